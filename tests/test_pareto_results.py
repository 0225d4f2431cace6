"""`raydllm best --pareto` on a hand-built multi-objective sweep in a real (SQLite) MLflow store: the front on
fresh-seed means, a dominated config left out, the within-noise flags, gains per objective, hypervolume by rung."""
import json
import math
import statistics

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from raydllm.cli.app import main
from raydllm.sweep.pareto import hypervolume
from raydllm.sweep.pareto_results import (_Config, _pair_noise, _within_noise, format_pareto_table, log_pareto_summary,
                                          pareto_report, plot_pareto)
from raydllm.sweep.results import ConfigResult
from raydllm.sweep.stats import METHOD, METHOD_SEEDS_ONLY

OBJECTIVES = {"val_loss_diff": "min", "wikitext_delta": "min"}
SELECTION, FRESH = 42, [123, 777]
BASE_MODEL = {"val_loss_diff": 2.8, "wikitext_delta": 0.0}

# config -> (arm, status, stopped rung, {step: (val_loss_diff, wikitext_delta)} on the selection seed)
SEARCH = {
    "A": ("dllm-jepa", "completed", None, {10: (2.0, 0.30), 40: (1.5, 0.25), 135: (1.00, 0.20)}),
    "B": ("dllm-jepa", "completed", None, {10: (2.2, 0.10), 40: (1.7, 0.08), 135: (1.30, 0.05)}),
    "C": ("dllm-jepa", "completed", None, {10: (2.1, 0.20), 40: (1.6, 0.15), 135: (1.05, 0.19)}),
    "D": ("dllm-jepa", "completed", None, {10: (2.3, 0.35), 40: (1.9, 0.30), 135: (1.50, 0.30)}),
    # stopped at rung 1 (step 40); its worker reported once more, at step 45, after ASHA's decision
    "E": ("dllm-jepa", "stopped_early", 1, {10: (1.9, 0.40), 40: (1.8, 0.35), 45: (1.7, 0.30)}),
    "F": ("dllm-jepa", "stopped_early", 0, {10: (2.5, 0.50), 15: (2.4, 0.45)}),
    "BASE": ("baseline", "completed", None, {10: (2.4, 0.05), 40: (2.0, 0.04), 135: (1.6, 0.03)}),
    "BASE2": ("baseline", "completed", None, {10: (2.6, 0.07), 40: (2.2, 0.06), 135: (1.8, 0.06)}),
}
# the repeat phase: config -> seed -> final (val_loss_diff, wikitext_delta)
REPEAT = {
    "A": {123: (1.00, 0.20), 777: (1.10, 0.22)},
    "C": {123: (1.08, 0.19), 777: (1.12, 0.21)},  # mean ± std overlapping A's on both objectives
    "B": {123: (1.30, 0.05), 777: (1.34, 0.07)},  # trades off against A and C (two seeds: no test)
    "D": {123: (1.50, 0.30), 777: (1.60, 0.30)},  # dominated
    "BASE": {123: (1.60, 0.03), 777: (1.70, 0.04)},
}


def _params(config: str) -> dict:
    lam = 0.0 if SEARCH[config][0] == "baseline" else 1.0 + "ABCDEF".find(config) / 10
    return {"jepa.lambda": lam, "train.lr": 1e-3 if config != "BASE2" else 3e-4}


