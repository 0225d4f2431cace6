"""Tiny re-creation of LLaDA's hub `modeling_llada.py` (GSAI-ML/LLaDA-8B-Base / -Instruct remote code).

Written for raydllm's tests from the facts of the public code (not copied); same module and parameter names
as the hub (`model.transformer.wte`, `.blocks.N.{attn_norm,q_proj,k_proj,v_proj,attn_out,ff_norm,ff_proj,
up_proj,ff_out}`, `.ln_f`, `.ff_out`), so a hub state dict has the same keys. Only the configuration the hub
checkpoints use is implemented (block_type "llama", RMS norm, SiLU-gated MLP, RoPE, block_group_size 1).

Facts reproduced (read in ML-GSAI/LLaDA@5975047 modeling_llada.py, the copy the LLaDA authors published on
2025-10-15 as "the new modeling_llada" and, per EVAL.md, uploaded to the hub in October 2025; compared with
NVlabs/Fast-dLLM@24cc59e llada/model/modeling_llada.py, an earlier hub copy, and ZHZisZZ/dllm's copy):
- `LLaDAModelLM(PreTrainedModel)` is a thin wrapper; `.model` is `LLaDAModel(nn.Module)`, not a PreTrainedModel.
  `LLaDAModelLM` does NOT declare `supports_gradient_checkpointing`, so transformers'
  `gradient_checkpointing_enable` / `activation_checkpointing_enable` raise ValueError. Activation
  checkpointing goes only through `model.model.set_activation_checkpointing(ActivationCheckpointingStrategy.X)`
  (torch.utils.checkpoint, use_reentrant=False): whole_layer, one_in_two/three/four checkpoint whole blocks,
  fine_grained checkpoints attention, ff_norm and the activation inside every block; other members do nothing.
- Block (LLaDALlamaBlock): x + attn_out(SDPA(rope(q), rope(k), v)) on attn_norm(x); then
  x + ff_out(silu(ff_proj(h)) * up_proj(h)) on h = ff_norm(x). RMS norm computed in float32, cast back,
  then scaled by its weight. RoPE: rotate-half form, positions 0..L-1 of the sequence as given (no
  position_ids argument), sin/cos and the rotation in float32 (rope_full_precision). Attention is never causal.
- attention_mask (hub version since Oct 2025): only if the mask contains a 0, it becomes an additive bias
  (1 - mask) * finfo(float32).min of shape [B, 1, 1, L], added to an all-zero bidirectional [1, 1, L, L] bias
  and passed to SDPA as attn_mask (cast to the activation dtype, -inf replaced by the dtype's min). So pad
  keys are hidden from every query, pad queries still attend to the real tokens (no NaN rows), and because
  RoPE is relative the real tokens of a left-padded row get the same outputs as the row alone, up to
  rounding. An all-ones mask is the same as no mask. NOTE: hub revisions before Oct 2025 (the Fast-dLLM copy)
  computed the bias but called SDPA with attn_mask=None, i.e. ignored attention_mask entirely, so pad tokens
  were attended to and padded rows changed; this re-creation follows the current hub.
- `attention_bias` may also be given: bool/int8 (True = may attend) or float (added to the scores).
- forward(input_ids, inputs_embeds, attention_mask, attention_bias, past_key_values, labels, use_cache,
  output_attentions, output_hidden_states, return_dict, cache_position) -> CausalLMOutputWithPast(logits,
  past_key_values, hidden_states). `use_cache=None` reads `config.use_cache`. output_attentions raises
  ValueError; labels only warn (no loss). return_dict=False gives (logits, attn_key_values, hidden_states).
- hidden_states (output_hidden_states=True): the input of every block, then ln_f(output of the last block):
  n_layers + 1 tensors, the last one after the final norm (the last block's raw output is not returned).
- KV cache: LLaDAModel.forward asserts `past_key_values is None and not use_cache` ("The kvcache is not
  suppotred for MDM"), so the hub model cannot be run with a cache. The plumbing behind the assert is kept
  as in the hub: per block a tuple (k, v), each [B, n_kv_heads, T, head_dim], keys stored BEFORE RoPE,
  new tokens appended after the cached ones and rotated as positions past_len .. past_len+L-1.
  Fast-dLLM removes the assert and adds `replace_position` to overwrite a block in the middle (dual cache).
- Loading under transformers 5 (checked by running the hub code with transformers 5.24): the hub wrapper never
  calls `post_init()`, so `from_pretrained` fails with AttributeError 'all_tied_weights_keys'; past that, its
  `tie_weights(self)` takes no arguments and transformers 5 calls it with keyword arguments (TypeError); and
  `config.use_cache` is missing (see configuration_llada). These are reproduced only when the config has
  `tiny_hub_quirks=True`; by default this re-creation calls post_init and loads.
"""
from __future__ import annotations

