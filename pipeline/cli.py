"""The `pipeline` command. Each subcommand registers its parser with @command and calls one library
function.

A UserError anywhere (bad path, wrong key, unknown layout...) becomes one line on stderr and exit
status 2; Ctrl-C / SIGTERM exit 130 / 143 with a line on how to resume; only a bug gives a
traceback (in quiet mode: one line, the traceback in the log file).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

from . import console
from .errors import Interrupted, UserError


@dataclass
class Command:
    name: str
    help: str
    description: str
    run: Callable
    arguments: Callable | None
    groups: tuple[str, ...]
    resume_hint: str


COMMANDS: list[Command] = []


def command(name: str, help: str, description: str, *, arguments: Callable | None = None,
            groups: tuple[str, ...] = (),
            resume_hint: str = "nothing was marked finished; re-run the same command to resume"):
    """Register a subcommand: its own arguments, plus shared groups of flags (config, ray,
    tracking, json, s3, verbose: quiet terminal with a log file unless --verbose)."""
    def register(fn):
        COMMANDS.append(Command(name, help, description, fn, arguments, groups, resume_hint))
        return fn
    return register


# -- shared flags ---------------------------------------------------------------------------------
def _add_group(p: argparse.ArgumentParser, group: str) -> None:
    if group == "config":
        p.add_argument("--config", help="YAML file: this command's settings at its top level, or "
                                        "sections (stage:, train:, tune:, register:) as for `run`")
    elif group == "ray":
        p.add_argument("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS, else local)")
    elif group == "tracking":
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                              "else sqlite:///<cwd>/mlflow.db)")
    elif group == "runs":
        p.add_argument("--experiment", default="pipeline", help="MLflow experiment")
        p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    elif group == "json":
        p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    elif group == "verbose":
        p.add_argument("--verbose", action="store_true",
                       help="stream Ray's and Tune's own output here instead of to the log file")
    elif group == "s3":
        g = p.add_argument_group(
            "S3 (defaults: AWS_ENDPOINT_URL, AWS_DEFAULT_REGION; keys only from the environment "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, an instance profile), never flags, "
            "so they stay out of shell history and ps)")
        g.add_argument("--s3-endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:8333")
        g.add_argument("--s3-region", help="S3 region")
        g.add_argument("--s3-outage-minutes", type=float, default=3.0,
                       help="ride out an S3 endpoint that stops answering for this long, then "
                            "fail (default: 3)")


RUN_GROUPS = ("config", "ray", "tracking", "runs", "json", "verbose", "s3")


def _storage(args):
    from .storage import S3Settings, Storage

    return Storage(S3Settings.from_env(endpoint_url=getattr(args, "s3_endpoint_url", None),
                                       region=getattr(args, "s3_region", None),
                                       outage_seconds=60 * getattr(args, "s3_outage_minutes", 3.0)))


def _tracking(args):
    from .tracking import Tracking, tracking_uri

    return None if args.no_tracking else Tracking(tracking_uri(args.tracking_uri), args.experiment)


def _print_json(obj) -> None:
    """The one JSON object, last on stdout: Ray is shut down first, or lines it forwards from
    workers could still arrive after it."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    console.say(json.dumps(obj, sort_keys=True, default=str))


def _flags(args) -> set[str]:
    """The settings typed on the command line (argparse leaves the others unset)."""
    return set(vars(args))


# -- sample-data --------------------------------------------------------------------------------
def _sample_data_args(p):
    from .config import LAYOUTS

    p.add_argument("out", help="output folder (new or empty), or s3://bucket/prefix")
    p.add_argument("--layout", choices=LAYOUTS, default="folders")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=20)
    p.add_argument("--val-per-class", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad-files", action="store_true",
                   help="add a PNG named .JPEG, a CMYK and a greyscale JPEG, a truncated JPEG and "
                        "an empty file, as real ImageNet has")


