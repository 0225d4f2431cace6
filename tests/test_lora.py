"""LoRA mode in one process (a one-rank gloo group, a real DeepSpeed engine, no Ray): the adapter-only EMA target,
the frozen base, exact resume from an adapter-only checkpoint, and `raydllm eval` on it."""
import json

import pytest
import torch

from raydllm.engine.backbone import BaseView, load_backbone
from raydllm.engine.checkpoints import read_checkpoint_state
from raydllm.core.config import ConfigError, load_config
from raydllm.core.objective import EmaAdapters, pool
from raydllm.engine.worker import WorkerLoop

SMALL = ["model.init=random", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.synthetic_size=400",
         "data.val_limit=16", "train.micro_batch_size=8", "train.max_steps=40", "train.lr=3e-3",
         "model.lora.rank=4"]


def _loop(*overrides):
    cfg = load_config("gsm8k", "local", SMALL + list(overrides))
    return WorkerLoop(cfg, rank=0, world=1, device=torch.device("cpu"))


def _batch(loop):
    from raydllm.data.sft import collate

    return collate(loop.train_records[:4], loop.ids.pad)


def _frozen(loop):
    return {n: p.detach().clone() for n, p in loop.engine.module.backbone.named_parameters() if not p.requires_grad}


def _adapters(loop):
    return [p for p in loop.engine.module.backbone.parameters() if p.requires_grad]


def _z_high(loop, batch):
    with torch.no_grad():
        _, hidden = loop._target()(batch.input_ids, batch.attention_mask)
    return pool(hidden, batch.attention_mask.bool())


def test_lora_loop_trains_adapters_only_with_an_adapter_ema(process_group):
    loop = _loop("jepa.lambda=1")
    assert isinstance(loop.ema, EmaAdapters) and loop.lora
    counts = loop.param_counts
    n_adapters = sum(p.numel() for p in _adapters(loop))
    n_predictor = sum(p.numel() for p in loop.engine.module.predictor.parameters())
    assert counts["params/trainable"] == n_adapters + n_predictor < counts["params/total"]
    # The EMA is the adapters in float32, nothing of the base.
    assert sum(p.numel() for p in loop.ema.params) == n_adapters
    assert all(p.dtype == torch.float32 for p in loop.ema.params)
    assert len(list(loop.ema.module.parameters())) == 0
    base = _frozen(loop)
    online_before = [p.detach().clone() for p in _adapters(loop)]
    ema_before = [p.clone() for p in loop.ema.params]
    for _ in range(3):
        metrics = loop.train_step()
    assert metrics["loss_jepa"] > 0
    after = dict(loop.engine.module.backbone.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())  # the base never moves
    assert any(not torch.equal(a, b) for a, b in zip(online_before, _adapters(loop)))
    # theta' <- 0.996 theta' + 0.004 theta after each step: it moved, and it lags the online adapters.
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, loop.ema.params))
    assert any(not torch.equal(a, b) for a, b in zip(loop.ema.params, _adapters(loop)))


def test_target_forward_reads_the_ema_adapters_not_the_online_ones(process_group):
    loop = _loop("jepa.lambda=1")
    for _ in range(2):
        loop.train_step()  # the online and EMA adapters now differ
    batch = _batch(loop)
    online_data = [p.data_ptr() for p in _adapters(loop)]
    z = _z_high(loop, batch)
    assert [p.data_ptr() for p in _adapters(loop)] == online_data  # swapped back after the forward
    # Changing the online adapters leaves z_H alone ...
    with torch.no_grad():
        for p in _adapters(loop):
            p.add_(0.5)
    assert torch.equal(_z_high(loop, batch), z)
    # ... changing the EMA adapters changes it.
    with torch.no_grad():
        for p in loop.ema.params:
            p.add_(0.5)
    assert not torch.allclose(_z_high(loop, batch), z)
    # The target forward runs the same modules as the online forward, with the EMA swapped in: z_H equals the
    # online backbone's pooled state once the online adapters hold the EMA values.
    with torch.no_grad():
        for p, e in zip(_adapters(loop), loop.ema.params):
            p.copy_(e)
        _, hidden = loop.engine.module.backbone(batch.input_ids, batch.attention_mask)
    assert torch.allclose(pool(hidden, batch.attention_mask.bool()), _z_high(loop, batch))


