"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""
from __future__ import annotations

import colorsys
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.storage import Storage
from ray_internals import actor_ids, pending_placement_groups, train_workers  # noqa: F401

PIPELINE = str(Path(sys.executable).parent / "pipeline")


def upload_tree(storage: Storage, local: str, uri: str) -> None:
    for rel, _ in Storage().list(local):
        storage.upload_file(os.path.join(local, rel), f"{uri.rstrip('/')}/{rel}")


def run_cli(*args, env: dict | None = None, timeout: float = 600, check: bool = True):
    """Run the installed `pipeline` command; return the CompletedProcess."""
    full_env = dict(os.environ, TQDM_DISABLE="1", **(env or {}))
    proc = subprocess.run([PIPELINE, *map(str, args)], env=full_env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
                             f"{log_tail(proc.stdout)}")
    return proc


def log_tail(stdout: str, chars: int = 6000) -> str:
    """The end of the log file a quiet command wrote (its path is in its first line)."""
    m = re.search(r"output goes to (\S+\.log)", stdout)
    if not m or not os.path.exists(m.group(1)):
        return ""
    return f"\nlog {m.group(1)}:\n{Path(m.group(1)).read_text()[-chars:]}"


def wait_for(check, what: str, timeout: float = 300, proc=None):
    """Poll check() until it is true; fail naming `what` after `timeout` s, or at once when the
    process that should make it true has ended."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc is not None:
            assert proc.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def on_fresh_ports(start, what: str, attempts: int = 3):
    """start() a service on ports it chooses afresh each call (free_ports): a port found free
    may be taken by another process before the service binds it, and the service then fails to
    start; it is started again, on new ports, a bounded number of times."""
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except Exception as exc:   # noqa: BLE001 - any failure to start; the last one is raised
            if attempt == attempts:
                raise
            print(f"{what} did not start ({type(exc).__name__}: {exc}); again on new ports")


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def read_shard(path: str, res: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of one .beton through an FFCV Loader: (N x res x res x 3 uint8, N labels)."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(path, batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((res, res), ratio=224 / 256),
                                         ToTensor()],
                               "label": [IntDecoder(), ToTensor()]})
    images, labels = [], []
    for x, y in loader:
        images.append(x.numpy().copy())   # FFCV reuses batch memory: copy what is kept
        labels.append(y.numpy().reshape(-1).copy())
    return np.concatenate(images), np.concatenate(labels)


def class_from_colour(image: np.ndarray, n_classes: int) -> int:
    """Sample-data images carry their class as hue (see pipeline.sample_data.class_image)."""
    r, g, b = image.reshape(-1, 3).mean(0) / 255
    h, _, _ = colorsys.rgb_to_hsv(r, g, b)
    return int(round(h * n_classes)) % n_classes


def mlflow_client(uri: str):
    """A client for exactly this store: without registry_uri, MlflowClient falls back to the
    process-wide registry URI, which in-process registrations in other tests may have set."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose PNG header claims width x height pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims width x height pixels."""
    import struct

    from pipeline.data.sample_data import jpeg_bytes

    data = bytearray(jpeg_bytes(np.zeros((16, 16, 3), np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def grey16_png(value: int = 32896, size=(40, 60)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full(size, value, np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def events(run_dir: Path, kind: str) -> list[dict]:
    """A run's events of one kind (RUN_DIR/events/*-KIND-*.json), oldest first."""
    found = [json.loads(p.read_text()) for p in (run_dir / "events").glob(f"*-{kind}-*.json")]
    return sorted(found, key=lambda e: e["time"])


class Running:
    """A `pipeline` command running in the background, its output lines collected as they come
    (stdout and stderr together), so a test can wait for a line before it changes the cluster."""

    def __init__(self, *args, env: dict | None = None):
        import threading

        self.proc = subprocess.Popen([PIPELINE, *map(str, args)], env=dict(os.environ, **(env or {})),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout),
                                       daemon=True)
        self.reader.start()

    def wait_for_line(self, text: str, timeout: float = 300) -> str:
        return wait_for(lambda: next((x for x in self.lines if text in x), None),
                        f"a line with {text!r}", timeout, self.proc)

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.reader.join(timeout=10)
        return code, "".join(self.lines)


def expected_epoch_samples(data: str, epochs: int, seed: int, layouts) -> list[dict]:
    """epoch_samples (count, digest and views per epoch) of an undisturbed run whose train split
    is read under `layouts[epoch]` (placement.Layout), computed from the order alone: what a run
    on fresh caches reads; views from the stored image sizes in the shards (`data` a folder)."""
    from ffcv.reader import Reader

    from pipeline.data.manifest import read_manifest
    from pipeline.data.placement import SampleIds, digest_hex, epoch_reads
    from pipeline.data.views import views, views_digest

    manifest = read_manifest(Storage(), data)
    ids = SampleIds(manifest.splits["train"].shards)
    images = np.concatenate([Reader(os.path.join(data, path)).metadata["f0"] for path in ids.paths])
    out = []
    for epoch in range(epochs):
        layout = layouts[epoch]
        world = sum(len(g.ranks) for g in layout.groups)
        read = np.concatenate([epoch_reads(ids, layout, r, seed, epoch).gids for r in range(world)])
        rows = views(seed, epoch, read, images["height"][read], images["width"][read])
        out.append({"epoch": epoch + 1, "samples": len(read), "digest": digest_hex(ids.digest(read)),
                    "views": digest_hex(views_digest(ids, read, rows))})
    return out