import math
import warnings
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada import ActivationCheckpointingStrategy, LLaDAConfig


def ensure_finite_(x: torch.Tensor) -> torch.Tensor:
    return x.masked_fill_(x == float("-inf"), torch.finfo(x.dtype).min)


class RMSLayerNorm(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.eps = config.rms_norm_eps
        affine = config.layer_norm_with_affine
        bias = config.bias_for_layer_norm if config.bias_for_layer_norm is not None else config.include_bias
        self.weight = nn.Parameter(torch.ones(config.d_model)) if affine else None
        self.bias = nn.Parameter(torch.zeros(config.d_model)) if affine and bias else None

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            h = x.float()
            h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        if self.weight is not None:
            h = self.weight * h
        return h + self.bias if self.bias is not None else h


def rotate_half(x):
    x1, x2 = x.unflatten(-1, (2, -1)).unbind(-2)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, theta: float, full_precision: bool):
    """Keys get positions 0..T_k-1, queries the last T_q of them (they follow a cache, if any)."""
    q_len, k_len, dim = q.shape[-2], k.shape[-2], q.shape[-1]
    qf, kf = (q.float(), k.float()) if full_precision else (q, k)
    with torch.autocast(q.device.type, enabled=False):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=q.device, dtype=torch.float) / dim)
        freqs = torch.outer(torch.arange(k_len, device=q.device, dtype=torch.float), inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        sin, cos = angles.sin().type_as(qf), angles.cos().type_as(qf)
        qf = qf * cos[k_len - q_len:] + rotate_half(qf) * sin[k_len - q_len:]
        kf = kf * cos + rotate_half(kf) * sin
    return qf.type_as(q), kf.type_as(k)


class LLaDALlamaBlock(nn.Module):
    def __init__(self, layer_id: int, config: LLaDAConfig):
        super().__init__()
        self.layer_id, self.config = layer_id, config
        self.hidden_size = config.mlp_hidden_size or config.mlp_ratio * config.d_model
        head_dim = config.d_model // config.n_heads
        qkv_bias = config.include_bias or config.include_qkv_bias
        self.attn_norm = RMSLayerNorm(config)
        self.ff_norm = RMSLayerNorm(config)
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(config.d_model, config.effective_n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.d_model, config.effective_n_kv_heads * head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=config.include_bias)
        self.ff_proj = nn.Linear(config.d_model, self.hidden_size, bias=config.include_bias)
        self.up_proj = nn.Linear(config.d_model, self.hidden_size, bias=config.include_bias)
        self.ff_out = nn.Linear(self.hidden_size, config.d_model, bias=config.include_bias)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(config.residual_dropout)
        self._activation_checkpoint_fn = None

    def set_activation_checkpointing(self, strategy):
        fine = strategy == ActivationCheckpointingStrategy.fine_grained
        self._activation_checkpoint_fn = partial(checkpoint, use_reentrant=False) if fine else None

    def _maybe_checkpoint(self, fn, *args, **kwargs):
        if self._activation_checkpoint_fn is not None:
            return self._activation_checkpoint_fn(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def attention(self, q, k, v, attention_bias=None, layer_past=None, use_cache=False):
        cfg = self.config
        B, T, C = q.shape
        hd = C // cfg.n_heads
        q = q.view(B, T, cfg.n_heads, hd).transpose(1, 2)
        k = k.view(B, T, cfg.effective_n_kv_heads, hd).transpose(1, 2)
        v = v.view(B, T, cfg.effective_n_kv_heads, hd).transpose(1, 2)
        if layer_past is not None:
            k, v = torch.cat((layer_past[0], k), dim=-2), torch.cat((layer_past[1], v), dim=-2)
        present = (k, v) if use_cache else None  # cached before RoPE, as in the hub
        q_len, k_len = q.shape[-2], k.shape[-2]
        q, k = apply_rope(q, k, cfg.rope_theta, cfg.rope_full_precision)
        if attention_bias is not None:
            dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else k.dtype
            attention_bias = attention_bias[:, :, k_len - q_len:k_len, :k_len]
            if attention_bias.dtype != dtype:  # a cast copy: min(float32) becomes -inf in bf16
                attention_bias = ensure_finite_(attention_bias.to(dtype))
        if cfg.n_heads != cfg.effective_n_kv_heads:
            k = k.repeat_interleave(cfg.n_heads // cfg.effective_n_kv_heads, dim=1)
            v = v.repeat_interleave(cfg.n_heads // cfg.effective_n_kv_heads, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, is_causal=False,
                                             dropout_p=cfg.attention_dropout if self.training else 0.0)
        return self.attn_out(att.transpose(1, 2).reshape(B, T, C)), present

    def forward(self, x, attention_bias=None, layer_past=None, use_cache=False):
        h = self.attn_norm(x)
        att, cache = self._maybe_checkpoint(self.attention, self.q_proj(h), self.k_proj(h), self.v_proj(h),
                                            attention_bias, layer_past=layer_past, use_cache=use_cache)
        x = x + self.dropout(att)
        h = self._maybe_checkpoint(self.ff_norm, x)
        h = self._maybe_checkpoint(self.act, self.ff_proj(h)) * self.up_proj(h)
        return x + self.dropout(self.ff_out(h)), cache


class LLaDAOutput(NamedTuple):
    logits: torch.Tensor
    attn_key_values: Optional[list]
    hidden_states: Optional[tuple]


class LLaDAModel(nn.Module):
    def __init__(self, config: LLaDAConfig, init_params: bool = True):
        super().__init__()
        if config.block_type != "llama" or config.layer_norm_type != "rms" or config.activation_type != "silu":
            raise NotImplementedError("the tiny re-creation implements LLaDA's llama/rms/silu configuration only")
        if config.block_group_size != 1 or config.attention_layer_norm or config.alibi or not config.rope:
            raise NotImplementedError("block groups, QK norm and ALiBi are not re-created")
        self.config = config
        self.activation_checkpointing_strategy = None
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size or config.vocab_size, config.d_model),
            emb_drop=nn.Dropout(config.embedding_dropout),
            ln_f=RMSLayerNorm(config),
            blocks=nn.ModuleList(LLaDALlamaBlock(i, config) for i in range(config.n_layers)),
        ))
        if not config.weight_tying:
            self.transformer["ff_out"] = nn.Linear(config.d_model, config.embedding_size or config.vocab_size,
                                                   bias=config.include_bias)
        if init_params:
            self.reset_parameters()

    def set_activation_checkpointing(self, strategy: Optional[ActivationCheckpointingStrategy]):
        self.activation_checkpointing_strategy = strategy
        for block in self.transformer.blocks:
            block.set_activation_checkpointing(strategy)

    def _checkpoints_block(self, idx: int) -> bool:
        every = {ActivationCheckpointingStrategy.whole_layer: 1, ActivationCheckpointingStrategy.one_in_two: 2,
                 ActivationCheckpointingStrategy.one_in_three: 3, ActivationCheckpointingStrategy.one_in_four: 4}
        n = every.get(self.activation_checkpointing_strategy)
        return n is not None and idx % n == 0

    @torch.no_grad()
    def reset_parameters(self):
        """The hub's "mitchell" init: truncated normal (3 std), std 1/sqrt(fan_in); out projections also
        divided by sqrt(2 * (layer + 1)); norms to one, biases to zero."""
        def trunc(w, std):
            nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std)

        d = self.config.d_model
        trunc(self.transformer.wte.weight, 1 / math.sqrt(d))
        if "ff_out" in self.transformer:
            trunc(self.transformer.ff_out.weight, 1 / math.sqrt(d))
        for module in self.modules():
            if isinstance(module, RMSLayerNorm) and module.weight is not None:
                module.weight.fill_(1.0)
            if isinstance(module, (nn.Linear, RMSLayerNorm)) and module.bias is not None:
                module.bias.zero_()
        for block in self.transformer.blocks:
            for lin in (block.q_proj, block.k_proj, block.v_proj, block.ff_proj, block.up_proj):
                trunc(lin.weight, 1 / math.sqrt(d))
            scale = 1 / math.sqrt(2 * (block.layer_id + 1))
            trunc(block.attn_out.weight, scale / math.sqrt(d))
            trunc(block.ff_out.weight, scale / math.sqrt(block.hidden_size))

    def forward(self, input_ids, input_embeddings=None, attention_mask=None, attention_bias=None,
                past_key_values=None, use_cache: bool = False, last_logits_only: bool = False,
                output_hidden_states: Optional[bool] = None) -> LLaDAOutput:
        assert not self.config.alibi, "Alibi length extrapolation is not supported for MDM."
        assert self.config.rope, "Rope must be used in Llama-Encoder for MDM."
        assert past_key_values is None and not use_cache, "The kvcache is not suppotred for MDM."
        x = self.transformer.wte(input_ids) if input_embeddings is None else input_embeddings
        batch_size, seq_len = x.shape[:2]
        past_length = 0 if past_key_values is None else past_key_values[0][0].size(-2)
        if self.config.input_emb_norm:
            x = x * self.config.d_model ** 0.5
        x = self.transformer.emb_drop(x)

        if attention_mask is not None and 0.0 in attention_mask:
            attention_mask = attention_mask.to(torch.float).view(batch_size, -1)[:, None, None, :]
            attention_mask = (1.0 - attention_mask) * torch.finfo(attention_mask.dtype).min
        else:
            attention_mask = None
        if attention_bias is not None or attention_mask is not None or past_key_values is not None:
            total = past_length + seq_len
            if attention_bias is None:
                attention_bias = torch.zeros(1, 1, total, total, device=x.device)  # bidirectional
            elif attention_bias.dtype in (torch.int8, torch.bool):
                attention_bias = attention_bias.to(torch.float)
                attention_bias = attention_bias.masked_fill(attention_bias == 0.0, torch.finfo(torch.float).min)
            mask_len = attention_mask.shape[-1] if attention_mask is not None else total
            attention_bias = attention_bias[:, :, :mask_len, :mask_len].to(torch.float)
            if attention_mask is not None:
                attention_bias = ensure_finite_(attention_bias + attention_mask)

        all_hidden_states, attn_key_values = [], [] if use_cache else None
        for idx, block in enumerate(self.transformer.blocks):
            if output_hidden_states:
                all_hidden_states.append(x)
            layer_past = None if past_key_values is None else past_key_values[idx]
            if self._checkpoints_block(idx):
                x, cache = checkpoint(block, x, attention_bias=attention_bias, layer_past=layer_past,
                                      use_cache=use_cache, use_reentrant=False)
            else:
                x, cache = block(x, attention_bias=attention_bias, layer_past=layer_past, use_cache=use_cache)
            if attn_key_values is not None:
                attn_key_values.append(cache)
        if last_logits_only:
            x = x[:, -1:, :]
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            all_hidden_states.append(x)  # after the final norm, following Hugging Face
        if self.config.weight_tying:
            logits = F.linear(x, self.transformer.wte.weight)
        else:
            logits = self.transformer.ff_out(x)
        if self.config.scale_logits:
            logits = logits * (1 / math.sqrt(self.config.d_model))
        return LLaDAOutput(logits, attn_key_values, tuple(all_hidden_states) if output_hidden_states else None)


