"""Data layer: the text corpora raydllm reads offline (WikiText from the shared data, built-in prose) and a
fast byte-level encoder for long texts. Used by the embedded model's pretraining and by the WikiText probe."""
from __future__ import annotations

import importlib
import inspect
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_STDLIB_DOC_MODULES = (
    "string", "textwrap", "json", "random", "collections", "itertools", "functools", "os", "pathlib", "re",
    "math", "statistics", "datetime", "calendar", "csv", "argparse", "logging", "unittest", "difflib", "heapq",
    "bisect", "queue", "threading", "subprocess", "shutil", "tempfile", "zipfile", "tarfile", "pickle", "copy",
    "pprint", "enum", "dataclasses", "typing", "abc", "contextlib", "inspect", "ast", "tokenize", "decimal",
    "fractions", "operator", "io", "codecs", "locale", "gettext", "hashlib", "uuid", "socket", "selectors",
    "asyncio", "concurrent.futures", "sched", "glob", "fnmatch", "filecmp", "email.message", "http.client",
    "urllib.parse", "html.parser", "xml.dom.minidom", "wave", "zlib", "base64", "binascii", "struct", "array",
    "weakref", "types", "imaplib", "smtplib", "ftplib", "poplib", "mailbox", "configparser", "shlex", "cmd",
    "code", "pdb", "timeit", "trace", "doctest", "pydoc", "sqlite3", "optparse", "getopt", "traceback",
    "warnings", "gc", "sys", "builtins",
)


_RAYDLLM_DOC_MODULES = ("engine.backbone", "core.config", "data.sft", "core.masking", "core.model", "core.objective",
                        "core.sampler", "core.tokenizer", "engine.worker", "engine.training_step", "engine.checkpointing",
                        "engine.reporting", "engine.pretrain", "data.tasks.base",
                        "data.tasks.gsm8k", "data.tasks.synthetic")


def shared_data_dir() -> Path | None:
    """The shared data folder: $RAYDLLM_SHARED_DATA, else `<repo>/../shared/data`, else `./../shared/data`."""
    candidates = []
    if os.environ.get("RAYDLLM_SHARED_DATA"):
        candidates.append(Path(os.environ["RAYDLLM_SHARED_DATA"]))
    candidates += [Path(__file__).resolve().parents[3] / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)


def wikitext_file(split: str) -> Path | None:
    """`<shared data>/wikitext/<valid|test>.txt` if present."""
    root = shared_data_dir()
    if root is None:
        return None
    path = root / "wikitext" / f"{split}.txt"
    return path if path.is_file() else None


def builtin_text() -> str:
    """English prose the package can produce by itself, offline: standard-library and raydllm docstrings."""
    import warnings

    docs: list[str] = []
    names = list(_STDLIB_DOC_MODULES) + [f"raydllm.{m}" for m in _RAYDLLM_DOC_MODULES]
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module missing on this Python is simply skipped
            continue
        doc = inspect.getdoc(module)
        if doc:
            docs.append(doc)
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = getattr(module, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                docs.append(doc)
    return "\n\n".join(docs)


def corpus_text(text_path: Path | None) -> tuple[str, str]:
    """(text, corpus tag). `text_path` None = WikiText valid from the shared data, else built-in text."""
    path = text_path if text_path is not None else wikitext_file("valid")
    if path is not None:
        log.info("pretrain text: %s + generated GSM8K-format problems", path)
        return Path(path).read_text(encoding="utf-8"), f"file:{Path(path).name}:{Path(path).stat().st_size}"
    log.warning("pretrain text: no WikiText copy found (../shared/data/wikitext/valid.txt); using generated "
                "GSM8K-format problems + built-in text (Python standard-library and raydllm docstrings)")
    return builtin_text(), "builtin-docstrings"


def corpus_tag(text_path: Path | None) -> str:
    path = text_path if text_path is not None else wikitext_file("valid")
    if path is not None:
        return f"file:{Path(path).name}:{Path(path).stat().st_size}"
    return "builtin-docstrings"


def _gpt2_byte_symbols() -> dict[int, str]:
    """The byte -> printable symbol map of byte-level BPE (GPT-2's bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a long text, without special tokens. For the embedded byte tokenizer this is a table
    lookup over the UTF-8 bytes (checked against the tokenizer on a sample), ~100x faster than the
    tokenizer on a megabyte of text; any other tokenizer is simply called."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    symbols = _gpt2_byte_symbols()
    if len(vocab) == 260 and all(s in vocab for s in symbols.values()):
        table = torch.tensor([vocab[symbols[b]] for b in range(256)], dtype=torch.long)
        import numpy as np

        ids = table[torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))]
        sample = text[:2000]
        expected = tokenizer(sample, add_special_tokens=False)["input_ids"]
        if ids[:len(expected)].tolist() == expected:
            return ids
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)

