"""Bench layer: `raydllm bench eval`: the evaluation phase of a two-worker trial against a one-worker trial.

Each arm is a real trial's worker group without Ray: `world` processes in a gloo group (torch.multiprocessing),
each building the trial's own `TrialLoop` (model, data, DeepSpeed engine) on `train.cpus_per_worker` threads, as
Ray Train would. Timed between two barriers: what a trial's last report runs, i.e. the validation diffusion loss,
`val_accuracy` (generation on `eval.gen_limit` items) and the final evaluation (generation on `eval.final_limit`
items per shot count, the probes against the base). The figures each arm logs are compared too: the generation
metrics must be equal to the bit (sharding hands whole batches to ranks), else the bench fails.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

# What a two-worker trial must reach on a 2-core machine (issue 27): 1.7x of the one-worker evaluation phase.
TARGET_SPEEDUP = 1.7


def _evaluation_phase(rank: int, world: int, cfg_dict: dict, repeats: int, out: str) -> None:
    import torch.distributed as dist

    from raydllm.core.config import validate
    from raydllm.evaluation.trial import TrialLoop

    # DeepSpeed reads the rank from the environment; the group meets through a file (no port to collide).
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world)})
    dist.init_process_group("gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=world)
    try:
        cfg = validate(cfg_dict)
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
        loop = TrialLoop(cfg, rank=rank, world=world, device=torch.device("cpu"))
        parts = {"val_loss": lambda: {"val_loss_diff": loop.validation_loss()},
                 "val_accuracy": lambda: {"val_accuracy": loop.share.every_rank_value(loop.validation_accuracy)},
                 "final_evaluation": lambda: loop.share.every_rank_dict(loop.final_evaluation)}
        seconds, part_seconds, figures = [], {name: [] for name in parts}, {}
        for _ in range(repeats):
            figures = {}
            dist.barrier()
            start = time.perf_counter()
            for name, part in parts.items():
                begun = time.perf_counter()
                figures |= part()
                dist.barrier()  # a part ends when its slowest rank does
                part_seconds[name].append(time.perf_counter() - begun)
            seconds.append(time.perf_counter() - start)
        if rank == 0:
            torch.save({"seconds": seconds, "part_seconds": part_seconds, "figures": figures}, out)
    finally:
        dist.destroy_process_group()


def measure(cfg, world: int, repeats: int = 1) -> dict:
    """{seconds: [per repeat], figures: {metric: value}} of the evaluation phase of a `world`-worker trial."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="raydllm-bench-eval-") as folder:
        out = str(Path(folder) / "result.pt")
        mp.spawn(_evaluation_phase, args=(world, cfg.to_dict(), repeats, out), nprocs=world,
                 join=True)
        return torch.load(out, weights_only=False)


def bench_eval_sharding(cfg, *, worlds: tuple[int, ...] = (1, 2), repeats: int = 2) -> dict:
    """The evaluation phase of each world size (median of `repeats`), its speed-up over one worker, and whether
    the generation figures (val_accuracy, final/*) match one worker's exactly."""
    if worlds[0] != 1:
        raise ValueError(f"bench eval: the first world size must be 1 (the reference), got {worlds[0]}")
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"metric": "accuracy", "final": True})})
    arms = {world: measure(cfg, world, repeats) for world in worlds}
    one = arms[1]
    # Generation and probe figures are gathered per batch and reduced in one rank's order: equal to the bit.
    # (val_loss_diff predates the sharding: all-reduced over ranks' rows, it may differ in the last digits.)
    generation_keys = [k for k in one["figures"] if k == "val_accuracy" or k.startswith(("final/", "final_", "probe/"))]
    result = {"cpus_per_worker": cfg.train.cpus_per_worker, "gen_limit": cfg.eval.gen_limit,
              "final_limit": cfg.eval.final_limit, "final_shots": list(cfg.eval.final_shots),
              "probes": cfg.eval.probes, "batch_size": cfg.train.micro_batch_size, "repeats": repeats,
              "target_speedup": TARGET_SPEEDUP, "arms": []}
    base_s = statistics.median(one["seconds"])
    for world, arm in arms.items():
        median = statistics.median(arm["seconds"])
        mismatched = sorted(k for k in generation_keys if arm["figures"].get(k) != one["figures"][k])
        parts = {name: statistics.median(values) for name, values in arm["part_seconds"].items()}
        result["arms"].append({"workers": world, "eval_s": median, "eval_s_all": arm["seconds"], "parts_s": parts,
                               "parts_speedup": {name: statistics.median(one["part_seconds"][name]) / max(s, 1e-9)
                                                 for name, s in parts.items()},
                               "speedup": base_s / median, "generation_figures_equal": not mismatched,
                               "mismatched": mismatched, "val_accuracy": arm["figures"].get("val_accuracy"),
                               "val_loss_diff": arm["figures"].get("val_loss_diff")})
    return result


def format_eval_bench(result: dict) -> str:
    lines = [f"evaluation phase of a trial's last report (val loss, val_accuracy on {result['gen_limit']} items, "
             f"final evaluation on {result['final_limit']} items x shots {result['final_shots']}, probes "
             f"{'on' if result['probes'] else 'off'}; batch {result['batch_size']}, {result['cpus_per_worker']} "
             f"CPU thread(s) per worker, median of {result['repeats']})"]
    for arm in result["arms"]:
        same = "same generation figures as 1 worker" if arm["generation_figures_equal"] else \
            f"DIFFERENT figures: {', '.join(arm['mismatched'])}"
        lines.append(f"  {arm['workers']} worker(s): {arm['eval_s']:7.2f} s   x{arm['speedup']:.2f}   "
                     f"val_accuracy {arm['val_accuracy']:.4f}   {same}")
        lines.append("      " + ", ".join(f"{name} {arm['parts_s'][name]:.2f} s (x{arm['parts_speedup'][name]:.2f})"
                                          for name in arm["parts_s"]))
    best = result["arms"][-1]
    verdict = "meets" if best["speedup"] >= result["target_speedup"] else "misses"
    lines.append(f"  {best['workers']} workers: x{best['speedup']:.2f} {verdict} the x{result['target_speedup']} target")
    return "\n".join(lines)
