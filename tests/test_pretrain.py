"""The offline base: pretraining, the cache (built once, atomically, under a lock) and model.init."""
import json
import threading

import pytest
import torch

from raydllm.data import corpora

from raydllm.engine import pretrain
from raydllm.cli.app import build_parser
from raydllm.engine.backbone import load_backbone
from raydllm.core.config import ConfigError, ModelConfig

SMALL = dict(d_model=32, n_layers=2, n_heads=2)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def fast_defaults(monkeypatch, tmp_path):
    """A private cache and a recipe small enough for a unit test."""
    monkeypatch.setenv("RAYDLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "DEFAULT_STEPS", 6)
    monkeypatch.setattr(pretrain, "DEFAULT_SEQ_LEN", 32)
    monkeypatch.setattr(pretrain, "DEFAULT_BATCH_SIZE", 4)
    return tmp_path / "cache"


def test_pretrain_loss_falls_and_shows_a_progress_bar(capsys):
    stats = {}
    state = pretrain.pretrain_tiny(ModelConfig(**SMALL), steps=40, seed=0, seq_len=48, batch_size=8, lr=5e-3,
                                   progress=True, stats=stats)
    assert stats["final_loss"] < stats["first_loss"] - 0.5
    assert "tok_emb.weight" in state and all(torch.isfinite(v).all() for v in state.values())
    assert "pretrain tiny" in capsys.readouterr().err


def test_fast_byte_encoding_matches_the_tokenizer():
    from raydllm.core.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    text = "Héllo, wörld ☃ \x00\x7f\t\n#### 42 <unk> = 3 " * 50
    assert corpora.encode_text(tokenizer, text).tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_text_is_wikitext_valid_when_shared_data_exists(shared_data):
    assert corpora.wikitext_file("valid") == shared_data / "wikitext" / "valid.txt"
    assert "valid.txt" in corpora.corpus_tag(None)


def test_fallback_text_without_shared_data(monkeypatch, caplog):
    monkeypatch.setattr(corpora, "shared_data_dir", lambda: None)
    with caplog.at_level("WARNING", logger="raydllm.engine.pretrain"):
        text, tag = corpora.corpus_text(None)
    assert tag == "builtin-docstrings" and len(text) > 100_000
    assert "built-in text" in caplog.text
    state = pretrain.pretrain_tiny(ModelConfig(**SMALL), steps=2, seq_len=32, batch_size=4, progress=False)
    assert "lm_head.weight" in state


def test_base_is_built_once_even_when_two_workers_ask_together(fast_defaults, monkeypatch):
    calls = []
    real = pretrain.pretrain_tiny

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "pretrain_tiny", counting)
    cfg = ModelConfig(init="pretrained", **SMALL)
    results = [None, None]

    def worker(i):
        results[i] = pretrain.load_base_weights(cfg, progress=False)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    files = sorted(p.name for p in fast_defaults.iterdir())
    path = pretrain.base_path(cfg)
    assert path.parent == fast_defaults and path.name in files
    assert not [f for f in files if f.endswith(".tmp")]  # only the renamed file, no leftovers
    pretrain.load_base_weights(cfg, progress=False)  # cached: no third build
    assert len(calls) == 1
    # A different seed, step count or shape is a different cache entry.
    assert pretrain.base_path(cfg, seed=1) != path and pretrain.base_path(cfg, steps=7) != path
    assert pretrain.base_path(ModelConfig(init="pretrained", d_model=64, n_layers=2, n_heads=2)) != path


def test_init_pretrained_and_init_path_through_load_backbone(fast_defaults, tmp_path):
    backbone, _ = load_backbone(ModelConfig(init="pretrained", **SMALL))
    cached, _ = pretrain.read_weights(pretrain.base_path(ModelConfig(**SMALL)))
    assert all(torch.equal(backbone.model.state_dict()[k], v) for k, v in cached.items())

    path = tmp_path / "my-base.pt"
    pretrain.save_weights(cached, path)
    from_file, _ = load_backbone(ModelConfig(init=str(path), **SMALL))
    assert all(torch.equal(from_file.model.state_dict()[k], v) for k, v in cached.items())

    with pytest.raises(ConfigError, match="model.init"):
        load_backbone(ModelConfig(init=str(path), d_model=64, n_layers=2, n_heads=2))
    with pytest.raises(ConfigError, match="model.init"):
        load_backbone(ModelConfig(init=str(tmp_path / "missing.pt"), **SMALL))


def test_cli_pretrain(fast_defaults, tmp_path, capsys):
    parser = build_parser()
    out = tmp_path / "base.pt"
    args = parser.parse_args(["pretrain", "--steps", "3", "--seed", "1", "--out", str(out), "--json",
                              "--set", "d_model=32", "--set", "n_layers=2", "--set", "n_heads=2"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["weights"] == str(out) and out.is_file() and result["final_loss"] > 0
    z = result["embeddings"]  # the paper's formulas on both views of 100 WikiText test windows
    assert z["samples"] == 100 and 1.0 <= z["eff_rank"] <= 32 and 0.0 <= z["cos_diversity"] <= 1.0
    assert z["eff_rank"] == pytest.approx((z["tL_eff_rank"] + z["tH_eff_rank"]) / 2)
    args = parser.parse_args(["pretrain", "--steps", "3", "--no-progress",
                              "--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert str(fast_defaults) in printed and "final loss" in printed and "effective rank" in printed


def test_contrastive_term_is_infonce_between_two_views(monkeypatch):
    from raydllm.core.model import build_tiny

    torch.manual_seed(0)
    model, tokenizer = build_tiny(ModelConfig(**SMALL))
    x0 = torch.randint(0, 250, (4, 24))
    plain, diff_plain = pretrain._step_loss(model, x0, mask_id=tokenizer.mask_token_id,
                                            generator=torch.Generator().manual_seed(0), contrast=0.0)
    assert torch.equal(plain.detach(), diff_plain)
    total, diff = pretrain._step_loss(model, x0, mask_id=tokenizer.mask_token_id,
                                      generator=torch.Generator().manual_seed(0), contrast=0.5)
    nce = (total.detach() - diff) / 0.5
    # 4 rows: an untrained model's InfoNCE is near log(4); it can never be negative
    assert 0.5 < float(nce) < 3.0
    total.backward()
    assert model.tok_emb.weight.grad is not None
