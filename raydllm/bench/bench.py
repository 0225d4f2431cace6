"""Bench layer: what DLLM-JEPA costs over the diffusion-only baseline, measured in one process;
`bench_sweep`, the same search space as a full grid and under ASHA (with the Kendall tau of fast- vs
exact-sampler validation accuracy over its trials); and `sampler_bench`, the exact and the fast sampler side
by side (`raydllm bench sampler`).

`raydllm bench`: 
One WorkerLoop (the real DeepSpeed engine trials use, in a one-rank process group created here when none
exists) runs interleaved optimizer steps of three phases on the same model, the same batches and the same
masks (step i of every phase sees batch i):

* baseline: lambda = 0, no EMA, no target forward (exactly the path `train_step` takes for a lambda = 0
  trial: the loop's EMA is detached and the config's lambda set to 0 for the phase);
* jepa: the configured lambda with the target branch on every step;
* jepa_dropout: the target branch on a fraction `target_prob` of steps (JEPA loss dropout).

Headline figures come from untouched `WorkerLoop.train_step` calls. The split of a step into parts comes
from separate instrumented steps: timestamps taken in forward hooks on the online backbone, the EMA target
and the predictor, and around `engine.backward`, `engine.step` and `EmaTarget.update` (each preceded by
`torch.cuda.synchronize()` on a GPU). The parts partition the step's wall time, so they sum to it.

FLOP model: a training step costs 6·N·T (forward 2NT + backward 4NT) and the target forward adds 2·N·T,
so JEPA / baseline = 8/6 = 4/3 (N = backbone parameters without the input embedding table, T = positions
processed, padding included). With the target branch on a fraction p of steps: 1 + p/3.

`estimate_memory` is the per-GPU arithmetic for a model under DeepSpeed ZeRO (the README quotes it for
LLaDA-8B); `raydllm bench` prints it for LLaDA-8B at world size 8 with predictor depths 1..5, and
`estimate_lora_memory` the same for a LoRA trial on one GPU (frozen bf16 base, adapters, EMA adapters) per rank.
With `--set model.lora.rank=r` the measured phases run in LoRA mode: the target pass is the online backbone with
the EMA adapters swapped in (`objective.EmaAdapters`), charged to target_forward all the same.
"""
from __future__ import annotations

import json
import math
import os
import socket
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

GIB = 1024 ** 3
MIB = 1024 ** 2

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by substring of torch.cuda.get_device_name().
# Checked in order: the first match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM5 / HBM3
    ("A100", 312.0),
)

# Usable memory of the cards the README talks about: torch.cuda.get_device_properties().total_memory of
# an A100-SXM4-40GB / -80GB, less 1 GiB for the CUDA context, NCCL buffers and allocator fragmentation.
A100_USABLE_BYTES = {"a100_40gb": 42_505_273_344 - GIB, "a100_80gb": 85_198_045_184 - GIB}

# LLaDA-8B-Base (the paper preset's model).
LLADA_8B = {"name": "GSAI-ML/LLaDA-8B-Base", "n_params": 8.02e9, "hidden_size": 4096, "n_layers": 32,
            "vocab_size": 126_464}

PARTS = ("data", "online_forward", "target_forward", "predictor_jepa_loss", "backward", "optimizer_step",
         "ema_update", "other")


# ---------------------------------------------------------------------------------------------------
# Memory arithmetic
# ---------------------------------------------------------------------------------------------------

def predictor_params(hidden_size: int, k_layers: int) -> int:
    """Parameters of a k-block predictor at backbone width d: per block qkv 3d²+3d, proj d²+d,
    MLP 8d²+5d, two LayerNorms 4d = 12d² + 13d (raydllm.core.model.Block)."""
    d = hidden_size
    return k_layers * (12 * d * d + 13 * d)


# LLaDA-8B's block shapes (its config.json: d_model 4096, mlp_hidden_size 12288, n_kv_heads 32 of 32 heads):
# the matrices LoRA adapts (backbone.LORA_TARGETS).
LLADA_8B_BLOCK = {"mlp_hidden_size": 12_288, "kv_width": 4096}


def lora_adapter_params(rank: int, *, hidden_size: int, mlp_hidden_size: int, kv_width: int, n_layers: int) -> int:
    """LoRA parameters r(d_in + d_out) on every attention and MLP linear of each block, LLaDA's names: q_proj and
    attn_out (d -> d), k_proj and v_proj (d -> kv), ff_proj and up_proj (d -> m), ff_out (m -> d)."""
    d, m, kv = hidden_size, mlp_hidden_size, kv_width
    return n_layers * rank * (2 * (d + d) + 2 * (d + kv) + 3 * (d + m))


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


def checkpoint_bytes_estimate(n_params: float, *, world_size: int = 8, lam_zero: bool = False,
                              export_ema: bool = False) -> dict[str, Any]:
    """Bytes one checkpoint writes (all ranks together) under ZeRO-2 bf16: the bf16 module weights (2N,
    rank 0's model states), the optimizer shards (fp32 master + Adam m, v: 12N over all ranks), the float32
    EMA (4N, lambda > 0); the final one adds the weights-only export (2N bf16, +2N with the EMA)."""
    n = float(n_params)
    per_save = 2 * n + 12 * n + (0 if lam_zero else 4 * n)
    export = 2 * n + (2 * n if export_ema else 0)
    return {"per_save_bytes": per_save, "per_save_gib": round(per_save / GIB, 1),
            "export_bytes": export, "export_gib": round(export / GIB, 1), "world_size": world_size}


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
        "from transformers import AutoConfig, AutoTokenizer\n"
        "from raydllm.engine.backbone import load_pretrained\n"
        "def status(key):\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith(key + ':'))\n"
        "    return int(line.split()[1]) * 1024\n"
        "folder, dtype = sys.argv[1], getattr(torch, sys.argv[2])\n"
        "AutoConfig.from_pretrained(folder, trust_remote_code=True)\n"
        "AutoTokenizer.from_pretrained(folder, trust_remote_code=True)\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # resets the peak (VmHWM) to the current RSS\n"
        "before = {k: status(k) for k in ('VmRSS', 'RssAnon', 'RssFile')}\n"
        "model, _ = load_pretrained(folder, trust_remote_code=True, dtype=dtype)\n"
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


