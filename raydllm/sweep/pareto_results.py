"""Sweep layer: reading a multi-objective sweep back from MLflow: its Pareto front on fresh seeds, the gains
over the tuned baseline on every objective, the hypervolume reached at each rung, a table and a plot.

Like results.py it reads MLflow only. A sweep is multi-objective when its parent run carries `raydllm.objectives`
(a JSON object {name: "min" | "max"}, in the space file's order); the first objective is the plot's x axis and the
tie-breaker where one config must be chosen.

Within-noise rule (WITHIN_NOISE below): the same interval as the gains (results.paired_gain, stats.py's paired
bootstrap: seeds, then the items both scored where the runs logged per-item scores; else Student's t over
seeds). Two configs are within noise of each other on an objective when the 95% interval of their paired difference over the fresh
seeds contains 0, or when that analysis allows no test (stats.paired_bootstrap gives no p: seed-level values on
fewer than three seeds, or zero spread): the data do not show the difference. A pair is flagged
"indistinguishable" when that holds on every objective, and "a dominates within noise" when a is better beyond
noise on at least one objective and each of b's advantages is within noise (b's trade-off is not shown). A pair
with no interval (one fresh seed and no per-item scores) is not judged.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from raydllm.core.config import ConfigError
from raydllm.sweep.pareto import dominates, hypervolume, pareto_front, reference_point
from raydllm.sweep.stats import format_effect
from raydllm.sweep.results import (ConfigResult, find_sweep, load_item_scores, paired_gain, selection_seed_of,
                                   summarize, time_accounting, trial_runs)

WITHIN_NOISE = ("within noise on an objective: the 95% interval of the pair's paired difference over the fresh "
                "seeds (the gains' interval: a bootstrap over seeds, then items, where per-item scores exist; "
                "else Student's t over seeds) "
                "contains 0, or that analysis allows no test (seed-level values on fewer than three seeds); "
                "'indistinguishable': within noise on every objective; 'a dominates within noise': a better beyond "
                "noise on one objective, b's advantages all within noise; a pair with no interval is not judged")


@dataclass
class _Config:
    """One config's results on every objective (one results.ConfigResult per objective, same trials)."""
    per_objective: dict[str, ConfigResult]

    @property
    def first(self) -> ConfigResult:
        return next(iter(self.per_objective.values()))

    def selection_point(self) -> list[float] | None:
        return _point([r.selection_value for r in self.per_objective.values()])

    def fresh_point(self) -> list[float] | None:
        return _point([r.fresh_mean for r in self.per_objective.values()])


def _point(values: list) -> list[float] | None:
    """An objective vector, or None when a value is missing or not finite (a diverged trial's NaN loss is not
    a point on any front: it is listed, not ranked)."""
    if any(v is None or not math.isfinite(float(v)) for v in values):
        return None
    return [float(v) for v in values]


