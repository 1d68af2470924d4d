"""The MLflow model registry against a real `mlflow server`: promotion, races, ties, errors."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PIPELINE, last_json, mlflow_client, run_cli, wait_for

from pipeline.config import TrainConfig
from pipeline.ops.local_services import free_ports
from pipeline.training import checkpoint
from pipeline.training.model import build_model

pytestmark = pytest.mark.slow   # real services / Ray clusters

CLASSES = [{"index": i, "wnid": f"n0000000{i}", "name": f"class {i}"} for i in range(4)]


def make_checkpoint(folder: Path, val_top1: float, val_set: str = "v" * 64,
                    classes: list[dict] = CLASSES, lr_tta: bool = True, head_scale: float = 1.0) -> str:
    """A checkpoint as training writes it (weights are random: only the score matters here;
    head_scale > 1 makes its answers confident, so that how an image is looked at shows)."""
    cfg = TrainConfig(arch="resnet18", val_res=32, lr_tta=lr_tta)
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_model("resnet18", len(classes), blurpool=True)
    with torch.no_grad():
        model.fc.weight *= head_scale
    checkpoint.save(folder, model=model.state_dict(), optimizer={}, scaler={}, epoch=1, rng=[],
                    meta=checkpoint.meta(cfg, classes, 1, {"val_top1": val_top1, "val_top5": 1.0},
                                         {"manifest_sha256": "0" * 64, "val_set": val_set}))
    return str(folder)


class Planted:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pipeline-planted-code-ran",))


def planted_checkpoint(folder: Path) -> str:
    """What someone who can write the runs bucket could leave there."""
    make_checkpoint(folder, 0.9)
    torch.save({"model": {}, "planted": Planted()}, folder / checkpoint.CHECKPOINT_FILE)
    # a planter writes meta.json to match (else the size check refuses it as a torn copy first)
    meta_path = folder / checkpoint.META_FILE
    meta = json.loads(meta_path.read_text())
    meta["checkpoint_bytes"] = (folder / checkpoint.CHECKPOINT_FILE).stat().st_size
    meta_path.write_text(json.dumps(meta))
    return str(folder)


def register_cmd(checkpoint: str, model: str, uri: str) -> list[str]:
    return [PIPELINE, "register", "--checkpoint", checkpoint, "--model", model,
            "--tracking-uri", uri, "--json"]


def test_racing_registrations_leave_one_champion_the_best(mlflow_server, tmp_path):
    """Two registrations both read champion v1 and decide to replace it before either writes
    (each is held between its read-compare and its writes: PIPELINE_TEST_PROMOTION_BARRIER);
    then the better one writes first and the worse one last, the order in which a plain
    read-compare-write leaves the worse one champion, since it beat v1 too."""
    uri = mlflow_server.uri
    first = last_json(run_cli(*register_cmd(make_checkpoint(tmp_path / "a", 0.50), "race", uri)[1:]).stdout)
    assert first["decision"] == "champion" and first["previous_champion_val_top1"] is None
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, TQDM_DISABLE="1", PIPELINE_TEST_PROMOTION_BARRIER=str(barrier))
    procs = {score: subprocess.Popen(register_cmd(make_checkpoint(tmp_path / name, score), "race", uri),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, score in (("b", 0.60), ("c", 0.70))}

    def both_have_read():
        for p in procs.values():
            assert p.poll() is None, p.communicate()[1][-3000:]
        return len(list(barrier.glob("read-*"))) == 2

    wait_for(both_have_read, "both registrations holding after their read-compare", 300)
    client = mlflow_client(uri)
    version_of = {float(v.tags["pipeline.val_top1"]): v.version
                  for v in client.search_model_versions("name = 'race'")}
    outs = {}
    for score in (0.70, 0.60):   # the better one writes first
        (barrier / f"go-{version_of[score]}").touch()
        stdout, stderr = procs[score].communicate(timeout=300)
        assert procs[score].returncode == 0, stderr[-3000:]
        outs[score] = last_json(stdout)
    # both compared with v1: the race happened
    assert [outs[s]["previous_champion_version"] for s in (0.60, 0.70)] == ["1", "1"]
    assert outs[0.70]["decision"] == "champion"
    assert outs[0.60]["decision"] == "challenger"
    assert f"version {version_of[0.70]}, registered at the same time, is better" in outs[0.60]["reason"]
    champion = client.get_model_version_by_alias("race", "champion")
    assert champion.version == version_of[0.70] and champion.tags["pipeline.val_top1"] == "0.7"
    assert client.get_model_version_by_alias("race", "challenger").version == version_of[0.60]
    for out in outs.values():   # each decision and both numbers are stored on its version
        tags = client.get_model_version("race", out["model_version"]).tags
        assert tags["pipeline.promotion.decision"] == out["decision"]
        assert tags["pipeline.promotion.previous_champion_val_top1"] == "0.5"

    tie = last_json(run_cli(*register_cmd(make_checkpoint(tmp_path / "d", 0.70), "race", uri)[1:]).stdout)
    assert tie["decision"] == "challenger"   # ties keep the old champion
    assert client.get_model_version_by_alias("race", "champion").version == champion.version
    assert client.get_model_version_by_alias("race", "challenger").version == tie["model_version"]


def test_operators_stay_in_charge_and_only_comparable_models_are_ranked(mlflow_server, tmp_path):
    from pipeline.registry.promote import register as register_checkpoint

    uri = mlflow_server.uri

    def register(name, score, **kw):   # in this process: the command itself is tested above
        return register_checkpoint(make_checkpoint(tmp_path / name, score, **kw), "rules", uri=uri)

    client = mlflow_client(uri)
    champion = lambda: client.get_model_version_by_alias("rules", "champion").version  # noqa: E731
    assert register("v1", 0.60)["alias"] == "champion"
    assert register("v2", 0.70)["alias"] == "champion" and champion() == "2"
    # an operator rolls back to v1 on purpose
    rolled = last_json(run_cli("promote", "--model", "rules", "--version", "1", "--reason",
                               "v2 misbehaves in production", "--tracking-uri", uri, "--json").stdout)
    assert rolled["previous_champion_version"] == "2" and champion() == "1"
    tags = client.get_model_version("rules", "1").tags
    assert tags["pipeline.promotion.promoted_reason"] == "v2 misbehaves in production"
    assert tags["pipeline.promotion.promoted_by"] and tags["pipeline.promotion.promoted_at"]
    # a worse registration is compared with v1 (the champion now), not with v2: it stays put
    worse = register("v3", 0.55)
    assert worse["decision"] == "challenger" and champion() == "1"
    # a model at chance (4 classes: 0.25) is registered without any alias
    chance = register("v4", 0.30)
    assert chance["decision"] == "none" and chance["alias"] is None
    assert "not clearly better than chance" in chance["reason"] and champion() == "1"
    assert "champion" not in client.get_model_version("rules", chance["model_version"]).aliases
    # a 2-class model scoring 1.0 on its own classes does not displace a 4-class champion
    two = [{"index": i, "wnid": f"n1000000{i}", "name": f"other {i}"} for i in range(2)]
    other = register("v5", 1.0, val_set="w" * 64, classes=two)
    assert other["decision"] == "none" and "another validation set" in other["reason"]
    assert champion() == "1"
    # the same val set scored without flip averaging (v1 was scored with it): not ranked
    flat = register("v6", 0.99, lr_tta=False)
    assert flat["decision"] == "none" and "another evaluation protocol" in flat["reason"]
    assert "(val_res=32 crop_ratio=0.875 lr_tta=off) than champion version 1 " \
           "(val_res=32 crop_ratio=0.875 lr_tta=on)" in flat["reason"]
    tags = client.get_model_version("rules", flat["model_version"]).tags
    assert tags["pipeline.promotion.reason"] == flat["reason"] and champion() == "1"
    # a better one, measured like the current champion, takes over
    assert register("v7", 0.65)["alias"] == "champion" and champion() == "7"


def _error(*args):
    proc = run_cli(*args, check=False, timeout=180)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_registry_errors(mlflow_server, tmp_path):
    port = free_ports(1)[0]
    ckpt = make_checkpoint(tmp_path / "ok", 0.9)
    assert "cannot reach the MLflow tracking server" in _error(
        "register", "--checkpoint", ckpt, "--model", "m", "--tracking-uri", f"http://127.0.0.1:{port}")
    assert "not a checkpoint folder" in _error(
        "register", "--checkpoint", tmp_path / "missing", "--model", "m",
        "--tracking-uri", mlflow_server.uri)
    image = tmp_path / "x.jpg"
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 10, 10)).save(image)
    assert "no such registered model" in _error(
        "predict", "--model", "models:/never-registered@champion", image,
        "--tracking-uri", mlflow_server.uri)
    run_cli("register", "--checkpoint", ckpt, "--model", "errs", "--tracking-uri", mlflow_server.uri)
    assert "pickled Python objects" in _error(
        "register", "--checkpoint", planted_checkpoint(tmp_path / "planted"), "--model", "errs",
        "--tracking-uri", mlflow_server.uri)
    assert "no such registered model, version or alias" in _error(
        "predict", "--model", "models:/errs@no-such-alias", image, "--tracking-uri", mlflow_server.uri)


def asymmetric_jpeg() -> bytes:
    """A picture whose mirror image looks different to any network: flip averaging shows."""
    from PIL import Image

    y, x = np.mgrid[0:96, 0:128]
    rgb = np.stack([x * 2, (x * y) % 256, 255 - y * 2], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_the_champion_serves_itself(mlflow_server, tmp_path):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` answers a posted JPEG
    (base64 in a dataframe_split body, as the README's curl line sends it) with its top-5 wnids,
    names and probabilities, computed on the protocol the score was measured with (val
    resolution, crop ratio, flip averaging): the same answer as `pipeline predict` and as the
    checkpoint's own network. The package is not needed: a `pipeline` that refuses to import
    comes first on the server's path."""
    from pipeline.ops.local_services import free_ports, stop_pid, wait_http
    from pipeline.registry.serving import preprocess

    uri = mlflow_server.uri
    ckpt = make_checkpoint(tmp_path / "ckpt", 0.9, head_scale=50)
    run_cli("register", "--checkpoint", ckpt, "--model", "served", "--tracking-uri", uri)
    image = tmp_path / "photo.jpg"
    image.write_bytes(asymmetric_jpeg())
    predicted = last_json(run_cli("predict", "--model", "models:/served@champion", image, "--json",
                                  "--tracking-uri", uri).stdout)["predictions"][0]["top"]
    assert len(predicted) == 4 and abs(sum(t["probability"] for t in predicted) - 1) < 0.01

    # what the score was measured with: the checkpoint's network, 32 px, crop 224/256, flips
    model = build_model("resnet18", 4, blurpool=True)
    model.load_state_dict(checkpoint.load_state(Path(ckpt, checkpoint.CHECKPOINT_FILE), ckpt)["model"])
    meta = json.loads(Path(ckpt, checkpoint.META_FILE).read_text())
    x = torch.from_numpy(preprocess(asymmetric_jpeg(), meta["preprocessing"]))[None]
    with torch.no_grad():
        model.eval()
        measured = torch.softmax((model(x) + model(torch.flip(x, dims=[3]))) / 2, dim=1)[0]
        unflipped = torch.softmax(model(x), dim=1)[0]
    assert (measured - unflipped).abs().max() > 0.01   # flips change the answer here
    expected = sorted(((float(p), CLASSES[i]["wnid"]) for i, p in enumerate(measured)), reverse=True)
    assert [t["wnid"] for t in predicted] == [w for _, w in expected]
    assert [t["probability"] for t in predicted] == pytest.approx([p for p, _ in expected], abs=2e-4)

    shadow = tmp_path / "shadow" / "pipeline"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the served model must not need pipeline')\n")
    port = free_ports(1)[0]
    bin_dir = os.path.dirname(sys.executable)   # the server runs `uvicorn` from PATH
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(shadow.parent),
               MLFLOW_TRACKING_URI=uri)
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([os.path.join(bin_dir, "mlflow"), "models", "serve", "-m",
                                 "models:/served@champion", "--env-manager", "local",
                                 "--host", "127.0.0.1", "--port", str(port)],
                                env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", 300, proc)
        except TimeoutError:   # it exited, or never answered: say what it printed
            raise AssertionError((tmp_path / "serve.log").read_text()[-4000:]) from None
        body = {"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(asymmetric_jpeg()).decode()], [base64.b64encode(b"junk").decode()]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())["predictions"]
    finally:
        stop_pid(proc.pid, timeout=30)
    served, junk = answer
    assert served["error"] == "" and served["wnids"] == [t["wnid"] for t in predicted]
    assert served["names"] == [t["name"] for t in predicted]
    assert served["probabilities"] == pytest.approx([p for p, _ in expected], abs=1e-4)
    assert junk["wnids"] == [] and "not an image" in junk["error"]


def test_init_from_a_registered_model_replaces_a_mismatched_head(mlflow_server, tmp_path):
    """--init-from models:/NAME@ALIAS: the registered weights, minus the head when the class
    count differs (fine-tuning on another label set)."""
    from pipeline.storage import Storage
    from pipeline.training.model import build_model, load_weights

    ckpt = make_checkpoint(tmp_path / "src", 0.9)
    run_cli("register", "--checkpoint", ckpt, "--model", "base", "--tracking-uri", mlflow_server.uri)
    state = checkpoint.init_weights(Storage(), "models:/base@champion", mlflow_server.uri)
    same = build_model("resnet18", 4, blurpool=True)
    assert load_weights(same, state) == "loaded all weights"
    assert torch.equal(same.fc.weight, state["fc.weight"])
    other = build_model("resnet18", 10, blurpool=True)
    assert "all but the head (4 -> 10 classes)" in load_weights(other, state)
    assert torch.equal(other.conv1.weight, state["conv1.weight"]) and other.fc.out_features == 10
    # a checkpoint folder works the same way
    assert torch.equal(checkpoint.init_weights(Storage(), ckpt)["conv1.weight"], state["conv1.weight"])
    with pytest.raises(Exception, match="no checkpoint.pt there"):
        checkpoint.init_weights(Storage(), str(tmp_path / "nowhere"))


def test_local_stack_scripts_start_and_stop(tmp_path):
    """infra/local: SeaweedFS + MLflow server on loopback, keys only in the env file."""
    import urllib.request

    from pipeline.storage import S3Settings, Storage

    root = Path(__file__).resolve().parents[1]
    folder = tmp_path / "stack"
    out = subprocess.run(["bash", str(root / "infra/local/start.sh"), str(folder)],
                         capture_output=True, text=True, timeout=180)
    try:
        assert out.returncode == 0, out.stderr[-2000:]
        env = dict(line[len("export "):].split("=", 1) for line in
                   (folder / "env").read_text().splitlines())
        env = {k: v.strip("'") for k, v in env.items()}
        assert env["AWS_SECRET_ACCESS_KEY"] not in out.stdout + out.stderr
        assert f"source {folder / 'env'}" in out.stdout
        assert oct((folder / "env").stat().st_mode)[-3:] == "600"
        store = Storage(S3Settings(env["AWS_ENDPOINT_URL"], env["AWS_ACCESS_KEY_ID"],
                                   env["AWS_SECRET_ACCESS_KEY"]))
        store.write_bytes("s3://pipeline/hello.txt", b"hi")
        assert store.read_bytes("s3://pipeline/hello.txt") == b"hi"
        with urllib.request.urlopen(env["MLFLOW_TRACKING_URI"] + "/health", timeout=5) as r:
            assert r.status == 200
        pids = {int(p): started_at(int(p)) for p in (folder / "pids").read_text().split()}
    finally:
        subprocess.run(["bash", str(root / "infra/local/stop.sh"), str(folder)], timeout=120)
    # each process is gone (its PID free, or reused by a process started since)
    assert all(started_at(pid) != began for pid, began in pids.items()), pids


def started_at(pid: int) -> str | None:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22), None if no
    process has the PID: with the PID, it names one process, not whoever reuses the PID."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]
