"""The DLLM-JEPA objective, pinned on CPU tensors."""
import math

import pytest
import torch
import torch.nn as nn

from raydllm.core.masking import mask_tokens
from raydllm.core.objective import (EmaTarget, Predictor, attach_l2_anchor, diffusion_loss, dllm_jepa_losses,
                               jepa_loss, pool)

MASK = 99


def _batch(b=64, prompt=20, answer=40, pad=5):
    x0 = torch.randint(0, 90, (b, pad + prompt + answer))
    attention = torch.ones_like(x0)
    attention[:, :pad] = 0  # left padding
    maskable = torch.zeros_like(x0, dtype=torch.bool)
    maskable[:, pad + prompt:] = True
    return x0, attention, maskable


@pytest.mark.parametrize("t", [0.1, 0.2, 0.5, 0.7, 0.9])
def test_mask_rate_within_tolerance(t):
    x0, _, maskable = _batch(b=256)
    _, masked = mask_tokens(x0, t, maskable, mask_token_id=MASK, generator=torch.Generator().manual_seed(0))
    rate = masked.sum().item() / maskable.sum().item()
    n = maskable.sum().item()
    assert abs(rate - t) < 4 * math.sqrt(t * (1 - t) / n)


def test_prompt_and_pad_never_masked_and_view_reproducible():
    x0, attention, maskable = _batch()
    x_t, masked = mask_tokens(x0, 0.99, maskable, mask_token_id=MASK, generator=torch.Generator().manual_seed(3))
    assert not masked[~maskable].any()
    assert torch.equal(x_t[~maskable], x0[~maskable])
    assert (x_t[masked] == MASK).all()
    again, _ = mask_tokens(x0, 0.99, maskable, mask_token_id=MASK, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x_t, again)
    other, _ = mask_tokens(x0, 0.5, maskable, mask_token_id=MASK, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(x_t, other)


def test_per_row_rates():
    x0, _, maskable = _batch(b=2, answer=4000)
    _, masked = mask_tokens(x0, torch.tensor([0.1, 0.9]), maskable, mask_token_id=MASK,
                            generator=torch.Generator().manual_seed(0))
    rates = masked.sum(1) / maskable.sum(1)
    assert abs(rates[0] - 0.1) < 0.03 and abs(rates[1] - 0.9) < 0.03


def test_pool_ignores_masked_and_pad_positions():
    hidden = torch.randn(3, 10, 16)
    keep = torch.zeros(3, 10, dtype=torch.bool)
    keep[:, 4:8] = True
    pooled = pool(hidden, keep)
    changed = hidden.clone()
    changed[:, :4] = 1e3  # positions outside `keep` may hold anything
    changed[:, 8:] = -1e3
    assert torch.allclose(pool(changed, keep), pooled)
    expected = torch.nn.functional.layer_norm(hidden[:, 4:8].mean(1), (16,))
    assert torch.allclose(pooled, expected, atol=1e-5)


def test_cosine_loss_zero_for_identical_and_no_gradient_to_target():
    z = torch.randn(4, 32)
    assert jepa_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert jepa_loss(z, -z).item() == pytest.approx(2.0, abs=1e-6)
    predicted = torch.randn(4, 32, requires_grad=True)
    target = torch.randn(4, 32, requires_grad=True)
    jepa_loss(predicted, target).backward()
    assert predicted.grad is not None and predicted.grad.abs().sum() > 0
    assert target.grad is None


def test_predictor_depth_equals_k_and_k0_is_identity():
    for k in range(0, 4):
        assert Predictor(32, k, n_heads=2).depth == k
    z = torch.randn(5, 32)
    assert torch.equal(Predictor(32, 0)(z), z)
    assert Predictor(32, 2, n_heads=2)(z).shape == (5, 32)


def test_ema_update_matches_formula():
    online = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    ema = EmaTarget(online, decay=0.9, chunk_size=1)  # chunk_size 1 exercises the chunking
    before = [p.detach().clone() for p in ema.params]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    ema.update(online.parameters())
    for old, new, p in zip(before, ema.params, online.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * p.detach(), atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_keeps_float32_under_bf16_online():
    online = nn.Linear(4, 4).to(torch.bfloat16)
    ema = EmaTarget(online, decay=0.996)
    assert all(p.dtype == torch.float32 for p in ema.params)
    start = ema.params[0].clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    ema.update(online.parameters())
    # A 0.004 step is below bf16 resolution; in float32 it is applied.
    assert torch.allclose(ema.params[0] - start, torch.full_like(start, 0.004), atol=2e-4)


def test_diffusion_loss_norms():
    logits = torch.randn(2, 6, 11)
    x0 = torch.randint(0, 11, (2, 6))
    masked = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    ce = torch.nn.functional.cross_entropy(logits[masked], x0[masked], reduction="none")
    assert diffusion_loss(logits, x0, masked, t=0.5).item() == pytest.approx(ce.mean().item(), rel=1e-6)
    lengths = torch.tensor([4, 2])
    llada = ((ce[0] + ce[1]) / 0.5 / 4 + ce[2] / 0.5 / 2) / 2
    got = diffusion_loss(logits, x0, masked, t=0.5, norm="answer_length", answer_lengths=lengths)
    assert got.item() == pytest.approx(llada.item(), rel=1e-6)
    nothing = torch.zeros_like(masked)
    assert diffusion_loss(logits, x0, nothing, t=0.5).item() == 0.0


def test_per_row_rates_give_eq2_per_sequence_mean():
    logits = torch.randn(2, 6, 11)
    x0 = torch.randint(0, 11, (2, 6))
    # row 0 masked at a high rate (5 tokens), row 1 at a low one (1 token)
    masked = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    ce = torch.nn.functional.cross_entropy(logits[masked], x0[masked], reduction="none")
    rates = torch.tensor([0.9, 0.1])
    per_sequence = (ce[:5].mean() + ce[5]) / 2  # eq. 2: each row's mean, then the mean over rows
    assert diffusion_loss(logits, x0, masked, t=rates).item() == pytest.approx(per_sequence.item(), rel=1e-6)
    assert diffusion_loss(logits, x0, masked, t=0.5).item() == pytest.approx(ce.mean().item(), rel=1e-6)
    # a row with nothing masked is left out of the mean, not counted as 0
    only_first = masked.clone()
    only_first[1] = False
    got = diffusion_loss(logits, x0, only_first, t=rates).item()
    assert got == pytest.approx(ce[:5].mean().item(), rel=1e-6)
    assert diffusion_loss(logits, x0, torch.zeros_like(masked), t=rates).item() == 0.0


def test_eos_padding_is_the_fill_after_the_first_eos_and_leaves_pooling():
    from raydllm.core.objective import eos_padding, dllm_jepa_losses

    eos = 9
    x0 = torch.tensor([[5, 5, 1, 2, eos, eos, eos], [5, 1, 2, 3, 4, eos, eos]])
    maskable = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    fill = eos_padding(x0, maskable, eos)
    assert fill.tolist() == [[False] * 5 + [True, True], [False] * 6 + [True]]
    pooled = {}

    def encoder(ids, attention_mask):
        hidden = torch.zeros(*ids.shape, 2)
        hidden[..., 0] = 1.0
        hidden[x0 == eos] = torch.tensor([0.0, 1.0])  # EOS positions point elsewhere
        return torch.zeros(*ids.shape, 12, requires_grad=True), hidden

    attention = torch.ones_like(x0)
    for exclude in (None, eos):
        losses = dllm_jepa_losses(encoder, encoder, torch.nn.Identity(), x0, attention, maskable, mask_token_id=11,
                                  t_low=0.001, t_high=0.002, lam=1.0, generator=torch.Generator().manual_seed(0),
                                  pool_exclude_id=exclude)
        pooled[exclude] = losses.z_low
    # with the fill left out, only the first EOS (the learned stop) keeps the second coordinate up
    assert (pooled[eos][:, 1] < pooled[None][:, 1]).all()


def test_l2_anchor_adds_gradient_of_squared_distance():
    layer = nn.Linear(3, 3)
    handles = attach_l2_anchor(list(layer.parameters()), strength=0.5, scale=0.5)
    base = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    layer(torch.zeros(1, 3)).sum().backward()  # data gradient of weight is 0 for a zero input
    assert torch.allclose(layer.weight.grad, 2 * 0.5 * 0.5 * (layer.weight.detach() - base))
    for h in handles:
        h.remove()


class _Encoder(nn.Module):
    def __init__(self, vocab=100, width=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)
        self.calls = 0

    def forward(self, ids, attention_mask):
        self.calls += 1
        h = self.emb(ids)
        return self.head(h), h


def test_lambda_zero_runs_no_target_forward():
    x0, attention, maskable = _batch(b=4)
    online, target = _Encoder(), _Encoder()
    losses = dllm_jepa_losses(online, target, Predictor(16, 1), x0, attention, maskable, mask_token_id=MASK,
                              t_low=0.2, t_high=0.7, lam=0.0, generator=torch.Generator().manual_seed(0))
    assert online.calls == 1 and target.calls == 0 and losses.jepa is None
    assert torch.equal(losses.total, losses.total)  # finite, computed
    losses = dllm_jepa_losses(online, target, Predictor(16, 1), x0, attention, maskable, mask_token_id=MASK,
                              t_low=0.2, t_high=0.7, lam=1.0, generator=torch.Generator().manual_seed(0))
    assert online.calls == 2 and target.calls == 1 and losses.jepa is not None
    assert losses.total.item() == pytest.approx(losses.diff.item() + losses.jepa.item(), rel=1e-5)


def test_jepa_gradient_reaches_online_and_predictor_not_target():
    x0, attention, maskable = _batch(b=4)
    online, target, predictor = _Encoder(), _Encoder(), Predictor(16, 1)
    losses = dllm_jepa_losses(online, target, predictor, x0, attention, maskable, mask_token_id=MASK, t_low=0.2,
                              t_high=0.7, lam=1.0, generator=torch.Generator().manual_seed(0))
    losses.total.backward()
    assert online.emb.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in predictor.parameters())
    assert all(p.grad is None for p in target.parameters())


def _tiny_backbone():
    from raydllm.engine.backbone import build_tiny
    from raydllm.core.config import ModelConfig

    torch.manual_seed(0)
    model, _ = build_tiny(ModelConfig(d_model=32, n_layers=2, n_heads=2))
    return model


def _tiny_inputs():
    ids = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[0, :4] = 0
    return ids, attention


def test_offloaded_ema_forward_matches_resident_and_swaps_back():
    online = _tiny_backbone()
    resident = EmaTarget(online, decay=0.9, device="cpu")
    offloaded = EmaTarget(online, decay=0.9, device="cpu", offload=True)
    masters = [t.data_ptr() for t in offloaded.params]
    during = {}

    def record(module, args):  # runs after the EMA's pre-hook (registered later): sees the swapped-in copy
        during[module] = module.weight.data_ptr()

    leaf = offloaded.module.blocks[0].qkv
    handle = leaf.register_forward_pre_hook(record)
    ids, attention = _tiny_inputs()
    with torch.no_grad():
        want = resident.module(ids, attention).logits
        got = offloaded.module(ids, attention).logits
    handle.remove()
    assert torch.equal(got, want)
    assert during[leaf] != leaf.weight.data_ptr()  # the forward really ran on a copy
    assert [t.data_ptr() for t in offloaded.params] == masters  # every master is back in place
    assert offloaded._host == {} and offloaded._swapped == {}


def test_offloaded_ema_restores_masters_when_forward_raises():
    offloaded = EmaTarget(_tiny_backbone(), decay=0.9, device="cpu", offload=True)
    masters = [t.data_ptr() for t in offloaded.params]
    with pytest.raises(IndexError), torch.no_grad():
        offloaded.module(torch.full((1, 4), 10_000), None)  # out of the vocabulary: the embedding raises
    assert [t.data_ptr() for t in offloaded.params] == masters and offloaded._host == {}


def test_offloaded_ema_update_equals_resident():
    online = _tiny_backbone()
    resident = EmaTarget(online, decay=0.9, device="cpu", chunk_size=3)
    offloaded = EmaTarget(online, decay=0.9, device="cpu", offload=True, chunk_size=3)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    resident.update(online.parameters())
    offloaded.update(online.parameters())
    assert all(torch.equal(a, b) for a, b in zip(resident.params, offloaded.params))
    assert not torch.equal(resident.params[0], online.tok_emb.weight)  # it moved, by the EMA rule


def test_ema_state_dict_round_trip_between_placements():
    online = _tiny_backbone()
    resident = EmaTarget(online, decay=0.9, device="cpu")
    offloaded = EmaTarget(online, decay=0.9, device="cpu", offload=True)
    with torch.no_grad():
        for p in online.parameters():
            p.mul_(2.0)
    resident.update(online.parameters())
    offloaded.load_state_dict(resident.state_dict())
    masters = [t.data_ptr() for t in offloaded.params]
    assert all(torch.equal(a, b) for a, b in zip(resident.params, offloaded.params))
    assert [t.data_ptr() for t in offloaded.params] == masters  # loaded into the masters, not replaced
    fresh = EmaTarget(_tiny_backbone(), decay=0.9, device="cpu")
    fresh.load_state_dict(offloaded.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.params, offloaded.params))


