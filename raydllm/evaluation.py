"""Generation evaluation: a checkpoint answers a task's questions with the diffusion sampler, the task scores it.

`evaluate_task` is the core (prompts -> left-padded batches -> `sampler.generate` -> decode up to EOS ->
`task.extract` -> `task.score`). `load_checkpoint_backbone` rebuilds a backbone from a raydllm checkpoint
folder. `raydllm eval` (registered by `register_cli`) ties them to the command line and to MLflow.

Checkpoint layout relied on (what `worker.WorkerLoop.save` writes, DeepSpeed 0.19 `save_checkpoint` with
tag "engine"):

    <checkpoint>/raydllm.json                        {"step", "config", ...}
    <checkpoint>/engine/mp_rank_00_model_states.pt   {"module": OnlineModel state dict, ...}  (ZeRO 0-2)
    <checkpoint>/engine/zero_pp_rank_*_mp_rank_00_model_states.pt + optim shards            (ZeRO 3)
    <checkpoint>/ema.pt                              EMA target state dict (keys "model.*"; lambda > 0 only)

The OnlineModel state dict holds the backbone under `backbone.model.` and the predictor under `predictor.`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import Config, ConfigError, validate
from .sampler import SamplerConfig, decode_generations, generate

log = logging.getLogger(__name__)

DS_TAG = "engine"
MODEL_STATES = "mp_rank_00_model_states.pt"
BACKBONE_PREFIX = "backbone.model."
CHECKPOINT_TAG = "raydllm.checkpoint"  # MLflow tag (or param) of a run pointing at its checkpoint
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


@torch.no_grad()
def evaluate_task(backbone, tokenizer, task, examples, *, shots: int = 0, train_examples=(),
                  sampler: SamplerConfig = SamplerConfig(), batch_size: int = 16, progress: bool = True,
                  max_prompt_tokens: int | None = None, generator: torch.Generator | None = None,
                  ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate an answer for every example and score it.

    Returns (metrics, predictions): metrics = the mean of each key of `task.score` over the examples plus
    "n"; predictions = one dict per example in input order (prompt, gold, generation, extracted, scores).
    Prompts are `task.format_prompt(example, few_shot_exemplars(train_examples, shots))`, tokenized without
    special tokens (as `data.tokenize_sft` does), truncated to their last `max_prompt_tokens` when given,
    and batched by length with left padding (pad id = backbone.ids.pad; the sampler's mask id is
    backbone.ids.mask).
    """
    from tqdm.auto import tqdm

    from .tasks.base import few_shot_exemplars

    examples = list(examples)
    exemplars = few_shot_exemplars(list(train_examples), shots) if shots else []
    prompts = [task.format_prompt(ex, exemplars) for ex in examples]
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    # The embedded model has a hard length limit: keep the prompt's end (the question) within it.
    model_limit = getattr(getattr(getattr(backbone, "model", None), "config", None), "max_seq_len", None)
    if isinstance(model_limit, int):
        room = model_limit - sampler.gen_length
        max_prompt_tokens = min(max_prompt_tokens, room) if max_prompt_tokens else room
    if max_prompt_tokens:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    device = next(backbone.parameters()).device
    stops = stop_ids(backbone, tokenizer)
    was_training = backbone.training
    backbone.eval()

    order = sorted(range(len(examples)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    generations: dict[int, str] = {}
    bar = tqdm(total=len(examples), desc=f"eval {getattr(task, 'name', 'task')}", unit="ex", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, attention = left_pad([encoded[i] for i in idx], backbone.ids.pad)
        out = generate(backbone.logits, ids.to(device), attention.to(device), mask_id=backbone.ids.mask,
                       config=sampler, generator=generator)
        texts = decode_generations(tokenizer, out.cpu(), ids.shape[1], eos_id=stops)
        generations.update(zip(idx, texts))
        bar.update(len(idx))
    bar.close()
    if was_training:
        backbone.train()

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


def default_sampler(cfg: Config, *, gen_length: int | None = None, block_length: int | None = None,
                    steps: int | None = None, temperature: float = 0.0) -> SamplerConfig:
    """Sampler settings for a checkpoint: answer length = data.answer_tokens rounded up to a multiple of the
    block length; block length = the whole answer when it is at most 64 tokens (the embedded default),
    else 32 (LLaDA's semi-autoregressive GSM8K setting); steps = gen_length (one token per step)."""
    answer = cfg.data.answer_tokens
    if block_length is None:
        block_length = gen_length if gen_length is not None and gen_length <= 64 else (answer if answer <= 64 else 32)
    if gen_length is None:
        gen_length = math.ceil(answer / block_length) * block_length
    try:
        return SamplerConfig(steps=steps or gen_length, gen_length=gen_length, block_length=block_length,
                             temperature=temperature)
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
def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint folder: `path` itself when it holds raydllm.json, else its newest `checkpoint_*`
    child that does (a Ray Train run folder)."""
    path = Path(path).expanduser()
    if (path / "raydllm.json").is_file():
        return path
    if path.is_dir():
        children = [c for c in path.iterdir() if c.is_dir() and (c / "raydllm.json").is_file()]
        if children:
            return max(children, key=lambda c: (json.loads((c / "raydllm.json").read_text()).get("step", 0), c.name))
    raise ConfigError(f"checkpoint {path}: no raydllm.json here (not a raydllm checkpoint folder)")


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - DeepSpeed stores a few plain Python objects beside the tensors
        log.info("%s: not loadable with weights_only=True; loading it as a trusted local checkpoint", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The OnlineModel state dict (`backbone.model.*`, `predictor.*`) of a raydllm checkpoint folder."""
    folder = resolve_checkpoint_dir(path)
    states = folder / DS_TAG / MODEL_STATES
    module = _torch_load(states).get("module") if states.is_file() else None
    if module is None:  # ZeRO-3 keeps the weights only in the partitioned optimizer shards
        if not any((folder / DS_TAG).glob("zero_pp_rank_*_model_states.pt")):
            raise ConfigError(f"checkpoint {folder}: no {DS_TAG}/{MODEL_STATES} (not a DeepSpeed checkpoint)")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DS_TAG)
    return dict(module)


def read_checkpoint_meta(path: str | Path) -> dict:
    return json.loads((resolve_checkpoint_dir(path) / "raydllm.json").read_text())


def load_checkpoint_backbone(path: str | Path, *, ema: bool = False, base: bool = False,
                             device: str | torch.device | None = None):
    """(backbone, tokenizer, cfg) of a raydllm checkpoint folder: the backbone is built from the saved
    config, then the checkpoint's `backbone.model.*` weights (or its EMA target with ema=True) are loaded.
    base=True: the model the run started from (its `model` config as is), for before/after comparisons."""
    from .backbone import load_backbone

    folder = resolve_checkpoint_dir(path)
    cfg = validate(read_checkpoint_meta(folder)["config"], source=str(folder / "raydllm.json"))
    if base:
        if cfg.model.name == "tiny" and cfg.model.init == "pretrained":
            from .train import prepare_base

            prepare_base(cfg)
        backbone, tokenizer = load_backbone(cfg.model.model_copy(update={"gradient_checkpointing": False}))
        if device is not None:
            backbone.to(device)
        return backbone.eval(), tokenizer, cfg
    # The weights come from the checkpoint, so the tiny model needs no pretrained base built first.
    model_cfg = cfg.model.model_copy(update={"init": "random"}) if cfg.model.name == "tiny" else cfg.model
    model_cfg = model_cfg.model_copy(update={"gradient_checkpointing": False})
    backbone, tokenizer = load_backbone(model_cfg)
    if ema:
        ema_file = folder / "ema.pt"
        if not ema_file.is_file():
            raise ConfigError(f"--ema: checkpoint {folder} has no ema.pt (trained with jepa.lambda=0?)")
        state = {k.removeprefix("model."): v for k, v in _torch_load(ema_file).items()}
    else:
        module = read_checkpoint_state(folder)
        state = {k[len(BACKBONE_PREFIX):]: v for k, v in module.items() if k.startswith(BACKBONE_PREFIX)}
        if not state:
            raise ConfigError(f"checkpoint {folder}: no {BACKBONE_PREFIX}* weights in its model states")
    backbone.model.load_state_dict(state, strict=True)
    if device is not None:
        backbone.to(device)
    return backbone.eval(), tokenizer, cfg


# -- run ids ---------------------------------------------------------------------------------------------
def _materialize(uri: str) -> Path:
    """A local copy of a remote checkpoint (s3://, gs://, ...) via pyarrow, as Ray Train stores them."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    local = Path(tempfile.mkdtemp(prefix="raydllm-ckpt-"))
    pafs.copy_files(root, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def resolve_target(target: str, tracking_uri: str) -> tuple[Path, str | None]:
    """(local checkpoint folder, MLflow run id or None) for a checkpoint path or a run id."""
    if Path(target).expanduser().exists():
        return resolve_checkpoint_dir(target), None
    if "://" in target:
        return resolve_checkpoint_dir(_materialize(target)), None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(target)
    except MlflowException:
        raise ConfigError(f"{target}: neither a checkpoint folder nor a run id in {tracking_uri}") from None
    location = run.data.tags.get(CHECKPOINT_TAG) or run.data.params.get(CHECKPOINT_TAG)
    if not location:
        raise ConfigError(f"run {target}: no {CHECKPOINT_TAG} tag (it finished without a checkpoint?)")
    if "://" in location and not location.startswith("file://"):
        return resolve_checkpoint_dir(_materialize(location)), target
    return resolve_checkpoint_dir(location.removeprefix("file://")), target


def log_to_run(tracking_uri: str, run_id: str, metrics: dict[str, float], predictions: list[dict], *,
               split: str, shots: int, task: str, step: int = 0, weights: str | None = None) -> str:
    """Log `eval/<split>/<shots>shot[/<weights>]/<metric>` metrics and a predictions jsonl artifact; returns
    the prefix. `weights="base"` marks figures of the model the run started from."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    prefix = f"eval/{split}/{shots}shot" + (f"/{weights}" if weights else "")
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"{prefix}/{k}", float(v), now, step) for k, v in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / f"predictions-{task}-{split}-{shots}shot{'-' + weights if weights else ''}.jsonl"
        file.write_text("".join(json.dumps(p) + "\n" for p in predictions))
        client.log_artifact(run_id, str(file), artifact_path="eval")
    return prefix


# -- command line ----------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from .data import load_examples
    from .tasks import get_task
    from .tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    folder, run_id = resolve_target(args.checkpoint, tracking_uri)
    if args.base and args.ema:
        raise ConfigError("--base and --ema: choose one set of weights")
    backbone, tokenizer, cfg = load_checkpoint_backbone(folder, ema=args.ema, base=args.base)
    step = 0 if args.base else int(read_checkpoint_meta(folder).get("step", 0))
    data = cfg.data.model_copy(update={"val_limit": 10**9})  # --limit, not the training val_limit, applies
    if args.data:
        data = data.model_copy(update={"source": "local", "path": str(Path(args.data).resolve())})
    raw = cfg.to_dict() | {"task": args.task, "data": data.model_dump(mode="json")}
    eval_cfg = validate(raw)
    task = get_task(args.task)
    examples = load_examples(eval_cfg, args.split)
    if args.limit:
        examples = examples[:args.limit]
    train = load_examples(eval_cfg, "train") if args.shots else []
    sampler = default_sampler(cfg, gen_length=args.gen_length, block_length=args.block_length, steps=args.steps)
    metrics, predictions = evaluate_task(backbone, tokenizer, task, examples, shots=args.shots,
                                         train_examples=train, sampler=sampler, batch_size=args.batch_size,
                                         progress=not args.no_progress,
                                         max_prompt_tokens=prompt_budget(cfg, sampler, args.shots))
    logged = None
    if run_id is not None:
        logged = log_to_run(tracking_uri, run_id, metrics, predictions, split=args.split, shots=args.shots,
                            task=args.task, step=step, weights="base" if args.base else None)
    if args.predictions:
        Path(args.predictions).write_text("".join(json.dumps(p) + "\n" for p in predictions))
    result = {"checkpoint": str(folder), "run_id": run_id, "step": step, "weights": "base" if args.base else
              ("ema" if args.ema else "online"), "task": args.task, "split": args.split,
              "shots": args.shots, "sampler": {"gen_length": sampler.gen_length, "block_length": sampler.block_length,
                                               "steps": sampler.steps},
              "metrics": metrics, "logged_as": logged}
    if args.json:
        from .cli import emit_json

        emit_json(result)
    else:
        print(("base model of " if args.base else "") + f"checkpoint: {folder} (step {step})"
              + (f", run {run_id}" if run_id else ""))
        print(f"{args.task} {args.split} {args.shots}-shot, gen_length {sampler.gen_length}, block "
              f"{sampler.block_length}, steps {sampler.steps}")
        for key, value in metrics.items():
            print(f"{key:>16}: {value:.4f}" if key != "n" else f"{key:>16}: {int(value)}")
        if logged:
            print(f"logged to MLflow run {run_id} as {logged}/*")
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="generate answers with a checkpoint and score them on a task")
    p.add_argument("checkpoint", help="a raydllm checkpoint folder (or a Ray run folder), or an MLflow run id")
    p.add_argument("task", help="task name, e.g. gsm8k")
    p.add_argument("--shots", type=int, choices=(0, 4), default=0, help="few-shot exemplars from train (default 0)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--split", choices=("validation", "test"), default="test")
    p.add_argument("--steps", type=int, help="denoising steps (default: gen-length, one token per step)")
    p.add_argument("--gen-length", type=int, help="answer tokens (default: data.answer_tokens rounded up to the block)")
    p.add_argument("--block-length", type=int, help="semi-autoregressive block (default: the whole answer "
                                                    "if <= 64 tokens, else 32)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data", help="local data file or folder (default: the checkpoint's data source)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA target weights instead of the online ones")
    p.add_argument("--base", action="store_true", help="evaluate the model this run started from (same data, "
                                                       "prompts and sampler), for a before/after comparison")
    p.add_argument("--predictions", help="also write the predictions jsonl here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.set_defaults(func=cmd_eval)
    return p
