"""Sweep layer: reading a sweep back from MLflow: best configs with seeds aggregated, the baseline, a summary plot.

Everything here reads MLflow only (not Ray's files), so it works on a sweep that is still running and on
a machine that never saw the cluster.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from raydllm.sweep.compute_match import MATCH_KEY
from raydllm.sweep.verdict import arm_budgets
from raydllm.core.config import ConfigError
from raydllm.sweep.tracking import experiment_name
from raydllm.sweep.stats import student_t_sf


@dataclass
class ConfigResult:
    """One config (all searched values but the seed) of one arm: its trial on the selection seed, and its
    completed trials on the fresh seeds."""
    config_key: str
    arm: str  # "baseline" (lambda = 0) or "dllm-jepa"
    label: str  # the trial's MLflow run name without its seed
    params: dict[str, object]  # the searched values (the baseline's pinned JEPA-only keys included)
    metric: str
    status: str  # of the selection-seed trial: completed / stopped_early / running / failed / missing
    selection_seed: int
    selection_value: float | None  # at the end (completed), at the rung it was stopped at, or the latest
    selection_step: int | None
    stopped_at_rung: int | None
    run_id: str | None  # the selection-seed trial
    fresh_seeds: list[int] = field(default_factory=list)  # completed trials on seeds not used for selection
    fresh_values: list[float] = field(default_factory=list)
    fresh_run_ids: list[str] = field(default_factory=list)
    fresh_mean: float | None = None
    fresh_std: float | None = None  # None for fewer than two seeds: one value has no spread
    gain: dict | None = None  # paired over the fresh seeds both arms completed; None = not measured
    selection_se: float | None = None  # the standard error of selection_value (`<metric>_se`), None if not logged

    @property
    def baseline(self) -> bool:
        return self.arm == "baseline"


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


def run_arm(run) -> str:
    """A trial's arm: its `raydllm.arm` tag, or (older sweeps) lambda = 0 without the L2 anchor = baseline."""
    arm = run.data.tags.get("raydllm.arm")
    if arm:
        return arm
    lam = float(run.data.params.get("jepa.lambda", "nan"))
    return "baseline" if lam == 0 and run.data.params.get("loss.anchor", "none") == "none" else "dllm-jepa"


def selection_seed_of(parent, runs) -> int:
    """The seed the sweep selected on: the parent's tag, or (older sweeps) the seed of its non-repeat trials."""
    tag = parent.data.tags.get("raydllm.selection_seed") if parent is not None else None
    if tag is not None:
        return int(tag)
    seeds = [int(r.data.params.get("train.seed", -1)) for r in runs if r.data.tags.get("raydllm.phase") != "repeat"]
    return max(set(seeds), key=seeds.count) if seeds else -1


def _value_at(client: MlflowClient | None, run, metric: str, step: int | None) -> float:
    """The metric at `step` (a stopped trial's rung: its worker may have reported once more after ASHA's
    decision), else the latest value."""
    if client is not None and step is not None:
        at = [m.value for m in client.get_metric_history(run.info.run_id, metric) if m.step == step]
        if at:
            return float(at[-1])
    return float(run.data.metrics[metric])


