"""Sweep layer: MLflow at the edge: where runs go, and the few operations raydllm needs on them.

Default store: a SQLite file in the working directory (`sqlite:///<cwd>/mlflow.db`), which
`mlflow ui --backend-store-uri sqlite:///mlflow.db` opens as is; `--tracking-uri` or MLFLOW_TRACKING_URI
point at a server instead. A server that cannot be reached is reported before anything starts.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from raydllm.engine.checkpoints import materialize, resolve_checkpoint_dir
from raydllm.core.config import ConfigError

CHECKPOINT_TAG = "raydllm.checkpoint"  # MLflow tag (or param) of a run pointing at its checkpoint


class TrackingError(RuntimeError):
    """The tracking store cannot be used; one line naming the URI."""


def resolve_tracking_uri(cli_value: str | None = None) -> str:
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def experiment_name(task: str) -> str:
    return f"raydllm-{task}"


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any Ray work, if the tracking store is unusable."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
            response.raise_for_status()
        except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
            raise TrackingError(f"--tracking-uri {uri}: cannot reach the MLflow server ({type(exc).__name__})") \
                from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"--tracking-uri {uri}: folder {folder} does not exist or is not writable")

# MLflow 3's UI opens an experiment in its GenAI view unless this tag says it holds model training
# (mlflow/server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT = "custom_model_development").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in whatever cwd the UI runs in
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location,
                                    tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})


def find_run(client: MlflowClient, experiment_id: str, key: str, value: str):
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{value}'", max_results=1)
    return runs[0] if runs else None


def open_run(uri: str, experiment: str, *, key: str, name: str, params: dict[str, Any] | None = None,
             tags: dict[str, str] | None = None, run_name: str | None = None) -> tuple[str, bool]:
    """(run_id, resumed): the run tagged `key`=`name` in `experiment`, created on first use.

    Looking the run up by a stable key (a Train run name, a Tune trial id) is what keeps a resumed run
    in the same MLflow run instead of a duplicate.
    """
    client = MlflowClient(tracking_uri=uri)
    experiment_id = get_or_create_experiment(client, experiment, uri)
    existing = find_run(client, experiment_id, key, name)
    if existing is not None:
        client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id, True
    run = client.create_run(experiment_id, run_name=run_name or name, tags={key: name, **(tags or {})})
    if params:
        log_params(client, run.info.run_id, params)
    return run.info.run_id, False


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's per-batch parameter limit
        client.log_batch(run_id, params=items[start:start + 100])


def finish_run(uri: str, run_id: str, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
    client = MlflowClient(tracking_uri=uri)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))


def environment_tags() -> dict[str, str]:
    """What a sweep ran on: git commit, package versions, hardware."""
    import importlib.metadata as md

    tags = {"host.python": platform.python_version(), "host.machine": platform.machine(),
            "host.cpus": str(os.cpu_count())}
    for package in ("raydllm", "torch", "ray", "deepspeed", "transformers", "mlflow"):
        try:
            tags[f"version.{package}"] = md.version(package)
        except md.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
        if commit.returncode == 0:
            tags["git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            tags["host.gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001
        pass
    return tags


# -- evaluation of a finished run (`raydllm eval <run id>`) -------------------------------------------
def resolve_target(target: str, tracking_uri: str, *, ema: bool = False) -> tuple[Path, str | None]:
    """(local checkpoint folder, MLflow run id or None) for a checkpoint path or a run id. A remote checkpoint is
    copied here only as far as evaluating it needs (its export/ where it has one; `ema`: the EMA weights too)."""
    if Path(target).expanduser().exists():
        return resolve_checkpoint_dir(target), None
    if "://" in target:
        return resolve_checkpoint_dir(materialize(target, ema=ema)), None
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(target)
    except MlflowException:
        raise ConfigError(f"{target}: neither a checkpoint folder nor a run id in {tracking_uri}") from None
    location = run.data.tags.get(CHECKPOINT_TAG) or run.data.params.get(CHECKPOINT_TAG)
    if not location:
        raise ConfigError(f"run {target}: no {CHECKPOINT_TAG} tag (it finished without a checkpoint?)")
    if "://" in location and not location.startswith("file://"):
        return resolve_checkpoint_dir(materialize(location, ema=ema)), target
    return resolve_checkpoint_dir(location.removeprefix("file://")), target


def log_to_run(tracking_uri: str, run_id: str, metrics: dict[str, float], predictions: list[dict], *,
               split: str, shots: int, task: str, step: int = 0, weights: str | None = None,
               protocol: dict | None = None) -> str:
    """Log `eval/<split>/<shots>shot[/<weights>]/<metric>` metrics and a predictions jsonl artifact; returns
    the prefix. `weights` marks figures of other weights or another sampler: "base" (the model the run started
    from), "ema", "fast" (the fast sampler), or two of them joined ("base/fast")."""
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=tracking_uri)
    prefix = f"eval/{split}/{shots}shot" + (f"/{weights}" if weights else "")
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"{prefix}/{k}", float(v), now, step) for k, v in metrics.items()])
    if protocol is not None:  # evaluation.protocol: the settings the figures came from, beside them
        from raydllm.evaluation.protocol import protocol_tags

        for tag, value in protocol_tags({prefix: protocol}).items():
            client.set_tag(run_id, tag, value)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / f"predictions-{task}-{split}-{shots}shot{'-' + weights.replace('/', '-') if weights else ''}.jsonl"
        file.write_text("".join(json.dumps(p) + "\n" for p in predictions))
        client.log_artifact(run_id, str(file), artifact_path="eval")
    return prefix


def log_harness_to_run(tracking_uri: str, run_id: str, metrics: dict[str, float], *, name: str, protocol: dict,
                       results: dict | None = None, step: int = 0) -> str:
    """Log lm-evaluation-harness scores as `harness/<name>/<task>/<metric>[/<filter>]` (`name`: the protocol's,
    e.g. a preset's), their protocol as the tag `protocol/harness/<name>` (JSON, as `log_to_run` tags its
    figures) and lm-eval's whole result as the artifact `harness/results-<name>.json`; returns the prefix."""
    from mlflow.entities import Metric

    from raydllm.evaluation.protocol import protocol_tags

    client = MlflowClient(tracking_uri=tracking_uri)
    prefix = f"harness/{name}"
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"{prefix}/{k}", float(v), now, step) for k, v in metrics.items()])
    for tag, value in protocol_tags({prefix: protocol}).items():
        client.set_tag(run_id, tag, value)
    if results is not None:
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / f"results-{name}.json"
            file.write_text(json.dumps(results, indent=1, sort_keys=True, default=str))  # lm-eval's has objects
            client.log_artifact(run_id, str(file), artifact_path="harness")
    return prefix