def _sweep(tmp_path, *, objectives: dict | None = OBJECTIVES, name: str = "s1", accuracy: bool = False,
           items: dict | None = None) -> str:
    """The sweep above in a fresh SQLite store; with `accuracy`, the first objective is val_accuracy (max),
    1 - val_loss_diff / 3, so the same configs win. `items`: {(config, seed): {item id: score}} logged on those
    repeat runs as items/val_accuracy.json (as the evaluation layer logs them)."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("raydllm-gsm8k")
    experiment_id = (experiment.experiment_id if experiment else
                     client.create_experiment("raydllm-gsm8k", artifact_location=(tmp_path / "art").as_uri()))
    tags = {"raydllm.kind": "sweep", "raydllm.sweep": name, "raydllm.selection_seed": str(SELECTION),
            "raydllm.fresh_seeds": json.dumps(FRESH), "raydllm.max_steps": "135",
            "raydllm.metric": "val_loss_diff", "raydllm.mode": "min"}
    if objectives:
        tags |= {"raydllm.objectives": json.dumps(objectives), "raydllm.rungs": json.dumps([10, 40])}
    names = ["val_accuracy", "wikitext_delta"] if accuracy else list(OBJECTIVES)

    def measured(values):
        return [1 - values[0] / 3, values[1]] if accuracy else list(values)

    parent = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def trial(config: str, seed: int, status: str, curve: dict, phase: str, rung: int | None) -> None:
        arm = SEARCH[config][0]
        params = _params(config)
        last = max(curve)
        trial_tags = {"mlflow.parentRunId": parent, "raydllm.kind": "trial", "raydllm.phase": phase,
                      "raydllm.arm": arm, "raydllm.config_key": json.dumps(params, sort_keys=True),
                      "raydllm.status": status, "raydllm.last_step": str(last),
                      "raydllm.searched": json.dumps({**params, "train.seed": seed})}
        if rung is not None:
            trial_tags |= {"raydllm.stopped_at_rung": str(rung), "raydllm.stopped_at_step": str([10, 40][rung])}
        run = client.create_run(experiment_id, run_name=f"{arm} {config} seed={seed}", tags=trial_tags).info.run_id
        client.log_param(run, "train.seed", seed)
        metrics = [Metric(f"base/{o}", v, 0, 0) for o, v in zip(names, measured(list(BASE_MODEL.values())))]
        for step, values in curve.items():
            metrics += [Metric(o, v, 0, step) for o, v in zip(names, measured(values))]
        client.log_batch(run, metrics=metrics)
        if phase == "repeat" and (config, seed) in (items or {}):
            client.log_dict(run, {"metric": "val_accuracy", "scores": items[(config, seed)]}, "items/val_accuracy.json")

    for config, (arm, status, rung, curve) in SEARCH.items():
        trial(config, SELECTION, status, curve, "baseline" if arm == "baseline" else "search", rung)
    for config, seeds in REPEAT.items():
        for seed, values in seeds.items():
            trial(config, seed, "completed", {10: (3.0, 0.9), 135: values}, "repeat", None)
    return uri


def _key(config: str) -> str:
    return json.dumps(_params(config), sort_keys=True)


@pytest.fixture(scope="module")
def sweep_uri(tmp_path_factory):
    """One store for the tests that only read it (building one takes seconds)."""
    return _sweep(tmp_path_factory.mktemp("pareto"))


def test_front_on_fresh_seed_means_gains_noise_and_hypervolume(sweep_uri, tmp_path):
    uri = sweep_uri
    report = pareto_report("gsm8k", tracking_uri=uri)
    assert report["objectives"] == OBJECTIVES and report["front_basis"] == "fresh_seed_means"
    # the front: A, C, B in the first objective's order; D (repeated, dominated) left out
    assert [m["config_key"] for m in report["front"]] == [_key("A"), _key("C"), _key("B")]
    assert [m["id"] for m in report["front"]] == ["F1", "F2", "F3"]
    (dominated,) = report["dominated"]
    assert dominated["config_key"] == _key("D") and dominated["dominated_by"] == ["F1", "F2", "F3"]
    a = report["front"][0]["objectives"]
    assert a["val_loss_diff"]["mean"] == pytest.approx(1.05) and a["wikitext_delta"]["mean"] == pytest.approx(0.21)
    assert a["val_loss_diff"]["std"] == pytest.approx(statistics.stdev([1.0, 1.1]))
    assert a["val_loss_diff"]["n"] == 2 and a["val_loss_diff"]["seeds"] == FRESH
    # within noise, from the gains' interval: two fresh seeds and no per-item scores allow no test, so no pair
    # is shown apart. F1's lead over F2 in val_loss_diff is +0.02 and +0.08 on the two seeds: Student's t over
    # them, 0.05 +- 12.71 x 0.0424 / sqrt(2), not their range (a 2-point bootstrap's "interval")
    flags = {(f["a"], f["b"]): f for f in report["within_noise"]}
    assert {k: f["kind"] for k, f in flags.items()} == {
        ("F1", "F2"): "indistinguishable", ("F1", "F3"): "indistinguishable", ("F2", "F3"): "indistinguishable"}
    loss = flags[("F1", "F2")]["per_objective"]["val_loss_diff"]
    assert loss["a_minus_b"] == pytest.approx(-0.05) and loss["effect"] == pytest.approx(0.05)  # + = F1 better
    assert (loss["ci_low"], loss["ci_high"]) == pytest.approx((-0.3312, 0.4312), abs=1e-3)
    assert not loss["tested"] and loss["within"] and loss["method"] == METHOD_SEEDS_ONLY
    # gains over the tuned baseline (BASE, not BASE2), paired over 123 and 777, positive = better
    assert report["baseline"]["config_key"] == _key("BASE")
    # front against front: the baseline arm's own front (BASE, the only baseline repeated) and both hypervolumes
    assert [m["config_key"] for m in report["baseline_front"]] == [_key("BASE")]
    versus = report["front_against_front"]
    assert versus["hypervolume"] > versus["baseline_hypervolume"] > 0 and versus["seeds"] == FRESH
    assert "front against front (one reference point)" in format_pareto_table(report)
    gain_a = report["front"][0]["gain"]
    assert gain_a["val_loss_diff"]["differences"] == pytest.approx([0.6, 0.6]) and gain_a["val_loss_diff"]["mean"] > 0
    assert gain_a["wikitext_delta"]["mean"] == pytest.approx(-0.175) and gain_a["wikitext_delta"]["seeds"] == FRESH
    assert report["front"][2]["gain"]["wikitext_delta"]["mean"] == pytest.approx(-0.025)
    assert not any(m["dominates_baseline"] for m in report["front"])  # the baseline forgets least
    assert report["base_model"]["values"] == pytest.approx(BASE_MODEL)
    # every search config on the selection seed, a stopped one at the step it was stopped (not its late report)
    rows = {r["config_key"]: r for r in report["configs"]}
    assert len(rows) == 6 and {r["config_key"] for r in report["baseline_configs"]} == {_key("BASE"), _key("BASE2")}
    e = rows[_key("E")]
    assert e["status"] == "stopped_early" and e["stopped_at_rung"] == 1 and e["step"] == 40
    assert e["values"] == pytest.approx({"val_loss_diff": 1.8, "wikitext_delta": 0.35})
    assert rows[_key("A")]["values"] == pytest.approx({"val_loss_diff": 1.0, "wikitext_delta": 0.2})
    # hypervolume by rung: one reference point over everything shown (the base model sets the worst loss,
    # F at step 10 the worst forgetting), trials that reached each step, rising as the curves improve
    assert report["reference_point"] == pytest.approx([2.8 + 0.1 * 1.8, 0.5 + 0.1 * 0.5])
    by_step = {row["step"]: row for row in report["hypervolume_by_rung"]}
    assert sorted(by_step) == [10, 40, 135] and [by_step[s]["trials"] for s in (10, 40, 135)] == [6, 5, 4]
    assert by_step[10]["rung"] == 0 and by_step[135]["max_steps"] and by_step[135]["rung"] is None
    assert by_step[10]["hypervolume"] < by_step[40]["hypervolume"] < by_step[135]["hypervolume"]
    at_40 = {p["config_key"]: p for p in by_step[40]["points"]}
    assert at_40[_key("E")]["values"] == pytest.approx({"val_loss_diff": 1.8, "wikitext_delta": 0.35})
    front_135 = [list(SEARCH[c][3][135]) for c in "ABC"]
    assert {p["config_key"] for p in by_step[135]["points"] if p["on_front"]} == {_key(c) for c in "ABC"}
    assert by_step[135]["hypervolume"] == pytest.approx(
        hypervolume(front_135, list(OBJECTIVES.values()), report["reference_point"]))
    json.dumps(report)  # serialisable as is

    table = format_pareto_table(report)
    assert "val_loss_diff (min)" in table and "wikitext_delta (min)" in table
    assert "F1 ~ F2 (val_loss_diff +0.0500 [95% CI -0.3312, +0.4312], no test" in table
    assert "1.0500 ± 0.0707 (n=2)" in table
    assert "hypervolume by rung" in table and "rung 1 step 40" in table
    plot = plot_pareto(report, tmp_path / "pareto.png")
    assert plot.stat().st_size > 10_000


def test_a_max_objective_counts_higher_as_better(tmp_path):
    objectives = {"val_accuracy": "max", "wikitext_delta": "min"}
    report = pareto_report("gsm8k", tracking_uri=_sweep(tmp_path, objectives=objectives, accuracy=True))
    assert [m["config_key"] for m in report["front"]] == [_key("A"), _key("C"), _key("B")]  # best accuracy first
    gain = report["front"][0]["gain"]["val_accuracy"]  # A's accuracy over the baseline's: 0.6 / 3 on each seed
    assert gain["differences"] == pytest.approx([0.2, 0.2]) and gain["mean"] > 0
    assert report["front"][0]["gain"]["wikitext_delta"]["mean"] == pytest.approx(-0.175)
    assert [d["config_key"] for d in report["dominated"]] == [_key("D")]
    hv = [row["hypervolume"] for row in report["hypervolume_by_rung"]]
    assert hv == sorted(hv) and hv[0] > 0
    assert plot_pareto(report, tmp_path / "acc.png").stat().st_size > 10_000


def test_logged_on_the_parent_run(sweep_uri):
    uri = sweep_uri
    report = pareto_report("gsm8k", tracking_uri=uri)
    log_pareto_summary(uri, report["parent_run_id"], report)
    client = MlflowClient(uri)
    assert {a.path for a in client.list_artifacts(report["parent_run_id"], "summary")} == {
        "summary/pareto.txt", "summary/pareto.json", "summary/pareto.png"}
    history = client.get_metric_history(report["parent_run_id"], "pareto/hypervolume")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [10, 40, 135]


def test_front_on_the_selection_seed_without_repeats(tmp_path):
    global REPEAT
    saved, REPEAT = REPEAT, {}
    try:
        uri = _sweep(tmp_path)
    finally:
        REPEAT = saved
    # a diverged search trial: NaN loss from step 40 on; listed, never on a front nor in a hypervolume
    client = MlflowClient(uri)
    (parent,) = client.search_runs(["1"], "tags.`raydllm.kind` = 'sweep'")
    nan_key = json.dumps({"jepa.lambda": 9.0, "train.lr": 1e-2}, sort_keys=True)
    run = client.create_run("1", tags={"mlflow.parentRunId": parent.info.run_id, "raydllm.phase": "search",
                                       "raydllm.arm": "dllm-jepa", "raydllm.config_key": nan_key,
                                       "raydllm.status": "completed", "raydllm.last_step": "135"}).info.run_id
    client.log_param(run, "train.seed", SELECTION)
    client.log_batch(run, metrics=[Metric(o, v, 0, step) for step, values in
                                   {10: (0.5, 0.01), 40: (float("nan"), 0.0), 135: (float("nan"), 0.0)}.items()
                                   for o, v in zip(OBJECTIVES, values)])
    report = pareto_report("gsm8k", tracking_uri=uri)
    diverged = next(r for r in report["configs"] if r["config_key"] == nan_key)
    assert diverged["values"]["wikitext_delta"] == 0.0 and math.isnan(diverged["values"]["val_loss_diff"])
    assert [row["trials"] for row in report["hypervolume_by_rung"]] == [7, 5, 4]  # counted at step 10 only
    assert report["front_basis"] == "selection_seed"
    # completed configs only (the stopped E and F were measured earlier): A, C, B; D dominated
    assert [m["config_key"] for m in report["front"]] == [_key("A"), _key("C"), _key("B")]
    assert report["within_noise"] == [] and report["front"][0]["gain"]["val_loss_diff"] is None
    assert "selection seed only" in format_pareto_table(report)


def test_cli_pareto_json_and_single_objective_error(sweep_uri, tmp_path, capsys):
    uri = sweep_uri
    assert main(["best", "gsm8k", "--pareto", "--json", "--tracking-uri", uri]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [m["id"] for m in printed["front"]] == ["F1", "F2", "F3"]
    assert printed["front"][1]["config_key"] == _key("C")
    assert main(["best", "gsm8k", "--pareto", "--tracking-uri", uri]) == 0
    assert "Pareto front of val_loss_diff (min), wikitext_delta (min)" in capsys.readouterr().out
    single = _sweep(tmp_path, objectives=None, name="single")
    assert main(["best", "gsm8k", "--pareto", "--tracking-uri", single]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raydllm")]
    assert line.startswith("raydllm: error: sweep single is single-objective: it optimised val_loss_diff (min)")


def _config(name: str, values: dict[str, list[float]], seeds=(123, 456, 777)) -> _Config:
    """A repeated config: per objective its value on each fresh seed (run ids name-seed, for item scores)."""
    return _Config({o: ConfigResult(config_key=name, arm="dllm-jepa", label=name, params={}, metric=o, status="completed",
                                    selection_seed=SELECTION, selection_value=None, selection_step=None,
                                    stopped_at_rung=None, run_id=None, fresh_seeds=list(seeds)[:len(v)],
                                    fresh_values=list(v), fresh_run_ids=[f"{name}-{s}" for s in list(seeds)[:len(v)]],
                                    fresh_mean=statistics.fmean(v), fresh_std=statistics.stdev(v) if len(v) > 1 else None)
                    for o, v in values.items()})


def _correct(n: int, right: set[int]) -> dict[str, float]:
    return {f"q{i}": float(i in right) for i in range(n)}


def _old_rule_within(a: _Config, b: _Config, objective: str) -> bool:
    """The rule this replaced: the mean ± std intervals over the fresh seeds overlap."""
    ra, rb = a.per_objective[objective], b.per_objective[objective]
    return abs(ra.fresh_mean - rb.fresh_mean) <= ra.fresh_std + rb.fresh_std


def test_within_noise_known_answers_from_the_paired_interval():
    """Known answers where the paired interval and the old overlap of mean ± std disagree."""
    seeds = (123, 777)
    # 1. Std intervals overlap (the seeds move both configs together), but on every seed a solves the same 4 of 20
    #    problems more than b and nothing less: the paired interval over seeds and items excludes 0.
    a = _config("a", {"val_accuracy": [0.8, 0.4]}, seeds)
    b = _config("b", {"val_accuracy": [0.6, 0.2]}, seeds)
    items = {"val_accuracy": {"a-123": _correct(20, set(range(16))), "b-123": _correct(20, set(range(12))),
                              "a-777": _correct(20, set(range(8))), "b-777": _correct(20, set(range(4)))}}
    (p,) = _pair_noise(a, b, {"val_accuracy": "max"}, items).values()
    assert _old_rule_within(a, b, "val_accuracy")  # |0.2| <= 0.283 + 0.283
    assert p["method"] == METHOD and (p["n_seeds"], p["n_items"]) == (2, 20) and p["tested"]
    assert p["effect"] == pytest.approx(0.2) and 0 < p["ci_low"] < 0.2 < p["ci_high"]
    assert not p["within"] and p["a_better"]
    # 2. Std intervals apart (0.1 > 0.014 + 0.014), but per seed a and b disagree on 25 of 50 problems (a right on
    #    15, b on 10): the item noise puts 0 inside the interval.
    a = _config("a", {"val_accuracy": [0.62, 0.60]}, seeds)
    b = _config("b", {"val_accuracy": [0.52, 0.50]}, seeds)
    items = {"val_accuracy": {"a-123": _correct(50, set(range(31))), "b-123": _correct(50, set(range(16)) | set(range(31, 41))),
                              "a-777": _correct(50, set(range(30))), "b-777": _correct(50, set(range(15)) | set(range(30, 40)))}}
    (p,) = _pair_noise(a, b, {"val_accuracy": "max"}, items).values()
    assert not _old_rule_within(a, b, "val_accuracy")
    assert p["method"] == METHOD and p["tested"] and p["effect"] == pytest.approx(0.1)
    assert p["ci_low"] < 0 < p["ci_high"] and p["within"]
    # 3. No per-item scores, three seeds: Student's t over seeds. a forgets less on every seed (by 0.019 to
    #    0.021) while the seeds spread both by 0.05: beyond noise, though the std intervals overlap.
    a = _config("a", {"wikitext_delta": [0.20, 0.30, 0.25]})
    b = _config("b", {"wikitext_delta": [0.22, 0.321, 0.269]})
    (p,) = _pair_noise(a, b, {"wikitext_delta": "min"}, None).values()
    assert _old_rule_within(a, b, "wikitext_delta")
    assert p["method"] == METHOD_SEEDS_ONLY and p["tested"] and p["effect"] == pytest.approx(0.02)
    assert 0 < p["ci_low"] and not p["within"] and p["a_better"]
    # 4. The same on two seeds: no test (one degree of freedom), so within noise; one seed: not judged.
    #    Three seeds with the old spread (0.01 to 0.03) are within noise too: t p = 0.07.
    a2, b2 = (_config(c.first.config_key, {"wikitext_delta": c.first.fresh_values[:2]}) for c in (a, b))
    (p,) = _pair_noise(a2, b2, {"wikitext_delta": "min"}, None).values()
    assert not p["tested"] and p["within"]
    (p,) = _pair_noise(a, _config("b", {"wikitext_delta": [0.22, 0.33, 0.26]}), {"wikitext_delta": "min"},
                       None).values()
    assert p["tested"] and p["ci_low"] < 0 < p["ci_high"] and p["within"]
    a1, b1 = (_config(c.first.config_key, {"wikitext_delta": c.first.fresh_values[:1]}) for c in (a, b))
    assert _pair_noise(a1, b1, {"wikitext_delta": "min"}, None) is None


def test_within_noise_rule_flags_indistinguishable_and_noise_dominated_pairs():
    objectives = {"val_accuracy": "max", "wikitext_delta": "min"}  # three fresh seeds, seed-level
    configs = [_config("F1", {"val_accuracy": [0.60, 0.70, 0.65], "wikitext_delta": [0.30, 0.32, 0.31]}),
               # vs F1: worse accuracy on every seed; forgetting better on two seeds, worse on one (within noise)
               _config("F2", {"val_accuracy": [0.55, 0.66, 0.62], "wikitext_delta": [0.29, 0.33, 0.30]}),
               _config("F3", {"val_accuracy": [0.50, 0.55, 0.52], "wikitext_delta": [0.10, 0.12, 0.11]}),  # trade-off
               _config("F4", {"val_accuracy": [0.49], "wikitext_delta": [0.09]})]  # one seed: not judged
    front = [{"id": c.first.config_key, "config_key": c.first.config_key} for c in configs]
    flags = {(f["a"], f["b"]): f["kind"] for f in _within_noise(front, configs, objectives)}
    assert flags == {("F1", "F2"): "dominates within noise"}
    configs[1] = _config("F2", {"val_accuracy": [0.61, 0.69, 0.655], "wikitext_delta": [0.29, 0.33, 0.30]})
    flags = {(f["a"], f["b"]): f["kind"] for f in _within_noise(front, configs, objectives)}
    assert flags == {("F1", "F2"): "indistinguishable"}  # accuracy now mixed in sign too
    configs[1] = _config("F2", {"val_accuracy": [0.65, 0.75, 0.70], "wikitext_delta": [0.29, 0.33, 0.30]})
    (flag,) = _within_noise(front, configs, objectives)  # F2 better on accuracy beyond noise: F2 leads the pair
    assert (flag["a"], flag["b"], flag["kind"]) == ("F2", "F1", "dominates within noise")
    accuracy = flag["per_objective"]["val_accuracy"]
    assert accuracy["a_minus_b"] == pytest.approx(0.05) and accuracy["effect"] == pytest.approx(0.05)
    assert 0 < accuracy["ci_low"] <= accuracy["ci_high"] and accuracy["a_better"]


def test_within_noise_and_gains_read_the_per_item_scores(tmp_path):
    """End to end: with items/val_accuracy.json on the repeat runs, the front's gains and its within-noise rule
    both use the two-level bootstrap. A solves 3 more of 30 problems than C on each fresh seed, so A leads C
    beyond noise on accuracy (the old mean ± std overlap called them indistinguishable); their forgetting
    (two seeds, no per-item scores) allows no test: A dominates C within noise."""
    objectives = {"val_accuracy": "max", "wikitext_delta": "min"}
    items = {(c, s): _correct(30, set(range(n))) for s in FRESH for c, n in (("A", 22), ("C", 19), ("BASE", 15))}
    report = pareto_report("gsm8k", tracking_uri=_sweep(tmp_path, objectives=objectives, accuracy=True, items=items))
    assert [m["id"] for m in report["front"]] == ["F1", "F2", "F3"] and report["front"][1]["config_key"] == _key("C")
    flags = {(f["a"], f["b"]): f for f in report["within_noise"]}
    flag = flags[("F1", "F2")]
    assert flag["kind"] == "dominates within noise"
    accuracy = flag["per_objective"]["val_accuracy"]
    assert accuracy["method"] == METHOD and accuracy["n_items"] == 30 and accuracy["tested"]
    assert accuracy["effect"] == pytest.approx(3 / 30) and accuracy["ci_low"] > 0 and not accuracy["within"]
    assert not flag["per_objective"]["wikitext_delta"]["tested"]
    a, c = (report["front"][i]["objectives"]["val_accuracy"] for i in (0, 1))
    assert abs(a["mean"] - c["mean"]) <= a["std"] + c["std"]  # what the old rule read as noise
    gain = report["front"][0]["gain"]["val_accuracy"]  # A over the baseline: 7 of 30 problems per seed
    assert gain["method"] == METHOD and gain["effect"] == pytest.approx(7 / 30) and gain["ci_low"] > 0
    assert "F1 dominates within noise F2 (val_accuracy +0.1000 [95% CI +" in format_pareto_table(report)


def test_front_against_front_hypervolumes_per_seed_interval_and_domination_beyond_noise():
    """The DLLM-JEPA front against the baseline arm's own front, on three fresh seeds (both objectives min):
    hand-computed hypervolumes against one reference, their difference per seed with Student's t over the seeds,
    and which baseline members a DLLM-JEPA member dominates beyond noise."""
    from raydllm.sweep.pareto import hypervolume, reference_point
    from raydllm.sweep.pareto_results import _front_against_front

    objectives = {"val_loss_diff": "min", "wikitext_delta": "min"}
    modes = list(objectives.values())
    # J1 beats B1 on every seed by 0.1 in loss and equals it in forgetting: beyond noise (t over 3 seeds).
    # J2 trades off against B2 (better loss, worse forgetting): no domination. B3 is dominated within the arm.
    j1 = _config("J1", {"val_loss_diff": [1.00, 1.10, 1.05], "wikitext_delta": [0.20, 0.22, 0.21]})
    j2 = _config("J2", {"val_loss_diff": [1.30, 1.40, 1.35], "wikitext_delta": [0.05, 0.07, 0.06]})
    b1 = _config("B1", {"val_loss_diff": [1.10, 1.20, 1.15], "wikitext_delta": [0.20, 0.22, 0.21]})
    b2 = _config("B2", {"val_loss_diff": [1.50, 1.60, 1.55], "wikitext_delta": [0.03, 0.05, 0.04]})
    b3 = _config("B3", {"val_loss_diff": [1.60, 1.70, 1.65], "wikitext_delta": [0.30, 0.30, 0.30]})
    front = [{"id": "F1"}, {"id": "F2"}]
    out = _front_against_front(front, [j1, j2], [b1, b2, b3], objectives, None)
    assert [r["id"] for r in out["baseline_front"]] == ["B1", "B2"]
    assert [r["label"] for r in out["baseline_front"]] == ["B1", "B2"]  # B3 dominated by B1
    versus = out["comparison"]
    points = [p for c in (j1, j2, b1, b2) for p in [c.fresh_point()] + [[c.per_objective[o].fresh_values[k]
                                                                        for o in objectives] for k in range(3)]]
    reference = reference_point([points], modes)
    assert versus["reference_point"] == pytest.approx(reference)
    assert versus["hypervolume"] == pytest.approx(hypervolume([j1.fresh_point(), j2.fresh_point()], modes, reference))
    assert versus["baseline_hypervolume"] == pytest.approx(
        hypervolume([b1.fresh_point(), b2.fresh_point()], modes, reference))
    assert versus["hypervolume"] > versus["baseline_hypervolume"]
    per_seed = [hypervolume([[c.per_objective[o].fresh_values[k] for o in objectives] for c in (j1, j2)], modes,
                            reference)
                - hypervolume([[c.per_objective[o].fresh_values[k] for o in objectives] for c in (b1, b2)], modes,
                              reference) for k in range(3)]
    assert list(versus["per_seed_difference"].values()) == pytest.approx(per_seed) and versus["seeds"] == [123, 456, 777]
    difference = versus["difference"]
    assert difference["method"] == METHOD_SEEDS_ONLY and difference["mean"] == pytest.approx(statistics.fmean(per_seed))
    assert difference["ci_low"] < difference["mean"] < difference["ci_high"]
    assert front[0]["dominates_beyond_noise"] == ["B1"] and front[1]["dominates_beyond_noise"] == []
    # The same J1 a hair better than B1 on one seed only: dominating on the means, but within noise.
    j1_close = _config("J1", {"val_loss_diff": [1.10, 1.20, 1.14], "wikitext_delta": [0.20, 0.22, 0.21]})
    front = [{"id": "F1"}, {"id": "F2"}]
    _front_against_front(front, [j1_close, j2], [b1, b2, b3], objectives, None)
    assert front[0]["dominates_beyond_noise"] == []
