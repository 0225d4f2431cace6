"""Known-answer tests for raydllm.sweep.stats (pure numpy, no Ray)."""
import math

import numpy as np
import pytest

from raydllm.sweep import stats


def test_holm_hand_computed():
    # p sorted: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04, monotone), None stays out of the family
    adj = stats.holm([0.04, 0.01, None, 0.02])
    assert adj[2] is None and adj[0] == pytest.approx(0.04) and adj[1] == pytest.approx(0.03)
    assert adj[3] == pytest.approx(0.04)
    assert stats.holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])


def test_mde_hand_computed():
    z = 1.959963984540054 + 0.8416212335729143
    # sigma2_seed 0.0004 over 3 seeds + sigma2_item 0.25 over 3 x 200 items
    expected = z * math.sqrt(0.0004 / 3 + 0.25 / 600)
    assert stats.minimum_detectable_effect(0.0004, 0.25, 3, 200) == pytest.approx(expected, rel=1e-9)
    assert stats.minimum_detectable_effect(0.0004, 0.25, 4, 200) < expected
    assert stats.minimum_detectable_effect(None, None, 3, 200) is None


def test_variance_components_recover_a_known_truth():
    rng = np.random.default_rng(1)
    seeds = {s: 0.1 + rng.normal(0, 0.05) + rng.normal(0, 0.5, size=2000) for s in range(60)}
    comp = stats.variance_components(seeds)
    assert comp["sigma2_item"] == pytest.approx(0.25, rel=0.05)
    assert comp["sigma2_seed"] == pytest.approx(0.0025, rel=0.5)
    det = stats.detectability(seeds)
    assert det["mde_plus_one_seed"] < det["mde"] and det["mde_double_items"] < det["mde"]


def test_degenerate_cases_print_no_p():
    # the report: both seeds differ by exactly one problem in 200 -> equal seed differences
    out = stats.paired_bootstrap({123: [-0.005], 777: [-0.005]})
    assert out["p_value"] is None and out["mean"] == pytest.approx(-0.005)
    out = stats.paired_bootstrap({123: [0.02]})
    assert out["p_value"] is None and out["ci_low"] is None
    out = stats.paired_bootstrap({1: [0.0, 0.0, 0.0], 2: [0.0, 0.0]})
    assert out["p_value"] is None
    # seed-level values on two seeds: an interval, but no test
    out = stats.paired_bootstrap({1: [0.01], 2: [0.03]})
    assert out["p_value"] is None and out["ci_low"] <= 0.02 <= out["ci_high"]
    assert "Holm" not in stats.format_effect(out) and "no p" in stats.format_effect(out)


def test_p_value_small_for_a_clear_effect_and_large_for_none():
    rng = np.random.default_rng(2)
    clear = {s: rng.normal(0.3, 0.5, size=400) for s in range(5)}
    none = {s: rng.normal(0.0, 0.5, size=400) for s in range(5)}
    assert stats.paired_bootstrap(clear)["p_value"] < 0.01
    assert stats.paired_bootstrap(none)["p_value"] > 0.05
    assert stats.paired_bootstrap(clear)["ci_low"] > 0


def _coverage(ignore_seeds: bool, sims: int = 120) -> float:
    rng = np.random.default_rng(3)
    truth, hits = 0.05, 0
    for k in range(sims):
        seeds = {s: truth + rng.normal(0, 0.1) + rng.normal(0, 0.3, size=60) for s in range(12)}
        data = [np.concatenate(list(seeds.values()))] if ignore_seeds else seeds
        out = stats.paired_bootstrap(data, n_boot=400, rng_seed=k)
        hits += out["ci_low"] <= truth <= out["ci_high"]
    return hits / sims


def test_interval_covers_the_truth_only_when_seeds_are_resampled():
    """The seed effect (sd 0.1) dwarfs the item noise of a seed mean (0.3/sqrt(60) = 0.04): an interval over
    items alone covers the truth far less than 95%; the two-level one comes close."""
    assert _coverage(ignore_seeds=False) > 0.85
    assert _coverage(ignore_seeds=True) < 0.6


def test_format_effect_names_the_method():
    rng = np.random.default_rng(4)
    out = stats.paired_bootstrap({s: rng.normal(0.1, 0.3, size=100) for s in range(3)})
    out["p_holm"] = 0.5
    text = stats.format_effect(out)
    assert "95% CI" in text and stats.METHOD in text and "Holm 0.5" in text


def test_seed_level_interval_is_students_t_and_covers_where_a_two_point_bootstrap_does_not():
    from scipy.stats import t as student_t, ttest_1samp

    diffs = [0.012, 0.031, 0.020]
    out = stats.paired_bootstrap({s: [d] for s, d in enumerate(diffs)})
    low, high = student_t.interval(0.95, 2, loc=np.mean(diffs), scale=np.std(diffs, ddof=1) / np.sqrt(3))
    assert out["method"] == stats.METHOD_SEEDS_ONLY and out["n_boot"] is None
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((low, high), rel=1e-9)
    assert out["p_value"] == pytest.approx(ttest_1samp(diffs, 0).pvalue, rel=1e-9)
    # Two seeds, true effect 0.02, seed sd 0.01: the t interval holds its 95%; the two values' range (what
    # resampling two numbers gives) covers the truth about half the time.
    rng = np.random.default_rng(0)
    covered_t = covered_range = 0
    for _ in range(400):
        pair = rng.normal(0.02, 0.01, size=2)
        out = stats.paired_bootstrap({1: [pair[0]], 2: [pair[1]]})
        covered_t += out["ci_low"] <= 0.02 <= out["ci_high"]
        covered_range += pair.min() <= 0.02 <= pair.max()
    assert covered_t / 400 > 0.92 and 0.4 < covered_range / 400 < 0.6


def test_seed_level_mde_uses_the_t_test_that_would_be_run():
    from scipy.stats import t as student_t

    det = stats.detectability({1: [0.0679], 2: [0.0915]})  # the embedded default's two fresh seeds
    sd2 = np.var([0.0679, 0.0915], ddof=1)
    expected = (student_t.ppf(0.975, 1) + student_t.ppf(0.8, 1)) * np.sqrt(sd2 / 2)
    assert det["mde"] == pytest.approx(expected, rel=1e-6)  # 0.166, not the normal approximation's 0.033
    assert det["mde_plus_one_seed"] == pytest.approx(
        (student_t.ppf(0.975, 2) + student_t.ppf(0.8, 2)) * np.sqrt(sd2 / 3), rel=1e-6)
