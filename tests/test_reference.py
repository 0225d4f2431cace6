"""The documentation's reference pages are rendered from the code: they say what the code says."""
import os
import subprocess
import sys

import pytest

from raydllm.cli.app import build_parser
from raydllm.cli.reference import (HELP_COLUMNS, command_help, commands_markdown, config_markdown, model_rows,
                                   space_markdown, subcommands)
from raydllm.core.config import Config
from raydllm.sweep.search_space import SweepSpec

COMMANDS = sorted(subcommands(build_parser()))


def test_every_command_is_in_the_reference():
    assert COMMANDS == ["bench", "best", "detect", "eval", "pretrain", "report", "train", "tune"]


@pytest.mark.parametrize("name", COMMANDS)
def test_the_reference_holds_exactly_what_help_prints(name):
    printed = subprocess.run([sys.executable, "-m", "raydllm.cli", name, "--help"], capture_output=True, text=True,
                             env={**os.environ, "COLUMNS": str(HELP_COLUMNS)}, check=True).stdout
    assert printed == command_help(name)
    assert f"```text\n{printed.rstrip()}\n```" in commands_markdown()


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_help_says_what_it_does_with_an_example(name):
    text = command_help(name)
    usage, _, rest = text.partition("\n\n")
    assert usage.startswith(f"usage: raydllm {name}")
    assert len(rest.split("\n\n")[0]) > 80, "a description of what the command does and prints"
    assert f"examples:\n  raydllm {name}" in text
    assert "layer" not in text.lower() and "nothing imports" not in text.lower()


def test_every_config_key_is_in_the_config_reference():
    page = config_markdown()
    keys = set(Config().flat())
    assert keys and all(f"| `{key}` |" in page for key in keys), sorted(k for k in keys if f"| `{k}` |" not in page)
    # the comment beside a field in the code is its description on the page
    assert "| `jepa.k` | `int` | `1` | predictor depth; 0 = identity predictor (no-predictor ablation) |" in page


def test_every_space_key_is_in_the_schema():
    page = space_markdown()
    missing = [key for key in (f.alias or n for n, f in SweepSpec.model_fields.items())
               if f"| `{key}` |" not in page and f"| `{key}." not in page]  # a section: its keys are listed
    assert missing == []
    assert [row[0] for row in model_rows(SweepSpec)][:2] == ["task", "preset"]