@command("sample-data", "write a small, learnable ImageNet look-alike",
         "Write a small ImageNet look-alike (real wnids and names, ImageNet-like JPEG sizes) in "
         "one of the real layouts.", arguments=_sample_data_args, groups=("json", "s3"))
def cmd_sample_data(args) -> int:
    from .data.sample_data import generate

    out = generate(args.out, layout=args.layout, classes=args.classes,
                   train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                   seed=args.seed, bad_files=args.bad_files, storage=_storage(args))
    console.say(f"wrote {out['train_images']} train and {out['val_images']} val images of "
                f"{len(out['classes'])} classes ({args.layout} layout) to {args.out}")
    if args.json:
        _print_json(out)
    return 0


# -- stage --------------------------------------------------------------------------------------
def _stage_args(p):
    from .config import StageConfig, add_model_flags

    add_model_flags(p, StageConfig)
    p.add_argument("--quiet", action="store_true", help="no progress output")


@command("stage", "stage ImageNet into FFCV shards + manifest.json",
         "Convert ImageNet (any layout, local or s3://) into FFCV .beton shards and a "
         "manifest.json, one Ray task per shard. Re-running resumes: only missing or corrupt "
         "shards are written.", arguments=_stage_args,
         groups=("config", "ray", "json", "verbose", "s3"),
         resume_hint="the shards written so far are kept; re-run the same command to finish")
def cmd_stage(args) -> int:
    from .config import StageConfig, from_args
    from .data.stage import stage

    cfg = from_args(args, {"stage": StageConfig})["stage"]
    result = stage(cfg, storage=_storage(args), ray_address=args.ray_address,
                   progress=not args.quiet)
    s = result.summary()
    split_text = ", ".join(f"{k}: {v} images" for k, v in s["splits"].items())
    console.say(f"[stage] staged {cfg.dest}: {split_text}; {s['shards_written']} shards written, "
                f"{s['shards_reused']} already complete, {s['skipped']} files skipped "
                f"(listed in manifest.json) in {s['seconds']} s")
    if args.json:
        _print_json({"dest": cfg.dest, **s})
    return 0


# -- train --------------------------------------------------------------------------------------
def _train_args(p):
    from .config import TrainConfig, add_model_flags

    add_model_flags(p, TrainConfig)


@command("train", "train a ResNet on a staged dataset with Ray Train",
         "Fault-tolerant multi-node ResNet training (Ray Train, DDP) with the FFCV ImageNet "
         "recipe. Settings: defaults < --config FILE.yaml < flags. Re-running with the same "
         "--name resumes.", arguments=_train_args, groups=RUN_GROUPS,
         resume_hint="re-run with the same --name to resume from its last checkpoint")
def cmd_train(args) -> int:
    from .config import TrainConfig, from_args
    from .training.launch import train

    cfg = from_args(args, {"train": TrainConfig})["train"]
    out = train(cfg, storage=_storage(args), ray_address=args.ray_address,
                tracking=_tracking(args), say=console.say)
    console.say(f"[train] trained {out['name']}: val top-1 {out['val_top1']:.4f}, top-5 "
                f"{out['val_top5']:.4f} after {out['epochs_completed']} epochs; "
                f"{out['restarts']} restart(s); checkpoint {out['checkpoint']}")
    for r in out["recoveries"]:
        console.say(f"[train]   recovered from {r['cause']} in {r['seconds']} s")
    if args.json:
        _print_json(out)
    return 0


# -- tune ---------------------------------------------------------------------------------------
def _tune_args(p):
    from .config import RegisterConfig, TrainConfig, TuneSettings, add_model_flags

    add_model_flags(p, TuneSettings)
    add_model_flags(p, RegisterConfig, skip=("model",))
    add_model_flags(p, TrainConfig, skip=("name",))
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep of this --name; finished trials are kept")


