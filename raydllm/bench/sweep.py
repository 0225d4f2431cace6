"""Bench layer: `raydllm bench sweep`: one search space as a full grid and under ASHA (or the multi-objective
ASHA), with the trial-steps each costs and what each finds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raydllm.bench.fidelity import arm_figures, fidelity_agreement


def bench_sweep(space_file: str | Path, *, tracking_uri: str, storage: str | None = None) -> dict[str, Any]:
    """The same space run twice: as a full grid (every trial to max_t, the grid-best repeated over the seeds
    to measure seed noise) and under ASHA. Compute is counted in trial-steps, read back from MLflow. Re-running
    resumes unfinished arms and recomputes the figures from MLflow."""
    from raydllm.sweep.search_space import RepeatSettings, load_spec
    from raydllm.sweep.tune import run_spec, sweep_name

    space_file = Path(space_file)
    spec = load_spec(space_file)
    base = sweep_name(spec, space_file)
    arms = {
        "grid": spec.model_copy(update={"scheduler": spec.scheduler.model_copy(update={"type": "fifo"}),
                                        "repeat": RepeatSettings(top=1), "baseline": False}),
        "asha": spec.model_copy(update={"repeat": RepeatSettings(top=0), "baseline": False}),
    }
    figures: dict[str, Any] = {}
    for arm, arm_spec in arms.items():
        if not _sweep_finished(tracking_uri, spec.task, f"{base}-{arm}"):  # a finished arm keeps its wall time
            run_spec(arm_spec, space_text=space_file.read_text(), space_name=space_file.name, name=f"{base}-{arm}",
                     tracking_uri=tracking_uri, storage=storage)
        figures[arm] = arm_figures(spec, tracking_uri=tracking_uri, sweep=f"{base}-{arm}")
    grid, asha = figures["grid"], figures["asha"]
    noise = grid["best_metric_std_over_seeds"]
    sign = 1 if spec.mode == "min" else -1
    figures["compute_ratio"] = asha["trial_steps"] / max(grid["trial_steps"], 1)
    figures["asha_gap"] = sign * (asha["best_metric"] - grid["best_metric"])
    figures["within_seed_noise"] = figures["asha_gap"] <= 2 * noise
    return figures


def pareto_arms(spec) -> dict[str, Any]:
    """`bench sweep --pareto`'s two arms of one multi-objective space: the full grid (every trial to max_t) and
    the multi-objective ASHA; neither repeats or adds a baseline (the bench compares search compute and fronts)."""
    from raydllm.sweep.search_space import RepeatSettings

    plain = {"repeat": RepeatSettings(top=0), "baseline": False}
    return {"grid": spec.model_copy(update={"scheduler": spec.scheduler.model_copy(update={"type": "fifo"}),
                                            **plain}),
            "pareto_asha": spec.model_copy(update=plain)}


# Scheduler settings the Pareto bench also replays on the grid's curves (grace period, reduction factor).
REPLAY_SETTINGS = [(10, 4), (10, 2), (20, 3), (20, 2), (40, 4), (40, 2)]


def bench_pareto(space_file: str | Path, *, tracking_uri: str, storage: str | None = None, shuffles: int = 200
                 ) -> dict[str, Any]:
    """A multi-objective space as a full grid and under the multi-objective ASHA: trial-steps of each, and the
    hypervolume of each arm's front (its completed trials' final objective vectors) against one reference point
    (the worst value of each objective over both arms, 10% of its range further out). Then the grid's recorded
    curves replayed under the same scheduler in `shuffles` random trial orders (the real run is one order)."""
    import random
    import statistics

    from raydllm.core.config import ConfigError
    from raydllm.sweep.pareto import hypervolume, pareto_front, reference_point
    from raydllm.sweep.pareto_asha import replay
    from raydllm.sweep.search_space import load_spec
    from raydllm.sweep.tune import run_spec, sweep_name

    space_file = Path(space_file)
    spec = load_spec(space_file)
    if not spec.objectives:
        raise ConfigError(f"{space_file}: bench sweep --pareto needs a space with objectives:")
    names, modes = list(spec.objectives), list(spec.objectives.values())
    base = sweep_name(spec, space_file)
    arms: dict[str, Any] = {}
    for arm, arm_spec in pareto_arms(spec).items():
        if not _sweep_finished(tracking_uri, spec.task, f"{base}-{arm}"):
            run_spec(arm_spec, space_text=space_file.read_text(), space_name=space_file.name, name=f"{base}-{arm}",
                     tracking_uri=tracking_uri, storage=storage)
        arms[arm] = _pareto_arm(spec, tracking_uri=tracking_uri, sweep=f"{base}-{arm}")
    reference = reference_point([arms["grid"]["points"], arms["pareto_asha"]["points"]], modes)
    for figures in arms.values():
        figures["hypervolume"] = hypervolume(figures["points"], modes, reference)
        figures["front"] = [figures["configs"][i] for i in pareto_front(figures["points"], modes)]
    grid, asha = arms["grid"], arms["pareto_asha"]
    out = {"objectives": spec.objectives, "reference_point": reference, "grid": grid, "pareto_asha": asha,
           "compute_ratio": asha["trial_steps"] / max(grid["trial_steps"], 1),
           "hypervolume_ratio": asha["hypervolume"] / grid["hypervolume"] if grid["hypervolume"] else None}
    # The replay: the grid's curves under ParetoASHA, trials starting in random orders, as many at once as the space
    # runs. A completed replayed trial's vector is its grid trial's final one, so fronts compare with the grid's.
    # The space's own scheduler settings first, then others, so the cost of a wider margin is visible.
    curves = grid.pop("curves")
    settings = [(spec.scheduler.grace_period, spec.scheduler.reduction_factor)]
    settings += [s for s in REPLAY_SETTINGS if s != settings[0] and s[0] < grid["max_t"]]
    out["replay"] = []
    for grace, factor in settings:
        rng = random.Random(0)
        ratios, hv_ratios = [], []
        for _ in range(shuffles):
            order = list(curves)
            rng.shuffle(order)
            result = replay(spec.objectives, curves, order, max_t=grid["max_t"], grace_period=grace,
                            reduction_factor=factor, concurrency=spec.max_concurrent_trials)
            done = [t for t, outcome in result.trials.items() if not outcome.stopped]
            points = [[curves[t][-1][1][n] for n in names] for t in done]
            ratios.append(result.trial_steps / max(grid["trial_steps"], 1))
            hv_ratios.append(hypervolume(points, modes, reference) / grid["hypervolume"] if grid["hypervolume"] else 0)
        out["replay"].append({"grace_period": grace, "reduction_factor": factor, "orders": shuffles,
                              "compute_ratio_mean": statistics.fmean(ratios),
                              "hypervolume_ratio_mean": statistics.fmean(hv_ratios),
                              "hypervolume_ratio_min": min(hv_ratios),
                              "share_meeting_target": sum(c <= 1 / 3 and h >= 0.95
                                                          for c, h in zip(ratios, hv_ratios)) / shuffles})
    for figures in arms.values():
        figures.pop("points")
        figures.pop("configs")
    return out


def _pareto_arm(spec, *, tracking_uri: str, sweep: str) -> dict[str, Any]:
    """One arm from MLflow: trial-steps of its search trials, and each completed trial's config and final vector;
    for the grid, every trial's curve (objective values at each report) for the replay."""
    from mlflow.tracking import MlflowClient

    from raydllm.sweep.results import find_sweep, trial_runs
    from raydllm.data.tasks import get_task

    client = MlflowClient(tracking_uri)
    parent = find_sweep(client, spec.task, sweep)
    runs = [r for r in trial_runs(client, parent) if r.data.tags.get("raydllm.phase") == "search"]
    names = list(spec.objectives)
    max_t = int(parent.data.tags.get("raydllm.max_steps", 0))
    completed = [r for r in runs if r.data.tags.get("raydllm.status") == "completed"]
    configs = [json.loads(r.data.tags.get("raydllm.searched", "{}")) for r in completed]
    for config in configs:
        config.pop("train.seed", None)
    points = [[float(r.data.metrics[n]) for n in names] for r in completed]
    wall = ((parent.info.end_time or parent.info.start_time) - parent.info.start_time) / 1000
    figures = {"trials": len(runs), "completed": len(completed), "max_t": max_t, "wall_s": round(wall, 1),
               "fast_vs_exact": fidelity_agreement(completed, get_task(spec.task).primary_metric),
               "trial_steps": sum(int(r.data.tags.get("raydllm.last_step", 0)) for r in runs),
               "stopped_at_rung": sorted(int(r.data.tags["raydllm.stopped_at_rung"]) for r in runs
                                         if "raydllm.stopped_at_rung" in r.data.tags),
               "points": points, "configs": [{"config": c, "values": dict(zip(names, p))}
                                             for c, p in zip(configs, points)]}
    if all(r.data.tags.get("raydllm.status") == "completed" for r in runs):  # a grid: curves for the replay
        histories = {n: {r.info.run_id: {m.step: m.value for m in client.get_metric_history(r.info.run_id, n)}
                         for r in runs} for n in names}
        figures["curves"] = {r.info.run_id: [(step, {n: histories[n][r.info.run_id][step] for n in names})
                                             for step in sorted(histories[names[0]][r.info.run_id])
                                             if all(step in histories[n][r.info.run_id] for n in names)]
                             for r in runs}
    return figures


