"""Sweep layer: a multi-objective ASHA for Ray Tune: trials promoted at each rung by Pareto rank.

`ParetoASHA` is Ray 2.60's one-bracket `AsyncHyperBandScheduler` (ASHA) with the one-metric quantile cut replaced
by non-dominated sorting of objective vectors (pareto.rank_order: front first, then crowding distance). Its
milestones, its clock and when it decides are Ray's; only the test at a rung differs. `replay` runs the real
scheduler over recorded curves as an asynchronous sweep would, so the bench can ask how many trial-steps a sweep
would have spent and which trials it would have kept, without a cluster.
"""
from __future__ import annotations

import heapq
import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from raydllm.core.config import ConfigError
from raydllm.sweep.pareto import non_dominated_sort, rank_order

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
COMPLETE = "COMPLETE"  # a decision row for a trial recorded as it finished: nothing is decided then


def milestones(grace_period: int, reduction_factor: float, max_t: int) -> list[float]:
    """The rungs, ascending: grace * rf^k for as many k as Ray's one bracket has (the same expression, so the
    same float rounding: a milestone equal to max_t exists when grace * rf^k lands on it, and is only ever
    filled by finished trials since a result at max_t stops the trial before any rung is looked at)."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor ** k for k in range(count)]


class Decision(NamedTuple):
    """One rung decision: the trial's place in the rung's rank order (0 = best; None when its vector could not be
    ranked), how many places continue, and what the scheduler answered (CONTINUE, STOP or COMPLETE)."""
    trial_id: str
    milestone: float
    position: int | None
    allowed: int
    action: str


class ParetoASHA(FIFOScheduler):
    """Asynchronous successive halving on several objectives.

    Rungs (as Ray's ASHA with one bracket): milestones grace_period * reduction_factor^k (k = 0, 1, ...) up to
    max_t on the clock `time_attr`, which results must carry. A result whose clock has passed a milestone at which
    the trial has no record yet is recorded at the highest such milestone and decided there, once, on arrival,
    against the vectors recorded there so far; later results at the same rung (a resumed trial re-reporting) just
    continue. A result at or past max_t stops the trial (it has finished); a finished trial's final result is
    recorded like any other but decides nothing.

    The rule at a rung: the arriving trial's objective vector joins the n - 1 vectors recorded there (n counts it),
    all n are ordered by `pareto.rank_order` (non-dominated front first, then larger crowding distance within a
    front), and the trial continues iff its position is below max(1, ceil(n / reduction_factor)): it must be among
    the best 1/rf of the rung as it stands. The arriving vector is placed first among equals, so a tie goes to it,
    as Ray's `value >= cutoff` does; the first trial to reach a rung always continues.

    With one objective this is Ray's rule up to its interpolated quantile: with m trials already recorded and p of
    them strictly better than the newcomer, both continue it when p <= floor((m - 1) / rf) and both stop it when
    p > ceil((m - 1) / rf); only at p = ceil((m - 1) / rf) with (m - 1) / rf fractional does Ray's linear
    interpolation between two recorded values decide where this rule counts places (for rf >= 2 this rule then
    continues iff p < ceil((m + 1) / rf)). One more, at an integral (m - 1) / rf: Ray's floating-point quantile can
    land a hair above the recorded value there, so Ray stops a newcomer that ties that value exactly; this rule
    continues it.

    Differences from Ray's ASHA, all deliberate:
    - a result carrying the clock but missing an objective (or with a non-numeric one) raises ConfigError naming
      it (Ray silently skips the decision, which would let every trial run to max_t);
    - a NaN objective at a rung stops the trial without recording it (it cannot be ranked; Ray continues it);
    - a trial whose first result past a rung is already past a higher rung is decided at the higher one only;
      Ray decides it there and later, on its next results, at the lower rungs it skipped, with values from steps
      the other trials there never saw. The two agree whenever trials report at least once between rungs.

    `metric`/`mode` from `tune.TuneConfig` are not used (they are None in a multi-objective sweep); the objectives
    are the constructor's. `decisions` lists every rung decision in the order they were made.
    """

    def __init__(self, objectives: Mapping[str, str], *, time_attr: str = "step", max_t: int, grace_period: int,
                 reduction_factor: float = 3):
        if not objectives:
            raise ConfigError("objectives: at least one objective is needed")
        for name, mode in objectives.items():
            if mode not in ("min", "max"):
                raise ConfigError(f"objectives.{name}: mode must be 'min' or 'max', got {mode!r}")
        if not max_t > 0:
            raise ConfigError(f"max_t: must be positive, got {max_t}")
        if not grace_period > 0:
            raise ConfigError(f"grace_period: must be positive, got {grace_period}")
        if grace_period > max_t:
            raise ConfigError(f"grace_period: {grace_period} is past max_t {max_t}")
        if not reduction_factor > 1:
            raise ConfigError(f"reduction_factor: must be greater than 1, got {reduction_factor}")
        super().__init__()
        self._objectives = dict(objectives)
        self._modes = list(self._objectives.values())
        self._time_attr = time_attr
        self._max_t = max_t
        self._reduction_factor = reduction_factor
        # milestone -> {trial_id: objective vector}, in the order the trials arrived there
        self._rungs: dict[float, dict[str, tuple[float, ...]]] = {
            m: {} for m in milestones(grace_period, reduction_factor, max_t)}
        self._num_stopped = 0
        self.decisions: list[Decision] = []

    @property
    def objectives(self) -> dict[str, str]:
        return dict(self._objectives)

    def rung_records(self) -> dict[float, dict[str, tuple[float, ...]]]:
        """A copy of what each rung has recorded: milestone -> {trial_id: objective vector}."""
        return {m: dict(recorded) for m, recorded in self._rungs.items()}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        # Tune passes TuneConfig's metric and mode (None in a multi-objective sweep); the objectives given to the
        # constructor decide, so any pair is accepted and `self.metric` stays None (Tune then checks no single
        # metric of ours in the results: _vector does, for all of them).
        return True

    def on_trial_add(self, tune_controller, trial) -> None:
        pass  # one bracket: nothing to assign (Tune re-adds every trial of a restored sweep, finished ones too)

    def on_trial_remove(self, tune_controller, trial) -> None:
        pass  # its rung records stay: they are what the others were measured against (as Ray)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._time_attr not in result:
            return CONTINUE  # no clock, no rung (as Ray)
        now = result[self._time_attr]
        vector = self._vector(trial.trial_id, result)
        if now >= self._max_t:
            action = STOP
        else:
            action = self._at_rung(trial.trial_id, now, vector, finished=False)
        if action == STOP:
            self._num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if self._time_attr in result:  # a trial that never reported has nothing to record
            self._at_rung(trial.trial_id, result[self._time_attr], self._vector(trial.trial_id, result),
                          finished=True)

    def _vector(self, trial_id: str, result: dict) -> tuple[float, ...]:
        values = []
        for name in self._objectives:
            if name not in result:
                raise ConfigError(f"objectives.{name}: trial {trial_id}'s result at {self._time_attr}="
                                  f"{result[self._time_attr]} has no {name!r} (it has: {', '.join(sorted(result))})")
            try:
                values.append(float(result[name]))
            except (TypeError, ValueError):
                raise ConfigError(f"objectives.{name}: trial {trial_id}'s result at {self._time_attr}="
                                  f"{result[self._time_attr]} has {name}={result[name]!r}, not a number") from None
        return tuple(values)

    def _at_rung(self, trial_id: str, now: float, vector: tuple[float, ...], *, finished: bool) -> str:
        passed = [m for m in self._rungs if m <= now]
        if not passed:
            return CONTINUE  # before the grace period
        milestone = passed[-1]
        recorded = self._rungs[milestone]
        if trial_id in recorded:
            return CONTINUE  # decided when it first arrived here (a resumed trial reports the rung again)
        if any(math.isnan(v) for v in vector):
            self.decisions.append(Decision(trial_id, milestone, None, 0, COMPLETE if finished else STOP))
            return STOP
        # The newcomer first: rank_order breaks exact ties by index, so a tie goes to it (Ray's `>= cutoff`).
        points = [vector, *recorded.values()]
        position = rank_order(points, self._modes).index(0)
        allowed = max(1, math.ceil(len(points) / self._reduction_factor))
        action = CONTINUE if position < allowed else STOP
        recorded[trial_id] = vector
        self.decisions.append(Decision(trial_id, milestone, position, allowed, COMPLETE if finished else action))
        return action

    def debug_string(self) -> str:
        rungs = []
        for milestone, recorded in self._rungs.items():
            front = len(non_dominated_sort(list(recorded.values()), self._modes)[0]) if recorded else 0
            rungs.append(f"{self._time_attr} {milestone:g}: {len(recorded)} recorded, {front} on the front")
        return (f"Using ParetoASHA ({', '.join(f'{n} {m}' for n, m in self._objectives.items())}): "
                f"num_stopped={self._num_stopped}\n" + " | ".join(rungs))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as out:
            pickle.dump(self.__dict__, out)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as source:
            self.__dict__.update(pickle.load(source))


# -- replaying recorded curves ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _ReplayTrial:
    """What a scheduler reads of a trial here: its id."""
    trial_id: str


class TrialOutcome(NamedTuple):
    reached: float  # the clock of the last result it reported
    stopped: bool  # stopped at a rung (not by reaching max_t, nor by its curve ending)


@dataclass
class Replay:
    """What an asynchronous sweep over recorded curves did: per trial how far it went, the trial-steps spent in
    all (the sum of `reached`), every result as (time, trial_id, step, action) in the order the scheduler saw
    them, and the scheduler's rung decisions (ParetoASHA's; empty for another scheduler)."""
    trials: dict[str, TrialOutcome]
    trial_steps: float
    events: list[tuple[float, str, float, str]] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)


Curve = Sequence[tuple[float, Mapping[str, float]]]


def replay(objectives: Mapping[str, str], curves: Mapping[str, Curve], order: Sequence[str], *, max_t: int,
           grace_period: int, reduction_factor: float = 3, concurrency: int) -> Replay:
    """Run a ParetoASHA over recorded curves as an asynchronous sweep would.

    curves: {trial_id: [(step, {objective: value}), ...]}, steps increasing; `order`: the trials in the order they
    start (a subset of the curves is fine). `concurrency` trials run at once; a trial started at time t reports
    its result at step s at time t + s (so every trial trains at the same speed), results at the same time go in
    the order their trials started, and the next trial of `order` starts when one stops or finishes its curve."""
    scheduler = ParetoASHA(objectives, time_attr="step", max_t=max_t, grace_period=grace_period,
                           reduction_factor=reduction_factor)
    return simulate(scheduler, curves, order, concurrency=concurrency, max_t=max_t)


def simulate(scheduler: TrialScheduler, curves: Mapping[str, Curve], order: Sequence[str], *, concurrency: int,
             max_t: float, time_attr: str = "step") -> Replay:
    """`replay` with any Tune scheduler already built (e.g. Ray's ASHAScheduler with its metric and mode, to
    compare): only the trial id is given to it, and no controller."""
    if concurrency < 1:
        raise ConfigError(f"concurrency: must be at least 1, got {concurrency}")
    if len(set(order)) != len(order):
        raise ConfigError("order: a trial is listed twice")
    for trial_id in order:
        if trial_id not in curves:
            raise ConfigError(f"order: trial {trial_id!r} has no curve")
        steps = [step for step, _ in curves[trial_id]]
        if not steps or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ConfigError(f"curves.{trial_id}: steps must be increasing and there must be at least one")
    waiting = list(reversed(order))
    queue: list[tuple[float, int, str, int, float]] = []  # (time, start sequence, trial, report index, start time)
    started = 0
    outcomes: dict[str, TrialOutcome] = {}
    events: list[tuple[float, str, float, str]] = []

    def start(now: float) -> None:
        nonlocal started
        trial_id = waiting.pop()
        scheduler.on_trial_add(None, _ReplayTrial(trial_id))
        heapq.heappush(queue, (now + curves[trial_id][0][0], started, trial_id, 0, now))
        started += 1

    while waiting and started < concurrency:
        start(0.0)
    while queue:
        now, sequence, trial_id, index, began = heapq.heappop(queue)
        step, values = curves[trial_id][index]
        result = {time_attr: step, **values}
        action = scheduler.on_trial_result(None, _ReplayTrial(trial_id), result)
        events.append((now, trial_id, step, action))
        last = index + 1 == len(curves[trial_id])
        if action == STOP or last:
            scheduler.on_trial_complete(None, _ReplayTrial(trial_id), result)
            outcomes[trial_id] = TrialOutcome(step, action == STOP and step < max_t)
            if waiting:
                start(now)
        else:
            heapq.heappush(queue, (began + curves[trial_id][index + 1][0], sequence, trial_id, index + 1, began))
    return Replay(trials={t: outcomes[t] for t in order}, trial_steps=sum(o.reached for o in outcomes.values()),
                  events=events, decisions=list(getattr(scheduler, "decisions", [])))