@command("tune", "hyperparameter sweep (Ray Tune + ASHA) with MLflow tracking",
         "A Ray Tune sweep in which every trial is one `pipeline train` run; ASHA stops weak "
         "trials early; trials are MLflow child runs of the sweep's run. Settings given as flags "
         "or in the config file are fixed; the search space covers the rest.",
         arguments=_tune_args, groups=RUN_GROUPS,
         resume_hint="nothing was registered or marked finished; re-run the same command with "
                     "--resume to finish the sweep")
def cmd_tune(args) -> int:
    from .config import RegisterConfig, TrainConfig, TuneSettings, from_args
    from .sweep.tune import tune

    got = from_args(args, {"train": TrainConfig, "tune": TuneSettings, "register": RegisterConfig},
                    skip={"train": ("name",), "register": ("model",)})
    base, settings = got["train"], got["tune"]
    out = tune(base, settings, storage=_storage(args), ray_address=args.ray_address,
               tracking=_tracking(args), resume=args.resume, flags=_flags(args),
               explicit=base.explicit(), min_val_top1=got["register"].min_val_top1 or None,
               say=console.say)
    console.say(f"[tune] sweep {out['name']}: best trial {out['best_trial']} val top-1 "
                f"{out['best_val_top1']:.4f} (config {json.dumps(out['best_config'], default=str)})")
    for t in out["trials"]:
        flag = " stopped early" if t["stopped_early"] else ""
        console.say(f"[tune]   {t['id']}: {t['status']}{flag}, {t['epochs_completed']} epochs, "
                    f"val top-1 {t['val_top1']}")
    console.say(f"[tune] plot: {out['plot']}")
    if "model_version" in out:
        _say_registration(out["promotion"])
    if args.json:
        out.pop("promotion", None)
        _print_json(out)
    return 0


def _say_registration(p: dict) -> None:
    alias = f"@{p['alias']}" if p.get("alias") else "without an alias"
    console.say(f"[register] {p['model_name']} version {p['model_version']} registered {alias}: "
                f"{p['reason']}")


# -- register / promote / predict ---------------------------------------------------------------
def _register_args(p):
    from .config import RegisterConfig, add_model_flags

    p.add_argument("--checkpoint", required=True, help="checkpoint folder (local or s3://)")
    add_model_flags(p, RegisterConfig)


@command("register", "register a checkpoint in the MLflow model registry",
         "Log a checkpoint's model to MLflow and register a new version. It becomes @champion "
         "only if it is clearly better than chance and beats the current champion on a score "
         "measured alike (same validation set, same val resolution, crop and flip averaging); "
         "else @challenger (it lost) or no alias (not comparable, or at chance). The registered "
         "model serves itself (`mlflow models serve`): JPEG/PNG bytes in, top-5 classes out.",
         arguments=_register_args, groups=("config", "tracking", "json", "s3"))
def cmd_register(args) -> int:
    from .config import RegisterConfig, from_args
    from .registry.promote import register
    from .tracking import tracking_uri

    cfg = from_args(args, {"register": RegisterConfig})["register"]
    if not cfg.model:
        raise UserError("--model is required: the registered model's name")
    out = register(args.checkpoint, cfg.model, _storage(args), tracking_uri(args.tracking_uri),
                   min_val_top1=cfg.min_val_top1 or None)
    _say_registration(out)
    if args.json:
        _print_json(out)
    return 0


def _promote_args(p):
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--version", required=True, help="the version to make @champion")
    p.add_argument("--reason", default="", help="why (recorded on the version)")


@command("promote", "give @champion to a version by hand (e.g. a rollback)",
         "Move @champion to a version of your choice; who, when and why are recorded as version "
         "tags. Later registrations are compared with the version it names.",
         arguments=_promote_args, groups=("tracking", "json"))
def cmd_promote(args) -> int:
    from .registry.promote import promote

    out = promote(args.model, args.version, args.reason, args.tracking_uri)
    before = out["previous_champion_version"]
    console.say(f"[promote] {out['model_name']} version {out['model_version']} is @champion "
                f"(was version {before or 'none'}), by {out['by']} at {out['at']}")
    if args.json:
        _print_json(out)
    return 0