def pareto_report(task: str, *, tracking_uri: str, sweep: str | None = None) -> dict:
    """A multi-objective sweep read from MLflow, as one JSON-serialisable dict (see the module docstring for
    the within-noise rule):

    objectives, selection seed, fresh seeds; `configs` (every search-phase config: its selection-seed objective
    vector at the end, or at the step it was stopped, with status and rung) and `baseline_configs` likewise;
    `front` (on the fresh-seed means of the DLLM-JEPA configs the repeat phase completed, `front_basis`
    "fresh_seed_means"; else on the completed search configs' selection-seed values, basis "selection_seed"):
    each member's per-objective mean, std, n and gain over the tuned baseline (paired over the fresh seeds both
    ran, positive = better); `dominated` (repeated configs the front excludes, with what dominates them);
    `within_noise` (the pairs the rule flags); `baseline` (the baseline arm's best repeated config, chosen on the
    first objective's fresh mean); `base_model` (from the trials' base/<objective> metrics); `hypervolume_by_rung`
    (at each milestone of raydllm.rungs and at max_steps: the front of every search trial that reached the step,
    its values there, and its hypervolume against the one `reference_point`)."""
    client = MlflowClient(tracking_uri)
    parent = find_sweep(client, task, sweep)
    tags = parent.data.tags
    name = tags.get("raydllm.sweep", parent.info.run_id)
    if not tags.get("raydllm.objectives"):
        raise ConfigError(f"sweep {name} is single-objective: it optimised {tags.get('raydllm.metric', '?')} "
                          f"({tags.get('raydllm.mode', '?')}) and its parent run has no raydllm.objectives tag; "
                          f"run `raydllm best {task}` without --pareto")
    objectives: dict[str, str] = json.loads(tags["raydllm.objectives"])
    if not objectives or any(mode not in ("min", "max") for mode in objectives.values()):
        raise ConfigError(f"sweep {name}: tag raydllm.objectives = {tags['raydllm.objectives']!r}: expected a JSON "
                          f"object of objective names to \"min\" or \"max\"")
    modes = list(objectives.values())
    runs = trial_runs(client, parent)
    selection = selection_seed_of(parent, runs)
    configs = _configs(runs, objectives, selection, client)
    search = [c for c in configs if c.first.arm != "baseline"]
    baselines = [c for c in configs if c.first.arm == "baseline"]
    search_keys = {r.data.tags.get("raydllm.config_key") for r in runs if r.data.tags.get("raydllm.phase") == "search"}
    if any(key is not None for key in search_keys):  # the search phase only (older sweeps carry no phase tag)
        search = [c for c in search if c.first.config_key in search_keys]

    baseline = _tuned_baseline(baselines, objectives)
    fresh_candidates = [c for c in search if c.fresh_point() is not None]
    if fresh_candidates:
        basis, candidates, points = "fresh_seed_means", fresh_candidates, [c.fresh_point() for c in fresh_candidates]
    else:
        candidates = [c for c in search if c.first.status == "completed" and c.selection_point() is not None]
        basis, points = "selection_seed", [c.selection_point() for c in candidates]
    on_front = set(pareto_front(points, modes)) if points else set()
    members = sorted(on_front, key=lambda i: (_sign(modes[0]) * points[i][0], candidates[i].first.label))
    # per-item scores of the repeated configs (items/<objective>.json), for the gains and the within-noise rule
    items = _item_scores(client, candidates + [baseline], objectives) if basis == "fresh_seed_means" else {}
    front = []
    for number, i in enumerate(members, 1):
        row = _member_row(candidates[i], objectives, basis, baseline, items)
        row["id"] = f"F{number}"
        row["dominates_baseline"] = (baseline is not None and baseline.fresh_point() is not None and basis ==
                                     "fresh_seed_means" and dominates(points[i], baseline.fresh_point(), modes))
        front.append(row)
    dominated = []
    for i, config in enumerate(candidates):
        if i in on_front:
            continue
        by = [front[k]["id"] for k, j in enumerate(members) if dominates(points[j], points[i], modes)]
        dominated.append({**_member_row(config, objectives, basis, baseline, items), "dominated_by": by})

    base_model = _base_model(runs, objectives)
    rungs = _hypervolume_by_rung(client, runs, parent, objectives, selection)
    shown = list(points) + [p for c in configs for p in (c.selection_point(), c.fresh_point()) if p]
    shown += [list(point["values"].values()) for rung in rungs["rungs"] for point in rung["points"]]
    if base_model and _point(list(base_model["values"].values())):
        shown.append(_point(list(base_model["values"].values())))
    reference = reference_point([shown], modes) if shown else None
    for rung in rungs["rungs"]:
        front_points = [list(p["values"].values()) for p in rung["points"] if p["on_front"]]
        rung["hypervolume"] = hypervolume(front_points, modes, reference) if reference and front_points else 0.0
    front_hypervolume = (hypervolume([points[i] for i in members], modes, reference) if reference and members
                         else None)
    fresh = json.loads(tags.get("raydllm.fresh_seeds", "null") or "null")
    if fresh is None:
        fresh = sorted({s for c in configs for s in c.first.fresh_seeds})
    arms = (_front_against_front(front, [candidates[i] for i in members], baselines, objectives, items)
            if basis == "fresh_seed_means" else None)
    return {"sweep": name, "parent_run_id": parent.info.run_id, "status": parent.info.status,
            "objectives": objectives, "selection_seed": selection, "fresh_seeds": fresh,
            "max_steps": rungs["max_steps"], "rungs": rungs["milestones"],
            "configs": [_config_row(c, objectives) for c in search],
            "baseline_configs": [_config_row(c, objectives) for c in baselines],
            "front_basis": basis, "front": front, "dominated": dominated,
            "within_noise_rule": WITHIN_NOISE,
            "within_noise": _within_noise(front, [candidates[i] for i in members], objectives, items),
            "baseline": _member_row(baseline, objectives, "fresh_seed_means" if baseline.fresh_point() else
                                    "selection_seed", None) if baseline is not None else None,
            "baseline_front": arms["baseline_front"] if arms else [],
            "front_against_front": arms["comparison"] if arms else None,
            "base_model": base_model, "reference_point": reference, "front_hypervolume": front_hypervolume,
            "hypervolume_by_rung": rungs["rungs"],
            "failed": sum(r.data.tags.get("raydllm.status") == "failed" for r in runs),
            "time": time_accounting(runs)}


