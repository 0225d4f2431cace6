"""Pareto fronts on hand-made vectors, and the multi-objective ASHA (ParetoASHA) on recorded curves: its
promotion decisions in an asynchronous replay, its agreement with Ray's ASHA on one objective, save/restore."""
import math
import random

import pytest

from raydllm.core.config import ConfigError
from raydllm.sweep.pareto import (crowding_distance, dominates, hypervolume, non_dominated_sort, pareto_front,
                            rank_order, reference_point)
from raydllm.sweep.pareto_asha import (COMPLETE, CONTINUE, STOP, Decision, ParetoASHA, TrialOutcome, milestones, replay,
                                 simulate)

# -- the Pareto math --------------------------------------------------------------------------------------------

MIXED = [(1, 0.5), (2, 0.9), (2, 0.4), (3, 0.9), (1, 0.5)]  # (loss, accuracy); points 0 and 4 are equal


def test_non_dominated_sort_mixed_modes_and_duplicates():
    # loss min, accuracy max: (2, .4) is beaten by (1, .5) on both, (3, .9) by (2, .9) on loss
    assert non_dominated_sort(MIXED, ["min", "max"]) == [[0, 1, 4], [2, 3]]
    # the opposite senses turn the order over: (2, .4) and (3, .9) are now the front
    assert non_dominated_sort(MIXED, ["max", "min"]) == [[2, 3], [0, 1, 4]]
    assert pareto_front(MIXED, ["min", "max"]) == [0, 1, 4] and pareto_front([], ["min"]) == []
    assert not dominates(MIXED[0], MIXED[4], ["min", "max"])  # equal points do not dominate each other
    assert dominates((2, 0.9), (3, 0.9), ["min", "max"]) and not dominates((3, 0.9), (2, 0.9), ["min", "max"])
    # a chain: three fronts of one point each
    assert non_dominated_sort([(3, 3), (1, 1), (2, 2)], ["min", "min"]) == [[1], [2], [0]]


@pytest.mark.parametrize("points,modes,message", [([(1, 2)], ["min", "low"], "mode"),
                                                  ([(1, 2), (1,)], ["min", "min"], "point 1"),
                                                  ([(1, math.nan)], ["min", "min"], "NaN")])
def test_bad_points_are_refused(points, modes, message):
    with pytest.raises(ValueError, match=message):
        non_dominated_sort(points, modes)


FRONT = [(1, 8), (2, 5), (4, 3), (8, 1)]  # one front, both minimised; each objective spans 7


def test_crowding_distance_by_hand():
    # (2, 5): neighbours 1 and 4 on the first objective, 3 and 8 on the second: 3/7 + 5/7
    # (4, 3): neighbours 2 and 8, then 1 and 5: 6/7 + 4/7; the extremes of each objective are kept first
    assert crowding_distance(FRONT, ["min", "min"]) == pytest.approx([math.inf, 8 / 7, 10 / 7, math.inf])
    # maximising the negated second objective is the same front
    assert crowding_distance([(a, -b) for a, b in FRONT], ["min", "max"]) == pytest.approx(
        [math.inf, 8 / 7, 10 / 7, math.inf])
    assert crowding_distance([(1, 2), (2, 1)], ["min", "min"]) == [math.inf, math.inf]
    # a constant objective adds nothing; the first and last of the other objective's order are the ends
    assert crowding_distance([(1, 5), (2, 5), (4, 5)], ["min", "min"]) == pytest.approx([math.inf, 1.0, math.inf])


def test_rank_order_front_then_crowding_then_index():
    points = [(4, 3), (2, 5), (5, 6), (1, 8), (8, 1), (3, 6)]
    # front 0 = points 0, 1, 3, 4: the two extremes (3, 4; infinite crowding, by index), then 0 (10/7) before
    # 1 (8/7); (3, 6) dominates (5, 6), so they are fronts 1 and 2
    assert non_dominated_sort(points, ["min", "min"]) == [[0, 1, 3, 4], [5], [2]]
    assert rank_order(points, ["min", "min"]) == [3, 4, 0, 1, 5, 2]
    # duplicates: equal crowding, the earlier index first
    assert rank_order([(2, 2), (1, 3), (2, 2), (3, 1)], ["min", "min"]) == [1, 3, 0, 2]


