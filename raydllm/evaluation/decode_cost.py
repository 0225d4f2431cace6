"""Evaluation layer: the decoding cost of a generation pass: answer tokens per model forward.

Fine-tuning changes how many tokens a masked-diffusion model can commit per forward at the same accuracy (the fast
sampler commits every position above its confidence threshold). A pass counts the forwards the sampler calls (the
full-sequence `logits` calls and the KV-cache block calls alike) per batch; a batched forward serves every row of
the batch, so the cost is counted in row-forwards (forwards x rows), and

    tokens_per_forward = answer tokens decoded (items x gen_length) / row-forwards.

The exact sampler decodes gen_length / steps tokens per forward by construction (1 at the default); the fast
sampler's figure is what an objective can reward. A batch decodes until its slowest row is done, so the figure
depends on the batch size, which is why it carries its protocol like any score.
"""
from __future__ import annotations

from typing import Callable

# The per-report objective's name (search_space.OBJECTIVE_MODES: max).
DECODE_OBJECTIVE = "decode_tokens_per_forward"


def count_forwards(logits_fn: Callable, cached_forward: Callable | None
                   ) -> tuple[Callable, Callable | None, Callable[[], int]]:
    """(logits_fn, cached_forward, forwards()): the two callables wrapped so that every call counts as one forward."""
    calls = [0]

    def counted(fn):
        def call(*args, **kwargs):
            calls[0] += 1
            return fn(*args, **kwargs)
        return call

    return counted(logits_fn), (counted(cached_forward) if cached_forward is not None else None), lambda: calls[0]


def cost_figures(*, tokens: int, row_forwards: int) -> dict[str, float]:
    return {"tokens": float(tokens), "row_forwards": float(row_forwards),
            "tokens_per_forward": tokens / row_forwards if row_forwards else 0.0}