def _sign(mode: str) -> int:
    return 1 if mode == "min" else -1


def _front_against_front(front: list[dict], members: list[_Config], baselines: list[_Config],
                         objectives: dict[str, str], items: dict | None) -> dict | None:
    """The DLLM-JEPA front against the baseline arm's own front, both on the fresh seeds: the baseline front's
    rows (ids B1, B2, ...); both hypervolumes against one reference point (every repeated config's per-seed and
    mean points of both arms); their difference per fresh seed (each arm's front on that seed's values) with the
    interval over seeds (stats.paired_bootstrap: one value a seed, so Student's t); and, on each DLLM-JEPA row
    (`front[i]`, config `members[i]`), `dominates_beyond_noise`: the baseline members it dominates on the means
    while better beyond noise on one objective and worse beyond noise on none (the within-noise rule's
    intervals). None without repeated configs in both arms."""
    from raydllm.sweep import stats

    modes = list(objectives.values())
    repeated = [c for c in baselines if c.fresh_point() is not None]
    if not members or not repeated:
        return None
    on_front = pareto_front([c.fresh_point() for c in repeated], modes)
    base_members = sorted((repeated[i] for i in on_front),
                          key=lambda c: (_sign(modes[0]) * c.fresh_point()[0], c.first.label))
    base_rows = [{**_member_row(c, objectives, "fresh_seed_means", None), "id": f"B{k}"}
                 for k, c in enumerate(base_members, 1)]

    def per_seed(config: _Config) -> dict[int, list[float]]:
        by_seed = [dict(zip(r.fresh_seeds, r.fresh_values)) for r in config.per_objective.values()]
        return {s: [d[s] for d in by_seed] for s in by_seed[0] if all(s in d for d in by_seed)}

    seeds = sorted(set.intersection(*(set(per_seed(c)) for c in members + base_members)))
    points = [p for c in members + base_members for p in [c.fresh_point(), *per_seed(c).values()]]
    reference = reference_point([points], modes)
    volume = lambda pts: hypervolume(pts, modes, reference)
    hv_ours = volume([c.fresh_point() for c in members])
    hv_theirs = volume([c.fresh_point() for c in base_members])
    differences = {s: volume([per_seed(c)[s] for c in members]) - volume([per_seed(c)[s] for c in base_members])
                   for s in seeds}
    difference = (stats.paired_bootstrap({s: [d] for s, d in differences.items()}) if differences else None)
    for row, config in zip(front, members):
        beyond = []
        for base_row, other in zip(base_rows, base_members):
            per = _pair_noise(config, other, objectives, items)
            if per is None or not dominates(config.fresh_point(), other.fresh_point(), modes):
                continue
            ahead = any(not p["within"] and p["a_better"] for p in per.values())
            behind = any(not p["within"] and not p["a_better"] for p in per.values())
            if ahead and not behind:
                beyond.append(base_row["id"])
        row["dominates_beyond_noise"] = beyond
    return {"baseline_front": base_rows,
            "comparison": {"reference_point": reference, "hypervolume": hv_ours, "baseline_hypervolume": hv_theirs,
                           "seeds": seeds, "per_seed_difference": differences, "difference": difference}}


