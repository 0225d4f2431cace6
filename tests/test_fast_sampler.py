"""raydllm.core.sampler.generate_fast (Fast-dLLM's threshold parallel decoding + block KV cache) and the embedded
model's KV-cache path it uses (`TinyDiffusionLM.forward_kv`, `Backbone.forward_with_cache`)."""
from __future__ import annotations

import json

import pytest
import torch

from raydllm.engine.backbone import Backbone, TokenIds, load_backbone
from raydllm.core.config import ModelConfig, load_config
from raydllm.core.sampler import SamplerConfig, generate, generate_fast, model_logits_fn, sample
from test_sampler import MASK, PROMPTS, SPEC, BagModel, _left_pad, build_model


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def tiny_backbone(n_layers: int, *, pretrained: bool = False, dtype=torch.float64) -> Backbone:
    """A small embedded model; random weights at a large scale (sharp attention and confident predictions,
    so stale keys or values would show), or the shipped pretrained base (raydllm/assets)."""
    torch.manual_seed(0)
    cfg = ModelConfig(init="pretrained") if pretrained else ModelConfig(n_layers=n_layers, d_model=32, n_heads=4,
                                                                        max_seq_len=128)
    backbone, _ = load_backbone(cfg)
    if not pretrained:
        with torch.no_grad():
            for name, param in backbone.named_parameters():
                if param.dim() > 1:
                    param.normal_(0, 0.4)
    return backbone.to(dtype).eval()


def byte_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    rows = [list(b"Q: 3 + 4 = ?\nA:"), list(b"Q: 12 * 2?\nA:"), list(b"Tom has 5 apples and buys 7.\nA:")]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    return ids, (ids != 0).long()


def cached(backbone):
    return lambda x, am, **kw: backbone.forward_with_cache(x, am, **kw)


# ------------------------------------------------------------------ fast == exact where it must be


@pytest.mark.parametrize("gen_length, block_length", [(24, 24), (24, 8), (30, 10)])
@pytest.mark.parametrize("model", ["toy", "bag"])
def test_threshold_at_one_without_cache_is_the_exact_sampler(model, gen_length, block_length):
    """threshold >= 1: no confidence exceeds it, so one token a step (the most confident, ranked and tie-broken
    as `generate` does) = the exact sampler at steps == gen_length. The bag model makes every position tie."""
    net = build_model(SPEC) if model == "toy" else BagModel()
    ids, am = _left_pad(PROMPTS)
    exact = generate(model_logits_fn(net), ids, am, mask_id=MASK,
                     config=SamplerConfig(steps=gen_length, gen_length=gen_length, block_length=block_length))
    for threshold in (1.0, 2.5):
        fast = generate_fast(model_logits_fn(net), ids, am, mask_id=MASK,
                             config=SamplerConfig(steps=gen_length, gen_length=gen_length, block_length=block_length,
                                                  method="fast", threshold=threshold))
        assert torch.equal(fast, exact), (threshold, (fast != exact).nonzero().tolist()[:5])
    # and a threshold below 1 does change things on this model (the test can fail)
    low = generate_fast(model_logits_fn(net), ids, am, mask_id=MASK,
                        config=SamplerConfig(steps=gen_length, gen_length=gen_length, block_length=block_length,
                                             method="fast", threshold=0.05))
    assert not torch.equal(low, exact)


def test_threshold_commits_every_confident_position_and_counts_forwards():
    net = build_model(SPEC)
    ids, am = _left_pad(PROMPTS)
    calls = []

    def counting(x, mask):
        calls.append((x == MASK).sum(1).tolist())
        return net(x, attention_mask=mask).logits

    cfg = SamplerConfig(steps=24, gen_length=24, block_length=8, method="fast", threshold=0.0)
    out = generate_fast(counting, ids, am, mask_id=MASK, config=cfg)
    assert len(calls) == 3 and not (out == MASK).any()  # every confidence > 0: a whole block per step
    calls.clear()
    out = generate_fast(counting, ids, am, mask_id=MASK, config=cfg.__class__(**{**cfg.__dict__, "threshold": 0.3}))
    assert 3 < len(calls) < 24 and not (out == MASK).any()
    done = [sum(c) for c in calls]
    assert all(a > b for a, b in zip(done, done[1:]))  # progress every step


