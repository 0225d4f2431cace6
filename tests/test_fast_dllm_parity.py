"""raydllm's fast sampler against a re-creation of Fast-dLLM's LLaDA decision rule (NVlabs/Fast-dLLM
llada/generate.py: `generate`, `generate_with_prefix_cache`, `generate_with_dual_cache` with a threshold, greedy),
written here from that code's behaviour, on the tiny LLaDA architecture in fp32 and bf16: the tokens must be
identical in every configuration (no cache, prefix cache, dual cache; several thresholds, blocks and prompts).

The rule re-created: each step proposes argmax(logits) at every masked position of the block (positions after the
block are not candidates), takes the confidence from a softmax in float64, ranks the candidates of the sequence
it computed (the whole row on a full pass, x[start:] with the prefix cache, the block with the dual cache) with
torch.topk, keeps the first and drops every other whose confidence is < threshold. A block's first step is a full
pass that (re)fills the cache. The cached passes use raydllm's `Backbone.forward_with_cache`, whose block outputs
tests/test_archs_block_cache.py checks against the full forward."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from archs import save_tiny_llada
from raydllm.core.config import ModelConfig
from raydllm.core.sampler import SamplerConfig, generate_fast
from raydllm.engine.backbone import load_backbone

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [b"Q: 3 + 4 = ?\nA:", b"Tom has 5 apples.\nA:", b"x"]
# (gen_length, block_length, threshold)
SHAPES = [(24, 8, 0.9), (24, 8, 0.5), (16, 16, 0.7), (16, 4, 0.3), (24, 24, 0.6)]
# weight scales: 0.3 puts many confidences near the thresholds (the old bf16 softmax and `>` rule fail there),
# 0.5 makes them sharp (most blocks decode several tokens a pass)
SCALES = (0.3, 0.5)


def rule_transfer(logits: torch.Tensor, candidates: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast-dLLM's threshold rule for one row: (proposals [L], positions to commit [L] bool)."""
    proposals = logits.argmax(dim=-1)
    probs = F.softmax(logits.to(torch.float64), dim=-1)
    confidence = probs.gather(-1, proposals[:, None]).squeeze(-1)
    confidence = torch.where(candidates, confidence, torch.tensor(float("-inf"), dtype=torch.float64))
    count = int(candidates.sum())
    order = torch.topk(confidence, k=count).indices
    commit = torch.zeros_like(candidates)
    commit[order[0]] = True
    for position in order[1:].tolist():
        commit[position] = bool(confidence[position] >= threshold)  # Fast-dLLM drops those < threshold
    return proposals, commit


def reference_decode(backbone, prompt: torch.Tensor, mask_id: int, gen: int, block: int, threshold: float,
                     cache: str) -> tuple[torch.Tensor, int]:
    """Fast-dLLM's loop for one prompt [1, P] -> (tokens [1, P + gen], forward passes)."""
    x = torch.cat([prompt, torch.full((1, gen), mask_id, dtype=torch.long)], dim=1)
    total, passes = x.shape[1], 0
    for first in range(prompt.shape[1], total, block):
        end = first + block
        full, kv = backbone.forward_with_cache(x, None, cache=None)  # the block's first step: full pass
        candidates = x[0] == mask_id
        candidates[end:] = False
        proposals, commit = rule_transfer(full[0], candidates, threshold)
        x[0, commit] = proposals[commit]
        passes += 1
        while (x[0, first:end] == mask_id).any():
            stop = total if cache == "prefix" else end  # "none" recomputes like "prefix", without stale keys
            if cache == "none":
                logits = backbone.forward_with_cache(x, None, cache=None)[0][0, first:stop]
            else:
                logits = backbone.forward_with_cache(x, None, cache=kv, start=first, end=stop)[0][0]
            candidates = x[0, first:stop] == mask_id
            candidates[block:] = False
            proposals, commit = rule_transfer(logits, candidates, threshold)
            x[0, first:stop][commit] = proposals[commit]
            passes += 1
    return x, passes


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(dtype, scale) -> tiny LLaDA Backbone with random weights of that scale; [MASK] never wins an argmax."""
    folder = save_tiny_llada(tmp_path_factory.mktemp("llada"))
    made = {}
    for dtype, scale in itertools.product((torch.float32, torch.bfloat16), SCALES):
        backbone = load_backbone(ModelConfig(name=str(folder)))[0]
        torch.manual_seed(0)
        with torch.no_grad():
            for param in backbone.parameters():
                if param.dim() > 1:
                    param.normal_(0, scale)
        backbone = backbone.to(dtype).eval()
        mask = backbone.ids.mask
        head = [m for m in backbone.modules() if isinstance(m, torch.nn.Linear)][-1]
        if head.out_features > mask:  # keep [MASK] out of every argmax: Fast-dLLM would "commit" it
            with torch.no_grad():
                head.weight[mask] = 0
            assert head.bias is None
        made[dtype, scale] = backbone
    return made


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fast_sampler_token_identical_to_fast_dllm_rule(models, dtype):
    runs = identical = parallel = 0
    for scale, (gen, block, threshold), cache, text in itertools.product(SCALES, SHAPES, ("none", "prefix", "dual"),
                                                                          PROMPTS):
        backbone = models[dtype, scale]
        mask = backbone.ids.mask
        prompt = torch.tensor([list(text)])
        expected, passes = reference_decode(backbone, prompt, mask, gen, block, threshold, cache)
        config = SamplerConfig(steps=gen // block, gen_length=gen, block_length=block, method="fast",
                               threshold=threshold, cache=cache)
        got = generate_fast(backbone.logits, prompt, None, mask_id=mask, config=config,
                            cached_forward=backbone.forward_with_cache)
        assert not (expected == mask).any(), "the reference left [MASK]: the model proposes it"
        runs += 1
        identical += bool(torch.equal(got, expected))
        parallel += passes < gen
    print(f"{dtype}: {identical} of {runs} runs token-identical to the Fast-dLLM rule; {parallel} decoded in "
          f"fewer passes than tokens")
    assert parallel > 0
    assert identical == runs, f"{identical} of {runs} runs token-identical"
