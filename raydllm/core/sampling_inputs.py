"""Core layer: what every sampler starts from: the checked prompt and the masked answer after it. Its own
module so that LLaDA's samplers (sampler.py) and Dream's (dream_sampler.py) share it without importing each other."""
from __future__ import annotations

from typing import Optional

import torch


def start_inputs(prompt_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], mask_id: int, config
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor], int]:
    """(x = prompt + gen_length masks [B, L], attention mask extended with ones over the answer, prompt
    length), after checking the inputs. `config`: a sampler.SamplerConfig (its gen_length)."""
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be [batch, prompt_len], got shape {tuple(prompt_ids.shape)}")
    if (prompt_ids == mask_id).any():
        raise ValueError(
            f"prompt_ids contain mask_id={mask_id}: the prompt (and its left padding: pad id must differ "
            "from the mask id) may not contain the mask token")
    batch, prompt_len = prompt_ids.shape
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, prompt_len):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != prompt_ids shape "
                         f"{(batch, prompt_len)}")
    x = torch.full((batch, prompt_len + config.gen_length), mask_id, dtype=torch.long, device=prompt_ids.device)
    x[:, :prompt_len] = prompt_ids
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, config.gen_length))], dim=-1)
    return x, attention_mask, prompt_len
