"""Sweep layer: Optuna as Ray Tune's search algorithm, told which trials the scheduler cut short.

Tune saves a sweep's search algorithm with the standard `pickle` (OptunaSearch.save, at every experiment
checkpoint, so that a resumed sweep continues the same search): every object in it must pickle by reference to
an importable class and hold nothing unpicklable.

Ray's OptunaSearch tells Optuna that every trial that ended without an error is COMPLETE, with its last result:
a trial ASHA stopped at its first rung then counts as a finished one (TPE models its low-rung value as a final
value; NSGA-II breeds from it). `RungAwareOptunaSearch` tells Optuna such a trial was PRUNED instead.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II without its thread lock in the pickled state (Optuna 5 holds one, which cannot be
    pickled); a restored sampler gets a new lock."""

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_thread_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


class RungAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that knows the scheduler's last rung (`max_t`, on the clock `time_attr`: the sweep's
    schedulers run on "step").

    - Each result of a one-objective search is an intermediate value of its Optuna trial at its step (Optuna
      holds none for several objectives: `Trial.report` refuses them).
    - A trial that ends without an error and without a result at or past `max_t` was stopped by the scheduler:
      its Optuna trial ends PRUNED. One objective: Optuna gives it its last intermediate value (the rung it was
      stopped at), and TPE ranks pruned trials after the complete ones, those that went further first
      (optuna/samplers/_tpe/sampler.py, `_split_trials` and `_get_pruned_trial_score`). Several objectives: no
      values; NSGA-II counts only COMPLETE trials in a generation and picks parents among them
      (optuna/samplers/_ga/_base.py: `_sync_generation_cache` caches COMPLETE trials only, and `get_population`,
      which `NSGAIISampler.select_parent` in optuna/samplers/nsgaii/_sampler.py selects from, returns them), so
      a stopped trial is never a parent and does not fill a generation. Multi-objective TPE ranks pruned trials
      without values after every complete one.
    - A trial that reaches `max_t`, an errored trial, a trial removed before it ran, and every trial when
      `max_t` is None (no scheduler cuts trials short): as OptunaSearch does.

    The same rule as TrialStatusCallback's "completed" / "stopped_early" tags (callbacks.py): the result the
    scheduler decided on, at or past max_t or not.
    """

    def __init__(self, *args: Any, max_t: int | None = None, time_attr: str = "step", **kwargs: Any):
        self._max_t = max_t
        self._time_attr = time_attr
        self._reported: dict[str, set[int]] = {}  # steps already reported per trial (Optuna keeps the first)
        super().__init__(*args, **kwargs)

    def _step(self, result: dict) -> int | None:
        step = result.get(self._time_attr, result.get(TRAINING_ITERATION))
        return None if step is None else int(step)

    def _report(self, trial_id: str, result: dict) -> None:
        """The result's value as its trial's intermediate value at its step, once per step (one objective)."""
        if isinstance(self.metric, list) or trial_id not in self._ot_trials:
            return
        step, value = self._step(result), result.get(self.metric)
        if step is None or value is None or step in self._reported.setdefault(trial_id, set()):
            return
        self._ot_trials[trial_id].report(float(value), step)
        self._reported[trial_id].add(step)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials:
            return super().on_trial_result(trial_id, result)  # Ray's warning
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # Tune gives the scheduler's decision result here, not to on_trial_result (tune_controller.py): report it.
        if result and not error and trial_id not in self._completed_trials:
            self._report(trial_id, result)
        step = self._step(result) if result else None
        self._reported.pop(trial_id, None)
        if (error or step is None or self._max_t is None or step >= self._max_t
                or trial_id in self._completed_trials or trial_id not in self._ot_trials):
            return super().on_trial_complete(trial_id, result=result, error=error)
        try:  # stopped at a rung below max_t
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        except Exception as exc:  # noqa: BLE001 - as OptunaSearch does: one bad trial must not stop the sweep
            log.warning(exc)
        self._completed_trials.add(trial_id)
