"""Data layer: what every task is: rows of (prompt, answer) text, a prompt format, answer extraction and a metric.

A task never touches tokens or models; `raydllm.data.sft` tokenizes its examples and `raydllm.evaluation.evaluate`
generates answers for them. One module per task, registered in `raydllm.data.tasks`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

SPLITS = ("train", "validation", "test")


class DataError(ValueError):
    """Bad or missing data: the message names the file or field at fault."""


@dataclass(frozen=True)
class Example:
    prompt: str  # the question / source text, without few-shot exemplars
    answer: str  # the gold target text the model is trained to produce
    meta: dict[str, Any] = field(default_factory=dict)  # task extras (gold number, db path, ...)


class Task(Protocol):
    name: str
    primary_metric: str  # the key of `score()` that a sweep selects on

    def load(self, split: str, path: str | None = None, *, seed: int = 0,
             val_fraction: float = 0.05, limit: int | None = None) -> list[Example]: ...

    def format_prompt(self, example: Example, shots: Sequence[Example] = ()) -> str: ...

    def extract(self, generation: str) -> str: ...

    def score(self, prediction: str, example: Example) -> dict[str, float]: ...


def carve_validation(train: list[Example], split: str, *, seed: int, val_fraction: float) -> list[Example]:
    """Split `train` into train/validation with a seeded shuffle; the same seed always gives the same split.

    Sweeps select on validation, so a task whose source has no validation split gets one from train,
    never from test.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"carve_validation: split must be train or validation, got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(train) * val_fraction))
    chosen = order[:n_val] if split == "validation" else order[n_val:]
    return [train[i] for i in sorted(chosen)]


def few_shot_exemplars(train: Sequence[Example], n: int, *, seed: int = 1234) -> list[Example]:
    """n exemplars drawn from train with a fixed seed, so 4-shot prompts are identical across trials."""
    if n <= 0:
        return []
    if n > len(train):
        raise DataError(f"asked for {n} few-shot exemplars but train has {len(train)} rows")
    return random.Random(seed).sample(list(train), n)


def first_answer_line(generation: str, cue: str) -> str:
    """The first non-empty line of a generation, with a repeated answer cue (e.g. "Code:") dropped."""
    for line in generation.splitlines():
        line = line.strip()
        if line.startswith(cue):
            line = line[len(cue):].strip()
        if line:
            return line
    return ""


def read_json_lines(path, fields: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file. A line that is not a JSON object, or a row without one of `fields`
    (null counts as missing), is a DataError naming the file and line: `datasets` buries the line number
    of a broken line in pyarrow's message."""
    import json

    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
            missing = [f for f in fields if row.get(f) is None]
            if missing:
                raise DataError(f"{path}: line {number}: no {', '.join(map(repr, missing))} field "
                                f"(the row has {', '.join(map(repr, row)) or 'no fields'})")
            rows.append(row)
    return rows


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