def _configs(runs, objectives: dict[str, str], selection: int, client: MlflowClient) -> list[_Config]:
    """results.summarize once per objective, joined on the config key (the first objective's order)."""
    by_key: dict[str, dict[str, ConfigResult]] = {}
    for objective, mode in objectives.items():
        for result in summarize(runs, objective, mode, selection_seed=selection, client=client):
            by_key.setdefault(result.config_key, {})[objective] = result
    return [_Config(per_objective) for per_objective in by_key.values()]


def _tuned_baseline(baselines: list[_Config], objectives: dict[str, str]) -> _Config | None:
    """The baseline arm's best repeated config on the first objective's fresh mean; without repeats, its best
    completed config on the first objective's selection-seed value (gains are then not measured)."""
    first, mode = next(iter(objectives.items()))
    repeated = [c for c in baselines if c.fresh_point() is not None]
    if repeated:
        return min(repeated, key=lambda c: _sign(mode) * c.per_objective[first].fresh_mean)
    completed = [c for c in baselines if c.first.status == "completed" and c.selection_point() is not None]
    return min(completed, key=lambda c: _sign(mode) * c.per_objective[first].selection_value) if completed else None


def _item_scores(client: MlflowClient, configs: list[_Config | None], objectives: dict[str, str]) -> dict:
    """{objective: {run id: {item id: score}}} for the fresh-seed runs of `configs`, from the runs'
    items/<objective>.json (results.load_item_scores; objectives without per-item logs get {})."""
    run_ids = sorted({i for c in configs if c is not None for r in c.per_objective.values() for i in r.fresh_run_ids})
    logged = {}  # one listing per run, then a download only where the file is (a failed download costs more)
    for run_id in run_ids:
        try:
            logged[run_id] = {a.path for a in client.list_artifacts(run_id, "items")}
        except (MlflowException, OSError):
            logged[run_id] = set()
    return {objective: load_item_scores(client, [r for r in run_ids if f"items/{objective}.json" in logged[r]],
                                        objective) for objective in objectives}


def _config_row(config: _Config, objectives: dict[str, str]) -> dict:
    first = config.first
    return {"config_key": first.config_key, "arm": first.arm, "label": first.label, "params": first.params,
            "status": first.status, "stopped_at_rung": first.stopped_at_rung, "step": first.selection_step,
            "run_id": first.run_id,
            "values": {o: config.per_objective[o].selection_value for o in objectives},
            "fresh_seeds": first.fresh_seeds}


def _member_row(config: _Config, objectives: dict[str, str], basis: str, baseline: _Config | None,
                items: dict | None = None) -> dict:
    """A front member (or a dominated or baseline config): per objective mean, std, n on the basis, and the
    gain over the baseline paired over the fresh seeds both ran (positive = better; over the items both scored
    where `items[objective]` has them)."""
    stats = {}
    gains = {}
    for objective, mode in objectives.items():
        r = config.per_objective[objective]
        if basis == "fresh_seed_means":
            stats[objective] = {"mean": r.fresh_mean, "std": r.fresh_std, "n": len(r.fresh_values),
                                "seeds": r.fresh_seeds, "values": r.fresh_values}
        else:
            stats[objective] = {"mean": r.selection_value, "std": None, "n": 1, "seeds": [r.selection_seed],
                                "values": [r.selection_value]}
        gains[objective] = (paired_gain(r, baseline.per_objective[objective], mode, (items or {}).get(objective))
                            if baseline is not None else None)
    first = config.first
    return {"config_key": first.config_key, "arm": first.arm, "label": first.label, "params": first.params,
            "selection_status": first.status, "selection_values":
                {o: config.per_objective[o].selection_value for o in objectives},
            "objectives": stats, "gain": gains, "run_ids": first.fresh_run_ids}