# ---------------------------------------------------------------------------------------------------
# Process group, timing helpers
# ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def one_rank_group(device: torch.device):
    """A one-process group (gloo on CPU, nccl on CUDA) unless one exists; torn down if created here."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _minor_faults() -> int:
    """Minor page faults of this process so far (fresh pages the kernel had to map and zero); 0 where
    getrusage is unavailable. On CPU they show allocations that glibc handed back to the OS and takes again."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timeline:
    """Charges wall time to the current part; `enter(part)` closes the running one and opens `part`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.part: str | None = None
        self.t = 0.0
        self.faults = 0
        self.totals: dict[str, float] = defaultdict(float)
        self.fault_totals: dict[str, int] = defaultdict(int)
        self.active = False

    def enter(self, part: str | None) -> None:
        if not self.active:
            return
        _sync(self.device)
        now = time.perf_counter()
        faults = _minor_faults()
        if self.part is not None:
            self.totals[self.part] += now - self.t
            self.fault_totals[self.part] += faults - self.faults
        self.part, self.t, self.faults = part, now, faults


class _Instrument:
    """Hooks that split `train_step` into parts; inert unless the timeline is active."""

    def __init__(self, loop, ema):
        self.loop = loop
        self.timeline = _Timeline(loop.device)
        self.positions = 0  # padded positions the online backbone processed (for the FLOP model)
        tl = self.timeline
        backbone = loop.engine.module.backbone

        def count(_module, args, kwargs):
            if getattr(ema, "active", False):  # LoRA: the target forward runs the online modules (EmaAdapters)
                return
            ids = args[0] if args else kwargs.get("input_ids")
            if isinstance(ids, torch.Tensor):
                self.positions += int(ids.numel())
            tl.enter("online_forward")

        self.handles = [
            backbone.register_forward_pre_hook(count, with_kwargs=True),
            ema.module.register_forward_pre_hook(lambda *_: tl.enter("target_forward")),
            loop.engine.module.predictor.register_forward_pre_hook(lambda *_: tl.enter("predictor_jepa_loss")),
        ]
        self.engine = loop.engine
        self.ema = ema
        self._patch(loop.engine, "backward", "backward")
        self._patch(loop.engine, "step", "optimizer_step")
        self._patch(ema, "update", "ema_update")

    def _patch(self, obj, name: str, part: str) -> None:
        original = getattr(obj, name)
        tl = self.timeline

        def wrapped(*args, **kwargs):
            tl.enter(part)
            try:
                return original(*args, **kwargs)
            finally:
                tl.enter("other")

        setattr(obj, name, wrapped)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for obj, name in ((self.engine, "backward"), (self.engine, "step"), (self.ema, "update")):
            obj.__dict__.pop(name, None)

    def timed_step(self) -> tuple[float, dict[str, float], dict[str, int]]:
        tl = self.timeline
        tl.totals = defaultdict(float)
        tl.fault_totals = defaultdict(int)
        tl.active = True
        tl.part = None
        tl.enter("data")
        start = tl.t
        try:
            self.loop.train_step()
        finally:
            tl.enter(None)
            tl.active = False
        return tl.t - start, dict(tl.totals), dict(tl.fault_totals)


# ---------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------

def _pick_device(cfg) -> torch.device:
    if cfg.train.use_gpu is not False and torch.cuda.is_available():
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    if cfg.train.use_gpu is True:
        print("raydllm bench: train.use_gpu=true but no CUDA device is visible; running on CPU",
              file=sys.stderr)
    return torch.device("cpu")


def _peak_tflops(device: torch.device, bf16: bool) -> float | None:
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _training_state_bytes(loop) -> int:
    """Bytes of the trainable state: module weights, ZeRO's flat groups and fp32 master partitions,
    persistent gradient buffers, and the inner optimizer's state (Adam m, v), each storage counted once."""
    engine = loop.engine
    opt = engine.optimizer
    tensors = [p for p in engine.module.parameters()] + [p.grad for p in engine.module.parameters()]
    for attr in ("bit16_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition",
                 "grads_in_partition", "averaged_gradients"):
        value = getattr(opt, attr, None)
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, (list, tuple)):
            for v in value:
                if isinstance(v, torch.Tensor):
                    tensors += [v, v.grad]
                elif isinstance(v, (list, tuple)):
                    tensors += [x for x in v if isinstance(x, torch.Tensor)]
    inner = getattr(opt, "optimizer", opt)
    for state in getattr(inner, "state", {}).values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return _storage_bytes(tensors)


def _ema_bytes(ema) -> int:
    return sum(p.numel() * p.element_size() for p in ema.params)


def _predictor_state_bytes(loop) -> int:
    """Predictor weights + gradients + fp32 master + Adam m, v (what ZeRO keeps for them, W = 1)."""
    params = list(loop.engine.module.predictor.parameters())
    n = sum(p.numel() for p in params)
    elt = params[0].element_size() if params else 4
    return n * (elt + elt + 4 + 8)


@contextmanager
def _phase(loop, ema, cfg_phase):
    """Run `loop` as a trial with `cfg_phase` would: lambda = 0 has no EMA at all."""
    saved_cfg, saved_ema = loop.cfg, loop.ema
    loop.cfg = cfg_phase
    loop.ema = ema if cfg_phase.jepa.lam > 0 else None
    try:
        yield
    finally:
        loop.cfg, loop.ema = saved_cfg, saved_ema


def _with_jepa(cfg, **changes):
    jepa = cfg.jepa.model_copy(update=changes)
    return cfg.model_copy(update={"jepa": jepa})


def _median(xs):
    return statistics.median(xs) if xs else None


def _sampler_bench(loop, *, batch_size: int, gen_length: int, steps: int) -> dict[str, Any]:
    from raydllm.core.sampler import SamplerConfig, sampler_throughput

    records = loop.val_records or loop.train_records
    rows = [records[i % len(records)].prompt_ids for i in range(batch_size)]
    length = max(len(r) for r in rows)
    pad = loop.ids.pad
    prompts = torch.full((batch_size, length), pad, dtype=torch.long)
    mask = torch.zeros((batch_size, length), dtype=torch.long)
    for i, r in enumerate(rows):
        prompts[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, length - len(r):] = 1
    prompts, mask = prompts.to(loop.device), mask.to(loop.device)
    backbone = loop.engine.module.backbone
    config = SamplerConfig(steps=steps, gen_length=gen_length, block_length=gen_length)

    def logits_fn(ids, attention_mask):
        return backbone.logits(ids, attention_mask)

    backbone.eval()
    try:
        result = sampler_throughput(logits_fn, prompts, mask, mask_id=loop.ids.mask, config=config)
    finally:
        backbone.train()
    return {"batch_size": batch_size, "gen_length": gen_length, "denoising_steps": steps,
            "batched_tokens_per_s": result["batched_tokens_per_s"],
            "one_at_a_time_tokens_per_s": result["sequential_tokens_per_s"],
            "ratio": result["speedup"], "outputs_match": result["outputs_match"]}


# -- raydllm bench sampler -------------------------------------------------------------------------------
class _CountingBackbone:
    """Counts a backbone's forward passes and the positions they compute, for `sampler_bench`: installed as
    instance attributes over `logits` / `forward_with_cache`, removed by `remove`."""

    def __init__(self, backbone):
        self.backbone, self.forwards, self.positions = backbone, 0, 0
        logits, cached = backbone.logits, backbone.forward_with_cache

        def counted_logits(ids, attention_mask=None):
            self.forwards += 1
            self.positions += ids.numel()
            return logits(ids, attention_mask)

        def counted_cache(ids, attention_mask=None, *, cache=None, start=0, end=None):
            self.forwards += 1
            width = ids.shape[1] if cache is None else (end if end is not None else ids.shape[1]) - start
            if cache is not None and backbone.shift_logits and start > 0:
                width += 1  # shifted logits (Dream): the model recomputes the position before the window too
            self.positions += ids.shape[0] * width
            return cached(ids, attention_mask, cache=cache, start=start, end=end)

        backbone.__dict__["logits"], backbone.__dict__["forward_with_cache"] = counted_logits, counted_cache

    def remove(self) -> None:
        self.backbone.__dict__.pop("logits", None)
        self.backbone.__dict__.pop("forward_with_cache", None)


