"""raydllm against tiny re-creations of the real LLaDA and Dream remote code (tests/archs).

What each architecture's hub code really does is asserted as such, loading with model.implementation=remote
(the folder's own code). raydllm's default for these model types is its own implementation (raydllm.core.archs,
tested in test_archs_raydllm.py); the `*_remote_path_fails_*` tests pin down why that default exists.
"""
import importlib
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from archs import DREAM_AUTO_MAP, LLADA_AUTO_MAP, save_tiny_dream, save_tiny_llada
from raydllm.engine.backbone import load_backbone, load_pretrained
from raydllm.core.config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")
REMOTE = "remote"  # model.implementation: the folder's own code, as a transformers 4.x user would run it
REMOTE_CODE = {"implementation": REMOTE, "trust_remote_code": True}  # the folder's code runs only when asked
VOCAB, WIDTH, LAYERS = 384, 64, 2


def _left_padded(ids: torch.Tensor, pad_id: int, n_pad: int):
    """ids [1, L] -> ([2, n_pad + L] with row 0 left-padded and row 1 other tokens, attention mask)."""
    torch.manual_seed(1)
    batch = torch.cat([torch.full((1, n_pad), pad_id), ids], 1)
    batch = torch.cat([batch, torch.randint(0, 256, batch.shape)], 0)
    attention = torch.ones_like(batch)
    attention[0, :n_pad] = 0
    return batch, attention


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------- LLaDA

@pytest.fixture(scope="module")
def llada_folder(tmp_path_factory):
    return save_tiny_llada(tmp_path_factory.mktemp("llada-tiny"))


@pytest.fixture(scope="module")
def llada(llada_folder):
    backbone, tokenizer = load_backbone(ModelConfig(name=str(llada_folder), **REMOTE_CODE))
    return backbone, tokenizer


def test_llada_folder_is_shaped_like_the_hub_repo(llada_folder):
    config = json.loads((llada_folder / "config.json").read_text())
    assert config["model_type"] == "llada" and config["auto_map"] == LLADA_AUTO_MAP
    assert config["architectures"] == ["LLaDAModelLM"]
    assert (config["d_model"], config["n_layers"], config["n_heads"]) == (WIDTH, LAYERS, 4)
    assert config["block_type"] == "llama" and config["layer_norm_type"] == "rms" and config["rope"]
    assert "hidden_size" not in config and "num_hidden_layers" not in config  # OLMo names only
    assert "torch_dtype" not in config and "dtype" not in config and config["use_cache"] is False
    assert {p.name for p in llada_folder.glob("*.py")} == {"configuration_llada.py", "modeling_llada.py"}


def test_llada_loads_through_the_raydllm_user_path(llada, llada_folder):
    backbone, tokenizer = llada
    model = backbone.model
    assert type(model).__module__.startswith("transformers_modules.")  # the folder's remote code
    assert type(model).__name__ == "LLaDAModelLM" and type(model.model).__name__ == "LLaDAModel"
    assert not isinstance(model.model, PreTrainedModel)  # the inner model is a plain nn.Module
    assert next(model.parameters()).dtype == torch.float32  # no dtype in the hub config: float32 by default
    saved = load_file(llada_folder / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    # hidden_size / num_hidden_layers are properties over d_model / n_layers
    assert (backbone.hidden_size, backbone.num_layers) == (WIDTH, LAYERS)
    # The mask id comes from config.mask_token_id: LLaDA's tokenizer declares no mask token.
    assert tokenizer.mask_token_id is None and backbone.ids.mask == model.config.mask_token_id == 259
    assert backbone.ids.pad == backbone.ids.eos == model.config.eos_token_id == 257
    assert backbone.shift_logits is False


def test_llada_forward_logits_and_hidden_states(llada):
    backbone, _ = llada
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 10))
    attention = torch.ones_like(ids)
    attention[0, :3] = 0
    logits, hidden = backbone(ids, attention)
    assert logits.shape == (2, 10, VOCAB) and hidden.shape == (2, 10, WIDTH)
    layers = backbone.all_hidden_states(ids, attention)
    # n_layers + 1: every block's input, then ln_f of the last block's output (its raw output is not returned)
    assert len(layers) == LAYERS + 1 and torch.equal(layers[-1], hidden)
    transformer = backbone.model.model.transformer
    assert torch.equal(layers[0], transformer.wte(ids))
    assert torch.allclose(transformer.ff_out(layers[-1]), logits, atol=1e-6)
    out = backbone.model(ids, attention_mask=attention, return_dict=True)
    assert out.past_key_values is None and out.hidden_states is None


