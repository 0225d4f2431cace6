"""Data layer: NL-RX-SYNTH: natural-language description -> regex in deep-regex's token syntax.

Data (nicholaslocascio/deep-regex): a folder with line-aligned src-{train,val,test}.txt (descriptions) and
targ-{train,val,test}.txt (regexes, tokens separated by spaces). There is no hub copy, so `path` is required.

Metrics:
* exact_match: the predicted regex equals the gold one token for token (whitespace runs collapsed);
* functional_equivalence (primary): the two regexes denote the same language, decided exactly by DFA
  equivalence under the reference evaluator's conventions (see `raydllm.data.tasks.regex_dfa`: `<M0>`..`<M3>` are
  the fixed strings "dog", "truck", "ring", "lake"; `\\ b` is the letter b, as dk.brics reads it). An invalid
  regex scores 0.
* string_match (the paper's Table 2 metric): the two regexes accept or reject alike each of 200 random
  strings drawn from the gold regex (`test_strings`, seeded); `string_agreement` is the share of the 200 on
  which they agree. An invalid or empty regex scores 0 on both. The strings are drawn so that both members and
  non-members of the gold language occur: a quarter near misses of the gold's shape, a quarter uniform
  random strings, half generated from the gold's shape (members when the gold has no `~` or `&`).
"""
from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from raydllm.data.tasks.base import DataError, Example, check_split, first_answer_line
from raydllm.data.tasks.regex_dfa import (RegexSyntaxError, _alphabet, _ends, _generate, _leaf_sets, equivalent,
                                     parse)

TEST_STRINGS = 200
TEST_STRING_SEED = 0
MAX_TEST_STRING = 24  # symbols


@lru_cache(maxsize=4096)
def test_strings(gold: str, n: int = TEST_STRINGS, seed: int = TEST_STRING_SEED) -> tuple[str, ...]:
    """`n` strings for judging a regex against `gold`, the same for every prediction: by index i % 4,
    0-1: generated from the gold's shape (`regex_dfa._generate`: members unless the gold has `~`/`&`);
    2: the same with one symbol changed, inserted or deleted (near misses, which sit at the language's edge);
    3: uniform random symbols, 0 to 12 long. Symbols are the character classes the gold tells apart
    (`regex_dfa._alphabet`), written as one representative character each. Raises RegexSyntaxError."""
    tree = parse(gold)
    alphabet = _alphabet((tree,))
    k, rng = alphabet.size, random.Random(f"{seed}:{gold}")
    members = {leaf: sorted(symbols) for leaf, symbols in alphabet.members.items()}
    out = []
    for i in range(n):
        if i % 4 == 3:
            word = [rng.randrange(k) for _ in range(rng.randint(0, 12))]
        else:
            word = list(_generate(tree, members, rng, k, MAX_TEST_STRING))
            if i % 4 == 2:
                at = rng.randint(0, len(word))
                word[at:at + rng.randint(0, 1)] = [rng.randrange(k)] * rng.randint(0, 1)
        out.append(alphabet.text(tuple(word[:MAX_TEST_STRING])))
    return tuple(out)


def accepts(regex: str, strings: Sequence[str]) -> list[bool]:
    """Whether the whole of each string is in the language of `regex` (dk.brics semantics, as in
    `regex_dfa`); raises RegexSyntaxError."""
    tree = parse(regex)
    leaves = _leaf_sets(tree, set())
    used = {ord(c) for text in strings for c in text}
    # Each character is its own symbol; a leaf holds the characters of the strings inside its ranges.
    members = {leaf: frozenset(o for o in used if any(lo <= o <= hi for lo, hi in leaf)) for leaf in leaves}
    return [len(text) in _ends(tree, tuple(ord(c) for c in text), 0, members, {}) for text in strings]


def string_agreement(prediction: str, gold: str) -> float:
    """Share of `test_strings(gold)` on which the prediction and the gold agree; 0 if either is invalid or
    the prediction is empty (no answer, though "" parses as the empty-string language)."""
    if not prediction.strip():
        return 0.0
    try:
        strings = test_strings(gold)
        agree = sum(a == b for a, b in zip(accepts(prediction, strings), accepts(gold, strings)))
    except (RegexSyntaxError, RecursionError):
        return 0.0
    return agree / len(strings)


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
        agreement = 1.0 if exact else string_agreement(prediction, example.answer)
        return {"exact_match": float(exact), "functional_equivalence": float(same_language),
                "string_match": float(agreement == 1.0), "string_agreement": agreement}