def summarize(runs, metric: str, mode: str, *, selection_seed: int, client: MlflowClient | None = None
              ) -> list[ConfigResult]:
    """Group trials by config; each config's selection-seed trial and its completed fresh-seed trials.
    Order: completed configs by their selection value, best first; then stopped ones (latest rung first), then
    running ones. A stopped trial never ranks above a completed one, whatever its early value."""
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(run.data.tags.get("raydllm.config_key", run.info.run_id), []).append(run)
    results = []
    for key, members in groups.items():
        params = json.loads(members[0].data.tags.get("raydllm.searched", "{}"))
        params.pop("train.seed", None)
        seed_of = {r.info.run_id: int(r.data.params.get("train.seed", -1)) for r in members}
        # A searcher may propose a config again (NSGA-II's offspring can repeat a parent): the selection-seed trial
        # that went furthest stands for it (completed first, then the latest step).
        chosen = sorted((r for r in members if seed_of[r.info.run_id] == selection_seed),
                        key=lambda r: (r.data.tags.get("raydllm.status") != "completed",
                                       -int(r.data.tags.get("raydllm.last_step", 0))))
        fresh = sorted((r for r in members if seed_of[r.info.run_id] != selection_seed
                        and r.data.tags.get("raydllm.status") == "completed" and metric in r.data.metrics),
                       key=lambda r: seed_of[r.info.run_id])
        result = ConfigResult(config_key=key, arm=run_arm(members[0]), label=_label(members[0]), params=params,
                              metric=metric, status="missing", selection_seed=selection_seed, selection_value=None,
                              selection_step=None, stopped_at_rung=None, run_id=None,
                              fresh_seeds=[seed_of[r.info.run_id] for r in fresh],
                              fresh_values=[float(r.data.metrics[metric]) for r in fresh],
                              fresh_run_ids=[r.info.run_id for r in fresh])
        if result.fresh_values:
            result.fresh_mean = statistics.fmean(result.fresh_values)
            result.fresh_std = statistics.stdev(result.fresh_values) if len(result.fresh_values) > 1 else None
        if chosen:
            run = chosen[0]
            tags = run.data.tags
            result.run_id = run.info.run_id
            result.status = tags.get("raydllm.status", "running")
            if result.status == "stopped_early":
                result.stopped_at_rung = int(tags.get("raydllm.stopped_at_rung", 0))
                result.selection_step = int(tags.get("raydllm.stopped_at_step", tags.get("raydllm.last_step", 0)))
            elif "raydllm.last_step" in tags:
                result.selection_step = int(tags["raydllm.last_step"])
            if metric in run.data.metrics and result.status != "failed":
                step = result.selection_step if result.status == "stopped_early" else None
                result.selection_value = _value_at(client, run, metric, step)
                if f"{metric}_se" in run.data.metrics:
                    result.selection_se = _value_at(client, run, f"{metric}_se", step)
        results.append(result)
    sign = 1 if mode == "min" else -1
    order = {"completed": 0, "stopped_early": 1, "running": 2}
    results.sort(key=lambda r: (order.get(r.status, 3) if r.selection_value is not None else 4,
                                -(r.stopped_at_rung or 0), sign * (r.selection_value or 0.0)))
    return results


def _label(run) -> str:
    name = run.info.run_name or ""
    return " ".join(part for part in name.split() if not part.startswith("seed="))


def paired_gain(config: ConfigResult, baseline: ConfigResult, mode: str,
                item_scores: dict[str, dict[str, float]] | None = None) -> dict | None:
    """The config's gain over the baseline on the fresh seeds both completed (positive = better): per seed
    differences, their mean and standard deviation, and the headline: a paired two-level bootstrap over seeds
    and the items both arms scored (`item_scores[run_id]` = {item id: score}, from `load_item_scores`; with
    none, Student's t over seeds), its 95% interval, p where meaningful, and the minimum detectable effect. The old
    seed-level t-test stays as `seed_t_test`, never the headline. The selection seed never counts (it chose
    both winners). None when no fresh seed is shared."""
    sign = 1 if mode == "min" else -1
    theirs = dict(zip(baseline.fresh_seeds, baseline.fresh_values))
    seeds = [s for s in config.fresh_seeds if s in theirs and s != config.selection_seed]
    if not seeds:
        return None
    ours = dict(zip(config.fresh_seeds, config.fresh_values))
    diffs = [sign * (theirs[s] - ours[s]) for s in seeds]
    our_runs = dict(zip(config.fresh_seeds, config.fresh_run_ids))
    their_runs = dict(zip(baseline.fresh_seeds, baseline.fresh_run_ids))
    per_seed = {}
    for s, d in zip(seeds, diffs):
        a, b = (item_scores or {}).get(our_runs.get(s)), (item_scores or {}).get(their_runs.get(s))
        shared = sorted(set(a) & set(b)) if a and b else []
        per_seed[s] = [sign * (b[k] - a[k]) for k in shared] if len(shared) > 1 else [d]
    seed_test = paired_test(diffs)
    return {"seeds": seeds, "differences": diffs, "mean": seed_test["mean"], "std": seed_test["std"],
            "n": len(seeds), **effect_with_interval(per_seed), "seed_t_test": seed_test}


