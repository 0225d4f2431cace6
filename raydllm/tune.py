"""Runs and sweeps layer: `raydllm tune`: Ray Tune + ASHA over the training engine, every trial a child run in MLflow.

Pattern (Ray Train V2): each Tune trial is a function trainable that builds the same `TorchTrainer` as
`raydllm train` and forwards its workers' reports to Tune with `TuneReportCallback`; ASHA's clock is the
`step` the workers report. Traps of Ray 2.60 handled here (see ../shared/notes/ray-2.60-tune-train.md):
- code after `trainer.fit()` never runs for a trial ASHA stops: curves are written by the workers and the
  final status by a driver-side callback, never by the trial after `fit()`;
- a restored sweep would open duplicate MLflow runs: a trial's run is looked up by its trial id;
- `max_concurrent_trials` is ignored after `Tuner.restore`: each trial actor holds one unit of a custom
  `trial_slot` resource, of which the local cluster has exactly `max_concurrent_trials`;
- a trial whose workers cannot be placed hangs forever: the resources a trial needs are checked against
  the cluster before anything starts, and `train.start_attempts` bounds the wait.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import tracking
from .config import ConfigError
from mlflow.tracking import MlflowClient

from .results import best_configs, format_table, plot_sweep, summary_metrics, trial_runs
from .search_space import (GRID_POINT, SweepSpec, arm_of, baseline_arm, baseline_keys, baseline_point, baseline_space,
                           config_key, flatten_trial_config, load_spec, max_steps, param_space, trial_config,
                           trial_label)

log = logging.getLogger(__name__)
SLOT = "trial_slot"


def default_space_file(task: str) -> Path:
    """search_spaces/<task>.yaml in the working directory, else the copy installed with the package."""
    local = Path("search_spaces") / f"{task}.yaml"
    if local.exists():
        return local
    packaged = Path(__file__).resolve().parent.parent / "search_spaces" / f"{task}.yaml"
    if packaged.exists():
        return packaged
    raise ConfigError(f"--space: no search_spaces/{task}.yaml here; pass --space FILE")


# -- inside a trial (a Tune actor) -----------------------------------------------------------------------

def run_trial(config: dict[str, Any], *, spec: dict, tracking_uri: str, experiment: str, parent_run_id: str,
              train_storage: str, phase: str) -> None:
    """One Tune trial: the training engine with this trial's config, reporting to Tune through Train."""
    scheduled_at = time.time()  # Tune placed this trial: from here its time counts as reserved
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .search_space import SweepSpec
    from .train import build_trainer

    sweep = SweepSpec.model_validate(spec)
    # A shuffled grid point, or a repeat-phase trial: a whole config from the search phase and a new seed.
    config = flatten_trial_config(config)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    cfg = trial_config(sweep, config, int(config["train.seed"]))
    cfg.train.max_steps = max_steps(sweep)
    run_id, resumed = tracking.open_run(
        tracking_uri, experiment, key="raydllm.trial_id", name=trial_id, params=cfg.flat() | sampler_params(cfg),
        run_name=trial_label(sweep, config, phase),
        tags={"mlflow.parentRunId": parent_run_id, "raydllm.kind": "trial", "raydllm.phase": phase, "raydllm.status": "running",
              "raydllm.arm": arm_of(cfg.flat()), "raydllm.config_key": config_key(sweep, config),
              "raydllm.searched": json.dumps({k: v for k, v in config.items() if "." in k}, sort_keys=True,
                                             default=str)})
    client = MlflowClient(tracking_uri)
    if not resumed:
        client.log_text(run_id, json.dumps(cfg.to_dict(), indent=1), "config.json")
    else:
        run = client.get_run(run_id)
        if run.data.tags.get("raydllm.status") in ("completed", "stopped_early"):
            # The driver recorded this trial's end, but died before Tune saved its own state: a restored sweep
            # must not train it again (nor overturn ASHA's decision to stop it). Hand Tune the final result
            # MLflow holds (Tune insists every result carries the sweep's metric), then end.
            tune.report({**run.data.metrics, "step": int(run.data.tags.get("raydllm.last_step", 0))})
            return
    trainer = build_trainer(cfg, name=f"train-{trial_id}", storage_path=train_storage,
                            tracking={"tracking_uri": tracking_uri, "run_id": run_id},
                            callbacks=[TuneReportCallback()], scheduled_at=scheduled_at)
    trainer.fit()


