"""`raydllm tune --plan`: a sweep's trials, steps, hours, dollars and checkpoint storage from the space file alone,
against figures worked out by hand here for a tiny space, and printed without Ray."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raydllm.core.config import ConfigError
from raydllm.sweep.plan import Assumptions, LocalCpu, format_plan, load_prices, plan
from raydllm.sweep.search_space import load_spec

ROOT = Path(__file__).resolve().parents[1]

# 8 steps, a report every 2, ASHA grace 2 x2: rungs at 2 and 4 (8 is max_t). The search is 2 samples x a
# 2-value grid = 4 trials, the baseline 3, the repeat phase each arm's winner on the one fresh seed.
SPACE = {
    "task": "gsm8k", "preset": "local", "metric": "val_loss_diff",
    "fixed": {"model.init": "random", "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
              "data.val_limit": 16, "train.micro_batch_size": 8, "train.max_steps": 8, "train.eval_every": 2,
              "data.answer_tokens": 48, "eval.final": False},
    "space": {"jepa.lambda": {"grid": [0.5, 2.0]}, "jepa.k": {"randint": [1, 2]},
              "train.lr": {"loguniform": [1.0e-4, 1.0e-2]}},
    "baseline": {"mode": "searched", "num_samples": 3}, "seeds": [42, 123], "repeat": {"top": 1},
    "scheduler": {"grace_period": 2, "reduction_factor": 2},
    "num_samples": 2, "max_concurrent_trials": 2,
    "resources": {"workers": 1, "cpus_per_worker": 1},
}
# Round figures, so the expected numbers below can be worked out by hand.
CPU = Assumptions(local=LocalCpu(flops_per_worker=1e9, step_overhead_s=0.0, trial_start_s=10.0, sweep_start_s=0.0,
                                 phase_start_s=0.0))
# The 2-layer, width-32 model: embedding 260 x 32, two blocks of 12 d^2 + 13 d, final LayerNorm 2d, head 32 x 260.
N = 260 * 32 + 2 * (12 * 32 * 32 + 13 * 32) + 2 * 32 + 32 * 260
TOKENS = 8 * (96 + 48)  # micro-batch x (the local preset's max_prompt_tokens + answer_tokens)


def _space(tmp_path, **changes) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**SPACE, **changes}))
    return path


def test_trials_steps_and_hours_match_the_hand_count(tmp_path):
    result = plan(load_spec(_space(tmp_path)), space_name="space.yaml", a=CPU)
    rows = [(p["phase"], p["arm"], p["trials"], p["steps_per_trial"], p["reports_per_trial"], p["rungs"])
            for p in result["phases"]]
    assert rows == [("search", "dllm-jepa", 4, 8, 4, [2, 4]), ("baseline", "baseline", 3, 8, 4, [2, 4]),
                    ("repeat", "dllm-jepa", 1, 8, 4, []), ("repeat", "baseline", 1, 8, 4, [])]
    # Worst: every trial to step 8. Expected: all reach 2, half go on to 4, a quarter to 8: 2 + 2/2 + 4/4 = 4.
    assert result["cases"]["worst"]["trial_steps"] == 9 * 8
    assert result["cases"]["expected"]["trial_steps"] == pytest.approx(7 * 4 + 2 * 8)
    jepa_step = 4 * 2 * N * TOKENS / 1e9  # online forward + backward + the EMA target's forward: 4F
    base_step = 3 * 2 * N * TOKENS / 1e9
    search = result["phases"][0]
    assert search["seconds_per_step"] == pytest.approx(jepa_step)
    assert result["phases"][1]["seconds_per_step"] == pytest.approx(base_step)
    # A report: the validation loss, 16 rows x 3 mask rates, one forward each (no generation: the metric is a loss).
    report = 3 * 2 * N * 16 * (96 + 48) / 1e9
    assert search["seconds_per_report"] == pytest.approx(report)
    # Expected reports per search trial: step 2 (all), 4 (half), 6 and 8 (a quarter): 1 + 0.5 + 0.5 = 2.
    assert search["trial_seconds"]["expected"] == pytest.approx(10 + 4 * jepa_step + 2 * report)
    worst_jepa, worst_base = 10 + 8 * jepa_step + 4 * report, 10 + 8 * base_step + 4 * report
    assert result["cases"]["worst"]["trial_hours"] == pytest.approx((5 * worst_jepa + 4 * worst_base) / 3600)
    # Two at a time, phase after phase: search 4 x jepa / 2, baseline 3 x base / 2, repeat (jepa + base) / 2.
    wall = 2 * worst_jepa + 1.5 * worst_base + max((worst_jepa + worst_base) / 2, worst_jepa)
    assert result["cases"]["worst"]["wall_clock_hours"] == pytest.approx(wall / 3600)
    assert result["cases"]["worst"]["gpu_hours"] == 0 and "dollars" not in result["cases"]["worst"]
    assert "search" in format_plan(result) and "trial-hours (CPU)" in format_plan(result)


def test_checkpoints_kept_follow_the_policy(tmp_path):
    """Saves at the rungs (2, 4) and the end: 3; Ray keeps 2, the last with export/. Worst case: all 9 trials end
    and keep theirs, plus 2 in flight."""
    result = plan(load_spec(_space(tmp_path)), space_name="space.yaml", a=CPU)
    search, baseline = result["phases"][0], result["phases"][1]
    assert search["checkpoint_saves_per_trial"] == 3
    predictor = 2 * (12 * 32 * 32 + 13 * 32)  # k up to 2
    assert search["checkpoint_bytes_per_save"] == pytest.approx(18 * (N + predictor))  # 2 + 12 (+ 4 for the EMA)
    assert baseline["checkpoint_bytes_per_save"] == pytest.approx(14 * N)
    assert search["export_bytes"] == pytest.approx(2 * N)
    jepa_kept, base_kept = 2 * 18 * (N + predictor) + 2 * N, 2 * 14 * N + 2 * N
    in_flight = 2 * 2 * 18 * (N + predictor)
    assert result["cases"]["worst"]["peak_checkpoint_bytes"] == pytest.approx(5 * jepa_kept + 4 * base_kept + in_flight)
    # Expected: a quarter of the searched trials end; the repeat phase's all do.
    expected = (4 / 4 + 1) * jepa_kept + (3 / 4 + 1) * base_kept + in_flight
    assert result["cases"]["expected"]["peak_checkpoint_bytes"] == pytest.approx(expected)


def test_compute_matched_baseline_runs_four_thirds_and_both_repeats(tmp_path):
    spec = load_spec(_space(tmp_path, fixed={**SPACE["fixed"], "train.max_steps": 9, "train.eval_every": 3},
                            scheduler={"grace_period": 3, "reduction_factor": 3},
                            baseline={"mode": "searched", "num_samples": 3, "match": "compute"}))
    rows = [(p["phase"], p["arm"], p["trials"], p["steps_per_trial"]) for p in plan(spec, space_name="s", a=CPU)["phases"]]
    assert rows == [("search", "dllm-jepa", 4, 9), ("baseline", "baseline", 3, 12), ("repeat", "dllm-jepa", 1, 9),
                    ("repeat", "baseline", 1, 12), ("repeat", "baseline", 1, 9)]


def _gpu_space(tmp_path) -> Path:
    return _space(tmp_path, resources={"workers": 4, "cpus_per_worker": 1, "use_gpu": True,
                                       "accelerator_type": "A100-80G"})


def test_gpu_dollars_from_the_cluster_node_types_and_the_price_file(tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text(yaml.safe_dump({"as_of": "2026-01-01", "source": "test", "region": "r", "instances": {
        "big.gpu": {"on_demand": 10.0, "spot": 4.0, "gpus": 8, "gpu": "A100-80G"},
        "small.gpu": {"on_demand": 5.0, "spot": 2.0, "gpus": 8, "gpu": "A100-40G"},
        "head.cpu": {"on_demand": 1.0, "spot": 0.5, "gpus": 0}}}))
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0}, "node_config": {"InstanceType": "head.cpu"}},
        "gpu80": {"max_workers": 2, "resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100-80G": 1},
                  "node_config": {"InstanceType": "big.gpu"}},
        "gpu40": {"max_workers": 2, "resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100-40G": 1},
                  "node_config": {"InstanceType": "small.gpu"}}}}))
    result = plan(load_spec(_gpu_space(tmp_path)), space_name="s", cluster_file=cluster, prices_file=prices)
    worst = result["cases"]["worst"]
    assert worst["gpu_hours"] == pytest.approx(4 * worst["trial_hours"])  # 4 GPUs a trial
    # Only the 80 GB type holds a worker that asks for accelerator_type:A100-80G; 8 GPUs a node, the head all along.
    assert set(worst["dollars"]) == {"big.gpu"}
    assert worst["dollars"]["big.gpu"]["on_demand"] == pytest.approx(
        worst["gpu_hours"] / 8 * 10.0 + worst["wall_clock_hours"] * 1.0)
    assert worst["dollars"]["big.gpu"]["spot"] == pytest.approx(worst["gpu_hours"] / 8 * 4.0 + worst["wall_clock_hours"])
    assert result["prices"]["as_of"] == "2026-01-01"


def test_bad_price_and_cluster_files_name_the_field(tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text(yaml.safe_dump({"as_of": "2026-01-01", "source": "t", "instances": {"x": {"on_demand": 1}}}))
    with pytest.raises(ConfigError, match=r"instances\.x\.spot"):
        load_prices(prices)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"head_node_type": "h", "available_node_types": {
        "g": {"resources": {"GPU": 8, "accelerator_type:A100-80G": 1}, "node_config": {"InstanceType": "unpriced"}}}}))
    with pytest.raises(ConfigError, match=r"instances\.unpriced"):
        plan(load_spec(_gpu_space(tmp_path)), space_name="s", cluster_file=cluster)
    cluster.write_text("just a string")
    with pytest.raises(ConfigError, match=r"--cluster"):
        plan(load_spec(_gpu_space(tmp_path)), space_name="s", cluster_file=cluster)


def test_shipped_price_file_is_dated_and_prices_cluster_yaml():
    prices = load_prices()
    assert str(prices["as_of"]) and prices["source"]
    result = plan(load_spec(ROOT / "search_spaces" / "gsm8k.yaml"), space_name="gsm8k.yaml",
                  cluster_file=ROOT / "cluster.yaml")
    assert set(result["cases"]["worst"]["dollars"]) == {"p4de.24xlarge"}  # the 80 GB cards the space asks for
    worst, expected = result["cases"]["worst"], result["cases"]["expected"]
    assert expected["gpu_hours"] < worst["gpu_hours"] and expected["trial_steps"] < worst["trial_steps"]


def test_cli_plan_prints_without_ray(tmp_path):
    """`raydllm tune gsm8k --plan` in a fresh interpreter: exit 0, the figures, and Ray neither started nor
    imported (nor MLflow)."""
    code = ("import sys; from raydllm.cli.app import main; rc = main(['tune', 'gsm8k', '--plan', '--json']); "
            "print(json.dumps({'rc': rc, 'ray': 'ray' in sys.modules, 'mlflow': 'mlflow' in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", "import json; " + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    *_, figures, imports = done.stdout.strip().splitlines()
    assert json.loads(imports) == {"rc": 0, "ray": False, "mlflow": False}
    figures = json.loads(figures)
    assert figures["cases"]["worst"]["gpu_hours"] > 0 and figures["cases"]["worst"]["dollars"]["p4de.24xlarge"]
    text = subprocess.run([sys.executable, "-m", "raydllm.cli.app", "tune", "gsm8k", "--plan"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "GPU-hours" in text.stdout and "on demand" in text.stdout
    missing = subprocess.run([sys.executable, "-m", "raydllm.cli.app", "tune", "gsm8k", "--plan", "--cluster",
                              str(tmp_path / "none.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--cluster" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