def effect_with_interval(per_seed: dict) -> dict:
    """The bootstrap effect (mean, ci_low, ci_high, p_value, method, n_seeds, n_items, note) and the
    detectability (mde, mde_plus_one_seed, mde_double_items, sigma2_seed, sigma2_item) of paired per-item
    differences by seed."""
    from raydllm.sweep import stats

    boot = stats.paired_bootstrap(per_seed)
    det = stats.detectability(per_seed)
    return {**{k: boot[k] for k in ("ci_low", "ci_high", "confidence", "p_value", "method", "n_seeds", "n_items",
                                    "note")},
            "effect": boot["mean"],
            **{k: det[k] for k in ("mde", "mde_plus_one_seed", "mde_double_items", "sigma2_seed", "sigma2_item")}}


def load_item_scores(client: MlflowClient, run_ids, metric: str) -> dict[str, dict[str, float]]:
    """{run id: {item id: score}} from each run's `items/<metric>.json` artifact (logged by the evaluation
    layer's `item_scores.log_item_scores`); runs without it are left out."""
    import tempfile

    out = {}
    for run_id in run_ids:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = client.download_artifacts(run_id, f"items/{metric}.json", tmp)
                out[run_id] = {str(k): float(v) for k, v in json.loads(Path(path).read_text())["scores"].items()}
        except (MlflowException, OSError, KeyError, ValueError):  # no artifact: the seed-level analysis
            continue
    return out


def paired_test(diffs: list[float]) -> dict:
    """mean, std (None for n < 2), n, t, df and the two-sided p-value of a paired t-test on `diffs`."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"mean": mean, "std": None, "n": n, "t": None, "df": None, "p_value": None,
                "test": "paired t-test (needs two or more seeds)"}
    std = statistics.stdev(diffs)
    if std == 0:
        t = math.inf if mean else 0.0
        p = 0.0 if mean else 1.0
    else:
        t = mean / (std / math.sqrt(n))
        p = 2 * student_t_sf(abs(t), n - 1)
    return {"mean": mean, "std": std, "n": n, "t": t, "df": n - 1, "p_value": min(1.0, p), "test": "paired t-test"}


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
    """Each arm's completed configs ranked on the selection seed, its stopped and running trials apart, each
    arm's winner, and the gains over the baseline arm's winner on the fresh seeds."""
    client = MlflowClient(tracking_uri)
    parent = find_sweep(client, task, sweep)
    metric = parent.data.tags["raydllm.metric"]
    mode = parent.data.tags["raydllm.mode"]
    runs = trial_runs(client, parent)
    selection = selection_seed_of(parent, runs)
    results = summarize(runs, metric, mode, selection_seed=selection, client=client)
    completed = [r for r in results if r.status == "completed" and r.selection_value is not None]
    baselines = [r for r in completed if r.baseline]
    baseline = baselines[0] if baselines else None
    ranked = [r for r in completed if not r.baseline]
    if baseline is not None:
        items = load_item_scores(client, {i for r in ranked[:top] + [baseline] for i in r.fresh_run_ids}, metric)
        for r in ranked:
            r.gain = paired_gain(r, baseline, mode, items if r in ranked[:top] else None)
        _holm_adjust([r.gain for r in ranked[:top]])
    tags = parent.data.tags
    fresh = json.loads(tags.get("raydllm.fresh_seeds", "null") or "null")
    if fresh is None:
        fresh = sorted({s for r in results for s in r.fresh_seeds})
    winner = ranked[0] if ranked else None
    # Under `baseline: {match: compute}` the baseline winner is compute-matched; its step-matched twin ran on the
    # fresh seeds only (compute_match.repeat_points): the second comparison a reviewer asks for.
    twin = step_matched_twin(baseline, results)
    gain_steps = None
    if twin is not None and winner is not None:
        twin_items = load_item_scores(client, set(winner.fresh_run_ids) | set(twin.fresh_run_ids), metric)
        gain_steps = paired_gain(winner, twin, mode, twin_items)
    return {"sweep": tags.get("raydllm.sweep"), "parent_run_id": parent.info.run_id,
            "status": parent.info.status, "metric": metric, "mode": mode,
            "selection_seed": selection, "fresh_seeds": fresh,
            "baseline_arm": {"mode": tags.get("raydllm.baseline_mode", "pinned" if baselines else "none"),
                             "searched_keys": json.loads(tags.get("raydllm.baseline_keys", "[]")),
                             "num_samples": int(tags.get("raydllm.baseline_num_samples", len(baselines)))},
            "searched_keys": json.loads(tags.get("raydllm.searched_keys", "[]")),
            "budgets": arm_budgets(tags, len({r.config_key for r in results if r.arm != "baseline"}),
                                   len({r.config_key for r in results if r.arm == "baseline"})),
            "best": [asdict(r) for r in ranked][:top],
            "baseline": asdict(baseline) if baseline else None,
            "baselines": [asdict(r) for r in baselines][:top],
            "gain": ({"config_key": winner.config_key, "label": winner.label, **winner.gain}
                     if winner is not None and winner.gain else None),
            "baseline_match": "compute" if twin is not None or _carries_steps(baseline) else "steps",
            "baseline_step_matched": asdict(twin) if twin else None,
            "gain_step_matched": ({"config_key": winner.config_key, "label": winner.label, **gain_steps}
                                  if gain_steps else None),
            "stopped": [asdict(r) for r in results if r.status == "stopped_early"],
            "running": [asdict(r) for r in results if r.status in ("running", "missing") and r is not twin],
            "failed": sum(r.data.tags.get("raydllm.status") == "failed" for r in runs),
            "trial_counts": trial_counts(runs),
            "within_noise": {"dllm-jepa": within_noise(ranked), "baseline": within_noise(baselines)},
            "pre_specified": "each arm's winner on the selection seed, gain on the fresh seeds",
            "time": time_accounting(runs)}


def _carries_steps(result: ConfigResult | None) -> bool:
    return result is not None and MATCH_KEY in result.params


def step_matched_twin(baseline: ConfigResult | None, results: list[ConfigResult]) -> ConfigResult | None:
    """The compute-matched baseline winner's step-matched twin: the baseline config with the same searched values
    but the sweep's own step count, run on the fresh seeds only (no selection-seed trial). None otherwise."""
    if not _carries_steps(baseline):
        return None
    want = {k: v for k, v in baseline.params.items() if k != MATCH_KEY}
    return next((r for r in results if r.baseline and r.run_id is None and r.fresh_values and r.params == want),
                None)


