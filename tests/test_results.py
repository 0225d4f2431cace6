"""`raydllm best` arithmetic on a real (SQLite) MLflow store: seeds aggregated, gain over the baseline."""
import json

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
    """Reserved = (run end - run start) x workers; training = time/train_s x workers; startup per trial."""
    from raydllm.results import format_table, time_accounting

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("timing")
    for wall_ms, train_s, startup_s, workers in [(100_000, 80.0, 10.0, 2), (50_000, 20.0, 30.0, 2)]:
        run = client.create_run(experiment, start_time=1_000_000)
        client.log_param(run.info.run_id, "train.workers", workers)
        client.log_metric(run.info.run_id, "time/train_s", train_s, step=10)
        client.log_metric(run.info.run_id, "time/startup_s", startup_s, step=0)
        client.set_terminated(run.info.run_id, end_time=1_000_000 + wall_ms)
    unfinished = client.create_run(experiment)  # still running: not counted as reserved time
    client.log_metric(unfinished.info.run_id, "time/train_s", 5.0, step=1)
    runs = client.search_runs([experiment])
    timing = time_accounting(runs)
    assert timing["reserved_worker_s"] == pytest.approx(300.0) and timing["training_worker_s"] == pytest.approx(200.0)
    assert timing["training_fraction"] == pytest.approx(2 / 3)
    assert timing["startup_s_median"] == pytest.approx(20.0) and timing["startup_s_max"] == pytest.approx(30.0)
    line = format_table({"sweep": "s", "status": "FINISHED", "metric": "m", "mode": "min", "best": [],
                         "baseline": None, "time": timing}).splitlines()[-1]
    assert "67% of reserved worker time" in line and "median 20 s" in line
