"""A sweep searches what the user left open, within what the data can feed."""
from __future__ import annotations

import pytest

from pipeline.config import TrainConfig
from pipeline.errors import UserError
from pipeline.sweep.search_space import MIN_STEPS, load_search_space, plan_space


def test_given_settings_are_fixed_and_left_out_of_the_default_space():
    base = TrainConfig(data="/d", arch="resnet18", batch_size=32, num_workers=1)
    space, fixed, notes = plan_space(None, base, flags={"arch", "batch_size", "data"},
                                     explicit=base.explicit(), train_samples=600)
    assert "arch" not in space and "batch_size" not in space
    assert set(space) == {"lr", "weight_decay", "label_smoothing"}
    assert fixed["arch"] == "resnet18" and fixed["batch_size"] == 32
    assert any("batch_size 32 gives each of 1 worker(s) 18 steps" in n for n in notes)


def test_default_batches_fit_the_data():
    """600 images on one worker: 256 and 512 would be 2 and 1 steps per epoch."""
    base = TrainConfig(data="/d", num_workers=1)
    space, _, notes = plan_space(None, base, set(), base.explicit(), train_samples=600)
    batches = space["batch_size"]["choice"]
    assert batches and all(600 // b >= MIN_STEPS for b in batches)
    assert any("256, 512 left out" in n for n in notes)
    big = plan_space(None, base, set(), base.explicit(), train_samples=1_281_167)[0]
    assert big["batch_size"] == {"choice": [256, 512]}
    two = TrainConfig(data="/d", num_workers=4)
    space4, _, _ = plan_space(None, two, set(), two.explicit(), train_samples=40_000)
    assert space4["batch_size"] == 256    # 512 would be 19 steps for each of 4 workers


def test_user_space_naming_a_flag_is_an_error_and_a_bad_batch_a_warning(tmp_path):
    base = TrainConfig(data="/d", batch_size=32, num_workers=1)
    with pytest.raises(UserError, match="'batch_size', which --batch-size also sets"):
        plan_space({"batch_size": {"choice": [16, 64]}}, base, {"batch_size"}, base.explicit(), 600)
    base = TrainConfig(data="/d", num_workers=1)
    space, _, notes = plan_space({"batch_size": {"choice": [16, 512]}}, base, set(),
                                 base.explicit(), 600)
    assert space == {"batch_size": {"choice": [16, 512]}}
    assert any(n.startswith("warning: batch_size 512") for n in notes)
    space, _, notes = plan_space({"lr": {"grid": [0.1, 0.2]}}, base, set(), base.explicit(), 600)
    assert space == {"lr": {"grid": [0.1, 0.2]}}
    assert notes == ["warning: batch_size 512 gives each of 1 worker(s) 1 steps per epoch on 600 "
                     "training images (fewer than 20): trials may learn little"]


def test_search_space_file_is_checked(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("lr: {loguniform: [0.01, 1.0]}\nbatch_size: {grid: [16, 32]}\n")
    assert set(load_search_space(str(f))) == {"lr", "batch_size"}
    f.write_text("lr: {sometimes: [1, 2]}\n")
    with pytest.raises(UserError, match="lr: expected one of loguniform"):
        load_search_space(str(f))
    f.write_text("learning_rate: {choice: [1]}\n")
    with pytest.raises(UserError, match="'learning_rate' is not a training setting"):
        load_search_space(str(f))
    assert load_search_space("") is None
