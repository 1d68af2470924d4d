"""Settings whose accepted values or defaults follow the recipe: one GPU per worker, the arch's
weight decay."""
from __future__ import annotations

import pytest

from pipeline.config import TrainConfig, build, default_weight_decay
from pipeline.errors import UserError
from pipeline.sweep.search_space import plan_space


@pytest.mark.parametrize("value, got", [(0, 0), (1, 1), (1.0, 1), ("1", 1), ("0", 0)])
def test_a_worker_takes_zero_or_one_gpu(value, got):
    assert build(TrainConfig, {"gpus_per_worker": value}).resources.gpus_per_worker == got


@pytest.mark.parametrize("value", [2, 0.5, 8, -1, "two"])
def test_other_gpu_counts_are_refused_saying_to_raise_num_workers(value):
    with pytest.raises(UserError) as err:
        build(TrainConfig, {"gpus_per_worker": value}, "jobs/x.yaml")
    line = str(err.value)
    assert "\n" not in line and "gpus_per_worker" in line and "num_workers" in line


def test_weight_decay_follows_the_arch_unless_given():
    assert default_weight_decay("resnet50") == 1e-4 and default_weight_decay("resnet18") == 5e-5
    assert [TrainConfig(arch=a).recipe.weight_decay for a in
            ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")] == \
        [5e-5, 5e-5, 1e-4, 1e-4, 1e-4]
    assert TrainConfig().recipe.weight_decay == 1e-4   # resnet50 by default
    assert TrainConfig(arch="resnet50", weight_decay=5e-5).recipe.weight_decay == 5e-5


def test_the_arch_default_is_not_taken_for_a_given_value():
    cfg = TrainConfig(arch="resnet50")
    assert "weight_decay" not in cfg.explicit()
    # a copy with another arch (a sweep trial) takes that arch's value...
    assert cfg.replace(arch="resnet18").recipe.weight_decay == 5e-5
    assert "weight_decay" not in cfg.replace(arch="resnet18").explicit()
    # ...but a value someone gave stays
    given = TrainConfig(arch="resnet50", weight_decay=3e-5)
    assert given.replace(arch="resnet18").recipe.weight_decay == 3e-5
    # what workers receive (the full dump) keeps the value
    assert TrainConfig(**cfg.model_dump()).recipe.weight_decay == 1e-4


def test_the_default_search_space_still_searches_weight_decay_unless_given():
    base = TrainConfig(data="d", arch="resnet50", num_workers=1)
    space, fixed, _ = plan_space(None, base, set(), base.explicit(), 1_281_167)
    assert "weight_decay" in space and "weight_decay" not in fixed
    given = TrainConfig(data="d", arch="resnet50", weight_decay=1e-4)
    space, fixed, _ = plan_space(None, given, set(), given.explicit(), 1_281_167)
    assert "weight_decay" not in space


def test_shipped_configs_agree_with_the_arch_defaults():
    from pathlib import Path

    import yaml

    for path in sorted((Path(__file__).parents[2] / "jobs/configs").glob("imagenet-*.yaml")):
        train = yaml.safe_load(path.read_text())["train"]
        assert train["weight_decay"] == default_weight_decay(train["arch"]), path
