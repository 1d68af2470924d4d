"""`pipeline stage` end to end: every layout, local and S3 (SeaweedFS), on a 3-node Ray cluster."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (PIPELINE, Running, class_from_colour, grey16_png, jpeg_claiming, last_json, png_claiming,
                     read_shard, run_cli, upload_tree, wait_for)

from ray_internals import stage_shard_tasks

from pipeline.ops.local_services import free_ports
from pipeline.data.manifest import read_manifest
from pipeline.data.stage import HOLD_ENV
from pipeline.data.shards import plan_digest, plan_shards, shard_task_memory
from pipeline.data.source import discover
from pipeline.storage import sha256_file
from pipeline.storage import UPLOAD_HOLD_ENV, Storage

pytestmark = pytest.mark.slow   # real services / Ray clusters

LAYOUTS = ["folders", "kaggle", "devkit", "tars"]
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 6, 3
# --bad-files puts png, cmyk, grey, truncated, empty into classes 0,1,2,3,0: the first three are
# staged as RGB, the last two skipped.
EXPECTED_TRAIN = [TRAIN_PER_CLASS + 1] * 3 + [TRAIN_PER_CLASS]


def download_dataset(storage: Storage, uri: str, to: Path) -> Path:
    for rel, _ in storage.list(uri):
        storage.download_file(f"{uri.rstrip('/')}/{rel}", to / rel)
    return to


def check_staged(storage: Storage, dest: str, local_copy: Path, layout: str) -> None:
    manifest = read_manifest(storage, dest)
    assert manifest.source["layout"] == layout
    assert [c.index for c in manifest.classes] == list(range(CLASSES))
    assert manifest.classes[0].name and manifest.classes[0].wnid.startswith("n")
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest.skipped}
    assert len(reasons) == 2, manifest.skipped
    assert any("truncated" in r for r in reasons.values())
    assert any("empty file" == r for r in reasons.values())
    assert manifest.splits["train"].samples == sum(EXPECTED_TRAIN)
    assert manifest.splits["val"].samples == CLASSES * VAL_PER_CLASS

    for split, expected in (("train", EXPECTED_TRAIN), ("val", [VAL_PER_CLASS] * CLASSES)):
        counts = collections.Counter()
        agree = total = 0
        for shard in manifest.splits[split].shards:
            path = local_copy / shard.path
            assert path.stat().st_size == shard.bytes
            assert sha256_file(path) == shard.sha256
            images, labels = read_shard(str(path))
            assert len(labels) == shard.samples
            counts.update(labels.tolist())
            agree += sum(class_from_colour(im, CLASSES) == lab for im, lab in zip(images, labels))
            total += len(labels)
        assert [counts[c] for c in range(CLASSES)] == expected, (split, counts)
        # The pixels carry their class as colour: labels must match what was staged (the one
        # greyscale file has no colour to tell).
        assert agree >= total - 1, (split, agree, total)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stage_layout_to_local_path(layout, sample_sets, ray_cluster, tmp_path):
    dest = tmp_path / "staged"
    proc = run_cli("stage", "--source", sample_sets[layout], "--dest", dest, "--shard-size", 7,
                   "--json", env={"RAY_ADDRESS": ray_cluster.address})
    summary = last_json(proc.stdout)
    assert summary["shards_written"] > 0
    assert summary["skipped"] == 2
    # images (and so images/s) count what was staged, not the files skipped on the way
    assert summary["images"] == sum(EXPECTED_TRAIN) + CLASSES * VAL_PER_CLASS
    check_staged(Storage(), str(dest), dest, layout)


@pytest.mark.parametrize("layout", ["devkit", "tars"])   # files by key, and tars by byte range
def test_stage_layout_s3_to_s3(layout, sample_sets, s3, bucket, s3_storage, ray_cluster, tmp_path):
    """Source and dest on SeaweedFS; tars are read in place through byte ranges."""
    src, dest = f"s3://{bucket}/imagenet", f"s3://{bucket}/staged/imagenet-64"
    upload_tree(s3_storage, sample_sets[layout], src)
    proc = run_cli("stage", "--source", src, "--dest", dest, "--shard-size", 7, "--json",
                   env={**s3.env(), "RAY_ADDRESS": ray_cluster.address})
    summary = last_json(proc.stdout)
    # 7 shards over three 1-CPU nodes, spread: more than one node did the work.
    assert summary["nodes"] > 1, summary
    check_staged(s3_storage, dest, download_dataset(s3_storage, dest, tmp_path / "copy"), layout)
    assert s3.secret_key not in proc.stdout + proc.stderr
    assert s3.secret_key not in s3_storage.read_text(f"{dest}/manifest.json")

    # A second run over the complete dest uploads nothing: every object keeps its ETag and time.
    client = s3_storage.client

    def objects():
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="staged/")
        return {o["Key"]: (o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])}

    if layout == "tars":
        # read about once (counted where Storage reads), and the same images and labels as the
        # listing of the same archives on disk gives; each shard task asked for its memory
        manifest = read_manifest(s3_storage, dest)
        assert summary["source_bytes"] == manifest.source["bytes"] == \
            sum(p.stat().st_size for p in Path(sample_sets[layout]).iterdir())
        assert 0.5 < summary["source_bytes_read"] / summary["source_bytes"] <= 1.1, summary
        assert manifest.source["bytes_read"] == summary["source_bytes_read"]
        plans = plan_shards(discover(Storage(), sample_sets[layout]), manifest.writer, 7)
        assert plan_digest(plans, [c.wnid for c in manifest.classes]) == manifest.plan
        asked = {t.required_resources.get("memory")
                 for t in stage_shard_tasks(ray_cluster.address, detail=True)}
        assert {shard_task_memory(p, manifest.writer) for p in plans} <= asked

    before = objects()
    time.sleep(1.1)  # LastModified has one-second resolution
    again = last_json(run_cli("stage", "--source", src, "--dest", dest, "--shard-size", 7, "--json",
                              env={**s3.env(), "RAY_ADDRESS": ray_cluster.address}).stdout)
    assert again["shards_written"] == 0 and again["shards_reused"] == summary["shards_written"]
    assert objects() == before


def test_a_second_stage_of_unchanged_archives_lists_nothing(sample_sets, s3, bucket, s3_storage,
                                                            ray_cluster, tmp_path):
    """On S3, counted where Storage makes its requests: the second run of the same command makes
    one HEAD per archive and no read of the source, and says the data is staged; an archive
    written again (same images, other bytes) is noticed and listed again; one with other images
    is refused without --replace, as before."""
    import tarfile

    src, dest = f"s3://{bucket}/imagenet", f"s3://{bucket}/staged/imagenet-64"
    upload_tree(s3_storage, sample_sets["tars"], src)
    archives = len(list(Path(sample_sets["tars"]).iterdir()))
    args = ("stage", "--source", src, "--dest", dest, "--shard-size", 7, "--json")
    env = {**s3.env(), "RAY_ADDRESS": ray_cluster.address}
    first = last_json(run_cli(*args, env=env).stdout)
    assert first["listing_gets"] > 0 and first["source_gets"] > first["listing_gets"], first
    assert not first["already_staged"]
    manifest = read_manifest(s3_storage, dest)
    assert set(manifest.source["files"]) == {p.name for p in Path(sample_sets["tars"]).iterdir()}

    proc = run_cli(*args, env=env)
    again = last_json(proc.stdout)
    assert again["already_staged"] and "nothing to do" in proc.stdout + proc.stderr
    assert (again["source_gets"], again["listing_gets"], again["source_lists"]) == (0, 0, 0)
    assert again["source_heads"] == archives
    assert again["shards_written"] == 0
    assert again["shards_reused"] == sum(len(s.shards) for s in manifest.splits.values())

    # the val archive written again with padding after its end: same images, other ETag
    val = tmp_path / "ILSVRC2012_img_val.tar"
    s3_storage.download_file(f"{src}/{val.name}", val)
    val.write_bytes(val.read_bytes() + bytes(10240))
    s3_storage.upload_file(val, f"{src}/{val.name}")
    third = last_json(run_cli(*args, env=env).stdout)
    assert not third["already_staged"] and third["listing_gets"] > 0, third
    assert third["shards_written"] == 0
    assert read_manifest(s3_storage, dest).source["files"][val.name][0] == val.stat().st_size

    # one image fewer: other images, refused in words as before
    smaller = tmp_path / "smaller.tar"
    with tarfile.open(val) as old, tarfile.open(smaller, "w") as new:
        for m in old.getmembers()[1:]:
            new.addfile(m, old.extractfile(m))
    s3_storage.upload_file(smaller, f"{src}/{val.name}")
    proc = run_cli(*args, env=env, check=False)
    assert proc.returncode == 2 and "--replace" in proc.stderr, proc.stderr[-2000:]


def test_resume_after_kill_matches_uninterrupted_run(sample_sets, ray_cluster, tmp_path):
    """Ctrl-C, then SIGTERM, then kill -9 mid-stage: the first two end in words (exit 130 and
    143, how to resume), none leaves a manifest, and the next run finishes what is missing."""
    src = sample_sets["folders"]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address, TQDM_DISABLE="1")
    args = ["stage", "--source", src, "--shard-size", "1", "--workers", "1", "--json"]
    reference = tmp_path / "reference"
    planned = last_json(run_cli(*args, "--dest", reference).stdout)["shards_written"]
    assert planned == 4 * 6 + 5 + 4 * 3   # one shard per planned image (bad files included)

    dest = tmp_path / "interrupted"

    def records():
        return len(list(dest.glob(".parts/*/*.json")))

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        # each run is held once it has written 3 shards (nothing in flight with --workers 1)
        # until the signal ends it: interrupted mid-stage however fast the machine
        hold = tmp_path / f"hold-{sig.name}"
        target = records() + 3
        proc = subprocess.Popen([PIPELINE, *args, "--dest", str(dest)], text=True,
                                env={**env, HOLD_ENV: f"3:{hold}"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        wait_for(lambda: Path(f"{hold}.held").exists(), "the stage held at its third shard",
                 300, proc)
        assert records() == target
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            continue
        proc.send_signal(sig)   # the stage's own process, as Ctrl-C or `kill` reach it
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, (sig, stderr[-3000:])
        name = signal.Signals(sig).name
        assert f"interrupted ({name}): the shards written so far are kept; re-run the same " \
               "command to finish" in stderr, stderr[-3000:]
        assert "Traceback" not in stderr
        assert not (dest / "manifest.json").exists()
    done_before = records()
    assert not (dest / "manifest.json").exists()
    assert done_before == 9 < planned
    # a reader refuses the half-staged dataset
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="manifest.json is missing"):
        read_manifest(Storage(), str(dest))

    summary = last_json(run_cli(*args, "--dest", dest).stdout)
    assert summary["shards_reused"] == done_before   # each run was held with none in flight
    assert summary["shards_written"] + summary["shards_reused"] == planned
    assert (dest / "manifest.json").read_text() == (reference / "manifest.json").read_text()
    for shard in reference.glob("*/shard-*.beton"):
        assert sha256_file(shard) == sha256_file(dest / shard.relative_to(reference))


def test_corrupt_shard_is_redone(sample_sets, ray_cluster, tmp_path):
    """...and a garbled manifest is refused, and so is a source that changed since (both in
    words; --replace stages over them)."""
    src = tmp_path / "src"
    subprocess.run(["cp", "-r", sample_sets["devkit"], src], check=True)
    dest = tmp_path / "staged"
    args = ["stage", "--source", src, "--dest", dest, "--shard-size", 10, "--json"]
    env = {"RAY_ADDRESS": ray_cluster.address}
    first = last_json(run_cli(*args, env=env).stdout)
    manifest = json.loads((dest / "manifest.json").read_text())
    victim = dest / manifest["splits"]["train"]["shards"][1]["path"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF   # same size, one flipped byte: only sha256 can tell
    victim.write_bytes(bytes(data))
    (dest / manifest["splits"]["val"]["shards"][0]["path"]).unlink()
    again = last_json(run_cli(*args, env=env).stdout)
    assert again["shards_written"] == 2
    assert again["shards_reused"] == first["shards_written"] - 2
    assert json.loads((dest / "manifest.json").read_text()) == manifest

    # A garbled manifest is refused in words; --replace stages over it.
    (dest / "manifest.json").write_text('{"source": "half a manif')
    proc = run_cli(*args, env=env, check=False)
    assert proc.returncode == 2 and "manifest.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    replaced = last_json(run_cli(*args, "--replace", env=env).stdout)
    assert replaced["shards_reused"] == first["shards_written"]
    assert json.loads((dest / "manifest.json").read_text()) == manifest

    # The source changed (one training image fewer): `pipeline stage` refuses to stage it over
    # the dataset of the old one, naming --replace, and leaves that dataset as it was.
    next(src.glob("train/*/*.JPEG")).unlink()
    line = _stage_error(src, dest, env, extra=("--shard-size", 10))
    assert f"{dest} already holds a dataset staged from {src} with other images or settings" in line
    assert "--replace" in line
    assert json.loads((dest / "manifest.json").read_text()) == manifest


def _stage_error(src, dest, env=None, extra=()):
    proc = run_cli("stage", "--source", src, "--dest", dest, *extra, env=env, check=False,
                   timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_clear_errors_for_bad_local_sources(sample_sets, tmp_path):
    assert "does not exist" in _stage_error(tmp_path / "nowhere", tmp_path / "d1")
    (tmp_path / "empty").mkdir()
    assert "is empty" in _stage_error(tmp_path / "empty", tmp_path / "d2")
    (tmp_path / "junk" / "stuff").mkdir(parents=True)
    (tmp_path / "junk" / "stuff" / "a.txt").write_text("x")
    assert "layout not recognised" in _stage_error(tmp_path / "junk", tmp_path / "d3")
    # devkit layout without its devkit: flat val images with no labels anywhere
    nolabels = tmp_path / "nolabels"
    subprocess.run(["cp", "-r", sample_sets["devkit"], nolabels], check=True)
    subprocess.run(["rm", "-r", nolabels / "ILSVRC2012_devkit_t12"], check=True)
    msg = _stage_error(nolabels, tmp_path / "d4")
    assert "val labels missing" in msg and "--splits train" in msg


def test_clear_errors_for_s3_problems(sample_sets, s3, bucket, s3_storage, tmp_path):
    src = f"s3://{bucket}/imagenet"
    upload_tree(s3_storage, sample_sets["folders"], src)
    dest = f"s3://{bucket}/staged"
    wrong_secret = {**s3.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret-123"}
    msg = _stage_error(src, dest, wrong_secret)
    assert "SignatureDoesNotMatch" in msg and "secret key" in msg
    assert "not-the-secret-123" not in msg and s3.secret_key not in msg
    wrong_id = {**s3.env(), "AWS_ACCESS_KEY_ID": "NOSUCHKEY"}
    assert "InvalidAccessKeyId" in _stage_error(src, dest, wrong_id)
    assert "does not exist" in _stage_error(src, f"s3://no-such-bucket-{bucket}/x", s3.env())
    port = free_ports(1)[0]
    unreachable = {**s3.env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    assert "cannot reach the S3 endpoint" in _stage_error(src, dest, unreachable)
    assert "is empty" in _stage_error(f"s3://{bucket}/nothing-here", dest, s3.env())


def test_untrusted_images_are_skipped_and_recorded(ray_cluster, tmp_path):
    """Decompression bombs never take a shard task down; a 16-bit PNG keeps its grey."""
    from pipeline.data.sample_data import generate

    src = tmp_path / "src"
    generate(str(src), "folders", classes=2, train_per_class=4, val_per_class=1, seed=5)
    wnid = sorted(p.name for p in (src / "train").iterdir())[0]
    folder = src / "train" / wnid
    (folder / f"{wnid}_bomb1.JPEG").write_bytes(png_claiming(65000, 65000))
    (folder / f"{wnid}_bomb2.JPEG").write_bytes(png_claiming(40000, 40000))
    (folder / f"{wnid}_bomb3.JPEG").write_bytes(jpeg_claiming(65000, 65000))
    (folder / f"{wnid}_grey16.JPEG").write_bytes(grey16_png(32896, (300, 400)))
    dest = tmp_path / "staged"
    out = last_json(run_cli("stage", "--source", src, "--dest", dest, "--max-resolution", 64,
                            "--json", env={"RAY_ADDRESS": ray_cluster.address}).stdout)
    assert out["splits"]["train"] == 2 * 4 + 1 and out["skipped"] == 3
    manifest = json.loads((dest / "manifest.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {f"{wnid}_bomb{i}.JPEG" for i in (1, 2, 3)}
    assert all("decompression bomb" in r for r in reasons.values()), reasons
    greys = 0
    for shard in manifest["splits"]["train"]["shards"]:
        images, _ = read_shard(str(dest / shard["path"]))
        for im in images:
            spread = im.reshape(-1, 3).astype(int)
            if abs(spread.mean() - 128) <= 2 and spread.std() < 2:
                greys += 1
    assert greys == 1   # the 16-bit grey image, as grey, not white


def test_s3_outage_mid_stage_is_ridden_out_then_fails_in_words(sample_sets, s3, ray_cluster, tmp_path):
    """SeaweedFS killed mid-stage (the stage held at its second shard until the server is
    down) and back once the stage has met the outage (the warning line): it retries and
    finishes byte-identical to an undisturbed run. Down for longer than --s3-outage-minutes:
    the stage waits that long (not less) and then ends in one line naming the endpoint; the
    next run finishes the dataset."""
    from pipeline.ops.local_services import start_seaweedfs
    from pipeline.storage import S3Settings

    server = start_seaweedfs(tmp_path / "weed", s3.access_key, s3.secret_key, buckets=("outage",))
    client = lambda: S3Settings(server.endpoint, s3.access_key, s3.secret_key).client()  # noqa: E731
    env = {**s3.env(), "AWS_ENDPOINT_URL": server.endpoint, "RAY_ADDRESS": ray_cluster.address}
    args = ["stage", "--source", sample_sets["tars"], "--shard-size", 5, "--workers", 1, "--json"]
    reference = last_json(run_cli(*args, "--dest", tmp_path / "reference", env=env).stdout)
    warning = f"[s3] warning: {server.endpoint} is not answering"

    try:
        # held after its second shard (nothing in flight with --workers 1) until the server is
        # down: the outage comes mid-stage however fast the machine
        hold = tmp_path / "hold-short"
        run = Running(*map(str, args), "--dest", "s3://outage/short",
                      env={**env, "TQDM_DISABLE": "1", HOLD_ENV: f"2:{hold}"})
        wait_for(lambda: Path(f"{hold}.held").exists(), "the stage held at its second shard",
                 300, run.proc)
        server.stop(signal.SIGKILL)
        hold.touch()
        run.wait_for_line(warning)   # met; back within --s3-outage-minutes (3)
        server = server.restart()
        code, out = run.finish()
        assert code == 0, out[-3000:]
        assert last_json(out)["splits"] == reference["splits"]
        staged = client().get_object(Bucket="outage", Key="short/manifest.json")["Body"].read()
        assert staged == (tmp_path / "reference" / "manifest.json").read_bytes()

        bound = 0.3 * 60
        hold = tmp_path / "hold-long"
        proc = subprocess.Popen([PIPELINE, *map(str, args), "--dest", "s3://outage/long",
                                 "--s3-outage-minutes", "0.3"],
                                env={**os.environ, **env, "TQDM_DISABLE": "1",
                                     HOLD_ENV: f"2:{hold}"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: Path(f"{hold}.held").exists(), "the stage held at its second shard",
                 300, proc)
        down = time.monotonic()
        server.stop(signal.SIGKILL)
        hold.touch()
        stdout, stderr = proc.communicate(timeout=300)
        waited = time.monotonic() - down
        assert proc.returncode == 2, stderr[-3000:]
        assert warning in stdout + stderr
        # every call that met the outage rode it out for the whole bound before giving up
        assert waited >= bound, waited
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"cannot reach the S3 endpoint {server.endpoint}" in errors[0]
        assert f"(waited {bound:.0f} s)" in errors[0]
        assert "Traceback" not in stderr
        server = server.restart()
        again = run_cli(*args, "--dest", "s3://outage/long", env=env)
        assert last_json(again.stdout)["splits"] == reference["splits"]
    finally:
        server.stop()


def test_a_stage_killed_mid_upload_leaves_an_upload_that_the_next_run_aborts(
        s3, bucket, s3_storage, ray_cluster, tmp_path):
    """Shards above a lowered multipart threshold: the shard task's worker is killed while it
    uploads one (held after its first part is under way, found through the cluster's State
    API). Ray runs the task again and the stage finishes, but the killed upload stays
    unfinished in the bucket (storage is billed for its parts) until the next run aborts it."""

    from pipeline.data.sample_data import generate

    src = tmp_path / "big"   # images up to 1600 px, stored raw at 1024 px: ~16 MB shards
    generate(str(src), "folders", classes=2, train_per_class=12, val_per_class=0, seed=4,
             max_side=1600)
    dest = f"s3://{bucket}/staged"
    args = ["stage", "--source", src, "--dest", dest, "--splits", "train", "--max-resolution",
            1024, "--compress-probability", 0, "--shard-size", 8, "--workers", 1, "--json"]
    env = {**s3.env(), "RAY_ADDRESS": ray_cluster.address,
           "PIPELINE_MULTIPART_THRESHOLD": str(1024 * 1024)}
    client = s3_storage.client
    hold = tmp_path / "hold"

    def uploads():
        return {u["UploadId"]: u["Key"] for u in
                client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}

    proc = subprocess.Popen([PIPELINE, *map(str, args)], env={**os.environ, **env,
                            "TQDM_DISABLE": "1", UPLOAD_HOLD_ENV: str(hold)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: Path(f"{hold}.held").exists(), "a shard upload held mid-way", 300, proc)
    killed = uploads()
    assert killed, "no multipart upload under way while one was held"
    workers = wait_for(lambda: {t.worker_pid for t in stage_shard_tasks(
        ray_cluster.address, "RUNNING") if t.worker_pid}, "the held task in the State API", 120, proc)
    assert len(workers) == 1, workers   # --workers 1
    os.kill(workers.pop(), signal.SIGKILL)
    hold.touch()   # the task Ray runs again uploads at once
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]   # Ray ran the killed task again
    first = last_json(stdout)
    assert first["splits"] == {"train": 24}
    assert set(killed) <= set(uploads()), "the stage itself left the unfinished upload"

    again = run_cli(*args, env=env)
    assert f"aborted {len(killed)} unfinished upload(s)" in again.stdout
    assert not uploads()
    assert last_json(again.stdout)["shards_reused"] == 3


def test_one_stage_at_a_time_per_destination(sample_sets, ray_cluster, tmp_path):
    """Two stages into one destination at once (quality 90 and 40): the second refuses in one
    line, the first finishes, and the dataset is the first's."""
    dest = tmp_path / "staged"
    hold = tmp_path / "hold"   # the first is held at its third shard until the second refused
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address, TQDM_DISABLE="1",
               **{HOLD_ENV: f"3:{hold}"})
    first = subprocess.Popen([PIPELINE, "stage", "--source", sample_sets["folders"], "--dest",
                              str(dest), "--shard-size", "1", "--workers", "1", "--jpeg-quality", "90"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: Path(f"{hold}.held").exists(), "the first stage held at its third shard", 300,
             first)
    second = run_cli("stage", "--source", sample_sets["folders"], "--dest", dest, "--shard-size", 1,
                     "--jpeg-quality", 40, env={"RAY_ADDRESS": ray_cluster.address}, check=False)
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "being written by another run" in errors[0], second.stderr
    hold.touch()
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert json.loads((dest / "manifest.json").read_text())["writer"]["jpeg_quality"] == 90
    assert not (dest / ".lease.json").exists()


def test_a_stage_whose_lease_was_taken_over_on_s3_writes_no_manifest(sample_sets, s3, bucket,
                                                                     s3_storage, ray_cluster):
    """Another run took the lease (an S3 object, written with If-Match on its ETag) while this
    stage worked: it ends in one line before it writes its manifest, and leaves the other run's
    lease alone."""
    dest = f"s3://{bucket}/staged"
    env = {**os.environ, **s3.env(), "RAY_ADDRESS": ray_cluster.address, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([PIPELINE, "stage", "--source", sample_sets["devkit"], "--dest", dest,
                             "--shard-size", "7", "--workers", "1"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: s3_storage.exists(f"{dest}/.lease.json"), "the stage's lease", 120, proc)
    other = {"owner": "someone@elsewhere pid 1", "host": "elsewhere", "pid": 1, "token": "other",
             "what": "pipeline stage from another source", "expires": time.time() + 600}
    s3_storage.write_bytes(f"{dest}/.lease.json", json.dumps(other).encode())
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lost its lease to another run (pipeline stage from another " \
        "source, someone@elsewhere pid 1)" in errors[0], stderr[-3000:]
    assert not s3_storage.exists(f"{dest}/manifest.json")
    assert json.loads(s3_storage.read_bytes(f"{dest}/.lease.json"))["token"] == "other"


def test_of_two_stages_racing_for_an_s3_lease_exactly_one_gets_it(s3, bucket):
    """Both read 'no lease' and then write at once (held at a barrier in between): S3's
    conditional write (If-None-Match) lets exactly one of them have it."""
    import threading

    from pipeline.data.lease import Lease
    from pipeline.errors import UserError
    from pipeline.storage import S3Settings

    barrier = threading.Barrier(2, timeout=60)

    class Racing(Storage):
        def write_if(self, uri, data, version):
            if version is None:
                barrier.wait()   # both have seen no lease; now both write
            return super().write_if(uri, data, version)

    uri = f"s3://{bucket}/staged/.lease.json"
    settings = S3Settings(s3.endpoint, s3.access_key, s3.secret_key)
    outcome = {}

    def take(name):
        try:
            outcome[name] = Lease(Racing(settings), uri, f"stage {name}").acquire()
        except UserError as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=take, args=(n,)) for n in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    won = [n for n, o in outcome.items() if isinstance(o, Lease)]
    lost = [o for o in outcome.values() if isinstance(o, UserError)]
    assert len(won) == 1 and len(lost) == 1, outcome
    assert f"being written by another run (stage {won[0]}" in str(lost[0])
    held = json.loads(Storage(settings).read_bytes(uri))
    assert held["token"] == outcome[won[0]].token
    outcome[won[0]].release()
