"""Core layer: raydllm's Dream (Dream-org/Dream-v0-Base-7B / -Instruct-7B, Qwen2-shaped), loadable under transformers 5.

Same config field names (Qwen2's) and parameter names (`model.embed_tokens`, `model.layers.N.{self_attn.
{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}`, `model.norm`, `lm_head`)
as the hub checkpoint. Kept from the hub code: never causal; q/k/v projections with bias; grouped KV heads;
`embed_tokens` has padding_idx = pad_token_id (= EOS, so the EOS input row gets no gradient); RoPE cos/sin in
float32, rotation in the activation dtype; hidden_states = every layer's input, then the final norm's output;
logits are Dream's own, shifted: position i predicts token i + 1 (raydllm.engine.backbone moves them back).
Changed: a 2-D [B, L] attention mask is accepted and turned into what Dream's generation code passes, the
boolean keep[i] & keep[j] mask with positions cumsum(mask) - 1 (the hub model misreads a 2-D mask); RoPE
frequencies are computed, not a buffer (the hub's non-persistent buffer loads uninitialised under transformers
5); `_tied_weights_keys` in transformers 5's form; no generation mixin and no from_pretrained override.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from raydllm.core.archs.common import DiffusionLMOutput, RMSNorm, attend, check_block, init_weights, rotary, rotate, run_layers


class DreamConfig(PreTrainedConfig):
    model_type = "Dream"

    def __init__(self, vocab_size: int = 152064, hidden_size: int = 3584, intermediate_size: int = 18944,
                 num_hidden_layers: int = 28, num_attention_heads: int = 28, num_key_value_heads: int = 4,
                 hidden_act: str = "silu", max_position_embeddings: int = 131072, rope_theta: float = 1000000.0,
                 rope_scaling: dict | None = None, use_sliding_window: bool = False, rms_norm_eps: float = 1e-6,
                 initializer_range: float = 0.02, attention_dropout: float = 0.0, tie_word_embeddings: bool = False,
                 use_cache: bool = False, mask_token_id: int = 151666, pad_token_id: int = 151643, **kwargs):
        # Defaults are the 7B hub config.json's values; the hub's config.json names every field anyway.
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.rope_theta, self.use_sliding_window = rope_theta, use_sliding_window
        if rope_scaling is not None:  # refused here: transformers 5 rewrites rope_scaling into rope_parameters
            raise NotImplementedError(f"raydllm's Dream implements unscaled RoPE only, not {rope_scaling}")
        self.rms_norm_eps, self.initializer_range = rms_norm_eps, initializer_range
        self.attention_dropout, self.use_cache, self.mask_token_id = attention_dropout, use_cache, mask_token_id
        kwargs.pop("auto_map", None)  # a save of this model ships no remote code
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id, **kwargs)


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        width, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.dropout = width // heads, config.attention_dropout
        self.q_proj = nn.Linear(width, heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(width, kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(width, kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(heads * self.head_dim, width, bias=False)

    def forward(self, h, cos, sin, keep, kv_cache, block_start):
        batch, length, _ = h.shape
        q, k, v = (proj(h).view(batch, length, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q, cos, sin, in_float32=False), rotate(k, cos, sin, in_float32=False)
        att, kv = attend(q, k, v, keep, kv_cache, block_start, self.dropout if self.training else 0.0)
        return self.o_proj(att), kv


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamLayer(GradientCheckpointingLayer):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.self_attn, self.mlp = DreamAttention(config), DreamMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, keep, kv_cache=None, block_start: int = 0):
        att, kv = self.self_attn(self.input_layernorm(x), cos, sin, keep, kv_cache, block_start)
        x = x + att
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class DreamBaseModel(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DreamLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, attention_mask=None, *, output_hidden_states=False, kv_cache=None,
                block_start: int = 0, return_kv: bool = False):
        """(final-norm output, hidden states or None, per-layer kv or None)."""
        x = self.embed_tokens(input_ids)
        batch, length = input_ids.shape
        end = block_start + length
        if attention_mask is not None and not attention_mask.bool().all():
            # What Dream's generation code passes for left-padded rows (keep[i] & keep[j]: pads are never
            # attended, real tokens keep positions 0, 1, ...; pads sit at position 1), except that a pad query
            # attends to itself: a fully masked row is NaN in some attention kernels, and 0 * NaN would carry it
            # into real tokens. Real query rows are unchanged (their diagonal is already kept).
            real = attention_mask.bool()
            self_only = torch.eye(real.shape[-1], dtype=torch.bool, device=real.device)[None, None]
            keep = ((real[:, None, None, :] & real[:, None, :, None]) | self_only)[:, :, block_start:end]
            positions = (real.long().cumsum(-1) - 1).masked_fill(~real, 1)[:, block_start:end]
        else:
            keep, positions = None, torch.arange(block_start, end, device=x.device)[None]
        total = attention_mask.shape[-1] if attention_mask is not None else (
            kv_cache[0][0].shape[-2] if kv_cache is not None else length)
        check_block(length, total, block_start, kv_cache)
        rope = rotary(positions, self.config.hidden_size // self.config.num_attention_heads, self.config.rope_theta)
        x, hidden_states, kv = run_layers(self.layers, x, rope, keep, kv_cache=kv_cache, block_start=block_start,
                                          output_hidden_states=output_hidden_states, return_kv=return_kv)
        x = self.norm(x)
        return x, None if hidden_states is None else (*hidden_states, x), kv


class DreamModel(PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DreamLayer"]
    _supports_sdpa = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # only if config.tie_word_embeddings

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        unsupported = {f: getattr(config, f) for f, ok in
                       {"hidden_act": "silu", "use_sliding_window": False}.items()
                       if getattr(config, f) != ok}
        if unsupported:
            raise NotImplementedError(f"raydllm's Dream implements the hub checkpoints' configuration only, "
                                      f"not {unsupported}")
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        init_weights(module, self.config.initializer_range)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, return_dict: bool = True, *, kv_cache=None,
                block_start: int = 0, return_kv: bool = False) -> DiffusionLMOutput:
        """Dream's shifted logits [B, L, V] (position i predicts token i + 1); see raydllm.core.archs for the cache."""
        x, hidden_states, kv = self.model(input_ids, attention_mask, output_hidden_states=output_hidden_states,
                                          kv_cache=kv_cache, block_start=block_start, return_kv=return_kv)
        out = DiffusionLMOutput(logits=self.lm_head(x), hidden_states=hidden_states, kv_cache=kv)
        return out if return_dict else out.to_tuple()
