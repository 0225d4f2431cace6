"""Evaluation layer: the protocol of a score: every setting that can move a generation accuracy, kept beside it.

A dLLM accuracy depends on more than the weights: the sampler and its steps, answer length and block, the fast
sampler's threshold and cache, the shots, and (through padding and kernels) the batch size, the padding side, the
dtype and the device type (Fast-dLLM's users see 43.29 against 42.07 from the batch size alone). `score_protocol`
records them; every logged score carries them as an MLflow tag `protocol/<metric>` (JSON) on its run, and
`require_same_protocol` is what refuses to put two numbers side by side whose protocols differ.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from raydllm.core.config import ConfigError
from raydllm.core.sampler import SamplerConfig

# The fields compared; "-" where a field does not apply (the exact sampler has no threshold).
PROTOCOL_FIELDS = ("sampler", "steps", "gen_length", "block_length", "threshold", "cache", "temperature",
                   "remasking", "shots", "batch_size", "padding_side", "dtype", "device_type")
NOT_APPLICABLE = "-"
TAG_PREFIX = "protocol/"


def score_protocol(sampler: SamplerConfig, *, shots: int, batch_size: int, backbone=None, dtype: str | None = None,
                   device_type: str | None = None, padding_side: str = "left") -> dict[str, Any]:
    """The protocol of a generation score made with `sampler` (as it ran: after `effective_sampler`), `shots`
    exemplars and `batch_size` rows a batch; dtype and device type from `backbone`'s weights unless given.
    `evaluate_task` pads on the left, so that is the default side."""
    if backbone is not None:
        weight = next(backbone.parameters())
        dtype = dtype or str(weight.dtype).removeprefix("torch.")
        device_type = device_type or weight.device.type
    fast = sampler.method == "fast"
    remasking = (sampler.dream_algorithm if sampler.method == "dream" else
                 NOT_APPLICABLE if fast else sampler.remasking)
    return {"sampler": sampler.method, "steps": NOT_APPLICABLE if fast else sampler.steps,
            "gen_length": sampler.gen_length, "block_length": sampler.block_length,
            "threshold": sampler.threshold if fast else NOT_APPLICABLE, "cache": sampler.cache,
            "temperature": sampler.temperature, "remasking": remasking, "shots": int(shots),
            "batch_size": int(batch_size), "padding_side": padding_side, "dtype": dtype or "unknown",
            "device_type": device_type or "unknown"}


def protocol_tag(metric: str) -> str:
    """The MLflow tag that holds the protocol of `metric` (a metric name or a metric prefix)."""
    return TAG_PREFIX + metric


def protocol_tags(metrics: Mapping[str, dict]) -> dict[str, str]:
    """{tag: JSON} for {metric: protocol}."""
    return {protocol_tag(metric): json.dumps(protocol, sort_keys=True) for metric, protocol in metrics.items()}


def read_protocol(tags: Mapping[str, str], metric: str) -> dict[str, Any] | None:
    """The protocol logged for `metric` on a run (its tags), or None where none was."""
    raw = tags.get(protocol_tag(metric))
    return json.loads(raw) if raw else None


def differing_fields(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return [f for f in PROTOCOL_FIELDS if a.get(f) != b.get(f)]


def require_same_protocol(protocols: Mapping[str, Mapping[str, Any] | None], what: str = "report") -> None:
    """Raise a one-line ConfigError naming the fields that differ when the labelled protocols are not all the
    same (or one is missing), e.g. `report: protocols differ in batch_size (dllm-jepa seed 123: 16; baseline
    seed 123: 8)`."""
    if not protocols:
        return
    missing = [label for label, p in protocols.items() if p is None]
    if missing:
        raise ConfigError(f"{what}: no protocol recorded for {', '.join(missing)}: cannot show it beside the others")
    labels = list(protocols)
    first = protocols[labels[0]]
    fields = sorted({f for label in labels[1:] for f in differing_fields(first, protocols[label])},
                    key=PROTOCOL_FIELDS.index)
    if fields:
        parts = []
        for field in fields:
            values = "; ".join(f"{label}: {protocols[label].get(field)}" for label in labels
                               if protocols[label].get(field) != first.get(field) or label == labels[0])
            parts.append(f"{field} ({values})")
        raise ConfigError(f"{what}: protocols differ in {', '.join(parts)}; score every number with the same "
                          f"protocol before comparing them")
