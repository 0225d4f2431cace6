"""Sweep layer: node launches the autoscaler tried and failed (quota, InsufficientInstanceCapacity, ...), for the
progress view. Without them a sweep whose GPU nodes cannot start only shows its trials pending.

The source is what `ray status` prints under "Pending"/"Recent failures": the autoscaling state the autoscaler
reports to the GCS, read with `ray.autoscaler.v2.sdk.get_cluster_status` (its `failed_launches`: node type,
instance type, count, when, and the cloud's reason). A cluster whose autoscaler reports no such state (none at
all, Slurm, a fixed allocation) simply has no failures to show.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def failure_key(launch) -> tuple:
    return (launch.ray_node_type_name, launch.instance_type_name, launch.failed_ts_s or launch.request_ts_s,
            launch.details or "")


def failure_line(launch) -> str:
    """One line for one failed launch, e.g. `launch failed 12:03:10: 1 x p4de.24xlarge (gpu_a100_80gb):
    InsufficientInstanceCapacity ...` (the reason's first line, as long as it fits a terminal)."""
    when = launch.failed_ts_s or launch.request_ts_s
    stamp = time.strftime("%H:%M:%S", time.localtime(when)) if when else "?"
    details = (launch.details or "").strip()
    reason = details.splitlines()[0] if details else "no reason given"
    if len(reason) > 200:
        reason = reason[:197] + "..."
    return (f"launch failed {stamp}: {launch.count} x {launch.instance_type_name or '?'} "
            f"({launch.ray_node_type_name or '?'}): {reason}")


def new_failures(status, seen: set, since_s: float) -> list[str]:
    """Lines for the failed launches in `status` (a ClusterStatus) not in `seen` and not older than `since_s`
    (failures before this sweep started are another sweep's); adds them to `seen`."""
    lines = []
    for launch in sorted(status.failed_launches, key=lambda l: l.failed_ts_s or l.request_ts_s or 0):
        key = failure_key(launch)
        if key in seen or (key[2] and key[2] < since_s):
            continue
        seen.add(key)
        lines.append(failure_line(launch))
    return lines


class LaunchWatch:
    """Polls the autoscaler's state at most every `every_s` seconds; plain data, so it pickles with Tune's
    callbacks. Gives up (silently, after one debug line) on a cluster that does not answer."""

    def __init__(self, gcs_address: str | None, *, every_s: float = 30.0, since_s: float | None = None):
        self.gcs_address, self.every_s = gcs_address, every_s
        self.since_s = time.time() if since_s is None else since_s
        self.seen: set = set()
        self.last_poll = 0.0
        self.working = bool(gcs_address)

    def poll(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        if not self.working or now - self.last_poll < self.every_s:
            return []
        self.last_poll = now
        try:
            from ray.autoscaler.v2.sdk import get_cluster_status

            status = get_cluster_status(self.gcs_address, timeout=5)
        except Exception as exc:  # noqa: BLE001 - no autoscaler state on this cluster: nothing to show
            log.debug("autoscaler status unavailable at %s: %s", self.gcs_address, exc)
            self.working = False
            return []
        return new_failures(status, self.seen, self.since_s)


def current_gcs_address() -> str | None:
    """The GCS address of the Ray this driver is connected to (None when none is)."""
    import ray

    if not ray.is_initialized():
        return None
    return ray.get_runtime_context().gcs_address
