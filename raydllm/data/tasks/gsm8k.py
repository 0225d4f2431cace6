"""Data layer: GSM8K: grade-school math word problems; the metric is accuracy of the final number.

Data: the hub id `openai/gsm8k` (config `main`) for real users, or a local folder / file of the same rows
(`question`, `answer` ending in `#### n`) in jsonl or parquet. Validation is carved from train (seeded),
so sweeps never select on test.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from raydllm.data.tasks.base import DataError, Example, carve_validation, check_split, read_json_lines

HUB_ID = "openai/gsm8k"
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, e.g. <<48/2=24>>
_NUMBER = re.compile(r"-?[$]?\s*\d[\d,]*(?:\.\d+)?|-?[$]?\s*\.\d+")
_FINAL = re.compile(r"####\s*(.+)")


def normalize_number(text: str) -> str | None:
    """'$1,200.50' -> '1200.5', '-3' -> '-3', '7.0' -> '7'; None if `text` holds no number."""
    match = _NUMBER.search(text)
    if not match:
        return None
    raw = match.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(generation: str) -> str:
    """The final number of a generation: after '####' if present, else the last number in the text."""
    final = _FINAL.search(generation)
    if final:
        number = normalize_number(final.group(1))
        if number is not None:
            return number
    numbers = _NUMBER.findall(generation)
    for candidate in reversed(numbers):
        number = normalize_number(candidate)
        if number is not None:
            return number
    return ""


FIELDS = ("question", "answer")


def _read_rows(path: Path, split: str) -> list[dict]:
    """Rows of a local GSM8K copy: a folder with <split>.jsonl / <split>.parquet, or one file. Every row is
    checked: a row without its question or answer is a DataError naming the file and its line (or row)."""
    if path.is_dir():
        candidates = [path / f"{split}.jsonl", path / f"{split}.json", path / f"{split}.parquet"]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise DataError(f"--data {path}: no {split}.jsonl or {split}.parquet in this folder")
        path = found
    elif not path.exists():
        raise DataError(f"--data {path}: no such file or folder")
    if path.suffix == ".jsonl":
        rows = read_json_lines(path, FIELDS)
        where = "line"
    else:
        from datasets import load_dataset

        table = load_dataset("parquet" if path.suffix == ".parquet" else "json", data_files=str(path), split="train")
        for field in FIELDS:
            if field not in table.column_names:
                raise DataError(f"{path}: missing field {field!r} (has {', '.join(table.column_names)})")
        rows, where = list(table), "row"
    for number, row in enumerate(rows, 1):
        for field in FIELDS:
            if not isinstance(row[field], str):
                raise DataError(f"{path}: {where} {number}: field {field!r} should be text, got "
                                f"{type(row[field]).__name__}")
    return rows


def to_example(row: dict) -> Example:
    answer = _CALCULATOR.sub("", row["answer"]).strip()
    gold = _FINAL.search(answer)
    return Example(prompt=row["question"].strip(), answer=answer,
                   meta={"gold": normalize_number(gold.group(1)) if gold else None})


class Gsm8kTask:
    name = "gsm8k"
    primary_metric = "accuracy"

    def load(self, split: str, path: str | None = None, *, seed: int = 0, val_fraction: float = 0.05,
             limit: int | None = None) -> list[Example]:
        check_split(split)
        source_split = "test" if split == "test" else "train"
        if path is None:
            from datasets import load_dataset

            rows = list(load_dataset(HUB_ID, "main", split=source_split))
        else:
            rows = _read_rows(Path(path), source_split)
        examples = [to_example(r) for r in rows]
        if split != "test":
            examples = carve_validation(examples, split, seed=seed, val_fraction=val_fraction)
        return examples[:limit] if limit else examples

    def format_prompt(self, example: Example, shots: Sequence[Example] = ()) -> str:
        exemplars = "".join(f"Question: {s.prompt}\nAnswer: {s.answer}\n\n" for s in shots)
        return f"{exemplars}Question: {example.prompt}\nAnswer:"

    def extract(self, generation: str) -> str:
        return extract_answer(generation)

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        return {"accuracy": float(prediction != "" and prediction == example.meta.get("gold"))}
