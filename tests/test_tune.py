"""`raydllm tune` / `raydllm best` end to end: Ray Tune + ASHA over DeepSpeed trials, asserted on MLflow.

Traps of Ray 2.60 (../shared/notes/ray-2.60-tune-train.md) each shown handled here:
- placement groups of ASHA-stopped trials leaking: trials start after others were stopped and all finish;
- code after fit() never running for stopped trials: every child run ends FINISHED with a status tag;
- duplicate MLflow runs after a restore: every trial appears exactly once after kill + resume;
- max_concurrent_trials ignored after a restore: the resumed sweep finishes with no trial failing on resources.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from raydllm.cli.app import main

TINY_SPACE = {
    "task": "gsm8k", "preset": "local", "metric": "val_loss_diff",
    "fixed": {"model.init": "random", "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "data.synthetic_size": 300,
              "data.val_limit": 16, "train.micro_batch_size": 8, "train.max_steps": 8, "train.eval_every": 2,
              # the paper's fixed rates: with per-row rates an 8-step random-init run barely separates the lrs
              "jepa.rate_sampling": "fixed", "data.answer_tokens": 48},
    "space": {"jepa.lambda": {"choice": [0.5, 2.0]}, "jepa.k": {"randint": [1, 2]},
              "jepa.t_low": {"uniform": [0.1, 0.3]}, "jepa.t_high": {"uniform": [0.6, 0.9]},
              # a learning rate that learns nothing next to one that learns: ASHA has something to stop
              "train.lr": {"choice": [1.0e-6, 3.0e-3]}},
    "baseline": {"mode": "searched", "num_samples": 2}, "seeds": [42],
    "scheduler": {"grace_period": 2, "reduction_factor": 2},
    "search": {"algorithm": "random", "seed": 3},
    "num_samples": 4, "max_concurrent_trials": 2,
    "resources": {"workers": 1, "cpus_per_worker": 1},
}


def _write_space(folder: Path, **changes) -> Path:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump({**TINY_SPACE, **changes}))
    return path


def _cli(workdir: Path, *args: str, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raydllm.cli.app", *args], cwd=workdir, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _children(client: MlflowClient, parent_id: str):
    experiment = client.get_experiment_by_name("raydllm-gsm8k")
    return client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def _parents(client: MlflowClient):
    experiment = client.get_experiment_by_name("raydllm-gsm8k")
    return client.search_runs([experiment.experiment_id], "tags.`raydllm.kind` = 'sweep'")


def kill_after_two_trials(command: list[str], workdir: Path, client: MlflowClient) -> set[str]:
    """Start the sweep in `command` and SIGKILL it (the driver and the Ray cluster it started) once two trials
    have ended in MLflow; returns their trial ids."""
    sweep = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    finished_before: set[str] = set()
    deadline = time.time() + 600
    while time.time() < deadline and sweep.poll() is None:
        time.sleep(2)
        if not (workdir / "mlflow.db").exists() or client.get_experiment_by_name("raydllm-gsm8k") is None:
            continue
        parents = _parents(client)
        done = [r for r in (_children(client, parents[0].info.run_id) if parents else [])
                if r.data.tags.get("raydllm.status") in ("completed", "stopped_early")]
        if len(done) >= 2:
            finished_before = {r.data.tags["raydllm.trial_id"] for r in done}
            os.killpg(sweep.pid, signal.SIGKILL)
            break
    sweep.wait(timeout=60)
    assert finished_before, "the sweep finished (or stalled) before it could be interrupted"
    return finished_before


@pytest.mark.parametrize("edit, message", [
    ({"fixed": {**TINY_SPACE["fixed"], "jepa.t_low": 0.8, "jepa.t_high": 0.5},
      "space": {"jepa.lambda": {"choice": [1.0]}}}, "jepa.t_low"),
    ({"space": {"jepa.lambda": {"normal": [0, 1]}}}, "space.jepa.lambda.normal"),
    ({"space": {"jepa.k": {"randint": [1, 3]}, "jepa.t_low": {"uniform": [0.1, 0.8]},
                "jepa.t_high": {"uniform": [0.6, 0.9]}}}, "space.jepa.t_low"),
    ({"space": {"jepa.lamda": {"choice": [1.0]}}}, "space.jepa.lamda"),
    ({"space": {"jepa.t_low": {"uniform": [0.1, 0.5]}, "jepa.t_high": {"uniform": [0.45, 0.9]}}},
     "every t_low must be below every t_high"),
    ({"metric": None}, "metric"),
])
def test_invalid_space_file_refused_before_ray(tmp_path, capsys, edit, message):
    spec = {**TINY_SPACE, **edit}
    spec = {k: v for k, v in spec.items() if v is not None}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    import ray

    assert main(["tune", "gsm8k", "--space", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and message in err, err
    assert not ray.is_initialized()


def test_unreachable_tracking_server_reported_before_trials(tmp_path, capsys):
    space = _write_space(tmp_path)
    assert main(["tune", "gsm8k", "--space", str(space), "--tracking-uri", "http://127.0.0.1:9"]) == 2
    assert "cannot reach the MLflow server" in capsys.readouterr().err


@pytest.mark.ray
def test_sweep_killed_and_resumed_every_trial_once_in_mlflow(tmp_path):
    space = _write_space(tmp_path)
    command = [sys.executable, "-m", "raydllm.cli.app", "tune", "gsm8k", "--space", str(space), "--json"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    finished_before = kill_after_two_trials(command, tmp_path, client)

    resumed = _cli(tmp_path, "tune", "gsm8k", "--space", str(space), "--json")  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    outcome = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert outcome["restored"] is True

    from ray.tune import ExperimentAnalysis

    trials = {t.trial_id: t for arm in ("", "-baseline")
              for t in ExperimentAnalysis(str(tmp_path / "raydllm_runs" / (outcome["sweep"] + arm))).trials}
    # the DLLM-JEPA arm and the baseline arm's own search; nothing re-created
    assert len(trials) == TINY_SPACE["num_samples"] + TINY_SPACE["baseline"]["num_samples"]

    parents = _parents(client)
    assert len(parents) == 1
    children = _children(client, parents[0].info.run_id)
    by_trial = {}
    for run in children:
        by_trial.setdefault(run.data.tags["raydllm.trial_id"], []).append(run)
    assert sorted(by_trial) == sorted(trials) and all(len(v) == 1 for v in by_trial.values())
    statuses = []
    for trial_id, (run,) in by_trial.items():
        config = trials[trial_id].config
        assert run.data.tags["raydllm.arm"] == ("baseline" if float(config["jepa.lambda"]) == 0 else "dllm-jepa")
        for key in TINY_SPACE["space"]:
            assert float(run.data.params[key]) == pytest.approx(float(config[key])), (key, run.data.params)
        assert run.info.status == "FINISHED", (trial_id, run.info.status, run.data.tags.get("raydllm.error"))
        statuses.append(run.data.tags["raydllm.status"])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss_total")]
        assert steps == sorted(set(steps)) == list(range(1, max(steps) + 1))  # one continuous curve
        if trial_id in finished_before:  # finished before the kill: its Train run was never started again
            assert "raydllm.resumed_from_step" not in run.data.tags
    # Whether async ASHA stops one of an arm's 4 (or 2) trials depends on which reaches a rung first: on a loaded
    # machine every trial can finish (seen once in two runs); whatever ASHA decided survives the kill.
    assert "completed" in statuses and set(statuses) <= {"completed", "stopped_early"}
    baseline_lrs = {r.data.params["train.lr"] for r in children if r.data.params["jepa.lambda"] == "0.0"}
    # named by what they are; with the paper's fixed rates the baseline searches t_low as well as lr
    assert len(baseline_lrs) >= 1 and all(r.info.run_name.startswith("baseline t_low=") and " lr=" in r.info.run_name
                                          for r in children if r.data.params["jepa.lambda"] == "0.0")

    best = _cli(tmp_path, "best", "gsm8k", "--json")
    assert best.returncode == 0, best.stderr
    report = json.loads(best.stdout.strip().splitlines()[-1])
    assert report["baseline"] is not None and report["best"]
    jepa_values = [r.data.metrics["val_loss_diff"] for r in children if r.data.params["jepa.lambda"] != "0.0"
                   and r.data.tags["raydllm.status"] == "completed"]
    assert report["best"][0]["selection_value"] == pytest.approx(min(jepa_values))  # completed trials only
    assert all(r["stopped_at_rung"] is not None and r["gain"] is None for r in report["stopped"])
    assert report["gain"] is None  # one seed: nothing to measure a gain on
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "summary")}
    assert "summary/metric_vs_params.png" in artifacts


@pytest.mark.ray
def test_sweep_logs_to_mlflow_server_and_best_reads_it_back(tmp_path, shared_ray):
    """A sweep joining a running cluster (RAY_ADDRESS, as on a cluster's head), logging to an MLflow server."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        import requests

        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if requests.get(uri + "/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        space = _write_space(tmp_path, num_samples=2, baseline={"mode": "searched", "num_samples": 1})
        planned = _cli(tmp_path, "tune", "gsm8k", "--space", str(space), "--plan", "--json")
        assert planned.returncode == 0, planned.stderr
        planned = json.loads(planned.stdout.strip().splitlines()[-1])["cases"]
        started = time.monotonic()
        done = _cli(tmp_path, "tune", "gsm8k", "--space", str(space), "--tracking-uri", uri, "--json", env=shared_ray)
        elapsed = time.monotonic() - started
        assert done.returncode == 0, done.stderr[-3000:]
        best = _cli(tmp_path, "best", "gsm8k", "--tracking-uri", uri, "--json")
        assert best.returncode == 0, best.stderr
        report = json.loads(best.stdout.strip().splitlines()[-1])
        client = MlflowClient(uri)
        children = _children(client, report["parent_run_id"])
        assert len(children) == 3 and not (tmp_path / "mlflow.db").exists()  # all of it went to the server
        # `tune --plan` for this local sweep, against what it measured: the wall-clock within 2x of the expected
        # case, the trial steps between half the expected case and the worst case (no early stop).
        steps = sum(max(m.step for m in client.get_metric_history(r.info.run_id, "loss_total")) for r in children)
        assert planned["expected"]["trial_steps"] / 2 <= steps <= planned["worst"]["trial_steps"], (steps, planned)
        assert 0.5 <= elapsed / (3600 * planned["expected"]["wall_clock_hours"]) <= 2, (elapsed, planned)
        winner = min((r for r in children if r.data.params["jepa.lambda"] != "0.0"
                      and r.data.tags["raydllm.status"] == "completed"),
                     key=lambda r: r.data.metrics["val_loss_diff"])
        assert report["best"][0]["run_id"] == winner.info.run_id
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_failed_trial_status_in_mlflow(tmp_path):
    """The driver-side callback marks an errored trial FAILED with its error, whatever killed the trial."""
    from raydllm.sweep import tracking
    from raydllm.sweep.callbacks import TrialStatusCallback

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    run_id, _ = tracking.open_run(uri, "raydllm-gsm8k", key="raydllm.trial_id", name="abc_00001")
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback ...\nFloatingPointError: non-finite loss nan at step 3\n")

    class Trial:
        trial_id, last_result, error_file = "abc_00001", {"step": 2}, str(tmp_path / "error.txt")

    TrialStatusCallback(uri, "raydllm-gsm8k", max_t=8, grace=2, factor=2).error(Trial())
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["raydllm.status"] == "failed"
    assert run.data.tags["raydllm.error"] == "FloatingPointError: non-finite loss nan at step 3"


@pytest.mark.parametrize("space_file", ["search_spaces/gsm8k.yaml", "search_spaces/nlrx.yaml",
                                        "search_spaces/gsm8k-lora.yaml"])
def test_optuna_accepts_the_paper_spaces(space_file):
    """The paper-scale spaces use Optuna TPE (their lambda = 0 baseline runs as its own phase, since Optuna
    cannot warm-start outside its space): the searcher sets up and suggests valid trial configs."""
    from raydllm.sweep.search_space import load_spec, param_space, trial_config
    from raydllm.sweep.tune import _search_alg

    spec = load_spec(space_file, {"data.path": "/data"} if "nlrx" in space_file else None)
    assert spec.search.algorithm == "optuna"
    algorithm = _search_alg(spec)
    assert algorithm.set_search_properties(spec.metric, spec.mode, param_space(spec)) is not False
    for i in range(3):
        suggested = algorithm.suggest(f"trial_{i}")
        if suggested is None:
            continue
        config = trial_config(spec, {k: v for k, v in suggested.items() if k in spec.space}, spec.seeds[0])
        assert config.jepa.t_low < config.jepa.t_high
    # The baseline arm's own TPE search: it suggests only the keys that change the lambda = 0 loss; Tune merges
    # in the space's constants (lambda = 0 and the pinned JEPA-only keys).
    from raydllm.sweep.search_space import baseline_keys, baseline_space

    space = baseline_space(spec)
    baseline = _search_alg(spec)
    assert baseline.set_search_properties(spec.metric, spec.mode, space) is not False
    suggested = baseline.suggest("baseline_0")
    lora = ["model.lora.rank"] if "model.lora.rank" in spec.space else []  # the LoRA space searches its rank
    assert sorted(suggested) == baseline_keys(spec) == sorted(["jepa.t_low", "train.lr", *lora])
    config = trial_config(spec, {**space, **suggested}, spec.seeds[0])
    low, high = spec.space["train.lr"].loguniform
    assert config.jepa.lam == 0 and low <= config.train.lr <= high


def test_asha_grid_reaches_tune_shuffled_and_seeded_fifo_grid_in_order(tmp_path):
    """Async ASHA promotes whoever reaches a rung first: Tune's nested grid order (ascending values) would feed
    it an improving sequence, so an ASHA sweep's grid arrives as one shuffled dimension of whole points (the
    same points, seeded: a resumed sweep sees the same order); a FIFO grid keeps Tune's own dimensions."""
    from raydllm.sweep.search_space import GRID_POINT, flatten_trial_config, load_spec, param_space

    grid = {"jepa.lambda": {"grid": [0.25, 0.5, 1.0, 2.0]}, "train.lr": {"grid": [3.0e-4, 1.0e-3, 2.0e-3, 3.0e-3]},
            "jepa.k": {"randint": [1, 2]}}
    spec = load_spec(_write_space(tmp_path, space=grid, baseline=False, search={"algorithm": "grid", "seed": 0}))
    space = param_space(spec)
    points = space[GRID_POINT]["grid_search"]
    pairs = [(p["jepa.lambda"], p["train.lr"]) for p in points]
    assert sorted(pairs) == sorted((a, b) for a in [0.25, 0.5, 1.0, 2.0] for b in [3.0e-4, 1.0e-3, 2.0e-3, 3.0e-3])
    assert pairs != sorted(pairs) and pairs != sorted(pairs, key=lambda p: (p[1], p[0]))
    assert "jepa.k" in space and "jepa.lambda" not in space  # non-grid dimensions stay Tune's
    assert [(p["jepa.lambda"], p["train.lr"]) for p in param_space(spec)[GRID_POINT]["grid_search"]] == pairs
    trial = flatten_trial_config({GRID_POINT: points[0], "jepa.k": 2, "train.seed": 42})
    assert trial == {**points[0], "jepa.k": 2, "train.seed": 42}
    fifo = load_spec(_write_space(tmp_path, space=grid, baseline=False, scheduler={"type": "fifo", "grace_period": 2}))
    assert GRID_POINT not in param_space(fifo) and "jepa.lambda" in param_space(fifo)


def test_grace_period_inside_the_warmup_warns(tmp_path):
    from raydllm.sweep.search_space import load_spec

    # TINY_SPACE: 8 steps at the local preset's 5% warm-up = 1 step; 40 steps of 25% warm-up = 10 steps.
    with pytest.warns(UserWarning, match="grace_period=2 ends inside the learning-rate warm-up \\(10 steps\\)"):
        load_spec(_write_space(tmp_path, fixed={**TINY_SPACE["fixed"], "train.max_steps": 40,
                                                "train.warmup_ratio": 0.25}))


def test_lora_space_is_one_gpu_per_trial_with_a_lora_baseline():
    """search_spaces/gsm8k-lora.yaml: LLaDA-8B LoRA trials on one GPU each, 8 at once, rank searched; its
    lambda = 0 arm is a LoRA baseline too (the fixed rank), not full fine-tuning."""
    from raydllm.sweep.search_space import baseline_point, load_spec, trial_config

    spec = load_spec("search_spaces/gsm8k-lora.yaml")
    assert spec.resources.workers == 1 and spec.resources.use_gpu and spec.max_concurrent_trials == 8
    assert {"jepa.lambda", "jepa.k", "jepa.t_low", "jepa.t_high", "train.lr", "model.lora.rank"} <= set(spec.space)
    point = baseline_point(spec)
    assert point["jepa.lambda"] == 0 and point["model.lora.rank"] == 16
    cfg = trial_config(spec, point, spec.seeds[0])
    assert cfg.model.name == "GSAI-ML/LLaDA-8B-Base" and cfg.model.lora.rank == 16 and cfg.train.workers == 1
    assert cfg.train.micro_batch_size * cfg.train.grad_accum == 32
def test_baseline_arm_searches_the_keys_that_change_its_loss(tmp_path):
    """Equal terms: the lambda = 0 arm searches every searched key that changes the lambda = 0 loss, with the
    DLLM-JEPA arm's distributions; the JEPA-only keys are pinned. With per-row rates t_low is JEPA-only; with
    the paper's fixed rates it sets L_diff's mask rate and is searched too."""
    from raydllm.sweep.search_space import baseline_arm, baseline_keys, baseline_space, load_spec, param_space

    uniform = load_spec(_write_space(tmp_path, fixed={**TINY_SPACE["fixed"], "jepa.rate_sampling": "uniform"},
                                     baseline={"mode": "searched", "num_samples": 3}))
    assert baseline_keys(uniform) == ["train.lr"]
    assert baseline_arm(uniform).mode == "searched" and baseline_arm(uniform).num_samples == 3
    space = baseline_space(uniform)
    assert space["train.lr"].categories == param_space(uniform)["train.lr"].categories == [1.0e-6, 3.0e-3]
    assert space["jepa.lambda"] == 0.0 and space["jepa.k"] == 1 and space["jepa.t_low"] == 0.2
    assert space["train.seed"] == 42
    fixed = load_spec(_write_space(tmp_path, baseline=True))  # the paper's fixed rates; `baseline: true` still works
    assert baseline_keys(fixed) == ["jepa.t_low", "train.lr"]
    assert baseline_arm(fixed).mode == "searched" and baseline_arm(fixed).num_samples == TINY_SPACE["num_samples"]
    assert "jepa.t_low" in baseline_space(fixed) and baseline_space(fixed)["jepa.t_high"] == 0.7


def test_baseline_pinned_only_where_the_space_fixes_its_keys(tmp_path):
    """The paper's protocol (lr and rates fixed, a lambda x k grid): the baseline is the one point at exactly
    those values. A pinned baseline beside a searched lr is refused before Ray starts."""
    from raydllm.core.config import ConfigError
    from raydllm.sweep.search_space import baseline_arm, baseline_point, load_spec

    grid = {"jepa.lambda": {"choice": [0.5, 1.0]}, "jepa.k": {"choice": [1, 2]}}
    spec = load_spec(_write_space(tmp_path, space=grid, fixed={**TINY_SPACE["fixed"], "train.lr": 2e-3},
                                  baseline=True))
    assert baseline_arm(spec).mode == "pinned"
    point = baseline_point(spec)
    assert point == {"jepa.lambda": 0.0, "jepa.k": 1}
    from raydllm.sweep.search_space import trial_config

    cfg = trial_config(spec, point, 42)
    assert cfg.train.lr == 2e-3 and cfg.jepa.t_low == 0.2 and cfg.jepa.lam == 0.0
    with pytest.raises(ConfigError, match="baseline.mode: pinned, but the space searches jepa.t_low, train.lr"):
        load_spec(_write_space(tmp_path, baseline={"mode": "pinned"}))
    with pytest.raises(ConfigError, match="baseline.mode: searched, but the space searches no key"):
        load_spec(_write_space(tmp_path, space=grid, baseline={"mode": "searched"}))
    with pytest.raises(ConfigError, match="baseline.num_samples"):
        load_spec(_write_space(tmp_path, space=grid, baseline={"mode": "pinned", "num_samples": 2}))
    assert main(["tune", "gsm8k", "--space", str(_write_space(tmp_path, baseline={"mode": "pinned"}))]) == 2


def test_trial_names_say_what_they_are(tmp_path):
    from raydllm.sweep.search_space import baseline_point, load_spec, trial_label

    spec = load_spec(_write_space(tmp_path, fixed={**TINY_SPACE["fixed"], "jepa.rate_sampling": "uniform"}))
    jepa = {"jepa.lambda": 0.5, "jepa.k": 2, "jepa.t_low": 0.181, "jepa.t_high": 0.9, "train.lr": 2.9e-3,
            "train.seed": 42}
    assert trial_label(spec, jepa, "search") == "λ=0.5 k=2 t=0.18/0.90 lr=2.9e-3"
    assert trial_label(spec, {**jepa, "train.seed": 123}, "repeat") == "λ=0.5 k=2 t=0.18/0.90 lr=2.9e-3 seed=123"
    base = baseline_point(spec) | {"train.lr": 1e-3, "train.seed": 42}
    assert trial_label(spec, base, "baseline") == "baseline lr=1e-3"
    fixed = load_spec(_write_space(tmp_path))
    assert trial_label(fixed, baseline_point(fixed) | {"train.lr": 1e-3, "jepa.t_low": 0.25}, "baseline") == \
        "baseline t_low=0.25 lr=1e-3"


@pytest.mark.parametrize("space_file, metric", [("search_spaces/gsm8k.yaml", "accuracy"),
                                                ("search_spaces/nlrx.yaml", "functional_equivalence"),
                                                ("search_spaces/django.yaml", "prefix_match"),
                                                ("search_spaces/spider.yaml", "execution_match")])
def test_paper_spaces_select_on_the_task_metric(space_file, metric):
    """The paper spaces select on the task's own validation metric from generation (val_accuracy holds the
    task's primary metric), with the baseline searched over lr and t_low like the DLLM-JEPA arm."""
    from raydllm.sweep.search_space import base_raw, baseline_arm, baseline_keys, load_spec
    from raydllm.core.config import validate
    from raydllm.data.tasks import get_task

    spec = load_spec(space_file, None if "gsm8k" in space_file else {"data.path": "/data"})
    base = validate(base_raw(spec))
    assert spec.metric == "val_accuracy" and spec.mode == "max" and base.eval.metric == "accuracy"
    assert get_task(spec.task).primary_metric == metric
    assert baseline_arm(spec).mode == "searched" and baseline_keys(spec) == ["jepa.t_low", "train.lr"]
    assert spec.repeat.top >= 1 and spec.fresh_seeds


def test_dream_space_reports_with_dreams_own_sampler():
    """search_spaces/gsm8k-dream.yaml: Dream-7B, Dream's diffusion_generate settings for GSM8K in the reports
    (256 tokens, 256 steps, entropy), the gsm8k space's arms, budgets and rows; selection on the validation loss
    (no generation at the rungs: Dream's sampler costs a forward per token)."""
    from raydllm.core.config import validate
    from raydllm.sweep.search_space import base_raw, baseline_arm, load_spec, trial_config

    dream, llada = load_spec("search_spaces/gsm8k-dream.yaml"), load_spec("search_spaces/gsm8k.yaml")
    cfg = validate(base_raw(dream))
    assert cfg.model.name == "Dream-org/Dream-v0-Base-7B" and cfg.eval.sampler == "dream"
    assert (cfg.eval.gen_length, cfg.eval.sampler_steps, cfg.eval.dream_algorithm) == (256, 256, "entropy")
    assert dream.metric == "val_loss_diff" and cfg.eval.metric == "loss"
    assert (dream.space, dream.num_samples, baseline_arm(dream), dream.seeds) == \
        (llada.space, llada.num_samples, baseline_arm(llada), llada.seeds)
    assert cfg.data.val_fraction == validate(base_raw(llada)).data.val_fraction
    trial = trial_config(dream, {"jepa.lambda": 1.0, "train.lr": 1e-5}, seed=42)
    assert trial.eval.sampler == "dream" and trial.jepa.lam == 1.0
