"""`raydllm` command line. Bad input exits with code 2 and one line naming the field or file at fault."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

from .config import ConfigError, load_config
from .tasks.base import DataError
from .tracking import TrackingError, resolve_tracking_uri

USER_ERRORS = (ConfigError, DataError, TrackingError)


def _common_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help="task name, e.g. gsm8k")
    p.add_argument("--preset", default="local", help="local | paper | wide-t (default: local)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set jepa.lambda=0 (repeatable)")
    p.add_argument("--data", help="local data file or folder (sets data.source=local)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--storage", help="checkpoint storage: a folder, s3://... or a shared file system path")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")


def _config_from_args(args):
    overrides = list(args.overrides)
    if args.data:
        overrides += ["data.source=local", f"data.path={args.data}"]
    if getattr(args, "workers", None):
        overrides.append(f"train.workers={args.workers}")
    if getattr(args, "name", None):
        overrides.append(f"run.name={args.name}")
    if args.storage:
        overrides.append(f"run.storage_path={args.storage}")
    return load_config(args.task, args.preset, overrides)


def cmd_train(args) -> int:
    from .train import run_training

    cfg = _config_from_args(args)
    outcome = run_training(cfg, tracking_uri=resolve_tracking_uri(args.tracking_uri))
    _quiet_ray()
    result = {"run_id": outcome.run_id, "name": outcome.name, "checkpoint": outcome.checkpoint,
              "resumed": outcome.resumed, **outcome.metrics}
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")
    return 0


def _quiet_ray() -> None:
    """Shut Ray down before printing results: its forwarded worker logs would otherwise follow them."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="one DLLM-JEPA training run (Ray Train + DeepSpeed), logged to MLflow")
    _common_run_flags(train)
    train.add_argument("--workers", type=int, help="Ray Train workers (sets train.workers)")
    train.add_argument("--name", help="run name; re-running with the same name resumes from its last checkpoint")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warnings.simplefilter("default" if args.verbose else "ignore", DeprecationWarning)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"raydllm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
