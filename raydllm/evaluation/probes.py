"""Evaluation layer: preservation probes: how much of the base model a fine-tune kept, and whether its embeddings collapsed.

Definitions follow the paper (§4.3, App. A.7); every probe reads the same `eval.probe_chunks` windows of
`eval.probe_seq_len` tokens of WikiText, evenly spaced over the split, with fixed seeds:
* `wikitext_loss`: masked-diffusion loss at one mask rate (0.5): mean CE over masked tokens, the same masks
  for the base and the fine-tuned model, so `probe/wikitext_delta` = fine-tuned - base (> 0 = forgetting).
  Split: `eval.probe_split`: validation (the paper: WikiText-103 validation) or test (the `local` preset,
  whose embedded base was pretrained on WikiText valid). Local copies: `../shared/data/wikitext/
  <valid|test>.txt` (WikiText-2 raw; WikiText-103 shares its valid/test articles); else the hub.
* `layer_drift`: per layer l, the mean over windows of 1 - cos(h̄_base^l, h̄_ft^l), where h̄ is the RAW mean
  of the layer's hidden states over non-pad tokens (no LayerNorm: with one, the figure would be
  1 - Pearson correlation); plus the means over the early/middle/late thirds of the layers.
* `collapse_stats`, on the pooled z (the objective's own `pool`: LayerNorm of the mean over visible
  tokens) of BOTH views of every window: x_{t_L} and x_{t_H}, masked at the run's jepa.t_low / t_high:
  - std_mean / std_min: per-dimension standard deviation over the samples, mean and min over dimensions;
  - eff_rank: r_eff = (Σσ_i)² / Σσ_i² over the singular values σ of the [N, D] matrix of z, NOT centred
    (the paper takes the singular values of the pooled embeddings; a shared mean direction counts as one
    direction). k equal orthogonal directions give k; N samples cap it at N. `eff_rank_centred` is the
    same formula after subtracting the mean z, beside it as a diagnostic;
  - cos_diversity: 1 - mean |cos(z_i, z_j)| over 5,000 random pairs i != j (seeded): two antipodal
    clusters score ≈ 0 (collapsed onto one line), orthogonal directions 1.
  Keys: `probe/z_tL_*`, `probe/z_tH_*` per view, and `probe/z_*` = the mean of the two views; the same with
  `z_base_` for the base model.
* `mmlu_subset`: MMLU (`eval.mmlu`: a hub id or local files), a stratified subset of 500 questions (8-9 per
  subject over MMLU's 57, fixed seed, so the same items for every model), each scored by the likelihood of
  each option letter at masked answer positions.

`run_probes` returns one flat `probe/...` dict for MLflow. Every probe takes a `shard` (`sharding.Shard`):
its batches spread over the ranks of a trial, the same figures on every rank as on one (a collective then).
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

from raydllm.data.corpora import encode_text, wikitext_file
from raydllm.core.masking import mask_tokens
from raydllm.core.objective import mean_pool, pool
from raydllm.evaluation.sharding import Shard, map_batches

log = logging.getLogger(__name__)

WIKITEXT_HUB = ("wikitext", "wikitext-103-raw-v1")
LOCAL_SPLIT_FILE = {"validation": "valid", "test": "test"}
COS_PAIRS = 5000


# -- WikiText held-out loss ------------------------------------------------------------------------------
def wikitext_text(text_path: str | Path | None = None, split: str = "validation") -> str:
    """WikiText text of `split`: `text_path` if given, else the shared-data copy, else the hub split."""
    if split not in LOCAL_SPLIT_FILE:
        raise ValueError(f"wikitext probe: split must be validation or test, got {split!r}")
    if text_path is None:
        text_path = wikitext_file(LOCAL_SPLIT_FILE[split])
    if text_path is not None:
        return Path(text_path).read_text(encoding="utf-8")
    from datasets import load_dataset

    log.info("wikitext probe: no local %s.txt; loading %s/%s %s from the hub", LOCAL_SPLIT_FILE[split],
             *WIKITEXT_HUB, split)
    return "".join(load_dataset(*WIKITEXT_HUB, split=split)["text"])


def wikitext_chunks(tokenizer, text_path: str | Path | None = None, *, split: str = "validation",
                    seq_len: int = 256, max_chunks: int | None = 100, text: str | None = None) -> torch.Tensor:
    """[N, seq_len] non-overlapping token windows of WikiText `split`, evenly spaced over the whole file
    (so the probe covers many articles, not only the first), deterministic."""
    text = wikitext_text(text_path, split) if text is None else text
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
def wikitext_loss(backbone, tokenizer, text_path: str | Path | None = None, *, split: str = "validation",
                  mask_rate: float = 0.5, seed: int = 0, seq_len: int = 256, max_chunks: int | None = 100,
                  batch_size: int = 8, chunks: torch.Tensor | None = None, shard: Shard | None = None) -> float:
    """Mean CE over masked tokens of WikiText chunks, each token masked with probability `mask_rate`
    by a generator seeded with `seed` (same seed -> same masks -> same value, on any number of ranks)."""
    if chunks is None:
        chunks = wikitext_chunks(tokenizer, text_path, split=split, seq_len=seq_len, max_chunks=max_chunks)
    generator = torch.Generator().manual_seed(seed)
    device = _device(backbone)
    was_training = backbone.training
    backbone.eval()
    # Every batch's masks in order (cheap), whichever rank runs its forward.
    batches = [(x0, *mask_tokens(x0, mask_rate, torch.ones_like(x0, dtype=torch.bool),
                                 mask_token_id=backbone.ids.mask, generator=generator))
               for x0 in chunks.split(batch_size)]

    def batch_loss(batch) -> tuple[float, int]:
        x0, x_t, masked = batch
        logits = backbone.logits(x_t.to(device), torch.ones_like(x0).to(device))
        masked = masked.to(device)
        return float(F.cross_entropy(logits[masked].float(), x0.to(device)[masked], reduction="sum")), int(masked.sum())

    total, count = 0.0, 0
    for batch_total, batch_count in map_batches(batches, batch_loss, shard):  # summed in one rank's order
        total += batch_total
        count += batch_count
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
def layer_drift(base, finetuned, batches: Iterable, shard: Shard | None = None) -> dict[str, float]:
    """Per layer l = 1..n: mean over examples of 1 - cos(h̄_base^l, h̄_ft^l), h̄ = the raw mean of the layer's
    hidden states over non-pad tokens (`objective.mean_pool`, no LayerNorm); keys `layer_<l>` and `early`,
    `middle`, `late` (means over thirds of the layers).
    `batches` yields (input_ids, attention_mask) pairs, `data.Batch`es, dicts or bare id tensors."""
    def batch_drift(batch) -> tuple[list[float], int]:
        ids, attention = _as_pair(batch)
        keep = attention.bool()
        hs_b = base.all_hidden_states(ids.to(_device(base)), attention.to(_device(base)))
        hs_f = finetuned.all_hidden_states(ids.to(_device(finetuned)), attention.to(_device(finetuned)))
        if len(hs_b) != len(hs_f):
            raise ValueError(f"layer_drift: base has {len(hs_b) - 1} layers, fine-tuned {len(hs_f) - 1}")
        return [float((1.0 - F.cosine_similarity(mean_pool(hs_b[layer].cpu(), keep),
                                                 mean_pool(hs_f[layer].cpu(), keep), dim=-1)).sum())
                for layer in range(1, len(hs_b))], int(ids.shape[0])

    sums: list[float] | None = None
    count = 0
    for layer_sums, rows in map_batches(list(batches), batch_drift, shard):  # summed in one rank's order
        sums = [0.0] * len(layer_sums) if sums is None else sums
        for layer, value in enumerate(layer_sums):
            sums[layer] += value
        count += rows
    if not sums or count == 0:
        raise ValueError("layer_drift: no batches")
    out = {f"layer_{i + 1}": s / count for i, s in enumerate(sums)}
    for name, layers in thirds(len(sums)).items():
        if layers:
            out[name] = float(np.mean([out[f"layer_{i}"] for i in layers]))
    return out


# -- representation collapse -----------------------------------------------------------------------------
def effective_rank(z: torch.Tensor, *, centred: bool = False) -> float:
    """r_eff = (Σσ_i)² / Σσ_i² over the singular values of z [N, D] (not centred unless asked)."""
    z = z.double()
    if centred:
        z = z - z.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(z)
    power = float((s * s).sum())
    return float(s.sum()) ** 2 / power if power > 0 else 0.0


def cosine_diversity(z: torch.Tensor, *, pairs: int = COS_PAIRS, seed: int = 0) -> float:
    """1 - mean |cos(z_i, z_j)| over `pairs` random pairs i != j drawn with a generator seeded with `seed`."""
    n = z.shape[0]
    if n < 2:
        return 0.0
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(n, (pairs,), generator=g)
    j = (i + torch.randint(1, n, (pairs,), generator=g)) % n  # uniform over the other rows
    u = F.normalize(z.double(), dim=-1)
    return float(1.0 - (u[i] * u[j]).sum(dim=-1).abs().mean())


def collapse_stats(z: torch.Tensor, *, seed: int = 0) -> dict[str, float]:
    """Pooled embeddings [N, D] -> std_mean, std_min (per dimension, over rows), eff_rank, eff_rank_centred,
    cos_diversity."""
    z = z.detach().float().cpu()
    std = z.std(dim=0, unbiased=True) if z.shape[0] > 1 else torch.zeros(z.shape[1])
    return {"std_mean": float(std.mean()), "std_min": float(std.min()), "eff_rank": effective_rank(z),
            "eff_rank_centred": effective_rank(z, centred=True), "cos_diversity": cosine_diversity(z, seed=seed)}


@torch.no_grad()
def view_embeddings(backbone, chunks: torch.Tensor, *, t_low: float, t_high: float, seed: int = 0,
                    batch_size: int = 8, shard: Shard | None = None) -> dict[str, torch.Tensor]:
    """{"tL": z [N, D], "tH": z [N, D]}: `objective.pool` of the last hidden states over the visible tokens of
    each chunk masked at t_low and at t_high (masks from `seed`: the same views for every model)."""
    device = _device(backbone)
    generator = torch.Generator().manual_seed(seed)
    views = []  # (name, x_t, masked) per batch and view, the masks drawn in one rank's order
    for x0 in chunks.split(batch_size):
        everywhere = torch.ones_like(x0, dtype=torch.bool)
        for name, rate in (("tL", t_low), ("tH", t_high)):
            views.append((name, *mask_tokens(x0, rate, everywhere, mask_token_id=backbone.ids.mask,
                                             generator=generator)))

    def embed(view) -> torch.Tensor:
        _, x_t, masked = view
        _, hidden = backbone(x_t.to(device), torch.ones_like(x_t).to(device))
        return pool(hidden.cpu(), ~masked)

    out: dict[str, list[torch.Tensor]] = {"tL": [], "tH": []}
    for (name, _, _), z in zip(views, map_batches(views, embed, shard)):
        out[name].append(z)
    return {name: torch.cat(z) for name, z in out.items()}


@torch.no_grad()
def embedding_report(backbone, tokenizer, *, t_low: float, t_high: float, split: str = "test", seq_len: int = 256,
                     max_chunks: int = 100, seed: int = 0, batch_size: int = 16) -> dict[str, float]:
    """One model's collapse statistics on both views of WikiText `split` (what `raydllm pretrain` reports)."""
    chunks = wikitext_chunks(tokenizer, split=split, seq_len=seq_len, max_chunks=max_chunks)
    views = view_embeddings(backbone.eval(), chunks, t_low=t_low, t_high=t_high, seed=seed, batch_size=batch_size)
    return view_collapse_stats(views, seed=seed) | {"samples": float(chunks.shape[0]), "seq_len": float(seq_len)}


