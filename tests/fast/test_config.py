"""Settings: defaults < config file < flags, flat or sectioned files, every key named in errors."""
from __future__ import annotations

import argparse

import pytest

from pipeline.config import (RegisterConfig, StageConfig, TrainConfig, TuneSettings, add_model_flags,
                             from_args)
from pipeline.errors import UserError


def parse(models: dict, argv: list[str], skip: dict | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    for section, model in models.items():
        add_model_flags(p, model, skip=(skip or {}).get(section, ()))
    return from_args(p.parse_args(argv), models, skip)


def test_flat_stage_file_is_read_and_flags_win(tmp_path):
    """`pipeline stage --config FILE` with the keys at the top level used to be ignored."""
    cfg = tmp_path / "stage.yaml"
    cfg.write_text("source: /src\ndest: /dst\nshard_size: 7\nmax_resolution: 64\n")
    got = parse({"stage": StageConfig}, ["--config", str(cfg), "--max-resolution", "96"])["stage"]
    assert (got.source, got.dest, got.shard_size, got.max_resolution) == ("/src", "/dst", 7, 96)
    assert got.writer.max_resolution == 96


def test_sectioned_file_and_nested_train_sections(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("stage: {source: /s, dest: /d}\n"
                   "train:\n  data: /d\n  recipe: {arch: resnet18, lr: 0.3}\n  batch_size: 16\n"
                   "  resources: {num_workers: 2-4}\n")
    train = parse({"train": TrainConfig}, ["--config", str(cfg), "--epochs", "5"])["train"]
    assert (train.recipe.arch, train.recipe.lr, train.recipe.batch_size, train.recipe.epochs) == \
        ("resnet18", 0.3, 16, 5)
    assert train.workers_range == (2, 4)
    assert train.explicit() == {"data", "arch", "lr", "batch_size", "epochs", "num_workers"}
    assert TrainConfig().explicit() == set()


def test_tune_flat_file_routes_each_key_to_its_model(tmp_path):
    cfg = tmp_path / "tune.yaml"
    cfg.write_text("data: /d\ntrials: 3\nlr: 0.2\nname: sweepy\nmin_val_top1: 0.4\n")
    got = parse({"train": TrainConfig, "tune": TuneSettings, "register": RegisterConfig},
                ["--config", str(cfg)], skip={"train": ("name",), "register": ("model",)})
    assert got["tune"].trials == 3 and got["tune"].name == "sweepy"
    assert got["train"].recipe.lr == 0.2 and got["train"].run.name == ""
    assert got["register"].min_val_top1 == 0.4


def test_errors_name_the_setting(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("arch: resnet99\n")
    with pytest.raises(UserError, match="arch.*resnet99"):
        parse({"train": TrainConfig}, ["--config", str(cfg)])
    cfg.write_text("lrr: 0.1\n")
    with pytest.raises(UserError, match="unknown setting 'lrr'"):
        parse({"train": TrainConfig}, ["--config", str(cfg)])
    cfg.write_text("train:\n  recipe: {lrr: 0.1}\n")
    with pytest.raises(UserError, match="lrr"):
        parse({"train": TrainConfig}, ["--config", str(cfg)])
    with pytest.raises(UserError, match="num_workers"):
        parse({"train": TrainConfig}, ["--num-workers", "4-2"])


def test_replace_keeps_sections_and_validates():
    base = TrainConfig(arch="resnet18", batch_size=32)
    again = base.replace(lr=0.5, storage="/runs")
    assert again.recipe.arch == "resnet18" and again.recipe.lr == 0.5 and again.run.storage == "/runs"
    with pytest.raises(UserError, match="batch_size"):
        base.replace(batch_size=0)
