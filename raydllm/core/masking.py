"""Core layer: the forward process q(x_t | x0, t): each maskable token is replaced by the mask token with probability t.

Prompt tokens (prompt/answer data) and padding are never maskable. Views are drawn from an explicit
`torch.Generator`, so the same seed gives the same view on any machine.
"""
from __future__ import annotations

import torch


def mask_tokens(x0: torch.Tensor, t: float | torch.Tensor, maskable: torch.Tensor, *, mask_token_id: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x_t, masked): x_t has `mask_token_id` where `masked` is True.

    x0: [B, L] token ids. t: a rate in (0, 1] or a [B] tensor of per-row rates. maskable: [B, L] bool,
    True for answer tokens (including their EOS padding), False for prompt and pad.
    """
    if isinstance(t, torch.Tensor):
        rate = t.to(torch.float32).reshape(-1, 1)
    else:
        rate = torch.full((x0.shape[0], 1), float(t))
    # Draw on CPU so the view depends only on the seed, not on the device the batch lives on.
    u = torch.rand(x0.shape, generator=generator, dtype=torch.float32)
    masked = (u < rate).to(x0.device) & maskable
    return torch.where(masked, torch.full_like(x0, mask_token_id), x0), masked
