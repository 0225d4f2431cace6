"""Pareto sweeps end to end: a space with several objectives, checked at the door; the multi-objective sweep under
ParetoASHA with NSGA-II, killed and resumed; the front read back by `raydllm best --pareto`."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from raydllm.config import ConfigError
from raydllm.search_space import FORGETTING_PROBE_CHUNKS, load_spec
from test_tune import TINY_SPACE, _children, _cli, _parents

PARETO_SPACE = {
    **TINY_SPACE,
    "metric": None,
    "objectives": {"val_loss_diff": "min", "wikitext_delta": "min"},
    "fixed": {**TINY_SPACE["fixed"], "eval.report_probe_chunks": 2, "eval.probe_seq_len": 32},
    "seeds": [42, 123], "repeat": {"top": 2},
    "search": {"algorithm": "optuna", "seed": 3},
    "space": {"jepa.lambda": {"choice": [0.5, 2.0]}, "train.lr": {"choice": [1.0e-6, 3.0e-3]}},
}


def _space(folder: Path, **changes) -> Path:
    path = folder / "pareto.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in {**PARETO_SPACE, **changes}.items() if v is not None}))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"objectives": {"val_loss_diff": "min"}}, "objectives: give at least two"),
    ({"objectives": {"val_loss_diff": "min", "forgetting": "min"}}, "objectives.forgetting: unknown objective"),
    ({"objectives": {"val_loss_diff": "min", "wikitext_delta": "max"}}, "its mode is min, not max"),
    ({"metric": "loss_total"}, "metric: loss_total is not one of the objectives"),
    ({"objectives": {"val_accuracy": "max", "wikitext_delta": "min"}}, "val_accuracy is reported only with"),
    ({"search": {"algorithm": "random", "sampler": "nsga2"}}, "search.sampler: nsga2 is an optuna sampler"),
    ({"fixed": {**PARETO_SPACE["fixed"], "eval.report_probe_chunks": 0}}, "eval.report_probe_chunks > 0"),
])
def test_objectives_checked_at_the_door(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_spec(_space(tmp_path, **changes))
    assert str(caught.value).startswith(str(tmp_path / "pareto.yaml")) and "\n" not in str(caught.value)


def test_forgetting_objective_gets_a_bounded_probe_by_default(tmp_path):
    fixed = {k: v for k, v in PARETO_SPACE["fixed"].items() if k != "eval.report_probe_chunks"}
    spec = load_spec(_space(tmp_path, fixed=fixed))
    assert spec.fixed["eval.report_probe_chunks"] == FORGETTING_PROBE_CHUNKS
    assert spec.metric == "val_loss_diff" and list(spec.objectives) == ["val_loss_diff", "wikitext_delta"]


def test_shipped_pareto_spaces_load():
    for name in ("local-pareto", "bench-pareto"):
        spec = load_spec(Path("search_spaces") / f"{name}.yaml")
        assert spec.objectives == {"val_loss_diff": "min", "wikitext_delta": "min"}
