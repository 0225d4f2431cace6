"""raydllm's engine on the tiny LLaDA and Dream architectures (tests/archs), loaded through the user path
(`model.name=<folder>`, remote code): training with gradient checkpointing for lambda = 0, DLLM-JEPA and the
L2 anchor, resume, padding invariance (training batches, probes, generation), the sampler, the probes, the
weights-only export and `raydllm eval`, and the host memory a load takes."""
import json

import pytest
import torch

from archs import save_tiny_dream, save_tiny_llada
from raydllm.engine.backbone import load_backbone
from raydllm.core.config import ModelConfig, load_config
from raydllm.data.sft import collate
from raydllm.engine.worker import WorkerLoop

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = {"llada": save_tiny_llada, "dream": save_tiny_dream}
TRAIN = ["data.source=synthetic", "data.synthetic_size=64", "data.val_limit=8", "data.max_prompt_tokens=48",
         "data.answer_tokens=16", "train.micro_batch_size=4", "train.max_steps=4", "train.lr=1e-3",
         "train.eval_every=2", "model.gradient_checkpointing=true", "eval.final=false", "jepa.k=1"]


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request, tmp_path_factory):
    """(name, folder) of a saved tiny architecture."""
    return request.param, ARCHS[request.param](tmp_path_factory.mktemp(f"{request.param}-tiny"))


def _loop(folder, *overrides, bf16=False):
    cfg = load_config("gsm8k", None, TRAIN + [f"model.name={folder}", f"train.bf16={str(bf16).lower()}",
                                              *overrides])
    return WorkerLoop(cfg, rank=0, world=1, device=torch.device("cpu"))


def _layers(backbone) -> torch.nn.ModuleList:
    """The transformer blocks (LLaDA: model.transformer.blocks; Dream: model.layers)."""
    return next(m for m in backbone.model.modules()
                if isinstance(m, torch.nn.ModuleList) and len(m) == backbone.num_layers)


@pytest.mark.parametrize("variant", [["jepa.lambda=0"], ["jepa.lambda=1"],
                                     ["jepa.lambda=0", "loss.anchor=l2", "loss.l2_lambda=1.0"]],
                         ids=["baseline", "jepa", "l2"])
def test_training_with_gradient_checkpointing(process_group, arch, variant):
    name, folder = arch
    loop = _loop(folder, *variant)
    backbone = loop.engine.module.backbone
    calls: dict[str, int] = {}
    # Pre-hooks on the first block's submodules: the recompute stops early (torch's non-reentrant checkpoint),
    # before forward hooks would fire; and transformers' GradientCheckpointingLayer re-runs the block's
    # `forward`, not its `__call__`, so the block's own hooks fire once either way.
    for name, sub in _layers(backbone)[0].named_modules():
        if name:
            sub.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    before = [p.detach().clone() for p in backbone.parameters()]
    first = loop.train_step()
    # Checkpointing on: the block's first submodules run in the forward and again in the backward (the recompute).
    assert max(calls.values()) == 2, calls
    for _ in range(2):
        last = loop.train_step()
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, backbone.parameters()))
    if "jepa.lambda=1" in variant:
        assert first["loss_jepa"] > 0 and loop.ema is not None
    else:
        assert "loss_jepa" not in first and loop.ema is None
    if loop.anchor is not None:
        assert loop.anchor.distance()[0] > 0
        assert all(b.device == p.device and b.dtype == p.dtype for b, p in zip(loop.anchor.bases, backbone.parameters()))


def test_bf16_training_loads_and_anchors_in_bf16(process_group, arch):
    _, folder = arch
    loop = _loop(folder, "jepa.lambda=1", "loss.anchor=l2", bf16=True)
    assert {p.dtype for p in loop.engine.module.backbone.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in loop.anchor.bases} == {torch.bfloat16}
    assert {p.dtype for p in loop.ema.params} == {torch.float32}
    assert torch.isfinite(torch.tensor(loop.train_step()["loss_total"]))


