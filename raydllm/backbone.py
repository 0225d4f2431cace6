"""Engine layer: one adapter over every masked-diffusion backbone: the embedded tiny model, LLaDA, Dream, a local folder.

The adapter gives the rest of raydllm a single contract: `backbone(input_ids, attention_mask)` returns
logits aligned so that logits[:, i] predicts token i, and the last hidden states for pooling;
`all_hidden_states` gives every layer for the drift probe. Dream-family models predict token i at
position i - 1 (shifted logits); the adapter undoes that here so losses and the sampler never see it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .config import ConfigError, ModelConfig
from .model import build_tiny
from .pretrain import load_base_weights

log = logging.getLogger(__name__)

# Mask token ids of known families whose config/tokenizer do not expose one under the usual names.
KNOWN_MASK_IDS = {"llada": 126336}
SHIFTED_FAMILIES = ("dream",)


@dataclass(frozen=True)
class TokenIds:
    mask: int
    pad: int
    eos: int


class Backbone(nn.Module):
    def __init__(self, model: nn.Module, ids: TokenIds, *, shift_logits: bool):
        super().__init__()
        self.model = model
        self.ids = ids
        self.shift_logits = shift_logits

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def _run(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        logits = out.logits
        if self.shift_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits, out.hidden_states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, L, V], last hidden states [B, L, D])."""
        logits, hidden_states = self._run(input_ids, attention_mask)
        return logits, hidden_states[-1]

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(input_ids, attention_mask)[0]

    @property
    def supports_kv_cache(self) -> bool:
        """Whether `forward_with_cache` works: the model has a `forward_kv` (the embedded model has; an
        architecture gains the block KV cache by implementing it) and its logits need no shift."""
        return callable(getattr(self.model, "forward_kv", None)) and not self.shift_logits

    def forward_with_cache(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                           cache=None, start: int = 0, end: int | None = None):
        """(logits, cache) with a block KV cache, see `model.TinyDiffusionLM.forward_kv`: cache=None is a
        full pass that also returns every layer's keys/values; with a cache only positions [start, end) are
        recomputed against the cached keys/values of the others. Only when `supports_kv_cache`."""
        return self.model.forward_kv(input_ids, attention_mask, cache=cache, start=start, end=end)

    def all_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, ...]:
        """Embedding output followed by every layer's output (the last after the final norm)."""
        return self._run(input_ids, attention_mask)[1]


def _family(model_config) -> str:
    return str(getattr(model_config, "model_type", "")).lower()


def resolve_token_ids(cfg: ModelConfig, model_config, tokenizer) -> TokenIds:
    family = _family(model_config)
    mask = (cfg.mask_token_id
            if cfg.mask_token_id is not None else getattr(model_config, "mask_token_id", None))
    if mask is None:
        mask = tokenizer.mask_token_id
    if mask is None:
        mask = next((m for name, m in KNOWN_MASK_IDS.items() if name in family), None)
    if mask is None:
        raise ConfigError(f"model.mask_token_id: {cfg.name} exposes no mask token; set model.mask_token_id")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"model.name: the tokenizer of {cfg.name} has no EOS token")
    pad = tokenizer.pad_token_id
    if pad is None or pad == mask:
        # Left padding needs a pad id distinct from the mask id; EOS is what LLaDA uses.
        pad = eos
    return TokenIds(mask=int(mask), pad=int(pad), eos=int(eos))



def load_pretrained(name_or_path: str, *, trust_remote_code: bool, dtype: torch.dtype | None = None):
    """The path a user's model id takes: AutoConfig/AutoModel/AutoTokenizer with trust_remote_code."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    local = Path(name_or_path)
    if (name_or_path.startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").exists():
        raise ConfigError(f"model.name: {name_or_path} is not a Hugging Face model folder (no config.json)")
    model_config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModel.from_pretrained(name_or_path, config=model_config, trust_remote_code=trust_remote_code,
                                      **kwargs)
    return model, tokenizer


def load_backbone(cfg: ModelConfig, *, dtype: torch.dtype | None = None) -> tuple[Backbone, object]:
    """(Backbone, tokenizer) for `model.name`: "tiny" or a Hugging Face id / local folder."""
    if cfg.name == "tiny":
        model, tokenizer = build_tiny(cfg)
        if cfg.init != "random":
            model.load_state_dict(load_base_weights(cfg))
    else:
        model, tokenizer = load_pretrained(cfg.name, trust_remote_code=cfg.trust_remote_code, dtype=dtype)
    if cfg.gradient_checkpointing:
        # transformers 5 renamed it; remote-code models on older releases only have the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shift = cfg.shift_logits if cfg.shift_logits is not None else any(
        f in _family(model.config) for f in SHIFTED_FAMILIES)
    ids = resolve_token_ids(cfg, model.config, tokenizer)
    log.info("backbone %s: %d layers, width %d, mask id %d, shifted logits %s", cfg.name,
             model.config.num_hidden_layers, model.config.hidden_size, ids.mask, shift)
    return Backbone(model, ids, shift_logits=shift), tokenizer