def _predict_args(p):
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top", type=int, default=5)


@command("predict", "top-5 classes of images from a registered model",
         "Load a registered model and print the top classes (wnid, name, probability) of each "
         "image, evaluated as its val top-1 was (resolution, crop, flip averaging). An image "
         "that cannot be read is reported in one line; "
         "the others are still predicted; the exit status is then 2.",
         arguments=_predict_args, groups=("tracking", "json"))
def cmd_predict(args) -> int:
    from .registry.predict import predict

    results = predict(args.model, args.images, args.tracking_uri, top=args.top)
    for r in results:
        if "error" in r:
            console.warn(f"error: {r['image']}: {r['error']}")
            continue
        console.say(r["image"])
        for t in r["top"]:
            console.say(f"  {t['probability']:.4f}  {t['wnid']}  {t['name']}")
    if args.json:
        _print_json({"model": args.model, "predictions": results})
    return 2 if any("error" in r for r in results) else 0


# -- run / demo / submit ---------------------------------------------------------------------------
def _run_args(p):
    from .ops.run import STEPS

    p.add_argument("--only", nargs="+", choices=STEPS, help="run just these steps")
    p.add_argument("--skip", nargs="+", choices=STEPS, help="skip these steps")


@command("run", "stage -> tune -> register from one config file",
         "Drive the chain from one YAML file with stage:, train:, tune: and register: sections. "
         "Each step can be run alone (--only) or skipped (--skip); re-running after a crash "
         "resumes.", arguments=_run_args, groups=RUN_GROUPS)
def cmd_run(args) -> int:
    from .ops.run import STEPS, load_pipeline_config, run
    from .tracking import redact

    if not args.config:
        raise UserError("--config is required: the pipeline's YAML file (see jobs/configs/)")
    cfg = load_pipeline_config(args.config)
    steps = tuple(args.only or [s for s in STEPS if s not in (args.skip or [])])
    # staging logs nothing to MLflow: `run --only stage` (jobs/stage_imagenet.py) needs no store
    tracking = _tracking(args) if set(steps) - {"stage"} else None
    landed = run(cfg, steps, storage=_storage(args), ray_address=args.ray_address,
                 tracking=tracking, say=console.say)
    for key in ("dataset", "sweep", "run", "plot", "checkpoint", "model_name", "model_version",
                "alias"):
        if key in landed:
            console.say(f"[run] {key}: {landed[key]}")
    if tracking:
        console.say(f"[run] mlflow: {redact(tracking.uri)} (experiment {tracking.experiment})")
    if args.json:
        _print_json(landed)
    return 0


def _demo_args(p):
    p.add_argument("--workdir", default="demo", help="where the demo's data and runs go")
    p.add_argument("--stack", action="store_true",
                   help="use the local stack instead (SeaweedFS S3 + MLflow server, infra/local/)")
    p.add_argument("--keep", action="store_true", help="with --stack: leave the stack running")


@command("demo", "the whole chain on this machine in a few minutes",
         "Sample data -> stage -> a small sweep on a local Ray -> register -> predict, with the "
         "embedded defaults (local files, SQLite MLflow store in the current folder).",
         arguments=_demo_args, groups=("json", "verbose"))
def cmd_demo(args) -> int:
    from .ops.demo import demo

    out = demo(args.workdir, stack=args.stack, keep=args.keep, say=console.say)
    if args.json:
        _print_json(out)
    return 0


def _submit_args(p):
    p.add_argument("--address", required=True, help="the head's dashboard, http://HEAD:8265")
    p.add_argument("--no-wait", action="store_true", help="submit and return")
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the pipeline subcommand and its arguments")


@command("submit", "run a pipeline command as a Ray job on a cluster",
         "Submit `pipeline <command>` to a Ray cluster's job server with this project as "
         "working_dir and where S3/MLflow are (never credentials: the cluster has its own); "
         "follow the logs and exit with the job's status.", arguments=_submit_args)
