"""Preservation probes: WikiText loss, layer drift, collapse statistics, MMLU check, run_probes."""
import copy
import json

import pytest
import torch

from raydllm.engine.backbone import load_backbone
from raydllm.core.config import ModelConfig
from raydllm.evaluation.probes import (collapse_stats, cosine_diversity, effective_rank, layer_drift, load_mmlu, mmlu_subset,
                            run_probes, stratified_sample, thirds, view_embeddings, wikitext_chunks, wikitext_loss)

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


def test_effective_rank_of_k_equal_orthogonal_directions_is_k():
    for k in (1, 3, 8):
        directions = torch.eye(16)[:k] * 2.5  # k orthogonal directions, equal energy
        z = directions.repeat(5, 1)  # each direction 5 times: singular values all equal
        assert effective_rank(z) == pytest.approx(k, rel=1e-9)
    g = torch.Generator().manual_seed(0)
    rank1 = torch.randn(500, 1, generator=g) @ torch.randn(1, 16, generator=g)
    assert effective_rank(rank1) == pytest.approx(1.0, abs=1e-6)
    # not centred: a shared offset is one more direction, and dominates; centring removes it
    shifted = torch.eye(16)[:4].repeat(5, 1) + 100 * torch.eye(16)[15]
    assert effective_rank(shifted) < 1.1
    assert effective_rank(shifted, centred=True) == pytest.approx(3.0, rel=1e-6)  # 4 centred points span 3


def test_cosine_diversity_uses_absolute_cosine_over_seeded_pairs():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(1, 16, generator=g)
    antipodal = torch.cat([direction.repeat(50, 1), -direction.repeat(50, 1)])
    antipodal = antipodal + 1e-4 * torch.randn(antipodal.shape, generator=g)
    assert cosine_diversity(antipodal) == pytest.approx(0.0, abs=1e-3)  # a signed mean would say ~1
    orthogonal = torch.eye(16).repeat(1, 1)
    assert cosine_diversity(orthogonal) == pytest.approx(1.0, abs=1e-12)
    iso = torch.randn(200, 64, generator=g)
    assert cosine_diversity(iso, seed=0) == cosine_diversity(iso, seed=0) != cosine_diversity(iso, seed=1)
    assert 0.85 < cosine_diversity(iso) < 0.95  # E|cos| of random 64-d vectors ~ sqrt(2 / (pi * 64)) = 0.1


def test_collapse_stats_keys_and_values():
    g = torch.Generator().manual_seed(0)
    same = torch.randn(1, 16, generator=g).repeat(10, 1)
    stats = collapse_stats(same)
    assert stats["std_mean"] == pytest.approx(0.0, abs=1e-6) and stats["eff_rank"] == pytest.approx(1.0)
    assert stats["cos_diversity"] == pytest.approx(0.0, abs=1e-9)
    stats = collapse_stats(torch.randn(4000, 16, generator=g))
    assert stats["std_min"] > 0.9 and stats["eff_rank"] > 15
    assert set(stats) == {"std_mean", "std_min", "eff_rank", "eff_rank_centred", "cos_diversity"}