def sampler_params(cfg) -> dict[str, Any]:
    """The generation settings every trial's accuracy figures use (`eval.*` resolved by default_sampler)."""
    from .evaluation import default_sampler

    sampler = default_sampler(cfg, gen_length=cfg.eval.gen_length, block_length=cfg.eval.block_length,
                              steps=cfg.eval.sampler_steps)
    return {"sampler.gen_length": sampler.gen_length, "sampler.block_length": sampler.block_length,
            "sampler.steps": sampler.steps, "sampler.temperature": sampler.temperature,
            "sampler.remasking": sampler.remasking}


# -- on the driver ------------------------------------------------------------------------------------------

def _rung(step: int, grace: int, factor: float) -> int:
    return max(0, round(math.log(max(step, 1) / grace, factor))) if step >= grace else 0


class TrialStatusCallback:
    """Writes each trial's final status to its MLflow run from the driver (the trial itself may be killed)."""

    def __init__(self, tracking_uri: str, experiment: str, max_t: int, grace: int, factor: float):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.max_t, self.grace, self.factor = max_t, grace, factor

    def _run_id(self, trial_id: str) -> str | None:
        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        run = experiment and tracking.find_run(client, experiment.experiment_id, "raydllm.trial_id", trial_id)
        return run.info.run_id if run else None

    def _last_step(self, trial, run_id: str) -> int:
        """The last step trained: Tune's last result, or later (a stopped trial's worker may finish one
        more report after ASHA's decision; a restored trial may have trained past Tune's last record)."""
        history = MlflowClient(self.tracking_uri).get_metric_history(run_id, "loss_total")
        return max([int((trial.last_result or {}).get("step", 0))] + [m.step for m in history])

    def complete(self, trial) -> None:
        run_id = self._run_id(trial.trial_id)
        if run_id is None:
            return
        step = self._last_step(trial, run_id)
        # Completed or stopped is ASHA's decision, read from the result it decided on; a stopped trial's
        # worker may still train a few steps past that before it is killed (counted in last_step).
        if int((trial.last_result or {}).get("step", step)) >= self.max_t:
            tags = {"raydllm.status": "completed", "raydllm.last_step": str(step)}
        else:
            decided_at = int((trial.last_result or {}).get("step", step))  # the result ASHA stopped it on
            tags = {"raydllm.status": "stopped_early", "raydllm.last_step": str(step),
                    "raydllm.stopped_at_step": str(decided_at),
                    "raydllm.stopped_at_rung": str(_rung(decided_at, self.grace, self.factor))}
        checkpoint = (trial.last_result or {}).get("checkpoint_path")
        if checkpoint:  # forwarded by TuneReportCallback; `raydllm eval <run id>` finds the weights with it
            tags[tracking.CHECKPOINT_TAG] = str(checkpoint)
        tracking.finish_run(self.tracking_uri, run_id, "FINISHED", tags)

    def error(self, trial) -> None:
        run_id = self._run_id(trial.trial_id)
        if run_id is None:
            return
        message = _trial_error(trial)
        tracking.finish_run(self.tracking_uri, run_id, "FAILED",
                            {"raydllm.status": "failed", "raydllm.error": message[:5000],
                             "raydllm.last_step": str(self._last_step(trial, run_id))})


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    if path and Path(path).exists():
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1] if lines else "error"
    return str(getattr(trial, "error_msg", "") or "error")


