"""Sweep layer: `raydllm tune`: Ray Tune + ASHA over the training engine, every trial a child run in MLflow.

Pattern (Ray Train V2): each Tune trial is a function trainable that builds the same `TorchTrainer` as
`raydllm train` and forwards its workers' reports to Tune with `TuneReportCallback`; ASHA's clock is the
`step` the workers report. Traps of Ray 2.60 handled here (see ../shared/notes/ray-2.60-tune-train.md):
- code after `trainer.fit()` never runs for a trial ASHA stops: curves are written by the workers and the
  final status by a driver-side callback, never by the trial after `fit()`;
- a restored sweep would open duplicate MLflow runs: a trial's run is looked up by its trial id;
- `max_concurrent_trials` is ignored after `Tuner.restore`: each trial actor holds one unit of a custom
  `trial_slot` resource, of which the local cluster has exactly `max_concurrent_trials`;
- a trial whose workers cannot be placed hangs forever: the resources a trial needs are checked against
  the nodes the cluster has and the node types its autoscaler can launch before anything starts, and
  `train.start_attempts` bounds the wait.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydllm.sweep import tracking
from raydllm.core.config import ConfigError
from mlflow.tracking import MlflowClient

from raydllm.sweep.results import best_configs, format_table, plot_sweep, summary_metrics, trial_runs
from raydllm.sweep.search_space import (GRID_POINT, SweepSpec, arm_of, baseline_arm, baseline_keys, baseline_point, baseline_space,
                           config_key, flatten_trial_config, load_spec, max_steps, param_space, searcher_sizes,
                           trial_config, trial_label)
from raydllm.sweep.verdict import ui_hint, write_description
from raydllm.sweep.compute_match import (MATCH_TAG, compute_matched, match_of, matched, repeat_points,
                                         trial_steps, with_match)

log = logging.getLogger(__name__)
SLOT = "trial_slot"


# -- inside a trial (a Tune actor) -----------------------------------------------------------------------

def run_trial(config: dict[str, Any], *, spec: dict, tracking_uri: str, experiment: str, parent_run_id: str,
              train_storage: str, phase: str) -> None:
    """One Tune trial: the training engine with this trial's config, reporting to Tune through Train."""
    scheduled_at = time.time()  # Tune placed this trial: from here its time counts as reserved
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raydllm.sweep.search_space import SweepSpec
    from raydllm.sweep.train import build_trainer

    sweep = SweepSpec.model_validate(spec)
    # A shuffled grid point, or a repeat-phase trial: a whole config from the search phase and a new seed.
    config = flatten_trial_config(config)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    cfg = trial_config(sweep, config, int(config["train.seed"]))
    # A compute-matched baseline trial carries its own step count; its rungs scale with it (compute_match.py).
    cfg.train.max_steps, grace = trial_steps(config, max_steps(sweep), sweep.scheduler.grace_period)
    if cfg.train.checkpoint_steps is None and cfg.train.checkpoint_every is None:
        # Checkpoints where ASHA decides and at the end: a resumed trial loses at most one rung of work.
        cfg.train.checkpoint_steps = rung_steps(grace, sweep.scheduler.reduction_factor, cfg.train.max_steps)
    run_id, resumed = tracking.open_run(
        tracking_uri, experiment, key="raydllm.trial_id", name=trial_id, params=cfg.flat() | sampler_params(cfg),
        run_name=trial_label(sweep, config, phase),
        tags={"mlflow.parentRunId": parent_run_id, "raydllm.kind": "trial", "raydllm.phase": phase, "raydllm.status": "running",
              "raydllm.arm": arm_of(cfg.flat()), "raydllm.config_key": config_key(sweep, config),
              **({MATCH_TAG: match_of(config)} if arm_of(cfg.flat()) == "baseline" else {}),
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
    from raydllm.evaluation.evaluate import default_sampler

    sampler = default_sampler(cfg, gen_length=cfg.eval.gen_length, block_length=cfg.eval.block_length,
                              steps=cfg.eval.sampler_steps)
    return {"sampler.gen_length": sampler.gen_length, "sampler.block_length": sampler.block_length,
            "sampler.steps": sampler.steps, "sampler.temperature": sampler.temperature,
            "sampler.remasking": sampler.remasking}


# -- on the driver ------------------------------------------------------------------------------------------

def rung_steps(grace: int, factor: float, max_t: int) -> list[int]:
    """ASHA's milestones below max_t: grace * factor^k (Ray's one-bracket AsyncHyperBandScheduler)."""
    count = int(math.log(max_t / grace) / math.log(factor) + 1) if max_t >= grace else 0
    return sorted(int(grace * factor ** k) for k in range(count))


def delete_checkpoints(run_folder: str) -> int:
    """Delete the `checkpoint_*` folders of one trial's Ray Train run (local or s3://...): a trial ASHA
    stopped is never resumed, and the repeat phase starts its configs afresh. Returns how many went."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(run_folder) if "://" in run_folder else (
            pafs.LocalFileSystem(), str(Path(run_folder).resolve()))
        children = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as exc:
        log.warning("could not list %s to delete its checkpoints: %s", run_folder, exc)
        return 0
    deleted = 0
    for info in children:
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            try:
                fs.delete_dir(info.path)
                deleted += 1
            except OSError as exc:
                log.warning("could not delete %s: %s", info.path, exc)
    return deleted


def _rung(step: int, grace: int, factor: float) -> int:
    return max(0, round(math.log(max(step, 1) / grace, factor))) if step >= grace else 0


class TrialStatusCallback:
    """Writes each trial's final status to its MLflow run from the driver (the trial itself may be killed)."""

    def __init__(self, tracking_uri: str, experiment: str, max_t: int, grace: int, factor: float,
                 train_storage: str | None = None):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.max_t, self.grace, self.factor = max_t, grace, factor
        self.train_storage = train_storage  # where trials' Train runs keep checkpoints (train-<trial id>)
        self.stopped: list[str] = []  # trial ids whose checkpoints were deleted

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
        if tags["raydllm.status"] == "stopped_early" and self.train_storage:
            # Nothing resumes a trial ASHA stopped: its checkpoints only cost storage (~140 GB each at 8B).
            self.stopped.append(trial.trial_id)
            tags["raydllm.checkpoints_deleted"] = str(self.delete_stopped(trial.trial_id))
        elif checkpoint:  # forwarded by TuneReportCallback; `raydllm eval <run id>` finds the weights with it
            tags[tracking.CHECKPOINT_TAG] = str(checkpoint)
        tracking.finish_run(self.tracking_uri, run_id, "FINISHED", tags)

    def delete_stopped(self, trial_id: str) -> int:
        return delete_checkpoints(f"{self.train_storage.rstrip('/')}/train-{trial_id}")

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
    """The live view of one phase of a sweep, in place of Ray's scrolling table: trials by state, the best
    result so far of each arm (DLLM-JEPA, and the lambda = 0 baseline), elapsed time and an estimate of what is
    left. On a terminal one line redrawn in place; otherwise (a file, a pipe) a plain line whenever a trial
    ends, and at most once a minute when only the rest has moved."""

    QUIET_S = 60.0  # a non-terminal stream gets a line per ended trial, else at most one per this many seconds

    def __init__(self, metric: str, mode: str, keys: list[str], total: int, max_t: int, *, phase: str = "search",
                 stream=None):
        self.metric, self.mode, self.keys, self.total, self.max_t = metric, mode, keys, total, max_t
        self.phase = phase
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.best: dict[str, tuple[float, dict]] = {}  # arm -> (value, searched params)
        self.started = time.time()
        self.last_states: tuple | None = None
        self.last_written = 0.0
        self.drawn = False

    def __getstate__(self):  # Tune pickles the hooks with the sweep; a stream does not pickle
        return {**self.__dict__, "stream": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.stream = sys.stderr

    def _better(self, value: float, arm: str) -> bool:
        if arm not in self.best:
            return True
        return value < self.best[arm][0] if self.mode == "min" else value > self.best[arm][0]

    def update(self, trials, trial=None, result=None) -> None:
        if result is not None and self.metric in result:
            config = flatten_trial_config(trial.config)
            arm = "baseline" if float(config.get("jepa.lambda", 1.0)) == 0 else "jepa"
            if self._better(float(result[self.metric]), arm):
                self.best[arm] = (float(result[self.metric]), {k: config.get(k) for k in self.keys})
        states, fraction = self._states(trials)
        now = time.time()
        # A terminal is redrawn on any change (at most once a second for the clock); a file gets a line when a
        # trial ends, so a sweep's log is about one line per trial.
        key = states if self.tty else states[2:5]
        changed = key != self.last_states
        if not changed and now - self.last_written < (1.0 if self.tty else self.QUIET_S):
            return
        self.last_states, self.last_written = key, now
        line = self.line(states, fraction, now - self.started)
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns
            self.stream.write("\r" + line[:width - 1] + "\x1b[K")
            self.drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _states(self, trials) -> tuple[tuple, float]:
        """(running, pending, done, stopped early, failed), and the share of the phase's work done: a finished
        trial counts whole, a running one by its step."""
        running = pending = done = stopped = failed = 0
        work = 0.0
        for t in trials:
            step = int((t.last_result or {}).get("step", 0))
            if t.status == "RUNNING":
                running += 1
                work += min(step / self.max_t, 1.0)
            elif t.status == "TERMINATED":
                done, stopped = (done + 1, stopped) if step >= self.max_t else (done, stopped + 1)
                work += 1
            elif t.status == "ERROR":
                failed += 1
                work += 1
            else:
                pending += 1
        total = max(self.total, len(trials), 1)
        return (running, pending, done, stopped, failed, len(trials)), work / total

    def line(self, states: tuple, fraction: float, elapsed: float) -> str:
        running, pending, done, stopped, failed, seen = states
        of = f"/{self.total}" if self.total else ""
        line = (f"[{self.phase} {_duration(elapsed)}] trials {seen}{of}: {running} running, {pending} pending, "
                f"{done} done, {stopped} stopped early, {failed} failed")
        for arm in ("jepa", "baseline"):
            if arm in self.best:
                value, params = self.best[arm]
                shown = "" if arm == "baseline" else " (" + " ".join(
                    f"{k.split('.')[-1]}={_short(v)}" for k, v in params.items()) + ")"
                line += f" | best {arm} {self.metric} {value:.4f}{shown}"
        if 0.02 < fraction < 1:
            line += f" | ~{_duration(elapsed * (1 - fraction) / fraction)} left"
        return line

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _callbacks(status: TrialStatusCallback, progress: SweepProgress | None):
    from ray.tune import Callback

    class SweepHooks(Callback):
        """Tune's driver-side hooks -> MLflow trial status and the progress view. Tune pickles them with the
        sweep; a restored sweep swaps in the progress view of the process that restores it."""

        def __init__(self):
            self.status, self.progress = status, progress

        def on_step_end(self, iteration, trials, **info):  # keeps the elapsed time and estimate moving
            if self.progress:
                self.progress.update(trials)

        def on_trial_start(self, iteration, trials, trial, **info):
            if self.progress:
                self.progress.update(trials)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.progress:
                self.progress.update(trials, trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.status.complete(trial)
            if self.progress:
                self.progress.update(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.status.error(trial)
            if self.progress:
                self.progress.update(trials)

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
    """Refuse, before any trial starts, a trial that no node of this cluster can ever hold: neither a node
    that is up nor a node type its autoscaler can launch (Ray's record of them: raydllm.sweep.cluster).
    Without that record: on a fixed allocation (Slurm, a local Ray, RAYDLLM_FIXED_CLUSTER=1) the nodes that are
    up are all there is; elsewhere (KubeRay, a hand-started Ray) an autoscaler may still add a node that fits,
    so the check warns and goes on."""
    from raydllm.sweep import cluster
    from raydllm.core.config import validate
    from raydllm.sweep.search_space import base_raw
    from raydllm.sweep.train import worker_bundle

    workers = spec.resources.workers
    bundle = worker_bundle(validate(base_raw(spec)), spec.resources.use_gpu)
    shapes = cluster.node_shapes()
    if cluster.placement(bundle, workers, shapes) is not None:
        return
    need = f"a trial needs {workers} worker(s) of {{{', '.join(f'{k}: {v:g}' for k, v in bundle.items())}}}"
    if cluster.node_types_recorded():
        raise ConfigError(f"resources: {need}, more than this cluster can ever hold ({cluster.describe(shapes)}); "
                          f"lower resources or add a node type that fits")
    if cluster.fixed_allocation() or not os.environ.get("RAY_ADDRESS"):
        raise ConfigError(f"resources: {need}, more than any node of this fixed allocation holds (largest: "
                          f"{cluster.describe_node(cluster.largest(bundle, shapes))}); lower resources or "
                          f"allocate larger nodes")
    log.warning("resources: %s, more than the nodes that are up hold (%s) and this cluster has no autoscaler "
                "node-type record, so whether a node that fits can still be added is unknown; going on (set "
                "RAYDLLM_FIXED_CLUSTER=1 to refuse instead)", need, cluster.describe(shapes))


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
    failed: int = 0  # trials whose MLflow status is failed (the CLI exits non-zero when there are any)
    summary: str = ""  # the final table (the CLI prints it)


def sweep_name(spec: SweepSpec, space_file: Path) -> str:
    return spec.name or f"sweep-{spec.task}-{space_file.stem}"


def run_sweep(space_file: str | Path, *, tracking_uri: str, storage: str | None = None, name: str | None = None,
              progress: bool | Any = True, extra_fixed: dict[str, Any] | None = None,
              checked: bool = False) -> SweepOutcome:
    """Run (or resume) the sweep in `space_file`. Re-running the same command resumes the same sweep.
    `progress`: show the live view (True: on stderr; or the stream to draw it on)."""
    space_file = Path(space_file)
    spec = load_spec(space_file, extra_fixed)
    return run_spec(spec, space_text=space_file.read_text(), space_name=space_file.name,
                    name=name or sweep_name(spec, space_file), tracking_uri=tracking_uri, storage=storage,
                    progress=progress, checked=checked)


def run_spec(spec: SweepSpec, *, space_text: str, space_name: str, name: str, tracking_uri: str,
             storage: str | None = None, progress: bool | Any = True, checked: bool = False) -> SweepOutcome:
    """Run (or resume) a validated sweep. Everything is checked and Ray is up before the MLflow parent run opens;
    once it is open, a sweep that stops early leaves it FAILED (KILLED on Ctrl-C), never RUNNING.
    `checked`: train.check_sweep already ran (the CLI checks before it quiets the terminal)."""
    from raydllm.sweep.train import check_sweep, default_storage_path, warm_deepspeed_ops

    # Tune's own console output is replaced by SweepProgress (a line per change) and the final table.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    storage = storage or default_storage_path()
    if not checked:
        check_sweep(spec, space_name=space_name, tracking_uri=tracking_uri, storage=storage)

    from raydllm.sweep.search_space import base_raw
    from raydllm.core.config import validate
    from raydllm.engine.pretrain import prepare_base

    prepare_base(validate(base_raw(spec)).model)
    ensure_ray_for_sweep(spec)
    experiment = tracking.experiment_name(spec.task)
    parent_run_id, _ = tracking.open_run(
        tracking_uri, experiment, key="raydllm.sweep", name=name,
        params={"space_file": space_name, "num_samples": spec.num_samples,
                "max_concurrent_trials": spec.max_concurrent_trials},
        tags={"raydllm.kind": "sweep", "raydllm.metric": spec.metric, "raydllm.mode": spec.mode,
              "raydllm.searched_keys": json.dumps(sorted(spec.space)), **arm_tags(spec), **objective_tags(spec),
              **tracking.environment_tags()})
    try:
        MlflowClient(tracking_uri).log_text(parent_run_id, space_text, f"space/{space_name}")
        warm_deepspeed_ops()
        restored = _run_phases(spec, name=name, storage=storage, tracking_uri=tracking_uri, experiment=experiment,
                               parent_run_id=parent_run_id, progress=progress)
    except BaseException as exc:
        _close_stopped_sweep(tracking_uri, parent_run_id, exc)
        raise
    client = MlflowClient(tracking_uri)
    trials = trial_runs(client, client.get_run(parent_run_id))
    failed = sum(run.data.tags.get("raydllm.status") == "failed" for run in trials)
    tracking.finish_run(tracking_uri, parent_run_id, "FINISHED", {"raydllm.failed_trials": str(failed)})
    summary = _log_summary(spec, tracking_uri, parent_run_id, name)
    return SweepOutcome(name=name, parent_run_id=parent_run_id, restored=restored, trials=len(trials),
                        failed=failed, summary=summary)


def _run_phases(spec: SweepSpec, *, name: str, **common) -> bool:
    """The DLLM-JEPA arm's search, the baseline arm (searched under the same scheduler, or pinned), then both
    arms' winners on the fresh seeds: True if the first phase was restored."""
    asha = spec.scheduler.type == "asha"
    # Each arm is its own search under the same scheduler: ASHA compares baseline trials with baseline trials.
    restored = _fit_phase(spec=spec, name=name, phase="search", param_space=param_space(spec), asha=asha,
                          num_samples=spec.num_samples, **common)
    arm = baseline_arm(spec)
    if arm and arm.mode == "searched":
        _fit_phase(spec=spec, name=f"{name}-baseline", phase="baseline", param_space=baseline_space(spec), asha=asha,
                   num_samples=arm.num_samples, **common)
    elif arm:  # the space fixes every key that changes the lambda = 0 loss: one trial at those values, to max_t
        _fit_phase(spec=spec, name=f"{name}-baseline", phase="baseline", asha=False, num_samples=None, **common,
                   param_space={**with_match(spec, baseline_point(spec), max_steps(spec)),
                                "train.seed": spec.selection_seed})
    if spec.repeat.top and spec.fresh_seeds:
        # The winners (chosen on the selection seed's validation metric, completed trials only) on the fresh
        # seeds: the same seeds for both arms, so each pair shares its data order and masks.
        report = best_configs(spec.task, tracking_uri=common["tracking_uri"], top=spec.repeat.top, sweep=name)
        # A Pareto sweep repeats the search's front (on the selection seed) instead of the top configs of one metric.
        winners = (selection_front(spec, tracking_uri=common["tracking_uri"], sweep=name) if spec.objectives
                   else [r["params"] for r in report["best"]])
        # The baseline arm's own front in a Pareto sweep; under match: compute its winner both ways.
        baselines = (selection_front(spec, tracking_uri=common["tracking_uri"], sweep=name, phase="baseline")
                     if spec.objectives else [report["baseline"]["params"]] if report["baseline"] else [])
        points = winners + [p for params in baselines for p in repeat_points(spec, params)]
        if points:
            from ray import tune

            _fit_phase(spec=spec, name=f"{name}-repeat", phase="repeat", asha=False, num_samples=None, **common,
                       param_space={GRID_POINT: tune.grid_search(points),
                                    "train.seed": tune.grid_search(spec.fresh_seeds)})
    return restored


def selection_front(spec: SweepSpec, *, tracking_uri: str, sweep: str, phase: str = "search") -> list[dict[str, Any]]:
    """The searched values of one arm's Pareto front (phase "search": DLLM-JEPA; "baseline": the baseline's) on the selection seed: its completed search trials'
    final objective vectors, non-dominated, best spread first (pareto.rank_order: the front's extremes, then by
    crowding distance), at most `repeat.top` of them. Only selection-seed results: a resumed sweep repeats the
    same configs whatever the repeat phase has already run."""
    from raydllm.sweep.pareto import rank_order, pareto_front
    from raydllm.sweep.results import find_sweep

    client = MlflowClient(tracking_uri)
    runs = [r for r in trial_runs(client, find_sweep(client, spec.task, sweep))
            if r.data.tags.get("raydllm.phase") == phase and r.data.tags.get("raydllm.status") == "completed"
            and all(name in r.data.metrics for name in spec.objectives)]
    modes = list(spec.objectives.values())
    points = [[float(r.data.metrics[name]) for name in spec.objectives] for r in runs]
    front = set(pareto_front(points, modes))
    chosen = [i for i in rank_order(points, modes) if i in front][:spec.repeat.top]
    searched = [json.loads(runs[i].data.tags.get("raydllm.searched", "{}")) for i in chosen]
    return [{k: v for k, v in params.items() if k != "train.seed"} for params in searched]


def _close_stopped_sweep(tracking_uri: str, parent_run_id: str, exc: BaseException) -> None:
    """A sweep that stopped early: its parent run, and trial runs left running, end KILLED (Ctrl-C: re-running
    the command resumes them) or FAILED; none stays RUNNING."""
    status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
    reason = "interrupted" if status == "KILLED" else f"{type(exc).__name__}: {exc}"[:5000]
    try:
        client = MlflowClient(tracking_uri)
        for run in trial_runs(client, client.get_run(parent_run_id)):
            if run.info.status == "RUNNING":
                tracking.finish_run(tracking_uri, run.info.run_id, "KILLED")
        tracking.finish_run(tracking_uri, parent_run_id, status, {"raydllm.error": reason})
    except Exception:  # noqa: BLE001 - the original error is the one to report
        log.exception("could not close MLflow run %s", parent_run_id)


@contextlib.contextmanager
def _sigint_stops_tune():
    """Ctrl-C during `tuner.fit()`: Tune stops the trials and saves its state (their checkpoints stay), and the
    sweep then ends as interrupted (KeyboardInterrupt) instead of moving on to its next phase, as Tune's own
    handler would let it. The first Ctrl-C goes to Tune's SIGUSR1 hook, which does what its SIGINT hook does;
    a second one (or one before Tune has set up) stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield threading.Event()
        return
    interrupted = threading.Event()

    def on_sigint(signum, frame):
        tune_hook = signal.getsignal(signal.SIGUSR1)  # set by tune.run (ray/tune/tune.py) for this fit
        if interrupted.is_set() or getattr(tune_hook, "__name__", "") != "signal_interrupt_tune_run":
            raise KeyboardInterrupt
        interrupted.set()
        tune_hook(signal.SIGUSR1, frame)

    previous_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    previous = signal.signal(signal.SIGINT, on_sigint)
    previous_usr1 = signal.getsignal(signal.SIGUSR1)
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGUSR1, previous_usr1)  # Tune's hook belongs to the fit that just ended
        if previous_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = previous_env


def objective_tags(spec: SweepSpec) -> dict[str, str]:
    """A Pareto sweep's objectives (in order, with modes) and its rungs: what `raydllm best --pareto` reads."""
    if not spec.objectives:
        return {}
    rungs = rung_steps(spec.scheduler.grace_period, spec.scheduler.reduction_factor, max_steps(spec)) \
        if spec.scheduler.type == "asha" else []
    return {"raydllm.objectives": json.dumps(spec.objectives), "raydllm.rungs": json.dumps(rungs)}


def arm_tags(spec: SweepSpec) -> dict[str, str]:
    """What the parent run says about the comparison: the selection seed, the fresh seeds, the baseline arm."""
    arm = baseline_arm(spec)
    return {"raydllm.selection_seed": str(spec.selection_seed), "raydllm.fresh_seeds": json.dumps(spec.fresh_seeds),
            "raydllm.max_steps": str(max_steps(spec)),
            "raydllm.baseline_mode": arm.mode if arm else "none",
            "raydllm.baseline_keys": json.dumps(baseline_keys(spec) if arm else []),
            "raydllm.baseline_num_samples": str(arm.num_samples or 1) if arm else "0",
            "raydllm.jepa_num_samples": str(spec.num_samples),
            MATCH_TAG: arm.match if arm else "none"}


def _fit_phase(*, spec: SweepSpec, name: str, phase: str, param_space: dict, asha: bool, num_samples: int | None,
               storage: str, tracking_uri: str, experiment: str, parent_run_id: str, progress: bool | Any) -> bool:
    """Run one Tuner (or restore it if its folder exists): True if it was restored. `num_samples`: a search
    (the space sampled that often, by the sweep's search algorithm); None: every point of `param_space` once."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    steps = matched(max_steps(spec)) if phase == "baseline" and compute_matched(spec) else max_steps(spec)
    train_storage = f"{storage.rstrip('/')}/{name}/train"
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec.model_dump(), tracking_uri=tracking_uri, experiment=experiment,
                             parent_run_id=parent_run_id, train_storage=train_storage, phase=phase),
        _trial_resources())
    path = f"{storage.rstrip('/')}/{name}"
    search = num_samples is not None
    # Tune runs num_samples x every grid combination.
    total = num_samples * math.prod(len(d.grid) for d in spec.space.values() if d.kind == "grid") \
        if search else None
    reporter = SweepProgress(spec.metric, spec.mode, sorted(spec.space), total or 0, steps, phase=phase,
                             stream=None if progress is True else progress) if progress else None
    if tune.Tuner.can_restore(path):
        # A restored Tuner keeps the callbacks it was created with; the progress view of this process joins them.
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space)
        for hooks in tuner._local_tuner.get_run_config().callbacks or []:
            if hasattr(hooks, "progress"):
                hooks.progress = reporter
        restored = True
    else:
        status = TrialStatusCallback(tracking_uri, experiment, steps, spec.scheduler.grace_period,
                                     spec.scheduler.reduction_factor, train_storage=train_storage)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                # A Pareto sweep has no one metric: its scheduler and searcher are given the objectives.
                metric=None if spec.objectives else spec.metric, mode=None if spec.objectives else spec.mode,
                num_samples=num_samples if search else 1,
                # the search phase's generator limits concurrency itself (Tune ignores this with it)
                max_concurrent_trials=None if search else spec.max_concurrent_trials,
                scheduler=_scheduler(spec, steps) if asha else FIFOScheduler(),
                search_alg=_search_alg(spec, num_samples) if search else None),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, verbose=0, callbacks=_callbacks(status, reporter),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures)))
        restored = False
    try:
        with _sigint_stops_tune() as interrupted:
            tuner.fit()
    finally:
        if reporter:
            reporter.close()
    if interrupted.is_set():
        raise KeyboardInterrupt
    if not restored:
        for trial_id in status.stopped:  # a stopped trial's worker may have saved once more after the decision
            status.delete_stopped(trial_id)
    return restored


def _log_summary(spec: SweepSpec, tracking_uri: str, parent_run_id: str, name: str) -> str:
    """The final table (returned; the CLI prints it); on the parent run each arm's best value and the gain as
    metrics, and the table, JSON and a plot as artifacts."""
    import tempfile

    client = MlflowClient(tracking_uri)
    report = best_configs(spec.task, tracking_uri=tracking_uri, top=10_000, sweep=name)
    table = format_table(report)
    for key, value in summary_metrics(report).items():
        client.log_metric(parent_run_id, key, value)
    client.log_text(parent_run_id, table, "summary/best.txt")
    client.log_dict(parent_run_id, report, "summary/best.json")
    write_description(client, parent_run_id, best=report)  # the verdict in the run's Description
    with tempfile.TemporaryDirectory() as tmp:
        plot = plot_sweep(report, sorted(spec.space), Path(tmp) / "metric_vs_params.png")
        if plot:
            client.log_artifact(parent_run_id, str(plot), "summary")
    if spec.objectives:  # the front as a table, JSON and a plot, and the hypervolume at each rung
        from raydllm.sweep.pareto_results import log_pareto_summary, pareto_report

        pareto = pareto_report(spec.task, tracking_uri=tracking_uri, sweep=name)
        table += "\n\n" + log_pareto_summary(tracking_uri, parent_run_id, pareto)
    return table + "\n" + ui_hint(client, parent_run_id)


def _scheduler(spec: SweepSpec, steps: int):
    """ASHA on the sweep's metric, or on all its objectives at once (a Pareto sweep: pareto_asha)."""
    # A compute-matched baseline phase runs more steps: its rungs at the same FLOPs (compute_match.py).
    settings = dict(time_attr="step", max_t=steps, grace_period=max(1, round(spec.scheduler.grace_period * steps
                                                                             / max_steps(spec))),
                    reduction_factor=spec.scheduler.reduction_factor)
    if spec.objectives:
        from raydllm.sweep.pareto_asha import ParetoASHA

        return ParetoASHA(spec.objectives, **settings)
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(**settings)


def _search_alg(spec: SweepSpec, num_samples: int | None = None):
    sizes = searcher_sizes(num_samples or spec.num_samples)  # each arm's searcher sized by its own budget
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.search.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
        import optuna

        if spec.search.sampler == "nsga2" or (spec.objectives and spec.search.sampler is None):
            from raydllm.sweep.searchers import PicklableNSGAIISampler

            sampler = PicklableNSGAIISampler(seed=spec.search.seed, population_size=sizes["population_size"])
        else:  # multi-objective TPE too
            sampler = optuna.samplers.TPESampler(seed=spec.search.seed, n_startup_trials=sizes["n_startup_trials"])
        searcher = (OptunaSearch(sampler=sampler, metric=list(spec.objectives), mode=list(spec.objectives.values()))
                    if spec.objectives else OptunaSearch(sampler=sampler))
        return ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent_trials)
    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=spec.max_concurrent_trials)