def test_llada_left_padding_is_invisible_to_the_real_tokens(llada):
    """The hub code (since Oct 2025) hides pad keys with an additive bias; RoPE is relative, so the real
    tokens of a left-padded row match the row alone up to rounding. Without the mask the pads are attended."""
    backbone, _ = llada
    torch.manual_seed(0)
    row = torch.randint(0, 256, (1, 9))
    batch, attention = _left_padded(row, backbone.ids.pad, n_pad=4)
    alone = backbone.logits(row, torch.ones_like(row))
    padded = backbone.logits(batch, attention)
    assert torch.allclose(padded[0, 4:], alone[0], atol=1e-5)
    assert torch.isfinite(padded).all()  # pad queries still attend to the real tokens
    unmasked = backbone.logits(batch, None)
    assert not torch.allclose(unmasked[0, 4:], alone[0], atol=1e-3)
    assert torch.equal(backbone.logits(row, None), alone)  # an all-ones mask is no mask


def test_llada_refuses_transformers_gradient_checkpointing(llada):
    model = llada[0].model
    assert not model.supports_gradient_checkpointing
    with pytest.raises(ValueError, match="does not support"):
        model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="does not support"):
        model.activation_checkpointing_enable()


@pytest.mark.parametrize("strategy", ["whole_layer", "one_in_two", "fine_grained"])
def test_llada_own_activation_checkpointing_gives_the_same_gradients(llada_folder, strategy):
    model, _ = load_pretrained(str(llada_folder), trust_remote_code=True, implementation=REMOTE)
    configuration = importlib.import_module(type(model).__module__.replace("modeling_", "configuration_"))
    strategy_enum = configuration.ActivationCheckpointingStrategy
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 8))
    attention = torch.ones_like(ids)
    attention[1, :2] = 0
    model.train()
    grads = []
    for chosen in (None, strategy_enum(strategy)):
        model.zero_grad()
        model.model.set_activation_checkpointing(chosen)
        model(ids, attention_mask=attention).logits.pow(2).mean().backward()
        grads.append(_grads(model))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters()))
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-7) for k in grads[0])


def test_llada_gradient_checkpointing_option_on_both_paths(llada_folder):
    """The hub LLaDA refuses transformers' checkpointing API (it only has model.model.set_activation_checkpointing,
    which the adapter calls on the remote path); raydllm's LLaDA declares support."""
    remote, _ = load_backbone(ModelConfig(name=str(llada_folder), gradient_checkpointing=True, **REMOTE_CODE))
    assert remote.model.model.activation_checkpointing_strategy == "whole_layer"
    backbone, _ = load_backbone(ModelConfig(name=str(llada_folder), gradient_checkpointing=True))
    assert all(block.gradient_checkpointing for block in backbone.model.model.transformer.blocks)


def test_llada_forward_refuses_a_kv_cache(llada):
    model = llada[0].model
    ids = torch.randint(0, 256, (1, 6))
    with pytest.raises(AssertionError, match="kvcache"):
        model(ids, use_cache=True)
    with pytest.raises(AssertionError, match="kvcache"):
        model(ids, past_key_values=[(torch.zeros(1, 4, 3, 16), torch.zeros(1, 4, 3, 16))] * LAYERS)


def test_llada_hub_code_drops_use_cache_under_transformers_5(tmp_path):
    from transformers import AutoConfig

    folder = save_tiny_llada(tmp_path / "quirks", tiny_hub_quirks=True)
    assert not hasattr(AutoConfig.from_pretrained(str(folder), trust_remote_code=True), "use_cache")


def test_llada_hub_folder_fails_on_the_remote_path_and_loads_by_default(tmp_path):
    """The hub LLaDAModelLM never calls post_init(): transformers 5 from_pretrained fails on
    all_tied_weights_keys (then on tie_weights' signature; forward needs use_cache=False)."""
    folder = save_tiny_llada(tmp_path / "quirks", tiny_hub_quirks=True)
    with pytest.raises(AttributeError, match="all_tied_weights_keys"):
        load_backbone(ModelConfig(name=str(folder), **REMOTE_CODE))
    backbone, _ = load_backbone(ModelConfig(name=str(folder)))
    assert torch.isfinite(backbone.logits(torch.randint(0, 256, (1, 5)))).all()


# ----------------------------------------------------------------------------------------------- Dream

@pytest.fixture(scope="module")
def dream_folder(tmp_path_factory):
    return save_tiny_dream(tmp_path_factory.mktemp("dream-tiny"))


