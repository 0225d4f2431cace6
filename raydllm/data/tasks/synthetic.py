"""Data layer: generated GSM8K-format word problems for the offline default. This is NOT GSM8K.

Short one- and two-step arithmetic stories with answers in GSM8K's format (worked line, then `#### n`),
generated from a seed, so the embedded model can be fine-tuned and evaluated with no download. Rows are
`{"question", "answer"}` like GSM8K's, so the GSM8K task's prompt format and metric apply unchanged.
"""
from __future__ import annotations

import random

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
