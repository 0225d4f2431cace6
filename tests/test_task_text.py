"""TextTask on users' own files: jsonl, parquet (written with pyarrow) and plain text, in tmp_path."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydllm.data.tasks.base import DataError, Example
from raydllm.data.tasks.text import TextTask

ROWS = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(40)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_with_custom_fields_and_carved_validation(tmp_path):
    file = write_jsonl(tmp_path / "data.jsonl", ROWS)
    task = TextTask(str(file), prompt_field="q", answer_field="a")
    train = task.load("train", seed=3, val_fraction=0.1)
    validation = task.load("validation", seed=3, val_fraction=0.1)
    assert len(validation) == 4 and len(train) == 36
    assert {e.prompt for e in train} | {e.prompt for e in validation} == {r["q"] for r in ROWS}
    assert not {e.prompt for e in train} & {e.prompt for e in validation}
    assert task.load("validation", seed=3, val_fraction=0.1) == validation  # same seed, same split
    assert Example("question 0", "answer 0") in train + validation
    assert task.load("train", seed=3, val_fraction=0.1, limit=5) == train[:5]


def test_parquet_default_fields_and_test_path(tmp_path):
    table = pa.table({"prompt": [r["q"] for r in ROWS], "answer": [r["a"] for r in ROWS], "extra": list(range(40))})
    pq.write_table(table, tmp_path / "train.parquet")
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "p", "answer": "a"}])
    task = TextTask(str(tmp_path / "train.parquet"), test_path=str(tmp_path / "test.jsonl"))
    assert len(task.load("train")) + len(task.load("validation")) == 40
    assert task.load("test") == [Example("p", "a")]
    with pytest.raises(DataError, match="test_path"):
        TextTask(str(tmp_path / "train.parquet")).load("test")


def test_txt_lines_and_paragraphs(tmp_path):
    file = tmp_path / "corpus.txt"
    file.write_text("first line\n\n  second line \nthird\n\n\nfourth\n", encoding="utf-8")
    lines = TextTask(str(file)).load("train", val_fraction=0.25) + TextTask(str(file)).load("validation", val_fraction=0.25)
    assert sorted(e.answer for e in lines) == ["first line", "fourth", "second line", "third"]
    assert all(e.prompt == "" for e in lines)
    task = TextTask(str(file), txt_unit="paragraph")
    paragraphs = task.load("train", val_fraction=0.34) + task.load("validation", val_fraction=0.34)
    assert sorted(e.answer for e in paragraphs) == ["first line", "fourth", "second line\nthird"]


def test_errors_name_the_file_and_field(tmp_path):
    file = write_jsonl(tmp_path / "data.jsonl", ROWS)
    with pytest.raises(DataError, match=r"data\.jsonl.*'prompt'.*'q'"):
        TextTask(str(file)).load("train")
    with pytest.raises(DataError, match="missing data file .*nope.jsonl"):
        TextTask(str(tmp_path / "nope.jsonl")).load("train")
    with pytest.raises(DataError, match=r"gap\.jsonl: line 2: no 'a' field"):
        TextTask(str(write_jsonl(tmp_path / "gap.jsonl", [ROWS[0], {"q": "x", "a": None}])), "q", "a").load("train")
    with pytest.raises(DataError, match="no data file"):
        TextTask().load("train")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="data.csv"):
        TextTask(str(tmp_path / "data.csv")).load("train")


def test_prompt_only_answers_and_exact_match(tmp_path):
    file = write_jsonl(tmp_path / "answers.jsonl", [{"text": f"t{i}"} for i in range(10)])
    task = TextTask(str(file), prompt_field=None, answer_field="text")
    assert all(e.prompt == "" for e in task.load("train"))
    example, shot = Example("Q: 2+2?\nA:", " 4"), Example("Q: 1+1?\nA:", " 2")
    assert task.format_prompt(example, [shot]) == "Q: 1+1?\nA: 2\n\nQ: 2+2?\nA:"
    assert task.score(task.extract("  4 \n"), example) == {"exact_match": 1.0}
    assert task.score("5", example) == {"exact_match": 0.0}
