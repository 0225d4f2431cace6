"""Preservation probes: WikiText loss, layer drift, collapse statistics, MMLU check, run_probes."""
import copy
import json

import pytest
import torch

from raydllm.backbone import load_backbone
from raydllm.config import ModelConfig
from raydllm.probes import (collapse_stats, cosine_diversity, effective_rank, layer_drift, mmlu_subset, run_probes,
                            thirds, wikitext_chunks, wikitext_loss)

SMALL = ModelConfig(d_model=32, n_layers=3, n_heads=2)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_backbone(SMALL)


def _batches(n=3, batch=4, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 250, (batch, length), generator=g)
        attention = torch.ones_like(ids)
        attention[0, :5] = 0  # one left-padded row
        ids[0, :5] = 256
        out.append((ids, attention))
    return out


def test_drift_against_itself_is_zero(tiny):
    backbone, _ = tiny
    drift = layer_drift(backbone, backbone, _batches())
    assert set(drift) == {"layer_1", "layer_2", "layer_3", "early", "middle", "late"}
    assert all(abs(v) < 1e-6 for v in drift.values())


def test_drift_grows_after_perturbing_weights(tiny):
    backbone, _ = tiny
    perturbed = copy.deepcopy(backbone)
    with torch.no_grad():
        for p in perturbed.model.blocks[1].parameters():
            p.add_(0.5 * torch.randn_like(p))
    drift = layer_drift(backbone, perturbed, _batches())
    assert drift["layer_1"] < 1e-6  # untouched first block
    assert drift["layer_2"] > 1e-3 and drift["layer_3"] > 1e-3
    assert drift["late"] == pytest.approx(drift["layer_3"])


def test_thirds_cover_all_layers():
    assert thirds(4) == {"early": [1, 2], "middle": [3], "late": [4]}
    assert sum(len(v) for v in thirds(32).values()) == 32


def test_effective_rank_and_diversity():
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(4000, 16, generator=g)
    assert effective_rank(iso) > 15.5
    rank1 = torch.randn(500, 1, generator=g) @ torch.randn(1, 16, generator=g)
    assert effective_rank(rank1) == pytest.approx(1.0, abs=1e-3)
    same = torch.randn(1, 16, generator=g).repeat(10, 1)
    assert cosine_diversity(same) == pytest.approx(0.0, abs=1e-9)
    assert cosine_diversity(iso[:200]) == pytest.approx(1.0, abs=0.05)
    stats = collapse_stats(same)
    assert stats["std_mean"] == pytest.approx(0.0, abs=1e-6) and stats["eff_rank"] == pytest.approx(1.0)
    stats = collapse_stats(iso)
    assert stats["std_min"] > 0.9 and set(stats) == {"std_mean", "std_min", "eff_rank", "cos_diversity"}


def test_wikitext_loss_reads_the_test_split_and_is_deterministic(tiny, shared_data):
    backbone, tokenizer = tiny
    path = shared_data / "wikitext" / "test.txt"
    chunks = wikitext_chunks(tokenizer, None, seq_len=64, max_chunks=8)
    assert torch.equal(chunks, wikitext_chunks(tokenizer, path, seq_len=64, max_chunks=8))  # default = test.txt
    assert tokenizer.decode(chunks[0]) == path.read_text(encoding="utf-8").encode()[:64].decode(errors="ignore")[:len(
        tokenizer.decode(chunks[0]))]
    kw = dict(seq_len=64, max_chunks=8, batch_size=4)
    a = wikitext_loss(backbone, tokenizer, path, seed=0, **kw)
    b = wikitext_loss(backbone, tokenizer, path, seed=0, **kw)
    c = wikitext_loss(backbone, tokenizer, path, seed=1, **kw)
    assert a == b and a != c
    assert 4.0 < a < 7.0  # an untrained model is near log(260) = 5.56


def test_run_probes_flat_dict(tiny, shared_data, tmp_path):
    backbone, tokenizer = tiny
    finetuned = copy.deepcopy(backbone)
    with torch.no_grad():
        finetuned.model.lm_head.weight.mul_(1.5)
        weight = finetuned.model.blocks[2].mlp[0].weight
        weight.add_(0.2 * torch.randn_like(weight))
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("".join(json.dumps({"subject": s, "question": f"What is {i} + 1?",
                                        "choices": [str(i + 1), "0", "7", "9"], "answer": 0}) + "\n"
                            for s in ("math", "bio") for i in range(4)))
    out = run_probes(backbone, finetuned, tokenizer, wikitext_path=shared_data / "wikitext" / "test.txt", seq_len=32,
                     max_chunks=8, batch_size=4, mmlu_path=mmlu, mmlu_per_subject=3)
    assert out["probe/wikitext_delta"] == pytest.approx(out["probe/wikitext_loss"] - out["probe/wikitext_loss_base"])
    assert out["probe/drift_layer_1"] < 1e-6 < out["probe/drift_layer_3"]
    for key in ("probe/drift_early", "probe/drift_middle", "probe/drift_late", "probe/z_eff_rank", "probe/z_std_mean",
                "probe/z_std_min", "probe/z_cos_diversity", "probe/z_base_eff_rank", "probe/mmlu_accuracy"):
        assert key in out
    assert out["probe/mmlu_n"] == 6 and 0 <= out["probe/mmlu_accuracy"] <= 1
    assert all(isinstance(v, float) for v in out.values())


def test_mmlu_csv_layout(tiny, tmp_path):
    backbone, tokenizer = tiny
    (tmp_path / "astronomy_test.csv").write_text('"Which is a star?",Sun,Moon,Mars,Io,A\n"2+2?",3,4,5,6,B\n')
    result = mmlu_subset(backbone, tokenizer, tmp_path, per_subject=5)
    assert result["n"] == 2.0 and result["accuracy"] in (0.0, 0.5, 1.0)
