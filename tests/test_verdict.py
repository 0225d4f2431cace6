"""The verdict's guards: disjoint generated splits, selection reads validation, the test ledger, budgets."""
import pytest
from mlflow.tracking import MlflowClient

from raydllm.core.config import ConfigError
from raydllm.data.tasks.synthetic import pretraining_questions, split_problems
from raydllm.sweep.ledger import claim, entry, read_ledger
from raydllm.sweep.search_space import searcher_sizes
from raydllm.sweep.verdict import arm_budgets


def test_generated_splits_are_disjoint_by_question():
    """local.yaml's settings (4000 problems, val carved from train): test shares no question with train,
    validation or the base's pretraining problems, and train holds each question once."""
    from raydllm.core.config import load_config
    from raydllm.data.sft import load_examples

    cfg = load_config("gsm8k", "local")
    splits = {s: [ex.prompt for ex in load_examples(cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"val_limit": None})}), s)] for s in ("train", "validation", "test")}
    pretrain = pretraining_questions(0)
    questions = {s: {q for q in v} for s, v in splits.items()}
    for s, qs in questions.items():
        assert len(qs) == len(splits[s]) and len(qs) > 0
    raw = {s: {r["question"] for r in split_problems(s, cfg.data.synthetic_size, cfg.data.split_seed)}
           for s in ("train", "test")}
    assert not raw["test"] & raw["train"] and not raw["test"] & pretrain and not raw["train"] & pretrain
    assert not questions["test"] & questions["train"] and not questions["test"] & questions["validation"]
    assert not questions["train"] & questions["validation"]


def test_selection_never_reads_the_reported_wikitext_split():
    from raydllm.core.config import load_config
    from raydllm.evaluation.trial import SELECTION_PROBE_SPLIT

    assert SELECTION_PROBE_SPLIT == "validation"
    assert load_config("gsm8k", "local").eval.probe_split == "test"


def test_ledger_refuses_a_then_b_then_a(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri()))
    parent = run.info.run_id
    a, b = [entry("A", 123, "/ck/a")], [entry("B", 123, "/ck/b")]
    claim(client, parent, a, force=False, by="report")
    claim(client, parent, b, force=False, by="report")
    with pytest.raises(ConfigError, match="already scored for config A seed 123"):
        claim(client, parent, a, force=False, by="report")
    assert claim(client, parent, a, force=True, by="report")[0]["config_key"] == "A"
    assert [e["config_key"] for e in read_ledger(client, parent)] == ["A", "B", "A"]


def test_budgets_and_searcher_sizes():
    assert arm_budgets({"raydllm.jepa_num_samples": "16", "raydllm.baseline_num_samples": "8"}, 0, 0)["line"] \
        == "baseline: 8 of the DLLM-JEPA arm's 16 trials"
    assert arm_budgets({"raydllm.jepa_num_samples": "5", "raydllm.baseline_num_samples": "5"}, 0, 0)["line"] is None
    assert searcher_sizes(8) == {"population_size": 4, "n_startup_trials": 2}
    assert searcher_sizes(3)["population_size"] == 2


@pytest.mark.parametrize("name", ["local", "local-pareto", "gsm8k", "nlrx", "django", "spider"])
def test_shipped_spaces_give_both_arms_equal_trials(name):
    """The baseline's count, where a space gives one, is the DLLM-JEPA arm's (read from the YAML: the paper
    spaces need their data files to load)."""
    from pathlib import Path
    import yaml

    space = yaml.safe_load((Path(__file__).parent.parent / "search_spaces" / f"{name}.yaml").read_text())
    assert space["baseline"].get("num_samples", space["num_samples"]) == space["num_samples"]


def test_compute_matched_baseline_trains_four_thirds_of_the_steps(tmp_path):
    """`baseline: {match: compute}`: the baseline arm's trials carry 4/3 of the steps (120 -> 160), their
    rungs at the same FLOPs (grace 30 -> 40), and the repeat phase runs its winner both ways."""
    import yaml

    from raydllm.sweep.compute_match import match_of, repeat_points, trial_steps
    from raydllm.sweep.search_space import baseline_arm, baseline_space, load_spec

    space = {"task": "gsm8k", "preset": "local", "metric": "val_loss_diff",
             "fixed": {"train.max_steps": 120, "data.synthetic_size": 300},
             "space": {"jepa.lambda": {"choice": [0.5, 1.0]}, "train.lr": {"loguniform": [3.0e-4, 3.0e-3]}},
             "baseline": {"match": "compute"}, "seeds": [42, 123], "repeat": {"top": 1},
             "scheduler": {"grace_period": 30, "reduction_factor": 3}, "num_samples": 4}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    spec = load_spec(path)
    assert baseline_arm(spec).match == "compute" and baseline_arm(spec).num_samples == 4
    config = baseline_space(spec)
    assert config["train.max_steps"] == 160 and config["jepa.lambda"] == 0.0
    assert trial_steps(config, 120, 30) == (160, 40) and trial_steps({}, 120, 30) == (120, 30)
    assert match_of(config) == "compute" and match_of({"train.lr": 1e-3}) == "steps"
    winner = {"jepa.lambda": 0.0, "train.lr": 1e-3, "train.max_steps": 160}
    assert repeat_points(spec, winner) == [winner, {"jepa.lambda": 0.0, "train.lr": 1e-3}]
    space["baseline"] = {"mode": "searched"}
    path.write_text(yaml.safe_dump(space))
    plain = load_spec(path)
    assert "train.max_steps" not in baseline_space(plain) and repeat_points(plain, winner) == [winner]