def test_hypervolume_two_objectives_by_hand():
    staircase = [(1, 3), (2, 2), (3, 1)]  # under reference (4, 4): slabs of area 1, 2 and 3
    assert hypervolume(staircase, ["min", "min"], (4, 4)) == pytest.approx(6.0)
    # a dominated point, a duplicate, a point outside the reference and one on its boundary add nothing
    more = staircase + [(3, 3), (2, 2), (5, 0), (4, 0)]
    assert hypervolume(more, ["min", "min"], (4, 4)) == pytest.approx(6.0)
    # the same set with the second objective maximised (values and reference negated)
    assert hypervolume([(a, -b) for a, b in more], ["min", "max"], (4, -4)) == pytest.approx(6.0)
    assert hypervolume([(5, 5)], ["min", "min"], (4, 4)) == 0.0
    assert hypervolume([], ["min", "min"], (4, 4)) == 0.0


def test_hypervolume_three_objectives_by_inclusion_exclusion():
    points = [(1, 2, 3), (2, 1, 2), (3, 3, 1)]
    # boxes up to (4, 4, 4): 3*2*1 + 2*3*2 + 1*1*3 = 21; pairwise overlaps (corners (2,2,3), (3,3,3), (3,3,2))
    # 4 + 1 + 2; the triple overlap (corner (3,3,3)) 1: 21 - 7 + 1 = 15
    assert hypervolume(points, ["min", "min", "min"], (4, 4, 4)) == pytest.approx(15.0)
    assert hypervolume([(-x, y, -z) for x, y, z in points], ["max", "min", "max"], (-4, 4, -4)) == pytest.approx(15.0)


def test_reference_point_is_past_the_worst_of_every_set():
    # loss (min) worst 3 over a span of 2, accuracy (max) worst 0.2 over a span of 0.4; 10 % further out
    ref = reference_point([[(1, 0.6)], [(3, 0.2), (2, 0.4)]], ["min", "max"])
    assert ref == pytest.approx([3.2, 0.16])
    assert hypervolume([(3, 0.2)], ["min", "max"], ref) > 0  # the worst point still counts
    with pytest.raises(ValueError, match="no points"):
        reference_point([[]], ["min"])


# -- ParetoASHA: a recorded asynchronous replay ----------------------------------------------------------------

OBJECTIVES = {"loss": "min", "acc": "max"}


def _curve(*points):
    """(loss, acc) at steps 1, 3, 6, 9 (a curve may stop early)."""
    return [(step, {"loss": loss, "acc": acc}) for step, (loss, acc) in zip((1, 3, 6, 9), points)]


# Rungs at steps 1 and 3 (grace 1, factor 3), and 9 = max_t, which only finished trials fill.
CURVES = {
    "A": _curve((2.0, 0.30), (1.6, 0.35), (1.5, 0.40), (1.3, 0.45)),
    "B": _curve((1.8, 0.25), (1.7, 0.30), (1.6, 0.30), (1.5, 0.32)),
    "C": _curve((2.2, 0.20), (2.0, 0.25), (1.9, 0.30), (1.8, 0.30)),
    "D": _curve((1.9, 0.28), (1.8, 0.30), (1.7, 0.32), (1.6, 0.35)),
    "E": _curve((1.5, 0.40), (1.2, 0.50), (1.1, 0.55), (1.0, 0.60)),
    "F": _curve((2.5, 0.45), (2.3, 0.32), (2.2, 0.35), (2.1, 0.36)),
    "G": _curve((1.7, 0.35), (1.4, 0.45), (1.2, 0.50), (1.1, 0.55)),
}


