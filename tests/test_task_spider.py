"""SpiderTask on a tiny Spider-layout folder built in tmp_path (the hub copy is not reachable)."""
import json
import sqlite3
import time

import pytest

from raydllm.data.tasks.base import DataError, Example
from raydllm.data.tasks.spider import SpiderTask, first_statement, run_query

QUESTIONS = [("How many singers are there?", "SELECT count(*) FROM singer"),
             ("List the names of all singers.", "SELECT name FROM singer"),
             ("Names of singers, oldest first.", "SELECT name FROM singer ORDER BY age DESC"),
             ("Show name and age of singers from France.", "SELECT name, age FROM singer WHERE country = 'France'"),
             ("What is the average age?", "SELECT avg(age) FROM singer")]


@pytest.fixture()
def spider(tmp_path):
    db_dir = tmp_path / "database" / "concert"
    db_dir.mkdir(parents=True)
    db = sqlite3.connect(db_dir / "concert.sqlite")
    db.execute("CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT, age INTEGER)")
    db.executemany("INSERT INTO singer VALUES (?, ?, ?, ?)",
                   [(1, "Joe", "France", 52), (2, "Ana", "Spain", 29), (3, "Lea", "France", 41), (4, "Bo", "Chile", 35)])
    db.commit()
    db.close()
    train = [{"question": q, "query": s, "db_id": "concert", "extra": 1} for q, s in QUESTIONS * 4]
    (tmp_path / "train_spider.json").write_text(json.dumps(train))
    (tmp_path / "dev.json").write_text(json.dumps([{"question": q, "query": s, "db_id": "concert"} for q, s in QUESTIONS]))
    return tmp_path


def example(spider, query: str) -> Example:
    return Example("question", query, {"db_id": "concert",
                                       "db_path": str(spider / "database" / "concert" / "concert.sqlite")})


def execution(spider, prediction: str, gold: str, **kwargs) -> float:
    return SpiderTask(**kwargs).score(prediction, example(spider, gold))["execution_match"]


def test_loader_on_spider_layout(spider):
    task = SpiderTask()
    train, validation = task.load("train", str(spider)), task.load("validation", str(spider))
    test = task.load("test", str(spider))
    assert len(train) + len(validation) == 20 and len(validation) == 1 and len(test) == 5
    assert test[0].prompt == QUESTIONS[0][0] and test[0].answer == QUESTIONS[0][1]
    assert test[0].meta["db_id"] == "concert" and test[0].meta["db_path"].endswith("concert/concert.sqlite")
    assert task.load("test", str(spider), limit=2) == test[:2]
    with pytest.raises(DataError, match="path"):
        task.load("test")
    (spider / "dev.json").write_text(json.dumps([{"question": "q", "db_id": "concert"}]))
    with pytest.raises(DataError, match="query"):
        task.load("test", str(spider))
    (spider / "dev.json").write_text(json.dumps([{"question": "q", "query": "SELECT 1", "db_id": "nope"}]))
    with pytest.raises(DataError, match="nope.sqlite"):
        task.load("test", str(spider))
    (spider / "dev.json").unlink()
    with pytest.raises(DataError, match="dev.json"):
        task.load("test", str(spider))


def test_prompt_has_schema_and_question(spider):
    task = SpiderTask()
    test = task.load("test", str(spider))
    prompt = task.format_prompt(test[1], [test[0]])
    assert prompt.count("CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT, age INTEGER);") == 2
    assert f"Question: {test[0].prompt}\nSQL: {test[0].answer}\n\n" in prompt
    assert prompt.endswith(f"Question: {test[1].prompt}\nSQL:")
    assert task.extract(" SQL: SELECT name FROM singer; DROP TABLE singer\nQuestion: x") == "SELECT name FROM singer"


def test_same_rows_in_another_order_or_alias_match(spider):
    gold = "SELECT name, age FROM singer WHERE country = 'France'"
    assert execution(spider, "SELECT name AS n, age AS years FROM singer WHERE country = 'France' ORDER BY age", gold) == 1.0
    assert execution(spider, "select T.name, T.age from singer as T where T.age in (52, 41)", gold) == 1.0
    assert execution(spider, "SELECT count(*) FROM singer WHERE age > 0", "SELECT count(*) FROM singer") == 1.0


def test_order_matters_only_when_gold_orders(spider):
    gold = "SELECT name FROM singer ORDER BY age DESC"
    assert execution(spider, "SELECT name FROM singer ORDER BY age DESC", gold) == 1.0
    assert execution(spider, "SELECT name FROM singer ORDER BY age ASC", gold) == 0.0
    assert execution(spider, "SELECT name FROM singer ORDER BY age ASC", "SELECT name FROM singer") == 1.0


def test_different_results_do_not_match(spider):
    gold = "SELECT name FROM singer WHERE country = 'France'"
    assert execution(spider, "SELECT name FROM singer WHERE country = 'Spain'", gold) == 0.0
    assert execution(spider, "SELECT name FROM singer", gold) == 0.0
    assert execution(spider, "SELECT name, age FROM singer WHERE country = 'France'", gold) == 0.0  # extra column
    # multisets: a duplicated row is a different result
    assert execution(spider, "SELECT name FROM singer WHERE country = 'France' UNION ALL SELECT 'Joe'", gold) == 0.0


@pytest.mark.parametrize("broken", ["SELEC name FROM singer", "SELECT nope FROM singer", "", "   ;",
                                    "DROP TABLE singer", "ATTACH DATABASE 'x.db' AS x", "PRAGMA table_info(singer)"])
def test_broken_or_writing_query_scores_zero(spider, broken, monkeypatch):
    monkeypatch.chdir(spider)  # where ATTACH would create x.db
    gold = "SELECT name FROM singer"
    assert SpiderTask().score(broken, example(spider, gold)) == {"normalized_string_match": 0.0, "execution_match": 0.0}
    assert execution(spider, gold, gold) == 1.0  # and the table is still there
    assert not (spider / "x.db").exists()


def test_timeout_aborts_long_query(spider):
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    start = time.monotonic()
    assert execution(spider, endless, "SELECT count(*) FROM singer", timeout_ms=200) == 0.0
    assert time.monotonic() - start < 3


def test_semicolon_truncation_and_normalized_string_match(spider):
    gold = "SELECT name FROM singer WHERE country = 'France'"
    scores = SpiderTask().score("select  name from singer where country = 'France' ; DELETE FROM singer",
                                example(spider, gold))
    assert scores == {"normalized_string_match": 0.0, "execution_match": 1.0}
    same = SpiderTask().score("select name  FROM singer where country = 'france';", example(spider, gold))
    assert same["normalized_string_match"] == 1.0
    assert first_statement("SELECT 'a;b' FROM t; SELECT 2") == "SELECT 'a;b' FROM t"
    assert first_statement("SELECT 1") == "SELECT 1"
    rows = run_query(example(spider, gold).meta["db_path"], "SELECT name FROM singer WHERE name = 'x;y'; junk", 1000)
    assert rows == []


def test_string_match_is_not_exact_set_match(spider):
    """Reordered conjuncts are the same query to Spider's exact-set match and to execution, not to a string match."""
    gold = "SELECT name FROM singer WHERE country = 'France' AND age > 20"
    scores = SpiderTask().score("SELECT name FROM singer WHERE age > 20 AND country = 'France'", example(spider, gold))
    assert scores == {"normalized_string_match": 0.0, "execution_match": 1.0}
