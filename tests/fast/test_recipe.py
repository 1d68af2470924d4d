"""The recipe's schedules, as plain functions."""
from __future__ import annotations

import pytest

from pipeline.config import Recipe
from pipeline.training.trainer import lr_at, resolution_at


def test_triangular_lr_peaks_at_the_peak_epoch_scaled_per_256_images():
    r = Recipe(lr=0.5, epochs=10, lr_peak_epoch=2)
    assert lr_at(r, 2, 512) == pytest.approx(1.0)          # 0.5 x 512 / 256
    assert lr_at(r, 0, 256) == pytest.approx(0.5e-4)
    assert lr_at(r, 6, 256) == pytest.approx(0.25)         # halfway down
    assert lr_at(r, 10, 256) == 0.0


def test_step_and_cosine_schedules():
    step = Recipe(lr=0.1, lr_schedule="step", lr_step_length=3, lr_step_ratio=0.1)
    assert [round(lr_at(step, e, 256), 6) for e in (0, 2.9, 3, 6)] == [0.1, 0.1, 0.01, 0.001]
    cos = Recipe(lr=0.2, lr_schedule="cosine", epochs=10, lr_peak_epoch=2)
    assert lr_at(cos, 1, 256) == pytest.approx(0.1)        # warm-up
    assert lr_at(cos, 2, 256) == pytest.approx(0.2)
    assert lr_at(cos, 6, 256) == pytest.approx(0.1)        # cosine midpoint
    assert lr_at(cos, 10, 256) == pytest.approx(0.0, abs=1e-12)


def test_progressive_resizing_in_steps_of_32():
    r = Recipe(min_res=160, max_res=192, start_ramp=11, end_ramp=13)
    assert [resolution_at(r, e) for e in (0, 11, 12, 13, 15)] == [160, 160, 192, 192, 192]
    wide = Recipe(min_res=128, max_res=256, start_ramp=0, end_ramp=4)
    assert [resolution_at(wide, e) for e in range(5)] == [128, 160, 192, 224, 256]
