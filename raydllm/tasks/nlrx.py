"""Data layer: NL-RX-SYNTH: natural-language description -> regex in deep-regex's token syntax.

Data (nicholaslocascio/deep-regex): a folder with line-aligned src-{train,val,test}.txt (descriptions) and
targ-{train,val,test}.txt (regexes, tokens separated by spaces). There is no hub copy, so `path` is required.

Metrics:
* exact_match: the predicted regex equals the gold one token for token (whitespace runs collapsed);
* functional_equivalence (primary): the two regexes denote the same language, decided exactly by DFA
  equivalence under the reference evaluator's conventions (see `raydllm.tasks.regex_dfa`: `<M0>`..`<M3>` are
  the fixed strings "dog", "truck", "ring", "lake"; `\\ b` is the letter b, as dk.brics reads it). An invalid
  regex scores 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from raydllm.tasks.base import DataError, Example, check_split, first_answer_line
from raydllm.tasks.regex_dfa import equivalent

# Our split names -> the file suffixes of the release (it ships its own validation split).
SPLIT_FILES = {"train": "train", "validation": "val", "test": "test"}
INSTRUCTION = "Write a regular expression for: "
ANSWER_CUE = "Regex:"


def _collapse(text: str) -> str:
    return " ".join(text.split())


class NlRxTask:
    name = "nlrx"
    primary_metric = "functional_equivalence"

    def load(self, split: str, path: str | None = None, *, seed: int = 0,
             val_fraction: float = 0.05, limit: int | None = None) -> list[Example]:
        """Rows of one split, in file order; seed and val_fraction are unused (the release has a val split)."""
        check_split(split)
        if path is None:
            raise DataError("nlrx: no hub copy of NL-RX-SYNTH; pass the folder holding src-/targ-*.txt as path")
        folder = Path(path)
        src, targ = (folder / f"{side}-{SPLIT_FILES[split]}.txt" for side in ("src", "targ"))
        for file in (src, targ):
            if not file.is_file():
                raise DataError(f"nlrx: missing data file {file}")
        descriptions = src.read_text(encoding="utf-8").splitlines()
        regexes = targ.read_text(encoding="utf-8").splitlines()
        if len(descriptions) != len(regexes):
            raise DataError(f"nlrx: {src} has {len(descriptions)} lines but {targ} has {len(regexes)}")
        examples = []
        for line, (description, regex) in enumerate(zip(descriptions, regexes), start=1):
            if not description.strip() or not regex.strip():
                raise DataError(f"nlrx: empty description or regex at line {line} of {src} / {targ}")
            examples.append(Example(prompt=_collapse(description), answer=_collapse(regex)))
        return examples[:limit] if limit is not None else examples

    def format_prompt(self, example: Example, shots: Sequence[Example] = ()) -> str:
        """Exemplars (from few_shot_exemplars over train) as solved blocks, then the open question."""
        blocks = [f"{INSTRUCTION}{shot.prompt}\n{ANSWER_CUE} {shot.answer}" for shot in shots]
        blocks.append(f"{INSTRUCTION}{example.prompt}\n{ANSWER_CUE}")
        return "\n\n".join(blocks)

    def extract(self, generation: str) -> str:
        """The regex is the first non-empty line; a repeated "Regex:" cue is dropped."""
        line = first_answer_line(generation, ANSWER_CUE)
        return _collapse(line) if line else ""

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        exact = _collapse(prediction) == _collapse(example.answer)
        same_language = exact or equivalent(prediction, example.answer)
        return {"exact_match": float(exact), "functional_equivalence": float(same_language)}