def sampler_bench(*, checkpoint: str | None = None, model: str | None = None, task: str = "gsm8k",
                  items: int = 200, lengths=(32, 128, 256), threshold: float = 0.9, cache: str = "dual",
                  batch_size: int = 16, threads: int | None = 1, progress: bool = False) -> dict[str, Any]:
    """The exact and the fast sampler side by side, in one process, on the same model and the same validation
    items: per generation length, accuracy of each, forward passes per answer position, positions computed,
    wall-clock ratio (exact / fast), tokens/s, and how many answers are identical.

    The model: a raydllm checkpoint (``checkpoint``), any Hugging Face masked-diffusion folder (``model``, e.g.
    a tiny LLaDA), else the embedded model's shipped pretrained base (`local` preset, model.init=pretrained).
    The block length is the evaluation default (the whole answer up to 64 tokens, else 32); the exact sampler
    takes one token per step. Forwards per token = forward passes / (batches x generation length): 1 for the
    exact sampler; a batch's steps are those of its slowest row."""
    from raydllm.engine.backbone import load_backbone
    from raydllm.core.config import ConfigError, load_config
    from raydllm.data.sft import load_examples
    from raydllm.evaluation.evaluate import default_sampler, effective_sampler, evaluate_task, load_checkpoint_backbone, prompt_budget
    from raydllm.data.tasks import get_task
    from raydllm.bench.peak_memory import PeakMemory

    if threads:
        torch.set_num_threads(threads)
    if checkpoint and model:
        raise ConfigError("--checkpoint and --model: choose one model")
    if checkpoint:
        backbone, tokenizer, cfg = load_checkpoint_backbone(checkpoint)
        source = f"checkpoint {checkpoint}"
    else:
        cfg = load_config(task, "local", [f"model.name={model}"] if model else ["model.init=pretrained"])
        torch.manual_seed(cfg.train.seed)
        backbone, tokenizer = load_backbone(cfg.model)
        backbone.eval()
        source = f"Hugging Face folder {model}" if model else "the embedded model's shipped pretrained base"
    cfg = cfg.model_copy(update={"task": task, "data": cfg.data.model_copy(update={"val_limit": items})})
    examples = load_examples(cfg, "validation")[:items]
    task_obj = get_task(task)
    figures: dict[str, Any] = {"model": source, "task": task, "items": len(examples), "batch_size": batch_size,
                               "threads": torch.get_num_threads(), "threshold": threshold, "lengths": {}}
    # Batches of similar prompt lengths (as evaluate_task forms them), each generated by both samplers in turn,
    # so a machine that gets busier or quieter during the run slows both alike.
    prompt_lengths = [len(ids) for ids in tokenizer([task_obj.format_prompt(ex) for ex in examples],
                                                    add_special_tokens=False)["input_ids"]]
    ordered = [examples[i] for i in sorted(range(len(examples)), key=prompt_lengths.__getitem__)]
    chunks = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    for length in lengths:
        samplers = {method: effective_sampler(default_sampler(cfg, gen_length=length, method=method,
                                                              threshold=threshold,
                                                              cache=cache if method == "fast" else "none"), backbone)
                    for method in ("exact", "fast")}
        tally = {m: {"correct": 0.0, "seconds": 0.0, "forwards": 0, "positions": 0, "generations": []}
                 for m in samplers}
        for chunk in chunks:
            for method, sampler in samplers.items():
                counter = _CountingBackbone(backbone)
                start = time.perf_counter()
                try:
                    with PeakMemory(next(backbone.parameters()).device) as peak:
                        metrics, predictions = evaluate_task(
                            backbone, tokenizer, task_obj, chunk, sampler=sampler, batch_size=batch_size,
                            progress=False, max_prompt_tokens=prompt_budget(cfg, sampler, 0))
                finally:
                    counter.remove()
                t = tally[method]
                t["peak_bytes"], figures["peak_memory_method"] = max(t.get("peak_bytes", 0), peak.bytes), peak.method
                t["seconds"] += time.perf_counter() - start
                t["correct"] += metrics[task_obj.primary_metric] * len(chunk)
                t["forwards"] += counter.forwards
                t["positions"] += counter.positions
                t["generations"] += [p["generation"] for p in predictions]
            if progress:
                print(f"length {length}: {sum(len(c) for c in chunks[:chunks.index(chunk) + 1])}/{len(ordered)} "
                      f"items, exact {tally['exact']['seconds']:.0f} s, fast {tally['fast']['seconds']:.0f} s",
                      file=sys.stderr, flush=True)
        row: dict[str, Any] = {}
        for method, sampler in samplers.items():
            t = tally[method]
            row[method] = {"accuracy": t["correct"] / max(len(ordered), 1), "seconds": round(t["seconds"], 2),
                           "tokens_per_s": round(len(ordered) * length / t["seconds"], 1),
                           "forwards": t["forwards"],
                           "forwards_per_token": round(t["forwards"] / (len(chunks) * length), 4),
                           "positions_computed": t["positions"],
                           "peak_memory_mib": round(t.get("peak_bytes", 0) / 2**20, 1),
                           "settings": {"block_length": sampler.block_length,
                                        **({"steps": sampler.steps} if method == "exact" else
                                           {"threshold": sampler.threshold, "cache": sampler.cache})},
                           "generations": t["generations"]}
        exact, fast = row["exact"], row["fast"]
        same = sum(a == b for a, b in zip(exact.pop("generations"), fast.pop("generations")))
        row["speedup"] = round(exact["seconds"] / fast["seconds"], 2)
        row["forward_ratio"] = round(exact["forwards"] / max(fast["forwards"], 1), 2)
        row["positions_ratio"] = round(exact["positions_computed"] / max(fast["positions_computed"], 1), 2)
        row["accuracy_delta_points"] = round(100 * (fast["accuracy"] - exact["accuracy"]), 2)
        row["identical_answers"] = same / max(len(examples), 1)
        figures["lengths"][str(length)] = row
    if not model:
        figures["llada"] = ("skipped: no tiny LLaDA folder given (--model PATH runs the same bench on any Hugging "
                            "Face masked-diffusion folder)")
    return figures


def format_sampler_report(r: dict[str, Any]) -> str:
    lines = [f"sampler bench: {r['model']}, {r['task']} validation, {r['items']} items, batch {r['batch_size']}, "
             f"{r['threads']} thread(s), threshold {r['threshold']}",
             f"{'length':>6} {'acc exact':>9} {'acc fast':>8} {'Δ pp':>6} {'fwd/tok exact':>13} {'fwd/tok fast':>12} "
             f"{'tok/s exact':>11} {'tok/s fast':>10} {'speed-up':>8} {'same':>5}"]
    for length, row in r["lengths"].items():
        e, f = row["exact"], row["fast"]
        lines.append(f"{length:>6} {e['accuracy']:>9.3f} {f['accuracy']:>8.3f} {row['accuracy_delta_points']:>6.1f} "
                     f"{e['forwards_per_token']:>13.3f} {f['forwards_per_token']:>12.3f} {e['tokens_per_s']:>11.1f} "
                     f"{f['tokens_per_s']:>10.1f} {row['speedup']:>7.2f}x {row['identical_answers']:>5.2f}")
    if r["lengths"]:
        lines.append("peak memory (MiB, exact / fast, " + r.get("peak_memory_method", "-") + "): " + ", ".join(
            f"{length}: {row['exact']['peak_memory_mib']} / {row['fast']['peak_memory_mib']}"
            for length, row in r["lengths"].items()))
    lines.append(f"cache: {next(iter(r['lengths'].values()))['fast']['settings']['cache'] if r['lengths'] else '-'}"
                 + (f"; LLaDA: {r['llada']}" if "llada" in r else ""))
    return "\n".join(lines)


def run_bench(cfg, *, steps: int = 10, warmup: int = 2, target_prob: float | None = 0.5,
              sampler_batch: int = 16, sampler_gen_length: int = 32, sampler_steps: int = 16,
              split: bool = True, memory_table: bool = True,
              threads: int | None = None) -> dict[str, Any]:
    """Build one WorkerLoop for `cfg` and measure baseline vs JEPA (vs JEPA loss dropout). See the module
    docstring. `cfg.jepa.lambda` = 0 is bumped to 1 for the JEPA phases (the baseline needs no bump)."""
    if steps < 1 or warmup < 0:
        raise ValueError("bench: --steps must be >= 1 and --warmup >= 0")
    lam = cfg.jepa.lam if cfg.jepa.lam > 0 else 1.0
    cfg_jepa = _with_jepa(cfg, lam=lam, target_prob=1.0)
    cfg_base = _with_jepa(cfg, lam=0.0, target_prob=1.0)
    phases = {"baseline": cfg_base, "jepa": cfg_jepa}
    if target_prob is not None and 0 < target_prob < 1:
        phases["jepa_dropout"] = _with_jepa(cfg, lam=lam, target_prob=target_prob)

    device = _pick_device(cfg)
    saved_threads = torch.get_num_threads()
    if threads or device.type == "cpu":
        # As trials run: train_loop_per_worker sets torch threads to train.cpus_per_worker.
        torch.set_num_threads(threads or max(1, int(cfg.train.cpus_per_worker)))
    try:
        return _run(cfg, device, phases, lam, steps=steps, warmup=warmup, sampler_batch=sampler_batch,
                    sampler_gen_length=sampler_gen_length, sampler_steps=sampler_steps, split=split,
                    memory_table=memory_table)
    finally:
        torch.set_num_threads(saved_threads)


