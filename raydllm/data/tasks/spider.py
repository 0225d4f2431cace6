"""Data layer: Spider text-to-SQL: question + database schema -> one SQLite query.

Data: Spider's release layout under `path`: train_spider.json and dev.json (lists of objects with
`question`, `query`, `db_id`) and database/<db_id>/<db_id>.sqlite. The hub copy is not reachable from
here, so `path` is required. validation is carved from train_spider.json (seeded); test is dev.json, the
public evaluation split. Example.meta holds `db_id` and `db_path`.

Metrics:
* normalized_string_match: the query strings are equal after lowercasing, collapsing whitespace and dropping a
  trailing ";". This is NOT Spider's exact-set match (which compares parsed clauses as sets, so `a = 1 AND
  b = 2` matches `b = 2 AND a = 1`); a string match is stricter and cheaper, a rough secondary figure;
* execution_match (primary): the prediction, cut after its first statement, and the gold query are run on
  the database opened read-only; they match when they return the same rows: as multisets, or as lists
  when the gold query has ORDER BY. Only values are compared, so column names and aliases never matter
  (column order does). Each query is aborted after `timeout_ms`; a query that fails, times out or is
  empty scores 0, and nothing raises.
"""
from __future__ import annotations

import json
import re
import sqlite3
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from raydllm.data.tasks.base import DataError, Example, carve_validation, check_split, first_answer_line

ANSWER_CUE = "SQL:"
ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)


class QueryError(Exception):
    """A query failed, timed out or was empty."""


def first_statement(sql: str) -> str:
    """sql up to its first statement-ending semicolon (one inside a string literal or comment does not
    count), without the semicolon; sqlite3 runs only one statement anyway."""
    for match in re.finditer(";", sql):
        if sqlite3.complete_statement(sql[:match.end()]):
            return sql[:match.start()].strip()
    return sql.strip()


def normalize_sql(sql: str) -> str:
    return " ".join(sql.split()).lower().rstrip(";").rstrip()


def _connect(db_path: str) -> sqlite3.Connection:
    return sqlite3.connect(f"{Path(db_path).resolve().as_uri()}?mode=ro", uri=True)


# What a scored query may do: read. Anything else (ATTACH, which could create a file; PRAGMA; temp tables)
# is refused by the authorizer, on top of opening the database read-only.
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                    getattr(sqlite3, "SQLITE_RECURSIVE", 33)}


def _authorize(action: int, *_: Any) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def run_query(db_path: str, sql: str, timeout_ms: int) -> list[tuple]:
    """Rows of one read-only query; raises QueryError on any failure or after timeout_ms."""
    sql = first_statement(sql)
    if not sql:
        raise QueryError("empty query")
    deadline = time.monotonic() + timeout_ms / 1000
    try:
        connection = _connect(db_path)
    except sqlite3.Error as error:
        raise QueryError(f"cannot open {db_path}: {error}") from error
    try:
        # sqlite calls this every 1000 VM instructions; a true return aborts the statement (OperationalError)
        connection.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
        connection.set_authorizer(_authorize)
        return connection.execute(sql).fetchall()
    except (sqlite3.Error, ValueError, OverflowError, MemoryError) as error:
        raise QueryError(str(error)) from error
    finally:
        connection.close()


@lru_cache(maxsize=4096)
def _gold_rows(db_path: str, sql: str, timeout_ms: int) -> list[tuple] | None:
    try:
        return run_query(db_path, sql, timeout_ms)
    except QueryError:
        return None


def same_results(gold: list[tuple], predicted: list[tuple], ordered: bool) -> bool:
    if ordered:
        return gold == predicted
    return Counter(gold) == Counter(predicted)


@lru_cache(maxsize=256)
def schema(db_path: str) -> str:
    """The CREATE TABLE statements of the database, one per line, whitespace collapsed."""
    connection = _connect(db_path)
    try:
        rows = connection.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND sql IS NOT NULL "
            "AND name NOT LIKE 'sqlite_%' ORDER BY rowid").fetchall()
    finally:
        connection.close()
    return "\n".join(" ".join(sql.split()) + ";" for (sql,) in rows)


class SpiderTask:
    name = "spider"
    primary_metric = "execution_match"

    def __init__(self, timeout_ms: int = 5000):
        self.timeout_ms = timeout_ms

    def load(self, split: str, path: str | None = None, *, seed: int = 0,
             val_fraction: float = 0.05, limit: int | None = None) -> list[Example]:
        check_split(split)
        if path is None:
            raise DataError("spider: the hub copy is not reachable; pass the Spider folder (train_spider.json, "
                            "dev.json, database/) as path")
        root = Path(path)
        source = root / ("dev.json" if split == "test" else "train_spider.json")
        examples = self._read(source, root / "database")
        if split != "test":
            examples = carve_validation(examples, split, seed=seed, val_fraction=val_fraction)
        return examples[:limit] if limit is not None else examples

    def _read(self, source: Path, databases: Path) -> list[Example]:
        if not source.is_file():
            raise DataError(f"spider: missing data file {source}")
        try:
            rows: list[dict[str, Any]] = json.loads(source.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"spider: {source} is not valid JSON: {error}") from error
        if not isinstance(rows, list):
            raise DataError(f"spider: {source} should hold a JSON list of examples")
        examples = []
        for i, row in enumerate(rows):
            missing = [f for f in ("question", "query", "db_id") if not isinstance(row, dict) or f not in row]
            if missing:
                raise DataError(f"spider: row {i} of {source} lacks field(s) {', '.join(missing)}")
            db_path = databases / row["db_id"] / f"{row['db_id']}.sqlite"
            if not db_path.is_file():
                raise DataError(f"spider: missing database file {db_path} (row {i} of {source})")
            examples.append(Example(prompt=" ".join(row["question"].split()), answer=" ".join(row["query"].split()),
                                    meta={"db_id": row["db_id"], "db_path": str(db_path)}))
        return examples

    def format_prompt(self, example: Example, shots: Sequence[Example] = ()) -> str:
        """Each exemplar and the open question come with the schema of their own database."""
        def block(ex: Example, answer: str) -> str:
            return f"Database schema:\n{schema(ex.meta['db_path'])}\nQuestion: {ex.prompt}\n{ANSWER_CUE}{answer}"
        return "\n\n".join([*(block(shot, " " + shot.answer) for shot in shots), block(example, "")])

    def extract(self, generation: str) -> str:
        """The first non-empty line (a repeated "SQL:" cue dropped), cut after its first statement."""
        line = first_answer_line(generation, ANSWER_CUE)
        return first_statement(line) if line else ""

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        same_string = normalize_sql(prediction) == normalize_sql(example.answer)
        db_path = example.meta["db_path"]
        gold = _gold_rows(db_path, example.answer, self.timeout_ms)
        try:
            predicted = run_query(db_path, prediction, self.timeout_ms)
        except QueryError:
            predicted = None
        executes_same = (gold is not None and predicted is not None
                         and same_results(gold, predicted, ordered=bool(ORDER_BY.search(example.answer))))
        return {"normalized_string_match": float(same_string), "execution_match": float(executes_same)}
