"""Sweep layer: the statistics of a gain: a paired two-level bootstrap (seeds, then items), the minimum
detectable effect from the observed variance components, and Holm's adjustment for several gains.

The protocol has two sources of variation: the fine-tuning seed and the evaluation items (problems or
sequences), and both arms score the same items, so the per-item difference is the unit (paired). The
interval resamples seeds with replacement and then items within each chosen seed (a clustered/hierarchical
bootstrap, Miller 2024 "Adding Error Bars to Evals", clustered standard errors; Davison & Hinkley 1997 §3.8
for the two-stage scheme). With one value a seed (no per-item scores) the interval is Student's t over seeds:
a bootstrap of two or three numbers under-covers badly. Pure numpy; see docs/explanation/statistics.md.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

METHOD = "paired two-level bootstrap (seeds, then items within seed)"
METHOD_SEEDS_ONLY = "Student t over seeds (no per-item scores)"
METHOD_ITEMS_ONLY = "paired bootstrap over items (one seed: seed variance not estimable)"


def _as_groups(diffs_by_seed) -> list[np.ndarray]:
    groups = [np.asarray(d, dtype=float).ravel() for d in
              (diffs_by_seed.values() if isinstance(diffs_by_seed, dict) else diffs_by_seed)]
    groups = [g for g in groups if g.size]
    if not groups:
        raise ValueError("paired differences: no seed has any item")
    for g in groups:
        if not np.all(np.isfinite(g)):
            raise ValueError("paired differences: a non-finite value")
    return groups


def point_estimate(groups: list[np.ndarray]) -> float:
    """Each seed's mean item difference, averaged over seeds (every seed weighs the same)."""
    return float(np.mean([g.mean() for g in groups]))


def paired_bootstrap(diffs_by_seed, *, n_boot: int = 4000, confidence: float = 0.95, rng_seed: int = 0) -> dict:
    """The effect (mean over seeds of the mean per-item paired difference, positive = better), its percentile
    interval, and a two-sided bootstrap p-value (null: effect 0, by recentring the bootstrap distribution).

    `diffs_by_seed`: {seed: per-item differences} (or a list of arrays). A seed with one value (no per-item
    scores) contributes only through the seed level. Degenerate cases give `p_value` None: one seed and one
    item, zero spread, or seed-level data only on fewer than three seeds (a 2-point bootstrap is no test)."""
    groups = _as_groups(diffs_by_seed)
    n_seeds, sizes = len(groups), [g.size for g in groups]
    per_item = max(sizes) > 1
    method = METHOD if per_item and n_seeds > 1 else METHOD_ITEMS_ONLY if per_item else METHOD_SEEDS_ONLY
    mean = point_estimate(groups)
    out = {"mean": mean, "ci_low": None, "ci_high": None, "confidence": confidence, "p_value": None,
           "method": method, "n_seeds": n_seeds, "n_items": int(min(sizes)), "n_boot": n_boot, "note": None}
    all_values = np.concatenate(groups)
    if all_values.size < 2:
        out["note"] = "one seed and no per-item scores: no interval, no test"
        return out
    if not per_item:
        return out | {"n_boot": None} | seed_level_t(np.array([g[0] for g in groups]), confidence)
    rng = np.random.default_rng(rng_seed)
    boot = _two_level_draws(groups, n_boot, rng)
    if np.ptp(all_values) == 0 or np.ptp(boot) == 0:
        out |= {"ci_low": mean, "ci_high": mean, "note": "zero variance in the differences: no test"}
        return out
    tail = (1 - confidence) / 2
    out["ci_low"], out["ci_high"] = (float(v) for v in np.quantile(boot, [tail, 1 - tail]))
    centred = boot - boot.mean()
    out["p_value"] = float((1 + np.sum(np.abs(centred) >= abs(mean))) / (n_boot + 1))
    return out


