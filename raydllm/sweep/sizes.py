"""Sweep layer: what the models a sweep trains weigh, without loading them: parameter counts, the shapes LoRA
adapts, the predictor's size and the bytes one checkpoint writes. `raydllm tune --plan` sizes a sweep with these
and `raydllm bench` (memory arithmetic) reads the same figures, so both say the same thing.

Hub models are known by their family (their config.json figures below, read once from the hub's files); the
embedded tiny model is counted from its config (raydllm.core.model: pre-LayerNorm blocks, untied output head).
"""
from __future__ import annotations

from typing import Any

from raydllm.core.config import ConfigError

GIB = 1024 ** 3

# config.json of each family's base: d_model / hidden_size, mlp_hidden_size / intermediate_size, the width of
# k_proj and v_proj (n_kv_heads x head_dim), n_layers, vocab; n_params the model's own count.
MODEL_SIZES: dict[str, dict[str, float]] = {
    # GSAI-ML/LLaDA-8B-Base (and -Instruct): 32 of 32 heads are key/value heads.
    "llada-8b": {"n_params": 8.02e9, "hidden_size": 4096, "mlp_hidden_size": 12_288, "kv_width": 4096,
                 "n_layers": 32, "vocab_size": 126_464},
    # Dream-org/Dream-v0-Base-7B (Qwen2.5-7B's shapes): 4 key/value heads of 128.
    "dream-7b": {"n_params": 7.62e9, "hidden_size": 3584, "mlp_hidden_size": 18_944, "kv_width": 512,
                 "n_layers": 28, "vocab_size": 152_064},
}
TINY_VOCAB = 260  # the embedded byte tokenizer's vocabulary (256 bytes + its special tokens)
TINY_MLP_RATIO = 4


def model_family(name: str) -> str | None:
    """"llada-8b", "dream-7b" or "tiny" for a config's model.name (a hub id or a local folder named after it)."""
    lowered = name.lower()
    if name == "tiny":
        return "tiny"
    if "llada" in lowered and "8b" in lowered:
        return "llada-8b"
    if "dream" in lowered and "7b" in lowered:
        return "dream-7b"
    return None


def model_shape(model) -> dict[str, float]:
    """The sizes of a config's model (`model`: its ModelConfig); refuses a model this table does not know."""
    family = model_family(model.name)
    if family == "tiny":
        d, layers = model.d_model, model.n_layers
        m = TINY_MLP_RATIO * d
        blocks = layers * (12 * d * d + 13 * d)  # the same block as the predictor's (predictor_params)
        n = TINY_VOCAB * d + blocks + 2 * d + d * TINY_VOCAB  # embedding, blocks, final LayerNorm, output head
        return {"n_params": float(n), "hidden_size": d, "mlp_hidden_size": m, "kv_width": d, "n_layers": layers,
                "vocab_size": TINY_VOCAB}
    if family is None:
        raise ConfigError(f"model.name: {model.name!r}: the plan knows the sizes of the tiny model, LLaDA-8B and "
                          f"Dream-7B only")
    return dict(MODEL_SIZES[family])


def predictor_params(hidden_size: int, k_layers: int) -> int:
    """Parameters of a k-block predictor at backbone width d: per block qkv 3d²+3d, proj d²+d,
    MLP 8d²+5d, two LayerNorms 4d = 12d² + 13d (raydllm.core.model.Block)."""
    d = hidden_size
    return k_layers * (12 * d * d + 13 * d)


def lora_adapter_params(rank: int, *, hidden_size: int, mlp_hidden_size: int, kv_width: int, n_layers: int) -> int:
    """LoRA parameters r(d_in + d_out) on every attention and MLP linear of each block, LLaDA's names: q_proj and
    attn_out (d -> d), k_proj and v_proj (d -> kv), ff_proj and up_proj (d -> m), ff_out (m -> d); Dream's
    q/o, k/v, gate/up and down are the same shapes."""
    d, m, kv = hidden_size, mlp_hidden_size, kv_width
    return n_layers * rank * (2 * (d + d) + 2 * (d + kv) + 3 * (d + m))


def checkpoint_bytes_estimate(n_params: float, *, world_size: int = 8, lam_zero: bool = False,
                              export_ema: bool = False, trainable: float | None = None,
                              export_params: float | None = None) -> dict[str, Any]:
    """Bytes one checkpoint writes (all ranks together) under ZeRO-2 bf16: the bf16 module weights (2N,
    rank 0's model states), the optimizer shards (fp32 master + Adam m, v: 12N over all ranks), the float32
    EMA (4N, lambda > 0); the final one adds the weights-only export (2N bf16, +2N with the EMA).
    `trainable`: what the engine saves when it is not the whole model (LoRA: the adapters and the predictor,
    the frozen base is left out); `export_params`: the exported backbone (default n_params)."""
    n = float(n_params if trainable is None else trainable)
    per_save = 2 * n + 12 * n + (0 if lam_zero else 4 * n)
    e = float(n_params if export_params is None else export_params)
    export = 2 * e + (2 * e if export_ema else 0)
    return {"per_save_bytes": per_save, "per_save_gib": round(per_save / GIB, 1),
            "export_bytes": export, "export_gib": round(export / GIB, 1), "world_size": world_size}
