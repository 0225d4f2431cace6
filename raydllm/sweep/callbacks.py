"""Sweep layer: the driver-side Tune callbacks of a sweep: each trial's final status in MLflow (and the
checkpoints of trials ASHA stopped, deleted), and the progress view the terminal shows."""
from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from pathlib import Path

from raydllm.sweep import tracking
from raydllm.sweep.search_space import flatten_trial_config
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


# -- on the driver ------------------------------------------------------------------------------------------

def delete_checkpoints(run_folder: str) -> int:
    """Delete the `checkpoint_*` folders of one trial's Ray Train run (local or s3://...): a trial ASHA
    stopped is never resumed, and the repeat phase starts its configs afresh. Returns how many went."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(run_folder) if "://" in run_folder else (
            pafs.LocalFileSystem(), str(Path(run_folder).resolve()))
        children = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as exc:
        log.warning("could not list %s to delete its checkpoints: %s", run_folder, exc)
        return 0
    deleted = 0
    for info in children:
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            try:
                fs.delete_dir(info.path)
                deleted += 1
            except OSError as exc:
                log.warning("could not delete %s: %s", info.path, exc)
    return deleted


def _rung(step: int, grace: int, factor: float) -> int:
    return max(0, round(math.log(max(step, 1) / grace, factor))) if step >= grace else 0


class TrialStatusCallback:
    """Writes each trial's final status to its MLflow run from the driver (the trial itself may be killed)."""

    def __init__(self, tracking_uri: str, experiment: str, max_t: int, grace: int, factor: float,
                 train_storage: str | None = None):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.max_t, self.grace, self.factor = max_t, grace, factor
        self.train_storage = train_storage  # where trials' Train runs keep checkpoints (train-<trial id>)
        self.stopped: list[str] = []  # trial ids whose checkpoints were deleted

    def _run_id(self, trial_id: str) -> str | None:
        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        run = experiment and tracking.find_run(client, experiment.experiment_id, "raydllm.trial_id", trial_id)
        return run.info.run_id if run else None

    def _last_step(self, trial, run_id: str) -> int:
        """The last step trained: Tune's last result, or later (a stopped trial's worker may finish one
        more report after ASHA's decision; a restored trial may have trained past Tune's last record)."""
        history = MlflowClient(self.tracking_uri).get_metric_history(run_id, "loss_total")
        return max([int((trial.last_result or {}).get("step", 0))] + [m.step for m in history])

    def complete(self, trial) -> None:
        run_id = self._run_id(trial.trial_id)
        if run_id is None:
            return
        step = self._last_step(trial, run_id)
        # Completed or stopped is ASHA's decision, read from the result it decided on; a stopped trial's
        # worker may still train a few steps past that before it is killed (counted in last_step).
        if int((trial.last_result or {}).get("step", step)) >= self.max_t:
            tags = {"raydllm.status": "completed", "raydllm.last_step": str(step)}
        else:
            decided_at = int((trial.last_result or {}).get("step", step))  # the result ASHA stopped it on
            tags = {"raydllm.status": "stopped_early", "raydllm.last_step": str(step),
                    "raydllm.stopped_at_step": str(decided_at),
                    "raydllm.stopped_at_rung": str(_rung(decided_at, self.grace, self.factor))}
        checkpoint = (trial.last_result or {}).get("checkpoint_path")
        if tags["raydllm.status"] == "stopped_early" and self.train_storage:
            # Nothing resumes a trial ASHA stopped: its checkpoints only cost storage (~140 GB each at 8B).
            self.stopped.append(trial.trial_id)
            tags["raydllm.checkpoints_deleted"] = str(self.delete_stopped(trial.trial_id))
        elif checkpoint:  # forwarded by TuneReportCallback; `raydllm eval <run id>` finds the weights with it
            tags[tracking.CHECKPOINT_TAG] = str(checkpoint)
        tracking.finish_run(self.tracking_uri, run_id, "FINISHED", tags)

    def delete_stopped(self, trial_id: str) -> int:
        return delete_checkpoints(f"{self.train_storage.rstrip('/')}/train-{trial_id}")

    def error(self, trial) -> None:
        run_id = self._run_id(trial.trial_id)
        if run_id is None:
            return
        message = _trial_error(trial)
        tracking.finish_run(self.tracking_uri, run_id, "FAILED",
                            {"raydllm.status": "failed", "raydllm.error": message[:5000],
                             "raydllm.last_step": str(self._last_step(trial, run_id))})


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    if path and Path(path).exists():
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1] if lines else "error"
    return str(getattr(trial, "error_msg", "") or "error")


