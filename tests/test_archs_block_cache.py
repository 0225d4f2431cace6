"""The fast sampler's block KV cache on raydllm's own LLaDA and Dream (raydllm.core.archs), through
`Backbone.forward_with_cache` (the archs' return_kv / kv_cache / block_start API; Dream's shifted logits moved
back): a block against a cache of the same sequence is the full forward; with one layer the prefix and dual
caches give the tokens of no cache; threshold >= 1 without a cache is the exact sampler; LoRA and its frozen
base view use it too; a remote-code model without the API falls back to parallel decoding alone."""
from __future__ import annotations

import logging

import pytest
import torch

from archs import save_tiny_dream, save_tiny_llada
from raydllm.engine.backbone import BaseView, Backbone, load_backbone
from raydllm.core.config import ModelConfig
from raydllm.evaluation.evaluate import effective_sampler, left_pad
from raydllm.core.sampler import SamplerConfig, generate, generate_fast

pytestmark = pytest.mark.usefixtures("one_thread")
# arch -> (folder writer, its config field for the number of layers)
ARCHS = {"llada": (save_tiny_llada, "n_layers"), "dream": (save_tiny_dream, "num_hidden_layers")}
GEN, BLOCK = 24, 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(arch, layers) -> a saved tiny folder of that architecture, written once per module."""
    made = {}

    def get(arch: str, layers: int):
        if (arch, layers) not in made:
            save, field = ARCHS[arch]
            made[arch, layers] = save(tmp_path_factory.mktemp(f"{arch}-{layers}"), **{field: layers})
        return made[arch, layers]

    return get


def sharp(backbone: Backbone) -> Backbone:
    """Random weights at a large scale, in float64: sharp attention and confident predictions, so that a stale or
    misplaced key, value or logit changes the tokens (the saved init, std 0.02, predicts near-uniformly)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in backbone.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.5)
    return backbone.to(torch.float64).eval()


