"""CLI layer: the reference pages of the documentation, rendered from the code so they cannot drift.

- `commands_markdown()`: every `raydllm` subcommand's `--help`, from the same argparse parser the command uses;
- `config_markdown()`: every config key (`section.key`, as `--set` and MLflow params spell it) with its type,
  default and the comment the typed config (`raydllm/core/config.py`) gives it;
- `space_markdown()`: the search-space YAML schema, from `SweepSpec` (`raydllm/sweep/search_space.py`).

`docs/hooks.py` calls these at `mkdocs build` time; `tests/test_reference.py` compares them with the code.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import os
import textwrap
import typing
from typing import Any, Iterator

from pydantic import BaseModel

HELP_COLUMNS = 100  # argparse wraps to $COLUMNS: one fixed width, so the page and `--help` agree


@contextlib.contextmanager
def help_width(columns: int = HELP_COLUMNS) -> Iterator[None]:
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(columns)
    try:
        yield
    finally:
        os.environ.pop("COLUMNS", None) if saved is None else os.environ.__setitem__("COLUMNS", saved)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """name -> sub-parser, in the order `raydllm --help` lists them."""
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_help(name: str | None = None) -> str:
    """What `raydllm [name] --help` prints at HELP_COLUMNS columns."""
    from raydllm.cli.app import build_parser

    with help_width():
        parser = build_parser()
        return (subcommands(parser)[name] if name else parser).format_help()


def commands_markdown() -> str:
    from raydllm.cli.app import build_parser

    with help_width():
        parser = build_parser()
        parts = ["# Command reference", "",
                 "Generated from the `raydllm` command's own argparse definitions at build time: each block is "
                 "exactly what `raydllm <command> --help` prints.", "", "## raydllm", "", "```text",
                 parser.format_help().rstrip(), "```", ""]
        for name, sub in subcommands(parser).items():
            parts += [f"## raydllm {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def _field_comments(cls: type) -> dict[str, str]:
    """field name -> the comment written beside it (trailing) or on the lines right above it, in `cls`'s source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        line = lines[node.end_lineno - 1]
        trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
        comments[node.target.id] = " ".join(filter(None, above + [trailing]))
    return comments


def _type_name(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def model_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, comment) for every field of `model`, sub-models flattened into dotted keys."""
    rows = []
    comments = {}
    for cls in reversed(model.__mro__):
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls is not BaseModel:
            comments.update(_field_comments(cls))
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        annotation = field.annotation
        inner = [a for a in typing.get_args(annotation) if _is_model(a)] if not _is_model(annotation) else [annotation]
        if inner and len(inner) == 1 and _is_model(annotation):
            doc = inspect.getdoc(annotation) if annotation.__doc__ else ""
            if doc and not prefix:
                rows.append((key, "section", "", " ".join(doc.split())))
            rows += model_rows(annotation, key + ".")
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append((key, _type_name(annotation), default, comments.get(name, "")))
    return rows


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    out = ["| key | type | default | what it is |", "|---|---|---|---|"]
    for key, kind, default, comment in rows:
        cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731 - one table cell
        out.append(f"| `{cell(key)}` | `{cell(kind)}` | `{cell(default)}` | {cell(comment)} |")
    return out


def config_markdown() -> str:
    from raydllm.core.config import Config

    return "\n".join(["# Config keys", "",
                      "Generated from the typed config (`raydllm/core/config.py`) at build time. Every key can be "
                      "set with `--set key=value`, in a preset, or in a search space's `fixed:` and `space:`; "
                      "presets (`raydllm/configs/*.yaml`) change the defaults shown here.", "",
                      *_table(model_rows(Config)), ""])


def _referenced_models(model: type[BaseModel]) -> list[type[BaseModel]]:
    """The models a field of `model` may hold inside a union, list or dict (a space's `baseline:`, a `space:`
    entry), each once, in field order."""
    found: list[type[BaseModel]] = []

    def walk(annotation):
        for arg in typing.get_args(annotation):
            if _is_model(arg) and arg not in found:
                found.append(arg)
            walk(arg)

    for field in model.model_fields.values():
        if not _is_model(field.annotation):
            walk(field.annotation)
    return found


def space_markdown() -> str:
    from raydllm.sweep.search_space import SweepSpec

    parts = ["# Search-space schema", "",
             "Generated from `SweepSpec` (`raydllm/sweep/search_space.py`) at build time: the keys a search-space "
             "YAML file (`search_spaces/<task>.yaml`) may have. Unknown keys are refused at the door, in one line "
             "naming the file and the key.", "", *_table(model_rows(SweepSpec)), ""]
    for sub in _referenced_models(SweepSpec):
        doc = " ".join((inspect.getdoc(sub) or "").split()) if sub.__doc__ else ""
        parts += [f"## `{sub.__name__}`", "", *([doc, ""] if doc else []), *_table(model_rows(sub)), ""]
    return "\n".join(parts)


PAGES = {"reference/commands.md": commands_markdown, "reference/config.md": config_markdown,
         "reference/space.md": space_markdown}


def modules_markdown() -> str:
    """Every module of the package, folder by folder (lowest layer first), with its docstring's first sentence."""
    import raydllm

    root = inspect.getfile(raydllm).rsplit("/", 1)[0]
    from pathlib import Path

    layers = ["core", "data", "engine", "evaluation", "sweep", "bench", "cli"]
    parts = ["# Modules", "", "Generated from the package at build time: its folders are its layers, lowest first; "
             "a module imports only its own folder and the folders listed before it (`tests/test_layers.py`).", ""]
    for layer in layers:
        parts += [f"## `raydllm/{layer}`", "", "| module | what it is |", "|---|---|"]
        for path in sorted(Path(root, layer).rglob("*.py")):
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            first = " ".join(doc.split("\n\n")[0].split())
            first = first.split(":", 1)[1].strip() if first.lower().startswith(f"{layer} layer:") else first
            parts.append(f"| `{path.relative_to(root)}` | {first.replace('|', chr(92) + '|')} |")
        parts.append("")
    return "\n".join(parts)


PAGES["reference/modules.md"] = modules_markdown
