"""raydllm's own LLaDA and Dream (raydllm.core.archs) against the hub code's re-creation (tests/archs).

The folders are saved with `tiny_hub_quirks=True`: exactly what the hub ships, whose remote code does not load
under transformers 5. raydllm loads them through the user path (`model.name=<folder>`) into its own classes;
the reference is the re-created remote code without the quirks, on the same safetensors file.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from archs import save_tiny_dream, save_tiny_llada
from archs.dream.configuration_dream import DreamConfig as HubDreamConfig
from archs.dream.modeling_dream import DreamModel as HubDreamModel
from archs.llada.configuration_llada import LLaDAConfig as HubLLaDAConfig
from archs.llada.modeling_llada import LLaDAModelLM as HubLLaDAModelLM
from raydllm.core import archs
from raydllm.engine.backbone import load_backbone
from raydllm.core.config import ConfigError, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, LAYERS = 384, 2
ATOL = 1e-5


def _hub_reference(folder, config_class, model_class, dtype):
    """The re-created hub code (quirks off) on the folder's weights."""
    config = config_class.from_pretrained(str(folder), tiny_hub_quirks=False)
    return model_class.from_pretrained(str(folder), config=config, dtype=dtype).eval()


def _same(a, b, dtype):
    """float32: within ATOL; bfloat16: bit for bit (both codes round at the same places)."""
    return a.dtype == b.dtype == dtype and (torch.equal(a, b) if dtype == torch.bfloat16 else _close(a, b))


def _batch(pad_rows: int = 1, n_pad: int = 3, length: int = 9):
    """[3, length] token ids and a mask whose first `pad_rows` rows are left-padded by n_pad."""
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (3, length))
    attention = torch.ones_like(ids)
    attention[:pad_rows, :n_pad] = 0
    return ids, attention


def _close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, atol=ATOL)


def _grads_and_saved(backbone, ids, attention):
    """Gradients of a loss through the backbone, and how many tensors autograd kept for the backward."""
    backbone.train()
    backbone.zero_grad()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        logits, hidden = backbone(ids, attention)
        loss = logits.pow(2).mean() + hidden.pow(2).mean()
    loss.backward()
    backbone.eval()
    return {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}, len(saved)


def _left_padding_is_invisible(backbone):
    """The real tokens of a left-padded row get the logits of the row alone. Dream's first real token is left
    out: its shifted logits come from the position before it (a pad, or nothing) and predict no token."""
    first = 1 if backbone.shift_logits else 0
    torch.manual_seed(1)
    row = torch.randint(0, 256, (1, 9))
    other = torch.randint(0, 256, (1, 13))
    batch = torch.cat([torch.cat([torch.full((1, 4), backbone.ids.pad), row], 1), other])
    attention = torch.ones_like(batch)
    attention[0, :4] = 0
    alone = backbone.logits(row)
    padded = backbone.logits(batch, attention)
    assert torch.isfinite(padded).all()
    assert _close(padded[0, 4 + first:], alone[0, first:])
    unmasked = backbone.logits(batch)  # the mask is what does it
    assert not torch.allclose(unmasked[0, 4 + first:], alone[0, first:], atol=1e-3)


# ----------------------------------------------------------------------------------------------- LLaDA

@pytest.fixture(scope="module")
def llada_hub_folder(tmp_path_factory):
    return save_tiny_llada(tmp_path_factory.mktemp("llada-hub"), tiny_hub_quirks=True)


@pytest.fixture(scope="module")
def llada_own(llada_hub_folder):
    return load_backbone(ModelConfig(name=str(llada_hub_folder)))


def test_llada_hub_folder_loads_into_raydllms_classes(llada_own, llada_hub_folder):
    backbone, tokenizer = llada_own
    model = backbone.model
    assert type(model) is archs.LLaDAModelLM and type(model.config) is archs.LLaDAConfig
    assert next(model.parameters()).dtype == torch.float32  # the hub config names no dtype
    saved = load_file(llada_hub_folder / "model.safetensors")
    state = model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    assert (backbone.hidden_size, backbone.num_layers, backbone.shift_logits) == (64, LAYERS, False)
    assert tokenizer.mask_token_id is None and backbone.ids.mask == 259 and backbone.ids.pad == 257
    assert model.supports_gradient_checkpointing and model.config.use_cache is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llada_logits_and_hidden_states_match_the_hub_code(llada_hub_folder, dtype):
    backbone, _ = load_backbone(ModelConfig(name=str(llada_hub_folder)), dtype=dtype)
    hub = _hub_reference(llada_hub_folder, HubLLaDAConfig, HubLLaDAModelLM, dtype)
    ids, attention = _batch()
    for mask in (None, attention):
        ours = backbone.model(ids, attention_mask=mask, output_hidden_states=True)
        theirs = hub(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)  # no config.use_cache
        assert _same(ours.logits, theirs.logits, dtype)
        assert len(ours.hidden_states) == len(theirs.hidden_states) == LAYERS + 1
        assert all(_same(a, b, dtype) for a, b in zip(ours.hidden_states, theirs.hidden_states))
    assert not _close(backbone.logits(ids, attention).float(), backbone.logits(ids).float())


