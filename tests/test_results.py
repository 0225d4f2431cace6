"""`raydllm best` arithmetic on a real (SQLite) MLflow store: seeds aggregated, gain over the baseline."""
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raydllm import tracking
from raydllm.cli import main
from raydllm.results import best_configs
from raydllm.search_space import baseline_point, config_key, load_spec


def _sweep(uri: str, trials: list[tuple[dict, int, float, str]]) -> str:
    parent, _ = tracking.open_run(uri, "raydllm-gsm8k", key="raydllm.sweep", name="s1",
                                  tags={"raydllm.kind": "sweep", "raydllm.metric": "val_loss_diff",
                                        "raydllm.mode": "min"})
    client = MlflowClient(uri)
    for i, (params, seed, value, status) in enumerate(trials):
        searched = {**params, "train.seed": seed}
        run, _ = tracking.open_run(uri, "raydllm-gsm8k", key="raydllm.trial_id", name=f"t{i}",
                                   params={**{k: v for k, v in params.items()}, "train.seed": seed,
                                           "loss.anchor": "none"},
                                   tags={"mlflow.parentRunId": parent, "raydllm.kind": "trial",
                                         "raydllm.status": status, "raydllm.searched": json.dumps(searched),
                                         "raydllm.config_key": json.dumps(params, sort_keys=True)})
        client.log_metric(run, "val_loss_diff", value, step=10)
    return parent


def test_seeds_aggregated_and_gain_on_shared_seeds(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    good, bad, base = {"jepa.lambda": 1.0, "jepa.k": 2}, {"jepa.lambda": 2.0, "jepa.k": 1}, {"jepa.lambda": 0.0,
                                                                                              "jepa.k": 1}
    _sweep(uri, [(good, 42, 1.0, "completed"), (good, 123, 1.2, "completed"), (good, 777, 1.1, "completed"),
                 (bad, 42, 3.0, "stopped_early"), (base, 42, 1.5, "completed"), (base, 123, 1.7, "completed"),
                 ({"jepa.lambda": 0.5, "jepa.k": 1}, 42, 0.1, "failed")])
    report = best_configs("gsm8k", tracking_uri=uri, top=5)
    first = report["best"][0]
    assert first["params"] == good and first["n"] == 3 and sorted(first["seeds"]) == [42, 123, 777]
    assert first["mean"] == pytest.approx(1.1) and first["std"] == pytest.approx(0.1)
    # gain uses the seeds both ran (42, 123): baseline mean 1.6 vs config mean 1.1 on those seeds
    assert first["gain_vs_baseline"] == pytest.approx(0.5) and first["baseline_seeds"] == [42, 123]
    assert report["baseline"]["mean"] == pytest.approx(1.6)
    assert [r["params"] for r in report["best"]] == [good, bad]  # the failed trial is not ranked
    assert main(["best", "gsm8k", "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out
    assert "baseline" in table and "1.1000 ± 0.1000" in table


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
    from raydllm.results import format_table, time_accounting

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

    from raydllm.search_space import load_spec
    from raydllm.tracking import experiment_name
    from raydllm.bench import _sweep_finished, arm_figures

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
