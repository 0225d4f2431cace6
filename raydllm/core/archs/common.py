"""Core layer: what raydllm's LLaDA and Dream share: RMS norm, rotary positions, bidirectional attention that can
run one block of the sequence against a cache of the rest, the layer loop, and the output type."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import ModelOutput

# One (keys, values) pair per layer, each [B, n_kv_heads, L, head_dim]; keys already rotated at their positions.
KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass
class DiffusionLMOutput(ModelOutput):
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # every layer's input, then the final norm's output
    kv_cache: KVCache | None = None  # only with return_kv=True


class RMSNorm(nn.Module):
    """x / rms(x) in float32, cast back, then scaled (the hub checkpoints have no norm bias)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def init_weights(module: nn.Module, std: float) -> None:
    """A fresh model's weights (loading overwrites them): normal(std) matrices, zero biases and pad row, unit norms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        nn.init.zeros_(module.weight[module.padding_idx])
    if isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, sin) [B, 1, L, head_dim] for integer positions [B, L], rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, in_float32: bool) -> torch.Tensor:
    """RoPE on [B, H, L, head_dim]: computed in float32 and cast back (LLaDA), or in x's dtype (Dream)."""
    h = x.float() if in_float32 else x
    cos, sin = cos.to(h.dtype), sin.to(h.dtype)
    x1, x2 = h.chunk(2, dim=-1)
    return (h * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def attend(q, k, v, keep, cache, block_start: int, dropout: float):
    """Bidirectional attention. q [B, H, Lq, hd]; k, v [B, H_kv, Lq, hd], rotated; keep: bool, broadcastable to
    [B, H, Lq, Lk], True = may attend (None = all). With `cache` = (keys, values) of the whole sequence, the
    block's fresh k, v replace positions block_start .. block_start + Lq - 1 of it (the cache is not modified).
    Returns (output [B, Lq, H * hd], (keys, values) attended)."""
    if cache is not None:
        end = block_start + q.shape[-2]
        k = torch.cat((cache[0][..., :block_start, :], k, cache[0][..., end:, :]), dim=-2)
        v = torch.cat((cache[1][..., :block_start, :], v, cache[1][..., end:, :]), dim=-2)
    groups = q.shape[1] // k.shape[1]  # grouped KV heads (Dream): each serves `groups` query heads
    k_all, v_all = (k, v) if groups == 1 else (k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1))
    out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=keep, dropout_p=dropout, is_causal=False)
    return out.transpose(1, 2).flatten(2), (k, v)


def check_block(length: int, total: int, block_start: int, kv_cache) -> None:
    """Check a block call's arguments: `length` new tokens at block_start of a `total`-token sequence."""
    if kv_cache is None and block_start:
        raise ValueError("block_start needs a kv_cache of the whole sequence")
    if kv_cache is not None:
        cached = kv_cache[0][0].shape[-2]
        if cached != total or block_start + length > total:
            raise ValueError(f"block [{block_start}, {block_start + length}) of a {total}-token sequence does not "
                             f"fit a kv_cache of {cached} tokens")


def run_layers(layers, x, rope, keep, *, kv_cache, block_start: int, output_hidden_states: bool, return_kv: bool):
    """x through every layer: (output, inputs of every layer or None, per-layer (keys, values) or None).
    Only what is asked for is kept: a layer's keys and values held past it would undo activation checkpointing."""
    hidden_states, kv = [], []
    for i, layer in enumerate(layers):
        if output_hidden_states:
            hidden_states.append(x)
        x, layer_kv = layer(x, *rope, keep, kv_cache=None if kv_cache is None else kv_cache[i],
                            block_start=block_start)
        if return_kv:
            kv.append(layer_kv)
    return x, hidden_states if output_hidden_states else None, tuple(kv) if return_kv else None
