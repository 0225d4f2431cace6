"""What a space's protocol can detect (`raydllm detect`, raydllm.sweep.power): known answers for the formulas,
and the shipped paper spaces sized so that selection can see the effect each is meant to find."""
import json
import math

import pytest

from raydllm.cli.app import main
from raydllm.core.config import validate
from raydllm.data.tasks import get_task
from raydllm.sweep.power import (Assumptions, TEST_ITEMS, detect, report_mde, seeds_needed, selection_se,
                                 token_reads_per_item)
from raydllm.sweep.search_space import base_raw, default_space_file, load_spec

PAPER_SPACES = {"gsm8k": "gsm8k", "nlrx": "nl-rx-synth", "django": "django", "spider": None}


def test_selection_se_known_answer():
    # 200 items, a quarter disagreed on, seed sd 1 point: sqrt(0.25/200 + 2 * 0.01^2) = sqrt(0.00145).
    a = Assumptions(discordance=0.25, seed_sd=0.01)
    assert selection_se(200, a) == pytest.approx(math.sqrt(0.00145))
    # More items shrink only the item part: the seed part is the floor.
    assert selection_se(10**9, a) == pytest.approx(math.sqrt(2) * 0.01, rel=1e-4)


def test_report_mde_known_answer_and_seeds_needed():
    # (1.95996 + 0.84162) * sqrt(2 * 0.01^2 / 2 + 0.2 / (2 * 1000)) = 2.80158 * sqrt(2e-4)
    a = Assumptions(discordance=0.2, seed_sd=0.01)
    assert report_mde(2, 1000, a) == pytest.approx(2.80158 * math.sqrt(2e-4), rel=1e-4)
    assert report_mde(3, 1000, a) < report_mde(2, 1000, a)
    need = seeds_needed(0.03, 1000, a)
    assert report_mde(need, 1000, a) <= 0.03 < report_mde(need - 1, 1000, a)


def test_token_reads_exact_fast_and_dual_cache():
    a = Assumptions(tokens_per_forward=4.0, prompt_tokens=100)
    kw = dict(steps=128, gen_length=256, block_length=32, a=a)
    assert token_reads_per_item(sampler="exact", cache="none", **kw) == 128 * 356
    assert token_reads_per_item(sampler="fast", cache="none", **kw) == 64 * 356
    # 64 forwards over a 32-token block, plus a full read as each of the 8 blocks starts.
    assert token_reads_per_item(sampler="fast", cache="dual", **kw) == 64 * 32 + 8 * 356


def _spec(task, folder):
    if folder is None:  # Spider is not in ../shared/data: a placeholder folder only satisfies the config
        return load_spec(default_space_file(task), {"data.source": "local", "data.path": "/nonexistent/spider"})
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / folder).exists():
        pytest.skip(f"shared data not found at {SHARED_DATA / folder}")
    return load_spec(default_space_file(task), None if task == "gsm8k" else
                     {"data.source": "local", "data.path": str(SHARED_DATA / folder)})


@pytest.mark.parametrize("task", sorted(PAPER_SPACES))
def test_paper_spaces_select_on_a_yardstick_finer_than_their_target(task):
    spec = _spec(task, PAPER_SPACES[task])
    assert spec.target_effect, f"{task}.yaml: no target_effect"
    result = detect(spec, validate(base_raw(spec)))
    assert result["selection"]["sized"], (task, result["selection"]["se_difference"], spec.target_effect)
    # ...and what the fixed 64-item exact pass it replaced could not see.
    assert selection_se(64, Assumptions()) > spec.target_effect
    assert result["report"]["test_items"] == TEST_ITEMS[task]


@pytest.mark.parametrize("task", ["gsm8k", "nlrx", "django"])
def test_selection_generates_on_every_validation_problem_and_test_sizes_match(task, shared_data):
    spec = _spec(task, PAPER_SPACES[task])
    cfg = validate(base_raw(spec))
    path = None if task == "gsm8k" else cfg.data.path
    if task == "gsm8k":
        path = str(shared_data / "gsm8k")
    loader = get_task(task)
    val = loader.load("validation", path, seed=cfg.data.split_seed, val_fraction=cfg.data.val_fraction)
    assert cfg.eval.gen_limit == len(val)
    assert len(loader.load("test", path)) == TEST_ITEMS[task]


def test_detect_command_json_and_a_bad_flag(capsys):
    assert main(["detect", "gsm8k", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["selection"]["items"] == 747 and out["selection"]["sized"] is True
    assert out["report"]["fresh_seeds"] == 2 and out["report"]["mde"] > out["report"]["mde_plus_one_seed"]
    assert main(["detect", "gsm8k", "--discordance", "1.5"]) == 2
    assert "--discordance 1.5" in capsys.readouterr().err