def test_drift_is_one_minus_cos_of_raw_pooled_states():
    class Fixed:
        """all_hidden_states returns given tensors (one 'layer' after the embedding)."""

        def __init__(self, hidden):
            self.hidden = hidden
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def parameters(self):
            return iter([self.weight])

        def all_hidden_states(self, ids, attention):
            return (self.hidden, self.hidden)

    batch = [(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))]
    a = torch.zeros(2, 3, 4)
    a[..., 0] = 1.0
    b = torch.zeros(2, 3, 4)
    b[..., 1] = 1.0
    assert layer_drift(Fixed(a), Fixed(a.clone()), batch)["layer_1"] == pytest.approx(0.0, abs=1e-7)
    assert layer_drift(Fixed(a), Fixed(b), batch)["layer_1"] == pytest.approx(1.0, abs=1e-7)
    # a constant offset on every dimension: cos of the raw means moves; a LayerNorm would hide it entirely
    c = a + 5.0
    expected = 1 - float(torch.nn.functional.cosine_similarity(a[0].mean(0), c[0].mean(0), dim=0))
    assert expected > 0.1
    assert layer_drift(Fixed(a), Fixed(c), batch)["layer_1"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("split, name", [("test", "test.txt"), ("validation", "valid.txt")])
def test_wikitext_loss_reads_the_split_and_is_deterministic(tiny, shared_data, split, name):
    backbone, tokenizer = tiny
    path = shared_data / "wikitext" / name
    chunks = wikitext_chunks(tokenizer, None, split=split, seq_len=64, max_chunks=8)
    assert torch.equal(chunks, wikitext_chunks(tokenizer, path, seq_len=64, max_chunks=8))
    assert tokenizer.decode(chunks[0]) == path.read_text(encoding="utf-8").encode()[:64].decode(errors="ignore")[:len(
        tokenizer.decode(chunks[0]))]
    kw = dict(seq_len=64, max_chunks=8, batch_size=4)
    a = wikitext_loss(backbone, tokenizer, path, seed=0, **kw)
    b = wikitext_loss(backbone, tokenizer, path, seed=0, **kw)
    c = wikitext_loss(backbone, tokenizer, path, seed=1, **kw)
    assert a == b and a != c
    assert 4.0 < a < 7.0  # an untrained model is near log(260) = 5.56


def _mmlu_rows(subjects=57, per_subject=12):
    return [{"subject": f"subject_{s:02d}", "question": f"q{s}-{i}: what is {i} + 1?",
             "choices": [str(i + 1), "0", "7", "9"], "answer": 0} for s in range(subjects) for i in range(per_subject)]


def test_run_probes_flat_dict(tiny, shared_data, tmp_path):
    backbone, tokenizer = tiny
    finetuned = copy.deepcopy(backbone)
    with torch.no_grad():
        finetuned.model.lm_head.weight.mul_(1.5)
        weight = finetuned.model.blocks[2].mlp[0].weight
        weight.add_(0.2 * torch.randn_like(weight))
    rows = stratified_sample(_mmlu_rows(subjects=2, per_subject=4), 6)
    out = run_probes(backbone, finetuned, tokenizer, t_low=0.2, t_high=0.7, split="test", seq_len=32,
                     max_chunks=12, batch_size=4, mmlu_rows=rows)
    assert out["probe/wikitext_delta"] == pytest.approx(out["probe/wikitext_loss"] - out["probe/wikitext_loss_base"])
    assert out["probe/wikitext_tokens"] == 12 * 32
    assert out["probe/drift_layer_1"] < 1e-6 < out["probe/drift_layer_3"]
    for key in ("probe/drift_early", "probe/drift_middle", "probe/drift_late", "probe/z_std_mean", "probe/z_std_min",
                "probe/z_tL_eff_rank", "probe/z_tH_eff_rank", "probe/z_cos_diversity", "probe/z_base_eff_rank",
                "probe/z_base_tH_cos_diversity", "probe/mmlu_accuracy"):
        assert key in out
    assert out["probe/z_eff_rank"] == pytest.approx((out["probe/z_tL_eff_rank"] + out["probe/z_tH_eff_rank"]) / 2)
    assert out["probe/z_tL_eff_rank"] != out["probe/z_tH_eff_rank"]  # two different views
    assert 1.0 <= out["probe/z_tL_eff_rank"] <= 12  # 12 samples cap the rank
    assert out["probe/mmlu_n"] == 6 and 0 <= out["probe/mmlu_accuracy"] <= 1
    assert all(isinstance(v, float) for v in out.values())


def test_views_are_the_same_for_every_model_and_differ_by_rate(tiny, shared_data):
    backbone, tokenizer = tiny
    chunks = wikitext_chunks(tokenizer, split="test", seq_len=32, max_chunks=6)
    a = view_embeddings(backbone, chunks, t_low=0.2, t_high=0.7, seed=3, batch_size=4)
    b = view_embeddings(backbone, chunks, t_low=0.2, t_high=0.7, seed=3, batch_size=4)
    assert torch.equal(a["tL"], b["tL"]) and torch.equal(a["tH"], b["tH"])
    assert a["tL"].shape == (6, 32) and not torch.allclose(a["tL"], a["tH"])


def test_stratified_mmlu_subset_from_a_local_file(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _mmlu_rows()))
    rows = load_mmlu(path)
    subset = stratified_sample(rows, 500, seed=0)
    assert len(subset) == 500
    counts = {}
    for r in subset:
        counts[r["subject"]] = counts.get(r["subject"], 0) + 1
    assert len(counts) == 57 and sorted(set(counts.values())) == [8, 9]
    assert sum(v == 9 for v in counts.values()) == 500 - 57 * 8
    assert len({r["question"] for r in subset}) == 500  # no item twice
    assert subset == stratified_sample(load_mmlu(path), 500, seed=0)  # same items for every model
    assert subset != stratified_sample(rows, 500, seed=1)
    few = stratified_sample(_mmlu_rows(subjects=3, per_subject=2), 500)
    assert len(few) == 6  # a subject gives what it has


