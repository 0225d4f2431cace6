"""Tiny, CPU-sized re-creations of the real masked-diffusion architectures raydllm fine-tunes.

`save_tiny_llada(folder)` / `save_tiny_dream(folder)` write a Hugging Face model folder shaped like the hub
repos GSAI-ML/LLaDA-8B-Base and Dream-org/Dream-v0-Base-7B: config.json with the hub's field names and
`auto_map`, the remote-code .py files (tests/archs/llada, tests/archs/dream: written for raydllm from the
facts of the public code, see their docstrings), seeded weights, and an offline byte-level tokenizer whose
special tokens sit at the ids the config names. The folder loads through raydllm's user path
(`AutoConfig` / `AutoTokenizer` / `AutoModel` with trust_remote_code), like `model.name=GSAI-ML/LLaDA-8B-Base`.

`tiny_hub_quirks=True` (a config override) makes the remote code fail under transformers 5 the way the hub
code does (LLaDA: no post_init, tie_weights signature, config.use_cache dropped; Dream: RoPE init through the
removed ROPE_INIT_FUNCTIONS["default"], list-style _tied_weights_keys).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# Special tokens of the real tokenizers, placed after the 256 byte tokens (the real ids are far larger).
LLADA_SPECIALS = {"<|startoftext|>": 256, "<|endoftext|>": 257, "<|eot_id|>": 258, "<|mdm_mask|>": 259}
DREAM_SPECIALS = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258, "<|beginoftext|>": 259,
                  "<|mask|>": 260}

TINY = dict(width=64, layers=2, heads=4, vocab=384, max_len=512)

LLADA_AUTO_MAP = {"AutoConfig": "configuration_llada.LLaDAConfig",
                  "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                  "AutoModel": "modeling_llada.LLaDAModelLM"}
DREAM_AUTO_MAP = {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"}


def byte_tokenizer(specials: dict[str, int], **roles):
    """256 byte tokens (ids 0-255) plus `specials` at the given ids; roles name eos/pad/bos/mask tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    assert sorted(specials.values()) == list(range(256, 256 + len(specials)))
    vocab.update(specials)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=core, **roles)


def _rewrite_config(folder: Path, auto_map: dict, architectures: list, dtype: str | None):
    """Make config.json look like the hub's: its exact auto_map; torch_dtype only where the hub has one."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.pop("dtype", None)
    data.pop("torch_dtype", None)
    data["auto_map"], data["architectures"] = auto_map, architectures
    if dtype is not None:
        data["torch_dtype"] = dtype
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_tiny_llada(folder, *, seed: int = 0, **config_overrides) -> Path:
    """A seeded 2-layer LLaDA (width 64, 4 heads, vocab 384) saved like GSAI-ML/LLaDA-8B-Base."""
    from .llada.configuration_llada import LLaDAConfig
    from .llada.modeling_llada import LLaDAModelLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fields = dict(d_model=TINY["width"], n_heads=TINY["heads"], n_kv_heads=TINY["heads"], n_layers=TINY["layers"],
                  mlp_hidden_size=3 * TINY["width"], max_sequence_length=TINY["max_len"], rope_theta=500000.0,
                  vocab_size=TINY["vocab"], embedding_size=TINY["vocab"],
                  eos_token_id=LLADA_SPECIALS["<|endoftext|>"], pad_token_id=LLADA_SPECIALS["<|endoftext|>"],
                  mask_token_id=LLADA_SPECIALS["<|mdm_mask|>"], init_device="meta")
    fields.update(config_overrides)
    hub_quirks = bool(fields.pop("tiny_hub_quirks", False))
    config = LLaDAConfig(**fields)  # quirks only in the saved config, so that this process can save
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LLaDAModelLM(config)
        model.model.reset_parameters()
    LLaDAConfig.register_for_auto_class()
    LLaDAModelLM.register_for_auto_class("AutoModel")
    model.save_pretrained(folder)
    _rewrite_config(folder, LLADA_AUTO_MAP, ["LLaDAModelLM"], dtype=None)  # the hub config has no dtype
    _set_config_field(folder, "tiny_hub_quirks", hub_quirks)
    # LLaDA's tokenizer names bos/eos but no mask token: LLaDA code uses config.mask_token_id (126336).
    byte_tokenizer(LLADA_SPECIALS, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                   pad_token="<|endoftext|>").save_pretrained(folder)
    return folder


def save_tiny_dream(folder, *, seed: int = 0, **config_overrides) -> Path:
    """A seeded 2-layer Dream (width 64, 4 heads, 2 KV heads, vocab 384) saved like Dream-org/Dream-v0-Base-7B."""
    from .dream.configuration_dream import DreamConfig
    from .dream.modeling_dream import DreamModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fields = dict(vocab_size=TINY["vocab"], hidden_size=TINY["width"], intermediate_size=3 * TINY["width"],
                  num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"], num_key_value_heads=2,
                  max_position_embeddings=TINY["max_len"], rope_theta=1000000.0, max_window_layers=TINY["layers"],
                  bos_token_id=DREAM_SPECIALS["<|beginoftext|>"], eos_token_id=DREAM_SPECIALS["<|endoftext|>"],
                  pad_token_id=DREAM_SPECIALS["<|endoftext|>"], mask_token_id=DREAM_SPECIALS["<|mask|>"])
    fields.update(config_overrides)
    hub_quirks = bool(fields.pop("tiny_hub_quirks", False))
    config = DreamConfig(**fields)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DreamModel(config)
        model.apply(model._init_weights)
    DreamConfig.register_for_auto_class()
    DreamModel.register_for_auto_class("AutoModel")
    model.save_pretrained(folder)
    _rewrite_config(folder, DREAM_AUTO_MAP, ["DreamModel"], dtype="bfloat16")  # as the hub: bf16 by default
    _set_config_field(folder, "tiny_hub_quirks", hub_quirks)
    byte_tokenizer(DREAM_SPECIALS, bos_token="<|beginoftext|>", eos_token="<|endoftext|>",
                   pad_token="<|endoftext|>", mask_token="<|mask|>").save_pretrained(folder)
    return folder


def _set_config_field(folder: Path, key: str, value):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