# ------------------------------------------------------------------ the KV-cache path of the embedded model


def test_forward_kv_full_pass_is_the_forward():
    backbone = tiny_backbone(3)
    ids, am = byte_prompts()
    logits, cache = backbone.forward_with_cache(ids, am)
    assert torch.equal(logits, backbone.logits(ids, am))
    assert len(cache) == 3 and cache[0][0].shape == (3, 4, ids.shape[1], 8)


@pytest.mark.parametrize("window", [(5, 12), (10, None), (0, 4)])
def test_cache_of_the_same_sequence_gives_the_same_logits(window):
    """With keys/values cached from this very sequence, recomputing a window is exact (prefix: to the end;
    dual: a middle window), padding included."""
    backbone = tiny_backbone(3)
    ids, am = byte_prompts()
    full, cache = backbone.forward_with_cache(ids, am)
    start, end = window
    part, same = backbone.forward_with_cache(ids, am, cache=cache, start=start, end=end)
    assert same is cache
    assert torch.allclose(part, full[:, start:end], atol=1e-10, rtol=0)
    changed = ids.clone()
    changed[:, start] = 65  # a token the window sees changes: with >1 layer the cache is now stale elsewhere
    stale, _ = backbone.forward_with_cache(changed, am, cache=cache, start=start, end=end)
    assert not torch.allclose(stale, backbone.logits(changed, am)[:, start:end], atol=1e-6)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("threshold", [0.05, 0.2, 1.0])
def test_cache_is_exact_for_one_layer(mode, threshold):
    """With one layer, keys/values are functions of the tokens alone; during a block only the block's tokens
    change (the prompt and finished blocks are fixed, later blocks all [MASK]), so the prefix and dual
    caches are exact: the same tokens as without a cache, at any threshold."""
    backbone = tiny_backbone(1)
    ids, am = byte_prompts()
    base = SamplerConfig(steps=24, gen_length=24, block_length=8, method="fast", threshold=threshold)
    plain = generate_fast(backbone.logits, ids, am, mask_id=backbone.ids.mask, config=base)
    with_cache = generate_fast(backbone.logits, ids, am, mask_id=backbone.ids.mask,
                               config=SamplerConfig(**{**base.__dict__, "cache": mode}),
                               cached_forward=cached(backbone))
    assert torch.equal(plain, with_cache)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cache_is_an_approximation_that_stays_close(mode):
    """Four layers: cached keys/values of positions outside the block go stale as the block fills, so tokens
    may differ; on the shipped pretrained base they stay close to the uncached answer, and rows are
    independent of their batch (left padding)."""
    backbone = tiny_backbone(4, pretrained=True, dtype=torch.float32)
    ids, am = byte_prompts()
    base = SamplerConfig(steps=32, gen_length=32, block_length=8, method="fast", threshold=0.9)
    plain = generate_fast(backbone.logits, ids, am, mask_id=backbone.ids.mask, config=base)
    config = SamplerConfig(**{**base.__dict__, "cache": mode})
    with_cache = generate_fast(backbone.logits, ids, am, mask_id=backbone.ids.mask, config=config,
                               cached_forward=cached(backbone))
    p = ids.shape[1]
    agree = (plain[:, p:] == with_cache[:, p:]).float().mean().item()
    print(f"{mode}: {agree:.3f} of the tokens agree with the uncached sampler")
    assert agree >= 0.7, agree
    assert not (with_cache == backbone.ids.mask).any()
    for r in range(ids.shape[0]):
        row = ids[r][am[r].bool()].unsqueeze(0)
        single = generate_fast(backbone.logits, row, torch.ones_like(row), mask_id=backbone.ids.mask,
                               config=config, cached_forward=cached(backbone))
        assert torch.equal(single[0, row.shape[1]:], with_cache[r, p:])