def view_collapse_stats(views: dict[str, torch.Tensor], *, seed: int = 0) -> dict[str, float]:
    """collapse_stats per view as `tL_<stat>`, `tH_<stat>`, and `<stat>` = their mean."""
    per_view = {name: collapse_stats(z, seed=seed) for name, z in views.items()}
    out = {f"{name}_{k}": v for name, stats in per_view.items() for k, v in stats.items()}
    for k in next(iter(per_view.values())):
        out[k] = float(np.mean([stats[k] for stats in per_view.values()]))
    return out


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


def load_mmlu(source: str | Path) -> list[dict]:
    """MMLU rows from local files (`read_mmlu`) when `source` exists, else the hub dataset `source`
    (e.g. cais/mmlu, config "all", split test: columns question, subject, choices, answer)."""
    if Path(source).expanduser().exists():
        rows = read_mmlu(Path(source).expanduser())
    else:
        from datasets import load_dataset

        log.info("mmlu: %s is not a local path; loading it from the hub (config all, split test)", source)
        data = load_dataset(str(source), "all", split="test")
        rows = [{"subject": r["subject"], "question": r["question"], "choices": list(r["choices"]),
                 "answer": int(r["answer"])} for r in data]
    if not rows:
        raise ValueError(f"mmlu: no rows found in {source}")
    return rows


