"""`pipeline run` (one config, resumable chain), `pipeline submit` to a `ray start --head` cluster,
and the deployment files (cluster.yaml, KubeRay, job entrypoints, README reference)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import PIPELINE, events, last_json, mlflow_client, run_cli, upload_tree, wait_for
from ray_internals import TRAIN_WORKER, registered_checkpoint

from pipeline.training.trainer import HOLD_ENV

pytestmark = pytest.mark.slow   # real services / Ray clusters


ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = {"arch": "resnet18", "epochs": 2, "batch_size": 16, "lr": 0.4, "lr_peak_epoch": 1,
              "min_res": 32, "max_res": 32, "start_ramp": 0, "end_ramp": 0, "val_res": 32,
              "num_workers": 1}


def write_config(path: Path, source: str, work: Path, tune: bool, model: str) -> Path:
    cfg = {"stage": {"source": source, "dest": str(work / "staged"), "max_resolution": 64,
                     "shard_size": 200},
           "train": {**TINY_TRAIN, "storage": str(work / "runs"), "cache_dir": str(work / "cache"),
                     "worker_resources": {"trainer": 1}},
           # a gate any trained model passes: the chain is under test here, not learning on a
           # few hundred images (the gate itself: test_registry)
           "register": {"model": model, "min_val_top1": 0.01}}
    if tune:
        cfg["tune"] = {"name": "sweep", "trials": 1, "scheduler": "none",
                       "search_space": {"lr": {"grid": [0.4, 0.2]}}}
    path.write_text(yaml.safe_dump(cfg))
    return path


NOISE = ("core_worker", "raylet", "Trial status", "KeyError", "Traceback", "PreemptionWatcher",
         "placement group", f"({TRAIN_WORKER} pid=")


_registered = registered_checkpoint


def test_run_chain_then_rerun_resumes_without_redoing(train_data, ray_cluster, tmp_path):
    """`run` is stopped with Ctrl-C mid-sweep, once a trial has checkpointed its first epoch: it
    registers nothing; the same command resumes the sweep (the trial goes on from its
    checkpoint) and registers the best; run again, it redoes nothing."""
    source = tmp_path / "src"
    shutil.copytree(Path(train_data).parent / "src", source)
    config = write_config(tmp_path / "tiny.yaml", str(source), tmp_path, tune=True, model="run-model")
    env = {"RAY_ADDRESS": ray_cluster.address}
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    runs = tmp_path / "runs" / "sweep" / "runs"
    # every trial is held at the first step of epoch 2 (never released): Ctrl-C comes mid-sweep
    # however fast the machine
    hold = tmp_path / "hold"
    proc = subprocess.Popen([PIPELINE, "run", "--config", str(config), "--json"],
                            env=dict(os.environ, **env, **{HOLD_ENV: f"1:0:{hold}"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: [t for t in runs.glob("*") if _registered(t, 1)],
                 "a trial's checkpoint of epoch 1", 400, proc)
        wait_for(lambda: Path(f"{hold}.held").exists(), "a trial held in epoch 2", 400, proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "interrupted (SIGINT)" in stderr, stderr[-3000:]
    assert not (tmp_path / "runs" / "sweep" / "result.json").exists()
    assert not client.search_model_versions("name = 'run-model'")
    # trials stopped after a checkpoint, before their end (nothing is written once it exited)
    stopped = [t for t in runs.iterdir() if _registered(t, 1) and not (t / "summary.json").exists()]
    assert stopped, "every trial had finished: the interrupt came too late to test a resume"
    # the interrupted sweep's MLflow runs are KILLED: each stopped trial's run and the sweep's
    everywhere = [e.experiment_id for e in client.search_experiments()]
    for trial in stopped:
        [child] = client.search_runs(everywhere, f"tags.`pipeline.trial_id` = '{trial.name}'")
        assert child.info.status == "KILLED", (trial.name, child.info.status)
        parent = client.get_run(child.data.tags["mlflow.parentRunId"])
        assert parent.info.status == "KILLED", parent.info.status

    first = run_cli("run", "--config", config, "--json", env=env)
    out = last_json(first.stdout)
    assert out["dataset"] == str(tmp_path / "staged") and out["model_version"] == "1"
    best = max(out["trials"], key=lambda t: (t["epochs_completed"], t["val_top1"]))
    assert out["alias"] == "champion" and out["val_top1"] == best["val_top1"]
    assert "[run] plot:" in first.stdout and "[run] checkpoint:" in first.stdout
    assert len(out["trials"]) == 2 and all(t["epochs_completed"] == 2 for t in out["trials"])
    for trial in stopped:   # the sweep was resumed, and each stopped trial from its checkpoint
        assert len(events(trial, "driver_start")) == 2
        assert (events(trial, "start")[-1]["resumed_from_epoch"] or 0) >= 1, events(trial, "start")
    # a quiet terminal: our lines, Ray's and Tune's own output in the log file
    assert not [w for w in NOISE if w in first.stdout + first.stderr], first.stdout + first.stderr
    assert len((first.stdout + first.stderr).splitlines()) < 40
    assert "Trial status" in Path(re.search(r"output goes to (\S+\.log)", first.stdout)[1]).read_text()

    started = {t: len(events(t, "driver_start")) for t in runs.iterdir()}
    again = run_cli("run", "--config", config, "--json", env=env)
    assert "[stage] skipped" in again.stdout
    assert "already registered as run-model version 1" in again.stdout
    # finished trials were not trained again
    assert {t: len(events(t, "driver_start")) for t in runs.iterdir()} == started
    assert len(client.search_model_versions("name = 'run-model'")) == 1

    only = last_json(run_cli("run", "--config", config, "--only", "register", "--json", env=env).stdout)
    assert only["model_version"] == "1"

    # the source grows: `run` stages again instead of keeping the old dataset...
    wnid = sorted(p.name for p in (source / "train").iterdir())[0]
    for image in sorted((source / "train" / wnid).iterdir())[:10]:
        shutil.copy(image, image.with_name("extra_" + image.name))
    restaged = run_cli("run", "--config", config, "--only", "stage", env=env)
    assert "changed since it was staged" in restaged.stdout
    manifest = json.loads((tmp_path / "staged" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 600 + 10
    # ...and the sweep of that name, made on the old data, is not passed off as this data's
    stale = run_cli("run", "--config", config, env=env, check=False)
    assert stale.returncode == 2 and "sweep sweep" in stale.stderr and "manifest_sha256" in stale.stderr


def scan(root: Path, secret: bytes) -> list[str]:
    """Files under root whose bytes contain the secret."""
    found = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            try:
                if not path.is_file():
                    continue
                with open(path, "rb") as f:
                    tail = b""
                    while block := f.read(1 << 22):
                        if secret in tail + block:
                            found.append(str(path))
                            break
                        tail = block[-len(secret):]
            except OSError:
                continue
    return found


def test_secrets_never_leave_the_environment(train_data, ray_cluster, ray_head, s3, bucket,
                                             s3_storage, mlflow_server, node_caches, tmp_path):
    """A whole `run` with S3 data and S3 runs, then a job submitted from a shell holding the
    keys: the secret key appears in no file the pipeline, Ray, MLflow or SeaweedFS wrote, in no
    object in the buckets, and in no job's runtime env or log."""
    from pipeline.storage import S3Settings, Storage

    secret = s3.secret_key.encode()
    upload_tree(s3_storage, str(Path(train_data).parent / "src"), f"s3://{bucket}/imagenet")
    cfg = {"stage": {"source": f"s3://{bucket}/imagenet", "dest": f"s3://{bucket}/staged",
                     "max_resolution": 64, "shard_size": 200},
           "train": {**TINY_TRAIN, "storage": f"s3://{bucket}/runs", "worker_resources": {"trainer": 1}},
           "tune": {"name": "scan", "trials": 1, "search_space": {"lr": {"grid": [0.4]}}},
           "register": {"model": "scanned"}}
    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump(cfg))
    logs = tmp_path / "logs"
    env = {**s3.env(), "RAY_ADDRESS": ray_cluster.address, "MLFLOW_TRACKING_URI": mlflow_server.uri,
           "PIPELINE_LOG_DIR": str(logs)}
    out = last_json(run_cli("run", "--config", config, "--json", env=env).stdout)
    assert out["alias"] == "champion"

    # the job registers the run's checkpoint (read from S3 with the head's own keys): its model
    # version and MLflow run carry the Ray job's id as their lineage
    job = run_cli("submit", "--address", ray_head.address, "--", "register", "--checkpoint",
                  out["checkpoint"], "--model", "scanned-by-job",
                  env={**s3.env(), "MLFLOW_TRACKING_URI": mlflow_server.uri,
                       "PIPELINE_LOG_DIR": str(logs)}, timeout=900)
    assert "SUCCEEDED" in job.stdout
    assert "AWS_SECRET_ACCESS_KEY" in job.stdout and "not sent with the job" in job.stdout
    assert s3.secret_key not in job.stdout + job.stderr
    job_id = re.search(r"^\[submit\] job (\S+): ", job.stdout, re.M)[1]
    client = mlflow_client(mlflow_server.uri)
    versions = client.search_model_versions("name = 'scanned-by-job'")
    assert [v.tags.get("pipeline.ray_job_id") for v in versions] == [job_id]
    run = client.get_run(versions[0].run_id)
    assert run.data.tags.get("pipeline.ray_job_id") == job_id

    # what anyone who can query the head's jobs sees (a fresh process: the head wants its token)
    seen = subprocess.run([sys.executable, "-c", (
        "import json, sys\n"
        "from ray.job_submission import JobSubmissionClient\n"
        "c = JobSubmissionClient(sys.argv[1])\n"
        "print(json.dumps([[j.runtime_env, c.get_job_logs(j.submission_id)] for j in c.list_jobs()]))"),
        ray_head.address], env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True,
        text=True, timeout=120)
    assert seen.returncode == 0, seen.stderr[-2000:]
    jobs = json.loads(seen.stdout.strip().splitlines()[-1])
    assert jobs and all(s3.secret_key not in json.dumps(job) for job in jobs)

    roots = [tmp_path, Path(ray_cluster.head_node.get_session_dir_path()), Path(ray_head.temp),
             Path(mlflow_server.data_dir),
             Path(s3.data_dir) / "data", Path(s3.data_dir) / "logs", node_caches.root]
    leaks = [hit for root in roots for hit in scan(root, secret)]
    assert not leaks, leaks
    store = Storage(S3Settings(s3.endpoint, s3.access_key, s3.secret_key))
    for prefix in (f"s3://{bucket}", "s3://mlflow"):
        for rel, _ in store.list(prefix):
            assert secret not in store.read_bytes(f"{prefix}/{rel}"), f"{prefix}/{rel}"