def test_llada_left_padding_is_invisible(llada_own):
    _left_padding_is_invisible(llada_own[0])


def test_llada_gradient_checkpointing_gives_the_same_gradients(llada_hub_folder, llada_own):
    ckpt, _ = load_backbone(ModelConfig(name=str(llada_hub_folder), gradient_checkpointing=True))
    ids, attention = _batch()
    plain_grads, plain_saved = _grads_and_saved(llada_own[0], ids, attention)
    ckpt_grads, ckpt_saved = _grads_and_saved(ckpt, ids, attention)
    assert ckpt_saved < plain_saved  # the blocks' activations are recomputed, not kept
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) == len(list(ckpt.parameters()))
    assert all(torch.allclose(plain_grads[k], ckpt_grads[k], atol=1e-7) for k in plain_grads)


def test_llada_loads_in_the_dtype_asked(llada_hub_folder):
    backbone, _ = load_backbone(ModelConfig(name=str(llada_hub_folder)), dtype=torch.bfloat16)
    assert {p.dtype for p in backbone.model.parameters()} == {torch.bfloat16}
    assert backbone.logits(torch.randint(0, 256, (1, 6))).dtype == torch.bfloat16


def _block_cache_matches_full_passes(model):
    """A block run against the cache equals the full pass when nothing else changed; its fresh keys and values
    land at the block's positions (checked on the first layer, whose keys depend on the tokens alone)."""
    ids, attention = _batch(length=12)
    start, end = 5, 9
    full = model(ids, attention, return_kv=True)
    block = model(ids[:, start:end], attention, kv_cache=full.kv_cache, block_start=start, return_kv=True,
                  output_hidden_states=True)
    assert _close(block.logits, full.logits[:, start:end])
    assert len(block.hidden_states) == LAYERS + 1 and block.hidden_states[0].shape[1] == end - start
    changed = ids.clone()
    changed[:, start:end] = (changed[:, start:end] + 1) % 256
    fresh = model(changed, attention, return_kv=True).kv_cache
    moved = model(changed[:, start:end], attention, kv_cache=full.kv_cache, block_start=start, return_kv=True)
    assert all(_close(a, b) for a, b in zip(moved.kv_cache[0], fresh[0]))
    assert not _close(moved.logits, block.logits)
    assert all(torch.equal(a, b) for a, b in zip(full.kv_cache[0], model(ids, attention, return_kv=True).kv_cache[0]))
    with pytest.raises(ValueError, match="kv_cache"):
        model(ids[:, start:end], attention, block_start=start)


def test_llada_block_cache(llada_own):
    _block_cache_matches_full_passes(llada_own[0].model)


def test_llada_unsupported_hub_configuration_is_refused(llada_hub_folder, tmp_path):
    folder = shutil.copytree(llada_hub_folder, tmp_path / "alibi")
    config = json.loads((folder / "config.json").read_text())
    config.update(alibi=True, rope=False)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model.implementation: .*alibi"):
        load_backbone(ModelConfig(name=str(folder)))


def test_llada_implementation_raydllm_refuses_other_model_types(tmp_path):
    from raydllm.core.model import build_tiny

    model, tokenizer = build_tiny(ModelConfig())
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="model.implementation: raydllm implements .*raydllm_tiny"):
        load_backbone(ModelConfig(name=str(tmp_path), implementation="raydllm"))


# ----------------------------------------------------------------------------------------------- Dream

@pytest.fixture(scope="module")
def dream_hub_folder(tmp_path_factory):
    return save_tiny_dream(tmp_path_factory.mktemp("dream-hub"), tiny_hub_quirks=True)


@pytest.fixture(scope="module")
def dream_own(dream_hub_folder):
    return load_backbone(ModelConfig(name=str(dream_hub_folder)), dtype=torch.float32)