def stratified_sample(rows: Sequence[dict], total: int, seed: int = 0) -> list[dict]:
    """`total` rows spread evenly over subjects: every subject gets total // S, and total % S subjects
    (chosen with `seed`) one more (500 over MMLU's 57 subjects: 44 get 9, 13 get 8); within a subject the
    rows are drawn with `seed`. A subject with fewer rows gives all it has. Same input + seed = same items."""
    by_subject: dict[str, list[dict]] = {}
    for r in rows:
        by_subject.setdefault(r["subject"], []).append(r)
    subjects = sorted(by_subject)
    rng = random.Random(seed)
    base, extra = divmod(total, len(subjects))
    plus_one = set(rng.sample(subjects, extra)) if extra else set()
    out = []
    for subject in subjects:
        group = by_subject[subject]
        out += rng.sample(group, min(base + (subject in plus_one), len(group)))
    return out


def mmlu_prompt(row: dict) -> str:
    options = "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, row["choices"]))
    return f"{row['question'].strip()}\n{options}Answer:"


@torch.no_grad()
def mmlu_subset(backbone, tokenizer, rows: Sequence[dict], *, max_prompt_tokens: int = 448,
                shard: Shard | None = None) -> dict[str, float]:
    """Accuracy on MMLU `rows` (e.g. `stratified_sample(load_mmlu(...), 500)`): the prompt is followed by
    the answer positions all masked, and the option whose letter (" A" ... " D") has the highest
    log-likelihood there is the prediction."""
    if not rows:
        raise ValueError("mmlu: no rows to score")
    options = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"] for letter in LETTERS]
    width = max(len(o) for o in options)
    device = _device(backbone)

    def is_correct(row) -> int:
        prompt = tokenizer(mmlu_prompt(row), add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
        x = torch.tensor([prompt + [backbone.ids.mask] * width], device=device)
        logp = F.log_softmax(backbone.logits(x, torch.ones_like(x)).float()[0, len(prompt):], dim=-1)
        scores = [float(sum(logp[j, tok] for j, tok in enumerate(option))) for option in options]
        return int(int(np.argmax(scores)) == row["answer"])

    correct = sum(map_batches(list(rows), is_correct, shard))  # one row per "batch": rows run one at a time
    return {"accuracy": correct / len(rows), "n": float(len(rows))}


def mmlu_probe(base_backbone, ft_backbone, tokenizer, rows: Sequence[dict], shard: Shard | None = None
               ) -> dict[str, float]:
    """`probe/mmlu_*`: the fine-tuned model's accuracy on `rows`, the base's, their difference, and n."""
    ft = mmlu_subset(ft_backbone, tokenizer, rows, shard=shard)
    base = mmlu_subset(base_backbone, tokenizer, rows, shard=shard)
    return {"probe/mmlu_accuracy": ft["accuracy"], "probe/mmlu_accuracy_base": base["accuracy"],
            "probe/mmlu_delta": ft["accuracy"] - base["accuracy"], "probe/mmlu_n": ft["n"]}


# -- everything, flat ------------------------------------------------------------------------------------
def run_probes(base_backbone, ft_backbone, tokenizer, *, t_low: float, t_high: float,
               wikitext_path: str | Path | None = None, split: str = "validation", seq_len: int = 256,
               max_chunks: int = 100, batch_size: int = 8, seed: int = 0, mask_rate: float = 0.5,
               drift_batches: Sequence | None = None, mmlu_rows: Sequence[dict] | None = None,
               shard: Shard | None = None) -> dict[str, float]:
    """All probes of `ft_backbone` against `base_backbone`, as a flat dict of `probe/...` floats.

    The WikiText chunks of `split` serve every probe; `drift_batches` (e.g. the task's validation batches)
    replace them for the drift when given. Collapse statistics are on both views (t_low, t_high) of the
    chunks. The tokenizer is shared (a fine-tune does not change it)."""
    chunks = wikitext_chunks(tokenizer, wikitext_path, split=split, seq_len=seq_len, max_chunks=max_chunks)
    loss_kw = dict(mask_rate=mask_rate, seed=seed, batch_size=batch_size, chunks=chunks, shard=shard)
    base_loss = wikitext_loss(base_backbone, tokenizer, **loss_kw)
    ft_loss = wikitext_loss(ft_backbone, tokenizer, **loss_kw)
    out = {"probe/wikitext_loss": ft_loss, "probe/wikitext_loss_base": base_loss,
           "probe/wikitext_delta": ft_loss - base_loss, "probe/wikitext_tokens": float(chunks.numel())}
    if drift_batches is None:
        drift_batches = [(c, torch.ones_like(c)) for c in chunks.split(batch_size)]
    drift = layer_drift(base_backbone, ft_backbone, drift_batches, shard=shard)
    out |= {f"probe/drift_{k}": v for k, v in drift.items()}
    view_kw = dict(t_low=t_low, t_high=t_high, seed=seed, batch_size=batch_size, shard=shard)
    for prefix, backbone in (("z", ft_backbone), ("z_base", base_backbone)):
        stats = view_collapse_stats(view_embeddings(backbone, chunks, **view_kw), seed=seed)
        out |= {f"probe/{prefix}_{k}": v for k, v in stats.items()}
    if mmlu_rows is not None:
        out |= mmlu_probe(base_backbone, ft_backbone, tokenizer, mmlu_rows, shard=shard)
    return {k: float(v) for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}