class SweepProgress:
    """The live view of one phase of a sweep, in place of Ray's scrolling table: trials by state, the best
    result so far of each arm (DLLM-JEPA, and the lambda = 0 baseline), elapsed time and an estimate of what is
    left. On a terminal one line redrawn in place; otherwise (a file, a pipe) a plain line whenever a trial
    ends, and at most once a minute when only the rest has moved."""

    QUIET_S = 60.0  # a non-terminal stream gets a line per ended trial, else at most one per this many seconds

    def __init__(self, metric: str, mode: str, keys: list[str], total: int, max_t: int, *, phase: str = "search",
                 stream=None, launches=None):
        self.metric, self.mode, self.keys, self.total, self.max_t = metric, mode, keys, total, max_t
        # launches.LaunchWatch: node launches that failed (quota, capacity), each shown once on its own line
        self.launches = launches
        self.phase = phase
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.best: dict[str, tuple[float, dict]] = {}  # arm -> (value, searched params)
        self.started = time.time()
        self.last_states: tuple | None = None
        self.last_written = 0.0
        self.drawn = False

    def __getstate__(self):  # Tune pickles the hooks with the sweep; a stream does not pickle
        return {**self.__dict__, "stream": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.stream = sys.stderr

    def _better(self, value: float, arm: str) -> bool:
        if arm not in self.best:
            return True
        return value < self.best[arm][0] if self.mode == "min" else value > self.best[arm][0]

    def update(self, trials, trial=None, result=None) -> None:
        if result is not None and self.metric in result:
            config = flatten_trial_config(trial.config)
            arm = "baseline" if float(config.get("jepa.lambda", 1.0)) == 0 else "jepa"
            if self._better(float(result[self.metric]), arm):
                self.best[arm] = (float(result[self.metric]), {k: config.get(k) for k in self.keys})
        states, fraction = self._states(trials)
        now = time.time()
        for failure in self.launches.poll(now) if self.launches else []:
            self._write_line(failure)
        # A terminal is redrawn on any change (at most once a second for the clock); a file gets a line when a
        # trial ends, so a sweep's log is about one line per trial.
        key = states if self.tty else states[2:5]
        changed = key != self.last_states
        if not changed and now - self.last_written < (1.0 if self.tty else self.QUIET_S):
            return
        self.last_states, self.last_written = key, now
        line = self.line(states, fraction, now - self.started)
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns
            self.stream.write("\r" + line[:width - 1] + "\x1b[K")
            self.drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _write_line(self, text: str) -> None:
        """A line of its own above the progress line (which the next update redraws)."""
        self.stream.write(("\r\x1b[K" if self.tty and self.drawn else "") + text + "\n")
        self.stream.flush()
        self.last_states = None  # the progress line goes under it at once

    def _states(self, trials) -> tuple[tuple, float]:
        """(running, pending, done, stopped early, failed), and the share of the phase's work done: a finished
        trial counts whole, a running one by its step."""
        running = pending = done = stopped = failed = 0
        work = 0.0
        for t in trials:
            step = int((t.last_result or {}).get("step", 0))
            if t.status == "RUNNING":
                running += 1
                work += min(step / self.max_t, 1.0)
            elif t.status == "TERMINATED":
                done, stopped = (done + 1, stopped) if step >= self.max_t else (done, stopped + 1)
                work += 1
            elif t.status == "ERROR":
                failed += 1
                work += 1
            else:
                pending += 1
        total = max(self.total, len(trials), 1)
        return (running, pending, done, stopped, failed, len(trials)), work / total

    def line(self, states: tuple, fraction: float, elapsed: float) -> str:
        running, pending, done, stopped, failed, seen = states
        of = f"/{self.total}" if self.total else ""
        line = (f"[{self.phase} {_duration(elapsed)}] trials {seen}{of}: {running} running, {pending} pending, "
                f"{done} done, {stopped} stopped early, {failed} failed")
        for arm in ("jepa", "baseline"):
            if arm in self.best:
                value, params = self.best[arm]
                shown = "" if arm == "baseline" else " (" + " ".join(
                    f"{k.split('.')[-1]}={_short(v)}" for k, v in params.items()) + ")"
                line += f" | best {arm} {self.metric} {value:.4f}{shown}"
        if 0.02 < fraction < 1:
            line += f" | ~{_duration(elapsed * (1 - fraction) / fraction)} left"
        return line

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def sweep_callbacks(status: TrialStatusCallback, progress: SweepProgress | None):
    from ray.tune import Callback

    class SweepHooks(Callback):
        """Tune's driver-side hooks -> MLflow trial status and the progress view. Tune pickles them with the
        sweep; a restored sweep swaps in the progress view of the process that restores it."""

        def __init__(self):
            self.status, self.progress = status, progress

        def on_step_end(self, iteration, trials, **info):  # keeps the elapsed time and estimate moving
            if self.progress:
                self.progress.update(trials)

        def on_trial_start(self, iteration, trials, trial, **info):
            if self.progress:
                self.progress.update(trials)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.progress:
                self.progress.update(trials, trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.status.complete(trial)
            if self.progress:
                self.progress.update(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.status.error(trial)
            if self.progress:
                self.progress.update(trials)

    return [SweepHooks()]
