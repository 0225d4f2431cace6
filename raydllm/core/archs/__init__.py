"""Core layer: raydllm's own implementations of the masked-diffusion architectures it fine-tunes.

The hub's remote code for LLaDA (GSAI-ML/LLaDA-8B-*) and Dream (Dream-org/Dream-v0-*-7B) does not load under
transformers 5 (see README "Real architectures"); these classes take the hub's config.json and safetensors as
they are (same field and parameter names) and are written for raydllm, short, with:
- `post_init`, so `from_pretrained` works; a `dtype` given there is the dtype the weights are loaded in;
- a 2-D attention mask [B, L] (1 = token, 0 = padding) understood as each model's own code means it
  (LLaDA: pad keys hidden; Dream: the 4-D keep mask and positions its generation code builds);
- `output_hidden_states`: every layer's input, then the final norm's output (n_layers + 1 tensors);
- gradient checkpointing through transformers' `activation_checkpointing_enable` (each layer is a
  GradientCheckpointingLayer); no global torch setting is touched.

Block cache, for samplers that re-run one block of the sequence many times (Fast-dLLM's "dual cache"):
    out = model(ids, mask, return_kv=True)           # out.kv_cache: per layer (keys, values),
                                                     # [B, n_kv_heads, L, head_dim], keys rotated
    out = model(ids[:, s:e], mask, kv_cache=out.kv_cache, block_start=s)
The second call runs only the block's tokens (positions s..e-1) against the cached keys and values of the whole
sequence, with the block's own fresh ones in place of s..e-1; `mask` still covers the whole sequence; logits and
hidden states are the block's; the cache is not modified (return_kv=True returns the merged one). The outputs
outside the block are those of the cached pass: exact when nothing outside the block changed since.
"""
from raydllm.core.archs.dream import DreamConfig, DreamModel
from raydllm.core.archs.llada import LLaDAConfig, LLaDAModelLM

# config.json model_type (lowercased) -> raydllm's (config class, model class)
ARCHITECTURES = {"llada": (LLaDAConfig, LLaDAModelLM), "dream": (DreamConfig, DreamModel)}