class SweepProgress:
    """One status line instead of Ray's scrolling table: trial counts and the best config so far."""

    def __init__(self, metric: str, mode: str, keys: list[str], total: int, max_t: int):
        self.metric, self.mode, self.keys, self.total, self.max_t = metric, mode, keys, total, max_t
        self.best: tuple[float, str, dict] | None = None
        self.started = time.time()
        self.last_line = ""

    def update(self, trials, trial=None, result=None) -> None:
        if result is not None and self.metric in result:
            value = float(result[self.metric])
            better = self.best is None or (value < self.best[0] if self.mode == "min" else value > self.best[0])
            if better:
                config = flatten_trial_config(trial.config)
                self.best = (value, trial.trial_id, {k: config.get(k) for k in self.keys})
        counts = {"RUNNING": 0, "TERMINATED": 0, "ERROR": 0, "PENDING": 0, "PAUSED": 0}
        stopped = 0
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
            if t.status == "TERMINATED" and (t.last_result or {}).get("step", 0) < self.max_t:
                stopped += 1
        of = f"/{self.total}" if self.total else ""
        line = (f"[{time.time() - self.started:6.0f}s] trials {len(trials)}{of}: "
                f"{counts['RUNNING']} running, {counts['PENDING']} pending, {counts['TERMINATED'] - stopped} done, "
                f"{stopped} stopped early, {counts['ERROR']} failed")
        if self.best:
            params = " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in self.best[2].items())
            line += f" | best {self.metric}={self.best[0]:.4f} ({params})"
        if line != self.last_line:
            end = "\r" if sys.stdout.isatty() else "\n"
            sys.stdout.write(line + end)
            sys.stdout.flush()
            self.last_line = line


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _callbacks(status: TrialStatusCallback, progress: SweepProgress | None):
    from ray.tune import Callback

    class SweepHooks(Callback):
        """Tune's driver-side hooks -> MLflow trial status and the progress line."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if progress:
                progress.update(trials, trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            status.complete(trial)
            if progress:
                progress.update(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            status.error(trial)
            if progress:
                progress.update(trials)

    return [SweepHooks()]


def ensure_ray_for_sweep(spec: SweepSpec) -> None:
    """A local cluster with `max_concurrent_trials` trial slots, or the cluster in RAY_ADDRESS."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, configure_logging=False)
        else:
            # The dashboard must run: it serves the State API that Train's placement-group cleaner uses to
            # free the workers of trials ASHA stops (without it they leak and later trials hang).
            ray.init(resources={SLOT: spec.max_concurrent_trials}, include_dashboard=True,
                     configure_logging=False)
    check_resources(spec)


def check_resources(spec: SweepSpec) -> None:
    """Refuse, before any trial starts, a trial that this cluster can never place (unless it autoscales)."""
    import ray

    total = ray.cluster_resources()
    autoscaling = os.environ.get("RAYDLLM_AUTOSCALING") == "1"
    res = spec.resources
    need_cpu = res.workers * res.cpus_per_worker
    if not autoscaling and need_cpu > total.get("CPU", 0):
        raise ConfigError(f"resources: a trial needs {need_cpu:g} CPUs for its workers but the cluster has "
                          f"{total.get('CPU', 0):g}; lower resources.workers or cpus_per_worker")
    if not autoscaling and res.use_gpu and res.workers > total.get("GPU", 0):
        raise ConfigError(f"resources: a trial needs {res.workers} GPUs but the cluster has "
                          f"{total.get('GPU', 0):g}")


def _trial_resources() -> dict[str, float]:
    import ray

    # The trial actor itself only waits on its TorchTrainer: no CPU, one slot when the cluster has slots
    # (cluster.yaml's head has them; so does the local cluster). Elsewhere a sliver of CPU, because Tune
    # refuses a trial that requests nothing at all.
    return {"CPU": 0, SLOT: 1} if ray.cluster_resources().get(SLOT) else {"CPU": 0.01}


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str
    restored: bool
    trials: int