def test_submit_failure_exits_nonzero(ray_head, tmp_path):
    proc = run_cli("submit", "--address", ray_head.address, "--", "train", "--data",
                   tmp_path / "nothing", check=False, timeout=300)
    assert proc.returncode == 1 and "FAILED" in proc.stdout
    assert "manifest.json is missing" in proc.stdout


def test_demo_shows_the_result_in_few_lines(tmp_path):
    """`make demo` on the embedded default: under 80 lines, the champion and its predictions."""
    proc = run_cli("demo", "--workdir", tmp_path / "demo", timeout=900)
    text = proc.stdout + proc.stderr
    assert len(text.splitlines()) < 80, text
    assert not [w for w in NOISE if w in text], text
    assert re.search(r"Champion: demo-resnet18 version \d+, val top-1 1\.000", proc.stdout), text
    assert re.search(r"predict named [34] of 4 held-out images right", proc.stdout), text
    assert list((tmp_path / "demo" / "logs").glob("demo-*.log"))


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    for remote, local in cfg["file_mounts"].items():
        assert (ROOT / local).exists(), local
    commands = " ".join(cfg["setup_commands"])
    assert "pip install" in commands and (ROOT / "pyproject.toml").exists()
    apt = re.search(r"^APT_PKGS := (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert all(pkg in commands for pkg in apt)   # the same system libraries as make install
    gpu = [t for t in cfg["available_node_types"].values()
           if t["node_config"]["InstanceType"].startswith(("g5.", "p4d."))]
    assert gpu and all("Arn" in t["node_config"]["IamInstanceProfile"] for t in gpu)
    assert "aws_access_key" not in (ROOT / "cluster.yaml").read_text().lower()
    # the node cache on the instance-store NVMe: the script runs on each host before Docker
    # starts, from where file_mounts land there; the container binds the folder it mounts
    from ray.autoscaler.sdk import get_docker_host_mount_location

    from pipeline.cli import build_parser

    script = "infra/aws/node-cache-disk.sh"
    project = next(r for r, local in cfg["file_mounts"].items() if (ROOT / local).resolve() == ROOT)
    host = get_docker_host_mount_location(cfg["cluster_name"])
    assert f"bash {host}{project}/{script}" in " ".join(cfg["initialization_commands"])
    mount = re.search(r"^CACHE_MOUNT=\$\{CACHE_MOUNT:-(\S+)\}$", (ROOT / script).read_text(), re.M)[1]
    options = cfg["docker"]["run_options"]
    assert f"-v {mount}:{mount}" in options and f"-e PIPELINE_CACHE_DIR={mount}" in options
    assert "PIPELINE_CACHE_DIR=/tmp" not in (ROOT / "cluster.yaml").read_text()
    # every worker starts the spot agent after `ray start`, in the background for the node's
    # life, with flags it takes; the (on-demand) head does not
    starts = cfg["worker_start_ray_commands"]
    after_ray = starts[next(i for i, c in enumerate(starts) if "ray start" in c) + 1:]
    agent = [c for c in after_ray if "pipeline spot-agent" in c]
    assert len(agent) == 1 and agent[0].endswith("&") and "nohup" in agent[0], agent
    assert ">> /tmp/spot-agent.log 2>&1 < /dev/null" in agent[0]
    args = build_parser().parse_args(agent[0].split("pipeline ", 1)[1].split(">>")[0].split())
    assert args.command == "spot-agent" and args.address == "$RAY_HEAD_IP:6379"
    assert "spot-agent" not in " ".join(cfg["head_start_ray_commands"])


def test_kuberay_job_runs_the_pipeline_entrypoint():
    import ray

    job = yaml.safe_load((ROOT / "infra/k8s/rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"].startswith("ray.io/")
    script, _, config = job["spec"]["entrypoint"].split()[1:4]
    assert script == "jobs/run_pipeline.py" and (ROOT / script).exists()
    assert (ROOT / job["spec"]["entrypoint"].split()[-1]).exists()
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    images = [c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]]
    assert all(img.endswith(f":{ray.__version__}") for img in images)
    assert f"rayproject/ray:{ray.__version__}-py311-gpu" in (ROOT / "infra/k8s/Dockerfile").read_text()
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
            for g in spec["workerGroupSpecs"]]
    assert gpus and all(int(g) >= 1 for g in gpus)
    # credentials come from the cluster (a Secret the pods read), never through the job
    containers = [g["template"]["spec"]["containers"][0]
                  for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]
    assert all(c["envFrom"][0]["secretRef"]["name"] == "pipeline-s3" for c in containers)
    assert "AWS_" not in job["spec"]["runtimeEnvYAML"]
    # a worker pod being deleted (a spot node's notice) drains its Ray node first and waits for
    # training to move off it; the grace period outlasts that and the drain on SIGTERM after it
    from pipeline.cli import build_parser

    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        worker = pod["containers"][0]
        hook = worker["lifecycle"]["preStop"]["exec"]["command"]
        args = build_parser().parse_args(hook[1:])
        assert hook[0] == "pipeline" and args.command == "spot-agent" and args.drain_now > 0
        env = {e["name"]: e["value"] for e in worker["env"]}
        sigterm_drain = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
        assert pod["terminationGracePeriodSeconds"] > args.drain_now + sigterm_drain > args.drain_now
        # the node cache: the pod's volume on the node's local disk, room asked for it
        cache = next(m["mountPath"] for m in worker["volumeMounts"] if m["name"] == "cache")
        assert env["PIPELINE_CACHE_DIR"] == cache
        assert f"PIPELINE_CACHE_DIR: {cache}" in job["spec"]["runtimeEnvYAML"]
        assert "ephemeral-storage" in worker["resources"]["requests"]