def test_cache_cuts_recomputed_positions():
    backbone = tiny_backbone(2)
    ids, am = byte_prompts()
    seen = {}
    for mode in ("none", "prefix", "dual"):
        widths = []

        def logits_fn(x, mask):
            widths.append(x.shape[1])
            return backbone.logits(x, mask)

        def cached_forward(x, mask, *, cache, start, end):
            widths.append(end - start)
            return backbone.forward_with_cache(x, mask, cache=cache, start=start, end=end)

        generate_fast(logits_fn, ids, am, mask_id=backbone.ids.mask, cached_forward=cached_forward,
                      config=SamplerConfig(steps=24, gen_length=24, block_length=8, method="fast", threshold=1.0,
                                           cache=mode))
        seen[mode] = widths
    total = ids.shape[1] + 24
    assert seen["none"] == [total] * 24
    assert seen["prefix"][0] == total and seen["prefix"][1] == 24 and seen["prefix"][9] == 16
    assert seen["dual"][0] == total and set(seen["dual"]) == {total, 8} and seen["dual"].count(total) == 3


# ------------------------------------------------------------------ configuration and the adapter


@pytest.mark.parametrize("kwargs, field", [
    (dict(method="quick"), "method"), (dict(cache="full", method="fast"), "cache"),
    (dict(threshold=-0.1, method="fast"), "threshold"), (dict(cache="dual"), "cache"),
    (dict(method="fast", remasking="random"), "remasking"),
])
def test_invalid_fast_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplerConfig(**kwargs)


def test_cache_needs_a_cached_forward():
    net = build_model(SPEC)
    ids, am = _left_pad(PROMPTS)
    with pytest.raises(ValueError, match="cached_forward"):
        sample(model_logits_fn(net), ids, am, mask_id=MASK,
               config=SamplerConfig(steps=8, gen_length=8, block_length=8, method="fast", cache="prefix"))


def test_backbone_kv_capability():
    assert tiny_backbone(1).supports_kv_cache

    class NoCache(torch.nn.Module):
        config = None

    assert not Backbone(NoCache(), TokenIds(mask=1, pad=0, eos=2), shift_logits=False).supports_kv_cache
    # Shifted logits are served too: the window starts one position earlier (tests/test_archs_block_cache.py).
    plain = tiny_backbone(3)
    shifted = Backbone(plain.model, plain.ids, shift_logits=True)
    assert shifted.supports_kv_cache
    ids, am = byte_prompts()
    full, cache = shifted.forward_with_cache(ids, am)
    assert torch.equal(full, shifted.logits(ids, am))
    for start, end in ((5, 12), (10, None), (0, 4)):
        part, _ = shifted.forward_with_cache(ids, am, cache=cache, start=start, end=end)
        assert torch.allclose(part, full[:, start:end], atol=1e-10, rtol=0)


# ------------------------------------------------------------------ bench: sampler mode and the rank agreement


def test_kendall_tau():
    from raydllm.bench.fidelity import kendall_tau

    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert kendall_tau([1], [2]) is None and kendall_tau([1, 1, 1], [1, 2, 3]) is None
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # tau-b with ties, as scipy computes it
        x = torch.randint(0, 4, (12,), generator=g).tolist()
        y = torch.randint(0, 4, (12,), generator=g).tolist()
        assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)


def test_fidelity_agreement_reads_trials_with_both_figures():
    from types import SimpleNamespace as NS

    from raydllm.bench.fidelity import fidelity_agreement

    def run(metrics):
        return NS(data=NS(metrics=metrics))

    runs = [run({"final_val_accuracy": 0.1, "final_val_accuracy_fast": 0.12}),
            run({"final_val_accuracy": 0.3, "final_val_accuracy_fast": 0.25}),
            run({"final_val_accuracy": 0.2, "final_val_accuracy_fast": 0.2}),
            run({"final_val_accuracy": 0.5}),  # exact only: not counted
            # scored after the sweep by `raydllm eval <run id> --split validation`, with each sampler
            run({"eval/validation/0shot/accuracy": 0.4, "eval/validation/0shot/fast/accuracy": 0.3})]
    got = fidelity_agreement(runs, "accuracy")
    assert got["trials"] == 4 and got["kendall_tau"] == 1.0 and got["exact"][-1] == 0.4


