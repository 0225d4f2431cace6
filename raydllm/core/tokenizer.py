"""Core layer: an offline tokenizer for the embedded model: one token per UTF-8 byte plus four special tokens.

Built with the `tokenizers` library and wrapped as a `PreTrainedTokenizerFast`, so it saves, loads and
behaves like any Hugging Face tokenizer (the rest of raydllm only uses that interface). Nothing is
downloaded: the vocabulary is the 256 bytes.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|pad|>", "<|mask|>", "<|bos|>", "<|eos|>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    byte_symbols = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(sorted(byte_symbols))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", mask_token="<|mask|>",
                                   bos_token="<|bos|>", eos_token="<|eos|>")
