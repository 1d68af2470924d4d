"""`pipeline bench gpu`: skips in words without CUDA, runs where neither ffcv nor Ray can be
imported, and its measurements are the training run's own code (run here on the CPU, tiny)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

from pipeline.bench.gpu import add_arguments, largest_batch, measure

BLOCKED = "import sys\nfor m in ('ffcv', 'ray', 'mlflow', 'boto3', 'pyarrow', 'numba'): sys.modules[m] = None\n"


def test_skips_in_words_where_ffcv_and_ray_cannot_be_imported():
    code = BLOCKED + "from pipeline.cli import main\nsys.exit(main(['bench', '--verbose', 'gpu']))"
    # no CUDA device for this process, on a GPU machine too (there the whole measurement would
    # run: tests/test_gpu.py does that)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench gpu: skipped: no CUDA device here"), lines


def test_the_module_imports_no_ffcv_or_ray_on_the_way_to_a_measurement():
    code = BLOCKED + ("import torch, argparse\nfrom pipeline.bench import gpu\n"
                      "t = gpu.synthetic_trainer(torch.device('cpu'), arch='resnet18', "
                      "batch_size=2, num_classes=3)\n"
                      "print(gpu.images_per_second(t, 32, steps=1, warmup=0) > 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("True"), proc.stderr[-2000:]


def test_largest_batch_search():
    for limit_fit in (0, 8, 9, 100, 512, 1000, 2048, 5000):
        tried: list[int] = []

        def fits(b, tried=tried, limit_fit=limit_fit):
            tried.append(b)
            return b <= limit_fit
        got = largest_batch(fits, 2048)
        assert got == min(limit_fit, 2048) // 8 * 8, (limit_fit, got)
        assert all(b <= 2048 for b in tried) and len(tried) < 20
    assert largest_batch(lambda b: True, 100) == 96


def test_measure_runs_the_recipe_on_cpu():
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--arch", "resnet18", "--res", "32", "48", "--steps", "1", "--warmup", "0",
                         "--max-batch", "16", "--classes", "10", "--batch-size", "4"])
    torch.manual_seed(0)
    out = measure(torch.device("cpu"), args)
    assert [r["res"] for r in out["rows"]] == [32, 48]
    assert all(r["images_per_s"] > 0 and r["batch"] == 4 for r in out["rows"])
    assert set(out["one_step"]) == {"fp32", "bf16", "fp16"}
    assert all(line.startswith("ok: fp32") for line in out["one_step"].values())   # CPU: fp32
    assert out["largest_batch"] == {"res": 48, "batch": 16, "recipe_batch": 512,
                                    "recipe_batch_fits": False}


def test_a_driver_too_old_for_torch_s_cuda_is_named_not_skipped(monkeypatch):
    """torch says only that CUDA is unavailable when the driver is too old: the bench says
    which driver and which CUDA, and exits 2."""
    from pipeline.bench import gpu

    lines: list[str] = []
    monkeypatch.setattr(gpu, "say", lines.append)
    assert gpu.no_cuda("2.14.1", "13.0", driver="535.183.01") == 2
    assert len(lines) == 1 and "driver 535.183.01 is too old for torch's CUDA 13.0" in lines[0]
    assert gpu.no_cuda("2.14.1", "13.0", driver="580.95.05") == 0
    assert lines[1].startswith("bench gpu: skipped: no CUDA device here")
