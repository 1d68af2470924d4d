"""Fine-tuning loads every weight but the head, or refuses: never layers left at random."""
from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from pipeline.training.model import arch_of, build_model, load_weights


def _model(arch="resnet18", classes=10, blurpool=True, seed=0):
    torch.manual_seed(seed)
    return build_model(arch, classes, blurpool)


def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("theirs, ours, says", [
    (True, False, "blurpool on and this run has it off: drop --no-blurpool"),
    (False, True, "without blurpool and this run has it on: add --no-blurpool"),
])
def test_a_blurpool_mismatch_is_refused_naming_keys_and_setting(theirs, ours, says):
    state = _model(classes=10, blurpool=theirs, seed=1).state_dict()
    model = _model(classes=5, blurpool=ours)   # a head swap as well: still refused
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as err:
        load_weights(model, state)
    line = str(err.value)
    assert "\n" not in line and says in line
    assert "18 weights" in line and "layer2.0.conv1" in line and "and 15 more" in line
    assert _unchanged(model, before)


def test_another_arch_is_refused_naming_it():
    with pytest.raises(UserError, match="the checkpoint is a resnet50 and this run trains a "
                                        "resnet18: set --arch resnet50"):
        load_weights(_model("resnet18"), _model("resnet50").state_dict())


def test_a_missing_body_weight_is_refused_even_with_the_same_head():
    state = _model(seed=1).state_dict()
    del state["layer3.1.bn2.running_var"]
    with pytest.raises(UserError, match=r"1 weights .*missing layer3\.1\.bn2\.running_var"):
        load_weights(_model(), state)


def test_a_head_swap_loads_everything_else():
    source = _model(classes=10, seed=1)
    model = _model(classes=5, seed=2)
    head = model.fc.weight.detach().clone()
    note = load_weights(model, source.state_dict())
    assert note == "loaded all but the head (10 -> 5 classes)"
    theirs = source.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, theirs[k]), k
    assert torch.equal(model.fc.weight, head)


def test_the_same_model_loads_all_weights():
    source, model = _model(seed=1), _model(seed=2)
    assert load_weights(model, source.state_dict()) == "loaded all weights"
    assert _unchanged(model, source.state_dict())


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_arch_of_a_state_dict(arch):
    assert arch_of(build_model(arch, 3, False).state_dict()) == arch
    assert arch_of({"conv.weight": torch.zeros(1)}) is None


def test_the_driver_can_check_without_building_weights():
    from pipeline.training.model import init_state_mismatch

    state = _model(classes=10, blurpool=True).state_dict()
    assert init_state_mismatch("resnet18", 4, True, state) is None   # a head swap
    assert "drop --no-blurpool" in init_state_mismatch("resnet18", 4, False, state)
    assert "set --arch resnet18" in init_state_mismatch("resnet50", 10, True, state)
