"""Bench layer: `raydllm bench`: what DLLM-JEPA costs over the diffusion-only baseline, measured in one process;
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

import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any

import torch

from raydllm.bench.instrument import PARTS, StepInstrument, sync, one_rank_group
from raydllm.bench.memory import MIB, llada_lora_memory_table, llada_memory_table


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by substring of torch.cuda.get_device_name().
# Checked in order: the first match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM5 / HBM3
    ("A100", 312.0),
)


def pick_device(cfg) -> torch.device:
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


def median(xs):
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

    device = pick_device(cfg)
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


def _timed_phases(loop, ema, instrument, phases, device, *, steps, warmup):
    """Interleaved untouched `train_step`s of every phase (step i of each sees batch i): per-phase times,
    tokens, positions, CUDA peak bytes, and how many jepa_dropout steps ran the target branch."""
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
                sync(device)
                t0 = time.perf_counter()
                metrics = loop.train_step()
                sync(device)
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
    return times, tokens, positions, peak_alloc, target_runs


def _split_parts(loop, ema, instrument, phases, steps):
    """Instrumented steps of baseline and jepa, alternating: the median time of each part of a step."""
    splits: dict[str, dict[str, float]] = {}
    split_faults: dict[str, dict[str, float]] = {}
    split_totals: dict[str, float] = {}
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
        splits[name] = {key: median(parts[name][key]) for key in PARTS}
        split_faults[name] = {key: median(faults[name][key]) for key in PARTS}
        split_totals[name] = median(totals[name])
    split_paired = median([j / b for j, b in zip(totals["jepa"], totals["baseline"])])
    return splits, split_faults, split_totals, split_paired


def _run(cfg, device, phases, lam, *, steps, warmup, sampler_batch, sampler_gen_length, sampler_steps, split,
         memory_table) -> dict[str, Any]:
    from raydllm.engine.worker import WorkerLoop

    cfg_jepa = phases["jepa"]
    with one_rank_group(device):
        loop = WorkerLoop(cfg_jepa, rank=0, world=1, device=device)
        ema = loop.ema
        instrument = StepInstrument(loop, ema)
        times, tokens, positions, peak_alloc, target_runs = _timed_phases(
            loop, ema, instrument, phases, device, steps=steps, warmup=warmup)

        splits, split_faults, split_totals, split_paired = (
            _split_parts(loop, ema, instrument, phases, steps) if split else ({}, {}, {}, None))
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

    med = {name: median(ts) for name, ts in times.items()}
    mean = {name: statistics.fmean(ts) for name, ts in times.items()}
    tok_s = {name: median([t / s for t, s in zip(tokens[name], times[name])]) for name in phases}
    peak_tf = _peak_tflops(device, bf16)
    mfu: dict[str, float | None] = {}
    flops_factor = {"baseline": 6.0, "jepa": 8.0}
    for name in ("baseline", "jepa"):
        if peak_tf is None:
            mfu[name] = None
        else:
            per_s = median([flops_factor[name] * n_flop * p / s for p, s in zip(positions[name], times[name])])
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
        "positions_per_step": median(positions["baseline"]),
        "n_params_backbone": n_backbone, "n_params_flop": n_flop, "n_params_predictor": n_predictor,
        "lora_rank": cfg.model.lora.rank, "n_params_backbone_trainable": n_trainable,
        "step_time_s": {name: med[name] for name in ("baseline", "jepa")},
        "step_time_s_min": {name: min(times[name]) for name in ("baseline", "jepa")},
        "step_ratio": ratio,
        "step_ratio_mean": mean["jepa"] / mean["baseline"],
        # median over iterations of jepa_i / baseline_i (adjacent steps): steadier on a shared machine
        "step_ratio_paired": median([j / b for j, b in zip(times["jepa"], times["baseline"])]),
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


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def format_report(r: dict[str, Any]) -> str:
    lines = [f"raydllm bench: {r['preset_model']} on {r['device_name']} ({r['threads']} threads), "
             f"bf16={r['bf16']}, ZeRO-{r['zero_stage']}, {r['steps']} steps after {r['warmup']} warm-up",
             "",
             f"{'':24}{'baseline':>12}{'jepa':>12}",
             f"{'step time (s, median)':24}{fmt(r['step_time_s']['baseline']):>12}{fmt(r['step_time_s']['jepa']):>12}",
             f"{'tokens/s':24}{fmt(r['tokens_per_s']['baseline'], '.0f'):>12}"
             f"{fmt(r['tokens_per_s']['jepa'], '.0f'):>12}",
             f"{'MFU':24}{fmt(r['mfu']['baseline'], '.3f'):>12}{fmt(r['mfu']['jepa'], '.3f'):>12}",
             f"{'memory (MB)':24}{fmt(r['peak_memory_mb']['baseline'], '.1f'):>12}"
             f"{fmt(r['peak_memory_mb']['jepa'], '.1f'):>12}",
             f"  ({r['peak_memory_kind']})",
             "",
             f"step_ratio = {r['step_ratio']:.3f} (paired {r['step_ratio_paired']:.3f}, mean-based "
             f"{r['step_ratio_mean']:.3f}; FLOP model 4/3 = 1.333)"]
    if "split_s" in r:
        lines += ["", f"instrumented steps: jepa / baseline = {fmt(r['split_ratio_paired'])} (paired median)",
                  f"{'part (s, median)':24}{'baseline':>12}{'jepa':>12}{'extra':>12}{'faults b/j':>16}"]
        f = r["split_minor_faults"]
        for k in PARTS:
            lines.append(f"{k:24}{fmt(r['split_s']['baseline'][k], '.4f'):>12}"
                         f"{fmt(r['split_s']['jepa'][k], '.4f'):>12}{fmt(r['split_extra_s'][k], '.4f'):>12}"
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
