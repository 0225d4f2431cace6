"""Engine layer: one adapter over every masked-diffusion backbone: the embedded tiny model, LLaDA, Dream, a local folder.

The adapter gives the rest of raydllm a single contract: `backbone(input_ids, attention_mask)` returns
logits aligned so that logits[:, i] predicts token i, and the last hidden states for pooling;
`all_hidden_states` gives every layer for the drift probe. Dream-family models predict token i at
position i - 1 (shifted logits); the adapter undoes that here so losses and the sampler never see it.
`forward_with_cache` is the fast sampler's block KV cache, aligned the same way, for raydllm's own LLaDA and
Dream classes (raydllm.core.archs) and the embedded model; a remote-code model has none.

Padding: a row's logits must not depend on how much longer the other rows of its batch are. Backbones
differ in what they do with `attention_mask`: the embedded model and transformers-style models take the
[B, L] mask; Dream's code hands `attention_mask` to SDPA as is, so it needs a [B, 1, 1, L] boolean key mask;
LLaDA's original hub code accepts the mask and never applies it (its attention runs with attn_mask=None).
`padding_mode` finds out at load time which form the backbone honours (a 2-row probe, left padded, against
the short row alone); a backbone that honours neither runs each group of rows with the same padding
separately, with the padding cut off ("rows": exact, fewer rows per matmul). `model.padding` overrides it.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from raydllm.core.archs import ARCHITECTURES
from raydllm.core.config import ConfigError, LoraSettings, ModelConfig
from raydllm.core.model import TinyDiffusionConfig, TinyDiffusionLM, build_tiny
from raydllm.engine.pretrain import load_base_weights

log = logging.getLogger(__name__)

# Mask token ids of known families whose config/tokenizer do not expose one under the usual names.
KNOWN_MASK_IDS = {"llada": 126336}
SHIFTED_FAMILIES = ("dream",)
# raydllm's own architectures: their block K/V API (return_kv / kv_cache / block_start) serves the block KV cache.
BLOCK_CACHE_CLASSES = tuple(model_class for _, model_class in ARCHITECTURES.values())
# The embedded model's save_pretrained folders (a trial's export/): raydllm's own class loads them, no remote code.
EMBEDDED_ARCHITECTURES = {TinyDiffusionConfig.model_type: (TinyDiffusionConfig, TinyDiffusionLM)}

# LoRA's default targets per family (by substring of config.model_type): every attention and MLP linear layer
# of each block, never the embedding or the LM head. A list = module-name suffixes, a string = a regex over
# the full module name (PEFT's two forms). The embedded model: `model.Block` (fused qkv, proj, the MLP's two
# linears). LLaDA (OLMo-style LLaDALlamaBlock): q_proj, k_proj, v_proj, attn_out, ff_proj (gate), up_proj,
# ff_out (down); anchored to the blocks because LLaDA-8B's untied LM head is `transformer.ff_out` too.
# Dream (Qwen2): the usual seven. Other families fall back to PEFT's own table (Qwen2, Llama, ...).
LORA_TARGETS: dict[str, list[str] | str] = {
    "raydllm_tiny": ["qkv", "proj", "mlp.0", "mlp.2"],
    "llada": r".*\.(blocks\.\d+|block_groups\.\d+\.\d+)\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)",
    "dream": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass(frozen=True)
class TokenIds:
    mask: int
    pad: int
    eos: int


# How a backbone is given padding (see the module docstring).
PADDING_MODES = ("mask", "mask_4d", "rows")


def _mask_for(mode: str, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attention_mask is None or mode == "mask":
        return attention_mask
    return attention_mask.bool()[:, None, None, :]  # mask_4d: True = this key may be attended to


class Backbone(nn.Module):
    def __init__(self, model: nn.Module, ids: TokenIds, *, shift_logits: bool, padding: str = "mask"):
        super().__init__()
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
        self.model = model
        self.ids = ids
        self.shift_logits = shift_logits
        self.padding = padding

    @property
    def is_lora(self) -> bool:
        return getattr(self.model, "peft_config", None) is not None

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters; PEFT's count for a LoRA model (it unpacks 4-bit storage)."""
        if self.is_lora:
            return tuple(int(n) for n in self.model.get_nb_trainable_parameters())
        return (sum(p.numel() for p in self.parameters() if p.requires_grad),
                sum(p.numel() for p in self.parameters()))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def _run(self, input_ids, attention_mask, hidden: bool = True):
        """(logits, every layer's hidden states, or None when ``hidden`` is False: sampling needs only the
        logits, and at 8B the stack is GBs the forward would otherwise keep alive)."""
        if self.padding == "rows" and attention_mask is not None and not bool(attention_mask.all()):
            return self._run_rows(input_ids, attention_mask, hidden)
        out = self.model(input_ids=input_ids, attention_mask=_mask_for(self.padding, attention_mask),
                         output_hidden_states=hidden)
        logits = out.logits
        if self.shift_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits, out.hidden_states if hidden else None

    def _run_rows(self, input_ids, attention_mask, hidden: bool = True):
        """For a backbone that ignores its attention mask: each group of rows with the same real positions
        runs alone with its padding cut off; pad positions get zero logits and hidden states."""
        keep = attention_mask.bool()
        groups: dict[bytes, list[int]] = {}
        for row in range(input_ids.shape[0]):
            if keep[row].any():
                groups.setdefault(keep[row].cpu().numpy().tobytes(), []).append(row)
        logits = states = None
        for rows in groups.values():
            index = torch.tensor(rows, device=input_ids.device)
            positions = keep[rows[0]].nonzero().squeeze(1)
            sub_logits, sub_hidden = self._run(input_ids[index][:, positions], None, hidden)
            if logits is None:
                batch, length = input_ids.shape
                logits = sub_logits.new_zeros(batch, length, sub_logits.shape[-1])
                states = [h.new_zeros(batch, length, h.shape[-1]) for h in sub_hidden] if hidden else None
            logits = logits.index_put((index[:, None], positions[None, :]), sub_logits)
            if hidden:
                states = [h.index_put((index[:, None], positions[None, :]), s) for h, s in zip(states, sub_hidden)]
        return logits, tuple(states) if hidden else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, L, V], last hidden states [B, L, D])."""
        logits, hidden_states = self._run(input_ids, attention_mask)
        return logits, hidden_states[-1]

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(input_ids, attention_mask, hidden=False)[0]

    @property
    def supports_kv_cache(self) -> bool:
        """Whether `forward_with_cache` works: the model is one of raydllm's own LLaDA / Dream classes (their
        `return_kv` / `kv_cache` / `block_start` API, see raydllm.core.archs), or has a `forward_kv` (the embedded
        model). A remote-code model has neither: the fast sampler runs it with parallel decoding alone."""
        own_architecture = isinstance(_unwrapped(self.model), BLOCK_CACHE_CLASSES)
        return own_architecture or callable(getattr(self.model, "forward_kv", None))

    def forward_with_cache(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                           cache=None, start: int = 0, end: int | None = None):
        """(logits, cache) with a block KV cache: cache=None is a full pass (logits [B, L, V]) that also returns
        every layer's keys/values; with a cache only positions [start, end) are recomputed against the cached
        keys/values of the others (logits [B, end - start, V], the cache returned unchanged): exact when
        nothing outside the window changed since the cache was filled. Logits are aligned as `logits` aligns
        them. Shifted logits (Dream): position i's logits come out at i - 1, so the model recomputes
        [start - 1, end) and its output at start - 1 .. end - 2 is the window's; position start - 1 gets fresh
        keys/values too, from its own unchanged token (the cached ones in the first layer; above it they see the
        block's current tokens, as the block's own do). Only when `supports_kv_cache`."""
        total = input_ids.shape[1]
        if cache is None:
            start, end = 0, total
        end = total if end is None else end
        first = start - 1 if self.shift_logits and start > 0 else start
        logits, cache = self._cached_run(input_ids, attention_mask, cache, first, end)
        if self.shift_logits:  # as `_run`: position 0 predicts no token and keeps its own logits
            logits = logits[:, :-1] if first < start else torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits, cache

    def _cached_run(self, input_ids, attention_mask, cache, start: int, end: int):
        """The model's own (unshifted) logits for [start, end) (all positions without a cache), and the cache."""
        if isinstance(_unwrapped(self.model), BLOCK_CACHE_CLASSES):
            # raydllm's archs take the [B, L] mask in every padding mode (they implement it, see raydllm.core.archs).
            if cache is None:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_kv=True)
                return out.logits, out.kv_cache
            out = self.model(input_ids=input_ids[:, start:end], attention_mask=attention_mask, kv_cache=cache,
                             block_start=start)
            return out.logits, cache
        return self.model.forward_kv(input_ids, attention_mask, cache=cache, start=start, end=end)

    def all_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, ...]:
        """Embedding output followed by every layer's output (the last after the final norm)."""
        return self._run(input_ids, attention_mask)[1]