def test_uniform_view_rates_cover_all_rates_and_keep_the_target_view_more_masked():
    from raydllm.core.objective import view_rates

    assert view_rates(4, 0.2, 0.7) == (0.2, 0.7)  # the paper's fixed pair, untouched
    low, high = view_rates(20_000, 0.2, 0.7, "uniform", torch.Generator().manual_seed(0))
    assert low.shape == high.shape == (20_000,)
    assert bool((low > 0).all() and (high > low).all() and (high <= 1).all())
    # Spread over (0, 1), as LLaDA's SFT schedule: generation starts from fully masked answers.
    assert low.min() < 0.01 and low.max() > 0.99 and abs(float(low.mean()) - 0.5) < 0.01
    # The target view hides the same share of the visible tokens as the fixed pair: at t_L = 0.2, t_H = 0.7.
    share = ((high - low) / (1 - low))[low < 0.99]  # (float32 cancellation as t_L -> 1)
    assert torch.allclose(share, torch.full_like(share, 0.5 / 0.8), atol=1e-4)
    with pytest.raises(ValueError, match="rate_sampling"):
        view_rates(2, 0.2, 0.7, "beta")


def test_uniform_rate_sampling_masks_each_row_at_its_own_rate():
    from raydllm.core.objective import dllm_jepa_losses, view_rates

    torch.manual_seed(0)
    batch, length, vocab, width = 64, 400, 11, 8
    x0 = torch.randint(0, vocab - 1, (batch, length))
    attention = torch.ones(batch, length, dtype=torch.long)
    maskable = torch.ones(batch, length, dtype=torch.bool)
    seen = {}

    def online(ids, attention_mask):
        seen["low"] = (ids == vocab - 1).float().mean(dim=1)
        return torch.zeros(batch, length, vocab, requires_grad=True), torch.randn(batch, length, width)

    def target(ids, attention_mask):
        seen["high"] = (ids == vocab - 1).float().mean(dim=1)
        return None, torch.randn(batch, length, width)

    losses = dllm_jepa_losses(online, target, torch.nn.Identity(), x0, attention, maskable, mask_token_id=vocab - 1,
                              t_low=0.2, t_high=0.7, lam=1.0, generator=torch.Generator().manual_seed(5),
                              rate_sampling="uniform")
    low, high = view_rates(batch, 0.2, 0.7, "uniform", torch.Generator().manual_seed(5))
    assert torch.allclose(seen["low"], low, atol=0.08) and torch.allclose(seen["high"], high, atol=0.08)
    assert torch.isfinite(losses.total)