def _pair_noise(a: _Config, b: _Config, objectives: dict[str, str], items: dict | None) -> dict | None:
    """Per objective, a's paired difference from b over the fresh seeds both ran (results.paired_gain with b as
    the reference: `effect` positive = a better, its interval, method, note), whether the analysis has a test
    (a p-value), and whether the pair is within noise there (module docstring). None if an objective has no
    interval (no shared fresh seed, or one seed without per-item scores): the pair is not judged."""
    per = {}
    for objective, mode in objectives.items():
        ra, rb = a.per_objective[objective], b.per_objective[objective]
        gain = paired_gain(ra, rb, mode, (items or {}).get(objective))
        if gain is None or gain["ci_low"] is None:
            return None
        tested = gain["p_value"] is not None
        per[objective] = {"a_minus_b": ra.fresh_mean - rb.fresh_mean, "effect": gain["effect"],
                          "ci_low": gain["ci_low"], "ci_high": gain["ci_high"], "confidence": gain["confidence"],
                          "method": gain["method"], "n_seeds": gain["n_seeds"], "n_items": gain["n_items"],
                          "note": gain["note"], "tested": tested,
                          "within": not tested or gain["ci_low"] <= 0 <= gain["ci_high"],
                          "a_better": gain["effect"] > 0}
    return per


def _swapped(p: dict) -> dict:
    """One objective's entry of _pair_noise seen from the other member."""
    return {**p, "a_minus_b": -p["a_minus_b"], "effect": -p["effect"], "ci_low": -p["ci_high"],
            "ci_high": -p["ci_low"], "a_better": not p["a_better"]}


def _within_noise(front: list[dict], configs: list[_Config], objectives: dict[str, str],
                  items: dict | None = None) -> list[dict]:
    """The pairs of front members (`front[i]` is `configs[i]`) the rule flags (module docstring); pairs
    without an interval on some objective are not judged."""
    flagged = []
    for i, a in enumerate(front):
        for j in range(i + 1, len(front)):
            b = front[j]
            per = _pair_noise(configs[i], configs[j], objectives, items)
            if per is None:
                continue
            if all(p["within"] for p in per.values()):
                kind, winner, loser = "indistinguishable", a, b
            else:
                kind = None
                for x, y, x_is_a in ((a, b, True), (b, a, False)):
                    ahead = [p for p in per.values() if not p["within"] and p["a_better"] == x_is_a]
                    behind = [p for p in per.values() if not p["within"] and p["a_better"] != x_is_a]
                    if ahead and not behind:
                        kind, winner, loser = "dominates within noise", x, y
                if kind is None:
                    continue  # a real trade-off: each is better beyond noise somewhere
            flagged.append({"a": winner["id"], "b": loser["id"], "kind": kind,
                            "a_config_key": winner["config_key"], "b_config_key": loser["config_key"],
                            "per_objective": per if winner is a else {o: _swapped(p) for o, p in per.items()}})
    return flagged


def _base_model(runs, objectives: dict[str, str]) -> dict | None:
    """The base model's objective values: the mean of the trials' base/<objective> metrics (every trial logs
    them at step 0; they agree up to the evaluation's own seed)."""
    values, counts = {}, {}
    for objective in objectives:
        logged = [float(r.data.metrics[f"base/{objective}"]) for r in runs if f"base/{objective}" in r.data.metrics]
        values[objective] = statistics.fmean(logged) if logged else None
        counts[objective] = len(logged)
    if not any(counts.values()):
        return None
    return {"values": values, "trials": counts}