def cmd_submit(args) -> int:
    from .ops.submit import submit

    command_args = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    _, status = submit(args.address, command_args, wait=not args.no_wait, say=console.say)
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") else 1


# -- preflight ----------------------------------------------------------------------------------
def _preflight_args(p):
    from .ops.preflight import DEFAULT_TIMEOUT_S

    p.add_argument("--data", help="the staged dataset the run will read (local or s3://; "
                                  "default: the config file's train: data, else stage: dest)")
    p.add_argument("--cache-dir", help="node cache folder (default: the config file's, else "
                                       "each node's PIPELINE_CACHE_DIR, else a temp folder)")
    p.add_argument("--experiment", default="pipeline", help="MLflow experiment the run logs to")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds for the whole check (default: {DEFAULT_TIMEOUT_S:g}); a node "
                        "that has not answered by then fails")
    p.add_argument("--metadata-endpoint", help="instance metadata server (default: the cloud's, "
                                               "169.254.169.254)")


def preflight_settings(args) -> tuple[str, str]:
    """(dataset, cache dir): the flags, else the config file's, as `train` or `run` reads it."""
    from .config import SECTIONS, load_yaml

    values = load_yaml(args.config)
    train = (values.get("train") or {}) if any(k in SECTIONS for k in values) else values
    data = args.data or train.get("data") or (values.get("stage") or {}).get("dest") or ""
    return str(data), str(args.cache_dir or train.get("cache_dir") or "")


@command("preflight", "check in one minute that a run on this cluster would work",
         "On every node of the cluster: GPUs and driver vs torch's CUDA, a matmul, an all-reduce "
         "across every rank with its bus bandwidth, read throughput from the dataset, the node "
         "cache's free space and write speed, the spot agent; from here: MLflow takes a write. "
         "One table, one line per problem with what to do; exit 2 if a run would fail.",
         arguments=_preflight_args, groups=("config", "ray", "tracking", "json", "verbose", "s3"),
         resume_hint="nothing was changed; re-run to check again")
def cmd_preflight(args) -> int:
    from dataclasses import replace

    from .ops.preflight import Check, problem_lines, run_preflight, table
    from .storage import absolute
    from .tracking import tracking_uri

    if not args.timeout > 0:
        raise UserError("--timeout takes a number of seconds above 0")
    storage = _storage(args)
    # a preflight says what is wrong within its minute; it does not ride out an outage
    storage.s3 = replace(storage.s3, outage_seconds=min(storage.s3.outage_seconds, 5.0))
    data, cache_dir = preflight_settings(args)
    out = run_preflight(absolute(data), storage, args.ray_address,
                        tracking_uri(args.tracking_uri), args.experiment, cache_dir,
                        args.timeout, args.metadata_endpoint, say=console.say)
    checks = [Check(**c) for c in out["checks"]]
    console.say(table(checks))
    for line in problem_lines(checks):
        console.say(line)
    console.say(f"[preflight] {len(out['nodes'])} nodes checked in {out['seconds']:g} s: "
                + ("a run would work" if out["ok"] else "a run would fail (exit 2)"))
    if args.json:
        _print_json(out)
    return out["exit"]


# -- spot-agent ---------------------------------------------------------------------------------
def _spot_agent_args(p):
    from .ops import spot_agent as sa

    p.add_argument("--endpoint", default=sa.DEFAULT_ENDPOINT,
                   help=f"instance metadata server, host[:port] or URL (default: {sa.DEFAULT_ENDPOINT})")
    p.add_argument("--provider", choices=sa.PROVIDERS, default="auto",
                   help="whose metadata server (default: auto, AWS then GCP)")
    p.add_argument("--poll-seconds", type=float, default=sa.DEFAULT_POLL_SECONDS,
                   help=f"seconds between polls (default: {sa.DEFAULT_POLL_SECONDS:g})")
    p.add_argument("--node-id", help="the Ray node to drain (default: the one whose raylet runs "
                                     "on this machine)")
    p.add_argument("--address", help="the cluster's GCS, HEAD:6379 (default: RAY_ADDRESS, else "
                                     "the cluster `ray start` joined here)")
    p.add_argument("--drain-now", type=float, metavar="SECONDS",
                   help="drain this node at once with a deadline SECONDS away and wait until it "
                        "has drained (a Kubernetes preStop hook)")


