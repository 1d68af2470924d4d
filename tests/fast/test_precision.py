"""The precision decision, for every device and setting (no GPU here: the device is a value)."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.training.precision import SETTINGS, choose_precision, has_bf16

A100, V100, T4, H100 = (8, 0), (7, 0), (7, 5), (9, 0)


@pytest.mark.parametrize("setting, cc, autocast, loader, scaler", [
    ("auto", A100, torch.bfloat16, np.float16, False),
    ("auto", H100, torch.bfloat16, np.float16, False),
    ("auto", V100, None, np.float32, False),        # the reference: fp32 where bf16 is missing
    ("auto", T4, None, np.float32, False),
    ("fp32", A100, None, np.float32, False),        # the old code fed fp16 images here
    ("fp32", V100, None, np.float32, False),
    ("bf16", A100, torch.bfloat16, np.float16, False),
    ("fp16", A100, torch.float16, np.float16, True),
    ("fp16", V100, torch.float16, np.float16, True),   # fp16 only when asked, with the scaler
    ("fp16", T4, torch.float16, np.float16, True),
])
def test_gpu_choice(setting, cc, autocast, loader, scaler):
    p = choose_precision(setting, "cuda", cc, "NVIDIA X")
    assert (p.autocast, p.loader_dtype, p.scaler) == (autocast, loader, scaler)
    assert "NVIDIA X" in p.description


@pytest.mark.parametrize("setting", SETTINGS)
def test_cpu_is_float32_without_autocast_whatever_the_setting(setting):
    p = choose_precision(setting, "cpu")
    assert (p.autocast, p.loader_dtype, p.scaler) == (None, np.float32, False)
    assert p.description.startswith("fp32") and "CPU" in p.description


@pytest.mark.parametrize("cc", [V100, T4, None])
def test_bf16_asked_on_a_gpu_without_it_is_refused_naming_the_device(cc):
    with pytest.raises(UserError) as err:
        choose_precision("bf16", "cuda", cc, "Tesla V100-SXM2-16GB")
    line = str(err.value)
    assert "\n" not in line and "Tesla V100-SXM2-16GB" in line and "--precision" in line


def test_the_auto_line_says_why():
    assert "(auto: NVIDIA A10G has bf16)" in choose_precision("auto", "cuda", (8, 6), "NVIDIA A10G").description
    assert "has no bf16" in choose_precision("auto", "cuda", T4, "Tesla T4").description


def test_bf16_needs_ampere_or_later():
    assert [has_bf16(c) for c in (None, (6, 1), V100, T4, A100, (8, 6), (8, 9), H100)] == \
        [False, False, False, False, True, True, True, True]


def test_unknown_setting_is_refused():
    with pytest.raises(UserError):
        choose_precision("fp8", "cuda", A100)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_half_images_into_float_weights_without_autocast_fail_as_the_old_fp32_did():
    """What step 0 of `--precision fp32` on a GPU did: fp16 images, autocast off."""
    with pytest.raises(RuntimeError, match="Half"):
        _model()(torch.zeros(2, 3, 8, 8, dtype=torch.float16))


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("cc", [A100, V100])
def test_every_choice_steps(setting, cc):
    """The chosen loader dtype, autocast and scaler make a training step that runs (autocast on
    the CPU here, with the dtype a GPU would get)."""
    try:
        p = choose_precision(setting, "cuda", cc, "GPU")
    except UserError:
        assert setting == "bf16" and cc == V100
        return
    model = _model()
    images = torch.from_numpy(np.random.rand(2, 3, 8, 8).astype(p.loader_dtype))
    cast = nullcontext() if p.autocast is None else torch.autocast("cpu", dtype=p.autocast)
    with cast:
        loss = nn.functional.cross_entropy(model(images), torch.tensor([0, 2]))
    scaler = torch.amp.GradScaler("cpu", enabled=p.scaler)
    scaler.scale(loss).backward()
    assert all(p_.grad is not None for p_ in model.parameters())
