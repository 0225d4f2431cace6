"""`raydllm best` arithmetic on a real (SQLite) MLflow store: seeds aggregated, gain over the baseline."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from raydllm.evaluation.item_scores import log_item_scores
from raydllm.sweep import tracking
from raydllm.cli.app import main
from raydllm.sweep.results import best_configs
from raydllm.sweep.search_space import baseline_point, config_key, load_spec


def _sweep(uri: str, trials: list[tuple], *, selection_seed: int = 42, fresh: list[int] = (123, 777),
           metric: str = "val_loss_diff", mode: str = "min", items: dict | None = None) -> str:
    """A synthetic sweep in MLflow: trials (params, seed, value, status[, rung, {step: value}]); `items` =
    {trial index: per-item scores} logged as the evaluation layer logs them."""
    parent, _ = tracking.open_run(uri, "raydllm-gsm8k", key="raydllm.sweep", name="s1",
                                  tags={"raydllm.kind": "sweep", "raydllm.metric": metric,
                                        "raydllm.mode": mode, "raydllm.selection_seed": str(selection_seed),
                                        "raydllm.fresh_seeds": json.dumps(list(fresh)),
                                        "raydllm.baseline_mode": "searched",
                                        "raydllm.baseline_keys": json.dumps(["train.lr"]),
                                        "raydllm.baseline_num_samples": "2"})
    client = MlflowClient(uri)
    for i, (params, seed, value, status, *rest) in enumerate(trials):
        searched = {**params, "train.seed": seed}
        arm = "baseline" if params["jepa.lambda"] == 0 else "dllm-jepa"
        tags = {"mlflow.parentRunId": parent, "raydllm.kind": "trial", "raydllm.arm": arm,
                "raydllm.phase": "repeat" if seed != selection_seed else ("baseline" if arm == "baseline" else "search"),
                "raydllm.status": status, "raydllm.searched": json.dumps(searched),
                "raydllm.config_key": json.dumps(params, sort_keys=True), "raydllm.last_step": "120"}
        if status == "stopped_early":
            tags |= {"raydllm.stopped_at_rung": str(rest[0]), "raydllm.stopped_at_step": str(30 * 3 ** rest[0]),
                     "raydllm.last_step": str(30 * 3 ** rest[0] + 15)}
        run, _ = tracking.open_run(uri, "raydllm-gsm8k", key="raydllm.trial_id", name=f"t{i}",
                                   run_name=f"{arm} {params} seed={seed}",
                                   params={**params, "train.seed": seed, "loss.anchor": "none"}, tags=tags)
        for step, v in (rest[1] if len(rest) > 1 else {}).items():
            client.log_metric(run, metric, v, step=step)
        client.log_metric(run, metric, value, step=int(tags["raydllm.last_step"]))
        if items and i in items:
            sink = SimpleNamespace(client=client, run_id=run, add=lambda step, values, run=run: [
                client.log_metric(run, k, v, step=step) for k, v in values.items()])
            examples = [SimpleNamespace(prompt=f"q{j}") for j in range(len(items[i]))]
            log_item_scores(sink, metric, examples, [{"scores": {"acc": v}} for v in items[i]], "acc",
                            int(tags["raydllm.last_step"]))
    return parent


GOOD, BAD, BASE, BASE2 = ({"jepa.lambda": 1.0, "train.lr": 1e-3}, {"jepa.lambda": 2.0, "train.lr": 3e-3},
                          {"jepa.lambda": 0.0, "train.lr": 2e-3}, {"jepa.lambda": 0.0, "train.lr": 3e-4})


def test_gain_on_fresh_seeds_only_paired_with_a_test(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    _sweep(uri, [(GOOD, 42, 1.0, "completed"), (GOOD, 123, 1.2, "completed"), (GOOD, 777, 1.1, "completed"),
                 (BASE, 42, 1.5, "completed"), (BASE, 123, 1.7, "completed"), (BASE, 777, 1.4, "completed"),
                 (BASE2, 42, 1.9, "completed"), ({"jepa.lambda": 0.5, "train.lr": 1e-3}, 42, 0.1, "failed")])
    report = best_configs("gsm8k", tracking_uri=uri, top=5)
    first = report["best"][0]
    assert first["params"] == GOOD and first["selection_value"] == pytest.approx(1.0)
    assert first["fresh_seeds"] == [123, 777] and first["fresh_mean"] == pytest.approx(1.15)
    # the gain is measured on 123 and 777 only: differences 0.5 and 0.3 (the selection seed's 0.5 is not one)
    gain = report["gain"]
    assert gain["seeds"] == [123, 777] and 42 not in gain["seeds"]
    assert gain["differences"] == pytest.approx([0.5, 0.3]) and gain["mean"] == pytest.approx(0.4)
    assert gain["std"] == pytest.approx(0.1414, abs=1e-4) and gain["n"] == 2
    from scipy.stats import ttest_rel

    # the seed-level t-test is kept, apart; on two seeds without per-item scores the headline has no p
    assert gain["seed_t_test"]["p_value"] == pytest.approx(ttest_rel([1.7, 1.4], [1.2, 1.1]).pvalue)
    assert gain["p_value"] is None and gain["method"].startswith("Student t over seeds")
    # Student's t over the two seeds, not their range [0.3, 0.5] (which a 2-point bootstrap gives and which
    # covers the truth half the time): 0.4 +- t_{0.975, 1} 0.1414 / sqrt(2)
    half = 12.7062 * 0.141421 / 2 ** 0.5
    assert gain["ci_low"] == pytest.approx(0.4 - half, abs=1e-3) and gain["ci_high"] == pytest.approx(0.4 + half, abs=1e-3)
    assert gain["effect"] == pytest.approx(0.4)
    assert report["trial_counts"] == {"dllm-jepa": {"search": 2, "repeat": 2}, "baseline": {"search": 2, "repeat": 2}}
    assert report["baseline"]["params"] == BASE and [r["params"] for r in report["baselines"]] == [BASE, BASE2]
    assert [r["params"] for r in report["best"]] == [GOOD]  # the failed trial is not ranked
    assert main(["best", "gsm8k", "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out
    assert "pre-specified comparison (each arm's winner on seed 42): gain +0.4000 [95% CI -0.8706, +1.6706], no p" \
        in table
    assert "searched over train.lr" in table


def test_gain_not_measured_without_fresh_seeds_and_no_std_for_one(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    _sweep(uri, [(GOOD, 42, 1.0, "completed"), (BASE, 42, 1.5, "completed")], fresh=[])
    report = best_configs("gsm8k", tracking_uri=uri)
    assert report["gain"] is None and report["best"][0]["gain"] is None  # never from the selection seed
    assert main(["best", "gsm8k", "--tracking-uri", uri]) == 0
    assert "gain not measured" in capsys.readouterr().out
    uri1 = f"sqlite:///{tmp_path / 'one.db'}"
    _sweep(uri1, [(GOOD, 42, 1.0, "completed"), (GOOD, 123, 1.2, "completed"), (BASE, 42, 1.5, "completed"),
                  (BASE, 123, 1.7, "completed")], fresh=[123])
    report = best_configs("gsm8k", tracking_uri=uri1)
    assert report["gain"]["n"] == 1 and report["gain"]["std"] is None and report["gain"]["p_value"] is None
    assert report["best"][0]["fresh_std"] is None  # one value has no spread, not 0.0


def test_stopped_trial_never_ranks_above_a_completed_one(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    # BAD looked best at its rung-0 report (0.2 at step 30), then was stopped; it reported once more after.
    _sweep(uri, [(GOOD, 42, 1.0, "completed"), (BAD, 42, 0.15, "stopped_early", 0, {30: 0.2}),
                 (BASE, 42, 1.5, "completed"), (BASE, 123, 1.7, "completed"), (GOOD, 123, 1.2, "completed")],
           fresh=[123])
    report = best_configs("gsm8k", tracking_uri=uri)
    assert [r["params"] for r in report["best"]] == [GOOD]
    (stopped,) = report["stopped"]
    assert stopped["params"] == BAD and stopped["stopped_at_rung"] == 0 and stopped["selection_step"] == 30
    assert stopped["selection_value"] == pytest.approx(0.2) and stopped["gain"] is None  # its value at the rung
    assert main(["best", "gsm8k", "--tracking-uri", uri]) == 0
    assert "rung 0 (step 30): 0.2000" in capsys.readouterr().out
    from raydllm.sweep.results import plot_sweep

    assert plot_sweep(report, ["jepa.lambda", "train.lr"], tmp_path / "plot.png").stat().st_size > 10_000


def test_student_t_without_scipy_matches_scipy(monkeypatch):
    import builtins

    from scipy.stats import t as student_t

    from raydllm.sweep.results import student_t_sf

    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    for t, df in [(0.0, 1), (0.5, 1), (2.3, 2), (4.1, 3), (1.7, 10), (12.0, 4), (0.01, 30)]:
        assert student_t_sf(t, df) == pytest.approx(float(student_t.sf(t, df)), rel=1e-9, abs=1e-12)


def test_best_without_sweep_is_a_clear_error(tmp_path, capsys):
    assert main(["best", "gsm8k", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert "no MLflow experiment" in capsys.readouterr().err


def test_baseline_point_and_config_key(tmp_path):
    spec = load_spec("search_spaces/local.yaml")
    point = baseline_point(spec)
    assert point["jepa.lambda"] == 0.0 and point["train.lr"] == 1e-3 and point["jepa.t_low"] == 0.2
    a = config_key(spec, {**point, "train.seed": 42})
    assert a == config_key(spec, {**point, "train.seed": 777})  # seed repeats share a key
    assert a != config_key(spec, {**point, "jepa.k": 3})


def test_time_accounting_fraction_of_reserved_worker_time(tmp_path):
    """Reserved = (run end - run start) x workers; each phase = its time/*_s x workers; startup per trial."""
    from raydllm.sweep.results import format_table, time_accounting

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("timing")
    for wall_ms, train_s, startup_s, eval_s, ray_s in [(100_000, 80.0, 10.0, 5.0, 4.0), (50_000, 20.0, 20.0, 5.0, 6.0)]:
        run = client.create_run(experiment, start_time=1_000_000)
        client.log_param(run.info.run_id, "train.workers", 2)
        for key, value, step in [("time/train_s", train_s, 10), ("time/startup_s", startup_s, 0),
                                 ("time/startup/ray_s", ray_s, 0), ("time/startup/init_s", startup_s - ray_s, 0),
                                 ("time/eval_s", eval_s, 10), ("time/checkpoint_s", 1.0, 10)]:
            client.log_metric(run.info.run_id, key, value, step=step)
        client.set_terminated(run.info.run_id, end_time=1_000_000 + wall_ms)
    unfinished = client.create_run(experiment)  # still running: not counted as reserved time
    client.log_metric(unfinished.info.run_id, "time/train_s", 5.0, step=1)
    runs = client.search_runs([experiment])
    timing = time_accounting(runs)
    assert timing["reserved_worker_s"] == pytest.approx(300.0) and timing["training_worker_s"] == pytest.approx(200.0)
    assert timing["training_fraction"] == pytest.approx(2 / 3)
    shares = timing["shares"]
    assert shares["startup"] == pytest.approx(60 / 300) and shares["evaluation"] == pytest.approx(20 / 300)
    assert shares["checkpointing"] == pytest.approx(4 / 300) and sum(shares.values()) == pytest.approx(1.0)
    assert timing["startup_s_median"] == pytest.approx(15.0) and timing["startup_s_max"] == pytest.approx(20.0)
    assert timing["startup_ray_s_median"] == pytest.approx(5.0) and timing["startup_init_s_median"] == pytest.approx(10.0)
    line = format_table({"sweep": "s", "status": "FINISHED", "metric": "m", "mode": "min", "best": [],
                         "baseline": None, "time": timing}).splitlines()[-1]
    assert "67% of reserved worker time" in line and "median 15 s" in line and "evaluation 7%" in line


def test_bench_sweep_arm_figures_from_mlflow(tmp_path):
    """Each arm's best is its own search phase's best; its noise is that config's spread over the seeds it ran
    (repeat phase included); compute is the sum of the search trials' last steps. A finished arm is not re-run."""
    import json as _json

    from raydllm.sweep.search_space import load_spec
    from raydllm.sweep.tracking import experiment_name
    from raydllm.bench.fidelity import arm_figures
    from raydllm.bench.sweep import _sweep_finished

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment(experiment_name("gsm8k"))
    spec = load_spec(Path(__file__).parents[1] / "search_spaces" / "bench-sweep.yaml")

    def sweep(name, trials, finished=True):
        parent = client.create_run(experiment, tags={"raydllm.kind": "sweep", "raydllm.sweep": name})
        for phase, key, seed, last_step, value in trials:
            run = client.create_run(experiment, tags={
                "mlflow.parentRunId": parent.info.run_id, "raydllm.phase": phase, "raydllm.config_key": key,
                "raydllm.last_step": str(last_step), "raydllm.searched": _json.dumps({"train.lr": key, "train.seed": seed})})
            client.log_param(run.info.run_id, "train.seed", seed)
            client.log_metric(run.info.run_id, "val_loss_diff", value, step=last_step)
        if finished:
            client.set_terminated(parent.info.run_id)

    sweep("grid", [("search", "a", 42, 135, 0.70), ("search", "b", 42, 135, 0.80), ("repeat", "a", 123, 135, 0.74),
                   ("repeat", "a", 777, 135, 0.72)])
    sweep("asha", [("search", "b", 42, 135, 0.80), ("search", "a", 42, 10, 1.30), ("search", "c", 42, 40, 0.95)],
          finished=False)
    grid = arm_figures(spec, tracking_uri=uri, sweep="grid")
    assert grid["best_config"] == {"train.lr": "a"} and grid["best_metric"] == pytest.approx(0.70)
    assert sorted(grid["seeds"]) == [42, 123, 777] and grid["best_metric_mean_over_seeds"] == pytest.approx(0.72)
    assert grid["best_metric_std_over_seeds"] == pytest.approx(0.02) and grid["trial_steps"] == 270
    asha = arm_figures(spec, tracking_uri=uri, sweep="asha")
    assert asha["best_config"] == {"train.lr": "b"} and asha["trial_steps"] == 185 and asha["seeds"] == [42]
    assert _sweep_finished(uri, "gsm8k", "grid") and not _sweep_finished(uri, "gsm8k", "asha")
    assert not _sweep_finished(uri, "gsm8k", "missing")


@pytest.mark.parametrize("match", ["steps", "compute"])
def test_report_evaluates_winners_on_test_once(tmp_path, capsys, one_thread, match):
    """`raydllm report`: both winners' fresh-seed checkpoints answer the test split (real generation with
    hand-built tiny checkpoints), the table carries per-arm mean ± std, the paired gain and the probes the
    trials logged; the parent run records it, and a second look at test is refused unless forced. Under
    `baseline: {match: compute}` the step-matched twin of the baseline winner is scored too, with its own gain."""
    import torch

    from raydllm.engine.backbone import load_backbone
    from raydllm.core.config import load_config
    from test_evaluation import SMALL, _hand_built_checkpoint

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    base = {**BASE, "train.max_steps": 160} if match == "compute" else BASE
    twin = [(BASE, 123, 1.8, "completed"), (BASE, 777, 1.6, "completed")] if match == "compute" else []
    parent = _sweep(uri, [(GOOD, 42, 1.0, "completed"), (GOOD, 123, 1.2, "completed"), (GOOD, 777, 1.1, "completed"),
                          (base, 42, 1.5, "completed"), (base, 123, 1.7, "completed"), (base, 777, 1.4, "completed"),
                          (BAD, 42, 0.5, "stopped_early", 0)] + twin)
    client = MlflowClient(uri)
    cfg = load_config("gsm8k", "local", SMALL)
    deltas = {}
    for i, run in enumerate(client.search_runs([client.get_run(parent).info.experiment_id],
                                               f"tags.`mlflow.parentRunId` = '{parent}'")):
        torch.manual_seed(i)
        backbone, _ = load_backbone(cfg.model)
        folder = tmp_path / f"ckpt{i}" / "checkpoint_000007"
        _hand_built_checkpoint(folder, cfg, backbone.model.state_dict())
        client.set_tag(run.info.run_id, "raydllm.checkpoint", str(folder))
        client.set_tag(run.info.run_id, "raydllm.device", "cpu")
        deltas[run.info.run_id] = 0.1 * i
        client.log_metric(run.info.run_id, "probe/wikitext_delta", 0.1 * i, step=120)
        client.log_metric(run.info.run_id, "probe/drift_late", 0.01 * i, step=120)
    args = ["report", "gsm8k", "--tracking-uri", uri, "--limit", "3", "--gen-length", "8", "--out", str(tmp_path),
            "--json"]
    assert main(args) == 2  # an unfinished sweep: refused
    assert "not FINISHED" in capsys.readouterr().err
    client.set_terminated(parent)
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    jepa, base = report["arms"]["dllm-jepa"], report["arms"]["baseline"]
    assert report["seeds"] == [123, 777] and jepa["params"] == GOOD and base["params"] == (
        {**BASE, "train.max_steps": 160} if match == "compute" else BASE)
    if match == "compute":
        steps = report["arms"]["baseline-steps"]
        assert steps["params"] == BASE and len(steps["values"]) == 2
        assert report["gain_step_matched"]["differences"] == pytest.approx(
            [j - b for j, b in zip(jepa["values"], steps["values"])])
        assert "Step-matched comparison" in (tmp_path / "report-s1.md").read_text()
    else:
        assert "baseline-steps" not in report["arms"] and report["gain_step_matched"] is None
    assert len(jepa["values"]) == 2 and jepa["std"] is not None and report["protocol"]["examples"] == 3
    assert report["gain"]["differences"] == pytest.approx([j - b for j, b in zip(jepa["values"], base["values"])])
    assert jepa["probes"]["wikitext_delta"]["mean"] == pytest.approx(
        sum(deltas[r] for r in jepa["run_ids"]) / 2)
    assert report["hardware"]["trials"] == ["cpu"] and report["protocol"]["gen_length"] == 8
    assert client.get_run(jepa["run_ids"][0]).data.metrics["eval/test/0shot/n"] == 3
    assert {a.path for a in client.list_artifacts(parent, "report")} == {"report/test.md", "report/test.json"}
    markdown = (tmp_path / "report-s1.md").read_text()
    assert "| DLLM-JEPA |" in markdown and "Pre-specified comparison" in markdown
    # an interval, or (3 problems both arms miss alike) the point it collapses to, named as no interval
    gain = report["gain"]
    assert ("95% CI" in markdown) != (gain["ci_low"] == gain["ci_high"] and "no interval: zero spread" in markdown)
    assert report["gain"]["n_items"] == 3 and report["gain"]["method"].startswith("paired two-level bootstrap")
    assert report["trial_counts"]["baseline"] == {"search": 1, "repeat": 4 if match == "compute" else 2}
    assert main(args) == 2  # the same winners on test again: refused
    assert "already scored" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    note = client.get_run(parent).data.tags["mlflow.note.content"]  # the verdict in the run's Description
    assert "## Test verdict" in note and "## Verdict: sweep s1" in note and "| dllm-jepa |" in note


def test_a_config_proposed_twice_is_judged_by_the_trial_that_went_furthest(tmp_path):
    """NSGA-II can propose a config again: the completed selection-seed trial stands for it, not the stopped one
    (whichever MLflow lists first)."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    for order in ([(GOOD, 42, 0.9, "stopped_early", 0), (GOOD, 42, 0.5, "completed")],
                  [(GOOD, 42, 0.5, "completed"), (GOOD, 42, 0.9, "stopped_early", 0)]):
        _sweep(uri, order + [(BAD, 42, 0.7, "completed")], fresh=[])
        report = best_configs("gsm8k", tracking_uri=uri)
        assert [(r["params"], r["selection_value"]) for r in report["best"]] == [(GOOD, 0.5), (BAD, 0.7)]
        assert report["stopped"] == []
        uri = f"sqlite:///{tmp_path / 'm2.db'}"


def test_max_mode_gain_sign_and_item_level_interval(tmp_path, capsys):
    """val_accuracy (max): DLLM-JEPA solves more problems than the baseline on both fresh seeds, so the gain is
    positive; with per-item scores the interval and p come from the two-level bootstrap over seeds and items."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    n = 40
    ours = [1.0] * 30 + [0.0] * 10  # 0.75
    theirs = [1.0] * 20 + [0.0] * 20  # 0.50
    _sweep(uri, [(GOOD, 42, 0.8, "completed"), (GOOD, 123, 0.75, "completed"), (GOOD, 777, 0.75, "completed"),
                 (BASE, 42, 0.5, "completed"), (BASE, 123, 0.5, "completed"), (BASE, 777, 0.5, "completed")],
           metric="val_accuracy", mode="max", items={1: ours, 2: ours, 4: theirs, 5: theirs})
    report = best_configs("gsm8k", tracking_uri=uri)
    gain = report["gain"]
    assert gain["mean"] == pytest.approx(0.25) and gain["effect"] == pytest.approx(0.25)
    assert gain["n_items"] == n and gain["method"].startswith("paired two-level bootstrap")
    assert 0.0 < gain["ci_low"] < 0.25 < gain["ci_high"] < 0.5
    assert gain["p_value"] is not None and gain["p_value"] < 0.05 and gain["p_holm"] == pytest.approx(gain["p_value"])
    assert gain["mde"] is not None and gain["mde_plus_one_seed"] < gain["mde"]
    assert report["within_noise"] == {"dllm-jepa": None, "baseline": None}  # no `val_accuracy_se` on seed 42
    assert main(["best", "gsm8k", "--tracking-uri", uri]) == 0
    assert "gain +0.2500 [95% CI +" in capsys.readouterr().out


def test_compute_matched_sweep_shows_both_comparisons(tmp_path, capsys):
    """`baseline: {match: compute}`: the baseline winner searched at 4/3 of the steps, its step-matched twin run on
    the fresh seeds only; `best` gives the pre-specified (compute-matched) gain and the step-matched one beside it,
    each against its own baseline runs, and the twin is not listed as running."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    base_c = {**BASE, "train.max_steps": 160}
    _sweep(uri, [(GOOD, 42, 1.0, "completed"), (GOOD, 123, 1.2, "completed"), (GOOD, 777, 1.1, "completed"),
                 (base_c, 42, 1.3, "completed"), (base_c, 123, 1.3, "completed"), (base_c, 777, 1.2, "completed"),
                 (BASE, 123, 1.6, "completed"), (BASE, 777, 1.5, "completed")])
    report = best_configs("gsm8k", tracking_uri=uri, top=5)
    assert report["baseline_match"] == "compute" and report["baseline"]["params"] == base_c
    assert report["baseline_step_matched"]["params"] == BASE
    assert report["gain"]["differences"] == pytest.approx([0.1, 0.1])  # against the 160-step baseline
    assert report["gain_step_matched"]["differences"] == pytest.approx([0.4, 0.4])  # against the 120-step twin
    assert report["running"] == []
    assert main(["best", "gsm8k", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "against the compute-matched baseline" in out and "step-matched comparison" in out
