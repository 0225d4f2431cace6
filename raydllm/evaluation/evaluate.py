"""Evaluation layer: a model answers a task's questions with the diffusion sampler, and the task scores them.

`evaluate_task` is the core (prompts -> left-padded batches -> `sampler.sample` -> decode up to EOS ->
`task.extract` -> `task.score`). `load_checkpoint_backbone` rebuilds a backbone from a raydllm checkpoint
folder (layout: `checkpoints.py`). `raydllm eval` ties them to the command line and MLflow (`cli.py`).
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from raydllm.engine.checkpoints import BACKBONE_PREFIX, read_checkpoint_meta, read_checkpoint_state, resolve_checkpoint_dir, torch_load
from raydllm.core.config import Config, ConfigError, validate
from raydllm.core.sampler import SamplerConfig, decode_generations, sample
from raydllm.evaluation.decode_cost import cost_figures, count_forwards
from raydllm.evaluation.sharding import ONE_RANK, Shard, map_batches

log = logging.getLogger(__name__)

# End-of-answer tokens of known families besides the tokenizer's EOS (LLaDA's <|eot_id|>, Qwen/Dream's).
EXTRA_STOP_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|endoftext|>")


# -- generation evaluation -------------------------------------------------------------------------------
def stop_ids(backbone, tokenizer) -> set[int]:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return {int(backbone.ids.eos)} | {int(vocab[t]) for t in EXTRA_STOP_TOKENS if t in vocab}


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, L], attention_mask [B, L]) with each row right-aligned after `pad_id` padding."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, length - len(r):] = torch.tensor(list(r), dtype=torch.long)
            attention[i, length - len(r):] = 1
    return ids, attention


def effective_sampler(sampler: SamplerConfig, backbone) -> SamplerConfig:
    """The sampler as it will run on this backbone: a KV cache the backbone cannot serve (not raydllm's own
    LLaDA / Dream classes nor a model with `forward_kv`, e.g. a remote-code model) falls back to parallel decoding
    alone, with a warning."""
    if sampler.cache == "none" or getattr(backbone, "supports_kv_cache", False):
        return sampler
    log.warning("sampler cache=%s: %s has no KV-cache path; the fast sampler runs with parallel decoding alone "
                "(cache=none)", sampler.cache, type(getattr(backbone, "model", backbone)).__name__)
    return replace(sampler, cache="none")


def sampler_settings(sampler: SamplerConfig) -> dict[str, Any]:
    """What to log beside every generation result."""
    settings = {"sampler": sampler.method, "gen_length": sampler.gen_length, "block_length": sampler.block_length}
    if sampler.method == "fast":
        return settings | {"threshold": sampler.threshold, "cache": sampler.cache}
    return settings | {"steps": sampler.steps}


@torch.no_grad()
def evaluate_task(backbone, tokenizer, task, examples, *, shots: int = 0, train_examples=(),
                  sampler: SamplerConfig = SamplerConfig(), batch_size: int = 16, progress: bool = True,
                  max_prompt_tokens: int | None = None, generator: torch.Generator | None = None,
                  shard: Shard | None = None, decode_cost: dict | None = None
                  ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate an answer for every example and score it.

    Returns (metrics, predictions): metrics = the mean of each key of `task.score` over the examples plus
    "n"; predictions = one dict per example in input order (prompt, gold, generation, extracted, scores).
    Prompts are `task.format_prompt(example, few_shot_exemplars(train_examples, shots))`, tokenized without
    special tokens (as `data.tokenize_sft` does), truncated to their last `max_prompt_tokens` when given,
    and batched by length with left padding (pad id = backbone.ids.pad; the sampler's mask id is
    backbone.ids.mask). `shard` (`sharding.Shard`, one per rank of a process group): each rank generates its
    share of those same batches, and every rank returns the whole pass's metrics and predictions (a collective:
    every rank of the group must call it). With `generator` (temperature > 0) the draws follow the batches a rank
    runs, so only a greedy pass is item-for-item the same sharded and unsharded. `decode_cost`, a dict, is
    filled with the pass's decoding cost (`decode_cost.count_forwards`): answer tokens, row-forwards (a batched
    forward counts once per row it carries) and their ratio, `tokens_per_forward`, over every rank's batches.
    """
    from tqdm.auto import tqdm

    from raydllm.data.tasks.base import few_shot_exemplars

    examples = list(examples)
    exemplars = few_shot_exemplars(list(train_examples), shots) if shots else []
    prompts = [task.format_prompt(ex, exemplars) for ex in examples]
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    encoded = truncate_prompts(backbone, encoded, sampler, max_prompt_tokens)
    bar = tqdm(total=0, desc=f"eval {getattr(task, 'name', 'task')}", unit="ex", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    texts, row_forwards = generate_answers(backbone, tokenizer, encoded, sampler=sampler, batch_size=batch_size,
                                           generator=generator, shard=shard, bar=bar)
    bar.close()
    generations = dict(enumerate(texts))
    if decode_cost is not None:
        decode_cost.update(cost_figures(tokens=len(examples) * sampler.gen_length, row_forwards=row_forwards))

    predictions, totals = [], {}
    for i, ex in enumerate(examples):
        generation = generations[i]
        extracted = task.extract(generation)
        scores = {k: float(v) for k, v in task.score(extracted, ex).items()}
        for k, v in scores.items():
            totals[k] = totals.get(k, 0.0) + v
        predictions.append({"prompt": prompts[i], "gold": ex.answer,
                            "gold_extracted": ex.meta.get("gold") if isinstance(ex.meta, dict) else None,
                            "generation": generation, "extracted": extracted, "scores": scores})
    n = len(examples)
    metrics = {k: v / n for k, v in totals.items()} if n else {}
    metrics["n"] = float(n)
    return metrics, predictions


def truncate_prompts(backbone, encoded: list[list[int]], sampler: SamplerConfig,
                     max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Each prompt's last `max_prompt_tokens` tokens, and for a model with a hard length limit (the embedded
    model's `max_seq_len`) no more than leaves room for the answer: the prompt's end (the question) is kept."""
    model_limit = getattr(getattr(getattr(backbone, "model", None), "config", None), "max_seq_len", None)
    if isinstance(model_limit, int):
        room = model_limit - sampler.gen_length
        max_prompt_tokens = min(max_prompt_tokens, room) if max_prompt_tokens else room
    return [ids[-max_prompt_tokens:] for ids in encoded] if max_prompt_tokens else list(encoded)


@torch.no_grad()
def generate_answers(backbone, tokenizer, encoded: Sequence[Sequence[int]], *, sampler: SamplerConfig,
                     batch_size: int = 16, generator: torch.Generator | None = None, shard: Shard | None = None,
                     bar=None) -> tuple[list[str], int]:
    """(one decoded answer per prompt, in input order, cut before its first stop token; row-forwards) for
    token-id prompts: batched by length with left padding (pad id = backbone.ids.pad), sampled by
    `sampler.sample` as `sampler` says (after `effective_sampler`). `shard`: as `evaluate_task`'s (a
    collective). `bar`: a tqdm bar advanced by each batch this rank runs (its total is set here). The
    harness model (`evaluation.harness`) generates through this too, so its answers are raydllm's."""
    device = next(backbone.parameters()).device
    sampler = effective_sampler(sampler, backbone)
    cached_forward = backbone.forward_with_cache if sampler.cache != "none" else None
    stops = stop_ids(backbone, tokenizer)
    was_training = backbone.training
    backbone.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    shard = shard or ONE_RANK
    if bar is not None:
        bar.total = sum(len(b) for k, b in enumerate(batches) if shard.owns(k))
        bar.refresh()

    def generate(idx: list[int]) -> tuple[list[str], int]:
        ids, attention = left_pad([encoded[i] for i in idx], backbone.ids.pad)
        logits_fn, cached, forwards = count_forwards(backbone.logits, cached_forward)
        out = sample(logits_fn, ids.to(device), attention.to(device), mask_id=backbone.ids.mask,
                     config=sampler, cached_forward=cached, generator=generator)
        if bar is not None:
            bar.update(len(idx))
        return decode_generations(tokenizer, out.cpu(), ids.shape[1], eos_id=stops), forwards()

    generations: dict[int, str] = {}
    row_forwards = 0
    for idx, (texts, forwards) in zip(batches, map_batches(batches, generate, shard)):
        generations.update(zip(idx, texts))
        row_forwards += forwards * len(idx)
    if was_training:
        backbone.train()
    return [generations[i] for i in range(len(encoded))], row_forwards


def default_sampler(cfg: Config, *, gen_length: int | None = None, block_length: int | None = None,
                    steps: int | None = None, temperature: float = 0.0, method: str = "exact",
                    threshold: float = 0.9, cache: str = "none", dream_algorithm: str = "entropy",
                    dream_alg_temp: float = 0.0) -> SamplerConfig:
    """Sampler settings for a checkpoint: answer length = data.answer_tokens rounded up to a multiple of the
    block length; block length = the whole answer when it is at most 64 tokens (the embedded default),
    else 32 (LLaDA's semi-autoregressive GSM8K setting); steps = gen_length (one token per step).
    method/threshold/cache: the fast sampler's (`sampler.generate_fast`); method "dream": Dream's sampler, one
    block over the whole answer (`dream_sampler.generate_dream`)."""
    answer = cfg.data.answer_tokens
    dream = {}
    if method == "dream":
        gen_length = gen_length or answer
        block_length = gen_length
        dream = dict(dream_algorithm=dream_algorithm, dream_alg_temp=dream_alg_temp)
    if block_length is None:
        block_length = gen_length if gen_length is not None and gen_length <= 64 else (answer if answer <= 64 else 32)
    if gen_length is None:
        gen_length = math.ceil(answer / block_length) * block_length
    try:
        return SamplerConfig(steps=steps or gen_length, gen_length=gen_length, block_length=block_length,
                             temperature=temperature, method=method, threshold=threshold, cache=cache, **dream)
    except ValueError as exc:
        raise ConfigError(str(exc).replace("SamplerConfig.", "--").replace("_", "-")) from None


def prompt_budget(cfg: Config, sampler: SamplerConfig, shots: int) -> int:
    """Prompt tokens kept (the last ones): the training budget per question and exemplar, and for the
    embedded model no more than its max_seq_len leaves beside the answer."""
    budget = cfg.data.max_prompt_tokens * (1 + shots)
    if cfg.model.name == "tiny":
        budget = min(budget, cfg.model.max_seq_len - sampler.gen_length)
    if budget < 1:
        raise ConfigError(f"--gen-length {sampler.gen_length}: leaves no room for a prompt within "
                          f"model.max_seq_len={cfg.model.max_seq_len}")
    return budget


# -- checkpoints -----------------------------------------------------------------------------------------
def eval_device(device: str | torch.device | None = None) -> torch.device:
    """`--device`: auto (None or "auto") = the first GPU when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible")
    return device


def eval_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware runs it natively (the training dtype of GPU runs), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def load_checkpoint_backbone(path: str | Path, *, ema: bool = False, base: bool = False,
                             device: str | torch.device | None = None):
    """(backbone, tokenizer, cfg) of a raydllm checkpoint folder, on `device` (None/"auto": the GPU when
    there is one) in bf16 on a GPU, float32 on the CPU.

    The weights come from the checkpoint's weights-only export (`export/`, written at the end of a run)
    when it has one, else from the DeepSpeed model states (`engine/mp_rank_00_model_states.pt`, which
    under ZeRO 0-2 hold the module weights only); optimizer state is never read. ema=True: the EMA
    target (export/ema/, else ema.pt). base=True: the model the run started from (its `model` config as
    is), for before/after comparisons."""
    from raydllm.engine.backbone import load_backbone, without_adapters
    from raydllm.engine.checkpoints import EXPORT_EMA, export_folder
    from raydllm.engine.pretrain import prepare_base

    folder = resolve_checkpoint_dir(path)
    cfg = validate(read_checkpoint_meta(folder)["config"], source=str(folder / "raydllm.json"))
    device = eval_device(device)
    dtype = eval_dtype(device)
    if cfg.model.lora.rank > 0 and not base:
        return _load_lora_checkpoint(folder, cfg, ema=ema, device=device, dtype=dtype)
    if base:
        prepare_base(cfg.model)
        torch.manual_seed(cfg.train.seed)  # a random-init base is the one the run's seed drew
        backbone, tokenizer = load_backbone(without_adapters(cfg.model).model_copy(
            update={"gradient_checkpointing": False}), dtype=dtype)
        return backbone.to(device).eval(), tokenizer, cfg
    export = export_folder(folder)
    if export is not None and (not ema or (export / EXPORT_EMA).is_file()):
        from safetensors.torch import load_file

        log.info("loading the weights-only export %s", export)
        backbone, tokenizer = load_backbone(cfg.model.model_copy(update={
            # The run's own trust_remote_code: raydllm's classes load LLaDA, Dream and tiny exports without it.
            "name": str(export), "gradient_checkpointing": False, "revision": None}), dtype=dtype)
        if ema:
            state = load_file(str(export / EXPORT_EMA))
            backbone.model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
        return backbone.to(device).eval(), tokenizer, cfg
    # The weights come from the checkpoint, so the tiny model needs no pretrained base built first.
    model_cfg = cfg.model.model_copy(update={"init": "random"}) if cfg.model.name == "tiny" else cfg.model
    model_cfg = model_cfg.model_copy(update={"gradient_checkpointing": False})
    backbone, tokenizer = load_backbone(model_cfg, dtype=dtype)
    backbone.model.load_state_dict(_saved_backbone_state(folder, ema=ema), strict=True)
    return backbone.to(device).eval(), tokenizer, cfg


def _load_lora_checkpoint(folder: Path, cfg: Config, *, ema: bool, device, dtype):
    """A LoRA run's checkpoint holds adapters, not a model: rebuild the frozen base from the run's model source
    (as the run's workers did: same seed, same base weights), load the adapters (or the EMA adapters), merge."""
    from raydllm.engine.backbone import load_adapters, load_backbone, merge_adapters
    from raydllm.engine.pretrain import prepare_base

    prepare_base(cfg.model)
    torch.manual_seed(cfg.train.seed)
    backbone, tokenizer = load_backbone(cfg.model.model_copy(update={"gradient_checkpointing": False}), dtype=dtype)
    load_adapters(backbone, _saved_backbone_state(folder, ema=ema))
    merge_adapters(backbone)
    return backbone.to(device).eval(), tokenizer, cfg


def _saved_backbone_state(folder: Path, *, ema: bool) -> dict[str, torch.Tensor]:
    """The backbone tensors a checkpoint saved (the whole model, or a LoRA run's adapters): the EMA target's
    (`ema.pt`) with ema=True, else the online model's from the DeepSpeed model states."""
    if ema:
        ema_file = folder / "ema.pt"
        if not ema_file.is_file():
            raise ConfigError(f"--ema: checkpoint {folder} has no ema.pt (trained with jepa.lambda=0?)")
        return {k.removeprefix("model."): v for k, v in torch_load(ema_file).items()}
    module = read_checkpoint_state(folder)
    state = {k[len(BACKBONE_PREFIX):]: v for k, v in module.items() if k.startswith(BACKBONE_PREFIX)}
    if not state:
        raise ConfigError(f"checkpoint {folder}: no {BACKBONE_PREFIX}* weights in its model states")
    return state