def test_target_forward_puts_the_online_adapters_back_when_it_raises(process_group):
    loop = _loop("jepa.lambda=1")
    online_data = [p.data_ptr() for p in _adapters(loop)]
    with pytest.raises(Exception):
        loop.ema.module(torch.zeros(1, 1000, dtype=torch.long), None)  # longer than model.max_seq_len
    assert [p.data_ptr() for p in _adapters(loop)] == online_data
    assert loop.engine.module.backbone.training and not loop.ema.active


def test_lora_resume_is_exact_from_an_adapter_only_checkpoint(process_group, tmp_path):
    a = _loop("jepa.lambda=1")
    for _ in range(3):
        a.train_step()
    a.save(str(tmp_path))
    saved = read_checkpoint_state(tmp_path) if (tmp_path / "raydllm.json").is_file() else None
    assert saved is not None
    trainable = {"backbone." + n for n, p in a.engine.module.backbone.named_parameters() if p.requires_grad}
    backbone_keys = {k for k in saved if k.startswith("backbone.")}
    assert backbone_keys == trainable  # adapters only: no base weight in the checkpoint
    assert any(k.startswith("predictor.") for k in saved)
    assert set(torch.load(tmp_path / "ema.pt")) == set(a.ema.names)
    losses_a = [a.train_step() for _ in range(2)]

    b = _loop("jepa.lambda=1")
    b.restore(str(tmp_path))
    assert b.step == 3
    losses_b = [b.train_step() for _ in range(2)]
    assert [(m["loss_total"], m["loss_jepa"]) for m in losses_a] == [(m["loss_total"], m["loss_jepa"])
                                                                     for m in losses_b]
    for p, q in zip(a.engine.module.parameters(), b.engine.module.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a.ema.params, b.ema.params):
        assert torch.equal(p, q)


def test_baseline_lora_has_no_ema(process_group):
    loop = _loop("jepa.lambda=0")
    assert loop.ema is None and loop.lora
    assert "loss_jepa" not in loop.train_step()