def test_replay_promotes_by_pareto_rank():
    """Two trials at a time, in the order A..G; a trial started at t reports step s at t + s.

    t=1  A@1 first at rung 1: continues.  B@1 (1.8, .25) vs A (2.0, .30): neither dominates, a two-point front
         (both crowding infinite): the tie goes to the newcomer, position 0 of ceil(2/3) = 1: continues.
    t=3  A@3 first at rung 3.  B@3 (1.7, .30) is dominated by A (1.6, .35): position 1 of 1 allowed: stopped; C starts.
    t=4  C@1 (2.2, .20) is dominated by A and B: position 2 of 1 allowed: stopped; D starts.
    t=5  D@1 (1.9, .28) is on the front with A and B, but between them: crowding 2 against their infinity, position
         2 of ceil(4/3) = 2 allowed: stopped although non-dominated; E starts.
    t=6  E@1 (1.5, .40) dominates every vector of rung 1: continues.   t=8  E@3 dominates A and B: continues.
    t=9  A@9 = max_t: finished (recorded at rung 9); F starts.
    t=10 F@1 (2.5, .45): the best accuracy yet, a front {E, F} of two: continues (position 0 of 2).
    t=12 F@3 (2.3, .32): fronts {E}, {A}, {F, B}: position 2 of ceil(4/3) = 2: stopped; G starts.
    t=13 G@1 (1.7, .35): dominated by E, yet third of seven (fronts {E, F}, {G}, ...), and ceil(7/3) = 3 go on.
    t=14 E@9 finished.   t=15 G@3 (1.4, .45): fronts {E}, {G}, ...: position 1 of 2: continues.   t=21 G finished.
    """
    result = replay(OBJECTIVES, CURVES, "ABCDEFG", max_t=9, grace_period=1, reduction_factor=3, concurrency=2)
    assert result.decisions == [
        Decision("A", 1, 0, 1, CONTINUE), Decision("B", 1, 0, 1, CONTINUE),
        Decision("A", 3, 0, 1, CONTINUE), Decision("B", 3, 1, 1, STOP),
        Decision("C", 1, 2, 1, STOP), Decision("D", 1, 2, 2, STOP),
        Decision("E", 1, 0, 2, CONTINUE), Decision("E", 3, 0, 1, CONTINUE),
        Decision("A", 9, 0, 1, COMPLETE), Decision("F", 1, 0, 2, CONTINUE),
        Decision("F", 3, 2, 2, STOP), Decision("G", 1, 2, 3, CONTINUE),
        Decision("E", 9, 0, 1, COMPLETE), Decision("G", 3, 1, 2, CONTINUE),
        Decision("G", 9, 1, 1, COMPLETE)]
    assert result.trials == {"A": TrialOutcome(9, False), "B": TrialOutcome(3, True), "C": TrialOutcome(1, True),
                             "D": TrialOutcome(1, True), "E": TrialOutcome(9, False), "F": TrialOutcome(3, True),
                             "G": TrialOutcome(9, False)}
    assert result.trial_steps == 9 + 3 + 1 + 1 + 9 + 3 + 9
    # the interleaving: results in time order, equal times in start order; A@6 reports between rungs
    assert [(t, trial, step) for t, trial, step, _ in result.events[:9]] == [
        (1, "A", 1), (1, "B", 1), (3, "A", 3), (3, "B", 3), (4, "C", 1), (5, "D", 1), (6, "A", 6), (6, "E", 1),
        (8, "E", 3)]
    assert [action for _, trial, step, action in result.events if step == 9] == [STOP, STOP, STOP]  # max_t


def test_replay_with_one_slot_runs_trials_one_after_another():
    result = replay(OBJECTIVES, CURVES, ["E", "A", "B"], max_t=9, grace_period=1, reduction_factor=3, concurrency=1)
    # E sets every rung; A is dominated at rung 1 (n = 2, one place) and B too
    assert result.trials == {"E": TrialOutcome(9, False), "A": TrialOutcome(1, True), "B": TrialOutcome(1, True)}
    assert [t for t, *_ in result.events] == [1, 3, 6, 9, 10, 11]
    assert result.trial_steps == 11


