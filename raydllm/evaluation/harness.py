"""Evaluation layer: raydllm's model and samplers behind lm-evaluation-harness's three requests.

`DiffusionLM` answers lm-eval's requests with a loaded backbone; it imports nothing of lm_eval, so this module
(and its presets) load without the `harness` extra. The class lm-eval instantiates (`@register_model("raydllm")`,
built from a checkpoint folder or a trial's MLflow run id) and the `simple_evaluate` runner live one layer up, in
`raydllm.sweep.harness`, because resolving a run id is MLflow's business (`sweep.tracking.resolve_target`).

* `generate_until`: the prompts go through `evaluate.generate_answers`, the function `raydllm eval` generates
  with (length-sorted left-padded batches, the exact / fast / Dream sampler, cut at the first stop token), so an
  answer here is token for token raydllm's own; then each is cut at its request's first `until` string (LLaDA's
  and Fast-dLLM's harness classes do the same). The answer length is `gen_length` when set (as LLaDA's and
  Fast-dLLM's classes: a diffusion sampler decodes a fixed canvas), else the request's `max_gen_toks`.
* `loglikelihood`: the diffusion ELBO by Monte Carlo over masks, LLaDA's estimator (`eval_llada.py`,
  `get_loglikelihood`): `mc_num` samples in batches of `mc_batch_size`; a batch draws k uniform in 1..L (L the
  continuation's length) and spreads its rows' mask counts evenly from there (stratified, each row's count still
  uniform), masks that many continuation tokens at random, and scores -CE over the masked tokens weighted by
  L / count. `is_greedy` is False unless `greedy_check` (LLaDA's `is_check_greedy`): then it is whether the
  exact sampler, one token a step, decodes the continuation from the context.
* `loglikelihood_rolling` (perplexity tasks) is not offered: a masked-diffusion model has no left-to-right
  factorisation to roll.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from raydllm.core.config import ConfigError
from raydllm.core.sampler import SamplerConfig, generate
from raydllm.evaluation.evaluate import default_sampler, effective_sampler, generate_answers, truncate_prompts
from raydllm.evaluation.protocol import score_protocol

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'raydllm[harness]'"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default when a task sets no max_gen_toks


@dataclass(frozen=True)
class HarnessPreset:
    """A published protocol: lm-eval tasks, shots and the model settings the paper's numbers came from."""
    name: str
    tasks: tuple[str, ...]
    num_fewshot: int
    model_args: dict[str, Any] = field(default_factory=dict)
    source: str = ""


PRESETS = {preset.name: preset for preset in (
    # LLaDA-8B-Base's GSM8K (EVAL.md, eval_llada_lm_eval.sh): lm-eval 0.4.8's `gsm8k` (5-shot by its YAML, which
    # the script leaves alone), the exact sampler with one 1024-token block, 1024 steps (70.3; 256/256/256: 70.0).
    HarnessPreset("llada-gsm8k", ("gsm8k",), 5,
                  {"sampler": "exact", "gen_length": 1024, "steps": 1024, "block_length": 1024},
                  "ML-GSAI/LLaDA eval_llada_lm_eval.sh: --tasks gsm8k, gen_length=steps=block_length=1024"),
    # Fast-dLLM's GSM8K (llada/eval_gsm8k.sh, "dual cache + parallel"): gsm8k 5-shot, length 256, block 32,
    # threshold 0.9, dual cache. Its figures are LLaDA-8B-Instruct's with the chat template (add chat=true).
    HarnessPreset("fast-dllm-gsm8k", ("gsm8k",), 5,
                  {"sampler": "fast", "gen_length": 256, "block_length": 32, "threshold": 0.9, "cache": "dual"},
                  "NVlabs/Fast-dLLM llada/eval_gsm8k.sh: num_fewshot=5, length=256, block_length=32, "
                  "threshold=0.9, use_cache=True, dual_cache=True"),
)}


