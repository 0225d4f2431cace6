"""Bench layer: Kendall tau between two rankings of a sweep's trials (fast vs exact sampler), and each arm's
figures read back from MLflow.
"""
from __future__ import annotations

import json
from typing import Any


def kendall_tau(x, y) -> float | None:
    """Kendall's tau-b rank correlation of two equally long sequences (ties in either are common among
    accuracies, tau-b corrects for them); None when it is undefined (fewer than 2 items, or a constant one)."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau: {len(x)} != {len(y)} values")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = (x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])
            if dx and dy:
                concordant += dx == dy
                discordant += dx != dy
            else:
                ties_x += not dx and bool(dy)
                ties_y += not dy and bool(dx)
    denominator = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denominator if denominator else None


# Where a trial's exact and fast validation figures are: its own final report (`eval.sampler=fast`), or
# `raydllm eval <run id> --split validation` run after the sweep with each sampler (0-shot).
FIDELITY_KEYS = (("final_val_{m}", "final_val_{m}_fast"),
                 ("eval/validation/0shot/{m}", "eval/validation/0shot/fast/{m}"))


def fidelity_agreement(runs, primary: str) -> dict[str, Any]:
    """Rank agreement between the fast sampler's and the exact sampler's validation figure over the trials that
    logged both: does the cheap fidelity rank configs as the exact one? Each trial's pair comes from the first of
    FIDELITY_KEYS it has both of."""
    pairs = []
    for run in runs:
        for exact_key, fast_key in FIDELITY_KEYS:
            exact_key, fast_key = exact_key.format(m=primary), fast_key.format(m=primary)
            if exact_key in run.data.metrics and fast_key in run.data.metrics:
                pairs.append((float(run.data.metrics[exact_key]), float(run.data.metrics[fast_key])))
                break
    return {"trials": len(pairs), "kendall_tau": kendall_tau([p[0] for p in pairs], [p[1] for p in pairs]),
            "exact": [p[0] for p in pairs], "fast": [p[1] for p in pairs]}


def arm_figures(spec, *, tracking_uri: str, sweep: str) -> dict[str, Any]:
    """One arm of `bench sweep`, from MLflow: its best search trial on the first seed (what the search itself
    chose), that config's values over every seed it ran (its seed noise), trial-steps, time accounting, and
    with `eval.sampler=fast` the Kendall tau between fast and exact final validation accuracy over trials."""
    import statistics

    from mlflow.tracking import MlflowClient

    from raydllm.sweep.results import find_sweep, time_accounting, trial_runs
    from raydllm.data.tasks import get_task

    client = MlflowClient(tracking_uri)
    parent = find_sweep(client, spec.task, sweep)
    runs = trial_runs(client, parent)
    search = [r for r in runs if r.data.tags.get("raydllm.phase") == "search" and spec.metric in r.data.metrics]
    sign = 1 if spec.mode == "min" else -1
    best = min(search, key=lambda r: sign * r.data.metrics[spec.metric])
    key = best.data.tags.get("raydllm.config_key")
    same = [r for r in runs if r.data.tags.get("raydllm.config_key") == key and spec.metric in r.data.metrics]
    values = [float(r.data.metrics[spec.metric]) for r in same]
    searched = json.loads(best.data.tags.get("raydllm.searched", "{}"))
    searched.pop("train.seed", None)
    wall = ((parent.info.end_time or parent.info.start_time) - parent.info.start_time) / 1000
    return {"trials": len(search), "wall_s": round(wall, 1),
            "trial_steps": sum(int(r.data.tags.get("raydllm.last_step", 0)) for r in search),
            "best_config": searched, "best_metric": float(best.data.metrics[spec.metric]),
            "best_metric_mean_over_seeds": statistics.fmean(values),
            "best_metric_std_over_seeds": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": [int(r.data.params.get("train.seed", -1)) for r in same],
            "fast_vs_exact": fidelity_agreement(runs, get_task(spec.task).primary_metric),
            "time": time_accounting(runs)}
