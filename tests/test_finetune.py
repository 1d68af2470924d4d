"""Real `pipeline train` runs on the GPU path's decisions that a CPU can show: fine-tuning
across a head swap (a validation split whose last batch holds one image on the way), a
checkpoint of the other blurpool setting refused, and an out-of-memory step ending the run
before epoch 1."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import last_json, run_cli

pytestmark = pytest.mark.slow   # Ray clusters, FFCV

TINY = ["--arch", "resnet18", "--batch-size", 16, "--min-res", 32, "--max-res", 32,
        "--val-res", 32, "--start-ramp", 0, "--end-ramp", 0, "--lr", 0.4, "--lr-peak-epoch", 1,
        "--num-workers", 1, "--json"]


def blurpool_checkpoint(folder: Path, classes: int = 10) -> Path:
    """A checkpoint of a ResNet-18 with BlurPool on `classes` classes, in the run's format."""
    from pipeline.training import checkpoint
    from pipeline.training.model import build_model

    torch.manual_seed(1)
    model = build_model("resnet18", classes, blurpool=True)
    folder.mkdir(parents=True)
    checkpoint.save(folder, model=model.state_dict(), optimizer={}, scaler={}, epoch=1, rng=[],
                    meta={"arch": "resnet18", "blurpool": True, "num_classes": classes})
    return folder


def error_line(proc) -> str:
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_fine_tune_across_a_head_swap_and_refuse_the_other_blurpool(train_data, ray_cluster,
                                                                    tmp_path):
    """The same checkpoint (BlurPool, 10 classes) fine-tunes a 4-class run: every weight but
    the head is loaded; with --no-blurpool it is refused in one line, before any epoch.
    The fine-tuning run validates with --val-batch-size 13 on 40 images: its last batch holds
    one image (Squeeze() made its label 0-d, and the val loop failed on it)."""
    ckpt = blurpool_checkpoint(tmp_path / "source")
    env = {"RAY_ADDRESS": ray_cluster.address}
    common = ["train", "--data", train_data, "--storage", tmp_path / "runs", "--epochs", 1,
              "--cache-dir", tmp_path / "cache", "--worker-resources", "trainer=1",
              "--init-from", ckpt, *TINY]

    refused = error_line(run_cli(*common, "--name", "refused", "--no-blurpool", env=env,
                                 check=False, timeout=300))
    assert "trained with blurpool on and this run has it off: drop --no-blurpool" in refused
    assert "18 weights" in refused and "layer2.0.conv1" in refused
    assert not list((tmp_path / "runs").glob("refused/epoch-*")), "an epoch was trained"

    val = json.loads((Path(train_data) / "manifest.json").read_text())["splits"]["val"]["samples"]
    assert val % 13 == 1   # 40 images: batches of 13, 13, 13 and 1
    proc = run_cli(*common, "--name", "tuned", "--val-batch-size", 13, env=env, timeout=400)
    out = last_json(proc.stdout)
    meta = json.loads((Path(out["checkpoint"]) / "meta.json").read_text())
    assert meta["metrics"]["val_images"] == val
    assert meta["num_classes"] == 4 and out["epochs_completed"] == 1
    logged = proc.stdout + proc.stderr + _log(proc.stdout)
    assert "loaded all but the head (10 -> 4 classes)" in logged
    assert "[train] precision: fp32, no autocast, float32 images (CPU)" in logged


def _log(stdout: str) -> str:
    from helpers import log_tail

    return log_tail(stdout, chars=200_000)


def test_out_of_memory_at_the_largest_step_ends_the_run_before_epoch_1(train_data, tmp_path):
    """The probe's out-of-memory (injected: no device here runs out on demand) ends the run in
    one line naming batch, resolution and what to lower; no epoch, no checkpoint, no retry.
    A local Ray of the command's own, so that its workers inherit the injecting variable."""
    from pipeline.training.probe import OOM_FAULT_ENV

    proc = run_cli("train", "--data", train_data, "--storage", tmp_path / "runs", "--name", "oom",
                   "--epochs", 2, "--cache-dir", tmp_path / "cache", "--max-failures", -1, *TINY,
                   env={"RAY_ADDRESS": "", OOM_FAULT_ENV: "1"}, check=False, timeout=300)
    line = error_line(proc)
    assert "batch 16 per worker at 32 px does not fit" in line and "before epoch 1" in line
    assert "lower --batch-size (e.g. 8) or --max-res" in line
    run_dir = tmp_path / "runs" / "oom"
    assert not list(run_dir.glob("epoch-*"))
    assert len(list((run_dir / "events").glob("*-failure-*.json"))) == 1   # never retried
    assert not list((run_dir / "events").glob("*-first_step-*.json"))
