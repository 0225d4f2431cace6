"""Tiny re-creation of Dream's hub `configuration_dream.py` (Dream-org/Dream-v0-Base-7B, Qwen2-derived).

Written for raydllm's tests from the facts of the public code, not copied. Facts reproduced:
- `DreamConfig(PretrainedConfig)`, `model_type = "Dream"` (capital D), Qwen2 field names and class defaults:
  vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
  hidden_act, max_position_embeddings, initializer_range, rms_norm_eps, use_cache (False: "cache not used in
  diffusion"), tie_word_embeddings, rope_theta, rope_scaling, use_sliding_window, sliding_window,
  max_window_layers, attention_dropout, mask_token_id (151666), pad_token_id (151643).
- Every field is set as an attribute before `PretrainedConfig.__init__`, so `use_cache` survives transformers 5;
  mask_token_id / pad_token_id are set after it.
The 7B hub config.json sets hidden_size 3584, intermediate_size 18944, 28 layers, 28 heads, 4 KV heads,
vocab_size 152064, rope_theta 1e6, max_position_embeddings 131072, torch_dtype bfloat16.

Read: ZHZisZZ/dllm@03270de7 dllm/pipelines/dream/models/configuration_dream.py (a hub copy) and
NVlabs/Fast-dLLM@24cc59e dream/model/configuration_dream.py.
"""
from transformers import PretrainedConfig


class DreamConfig(PretrainedConfig):
    model_type = "Dream"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768,
                 initializer_range=0.02, rms_norm_eps=1e-6, use_cache=False, tie_word_embeddings=False,
                 rope_theta=10000.0, rope_scaling=None, use_sliding_window=False, sliding_window=4096,
                 max_window_layers=28, attention_dropout=0.0, mask_token_id=151666, pad_token_id=151643,
                 tiny_hub_quirks=False, **kwargs):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window if use_sliding_window else None
        self.max_window_layers = max_window_layers
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        if rope_scaling is not None:
            raise NotImplementedError("the tiny re-creation implements the default RoPE only")
        self.attention_dropout = attention_dropout
        # Not a hub field: True reproduces the hub code's failure under transformers 5 (see modeling_dream).
        self.tiny_hub_quirks = tiny_hub_quirks
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
