"""Bench layer: memory arithmetic for LLaDA-8B-sized trials: per-GPU bytes under DeepSpeed ZeRO (full
fine-tuning and LoRA), host memory while loading, checkpoint sizes, and a measured load of a model folder.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from raydllm.sweep.sizes import MODEL_SIZES, checkpoint_bytes_estimate, lora_adapter_params, predictor_params


GIB = 1024 ** 3
MIB = 1024 ** 2

# Usable memory of the cards the README talks about: torch.cuda.get_device_properties().total_memory of
# an A100-SXM4-40GB / -80GB, less 1 GiB for the CUDA context, NCCL buffers and allocator fragmentation.
A100_USABLE_BYTES = {"a100_40gb": 42_505_273_344 - GIB, "a100_80gb": 85_198_045_184 - GIB}

# LLaDA-8B-Base (the paper preset's model) and its block shapes: raydllm.sweep.sizes, shared with `tune --plan`.
LLADA_8B = {"name": "GSAI-ML/LLaDA-8B-Base", **{k: v for k, v in MODEL_SIZES["llada-8b"].items()
                                                 if k in ("n_params", "hidden_size", "n_layers", "vocab_size")}}
LLADA_8B_BLOCK = {k: MODEL_SIZES["llada-8b"][k] for k in ("mlp_hidden_size", "kv_width")}


def _zero_state_bytes(n: float, *, world_size: int, zero_stage: int, bf16: bool) -> dict[str, float]:
    """Per-GPU bytes of n trainable parameters under DeepSpeed ZeRO with an Adam-type optimizer.

    bf16 (DeepSpeed "bf16": {"enabled": true}): the model holds bf16 weights (2n), gradients are bf16
    (2n, reduce-scattered at stage >= 2), the optimizer keeps an fp32 master copy plus Adam m and v
    (4n + 8n = 12n, partitioned at stage >= 1). fp32: weights 4n, gradients 4n; ZeRO 1/2 still keep an
    fp32 master copy of the partition next to Adam m, v (12n / W); stage 0 is a plain torch optimizer (8n).
    Stage 0 with bf16 runs DeepSpeed's BF16_Optimizer (fp32 master + Adam partitioned like stage 1, plus
    full-size fp32 gradient accumulators); treat the stage-0/1/3 figures as approximate, stage 2 is exact
    up to alignment padding.
    """
    w = world_size
    elt = 2 if bf16 else 4
    params = elt * n / (w if zero_stage >= 3 else 1)
    grads = elt * n / (w if zero_stage >= 2 else 1)
    if zero_stage == 0 and bf16:
        optimizer, extra = 12 * n / w, 4 * n  # BF16_Optimizer: fp32 grad accumulators, replicated
    elif zero_stage == 0:
        optimizer, extra = 8 * n, 0.0
    else:
        optimizer, extra = 12 * n / w, 0.0
    return {"params": params, "grads": grads + extra, "optimizer": optimizer}


def estimate_memory(n_params: int, *, world_size: int, zero_stage: int, k_predictor_layers: int,
                    hidden_size: int, ema_dtype: str, ema_on_cpu: bool, bf16: bool,
                    activation_gb: float | None = None, lam_zero: bool = False,
                    reduce_bucket_elements: float = 5e8, l2_anchor: bool = False) -> dict[str, Any]:
    """Per-GPU memory of one DLLM-JEPA rank under DeepSpeed ZeRO (bytes, plus GiB and fit verdicts).

    Terms (N backbone params, P predictor params, W world size), for ZeRO-2 + bf16:
    * weights: bf16 backbone + predictor, replicated: 2(N + P);
    * gradients: bf16, reduce-scattered, each rank keeps its partition: 2(N + P)/W;
    * optimizer: fp32 master + Adam m, v of the rank's partition: 12(N + P)/W;
    * EMA target: a full replicated copy, 4N (float32) or 2N (bfloat16), on every GPU unless it lives in
      host memory (`ema_on_cpu`, then counted under host_bytes_per_rank instead);
    * transient, backward: DeepSpeed's contiguous reduce bucket (reduce_bucket_size elements, default
      5e8, in the gradient dtype) plus activations (`activation_gb`; None = not counted, say so);
    * L2-to-base anchor (`l2_anchor`): theta_base, a clone of the backbone weights the optimizer updates,
      on the GPU in their dtype: 2N under bf16 (4N in fp32), replicated, none in host memory;
    * transient, optimizer step: the fp32 copy of the rank's gradient partition, 4(N + P)/W.
    Peak = resident + max(backward transient, step transient).
    `lam_zero` = the lambda = 0 baseline: no EMA (the predictor is still built by today's worker).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    if ema_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"ema_dtype must be float32 or bfloat16, got {ema_dtype!r}")
    w = world_size
    n = float(n_params)
    p = float(predictor_params(hidden_size, k_predictor_layers))
    backbone = _zero_state_bytes(n, world_size=w, zero_stage=zero_stage, bf16=bf16)
    predictor = _zero_state_bytes(p, world_size=w, zero_stage=zero_stage, bf16=bf16)
    ema_bytes = 0.0 if lam_zero else (4 if ema_dtype == "float32" else 2) * n
    ema_gpu = 0.0 if ema_on_cpu else ema_bytes
    grad_elt = 2 if bf16 else 4
    bucket = reduce_bucket_elements * grad_elt if zero_stage >= 2 else 0.0
    activations = (activation_gb or 0.0) * 1e9
    step_transient = 4 * (n + p) / w if zero_stage >= 1 else 0.0
    resident = {
        "backbone_weights": backbone["params"], "backbone_grads": backbone["grads"],
        "backbone_optimizer": backbone["optimizer"],
        "predictor_weights": predictor["params"], "predictor_grads": predictor["grads"],
        "predictor_optimizer": predictor["optimizer"],
        "ema": ema_gpu,
        "l2_anchor_base": (2 if bf16 else 4) * n if l2_anchor else 0.0,
    }
    resident_total = sum(resident.values())
    backward_peak = resident_total + bucket + activations
    step_peak = resident_total + step_transient
    peak = max(backward_peak, step_peak)
    out: dict[str, Any] = {
        "n_params": int(n), "predictor_params": int(p), "world_size": w, "zero_stage": zero_stage,
        "k_predictor_layers": k_predictor_layers, "bf16": bf16, "ema_dtype": None if lam_zero else ema_dtype,
        "ema_on_cpu": ema_on_cpu, "lam_zero": lam_zero, "l2_anchor": l2_anchor,
        "bytes": {**resident, "reduce_bucket": bucket, "activations": activations,
                  "step_fp32_grad_partition": step_transient},
        "resident_bytes": resident_total, "peak_bytes": peak,
        "host_bytes_per_rank": ema_bytes if ema_on_cpu else 0.0,
        "resident_gib": resident_total / GIB, "peak_gib": peak / GIB,
        "activations_counted": activation_gb is not None,
    }
    for card, usable in A100_USABLE_BYTES.items():
        out[f"fits_{card}"] = peak <= usable
    return out


def rough_activation_gb(*, micro_batch: int, seq_len: int, hidden_size: int, n_layers: int, vocab_size: int,
                        checkpointing: bool = True, jepa: bool = True) -> float:
    """A rough bf16 activation figure (GB) for a LLaMA-shaped bidirectional model; meant for the fit
    verdicts only. With activation checkpointing: each layer's input is kept (2·B·L·d per layer) plus one
    layer recomputed in backward (~34·B·L·d bytes with flash/SDPA attention); the logits are bf16
    (2·B·L·V) with their fp32 CE copy on the masked rows (~4·B·L·V·t, counted at t = 1 to stay on the
    safe side) and the same again for their gradient. The no-grad target forward holds one layer's
    activations and its own (unused) logits, 2·B·L·V, freed before the backward."""
    b, length, d, v = micro_batch, seq_len, hidden_size, vocab_size
    tokens = b * length
    if checkpointing:
        layers = 2 * tokens * d * n_layers + 34 * tokens * d
    else:
        layers = 34 * tokens * d * n_layers
    logits = 2 * tokens * v + 2 * 4 * tokens * v
    target = (2 * tokens * v + 34 * tokens * d) if jepa else 0
    # The target forward finishes before the backward starts, so it only adds where it exceeds the
    # online graph's own transient; count the larger of the two to be safe.
    return (layers + logits + max(0, target - 34 * tokens * d)) / 1e9


def llada_memory_table(*, world_size: int = 8, ks=(1, 2, 3, 4, 5), micro_batch: int = 4,
                       seq_len: int = 512) -> dict[str, Any]:
    """The README's table: LLaDA-8B under ZeRO-2 + bf16 at `world_size`, per predictor depth and EMA
    placement, with and without a rough activation term (micro-batch 4 x 512 tokens, checkpointing on)."""
    m = LLADA_8B
    act = rough_activation_gb(micro_batch=micro_batch, seq_len=seq_len, hidden_size=m["hidden_size"],
                              n_layers=m["n_layers"], vocab_size=m["vocab_size"])
    act_base = rough_activation_gb(micro_batch=micro_batch, seq_len=seq_len, hidden_size=m["hidden_size"],
                                   n_layers=m["n_layers"], vocab_size=m["vocab_size"], jepa=False)
    common = dict(world_size=world_size, zero_stage=2, hidden_size=m["hidden_size"], bf16=True)
    rows = []

    def row(label: str, est_no_act: dict, est_act: dict) -> dict:
        return {"config": label, "k": est_act["k_predictor_layers"],
                "resident_gib": round(est_act["resident_gib"], 2),
                "peak_gib_without_activations": round(est_no_act["peak_gib"], 2),
                "peak_gib": round(est_act["peak_gib"], 2),
                "fits_a100_40gb": est_act["fits_a100_40gb"], "fits_a100_80gb": est_act["fits_a100_80gb"],
                "host_gib_per_rank": round(est_act["host_bytes_per_rank"] / GIB, 2)}

    for k in (ks[0],):
        kw = dict(common, k_predictor_layers=k, ema_dtype="float32", ema_on_cpu=False, lam_zero=True)
        rows.append(row("baseline (lambda=0)", estimate_memory(int(m["n_params"]), **kw),
                        estimate_memory(int(m["n_params"]), activation_gb=act_base, **kw)))
        kw = dict(kw, l2_anchor=True)  # the paper's L2 arm: lambda = 0 + the anchor
        rows.append(row("L2 anchor (lambda=0, theta_base bf16 on gpu)", estimate_memory(int(m["n_params"]), **kw),
                        estimate_memory(int(m["n_params"]), activation_gb=act_base, **kw)))
    for ema_dtype, on_cpu in (("float32", False), ("bfloat16", False), ("float32", True)):
        for k in ks:
            kw = dict(common, k_predictor_layers=k, ema_dtype=ema_dtype, ema_on_cpu=on_cpu)
            label = f"jepa, ema {ema_dtype} on {'cpu' if on_cpu else 'gpu'}"
            rows.append(row(label, estimate_memory(int(m["n_params"]), **kw),
                            estimate_memory(int(m["n_params"]), activation_gb=act, **kw)))
    return {"model": m["name"], "n_params": m["n_params"], "hidden_size": m["hidden_size"],
            "n_layers": m["n_layers"], "world_size": world_size, "zero_stage": 2, "bf16": True,
            "activation_gb_rough": round(act, 2), "activation_gb_rough_baseline": round(act_base, 2),
            "activation_assumption": f"micro-batch {micro_batch} x {seq_len} tokens, activation checkpointing",
            "usable_gib": {k: round(v / GIB, 2) for k, v in A100_USABLE_BYTES.items()},
            "rows": rows, "load": load_host_estimate(m["n_params"]),
            "checkpoints": checkpoint_bytes_estimate(m["n_params"], world_size=world_size),
            # search_spaces/gsm8k.yaml: 444 steps, reports every 37, ASHA grace 74, reduction 3
            "checkpoints_per_trial": {
                "every_report": trial_checkpoint_bytes(m["n_params"], max_t=444, eval_every=37, grace=74, factor=3,
                                                       checkpoint_at_rungs=False),
                "rungs_and_end": trial_checkpoint_bytes(m["n_params"], max_t=444, eval_every=37, grace=74, factor=3)}}


def load_host_estimate(n_params: float) -> dict[str, Any]:
    """Host memory per rank while a rank builds its model from a bf16 checkpoint (LLaDA-8B-Base's), in
    bytes and GiB, from what `measure_load_memory` measured on the tiny architectures (stored in bf16 as the
    hub ships them; README "Costs"):
    * loaded in bf16 (raydllm: the training dtype): the weights stay memory-mapped from the checkpoint
      files, so a rank's private memory barely grows (0.1x the weights, measured) and the mapped pages
      (2N) are page cache shared by every rank of the node that maps the same files;
    * loaded in float32 (what a rank did without a dtype on transformers 4): the peak is 1.54x the float32
      weights (measured: the float32 copy plus the bf16 pages being read), all private: 6.2N per rank;
    * DLLM-JEPA builds its EMA from the loaded weights: a private bf16 deep copy (2N), then float32 (4N)
      on the GPU (jepa.ema_device=auto; the host copy is freed) or in host memory (jepa.ema_device=cpu)."""
    n = float(n_params)
    figures = {
        "load_bf16_private": 0.1 * 2 * n,
        "load_bf16_mapped_shared_per_node": 2 * n,
        "load_float32_peak_private": 1.54 * 4 * n,
        "jepa_ema_init_peak_private": 0.1 * 2 * n + 2 * n + 4 * n,
        "jepa_ema_cpu_resident_private": 4 * n,
    }
    return {"bytes_per_rank": figures, "gib_per_rank": {k: round(v / GIB, 1) for k, v in figures.items()},
            "measured_on": "tiny LLaDA/Dream (~55M params) stored in bf16, tests/test_llada_dream.py"}


def trial_checkpoint_bytes(n_params: float, *, max_t: int, eval_every: int, grace: int, factor: float,
                           checkpoint_at_rungs: bool = True, lam_zero: bool = False) -> dict[str, Any]:
    """Checkpoint bytes a trial that runs to max_t writes: at every report (before), or at ASHA's rungs and
    the end (now), plus the final export."""
    import math

    est = checkpoint_bytes_estimate(n_params, lam_zero=lam_zero)
    count = int(math.log(max_t / grace) / math.log(factor) + 1) if max_t >= grace else 0
    rungs = {int(grace * factor ** k) for k in range(count)}
    reports = list(range(eval_every, max_t, eval_every)) + [max_t]
    at_rungs = sum(1 for step in reports if step == max_t or any(step - eval_every < r <= step for r in rungs))
    saves = at_rungs if checkpoint_at_rungs else len(reports)
    total = saves * est["per_save_bytes"] + est["export_bytes"]
    return {"saves": saves, "bytes": total, "tb": round(total / 1e12, 2), "per_save_gib": est["per_save_gib"]}


def measure_load_memory(folder: str | Path, dtype: str) -> dict[str, Any]:
    """Peak host memory a `backbone.load_pretrained(folder, dtype)` adds, measured in a fresh Linux process:
    the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs just before the load) minus
    the resident set before it; imports, config and tokenizer come first. Also, once every weight has been
    read: the private (RssAnon) and file-backed (RssFile: memory-mapped checkpoint pages, shared by every
    rank on a node that maps the same file) resident memory the model holds."""
    import subprocess

    script = (
        "import json, sys, torch\n"
        "from transformers import AutoTokenizer, PreTrainedConfig\n"
        "from raydllm.engine.backbone import load_pretrained\n"
        "def status(key):\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith(key + ':'))\n"
        "    return int(line.split()[1]) * 1024\n"
        "folder, dtype = sys.argv[1], getattr(torch, sys.argv[2])\n"
        "PreTrainedConfig.get_config_dict(folder)  # raydllm's own classes load it: none of the folder's code runs\n"
        "AutoTokenizer.from_pretrained(folder, trust_remote_code=False)\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # resets the peak (VmHWM) to the current RSS\n"
        "before = {k: status(k) for k in ('VmRSS', 'RssAnon', 'RssFile')}\n"
        "model, _ = load_pretrained(folder, trust_remote_code=False, dtype=dtype)\n"
        "peak = status('VmHWM')\n"
        "for p in model.parameters():  # touch every weight: memory-mapped ones are read in now\n"
        "    float(p.detach().float().sum())\n"
        "after = {k: status(k) - v for k, v in before.items()}\n"
        "params = sum(p.numel() * p.element_size() for p in model.parameters())\n"
        "print(json.dumps({'peak_delta_bytes': peak - before['VmRSS'], 'param_bytes': params,\n"
        "                  'anon_after_bytes': after['RssAnon'], 'file_after_bytes': after['RssFile'],\n"
        "                  'dtype': str(next(model.parameters()).dtype)}))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                      os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", script, str(folder), dtype], capture_output=True, text=True,
                         env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"measure_load_memory: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_over_params"] = result["peak_delta_bytes"] / max(result["param_bytes"], 1)
    return result


