"""Bench layer: `raydllm bench gpu`: the step benchmark on the real LLaDA and Dream architectures, on a GPU
(or the CPU), for the README's device figures.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from raydllm.bench.instrument import sync, one_rank_group
from raydllm.bench.memory import MIB
from raydllm.bench.step import fmt, median


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
                        sync(device)
                        t0 = time.perf_counter()
                        metrics = loop.train_step()
                        sync(device)
                        if i >= warmup:
                            times.append(time.perf_counter() - t0)
                            tokens += metrics["tokens"]
                    if not math.isfinite(metrics["loss_total"]):
                        raise FloatingPointError(f"loss {metrics['loss_total']}")
                    part.update(ran=True, step_s=median(times), tokens_per_s=tokens / sum(times),
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
        lines += ["", f"{arch}: step ratio (DLLM-JEPA / baseline) {fmt(a['step_ratio'])}",
                  f"  {'part':16}{'ran':>5}{'step s':>9}{'tokens/s':>10}{'peak MB':>9}"]
        for name, p in a["parts"].items():
            lines.append(f"  {name:16}{'yes' if p['ran'] else 'NO':>5}{fmt(p.get('step_s'), '.3f'):>9}"
                         f"{fmt(p.get('tokens_per_s'), '.0f'):>10}{fmt(p.get('peak_memory_mb'), '.0f'):>9}"
                         + (f"  {p['error']}" if "error" in p else ""))
        e = a["evaluation"]
        lines.append(f"  {'evaluation':16}{'yes' if e['ran'] else 'NO':>5}"
                     + (f"  {e['n']} answers in {e['seconds']:.1f} s on {e['device']} ({e['dtype']}), from export/"
                        if e["ran"] else f"  {e.get('error', '')}"))
    return "\n".join(lines)