@pytest.fixture(scope="module")
def dream(dream_folder):
    return load_backbone(ModelConfig(name=str(dream_folder), **REMOTE_CODE), dtype=torch.float32)


def _dream_mask(attention: torch.Tensor):
    """What Dream's generation_utils passes for left-padded rows: a 4-D boolean mask and cumsum positions."""
    keep = attention.bool()
    mask = keep[:, None, None, :] & keep[:, None, :, None]
    positions = (attention.long().cumsum(-1) - 1).masked_fill(~keep, 1)
    return mask, positions


def test_dream_folder_is_shaped_like_the_hub_repo(dream_folder):
    config = json.loads((dream_folder / "config.json").read_text())
    assert config["model_type"] == "Dream" and config["auto_map"] == DREAM_AUTO_MAP
    assert config["architectures"] == ["DreamModel"] and config["torch_dtype"] == "bfloat16"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (WIDTH, LAYERS, 2)
    assert config["use_cache"] is False and config["tie_word_embeddings"] is False
    assert {p.name for p in dream_folder.glob("*.py")} == {"configuration_dream.py", "modeling_dream.py"}


def test_dream_loads_through_the_raydllm_user_path(dream, dream_folder):
    backbone, tokenizer = dream
    model = backbone.model
    assert type(model).__module__.startswith("transformers_modules.") and type(model).__name__ == "DreamModel"
    assert model.supports_gradient_checkpointing and (backbone.hidden_size, backbone.num_layers) == (WIDTH, LAYERS)
    saved = load_file(dream_folder / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert backbone.shift_logits is True  # detected from model_type "Dream"
    assert backbone.ids.mask == tokenizer.mask_token_id == model.config.mask_token_id == 260
    assert backbone.ids.pad == backbone.ids.eos == model.config.pad_token_id == 256


def test_dream_loads_in_the_dtype_raydllm_asks_for(dream_folder):
    # transformers 5 would load with dtype "auto" (the hub config's torch_dtype, bfloat16): raydllm always
    # passes the training dtype, float32 for a CPU run, bfloat16 for a bf16 one.
    backbone, _ = load_backbone(ModelConfig(name=str(dream_folder), **REMOTE_CODE))
    assert next(backbone.model.parameters()).dtype == torch.float32
    backbone, _ = load_backbone(ModelConfig(name=str(dream_folder), **REMOTE_CODE), dtype=torch.bfloat16)
    assert next(backbone.model.parameters()).dtype == torch.bfloat16


def test_dream_forward_logits_hidden_states_and_shift(dream):
    backbone, _ = dream
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 10))
    logits, hidden = backbone(ids)
    assert logits.shape == (2, 10, VOCAB) and hidden.shape == (2, 10, WIDTH)
    raw = backbone.model(ids, output_hidden_states=True)
    assert set(raw.keys()) == {"logits", "hidden_states"}  # MaskedLMOutput: no past_key_values
    # position i of the raw logits predicts token i + 1; the adapter moves them back by one
    assert torch.equal(logits, torch.cat([raw.logits[:, :1], raw.logits[:, :-1]], 1))
    layers = backbone.all_hidden_states(ids)
    assert len(layers) == LAYERS + 1 and torch.equal(layers[-1], hidden)  # last one after the final norm
    assert torch.equal(layers[0], backbone.model.model.embed_tokens(ids))
    assert torch.allclose(backbone.model.lm_head(hidden), raw.logits, atol=1e-6)


def test_dream_model_does_not_understand_a_2d_attention_mask(dream):
    model = dream[0].model
    ids = torch.randint(0, 256, (2, 6))
    with pytest.raises(RuntimeError):
        model(ids, attention_mask=torch.ones_like(ids))  # int64 [B, L] goes to SDPA as is
    with pytest.raises(RuntimeError):
        model(ids, attention_mask=torch.ones_like(ids, dtype=torch.bool))  # [B, L] does not broadcast


def test_dream_forward_with_padding_on_both_paths(dream, dream_folder):
    """raydllm passes a 2-D attention mask; the hub Dream needs the 4-D boolean mask that its generation_utils
    builds: the adapter's load-time probe finds that form for the remote path. raydllm's Dream takes 2-D."""
    ids = torch.randint(0, 256, (2, 6))
    attention = torch.ones_like(ids)
    attention[0, :2] = 0
    assert dream[0].padding == "mask_4d"
    assert torch.allclose(dream[0].logits(ids, attention)[0, 3:], dream[0].logits(ids[:1, 2:])[0, 1:], atol=1e-5)
    with pytest.raises(RuntimeError):  # the hub code itself, handed the 2-D mask
        dream[0].model(input_ids=ids, attention_mask=attention)
    own, _ = load_backbone(ModelConfig(name=str(dream_folder)), dtype=torch.float32)
    assert own.padding == "mask" and torch.isfinite(own(ids, attention)[0]).all()


