"""`pipeline demo`: the whole chain on this machine, nothing to start by hand.

sample data -> stage -> a small ASHA sweep on a local Ray -> register -> predict, with the embedded
defaults (local files, SQLite MLflow store in the current folder). `--stack` runs the same chain
against the local stack from infra/local/ instead: SeaweedFS S3 and an MLflow server.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from ..config import PipelineConfig, RegisterConfig, StageConfig, TrainConfig, TuneSettings
from ..tracking import Tracking, redact, tracking_uri

MODEL = "demo-resnet18"
REPO = Path(__file__).resolve().parents[2]


def demo_config(workdir: Path, data_root: str, storage_root: str):
    return PipelineConfig(
        stage=StageConfig(source=str(workdir / "imagenet-sample"), dest=f"{data_root}/staged",
                          max_resolution=64, shard_size=200),
        train=TrainConfig(arch="resnet18", epochs=3, batch_size=16, lr_peak_epoch=1,
                          min_res=32, max_res=32, start_ramp=0, end_ramp=0, val_res=32,
                          num_workers="1", storage=f"{storage_root}/runs",
                          cache_dir=str(workdir / "cache")),
        tune=TuneSettings(trials=1, name="demo-sweep",
                          search_space={"lr": {"grid": [0.4, 0.2, 0.000001]}}),
        register_=RegisterConfig(model=MODEL))


def start_stack(folder: Path) -> dict[str, str]:
    """infra/local/start.sh: SeaweedFS + MLflow server; returns the environment it wrote."""
    subprocess.run(["bash", str(REPO / "infra/local/start.sh"), str(folder)], check=True,
                   stdout=subprocess.DEVNULL)
    env = {}
    for line in (folder / "env").read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = value.strip("'\"")
    return env


def stop_stack(folder: Path) -> None:
    subprocess.run(["bash", str(REPO / "infra/local/stop.sh"), str(folder)], check=False,
                   stdout=subprocess.DEVNULL)


def demo(workdir: str = "demo", stack: bool = False, keep: bool = False, say=print) -> dict:
    import ray

    from ..data.sample_data import generate
    from ..ray_connect import connect
    from ..registry.predict import predict
    from ..storage import Storage
    from .run import run

    started = time.monotonic()
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    source = work / "imagenet-sample"
    if not source.exists():
        say(f"[demo] writing sample ImageNet (original tar layout) to {source}")
        generate(str(source), "tars", classes=4, train_per_class=150, val_per_class=10, seed=0,
                 bad_files=True)
        generate(str(work / "val-images"), "folders", classes=4, train_per_class=1,
                 val_per_class=1, seed=1)

    stack_dir = work / ".stack"
    env_before = dict(os.environ)
    try:
        if stack:
            say(f"[demo] starting the local stack (infra/local/start.sh {stack_dir})")
            os.environ.update(start_stack(stack_dir))
            storage = Storage()
            data_root = storage_root = "s3://pipeline/demo"
            uri = os.environ["MLFLOW_TRACKING_URI"]
        else:
            storage = Storage()
            data_root, storage_root = str(work), str(work)
            uri = tracking_uri()
        tracking = Tracking(uri, "demo")
        connect(None, num_cpus=os.cpu_count())
        landed = run(demo_config(work, data_root, storage_root), storage=storage,
                     tracking=tracking, say=say)
        ray.shutdown()
        images = sorted(str(p) for p in (work / "val-images" / "val").rglob("*.JPEG"))
        predictions = predict(f"models:/{MODEL}@champion", images, uri)
        correct = sum("top" in p and p["top"][0]["wnid"] == Path(p["image"]).parent.name
                      for p in predictions)
        for p in predictions:
            if "error" in p:
                say(f"[predict] {p['image']}: {p['error']}")
                continue
            top = p["top"][0]
            say(f"[predict] {Path(p['image']).parent.name}/{Path(p['image']).name}: "
                f"{top['wnid']} {top['name']!r} p={top['probability']:.2f}")
        from ..tracking import client as tracking_client

        champion = tracking_client(uri).get_model_version_by_alias(MODEL, "champion")
        summary = {
            "champion_version": champion.version,
            "champion_val_top1": float(champion.tags.get("pipeline.val_top1", "nan")),
            "predict_correct": f"{correct}/{len(predictions)}",
            "tracking_uri": redact(uri),
            "dataset": landed.get("dataset"), "plot": landed.get("plot"),
            "seconds": round(time.monotonic() - started),
        }
        say("")
        say(f"Champion: {MODEL} version {summary['champion_version']}, val top-1 "
            f"{summary['champion_val_top1']:.3f}; predict named {correct} of {len(predictions)} "
            f"held-out images right.")
        say(f"Dataset: {summary['dataset']}   sweep plot: {summary['plot']}")
        if uri.startswith("sqlite:///"):
            say(f"MLflow store: {uri}  -> open the UI with: "
                f".venv/bin/mlflow ui --backend-store-uri {uri} --port 5000  (then http://127.0.0.1:5000)")
        else:
            say(f"MLflow server: {redact(uri)} (open it in a browser)")
        say(f"Done in {summary['seconds']} s.")
        return summary
    finally:
        if stack and not keep:
            stop_stack(stack_dir)
        elif stack:
            say(f"[demo] the local stack keeps running: source {stack_dir}/env; "
                f"stop it with infra/local/stop.sh {stack_dir}")
        os.environ.clear()
        os.environ.update(env_before)