def test_replay_checks_its_inputs():
    with pytest.raises(ConfigError, match="order: trial 'Z'"):
        replay(OBJECTIVES, CURVES, ["A", "Z"], max_t=9, grace_period=1, concurrency=2)
    with pytest.raises(ConfigError, match="curves.X: steps"):
        replay(OBJECTIVES, {"X": [(3, {}), (1, {})]}, ["X"], max_t=9, grace_period=1, concurrency=1)
    with pytest.raises(ConfigError, match="concurrency"):
        replay(OBJECTIVES, CURVES, ["A"], max_t=9, grace_period=1, concurrency=0)


def test_a_curve_ending_before_max_t_is_not_counted_as_stopped():
    curves = {"A": CURVES["A"][:3], "B": CURVES["B"][:1], "C": CURVES["C"][:1]}
    result = replay(OBJECTIVES, curves, "ABC", max_t=9, grace_period=1, reduction_factor=3, concurrency=1)
    # B continues at rung 1 (on the front with A), then its curve ends; C is dominated there
    assert result.trials == {"A": TrialOutcome(6, False), "B": TrialOutcome(1, False), "C": TrialOutcome(1, True)}
    assert result.trial_steps == 8


# -- ParetoASHA and Ray's ASHA on one objective -----------------------------------------------------------------

class _T:
    def __init__(self, trial_id):
        self.trial_id = trial_id


@pytest.mark.parametrize("max_t,grace,factor", [(444, 74, 3), (135, 10, 4), (40, 5, 2), (9, 1, 3), (1000, 1, 10)])
def test_milestones_are_rays(max_t, grace, factor):
    from ray.tune.schedulers import ASHAScheduler

    asha = ASHAScheduler(time_attr="step", max_t=max_t, grace_period=grace, reduction_factor=factor)
    assert milestones(grace, factor, max_t) == sorted(m for m, _ in asha._brackets[0]._rungs)


LOSS_CURVES = {  # loss at steps 1, 3, 6, 9
    "a": [(1, {"loss": 5.0}), (3, {"loss": 4.0}), (6, {"loss": 3.0}), (9, {"loss": 2.0})],
    "b": [(1, {"loss": 4.0}), (3, {"loss": 4.5}), (6, {"loss": 4.0}), (9, {"loss": 3.5})],
    "c": [(1, {"loss": 6.0}), (3, {"loss": 5.0}), (6, {"loss": 4.0}), (9, {"loss": 3.0})],
    "d": [(1, {"loss": 3.0}), (3, {"loss": 2.5}), (6, {"loss": 2.0}), (9, {"loss": 1.5})],
    "e": [(1, {"loss": 4.5}), (3, {"loss": 3.0}), (6, {"loss": 2.5}), (9, {"loss": 2.0})],
    "f": [(1, {"loss": 3.5}), (3, {"loss": 2.0}), (6, {"loss": 1.5}), (9, {"loss": 1.0})],
    "g": [(1, {"loss": 7.0}), (3, {"loss": 6.0}), (6, {"loss": 5.0}), (9, {"loss": 4.0})],
    "h": [(1, {"loss": 4.2}), (3, {"loss": 2.2}), (6, {"loss": 2.1}), (9, {"loss": 2.0})],
}


def test_one_objective_replay_matches_rays_asha():
    from ray.tune.schedulers import ASHAScheduler

    ours = replay({"loss": "min"}, LOSS_CURVES, "abcdefgh", max_t=9, grace_period=1, reduction_factor=3,
                  concurrency=3)
    rays = simulate(ASHAScheduler(time_attr="step", metric="loss", mode="min", max_t=9, grace_period=1,
                                  reduction_factor=3), LOSS_CURVES, "abcdefgh", concurrency=3, max_t=9)
    assert ours.events == rays.events and ours.trials == rays.trials
    assert {t for t, o in ours.trials.items() if o.stopped} == set("bcegh")


def _ray_asha(mode, factor):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="step", metric="x", mode=mode, max_t=100, grace_period=1, reduction_factor=factor)


