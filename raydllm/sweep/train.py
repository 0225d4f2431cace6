"""Sweep layer: the driver side of one training run: a Ray Train `TorchTrainer` over `trial.train_loop_per_worker`.

The same function serves `raydllm train` (its own MLflow run) and each Ray Tune trial (the trial's child
run), so a sweep trains exactly what a single run trains.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydllm.core.config import Config, ConfigError

log = logging.getLogger(__name__)


def default_storage_path() -> str:
    """RAYDLLM_STORAGE (set on every node by cluster.yaml), else ./raydllm_runs."""
    return os.environ.get("RAYDLLM_STORAGE") or str(Path.cwd() / "raydllm_runs")


def check_storage(storage: str) -> None:
    """An unwritable or full storage path is reported before training starts."""
    if "://" in storage:
        return
    import shutil

    path = Path(storage)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".raydllm-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--storage {storage}: not writable ({exc.strerror or exc})") from None
    free = shutil.disk_usage(path).free
    if free < 1 << 30:
        raise ConfigError(f"--storage {storage}: only {free / 2**20:.0f} MiB free; checkpoints need more")


def running_cluster_address() -> str | None:
    """The GCS address of a Ray cluster that `ray start --head` left running on this machine (the launcher's head
    node runs one), from the address file Ray writes in its default temp folder, when that GCS accepts a
    connection; None when there is none, or the file is stale (a crashed head leaves it behind)."""
    import socket

    from ray._common.utils import get_ray_address_file

    try:
        address = Path(get_ray_address_file(None)).read_text().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return address
    except (OSError, ValueError):
        return None


def ray_init_address() -> str:
    """What to hand `ray.init(address=...)`: RAY_ADDRESS when set, "auto" (join) when a cluster runs on this
    machine (`raydllm tune` typed on a head node), else "local": a new cluster, never a stale address file's."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        return address
    return "auto" if running_cluster_address() else "local"


def starts_local_cluster() -> bool:
    """True when this command will start a Ray cluster on this machine: no RAY_ADDRESS to join (the CLI treats
    an empty one as unset), no Ray this process is already connected to (a cluster whose node types the
    sweep's own resource check reads), and no `ray start`ed cluster running here to join."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return False
    return ray_init_address() == "local"


def local_gpus() -> int:
    """GPUs on this machine, without importing torch (seconds) when there is no GPU device at all."""
    if not any(Path("/dev").glob("nvidia[0-9]*")) and not Path("/dev/kfd").exists():
        return 0
    import torch

    return torch.cuda.device_count()


def local_shortfall(workers: int, cpus_per_worker: float, use_gpu: bool, custom: dict[str, float]) -> str | None:
    """What a run needs that this machine can never give a local Ray cluster (None if it fits), checked before
    Ray starts: Ray would otherwise wait for the resources (Train retries the worker group start for minutes)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    need_cpus = workers * cpus_per_worker
    gpus = local_gpus() if use_gpu else 0
    short = []
    if use_gpu and workers > gpus:
        short.append(f"{workers} GPUs")
    if need_cpus > cpus:
        short.append(f"{need_cpus:g} CPUs ({workers} workers x {cpus_per_worker:g})")
    if custom:
        short.append(f"the custom resources {', '.join(sorted(custom))} (a cluster's node types define them)")
    if not short:
        return None
    return f"needs {' and '.join(short)}, but this machine has {gpus} GPUs and {cpus} CPUs"


def local_resources_hint(kind: str, model: str, workers: int, use_gpu: bool) -> str:
    """What to do instead, for the error message of a run (`kind`: run / sweep) this machine cannot hold."""
    if use_gpu:
        return (f"this is the {workers}-GPU {model.split('/')[-1]} {kind}: run it on a Ray cluster (set RAY_ADDRESS; "
                f"docs/how-to/aws.md), or use --preset local on this machine")
    return f"lower the workers or CPUs per worker, or run the {kind} on a Ray cluster (set RAY_ADDRESS)"


