"""The numeric precision of a run: one decision, made once from the device and the setting.

What it decides must agree in three places, or step 0 fails ("Input type (c10::Half) and bias
type (float) should be the same" when half images meet float weights without autocast): the
autocast dtype, the dtype the loader normalises images into, and whether a GradScaler is on.
Imports only torch and numpy, so that `pipeline bench gpu` can use it without ffcv or Ray.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError

SETTINGS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    autocast: torch.dtype | None   # None: no autocast, everything in float32
    loader_dtype: type             # numpy dtype FFCV's NormalizeImage writes images in
    scaler: bool                   # a GradScaler (fp16 only: its gradients can underflow)
    description: str               # for the run's first line

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.autocast]


def has_bf16(compute_capability: tuple[int, int] | None) -> bool:
    """bf16 in hardware: NVIDIA compute capability 8.0 and later (A100, A10G, L4, H100). Older
    GPUs (V100 7.0, T4 7.5) only emulate it, slower than fp32 (torch's
    is_bf16_supported() says True for them by default, hence the capability)."""
    return compute_capability is not None and compute_capability[0] >= 8


def choose_precision(setting: str, device_type: str, compute_capability: tuple[int, int] | None = None,
                     device_name: str = "") -> Precision:
    """(setting auto|fp32|bf16|fp16, device) -> Precision.

    CPU: float32 throughout, whatever the setting (CPU autocast buys nothing for these models).
    GPU: auto = bf16 where the hardware has it, else fp32 (the reference's promise: fp16 needs a
    GradScaler and can diverge, so it is used only when asked); bf16 asked for on a GPU without
    it is refused. Mixed precision reads fp16 images (half the host-to-device bytes; autocast
    casts them to bf16 at the first convolution); fp32 reads float32 images.
    """
    if setting not in SETTINGS:
        raise UserError(f"--precision {setting}: expected one of {', '.join(SETTINGS)}")
    if device_type != "cuda":
        why = "" if setting in ("auto", "fp32") else f": {setting} is for GPUs"
        return Precision(None, np.float32, False,
                         f"fp32, no autocast, float32 images (CPU{why})")
    gpu = device_name or "this GPU"
    bf16 = has_bf16(compute_capability)
    cc = "" if compute_capability is None else \
        f", compute capability {compute_capability[0]}.{compute_capability[1]}"
    if setting == "bf16" and not bf16:
        raise UserError(f"--precision bf16: {gpu}{cc} has no bf16 (it needs compute capability "
                        "8.0+, e.g. A100, A10G, L4, H100); use --precision auto or fp32 (or fp16)")
    if setting == "auto":
        setting = "bf16" if bf16 else "fp32"
        why = f" (auto: {gpu} has bf16)" if bf16 else f" (auto: {gpu}{cc} has no bf16)"
    else:
        why = f" (asked; {gpu})"
    if setting == "bf16":
        return Precision(torch.bfloat16, np.float16, False,
                         f"bf16 autocast, fp16 images, no grad scaler{why}")
    if setting == "fp16":
        return Precision(torch.float16, np.float16, True,
                         f"fp16 autocast, fp16 images, grad scaler on{why}")
    return Precision(None, np.float32, False, f"fp32, no autocast, float32 images{why}")


def device_precision(setting: str, device: torch.device) -> Precision:
    """choose_precision for this process's device, read from torch."""
    if device.type != "cuda":
        return choose_precision(setting, device.type)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return choose_precision(setting, "cuda", torch.cuda.get_device_capability(index),
                            torch.cuda.get_device_name(index))