def estimate_lora_memory(n_params: int, n_adapter: int, *, k_predictor_layers: int, hidden_size: int,
                         activation_gb: float | None = None, lam_zero: bool = False, ema_dtype: str = "float32",
                         reduce_bucket_elements: float = 5e8) -> dict[str, Any]:
    """Per-GPU memory of one LoRA trial on one GPU (DeepSpeed ZeRO-2 at world size 1, bf16), in bytes and GiB.

    Terms (N base params, A adapter params, P predictor params; lambda = 0 builds no predictor):
    * frozen base: bf16 weights 2N, no gradient, no optimizer state;
    * adapters + predictor, trained: `_zero_state_bytes` at W = 1: bf16 weights, bf16 gradients, fp32 master
      + Adam m, v = 16(A + P);
    * EMA target (DLLM-JEPA): the adapters only, 4A in float32 (the base is shared with the online forward);
    * transients as `estimate_memory`: the reduce bucket (allocated at its full size), activations, and the
      fp32 gradient copy of the optimizer step.
    """
    n, a = float(n_params), float(n_adapter)
    p = 0.0 if lam_zero else float(predictor_params(hidden_size, k_predictor_layers))
    trained = _zero_state_bytes(a + p, world_size=1, zero_stage=2, bf16=True)
    resident = {"base_weights": 2 * n, "adapter_weights": 2 * a, "adapter_grads": 2 * a, "adapter_optimizer": 12 * a,
                "predictor_weights": 2 * p, "predictor_grads": 2 * p, "predictor_optimizer": 12 * p,
                "ema_adapters": 0.0 if lam_zero else (4 if ema_dtype == "float32" else 2) * a}
    assert abs(sum(trained.values()) - sum(v for k, v in resident.items() if k.startswith(("adapter", "predictor")))) < 1
    resident_total = sum(resident.values())
    bucket = reduce_bucket_elements * 2
    activations = (activation_gb or 0.0) * 1e9
    peak = max(resident_total + bucket + activations, resident_total + 4 * (a + p))
    return {"n_params": int(n), "adapter_params": int(a), "predictor_params": int(p),
            "k_predictor_layers": None if lam_zero else k_predictor_layers, "lam_zero": lam_zero,
            "bytes": {**resident, "reduce_bucket": bucket, "activations": activations},
            "resident_bytes": resident_total, "peak_bytes": peak,
            "resident_gib": resident_total / GIB, "peak_gib": peak / GIB}