def test_mmlu_csv_layout(tiny, tmp_path):
    backbone, tokenizer = tiny
    (tmp_path / "astronomy_test.csv").write_text('"Which is a star?",Sun,Moon,Mars,Io,A\n"2+2?",3,4,5,6,B\n')
    rows = stratified_sample(load_mmlu(tmp_path), 500)
    assert {r["subject"] for r in rows} == {"astronomy"} and len(rows) == 2
    result = mmlu_subset(backbone, tokenizer, rows)
    assert result["n"] == 2.0 and result["accuracy"] in (0.0, 0.5, 1.0)


def test_final_evaluation_runs_probes_mmlu_and_logs_sampler_params(process_group, tmp_path, shared_data):
    from mlflow.tracking import MlflowClient

    from raydllm.core.config import load_config
    from raydllm.evaluation.trial import TrialLoop

    mmlu = tmp_path / "mmlu"
    mmlu.mkdir()
    for subject in ("anatomy", "virology", "astronomy"):
        (mmlu / f"{subject}_test.csv").write_text("".join(f'"{subject} {i}?",a,b,c,d,A\n' for i in range(5)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    cfg = load_config("gsm8k", "local", ["model.init=random", "model.d_model=32", "model.n_layers=2",
                                         "model.n_heads=2", "data.synthetic_size=200", "data.val_limit=8",
                                         "train.micro_batch_size=4", "train.max_steps=1", "eval.final_limit=2",
                                         "eval.final_shots=[0,1]", "eval.probe_chunks=6", "eval.probe_seq_len=32",
                                         "eval.gen_length=8", "eval.sampler_steps=4", f"eval.mmlu={mmlu}",
                                         "eval.mmlu_items=7"])
    loop = TrialLoop(cfg, rank=0, world=1, device=torch.device("cpu"), tracking={"tracking_uri": uri, "run_id": run_id})
    assert len(loop.mmlu_rows) == 7
    out = loop.final_evaluation()
    assert out["probe/mmlu_n"] == 7 and "probe/mmlu_delta" in out
    assert out["probe/wikitext_tokens"] == 6 * 32 and "probe/z_tH_eff_rank" in out
    assert "final/val/0shot/accuracy" in out and "final/val/1shot/accuracy" in out
    params = client.get_run(run_id).data.params
    assert params["sampler.steps"] == "4" and params["sampler.gen_length"] == "8"
    assert params["sampler.block_length"] == "8" and params["sampler.remasking"] == "low_confidence"


def test_forgetting_objective_at_every_report_against_the_base(process_group, tmp_path, monkeypatch):
    """eval.report_probe_chunks: each report carries wikitext_delta = WikiText loss now - the base's (the weights
    before step 1, on the same chunks and masks); the base's own values are logged once, at step 0."""
    import ray.train
    from mlflow.tracking import MlflowClient

    from raydllm.core.config import load_config
    from raydllm.evaluation.trial import TrialLoop

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    cfg = load_config("gsm8k", "local", ["model.init=random", "model.d_model=32", "model.n_layers=2",
                                         "model.n_heads=2", "data.synthetic_size=200", "data.val_limit=8",
                                         "train.micro_batch_size=4", "train.max_steps=20", "train.lr=3e-3",
                                         "train.eval_every=10", "eval.final=false", "eval.probe_seq_len=32",
                                         "eval.report_probe_chunks=3"])
    tracking = {"tracking_uri": uri, "run_id": run_id}
    loop = TrialLoop(cfg, rank=0, world=1, device=torch.device("cpu"), tracking=tracking)
    assert loop.forgetting_chunks.shape == (3, 32)
    assert loop.forgetting_probe()["wikitext_delta"] == 0.0  # untrained: the base itself
    reported = []
    monkeypatch.setattr(ray.train, "report", lambda summary, **kw: reported.append(summary))
    for _ in range(10):
        loop.step += 1
        loop.train_step()
    loop.report([], 1.0)
    summary = reported[-1]
    now = wikitext_loss(loop.engine.module.backbone, loop.tokenizer, chunks=loop.forgetting_chunks, seed=0,
                        batch_size=4)
    assert summary["wikitext_delta"] == pytest.approx(now - loop.base_wikitext_loss)
    assert summary["wikitext_delta"] != 0.0 and summary["time/forgetting_probe_s"] > 0
    metrics = client.get_run(run_id).data.metrics
    assert metrics["base/wikitext_delta"] == 0.0 and metrics["base/wikitext_loss"] == loop.base_wikitext_loss
    assert metrics["wikitext_delta"] == pytest.approx(summary["wikitext_delta"])
    assert [m.step for m in client.get_metric_history(run_id, "base/val_loss_diff")] == [0]
    # A resumed attempt (a new loop on the same run) measures the base again but does not log it twice.
    TrialLoop(cfg, rank=0, world=1, device=torch.device("cpu"), tracking=tracking)
    assert len(client.get_metric_history(run_id, "base/val_loss_diff")) == 1


def test_effective_rank_hand_computed_unequal_singular_values():
    """diag(3, 1): singular values 3 and 1, r_eff = (3 + 1)^2 / (9 + 1) = 1.6 (the participation ratio
    (9 + 1)^2 / (81 + 1) = 1.2195 would be wrong; equal singular values cannot tell the two apart)."""
    z = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert effective_rank(z) == pytest.approx(1.6, abs=1e-12)
    # rotate it: the rank is a property of the singular values, not of the basis
    rotation = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    assert effective_rank(rotation @ z @ rotation.T) == pytest.approx(1.6, abs=1e-9)


def test_run_probes_masks_wikitext_at_half(tiny, shared_data, monkeypatch):
    """The forgetting probe's WikiText loss masks each token with probability 0.5: observed as the rate passed to
    the masking and the fraction of tokens it actually masked."""
    import raydllm.evaluation.probes as probes

    seen = []
    original = probes.mask_tokens

    def spy(x0, rate, *args, **kwargs):
        x_t, masked = original(x0, rate, *args, **kwargs)
        seen.append((float(rate) if not torch.is_tensor(rate) else None, int(masked.sum()), masked.numel()))
        return x_t, masked

    monkeypatch.setattr(probes, "mask_tokens", spy)
    backbone, tokenizer = tiny
    run_probes(backbone, backbone, tokenizer, t_low=0.2, t_high=0.7, split="test", seq_len=32, max_chunks=12,
               batch_size=4)
    wikitext = [(m, n) for rate, m, n in seen if rate == 0.5]
    assert wikitext, f"no masking at rate 0.5; rates seen: {sorted({r for r, _, _ in seen if r is not None})}"
    masked, total = map(sum, zip(*wikitext))
    assert total == 2 * 12 * 32 and 0.4 < masked / total < 0.6  # base and fine-tuned, 384 tokens each
