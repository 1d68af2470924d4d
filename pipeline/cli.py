"""The `pipeline` command. Each subcommand parses its flags here and calls one library function.

A UserError anywhere (bad path, wrong key, unknown layout...) becomes one line on stderr and exit
code 2; only a bug gives a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import UserError


def _s3_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("S3 (defaults: AWS_ENDPOINT_URL, AWS_DEFAULT_REGION; keys only from "
                             "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an instance profile, never "
                             "flags, so they stay out of shell history and ps)")
    g.add_argument("--s3-endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:8333")
    g.add_argument("--s3-region", help="S3 region")


def _run_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that run training: where Ray and MLflow are."""
    p.add_argument("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS, else local)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                          "sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--experiment", default="pipeline", help="MLflow experiment")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    _s3_flags(p)


def _storage(args):
    from .storage import S3Settings, Storage

    return Storage(S3Settings.from_env(endpoint_url=args.s3_endpoint_url, region=args.s3_region))


def _print_json(obj) -> None:
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
    from .manifest import WriterSettings
    from .stage import stage

    writer = WriterSettings(max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                            compress_probability=args.compress_probability)
    result = stage(args.source, args.dest, layout=args.layout, splits=args.splits, writer=writer,
                   shard_size=args.shard_size, workers=args.workers, storage=_storage(args),
                   ray_address=args.ray_address, progress=not args.quiet)
    s = result.summary()
    split_text = ", ".join(f"{k}: {v} images" for k, v in s["splits"].items())
    print(f"staged {args.dest}: {split_text}; {s['shards_written']} shards written, "
          f"{s['shards_reused']} already complete, {s['skipped']} files skipped "
          f"(listed in manifest.json) in {s['seconds']} s")
    if args.json:
        _print_json({"dest": args.dest, **s})
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


# -- bench --------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    from . import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    from .imagenet_source import LAYOUTS, SPLITS

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
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    _s3_flags(p)
    p.set_defaults(fn=cmd_sample_data)

    p = sub.add_parser("stage", help="stage ImageNet into FFCV shards + manifest.json",
                       description="Convert ImageNet (any layout, local or s3://) into FFCV .beton "
                                   "shards and a manifest.json, one Ray task per shard. Re-running "
                                   "resumes: only missing or corrupt shards are written.")
    p.add_argument("--source", required=True, help="ImageNet root: a folder or s3://bucket/prefix")
    p.add_argument("--dest", required=True, help="staged dataset: a folder or s3://bucket/prefix")
    p.add_argument("--layout", choices=LAYOUTS, help="source layout (default: detected)")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    p.add_argument("--max-resolution", type=int, default=512, help="longest side kept (px)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="share of images stored as JPEG, the rest raw (FFCV 'proportion' mode)")
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard")
    p.add_argument("--workers", type=int, help="shards staged at once (default: the cluster's CPUs)")
    p.add_argument("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS, else local)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    _s3_flags(p)
    p.set_defaults(fn=cmd_stage)

    from .config import TrainConfig, add_model_flags

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
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                          "sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    _s3_flags(p)
    p.set_defaults(fn=cmd_register)

    p = sub.add_parser("predict", help="top-5 classes of images from a registered model",
                       description="Load a registered model and print the top classes (wnid, name, "
                                   "probability) of each image, preprocessed as recorded.")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                          "sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("bench", help="benchmarks that print figures",
                       description="Benchmarks: each prints a table and one JSON line.")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    from . import bench

    bench.add_parsers(bsub, _s3_flags)
    p.set_defaults(fn=cmd_bench)
    return parser


def main(argv=None) -> int:
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