@command("spot-agent", "drain this Ray node when the cloud sends a preemption notice",
         "Run on each worker node: polls the instance metadata (AWS spot/instance-action, GCP "
         "instance/preempted) every few seconds and, on a notice, drains this Ray node with the "
         "notice's deadline, so training checkpoints before the node goes.",
         arguments=_spot_agent_args,
         resume_hint="this node is no longer watched; start `pipeline spot-agent` again")
def cmd_spot_agent(args) -> int:
    import re

    from .ops.spot_agent import main as spot_agent

    if args.node_id and not re.fullmatch(r"[0-9a-f]{56}", args.node_id):
        raise UserError(f"--node-id {args.node_id}: not a Ray node id (56 hex digits, as "
                        "`ray list nodes` shows)")
    if not args.poll_seconds > 0 or (args.drain_now is not None and not args.drain_now > 0):
        raise UserError("--poll-seconds and --drain-now take a number of seconds above 0")
    return spot_agent(args.endpoint, args.provider, args.poll_seconds, args.node_id,
                      args.address, drain_now_seconds=args.drain_now, say=console.say)


# -- bench --------------------------------------------------------------------------------------
def _bench_args(p):
    from . import bench

    bench.add_parsers(p.add_subparsers(dest="bench", required=True, metavar="WHAT"),
                      lambda q: _add_group(q, "s3"))


@command("bench", "benchmarks that print figures",
         "Benchmarks: each prints a table and one JSON line.", arguments=_bench_args,
         groups=("verbose",))
def cmd_bench(args) -> int:
    from . import bench

    return bench.main(args)


# -- main -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="ImageNet -> FFCV shards on object storage -> Ray Train/Tune ResNets -> MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description)
        if cmd.arguments:
            cmd.arguments(p)
        for group in cmd.groups:
            _add_group(p, group)
        p.set_defaults(command_spec=cmd)
    return parser


def main(argv=None) -> int:
    # MLflow draws a progress bar for every artifact download; on a terminal that is noise
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Ray folds lines that look alike from different workers into one: it would hide one trial's
    # epoch lines behind another's
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    args = build_parser().parse_args(argv)
    cmd: Command = args.command_spec
    if "verbose" in cmd.groups and not args.verbose:
        log_dir = os.path.join(args.workdir, "logs") if cmd.name == "demo" else None
        path = console.quiet(cmd.name, log_dir)
        console.say(f"[pipeline] Ray's and Tune's own output goes to {path} (--verbose shows it here)")
    if threading_main():
        signal.signal(signal.SIGTERM, Interrupted.raise_for)
    try:
        return cmd.run(args)
    except UserError as exc:
        # An error raised inside a Ray task arrives wrapped; say only the user's part.
        cause = getattr(exc, "cause", None)
        console.warn(f"error: {cause if isinstance(cause, UserError) else exc}")
        return 2
    except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM (Interrupted)
        signum = Interrupted.signal_of(exc)
        console.warn(f"interrupted ({signal.Signals(signum).name}): {cmd.resume_hint}")
        return 128 + signum
    except Exception as exc:   # a bug: one line here, the traceback where it can be read
        if console.log_path() is None:
            raise
        traceback.print_exc()
        lines = [line for line in str(exc).splitlines() if line.strip()] or [""]
        # Ray's errors say "...worker errors:" first and the worker's own error last
        text = lines[-1] if lines[0].endswith(":") else lines[0]
        console.warn(f"error: unexpected {type(exc).__name__}: {text[:300]} "
                     f"(traceback in {console.log_path()})")
        return 1


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
