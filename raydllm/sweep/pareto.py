"""Sweep layer: Pareto fronts of objective vectors: non-dominated sorting, crowding distance, hypervolume.

Pure Python on lists of floats, so the scheduler, the sweep report and the bench share one definition.
Every function takes the objectives' modes ("min" or "max") and flips the "max" ones internally: callers pass
values as they were reported.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

Point = Sequence[float]


def _check(points: Sequence[Point], modes: Sequence[str]) -> list[tuple[float, ...]]:
    """The points as minimisation vectors (max objectives negated); refuses a ragged set or an unknown mode."""
    for mode in modes:
        if mode not in ("min", "max"):
            raise ValueError(f"objective mode must be min or max, got {mode!r}")
    out = []
    for i, point in enumerate(points):
        if len(point) != len(modes):
            raise ValueError(f"point {i} has {len(point)} values for {len(modes)} objectives")
        values = tuple(float(v) if mode == "min" else -float(v) for v, mode in zip(point, modes))
        if any(math.isnan(v) for v in values):
            raise ValueError(f"point {i} has a NaN objective value")
        out.append(values)
    return out


def dominates(a: Point, b: Point, modes: Sequence[str]) -> bool:
    """a is at least as good as b on every objective and better on one."""
    (a_min, b_min) = _check([a, b], modes)
    return all(x <= y for x, y in zip(a_min, b_min)) and any(x < y for x, y in zip(a_min, b_min))


def _dominates_min(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated_sort(points: Sequence[Point], modes: Sequence[str]) -> list[list[int]]:
    """Fronts of point indices, best first (Deb et al.'s fast non-dominated sort): front 0 is the Pareto
    front; front k the front of what remains once fronts 0..k-1 are removed. Equal points share a front."""
    pts = _check(points, modes)
    dominated_by_count = [0] * len(pts)
    dominating: list[list[int]] = [[] for _ in pts]
    for i in range(len(pts)):
        for j in range(i + 1, len(pts)):
            if _dominates_min(pts[i], pts[j]):
                dominating[i].append(j)
                dominated_by_count[j] += 1
            elif _dominates_min(pts[j], pts[i]):
                dominating[j].append(i)
                dominated_by_count[i] += 1
    fronts: list[list[int]] = []
    current = [i for i, n in enumerate(dominated_by_count) if n == 0]
    while current:
        fronts.append(sorted(current))
        following = []
        for i in current:
            for j in dominating[i]:
                dominated_by_count[j] -= 1
                if dominated_by_count[j] == 0:
                    following.append(j)
        current = following
    return fronts


def pareto_front(points: Sequence[Point], modes: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points."""
    return non_dominated_sort(points, modes)[0] if points else []


def crowding_distance(points: Sequence[Point], modes: Sequence[str]) -> list[float]:
    """NSGA-II's crowding distance of each point within the set given (normally one front): per objective,
    the gap between its two neighbours in that objective's order over the objective's range, summed; the two
    ends of each objective get infinity, so a front's extremes are kept first; an objective constant over the
    set has no ends and adds nothing."""
    pts = _check(points, modes)
    n = len(pts)
    distance = [0.0] * n
    if n <= 2:
        return [math.inf] * n
    for m in range(len(modes)):
        order = sorted(range(n), key=lambda i: pts[i][m])
        low, high = pts[order[0]][m], pts[order[-1]][m]
        if high == low:
            continue  # constant across the set: no extremes, nothing to spread (its ends are arbitrary ties)
        distance[order[0]] = distance[order[-1]] = math.inf
        for position in range(1, n - 1):
            i = order[position]
            if distance[i] != math.inf:
                distance[i] += (pts[order[position + 1]][m] - pts[order[position - 1]][m]) / (high - low)
    return distance


def rank_order(points: Sequence[Point], modes: Sequence[str]) -> list[int]:
    """Every index, best first: by front, then by crowding distance within the front (larger first, so the
    spread of the front is kept), then by index (the earlier point first, so the order is deterministic)."""
    order: list[int] = []
    for front in non_dominated_sort(points, modes):
        crowding = crowding_distance([points[i] for i in front], modes)
        order += [i for _, i in sorted(zip(crowding, front), key=lambda pair: (-pair[0], pair[1]))]
    return order


def hypervolume(points: Sequence[Point], modes: Sequence[str], reference: Point) -> float:
    """The volume of objective space the points dominate up to `reference` (a point worse than every point of
    interest on every objective); points not strictly better than the reference on every objective add nothing.
    Exact: a sweep over the first objective with the (k-1)-dimensional volume of each slab (fine for the tens of
    points and 2-3 objectives of a sweep)."""
    ref = _check([reference], modes)[0]
    pts = [p for p in _check(points, modes) if all(v < r for v, r in zip(p, ref))]
    return _hv(pts, ref)


def _hv(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    if not points:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in points)
    ordered = sorted(points, key=lambda p: p[0])
    volume = 0.0
    for i, point in enumerate(ordered):
        upper = ordered[i + 1][0] if i + 1 < len(ordered) else ref[0]
        width = upper - point[0]
        if width > 0:  # the slab [point_0, upper): every point up to i dominates it in the first objective
            volume += width * _hv([p[1:] for p in ordered[:i + 1]], ref[1:])
    return volume


def reference_point(point_sets: Sequence[Sequence[Point]], modes: Sequence[str], margin: float = 0.1
                    ) -> list[float]:
    """One reference point for comparing several sets' hypervolumes: the worst value of each objective over
    all the sets, moved `margin` of that objective's range further out (so the worst points still count)."""
    pts = _check([p for points in point_sets for p in points], modes)
    if not pts:
        raise ValueError("reference_point: no points")
    ref = []
    for m, mode in enumerate(modes):
        values = [p[m] for p in pts]
        span = (max(values) - min(values)) or abs(max(values)) or 1.0
        worst = max(values) + margin * span
        ref.append(worst if mode == "min" else -worst)
    return ref
