"""The 8B checkpoint policy: checkpoints at ASHA's rungs and the end, stopped trials' checkpoints deleted,
staging on the node's local disk."""
import pytest

from raydllm.checkpoints import LOCAL_DIR_ENV, folder_bytes, staging_dir
from raydllm.tune import delete_checkpoints, rung_steps


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
