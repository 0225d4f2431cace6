"""`raydllm train` for real: a Ray Train TorchTrainer with two DeepSpeed ZeRO-2 CPU workers, logged to MLflow."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.ray

TINY = ["--set", "model.init=random", "--set", "model.d_model=64", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
        "--set", "data.synthetic_size=800", "--set", "data.val_limit=32", "--set", "train.micro_batch_size=8",
        "--set", "train.lr=3e-3", "--set", "eval.final=false"]


def _train(workdir: Path, *args: str, timeout: int = 400, env: dict | None = None) -> dict:
    """`raydllm train` in a subprocess: on its own local Ray, or on the cluster `env`'s RAY_ADDRESS names."""
    cmd = [sys.executable, "-m", "raydllm.cli.app", "train", "gsm8k", "--preset", "local", "--json", *TINY, *args]
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _history(workdir: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_train_two_deepspeed_workers_both_losses_fall(tmp_path, shared_ray):
    result = _train(tmp_path, "--set", "train.max_steps=30", "--set", "train.eval_every=10",
                    "--set", "eval.final=true", "--set", "eval.final_limit=8", "--set", "eval.probe_chunks=4",
                    env=shared_ray)
    assert result["step"] == 30
    checkpoint = Path(result["checkpoint"])
    # Two ZeRO ranks each saved their optimizer shard: DeepSpeed ran on both workers.
    shards = sorted(p.name for p in checkpoint.rglob("zero_pp_rank_*optim_states.pt"))
    assert len(shards) == 2, shards
    assert (checkpoint / "ema.pt").exists()
    diff = [v for _, v in _history(tmp_path, result["run_id"], "loss_diff")]
    jepa = [v for _, v in _history(tmp_path, result["run_id"], "loss_jepa")]
    assert len(diff) == 30 and len(jepa) == 30
    assert sum(diff[-5:]) < 0.8 * sum(diff[:5]), diff
    assert sum(jepa[-5:]) < sum(jepa[:5]), jepa
    val = _history(tmp_path, result["run_id"], "val_loss_diff")
    assert [s for s, _ in val] == [10, 20, 30] and val[-1][1] < val[0][1]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["jepa.lambda"] == "1.0"
    assert run.data.tags["raydllm.checkpoint"] == result["checkpoint"]
    # End-of-run evaluation and probes land in the run, with the sampler settings as params.
    metrics = run.data.metrics
    assert metrics["final/val/0shot/n"] == 8 and 0.0 <= metrics["final/val/0shot/accuracy"] <= 1.0
    assert {"probe/wikitext_delta", "probe/drift_early", "probe/z_eff_rank"} <= set(metrics)
    assert "eval.gen_length" in run.data.params


def test_baseline_reports_no_jepa_loss_and_checkpoints_every_other_report(tmp_path, shared_ray):
    result = _train(tmp_path, "--set", "train.max_steps=6", "--set", "train.eval_every=2",
                    "--set", "train.checkpoint_every=4", "--set", "jepa.lambda=0", env=shared_ray)
    assert "loss_jepa" not in result and result["step"] == 6
    assert _history(tmp_path, result["run_id"], "loss_jepa") == []
    assert not list(Path(result["checkpoint"]).rglob("ema.pt"))  # no EMA copy exists at lambda = 0
    # Reports at 2, 4, 6; checkpoints only at 4 and at the end; each phase's time is logged.
    assert sorted(_saved_steps(Path(result["checkpoint"]).parent)) == [4, 6]
    assert [s for s, _ in _history(tmp_path, result["run_id"], "val_loss_diff")] == [2, 4, 6]
    assert [s for s, _ in _history(tmp_path, result["run_id"], "time/checkpoint_s")] == [4, 6]
    eval_s = _history(tmp_path, result["run_id"], "time/eval_s")
    assert [s for s, _ in eval_s] == [2, 4, 6] and 0 < eval_s[0][1] < eval_s[-1][1]
    startup = {k: _history(tmp_path, result["run_id"], f"time/startup{k}")[0][1] for k in ("_s", "/ray_s", "/init_s")}
    assert startup["_s"] == pytest.approx(startup["/ray_s"] + startup["/init_s"], abs=0.5)


def _saved_steps(storage: Path) -> list[int]:
    """Steps of the checkpoints on disk; one still being written is skipped."""
    steps = []
    for path in storage.glob("checkpoint_*/raydllm.json"):
        try:
            steps.append(json.loads(path.read_text())["step"])
        except (OSError, ValueError, KeyError):
            pass
    return steps


def _registered_step(storage: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has registered (checkpoint_manager_snapshot.json)."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@pytest.mark.joins_shared_ray
def test_killed_run_resumes_at_its_checkpoint_with_same_weights(tmp_path, request):
    steps = ["--set", "train.max_steps=8", "--set", "train.eval_every=2"]
    # The victim on a cluster of its own, which the kill takes down with its driver (a head lost with the run),
    # and its resumption on another; only then the uninterrupted reference, on the shared cluster, so that no two
    # Ray instances run at once (tests/conftest.py).
    cmd = [sys.executable, "-m", "raydllm.cli.app", "train", "gsm8k", "--preset", "local", "--json", *TINY, *steps,
           "--name", "victim"]
    victim = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    storage = tmp_path / "raydllm_runs" / "victim"
    deadline = time.time() + 300
    killed_after = None
    while time.time() < deadline and victim.poll() is None:
        steps_saved = _saved_steps(storage)
        if steps_saved and max(steps_saved) >= 4:
            killed_after = max(steps_saved)
            os.killpg(victim.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
            break
        time.sleep(0.2)
    victim.wait(timeout=60)
    assert killed_after is not None and killed_after < 8, "the run ended before it could be killed"

    resumed = _train(tmp_path, *steps, "--name", "victim")
    reference = _train(tmp_path, *steps, "--name", "reference", env=request.getfixturevalue("shared_ray"))
    assert resumed["resumed"] is True and resumed["step"] == 8
    assert resumed["val_loss_diff"] == pytest.approx(reference["val_loss_diff"], rel=1e-6, abs=1e-7)
    assert resumed["loss_total"] == pytest.approx(reference["loss_total"], rel=1e-6, abs=1e-7)
    # One MLflow run, one continuous curve: every step exactly once.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("raydllm-gsm8k").experiment_id],
                              filter_string="tags.`raydllm.run_name` = 'victim'")
    assert len(runs) == 1 and runs[0].info.run_id == resumed["run_id"]
    assert [s for s, _ in _history(tmp_path, resumed["run_id"], "loss_total")] == list(range(1, 9))


def test_killed_worker_process_restarts_from_last_checkpoint(tmp_path):
    """FailureConfig(max_failures=1): a Ray Train worker killed mid-run is replaced, the run resumes from its
    last checkpoint (not from step 0) and its MLflow run shows one continuous curve."""
    import psutil

    cmd = [sys.executable, "-m", "raydllm.cli.app", "train", "gsm8k", "--preset", "local", "--json", *TINY,
           "--set", "train.max_steps=10", "--set", "train.eval_every=2", "--set", "train.max_failures=1",
           "--name", "worker-fault"]
    run = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           start_new_session=True)
    storage = tmp_path / "raydllm_runs" / "worker-fault"
    registered = None
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None and registered is None:
        # Kill once Ray Train has *registered* a checkpoint at step >= 4 (its checkpoint manager snapshot):
        # a checkpoint folder on disk is not yet one that a restarted worker group is handed.
        step = _registered_step(storage)
        if step is not None and step >= 4:
            # Only this run's workers (descendants of its driver): another Ray on the machine, or an orphan
            # of an earlier test, must not be the one killed.
            workers = [p for p in psutil.Process(run.pid).children(recursive=True)
                       if "RayTrainWorker" in " ".join(p.cmdline())]
            if workers:
                workers[0].kill()
                registered = step
        time.sleep(0.2)
    out, _ = run.communicate(timeout=400)
    assert run.returncode == 0 and registered is not None and registered < 10
    result = json.loads(out.strip().splitlines()[-1])
    assert result["step"] == 10
    # The restarted worker group resumed from a checkpoint it had saved, not from step 0, and the MLflow run
    # shows every step once.
    tags = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result["run_id"]).data.tags
    assert registered <= int(tags["raydllm.resumed_from_step"]) < 10, (registered, tags)
    assert [s for s, _ in _history(tmp_path, result["run_id"], "loss_total")] == list(range(1, 11))


