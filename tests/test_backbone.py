"""Both backbone paths: the embedded model, and a Hugging Face folder loaded the way a user's model id is."""
import pytest
import torch

from raydllm.engine.backbone import build_tiny, load_backbone
from raydllm.core.config import ModelConfig


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
    # By default none of it runs: the embedded model's own class loads its folders (a trial's export/ too).
    own, _ = load_backbone(ModelConfig(name=str(folder)))
    assert type(own.model).__module__ == type(original).__module__
    backbone, tokenizer = load_backbone(ModelConfig(name=str(folder), implementation="remote", trust_remote_code=True))
    assert type(backbone.model).__module__ != type(original).__module__  # loaded from the folder's code
    assert torch.equal(own.model.lm_head.weight, backbone.model.lm_head.weight)
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
    from raydllm.core.config import ConfigError

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


class _IgnoresMask(torch.nn.Module):
    """Wraps the embedded model and drops attention_mask, as LLaDA's original hub code does."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def _left_padded(pad_id):
    long_row, short_row = torch.randint(3, 200, (11,)), torch.randint(3, 200, (5,))
    ids = torch.stack([long_row, torch.cat([torch.full((6,), pad_id), short_row])])
    attention = torch.ones_like(ids)
    attention[1, :6] = 0
    return ids, attention, short_row


def test_padding_probe_and_per_row_mode_for_a_backbone_that_ignores_the_mask():
    from raydllm.engine.backbone import Backbone, padding_mode

    torch.manual_seed(0)
    honest, _ = load_backbone(ModelConfig(d_model=32, n_layers=2, n_heads=2))
    assert honest.padding == "mask"
    ignoring = _IgnoresMask(honest.model)
    assert padding_mode(ignoring, pad_id=honest.ids.pad, vocab_size=260) == "rows"
    ids, attention, short_row = _left_padded(honest.ids.pad)
    alone_logits, alone_hidden = honest(short_row[None], torch.ones(1, 5, dtype=torch.long))
    fixed = Backbone(ignoring, honest.ids, shift_logits=False, padding="rows")
    broken = Backbone(ignoring, honest.ids, shift_logits=False, padding="mask")
    logits, hidden = fixed(ids, attention)
    assert torch.allclose(logits[1, 6:], alone_logits[0], atol=1e-5)
    assert torch.allclose(hidden[1, 6:], alone_hidden[0], atol=1e-5)
    assert torch.equal(logits[1, :6], torch.zeros_like(logits[1, :6]))  # pad positions: zeros
    assert not torch.allclose(broken.logits(ids, attention)[1, 6:], alone_logits[0], atol=1e-3)  # the bug it fixes
    layers = fixed.all_hidden_states(ids, attention)
    assert len(layers) == 3 and torch.allclose(layers[-1][1, 6:], alone_hidden[0], atol=1e-5)
    logits.sum().backward()  # gradients flow through the per-row path
    assert honest.model.tok_emb.weight.grad is not None


def test_load_in_the_training_dtype():
    backbone, _ = load_backbone(ModelConfig(d_model=32, n_layers=2, n_heads=2), dtype=torch.bfloat16)
    assert {p.dtype for p in backbone.parameters()} == {torch.bfloat16}


def test_gradient_checkpointing_entry_points():
    from raydllm.engine.backbone import enable_gradient_checkpointing
    from raydllm.core.config import ConfigError

    class Inner(torch.nn.Module):
        def set_activation_checkpointing(self, strategy):
            self.strategy = strategy

    class LLaDALike(torch.nn.Module):  # declares no transformers support, has LLaDA's own entry point
        def __init__(self):
            super().__init__()
            self.model = Inner()

    llada = LLaDALike()
    assert enable_gradient_checkpointing(llada, "x") == "set_activation_checkpointing"
    assert llada.model.strategy == "whole_layer"
    with pytest.raises(ConfigError, match="model.gradient_checkpointing: plain .*supports neither"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2), "plain")
