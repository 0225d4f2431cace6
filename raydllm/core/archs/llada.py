"""Core layer: raydllm's LLaDA (GSAI-ML/LLaDA-8B-Base / -Instruct), loadable under transformers 5.

Same config field names (OLMo's: d_model, n_layers, n_heads, ...) and parameter names
(`model.transformer.{wte, blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj,
ff_out}, ln_f, ff_out}`) as the hub checkpoint, so its safetensors load without renaming. Only the configuration
the hub checkpoints use is implemented (llama blocks, RMS norm, SiLU-gated MLP, RoPE, no biases); anything else
is refused at construction. What it keeps from the hub code: never causal; a 2-D attention mask with a 0 hides
those keys from every query (pad queries still attend to the real tokens); RoPE at positions 0..L-1 computed in
float32; hidden_states = every block's input, then the final norm's output (n_layers + 1).
What it changes: post_init is called (transformers 5 loads it); checkpointing goes through transformers'
`activation_checkpointing_enable` (every block is a GradientCheckpointingLayer) instead of the hub's
`set_activation_checkpointing`; no global torch setting is touched; the block cache (see raydllm.core.archs) exists.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from raydllm.core.archs.common import DiffusionLMOutput, RMSNorm, attend, check_block, init_weights, rotary, rotate, run_layers

# Fields whose other values the hub code supports and this implementation does not (the hub checkpoints use these).
SUPPORTED = {"block_type": ("llama",), "layer_norm_type": ("rms",), "activation_type": ("silu",),
             "block_group_size": (1,), "alibi": (False,), "rope": (True,), "attention_layer_norm": (False,),
             "input_emb_norm": (False,), "scale_logits": (False,), "include_bias": (False,),
             "bias_for_layer_norm": (False, None), "layer_norm_with_affine": (True,),
             "residual_dropout": (0.0,), "embedding_dropout": (0.0,)}


class LLaDAConfig(PreTrainedConfig):
    model_type = "llada"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}

    def __init__(self, d_model: int = 4096, n_layers: int = 32, n_heads: int = 32, n_kv_heads: int | None = 32,
                 multi_query_attention: bool | None = None, mlp_hidden_size: int | None = 12288, mlp_ratio: int = 4,
                 vocab_size: int = 126464, embedding_size: int | None = 126464, rope_theta: float = 500000.0,
                 rms_norm_eps: float = 1e-5, include_qkv_bias: bool = False, weight_tying: bool = False,
                 attention_dropout: float = 0.0, init_std: float = 0.02, mask_token_id: int = 126336,
                 use_cache: bool = False, **kwargs):
        # Defaults are the 8B hub config.json's values; the hub's config.json names every field anyway.
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.n_kv_heads, self.multi_query_attention = n_kv_heads, multi_query_attention
        self.mlp_hidden_size, self.mlp_ratio = mlp_hidden_size, mlp_ratio
        self.vocab_size, self.embedding_size = vocab_size, embedding_size
        self.rope_theta, self.rms_norm_eps, self.include_qkv_bias = rope_theta, rms_norm_eps, include_qkv_bias
        self.weight_tying, self.attention_dropout, self.init_std = weight_tying, attention_dropout, init_std
        self.mask_token_id, self.use_cache = mask_token_id, use_cache
        kwargs.pop("auto_map", None)  # a save of this model ships no remote code
        # weight_tying is LLaDA's own switch (the forward reads wte); transformers must not tie anything itself.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    @property
    def kv_heads(self) -> int:
        if self.n_kv_heads is None:
            return 1 if self.multi_query_attention else self.n_heads
        return self.n_kv_heads


class LLaDABlock(GradientCheckpointingLayer):
    """x + attn_out(attention(attn_norm(x))), then + ff_out(silu(ff_proj(h)) * up_proj(h)), h = ff_norm(x)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        width, self.head_dim = config.d_model, config.d_model // config.n_heads
        hidden = config.mlp_hidden_size or config.mlp_ratio * width
        self.dropout = config.attention_dropout
        self.attn_norm, self.ff_norm = RMSNorm(width, config.rms_norm_eps), RMSNorm(width, config.rms_norm_eps)
        self.q_proj = nn.Linear(width, width, bias=config.include_qkv_bias)
        self.k_proj = nn.Linear(width, config.kv_heads * self.head_dim, bias=config.include_qkv_bias)
        self.v_proj = nn.Linear(width, config.kv_heads * self.head_dim, bias=config.include_qkv_bias)
        self.attn_out = nn.Linear(width, width, bias=False)
        self.ff_proj, self.up_proj = nn.Linear(width, hidden, bias=False), nn.Linear(width, hidden, bias=False)
        self.ff_out = nn.Linear(hidden, width, bias=False)

    def forward(self, x, cos, sin, keep, kv_cache=None, block_start: int = 0):
        batch, length, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(batch, length, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q, cos, sin, in_float32=True), rotate(k, cos, sin, in_float32=True)
        att, kv = attend(q, k, v, keep, kv_cache, block_start, self.dropout if self.training else 0.0)
        x = x + self.attn_out(att)
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h)), kv


class LLaDAModel(nn.Module):
    """The hub's inner model (a plain module): `transformer` = wte, blocks, ln_f and (untied) ff_out."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        unsupported = {f: getattr(config, f) for f, ok in SUPPORTED.items() if getattr(config, f, ok[0]) not in ok}
        if unsupported:
            raise NotImplementedError(f"raydllm's LLaDA implements the hub checkpoints' configuration only, "
                                      f"not {unsupported}")
        self.config = config
        vocab = config.embedding_size or config.vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, config.d_model),
            blocks=nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps)))
        if not config.weight_tying:
            self.transformer["ff_out"] = nn.Linear(config.d_model, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, *, output_hidden_states=False, kv_cache=None,
                block_start: int = 0, return_kv: bool = False) -> DiffusionLMOutput:
        x = self.transformer.wte(input_ids)
        batch, length = input_ids.shape
        total = attention_mask.shape[-1] if attention_mask is not None else (
            kv_cache[0][0].shape[-2] if kv_cache is not None else length)
        check_block(length, total, block_start, kv_cache)
        # Pad keys hidden from every query; an all-ones mask is no mask (as the hub code).
        keep = None
        if attention_mask is not None and not attention_mask.bool().all():
            keep = attention_mask.bool()[:, None, None, :]
        positions = torch.arange(block_start, block_start + length, device=x.device)[None]
        rope = rotary(positions, self.config.d_model // self.config.n_heads, self.config.rope_theta)
        x, hidden_states, kv = run_layers(self.transformer.blocks, x, rope, keep, kv_cache=kv_cache,
                                          block_start=block_start, output_hidden_states=output_hidden_states,
                                          return_kv=return_kv)
        x = self.transformer.ln_f(x)
        logits = F.linear(x, self.transformer.wte.weight) if self.config.weight_tying else self.transformer.ff_out(x)
        return DiffusionLMOutput(logits=logits, hidden_states=None if hidden_states is None else (*hidden_states, x),
                                 kv_cache=kv)


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module):
        init_weights(module, self.config.init_std)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, return_dict: bool = True, *, kv_cache=None,
                block_start: int = 0, return_kv: bool = False) -> DiffusionLMOutput:
        """Logits [B, L, V] (position i predicts token i); see raydllm.core.archs for kv_cache / block_start."""
        out = self.model(input_ids, attention_mask, output_hidden_states=output_hidden_states, kv_cache=kv_cache,
                         block_start=block_start, return_kv=return_kv)
        return out if return_dict else out.to_tuple()