def sweep_name(spec: SweepSpec, space_file: Path) -> str:
    return spec.name or f"sweep-{spec.task}-{space_file.stem}"


def run_sweep(space_file: str | Path, *, tracking_uri: str, storage: str | None = None, name: str | None = None,
              progress: bool = True, extra_fixed: dict[str, Any] | None = None) -> SweepOutcome:
    """Run (or resume) the sweep in `space_file`. Re-running the same command resumes the same sweep."""
    space_file = Path(space_file)
    spec = load_spec(space_file, extra_fixed)
    return run_spec(spec, space_text=space_file.read_text(), space_name=space_file.name,
                    name=name or sweep_name(spec, space_file), tracking_uri=tracking_uri, storage=storage,
                    progress=progress)


def run_spec(spec: SweepSpec, *, space_text: str, space_name: str, name: str, tracking_uri: str,
             storage: str | None = None, progress: bool = True) -> SweepOutcome:
    """Run (or resume) a validated sweep."""
    from .train import check_storage, default_storage_path, warm_deepspeed_ops

    # Tune's own console output is replaced by SweepProgress (a line per change) and the final table.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    storage = storage or default_storage_path()
    tracking.check_tracking(tracking_uri)
    check_storage(storage)
    experiment = tracking.experiment_name(spec.task)
    parent_run_id, _ = tracking.open_run(
        tracking_uri, experiment, key="raydllm.sweep", name=name,
        params={"space_file": space_name, "num_samples": spec.num_samples,
                "max_concurrent_trials": spec.max_concurrent_trials},
        tags={"raydllm.kind": "sweep", "raydllm.metric": spec.metric, "raydllm.mode": spec.mode,
              "raydllm.searched_keys": json.dumps(sorted(spec.space)), **arm_tags(spec),
              **tracking.environment_tags()})
    MlflowClient(tracking_uri).log_text(parent_run_id, space_text, f"space/{space_name}")

    from .search_space import base_raw
    from .config import validate
    from .pretrain import prepare_base

    prepare_base(validate(base_raw(spec)).model)
    ensure_ray_for_sweep(spec)
    warm_deepspeed_ops()
    common = dict(spec=spec, storage=storage, tracking_uri=tracking_uri, experiment=experiment,
                  parent_run_id=parent_run_id, progress=progress)
    asha = spec.scheduler.type == "asha"
    # Each arm is its own search under the same scheduler: ASHA compares baseline trials with baseline trials.
    restored = _fit_phase(name=name, phase="search", param_space=param_space(spec), asha=asha,
                          num_samples=spec.num_samples, **common)
    arm = baseline_arm(spec)
    if arm and arm.mode == "searched":
        _fit_phase(name=f"{name}-baseline", phase="baseline", param_space=baseline_space(spec), asha=asha,
                   num_samples=arm.num_samples, **common)
    elif arm:  # the space fixes every key that changes the lambda = 0 loss: one trial at those values, to max_t
        _fit_phase(name=f"{name}-baseline", phase="baseline", asha=False, num_samples=None, **common,
                   param_space={**baseline_point(spec), "train.seed": spec.selection_seed})
    if spec.repeat.top and spec.fresh_seeds:
        # The winners (chosen on the selection seed's validation metric, completed trials only) on the fresh
        # seeds: the same seeds for both arms, so each pair shares its data order and masks.
        report = best_configs(spec.task, tracking_uri=tracking_uri, top=spec.repeat.top, sweep=name)
        points = [r["params"] for r in report["best"]] + ([report["baseline"]["params"]]
                                                           if report["baseline"] else [])
        if points:
            from ray import tune

            _fit_phase(name=f"{name}-repeat", phase="repeat", asha=False, num_samples=None, **common,
                       param_space={GRID_POINT: tune.grid_search(points),
                                    "train.seed": tune.grid_search(spec.fresh_seeds)})
    tracking.finish_run(tracking_uri, parent_run_id, "FINISHED")
    _log_summary(spec, tracking_uri, parent_run_id, name)
    return SweepOutcome(name=name, parent_run_id=parent_run_id, restored=restored,
                        trials=len(trial_runs(MlflowClient(tracking_uri), MlflowClient(tracking_uri).get_run(
                            parent_run_id))))