def test_job_entrypoints_run_their_step_of_the_chain(train_data, ray_cluster, tmp_path):
    """Each Ray job entrypoint runs its own step of `pipeline run` with the config it is given,
    and only that step, told apart by what each step says: staging is skipped (the dataset is
    staged already), train and tune refuse 5 workers in their own words, register finds nothing
    trained, the whole chain skips staging and then refuses the sweep."""
    refused = "error: each trial needs 5 workers"
    expected = {   # exit status, the steps that speak (in order), how the last line starts
        "stage_imagenet": (0, ["stage"], "[stage] skipped"),
        "train_resnet": (2, [], "error: --num-workers 5: "),
        "tune_resnet": (2, ["tune"], refused),
        "register_model": (2, [], "error: nothing to register yet: "
                                  f"{tmp_path}/runs/register_model/result.json is missing"),
        "run_pipeline": (2, ["stage", "tune"], refused)}
    assert sorted(expected) == sorted(p.stem for p in (ROOT / "jobs").glob("*.py"))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address, TQDM_DISABLE="1")
    procs = {}
    for script in expected:   # all at once: each spends seconds importing and connecting
        cfg = {"stage": {"source": str(Path(train_data).parent / "src"), "dest": train_data,
                         "max_resolution": 64, "shard_size": 50},   # as the train_data fixture
               "train": {**TINY_TRAIN, "num_workers": 5, "storage": str(tmp_path / "runs"),
                         "worker_resources": {"trainer": 1}, "name": script},
               "tune": {"name": script, "trials": 1, "search_space": {"lr": {"grid": [0.4]}}},
               "register": {"model": "job-model"}}
        config = tmp_path / f"{script}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        procs[script] = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / f"{script}.py"), "--config", str(config)],
            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for script, proc in procs.items():
        said, _ = proc.communicate(timeout=300)
        code, steps, last = expected[script]
        ours = [line for line in said.splitlines()
                if line.startswith(("[stage]", "[train]", "[tune]", "[register]", "error:"))]
        spoke = list(dict.fromkeys(line[1:line.index("]")] for line in ours if line[0] == "["))
        assert proc.returncode == code and ours and ours[-1].startswith(last), \
            (script, said[-3000:])
        assert spoke == steps, (script, ours)
        assert "stage" not in steps or ours[0].startswith("[stage] skipped"), (script, ours)


@pytest.mark.parametrize("name", ["tiny-local.yaml", "imagenet-resnet50.yaml", "imagenet-resnet18.yaml"])
def test_job_configs_are_valid(name):
    from pipeline.ops.run import load_pipeline_config

    cfg = load_pipeline_config(str(ROOT / "jobs" / "configs" / name))
    assert cfg.stage and cfg.register_ and cfg.register_.model
    if name.startswith("imagenet"):
        r = cfg.train.recipe
        assert r.lr_tta and r.blurpool and r.label_smoothing == 0.1
        assert r.val_res == 256 and (r.min_res, r.max_res) == (160, 192)


def test_readme_opens_with_the_two_commands_and_its_reference_is_current():
    from pipeline.docs import render_reference

    readme = (ROOT / "README.md").read_text()
    head = "\n".join(readme.splitlines()[:12])
    assert "make demo" in head and "make test" in head
    assert render_reference() in readme, "README reference is stale: python -m pipeline.docs"