def test_resume_continues_exactly(process_group, arch, tmp_path):
    _, folder = arch
    a = _loop(folder, "jepa.lambda=1", "loss.anchor=l2", "loss.l2_lambda=0.1")
    for _ in range(2):
        a.train_step()
    a.save(str(tmp_path))
    a.train_step()
    b = _loop(folder, "jepa.lambda=1", "loss.anchor=l2", "loss.l2_lambda=0.1")
    b.restore(str(tmp_path))
    assert b.step == 2
    b.train_step()
    assert all(torch.equal(p, q) for p, q in zip(a.engine.module.parameters(), b.engine.module.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.ema.params, b.ema.params))
    # the anchor's base is the loaded model, not the restored weights
    assert all(torch.equal(x, y) for x, y in zip(a.anchor.bases, b.anchor.bases))


# -- padding: a row's logits do not depend on the other rows of its batch ---------------------------------

@pytest.fixture(scope="module")
def backbone(arch):
    _, folder = arch
    return load_backbone(ModelConfig(name=str(folder)))


def test_padding_mode_found_at_load(arch, backbone):
    name, _ = arch
    # raydllm's LLaDA and Dream both take the [B, L] mask (the hub's Dream code would need the 4-D boolean key
    # mask: test_backbone's mask-ignoring and 4-D cases cover the other modes).
    assert backbone[0].padding == "mask"


def test_training_batches_are_padding_invariant(backbone):
    from raydllm.data.sft import SftRecord

    model, _ = backbone
    short = SftRecord(list(range(40, 46)), list(range(60, 68)))
    long = SftRecord(list(range(70, 90)), list(range(100, 108)))
    batch = collate([short, long], model.ids.pad)
    alone = collate([short], model.ids.pad)
    logits, hidden = model(batch.input_ids, batch.attention_mask)
    ref_logits, ref_hidden = model(alone.input_ids, alone.attention_mask)
    offset = batch.input_ids.shape[1] - alone.input_ids.shape[1]
    # Answer positions (the only ones the diffusion loss reads) and every real hidden state.
    answer = alone.maskable[0]
    assert torch.allclose(logits[0, offset:][answer], ref_logits[0][answer], atol=1e-4)
    assert torch.allclose(hidden[0, offset + 1:], ref_hidden[0, 1:], atol=1e-4)


def test_probes_are_padding_invariant_and_run(backbone, tmp_path):
    from raydllm.evaluation.evaluate import left_pad
    from raydllm.core.objective import pool
    from raydllm.evaluation.probes import run_probes

    model, tokenizer = backbone

    def pooled(rows):  # what the probes and the JEPA views pool: the last hidden states over the real tokens
        ids, attention = left_pad(rows, model.ids.pad)
        return pool(model(ids, attention)[1], attention.bool())

    rows = [list(range(30, 36)), list(range(50, 70))]
    apart = torch.cat([pooled([r]) for r in rows])
    assert torch.allclose(pooled(rows), apart, atol=1e-4)
    text = tmp_path / "wiki.txt"
    text.write_text(" The quick brown fox jumps over the lazy dog near the river bank. " * 40)
    out = run_probes(model, model, tokenizer, t_low=0.2, t_high=0.7, wikitext_path=text, seq_len=32,
                     max_chunks=4, batch_size=2)
    assert out["probe/wikitext_delta"] == 0.0 and out["probe/drift_layer_2"] == pytest.approx(0.0, abs=1e-6)
    assert out["probe/wikitext_loss"] > 0 and out["probe/z_eff_rank"] >= 1.0


def test_sampler_batched_equals_one_at_a_time(backbone):
    from raydllm.evaluation.evaluate import left_pad
    from raydllm.core.sampler import SamplerConfig, sampler_throughput

    model, _ = backbone
    ids, attention = left_pad([list(range(30, 36)), list(range(50, 64)), list(range(80, 83))], model.ids.pad)
    result = sampler_throughput(model.logits, ids, attention, mask_id=model.ids.mask,
                                config=SamplerConfig(steps=8, gen_length=8, block_length=4), warmup=False)
    assert result["outputs_match"] is True