def test_dream_left_padding_with_the_4d_mask_is_invisible_to_the_real_tokens(dream):
    model = dream[0].model
    torch.manual_seed(0)
    row = torch.randint(0, 256, (1, 9))
    batch, attention = _left_padded(row, dream[0].ids.pad, n_pad=4)
    alone = model(row).logits
    mask, positions = _dream_mask(attention)
    padded = model(batch, attention_mask=mask, position_ids=positions).logits
    assert torch.isfinite(padded).all()  # fully masked pad rows come out as zeros, not NaN
    assert torch.allclose(padded[0, 4:], alone[0], atol=1e-5)
    shifted = model(batch, attention_mask=mask).logits  # default positions: RoPE is relative
    assert torch.allclose(shifted[0, 4:], alone[0], atol=1e-5)
    assert not torch.allclose(model(batch).logits[0, 4:], alone[0], atol=1e-3)  # no mask: pads attended


def test_dream_transformers_gradient_checkpointing_gives_the_same_gradients(dream_folder):
    plain, _ = load_backbone(ModelConfig(name=str(dream_folder), **REMOTE_CODE), dtype=torch.float32)
    ckpt, _ = load_backbone(ModelConfig(name=str(dream_folder), gradient_checkpointing=True, **REMOTE_CODE),
                            dtype=torch.float32)
    assert ckpt.model.model.gradient_checkpointing and not plain.model.model.gradient_checkpointing
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 8))
    grads = []
    for backbone in (plain, ckpt):
        backbone.train()
        logits, hidden = backbone(ids)
        (logits.pow(2).mean() + hidden.pow(2).mean()).backward()
        grads.append(_grads(backbone.model))
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-7) for k in grads[0])


def test_dream_pad_eos_embedding_gets_no_gradient(dream_folder):
    """embed_tokens has padding_idx = pad_token_id, which is Dream's EOS: the EOS input row never trains."""
    backbone, _ = load_backbone(ModelConfig(name=str(dream_folder), **REMOTE_CODE), dtype=torch.float32)
    pad = backbone.ids.pad
    assert backbone.model.model.embed_tokens.padding_idx == pad == backbone.ids.eos
    ids = torch.tensor([[5, pad, 7, pad, 9]])
    backbone.model(ids).logits.pow(2).mean().backward()
    grad = backbone.model.model.embed_tokens.weight.grad
    assert grad[pad].abs().sum() == 0 and grad[5].abs().sum() > 0


def test_dream_kv_cache_is_appended_in_place_after_the_cached_tokens(dream):
    from transformers import DynamicCache

    model = dream[0].model
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 10))
    cache = DynamicCache()
    prefix = model(ids[:, :6], use_cache=True, past_key_values=cache)
    assert "past_key_values" not in prefix and cache.get_seq_length() == 6  # updated in place, not returned
    keys = cache.layers[0].keys
    assert keys.shape == (2, 2, 6, WIDTH // 4)  # [B, num_key_value_heads, T, head_dim], after RoPE
    block = model(ids[:, 6:], use_cache=True, past_key_values=cache).logits
    assert cache.get_seq_length() == 10
    # Equivalent full pass: the cached prefix never saw the block; the block sees everything.
    see = torch.ones(10, 10, dtype=torch.bool)
    see[:6, 6:] = False
    full = model(ids, attention_mask=see[None, None].expand(2, 1, 10, 10)).logits
    assert torch.allclose(block, full[:, 6:], atol=1e-5)


def test_dream_hub_folder_fails_on_the_remote_path_and_loads_by_default(tmp_path):
    """The hub Dream rotary embedding looks up ROPE_INIT_FUNCTIONS['default'], gone in transformers 5 (and,
    patched, its non-persistent inv_freq loads uninitialised)."""
    folder = save_tiny_dream(tmp_path / "quirks", tiny_hub_quirks=True)
    with pytest.raises(KeyError, match="default"):
        load_backbone(ModelConfig(name=str(folder), **REMOTE_CODE))
    backbone, _ = load_backbone(ModelConfig(name=str(folder)))
    assert torch.isfinite(backbone.logits(torch.randint(0, 256, (1, 5))).float()).all()