def _hypervolume_by_rung(client: MlflowClient, runs, parent, objectives: dict[str, str], selection: int) -> dict:
    """Per milestone (raydllm.rungs, then max_steps): every search-phase selection-seed trial that reached the
    step (reported at or after it on every objective), its values there (its latest report at or before the
    step) and whether it is on that step's front. Hypervolumes are filled in by the caller (one reference)."""
    tags = parent.data.tags
    milestones = [int(s) for s in json.loads(tags.get("raydllm.rungs", "[]") or "[]")]
    max_steps = int(tags["raydllm.max_steps"]) if tags.get("raydllm.max_steps") else None
    steps = sorted(set(milestones) | ({max_steps} if max_steps else set()))
    search = [r for r in runs if r.data.tags.get("raydllm.phase", "search") == "search"
              and int(r.data.params.get("train.seed", selection)) == selection
              and r.data.tags.get("raydllm.status") != "failed"]
    histories = {r.info.run_id: {o: sorted((m.step, m.timestamp, float(m.value))
                                           for m in client.get_metric_history(r.info.run_id, o))
                                 for o in objectives} for r in search}
    modes = list(objectives.values())
    rows = []
    for step in steps:
        points = []
        for run in search:
            history = histories[run.info.run_id]
            if not all(h and h[-1][0] >= step for h in history.values()):
                continue
            values = {o: [v for s, _, v in history[o] if s <= step] for o in objectives}
            if not all(values.values()) or _point([v[-1] for v in values.values()]) is None:
                continue
            points.append({"config_key": run.data.tags.get("raydllm.config_key", run.info.run_id),
                           "run_id": run.info.run_id, "values": {o: v[-1] for o, v in values.items()}})
        front = set(pareto_front([list(p["values"].values()) for p in points], modes)) if points else set()
        for i, p in enumerate(points):
            p["on_front"] = i in front
        rung = milestones.index(step) if step in milestones else None
        rows.append({"step": step, "rung": rung, "max_steps": step == max_steps, "trials": len(points),
                     "front_size": len(front), "points": points, "hypervolume": None})
    return {"milestones": milestones, "max_steps": max_steps, "rungs": rows}


def _pm(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    if stat["std"] is None:
        return f"{stat['mean']:.4f} (n={stat['n']})"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f} (n={stat['n']})"


def _gain_text(gain: dict | None) -> str:
    if not gain:
        return "not measured"
    return format_effect({**gain, "mean": gain["effect"]})


def format_pareto_table(report: dict) -> str:
    """The front as a terminal table: per member each objective's mean ± std (n), the gain over the tuned
    baseline per objective (positive = better), the within-noise flags, and the hypervolume by rung."""
    objectives = report["objectives"]
    names = ", ".join(f"{o} ({m})" for o, m in objectives.items())
    fresh = report.get("fresh_seeds") or []
    basis = ("on the means of fresh seeds " + str(fresh) if report["front_basis"] == "fresh_seed_means"
             else "on the selection seed only (no fresh-seed repeats yet: no spread, no gains)")
    lines = [f"sweep {report['sweep']} ({str(report['status']).lower()}): Pareto front of {names}; selected on seed "
             f"{report['selection_seed']}, front {basis}"]
    width = max([len(o) for o in objectives] + [26])
    header = "  " + " " * 10 + "".join(f"{o:<{width + 2}}" for o in objectives) + "config"
    lines.append(header)
    for member in report["front"]:
        cells = "".join(f"{_pm(member['objectives'][o]):<{width + 2}}" for o in objectives)
        lines.append(f"  {member['id']:<10}{cells}{member['label'] or member['params']}")
        gains = " | ".join(f"{o} {_gain_text(member['gain'][o])}" for o in objectives)
        beat = "; dominates the baseline" if member.get("dominates_baseline") else ""
        lines.append(f"  {'':<10}gain over the baseline (positive = better): {gains}{beat}")
    if not report["front"]:
        lines.append("      (no completed config yet)")
    baseline = report.get("baseline")
    if baseline:
        cells = "".join(f"{_pm(baseline['objectives'][o]):<{width + 2}}" for o in objectives)
        lines.append(f"  {'baseline':<10}{cells}tuned baseline (λ = 0): {baseline['label'] or baseline['params']}")
    for member in report.get("baseline_front") or []:
        cells = "".join(f"{_pm(member['objectives'][o]):<{width + 2}}" for o in objectives)
        lines.append(f"  {member['id']:<10}{cells}baseline front (λ = 0): {member['label'] or member['params']}")
    versus = report.get("front_against_front")
    if versus:
        diff = versus["difference"]
        diff_text = format_effect(diff) if diff else "not measured (no fresh seed both fronts ran)"
        lines.append(f"  front against front (one reference point): hypervolume DLLM-JEPA {versus['hypervolume']:.4g}, "
                     f"baseline {versus['baseline_hypervolume']:.4g}; difference per fresh seed {diff_text}")
        beats = [f"{m['id']} > {', '.join(m['dominates_beyond_noise'])}" for m in report["front"]
                 if m.get("dominates_beyond_noise")]
        lines.append("  DLLM-JEPA members dominating baseline-front members beyond noise: "
                     + ("; ".join(beats) if beats else "none"))
    base = report.get("base_model")
    if base:
        values = ", ".join(f"{o} {v:.4f}" if v is not None else f"{o} -" for o, v in base["values"].items())
        lines.append(f"  base model (before fine-tuning): {values}")
    lines.append("  within noise (on an objective: the 95% interval of the paired difference, the gains' bootstrap, "
                 "contains 0 or allows no test; ~ = on every objective; a's difference from b, positive = a better):")
    if report["within_noise"]:
        for flag in report["within_noise"]:
            detail = ", ".join(_noise_text(o, p) for o, p in flag["per_objective"].items())
            verb = "~" if flag["kind"] == "indistinguishable" else "dominates within noise"
            lines.append(f"    {flag['a']} {verb} {flag['b']} ({detail})")
    elif report["front_basis"] == "fresh_seed_means" and len(report["front"]) > 1:
        lines.append("    no pair flagged: every pair of members trades off beyond noise (or has no interval)")
    basis_name = "fresh-seed means" if report["front_basis"] == "fresh_seed_means" else "selection seed"
    for row in report.get("dominated") or []:
        lines.append(f"  dominated on the {basis_name} (not on the front): {row['label'] or row['params']}, "
                     f"by {', '.join(row['dominated_by'])}")
    lines.append("  " + format_hypervolume_line(report))
    return "\n".join(lines)