def ensure_ray(num_cpus: int | None = None, resources: dict[str, float] | None = None) -> None:
    """Join the cluster in RAY_ADDRESS or the one `ray start`ed on this machine; otherwise start a local one
    with `num_cpus` and the custom `resources` (a sweep's trial slots)."""
    import ray

    if ray.is_initialized():
        return
    address = ray_init_address()
    if address != "local":
        ray.init(address=address, configure_logging=False)
        return
    # include_dashboard: the State API it serves is what frees the placement groups of stopped runs (without it
    # the workers of trials ASHA stops leak and later trials hang).
    ray.init(address="local", num_cpus=num_cpus, resources=resources, include_dashboard=True,
             configure_logging=False)


def warm_deepspeed_ops() -> None:
    """Build DeepSpeed's CPU shared-memory comm op once per machine (about a minute) in the driver, so no
    worker pays it at start-up; later builds hit the torch_extensions cache and take milliseconds."""
    try:
        from deepspeed.accelerator import get_accelerator
        if get_accelerator().device_name() != "cpu":
            return
        from deepspeed.comm.torch import build_shm_op

        start = time.perf_counter()
        build_shm_op()
        log.info("DeepSpeed CPU comm op ready in %.1fs", time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - DeepSpeed falls back to plain gloo without it
        log.warning("DeepSpeed CPU comm op unavailable (%s); workers use plain torch.distributed", exc)



def choose_gpu(cfg: Config) -> bool:
    if cfg.train.use_gpu != "auto":
        return cfg.train.use_gpu
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def worker_bundle(cfg: Config, use_gpu: bool) -> dict[str, float]:
    """What one Ray Train worker asks for (extra_resources may name an `accelerator_type:<type>`)."""
    resources = {"CPU": cfg.train.cpus_per_worker, **cfg.train.extra_resources}
    if use_gpu:
        resources["GPU"] = 1
    return resources


def scaling_config(cfg: Config):
    """Workers that fit on one node (up now or launchable) are placed on one node (STRICT_PACK: PACK is only a
    preference, and an 8-GPU trial split over two nodes runs its all-reduce over the network)."""
    from ray.train import ScalingConfig

    from raydllm.sweep.cluster import node_shapes, placement

    use_gpu = choose_gpu(cfg)
    resources = worker_bundle(cfg, use_gpu)
    strategy = placement(resources, cfg.train.workers, node_shapes()) or "PACK"
    return ScalingConfig(num_workers=cfg.train.workers, use_gpu=use_gpu, resources_per_worker=resources,
                         placement_strategy=strategy)


def build_trainer(cfg: Config, *, name: str, storage_path: str, tracking: dict[str, str] | None,
                  callbacks: list | None = None, scheduled_at: float | None = None):
    """`scheduled_at`: when the run got its resources (epoch s), for the time-to-first-step figure."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from raydllm.evaluation.trial import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "tracking": tracking,
                           "scheduled_at": scheduled_at or time.time()},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=name,  # a fixed name: Ray Train resumes from this run's latest checkpoint on re-run
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures,
                                         controller_failure_limit=cfg.train.start_attempts),
            callbacks=callbacks or [],
        ),
    )


def progress_callback(total_steps: int | None):
    """A Ray Train callback printing one line per report (it runs in the controller; Ray forwards its output
    to the driver's terminal): step, losses, validation loss, throughput and elapsed time."""
    from ray.train import UserCallback

    class TrainProgress(UserCallback):
        def __init__(self):
            self.started = time.time()

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            of = f"/{total_steps}" if total_steps else ""
            parts = [f"step {int(m.get('step', 0))}{of}"] + [
                f"{key} {m[key]:.4f}" for key in ("loss_total", "loss_diff", "loss_jepa", "val_loss_diff") if key in m]
            if "tokens_per_s" in m:
                parts.append(f"{m['tokens_per_s']:.0f} tok/s")
            print(f"[raydllm {time.time() - self.started:5.0f}s] " + ", ".join(parts), flush=True)

    return TrainProgress()


@dataclass
class TrainOutcome:
    run_id: str
    name: str
    metrics: dict[str, Any]
    checkpoint: str | None
    resumed: bool


def check_before_ray(cfg: Config, *, kind: str, field: str, tracking_uri: str | None, storage: str | None) -> None:
    """Everything about a run (kind "run") or every trial of a sweep (kind "sweep", cfg its base config) that can
    be checked before Ray starts, cheapest first, each failure one line (ConfigError / DataError / TrackingError):
    what it needs against this machine when it will start a local cluster (a cluster's own resources are checked
    once Ray is up), the task and its data (read through the task's own reader here), storage, tracking store."""
    from raydllm.data.sft import check_data

    train = cfg.train
    if starts_local_cluster():
        shortfall = local_shortfall(train.workers, train.cpus_per_worker, train.use_gpu is True,
                                    train.extra_resources)
        if shortfall:
            raise ConfigError(f"{field}: a {'trial' if kind == 'sweep' else kind} {shortfall}; "
                              + local_resources_hint(kind, cfg.model.name, train.workers, train.use_gpu is True))
    check_data(cfg)
    check_storage(storage or default_storage_path())
    from raydllm.sweep import tracking  # MLflow: seconds to import, so after the checks that do not need it

    tracking.check_tracking(tracking.resolve_tracking_uri(tracking_uri))


def check_sweep(spec, *, space_name: str, tracking_uri: str | None, storage: str | None = None) -> None:
    """check_before_ray for a sweep (a search_space.SweepSpec): its trials' base config and resources."""
    from raydllm.core.config import validate
    from raydllm.sweep.search_space import base_raw

    check_before_ray(validate(base_raw(spec)), kind="sweep", field=f"{space_name}: resources",
                     tracking_uri=tracking_uri, storage=storage)


def prepare_training(cfg: Config, *, tracking_uri: str | None) -> Config:
    """check_before_ray for one run, its relative data.path resolved here (a Ray worker would resolve it in its
    own working directory). Returns cfg with its run name fixed and its data path absolute."""
    from raydllm.data.sft import with_absolute_data_path

    cfg = with_absolute_data_path(cfg)
    check_before_ray(cfg, kind="run", field="train.workers", tracking_uri=tracking_uri, storage=cfg.run.storage_path)
    name = cfg.run.name or f"train-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})


def run_training(cfg: Config, *, tracking_uri: str, prepared: bool = False) -> TrainOutcome:
    """One training run logged as one MLflow run; re-running with the same run.name resumes both.
    `prepared`: cfg came from `prepare_training` (the CLI checks before it quiets the terminal)."""
    from raydllm.sweep import tracking
    from raydllm.engine.pretrain import prepare_base

    if not prepared:
        cfg = prepare_training(cfg, tracking_uri=tracking_uri)
    name = cfg.run.name
    storage = cfg.run.storage_path or default_storage_path()
    run_id, resumed = tracking.open_run(tracking_uri, tracking.experiment_name(cfg.task), key="raydllm.run_name",
                                        name=name, params=cfg.flat(),
                                        tags={"raydllm.kind": "train", **tracking.environment_tags()})
    try:  # from here on, a run that stops for any reason is closed FAILED (KILLED on Ctrl-C), never left RUNNING
        prepare_base(cfg.model)
        ensure_ray()
        warm_deepspeed_ops()
        trainer = build_trainer(cfg, name=name, storage_path=storage,
                                tracking={"tracking_uri": tracking_uri, "run_id": run_id},
                                callbacks=[progress_callback(cfg.train.max_steps)])
        result = trainer.fit()
    except BaseException as exc:
        tracking.finish_run(tracking_uri, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                            {"raydllm.error": f"{type(exc).__name__}: {exc}"[:5000]})
        raise
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    # `raydllm eval <run id>` finds the weights through this tag.
    tracking.finish_run(tracking_uri, run_id, "FINISHED", {tracking.CHECKPOINT_TAG: checkpoint} if checkpoint else None)
    return TrainOutcome(run_id=run_id, name=name, metrics=dict(result.metrics or {}), checkpoint=checkpoint,
                        resumed=resumed)