class BaseView(Backbone):
    """The frozen base of a LoRA backbone: the same modules and weights with the adapters switched off
    (PEFT's `disable_adapter`), for the probes' base-vs-fine-tuned comparisons without a second copy."""

    def __init__(self, lora: Backbone):
        super().__init__(lora.model, lora.ids, shift_logits=lora.shift_logits)

    def _run(self, input_ids, attention_mask, hidden: bool = True):
        with self.model.disable_adapter():
            return super()._run(input_ids, attention_mask, hidden)

    def _cached_run(self, input_ids, attention_mask, cache, start: int, end: int):
        with self.model.disable_adapter():
            return super()._cached_run(input_ids, attention_mask, cache, start, end)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model under a PEFT (LoRA) wrapper, else the model itself."""
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


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



def own_architecture(name_or_path: str, implementation: str, revision: str | None = None):
    """raydllm's (config class, model class) for the model_type in the folder's config.json (LLaDA, Dream, or
    the embedded model's own export), or None for the folder's own (remote) code; read without running any of
    the folder's code."""
    from transformers import PreTrainedConfig

    if implementation == "remote":
        return None
    model_type = str(PreTrainedConfig.get_config_dict(name_or_path, revision=revision)[0].get("model_type", ""))
    own = ARCHITECTURES.get(model_type.lower())
    if own is None and implementation == "raydllm":
        raise ConfigError(f"model.implementation: raydllm implements {sorted(ARCHITECTURES)}, "
                          f"not {name_or_path} (model_type {model_type!r})")
    return own or EMBEDDED_ARCHITECTURES.get(model_type.lower())


def load_pretrained(name_or_path: str, *, trust_remote_code: bool, dtype: torch.dtype | None = None,
                    implementation: str = "auto", revision: str | None = None, **model_kwargs):
    """The path a user's model id takes: raydllm's own classes for LLaDA / Dream (see raydllm.core.archs) and
    the embedded model, else AutoConfig/AutoModel (running the folder's code only with trust_remote_code); the
    tokenizer is always the folder's (AutoTokenizer). `revision`: the hub commit to download (model.revision)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    local = Path(name_or_path)
    if (name_or_path.startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").exists():
        raise ConfigError(f"model.name: {name_or_path} is not a Hugging Face model folder (no config.json)")
    pinned = {"revision": revision} if revision else {}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **pinned)
    own = own_architecture(name_or_path, implementation, revision)
    if own is not None:
        config_class, model_class = own
        try:
            model_config = config_class.from_pretrained(name_or_path, **pinned)
            # "auto": the checkpoint's torch_dtype if its config names one, else float32 (as AutoModel).
            model = model_class.from_pretrained(name_or_path, config=model_config,
                                                dtype=dtype if dtype is not None else "auto", **pinned,
                                                **model_kwargs)
            return model, tokenizer
        except NotImplementedError as error:
            raise ConfigError(f"model.implementation: {error}; model.implementation=remote (with "
                              "model.trust_remote_code=true) runs the folder's own code") from None
    model_config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **pinned)
    kwargs = ({"dtype": dtype} if dtype is not None else {}) | pinned | model_kwargs
    model = AutoModel.from_pretrained(name_or_path, config=model_config, trust_remote_code=trust_remote_code,
                                      **kwargs)
    return model, tokenizer


def enable_gradient_checkpointing(model: nn.Module, name: str) -> str:
    """Turn on activation checkpointing through the entry point the model has: transformers' API where
    the class declares `supports_gradient_checkpointing` (the embedded model, Dream), else LLaDA's own
    `model.model.set_activation_checkpointing(whole_layer)` (LLaDA's hub class declares no support, and
    transformers 5 refuses it). Returns which one was used."""
    if getattr(model, "supports_gradient_checkpointing", False):
        kwargs = {"use_reentrant": False}
        # transformers 5 renamed it; remote-code models on older releases only have the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return "transformers"
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "set_activation_checkpointing"):
        # The strategy enum lives in the model's own (remote) code; it is a str enum, so the name works too.
        strategies = getattr(sys.modules.get(type(inner).__module__), "ActivationCheckpointingStrategy", None)
        inner.set_activation_checkpointing(strategies.whole_layer if strategies is not None else "whole_layer")
        return "set_activation_checkpointing"
    raise ConfigError(f"model.gradient_checkpointing: {name} ({type(model).__name__}) supports neither transformers' "
                      "gradient checkpointing nor set_activation_checkpointing; set model.gradient_checkpointing=false")


@torch.no_grad()
def padding_mode(model: nn.Module, *, pad_id: int, vocab_size: int, tolerance: float = 0.1) -> str:
    """Which form of attention mask keeps a row's logits independent of its batch (see PADDING_MODES).

    Probe: a 6-token row alone, then left-padded by 3 beside a 9-token row. A form passes when it changes
    the row's logits by at most `tolerance` times what attending to the 3 pads changes them (relative L2
    errors against the row alone): a yardstick of the model's own scale, so bf16 rounding passes and an
    ignored mask does not."""
    generator = torch.Generator().manual_seed(0)
    low = min(16, max(vocab_size - 64, 0))  # ordinary token ids, clear of most special ones
    high = max(low + 1, min(vocab_size, low + 1000))
    device = next(model.parameters()).device
    long_row = torch.randint(low, high, (9,), generator=generator)
    short_row = torch.randint(low, high, (6,), generator=generator)
    batch = torch.stack([long_row, torch.cat([torch.full((3,), pad_id), short_row])]).to(device)
    attention = torch.ones_like(batch)
    attention[1, :3] = 0
    was_training = model.training
    model.eval()
    try:
        reference = model(input_ids=short_row[None].to(device)).logits[0].float()

        def error(mask) -> float:
            logits = model(input_ids=batch, attention_mask=mask).logits[1, 3:].float()
            return float((logits - reference).norm() / reference.norm().clamp(min=1e-12))

        unmasked = error(None)
        for mode in ("mask", "mask_4d"):
            try:
                err = error(_mask_for(mode, attention))
            except (RuntimeError, ValueError, TypeError) as exc:  # e.g. SDPA refusing a [B, L] integer mask
                log.info("padding probe: %s mask refused (%s)", mode, str(exc).splitlines()[0][:200])
                continue
            log.info("padding probe: %s mask, relative logit change %.2e (pads attended: %.2e)", mode, err,
                     unmasked)
            if err <= tolerance * unmasked or err < 1e-6:
                return mode
        return "rows"
    finally:
        model.train(was_training)


def load_backbone(cfg: ModelConfig, *, dtype: torch.dtype = torch.float32) -> tuple[Backbone, object]:
    """(Backbone, tokenizer) for `model.name`: "tiny" or a Hugging Face id / local folder, in `dtype`
    (the training dtype: bfloat16 when training runs in bf16)."""
    quantized = four_bit_kwargs(cfg) if cfg.lora.load_in_4bit else {}
    if cfg.name == "tiny":
        if quantized:
            raise ConfigError("model.lora.load_in_4bit: the embedded model is not loaded through from_pretrained; "
                              "4-bit loading is for Hugging Face models")
        model, tokenizer = build_tiny(cfg)
        if cfg.init != "random":
            model.load_state_dict(load_base_weights(cfg))
        model.to(dtype)
    else:
        model, tokenizer = load_pretrained(cfg.name, trust_remote_code=cfg.trust_remote_code, dtype=dtype,
                                           implementation=cfg.implementation, revision=cfg.revision, **quantized)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.name)
    shift = cfg.shift_logits if cfg.shift_logits is not None else any(
        f in _family(model.config) for f in SHIFTED_FAMILIES)
    ids = resolve_token_ids(cfg, model.config, tokenizer)
    padding = cfg.padding if cfg.padding != "auto" else padding_mode(
        model, pad_id=ids.pad, vocab_size=int(model.config.vocab_size))
    if cfg.lora.rank > 0:
        model = apply_lora(model, cfg.lora)
    log.info("backbone %s: %d layers, width %d, mask id %d, shifted logits %s, padding %s", cfg.name,
             model.config.num_hidden_layers, model.config.hidden_size, ids.mask, shift, padding)
    return Backbone(model, ids, shift_logits=shift, padding=padding), tokenizer


# -- LoRA ------------------------------------------------------------------------------------------------
def lora_targets(cfg: LoraSettings, model_config) -> list[str] | str | None:
    """`model.lora.target_modules`, else the family's default, else None (PEFT's table decides)."""
    if cfg.target_modules is not None:
        return cfg.target_modules
    family = _family(model_config)
    return next((targets for name, targets in LORA_TARGETS.items() if name in family), None)


def apply_lora(model: nn.Module, cfg: LoraSettings) -> nn.Module:
    """The model with LoRA adapters (PEFT `get_peft_model`): every base tensor frozen, the adapters trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.rank,
                        lora_dropout=cfg.dropout, target_modules=lora_targets(cfg, model.config), bias="none")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # no default for this family, or no module matches the patterns
        raise ConfigError(f"model.lora.target_modules: {str(exc).splitlines()[0]}") from None


