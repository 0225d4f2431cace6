"""Runs and sweeps layer: reading a sweep back from MLflow: best configs with seeds aggregated, the baseline, a summary plot.

Everything here reads MLflow only (not Ray's files), so it works on a sweep that is still running and on
a machine that never saw the cluster.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlflow.tracking import MlflowClient

from .config import ConfigError
from .tracking import experiment_name


@dataclass
class ConfigResult:
    config_key: str
    params: dict[str, object]  # the searched values (and the pinned baseline's lambda)
    metric: str
    mean: float
    std: float
    n: int
    seeds: list[int]
    values: list[float]
    run_ids: list[str]
    statuses: list[str]
    baseline: bool
    gain_vs_baseline: float | None = None  # positive = better than the baseline on the same seeds
    baseline_seeds: list[int] = field(default_factory=list)


def find_sweep(client: MlflowClient, task: str, sweep: str | None = None):
    experiment = client.get_experiment_by_name(experiment_name(task))
    if experiment is None:
        raise ConfigError(f"task {task}: no MLflow experiment {experiment_name(task)!r} at {client.tracking_uri}")
    query = "tags.`raydllm.kind` = 'sweep'" + (f" and tags.`raydllm.sweep` = '{sweep}'" if sweep else "")
    runs = client.search_runs([experiment.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        raise ConfigError(f"task {task}: no sweep{' named ' + sweep if sweep else ''} in {client.tracking_uri}")
    return runs[0]


def trial_runs(client: MlflowClient, parent) -> list:
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=5000)


def summarize(runs, metric: str, mode: str) -> list[ConfigResult]:
    """Group trials by config (all searched values but the seed); best first."""
    groups: dict[str, list] = {}
    for run in runs:
        if metric not in run.data.metrics or run.data.tags.get("raydllm.status") == "failed":
            continue
        groups.setdefault(run.data.tags.get("raydllm.config_key", run.info.run_id), []).append(run)
    results = []
    for key, members in groups.items():
        values = [float(r.data.metrics[metric]) for r in members]
        params = json.loads(members[0].data.tags.get("raydllm.searched", "{}"))
        params.pop("train.seed", None)
        lam = float(members[0].data.params.get("jepa.lambda", "nan"))
        anchor = members[0].data.params.get("loss.anchor", "none")
        results.append(ConfigResult(
            config_key=key, params=params, metric=metric, mean=statistics.fmean(values),
            std=statistics.stdev(values) if len(values) > 1 else 0.0, n=len(values),
            seeds=[int(r.data.params.get("train.seed", -1)) for r in members], values=values,
            run_ids=[r.info.run_id for r in members],
            statuses=[r.data.tags.get("raydllm.status", "running") for r in members],
            baseline=lam == 0 and anchor == "none"))
    sign = 1 if mode == "min" else -1
    results.sort(key=lambda r: sign * r.mean)
    baselines = [r for r in results if r.baseline]
    if baselines:
        base = baselines[0]
        by_seed = dict(zip(base.seeds, base.values))
        for r in results:
            shared = [(v, by_seed[s]) for s, v in zip(r.seeds, r.values) if s in by_seed]
            if shared and not r.baseline:
                r.gain_vs_baseline = sign * (statistics.fmean(b for _, b in shared) - statistics.fmean(
                    v for v, _ in shared))
                r.baseline_seeds = sorted({s for s in r.seeds if s in by_seed})
    return results


def time_accounting(runs) -> dict | None:
    """Where the sweep's reserved worker time went: the fraction spent in training steps, and the shares of
    start-up (scheduling to first step), evaluation and checkpointing (the rest is teardown and logging);
    with each trial's time from scheduling to its first step, split into Ray's part and the worker's init.
    Reserved time = (MLflow run end - start) x workers, for trials that ended."""
    phases = {"training": "time/train_s", "startup": "time/startup_s", "evaluation": "time/eval_s",
              "checkpointing": "time/checkpoint_s"}
    reserved = 0.0
    spent = dict.fromkeys(phases, 0.0)
    startups: dict[str, list[float]] = {"total": [], "ray": [], "init": []}
    written: list[float] = []  # checkpoint bytes per trial (all its ranks, every save, the export)
    for run in runs:
        metrics = run.data.metrics
        if "checkpoint/bytes" in metrics:
            written.append(float(metrics["checkpoint/bytes"]))
        for part, key in [("total", "time/startup_s"), ("ray", "time/startup/ray_s"), ("init", "time/startup/init_s")]:
            if key in metrics:
                startups[part].append(float(metrics[key]))
        if run.info.end_time is None or "time/train_s" not in metrics:
            continue
        workers = int(run.data.params.get("train.workers", 1))
        reserved += (run.info.end_time - run.info.start_time) / 1000 * workers
        for phase, key in phases.items():
            spent[phase] += float(metrics.get(key, 0.0)) * workers
    if reserved <= 0:
        return None
    shares = {phase: seconds / reserved for phase, seconds in spent.items()}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    median = {part: statistics.median(v) if v else None for part, v in startups.items()}
    return {"training_fraction": shares["training"], "shares": shares, "reserved_worker_s": reserved,
            "training_worker_s": spent["training"], "trials_timed": len(startups["total"]),
            "startup_s_median": median["total"], "startup_s_max": max(startups["total"], default=None),
            "startup_ray_s_median": median["ray"], "startup_init_s_median": median["init"],
            "checkpoint_bytes_total": sum(written), "checkpoint_bytes_per_trial_max": max(written, default=None)}


def best_configs(task: str, *, tracking_uri: str, top: int = 5, sweep: str | None = None) -> dict:
    client = MlflowClient(tracking_uri)
    parent = find_sweep(client, task, sweep)
    metric = parent.data.tags["raydllm.metric"]
    mode = parent.data.tags["raydllm.mode"]
    runs = trial_runs(client, parent)
    results = summarize(runs, metric, mode)
    baseline = next((r for r in results if r.baseline), None)
    return {"sweep": parent.data.tags.get("raydllm.sweep"), "parent_run_id": parent.info.run_id,
            "status": parent.info.status, "metric": metric, "mode": mode,
            "best": [asdict(r) for r in results if not r.baseline][:top],
            "baseline": asdict(baseline) if baseline else None, "time": time_accounting(runs)}


def format_table(report: dict) -> str:
    metric = report["metric"]
    lines = [f"sweep {report['sweep']} ({report['status'].lower()}), {metric} ({report['mode']}):"]
    rows = report["best"] + ([report["baseline"]] if report["baseline"] else [])
    for i, r in enumerate(rows, 1):
        label = "baseline" if r["baseline"] else f"#{i}"
        params = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(r["params"].items()))
        spread = f" ± {r['std']:.4f}" if r["n"] > 1 else ""
        gain = f"  gain {r['gain_vs_baseline']:+.4f}" if r.get("gain_vs_baseline") is not None else ""
        lines.append(f"  {label:>8}  {r['mean']:.4f}{spread} (n={r['n']}, seeds {r['seeds']}){gain}  {params}"
                     f"  run {r['run_ids'][0][:8]}")
    timing = report.get("time")
    if timing:
        lines.append("  " + format_time_accounting(timing))
    return "\n".join(lines)


def format_time_accounting(timing: dict) -> str:
    shares = timing.get("shares", {})
    line = (f"time: {timing['training_fraction']:.0%} of reserved worker time in training steps "
            f"({timing['training_worker_s']:.0f} of {timing['reserved_worker_s']:.0f} worker-s)")
    if shares:
        line += " | " + ", ".join(f"{phase} {shares[phase]:.0%}" for phase in
                                  ("startup", "evaluation", "checkpointing", "other"))
    if timing["startup_s_median"] is not None:
        line += (f" | scheduling to first step: median {timing['startup_s_median']:.0f} s, "
                 f"max {timing['startup_s_max']:.0f} s over {timing['trials_timed']} trials")
        if timing.get("startup_ray_s_median") is not None:
            line += (f" (Ray start {timing['startup_ray_s_median']:.0f} s + model, data and DeepSpeed init "
                     f"{timing['startup_init_s_median']:.0f} s)")
    if timing.get("checkpoint_bytes_per_trial_max"):
        line += (f" | checkpoints written: {timing['checkpoint_bytes_total'] / 1e9:.3g} GB, at most "
                 f"{timing['checkpoint_bytes_per_trial_max'] / 1e9:.3g} GB a trial")
    return line


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot_sweep(runs, metric: str, keys: list[str], path: Path) -> Path | None:
    """Metric against each searched parameter (one panel each), colored by trial status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(json.loads(r.data.tags.get("raydllm.searched", "{}")), r.data.metrics[metric],
               r.data.tags.get("raydllm.status", "running")) for r in runs if metric in r.data.metrics]
    if not points or not keys:
        return None
    colors = {"completed": "tab:green", "stopped_early": "tab:orange", "running": "tab:blue", "failed": "tab:red"}
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), sharey=True, squeeze=False)
    for ax, key in zip(axes[0], keys):
        for params, value, status in points:
            x = params.get(key)
            if x is None or (isinstance(x, float) and math.isnan(x)):
                continue
            ax.scatter(x, value, c=colors.get(status, "gray"), s=28, alpha=0.85)
        ax.set_xlabel(key)
        if key == "train.lr":
            ax.set_xscale("log")
    axes[0][0].set_ylabel(metric)
    for status, color in colors.items():
        axes[0][-1].scatter([], [], c=color, label=status)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{metric} vs searched parameters ({len(points)} trials)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
