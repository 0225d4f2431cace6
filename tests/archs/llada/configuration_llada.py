"""Tiny re-creation of LLaDA's hub `configuration_llada.py` (GSAI-ML/LLaDA-8B-Base, OLMo-derived).

Written for raydllm's tests from the facts of the public code, not copied. Facts reproduced:
- `LLaDAConfig(PretrainedConfig)`, `model_type = "llada"`, OLMo field names (`d_model`, `n_heads`, `n_kv_heads`,
  `n_layers`, `mlp_hidden_size` / `mlp_ratio`, `vocab_size`, `embedding_size`, `max_sequence_length`, `rope`,
  `rope_theta`, `block_type`, `layer_norm_type`, `include_bias`, `weight_tying`, `mask_token_id`, ...).
- The Hugging Face names exist only as read-only properties: `hidden_size` -> d_model, `num_hidden_layers` ->
  n_layers, `num_attention_heads` -> n_heads.
- `__init__(use_cache=False, **kwargs)` hands `use_cache` to `PretrainedConfig.__init__` as a plain kwarg.
  transformers 5 drops generation parameters (use_cache among them) from those kwargs, so on the hub code
  `config.use_cache` does not exist and `LLaDAModelLM.forward(use_cache=None)` raises AttributeError. This
  re-creation sets the attribute itself unless `tiny_hub_quirks` is true (see modeling_llada.py).
- `ActivationCheckpointingStrategy`, the enum `LLaDAModel.set_activation_checkpointing` takes, lives here.
The defaults below are the values of the 8B hub config.json (the hub's own defaults are OLMo/GPT-2 ones, but
its config.json names every field, so loading never sees them).

Read: ML-GSAI/LLaDA@5975047 modeling_llada.py (the hub code as of Oct 2025, imports this module's names);
NVlabs/Fast-dLLM@24cc59e llada/model/configuration_llada.py; ZHZisZZ/dllm dllm/pipelines/llada/models/.
"""
from enum import Enum

from transformers import PretrainedConfig


class ActivationCheckpointingStrategy(str, Enum):
    whole_layer = "whole_layer"
    one_in_two = "one_in_two"
    one_in_three = "one_in_three"
    one_in_four = "one_in_four"
    two_in_three = "two_in_three"  # declared by the hub enum, not acted on by its forward
    three_in_four = "three_in_four"
    four_in_five = "four_in_five"
    nine_in_ten = "nine_in_ten"
    fine_grained = "fine_grained"  # checkpoints attention, ff_norm and the activation inside each block


HUB_8B_DEFAULTS = dict(
    d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_ratio=4, mlp_hidden_size=12288,
    activation_type="silu", block_type="llama", block_group_size=1, alibi=False, alibi_bias_max=8.0,
    rope=True, rope_full_precision=True, rope_theta=500000.0, flash_attention=False, attention_dropout=0.0,
    multi_query_attention=None, attention_layer_norm=False, attention_layer_norm_with_affine=True,
    residual_dropout=0.0, embedding_dropout=0.0, input_emb_norm=False, layer_norm_type="rms",
    layer_norm_with_affine=True, rms_norm_eps=1e-5, bias_for_layer_norm=False, max_sequence_length=4096,
    include_qkv_bias=False, include_bias=False, scale_logits=False, vocab_size=126464, embedding_size=126464,
    weight_tying=False, eos_token_id=126081, pad_token_id=126081, mask_token_id=126336, init_device="meta",
    init_fn="mitchell", init_std=0.02, init_cutoff_factor=None, precision="amp_bf16",
)


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, use_cache: bool = False, **kwargs):
        fields = {**HUB_8B_DEFAULTS, **kwargs}
        fields.setdefault("architectures", ["LLaDAModelLM"])
        # Not a hub field: True reproduces the hub code's failures under transformers 5 (see modeling_llada).
        fields.setdefault("tiny_hub_quirks", False)
        super().__init__(use_cache=use_cache, **fields)
        if not self.tiny_hub_quirks:
            self.use_cache = use_cache

    @property
    def hidden_size(self):
        return self.d_model

    @property
    def num_hidden_layers(self):
        return self.n_layers

    @property
    def num_attention_heads(self):
        return self.n_heads

    @property
    def effective_n_kv_heads(self) -> int:
        if self.n_kv_heads is None:
            return 1 if self.multi_query_attention else self.n_heads
        return self.n_kv_heads
