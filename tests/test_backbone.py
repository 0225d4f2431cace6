"""Both backbone paths: the embedded model, and a Hugging Face folder loaded the way a user's model id is."""
import pytest
import torch

from raydllm.backbone import build_tiny, load_backbone
from raydllm.config import ModelConfig


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny model saved in Hugging Face format with its modeling code (auto_map), like LLaDA's repo."""
    folder = tmp_path_factory.mktemp("hf-tiny")
    torch.manual_seed(0)
    model, tokenizer = build_tiny(ModelConfig(d_model=32, n_layers=2, n_heads=2))
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModel")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def test_hf_folder_loads_through_the_user_path(hf_folder):
    folder, original = hf_folder
    assert (folder / "model.py").exists()  # remote code travels with the weights
    backbone, tokenizer = load_backbone(ModelConfig(name=str(folder), trust_remote_code=True))
    assert type(backbone.model).__module__ != type(original).__module__  # loaded from the folder's code
    assert backbone.ids.mask == tokenizer.mask_token_id and backbone.ids.pad != backbone.ids.mask
    ids = torch.randint(0, 256, (2, 12))
    attention = torch.ones_like(ids)
    attention[0, :3] = 0
    logits, hidden = backbone(ids, attention)
    assert torch.allclose(logits, original(ids, attention).logits, atol=1e-5)
    assert hidden.shape == (2, 12, 32)
    layers = backbone.all_hidden_states(ids, attention)
    assert len(layers) == backbone.num_layers + 1 and torch.equal(layers[-1], hidden)


def test_dream_style_shift_is_undone_by_the_adapter(hf_folder):
    folder, _ = hf_folder
    plain, _ = load_backbone(ModelConfig(name=str(folder)))
    shifted, _ = load_backbone(ModelConfig(name=str(folder), shift_logits=True))
    ids = torch.randint(0, 256, (1, 8))
    a, b = plain.logits(ids), shifted.logits(ids)
    assert torch.equal(b[:, 1:], a[:, :-1]) and torch.equal(b[:, 0], a[:, 0])


def test_missing_folder_is_a_clear_error(tmp_path):
    from raydllm.config import ConfigError

    with pytest.raises(ConfigError, match="no config.json"):
        load_backbone(ModelConfig(name=str(tmp_path)))


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2)
    plain, _ = load_backbone(cfg)
    ckpt, _ = load_backbone(cfg.model_copy(update={"gradient_checkpointing": True}))
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.model.gradient_checkpointing
    ids = torch.randint(0, 256, (2, 10))
    for m in (plain, ckpt):
        m.train()
        logits, hidden = m(ids, torch.ones_like(ids))
        (logits.sum() + hidden.sum()).backward()
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)
