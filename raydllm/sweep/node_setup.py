"""Sweep layer: checks and preparation a cluster node runs while `ray up` (or the autoscaler) sets it up, before raydllm and
its dependencies are installed: standard library only, run as a script from the mounted checkout
(`python3 ~/raydllm/raydllm/sweep/node_setup.py ...`, see cluster.yaml).

  gpus     inside the container: refuse a node whose container sees fewer GPUs than its host has (the host's
           count comes in as RAYDLLM_HOST_GPUS, set by the docker run options). Without this, setup would install
           the CPU build of torch and the node would still advertise its GPUs: trials land there and fail late.
  local    on the host, as root: the node-local folder the container gets as RAYDLLM_LOCAL_DIR (checkpoints are
           staged there before upload) at a fixed path (--link): a link to a folder on the instance's NVMe
           instance store (a p4de has eight drives), mounted first if the AMI has not; a plain folder on the
           root volume when the instance has none. The SSH user owns it (the container's user has its uid).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HOST_GPUS_ENV = "RAYDLLM_HOST_GPUS"
INSTANCE_STORE_MODEL = "Amazon EC2 NVMe Instance Storage"  # /sys/block/nvme*/device/model of an instance store
DEFAULT_MOUNT = "/opt/dlami/nvme"  # where the Deep Learning AMIs mount it; raydllm's checkpoints look there too
NVME_FOLDER = "raydllm"


class SetupError(Exception):
    """The node cannot serve trials; the message is the one line setup prints before it exits non-zero."""


def gpu_count(nvidia_smi_list: str) -> int:
    """GPUs in the output of `nvidia-smi -L` (one 'GPU n: ...' line each; error text counts none)."""
    return sum(1 for line in nvidia_smi_list.splitlines() if line.startswith("GPU "))


def container_gpus() -> int:
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return gpu_count(listing)


def check_gpus_visible(host_gpus: str | None, visible: int) -> str:
    """One line on what was checked; raises SetupError when the container sees fewer GPUs than the host."""
    if host_gpus is None or not host_gpus.strip():
        return f"{HOST_GPUS_ENV} is not set (no container, or run options without it): GPU visibility not checked"
    try:
        expected = int(host_gpus)
    except ValueError:
        raise SetupError(f"{HOST_GPUS_ENV}={host_gpus!r}: not a GPU count") from None
    if visible < expected:
        raise SetupError(f"this node's host has {expected} GPUs but its container sees {visible}: the NVIDIA "
                         f"container runtime is missing or broken; refusing to set the node up (it would "
                         f"advertise GPUs that trials cannot use)")
    return f"{visible} of the host's {expected} GPUs visible in the container"


def instance_store_devices(sys_block: Path) -> list[str]:
    """Device names (nvme1n1, ...) of the instance-store NVMe drives, in name order."""
    found = []
    for device in sorted(sys_block.glob("nvme*")):
        model = device / "device" / "model"
        if model.is_file() and model.read_text().strip() == INSTANCE_STORE_MODEL:
            found.append(device.name)
    return found


def mounts(proc_mounts: Path) -> dict[str, str]:
    """Mounted device path -> mount point, from /proc/mounts."""
    table = {}
    for line in proc_mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2:
            table[fields[0]] = fields[1].replace("\\040", " ")
    return table


def staging_plan(sys_block: Path, proc_mounts: Path, default_mount: str = DEFAULT_MOUNT) -> tuple[str | None, str | None]:
    """(device to format and mount at default_mount or None, mount point to stage under or None).
    An instance-store drive already mounted (the Deep Learning AMIs mount one, or a RAID of all, at
    /opt/dlami/nvme) is used as it is; otherwise the first drive is formatted and mounted. A 144 GB save needs
    one drive; that drive writes several times faster than gp3's default 125 MB/s."""
    devices = instance_store_devices(sys_block)
    table = mounts(proc_mounts)
    if default_mount in table.values():
        return None, default_mount
    for name in devices:
        if f"/dev/{name}" in table:
            return None, table[f"/dev/{name}"]
    if devices:
        return f"/dev/{devices[0]}", default_mount
    return None, None


def prepare_local_folder(link: Path, owner: str, sys_block: Path = Path("/sys/block"),
                         proc_mounts: Path = Path("/proc/mounts"), default_mount: str = DEFAULT_MOUNT) -> str:
    """Carry out staging_plan (as root): `link` becomes a link to <NVMe mount>/raydllm, or a plain folder
    when there is no instance store; either is owned by `owner` (uid:gid). Returns what `link` resolves to."""
    device, mount_point = staging_plan(sys_block, proc_mounts, default_mount)
    uid, _, gid = owner.partition(":")
    if device is not None:
        os.makedirs(mount_point, exist_ok=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True)
        subprocess.run(["mount", "-o", "noatime", device, mount_point], check=True)
    if link.is_symlink():
        link.unlink()
    if mount_point is not None:
        target = Path(mount_point, NVME_FOLDER)
        target.mkdir(exist_ok=True)
        os.chown(target, int(uid), int(gid or uid))
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    else:
        link.mkdir(parents=True, exist_ok=True)
        os.chown(link, int(uid), int(gid or uid))
    return str(link.resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="node_setup.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("gpus", help="fail when the container sees fewer GPUs than RAYDLLM_HOST_GPUS")
    local = sub.add_parser("local", help="make --link the node-local folder (on the NVMe instance store if any)")
    local.add_argument("--link", required=True, type=Path, help="the fixed host path the container mounts")
    local.add_argument("--owner", required=True, help="uid:gid that owns the folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "gpus":
            print(f"raydllm node setup: {check_gpus_visible(os.environ.get(HOST_GPUS_ENV), container_gpus())}")
        else:
            where = prepare_local_folder(args.link, args.owner)
            print(f"raydllm node setup: node-local folder {args.link} -> {where}")
    except SetupError as exc:
        print(f"raydllm node setup: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
