"""Pareto sweeps end to end: a space with several objectives, checked at the door; the multi-objective sweep under
ParetoASHA with NSGA-II, killed and resumed; the front read back by `raydllm best --pareto`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from raydllm.core.config import ConfigError
from raydllm.sweep.search_space import FORGETTING_PROBE_CHUNKS, load_spec
from test_tune import TINY_SPACE, _children, _cli, _parents, kill_after_two_trials

PARETO_SPACE = {
    **TINY_SPACE,
    "metric": None,
    "objectives": {"val_loss_diff": "min", "wikitext_delta": "min"},
    "fixed": {**TINY_SPACE["fixed"], "eval.report_probe_chunks": 2, "eval.probe_seq_len": 32},
    "seeds": [42, 123], "repeat": {"top": 1}, "baseline": {"mode": "searched", "num_samples": 1},
    "search": {"algorithm": "optuna", "seed": 3},
    "space": {"jepa.lambda": {"choice": [0.5, 2.0]}, "train.lr": {"choice": [1.0e-6, 3.0e-3]}},
}


def _space(folder: Path, **changes) -> Path:
    path = folder / "pareto.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in {**PARETO_SPACE, **changes}.items() if v is not None}))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"objectives": {"val_loss_diff": "min"}}, "objectives: give at least two"),
    ({"objectives": {"val_loss_diff": "min", "forgetting": "min"}}, "objectives.forgetting: unknown objective"),
    ({"objectives": {"val_loss_diff": "min", "wikitext_delta": "max"}}, "its mode is min, not max"),
    ({"metric": "loss_total"}, "metric: loss_total is not one of the objectives"),
    ({"objectives": {"val_accuracy": "max", "wikitext_delta": "min"}}, "val_accuracy is reported only with"),
    ({"search": {"algorithm": "random", "sampler": "nsga2"}}, "search.sampler: nsga2 is an optuna sampler"),
    ({"fixed": {**PARETO_SPACE["fixed"], "eval.report_probe_chunks": 0}}, "eval.report_probe_chunks > 0"),
])
def test_objectives_checked_at_the_door(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_spec(_space(tmp_path, **changes))
    assert str(caught.value).startswith(str(tmp_path / "pareto.yaml")) and "\n" not in str(caught.value)


def test_forgetting_objective_gets_a_bounded_probe_by_default(tmp_path):
    fixed = {k: v for k, v in PARETO_SPACE["fixed"].items() if k != "eval.report_probe_chunks"}
    spec = load_spec(_space(tmp_path, fixed=fixed))
    assert spec.fixed["eval.report_probe_chunks"] == FORGETTING_PROBE_CHUNKS
    assert spec.metric == "val_loss_diff" and list(spec.objectives) == ["val_loss_diff", "wikitext_delta"]


def test_shipped_pareto_spaces_load():
    for name in ("local-pareto", "bench-pareto"):
        spec = load_spec(Path(__file__).resolve().parents[1] / "search_spaces" / f"{name}.yaml")
        assert spec.objectives == {"val_loss_diff": "min", "wikitext_delta": "min"}


@pytest.mark.ray
def test_pareto_sweep_killed_resumed_and_front_read_back(tmp_path):
    """NSGA-II proposes, ParetoASHA stops, the sweep is killed and resumed: every trial once in MLflow with both
    objectives at every report; the selection-seed front and the baseline's winner run on the fresh seed;
    `raydllm best --pareto` lists the front; the parent run holds the plot and the hypervolume at each rung."""
    space = _space(tmp_path)
    command = [sys.executable, "-m", "raydllm.cli.app", "tune", "gsm8k", "--space", str(space), "--json"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    kill_after_two_trials(command, tmp_path, client)

    resumed = _cli(tmp_path, "tune", "gsm8k", "--space", str(space), "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["restored"] is True

    (parent,) = _parents(client)
    assert json.loads(parent.data.tags["raydllm.objectives"]) == PARETO_SPACE["objectives"]
    children = _children(client, parent.info.run_id)
    trial_ids = [r.data.tags["raydllm.trial_id"] for r in children]
    assert len(trial_ids) == len(set(trial_ids))  # nothing re-created by the resume
    phases = [r.data.tags["raydllm.phase"] for r in children]
    assert phases.count("search") == PARETO_SPACE["num_samples"]
    assert phases.count("baseline") == PARETO_SPACE["baseline"]["num_samples"]
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["raydllm.status"] in ("completed", "stopped_early")
        last = int(run.data.tags["raydllm.last_step"])
        reports = list(range(2, last + 1, 2))
        for name in PARETO_SPACE["objectives"]:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, name))
            assert steps[:len(reports)] == reports, (name, steps)  # both objectives at every report
        assert [m.step for m in client.get_metric_history(run.info.run_id, "base/val_loss_diff")] == [0]
    repeats = [r for r in children if r.data.tags["raydllm.phase"] == "repeat"]
    assert repeats and all(r.data.params["train.seed"] == "123" for r in repeats)
    assert any(r.data.tags["raydllm.arm"] == "baseline" for r in repeats)
    # The repeated DLLM-JEPA configs are non-dominated among the completed search trials on seed 42.
    search = [r for r in children if r.data.tags["raydllm.phase"] == "search"
              and r.data.tags["raydllm.status"] == "completed"]
    vectors = {r.data.tags["raydllm.config_key"]: [r.data.metrics[n] for n in PARETO_SPACE["objectives"]]
               for r in search}
    for run in repeats:
        key = run.data.tags["raydllm.config_key"]
        if run.data.tags["raydllm.arm"] == "dllm-jepa":
            assert not any(all(o <= v for o, v in zip(other, vectors[key])) and other != vectors[key]
                           for other in vectors.values())

    best = _cli(tmp_path, "best", "gsm8k", "--pareto", "--json")
    assert best.returncode == 0, best.stderr
    front = json.loads(best.stdout.strip().splitlines()[-1])
    assert front["front"] and list(front["objectives"]) == list(PARETO_SPACE["objectives"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/pareto.png", "summary/pareto.txt", "summary/pareto.json"} <= artifacts
    assert client.get_metric_history(parent.info.run_id, "pareto/hypervolume")


@pytest.mark.parametrize("sampler", [None, "nsga2", "tpe"])
def test_multi_objective_searcher_survives_tunes_pickling(tmp_path, sampler):
    """Tune saves the search algorithm with pickle at every experiment checkpoint and restores it on a resume:
    NSGA-II's thread lock must not stop that, and the restored searcher must go on proposing configs."""
    from raydllm.sweep.search_space import param_space
    from raydllm.sweep.tune import _search_alg

    search = {"algorithm": "optuna", "seed": 3, **({"sampler": sampler} if sampler else {})}
    spec = load_spec(_space(tmp_path, search=search))
    searcher = _search_alg(spec)
    assert searcher.set_search_properties(None, None, param_space(spec))
    searcher.suggest("trial_1")
    searcher.save_to_dir(str(tmp_path))  # what Tune's experiment checkpoint does
    restored = _search_alg(spec)
    restored.restore_from_dir(str(tmp_path))
    config = restored.searcher.suggest("trial_2")
    assert config["jepa.lambda"] in (0.5, 2.0) and config["train.lr"] in (1.0e-6, 3.0e-3)
    study = restored.searcher._ot_study
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"] and len(study.trials) == 2
    expected = "NSGAIISampler" if sampler in (None, "nsga2") else "TPESampler"
    assert expected in type(study.sampler).__name__