def tiny(folder, arch: str, layers: int, **fields) -> Backbone:
    return sharp(load_backbone(ModelConfig(name=str(folder(arch, layers)), **fields))[0])


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of byte tokens (different lengths: padding is in play)."""
    return left_pad([list(b"Q: 3 + 4 = ?\nA:"), list(b"Q: 12 * 2?\nA:"), list(b"Tom has 5 apples.\nA:")], pad_id=257)


def with_answer(backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts followed by GEN answer positions, part of them committed (what a block step sees)."""
    ids, attention = prompts()
    torch.manual_seed(1)
    answer = torch.randint(30, 120, (ids.shape[0], GEN))
    answer[:, BLOCK + 3:] = backbone.ids.mask
    return torch.cat([ids, answer], 1), torch.cat([attention, torch.ones_like(answer)], 1)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_own_architectures_offer_the_cache(folder, arch):
    backbone = tiny(folder, arch, 1)
    assert backbone.supports_kv_cache and backbone.shift_logits == (arch == "dream")
    sampler = SamplerConfig(steps=GEN, gen_length=GEN, block_length=BLOCK, method="fast", cache="dual")
    assert effective_sampler(sampler, backbone) is sampler


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("window", ["block", "prefix", "first", "second"])
def test_block_equals_the_full_forward(folder, arch, window):
    """Two layers, the cache filled from this very sequence: recomputing a window (the sampler's dual block, its
    prefix-mode suffix, windows at position 0 and 1, where Dream's shift has no or one position before it) gives
    the full forward's aligned logits at those positions; the full pass is `logits` and returns the cache."""
    backbone = tiny(folder, arch, 2)
    ids, attention = with_answer(backbone)
    prompt = prompts()[0].shape[1]
    start, end = {"block": (prompt + BLOCK, prompt + 2 * BLOCK), "prefix": (prompt + BLOCK, None),
                  "first": (0, 5), "second": (1, 6)}[window]
    full, cache = backbone.forward_with_cache(ids, attention)
    reference = backbone.logits(ids, attention)
    assert torch.allclose(full, reference, atol=1e-10, rtol=0)
    assert len(cache) == 2 and cache[0][0].shape[-2] == ids.shape[1]
    part, same = backbone.forward_with_cache(ids, attention, cache=cache, start=start, end=end)
    assert same is cache
    assert torch.allclose(part, reference[:, start:end], atol=1e-10, rtol=0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cache_is_exact_for_one_layer(folder, arch, mode):
    """One layer: keys/values depend on the tokens alone, and during a block only the block's tokens change, so
    the prefix and dual caches give the tokens of no cache, at every threshold (several tokens a step or one)."""
    backbone = tiny(folder, arch, 1)
    ids, attention = prompts()
    for threshold in (0.1, 0.5, 1.0):
        plain_config = SamplerConfig(steps=GEN, gen_length=GEN, block_length=BLOCK, method="fast",
                                     threshold=threshold)
        plain = generate_fast(backbone.logits, ids, attention, mask_id=backbone.ids.mask, config=plain_config)
        cached = generate_fast(backbone.logits, ids, attention, mask_id=backbone.ids.mask,
                               config=SamplerConfig(**{**plain_config.__dict__, "cache": mode}),
                               cached_forward=backbone.forward_with_cache)
        assert torch.equal(plain, cached), (threshold, (plain != cached).nonzero().tolist()[:5])
        assert not (cached == backbone.ids.mask).any()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_threshold_at_one_without_cache_is_the_exact_sampler(folder, arch):
    """threshold >= 1, no cache: one token a step, the most confident = the exact sampler at steps == gen_length.
    The equality needs a model that never proposes [MASK] (the fast sampler never does): the [MASK] logit is
    pushed down, as a trained model has it."""
    backbone = tiny(folder, arch, 2)
    mask = backbone.ids.mask
    head = backbone.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: out.index_fill(-1, torch.tensor([mask]), -1e4))
    try:
        ids, attention = prompts()
        exact = generate(backbone.logits, ids, attention, mask_id=mask,
                         config=SamplerConfig(steps=GEN, gen_length=GEN, block_length=BLOCK))
        for threshold in (1.0, 3.0):
            fast = generate_fast(backbone.logits, ids, attention, mask_id=mask,
                                 config=SamplerConfig(steps=GEN, gen_length=GEN, block_length=BLOCK, method="fast",
                                                      threshold=threshold))
            assert torch.equal(fast, exact), (threshold, (fast != exact).nonzero().tolist()[:5])
        loose = generate_fast(backbone.logits, ids, attention, mask_id=mask,
                              config=SamplerConfig(steps=GEN, gen_length=GEN, block_length=BLOCK, method="fast",
                                                   threshold=0.05))
        assert not torch.equal(loose, exact)  # a low threshold does change things here: the test can fail
    finally:
        hook.remove()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lora_and_its_base_view_use_the_cache(folder, arch):
    """Under PEFT the archs keep the cache; the frozen base view (adapters off) computes its own."""
    backbone = tiny(folder, arch, 2, lora={"rank": 4})
    with torch.no_grad():
        for name, param in backbone.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    base = BaseView(backbone)
    assert backbone.supports_kv_cache and base.supports_kv_cache
    ids, attention = with_answer(backbone)
    start, end = prompts()[0].shape[1], prompts()[0].shape[1] + BLOCK
    for view in (backbone, base):
        _, cache = view.forward_with_cache(ids, attention)
        part, _ = view.forward_with_cache(ids, attention, cache=cache, start=start, end=end)
        assert torch.allclose(part, view.logits(ids, attention)[:, start:end], atol=1e-10, rtol=0)
    assert not torch.allclose(backbone.logits(ids, attention), base.logits(ids, attention), atol=1e-3)


def test_remote_code_without_the_api_falls_back(folder, caplog):
    """The folder's own (remote) LLaDA code has no block K/V API: the fast sampler runs it without a cache."""
    backbone = load_backbone(ModelConfig(name=str(folder("llada", 1)), implementation="remote", trust_remote_code=True))[0]
    assert type(backbone.model).__module__.startswith("transformers_modules")
    assert not backbone.supports_kv_cache
    sampler = SamplerConfig(steps=GEN, gen_length=GEN, block_length=BLOCK, method="fast", cache="prefix")
    with caplog.at_level(logging.WARNING, logger="raydllm.evaluation.evaluate"):
        assert effective_sampler(sampler, backbone).cache == "none"
    assert "parallel decoding alone" in caplog.text


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bench_sampler_uses_the_cache_on_a_tiny_architecture(folder, arch):
    from raydllm.bench.sampler import sampler_bench

    result = sampler_bench(model=str(folder(arch, 1)), items=2, lengths=(16,), batch_size=2, threads=1)
    row = result["lengths"]["16"]
    assert row["fast"]["settings"]["cache"] == "dual"
    assert row["fast"]["positions_computed"] < row["exact"]["positions_computed"]
