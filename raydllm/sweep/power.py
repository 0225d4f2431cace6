"""Sweep layer: what a space's protocol can detect, worked out before any GPU-hour is spent (`raydllm detect`).

A sweep makes two decisions a reviewer checks:

1. **Selection.** Winners are chosen on `eval.gen_limit` validation problems, one trial per config on the
   selection seed. The difference between two configs there has
       SE^2 = d / n + 2 * sigma_seed^2
   where n is the number of items both configs score (paired: only the items on which they disagree vary, a
   fraction d of them, the discordance; strictly (d - delta^2) / n, and delta^2 is negligible) and sigma_seed is
   the seed-to-seed standard deviation of one config's accuracy (each config's training run is one draw of it;
   more items do not shrink that part). The yardstick is sized when SE < the space's `target_effect`.
2. **The report.** Each arm's winner is re-run on the S fresh seeds and scored on the n test items, paired by item
   and seed: sigma2_item = d and sigma2_seed = 2 * sigma_seed^2 (the two arms' runs on one seed are independent
   draws) in `stats.minimum_detectable_effect`, the same formula `best` and `report` use with the variance they
   observe.

d and sigma_seed are assumptions until a sweep has run (then `best` prints the observed MDE); the defaults are
stated in `Assumptions` and every figure `raydllm detect` prints names them.

The generation cost of one selection pass (per ASHA rung) is counted in token positions the backbone reads,
times 2 * parameters FLOPs each (the dense-layer cost; attention's share is left out, so it is a lower bound):
the exact sampler reads prompt + answer at every step; the fast one reads the same per forward, answer /
tokens-per-forward forwards; with the dual cache a forward reads only the block being decided, plus one full read
when each block starts (Fast-dLLM's dual cache), with a prefix cache the block and everything after it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from raydllm.sweep.search_space import SweepSpec
from raydllm.sweep.stats import minimum_detectable_effect

# Standard test-split sizes of the shipped tasks (GSM8K test, NL-RX-SYNTH test, Django's last 1,805 lines,
# Spider dev): the items `raydllm report` scores. tests/test_power.py checks the local files against them.
TEST_ITEMS = {"gsm8k": 1319, "nlrx": 2500, "django": 1805, "spider": 1034}


@dataclass(frozen=True)
class Assumptions:
    discordance: float = 0.15        # share of items on which two fine-tuned configs of one base disagree
    seed_sd: float = 0.005           # seed-to-seed sd of one config's accuracy (0.5 points)
    tokens_per_forward: float = 3.0  # the fast sampler's answer tokens committed per forward
    prompt_tokens: int = 128         # mean prompt length of an in-trial (0-shot) selection problem
    parameters: float = 8.0e9        # LLaDA-8B
    gpu_tflops: float = 312.0        # A100 bf16 dense peak
    mfu: float = 0.3                 # share of the peak a batched generation pass reaches (assumed)


def selection_se(n_items: int, a: Assumptions) -> float:
    """SE of the difference between two configs' selection scores (module docstring, 1)."""
    return math.sqrt(a.discordance / n_items + 2 * a.seed_sd ** 2)


def report_mde(n_seeds: int, n_items: int, a: Assumptions) -> float | None:
    """The report's minimum detectable effect (80% power, alpha 0.05) for n_seeds fresh seeds (docstring, 2)."""
    return minimum_detectable_effect(2 * a.seed_sd ** 2, a.discordance, n_seeds, n_items)


def seeds_needed(target: float, n_items: int, a: Assumptions, *, most: int = 64) -> int | None:
    """The fewest fresh seeds whose MDE is at most `target` (None: more than `most`)."""
    return next((s for s in range(1, most + 1) if report_mde(s, n_items, a) <= target), None)


def token_reads_per_item(*, sampler: str, cache: str, steps: int, gen_length: int, block_length: int,
                         a: Assumptions) -> float:
    """Token positions the backbone reads to answer one problem (module docstring, last paragraph)."""
    full = a.prompt_tokens + gen_length
    if sampler != "fast":
        return float(steps * full)
    forwards = math.ceil(gen_length / a.tokens_per_forward)
    blocks = math.ceil(gen_length / block_length)
    if cache == "dual":
        return float(forwards * block_length + blocks * full)
    if cache == "prefix":
        # A forward reads its block and every later position; on average half the answer past the prompt.
        return float(forwards * (gen_length + block_length) / 2 + blocks * full)
    return float(forwards * full)