class LLaDAModelLM(PreTrainedModel):
    """Extremely barebones HF model wrapper (as the hub calls it)."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock", "LLaDASequentialBlock", "LLaDALlamaBlock"]

    def __init__(self, config: LLaDAConfig, model: Optional[LLaDAModel] = None, init_params: bool = False):
        super().__init__(config)
        self.model = model if model is not None else LLaDAModel(config, init_params=init_params)
        if not config.tiny_hub_quirks:
            self.post_init()  # the hub wrapper never calls it; transformers 5 needs it to load

    def _init_weights(self, module):
        if isinstance(module, LLaDAModel):
            module.reset_parameters()

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, attention_bias=None,
                past_key_values=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, cache_position=None):
        if use_cache is None:
            use_cache = self.config.use_cache
        if output_attentions:
            raise ValueError("output_attentions is not yet supported in LLaDA")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model.forward(input_ids=input_ids, input_embeddings=inputs_embeds,
                                     attention_mask=attention_mask, attention_bias=attention_bias,
                                     past_key_values=past_key_values, use_cache=use_cache,
                                     output_hidden_states=output_hidden_states)
        if labels is not None:
            warnings.warn("Note that for LLaDA, you cannot calculate the loss here.", UserWarning)
        if not return_dict:
            return tuple(outputs)
        return CausalLMOutputWithPast(logits=outputs.logits, past_key_values=outputs.attn_key_values,
                                      hidden_states=outputs.hidden_states)

    def can_generate(self) -> bool:
        return True

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return self.model.transformer.wte if self.config.weight_tying else self.model.transformer.ff_out

    def tie_weights(self, *args, **kwargs):
        # The hub's tie_weights(self) takes no arguments (transformers 5 passes some) and, with weight_tying,
        # replaces ff_out by wte; the forward above reads wte directly instead.
        if self.config.tiny_hub_quirks and (args or kwargs):
            raise TypeError("LLaDAModelLM.tie_weights() got an unexpected keyword argument")
