"""Core layer: the embedded backbone: a tiny bidirectional transformer for masked diffusion, in Hugging Face form.

It is a `PreTrainedModel`, so it saves with `save_pretrained` (with this file as remote code) and loads
through exactly the `AutoModel.from_pretrained(..., trust_remote_code=True)` path a user's LLaDA or Dream
id goes through. This file therefore imports only torch and transformers.

Shape: pre-LayerNorm blocks, rotary positions (relative, so left padding does not move real tokens),
no causal mask: every position attends to every non-pad position.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput


class TinyDiffusionConfig(PreTrainedConfig):
    model_type = "raydllm_tiny"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}

    def __init__(self, vocab_size: int = 260, d_model: int = 128, n_layers: int = 4, n_heads: int = 4,
                 max_seq_len: int = 512, mlp_ratio: int = 4, rope_theta: float = 10000.0,
                 mask_token_id: int | None = None, **kwargs):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.max_seq_len = max_seq_len
        self.mlp_ratio = mlp_ratio
        self.rope_theta = rope_theta
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)


def rotary_tables(length: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


class Block(nn.Module):
    """One pre-LayerNorm transformer block with bidirectional attention."""

    def __init__(self, width: int, n_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.n_heads = n_heads
        self.ln_attn = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def _qkv(self, h: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None):
        batch, length, _ = h.shape
        q, k, v = self.qkv(self.ln_attn(h)).view(batch, length, 3, self.n_heads, -1).transpose(1, 3).unbind(2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        return q, k, v

    def _finish(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h = h + self.proj(attn.transpose(1, 2).reshape(h.shape))
        return h + self.mlp(self.ln_mlp(h))

    def forward(self, h: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._qkv(h, rotary)
        return self._finish(h, F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask))

    def forward_kv(self, h: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                   key_mask: torch.Tensor | None, cached: tuple[torch.Tensor, torch.Tensor] | None, start: int
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """`forward` for the positions [start, start + W) that ``h`` holds, returning their keys/values
        ([B, H, W, head]) too. ``cached``: keys/values of the whole sequence (from an earlier full pass);
        the window's queries then attend to its own fresh keys/values and the cached ones elsewhere."""
        q, k, v = self._qkv(h, rotary)
        keys, values = k, v
        if cached is not None:
            end = start + h.shape[1]
            keys = torch.cat([cached[0][:, :, :start], k, cached[0][:, :, end:]], dim=2)
            values = torch.cat([cached[1][:, :, :start], v, cached[1][:, :, end:]], dim=2)
        return self._finish(h, F.scaled_dot_product_attention(q, keys, values, attn_mask=key_mask)), (k, v)


class TinyDiffusionLM(PreTrainedModel):
    config_class = TinyDiffusionConfig
    base_model_prefix = "tiny"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]

    def __init__(self, config: TinyDiffusionConfig):
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config.d_model, config.n_heads, config.mlp_ratio)
                                    for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, return_dict: bool = True, **unused) -> MaskedLMOutput:
        _, length = input_ids.shape
        if length > self.config.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds model.max_seq_len={self.config.max_seq_len}")
        h = self.tok_emb(input_ids)
        rotary = rotary_tables(length, self.config.d_model // self.config.n_heads, self.config.rope_theta,
                               device=h.device)
        # [B, 1, 1, L] boolean: True = this key may be attended to (pad keys are hidden from everyone).
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        hidden_states = [h]
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                h = checkpoint(block, h, rotary, key_mask, use_reentrant=False)
            else:
                h = block(h, rotary, key_mask)
            hidden_states.append(h)
        h = self.ln_f(h)
        hidden_states[-1] = h  # as in Hugging Face decoders: the last entry is after the final norm
        logits = self.lm_head(h)
        return MaskedLMOutput(logits=logits, hidden_states=tuple(hidden_states) if output_hidden_states else None)

    def forward_kv(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None, start: int = 0,
                   end: int | None = None) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Inference with a block KV cache (Fast-dLLM's approximate cache for bidirectional models).

        ``cache=None``: a full pass; returns (logits [B, L, V], cache), the cache being every layer's keys
        (after rotary) and values for all L positions, ``[B, H, L, head]``. With a cache: only positions
        [start, end) of ``input_ids`` (the whole sequence, [B, L]) are recomputed; their queries attend to
        their own fresh keys/values and to the cached ones of every other position, so the result is exact
        when those positions' states have not changed since the cache was filled, and an approximation
        otherwise. Returns (logits [B, end - start, V], the cache unchanged). ``attention_mask`` covers
        all L positions in both cases.
        """
        length = input_ids.shape[1]
        if length > self.config.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds model.max_seq_len={self.config.max_seq_len}")
        if cache is None:
            start, end = 0, length
        end = length if end is None else end
        cos, sin = rotary_tables(length, self.config.d_model // self.config.n_heads, self.config.rope_theta,
                                 device=input_ids.device)
        rotary = cos[start:end], sin[start:end]
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        h = self.tok_emb(input_ids[:, start:end])
        fresh = []
        for layer, block in enumerate(self.blocks):
            h, kv = block.forward_kv(h, rotary, key_mask, None if cache is None else cache[layer], start)
            fresh.append(kv)
        logits = self.lm_head(self.ln_f(h))
        return logits, fresh if cache is None else cache


def build_tiny(cfg) -> tuple[TinyDiffusionLM, object]:
    """(model, byte tokenizer) of the embedded model at the shape a `config.ModelConfig` names."""
    from raydllm.core.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    model_config = TinyDiffusionConfig(vocab_size=len(tokenizer), d_model=cfg.d_model, n_layers=cfg.n_layers,
                                       n_heads=cfg.n_heads, max_seq_len=cfg.max_seq_len,
                                       mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return TinyDiffusionLM(model_config), tokenizer