def seed_level_t(diffs: np.ndarray, confidence: float) -> dict:
    """One value a seed (no per-item scores): the Student t interval over seeds, mean +- t_{S-1} sd / sqrt(S).
    Not a bootstrap: resampling two or three numbers gives their range, which covers the true effect about half
    the time with two seeds (both on one side of it: probability 1/2), whatever it is called. The t interval
    holds its level for normal seed effects and is as wide as so few seeds warrant (x 12.7 the standard error
    with two). The p-value is the paired t-test's from three seeds on; with two, none: one degree of freedom
    and a spread estimated from a single difference is no test a reviewer accepts."""
    n = diffs.size
    mean, sd = float(diffs.mean()), float(diffs.std(ddof=1))
    if sd == 0:  # as the bootstrap's zero-spread case: a point, no test
        return {"ci_low": mean, "ci_high": mean, "note": "zero variance in the differences: no test"}
    half = student_t_quantile(1 - (1 - confidence) / 2, n - 1) * sd / math.sqrt(n)
    out = {"ci_low": mean - half, "ci_high": mean + half, "note": None}
    if n < 3:
        out["note"] = f"seed-level values on {n} seeds: t interval (df {n - 1}), no test"
    else:
        out["p_value"] = min(1.0, 2 * student_t_sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    return out


def student_t_quantile(q: float, df: int) -> float:
    """The q-quantile (q > 0.5) of Student's t: the sf inverted by bisection (no scipy needed)."""
    low, high = 0.0, 1.0
    while student_t_sf(high, df) > 1 - q:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_sf(mid, df) > 1 - q else (low, mid)
    return (low + high) / 2


def student_t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom (t >= 0): scipy's when installed, else the
    regularized incomplete beta function, P(T > t) = I_x(df/2, 1/2) / 2 with x = df / (df + t^2)."""
    try:
        from scipy.stats import t as student_t

        return float(student_t.sf(t, df))
    except ImportError:
        return 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (modified Lentz), x in [0, 1]."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def _two_level_draws(groups: list[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """n_boot replicates: draw n_seeds seeds with replacement, then, independently for each draw, its items."""
    n_seeds = len(groups)
    picks = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    # item_means[k][b, j]: a fresh item resample of seed k for draw j of replicate b (independent per draw)
    item_means = np.stack([g[rng.integers(0, g.size, size=(n_boot, n_seeds, g.size))].mean(axis=2)
                           if g.size > 1 else np.full((n_boot, n_seeds), g[0]) for g in groups])
    rows = np.arange(n_boot)[:, None]
    cols = np.arange(n_seeds)[None, :]
    return item_means[picks, rows, cols].mean(axis=1)


def variance_components(diffs_by_seed) -> dict:
    """One-way random-effects moments: the between-seed variance of the true per-seed effect (sigma2_seed,
    floored at 0) and the within-seed item variance of a paired difference (sigma2_item). None where a level
    cannot be estimated (one seed; one item per seed)."""
    groups = _as_groups(diffs_by_seed)
    sizes = np.array([g.size for g in groups], dtype=float)
    within = [((g - g.mean()) ** 2).sum() for g in groups]
    df_within = float((sizes - 1).sum())
    sigma2_item = float(sum(within) / df_within) if df_within > 0 else None
    sigma2_seed = None
    if len(groups) > 1:
        seed_means = np.array([g.mean() for g in groups])
        var_means = float(np.var(seed_means, ddof=1))
        item_part = (sigma2_item or 0.0) * float(np.mean(1 / sizes))
        sigma2_seed = max(0.0, var_means - item_part)
    return {"sigma2_seed": sigma2_seed, "sigma2_item": sigma2_item, "n_seeds": len(groups),
            "n_items": int(sizes.min())}


def minimum_detectable_effect(sigma2_seed: float | None, sigma2_item: float | None, n_seeds: int, n_items: int,
                              *, alpha: float = 0.05, power: float = 0.8, df: int | None = None) -> float | None:
    """The smallest true effect a two-sided level-alpha test detects with the given power:
    (z_{1-alpha/2} + z_power) * sqrt(sigma2_seed / S + sigma2_item / (S * n)). None without any variance.
    `df`: the test is Student's t with that many degrees of freedom (seed-level values: S - 1), so t quantiles
    replace z: with two seeds the test that would be run is far weaker than the normal approximation says."""
    if n_seeds < 1 or n_items < 1 or (sigma2_seed is None and sigma2_item is None) or (df is not None and df < 1):
        return None
    var = (sigma2_seed or 0.0) / n_seeds + (sigma2_item or 0.0) / (n_seeds * n_items)
    if df is None:
        z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    else:
        z = student_t_quantile(1 - alpha / 2, df) + student_t_quantile(power, df)
    return float(z * math.sqrt(var))


def detectability(diffs_by_seed, *, alpha: float = 0.05, power: float = 0.8) -> dict:
    """The MDE at the sweep's seeds and items, with one more seed, and with twice the items."""
    comp = variance_components(diffs_by_seed)
    s, n = comp["n_seeds"], comp["n_items"]
    seed_level = comp["sigma2_item"] is None  # one value a seed: the t-test over seeds is the test
    mde = lambda seeds, items: minimum_detectable_effect(comp["sigma2_seed"], comp["sigma2_item"], seeds, items,
                                                         alpha=alpha, power=power,
                                                         df=seeds - 1 if seed_level else None)
    return {**comp, "alpha": alpha, "power": power, "mde": mde(s, n), "mde_plus_one_seed": mde(s + 1, n),
            "mde_double_items": mde(s, 2 * n),
            "note": None if comp["sigma2_seed"] is not None else "one seed: the seed variance is not in the MDE"}


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; None entries stay None
    and do not count in the family."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(indexed)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def format_effect(stat: dict, *, digits: int = 4) -> str:
    """'+0.0123 [95% CI -0.0040, +0.0290], p=0.21 (method)' or without p where there is none."""
    mean = f"{stat['mean']:+.{digits}f}"
    if stat.get("ci_low") is None:
        interval = "[no interval]"
    elif stat["ci_low"] == stat["ci_high"] and stat.get("p_value") is None:
        interval = "[no interval: zero spread]"  # a point is no interval (two seeds that happen to agree)
    else:
        interval = (f"[{stat['confidence']:.0%} CI {stat['ci_low']:+.{digits}f}, {stat['ci_high']:+.{digits}f}]")
    p = f", p={stat['p_value']:.3g}" if stat.get("p_value") is not None else ", no p"
    if stat.get("p_holm") is not None:
        p += f" (Holm {stat['p_holm']:.3g})"
    note = f"; {stat['note']}" if stat.get("note") else ""
    return f"{mean} {interval}{p} ({stat['method']}, {stat['n_seeds']} seeds x {stat['n_items']} items{note})"