def _holm_adjust(gains: list[dict | None]) -> None:
    """Set `p_holm` on each gain: Holm over the gains printed together (the top-N)."""
    from raydllm.sweep.stats import holm

    present = [g for g in gains if g]
    for g, adjusted in zip(present, holm([g.get("p_value") for g in present])):
        g["p_holm"] = adjusted


def trial_counts(runs) -> dict[str, dict[str, int]]:
    """Per arm, the trials in MLflow: on the selection phase (searched) and on the fresh-seed repeats."""
    out: dict[str, dict[str, int]] = {}
    for run in runs:
        row = out.setdefault(run_arm(run), {"search": 0, "repeat": 0})
        row["repeat" if run.data.tags.get("raydllm.phase") == "repeat" else "search"] += 1
    return out


def within_noise(ranked: list[ConfigResult], z: float = 1.959963984540054) -> list[str] | None:
    """The labels of configs whose selection value is within the 95% interval of the difference from the
    arm's winner (|d| <= z * sqrt(se_w^2 + se_c^2), each trial's `<metric>_se`); None where the SEs were not
    logged."""
    if not ranked or ranked[0].selection_se is None:
        return None
    winner = ranked[0]
    out = []
    for r in ranked[1:]:
        if r.selection_se is None or r.selection_value is None:
            continue
        if abs(winner.selection_value - r.selection_value) <= z * math.hypot(winner.selection_se, r.selection_se):
            out.append(r.label or r.config_key)
    return out