def format_pareto_bench(r: dict[str, Any]) -> str:
    names = list(r["objectives"])
    lines = [f"objectives: " + ", ".join(f"{n} ({m})" for n, m in r["objectives"].items()),
             "reference point: " + ", ".join(f"{n}={v:.4g}" for n, v in zip(names, r["reference_point"]))]
    for arm in ("grid", "pareto_asha"):
        a = r[arm]
        lines.append(f"{arm:12s} trials {a['trials']:3d} (completed {a['completed']}), trial-steps {a['trial_steps']}, "
                     f"wall {a['wall_s'] / 60:.1f} min, hypervolume {a['hypervolume']:.5g}, front of {len(a['front'])}")
        for member in a["front"]:
            values = ", ".join(f"{n} {member['values'][n]:.4f}" for n in names)
            config = " ".join(f"{k.split('.')[-1]}={v}" for k, v in member["config"].items())
            lines.append(f"    {config}: {values}")
    fidelity = r["grid"].get("fast_vs_exact") or {}
    if fidelity.get("trials"):
        tau = fidelity["kendall_tau"]
        lines.append(f"fast vs exact sampler over the grid's {fidelity['trials']} trials: Kendall tau "
                     f"{'n/a' if tau is None else f'{tau:.2f}'}")
    ratio = r["hypervolume_ratio"]
    lines.append(f"pareto_asha / grid: compute {r['compute_ratio']:.2f}x, hypervolume "
                 f"{'n/a' if ratio is None else f'{ratio:.3f}'} (target: >= 0.95 at <= 0.33x)")
    lines.append(f"the grid's curves replayed under the multi-objective ASHA, {r['replay'][0]['orders']} random trial "
                 f"orders each (the first row: this space's settings):")
    lines.append("    grace  factor  compute (mean)  hypervolume (mean, min)  orders meeting the target")
    for rep in r["replay"]:
        lines.append(f"    {rep['grace_period']:5d}  {rep['reduction_factor']:6g}  {rep['compute_ratio_mean']:13.2f}x"
                     f"  {rep['hypervolume_ratio_mean']:11.3f}, {rep['hypervolume_ratio_min']:.3f}"
                     f"  {rep['share_meeting_target']:24.0%}")
    return "\n".join(lines)


def _sweep_finished(tracking_uri: str, task: str, sweep: str) -> bool:
    from mlflow.tracking import MlflowClient

    from raydllm.core.config import ConfigError
    from raydllm.sweep.results import find_sweep

    try:
        return find_sweep(MlflowClient(tracking_uri), task, sweep).info.status == "FINISHED"
    except ConfigError:  # no such sweep yet
        return False
