"""The sweep's Optuna searcher told which trials the scheduler stopped (searchers.RungAwareOptunaSearch), driven
directly as Tune drives it (suggest, on_trial_result, on_trial_complete with the results Tune passes): no Ray
cluster. Tune calls on_trial_complete with the result the scheduler stopped the trial on, and never passes that
result to on_trial_result (ray/tune/execution/tune_controller.py, _process_trial_result and stop_trial)."""
import pytest
from optuna.samplers import TPESampler
from optuna.trial import TrialState
from ray import tune

from raydllm.sweep.searchers import PicklableNSGAIISampler, RungAwareOptunaSearch

MAX_T = 8  # the scheduler's last rung; rungs at 2 and 4


def _single(max_t=MAX_T):
    searcher = RungAwareOptunaSearch(sampler=TPESampler(seed=0, n_startup_trials=2), max_t=max_t)
    assert searcher.set_search_properties("val_loss", "min", {"x": tune.uniform(0.0, 1.0)})  # as Tune does
    return searcher


def _pareto(population=2, max_t=MAX_T):
    searcher = RungAwareOptunaSearch(metric=["a", "b"], mode=["min", "min"], max_t=max_t,
                                     sampler=PicklableNSGAIISampler(seed=0, population_size=population))
    assert searcher.set_search_properties(None, None, {"x": tune.uniform(0.0, 1.0), "y": tune.uniform(0.0, 1.0)})
    return searcher


def _run(searcher, trial_id, curve, *, stopped_at=None, error=False):
    """One trial as Tune runs it: suggested, its results (step: value) reported until the scheduler's decision
    result (the last one, or `stopped_at`), which goes to on_trial_complete alone."""
    searcher.suggest(trial_id)
    steps = sorted(curve) if stopped_at is None else [s for s in sorted(curve) if s <= stopped_at]
    results = [{"step": s, "training_iteration": i + 1,
                **(dict(zip(searcher.metric, curve[s])) if isinstance(searcher.metric, list)
                   else {"val_loss": curve[s]})} for i, s in enumerate(steps)]
    for result in results[:-1]:
        searcher.on_trial_result(trial_id, result)
    if error:
        searcher.on_trial_complete(trial_id, error=True)
    else:
        searcher.on_trial_complete(trial_id, result=results[-1])


def _trial(searcher, trial_id):
    return searcher._ot_study._storage.get_trial(searcher._ot_trials[trial_id]._trial_id)


def test_stopped_trial_ends_pruned_finished_trial_complete():
    """(a) One objective: a trial the scheduler stopped at rung 4 ends PRUNED with the value it was stopped on
    (its last intermediate value, as Optuna gives a pruned trial) and its curve at its steps; one that reached
    max_t ends COMPLETE with its final value; an errored trial FAIL and a trial removed before it ran PRUNED,
    as before."""
    searcher = _single()
    _run(searcher, "full", {2: 0.9, 4: 0.7, 8: 0.5})
    _run(searcher, "cut", {2: 0.8, 4: 0.75, 8: 0.1}, stopped_at=4)
    _run(searcher, "broken", {2: 0.6}, error=True)
    searcher.suggest("removed")
    searcher.on_trial_complete("removed")
    full, cut = _trial(searcher, "full"), _trial(searcher, "cut")
    assert (full.state, full.value, full.intermediate_values) == (TrialState.COMPLETE, 0.5, {2: 0.9, 4: 0.7, 8: 0.5})
    assert (cut.state, cut.value, cut.intermediate_values) == (TrialState.PRUNED, 0.75, {2: 0.8, 4: 0.75})
    assert _trial(searcher, "broken").state == TrialState.FAIL
    assert _trial(searcher, "removed").state == TrialState.PRUNED
    assert searcher.suggest("next")["x"] is not None  # TPE goes on with the pruned trial among its observations


def test_stopped_multi_objective_trial_ends_pruned_without_values():
    """(a) Several objectives: a stopped trial ends PRUNED with no values (Optuna holds no multi-objective
    intermediate values); a finished one COMPLETE with its vector."""
    searcher = _pareto()
    _run(searcher, "full", {2: (0.9, 0.9), 8: (0.4, 0.6)})
    _run(searcher, "cut", {2: (0.1, 0.1)}, stopped_at=2)
    full, cut = _trial(searcher, "full"), _trial(searcher, "cut")
    assert (full.state, full.values) == (TrialState.COMPLETE, [0.4, 0.6])
    assert (cut.state, cut.values) == (TrialState.PRUNED, None)


def test_without_max_t_every_trial_ends_as_ray_tells_it():
    """No scheduler that stops trials (max_t None): OptunaSearch's behaviour, a trial's last result COMPLETE."""
    searcher = _single(max_t=None)
    _run(searcher, "cut", {2: 0.8, 4: 0.75}, stopped_at=4)
    assert (_trial(searcher, "cut").state, _trial(searcher, "cut").value) == (TrialState.COMPLETE, 0.75)