def test_where_one_objective_differs_from_ray():
    """Recorded 1.0 and 4.0 (maximised), rf 3: Ray's cutoff is the 2/3 quantile interpolated, 3.0, so 3.5 goes on;
    here 3.5 is second of three and ceil(3/3) = 1 place continues."""
    ours, rays = ParetoASHA({"x": "max"}, max_t=100, grace_period=1, reduction_factor=3), _ray_asha("max", 3)
    for i, value in enumerate([1.0, 4.0, 3.5]):
        for scheduler in (ours, rays):
            scheduler.on_trial_add(None, _T(str(i)))
        answers = [s.on_trial_result(None, _T(str(i)), {"step": 1, "x": value}) for s in (ours, rays)]
    assert answers == [STOP, CONTINUE]
    assert ours.decisions[-1] == Decision("2", 1, 1, 1, STOP)


@pytest.mark.parametrize("mode,factor", [("min", 3), ("max", 3), ("min", 2), ("max", 4)])
def test_one_objective_agrees_with_ray_except_at_the_interpolated_place(mode, factor):
    """Trials arriving one by one at a rung (values with many ties): with m recorded and p of them strictly better,
    the two schedulers may differ only at p = ceil((m - 1) / rf) with (m - 1) / rf fractional (Ray interpolates
    between two recorded values there), or, at an integral (m - 1) / rf, when the newcomer ties the recorded value
    at Ray's quantile exactly and Ray's floating-point quantile lands a hair above it."""
    rng = random.Random(7)
    interpolated, rounding = [], []
    for _ in range(20):
        ours, rays = ParetoASHA({"x": mode}, max_t=100, grace_period=1, reduction_factor=factor), _ray_asha(mode, factor)
        recorded = []
        for i in range(14):
            value = float(rng.randint(0, 6))
            for scheduler in (ours, rays):
                scheduler.on_trial_add(None, _T(str(i)))
            mine, theirs = (s.on_trial_result(None, _T(str(i)), {"step": 1, "x": value}) for s in (ours, rays))
            m, p, k = i, ours.decisions[-1].position, (i - 1) / factor
            if mine != theirs:
                if k == int(k):  # an exact place: Ray's float quantile lands a hair past a value the newcomer ties
                    rounding.append((m, p))
                    assert recorded[m - 1 - int(k)] == (value if mode == "max" else -value) and mine == CONTINUE
                else:
                    interpolated.append((m, p))
                    assert p == math.ceil(k), (m, p, mine, theirs)
            recorded = sorted(rays._brackets[0]._rungs[-1][1].values())  # Ray's rung 1, as Ray's signed values
    assert interpolated  # the band is real, and exercised


# -- errors, search properties, save and restore ----------------------------------------------------------------

def test_a_missing_objective_is_an_error_naming_it():
    scheduler = ParetoASHA(OBJECTIVES, max_t=9, grace_period=1)
    scheduler.on_trial_add(None, _T("A"))
    with pytest.raises(ConfigError, match="objectives.acc: trial A's result at step=1 has no 'acc'"):
        scheduler.on_trial_result(None, _T("A"), {"step": 1, "loss": 1.0})
    with pytest.raises(ConfigError, match="objectives.acc: .* not a number"):
        scheduler.on_trial_result(None, _T("A"), {"step": 1, "loss": 1.0, "acc": None})
    assert scheduler.on_trial_result(None, _T("A"), {"loss": 1.0}) == CONTINUE  # no clock: no rung (as Ray)


@pytest.mark.parametrize("kwargs,field", [(dict(objectives={}), "objectives"),
                                          (dict(objectives={"loss": "low"}), "objectives.loss"),
                                          (dict(grace_period=10), "grace_period"),
                                          (dict(reduction_factor=1), "reduction_factor"),
                                          (dict(max_t=0), "max_t")])
def test_bad_settings_are_refused(kwargs, field):
    settings = dict(objectives=OBJECTIVES, max_t=9, grace_period=1, reduction_factor=3) | kwargs
    with pytest.raises(ConfigError, match=f"^{field}:"):
        ParetoASHA(settings.pop("objectives"), **settings)


