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
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydllm.sweep import tracking
from raydllm.core.config import ConfigError
from mlflow.tracking import MlflowClient

from raydllm.sweep.results import best_configs, format_table, plot_sweep, summary_metrics, trial_runs
from raydllm.sweep.verdict import ui_hint, write_description
from raydllm.sweep.callbacks import SweepProgress, TrialStatusCallback, sweep_callbacks
from raydllm.sweep.trial_runner import run_trial
from raydllm.sweep.launches import LaunchWatch, current_gcs_address
from raydllm.sweep.search_space import GRID_POINT, SweepSpec, baseline_arm, baseline_keys, baseline_point, baseline_space, load_spec, max_steps, param_space, rung_steps, searcher_sizes
from raydllm.sweep.compute_match import MATCH_TAG, compute_matched, matched, repeat_points, with_match


log = logging.getLogger(__name__)
SLOT = "trial_slot"
TIME_ATTR = "step"  # the schedulers' clock (a result's training step) and the searcher's, for its rungs


def ensure_ray_for_sweep(spec: SweepSpec) -> None:
    """A local cluster with `max_concurrent_trials` trial slots, or the cluster in RAY_ADDRESS (or `ray start`ed here)."""
    from raydllm.sweep.train import ensure_ray

    ensure_ray(resources={SLOT: spec.max_concurrent_trials})
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
                             stream=None if progress is True else progress,
                             launches=LaunchWatch(current_gcs_address())) if progress else None
    if tune.Tuner.can_restore(path):
        # A restored Tuner keeps the callbacks it was created with, pickled with the tracking URI of the run that
        # created them; this process's progress view and tracking server replace theirs. A resubmitted Slurm job
        # runs its MLflow on another node or port: with the old URI every trial's end would wait on a dead server.
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space)
        for hooks in tuner._local_tuner.get_run_config().callbacks or []:
            if hasattr(hooks, "progress"):
                hooks.progress = reporter
            if isinstance(getattr(hooks, "status", None), TrialStatusCallback):
                hooks.status.tracking_uri = tracking_uri
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
                # The searcher tells Optuna which trials the scheduler stopped before its last rung, max_t.
                search_alg=_search_alg(spec, num_samples, max_t=steps if asha else None) if search else None),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, verbose=0, callbacks=sweep_callbacks(status, reporter),
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
    settings = dict(time_attr=TIME_ATTR, max_t=steps, grace_period=max(1, round(spec.scheduler.grace_period * steps
                                                                             / max_steps(spec))),
                    reduction_factor=spec.scheduler.reduction_factor)
    if spec.objectives:
        from raydllm.sweep.pareto_asha import ParetoASHA

        return ParetoASHA(spec.objectives, **settings)
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(**settings)


def _search_alg(spec: SweepSpec, num_samples: int | None = None, *, max_t: int | None = None):
    """One arm's search algorithm, sized by its own budget `num_samples`. `max_t`: the scheduler's last rung
    (the arm's step count under ASHA; None without a scheduler that stops trials): Optuna's trials that end
    below it are PRUNED, not COMPLETE (searchers.RungAwareOptunaSearch)."""
    sizes = searcher_sizes(num_samples or spec.num_samples)  # each arm's searcher sized by its own budget
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.search.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        import optuna

        from raydllm.sweep.searchers import RungAwareOptunaSearch

        if spec.search.sampler == "nsga2" or (spec.objectives and spec.search.sampler is None):
            from raydllm.sweep.searchers import PicklableNSGAIISampler

            sampler = PicklableNSGAIISampler(seed=spec.search.seed, population_size=sizes["population_size"])
        else:  # multi-objective TPE too
            sampler = optuna.samplers.TPESampler(seed=spec.search.seed, n_startup_trials=sizes["n_startup_trials"])
        searcher = (RungAwareOptunaSearch(sampler=sampler, metric=list(spec.objectives),
                                          mode=list(spec.objectives.values()), max_t=max_t, time_attr=TIME_ATTR)
                    if spec.objectives else RungAwareOptunaSearch(sampler=sampler, max_t=max_t, time_attr=TIME_ATTR))
        return ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent_trials)
    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=spec.max_concurrent_trials)