def _selection(spec: SweepSpec, cfg, a: Assumptions) -> dict:
    """Module docstring, 1, and the generation cost of one selection pass."""
    ev = cfg.eval
    if ev.metric != "accuracy":  # no generation at the rungs: the yardstick is a loss, not an item count
        return {"metric": spec.metric, "items": None, "sampler": None, "se_difference": None, "sized": None}
    n = ev.gen_limit
    gen = ev.gen_length or cfg.data.answer_tokens
    reads = n * token_reads_per_item(sampler=ev.sampler, cache=ev.cache, steps=ev.sampler_steps or gen,
                                     gen_length=gen, block_length=ev.block_length or gen, a=a)
    flops = 2 * a.parameters * reads
    gpus = spec.resources.workers if spec.resources.use_gpu else 0
    se = selection_se(n, a)
    return {"metric": spec.metric, "items": n, "sampler": ev.sampler, "cache": ev.cache, "se_difference": se,
            "se_item_part": math.sqrt(a.discordance / n), "se_seed_part": math.sqrt(2) * a.seed_sd,
            "sized": spec.target_effect is not None and se < spec.target_effect,
            "token_reads_per_rung": reads, "flops_per_rung": flops,
            "seconds_per_rung": flops / (gpus * a.gpu_tflops * 1e12 * a.mfu) if gpus else None}


def detect(spec: SweepSpec, cfg, *, a: Assumptions = Assumptions(), test_items: int | None = None) -> dict:
    """Everything `raydllm detect` prints for one space, with `cfg` its trials' config (the space's fixed values
    on its preset)."""
    n_test = test_items or TEST_ITEMS.get(spec.task)
    fresh = max(len(spec.seeds) - 1, 1)
    out = {"space": spec.name or spec.task, "task": spec.task, "target_effect": spec.target_effect,
           "selection": _selection(spec, cfg, a), "report": None, "assumptions": asdict(a)}
    if n_test:
        out["report"] = {
            "test_items": n_test, "fresh_seeds": fresh, "mde": report_mde(fresh, n_test, a),
            "mde_plus_one_seed": report_mde(fresh + 1, n_test, a),
            "mde_double_items": report_mde(fresh, 2 * n_test, a),
            "seeds_for_target": seeds_needed(spec.target_effect, n_test, a) if spec.target_effect else None,
        }
    return out


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} points"


def format_detect(result: dict) -> str:
    sel, rep, a = result["selection"], result["report"], result["assumptions"]
    target = result["target_effect"]
    lines = [f"{result['space']}: what this protocol can detect (assumed: discordance {a['discordance']}, "
             f"seed sd {_pts(a['seed_sd'])})",
             f"  target effect: {_pts(target) if target else 'not set (target_effect: in the space)'}"]
    if sel["items"] is None:
        lines.append(f"  selection on {sel['metric']} (no generation at the rungs): a loss, whose noise no item "
                     f"count sets; after a sweep `best` lists the configs within noise of each winner")
    else:
        lines.append(f"  selection on {sel['items']} validation items ({sel['sampler']} sampler, cache {sel['cache']}): "
                     f"SE of a two-config difference {_pts(sel['se_difference'])} (items {_pts(sel['se_item_part'])}, "
                     f"seeds {_pts(sel['se_seed_part'])})"
                     + ("" if target is None else (" - below the target" if sel["sized"] else
                                                   " - NOT below the target: raise eval.gen_limit or the validation "
                                                   "share")))
        lines.append(f"  generation per rung: {sel['token_reads_per_rung']:.3g} token reads, "
                     f"{sel['flops_per_rung']:.3g} FLOPs"
                     + (f", about {sel['seconds_per_rung']:.0f} s on the trial's GPUs at {a['mfu']:.0%} of "
                        f"{a['gpu_tflops']:.0f} TFLOPS" if sel["seconds_per_rung"] is not None else ""))
    if rep:
        lines.append(f"  report on {rep['test_items']} test items x {rep['fresh_seeds']} fresh seeds: MDE "
                     f"{_pts(rep['mde'])} (80% power, alpha 0.05); one more seed: {_pts(rep['mde_plus_one_seed'])}; "
                     f"twice the items: {_pts(rep['mde_double_items'])}")
        if target:
            need = rep["seeds_for_target"]
            lines.append(f"  fresh seeds for an MDE at the target: {need if need else 'more than 64'}")
    else:
        lines.append("  report: test size unknown for this task (--test-items)")
    return "\n".join(lines)