# -- the weights-only export and `raydllm eval` ----------------------------------------------------------

def test_export_and_raydllm_eval(process_group, arch, tmp_path, capsys):
    import shutil

    from raydllm.cli.app import build_parser
    from raydllm.evaluation.evaluate import load_checkpoint_backbone

    name, folder = arch
    loop = _loop(folder, "jepa.lambda=1", "train.export_ema=true")
    loop.train_step()
    checkpoint = tmp_path / "checkpoint_000001"
    checkpoint.mkdir()
    loop.save(str(checkpoint))
    loop.export(str(checkpoint))
    export = checkpoint / "export"
    # raydllm's own classes: the export is a plain Hugging Face folder that names its model type, no remote code
    assert json.loads((export / "config.json").read_text())["model_type"].lower() == name
    shutil.rmtree(checkpoint / "engine")  # eval reads neither weights nor optimizer state from the engine
    loaded, _, _ = load_checkpoint_backbone(checkpoint, device="cpu")
    trained = loop.engine.module.backbone.model.state_dict()
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in trained.items())
    args = build_parser().parse_args(["eval", str(checkpoint), "gsm8k", "--split", "validation", "--limit", "3",
                                      "--gen-length", "8", "--device", "cpu", "--ema", "--json", "--no-progress",
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metrics"]["n"] == 3 and result["weights"] == "ema" and result["device"] == "cpu"


# -- host memory while loading ---------------------------------------------------------------------------

def test_load_peak_host_memory_in_the_training_dtype(arch, tmp_path):
    """A wider copy of the architecture (so the weights dominate), its weights stored in bf16 as the hub
    ships them, loaded in a fresh process: in bf16 the weights stay memory-mapped (the private peak barely
    moves); in float32 the peak is a private float32 copy and more."""
    from safetensors.torch import load_file, save_file

    from raydllm.bench.memory import measure_load_memory

    name, _ = arch
    wide = {"llada": dict(d_model=512, n_layers=4, mlp_hidden_size=1536),
            "dream": dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1536, max_window_layers=4)}[name]
    folder = ARCHS[name](tmp_path / name, **wide)
    weights = folder / "model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}, str(weights),
              metadata={"format": "pt"})
    bf16 = measure_load_memory(folder, "bfloat16")
    fp32 = measure_load_memory(folder, "float32")
    assert bf16["param_bytes"] * 2 == fp32["param_bytes"] > 10e6
    # raydllm's own classes: peak 0.42-0.59x, private 0.17x after the load (the rest stays mapped); transient
    # allocations move the peak with the machine's load, so the bound leaves room.
    assert bf16["peak_delta_bytes"] < 0.8 * bf16["param_bytes"] and bf16["anon_after_bytes"] < 0.5 * bf16["param_bytes"]
    assert fp32["peak_delta_bytes"] > 1.2 * fp32["param_bytes"] and fp32["anon_after_bytes"] > 0.9 * fp32["param_bytes"]


def test_bench_gpu_runs_every_part_on_cpu(tmp_path, capsys):
    """`raydllm bench gpu --cpu`: the same parts a CUDA machine runs (here float32); without --cpu and no
    GPU it skips with one line."""
    from raydllm.cli.app import build_parser

    folder = save_tiny_llada(tmp_path / "llada")
    if not torch.cuda.is_available():
        args = build_parser().parse_args(["bench", "gpu", "--llada", str(folder)])
        assert args.func(args) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1].startswith("raydllm bench gpu: no CUDA device here")
    args = build_parser().parse_args(["bench", "gpu", "--llada", str(folder), "--cpu", "--steps", "1", "--json"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    llada = result["architectures"]["llada"]
    assert result["all_ran"] and set(llada["parts"]) == {"baseline", "jepa_ema_gpu", "jepa_ema_host", "l2_anchor"}
    assert llada["evaluation"]["n"] == 8 and llada["step_ratio"] > 0
