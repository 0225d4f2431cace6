"""The commands a user types: bad input refused at the door (exit 2, one line naming the culprit, no traceback,
seconds, before Ray starts), the quiet terminal (library output to the log file, raydllm's own lines shown),
the live progress view, and a Ctrl-C'd sweep that ends KILLED, exits 130 and resumes."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ROW = {"question": "Tom has 3 apples and buys 2 more. How many?", "answer": "3 + 2 = 5\n#### 5"}


def _run(workdir: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "raydllm.cli.app", *args], cwd=workdir, capture_output=True, text=True,
                          timeout=120, env=environment)
    return done, time.perf_counter() - started


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _no_gpu_machine() -> bool:
    from raydllm.sweep.train import local_gpus

    return local_gpus() < 8


def _cases(tmp: Path):
    """(name, command, env, what the one line must name)."""
    good = json.dumps(ROW)
    no_answer = _jsonl(tmp / "data" / "no_answer.jsonl", [good, json.dumps({"question": "q", "reply": "5"}), good])
    broken = _jsonl(tmp / "broken.jsonl", [good, good, '{"question": "q", "answer": "#### 1"', good])
    (tmp / "broken.yaml").write_text("task: gsm8k\nmetric: val_loss_diff\nspace:\n  jepa.k: {randint: [1, 3]\n"
                                     "scheduler: {grace_period: 10}\n")
    (tmp / "rates.yaml").write_text(yaml.safe_dump({
        "task": "gsm8k", "preset": "local", "metric": "val_loss_diff",
        "fixed": {"train.max_steps": 30, "train.eval_every": 10},
        "space": {"jepa.t_low": {"uniform": [0.1, 0.8]}, "jepa.t_high": {"uniform": [0.2, 0.9]}},
        "scheduler": {"grace_period": 10}}))
    yield "unknown task", ["train", "nosuchtask"], None, ["nosuchtask", "task"]
    yield "missing data path", ["train", "gsm8k", "--data", "nope.jsonl"], None, [str(tmp / "nope.jsonl")]
    # A relative path that exists is resolved here, not in a worker's directory: the error is about its row.
    yield "relative data path, row without its answer (train)", ["train", "gsm8k", "--data", "data/no_answer.jsonl"], \
        None, [str(no_answer), "line 2", "'answer'"]
    yield "row without its answer (tune)", ["tune", "gsm8k", "--preset", "local", "--data", "data/no_answer.jsonl"], \
        None, [str(no_answer), "line 2", "'answer'"]
    yield "broken JSON Lines line", ["train", "gsm8k", "--data", str(broken)], None, [str(broken), "line 3", "JSON"]
    yield "YAML syntax error", ["tune", "gsm8k", "--space", "broken.yaml"], None, ["broken.yaml", "line 5", "line 4"]
    # The file's own values (t_low up to 0.8, t_high from 0.2), not the preset's t_high = 0.7.
    yield "space error", ["tune", "gsm8k", "--space", "rates.yaml"], None, ["rates.yaml", "0.8", "0.2"]
    if _no_gpu_machine():
        refusal = ["gsm8k.yaml", "8-GPU", "LLaDA", "--preset local", "cluster"]
        yield "paper space without GPUs", ["tune", "gsm8k"], None, refusal
        yield "empty RAY_ADDRESS", ["tune", "gsm8k"], {"RAY_ADDRESS": ""}, refusal


def test_bad_input_is_one_line_exit_2_in_seconds(tmp_path):
    timings = {}
    for name, command, env, named in _cases(tmp_path):
        done, seconds = _run(tmp_path, *command, env=env)
        output = (done.stdout + done.stderr).strip()
        timings[name] = round(seconds, 1)
        assert done.returncode == 2, (name, output[-2000:])
        assert len(output.splitlines()) <= 2, (name, output[-2000:])
        assert "Traceback" not in output, (name, output[-2000:])
        assert output.startswith("raydllm: error: "), (name, output)
        for culprit in named:
            assert culprit in output, (name, culprit, output)
        assert "0.7" not in output or name != "space error", output
        assert seconds < 30, (name, seconds)
    assert not (tmp_path / "raydllm_runs").exists()  # nothing started: no run folder, no log file
    print("bad-input seconds:", json.dumps(timings))


def test_quiet_log_stream_echoes_the_users_lines_once():
    from raydllm.cli.console import LogStream

    log, terminal = io.StringIO(), io.StringIO()
    stream = LogStream(log, terminal)
    stream.write("\x1b[36m(RayTrainWorker pid=12)\x1b[0m Setting up process group\n")
    stream.write("\x1b[36m(RayTrainWorker pid=12)\x1b[0m [raydllm] warning: data.answer_tokens=8 cuts 3 of 9 answers\n")
    stream.write("(RayTrainWorker pid=13) [raydllm] warning: data.answer_tokens=8 cuts 3 of 9 answers"
                 " [repeated 2x across cluster]\n(TrainController pid=9) [raydllm    12s] step 5/10, ")
    assert terminal.getvalue() == "raydllm: warning: data.answer_tokens=8 cuts 3 of 9 answers\n"
    stream.write("loss_total 1.2000\n")
    assert terminal.getvalue().splitlines()[-1] == "[raydllm    12s] step 5/10, loss_total 1.2000"
    assert "Setting up process group" in log.getvalue() and "pid=13" in log.getvalue()


def test_progress_view_plain_lines_on_state_changes_only():
    from raydllm.sweep.callbacks import SweepProgress

    def trial(status, step, lam, value=None):
        return SimpleNamespace(status=status, last_result={"step": step}, trial_id=f"t{lam}{step}",
                               config={"jepa.lambda": lam, "train.lr": 1e-3})

    out = io.StringIO()
    view = SweepProgress("val_loss_diff", "min", ["jepa.lambda", "train.lr"], 4, 10, stream=out)
    running, baseline = trial("RUNNING", 5, 1.0), trial("RUNNING", 5, 0.0)
    trials = [running, baseline, trial("PENDING", 0, 2.0), trial("PENDING", 0, 0.5)]
    view.update(trials, running, {"val_loss_diff": 0.9})
    view.update(trials, baseline, {"val_loss_diff": 0.95})  # the same states: no new line (not a terminal)
    view.update(trials, running, {"val_loss_diff": 0.8})
    assert len(out.getvalue().splitlines()) == 1
    running.status, running.last_result = "TERMINATED", {"step": 10}
    view.update(trials)
    last = out.getvalue().splitlines()[-1]
    assert "1 running, 2 pending, 1 done, 0 stopped early, 0 failed" in last
    assert "best jepa val_loss_diff 0.8000 (lambda=1 lr=0.001)" in last and "best baseline val_loss_diff 0.9500" in last
    assert "left" in last  # 1.5 of 4 trials' work done: an estimate of the rest

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    view = SweepProgress("val_loss_diff", "min", ["train.lr"], 4, 10, stream=screen)
    view.update(trials)
    view.close()
    assert screen.getvalue().startswith("\r[search") and screen.getvalue().count("\n") == 1  # redrawn in place


TINY = {
    "task": "gsm8k", "preset": "local", "metric": "val_loss_diff",
    "fixed": {"model.init": "random", "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
              "data.synthetic_size": 300, "data.val_limit": 16, "train.micro_batch_size": 8, "train.max_steps": 12,
              "train.eval_every": 2, "eval.final": False, "eval.probes": False},
    "space": {"train.lr": {"choice": [1.0e-3, 3.0e-3]}},
    "baseline": False, "seeds": [42], "scheduler": {"type": "fifo", "grace_period": 2},
    "search": {"algorithm": "grid", "seed": 0}, "num_samples": 1, "max_concurrent_trials": 2,
    "resources": {"workers": 1, "cpus_per_worker": 1},
}


@pytest.mark.ray
def test_ctrl_c_stops_the_sweep_killed_exit_130_and_the_same_command_resumes(tmp_path):
    from mlflow.tracking import MlflowClient

    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump({**TINY, "space": {"train.lr": {"grid": [1.0e-3, 3.0e-3]}}}))
    command = [sys.executable, "-m", "raydllm.cli.app", "tune", "gsm8k", "--space", str(space), "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    sweep = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    checkpoints = tmp_path / "raydllm_runs" / "sweep-gsm8k-tiny" / "train"
    deadline = time.time() + 600
    while time.time() < deadline and sweep.poll() is None and not any(checkpoints.glob("*/checkpoint_*")):
        time.sleep(1)
    assert sweep.poll() is None, "the sweep ended before it could be interrupted"
    os.kill(sweep.pid, signal.SIGINT)  # Ctrl-C, to the driver
    out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 130, err[-3000:]
    assert "run the same command again to resume" in err
    kept = sorted(p.name for p in checkpoints.glob("*/checkpoint_*"))
    assert kept  # the trials' checkpoints stay for the resume

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("raydllm-gsm8k")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`raydllm.kind` = 'sweep'")
    assert parent.info.status == "KILLED"
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert children and all(run.info.status != "RUNNING" for run in children)

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    outcome = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert outcome["restored"] is True and outcome["trials"] == 2 and outcome["failed"] == 0
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and {r.data.tags["raydllm.status"] for r in children} == {"completed"}
    assert any("raydllm.resumed_from_step" in r.data.tags for r in children)  # one picked up from its checkpoint


def _tiny_space(tmp_path: Path) -> Path:
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(TINY))
    return space


def test_a_sweep_stopped_by_an_error_ends_failed_never_running(tmp_path, monkeypatch):
    """Once the parent run is open, whatever stops the sweep closes it (here an error in a phase: FAILED)."""
    from mlflow.tracking import MlflowClient

    from raydllm.sweep import tune
    from raydllm.sweep.search_space import load_spec

    monkeypatch.setattr(tune, "ensure_ray_for_sweep", lambda spec: None)  # no Ray: the phases fail first
    monkeypatch.setattr("raydllm.sweep.train.warm_deepspeed_ops", lambda: None)

    def broken_phases(*args, **kwargs):
        raise RuntimeError("the search phase broke")

    monkeypatch.setattr(tune, "_run_phases", broken_phases)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = _tiny_space(tmp_path)
    with pytest.raises(RuntimeError):
        tune.run_spec(load_spec(space), space_text=space.read_text(), space_name=space.name, name="broken",
                      tracking_uri=uri, storage=str(tmp_path / "runs"), progress=False)
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("raydllm-gsm8k").experiment_id])
    assert parent.info.status == "FAILED" and "the search phase broke" in parent.data.tags["raydllm.error"]


def test_tune_exits_1_when_trials_failed_and_still_prints_the_summary(tmp_path, monkeypatch, capsys):
    from raydllm.sweep import tune
    from raydllm.cli.app import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tune, "run_spec", lambda spec, **kw: tune.SweepOutcome(
        name=kw["name"], parent_run_id="p", restored=False, trials=3, failed=1, summary="THE SUMMARY TABLE"))
    assert main(["tune", "gsm8k", "--space", str(_tiny_space(tmp_path)), "-v"]) == 1
    captured = capsys.readouterr()
    assert "THE SUMMARY TABLE" in captured.out
    assert "1 of 3 trials failed" in captured.err
