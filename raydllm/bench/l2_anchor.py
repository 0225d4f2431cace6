"""Bench layer: `raydllm bench --l2-anchor`: how strongly an L2 anchor to the base weights holds a run back.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from raydllm.bench.instrument import one_rank_group
from raydllm.bench.step import fmt, median, pick_device


def l2_anchor_strength(cfg, *, lambdas=(0.0, 1e-4, 1e-2, 1.0, 100.0), steps: int = 100,
                       threads: int | None = None) -> dict[str, Any]:
    """Train `steps` steps of `cfg` once per lambda_L2 (the same seed, data and masks; 0 = no anchor) and
    report, per lambda: the ratio ||anchor gradient|| / ||loss gradient|| (over all anchored parameters,
    per backward; its median over the run and its value at the last step) and the parameter distance to
    base ||theta - theta_base|| / ||theta_base|| after the run, against lambda = 0."""
    from raydllm.engine.worker import WorkerLoop

    device = pick_device(cfg)
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
                rows.append({"l2_lambda": float(lam), "grad_ratio_median": median(ratios),
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
                     f"{row['relative_distance_to_base']:>14.3g}{fmt(row['distance_vs_unanchored'], '.3f'):>9}")
    lines.append(f"(under bf16 an anchor term below {r['bf16_resolution']:.1e} of a gradient element is rounded away)")
    return "\n".join(lines)
