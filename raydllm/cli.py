"""`raydllm` command line. Bad input exits with code 2 and one line naming the field or file at fault."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
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
        emit_json(result, default=str)
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")
    return 0


def cmd_tune(args) -> int:
    from pathlib import Path

    from .search_space import load_spec
    from .tune import default_space_file, run_sweep, sweep_name

    space = Path(args.space) if args.space else default_space_file("local" if args.preset == "local" else args.task)
    extra = {"data.source": "local", "data.path": str(Path(args.data).resolve())} if args.data else None
    spec = load_spec(space, extra)  # validated before Ray starts
    if spec.task != args.task:
        raise ConfigError(f"{space}: task is {spec.task!r}, but the command asks for {args.task!r}")
    if args.resume:
        from ray import tune

        from .train import default_storage_path

        name = args.name or sweep_name(spec, space)
        path = f"{(args.storage or default_storage_path()).rstrip('/')}/{name}"
        if not tune.Tuner.can_restore(path):
            raise ConfigError(f"--resume: no sweep to resume at {path}")
    outcome = run_sweep(space, tracking_uri=resolve_tracking_uri(args.tracking_uri), storage=args.storage,
                        name=args.name, extra_fixed=extra)
    _quiet_ray()
    if args.json:
        emit_json({"sweep": outcome.name, "parent_run_id": outcome.parent_run_id,
                   "restored": outcome.restored, "trials": outcome.trials})
    return 0


def cmd_best(args) -> int:
    from .results import best_configs, format_table

    report = best_configs(args.task, tracking_uri=resolve_tracking_uri(args.tracking_uri), top=args.top,
                          sweep=args.sweep)
    if args.json:
        emit_json(report, default=str)
    else:
        print(format_table(report))
    return 0


def _quiet_ray() -> None:
    """Shut Ray down before printing results: its forwarded worker logs would otherwise follow them."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stderr.flush()


_RESULT_FD: int | None = None  # the real stdout while a --json command runs (see json_stdout)


@contextlib.contextmanager
def json_stdout(enabled: bool):
    """With --json, stdout carries the result line and nothing else: whatever else is written to it while the
    command runs (DeepSpeed's and Ray's prints, C-level writes included) goes to stderr, so
    `raydllm bench --json | jq` works. `emit_json` writes the result to the real stdout."""
    global _RESULT_FD
    try:
        redirect = enabled and sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):  # stdout replaced (e.g. captured in-process): print as is
        redirect = False
    if not redirect:
        yield
        return
    sys.stdout.flush()
    _RESULT_FD = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(_RESULT_FD, 1)
        os.close(_RESULT_FD)
        _RESULT_FD = None


def emit_json(result, **dumps_kwargs) -> None:
    """One JSON line on the real stdout (the result of a --json command)."""
    line = json.dumps(result, **dumps_kwargs) + "\n"
    if _RESULT_FD is None:
        sys.stdout.write(line)
        sys.stdout.flush()
    else:
        os.write(_RESULT_FD, line.encode())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="one DLLM-JEPA training run (Ray Train + DeepSpeed), logged to MLflow")
    _common_run_flags(train)
    train.add_argument("--workers", type=int, help="Ray Train workers (sets train.workers)")
    train.add_argument("--name", help="run name; re-running with the same name resumes from its last checkpoint")
    train.set_defaults(func=cmd_train)

    tune = sub.add_parser("tune", help="a Ray Tune + ASHA sweep from a search-space file, every trial in MLflow")
    tune.add_argument("task")
    tune.add_argument("--preset", help="local = the embedded default's space (search_spaces/local.yaml)")
    tune.add_argument("--space", help="search-space YAML (default: search_spaces/<task>.yaml)")
    tune.add_argument("--data", help="local data file or folder for every trial")
    tune.add_argument("--name", help="sweep name (default: sweep-<task>-<space file>); same name = resume")
    tune.add_argument("--resume", action="store_true", help="resume an interrupted sweep (error if none)")
    tune.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    tune.add_argument("--storage", help="where trials keep checkpoints: a folder, s3://..., or a shared FS")
    tune.add_argument("--json", action="store_true", help="print the outcome as JSON on the last line")
    tune.set_defaults(func=cmd_tune)

    best = sub.add_parser("best", help="the best configs of a task's latest sweep, read from MLflow")
    best.add_argument("task")
    best.add_argument("--top", type=int, default=5)
    best.add_argument("--sweep", help="sweep name (default: the latest)")
    best.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    best.add_argument("--json", action="store_true")
    best.set_defaults(func=cmd_best)

    from . import bench, evaluation, pretrain

    evaluation.register_cli(sub)  # raydllm eval
    pretrain.register_cli(sub)    # raydllm pretrain
    bench.register_cli(sub)       # raydllm bench [sweep]
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warnings.simplefilter("default" if args.verbose else "ignore", DeprecationWarning)
    try:
        with json_stdout(getattr(args, "json", False)):
            return args.func(args)
    except USER_ERRORS as exc:
        print(f"raydllm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Through the package module, not this __main__ copy: commands reach json_stdout's state as raydllm.cli.
    from raydllm.cli import main as package_main

    sys.exit(package_main())