def four_bit_kwargs(cfg: ModelConfig) -> dict:
    """from_pretrained arguments that load the frozen base in 4-bit NF4 (bf16 compute); refused with one line
    where bitsandbytes or a CUDA device is missing."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.lora.load_in_4bit: needs the bitsandbytes package (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        raise ConfigError("model.lora.load_in_4bit: needs a CUDA GPU (bitsandbytes 4-bit layers run on CUDA)")
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.bfloat16)}


def without_adapters(cfg: ModelConfig) -> ModelConfig:
    """The model config of the frozen base a LoRA run starts from (4-bit loading kept)."""
    return cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"rank": 0})})


def load_adapters(backbone: Backbone, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (keys as in the PEFT model's state dict; buffers may come along) into a LoRA
    backbone; every adapter tensor must be there, and no key unknown to the model."""
    expected = {name for name, p in backbone.model.named_parameters() if p.requires_grad}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(backbone.model.state_dict()))
    if missing or unexpected:
        raise ConfigError(f"LoRA checkpoint: {len(missing)} adapter tensors missing (e.g. {missing[:1]}), "
                          f"{len(unexpected)} unexpected (e.g. {unexpected[:1]}); was it trained with this "
                          f"model.lora config?")
    backbone.model.load_state_dict(state, strict=False)


def merge_adapters(backbone: Backbone) -> Backbone:
    """The backbone with its adapters merged into the base weights (PEFT `merge_and_unload`): a plain model."""
    backbone.model = backbone.model.merge_and_unload()
    return backbone