def require_lm_eval():
    """The lm_eval module, or a one-line ConfigError naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return lm_eval


def _flag(value: Any) -> bool:
    """model_args arrive as strings from lm-eval's CLI ("True", "false", "1") or as Python values."""
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"harness model_args: {value!r} is not a boolean")
    return bool(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None or value == "" else int(value)


def cut_at_stops(text: str, until: Iterable[str]) -> str:
    """`text` up to the earliest occurrence of any `until` string (LLaDA's harness splits at each in turn,
    which leaves the same text)."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def mask_counts(length: int, rows: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[rows] mask counts in 1..length, LLaDA's `_forward_process`: one k uniform in 1..length, the rows'
    counts spread evenly from it around the circle 1..length (each row's count is uniform; together they cover
    the range evenly, which lowers the estimate's variance)."""
    k = int(torch.randint(1, length + 1, (), generator=generator))
    counts = torch.round(torch.linspace(float(k), k + (rows - 1) * (length / rows), steps=rows)).long()
    return ((counts - 1) % length) + 1


@torch.no_grad()
def elbo_loglikelihood(logits_fn, prefix: Sequence[int], target: Sequence[int], *, mask_id: int, mc_num: int = 128,
                       mc_batch_size: int = 32, device: torch.device | str = "cpu",
                       generator: torch.Generator | None = None) -> float:
    """The diffusion ELBO of `target` after `prefix` (a lower bound on log p(target | prefix)), estimated as
    LLaDA's harness does with `mc_num` masked samples in batches of `mc_batch_size` (see the module docstring).
    `logits_fn(ids [B, T], None) -> logits [B, T, V]`, position i's logits predicting token i (`Backbone.logits`).
    The cross-entropy runs in float32 whatever the model's dtype."""
    length = len(target)
    if length == 0:
        raise ConfigError("loglikelihood: empty continuation")
    if mc_num < 1 or mc_batch_size < 1 or mc_num % mc_batch_size:
        raise ConfigError(f"harness: mc_num ({mc_num}) must be a positive multiple of mc_batch_size "
                          f"({mc_batch_size}), as in LLaDA's harness")
    seq = torch.tensor([*prefix, *target], dtype=torch.long, device=device)
    seq = seq.unsqueeze(0).repeat(mc_batch_size, 1)
    total = 0.0
    for _ in range(mc_num // mc_batch_size):
        counts = mask_counts(length, mc_batch_size, generator)
        # A random subset of `count` continuation positions per row: the first `count` of a random permutation.
        order = torch.stack([torch.randperm(length, generator=generator) for _ in range(mc_batch_size)])
        masked = torch.zeros_like(seq, dtype=torch.bool)
        masked[:, len(prefix):] = (order < counts.unsqueeze(1)).to(device)
        noisy = torch.where(masked, torch.full_like(seq, mask_id), seq)
        logits = logits_fn(noisy, None)
        loss = F.cross_entropy(logits[masked].float(), seq[masked], reduction="none")
        weight = (length / counts.to(device=device, dtype=torch.float32)).unsqueeze(1).expand_as(seq)[masked]
        total += float((loss * weight).sum()) / mc_batch_size
    return -total / (mc_num // mc_batch_size)


class DiffusionLM:
    """lm-eval's request methods over a loaded raydllm backbone (see the module docstring).

    Settings (lm-eval `model_args`, strings or values): sampler (exact / fast / dream), steps, gen_length,
    block_length, threshold, cache, temperature (their `raydllm eval` meanings and defaults, `gen_length`
    falling back to each request's max_gen_toks); batch_size (generation rows per batch); mc_num,
    mc_batch_size, greedy_check (loglikelihood); add_special_tokens (tokenize contexts as the reference harness
    classes do: True, e.g. LLaDA's BOS); chat (wrap each context in the tokenizer's chat template, as Fast-dLLM
    does for an Instruct model); seed (the Monte Carlo draws and temperature > 0 sampling)."""

    def __init__(self, backbone, tokenizer, cfg, *, sampler: str = "exact", steps=None, gen_length=None,
                 block_length=None, threshold=0.9, cache: str = "none", temperature=0.0, batch_size=16,
                 mc_num=128, mc_batch_size=None, greedy_check=False, add_special_tokens=True, chat=False,
                 seed=1234, progress=False, **unused):
        if unused:
            raise ConfigError(f"harness model_args: unknown setting(s) {', '.join(sorted(unused))}")
        self.backbone, self.tokenizer, self.cfg = backbone, tokenizer, cfg
        self.model_device = next(backbone.parameters()).device
        self.method, self.cache, self.threshold = str(sampler), str(cache), float(threshold)
        self.steps, self.gen_length = _optional_int(steps), _optional_int(gen_length)
        self.block_length, self.temperature = _optional_int(block_length), float(temperature)
        if self.cache != "none" and self.method != "fast":
            raise ConfigError(f"harness model_args: cache={self.cache} needs sampler=fast")
        self.batch_size = int(batch_size)
        self.mc_num = int(mc_num)
        self.mc_batch_size = int(mc_batch_size) if mc_batch_size not in (None, "") else (
            self.mc_num if self.mc_num <= 32 or self.mc_num % 32 else 32)
        self.greedy_check, self.add_special_tokens = _flag(greedy_check), _flag(add_special_tokens)
        self.chat, self.seed, self.progress = _flag(chat), int(seed), _flag(progress)
        # The mask draws run on the CPU (small, and the same on every device); temperature > 0 sampling draws
        # where the logits are, which needs a generator on that device.
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self.sample_generator = torch.Generator(device=self.model_device).manual_seed(self.seed)
        self.used_samplers: dict[int, SamplerConfig] = {}  # gen_length -> the sampler as it ran (protocol)
        self.sampler_for(self.gen_length or DEFAULT_MAX_GEN_TOKS)  # bad settings fail now, not mid-run

    # -- settings ----------------------------------------------------------------------------------------
    def sampler_for(self, gen_length: int) -> SamplerConfig:
        """The sampler for an answer of `gen_length` tokens, by `raydllm eval`'s rules (`default_sampler`),
        as it runs on this backbone (`effective_sampler`: a cache it cannot serve falls back to none)."""
        sampler = default_sampler(self.cfg, gen_length=gen_length, block_length=self.block_length,
                                  steps=self.steps, temperature=self.temperature, method=self.method,
                                  threshold=self.threshold, cache=self.cache)
        return effective_sampler(sampler, self.backbone)

    def protocol(self, shots: int) -> dict[str, Any]:
        """`protocol.score_protocol` of the generation this model ran (the settings' sampler when it ran none,
        e.g. a loglikelihood-only task), plus the harness's own settings."""
        samplers = list(self.used_samplers.values()) or [self.sampler_for(self.gen_length or DEFAULT_MAX_GEN_TOKS)]
        protocol = score_protocol(samplers[0], shots=shots, batch_size=self.batch_size, backbone=self.backbone)
        if len(samplers) > 1:  # per-request max_gen_toks: every length that ran
            protocol["gen_length"] = sorted(s.gen_length for s in samplers)
        return protocol | {"mc_num": self.mc_num, "mc_batch_size": self.mc_batch_size,
                           "greedy_check": self.greedy_check, "add_special_tokens": self.add_special_tokens,
                           "chat": self.chat, "seed": self.seed}

    # -- tokenization ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"])

    def _context(self, text: str) -> str:
        if not self.chat:
            return text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """LLaDA's `_encode_pair`: the context's trailing spaces move to the continuation, and the continuation's
        tokens are those the whole text has after the context's (so a merge across the seam is scored)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation, context = context[-spaces:] + continuation, context[:-spaces]
        whole = self.encode(context + continuation)
        prefix = self.encode(context)
        return prefix, whole[len(prefix):]

    def _model_limit(self) -> int | None:
        limit = getattr(getattr(getattr(self.backbone, "model", None), "config", None), "max_seq_len", None)
        return limit if isinstance(limit, int) else None

    # -- lm-eval's requests ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """One answer per request (context, gen_kwargs): requests of the same answer length are generated
        together by `generate_answers`, then each answer is cut at its first `until` string."""
        from tqdm.auto import tqdm

        groups: dict[int, list[int]] = {}
        contexts, untils = [], []
        for i, request in enumerate(requests):
            context, kwargs = request.args[0], dict(request.args[1] or {})
            until = kwargs.get("until") or []
            untils.append([until] if isinstance(until, str) else list(until))
            contexts.append(self.encode(self._context(context)))
            length = self.gen_length or int(kwargs.get("max_gen_toks") or DEFAULT_MAX_GEN_TOKS)
            groups.setdefault(length, []).append(i)
        answers: list[str] = [""] * len(contexts)
        bar = tqdm(total=0, desc="raydllm generate_until", unit="req", disable=not self.progress)
        for length, idx in groups.items():
            sampler = self.sampler_for(length)
            self.used_samplers[sampler.gen_length] = sampler
            encoded = truncate_prompts(self.backbone, [contexts[i] for i in idx], sampler)
            texts, _ = generate_answers(self.backbone, self.tokenizer, encoded, sampler=sampler,
                                        batch_size=self.batch_size, bar=bar,
                                        generator=self.sample_generator if sampler.temperature > 0 else None)
            for i, text in zip(idx, texts):
                answers[i] = cut_at_stops(text, untils[i])
        bar.close()
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(ELBO of the continuation, is_greedy) per request (context, continuation)."""
        from tqdm.auto import tqdm

        was_training = self.backbone.training
        self.backbone.eval()
        limit = self._model_limit()
        out = []
        for request in tqdm(requests, desc="raydllm loglikelihood", disable=not self.progress):
            prefix, target = self.encode_pair(self._context(request.args[0]), request.args[1])
            if limit is not None:  # keep the context's end within the embedded model's length
                prefix = prefix[max(0, len(prefix) + len(target) - limit):]
            value = elbo_loglikelihood(self.backbone.logits, prefix, target, mask_id=self.backbone.ids.mask,
                                       mc_num=self.mc_num, mc_batch_size=self.mc_batch_size, device=self.model_device,
                                       generator=self.generator)
            out.append((value, self._greedy(prefix, target) if self.greedy_check else False))
        if was_training:
            self.backbone.train()
        return out

    def _greedy(self, prefix: list[int], target: list[int]) -> bool:
        """Whether the exact sampler, one token a step over one block, decodes `target` after `prefix` (LLaDA's
        `suffix_greedy_prediction`, which commits the most confident masked position at each step)."""
        sampler = SamplerConfig(steps=len(target), gen_length=len(target), block_length=len(target))
        ids = torch.tensor([prefix], dtype=torch.long, device=self.model_device)
        out = generate(self.backbone.logits, ids, torch.ones_like(ids), mask_id=self.backbone.ids.mask,
                       config=sampler)
        return out[0, len(prefix):].tolist() == list(target)

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError(
            "raydllm harness: loglikelihood_rolling (perplexity tasks such as wikitext) is not offered: a masked "
            "diffusion model has no left-to-right factorisation to roll; use loglikelihood or generation tasks")


def gsm8k_local_task(data_dir, folder, *, name: str = "gsm8k_local", base: str = "gsm8k") -> str:
    """Write an lm-eval task YAML `name` into `folder`: lm-eval's own `base` task (its prompt, shots, `until`,
    filters and metric, by `include`) reading GSM8K's train/test jsonl in `data_dir` instead of the Hub, so a
    harness run needs no network. Returns the task name; pass `folder` as the TaskManager's include path."""
    from pathlib import Path

    lm_eval = require_lm_eval()
    data_dir, folder = Path(data_dir).resolve(), Path(folder)
    source = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / f"{base}.yaml"
    if not source.is_file():
        raise ConfigError(f"lm-eval {lm_eval.__version__} has no task {base} at {source}")
    files = {split: data_dir / f"{split}.jsonl" for split in ("train", "test")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"GSM8K data: {', '.join(missing)} not found (jsonl with question/answer)")
    folder.mkdir(parents=True, exist_ok=True)
    # JSON is YAML: every path quoted, whatever characters it holds.
    import json
    lines = [f"include: {json.dumps(str(source))}", f"task: {name}", "tag: []", "dataset_path: json",
             "dataset_name: null", "dataset_kwargs:", "  data_files:",
             *(f"    {split}: {json.dumps(str(path))}" for split, path in files.items())]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return name
