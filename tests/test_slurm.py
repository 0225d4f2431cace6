"""launchers/slurm/raydllm.sbatch on a real Slurm: one machine, the OS's slurmctld, slurmd and MUNGE (installed with
apt-get when missing, so CI gets them), two node names on localhost (Debian's slurmd runs one daemon per node name
with -N) or one where the second does not come up. The recipe goes through sbatch with a two-trial local space;
the sweep's best is read from the MLflow the recipe ran on the head; scancel mid-sweep + resubmission resumes it.
Everything started here is stopped by pid at the end."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "launchers" / "slurm" / "raydllm.sbatch"
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scancel", "scontrol", "sinfo")
SPACE = {
    "task": "gsm8k", "preset": "local", "metric": "val_loss_diff",
    "fixed": {"model.init": "random", "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
              "data.synthetic_size": 300, "data.val_limit": 16, "train.micro_batch_size": 8, "train.max_steps": 8,
              "train.eval_every": 2, "jepa.rate_sampling": "fixed", "data.answer_tokens": 48},
    "space": {"jepa.lambda": {"choice": [1.0]}, "train.lr": {"choice": [3.0e-3]}},
    # one DLLM-JEPA trial and its λ = 0 baseline, one at a time: the second is still to run when the first ends
    "baseline": {"mode": "searched", "num_samples": 1}, "seeds": [42],
    "scheduler": {"grace_period": 2, "reduction_factor": 2}, "search": {"algorithm": "random", "seed": 0},
    "num_samples": 1, "max_concurrent_trials": 1,
    "resources": {"workers": 1, "cpus_per_worker": 1},
}

pytestmark = [pytest.mark.ray, pytest.mark.skipif(os.geteuid() != 0, reason="a one-machine Slurm runs as root")]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _install_slurm() -> None:
    if all(shutil.which(d) for d in DAEMONS):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], check=True, env=env,
                   capture_output=True)


def _slurm_conf(folder: Path, nodes: list[str], ports: list[int], munge_socket: Path) -> Path:
    host = socket.gethostname()
    lines = [
        "ClusterName=raydllmtest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", f"AuthInfo=socket={munge_socket}", "CredType=cred/munge",
        f"StateSaveLocation={folder}/state", f"SlurmdSpoolDir={folder}/spool-%n",
        f"SlurmctldPidFile={folder}/slurmctld.pid", f"SlurmdPidFile={folder}/slurmd-%n.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log", f"SlurmdLogFile={folder}/slurmd-%n.log",
        f"SlurmctldPort={ports[0]}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "JobAcctGatherType=jobacct_gather/none", "ReturnToService=2",
        "MpiDefault=none", "KillWait=10", "MinJobAge=900", "SchedulerType=sched/backfill",
    ]
    lines += [f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs=2 RealMemory=8000"
              for n, p in zip(nodes, ports[1:])]
    lines.append(f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP")
    conf = folder / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _idle_nodes(env) -> set[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()[1:] == ["idle"]}


def _pid(path: Path) -> int | None:
    return int(path.read_text()) if path.exists() and path.read_text().strip() else None


def _stop(pid: int | None, timeout: float = 20) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, 9)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-machine Slurm; yields (environment for sbatch & co, node names)."""
    _install_slurm()
    folder = tmp_path_factory.mktemp("slurm")
    munge_socket = folder / "munge.socket"
    munge = [shutil.which("munged"), "--force", f"--socket={munge_socket}", f"--pid-file={folder}/munged.pid",
             f"--log-file={folder}/munged.log", f"--seed-file={folder}/munged.seed"]
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
    subprocess.run(munge, check=True, capture_output=True)  # daemonizes; its pid is in the pid file
    nodes = ["rd1", "rd2"]
    conf = _slurm_conf(folder, nodes, _free_ports(3), munge_socket)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = []
    try:
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env, capture_output=True)
        for node in nodes:
            subprocess.run(["slurmd", "-f", str(conf), "-N", node], env=env, capture_output=True)
        deadline = time.time() + 30
        while time.time() < deadline and _idle_nodes(env) != set(nodes):
            time.sleep(1)
        up = sorted(_idle_nodes(env))
        assert up, f"no Slurm node came up: {(folder / 'slurmctld.log').read_text()[-2000:]}"
        print(f"slurm: node names up: {up}")
        yield env, up
    finally:
        # Jobs first, while slurmd can still end their steps: a slurmd stopped under a running job leaves the
        # job's processes (its Ray among them) behind.
        subprocess.run(["scancel", "--full", "--partition=debug"], env=env, capture_output=True)
        deadline = time.time() + 60
        while time.time() < deadline and subprocess.run(["squeue", "-h"], env=env, capture_output=True,
                                                         text=True).stdout.strip():
            time.sleep(1)
        for node in nodes:
            _stop(_pid(folder / f"slurmd-{node}.pid"))
        _stop(_pid(folder / "slurmctld.pid"))
        _stop(_pid(folder / "munged.pid"))