def test_unwritable_storage_reported_before_training(tmp_path, capsys):
    from raydllm.cli.app import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["train", "gsm8k", "--storage", str(blocker / "runs"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    err = capsys.readouterr().err
    assert "--storage" in err and "not writable" in err


def test_full_disk_reported_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from raydllm.core.config import ConfigError
    from raydllm.sweep.train import check_storage

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10 << 30, (10 << 30) - (5 << 20), 5 << 20))
    with pytest.raises(ConfigError, match="only 5 MiB free"):
        check_storage(str(tmp_path))


def test_nan_loss_fails_the_run_with_a_clear_status(tmp_path, shared_ray):
    """An exploding learning rate: the loss turns NaN, the run stops at once and MLflow says why."""
    cmd = [sys.executable, "-m", "raydllm.cli.app", "train", "gsm8k", "--preset", "local", "--json", *TINY,
           "--set", "train.max_steps=20", "--set", "train.eval_every=10", "--set", "train.lr=1e30",
           "--set", "train.grad_clip=0", "--set", "train.warmup_ratio=0", "--workers", "1"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400, env=shared_ray)
    assert done.returncode != 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raydllm-gsm8k").experiment_id])
    assert run.info.status == "FAILED"
    assert "non-finite loss" in run.data.tags["raydllm.error"]
