import os
import sys
import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def process_group():
    """A one-process gloo group, so DeepSpeed engines can be built in-process (no Ray) for unit tests."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield


@pytest.fixture
def one_thread():
    """Small models run fastest on one thread (and do not oversubscribe a shared 2-core CI box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shared_ray_order(item) -> int:
    """0: tests that start a Ray of their own (or none); 1: those that join the shared cluster part-way
    (`joins_shared_ray`); 2: those that need it from the start."""
    if "shared_ray" in item.fixturenames:
        return 2
    return 1 if item.get_closest_marker("joins_shared_ray") else 0


def pytest_collection_modifyitems(config, items):
    # The shared cluster starts with its first user and lives to the end of the session, so its users go last:
    # no test may start a Ray of its own while it runs. Two Ray instances on one machine break Ray Train's
    # PlacementGroupCleaner (it looks its cluster up without an address and stops at "Found multiple active
    # Ray instances"), and a resumed sweep's trials then wait until they time out (seen in CI). Stable sort:
    # within each group, pytest's own order.
    items.sort(key=_shared_ray_order)


@pytest.fixture(scope="session")
def shared_ray():
    """One Ray cluster for the Ray tests that do not need their own (a test that kills its driver, or a worker
    it finds among the driver's children, or fakes an autoscaler, starts its own). `ray start --head --block`
    in a session of its own: the test session stops it, and every Ray process it started, by process group.
    Yields the environment a `raydllm` subprocess joins it with (RAY_ADDRESS and the token), as on a head."""
    import shutil
    import secrets
    import signal
    import subprocess
    import tempfile
    import time

    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    # A short temp folder: Ray's unix socket paths under pytest's tmp_path would pass the 107-byte limit.
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rdt-")
    # Every port of its own, none of the defaults a test's own `ray.init()` takes (dashboard agent 52365, worker
    # ports 10002-19999, ...): two Ray instances on one machine collide only where they share a port. Its own
    # temp folder too, so Ray's "latest cluster" file (read by an address-less ray.init) stays where only
    # RAY_ADDRESS leads: a test that starts its own cluster does not join this one.
    # Token authentication as on a real cluster, with a token of its own: Ray 2.60's `ray start` turns it on
    # whenever a token file exists (~/.ray/auth_token, left by `ray up` or `ray get-auth-token --generate`), and
    # a client without the token is refused, so the head and every client get it the same way, explicitly.
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    port = _free_port()
    ports = [f"--{name}={_free_port()}" for name in ("dashboard-port", "dashboard-agent-listen-port",
                                                     "dashboard-agent-grpc-port", "metrics-export-port",
                                                     "runtime-env-agent-port", "ray-client-server-port",
                                                     "node-manager-port", "object-manager-port")]
    head = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp_dir}", *ports,
                             "--min-worker-port=20000", "--max-worker-port=21999", "--include-dashboard=true",
                             "--disable-usage-stats", '--resources={"trial_slot": 2}'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while subprocess.run([ray, "status", f"--address={address}"], capture_output=True, env=env).returncode != 0:
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the shared Ray head did not start (exit {head.poll()})")
            time.sleep(1)
        yield dict(env, RAY_ADDRESS=address)
    finally:
        _stop_group(head, signal.SIGTERM, 60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_group(process, sig, timeout: float) -> None:
    """Signal a process group, wait for its leader, then SIGKILL whatever of the group is left."""
    import signal
    import subprocess

    try:
        os.killpg(process.pid, sig)
        process.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
