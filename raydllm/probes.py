"""Evaluation layer: preservation probes: how much of the base model a fine-tune kept, and whether its embeddings collapsed.

* `wikitext_loss`: held-out masked-diffusion loss on WikiText **test** at one mask rate (0.5) with a fixed
  seed: the same chunks and the same masks for the base and the fine-tuned model, so their difference
  (`probe/wikitext_delta` = fine-tuned - base; > 0 = forgetting) is the paper's general-text signal.
  Local copy: `../shared/data/wikitext/test.txt` (WikiText-2 raw test; WikiText-103's test split is the
  same articles); otherwise `datasets.load_dataset("wikitext", "wikitext-103-raw-v1", split="test")`.
* `layer_drift`: per layer, 1 - cos(pooled h_base, pooled h_ft), pooled with `objective.pool` over
  non-pad tokens, averaged over examples; plus the means over the early/middle/late thirds of the layers.
* `collapse_stats`: per-dimension std (mean, min), effective rank (RankMe: exp of the entropy of the
  normalized singular values) and cosine diversity (1 - mean off-diagonal cosine) of pooled embeddings.
* `mmlu_subset`: an MMLU sanity check on user-supplied MMLU files (stratified by subject, fixed seed):
  each question is scored by the likelihood of each option letter at masked answer positions.

`run_probes` returns one flat `probe/...` dict for MLflow.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import random
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .corpora import encode_text, wikitext_file
from .masking import mask_tokens
from .objective import pool

log = logging.getLogger(__name__)

WIKITEXT_HUB = ("wikitext", "wikitext-103-raw-v1")


# -- WikiText held-out loss ------------------------------------------------------------------------------
def wikitext_text(text_path: str | Path | None = None) -> str:
    """WikiText test text: `text_path` if given, else the shared-data copy, else the hub test split."""
    if text_path is None:
        text_path = wikitext_file("test")
    if text_path is not None:
        return Path(text_path).read_text(encoding="utf-8")
    from datasets import load_dataset

    log.info("wikitext probe: no local test.txt; loading %s/%s test from the hub", *WIKITEXT_HUB)
    return "".join(load_dataset(*WIKITEXT_HUB, split="test")["text"])


def wikitext_chunks(tokenizer, text_path: str | Path | None = None, *, seq_len: int = 128,
                    max_chunks: int | None = 64, text: str | None = None) -> torch.Tensor:
    """[N, seq_len] non-overlapping token windows of WikiText test, evenly spaced over the whole file
    (so the probe covers many articles, not only the first), deterministic."""
    text = wikitext_text(text_path) if text is None else text
    ids = encode_text(tokenizer, text)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"wikitext probe: text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    chunks = ids[:n * seq_len].view(n, seq_len)
    if max_chunks is not None and n > max_chunks:
        chunks = chunks[torch.linspace(0, n - 1, max_chunks).round().long()]
    return chunks


def _device(backbone) -> torch.device:
    return next(backbone.parameters()).device


@torch.no_grad()
def wikitext_loss(backbone, tokenizer, text_path: str | Path | None = None, *, mask_rate: float = 0.5,
                  seed: int = 0, seq_len: int = 128, max_chunks: int | None = 64, batch_size: int = 8,
                  chunks: torch.Tensor | None = None) -> float:
    """Mean CE over masked tokens of WikiText test chunks, each token masked with probability `mask_rate`
    by a generator seeded with `seed` (same seed -> same masks -> same value)."""
    if chunks is None:
        chunks = wikitext_chunks(tokenizer, text_path, seq_len=seq_len, max_chunks=max_chunks)
    generator = torch.Generator().manual_seed(seed)
    device = _device(backbone)
    was_training = backbone.training
    backbone.eval()
    total, count = 0.0, 0
    for start in range(0, chunks.shape[0], batch_size):
        x0 = chunks[start:start + batch_size]
        x_t, masked = mask_tokens(x0, mask_rate, torch.ones_like(x0, dtype=torch.bool),
                                  mask_token_id=backbone.ids.mask, generator=generator)
        logits = backbone.logits(x_t.to(device), torch.ones_like(x0).to(device))
        masked = masked.to(device)
        total += float(F.cross_entropy(logits[masked].float(), x0.to(device)[masked], reduction="sum"))
        count += int(masked.sum())
    if was_training:
        backbone.train()
    return total / max(count, 1)


# -- layer drift -----------------------------------------------------------------------------------------
def _as_pair(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(batch, "input_ids"):
        return batch.input_ids, batch.attention_mask
    if isinstance(batch, dict):
        return batch["input_ids"], batch["attention_mask"]
    if isinstance(batch, torch.Tensor):
        return batch, torch.ones_like(batch)
    return batch[0], batch[1]


def thirds(n: int) -> dict[str, list[int]]:
    """Layer indices 1..n split into early/middle/late thirds (the remainder goes to the early ones)."""
    parts = np.array_split(np.arange(1, n + 1), 3)
    return {name: [int(i) for i in part] for name, part in zip(("early", "middle", "late"), parts)}


@torch.no_grad()
def layer_drift(base, finetuned, batches: Iterable) -> dict[str, float]:
    """Per layer l = 1..n: mean over examples of 1 - cos(pool(h_base^l), pool(h_ft^l)), pooled over non-pad
    tokens; keys `layer_<l>` and `early`, `middle`, `late` (means over thirds of the layers).
    `batches` yields (input_ids, attention_mask) pairs, `data.Batch`es, dicts or bare id tensors."""
    sums: list[float] | None = None
    count = 0
    for batch in batches:
        ids, attention = _as_pair(batch)
        keep = attention.bool()
        hs_b = base.all_hidden_states(ids.to(_device(base)), attention.to(_device(base)))
        hs_f = finetuned.all_hidden_states(ids.to(_device(finetuned)), attention.to(_device(finetuned)))
        if len(hs_b) != len(hs_f):
            raise ValueError(f"layer_drift: base has {len(hs_b) - 1} layers, fine-tuned {len(hs_f) - 1}")
        if sums is None:
            sums = [0.0] * (len(hs_b) - 1)
        for layer in range(1, len(hs_b)):
            zb = pool(hs_b[layer].cpu(), keep)
            zf = pool(hs_f[layer].cpu(), keep)
            sums[layer - 1] += float((1.0 - F.cosine_similarity(zb, zf, dim=-1)).sum())
        count += ids.shape[0]
    if not sums or count == 0:
        raise ValueError("layer_drift: no batches")
    out = {f"layer_{i + 1}": s / count for i, s in enumerate(sums)}
    for name, layers in thirds(len(sums)).items():
        if layers:
            out[name] = float(np.mean([out[f"layer_{i}"] for i in layers]))
    return out


# -- representation collapse -----------------------------------------------------------------------------
def effective_rank(z: torch.Tensor, eps: float = 1e-12) -> float:
    """exp(entropy of the singular values normalized to sum 1) of z [N, D] (RankMe; not centred)."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum().clamp(min=eps)
    p = p[p > eps]
    return float(torch.exp(-(p * p.log()).sum()))


