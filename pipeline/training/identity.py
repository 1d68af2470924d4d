"""What a run (or sweep) is: the settings that define it, recorded when it starts, so that a
name used again with other data or another recipe is refused instead of resuming, or handing
back, a run that is not the one asked for."""
from __future__ import annotations

import json

from ..errors import UserError
from ..storage import Storage, join


def defining(cfg, manifest_sha256: str) -> dict:
    """The settings that make a training run what it is (not where or on how many workers)."""
    return {"data": cfg.data, "manifest_sha256": manifest_sha256, "recipe": cfg.recipe.model_dump(),
            "init_from": cfg.run.init_from, "max_steps_per_epoch": cfg.loader.max_steps_per_epoch}


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


def claim(storage: Storage, folder: str, file: str, what: str, settings: dict,
          restart: bool) -> bool:
    """Record `settings` as what lives in `folder`; True when that folder already holds the same
    (a resume). Other settings are refused in one line, unless `restart` discards the old one."""
    uri = join(folder, file)
    if restart:
        for rel, _ in list(storage.list(folder)):
            storage.delete(join(folder, rel))
    elif storage.exists(uri):
        try:
            old = json.loads(storage.read_bytes(uri))
        except ValueError:
            old = None
        if not isinstance(old, dict):   # a garbled record proves nothing: not a resume
            raise UserError(f"{uri} cannot be read, so {what} cannot be resumed; choose another "
                            "--name, or restart it (--restart, or restart: true in the config "
                            "file) to discard it and start over")
        diff = differences(old, settings)
        if diff:
            shown = "; ".join(diff[:4]) + (f" (and {len(diff) - 4} more)" if len(diff) > 4 else "")
            raise UserError(f"{what} at {folder} was started with other settings ({shown}): "
                            "choose another --name, or restart it (--restart, or restart: true "
                            "in the config file) to discard it and start over")
        return True
    elif next(iter(storage.list(folder)), None) is not None:
        raise UserError(f"{folder} already holds files but no {file}: not a run this version "
                        "started; choose another --name, or restart it (--restart, or restart: "
                        "true in the config file) to discard them")
    storage.write_bytes(uri, json.dumps(settings, indent=1, sort_keys=True, default=str).encode())
    return False
