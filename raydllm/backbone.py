"""Engine layer: one adapter over every masked-diffusion backbone: the embedded tiny model, LLaDA, Dream, a local folder.

The adapter gives the rest of raydllm a single contract: `backbone(input_ids, attention_mask)` returns
logits aligned so that logits[:, i] predicts token i, and the last hidden states for pooling;
`all_hidden_states` gives every layer for the drift probe. Dream-family models predict token i at
position i - 1 (shifted logits); the adapter undoes that here so losses and the sampler never see it.

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
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def _run(self, input_ids, attention_mask):
        if self.padding == "rows" and attention_mask is not None and not bool(attention_mask.all()):
            return self._run_rows(input_ids, attention_mask)
        out = self.model(input_ids=input_ids, attention_mask=_mask_for(self.padding, attention_mask),
                         output_hidden_states=True)
        logits = out.logits
        if self.shift_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits, out.hidden_states

    def _run_rows(self, input_ids, attention_mask):
        """For a backbone that ignores its attention mask: each group of rows with the same real positions
        runs alone with its padding cut off; pad positions get zero logits and hidden states."""
        keep = attention_mask.bool()
        groups: dict[bytes, list[int]] = {}
        for row in range(input_ids.shape[0]):
            if keep[row].any():
                groups.setdefault(keep[row].cpu().numpy().tobytes(), []).append(row)
        logits = hidden = None
        for rows in groups.values():
            index = torch.tensor(rows, device=input_ids.device)
            positions = keep[rows[0]].nonzero().squeeze(1)
            sub_logits, sub_hidden = self._run(input_ids[index][:, positions], None)
            if logits is None:
                batch, length = input_ids.shape
                logits = sub_logits.new_zeros(batch, length, sub_logits.shape[-1])
                hidden = [h.new_zeros(batch, length, h.shape[-1]) for h in sub_hidden]
            logits = logits.index_put((index[:, None], positions[None, :]), sub_logits)
            hidden = [h.index_put((index[:, None], positions[None, :]), s) for h, s in zip(hidden, sub_hidden)]
        return logits, tuple(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, L, V], last hidden states [B, L, D])."""
        logits, hidden_states = self._run(input_ids, attention_mask)
        return logits, hidden_states[-1]

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(input_ids, attention_mask)[0]

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



def load_pretrained(name_or_path: str, *, trust_remote_code: bool, dtype: torch.dtype = torch.float32):
    """The path a user's model id takes: AutoConfig/AutoModel/AutoTokenizer with trust_remote_code.

    Weights are read straight into `dtype` (the training dtype: a bf16 checkpoint is never widened to
    float32 first) with low_cpu_mem_usage (transformers 5 always builds on the meta device and ignores it;
    4.x needs it), so a rank's host memory peaks near one copy of the weights in `dtype`."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    local = Path(name_or_path)
    if (name_or_path.startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").exists():
        raise ConfigError(f"model.name: {name_or_path} is not a Hugging Face model folder (no config.json)")
    model_config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if trust_remote_code:
        _hub_code_on_transformers_5(name_or_path, model_config)
    import transformers

    # transformers 4.x names the argument torch_dtype (5.x accepts both, and prefers dtype).
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModel.from_pretrained(name_or_path, config=model_config, trust_remote_code=trust_remote_code,
                                      low_cpu_mem_usage=True, **{dtype_kw: dtype})
    _recompute_rope_buffers(model)
    return model, tokenizer


def _default_rope_init(config, device=None, seq_len=None, **_):
    """transformers 4's ROPE_INIT_FUNCTIONS["default"] (plain RoPE), which Dream's hub code looks up."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
    return inv_freq, 1.0


def _hub_code_on_transformers_5(name_or_path: str, model_config) -> None:
    """Let remote code written for transformers 4 (LLaDA's and Dream's hub code) load under transformers 5:
    * LLaDA's `LLaDAModelLM.__init__` never calls `post_init()` (transformers 5's from_pretrained needs what it
      sets up); its `tie_weights(self)` takes none of the arguments transformers 5 passes; its config loses
      `use_cache` (transformers 5 drops generation fields from config kwargs) that its forward reads;
    * Dream's rotary embedding looks up ROPE_INIT_FUNCTIONS["default"], which transformers 5 removed.
    The class is patched where it is cached (transformers reuses a remote module while its files are
    unchanged). Nothing is done for code that does not need it."""
    import inspect

    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return
    reference = (getattr(model_config, "auto_map", None) or {}).get("AutoModel")
    if not reference:
        return
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ROPE_INIT_FUNCTIONS.setdefault("default", _default_rope_init)
    if not hasattr(model_config, "use_cache"):
        model_config.use_cache = False
    cls = get_class_from_dynamic_module(reference, name_or_path)
    if getattr(cls, "_raydllm_patched", False):
        return
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not hasattr(self, "all_tied_weights_keys"):  # set by post_init(), which the class never called
            self.post_init()

    cls.__init__ = __init__
    tie = cls.__dict__.get("tie_weights")
    if tie is not None:
        def tie_weights(self, *args, **kwargs):
            if len(inspect.signature(tie).parameters) == 1:
                return tie(self)
            try:
                return tie(self, *args, **kwargs)
            except TypeError:  # written for transformers 4, which called tie_weights() bare
                return tie(self)

        cls.tie_weights = tie_weights
    cls._raydllm_patched = True


def _recompute_rope_buffers(model: nn.Module) -> None:
    """Non-persistent inv_freq buffers are not in the checkpoint, and a model built on the meta device
    leaves them uninitialised: recompute them from the config, as the module's own init would."""
    for module in model.modules():
        init_fn = getattr(module, "rope_init_fn", None)
        if callable(init_fn) and isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            inv_freq, _ = init_fn(module.config, module.inv_freq.device)
            module.inv_freq.data = inv_freq.to(module.inv_freq.dtype)
            if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
                module.original_inv_freq = module.inv_freq.clone()


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
    if cfg.name == "tiny":
        model, tokenizer = build_tiny(cfg)
        if cfg.init != "random":
            model.load_state_dict(load_base_weights(cfg))
        model.to(dtype)
    else:
        model, tokenizer = load_pretrained(cfg.name, trust_remote_code=cfg.trust_remote_code, dtype=dtype)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.name)
    shift = cfg.shift_logits if cfg.shift_logits is not None else any(
        f in _family(model.config) for f in SHIFTED_FAMILIES)
    ids = resolve_token_ids(cfg, model.config, tokenizer)
    padding = cfg.padding if cfg.padding != "auto" else padding_mode(
        model, pad_id=ids.pad, vocab_size=int(model.config.vocab_size))
    log.info("backbone %s: %d layers, width %d, mask id %d, shifted logits %s, padding %s", cfg.name,
             model.config.num_hidden_layers, model.config.hidden_size, ids.mask, shift, padding)
    return Backbone(model, ids, shift_logits=shift, padding=padding), tokenizer
