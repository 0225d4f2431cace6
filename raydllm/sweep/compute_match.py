"""Sweep layer: the compute-matched baseline (`baseline: {match: compute}`): the same FLOPs as DLLM-JEPA.

A DLLM-JEPA step costs about 4F (F: one forward pass of the backbone over the batch): the online forward and
its backward (about 2F) plus the EMA target's forward, against the baseline's 3F (forward + backward). So a
baseline given the DLLM-JEPA arm's FLOPs trains 4/3 of its steps, and its ASHA rungs sit at the same FLOPs
(4/3 of each rung's step). A compute-matched trial carries `train.max_steps` in its Tune config (so its config
key differs from the step-matched one's) and the tag `raydllm.baseline_match: compute`; every other baseline
trial is tagged `steps`. The repeat phase runs the baseline winner both ways on the fresh seeds, so `best` and
`report` can show the step-matched and the compute-matched comparison side by side.
"""
from __future__ import annotations

from typing import Any

JEPA_STEP_COST = 4  # forward-equivalents: online forward + backward + the EMA target's forward
BASELINE_STEP_COST = 3  # forward + backward
MATCH_KEY = "train.max_steps"
MATCH_TAG = "raydllm.baseline_match"


def matched(steps: int) -> int:
    """The baseline's step count with the FLOPs of `steps` DLLM-JEPA steps."""
    return round(steps * JEPA_STEP_COST / BASELINE_STEP_COST)


def compute_matched(spec) -> bool:
    baseline = getattr(spec, "baseline", None)
    return getattr(baseline, "match", "steps") == "compute"


def match_of(config: dict[str, Any]) -> str:
    """"compute" for a trial that carries its own step count (the compute-matched baseline), else "steps"."""
    return "compute" if MATCH_KEY in config else "steps"


def with_match(spec, point: dict[str, Any], steps: int) -> dict[str, Any]:
    """A baseline point (or space) as the space asks for it: with the matched step count under match: compute."""
    return point | {MATCH_KEY: matched(steps)} if compute_matched(spec) else point


def trial_steps(config: dict[str, Any], steps: int, grace: int) -> tuple[int, int]:
    """(max_steps, ASHA grace period) of one trial: scaled alike for a compute-matched trial, so its rungs are at
    the DLLM-JEPA rungs' FLOPs."""
    if MATCH_KEY not in config:
        return steps, grace
    own = int(config[MATCH_KEY])
    return own, max(1, round(grace * own / steps))


def repeat_points(spec, winner_params: dict[str, Any]) -> list[dict[str, Any]]:
    """The baseline winner's points for the repeat phase: itself, and under match: compute also its
    step-matched twin (the same searched values, the sweep's own step count)."""
    step_matched = {k: v for k, v in winner_params.items() if k != MATCH_KEY}
    return [winner_params, step_matched] if compute_matched(spec) and MATCH_KEY in winner_params else [winner_params]