def test_the_l2_space_sweeps_the_anchor_strength():
    """search_spaces/gsm8k-l2.yaml: the paper's L2 arm (anchor on, no JEPA term) with lambda_L2 searched over
    the range where it goes from barely acting to pinning the weights (README: L2-to-base anchor)."""
    from raydllm.sweep.search_space import load_spec, trial_config

    spec = load_spec("search_spaces/gsm8k-l2.yaml")
    assert spec.space["loss.l2_lambda"].kind == "loguniform"
    cfg = trial_config(spec, {"loss.l2_lambda": 0.01, "train.lr": 1e-5}, spec.seeds[0])
    assert cfg.loss.anchor == "l2" and cfg.loss.l2_lambda == 0.01 and cfg.jepa.lam == 0
def _ema_motion_kept_in_bf16(step_size: float, updates: int = 1000) -> tuple[float, float]:
    """(share of the float32 EMA's motion a bf16 EMA keeps, share of bf16 weights that never moved)."""
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))
    with torch.no_grad():
        online[0].weight.normal_(0, 0.02)  # the embedded model's init scale
    e32 = EmaTarget(online, 0.996, dtype=torch.float32)
    e16 = EmaTarget(online, 0.996, dtype=torch.bfloat16)
    start32 = torch.cat([p.detach().flatten() for p in e32.params])
    start16 = torch.cat([p.detach().float().flatten() for p in e16.params])
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).sign() for p in online.parameters()]
    for _ in range(updates):
        with torch.no_grad():
            for p, d in zip(online.parameters(), direction):
                p.add_(step_size * d)
        e32.update(online.parameters())
        e16.update(online.parameters())
    m32 = torch.cat([p.flatten() for p in e32.params]) - start32
    m16 = torch.cat([p.float().flatten() for p in e16.params]) - start16
    return float(m16.dot(m32) / m32.dot(m32)), float((m16 == 0).float().mean())


def test_bf16_ema_loses_most_of_its_motion_and_config_warns_with_the_figure():
    from raydllm.core.config import load_config

    kept, frozen = _ema_motion_kept_in_bf16(1e-5)
    assert kept < 0.6 and frozen > 0.2  # the embedded model: 32% kept, 43% never move (config.BF16_EMA_WARNING)
    kept_large, _ = _ema_motion_kept_in_bf16(1e-3)
    assert kept_large > kept  # large steps survive bf16 rounding better
    with pytest.warns(UserWarning, match=r"keeps 32% of the float32 EMA's motion"):
        load_config("gsm8k", "local", ["jepa.ema_dtype=bfloat16"])


def test_zero3_is_refused_in_one_line():
    from raydllm.core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^train: train.zero_stage=3 is not supported yet: the EMA update, the L2 "
                                          r"anchor and rank-0 generation"):
        load_config("gsm8k", "local", ["train.zero_stage=3"])