def summary_metrics(report: dict) -> dict[str, float]:
    """The parent run's metrics: each arm's winner on the selection seed and on the fresh seeds, the gain."""
    metric = report["metric"]
    out: dict[str, float] = {}
    for arm, row in (("dllm-jepa", report["best"][0] if report["best"] else None), ("baseline", report["baseline"])):
        if row is None:
            continue
        out[f"best/{arm}/{metric}"] = row["selection_value"]
        if row["fresh_mean"] is not None:
            out[f"fresh/{arm}/{metric}_mean"] = row["fresh_mean"]
        if row["fresh_std"] is not None:
            out[f"fresh/{arm}/{metric}_std"] = row["fresh_std"]
    gain = report.get("gain")
    if gain:
        out |= {f"gain/{k}": gain[k] for k in ("mean", "ci_low", "ci_high", "p_value", "p_holm", "mde", "n")
                if gain.get(k) is not None}
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def format_gain(gain: dict | None) -> str:
    """'gain +0.0167 [95% CI -0.003, +0.036], p=0.21 (Holm 0.6) (method, seeds x items); MDE 0.04' """
    if not gain:
        return "gain not measured (no fresh seeds ran for it and the baseline)"
    from raydllm.sweep.stats import format_effect

    mde = f"; MDE {gain['mde']:.4f} (80% power, alpha 0.05)" if gain.get("mde") is not None else ""
    return f"gain {format_effect({**gain, 'mean': gain['effect']})}, seeds {gain['seeds']}{mde}"


def format_table(report: dict) -> str:
    metric = report["metric"]
    base_arm = report.get("baseline_arm") or {}
    fresh = report.get("fresh_seeds") or []
    lines = [f"sweep {report['sweep']} ({report['status'].lower()}), {metric} ({report['mode']}); selected on "
             f"seed {report.get('selection_seed')}, "
             + (f"gains on fresh seeds {fresh}" if fresh else "no fresh seeds: gains not measured")]
    if (report.get("budgets") or {}).get("line"):
        lines.append(report["budgets"]["line"])
    if base_arm.get("mode") == "searched":
        lines.append(f"baseline arm (λ = 0): searched over {', '.join(base_arm['searched_keys'])} "
                     f"({base_arm['num_samples']} trials), as the DLLM-JEPA arm searches them")
    elif base_arm.get("mode") == "pinned":
        lines.append("baseline arm (λ = 0): pinned at the space's fixed values (it searches no key that changes "
                     "the λ = 0 loss)")

    def row(label: str, r: dict) -> str:
        spread = ""
        if r["fresh_values"]:
            spread = (f" | fresh {r['fresh_mean']:.4f} ± {r['fresh_std']:.4f} (n={len(r['fresh_values'])})"
                      if r["fresh_std"] is not None else f" | fresh {r['fresh_mean']:.4f} (n=1, no spread)")
        run = f"  run {r['run_id'][:8]}" if r.get("run_id") else ""
        value = f"{r['selection_value']:.4f}" if r["selection_value"] is not None else "   -  "
        return f"  {label:>9}  {value}{spread}  {r['label'] or r['params']}{run}"

    lines.append(f"  DLLM-JEPA arm, completed trials ranked on seed {report.get('selection_seed')}:")
    for i, r in enumerate(report["best"], 1):
        lines.append(row(f"#{i}", r) + ("\n" + " " * 13 + format_gain(r.get("gain")) if fresh or r.get("gain")
                                         else ""))
    if not report["best"]:
        lines.append("         (none completed yet)")
    lines.append("  baseline arm:")
    for i, r in enumerate(report.get("baselines") or ([report["baseline"]] if report.get("baseline") else []), 1):
        lines.append(row("baseline" if i == 1 else f"#{i}", r))
    if not report.get("baseline"):
        lines.append("         (none completed yet)")
    gain = report.get("gain")
    matched = " against the compute-matched baseline" if report.get("baseline_match") == "compute" else ""
    lines.append(f"  pre-specified comparison (each arm's winner on seed {report.get('selection_seed')}{matched}): "
                 f"{format_gain(gain)}")
    twin = report.get("baseline_step_matched")
    if twin:
        lines.append(row("steps", twin) + "  (the baseline winner at the DLLM-JEPA arm's step count)")
        lines.append(f"  step-matched comparison (same winners, baseline at equal steps): "
                     f"{format_gain(report.get('gain_step_matched'))}")
    counts = report.get("trial_counts") or {}
    if counts:
        lines.append("  trials: " + ", ".join(f"{arm} {c['search']} searched + {c['repeat']} repeats"
                                              for arm, c in sorted(counts.items())))
    for arm, labels in (report.get("within_noise") or {}).items():
        if labels is not None:
            lines.append(f"  within noise of the {arm} winner on the selection seed: "
                         + (", ".join(labels) if labels else "none"))
    if report.get("stopped"):
        lines.append("  stopped early (not ranked, no gain):")
        for r in report["stopped"]:
            value = f"{r['selection_value']:.4f}" if r["selection_value"] is not None else "-"
            lines.append(f"      rung {r['stopped_at_rung']} (step {r['selection_step']}): {value}  "
                         f"[{r['arm']}] {r['label']}")
    if report.get("running"):
        lines.append(f"  running or not started: {len(report['running'])}")
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


