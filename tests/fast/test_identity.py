"""A run's name stands for its settings: the same settings resume, others are refused in words."""
from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.storage import Storage
from pipeline.training.identity import claim

SETTINGS = {"data": "/d", "manifest_sha256": "a" * 64, "recipe": {"lr": 0.1, "epochs": 4}}


def test_same_settings_resume_other_settings_are_named(tmp_path):
    storage, folder = Storage(), str(tmp_path / "run")
    assert claim(storage, folder, "run.json", "run r", SETTINGS, restart=False) is False
    assert claim(storage, folder, "run.json", "run r", SETTINGS, restart=False) is True
    other = {**SETTINGS, "recipe": {"lr": 0.5, "epochs": 4}}
    with pytest.raises(UserError, match=r"recipe.lr 0.1 -> 0.5\): choose another --name"):
        claim(storage, folder, "run.json", "run r", other, restart=False)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"old")
    assert claim(storage, folder, "run.json", "run r", other, restart=True) is False
    assert not (tmp_path / "run" / "checkpoint.pt").exists()   # the old run is gone


def test_a_garbled_record_or_a_foreign_folder_is_not_resumed(tmp_path):
    storage = Storage()
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "run.json").write_text('{"data": "/d", "manif')
    with pytest.raises(UserError, match="run.json cannot be read, so run g cannot be resumed"):
        claim(storage, str(tmp_path / "garbled"), "run.json", "run g", SETTINGS, restart=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("someone else's")
    with pytest.raises(UserError, match="already holds files but no run.json"):
        claim(storage, str(tmp_path / "foreign"), "run.json", "run f", SETTINGS, restart=False)