def llada_lora_memory_table(*, ranks=(8, 16, 64), k: int = 1, micro_batch: int = 4, seq_len: int = 512
                            ) -> dict[str, Any]:
    """LLaDA-8B LoRA, one GPU per trial: baseline and DLLM-JEPA (EMA adapters float32 on the GPU) per rank, at
    micro-batch 4 x 512 with activation checkpointing (the activation figures of `llada_memory_table`)."""
    m = LLADA_8B
    shape = dict(hidden_size=m["hidden_size"], n_layers=m["n_layers"], vocab_size=m["vocab_size"],
                 micro_batch=micro_batch, seq_len=seq_len)
    act = {"baseline": rough_activation_gb(**shape, jepa=False), "jepa": rough_activation_gb(**shape)}
    rows = []
    for rank in ranks:
        n_adapter = lora_adapter_params(rank, hidden_size=m["hidden_size"], n_layers=m["n_layers"], **LLADA_8B_BLOCK)
        est = {arm: estimate_lora_memory(int(m["n_params"]), n_adapter, k_predictor_layers=k,
                                         hidden_size=m["hidden_size"], activation_gb=act[arm],
                                         lam_zero=arm == "baseline")
               for arm in ("baseline", "jepa")}
        base, jepa = est["baseline"]["peak_bytes"], est["jepa"]["peak_bytes"]
        terms = est["jepa"]["bytes"]
        ema = terms["ema_adapters"]
        predictor = sum(v for key, v in terms.items() if key.startswith("predictor"))
        rows.append({"rank": rank, "adapter_params": n_adapter,
                     "baseline_peak_gib": round(base / GIB, 2), "jepa_peak_gib": round(jepa / GIB, 2),
                     "ema_adapters_mib": round(ema / MIB, 1), "ema_share_of_baseline": ema / base,
                     # the predictor's weights, gradients and Adam state (k blocks at backbone width), and the
                     # target forward's extra activations: the rest of what DLLM-JEPA adds
                     "predictor_gib": round(predictor / GIB, 2),
                     "target_activations_gib": round((act["jepa"] - act["baseline"]) * 1e9 / GIB, 2),
                     "jepa_over_baseline": jepa / base - 1.0,
                     "fits_24gib": jepa <= 24 * GIB})
    return {"model": m["name"], "n_params": m["n_params"], "world_size": 1, "zero_stage": 2, "bf16": True,
            "k": k, "activation_gb_rough": {arm: round(v, 2) for arm, v in act.items()},
            "activation_assumption": f"micro-batch {micro_batch} x {seq_len} tokens, activation checkpointing",
            "rows": rows}