def _run(cfg, device, phases, lam, *, steps, warmup, sampler_batch, sampler_gen_length, sampler_steps, split,
         memory_table) -> dict[str, Any]:
    from raydllm.engine.worker import WorkerLoop

    cfg_jepa = phases["jepa"]
    with one_rank_group(device):
        loop = WorkerLoop(cfg_jepa, rank=0, world=1, device=device)
        ema = loop.ema
        instrument = _Instrument(loop, ema)
        times: dict[str, list[float]] = {name: [] for name in phases}
        tokens: dict[str, list[float]] = {name: [] for name in phases}
        positions: dict[str, list[int]] = {name: [] for name in phases}
        peak_alloc: dict[str, int] = {name: 0 for name in phases}
        target_runs = 0
        target_counter = {"n": 0}
        ema_hook = ema.module.register_forward_hook(lambda *_: target_counter.__setitem__("n", target_counter["n"] + 1))
        names = list(phases)
        for i in range(warmup + steps):
            order = names[i % len(names):] + names[:i % len(names)]  # rotate: no phase always goes first
            for name in order:
                with _phase(loop, ema, phases[name]):
                    loop.step = i  # every phase sees batch i and the masks of step i
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    before_pos, before_tgt = instrument.positions, target_counter["n"]
                    _sync(device)
                    t0 = time.perf_counter()
                    metrics = loop.train_step()
                    _sync(device)
                    elapsed = time.perf_counter() - t0
                if i < warmup:
                    continue
                times[name].append(elapsed)
                tokens[name].append(metrics["tokens"])
                positions[name].append(instrument.positions - before_pos)
                if device.type == "cuda":
                    peak_alloc[name] = max(peak_alloc[name], torch.cuda.max_memory_allocated(device))
                if name == "jepa_dropout":
                    target_runs += int(target_counter["n"] > before_tgt)
        ema_hook.remove()

        splits: dict[str, dict[str, float]] = {}
        split_paired = None
        split_faults: dict[str, dict[str, float]] = {}
        split_totals: dict[str, float] = {}
        if split:
            parts: dict[str, dict[str, list[float]]] = {n: defaultdict(list) for n in ("baseline", "jepa")}
            faults: dict[str, dict[str, list[int]]] = {n: defaultdict(list) for n in ("baseline", "jepa")}
            totals: dict[str, list[float]] = {n: [] for n in ("baseline", "jepa")}
            for i in range(steps):
                for name in (("baseline", "jepa") if i % 2 == 0 else ("jepa", "baseline")):
                    with _phase(loop, ema, phases[name]):
                        loop.step = i
                        total, part, fault = instrument.timed_step()
                    totals[name].append(total)
                    for key in PARTS:
                        parts[name][key].append(part.get(key, 0.0))
                        faults[name][key].append(fault.get(key, 0))
            for name in parts:
                splits[name] = {key: _median(parts[name][key]) for key in PARTS}
                split_faults[name] = {key: _median(faults[name][key]) for key in PARTS}
                split_totals[name] = _median(totals[name])
            split_paired = _median([j / b for j, b in zip(totals["jepa"], totals["baseline"])])
        instrument.remove()

        sampler = (_sampler_bench(loop, batch_size=sampler_batch, gen_length=sampler_gen_length,
                                  steps=sampler_steps) if sampler_batch > 0 else None)

        backbone = loop.engine.module.backbone
        n_backbone = sum(p.numel() for p in backbone.parameters())
        n_trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
        # Embedding lookups cost no matmul FLOPs (the LM head does, and stays in N).
        n_flop = n_backbone - sum(m.weight.numel() for m in backbone.modules() if isinstance(m, torch.nn.Embedding))
        n_predictor = sum(p.numel() for p in loop.engine.module.predictor.parameters())
        state_bytes = _training_state_bytes(loop)
        ema_bytes = _ema_bytes(ema)
        pred_bytes = _predictor_state_bytes(loop)
        bf16, zero_stage = loop.bf16, cfg.train.zero_stage

    med = {name: _median(ts) for name, ts in times.items()}
    mean = {name: statistics.fmean(ts) for name, ts in times.items()}
    tok_s = {name: _median([t / s for t, s in zip(tokens[name], times[name])]) for name in phases}
    peak_tf = _peak_tflops(device, bf16)
    mfu: dict[str, float | None] = {}
    flops_factor = {"baseline": 6.0, "jepa": 8.0}
    for name in ("baseline", "jepa"):
        if peak_tf is None:
            mfu[name] = None
        else:
            per_s = _median([flops_factor[name] * n_flop * p / s for p, s in zip(positions[name], times[name])])
            mfu[name] = per_s / (peak_tf * 1e12)
    if device.type == "cuda":
        peak_mb = {name: peak_alloc[name] / MIB for name in ("baseline", "jepa")}
        memory_kind = ("torch.cuda.max_memory_allocated per phase (the EMA copy stays resident during "
                       "baseline steps here; baseline_without_ema subtracts it)")
        # jepa.ema_device=cpu: the EMA is not resident on the GPU, so there is nothing to subtract.
        peak_mb["baseline_without_ema"] = peak_mb["baseline"] - (0 if ema.offload else ema_bytes) / MIB
    else:
        peak_mb = {"baseline": state_bytes / MIB, "jepa": (state_bytes + ema_bytes) / MIB}
        memory_kind = ("static bytes, not a peak: weights + ZeRO flat groups/fp32 master + gradient buffers + "
                       "Adam state (+ EMA for jepa), counted from the modules; activations excluded "
                       "(CPU has no per-phase allocator peak)")

    ratio = med["jepa"] / med["baseline"]
    result: dict[str, Any] = {
        "preset_model": cfg.model.name, "task": cfg.task, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "bf16": bf16, "zero_stage": zero_stage,
        "engine": "WorkerLoop.train_step (DeepSpeed, one-rank group)",
        "lambda": lam, "k": cfg.jepa.k, "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum": cfg.train.grad_accum, "steps": steps, "warmup": warmup,
        "positions_per_step": _median(positions["baseline"]),
        "n_params_backbone": n_backbone, "n_params_flop": n_flop, "n_params_predictor": n_predictor,
        "lora_rank": cfg.model.lora.rank, "n_params_backbone_trainable": n_trainable,
        "step_time_s": {name: med[name] for name in ("baseline", "jepa")},
        "step_time_s_min": {name: min(times[name]) for name in ("baseline", "jepa")},
        "step_ratio": ratio,
        "step_ratio_mean": mean["jepa"] / mean["baseline"],
        # median over iterations of jepa_i / baseline_i (adjacent steps): steadier on a shared machine
        "step_ratio_paired": _median([j / b for j, b in zip(times["jepa"], times["baseline"])]),
        "step_ratio_expected": 4.0 / 3.0,
        "tokens_per_s": {name: tok_s[name] for name in ("baseline", "jepa")},
        "mfu": mfu, "peak_tflops_bf16": peak_tf,
        "peak_memory_mb": peak_mb, "peak_memory_kind": memory_kind,
        "ema_extra_mb": ema_bytes / MIB, "predictor_extra_mb": pred_bytes / MIB,
        "predictor_in_baseline": True,
    }
    if split:
        result["split_s"] = splits
        result["split_total_s"] = split_totals
        result["split_ratio_paired"] = split_paired
        result["split_minor_faults"] = split_faults  # median page faults per part (host memory)
        if splits:
            j, b = splits["jepa"], splits["baseline"]
            result["split_extra_s"] = {k: j[k] - b[k] for k in PARTS}
    if "jepa_dropout" in phases:
        q = target_runs / max(1, len(times["jepa_dropout"]))
        p = phases["jepa_dropout"].jepa.target_prob
        result["jepa_dropout"] = {
            "target_prob": p, "target_fraction": q,
            # a bimodal step time: mean, not median
            "ratio": mean["jepa_dropout"] / mean["baseline"],
            "expected_nominal": 1.0 + p / 3.0,
            "expected_from_measured": 1.0 + q * (mean["jepa"] / mean["baseline"] - 1.0),
            "tokens_per_s": sum(tokens["jepa_dropout"]) / sum(times["jepa_dropout"]),
        }
    if sampler is not None:
        result["sampler_tokens_per_s"] = {"batched": sampler["batched_tokens_per_s"],
                                          "one_at_a_time": sampler["one_at_a_time_tokens_per_s"]}
        result["sampler_ratio"] = sampler["ratio"]
        result["sampler"] = sampler
    if memory_table:
        result["memory_estimate"] = llada_memory_table()
        result["memory_estimate_lora"] = llada_lora_memory_table()
    return result


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def format_report(r: dict[str, Any]) -> str:
    lines = [f"raydllm bench: {r['preset_model']} on {r['device_name']} ({r['threads']} threads), "
             f"bf16={r['bf16']}, ZeRO-{r['zero_stage']}, {r['steps']} steps after {r['warmup']} warm-up",
             "",
             f"{'':24}{'baseline':>12}{'jepa':>12}",
             f"{'step time (s, median)':24}{_fmt(r['step_time_s']['baseline']):>12}{_fmt(r['step_time_s']['jepa']):>12}",
             f"{'tokens/s':24}{_fmt(r['tokens_per_s']['baseline'], '.0f'):>12}"
             f"{_fmt(r['tokens_per_s']['jepa'], '.0f'):>12}",
             f"{'MFU':24}{_fmt(r['mfu']['baseline'], '.3f'):>12}{_fmt(r['mfu']['jepa'], '.3f'):>12}",
             f"{'memory (MB)':24}{_fmt(r['peak_memory_mb']['baseline'], '.1f'):>12}"
             f"{_fmt(r['peak_memory_mb']['jepa'], '.1f'):>12}",
             f"  ({r['peak_memory_kind']})",
             "",
             f"step_ratio = {r['step_ratio']:.3f} (paired {r['step_ratio_paired']:.3f}, mean-based "
             f"{r['step_ratio_mean']:.3f}; FLOP model 4/3 = 1.333)"]
    if "split_s" in r:
        lines += ["", f"instrumented steps: jepa / baseline = {_fmt(r['split_ratio_paired'])} (paired median)",
                  f"{'part (s, median)':24}{'baseline':>12}{'jepa':>12}{'extra':>12}{'faults b/j':>16}"]
        f = r["split_minor_faults"]
        for k in PARTS:
            lines.append(f"{k:24}{_fmt(r['split_s']['baseline'][k], '.4f'):>12}"
                         f"{_fmt(r['split_s']['jepa'][k], '.4f'):>12}{_fmt(r['split_extra_s'][k], '.4f'):>12}"
                         f"{f['baseline'][k]:>8.0f}/{f['jepa'][k]:<7.0f}")
    if "jepa_dropout" in r:
        d = r["jepa_dropout"]
        lines += ["", f"jepa_dropout: target_prob {d['target_prob']}, ran on {d['target_fraction']:.2f} of steps, "
                      f"ratio {d['ratio']:.3f} (expected {d['expected_from_measured']:.3f} from the measured "
                      f"ratio, {d['expected_nominal']:.3f} nominal)"]
    if "sampler" in r:
        s = r["sampler"]
        lines += ["", f"sampler: batch {s['batch_size']} {s['batched_tokens_per_s']:.0f} tok/s vs one at a time "
                      f"{s['one_at_a_time_tokens_per_s']:.0f} tok/s: {s['ratio']:.2f}x "
                      f"(outputs match: {s['outputs_match']})"]
    if "memory_estimate" in r:
        m = r["memory_estimate"]
        lines += ["", f"memory estimate, {m['model']} ({m['n_params']:.3g} params), ZeRO-2 bf16, world "
                      f"{m['world_size']}, per GPU (GiB; activations ~{m['activation_gb_rough']} GB: "
                      f"{m['activation_assumption']}):",
                  f"{'config':32}{'k':>3}{'resident':>10}{'no-act':>10}{'peak':>8}{'A100-40':>9}{'A100-80':>9}"
                  f"{'host/rank':>11}"]
        for row in m["rows"]:
            lines.append(f"{row['config'][:32]:32}{row['k']:>3}{row['resident_gib']:>10.1f}"
                         f"{row['peak_gib_without_activations']:>10.1f}{row['peak_gib']:>8.1f}"
                         f"{'yes' if row['fits_a100_40gb'] else 'no':>9}{'yes' if row['fits_a100_80gb'] else 'no':>9}"
                         f"{row['host_gib_per_rank']:>11.1f}")
        load, ckpt, trial = m["load"]["gib_per_rank"], m["checkpoints"], m["checkpoints_per_trial"]
        lines += ["", f"loading (host, per rank): bf16 {load['load_bf16_private']} GiB private + "
                      f"{load['load_bf16_mapped_shared_per_node']} GiB mapped (shared per node); float32 would peak at "
                      f"{load['load_float32_peak_private']} GiB; DLLM-JEPA's EMA init peaks at "
                      f"{load['jepa_ema_init_peak_private']} GiB",
                  f"checkpoint: {ckpt['per_save_gib']} GiB a save (all ranks), export {ckpt['export_gib']} GiB; "
                  f"per finished trial of gsm8k.yaml: {trial['rungs_and_end']['saves']} saves, "
                  f"{trial['rungs_and_end']['tb']} TB (every report: {trial['every_report']['saves']} saves, "
                  f"{trial['every_report']['tb']} TB)"]
    if "memory_estimate_lora" in r:
        m = r["memory_estimate_lora"]
        lines += ["", f"memory estimate, {m['model']} LoRA, one GPU per trial (ZeRO-2 bf16, world 1), predictor "
                      f"k = {m['k']}, EMA adapters float32 on the GPU ({m['activation_assumption']}):",
                  f"{'rank':>5}{'adapters':>10}{'baseline':>10}{'jepa':>8}{'EMA MiB':>9}{'EMA %':>7}"
                  f"{'predictor':>10}{'jepa +%':>8}{'<=24 GiB':>9}"]
        for row in m["rows"]:
            lines.append(f"{row['rank']:>5}{row['adapter_params'] / 1e6:>9.1f}M{row['baseline_peak_gib']:>10.2f}"
                         f"{row['jepa_peak_gib']:>8.2f}{row['ema_adapters_mib']:>9.1f}"
                         f"{100 * row['ema_share_of_baseline']:>7.2f}{row['predictor_gib']:>10.2f}"
                         f"{100 * row['jepa_over_baseline']:>8.1f}{'yes' if row['fits_24gib'] else 'no':>9}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# What strength of the L2-to-base anchor changes the update (`raydllm bench l2`)
# ---------------------------------------------------------------------------------------------------

def l2_anchor_strength(cfg, *, lambdas=(0.0, 1e-4, 1e-2, 1.0, 100.0), steps: int = 100,
                       threads: int | None = None) -> dict[str, Any]:
    """Train `steps` steps of `cfg` once per lambda_L2 (the same seed, data and masks; 0 = no anchor) and
    report, per lambda: the ratio ||anchor gradient|| / ||loss gradient|| (over all anchored parameters,
    per backward; its median over the run and its value at the last step) and the parameter distance to
    base ||theta - theta_base|| / ||theta_base|| after the run, against lambda = 0."""
    from raydllm.engine.worker import WorkerLoop

    device = _pick_device(cfg)
    saved_threads = torch.get_num_threads()
    if threads or device.type == "cpu":
        torch.set_num_threads(threads or max(1, int(cfg.train.cpus_per_worker)))
    rows = []
    try:
        with one_rank_group(device):
            for lam in lambdas:
                run_cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(
                    update={"anchor": "l2", "l2_lambda": float(lam)})})
                loop = WorkerLoop(run_cfg, rank=0, world=1, device=device)
                loop.anchor.measure = True
                ratios, start = [], time.perf_counter()
                for _ in range(steps):
                    loop.anchor.loss_sq = loop.anchor.anchor_sq = 0.0
                    metrics = loop.train_step()
                    ratios.append((loop.anchor.anchor_sq / max(loop.anchor.loss_sq, 1e-30)) ** 0.5)
                distance, norm = loop.anchor.distance()
                rows.append({"l2_lambda": float(lam), "grad_ratio_median": _median(ratios),
                             "grad_ratio_last": ratios[-1], "distance_to_base": distance,
                             "relative_distance_to_base": distance / max(norm, 1e-30),
                             "loss_diff_last": metrics["loss_diff"], "seconds": time.perf_counter() - start})
                del loop
    finally:
        torch.set_num_threads(saved_threads)
    free = next((r for r in rows if r["l2_lambda"] == 0.0), None)
    for r in rows:
        r["distance_vs_unanchored"] = (r["distance_to_base"] / free["distance_to_base"]
                                       if free and free["distance_to_base"] > 0 else None)
    return {"model": cfg.model.name, "device": str(device), "steps": steps, "lr": cfg.train.lr,
            "lambda": cfg.jepa.lam, "rows": rows,
            # A bf16 gradient element keeps 8 significant bits: an added term below 2^-9 of it rounds away.
            "bf16_resolution": 2.0 ** -9}


