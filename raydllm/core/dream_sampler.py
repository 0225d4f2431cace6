"""Core layer: Dream's own sampler (Dream-org's `diffusion_generate`), for Dream-family models.

No blocks: the whole answer starts masked and is decoded in ``steps`` steps along the timestep schedule
``linspace(1, eps, steps + 1)``. At step i (t = schedule[i], s = schedule[i + 1]), with the logits aligned so that
position j's row predicts token j (Dream's shift undone, as `Backbone.logits` gives them):

* ``origin``: each masked position is revealed with probability 1 - s/t (all at the last step): a uniform draw
  per masked position, then a token drawn (temperature > 0) or the argmax for the revealed ones;
* ``maskgit_plus`` / ``topk_margin`` / ``entropy``: every masked position gets a proposal and a confidence (its
  probability, top-1 minus top-2 probability, or negative entropy); int(n * (1 - s/t)) positions are committed
  (all at the last step), n being the batch's masked count divided by the batch size, as Dream counts it; the most
  confident (``alg_temp`` 0) or drawn from softmax(confidence / alg_temp).

Token-identical to Dream's loop at temperature 0, and at temperature > 0 with a generator seeded as Dream's global
RNG (tests/test_dream_sampler.py re-creates that loop). Not supported: Dream's top_p / top_k filtering.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from raydllm.core.sampling_inputs import start_inputs

__all__ = ["DREAM_ALGORITHMS", "generate_dream"]

DREAM_ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def _proposals(logits: torch.Tensor, temperature: float, rule: str,
               generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence [N], tokens [N]) for logits [N, V], Dream's way: softmax at the temperature; a draw from it
    when temperature > 0 (the confidence is the drawn token's probability), else its maximum."""
    if temperature > 0:
        logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0 and probs.shape[0] > 0:
        # What torch.distributions.Categorical(probs).sample() does: renormalise, one multinomial draw a row.
        normalised = probs / probs.sum(-1, keepdim=True)
        tokens = torch.multinomial(normalised, 1, True, generator=generator).squeeze(-1)
        confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
    else:
        confidence, tokens = probs.max(dim=-1)
    if rule == "topk_margin":
        top2 = probs.sort(dim=-1, descending=True).values
        confidence = top2[:, 0] - top2[:, 1]
    elif rule == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    return confidence, tokens


@torch.no_grad()
def generate_dream(logits_fn, prompt_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                   mask_id: int, config, generator: Optional[torch.Generator] = None) -> torch.LongTensor:
    """Dream's `diffusion_generate` loop: ``[B, P] -> [B, P + gen_length]`` (``config``: a SamplerConfig with
    method "dream": steps, gen_length, temperature, dream_algorithm, dream_alg_temp, dream_eps)."""

    x, attention_mask, _ = start_inputs(prompt_ids, attention_mask, mask_id, config)
    batch = x.shape[0]
    steps, rule = config.steps, config.dream_algorithm
    schedule = torch.linspace(1, config.dream_eps, steps + 1, device=x.device)
    for i in range(steps):
        masked = x == mask_id
        logits = logits_fn(x, attention_mask)
        masked_logits = logits[masked]
        t, s = schedule[i], schedule[i + 1]
        last = i == steps - 1
        if rule == "origin":
            reveal_p = 1 if last else 1 - s / t
            tokens = torch.full((masked_logits.shape[0],), mask_id, dtype=torch.long, device=x.device)
            revealed = torch.rand(tokens.shape, device=x.device, generator=generator) < reveal_p
            tokens[revealed] = _proposals(masked_logits[revealed], config.temperature, rule, generator)[1]
            x[masked] = tokens
            continue
        confidence, tokens = _proposals(masked_logits, config.temperature, rule, generator)
        per_row = masked.sum() / batch
        count = int(per_row) if last else int(per_row * (1 - s / t))
        if count <= 0:
            continue
        ranked = torch.full(x.shape, float("-inf"), dtype=logits.dtype, device=x.device)
        ranked[masked] = confidence
        if not config.dream_alg_temp:
            chosen = torch.topk(ranked, count).indices
        else:
            weights = F.softmax(ranked / config.dream_alg_temp, dim=-1)
            chosen = torch.multinomial(weights, num_samples=count, generator=generator)
        proposed = torch.full_like(x, mask_id)
        proposed[masked] = tokens
        rows = torch.arange(batch, device=x.device)[:, None].expand_as(chosen)
        x[rows, chosen] = proposed[rows, chosen]
    return x
