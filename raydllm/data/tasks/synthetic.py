"""Data layer: generated GSM8K-format word problems for the offline default. This is NOT GSM8K.

Short one- and two-step arithmetic stories with answers in GSM8K's format (worked line, then `#### n`),
generated from a seed, so the embedded model can be fine-tuned and evaluated with no download. Rows are
`{"question", "answer"}` like GSM8K's, so the GSM8K task's prompt format and metric apply unchanged.

The four uses are disjoint by question text (`split_problems`): the embedded base's pretraining problems (the
stream `PRETRAIN_PROBLEM_SEED + base seed`, unchanged, so the shipped base asset stays valid), fine-tuning train
and the validation carved from it (selection), and test. Train/validation/test are drawn from their own seeds
with every question already taken skipped, so a question appears once across all of them.
"""
from __future__ import annotations

import random
from functools import lru_cache

NAMES = ["Tom", "Ana", "Ben", "Mia", "Sam", "Lea", "Max", "Zoe", "Leo", "Ivy"]
ITEMS = ["apples", "pens", "books", "cards", "eggs", "coins", "shells", "cups"]


def _problem(rng: random.Random) -> dict[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    kind = rng.choice(["add", "sub", "mul", "two"])
    if kind == "add":
        q = f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have?"
        work, n = f"{a} + {b} = {a + b}", a + b
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        work, n = f"{a} - {b} = {a - b}", a - b
    elif kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{name} buys {a} bags with {b} {item} each. How many {item} is that?"
        work, n = f"{a} * {b} = {a * b}", a * b
    else:
        c = rng.randint(1, min(a + b - 1, 9))
        q = f"{name} has {a} {item}, finds {b} more, then loses {c}. How many {item} now?"
        work, n = f"{a} + {b} - {c} = {a + b - c}", a + b - c
    return {"question": q, "answer": f"{work}\n#### {n}"}


def gsm8k_format_problems(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [_problem(rng) for _ in range(n)]


# The base's pretraining problems (engine/pretrain.py reads these constants): the first
# max(1000, min(PRETRAIN_PROBLEMS_MAX, steps * batch)) problems of this stream, so its first
# PRETRAIN_PROBLEMS_MAX cover every pretraining length.
PRETRAIN_PROBLEM_SEED = 7_000_003
PRETRAIN_PROBLEMS_MAX = 20_000
TEST_SEED_OFFSET = 10_007


@lru_cache(maxsize=4)
def pretraining_questions(base_seed: int = 0) -> frozenset[str]:
    """Every question the base pretrained with `base_seed` can have seen (the shipped base: seed 0)."""
    rows = gsm8k_format_problems(PRETRAIN_PROBLEMS_MAX, seed=PRETRAIN_PROBLEM_SEED + base_seed)
    return frozenset(r["question"] for r in rows)


def unique_problems(n: int, seed: int, exclude: frozenset[str] | set[str]) -> list[dict[str, str]]:
    """n problems from `seed`'s stream with distinct questions, none in `exclude` (skipped, not replaced)."""
    rng, taken, rows = random.Random(seed), set(exclude), []
    for _ in range(200 * n + 1000):
        if len(rows) == n:
            return rows
        row = _problem(rng)
        if row["question"] not in taken:
            taken.add(row["question"])
            rows.append(row)
    if len(rows) == n:
        return rows
    raise ValueError(f"data.synthetic_size: only {len(rows)} distinct generated problems outside the excluded "
                     f"ones, asked for {n}")


@lru_cache(maxsize=8)
def _split_pools(size: int, split_seed: int, base_seed: int) -> tuple[tuple, tuple]:
    pretrain = pretraining_questions(base_seed)
    train = unique_problems(size, split_seed, pretrain)
    test = unique_problems(max(size // 10, 50), split_seed + TEST_SEED_OFFSET,
                           pretrain | {r["question"] for r in train})
    return tuple(train), tuple(test)


def split_problems(split: str, size: int, split_seed: int, base_seed: int = 0) -> list[dict[str, str]]:
    """The generated problems of `split`: "train" is the fine-tuning pool (validation is carved from it by the
    caller), "test" its own; no question of either is a pretraining question or in the other."""
    train, test = _split_pools(size, split_seed, base_seed)
    if split == "test":
        return [dict(r) for r in test]
    if split == "train":
        return [dict(r) for r in train]
    raise ValueError(f"split_problems: split must be train or test, got {split!r}")