def test_a_nan_objective_stops_the_trial_at_a_rung_unrecorded():
    scheduler = ParetoASHA(OBJECTIVES, max_t=9, grace_period=1)
    assert scheduler.on_trial_result(None, _T("A"), {"step": 1, "loss": math.nan, "acc": 0.5}) == STOP
    assert scheduler.rung_records()[1] == {}


def test_set_search_properties_accepts_a_multi_objective_tune_config():
    scheduler = ParetoASHA(OBJECTIVES, max_t=9, grace_period=1)
    assert scheduler.set_search_properties(None, None) is True
    assert scheduler.set_search_properties("loss", "min", config={}) is True
    assert scheduler.metric is None  # Tune checks no single metric of ours; the scheduler checks all of them


def test_save_restore_keeps_the_rungs_and_the_next_decision(tmp_path):
    first = ParetoASHA(OBJECTIVES, max_t=9, grace_period=1)
    for trial_id in "ABE":
        first.on_trial_add(None, _T(trial_id))
        for step, values in CURVES[trial_id][:2]:
            first.on_trial_result(None, _T(trial_id), {"step": step, **values})
    first.save(str(tmp_path / "scheduler.pkl"))
    restored = ParetoASHA({"other": "max"}, max_t=100, grace_period=5)  # overwritten by the saved state
    restored.restore(str(tmp_path / "scheduler.pkl"))
    assert restored.rung_records() == first.rung_records()
    assert set(restored.rung_records()[3]) == {"A", "B", "E"} and restored.decisions == first.decisions
    assert restored.objectives == OBJECTIVES
    # a resumed trial reporting a rung again is not decided twice; a new one is decided against the same records
    assert restored.on_trial_result(None, _T("A"), {"step": 3, **CURVES["A"][1][1]}) == CONTINUE
    late = {"step": 3, **CURVES["G"][1][1]}
    assert restored.on_trial_result(None, _T("G"), late) == first.on_trial_result(None, _T("G"), late)
    assert restored.decisions[-1] == first.decisions[-1]
    assert "num_stopped=1" in restored.debug_string() and "step 3: 4 recorded, 1 on the front" in restored.debug_string()


def test_a_rung_is_decided_at_the_first_result_past_it_and_skipped_rungs_stay_skipped():
    scheduler = ParetoASHA({"loss": "min"}, max_t=9, grace_period=1, reduction_factor=3)  # rungs 1, 3, 9
    for trial_id in "AB":
        scheduler.on_trial_add(None, _T(trial_id))
    assert scheduler.on_trial_result(None, _T("A"), {"step": 2, "loss": 1.0}) == CONTINUE  # rung 1, at step 2
    assert scheduler.on_trial_result(None, _T("A"), {"step": 2.5, "loss": 0.5}) == CONTINUE  # already decided there
    assert scheduler.on_trial_result(None, _T("B"), {"step": 4, "loss": 9.0}) == CONTINUE  # first at rung 3
    assert scheduler.on_trial_result(None, _T("B"), {"step": 5, "loss": 9.0}) == CONTINUE  # rung 1 stays skipped
    assert scheduler.decisions == [Decision("A", 1, 0, 1, CONTINUE), Decision("B", 3, 0, 1, CONTINUE)]
    assert scheduler.rung_records() == {1: {"A": (1.0,)}, 3: {"B": (9.0,)}, 9: {}}


def test_a_constant_objective_gives_no_member_infinite_crowding():
    """Three objectives, the third constant across the front: only the ends of the two that vary are infinite;
    the middle members get finite distances (hand-computed: (3-1)/4 + (3-1)/4 = 1.0 for the middle one)."""
    from raydllm.sweep.pareto import crowding_distance

    # listed middle first: a tie-broken sort of the constant objective would make (2, 2) and (4, 0) its "ends"
    points = [(2.0, 2.0, 7.0), (1.0, 3.0, 7.0), (3.0, 1.0, 7.0), (0.0, 4.0, 7.0), (4.0, 0.0, 7.0)]
    distance = crowding_distance(points, ["min", "min", "min"])
    assert distance[3] == distance[4] == float("inf")
    assert distance[:3] == [1.0, 1.0, 1.0]