def arm_tags(spec: SweepSpec) -> dict[str, str]:
    """What the parent run says about the comparison: the selection seed, the fresh seeds, the baseline arm."""
    arm = baseline_arm(spec)
    return {"raydllm.selection_seed": str(spec.selection_seed), "raydllm.fresh_seeds": json.dumps(spec.fresh_seeds),
            "raydllm.max_steps": str(max_steps(spec)),
            "raydllm.baseline_mode": arm.mode if arm else "none",
            "raydllm.baseline_keys": json.dumps(baseline_keys(spec) if arm else []),
            "raydllm.baseline_num_samples": str(arm.num_samples or 1) if arm else "0"}


def _fit_phase(*, spec: SweepSpec, name: str, phase: str, param_space: dict, asha: bool, num_samples: int | None,
               storage: str, tracking_uri: str, experiment: str, parent_run_id: str, progress: bool) -> bool:
    """Run one Tuner (or restore it if its folder exists): True if it was restored. `num_samples`: a search
    (the space sampled that often, by the sweep's search algorithm); None: every point of `param_space` once."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    steps = max_steps(spec)
    train_storage = f"{storage.rstrip('/')}/{name}/train"
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec.model_dump(), tracking_uri=tracking_uri, experiment=experiment,
                             parent_run_id=parent_run_id, train_storage=train_storage, phase=phase),
        _trial_resources())
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space)
        restored = True
    else:
        status = TrialStatusCallback(tracking_uri, experiment, steps, spec.scheduler.grace_period,
                                     spec.scheduler.reduction_factor)
        search = num_samples is not None
        # Tune runs num_samples x every grid combination.
        total = num_samples * math.prod(len(d.grid) for d in spec.space.values() if d.kind == "grid") \
            if search else None
        reporter = SweepProgress(spec.metric, spec.mode, sorted(spec.space), total or 0, steps) if progress else None
        scheduler = (ASHAScheduler(time_attr="step", max_t=steps, grace_period=spec.scheduler.grace_period,
                                   reduction_factor=spec.scheduler.reduction_factor) if asha else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=num_samples if search else 1,
                # the search phase's generator limits concurrency itself (Tune ignores this with it)
                max_concurrent_trials=None if search else spec.max_concurrent_trials, scheduler=scheduler,
                search_alg=_search_alg(spec) if search else None),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, verbose=0, callbacks=_callbacks(status, reporter),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures)))
        restored = False
    tuner.fit()
    if progress:
        sys.stdout.write("\n")
    return restored


def _log_summary(spec: SweepSpec, tracking_uri: str, parent_run_id: str, name: str) -> None:
    """The final table on stdout; on the parent run each arm's best value and the gain as metrics, and the
    table, JSON and a plot as artifacts."""
    import tempfile

    client = MlflowClient(tracking_uri)
    report = best_configs(spec.task, tracking_uri=tracking_uri, top=10_000, sweep=name)
    table = format_table(report)
    print(table)
    for key, value in summary_metrics(report).items():
        client.log_metric(parent_run_id, key, value)
    client.log_text(parent_run_id, table, "summary/best.txt")
    client.log_dict(parent_run_id, report, "summary/best.json")
    with tempfile.TemporaryDirectory() as tmp:
        plot = plot_sweep(report, sorted(spec.space), Path(tmp) / "metric_vs_params.png")
        if plot:
            client.log_artifact(parent_run_id, str(plot), "summary")


def _search_alg(spec: SweepSpec):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.search.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
        import optuna

        sampler = optuna.samplers.TPESampler(seed=spec.search.seed)
        return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=spec.max_concurrent_trials)
    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=spec.max_concurrent_trials)