def cosine_diversity(z: torch.Tensor) -> float:
    """1 - mean cosine over distinct pairs of rows (0 when every row points the same way)."""
    n = z.shape[0]
    if n < 2:
        return 0.0
    u = F.normalize(z.double(), dim=-1)
    sim = u @ u.T
    off = (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
    return float(1.0 - off)


def collapse_stats(z: torch.Tensor) -> dict[str, float]:
    """Pooled embeddings [N, D] -> std_mean, std_min (per dimension, over rows), eff_rank, cos_diversity."""
    z = z.detach().float().cpu()
    std = z.std(dim=0, unbiased=True) if z.shape[0] > 1 else torch.zeros(z.shape[1])
    return {"std_mean": float(std.mean()), "std_min": float(std.min()), "eff_rank": effective_rank(z),
            "cos_diversity": cosine_diversity(z)}


@torch.no_grad()
def pooled_embeddings(backbone, batches: Iterable) -> torch.Tensor:
    """objective.pool of the last hidden states over non-pad tokens, for every example: [N, D]."""
    out = []
    for batch in batches:
        ids, attention = _as_pair(batch)
        _, hidden = backbone(ids.to(_device(backbone)), attention.to(_device(backbone)))
        out.append(pool(hidden.cpu(), attention.bool()))
    return torch.cat(out)


# -- MMLU sanity check (optional) ------------------------------------------------------------------------
LETTERS = ("A", "B", "C", "D")


def read_mmlu(path: str | Path) -> list[dict]:
    """MMLU rows {subject, question, choices[4], answer 0-3} from a jsonl file or a folder of jsonl files,
    or of the original `<subject>_test.csv` files (question, A, B, C, D, letter; no header)."""
    path = Path(path)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    rows: list[dict] = []
    for f in files:
        if f.suffix == ".jsonl":
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    r = json.loads(line)
                    answer = r["answer"]
                    rows.append({"subject": r.get("subject", f.stem), "question": r["question"],
                                 "choices": list(r["choices"]),
                                 "answer": LETTERS.index(answer) if isinstance(answer, str) else int(answer)})
        elif f.suffix == ".csv":
            subject = f.stem.removesuffix("_test").removesuffix("_val").removesuffix("_dev")
            with open(f, newline="", encoding="utf-8") as handle:
                for r in csv.reader(handle):
                    if len(r) == 6:
                        rows.append({"subject": subject, "question": r[0], "choices": r[1:5],
                                     "answer": LETTERS.index(r[5].strip())})
    return rows


def stratified_sample(rows: Sequence[dict], per_subject: int, seed: int = 0) -> list[dict]:
    by_subject: dict[str, list[dict]] = {}
    for r in rows:
        by_subject.setdefault(r["subject"], []).append(r)
    rng = random.Random(seed)
    out = []
    for subject in sorted(by_subject):
        group = by_subject[subject]
        out += rng.sample(group, min(per_subject, len(group)))
    return out


def mmlu_prompt(row: dict) -> str:
    options = "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, row["choices"]))
    return f"{row['question'].strip()}\n{options}Answer:"


@torch.no_grad()
def mmlu_subset(backbone, tokenizer, path: str | Path, *, per_subject: int = 10, seed: int = 0,
                max_prompt_tokens: int = 448) -> dict[str, float]:
    """Accuracy on a stratified MMLU sample: the prompt is followed by the answer positions all masked,
    and the option whose letter (" A" ... " D") has the highest log-likelihood there is the prediction."""
    rows = stratified_sample(read_mmlu(path), per_subject, seed)
    if not rows:
        raise ValueError(f"mmlu: no rows found in {path}")
    options = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"] for letter in LETTERS]
    width = max(len(o) for o in options)
    device = _device(backbone)
    correct = 0
    for row in rows:
        prompt = tokenizer(mmlu_prompt(row), add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
        x = torch.tensor([prompt + [backbone.ids.mask] * width], device=device)
        logp = F.log_softmax(backbone.logits(x, torch.ones_like(x)).float()[0, len(prompt):], dim=-1)
        scores = [float(sum(logp[j, tok] for j, tok in enumerate(option))) for option in options]
        correct += int(int(np.argmax(scores)) == row["answer"])
    return {"accuracy": correct / len(rows), "n": float(len(rows))}


# -- everything, flat ------------------------------------------------------------------------------------
def run_probes(base_backbone, ft_backbone, tokenizer, *, wikitext_path: str | Path | None = None,
               seq_len: int = 128, max_chunks: int = 64, batch_size: int = 8, seed: int = 0,
               mask_rate: float = 0.5, drift_batches: Sequence | None = None,
               mmlu_path: str | Path | None = None, mmlu_per_subject: int = 10) -> dict[str, float]:
    """All probes of `ft_backbone` against `base_backbone`, as a flat dict of `probe/...` floats.

    WikiText test chunks serve every probe; `drift_batches` (e.g. the task's validation batches) replace
    them for drift and collapse statistics when given. The tokenizer is shared (a fine-tune does not
    change it)."""
    chunks = wikitext_chunks(tokenizer, wikitext_path, seq_len=seq_len, max_chunks=max_chunks)
    loss_kw = dict(mask_rate=mask_rate, seed=seed, batch_size=batch_size, chunks=chunks)
    base_loss = wikitext_loss(base_backbone, tokenizer, **loss_kw)
    ft_loss = wikitext_loss(ft_backbone, tokenizer, **loss_kw)
    out = {"probe/wikitext_loss": ft_loss, "probe/wikitext_loss_base": base_loss,
           "probe/wikitext_delta": ft_loss - base_loss}
    if drift_batches is None:
        drift_batches = [(c, torch.ones_like(c)) for c in chunks.split(batch_size)]
    drift = layer_drift(base_backbone, ft_backbone, drift_batches)
    out |= {f"probe/drift_{k}": v for k, v in drift.items()}
    out |= {f"probe/z_{k}": v for k, v in collapse_stats(pooled_embeddings(ft_backbone, drift_batches)).items()}
    out |= {f"probe/z_base_{k}": v
            for k, v in collapse_stats(pooled_embeddings(base_backbone, drift_batches)).items()}
    if mmlu_path is not None:
        ft = mmlu_subset(ft_backbone, tokenizer, mmlu_path, per_subject=mmlu_per_subject, seed=seed)
        base = mmlu_subset(base_backbone, tokenizer, mmlu_path, per_subject=mmlu_per_subject, seed=seed)
        out |= {"probe/mmlu_accuracy": ft["accuracy"], "probe/mmlu_accuracy_base": base["accuracy"],
                "probe/mmlu_delta": ft["accuracy"] - base["accuracy"], "probe/mmlu_n": ft["n"]}
    return {k: float(v) for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}
