"""What a run (or sweep) is: the settings that define it, recorded when it starts, so that a
name used again with other data or another recipe is refused instead of resuming, or handing
back, a run that is not the one asked for."""
from __future__ import annotations

import json

from ..errors import UserError
from ..storage import Storage, join


def defining(cfg, manifest_sha256: str) -> dict:
    """The settings that make a training run what it is (not where, nor on how many workers of
    the moment: but the most it may have fixes the global batch, and so the lr)."""
    return {"data": cfg.data, "manifest_sha256": manifest_sha256, "recipe": cfg.recipe.model_dump(),
            "init_from": cfg.run.init_from, "max_steps_per_epoch": cfg.loader.max_steps_per_epoch,
            "global_batch": cfg.global_batch, "most_workers": cfg.workers_range[1]}


def batch_changed(old: dict, new: dict) -> str | None:
    """One line when a resume would change the global batch (another most --num-workers)."""
    if old.get("global_batch") == new.get("global_batch") or "global_batch" not in old:
        return None
    return (f"was started with a global batch of {old['global_batch']} (at most "
            f"{old.get('most_workers')} workers); this command's is {new['global_batch']} (at "
            f"most {new.get('most_workers')}), which would change the lr schedule mid-run: resume "
            f"with --num-workers N-{old.get('most_workers')} (any fewer may run), or start over "
            "with --restart")


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
    elif check(storage, folder, file, what, settings):
        return True
    storage.write_bytes(uri, json.dumps(settings, indent=1, sort_keys=True, default=str).encode())
    return False


def check(storage: Storage, folder: str, file: str, what: str, settings: dict) -> bool:
    """claim's refusals without writing anything: True when `folder` holds the same settings
    (a resume), False when it holds nothing yet; other settings raise a UserError."""
    uri = join(folder, file)
    if storage.exists(uri):
        try:
            old = json.loads(storage.read_bytes(uri))
        except ValueError:
            old = None
        if not isinstance(old, dict):   # a garbled record proves nothing: not a resume
            raise UserError(f"{uri} cannot be read, so {what} cannot be resumed; choose another "
                            "--name, or restart it (--restart, or restart: true in the config "
                            "file) to discard it and start over")
        # a record from before the global batch was part of it: the cursor's check stands
        # (worker.check_cursor)
        diff = differences(old, {k: v for k, v in settings.items()
                                 if k in old or k not in ("global_batch", "most_workers")})
        batch = batch_changed(old, settings)
        if batch:
            raise UserError(f"{what} at {folder} {batch}")
        if diff:
            shown = "; ".join(diff[:4]) + (f" (and {len(diff) - 4} more)" if len(diff) > 4 else "")
            raise UserError(f"{what} at {folder} was started with other settings ({shown}): "
                            "choose another --name, or restart it (--restart, or restart: true "
                            "in the config file) to discard it and start over")
        return True
    if next(iter(storage.list(folder)), None) is not None:
        raise UserError(f"{folder} already holds files but no {file}: not a run this version "
                        "started; choose another --name, or restart it (--restart, or restart: "
                        "true in the config file) to discard them")
    return False
