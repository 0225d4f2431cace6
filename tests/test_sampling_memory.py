"""Sampling memory and Dream's padded rows: the Gumbel noise is held for the decided window only yet consumes the
generator exactly as the full [B, L, V] float64 draw (so LLaDA-parity streams are kept); `Backbone.logits` asks the
model for no hidden-state stack; Dream's pad queries attend to themselves, so an attention kernel that returns NaN
for a fully masked row cannot leak NaN into real tokens, whose outputs are bitwise those of the old mask."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import raydllm.core.archs.dream as dream_arch
import raydllm.core.sampler as sampler
from archs import save_tiny_dream, save_tiny_llada
from raydllm.core.config import ModelConfig
from raydllm.engine.backbone import load_backbone
from raydllm.evaluation.evaluate import left_pad

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_window_noise_is_the_full_draws_window_and_leaves_the_stream_where_it_would(monkeypatch, chunk):
    monkeypatch.setattr(sampler, "_NOISE_CHUNK", chunk)
    shape = torch.Size((3, 11, 5))
    full_gen, window_gen = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    full = torch.rand(shape, dtype=torch.float64, generator=full_gen)
    window = sampler._window_uniform(shape, 4, 9, window_gen, torch.device("cpu"))
    assert window.shape == (3, 5, 5)
    assert torch.equal(window, full[:, 4:9])
    assert torch.equal(torch.rand(4, generator=full_gen), torch.rand(4, generator=window_gen))


def test_backbone_logits_requests_no_hidden_states(tmp_path):
    backbone = load_backbone(ModelConfig(name=str(save_tiny_llada(tmp_path))))[0].eval()
    asked = []
    original = backbone.model.forward

    def recording(*args, **kwargs):
        asked.append(kwargs.get("output_hidden_states"))
        return original(*args, **kwargs)

    backbone.model.forward = recording
    ids = torch.tensor([list(b"hello there")])
    with torch.no_grad():
        logits = backbone.logits(ids)
        full_logits, _ = backbone(ids)
    assert asked == [False, True]
    assert torch.equal(logits, full_logits)


def nan_for_empty_rows(q, k, v, keep, cache, block_start, dropout):
    """Attention whose fully masked rows come out NaN (softmax over all -inf), as some CUDA kernels do."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return (F.softmax(scores, dim=-1) @ v).transpose(1, 2).flatten(2), (k, v)


def test_dream_pad_queries_attend_to_themselves(tmp_path, monkeypatch):
    backbone = load_backbone(ModelConfig(name=str(save_tiny_dream(tmp_path))))[0].eval()
    ids, attention = left_pad([list(b"Q: 3 + 4 = ?\nA:"), list(b"Hi:")], pad_id=backbone.ids.pad)
    real = attention.bool()
    seen = []
    sdpa = dream_arch.attend

    def recording(q, k, v, keep, *rest):
        seen.append(keep)
        return sdpa(q, k, v, keep, *rest)

    monkeypatch.setattr(dream_arch, "attend", recording)
    with torch.no_grad():
        new = backbone.logits(ids, attention)
    assert seen and all(bool(keep.any(dim=-1).all()) for keep in seen), "a query row attends to nothing"

    old_keep = real[:, None, None, :] & real[:, None, :, None]  # Dream's own keep[i] & keep[j]
    monkeypatch.setattr(dream_arch, "attend", lambda q, k, v, keep, *rest: sdpa(q, k, v, old_keep, *rest))
    with torch.no_grad():
        old = backbone.logits(ids, attention)
    assert torch.equal(new[real], old[real])  # real tokens: bitwise the outputs of the old mask

    monkeypatch.setattr(dream_arch, "attend", nan_for_empty_rows)
    with torch.no_grad():
        guarded = backbone.logits(ids, attention)
    assert not torch.isnan(guarded).any()
    assert torch.allclose(guarded[real], new[real], atol=1e-5)
    monkeypatch.setattr(dream_arch, "attend", lambda q, k, v, keep, *rest: nan_for_empty_rows(q, k, v, old_keep,
                                                                                                 *rest))
    with torch.no_grad():
        leaked = backbone.logits(ids, attention)
    assert torch.isnan(leaked[real]).any()  # the hazard the self-attending pads remove
