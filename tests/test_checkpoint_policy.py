"""The 8B checkpoint policy: checkpoints at ASHA's rungs and the end, stopped trials' checkpoints deleted,
staging on the node's local disk."""
import pytest

from raydllm.engine.checkpoints import LOCAL_DIR_ENV, folder_bytes, staging_dir
from raydllm.sweep.callbacks import delete_checkpoints
from raydllm.sweep.search_space import rung_steps


@pytest.mark.parametrize("max_t,grace,factor", [(444, 74, 3), (135, 10, 4), (40, 5, 2), (100, 10, 3)])
def test_rung_steps_are_ashas_milestones(max_t, grace, factor):
    from ray.tune.schedulers import ASHAScheduler

    asha = ASHAScheduler(time_attr="step", max_t=max_t, grace_period=grace, reduction_factor=factor)
    assert rung_steps(grace, factor, max_t) == sorted(int(r[0]) for r in asha._brackets[0]._rungs)


def test_delete_checkpoints_keeps_everything_else(tmp_path):
    run = tmp_path / "train-abc"
    for name in ("checkpoint_2026-01-01_00-00-00.000000", "checkpoint_2026-01-01_00-01-00.000000"):
        (run / name / "engine").mkdir(parents=True)
        (run / name / "engine" / "x.pt").write_bytes(b"0" * 10)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    assert folder_bytes(run) == 22
    assert delete_checkpoints(str(run)) == 2
    assert [p.name for p in run.iterdir()] == ["checkpoint_manager_snapshot.json"]
    assert delete_checkpoints(str(tmp_path / "missing")) == 0


def test_staging_dir_prefers_the_local_disk(tmp_path, monkeypatch):
    monkeypatch.setenv(LOCAL_DIR_ENV, str(tmp_path))
    assert staging_dir() == str(tmp_path / "raydllm-staging")
    monkeypatch.setenv(LOCAL_DIR_ENV, str(tmp_path / "absent"))
    assert staging_dir() in (None, "/opt/dlami/nvme/raydllm-staging")


@pytest.mark.ray
def test_rung_checkpoints_async_upload_export_and_bytes(tmp_path):
    """A real `raydllm train` (2 DeepSpeed workers): checkpoints only at the report after each listed step and
    at the end, staged under RAYDLLM_LOCAL_DIR and uploaded asynchronously (the staged copies are gone
    after), the final one with the weights-only export, and checkpoint/bytes logged at each save."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    staging = tmp_path / "nvme"
    staging.mkdir()
    cmd = [sys.executable, "-m", "raydllm.cli.app", "train", "gsm8k", "--preset", "local", "--json",
           *[a for kv in ["model.init=random", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                          "data.synthetic_size=200", "data.val_limit=16", "train.micro_batch_size=4",
                          "eval.final=false", "jepa.lambda=0", "train.max_steps=6", "train.eval_every=2",
                          "train.checkpoint_steps=[3]", "train.checkpoint_upload=async"] for a in ("--set", kv)]]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=500,
                          env=dict(os.environ, **{LOCAL_DIR_ENV: str(staging)}))
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    run_folder = Path(result["checkpoint"]).parent
    saved = sorted(json.loads(p.read_text())["step"] for p in run_folder.glob("checkpoint_*/raydllm.json"))
    assert saved == [4, 6]  # the report after step 3, and the end
    final = Path(result["checkpoint"])
    assert (final / "export" / "config.json").is_file() and (final / "export" / "model.safetensors").is_file()
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(result["run_id"],
                                                                                     "checkpoint/bytes")
    written = sorted((m.step, m.value) for m in history)
    assert [s for s, _ in written] == [4, 6] and 0 < written[0][1] < written[1][1]
    assert json.loads((final / "raydllm.json").read_text())["checkpoint_bytes"] == written[1][1]
    assert not any((staging / "raydllm-staging").iterdir())  # Ray deleted the staged copies after uploading


def test_status_callback_deletes_a_stopped_trials_checkpoints_and_keeps_a_finished_ones(tmp_path):
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from raydllm.sweep.callbacks import TrialStatusCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("raydllm-gsm8k", artifact_location=(tmp_path / "artifacts").as_uri())
    storage = tmp_path / "sweep" / "train"
    runs = {}
    for trial_id in ("stopped", "finished"):
        runs[trial_id] = client.create_run(experiment, tags={"raydllm.trial_id": trial_id}).info.run_id
        (storage / f"train-{trial_id}" / "checkpoint_000001" / "export").mkdir(parents=True)
    status = TrialStatusCallback(uri, "raydllm-gsm8k", max_t=40, grace=10, factor=2, train_storage=str(storage))
    status.complete(SimpleNamespace(trial_id="stopped", last_result={"step": 10}))
    status.complete(SimpleNamespace(trial_id="finished", last_result={
        "step": 40, "checkpoint_path": str(storage / "train-finished" / "checkpoint_000001")}))
    assert not list((storage / "train-stopped").iterdir())
    assert (storage / "train-finished" / "checkpoint_000001" / "export").is_dir()
    stopped, finished = (client.get_run(runs[t]).data.tags for t in ("stopped", "finished"))
    assert stopped["raydllm.status"] == "stopped_early" and stopped["raydllm.checkpoints_deleted"] == "1"
    assert finished["raydllm.status"] == "completed" and finished["raydllm.checkpoint"].endswith("checkpoint_000001")
