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


HEAD = "fc."
# blocks per stage and block type -> torchvision ResNet
RESNETS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
           ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
           ("bottleneck", (3, 8, 36, 3)): "resnet152"}


def arch_of(state: dict) -> str | None:
    """The torchvision ResNet a state dict comes from, by its blocks per stage and block type."""
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")})
                   for i in range(1, 5))
    kind = "bottleneck" if any(k.startswith("layer1.0.conv3.") for k in state) else "basic"
    return RESNETS.get((kind, blocks))


def has_blurpool(state: dict) -> bool:
    return any(k.endswith(".blur_filter") for k in state)


def weights_mismatch(model: nn.Module, state: dict) -> str | None:
    """Why `state` cannot initialise `model` beyond its head, in one line; None when it can.
    Only the head (fc.*) may differ, and only in its class count."""
    ours = model.state_dict()
    head_swap = any(k.startswith(HEAD) and k in state and state[k].shape != v.shape
                    for k, v in ours.items())
    skip = (lambda k: k.startswith(HEAD)) if head_swap else (lambda k: False)
    wrong = [f"missing {k}" for k in ours if k not in state and not skip(k)]
    wrong += [f"unexpected {k}" for k in state if k not in ours and not skip(k)]
    wrong += [f"{k} is {tuple(state[k].shape)} not {tuple(v.shape)}" for k, v in ours.items()
              if k in state and not skip(k) and state[k].shape != v.shape]
    if not wrong:
        return None
    theirs_arch, our_arch = arch_of(state), arch_of(ours)
    why = []
    if theirs_arch != our_arch:
        why.append(f"the checkpoint is a {theirs_arch or 'model of another kind'} and this run "
                   f"trains a {our_arch}: set --arch {theirs_arch}" if theirs_arch else
                   f"the checkpoint is not a torchvision ResNet like this run's {our_arch}")
    if has_blurpool(state) != has_blurpool(ours):
        why.append("the checkpoint was trained with blurpool on and this run has it off: drop "
                   "--no-blurpool (blurpool: true)" if has_blurpool(state) else
                   "the checkpoint was trained without blurpool and this run has it on: add "
                   "--no-blurpool (blurpool: false)")
    shown = ", ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
    return (f"--init-from: {len(wrong)} weights of the checkpoint do not fit this model beyond "
            f"its head ({shown}); " + ("; ".join(why) or "it was trained with other model "
                                       "settings (arch, blurpool)") + "; nothing was loaded")


def init_state_mismatch(arch: str, num_classes: int, blurpool: bool, state: dict) -> str | None:
    """weights_mismatch for the model a run will build, without building its weights (meta
    device): for the driver, to refuse before any worker starts."""
    with torch.device("meta"):
        model = build_model(arch, num_classes, blurpool)
    return weights_mismatch(model, state)


def load_weights(model: nn.Module, state: dict) -> str:
    """Load a state dict to fine-tune from; when the class count differs, keep the new head.
    Anything else that differs is refused (a UserError naming the keys and the setting that
    explains them): non-strict loading would leave those layers at random weights.
    Returns what was done, for the log."""
    from ..errors import UserError

    why = weights_mismatch(model, state)
    if why is not None:
        raise UserError(why)
    head_w = model.fc.weight
    theirs = state.get("fc.weight")
    if theirs is not None and theirs.shape != head_w.shape:
        body = {k: v for k, v in state.items() if not k.startswith(HEAD)}
        result = model.load_state_dict(body, strict=False)
        assert all(k.startswith(HEAD) for k in result.missing_keys) and not result.unexpected_keys
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