def format_l2_report(r: dict[str, Any]) -> str:
    lines = [f"L2-to-base anchor on {r['model']} ({r['device']}), {r['steps']} steps at lr {r['lr']}, "
             f"jepa.lambda {r['lambda']}:",
             f"{'l2_lambda':>10}{'|g_anchor|/|g_loss| (median)':>30}{'(last)':>10}{'|θ-θ0|/|θ0|':>14}"
             f"{'vs λ=0':>9}"]
    for row in r["rows"]:
        lines.append(f"{row['l2_lambda']:>10g}{row['grad_ratio_median']:>30.3g}{row['grad_ratio_last']:>10.3g}"
                     f"{row['relative_distance_to_base']:>14.3g}{_fmt(row['distance_vs_unanchored'], '.3f'):>9}")
    lines.append(f"(under bf16 an anchor term below {r['bf16_resolution']:.1e} of a gradient element is rounded away)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Grid against ASHA over one search space (`raydllm bench sweep`)
# ---------------------------------------------------------------------------------------------------

def bench_sweep(space_file: str | Path, *, tracking_uri: str, storage: str | None = None) -> dict[str, Any]:
    """The same space run twice: as a full grid (every trial to max_t, the grid-best repeated over the seeds
    to measure seed noise) and under ASHA. Compute is counted in trial-steps, read back from MLflow. Re-running
    resumes unfinished arms and recomputes the figures from MLflow."""
    from raydllm.sweep.search_space import RepeatSettings, load_spec
    from raydllm.sweep.tune import run_spec, sweep_name

    space_file = Path(space_file)
    spec = load_spec(space_file)
    base = sweep_name(spec, space_file)
    arms = {
        "grid": spec.model_copy(update={"scheduler": spec.scheduler.model_copy(update={"type": "fifo"}),
                                        "repeat": RepeatSettings(top=1), "baseline": False}),
        "asha": spec.model_copy(update={"repeat": RepeatSettings(top=0), "baseline": False}),
    }
    figures: dict[str, Any] = {}
    for arm, arm_spec in arms.items():
        if not _sweep_finished(tracking_uri, spec.task, f"{base}-{arm}"):  # a finished arm keeps its wall time
            run_spec(arm_spec, space_text=space_file.read_text(), space_name=space_file.name, name=f"{base}-{arm}",
                     tracking_uri=tracking_uri, storage=storage)
        figures[arm] = arm_figures(spec, tracking_uri=tracking_uri, sweep=f"{base}-{arm}")
    grid, asha = figures["grid"], figures["asha"]
    noise = grid["best_metric_std_over_seeds"]
    sign = 1 if spec.mode == "min" else -1
    figures["compute_ratio"] = asha["trial_steps"] / max(grid["trial_steps"], 1)
    figures["asha_gap"] = sign * (asha["best_metric"] - grid["best_metric"])
    figures["within_seed_noise"] = figures["asha_gap"] <= 2 * noise
    return figures


def pareto_arms(spec) -> dict[str, Any]:
    """`bench sweep --pareto`'s two arms of one multi-objective space: the full grid (every trial to max_t) and
    the multi-objective ASHA; neither repeats or adds a baseline (the bench compares search compute and fronts)."""
    from raydllm.sweep.search_space import RepeatSettings

    plain = {"repeat": RepeatSettings(top=0), "baseline": False}
    return {"grid": spec.model_copy(update={"scheduler": spec.scheduler.model_copy(update={"type": "fifo"}),
                                            **plain}),
            "pareto_asha": spec.model_copy(update=plain)}


# Scheduler settings the Pareto bench also replays on the grid's curves (grace period, reduction factor).
REPLAY_SETTINGS = [(10, 4), (10, 2), (20, 3), (20, 2), (40, 4), (40, 2)]


def bench_pareto(space_file: str | Path, *, tracking_uri: str, storage: str | None = None, shuffles: int = 200
                 ) -> dict[str, Any]:
    """A multi-objective space as a full grid and under the multi-objective ASHA: trial-steps of each, and the
    hypervolume of each arm's front (its completed trials' final objective vectors) against one reference point
    (the worst value of each objective over both arms, 10% of its range further out). Then the grid's recorded
    curves replayed under the same scheduler in `shuffles` random trial orders (the real run is one order)."""
    import random
    import statistics

    from raydllm.core.config import ConfigError
    from raydllm.sweep.pareto import hypervolume, pareto_front, reference_point
    from raydllm.sweep.pareto_asha import replay
    from raydllm.sweep.search_space import load_spec
    from raydllm.sweep.tune import run_spec, sweep_name

    space_file = Path(space_file)
    spec = load_spec(space_file)
    if not spec.objectives:
        raise ConfigError(f"{space_file}: bench sweep --pareto needs a space with objectives:")
    names, modes = list(spec.objectives), list(spec.objectives.values())
    base = sweep_name(spec, space_file)
    arms: dict[str, Any] = {}
    for arm, arm_spec in pareto_arms(spec).items():
        if not _sweep_finished(tracking_uri, spec.task, f"{base}-{arm}"):
            run_spec(arm_spec, space_text=space_file.read_text(), space_name=space_file.name, name=f"{base}-{arm}",
                     tracking_uri=tracking_uri, storage=storage)
        arms[arm] = _pareto_arm(spec, tracking_uri=tracking_uri, sweep=f"{base}-{arm}")
    reference = reference_point([arms["grid"]["points"], arms["pareto_asha"]["points"]], modes)
    for figures in arms.values():
        figures["hypervolume"] = hypervolume(figures["points"], modes, reference)
        figures["front"] = [figures["configs"][i] for i in pareto_front(figures["points"], modes)]
    grid, asha = arms["grid"], arms["pareto_asha"]
    out = {"objectives": spec.objectives, "reference_point": reference, "grid": grid, "pareto_asha": asha,
           "compute_ratio": asha["trial_steps"] / max(grid["trial_steps"], 1),
           "hypervolume_ratio": asha["hypervolume"] / grid["hypervolume"] if grid["hypervolume"] else None}
    # The replay: the grid's curves under ParetoASHA, trials starting in random orders, as many at once as the space
    # runs. A completed replayed trial's vector is its grid trial's final one, so fronts compare with the grid's.
    # The space's own scheduler settings first, then others, so the cost of a wider margin is visible.
    curves = grid.pop("curves")
    settings = [(spec.scheduler.grace_period, spec.scheduler.reduction_factor)]
    settings += [s for s in REPLAY_SETTINGS if s != settings[0] and s[0] < grid["max_t"]]
    out["replay"] = []
    for grace, factor in settings:
        rng = random.Random(0)
        ratios, hv_ratios = [], []
        for _ in range(shuffles):
            order = list(curves)
            rng.shuffle(order)
            result = replay(spec.objectives, curves, order, max_t=grid["max_t"], grace_period=grace,
                            reduction_factor=factor, concurrency=spec.max_concurrent_trials)
            done = [t for t, outcome in result.trials.items() if not outcome.stopped]
            points = [[curves[t][-1][1][n] for n in names] for t in done]
            ratios.append(result.trial_steps / max(grid["trial_steps"], 1))
            hv_ratios.append(hypervolume(points, modes, reference) / grid["hypervolume"] if grid["hypervolume"] else 0)
        out["replay"].append({"grace_period": grace, "reduction_factor": factor, "orders": shuffles,
                              "compute_ratio_mean": statistics.fmean(ratios),
                              "hypervolume_ratio_mean": statistics.fmean(hv_ratios),
                              "hypervolume_ratio_min": min(hv_ratios),
                              "share_meeting_target": sum(c <= 1 / 3 and h >= 0.95
                                                          for c, h in zip(ratios, hv_ratios)) / shuffles})
    for figures in arms.values():
        figures.pop("points")
        figures.pop("configs")
    return out


def _pareto_arm(spec, *, tracking_uri: str, sweep: str) -> dict[str, Any]:
    """One arm from MLflow: trial-steps of its search trials, and each completed trial's config and final vector;
    for the grid, every trial's curve (objective values at each report) for the replay."""
    from mlflow.tracking import MlflowClient

    from raydllm.sweep.results import find_sweep, trial_runs
    from raydllm.data.tasks import get_task

    client = MlflowClient(tracking_uri)
    parent = find_sweep(client, spec.task, sweep)
    runs = [r for r in trial_runs(client, parent) if r.data.tags.get("raydllm.phase") == "search"]
    names = list(spec.objectives)
    max_t = int(parent.data.tags.get("raydllm.max_steps", 0))
    completed = [r for r in runs if r.data.tags.get("raydllm.status") == "completed"]
    configs = [json.loads(r.data.tags.get("raydllm.searched", "{}")) for r in completed]
    for config in configs:
        config.pop("train.seed", None)
    points = [[float(r.data.metrics[n]) for n in names] for r in completed]
    wall = ((parent.info.end_time or parent.info.start_time) - parent.info.start_time) / 1000
    figures = {"trials": len(runs), "completed": len(completed), "max_t": max_t, "wall_s": round(wall, 1),
               "fast_vs_exact": fidelity_agreement(completed, get_task(spec.task).primary_metric),
               "trial_steps": sum(int(r.data.tags.get("raydllm.last_step", 0)) for r in runs),
               "stopped_at_rung": sorted(int(r.data.tags["raydllm.stopped_at_rung"]) for r in runs
                                         if "raydllm.stopped_at_rung" in r.data.tags),
               "points": points, "configs": [{"config": c, "values": dict(zip(names, p))}
                                             for c, p in zip(configs, points)]}
    if all(r.data.tags.get("raydllm.status") == "completed" for r in runs):  # a grid: curves for the replay
        histories = {n: {r.info.run_id: {m.step: m.value for m in client.get_metric_history(r.info.run_id, n)}
                         for r in runs} for n in names}
        figures["curves"] = {r.info.run_id: [(step, {n: histories[n][r.info.run_id][step] for n in names})
                                             for step in sorted(histories[names[0]][r.info.run_id])
                                             if all(step in histories[n][r.info.run_id] for n in names)]
                             for r in runs}
    return figures


def format_pareto_bench(r: dict[str, Any]) -> str:
    names = list(r["objectives"])
    lines = [f"objectives: " + ", ".join(f"{n} ({m})" for n, m in r["objectives"].items()),
             "reference point: " + ", ".join(f"{n}={v:.4g}" for n, v in zip(names, r["reference_point"]))]
    for arm in ("grid", "pareto_asha"):
        a = r[arm]
        lines.append(f"{arm:12s} trials {a['trials']:3d} (completed {a['completed']}), trial-steps {a['trial_steps']}, "
                     f"wall {a['wall_s'] / 60:.1f} min, hypervolume {a['hypervolume']:.5g}, front of {len(a['front'])}")
        for member in a["front"]:
            values = ", ".join(f"{n} {member['values'][n]:.4f}" for n in names)
            config = " ".join(f"{k.split('.')[-1]}={v}" for k, v in member["config"].items())
            lines.append(f"    {config}: {values}")
    fidelity = r["grid"].get("fast_vs_exact") or {}
    if fidelity.get("trials"):
        tau = fidelity["kendall_tau"]
        lines.append(f"fast vs exact sampler over the grid's {fidelity['trials']} trials: Kendall tau "
                     f"{'n/a' if tau is None else f'{tau:.2f}'}")
    ratio = r["hypervolume_ratio"]
    lines.append(f"pareto_asha / grid: compute {r['compute_ratio']:.2f}x, hypervolume "
                 f"{'n/a' if ratio is None else f'{ratio:.3f}'} (target: >= 0.95 at <= 0.33x)")
    lines.append(f"the grid's curves replayed under the multi-objective ASHA, {r['replay'][0]['orders']} random trial "
                 f"orders each (the first row: this space's settings):")
    lines.append("    grace  factor  compute (mean)  hypervolume (mean, min)  orders meeting the target")
    for rep in r["replay"]:
        lines.append(f"    {rep['grace_period']:5d}  {rep['reduction_factor']:6g}  {rep['compute_ratio_mean']:13.2f}x"
                     f"  {rep['hypervolume_ratio_mean']:11.3f}, {rep['hypervolume_ratio_min']:.3f}"
                     f"  {rep['share_meeting_target']:24.0%}")
    return "\n".join(lines)


def _sweep_finished(tracking_uri: str, task: str, sweep: str) -> bool:
    from mlflow.tracking import MlflowClient

    from raydllm.core.config import ConfigError
    from raydllm.sweep.results import find_sweep

    try:
        return find_sweep(MlflowClient(tracking_uri), task, sweep).info.status == "FINISHED"
    except ConfigError:  # no such sweep yet
        return False


def kendall_tau(x, y) -> float | None:
    """Kendall's tau-b rank correlation of two equally long sequences (ties in either are common among
    accuracies, tau-b corrects for them); None when it is undefined (fewer than 2 items, or a constant one)."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau: {len(x)} != {len(y)} values")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = (x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])
            if dx and dy:
                concordant += dx == dy
                discordant += dx != dy
            else:
                ties_x += not dx and bool(dy)
                ties_y += not dy and bool(dx)
    denominator = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denominator if denominator else None


# Where a trial's exact and fast validation figures are: its own final report (`eval.sampler=fast`), or
# `raydllm eval <run id> --split validation` run after the sweep with each sampler (0-shot).
FIDELITY_KEYS = (("final_val_{m}", "final_val_{m}_fast"),
                 ("eval/validation/0shot/{m}", "eval/validation/0shot/fast/{m}"))


def fidelity_agreement(runs, primary: str) -> dict[str, Any]:
    """Rank agreement between the fast sampler's and the exact sampler's validation figure over the trials that
    logged both: does the cheap fidelity rank configs as the exact one? Each trial's pair comes from the first of
    FIDELITY_KEYS it has both of."""
    pairs = []
    for run in runs:
        for exact_key, fast_key in FIDELITY_KEYS:
            exact_key, fast_key = exact_key.format(m=primary), fast_key.format(m=primary)
            if exact_key in run.data.metrics and fast_key in run.data.metrics:
                pairs.append((float(run.data.metrics[exact_key]), float(run.data.metrics[fast_key])))
                break
    return {"trials": len(pairs), "kendall_tau": kendall_tau([p[0] for p in pairs], [p[1] for p in pairs]),
            "exact": [p[0] for p in pairs], "fast": [p[1] for p in pairs]}


def arm_figures(spec, *, tracking_uri: str, sweep: str) -> dict[str, Any]:
    """One arm of `bench sweep`, from MLflow: its best search trial on the first seed (what the search itself
    chose), that config's values over every seed it ran (its seed noise), trial-steps, time accounting, and
    with `eval.sampler=fast` the Kendall tau between fast and exact final validation accuracy over trials."""
    import statistics

    from mlflow.tracking import MlflowClient

    from raydllm.sweep.results import find_sweep, time_accounting, trial_runs
    from raydllm.data.tasks import get_task

    client = MlflowClient(tracking_uri)
    parent = find_sweep(client, spec.task, sweep)
    runs = trial_runs(client, parent)
    search = [r for r in runs if r.data.tags.get("raydllm.phase") == "search" and spec.metric in r.data.metrics]
    sign = 1 if spec.mode == "min" else -1
    best = min(search, key=lambda r: sign * r.data.metrics[spec.metric])
    key = best.data.tags.get("raydllm.config_key")
    same = [r for r in runs if r.data.tags.get("raydllm.config_key") == key and spec.metric in r.data.metrics]
    values = [float(r.data.metrics[spec.metric]) for r in same]
    searched = json.loads(best.data.tags.get("raydllm.searched", "{}"))
    searched.pop("train.seed", None)
    wall = ((parent.info.end_time or parent.info.start_time) - parent.info.start_time) / 1000
    return {"trials": len(search), "wall_s": round(wall, 1),
            "trial_steps": sum(int(r.data.tags.get("raydllm.last_step", 0)) for r in search),
            "best_config": searched, "best_metric": float(best.data.metrics[spec.metric]),
            "best_metric_mean_over_seeds": statistics.fmean(values),
            "best_metric_std_over_seeds": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": [int(r.data.params.get("train.seed", -1)) for r in same],
            "fast_vs_exact": fidelity_agreement(runs, get_task(spec.task).primary_metric),
            "time": time_accounting(runs)}



# ---------------------------------------------------------------------------------------------------
# The first GPU: tiny LLaDA and Dream through everything an 8B trial does (`raydllm bench gpu`)
# ---------------------------------------------------------------------------------------------------

GPU_VARIANTS = {
    "baseline": ["jepa.lambda=0"],
    "jepa_ema_gpu": ["jepa.lambda=1"],
    "jepa_ema_host": ["jepa.lambda=1", "jepa.ema_device=cpu"],
    "l2_anchor": ["jepa.lambda=0", "loss.anchor=l2", "loss.l2_lambda=0.01"],
}


def bench_gpu(folders: dict[str, str], *, cpu: bool = False, steps: int = 5, warmup: int = 1,
              eval_limit: int = 8) -> dict[str, Any]:
    """Each architecture folder (e.g. {"llada": ..., "dream": ...}, saved by tests/archs) through DeepSpeed
    ZeRO-2 with gradient checkpointing, bf16 on a GPU (float32 with `cpu`): lambda = 0, DLLM-JEPA with the
    EMA on the device and in host memory, the L2 anchor; then the end-of-run export and the generation
    evaluation from it on the same device. Per part: whether it ran (or its error), step time, tokens/s,
    peak device memory; per architecture the JEPA / baseline step ratio."""
    import tempfile as _tempfile

    from raydllm.core.config import load_config
    from raydllm.data.sft import load_examples
    from raydllm.evaluation.evaluate import evaluate_task, load_checkpoint_backbone
    from raydllm.core.sampler import SamplerConfig
    from raydllm.data.tasks import get_task
    from raydllm.engine.worker import WorkerLoop

    device = torch.device("cpu") if cpu else torch.device("cuda", 0)
    base = ["data.source=synthetic", "data.synthetic_size=256", "data.val_limit=16", "data.max_prompt_tokens=96",
            "data.answer_tokens=32", "train.micro_batch_size=8", f"train.max_steps={warmup + steps}",
            "train.lr=1e-4", "train.zero_stage=2", "model.gradient_checkpointing=true", f"train.bf16={str(not cpu).lower()}",
            "train.export_ema=true"]
    out: dict[str, Any] = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if not cpu else "cpu",
                           "steps": steps, "architectures": {}}
    started = time.perf_counter()
    with one_rank_group(device):
        for arch, folder in folders.items():
            parts: dict[str, dict[str, Any]] = {}
            exported = None
            for variant, overrides in GPU_VARIANTS.items():
                part: dict[str, Any] = {"ran": False}
                try:
                    cfg = load_config("gsm8k", None, base + [f"model.name={folder}"] + overrides)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    loop = WorkerLoop(cfg, rank=0, world=1, device=device)
                    times, tokens = [], 0.0
                    for i in range(warmup + steps):
                        _sync(device)
                        t0 = time.perf_counter()
                        metrics = loop.train_step()
                        _sync(device)
                        if i >= warmup:
                            times.append(time.perf_counter() - t0)
                            tokens += metrics["tokens"]
                    if not math.isfinite(metrics["loss_total"]):
                        raise FloatingPointError(f"loss {metrics['loss_total']}")
                    part.update(ran=True, step_s=_median(times), tokens_per_s=tokens / sum(times),
                                loss=metrics["loss_total"],
                                peak_memory_mb=(torch.cuda.max_memory_allocated(device) / MIB
                                                if device.type == "cuda" else None))
                    if variant == "jepa_ema_gpu":  # the end of a trial: checkpoint + weights-only export
                        exported = _tempfile.mkdtemp(prefix="raydllm-bench-gpu-")
                        loop.save(exported)
                        loop.export(exported)
                    del loop
                except Exception as exc:  # noqa: BLE001 - the point is to report which parts run
                    part["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                parts[variant] = part
            evaluation: dict[str, Any] = {"ran": False}
            try:
                if exported is None:
                    raise RuntimeError("no export (the DLLM-JEPA part failed)")
                t0 = time.perf_counter()
                backbone, tokenizer, cfg = load_checkpoint_backbone(exported, device=device)
                examples = load_examples(cfg, "validation")[:eval_limit]
                metrics, _ = evaluate_task(backbone, tokenizer, get_task("gsm8k"), examples, progress=False,
                                           sampler=SamplerConfig(steps=16, gen_length=16, block_length=16),
                                           batch_size=eval_limit, max_prompt_tokens=cfg.data.max_prompt_tokens)
                evaluation.update(ran=True, seconds=time.perf_counter() - t0, n=int(metrics["n"]),
                                  device=str(next(backbone.parameters()).device),
                                  dtype=str(next(backbone.parameters()).dtype).removeprefix("torch."))
            except Exception as exc:  # noqa: BLE001
                evaluation["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            ratio = (parts["jepa_ema_gpu"]["step_s"] / parts["baseline"]["step_s"]
                     if parts["baseline"]["ran"] and parts["jepa_ema_gpu"]["ran"] else None)
            out["architectures"][arch] = {"folder": str(folder), "parts": parts, "evaluation": evaluation,
                                          "step_ratio": ratio}
    out["seconds"] = time.perf_counter() - started
    out["all_ran"] = all(p["ran"] for a in out["architectures"].values()
                         for p in [*a["parts"].values(), a["evaluation"]])
    return out


def format_gpu_report(r: dict[str, Any]) -> str:
    lines = [f"raydllm bench gpu on {r['device_name']} ({r['device']}), {r['steps']} steps a part, "
             f"{r['seconds']:.0f} s: {'every part ran' if r['all_ran'] else 'SOME PARTS FAILED'}"]
    for arch, a in r["architectures"].items():
        lines += ["", f"{arch}: step ratio (DLLM-JEPA / baseline) {_fmt(a['step_ratio'])}",
                  f"  {'part':16}{'ran':>5}{'step s':>9}{'tokens/s':>10}{'peak MB':>9}"]
        for name, p in a["parts"].items():
            lines.append(f"  {name:16}{'yes' if p['ran'] else 'NO':>5}{_fmt(p.get('step_s'), '.3f'):>9}"
                         f"{_fmt(p.get('tokens_per_s'), '.0f'):>10}{_fmt(p.get('peak_memory_mb'), '.0f'):>9}"
                         + (f"  {p['error']}" if "error" in p else ""))
        e = a["evaluation"]
        lines.append(f"  {'evaluation':16}{'yes' if e['ran'] else 'NO':>5}"
                     + (f"  {e['n']} answers in {e['seconds']:.1f} s on {e['device']} ({e['dtype']}), from export/"
                        if e["ran"] else f"  {e.get('error', '')}"))
    return "\n".join(lines)
