"""A real Ray autoscaler on one machine: Ray's ``fake_multinode`` node provider.

`ray start --head --autoscaling-config=<yaml>` with ``RAY_FAKE_CLUSTER=1`` starts the ordinary (v1) autoscaler
monitor on the head; with ``provider.type: fake_multinode`` it "launches" a worker node by starting another raylet
process on this machine (``ray/autoscaler/_private/fake_multi_node/node_provider.py``) and "terminates" it by
killing that raylet. Scale-up and idle scale-down are decided by the same autoscaler code a cloud cluster runs.

Facts that shaped this helper (Ray 2.60.0):

* The wheel does not ship ``fake_multi_node/example.yaml``, so ``AutoscalingCluster`` from ``ray.cluster_utils``
  and anything that calls ``prepare_config`` on a ``fake_multinode`` config fail with FileNotFoundError. The v1
  monitor reads the YAML as-is (``StandardAutoscaler.reset`` -> ``yaml.safe_load``), so the config written here
  is complete: every top-level key that ``example.yaml`` in the Ray repo has.
* Autoscaler v2 (``RAY_enable_autoscaler_v2=1``, which ``ray up`` turns on since 2.50) runs ``prepare_config``
  and so cannot use ``fake_multinode`` from the wheel; a plain ``ray start`` uses v1, which is what runs here.
* The head node type must be called ``ray.head.default`` (the provider hard-codes it).
* ``idle_timeout_minutes`` is a JSON-schema ``number`` (>= 0), so fractions such as 0.1 (6 s) are accepted.
* Token authentication (new in Ray 2.60) must match between the cluster and this process; see RAY_AUTH_MODE below.
* Ray 2.60's autoscalers do not record their node types in the GCS (newer v2 autoscalers do); like cluster.yaml's
  head, the helper reports them after `ray start` (`raydllm.sweep.cluster.report_node_types`), so a driver asks Ray
  what the cluster can launch, exactly as on AWS.
* Apart from that the driver needs nothing special: ``ray.init(address="<ip>:<port>")`` connects to the head raylet even though
  several raylets share the IP (``services.get_node_to_connect_for_driver`` prefers the head). Only ``ray start``
  needs ``RAY_FAKE_CLUSTER=1``; ``AUTOSCALER_UPDATE_INTERVAL_S=1`` makes the monitor poll every second (5 s default).

Teardown never uses ``ray stop`` (it kills every Ray process of the user on the machine, including other test
sessions' clusters). Every process of this cluster - GCS, monitor, dashboard, raylets of the head and of the fake
workers, their Python workers - carries this cluster's private ``--temp-dir`` on its command line (worker nodes
inherit the head's temp dir), so teardown kills exactly the processes whose command line contains that directory,
by pid, and checks that none is left.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

from raydllm.sweep.cluster import report_node_types

HEAD_NODE_TYPE = "ray.head.default"  # fixed by FakeMultiNodeProvider
WORKER_NODE_TYPE = "ray.worker.slot"
MIB = 1024 * 1024


# Ray Train 2.60 asks the autoscaler for a trial's workers with a request that expires 180 s after it was last
# sent (AUTOSCALING_REQUESTS_EXPIRE_TIME_S, a module constant, re-sent every 20 s while the trial runs). A trial
# whose actor Tune ends at max_t never withdraws it, so the nodes stay wanted for 180 s after the sweep. The
# scale-down test shortens that wait by running this hook in every worker process of its job; the path
# (request, expiry, idle timeout, termination) is Ray's own.
SHORT_REQUEST_EXPIRY_S = 30


def shorten_train_request_expiry() -> None:
    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as client

    client.AUTOSCALING_REQUESTS_EXPIRE_TIME_S = SHORT_REQUEST_EXPIRY_S


def short_request_expiry_job_config() -> str:
    """RAY_JOB_CONFIG_JSON_ENV_VAR for a driver whose job's workers run `shorten_train_request_expiry`."""
    import json

    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    return json.dumps({"runtime_env": {"worker_process_setup_hook": "fake_cluster.shorten_train_request_expiry",
                                       "env_vars": {"PYTHONPATH": path}}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def fake_cluster_config(
    *,
    head_cpus: int = 1,
    worker_resources: dict | None = None,
    max_workers: int = 3,
    idle_timeout_minutes: float = 0.1,
    gcs_address: str | None = None,
    object_store_bytes: int = 100 * MIB,
) -> dict:
    """A complete autoscaler config for the fake_multinode provider (no defaults file needed)."""
    worker_resources = dict(worker_resources or {"CPU": 1, "node_slot": 1})
    worker_resources.setdefault("object_store_memory", object_store_bytes)
    provider = {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
        # No "launch_multiple": with it the v1 autoscaler over-launches (the provider creates the nodes one after
        # the other, ~5 s each here, and the next update launches more), then terminates the surplus as
        # "max_workers_per_type". Ray sets it only for autoscaler v2 (ray.cluster_utils.AutoscalingCluster).
    }
    if gcs_address:
        provider["gcs_address"] = gcs_address  # fake workers otherwise assume <node ip>:6379
    return {
        "cluster_name": "raydllm-fake",
        "max_workers": max_workers,
        "upscaling_speed": 10.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": provider,
        "auth": {},
        "docker": {},
        "head_node_type": HEAD_NODE_TYPE,
        "available_node_types": {
            HEAD_NODE_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            WORKER_NODE_TYPE: {
                "resources": worker_resources,
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_workers,
            },
        },
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


@dataclass
class FakeCluster:
    address: str  # "<ip>:<gcs port>", for ray.init(address=...)
    dashboard_url: str
    temp_dir: Path
    config_path: Path
    config: dict

    def alive_nodes(self) -> list[dict]:
        """Alive nodes from the GCS, without a driver: [{"node_id", "is_head", "resources"}]."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        client = GcsClient(address=self.address)
        infos = client.get_all_node_info(timeout=10, state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
        return [
            {
                "node_id": info.node_id.hex(),
                "is_head": bool(info.is_head_node),
                "resources": dict(info.resources_total),
            }
            for info in infos.values()
        ]

    def worker_count(self) -> int:
        return sum(1 for n in self.alive_nodes() if not n["is_head"])

    def wait_for_workers(self, predicate, timeout_s: float, poll_s: float = 0.5) -> int:
        deadline = time.monotonic() + timeout_s
        count = self.worker_count()
        while not predicate(count):
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker node count {count} did not reach the expected value in {timeout_s}s")
            time.sleep(poll_s)
            count = self.worker_count()
        return count

    def kill_node(self, node_id: str) -> list[int]:
        """Crash a worker node: SIGKILL its raylet and every process started for it (workers, agents), which
        carry the node id on their command lines. The GCS then marks the node dead; the autoscaler, seeing a
        node with no heartbeat, terminates it and launches what the pending demand needs."""
        if any(n["is_head"] and n["node_id"] == node_id for n in self.alive_nodes()):
            raise ValueError("kill_node: refusing to kill the head node")
        import psutil

        # Node ids are unique random hex: the raylet has --node_id=, the agents it starts --node-id=. Its Python
        # workers rename themselves (ray::RayTrainWorker), so they are found as the raylet's descendants.
        roots = sorted(set(_pids_with(f"--node_id={node_id}") + _pids_with(f"--node-id={node_id}")))
        procs = []
        for pid in roots:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                procs += [root, *root.children(recursive=True)]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        return sorted({p.pid for p in procs})

    def _monitor_logs(self, pattern: str) -> list[Path]:
        # session_latest is a symlink to the session dir: resolve and de-duplicate.
        return sorted({p.resolve() for p in self.temp_dir.glob(f"session_*/logs/{pattern}")})

    def autoscaler_events(self) -> list[str]:
        """The autoscaler's launch/terminate decisions from monitor.log ("Adding", "Terminating", "Removing")."""
        keep = ("Adding", "Terminating", "Removing", "idle", "Launching", "launch failed", "Failed")
        out = []
        for path in self._monitor_logs("monitor.log"):
            with contextlib.suppress(OSError):
                for line in path.read_text(errors="replace").splitlines():
                    if any(k in line for k in keep) and "StandardAutoscaler: {" not in line:
                        out.append(line.strip())
        return out

    def monitor_log_tail(self, lines: int = 60) -> str:
        logs = self._monitor_logs("monitor.*")
        out = []
        for path in logs:
            with contextlib.suppress(OSError):
                out.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)


@dataclass
class NodeTimeline:
    """Samples the alive worker-node count in a background thread: [(seconds since start, workers)]."""

    cluster: FakeCluster
    interval_s: float = 0.5
    samples: list[tuple[float, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="node-timeline", daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append((round(time.monotonic() - self._t0, 1), self.cluster.worker_count()))
            except Exception as exc:  # keep sampling; a GCS hiccup must not end the timeline
                self.errors.append(repr(exc))
            self._stop.wait(self.interval_s)

    def start(self) -> "NodeTimeline":
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=15)

    def changes(self) -> list[tuple[float, int]]:
        """Only the samples where the count changed (plus the first one)."""
        out: list[tuple[float, int]] = []
        for t, n in self.samples:
            if not out or out[-1][1] != n:
                out.append((t, n))
        return out

    def counts(self) -> list[int]:
        return [n for _, n in self.changes()]

    def render(self) -> str:
        lines = ["  t(s)  workers"]
        lines += [f"{t:6.1f}  {n:>7}  {'#' * n}" for t, n in self.changes()]
        if self.samples:
            lines.append(f"{self.samples[-1][0]:6.1f}  {self.samples[-1][1]:>7}  (last sample)")
        return "\n".join(lines)


def _pids_with(marker: str) -> list[int]:
    """Pids (not ours) whose command line contains marker: this cluster's processes."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry))
    return pids


def _kill_cluster_processes(temp_dir: str, timeout_s: float = 20.0) -> list[int]:
    """SIGTERM then SIGKILL every process carrying temp_dir; returns pids still alive (should be [])."""
    deadline = time.monotonic() + timeout_s
    sig = signal.SIGTERM
    grace_until = time.monotonic() + 3
    while time.monotonic() < deadline:
        pids = _pids_with(temp_dir)
        if not pids:
            return []
        if time.monotonic() > grace_until:
            sig = signal.SIGKILL
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        time.sleep(0.5)
    return _pids_with(temp_dir)


def _ray_executable() -> str:
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


@contextlib.contextmanager
def fake_autoscaling_cluster(
    *,
    head_cpus: int = 1,
    worker_resources: dict | None = None,
    max_workers: int = 3,
    idle_timeout_minutes: float = 0.1,
    update_interval_s: int = 1,  # AUTOSCALER_UPDATE_INTERVAL_S is parsed with int()
    start_timeout_s: float = 90.0,
    pythonpath: tuple[str, ...] | None = None,
) -> Iterator[FakeCluster]:
    """Start a head node (0 workers) whose autoscaler launches fake worker nodes; always tear it all down.

    Keep logical CPU counts small: every fake node is a set of processes on this machine.
    `pythonpath` (default: the repo root and tests/) is prepended, as absolute paths, to PYTHONPATH of every
    cluster process, so trial code from this checkout imports on the fake nodes (their cwd is not the repo).
    """
    import ray._private.services as services

    # Short path: Ray puts unix sockets under <temp dir>/session_*/sockets (108-byte limit on socket paths).
    temp_dir = Path(tempfile.mkdtemp(prefix="rfk_", dir="/tmp"))
    ip = services.get_node_ip_address()
    gcs_port, dash_port, agent_port, client_port = (free_port() for _ in range(4))
    address = f"{ip}:{gcs_port}"
    config = fake_cluster_config(
        head_cpus=head_cpus,
        worker_resources=worker_resources,
        max_workers=max_workers,
        idle_timeout_minutes=idle_timeout_minutes,
        gcs_address=address,
    )
    config_path = temp_dir / "autoscaler.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "RAY_enable_autoscaler_v2"):
        env.pop(var, None)
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S=str(int(update_interval_s)))
    # Ray 2.60 token auth: `ray start --head` turns it on by itself when ~/.ray/auth_token exists (any earlier local
    # ray.init() writes that file and sets RAY_AUTH_MODE=token in its own process), while a driver that connects
    # with an explicit address does not. Pin the cluster to this process's mode so driver and cluster agree.
    here = Path(__file__).resolve().parent
    extra = [str(Path(p).resolve()) for p in (pythonpath if pythonpath is not None else (here.parent, here))]
    env["PYTHONPATH"] = os.pathsep.join(extra + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE", "disabled")
    cmd = [
        _ray_executable(), "start", "--head",
        f"--port={gcs_port}",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={head_cpus}",
        "--num-gpus=0",
        f"--object-store-memory={100 * MIB}",
        f"--autoscaling-config={config_path}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        f"--ray-client-server-port={client_port}",
        "--disable-usage-stats",
    ]
    cluster = FakeCluster(
        address=address,
        dashboard_url=f"http://127.0.0.1:{dash_port}",
        temp_dir=temp_dir,
        config_path=config_path,
        config=config,
    )
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=start_timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if any(n["is_head"] for n in cluster.alive_nodes()):
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("fake cluster head node did not come up")
            time.sleep(0.5)
        # What cluster.yaml's head does after `ray start`: record the autoscaler's node types in the GCS, where
        # raydllm's resource check (and Ray Data) read what the cluster can launch.
        report_node_types(config_path, address)
        yield cluster
    finally:
        left = _kill_cluster_processes(str(temp_dir))
        with contextlib.suppress(Exception):
            import ray._private.services as services  # noqa: F811

            services.find_gcs_addresses.cache_clear()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if left:
            raise RuntimeError(f"fake cluster processes still alive after teardown: {left}")

