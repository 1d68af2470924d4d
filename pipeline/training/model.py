"""The model: a torchvision ResNet with the FFCV recipe's BlurPool, and the head swap for fine-tuning."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BlurPoolConv2d(nn.Module):
    """A fixed 3x3 binomial blur before a strided convolution (anti-aliased downsampling)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
        self.conv = conv
        self.register_buffer("blur_filter", kernel.repeat(conv.in_channels, 1, 1, 1))

    def forward(self, x):
        blurred = F.conv2d(x, self.blur_filter.to(x.dtype), stride=1, padding=1,
                           groups=self.conv.in_channels)
        return self.conv(blurred)


def apply_blurpool(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, BlurPoolConv2d(child))
        else:
            apply_blurpool(child)


def build_model(arch: str, num_classes: int, blurpool: bool = True) -> nn.Module:
    from torchvision import models

    model = getattr(models, arch)(weights=None, num_classes=num_classes)
    if blurpool:
        apply_blurpool(model)
    return model


def load_weights(model: nn.Module, state: dict) -> str:
    """Load a state dict; when the class count differs, keep the new head (fine-tuning).
    Returns what was done, for the log."""
    head_w = model.fc.weight
    theirs = state.get("fc.weight")
    if theirs is not None and theirs.shape != head_w.shape:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        model.load_state_dict(state, strict=False)
        return f"loaded all but the head ({theirs.shape[0]} -> {head_w.shape[0]} classes)"
    model.load_state_dict(state)
    return "loaded all weights"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on BatchNorm parameters or biases (the FFCV recipe)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.modules.batchnorm._BatchNorm) or name == "bias":
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]
