"""Django task: fixed file-order splits on the real files in ../shared/data, prompt, prefix/exact match."""
from pathlib import Path

import pytest

from raydllm.data.tasks.base import DataError, Example
from raydllm.data.tasks.django import DjangoTask, normalize

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "django"


@pytest.fixture(scope="module")
def data() -> Path:
    if not (DATA / "all.code").is_file():
        pytest.skip(f"Django data set not found at {DATA}")
    return DATA


def test_splits_follow_file_order(data):
    task = DjangoTask()
    splits = {split: task.load(split, str(data)) for split in ("train", "validation", "test")}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [16000, 1000, 1805]
    annotations = (data / "all.anno").read_text(encoding="utf-8").splitlines()
    code = (data / "all.code").read_text(encoding="utf-8").splitlines()
    for split, offset in (("train", 0), ("validation", 16000), ("test", 17000)):
        for i in (0, len(splits[split]) - 1):
            assert splits[split][i] == Example(normalize(annotations[offset + i]), normalize(code[offset + i]))
    assert all(e.answer == e.answer.strip() and "  " not in e.answer for e in splits["test"])
    assert task.load("test", str(data), limit=5) == splits["test"][:5]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DataError, match="all.anno"):
        DjangoTask().load("train", str(tmp_path))
    with pytest.raises(DataError, match="path"):
        DjangoTask().load("train")


def test_prompt_and_extract(data):
    task = DjangoTask()
    shots = task.load("train", str(data), limit=2)
    example = task.load("test", str(data), limit=1)[0]
    prompt = task.format_prompt(example, shots)
    assert prompt.startswith(f"Write the Python line for: {shots[0].prompt}\nCode: {shots[0].answer}\n\n")
    assert prompt.endswith(f"Write the Python line for: {example.prompt}\nCode:")
    assert task.extract(f"\n  {example.answer}  \nWrite the Python line for: more") == example.answer
    assert task.extract("Code: x  =  1") == "x = 1"


def test_exact_and_prefix_match(data):
    task = DjangoTask()
    example = task.load("test", str(data), limit=1)[0]
    gold = example.answer
    assert task.score(gold, example) == {"exact_match": 1.0, "prefix_match": 1.0}
    assert task.score("  " + gold.replace(" ", "   ") + " ", example) == {"exact_match": 1.0, "prefix_match": 1.0}
    assert task.score(gold + " ) junk", example) == {"exact_match": 0.0, "prefix_match": 1.0}
    assert task.score(gold[:-1], example) == {"exact_match": 0.0, "prefix_match": 0.0}  # truncated
    assert task.score("", example) == {"exact_match": 0.0, "prefix_match": 0.0}
    assert task.score("x" + gold, example)["prefix_match"] == 0.0
    # the metric scores what extract() returns: a gold line followed by the next exemplar still counts
    assert task.score(task.extract(gold + "\nWrite the Python line for: x"), example)["prefix_match"] == 1.0
