"""CLI layer: what every command shares: the console, bad-input errors, the run flags, --json output."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path

from raydllm.core.config import ConfigError, load_config
from raydllm.cli.console import Console
from raydllm.data.tasks.base import DataError


CONSOLE = Console()


def user_errors() -> tuple[type[Exception], ...]:
    """Bad input: exit 2 with one line. (tracking is imported only when a command needs it: MLflow takes
    seconds to import, and bad input is answered before that.)"""
    tracking = sys.modules.get("raydllm.sweep.tracking")
    return (ConfigError, DataError) + ((tracking.TrackingError,) if tracking else ())


def resolve_tracking_uri(cli_value: str | None) -> str:
    from raydllm.sweep.tracking import resolve_tracking_uri as resolve

    return resolve(cli_value)


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help="task name, e.g. gsm8k")
    p.add_argument("--preset", default="local", help="local | paper | wide-t (default: local)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set jepa.lambda=0 (repeatable)")
    p.add_argument("--data", help="local data file or folder (sets data.source=local)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--storage", help="checkpoint storage: a folder, s3://... or a shared file system path")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")


def config_from_args(args):
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


def log_file_for(storage: str | None, name: str) -> Path:
    """The command's log file: in its run's folder when checkpoints go to a local folder (--storage, else
    RAYDLLM_STORAGE / ./raydllm_runs); when they go to s3:// or similar, in ~/raydllm_runs/<name> instead (a
    log file is written line by line, so it must be a real local folder, never a relative one named `s3:`)."""
    from raydllm.sweep.train import default_storage_path

    folder = next((f for f in (storage, default_storage_path()) if f and "://" not in f),
                  str(Path.home() / "raydllm_runs"))
    return Path(folder).expanduser().resolve() / name / "raydllm.log"


def under_ray_job() -> bool:
    """True in the driver of a `ray job submit` entrypoint: Ray's job supervisor hands it its job config in this
    variable. Its stdout/stderr are what `ray job logs` shows; the log file stays on the head node."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def flat_overrides(pairs: list[str]) -> dict:
    """`--set a.b=1` pairs as a space file's `fixed:` keys (values parsed as YAML scalars, like `train --set`)."""
    from raydllm.core.config import parse_overrides

    flat = {}
    for pair in pairs:
        key, value = pair.partition("=")[0], parse_overrides([pair])
        for part in key.split("."):
            value = value[part]
        flat[key] = value
    return flat


def quiet_ray() -> None:
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
        CONSOLE.terminal_out.write(line)
        CONSOLE.terminal_out.flush()
    else:
        os.write(_RESULT_FD, line.encode())


def json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)