def test_nsga2_never_breeds_from_stopped_trials():
    """(b) Population 2: a complete trial, one stopped at the first rung (with the best vector of all: told as
    complete, it would be a parent), another complete one; the next trial is generation 1 and its parents are
    the two complete trials only. The stopped trial does not fill generation 0 either: the second complete trial
    is still generation 0."""
    searcher = _pareto(population=2)
    sampler = searcher._ot_study.sampler
    _run(searcher, "t0", {2: (0.5, 0.5), 8: (0.2, 0.8)})
    _run(searcher, "t1", {2: (0.01, 0.01), 8: (0.0, 0.0)}, stopped_at=2)
    _run(searcher, "t2", {2: (0.5, 0.5), 8: (0.8, 0.2)})
    searcher.suggest("t3")
    parents = sampler.get_parent_population(searcher._ot_study, 1)  # cached in the study when t3 was sampled
    assert sorted(p.number for p in parents) == [_trial(searcher, "t0").number, _trial(searcher, "t2").number]
    assert all(p.state == TrialState.COMPLETE for p in parents)
    generation = sampler._get_generation_key()
    assert [_trial(searcher, t).system_attrs[generation] for t in ("t0", "t1", "t2", "t3")] == [0, 0, 0, 1]


@pytest.mark.parametrize("make", [_single, _pareto], ids=["tpe", "nsga2"])
def test_save_restore_keeps_states_and_the_rung_rule(tmp_path, make):
    """(c) Tune's save and restore (pickle of the searcher's state) in the middle of a sweep: the study's states
    (COMPLETE, PRUNED, a RUNNING trial with its intermediate values), max_t and the steps already reported come
    back, and the restored searcher still prunes the running trial when it is stopped below max_t."""
    searcher = make()
    pair = isinstance(searcher.metric, list)
    value = (lambda v: (v, 1 - v)) if pair else (lambda v: v)
    _run(searcher, "full", {2: value(0.9), 8: value(0.5)})
    _run(searcher, "cut", {2: value(0.8)}, stopped_at=2)
    searcher.suggest("open")
    searcher.on_trial_result("open", {"step": 2, "training_iteration": 1,
                                      **(dict(zip(["a", "b"], value(0.7))) if pair else {"val_loss": 0.7})})
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = make()
    restored.restore(str(tmp_path / "searcher.pkl"))
    states = {t: _trial(restored, t).state for t in ("full", "cut", "open")}
    assert states == {"full": TrialState.COMPLETE, "cut": TrialState.PRUNED, "open": TrialState.RUNNING}
    assert restored._max_t == MAX_T and restored._reported == ({"open": {2}} if not pair else {})
    assert _trial(restored, "open").intermediate_values == ({} if pair else {2: 0.7})
    restored.on_trial_complete("open", result={"step": 4, "training_iteration": 2,
                                               **(dict(zip(["a", "b"], value(0.6))) if pair else {"val_loss": 0.6})})
    assert _trial(restored, "open").state == TrialState.PRUNED
    assert restored.suggest("after") is not None


def test_each_arms_searcher_gets_its_schedulers_max_t(tmp_path, monkeypatch):
    """_fit_phase hands the searcher its phase's max_t (the scheduler's): the search's step count, and a
    compute-matched baseline's matched count; no max_t without ASHA. The Tuner is a fake: nothing starts Ray."""
    import raydllm.sweep.tune as tune_module
    from raydllm.sweep.compute_match import matched
    from raydllm.sweep.search_space import load_spec, max_steps, param_space
    from test_pareto_sweep import _space

    seen = []

    class Stop(Exception):
        pass

    class FakeTuner:
        can_restore = staticmethod(lambda path: False)

        def __init__(self, trainable, *, param_space, tune_config, run_config):
            seen.append(tune_config.search_alg.searcher)
            raise Stop

    monkeypatch.setattr(tune, "Tuner", FakeTuner)
    monkeypatch.setattr(tune, "with_parameters", lambda trainable, **kwargs: trainable)
    monkeypatch.setattr(tune, "with_resources", lambda trainable, resources: trainable)
    monkeypatch.setattr(tune_module, "_trial_resources", lambda: {"CPU": 0.01})
    baseline = {"mode": "searched", "num_samples": 2, "match": "compute"}
    for changes, phase, asha in [({}, "search", True), ({"baseline": baseline}, "baseline", True),
                                 ({}, "search", False)]:
        spec = load_spec(_space(tmp_path, **changes))
        with pytest.raises(Stop):
            tune_module._fit_phase(spec=spec, name="s", phase=phase, param_space=param_space(spec), asha=asha,
                                   num_samples=2, storage=str(tmp_path / "runs"), tracking_uri="file:/nowhere",
                                   experiment="e", parent_run_id="p", progress=False)
    assert all(isinstance(s, RungAwareOptunaSearch) for s in seen)
    steps = max_steps(spec)
    assert [s._max_t for s in seen] == [steps, matched(steps), None] and matched(steps) > steps