def test_bench_sampler_runs_both_samplers_on_the_same_items(capsys):
    from raydllm.cli.app import build_parser

    args = build_parser().parse_args(["bench", "sampler", "--items", "3", "--lengths", "8,16", "--sampler-batch",
                                      "2", "--threshold", "0.5", "--json"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["items"] == 3 and set(result["lengths"]) == {"8", "16"} and "pretrained base" in result["model"]
    row = result["lengths"]["16"]
    assert row["exact"]["forwards_per_token"] == 1.0 and row["exact"]["forwards"] == 2 * 16  # 2 batches
    assert row["fast"]["forwards"] <= row["exact"]["forwards"]
    assert row["fast"]["positions_computed"] < row["exact"]["positions_computed"]  # the dual cache
    assert row["fast"]["settings"] == {"block_length": 16, "threshold": 0.5, "cache": "dual"}
    assert row["speedup"] > 0 and 0 <= row["identical_answers"] <= 1


def test_trial_reports_with_the_fast_sampler_and_finals_with_both(process_group, monkeypatch):
    """eval.sampler=fast: the per-report val_accuracy uses the fast sampler (with its cache); the final report
    scores the exact sampler and the fast one on the same items (the pair the sweep's Kendall tau compares)."""
    import raydllm.evaluation.trial as trial

    cfg = load_config("gsm8k", "local", [
        "model.init=random", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.synthetic_size=400",
        "data.val_limit=16", "data.answer_tokens=16", "train.micro_batch_size=8", "eval.gen_limit=4",
        "eval.final_limit=4", "eval.probes=false", "eval.sampler=fast", "eval.cache=dual", "eval.threshold=0.5"])
    loop = trial.TrialLoop(cfg, rank=0, world=1, device=torch.device("cpu"))
    used = []
    real = trial.evaluate_task

    def spy(*args, sampler, **kwargs):
        used.append((sampler.method, sampler.cache, sampler.threshold, len(args[3])))
        return real(*args, sampler=sampler, **kwargs)

    monkeypatch.setattr(trial, "evaluate_task", spy)
    assert 0.0 <= loop.validation_accuracy() <= 1.0
    assert used == [("fast", "dual", 0.5, 4)]
    used.clear()
    final = loop.final_evaluation()
    assert used == [("exact", "none", 0.5, 4), ("fast", "dual", 0.5, 4)]
    assert {"final_val_accuracy", "final_val_accuracy_fast", "final/val/0shot/n", "final/val/0shot/fast/n"} <= set(final)


def test_bench_sampler_on_a_hugging_face_folder(tmp_path):
    """The hook for other architectures (e.g. a tiny LLaDA): any HF folder; its KV cache is used when the
    loaded code offers `forward_kv` (here the embedded model's own code, saved with its weights)."""
    from raydllm.engine.backbone import build_tiny
    from raydllm.bench.sampler import sampler_bench

    torch.manual_seed(0)
    model, tokenizer = build_tiny(ModelConfig(d_model=32, n_layers=2, n_heads=2))
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModel")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    result = sampler_bench(model=str(tmp_path), items=2, lengths=(8,), batch_size=2, threads=1)
    assert result["model"].startswith("Hugging Face folder") and "llada" not in result
    assert result["lengths"]["8"]["fast"]["settings"]["cache"] == "dual"


def test_eval_sampler_fields_are_validated_at_the_door():
    from raydllm.core.config import ConfigError, validate

    cfg = validate({"eval": {"sampler": "fast", "threshold": 0.8, "cache": "prefix"}})
    assert (cfg.eval.sampler, cfg.eval.threshold, cfg.eval.cache) == ("fast", 0.8, "prefix")
    assert cfg.flat()["eval.cache"] == "prefix"  # every config field is an MLflow param of the trial
    with pytest.raises(ConfigError, match="eval.cache=dual needs eval.sampler=fast"):
        validate({"eval": {"cache": "dual"}})
    with pytest.raises(ConfigError, match="threshold"):
        validate({"eval": {"sampler": "fast", "threshold": -1}})
