"""Decode cost as an objective: a pass's answer tokens per forward, in each report with the fast sampler, and a
space that names `decode_tokens_per_forward` (max) beside a task metric."""
from pathlib import Path

import pytest
import torch

from raydllm.core.config import ConfigError, load_config
from raydllm.core.sampler import SamplerConfig
from raydllm.data.sft import load_examples
from raydllm.data.tasks import get_task
from raydllm.engine.backbone import load_backbone
from raydllm.evaluation.evaluate import evaluate_task
from raydllm.sweep.search_space import check_against_config, load_spec

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.answer_tokens=16", "data.val_limit=8",
         "model.init=random"]
SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "local-decode.yaml"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("gsm8k", "local", SMALL)
    torch.manual_seed(0)
    backbone, tokenizer = load_backbone(cfg.model)
    return backbone, tokenizer, load_examples(cfg, "validation")[:5]


def test_exact_sampler_decodes_gen_length_over_steps_tokens_per_forward(tiny):
    backbone, tokenizer, examples = tiny
    cost = {}
    evaluate_task(backbone, tokenizer, get_task("gsm8k"), examples, batch_size=2, progress=False,
                  sampler=SamplerConfig(steps=8, gen_length=16, block_length=16), decode_cost=cost)
    # 3 batches (2, 2, 1 rows) of 8 forwards each: 5 rows x 8 = 40 row-forwards for 5 x 16 tokens.
    assert cost == {"tokens": 80.0, "row_forwards": 40.0, "tokens_per_forward": 2.0}


def test_fast_sampler_commits_more_tokens_per_forward_at_a_lower_threshold(tiny):
    backbone, tokenizer, examples = tiny
    figures = {}
    for threshold in (0.999, 0.0):
        cost = {}
        evaluate_task(backbone, tokenizer, get_task("gsm8k"), examples, batch_size=2, progress=False,
                      sampler=SamplerConfig(steps=16, gen_length=16, block_length=8, method="fast",
                                            threshold=threshold, cache="dual"), decode_cost=cost)
        figures[threshold] = cost["tokens_per_forward"]
    # Threshold 0 commits a whole block per step (plus the cache's full forwards); 0.999 about one token a step.
    assert figures[0.0] > 2 * figures[0.999] and figures[0.999] >= 0.5


def test_the_local_decode_space_names_the_objective_and_needs_the_fast_sampler(tmp_path):
    spec = load_spec(SPACE)
    assert spec.objectives == {"val_loss_diff": "min", "decode_tokens_per_forward": "max"}
    check_against_config(spec, SPACE)
    text = SPACE.read_text().replace("eval.sampler: fast", "eval.sampler: exact")
    bad = tmp_path / "exact.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match="decode_tokens_per_forward is reported only with fixed eval.metric: "
                                          "accuracy and eval.sampler: fast"):
        check_against_config(load_spec(bad), bad)
    wrong_mode = tmp_path / "min.yaml"
    wrong_mode.write_text(SPACE.read_text().replace("decode_tokens_per_forward: max", "decode_tokens_per_forward: min"))
    with pytest.raises(ConfigError, match="its mode is max"):
        load_spec(wrong_mode)


def test_a_report_carries_the_decode_cost_with_the_fast_sampler(process_group, shared_data):
    from raydllm.evaluation.trial import TrialLoop

    cfg = load_config("gsm8k", "local", SMALL + ["train.micro_batch_size=4", "train.max_steps=1", "eval.gen_limit=4",
                                                 "eval.sampler=fast", "eval.metric=accuracy", "data.synthetic_size=100"])
    loop = TrialLoop(cfg, rank=0, world=1, device=torch.device("cpu"))
    assert loop.report_figures() == {}
    loop.validation_accuracy()
    figures = loop.report_figures()
    assert set(figures) == {"decode_tokens_per_forward"} and figures["decode_tokens_per_forward"] > 0