def _submit(env, shared: Path, nodes: int, workdir: Path, mlflow_port: int | None = None) -> str:
    """sbatch of the recipe with this machine's fill-ins: its #SBATCH lines as shipped, but no GPU request (this
    Slurm has no GPUs); the rest overridden on sbatch's command line, as the recipe's header says."""
    recipe = workdir / "raydllm.sbatch"
    recipe.write_text("".join(line for line in RECIPE.read_text().splitlines(keepends=True)
                              if not line.startswith("#SBATCH --gpus-per-node")))
    job_env = {**env, "RAYDLLM_SHARED": str(shared), "RAYDLLM_CMD": f"{sys.executable} -m raydllm.cli",
               "RAYDLLM_TUNE_ARGS": f"--space {workdir / 'space.yaml'} --json",
               "RAYDLLM_RAY_PORT": str(_free_ports(1)[0]),
               "RAYDLLM_MLFLOW_PORT": str(mlflow_port or _free_ports(1)[0]),
               "PYTHONPATH": str(REPO)}
    out = subprocess.run(["sbatch", "--parsable", "-N", str(nodes), "-p", "debug", "-c", "2", "-t", "15",
                          f"--output={workdir}/job-%j.out", str(recipe)],
                         cwd=workdir, env=job_env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def _job_state(env, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "GONE")


def _wait(env, job: str, timeout: float = 480) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = _job_state(env, job)
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state
        time.sleep(2)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} still {state} after {timeout} s")


def _ray_left(job: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", f"ray-slurm-{job}"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def _sweep_runs(shared: Path, tracking_uri: str | None = None):
    """The sweep's parent and child runs: from the database once the job is over, or through the job's MLflow
    server while it runs (the server creates and migrates the database: a second writer would race it)."""
    client = MlflowClient(tracking_uri or f"sqlite:///{shared / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("raydllm-gsm8k")
    if experiment is None:
        return client, [], []
    parents = client.search_runs([experiment.experiment_id], "tags.`raydllm.kind` = 'sweep'")
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'") if parents else []
    return client, parents, children


def _outcome(workdir: Path, job: str) -> dict:
    lines = (workdir / f"job-{job}.out").read_text().splitlines()
    return json.loads(next(line for line in reversed(lines) if line.startswith("{")))


def test_sbatch_runs_the_sweep_and_mlflow_has_its_best(slurm, tmp_path):
    env, nodes = slurm
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    shared = tmp_path / "shared"
    job = _submit(env, shared, len(nodes), tmp_path)
    state = _wait(env, job)
    log = (tmp_path / f"job-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert f"{len(nodes)} Ray node(s) up" in log
    assert _outcome(tmp_path, job)["restored"] is False
    assert not _ray_left(job)
    _, parents, children = _sweep_runs(shared)
    assert len(parents) == 1 and len(children) == 2
    best = subprocess.run([sys.executable, "-m", "raydllm.cli", "best", "gsm8k", "--tracking-uri",
                           f"sqlite:///{shared / 'mlflow.db'}", "--json"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert best.returncode == 0, best.stderr[-2000:]
    report = json.loads(best.stdout.strip().splitlines()[-1])
    jepa = [r for r in children if r.data.params["jepa.lambda"] != "0.0"]
    assert report["best"][0]["run_id"] == jepa[0].info.run_id
    assert report["baseline"] is not None


def test_scancel_mid_sweep_then_resubmit_resumes_it(slurm, tmp_path):
    env, nodes = slurm
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    shared = tmp_path / "shared"
    port = _free_ports(1)[0]
    job = _submit(env, shared, len(nodes), tmp_path, mlflow_port=port)
    finished_before: set[str] = set()
    deadline = time.time() + 420
    while time.time() < deadline and _job_state(env, job) in ("PENDING", "RUNNING", "CONFIGURING"):
        time.sleep(2)
        try:
            children = _sweep_runs(shared, f"http://127.0.0.1:{port}")[2]
        except Exception:  # the job's MLflow server is not up yet
            continue
        done = [r for r in children if r.data.tags.get("raydllm.status") in ("completed", "stopped_early")]
        if done:
            finished_before = {r.data.tags["raydllm.trial_id"] for r in done}
            subprocess.run(["scancel", job], env=env, check=True)
            break
    assert finished_before, "the job ended (or stalled) before a trial finished: nothing to cancel mid-sweep"
    assert _wait(env, job, timeout=120) == "CANCELLED"
    time.sleep(2)
    assert not _ray_left(job), _ray_left(job)

    again = _submit(env, shared, len(nodes), tmp_path)  # the same script, the same storage
    state = _wait(env, again)
    assert state == "COMPLETED", (tmp_path / f"job-{again}.out").read_text()[-3000:]
    assert _outcome(tmp_path, again)["restored"] is True
    assert not _ray_left(again)
    _, parents, children = _sweep_runs(shared)
    assert len(parents) == 1
    trial_ids = [r.data.tags["raydllm.trial_id"] for r in children]
    assert len(trial_ids) == 2 and len(set(trial_ids)) == 2  # every trial in MLflow once
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags.get("raydllm.error")
        if run.data.tags["raydllm.trial_id"] in finished_before:  # not run again after the resubmission
            assert "raydllm.resumed_from_step" not in run.data.tags
