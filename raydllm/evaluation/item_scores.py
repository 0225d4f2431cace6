"""Evaluation layer: per-item scores of an evaluation (correctness per problem), logged on the trial's MLflow run
as `items/<metric>.json`, so the sweep layer can pair the two arms item by item and bootstrap seeds and items.

The item id is the example's position and a hash of its prompt: both arms read the same validation split in the
same order, so their ids match; an id that does not match is simply not paired.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence


def item_ids(examples: Sequence[Any]) -> list[str]:
    return [f"{i}-{hashlib.sha1(ex.prompt.encode()).hexdigest()[:10]}" for i, ex in enumerate(examples)]


def standard_error(values: Sequence[float]) -> float | None:
    """The standard error of the mean of `values` (sample sd / sqrt n); None for fewer than two."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def log_item_scores(sink, metric: str, examples: Sequence[Any], predictions: Sequence[dict], key: str,
                    step: int) -> float | None:
    """Log {item id: score} of `key` as the run's `items/<metric>.json` and `<metric>_se` at `step` (a rank 0
    `MetricsSink`; a sink without a client logs nothing). Returns the standard error."""
    return log_item_values(sink, metric, item_ids(examples), [float(p["scores"][key]) for p in predictions], step,
                           key=key)


def log_item_values(sink, metric: str, names: Sequence[str], values: Sequence[float], step: int, *,
                    key: str | None = None) -> float | None:
    """`log_item_scores` for values already computed: {names[i]: values[i]} (names from `item_ids`)."""
    se = standard_error(values)
    if getattr(sink, "client", None) is not None:
        payload = {"metric": metric, "key": key or metric, "step": step, "scores": dict(zip(names, values))}
        sink.client.log_dict(sink.run_id, payload, f"items/{metric}.json")
        if se is not None:
            sink.add(step, {f"{metric}_se": se})
    return se
