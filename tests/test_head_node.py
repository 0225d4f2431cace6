"""What runs on a cluster node: node_setup.py (setup's GPU check, the NVMe staging folder), `raydllm tune` typed
on a head node joining the cluster there, and where a command's log and its failure reason go (no Ray started)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from raydllm.sweep import node_setup
from raydllm.sweep.node_setup import SetupError, check_gpus_visible, gpu_count, staging_plan

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "raydllm" / "sweep" / "node_setup.py"


# --- setup's GPU check ----------------------------------------------------------------------------------------

def test_gpu_count_reads_nvidia_smi_list():
    listing = "GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-a)\nGPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-b)\n"
    assert gpu_count(listing) == 2
    assert gpu_count("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n") == 0


def test_gpu_node_whose_container_sees_no_gpu_is_refused():
    with pytest.raises(SetupError, match="host has 8 GPUs but its container sees 0"):
        check_gpus_visible("8", 0)
    with pytest.raises(SetupError, match="RAYDLLM_HOST_GPUS='eight': not a GPU count"):
        check_gpus_visible("eight", 0)
    assert "8 of the host's 8 GPUs" in check_gpus_visible("8", 8)
    assert "0 of the host's 0 GPUs" in check_gpus_visible("0", 0)  # the CPU head
    assert "not checked" in check_gpus_visible(None, 0)


def _fake_nvidia_smi(tmp_path: Path, gpus: int) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "nvidia-smi"
    tool.write_text("#!/bin/sh\n" + "".join(f'echo "GPU {i}: NVIDIA A100 (UUID: GPU-{i})"\n' for i in range(gpus)))
    tool.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_setup_command_exits_non_zero_with_one_line(tmp_path):
    """The script as setup_commands runs it (standard library only, not installed): exit 1 and one line."""
    env = _fake_nvidia_smi(tmp_path, gpus=0)
    done = subprocess.run([sys.executable, "-I", str(SCRIPT), "gpus"], env={**env, "RAYDLLM_HOST_GPUS": "8"},
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "raydllm node setup: error: this node's host has 8 GPUs but its container sees 0: the NVIDIA container "
        "runtime is missing or broken; refusing to set the node up (it would advertise GPUs that trials cannot use)"]
    (tmp_path / "ok").mkdir()
    seen = subprocess.run([sys.executable, "-I", str(SCRIPT), "gpus"], capture_output=True, text=True,
                          env={**_fake_nvidia_smi(tmp_path / "ok", gpus=8), "RAYDLLM_HOST_GPUS": "8"})
    assert seen.returncode == 0 and "8 of the host's 8 GPUs visible" in seen.stdout


# --- checkpoint staging on the instance store -------------------------------------------------------------------

def _fake_host(tmp_path: Path, devices: dict[str, str], mounted: dict[str, str]) -> tuple[Path, Path]:
    """/sys/block with nvme devices (name -> model) and /proc/mounts with `mounted` (device -> mount point)."""
    sys_block = tmp_path / "sys" / "block"
    for name, model in devices.items():
        (sys_block / name / "device").mkdir(parents=True)
        (sys_block / name / "device" / "model").write_text(model + "          \n")
    proc_mounts = tmp_path / "mounts"
    proc_mounts.write_text("".join(f"{dev} {point} ext4 rw 0 0\n" for dev, point in
                                   {"/dev/nvme0n1p1": "/", **mounted}.items()))
    return sys_block, proc_mounts


EBS = "Amazon Elastic Block Store"
STORE = node_setup.INSTANCE_STORE_MODEL
P4DE = {"nvme0n1": EBS, **{f"nvme{i}n1": STORE for i in range(1, 9)}}


def test_p4de_with_its_drives_unmounted_formats_the_first(tmp_path):
    assert staging_plan(*_fake_host(tmp_path, P4DE, {})) == ("/dev/nvme1n1", "/opt/dlami/nvme")


def test_drive_the_ami_mounted_is_used_as_it_is(tmp_path):
    assert staging_plan(*_fake_host(tmp_path, P4DE, {"/dev/md0": "/opt/dlami/nvme"})) == (None, "/opt/dlami/nvme")
    assert staging_plan(*_fake_host(tmp_path / "b", P4DE, {"/dev/nvme3n1": "/data"})) == (None, "/data")


def test_node_without_instance_store_stages_on_its_root_volume(tmp_path):
    # the m5 head: only its EBS root volume, which is an NVMe device too on Nitro instances
    assert staging_plan(*_fake_host(tmp_path, {"nvme0n1": EBS}, {})) == (None, None)


def test_local_folder_without_instance_store_is_a_plain_folder(tmp_path):
    link = tmp_path / "mnt" / "raydllm-local"
    owner = f"{os.getuid()}:{os.getgid()}"
    where = node_setup.prepare_local_folder(link, owner, *_fake_host(tmp_path, {"nvme0n1": EBS}, {}),
                                            default_mount=str(tmp_path / "nvme"))
    assert where == str(link) and link.is_dir() and not link.is_symlink()


def test_local_folder_links_to_the_mounted_instance_store(tmp_path):
    link, nvme = tmp_path / "mnt" / "raydllm-local", tmp_path / "nvme"
    nvme.mkdir()
    sys_block, mounts = _fake_host(tmp_path, P4DE, {"/dev/md0": str(nvme)})
    where = node_setup.prepare_local_folder(link, f"{os.getuid()}:{os.getgid()}", sys_block, mounts,
                                            default_mount=str(nvme))
    assert link.is_symlink() and where == str(nvme / "raydllm")


# --- `raydllm tune` typed on a head node ------------------------------------------------------------------------

@pytest.fixture
def ray_temp(tmp_path, monkeypatch):
    """Ray's default temp folder moved here (RAY_TMPDIR), so no other Ray on this machine is seen."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray"


