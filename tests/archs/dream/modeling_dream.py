"""Tiny re-creation of Dream's hub `modeling_dream.py` (Dream-org/Dream-v0-Base-7B remote code, Qwen2-derived).

Written for raydllm's tests from the facts of the public code (not copied); same module and parameter names
as the hub (`model.embed_tokens`, `model.layers.N.self_attn.{q,k,v,o}_proj`, `.mlp.{gate,up,down}_proj`,
`.input_layernorm`, `.post_attention_layernorm`, `model.norm`, `lm_head`), so a hub state dict has the same keys.

Facts reproduced (read in ZHZisZZ/dllm@03270de7 dllm/pipelines/dream/models/modeling_dream.py and
generation_utils.py, hub copies, and NVlabs/Fast-dLLM@24cc59e dream/model/; dllm's README says it changed
DreamModel.forward "so that model.forward() supports 2-D attention masks", and Fast-dLLM's copy, like the hub,
has no such conversion; this re-creation follows the hub):
- `DreamModel(DreamGenerationMixin, DreamPreTrainedModel)` with `.model` (DreamBaseModel) and `.lm_head`
  (no bias); `supports_gradient_checkpointing = True`, transformers-style checkpointing: DreamBaseModel has a
  `gradient_checkpointing` flag and calls `self._gradient_checkpointing_func(layer.__call__, ...)`.
- Qwen2 decoder layer: pre-RMSNorm (float32, eps rms_norm_eps), q/k/v projections WITH bias, o_proj without,
  grouped KV heads (repeat_kv), SwiGLU MLP, RoPE (rotate-half, float32 cos/sin, base rope_theta) at
  `position_ids` (default: arange from the cache length). SDPA with is_causal=False: fully bidirectional.
- `embed_tokens = nn.Embedding(vocab, hidden, padding_idx=pad_token_id)`: the pad id is the EOS id (151643),
  so the EOS input embedding receives no gradient.
- Logits are shifted: position i's logits predict token i + 1 (generation_utils does
  `logits = cat([logits[:, :1], logits[:, :-1]], 1)`); the model itself returns them unshifted.
- attention_mask: DreamModel.forward passes it unchanged to SDPA as attn_mask when it is a tensor; None or the
  string "full" mean no mask. A 2-D [B, L] 0/1 mask is therefore NOT understood: int64 -> RuntimeError (SDPA wants
  bool or float), bool/float -> a shape error unless B == 1 or B == L (then silently wrong). Callers must pass a
  4-D boolean [B, 1, L, L] mask. generation_utils builds, for left-padded rows,
  mask4 = m[:, None, None, :] & m[:, None, :, None] and position_ids = cumsum(m) - 1 (pads at position 1), so
  real tokens keep positions 0.. and never see pads; a pad query row is all False, which SDPA (torch >= 2.5)
  turns into zeros. With the 4-D mask, a left-padded row's real tokens match the row alone.
- forward(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels, use_cache,
  output_attentions, output_hidden_states, return_dict, cache_position, num_logits_to_keep, **loss_kwargs)
  -> MaskedLMOutput(loss, logits, hidden_states, attentions): no past_key_values field.
- hidden_states: the input of every layer, then norm(output of the last layer): num_hidden_layers + 1 tensors,
  the last one after the final norm.
- KV cache: `past_key_values` is a transformers Cache (DynamicCache) that each layer `update`s IN PLACE with its
  keys AFTER RoPE and its values, [B, num_key_value_heads, T, head_dim]; use_cache=None reads config.use_cache
  (False); use_cache=True without a cache makes a DynamicCache that is then dropped (not returned). New tokens are
  appended after the cached ones (positions from the cache length). A block can be run against a cache of the
  tokens before it (the cached tokens never saw the block); there is no way to overwrite a block in the middle
  (Fast-dLLM adds `dual_cache` / `replace_position` for that).
- Not re-created: output_attentions (the hub falls back to an eager path), DreamGenerationMixin
  (diffusion_generate), the from_pretrained override that loads DreamGenerationConfig, sliding window.
- Under transformers 5 the hub code cannot be built: its rotary embedding looks up
  ROPE_INIT_FUNCTIONS["default"], removed in transformers 5 (KeyError); its `_tied_weights_keys` is a list
  (save_pretrained: AttributeError 'list' object has no attribute 'keys'); its DreamGenerationConfig.validate()
  rejects transformers 5's keyword arguments (from_pretrained: TypeError). `tiny_hub_quirks=True` reproduces
  the first (construction) failure; by default this re-creation loads.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from .configuration_dream import DreamConfig


class DreamRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class DreamRotaryEmbedding(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.config = config
        if config.tiny_hub_quirks:  # as the hub: transformers 5 no longer has a "default" entry (KeyError)
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
            ROPE_INIT_FUNCTIONS["default"]

    @torch.no_grad()
    def forward(self, x, position_ids):
        dim = self.config.hidden_size // self.config.num_attention_heads
        inv_freq = 1.0 / self.config.rope_theta ** (
            torch.arange(0, dim, 2, dtype=torch.int64, device=x.device).float() / dim)
        with torch.autocast(x.device.type if x.device.type != "mps" else "cpu", enabled=False):
            freqs = (inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)
                     @ position_ids[:, None, :].float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DreamMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        if config.hidden_act != "silu":
            raise NotImplementedError("the tiny re-creation implements hidden_act='silu' only")

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamSdpaAttention(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_key_value_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None):
        if output_attentions:
            raise NotImplementedError("output_attentions (the hub's eager fallback) is not re-created")
        bsz, q_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        cos, sin = (c.unsqueeze(1) for c in position_embeddings)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if past_key_value is not None:  # keys cached after RoPE
            k, v = past_key_value.update(k, v, self.layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
        groups = self.num_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask if isinstance(attention_mask, torch.Tensor) else None,
            dropout_p=self.config.attention_dropout if self.training else 0.0, is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, q_len, -1)), None, past_key_value


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DreamSdpaAttention(config, layer_idx)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
        attn, weights, present = self.self_attn(self.input_layernorm(hidden_states), attention_mask, position_ids,
                                                past_key_value, output_attentions, use_cache, cache_position,
                                                position_embeddings)
        hidden_states = hidden_states + attn
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return (hidden_states,) + ((weights,) if output_attentions else ()) + ((present,) if use_cache else ())


class DreamPreTrainedModel(PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DreamDecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()


class DreamBaseModel(DreamPreTrainedModel):
    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DreamRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cache_position=None):
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # "`use_cache=True` is incompatible with gradient checkpointing"
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if cache_position is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            cache_position = torch.arange(seen, seen + inputs_embeds.shape[1], device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            args = (hidden_states, attention_mask, position_ids, past_key_values, output_attentions, use_cache,
                    cache_position, position_embeddings)
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(layer.__call__, *args)[0]
            else:
                hidden_states = layer(*args)[0]
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, all_hidden_states) if v is not None)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)


class DreamModel(DreamPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # the hub: ["lm_head.weight"]

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cache_position=None, num_logits_to_keep: int = 0, **loss_kwargs):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                             return_dict=return_dict, cache_position=cache_position)
        logits = self.lm_head(outputs[0][:, -num_logits_to_keep:, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **loss_kwargs)
        if not return_dict:
            output = (logits,) + tuple(outputs[1:])
            return (loss,) + output if loss is not None else output
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