def test_dream_hub_folder_loads_into_raydllms_classes(dream_own, dream_hub_folder):
    backbone, tokenizer = dream_own
    model = backbone.model
    assert type(model) is archs.DreamModel and type(model.config) is archs.DreamConfig
    saved = load_file(dream_hub_folder / "model.safetensors")
    state = model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    assert (backbone.hidden_size, backbone.num_layers, backbone.shift_logits) == (64, LAYERS, True)
    assert backbone.ids.mask == tokenizer.mask_token_id == 260 and backbone.ids.pad == backbone.ids.eos == 256
    assert model.model.embed_tokens.padding_idx == 256  # as the hub: the EOS input row gets no gradient


def test_dream_loads_in_the_training_dtype_not_the_hub_configs(dream_hub_folder):
    # The hub config names bfloat16; raydllm loads in the dtype it trains in (float32 on a CPU run).
    backbone, _ = load_backbone(ModelConfig(name=str(dream_hub_folder)))
    assert {p.dtype for p in backbone.model.parameters()} == {torch.float32}
    backbone, _ = load_backbone(ModelConfig(name=str(dream_hub_folder)), dtype=torch.bfloat16)
    assert {p.dtype for p in backbone.model.parameters()} == {torch.bfloat16}


def _dream_generation_mask(attention):
    """What Dream's generation code passes the hub model for left-padded rows."""
    keep = attention.bool()
    return keep[:, None, None, :] & keep[:, None, :, None], (attention.cumsum(-1) - 1).masked_fill(~keep, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dream_logits_and_hidden_states_match_the_hub_code(dream_hub_folder, dtype):
    backbone, _ = load_backbone(ModelConfig(name=str(dream_hub_folder)), dtype=dtype)
    hub = _hub_reference(dream_hub_folder, HubDreamConfig, HubDreamModel, dtype)
    ids, attention = _batch()
    mask4, positions = _dream_generation_mask(attention)
    for ours_mask, hub_kwargs in ((None, {}), (attention, dict(attention_mask=mask4, position_ids=positions))):
        ours = backbone.model(ids, attention_mask=ours_mask, output_hidden_states=True)
        theirs = hub(ids, output_hidden_states=True, **hub_kwargs)
        # Real tokens only: raydllm's pad queries attend to themselves (the hub's attend to nothing, which some
        # kernels turn into NaN), so pad rows differ by design; real rows are bitwise the hub's.
        real = torch.ones_like(ids, dtype=torch.bool) if ours_mask is None else attention.bool()
        assert _same(ours.logits[real], theirs.logits[real], dtype)
        assert len(ours.hidden_states) == len(theirs.hidden_states) == LAYERS + 1
        assert all(_same(a[real], b[real], dtype) for a, b in zip(ours.hidden_states, theirs.hidden_states))


def test_dream_shift_is_undone_by_the_adapter(dream_own):
    backbone, _ = dream_own
    ids, attention = _batch()
    raw = backbone.model(ids, attention).logits
    logits, _ = backbone(ids, attention)
    assert torch.equal(logits[:, 1:], raw[:, :-1]) and torch.equal(logits[:, 0], raw[:, 0])


def test_dream_left_padding_is_invisible(dream_own):
    _left_padding_is_invisible(dream_own[0])


def test_dream_gradient_checkpointing_gives_the_same_gradients(dream_hub_folder, dream_own):
    ckpt, _ = load_backbone(ModelConfig(name=str(dream_hub_folder), gradient_checkpointing=True),
                            dtype=torch.float32)
    assert all(layer.gradient_checkpointing for layer in ckpt.model.model.layers)
    ids, attention = _batch()
    plain_grads, plain_saved = _grads_and_saved(dream_own[0], ids, attention)
    ckpt_grads, ckpt_saved = _grads_and_saved(ckpt, ids, attention)
    assert ckpt_saved < plain_saved
    assert plain_grads.keys() == ckpt_grads.keys()
    assert all(torch.allclose(plain_grads[k], ckpt_grads[k], atol=1e-7) for k in plain_grads)


def test_dream_block_cache(dream_own):
    _block_cache_matches_full_passes(dream_own[0].model)


def test_llada_and_dream_at_the_hub_sizes_have_the_hub_parameter_counts():
    """The config defaults are the hub config.json values; Dream-7B has Qwen2.5-7B's 7,615,616,512 parameters."""
    with torch.device("meta"):
        llada = archs.LLaDAModelLM(archs.LLaDAConfig())
        dream = archs.DreamModel(archs.DreamConfig())
    assert sum(p.numel() for p in llada.parameters()) == 8_015_581_184
    assert sum(p.numel() for p in dream.parameters()) == 7_615_616_512