def test_typed_on_a_head_node_it_joins_the_running_cluster(ray_temp):
    from raydllm.sweep.train import ray_init_address, running_cluster_address, starts_local_cluster

    with socket.socket() as gcs:  # a GCS port that answers
        gcs.bind(("127.0.0.1", 0))
        gcs.listen()
        address = f"127.0.0.1:{gcs.getsockname()[1]}"
        (ray_temp / "ray_current_cluster").write_text(address + "\n")
        assert running_cluster_address() == address
        assert ray_init_address() == "auto"
        assert not starts_local_cluster()  # so the "0 GPUs on this machine" refusal does not apply
    # the head stopped without `ray stop` removing the file: a stale address is not joined
    assert running_cluster_address() is None
    assert ray_init_address() == "local" and starts_local_cluster()


def test_no_cluster_here_starts_a_local_one_and_ray_address_wins(ray_temp, monkeypatch):
    from raydllm.sweep.train import ray_init_address, starts_local_cluster

    assert ray_init_address() == "local" and starts_local_cluster()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ray_init_address() == "10.0.0.5:6379" and not starts_local_cluster()


# --- logs ---------------------------------------------------------------------------------------------------

def test_log_file_is_a_real_local_folder_when_storage_is_s3(tmp_path, monkeypatch):
    from raydllm.cli.common import log_file_for

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAYDLLM_STORAGE", "s3://bucket/raydllm")
    assert log_file_for(None, "sweep-a") == tmp_path / "raydllm_runs" / "sweep-a" / "raydllm.log"
    assert log_file_for("s3://other/x", "sweep-a") == tmp_path / "raydllm_runs" / "sweep-a" / "raydllm.log"
    monkeypatch.setenv("RAYDLLM_STORAGE", str(tmp_path / "runs"))
    assert log_file_for(None, "b") == tmp_path / "runs" / "b" / "raydllm.log"
    monkeypatch.chdir(tmp_path)
    assert log_file_for("rel", "c") == tmp_path / "rel" / "c" / "raydllm.log"  # absolute, as the note prints it


FAILING_COMMAND = """
import sys
from raydllm.cli import app
from raydllm.cli.common import CONSOLE

def cmd_tune(args):
    CONSOLE.quiet(__import__("pathlib").Path(sys.argv[1]) / "raydllm.log")
    raise RuntimeError("the store said no\\nsecond line: disk full")

app.cmd_tune = cmd_tune
sys.exit(app.main(["tune", "gsm8k"]))
"""


@pytest.mark.parametrize("under_job", [False, True], ids=["terminal", "ray-job"])
def test_unexpected_failure_reason_reaches_stderr(tmp_path, under_job):
    """A quiet command's unexpected failure: one line on stderr, the traceback in the log file; under
    `ray job submit` (what `ray job logs` shows is the driver's stderr) the traceback goes to stderr too."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_JOB_CONFIG_JSON_ENV_VAR"}
    if under_job:
        env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = '{"runtime_env": {}, "metadata": {}}'
    done = subprocess.run([sys.executable, "-c", FAILING_COMMAND, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert f"raydllm: error: RuntimeError: second line: disk full (the traceback is in {tmp_path}/raydllm.log)" \
        in done.stderr.splitlines()
    assert "Traceback" in (tmp_path / "raydllm.log").read_text()
    assert ("Traceback (most recent call last)" in done.stderr) is under_job
