"""The `pipeline` command. Each subcommand parses its flags here and calls one library function.

A UserError anywhere (bad path, wrong key, unknown layout...) becomes one line on stderr and exit
code 2; only a bug gives a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import UserError


def _s3_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("S3 (defaults: AWS_ENDPOINT_URL, AWS_DEFAULT_REGION; keys only from "
                             "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an instance profile, never "
                             "flags, so they stay out of shell history and ps)")
    g.add_argument("--s3-endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:8333")
    g.add_argument("--s3-region", help="S3 region")


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def _ray_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS, else local)")


def _tracking_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                          "sqlite:///<cwd>/mlflow.db)")


def _run_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that run training: where Ray and MLflow are."""
    _ray_flag(p)
    _tracking_flag(p)
    p.add_argument("--experiment", default="pipeline", help="MLflow experiment")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    _json_flag(p)
    _s3_flags(p)


def _storage(args):
    from .storage import S3Settings, Storage

    return Storage(S3Settings.from_env(endpoint_url=args.s3_endpoint_url, region=args.s3_region))


def _print_json(obj) -> None:
    """The one JSON object, last on stdout: Ray is shut down first, or lines it forwards from
    workers could still arrive after it."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    sys.stdout.flush()
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


# -- sample-data --------------------------------------------------------------------------------
def cmd_sample_data(args) -> int:
    from .sample_data import generate

    out = generate(args.out, layout=args.layout, classes=args.classes,
                   train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                   seed=args.seed, bad_files=args.bad_files, storage=_storage(args))
    print(f"wrote {out['train_images']} train and {out['val_images']} val images of "
          f"{len(out['classes'])} classes ({args.layout} layout) to {args.out}")
    if args.json:
        _print_json(out)
    return 0


# -- stage --------------------------------------------------------------------------------------
def cmd_stage(args) -> int:
    from .config import StageConfig, from_args
    from .stage import stage_from_config

    cfg = from_args(StageConfig, args, "stage")
    result = stage_from_config(cfg, storage=_storage(args), ray_address=args.ray_address,
                               progress=not args.quiet)
    s = result.summary()
    split_text = ", ".join(f"{k}: {v} images" for k, v in s["splits"].items())
    print(f"staged {cfg.dest}: {split_text}; {s['shards_written']} shards written, "
          f"{s['shards_reused']} already complete, {s['skipped']} files skipped "
          f"(listed in manifest.json) in {s['seconds']} s")
    if args.json:
        _print_json({"dest": cfg.dest, **s})
    return 0


# -- train --------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .config import TrainConfig, from_args
    from .train import train

    from .tracking import Tracking, tracking_uri

    cfg = from_args(TrainConfig, args, "train")
    tracking = None if args.no_tracking else Tracking(tracking_uri(args.tracking_uri), args.experiment)
    out = train(cfg, storage=_storage(args), ray_address=args.ray_address, tracking=tracking)
    print(f"trained {out['name']}: val top-1 {out['val_top1']:.4f}, top-5 {out['val_top5']:.4f} "
          f"after {out['epochs_completed']} epochs; {out['restarts']} restart(s); "
          f"checkpoint {out['checkpoint']}")
    for r in out["recoveries"]:
        print(f"  recovered from {r['cause']} in {r['seconds']} s")
    if args.json:
        _print_json(out)
    return 0


# -- tune ---------------------------------------------------------------------------------------
def cmd_tune(args) -> int:
    from .config import TrainConfig, from_args
    from .tracking import Tracking, tracking_uri
    from .tune import TuneSettings, tune

    base = from_args(TrainConfig, args, "train", skip=("name",))
    settings = from_args(TuneSettings, args, "tune")
    tracking = None if args.no_tracking else Tracking(tracking_uri(args.tracking_uri), args.experiment)
    out = tune(base, settings, storage=_storage(args), ray_address=args.ray_address,
               tracking=tracking, resume=args.resume)
    print(f"sweep {out['name']}: best trial {out['best_trial']} val top-1 "
          f"{out['best_val_top1']:.4f} (config {json.dumps(out['best_config'], default=str)})")
    for t in out["trials"]:
        flag = " stopped early" if t["stopped_early"] else ""
        print(f"  {t['id']}: {t['status']}{flag}, {t['epochs_completed']} epochs, "
              f"val top-1 {t['val_top1']}")
    print(f"plot: {out['plot']}")
    if "model_version" in out:
        p = out["promotion"]
        print(f"registered {out['model_name']} version {out['model_version']} as @{out['alias']} "
              f"(val top-1 {p['val_top1']} vs champion {p['previous_champion_val_top1']})")
    if args.json:
        out.pop("promotion", None)
        _print_json(out)
    return 0


# -- register / predict -------------------------------------------------------------------------
def cmd_register(args) -> int:
    from .registry import register
    from .tracking import redact, tracking_uri

    out = register(args.checkpoint, args.model, _storage(args), tracking_uri(args.tracking_uri))
    prev = out["previous_champion_val_top1"]
    print(f"registered {out['model_name']} version {out['model_version']}: val top-1 "
          f"{out['val_top1']:.4f} vs current champion "
          f"{'none' if prev is None else f'{prev:.4f}'} -> @{out['decision']} "
          f"(tracking: {redact(tracking_uri(args.tracking_uri))})")
    if args.json:
        _print_json(out)
    return 0


def cmd_predict(args) -> int:
    from .predict import predict

    results = predict(args.model, args.images, args.tracking_uri, top=args.top)
    for r in results:
        print(r["image"])
        for t in r["top"]:
            print(f"  {t['probability']:.4f}  {t['wnid']}  {t['name']}")
    if args.json:
        _print_json({"model": args.model, "predictions": results})
    return 0


# -- run / demo / submit ---------------------------------------------------------------------------
def cmd_run(args) -> int:
    from .run import STEPS, load_pipeline_config, run
    from .tracking import Tracking, redact, tracking_uri

    cfg = load_pipeline_config(args.config)
    steps = tuple(args.only or [s for s in STEPS if s not in (args.skip or [])])
    tracking = None if args.no_tracking else Tracking(tracking_uri(args.tracking_uri), args.experiment)
    landed = run(cfg, steps, storage=_storage(args), ray_address=args.ray_address,
                 tracking=tracking)
    for key in ("dataset", "sweep", "run", "plot", "checkpoint", "model_name", "model_version",
                "alias"):
        if key in landed:
            print(f"{key}: {landed[key]}")
    if tracking:
        print(f"mlflow: {redact(tracking.uri)} (experiment {tracking.experiment})")
    if args.json:
        _print_json(landed)
    return 0


def cmd_demo(args) -> int:
    from .demo import demo

    out = demo(args.workdir, stack=args.stack, keep=args.keep)
    if args.json:
        _print_json(out)
    return 0


def cmd_submit(args) -> int:
    from .submit import submit

    command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    _, status = submit(args.address, command, wait=not args.no_wait)
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") else 1


# -- bench --------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    from . import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    from .imagenet_source import LAYOUTS

    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="ImageNet -> FFCV shards on object storage -> Ray Train/Tune ResNets -> MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sample-data", help="write a small, learnable ImageNet look-alike",
                       description="Write a small ImageNet look-alike (real wnids and names, "
                                   "ImageNet-like JPEG sizes) in one of the real layouts.")
    p.add_argument("out", help="output folder (new or empty), or s3://bucket/prefix")
    p.add_argument("--layout", choices=LAYOUTS, default="folders")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=20)
    p.add_argument("--val-per-class", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad-files", action="store_true",
                   help="add a PNG named .JPEG, a CMYK and a greyscale JPEG, a truncated JPEG and "
                        "an empty file, as real ImageNet has")
    _json_flag(p)
    _s3_flags(p)
    p.set_defaults(fn=cmd_sample_data)

    from .config import StageConfig, TrainConfig, add_model_flags

    p = sub.add_parser("stage", help="stage ImageNet into FFCV shards + manifest.json",
                       description="Convert ImageNet (any layout, local or s3://) into FFCV .beton "
                                   "shards and a manifest.json, one Ray task per shard. Re-running "
                                   "resumes: only missing or corrupt shards are written.")
    p.add_argument("--config", help="YAML with the same keys (or a stage: section)")
    add_model_flags(p, StageConfig)
    _ray_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _json_flag(p)
    _s3_flags(p)
    p.set_defaults(fn=cmd_stage)

    p = sub.add_parser("train", help="train a ResNet on a staged dataset with Ray Train",
                       description="Fault-tolerant multi-node ResNet training (Ray Train, DDP) "
                                   "with the FFCV ImageNet recipe. Settings: defaults < --config "
                                   "FILE.yaml < flags. Re-running with the same --name resumes.")
    p.add_argument("--config", help="YAML file with the same keys as the flags (data, arch, ...)")
    add_model_flags(p, TrainConfig)
    _run_flags(p)
    p.set_defaults(fn=cmd_train)

    from .tune import TuneSettings

    p = sub.add_parser("tune", help="hyperparameter sweep (Ray Tune + ASHA) with MLflow tracking",
                       description="A Ray Tune sweep in which every trial is one `pipeline train` "
                                   "run; ASHA stops weak trials early; trials are MLflow child runs "
                                   "of the sweep's run. Training flags are the fixed settings.")
    p.add_argument("--config", help="YAML with train: and tune: sections (or train keys at the top)")
    add_model_flags(p, TuneSettings)
    add_model_flags(p, TrainConfig, skip=("name",))
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep of this --name; finished trials are kept")
    _run_flags(p)
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("register", help="register a checkpoint in the MLflow model registry",
                       description="Log a checkpoint's model to MLflow, register a new version, "
                                   "and give it @champion only if its val top-1 beats the current "
                                   "champion's (else @challenger).")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (local or s3://)")
    p.add_argument("--model", required=True, help="registered model name")
    _tracking_flag(p)
    _json_flag(p)
    _s3_flags(p)
    p.set_defaults(fn=cmd_register)

    p = sub.add_parser("predict", help="top-5 classes of images from a registered model",
                       description="Load a registered model and print the top classes (wnid, name, "
                                   "probability) of each image, preprocessed as recorded.")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top", type=int, default=5)
    _tracking_flag(p)
    _json_flag(p)
    p.set_defaults(fn=cmd_predict)

    from .run import STEPS

    p = sub.add_parser("run", help="stage -> tune -> register from one config file",
                       description="Drive the chain from one YAML file with stage:, train:, tune: "
                                   "and register: sections. Each step can be run alone (--only) "
                                   "or skipped (--skip); re-running after a crash resumes.")
    p.add_argument("--config", required=True, help="pipeline config (see jobs/configs/)")
    p.add_argument("--only", nargs="+", choices=STEPS, help="run just these steps")
    p.add_argument("--skip", nargs="+", choices=STEPS, help="skip these steps")
    _run_flags(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("demo", help="the whole chain on this machine in a few minutes",
                       description="Sample data -> stage -> a small sweep on a local Ray -> "
                                   "register -> predict, with the embedded defaults (local files, "
                                   "SQLite MLflow store in the current folder).")
    p.add_argument("--workdir", default="demo", help="where the demo's data and runs go")
    p.add_argument("--stack", action="store_true",
                   help="use the local stack instead (SeaweedFS S3 + MLflow server, infra/local/)")
    p.add_argument("--keep", action="store_true", help="with --stack: leave the stack running")
    _json_flag(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("submit", help="run a pipeline command as a Ray job on a cluster",
                       description="Submit `pipeline <command>` to a Ray cluster's job server with "
                                   "this project as working_dir and the S3/MLflow environment "
                                   "passed through (never printed); follow the logs and exit with "
                                   "the job's status.")
    p.add_argument("--address", required=True, help="the head's dashboard, http://HEAD:8265")
    p.add_argument("--no-wait", action="store_true", help="submit and return")
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the pipeline subcommand and its arguments")
    p.set_defaults(fn=cmd_submit)

    p = sub.add_parser("bench", help="benchmarks that print figures",
                       description="Benchmarks: each prints a table and one JSON line.")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    from . import bench

    bench.add_parsers(bsub, _s3_flags)
    p.set_defaults(fn=cmd_bench)
    return parser


def main(argv=None) -> int:
    # MLflow draws a progress bar for every artifact download; on a terminal that is noise
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except UserError as exc:
        # An error raised inside a Ray task arrives wrapped; say only the user's part.
        cause = getattr(exc, "cause", None)
        print(f"error: {cause if isinstance(cause, UserError) else exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
