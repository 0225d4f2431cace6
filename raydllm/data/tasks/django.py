"""Data layer: Django code generation: pseudo-code annotation -> one line of Python (odashi/ase15-django-dataset).

Data: a folder with line-aligned all.anno / all.code (18,805 pairs). Splits are the usual ones, in file
order: the first 16,000 lines train, the next 1,000 validation, the last 1,805 test. The code lines are
tokenized with spaces ("from django . conf import settings") and indented; we collapse whitespace runs and
strip the ends, since the one-line targets carry no meaningful layout.

Metrics, both on whitespace-normalized text (runs of whitespace -> one space, ends stripped):
* exact_match: the prediction equals the gold line;
* prefix_match (primary): the prediction starts with the gold line, i.e. it is the gold line possibly
  followed by extra text. A masked-diffusion model fills a fixed-length answer window and can leave
  trailing tokens after a correct line; this credits the line itself, never a truncated one (a
  prediction shorter than the gold never matches). It is a plain character prefix, so "x = 10" also
  matches gold "x = 1"; we keep it that simple rather than invent token-boundary rules.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from raydllm.data.tasks.base import DataError, Example, check_split, first_answer_line

SPLIT_ROWS = {"train": (0, 16000), "validation": (16000, 17000), "test": (17000, 18805)}
TOTAL_ROWS = 18805
INSTRUCTION = "Write the Python line for: "
ANSWER_CUE = "Code:"


def normalize(text: str) -> str:
    return " ".join(text.split())


class DjangoTask:
    name = "django"
    primary_metric = "prefix_match"

    def load(self, split: str, path: str | None = None, *, seed: int = 0,
             val_fraction: float = 0.05, limit: int | None = None) -> list[Example]:
        """Rows of one split in file order; seed and val_fraction are unused (the split is fixed)."""
        check_split(split)
        if path is None:
            raise DataError("django: no hub copy of the Django data set; pass the folder holding all.anno "
                            "and all.code as path")
        anno_file, code_file = Path(path) / "all.anno", Path(path) / "all.code"
        for file in (anno_file, code_file):
            if not file.is_file():
                raise DataError(f"django: missing data file {file}")
        annotations = anno_file.read_text(encoding="utf-8").splitlines()
        code = code_file.read_text(encoding="utf-8").splitlines()
        if len(annotations) != len(code):
            raise DataError(f"django: {anno_file} has {len(annotations)} lines but {code_file} has {len(code)}")
        if len(annotations) != TOTAL_ROWS:
            raise DataError(f"django: expected {TOTAL_ROWS} lines in {anno_file} for the standard split, "
                            f"found {len(annotations)}")
        start, stop = SPLIT_ROWS[split]
        if limit is not None:
            stop = min(stop, start + limit)
        return [Example(prompt=normalize(annotations[i]), answer=normalize(code[i])) for i in range(start, stop)]

    def format_prompt(self, example: Example, shots: Sequence[Example] = ()) -> str:
        """Exemplars (from few_shot_exemplars over train) as solved blocks, then the open annotation."""
        blocks = [f"{INSTRUCTION}{shot.prompt}\n{ANSWER_CUE} {shot.answer}" for shot in shots]
        blocks.append(f"{INSTRUCTION}{example.prompt}\n{ANSWER_CUE}")
        return "\n\n".join(blocks)

    def extract(self, generation: str) -> str:
        """The first non-empty line (a repeated "Code:" cue dropped), whitespace-normalized."""
        line = first_answer_line(generation, ANSWER_CUE)
        return normalize(line) if line else ""

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        predicted, gold = normalize(prediction), normalize(example.answer)
        return {"exact_match": float(predicted == gold),
                "prefix_match": float(bool(gold) and predicted.startswith(gold))}