def test_eval_scores_a_lora_checkpoint_merged(process_group, tmp_path, capsys):
    from raydllm.cli.app import build_parser
    from raydllm.evaluation.evaluate import load_checkpoint_backbone

    loop = _loop("jepa.lambda=1")
    for _ in range(3):
        loop.train_step()
    folder = tmp_path / "checkpoint_000003"
    folder.mkdir()
    loop.save(str(folder))
    batch = _batch(loop)
    online = loop.engine.module.backbone.eval()
    with torch.no_grad():
        expected = online.logits(batch.input_ids, batch.attention_mask)
        expected_base = BaseView(online).logits(batch.input_ids, batch.attention_mask)
        expected_ema = loop.ema.module(batch.input_ids, batch.attention_mask)[0]

    merged, _, cfg = load_checkpoint_backbone(tmp_path)
    assert cfg.model.lora.rank == 4 and not merged.is_lora  # a plain model, adapters merged in
    with torch.no_grad():
        assert torch.allclose(merged.logits(batch.input_ids, batch.attention_mask), expected, atol=1e-5)
        ema, _, _ = load_checkpoint_backbone(tmp_path, ema=True)
        assert torch.allclose(ema.logits(batch.input_ids, batch.attention_mask), expected_ema, atol=1e-5)
        base, _, _ = load_checkpoint_backbone(tmp_path, base=True)
        assert not base.is_lora
        assert torch.allclose(base.logits(batch.input_ids, batch.attention_mask), expected_base, atol=1e-6)
        assert not torch.allclose(expected_base, expected, atol=1e-3)  # the adapters did something

    args = build_parser().parse_args(["eval", str(folder), "gsm8k", "--limit", "2", "--gen-length", "8",
                                      "--split", "validation", "--json", "--no-progress"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metrics"]["n"] == 2 and result["step"] == 3


def test_lora_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="load_in_4bit needs model.lora.rank > 0"):
        load_config("gsm8k", "local", ["model.lora.load_in_4bit=true"])
    cfg = load_config("gsm8k", "local", SMALL + ["model.lora.target_modules=[nowhere]"])
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        load_backbone(cfg.model)
    cfg = load_config("gsm8k", "local", SMALL + ["model.lora.load_in_4bit=true"])
    with pytest.raises(ConfigError, match="model.lora.load_in_4bit") as info:
        load_backbone(cfg.model)
    assert "\n" not in str(info.value)
    # A regular expression over full module names is the other form of target_modules.
    cfg = load_config("gsm8k", "local", SMALL + [r"model.lora.target_modules=.*blocks\.0\.qkv"])
    backbone, _ = load_backbone(cfg.model)
    assert {n.split(".lora_")[0] for n, p in backbone.named_parameters() if p.requires_grad} == {
        "model.base_model.model.blocks.0.qkv"}


# ------------------------------------------------------------------------- the tiny LLaDA re-creation (tests/archs)

def test_lora_through_the_tiny_llada_architecture(process_group, one_thread, tmp_path):
    """LLaDA's OLMo-style names get the default adapters (not its untied LM head `transformer.ff_out`), and the
    LoRA loop holds there too: base frozen, target reads the EMA adapters, exact resume, eval merges."""
    from archs import save_tiny_llada
    from raydllm.evaluation.evaluate import load_checkpoint_backbone

    folder = save_tiny_llada(tmp_path / "llada")
    overrides = [f"model.name={folder}", "jepa.lambda=1", "train.micro_batch_size=4"]
    loop = _loop(*overrides)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in loop.engine.module.backbone.named_parameters()
               if p.requires_grad}
    assert adapted == {"q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"}
    assert not any("transformer.ff_out.lora" in n for n in loop.ema.names)  # the LM head stays untouched
    base = _frozen(loop)
    for _ in range(2):
        loop.train_step()
    after = dict(loop.engine.module.backbone.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())

    batch = _batch(loop)
    z = _z_high(loop, batch)
    with torch.no_grad():
        for p in _adapters(loop):
            p.add_(0.5)
        assert torch.equal(_z_high(loop, batch), z)
        for p in _adapters(loop):
            p.sub_(0.5)
        loop.ema.params[0].add_(0.5)
        assert not torch.allclose(_z_high(loop, batch), z)
        loop.ema.params[0].sub_(0.5)

    checkpoint = tmp_path / "checkpoint_000002"
    checkpoint.mkdir()
    loop.save(str(checkpoint))
    resumed = _loop(*overrides)
    resumed.restore(str(checkpoint))
    assert loop.train_step() == resumed.train_step()

    merged, _, _ = load_checkpoint_backbone(tmp_path)
    online = resumed.engine.module.backbone.eval()
    fresh = _loop(*overrides).engine.module.backbone.eval()  # the checkpoint's step-2 adapters, for reference
    fresh_state = {k[len("backbone."):]: v for k, v in read_checkpoint_state(checkpoint).items() if k.startswith("backbone.")}
    fresh.load_state_dict(fresh_state, strict=False)
    with torch.no_grad():
        expected = fresh.logits(batch.input_ids, batch.attention_mask)
        assert torch.allclose(merged.logits(batch.input_ids, batch.attention_mask), expected, atol=1e-4)
        assert not torch.allclose(online.logits(batch.input_ids, batch.attention_mask), expected, atol=1e-4)


def test_lora_ema_in_host_memory_trains_identically(process_group):
    default, offloaded = _loop("jepa.lambda=1"), _loop("jepa.lambda=1", "jepa.ema_device=cpu")
    assert offloaded.ema.offload and not default.ema.offload
    for _ in range(2):
        assert default.train_step() == offloaded.train_step()
