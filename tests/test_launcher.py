"""The recipe under Ray's own cluster launcher, on this machine: `ray up` with Ray's `local` node provider over SSH
to 127.0.0.1 (an sshd of the test's own, on its own port, with a throwaway key), on a variant of cluster.yaml in
which only these keys are replaced:
  provider, auth          local provider, head at 127.0.0.1, SSH as root with the throwaway key (Ray has no SSH
                          port setting: a proxy command reaches the test's port);
  docker, initialization_commands   removed: there is no container here, and the initialization commands are the
                          host's half of the Docker setup (tests/test_cluster_config.py checks that half on Ray's
                          own `docker run` construction);
  node types              removed (the local provider refuses them): the head's resources, {CPU: 2,
                          trial_slot: 2}, reach `ray start` through RAY_OVERRIDE_RESOURCES, as Ray's updater passes a
                          node type's resources on other providers;
  fill-ins                YOUR_BUCKET -> a local folder; file_mounts' local paths resolved against this checkout
                          (the token folder is a temporary "laptop" one); the container's home /home/ray is
                          the SSH user's home; MLflow's allowed Host headers
                          name this machine's address (an AWS head's private IP is admitted by default).
The recipe's own file_mounts, rsync filters, setup_commands, head_setup_commands and head_start_ray_commands are
what runs, each behind one environment prefix: PATH to a virtual environment of the test's own (the recipe's
`pip install` goes there, never into the development venv) and RAY_TMPDIR (Ray's address file and sessions in a
temp folder of the test's own).

Then, as a user would: `ray job submit` of a two-trial sweep with the cluster's token (and refused without it);
`raydllm best` typed on the head through `ray exec`; MLflow on the head read from this side; `raydllm tune` typed
on the head joins the cluster there; a failing job whose one-line reason `ray job logs` shows; `ray down`, `ray
stop` on the head, the MLflow server and sshd stopped, and no process of the test's own left.

One Ray per machine at a time: run it alone (flock /tmp/raydllm-ray.lock, as CI's Ray pass does).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MLFLOW_PORT, DASHBOARD_PORT, GCS_PORT = 5000, 8265, 6379  # the recipe's own
# What the recipe leaves in the SSH user's home on the head (here: this machine's root): removed afterwards
# unless it was there before.
HEAD_HOME_PATHS = ("raydllm", ".ray-auth", "mlflow", "ray_bootstrap_config.yaml", "ray_bootstrap_key.pem")

TWO_TRIAL_SPACE = {
    "task": "gsm8k", "preset": "local", "metric": "val_loss_diff",
    "fixed": {"model.init": "random", "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
              "data.synthetic_size": 200, "data.val_limit": 8, "train.micro_batch_size": 8, "train.max_steps": 4,
              "train.eval_every": 2, "jepa.rate_sampling": "fixed", "data.answer_tokens": 48,
              # the final probes read WikiText: a download (no network here) unless ../shared/data has it, and
              # the installed copy on the head has no ../shared
              "eval.probes": False},
    "space": {"jepa.lambda": {"choice": [0.5, 2.0]}, "train.lr": {"choice": [1.0e-3, 3.0e-3]}},
    "baseline": {"mode": "searched", "num_samples": 1}, "seeds": [42],
    "scheduler": {"grace_period": 2, "reduction_factor": 2},
    "search": {"algorithm": "random", "seed": 3},
    "num_samples": 1, "max_concurrent_trials": 2,
    "resources": {"workers": 1, "cpus_per_worker": 1},
}

RELAY = """import os, selectors, socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
sel = selectors.DefaultSelector()
sel.register(0, selectors.EVENT_READ)
sel.register(sock, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj == 0:
            data = os.read(0, 65536)
            if not data:
                sock.shutdown(socket.SHUT_WR)
                sel.unregister(0)
                continue
            sock.sendall(data)
        else:
            data = sock.recv(65536)
            if not data:
                sys.exit(0)
            os.write(1, data)
"""


def _sshd() -> str | None:
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "openssh-server", "rsync"],
                   capture_output=True, timeout=600)
    return shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait_port(port: int, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while _free(port):
        if time.time() > deadline:
            raise AssertionError(f"{what} did not listen on port {port} within {seconds:.0f} s")
        time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_processes(marker: str) -> list[str]:
    """Processes whose command line or environment mentions `marker` (the test's temp folder)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid == os.getpid():
                continue
            text = " ".join(proc.info["cmdline"] or [])
            if marker in text or marker in proc.environ().get("PATH", "") + proc.environ().get("RAY_TMPDIR", ""):
                found.append(f"{proc.pid}: {text[:200]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _other_rays() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in ("raylet", "gcs_server")]


def _stop_own_processes(marker: str) -> None:
    """SIGTERM, then SIGKILL, every process of the test's own (never another test's Ray: no `ray stop`)."""
    import psutil

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for line in _own_processes(marker):
            try:
                os.kill(int(line.split(":")[0]), sig)
            except ProcessLookupError:
                pass
        time.sleep(3)


def _make_venv(venv: Path) -> None:
    """A virtual environment that sees the development venv's packages (a .pth file) and has its own `ray` and
    `mlflow` commands, so everything the cluster starts runs this venv's Python and the raydllm the recipe
    installs into it (pip leaves packages outside the environment alone)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    parent = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "development-venv.pth").write_text("\n".join(parent) + "\n")
    # pip itself, from the development venv (the recipe runs `pip install`)
    (venv / "bin" / "pip").write_text(f"#!{venv}/bin/python\nimport sys\nfrom pip._internal.cli.main import main\n"
                                      "sys.exit(main())\n")
    for name, entry in (("ray", "from ray.scripts.scripts import main"), ("mlflow", "from mlflow.cli import cli as main")):
        (venv / "bin" / name).write_text(f"#!{venv}/bin/python\nimport sys\n{entry}\nsys.exit(main())\n")
    for name in ("pip", "ray", "mlflow"):
        (venv / "bin" / name).chmod(0o755)


def _variant(tmp: Path, key: Path, ssh_port: int, venv: Path, laptop_auth: Path, bucket: Path) -> dict:
    # No container: its home, /home/ray (the MLflow database's folder), is the SSH user's home here.
    text = (REPO / "cluster.yaml").read_text().replace("s3://YOUR_BUCKET", str(bucket)) \
        .replace("/home/ray/", f"{Path.home()}/")
    cfg = yaml.safe_load(text)
    cfg["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(key),
                   "ssh_proxy_command": f"{sys.executable} {tmp / 'relay.py'} 127.0.0.1 {ssh_port}"}
    for key_name in ("docker", "available_node_types", "head_node_type", "initialization_commands"):
        cfg.pop(key_name, None)
    cfg["max_workers"] = 0
    cfg["file_mounts"] = {remote: str(laptop_auth if local.endswith(".ray-auth") else (REPO / local).resolve())
                          for remote, local in cfg["file_mounts"].items()}
    resources = json.dumps({"CPU": 2, "trial_slot": 2})
    # MLflow's server admits by default the Host headers localhost and the private ranges (10/8, 172.16/12,
    # 192.168/16), where an AWS head's private IP is; this machine's address may be in none of them.
    import ray.util

    ip = ray.util.get_node_ip_address()
    hosts = ",".join(f"{h},{h}:*" for h in ("localhost", "127.0.0.1", ip))
    prefix = (f"export PATH={venv}/bin:$PATH RAY_TMPDIR={tmp / 'rt'} RAY_OVERRIDE_RESOURCES='{resources}' "
              f"MLFLOW_SERVER_ALLOWED_HOSTS='{hosts}'; ")
    for key_name in ("setup_commands", "head_setup_commands", "head_start_ray_commands"):
        cfg[key_name] = [prefix + command for command in cfg[key_name]]
    cfg["worker_setup_commands"], cfg["worker_start_ray_commands"] = [], []
    return cfg, prefix


def _run(args, env, timeout=300, check=True, cwd=None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))[:300]} exited {done.returncode}:\n"
                             f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_ray_up_job_best_logs_down_under_rays_launcher():
    sshd = _sshd()
    if sshd is None:
        pytest.skip("no OpenSSH server, and it cannot be installed here (apt-get as root): the launcher test needs "
                    "sshd on 127.0.0.1")
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed, and it cannot be installed here")
    # The recipe's head runs `ray stop` (every Ray on the machine) and takes Ray's default ports: wait for a Ray
    # that another test left running here to end, rather than stop it.
    deadline = time.time() + 300
    while (busy := [p for p in (MLFLOW_PORT, DASHBOARD_PORT, GCS_PORT) if not _free(p)]) or _other_rays():
        if time.time() > deadline:
            pytest.fail(f"another Ray runs on this machine (ports in use: {busy}; raylets: {_other_rays()}): the "
                        f"launcher test runs the recipe's own `ray stop` and ports; run it alone")
        time.sleep(5)

    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="/tmp/rdl-"))  # short: Ray's unix socket paths live under it
    home = Path.home()
    before = {name: (home / name).exists() for name in HEAD_HOME_PATHS}
    bashrc = home / ".bashrc"
    bashrc_text = bashrc.read_text() if bashrc.exists() else None
    ray = str(tmp / "venv" / "bin" / "ray")
    sshd_proc = None
    config_path = tmp / "cluster-local.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTHONPATH", "MLFLOW_"))}
    try:
        # --- sshd on 127.0.0.1, own port, throwaway keys -----------------------------------------------------
        key, host_key = tmp / "id_ed25519", tmp / "host_ed25519"
        for path in (key, host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
        (tmp / "authorized_keys").write_text((tmp / "id_ed25519.pub").read_text())
        (tmp / "relay.py").write_text(RELAY)
        ssh_port = _free_port()
        (tmp / "sshd_config").write_text(
            f"Port {ssh_port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {tmp / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation folder (systemd would make it)
        sshd_proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(tmp / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=open(tmp / "sshd.log", "w"))
        _wait_port(ssh_port, 20, "sshd")

        # --- the variant, the venv, the laptop's token ---------------------------------------------------------
        _make_venv(tmp / "venv")
        laptop_auth = tmp / "laptop" / ".ray-auth"
        laptop_auth.mkdir(parents=True)
        (laptop_auth / "auth_token").write_text(secrets.token_hex(32))
        (laptop_auth / "auth_token").chmod(0o600)
        cfg, prefix = _variant(tmp, key, ssh_port, tmp / "venv", laptop_auth, tmp / "bucket")
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

        # --- ray up ------------------------------------------------------------------------------------------
        t0 = time.time()
        up = _run([ray, "up", "-y", "--no-config-cache", str(config_path)], env, timeout=600)
        up_s = time.time() - t0
        print(f"\nlauncher test: ray up took {up_s:.1f} s")
        address_file = tmp / "rt" / "ray" / "ray_current_cluster"
        assert address_file.is_file(), f"no Ray address file where the head's ray start should write it\n{up.stdout[-3000:]}"
        # the recipe's install: raydllm from the mounted checkout, built in a temporary copy, into the venv
        installed = _run([str(tmp / "venv" / "bin" / "python"), "-c",
                          "import raydllm, sys; print(raydllm.__file__)"], env, cwd=tmp).stdout.strip()
        assert installed.startswith(str(tmp / "venv")), installed
        assert not list((home / "raydllm").glob("*.egg-info")) and not (home / "raydllm" / "build").exists()
        assert not (home / "raydllm" / ".ray-auth").exists()  # the token came as its own folder only
        assert (home / ".ray-auth" / "auth_token").read_text() == (laptop_auth / "auth_token").read_text()
        # the MLflow server is started in the background: the job must not start before it listens
        _wait_port(MLFLOW_PORT, 120, "the head's MLflow server")

        # --- token: refused without it, accepted with the laptop's copy -------------------------------------
        dashboard = f"http://127.0.0.1:{DASHBOARD_PORT}"
        no_token = dict(env, RAY_AUTH_MODE="disabled")
        refused = _run([ray, "job", "list", "--address", dashboard], no_token, check=False, timeout=120)
        assert refused.returncode != 0 and "Authentication required" in refused.stdout + refused.stderr, refused
        client = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(laptop_auth / "auth_token"))

        # --- a two-trial sweep as a Ray job ------------------------------------------------------------------
        job_dir = tmp / "job"
        job_dir.mkdir()
        (job_dir / "space.yaml").write_text(yaml.safe_dump(TWO_TRIAL_SPACE))
        (job_dir / "bad.yaml").write_text(yaml.safe_dump({**TWO_TRIAL_SPACE, "num_samples": -1}))
        (job_dir / "gpu.yaml").write_text(yaml.safe_dump({**TWO_TRIAL_SPACE, "resources": {
            "workers": 1, "cpus_per_worker": 1, "use_gpu": True}}))
        t0 = time.time()
        _run([ray, "job", "submit", "--address", dashboard, "--submission-id", "raydllm-launcher-ok",
              "--working-dir", str(job_dir), "--", "raydllm", "tune", "gsm8k", "--space", "space.yaml", "--name", "launcher-sweep"],
             client, timeout=600)
        sweep_s = time.time() - t0
        status = _run([ray, "job", "status", "--address", dashboard, "raydllm-launcher-ok"], client).stdout
        assert "Job 'raydllm-launcher-ok' succeeded" in status, status

        # --- MLflow on the head, read from this side -------------------------------------------------------
        from mlflow.tracking import MlflowClient

        mlflow_client = MlflowClient(f"http://127.0.0.1:{MLFLOW_PORT}")
        experiment = mlflow_client.get_experiment_by_name("raydllm-gsm8k")
        parents = mlflow_client.search_runs([experiment.experiment_id], "tags.`raydllm.kind` = 'sweep'")
        assert len(parents) == 1 and parents[0].info.run_name == "launcher-sweep"
        children = mlflow_client.search_runs([experiment.experiment_id],
                                             f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
        assert len(children) >= 2 and {c.info.status for c in children} == {"FINISHED"}, \
            [(c.info.run_name, c.info.status, c.data.tags.get("raydllm.error")) for c in children]
        # the store is the recipe's default: the SQLite file in ~/mlflow on the head
        assert (home / "mlflow" / "mlflow.db").is_file()
        # checkpoints went to the (filled-in) RAYDLLM_STORAGE, the log file to a real folder
        assert (tmp / "bucket" / "raydllm" / "launcher-sweep").is_dir()

        # --- typed on the head through ray exec -------------------------------------------------------------
        best = _run([ray, "exec", str(config_path), prefix + "raydllm best gsm8k --sweep launcher-sweep"], env)
        assert "launcher-sweep" in best.stdout or any(c.info.run_name in best.stdout for c in children), best.stdout
        joined = _run([ray, "exec", str(config_path), prefix + f"cd {job_dir} && raydllm tune gsm8k --space gpu.yaml"], env,
                      check=False)
        said = joined.stdout + joined.stderr
        assert joined.returncode != 0 and "raydllm: error: resources:" in said, said[-3000:]
        assert "set RAY_ADDRESS" not in said and "this machine has" not in said, said[-3000:]  # it joined

        # --- a failing sweep's reason in ray job logs ---------------------------------------------------------
        _run([ray, "job", "submit", "--address", dashboard, "--submission-id", "raydllm-launcher-bad",
              "--working-dir", str(job_dir), "--", "raydllm", "tune", "gsm8k", "--space", "bad.yaml"], client, check=False)
        logs = _run([ray, "job", "logs", "--address", dashboard, "raydllm-launcher-bad"], client).stdout
        reason = [line for line in logs.splitlines() if line.startswith("raydllm: error:")]
        assert len(reason) == 1 and "num_samples" in reason[0], logs[-3000:]
        bad_status = _run([ray, "job", "status", "--address", dashboard, "raydllm-launcher-bad"], client).stdout
        assert "Job 'raydllm-launcher-bad' failed" in bad_status, bad_status

        # --- ray down -----------------------------------------------------------------------------------------
        _run([ray, "down", "-y", str(config_path)], env, timeout=300)
        print(f"\nlauncher test: ray up {up_s:.1f} s, two-trial job {sweep_s:.1f} s, "
              f"total {time.time() - started:.1f} s")
    finally:
        # `ray down` with the local provider leaves the head's Ray running: a user runs `ray stop` on the head;
        # here that would stop every Ray on the machine, so the test stops its own processes only.
        after_down = _own_processes(str(tmp))
        print(f"launcher test: {len(after_down)} processes of the cluster still ran after `ray down`, e.g. "
              f"{[line for line in after_down if 'raylet' in line][:1]}")
        _stop_own_processes(str(tmp))
        pid_file = home / "mlflow" / "server.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
        if sshd_proc is not None:
            sshd_proc.terminate()
            sshd_proc.wait(timeout=30)
        time.sleep(2)
        left = _own_processes(str(tmp))
        for name, existed in before.items():
            if not existed:
                path = home / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if bashrc_text is None:
            bashrc.unlink(missing_ok=True)
        else:
            bashrc.write_text(bashrc_text)
        for state in Path(tempfile.gettempdir(), "ray").glob("cluster-raydllm.*"):
            state.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    assert not left, f"processes of the launcher test still running: {left}"