def plot_sweep(report: dict, keys: list[str], path: Path) -> Path | None:
    """The selection metric against each searched parameter (one panel each), from a `best_configs` report
    (with every config: top large). Completed trials are filled; stopped ones are hollow, one colour per rung
    they stopped at (their value there); the baseline arm's trials are squares, shown on the panels of the keys
    it searches (and at λ = 0), with its winner as a dashed line on every panel; the DLLM-JEPA winner is a
    star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    metric = report["metric"]
    rows = [r for r in report["best"] + report.get("baselines", []) + report.get("stopped", [])
            if r["selection_value"] is not None]
    if not rows or not keys:
        return None
    base_keys = set((report.get("baseline_arm") or {}).get("searched_keys") or []) | {"jepa.lambda"}
    rungs = sorted({r["stopped_at_rung"] for r in rows if r["status"] == "stopped_early"})
    rung_colors = dict(zip(rungs, ["tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink"] * 4))
    winner = report["best"][0]["config_key"] if report["best"] else None
    baseline = report.get("baseline")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 4.2), sharey=True, squeeze=False)
    for ax, key in zip(axes[0], keys):
        for r in rows:
            x = r["params"].get(key)
            if x is None or (isinstance(x, float) and math.isnan(x)) or (r["arm"] == "baseline" and key not in base_keys):
                continue
            color = "tab:green" if r["status"] == "completed" else rung_colors[r["stopped_at_rung"]]
            marker = "s" if r["arm"] == "baseline" else "o"
            filled = r["status"] == "completed"
            ax.scatter(x, r["selection_value"], marker=marker, s=30, alpha=0.85, linewidths=1.2,
                       facecolors=color if filled else "none", edgecolors=color)
            if r["config_key"] == winner:
                ax.scatter(x, r["selection_value"], marker="*", s=220, facecolors="none", edgecolors="black",
                           linewidths=1.2)
        if baseline:
            ax.axhline(baseline["selection_value"], color="tab:blue", linestyle="--", linewidth=1)
        ax.set_xlabel(key)
        if key == "train.lr":
            # Decade ticks only, labels tilted: minor-tick labels of a log axis pile on top of each other.
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}".replace("e-0", "e-")))
            ax.xaxis.set_minor_formatter(NullFormatter())
        elif all(isinstance(r["params"].get(key), int) for r in rows if key in r["params"]):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # k = 1, 2, 3: no 2.2, 2.4 ticks
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (seed {report.get('selection_seed')})")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", color="tab:green", linestyle="", label="DLLM-JEPA, completed"),
               Line2D([], [], marker="s", color="tab:green", linestyle="", label="baseline (λ = 0), completed")]
    handles += [Line2D([], [], marker="o", markerfacecolor="none", markeredgecolor=color, linestyle="",
                       label=f"stopped at rung {rung} (value there)") for rung, color in rung_colors.items()]
    handles.append(Line2D([], [], marker="*", markersize=12, markerfacecolor="none", markeredgecolor="black",
                          linestyle="", label="DLLM-JEPA winner"))
    if baseline:
        handles.append(Line2D([], [], color="tab:blue", linestyle="--", label="baseline winner"))
    fig.suptitle(f"{metric} vs searched parameters ({len(rows)} configs, selection seed)")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=7, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
