"""Engine layer: when a trial saves a checkpoint. Apart from the saving itself (checkpointing.py, torch) so that
`raydllm tune --plan` counts a sweep's checkpoints with the same rule, without importing torch."""
from __future__ import annotations


def checkpoint_due(train, *, step: int, total_steps: int) -> bool:
    """At the end; at the first report at or after each of train.checkpoint_steps (where ASHA decides,
    so a resumed trial loses at most one rung of work) and every train.checkpoint_every steps; at every
    report when neither is set."""
    if step >= total_steps:
        return True
    if train.checkpoint_steps is None and train.checkpoint_every is None:
        return True
    at_rung = any(step - train.eval_every < s <= step for s in train.checkpoint_steps or ())
    return at_rung or bool(train.checkpoint_every and step % train.checkpoint_every == 0)
