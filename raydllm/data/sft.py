"""Data layer: from a task's examples to training batches, in LLaDA's SFT convention.

Each example becomes [left pad][prompt][answer][EOS ... EOS]: the answer is padded with EOS to a fixed
`answer_tokens`, and those EOS tokens are answer tokens (masked and learned) so the model learns where
to stop. Only answer positions are maskable; prompt and pad never are. Prompts are left-padded, as the
sampler does at generation time.

The order of examples is a pure function of (seed, step): step s of a run always sees the same global
batch, whatever happened before, which is what makes a resumed run continue exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from raydllm.core.config import Config
from raydllm.data.tasks import Example, get_task
from raydllm.data.tasks.base import carve_validation

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SftRecord:
    prompt_ids: list[int]
    answer_ids: list[int]  # already padded with EOS to answer_tokens


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L] 1 = real token
    maskable: torch.Tensor  # [B, L] bool: answer tokens (incl. EOS padding)

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.maskable.to(device))

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def load_examples(cfg: Config, split: str) -> list[Example]:
    """The examples of `split` for cfg.task from cfg.data.source (hub, local files, or generated)."""
    task = get_task(cfg.task)
    data = cfg.data
    if data.source == "synthetic":
        from raydllm.data.tasks.gsm8k import to_example
        from raydllm.data.tasks.synthetic import split_problems

        if cfg.task != "gsm8k":
            from raydllm.data.tasks.base import DataError
            raise DataError(f"data.source=synthetic generates GSM8K-format problems; task is {cfg.task!r}")
        if split == "test":  # disjoint by question from train, validation and the base's pretraining problems
            return [to_example(r) for r in split_problems("test", data.synthetic_size, data.split_seed)]
        examples = [to_example(r) for r in split_problems("train", data.synthetic_size, data.split_seed)]
        examples = carve_validation(examples, split, seed=data.split_seed, val_fraction=data.val_fraction)
    else:
        examples = task.load(split, data.path if data.source == "local" else None, seed=data.split_seed,
                             val_fraction=data.val_fraction)
    limit = data.train_limit if split == "train" else data.val_limit if split == "validation" else None
    return examples[:limit] if limit else examples


def with_absolute_data_path(cfg: Config) -> Config:
    """cfg with a relative local data.path made absolute here, on the driver: a Ray worker resolves paths in its
    own working directory, where a relative path names nothing."""
    path = cfg.data.path
    if cfg.data.source != "local" or not path or "://" in path or Path(path).is_absolute():
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(Path(path).resolve())})})


def check_data(cfg: Config) -> int | None:
    """Read the training rows on the driver through the task's own reader, before Ray starts: an unknown task,
    a missing file, a broken line or a row without its answer is one DataError naming the file and line, in
    seconds instead of a worker traceback minutes later. Hub data is left to the workers (only the task name is
    checked here): a driver may have no network, and a data set's download is the workers' to make.
    Returns the number of training examples (None for hub data)."""
    if cfg.data.source == "hub":
        get_task(cfg.task)
        return None
    examples = load_examples(cfg, "train")
    if not examples:
        from raydllm.data.tasks.base import DataError
        raise DataError(f"data: no training examples for task {cfg.task!r} in {cfg.data.path or cfg.data.source}")
    return len(examples)


def tokenize_sft(examples: list[Example], tokenizer, task, *, max_prompt_tokens: int, answer_tokens: int,
                 eos_id: int) -> list[SftRecord]:
    """Tokenize (prompt, answer) pairs; prompts keep their last max_prompt_tokens (the cue to answer)."""
    prompts = tokenizer([task.format_prompt(ex) if ex.prompt else "" for ex in examples],
                        add_special_tokens=False)["input_ids"]
    answers = tokenizer([(" " + ex.answer) if ex.prompt else ex.answer for ex in examples],
                        add_special_tokens=False)["input_ids"]
    records, cut, longest = [], 0, 0
    for prompt, answer in zip(prompts, answers):
        cut += len(answer) > answer_tokens - 1
        longest = max(longest, len(answer))
        answer = answer[:answer_tokens - 1]  # at least one EOS, so the stop is always learned
        records.append(SftRecord(prompt[-max_prompt_tokens:] if max_prompt_tokens else [],
                                 answer + [eos_id] * (answer_tokens - len(answer))))
    if cut:  # a cut answer teaches the model to stop early (e.g. before GSM8K's final `#### n`)
        # "[raydllm]": a line the driver's quiet terminal shows when a Ray worker prints it (raydllm.cli.console).
        log.warning("[raydllm] warning: data.answer_tokens=%d cuts %d of %d answers (longest: %d tokens + EOS)",
                    answer_tokens, cut, len(records), longest)
    return records


def collate(records: list[SftRecord], pad_id: int) -> Batch:
    import torch  # here, not at the top: the driver's data check (check_data) runs before torch is needed

    prompt_len = max(len(r.prompt_ids) for r in records)
    answer_len = max(len(r.answer_ids) for r in records)
    length = prompt_len + answer_len
    input_ids = torch.full((len(records), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(records), length), dtype=torch.long)
    maskable = torch.zeros((len(records), length), dtype=torch.bool)
    for row, r in enumerate(records):
        start = prompt_len - len(r.prompt_ids)
        input_ids[row, start:prompt_len] = torch.tensor(r.prompt_ids, dtype=torch.long)
        input_ids[row, prompt_len:prompt_len + len(r.answer_ids)] = torch.tensor(r.answer_ids, dtype=torch.long)
        attention[row, start:prompt_len + len(r.answer_ids)] = 1
        maskable[row, prompt_len:prompt_len + len(r.answer_ids)] = True
    return Batch(input_ids, attention, maskable)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def micro_batch_indices(n: int, *, step: int, micro: int, rank: int, world: int, micro_batch_size: int,
                        grad_accum: int, seed: int) -> list[int]:
    """Example indices of one worker's micro-batch at (step, micro): a slice of an endless stream of
    seeded epoch permutations. Workers take disjoint slices of each global batch."""
    global_batch = micro_batch_size * grad_accum * world
    first = step * global_batch + (micro * world + rank) * micro_batch_size
    positions = range(first, first + micro_batch_size)
    orders: dict[int, torch.Tensor] = {}
    out = []
    for p in positions:
        epoch, offset = divmod(p, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        out.append(int(orders[epoch][offset]))
    return out


def steps_for(cfg: Config, n_train: int) -> int:
    """Optimizer steps of a run: train.max_steps, or train.epochs over the global batch."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.workers
    return max(1, int(cfg.train.epochs * n_train / global_batch))
