"""Data layer: users' own data: (prompt, answer) rows from jsonl / parquet, or plain text for unpaired fine-tuning.

* .jsonl / .json / .parquet: read with `datasets.load_dataset`; `prompt_field` and `answer_field` name the
  columns (default "prompt" / "answer"); `prompt_field=None` gives every row an empty prompt.
* .txt: every non-empty line (txt_unit="line") or every blank-line-separated paragraph
  (txt_unit="paragraph") is one Example with an empty prompt and the text as answer; the method needs no
  paired data.

validation is carved from `path` with a seeded shuffle; test reads `test_path`, which must then be given.
Prompts are used as written (put any template into the data); a few-shot block is a shot's prompt
followed directly by its answer, as the model is trained on them. Metric: exact_match, the generation
equals the answer after collapsing whitespace runs and stripping the ends.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from raydllm.data.tasks.base import DataError, Example, carve_validation, check_split, read_json_lines

TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TXT_UNITS = ("line", "paragraph")


def _collapse(text: str) -> str:
    return " ".join(text.split())


class TextTask:
    name = "text"  # an instance may be renamed (constructor `name`) to register several data sets
    primary_metric = "exact_match"

    def __init__(self, path: str | None = None, prompt_field: str | None = "prompt",
                 answer_field: str = "answer", *, test_path: str | None = None, txt_unit: str = "line",
                 name: str = "text"):
        if txt_unit not in TXT_UNITS:
            raise DataError(f"text: txt_unit must be one of {', '.join(TXT_UNITS)}; got {txt_unit!r}")
        self.path, self.test_path = path, test_path
        self.prompt_field, self.answer_field, self.txt_unit = prompt_field, answer_field, txt_unit
        self.name = name

    def load(self, split: str, path: str | None = None, *, seed: int = 0,
             val_fraction: float = 0.05, limit: int | None = None) -> list[Example]:
        """`path` (else the constructor's) holds train + validation; test comes from test_path."""
        check_split(split)
        if split == "test":
            if self.test_path is None:
                raise DataError("text: no test file configured (pass test_path to use the test split)")
            examples = self._read(Path(self.test_path))
        else:
            source = path or self.path
            if source is None:
                raise DataError("text: no data file given (pass path: a .jsonl, .parquet or .txt file)")
            examples = carve_validation(self._read(Path(source)), split, seed=seed, val_fraction=val_fraction)
        return examples[:limit] if limit is not None else examples

    def _read(self, file: Path) -> list[Example]:
        if not file.is_file():
            raise DataError(f"text: missing data file {file}")
        suffix = file.suffix.lower()
        if suffix == ".txt":
            examples = self._read_txt(file)
        elif suffix in TABLE_FORMATS:
            examples = self._read_table(file, TABLE_FORMATS[suffix])
        else:
            raise DataError(f"text: {file} should end in .jsonl, .json, .parquet or .txt")
        if not examples:
            raise DataError(f"text: {file} holds no examples")
        return examples

    def _read_txt(self, file: Path) -> list[Example]:
        text = file.read_text(encoding="utf-8")
        if self.txt_unit == "line":
            pieces = text.splitlines()
        else:  # paragraphs: runs of lines between blank lines, their line breaks kept
            pieces, current = [], []
            for line in text.splitlines() + [""]:
                if line.strip():
                    current.append(line.strip())
                elif current:
                    pieces.append("\n".join(current))
                    current = []
        return [Example(prompt="", answer=piece.strip()) for piece in pieces if piece.strip()]

    def _read_table(self, file: Path, builder: str) -> list[Example]:
        wanted = [f for f in (self.prompt_field, self.answer_field) if f is not None]
        if file.suffix.lower() == ".jsonl":  # read here: a broken line or a missing field is named by its line
            return [Example(prompt=str(row[self.prompt_field]) if self.prompt_field is not None else "",
                            answer=str(row[self.answer_field])) for row in read_json_lines(file, wanted)]
        import datasets  # heavy import, only needed for table files

        try:
            table = datasets.load_dataset(builder, data_files=str(file), split="train")
        except Exception as error:  # datasets raises many types for unreadable files
            raise DataError(f"text: cannot read {file} as {builder}: {error}") from error
        missing = [f for f in wanted if f not in table.column_names]
        if missing:
            raise DataError(f"text: {file} has no field(s) {', '.join(map(repr, missing))}; "
                            f"its fields are {', '.join(map(repr, table.column_names))}")
        prompts = table[self.prompt_field] if self.prompt_field is not None else [""] * len(table)
        examples = []
        for i, (prompt, answer) in enumerate(zip(prompts, table[self.answer_field])):
            for field, value in ((self.prompt_field, prompt), (self.answer_field, answer)):
                if value is None:
                    raise DataError(f"text: row {i} of {file} has no value for field {field!r}")
            examples.append(Example(prompt=str(prompt), answer=str(answer)))
        return examples

    def format_prompt(self, example: Example, shots: Sequence[Example] = ()) -> str:
        return "\n\n".join([*(shot.prompt + shot.answer for shot in shots), example.prompt])

    def extract(self, generation: str) -> str:
        return generation.strip()

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        return {"exact_match": float(_collapse(prediction) == _collapse(example.answer))}