def _noise_text(objective: str, p: dict) -> str:
    """'val_loss_diff +0.0500 [95% CI +0.0200, +0.0800]', with 'no test' where the analysis has none."""
    interval = f"[{p['confidence']:.0%} CI {p['ci_low']:+.4f}, {p['ci_high']:+.4f}]"
    return f"{objective} {p['effect']:+.4f} {interval}" + ("" if p["tested"] else ", no test")


def format_hypervolume_line(report: dict) -> str:
    rows = report.get("hypervolume_by_rung") or []
    if not rows or report.get("reference_point") is None:
        return "hypervolume by rung: not measured (no raydllm.rungs / raydllm.max_steps tags or no reports)"
    reference = ", ".join(f"{v:.4g}" for v in report["reference_point"])
    parts = []
    for row in rows:
        where = f"rung {row['rung']} step {row['step']}" if row["rung"] is not None else f"step {row['step']}"
        where += " (max_steps)" if row["max_steps"] and row["rung"] is not None else (
            " = max_steps" if row["max_steps"] else "")
        parts.append(f"{where}: {row['hypervolume']:.4g} ({row['trials']} trials)")
    return f"hypervolume by rung (reference point [{reference}]): " + " | ".join(parts)


def plot_pareto(report: dict, path: Path) -> Path | None:
    """The first objective against the second: every search trial on the selection seed (completed filled,
    stopped hollow in one colour per rung they stopped at, their values there), the baseline arm's trials as
    squares with the tuned baseline's fresh mean ± std, the base model as a cross, and the front (fresh-seed
    means ± std) joined in the first objective's order. None with fewer than two objectives or no point."""
    objectives = list(report["objectives"].items())
    if len(objectives) < 2:
        return None
    (x_name, x_mode), (y_name, y_mode) = objectives[:2]
    rows = [r for r in report["configs"] + report.get("baseline_configs", [])
            if r["values"].get(x_name) is not None and r["values"].get(y_name) is not None]
    if not rows and not report["front"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rungs = sorted({r["stopped_at_rung"] for r in rows if r["status"] == "stopped_early"})
    rung_colors = dict(zip(rungs, ["tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink"] * 4))
    step_of = {row["rung"]: row["step"] for row in report.get("hypervolume_by_rung") or [] if row["rung"] is not None}
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    for r in rows:
        x, y = r["values"][x_name], r["values"][y_name]
        stopped = r["status"] == "stopped_early"
        color = rung_colors[r["stopped_at_rung"]] if stopped else (
            "tab:green" if r["status"] == "completed" else "tab:gray")
        marker = "s" if r["arm"] == "baseline" else "o"
        ax.scatter(x, y, marker=marker, s=30, alpha=0.85, linewidths=1.2,
                   facecolors="none" if stopped else color, edgecolors=color)

    def error_point(row: dict, **style):
        sx, sy = row["objectives"][x_name], row["objectives"][y_name]
        ax.errorbar(sx["mean"], sy["mean"], xerr=sx["std"] or 0, yerr=sy["std"] or 0, capsize=3, **style)

    front = [m for m in report["front"] if m["objectives"][x_name]["mean"] is not None
             and m["objectives"][y_name]["mean"] is not None]
    if front:
        ordered = sorted(front, key=lambda m: _sign(x_mode) * m["objectives"][x_name]["mean"])
        ax.plot([m["objectives"][x_name]["mean"] for m in ordered], [m["objectives"][y_name]["mean"] for m in ordered],
                color="black", linewidth=1.2, zorder=3)
        for m in ordered:
            error_point(m, fmt="D", color="black", markersize=6, zorder=4)
            ax.annotate(m["id"], (m["objectives"][x_name]["mean"], m["objectives"][y_name]["mean"]),
                        textcoords="offset points", xytext=(6, 4), fontsize=8)
    baseline = report.get("baseline")
    if baseline and baseline["objectives"][x_name]["mean"] is not None:
        error_point(baseline, fmt="s", color="tab:blue", markersize=9, zorder=4)
    base = report.get("base_model")
    if base and base["values"].get(x_name) is not None and base["values"].get(y_name) is not None:
        ax.scatter(base["values"][x_name], base["values"][y_name], marker="X", s=110, color="black", zorder=5)
    better = {"min": "lower", "max": "higher"}
    ax.set_xlabel(f"{x_name} (better: {better[x_mode]})")
    ax.set_ylabel(f"{y_name} (better: {better[y_mode]})")
    ax.grid(alpha=0.3)
    fresh = report["front_basis"] == "fresh_seed_means"
    handles = [Line2D([], [], marker="o", color="tab:green", linestyle="", label="DLLM-JEPA trial, completed"),
               Line2D([], [], marker="s", color="tab:green", linestyle="", label="baseline-arm trial (λ = 0)")]
    handles += [Line2D([], [], marker="o", markerfacecolor="none", markeredgecolor=color, linestyle="",
                       label=f"stopped at rung {rung}" + (f" (step {step_of[rung]})" if rung in step_of else ""))
                for rung, color in rung_colors.items()]
    handles.append(Line2D([], [], marker="D", color="black",
                          label="front, fresh-seed mean ± std" if fresh else "front (selection seed)"))
    if baseline:
        handles.append(Line2D([], [], marker="s", color="tab:blue", linestyle="", markersize=9,
                              label="tuned baseline" + (", fresh-seed mean ± std" if fresh else "")))
    if base:
        handles.append(Line2D([], [], marker="X", color="black", linestyle="", markersize=9, label="base model"))
    ax.set_title(f"{report['sweep']}: {x_name} vs {y_name} (trials on seed {report['selection_seed']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def log_pareto_summary(tracking_uri: str, parent_run_id: str, report: dict) -> str:
    """On the parent run: the table (summary/pareto.txt), the report (summary/pareto.json), the plot
    (summary/pareto.png) and metric pareto/hypervolume at each rung's step. Returns the table."""
    import tempfile

    client = MlflowClient(tracking_uri)
    table = format_pareto_table(report)
    client.log_text(parent_run_id, table, "summary/pareto.txt")
    client.log_text(parent_run_id, json.dumps(report, indent=1, default=str), "summary/pareto.json")
    with tempfile.TemporaryDirectory() as tmp:
        plot = plot_pareto(report, Path(tmp) / "pareto.png")
        if plot:
            client.log_artifact(parent_run_id, str(plot), "summary")
    for row in report.get("hypervolume_by_rung") or []:
        if row["hypervolume"] is not None and math.isfinite(row["hypervolume"]):
            client.log_metric(parent_run_id, "pareto/hypervolume", float(row["hypervolume"]), step=row["step"])
    return table
