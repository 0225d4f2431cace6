"""Sweep layer: what a sweep will cost, before it starts (`raydllm tune <task> --plan`). No Ray, no model load.

The trials: each phase of `tune._run_phases` in order: the DLLM-JEPA arm's search (num_samples x every grid
combination), the baseline arm (its own search of num_samples, or one pinned trial to the end), and the repeat
phase (each arm's winners on every fresh seed, to the end; under `match: compute` the baseline winner both
ways). A trial runs max_t steps (a compute-matched baseline 4/3 of them) with a report every eval_every steps
and at the end.

Two cases. Worst: no trial is stopped early. Expected: ASHA's nominal rung fractions, a trial reaching rung i
(grace x factor^i) with probability factor^-i, so a share factor^-(number of rungs) runs to the end (async ASHA
promotes more than that early in a sweep, before the rungs fill: the expected case is a floor, the worst a ceiling).

Seconds per step, from FLOPs. F = 2 x parameters x tokens is one forward over the step's batch (effective batch x
(max_prompt_tokens + answer_tokens): padded, an upper bound); the baseline's step is forward + backward = 3F, a
DLLM-JEPA step adds the EMA target's forward, 1F (x jepa.target_prob) (compute_match.py); gradient checkpointing
recomputes the forward (+1F); under LoRA the frozen base gets no weight gradients (backward 1F, not 2F). A GPU
trial runs at `mfu` of `gpu_tflops` per GPU (power.Assumptions: 30% of an A100's 312 TFLOPS); the local preset
at the CPU figures in `LOCAL_CPU`, measured on this project's 2-core machine. Every report adds the validation
loss (val_limit rows at each val_mask_rate, a forward each), the generation pass when the metric is val_accuracy
(power.token_reads_per_item) and the forgetting probe's chunks; a trial that reaches the end adds its final
evaluation (final_limit items per shot count with the exact sampler, and the fast one when eval.sampler is fast;
the probes: probe_chunks windows through the base and the fine-tuned model, four forwards each) - all at the same
FLOP rate. Every trial also pays a start: Ray Train's worker group, the model load and DeepSpeed's set-up
(measured locally; assumed on GPUs: `Assumptions.gpu_trial_start_s`).

Checkpoints, from the policy: a trial saves where engine.checkpoint_policy says (ASHA's rungs and the end, as
`raydllm tune` sets it), Ray Train keeps train.checkpoints_to_keep of them, a stopped trial's are deleted, and the
final one holds export/. A save is sizes.checkpoint_bytes_estimate (weights, optimizer state, the EMA). The
peak: every trial that runs to the end keeps its checkpoints, and at most max_concurrent_trials more are in flight.

Wall-clock: phases run one after another; within one, trials run max_concurrent_trials at a time, so a phase takes
its trial-seconds / concurrency, and never less than its longest trial. Dollars: a trial's GPU-hours on the
cluster's GPU node types that fit it (cluster.yaml; a node billed while any of its GPUs is busy, trials packed),
at the on-demand and the spot price of `assets/aws_prices.yaml`, plus the head node for the wall-clock.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raydllm.core.config import Config, ConfigError, validate
from raydllm.engine.checkpoint_policy import checkpoint_due
from raydllm.sweep.compute_match import BASELINE_STEP_COST, JEPA_STEP_COST, compute_matched, matched
from raydllm.sweep.power import Assumptions as DetectAssumptions, token_reads_per_item
from raydllm.sweep.search_space import SweepSpec, base_raw, baseline_arm, baseline_keys, max_steps, rung_steps
from raydllm.sweep.sizes import checkpoint_bytes_estimate, lora_adapter_params, model_shape, predictor_params

PRICES_FILE = Path(__file__).resolve().parents[1] / "assets" / "aws_prices.yaml"
PROBE_FORWARDS = 4  # per probe window and model: the WikiText loss, the drift's hidden states, the two views


@dataclass(frozen=True)
class LocalCpu:
    """The local preset's costs on a CPU worker, measured on this project's machine (2 cores, 2024 x86):
    `raydllm bench step --preset local --threads 1`: 0.30 s a DLLM-JEPA step, 0.23 s a baseline step (12.4 and
    9.3 GFLOPs by this module's count: 41 GFLOPS); a trial's start (time/startup_s in MLflow: 22 s alone, 39-56 s
    with two at once, mostly Ray Train's worker group); the time a step costs beyond its FLOPs on the 2-layer test
    model: about 0.05 s; the driver before the first trial, about 15 s after Ray is up, 6 s between phases.
    tests/test_tune.py checks the resulting plan against a measured local sweep (within 2x)."""
    flops_per_worker: float = 40e9
    step_overhead_s: float = 0.05
    trial_start_s: float = 45.0
    sweep_start_s: float = 30.0  # the driver: imports, joining or starting Ray, MLflow's parent run
    phase_start_s: float = 6.0  # each phase's Tuner


@dataclass(frozen=True)
class Assumptions:
    gpu: DetectAssumptions = field(default_factory=DetectAssumptions)  # A100 peak, MFU, prompt length, tokens/forward
    gpu_trial_start_s: float = 600.0  # assumed: workers start, 16 GB of weights load, DeepSpeed sets up
    gpu_sweep_start_s: float = 900.0  # assumed: the first GPU node boots, pulls the image, installs raydllm
    local: LocalCpu = field(default_factory=LocalCpu)


@dataclass
class TrialCost:
    """One trial of one phase: seconds by part, on the trial's workers together."""
    steps: int
    reports: int
    step_s: float
    report_s: float
    final_s: float
    start_s: float
    rungs: list[int]

    def seconds(self, steps: float, reports: float, final_share: float) -> float:
        return self.start_s + steps * self.step_s + reports * self.report_s + final_share * self.final_s


def _forward_flops(n_params: float, tokens: float) -> float:
    return 2.0 * n_params * tokens


def _step_forwards(cfg: Config) -> float:
    """Forward-equivalents of one training step (module docstring)."""
    jepa = cfg.jepa.lam > 0
    cost = float(JEPA_STEP_COST if jepa else BASELINE_STEP_COST)
    if jepa:
        cost -= 1 - cfg.jepa.target_prob  # the target branch runs on this share of the steps
    if cfg.model.lora.rank:
        cost -= 1  # no weight gradients for the frozen base
    if cfg.model.gradient_checkpointing:
        cost += 1
    return cost


def _rate(cfg: Config, a: Assumptions) -> float:
    """FLOPs per second of one trial's workers together."""
    if cfg.train.use_gpu is True:
        return cfg.train.workers * a.gpu.gpu_tflops * 1e12 * a.gpu.mfu
    return cfg.train.workers * a.local.flops_per_worker


def trial_cost(cfg: Config, *, steps: int, grace: int, factor: float, a: Assumptions) -> TrialCost:
    shape = model_shape(cfg.model)
    n = shape["n_params"]
    rate = _rate(cfg, a)
    gpu = cfg.train.use_gpu is True
    seq = cfg.data.max_prompt_tokens + cfg.data.answer_tokens
    batch = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.workers
    step_s = _step_forwards(cfg) * _forward_flops(n, batch * seq) / rate + (0 if gpu else a.local.step_overhead_s)
    ev = cfg.eval
    gen = ev.gen_length or cfg.data.answer_tokens
    val_loss = len(ev.val_mask_rates) * _forward_flops(n, cfg.data.val_limit * seq)
    generation = 0.0
    if ev.metric == "accuracy":
        generation = ev.gen_limit * token_reads_per_item(
            sampler=ev.sampler, cache=ev.cache, steps=ev.sampler_steps or gen, gen_length=gen,
            block_length=ev.block_length or gen, a=a.gpu) * 2 * n
    probe_len = min(ev.probe_seq_len, seq)
    forgetting = _forward_flops(n, ev.report_probe_chunks * probe_len)
    report_s = (val_loss + generation + forgetting) / rate
    final = 0.0
    if ev.final:
        for shots in ev.final_shots:
            prompt = a.gpu.prompt_tokens * (1 + shots)  # each shot a worked example about as long as the question
            a_shots = DetectAssumptions(**(asdict(a.gpu) | {"prompt_tokens": prompt}))
            for sampler in ["exact"] + (["fast"] if ev.sampler == "fast" else []):
                final += ev.final_limit * token_reads_per_item(
                    sampler=sampler, cache=ev.cache if sampler == "fast" else "none", steps=ev.sampler_steps or gen,
                    gen_length=gen, block_length=ev.block_length or gen, a=a_shots) * 2 * n
        if ev.probes:
            final += 2 * PROBE_FORWARDS * _forward_flops(n, ev.probe_chunks * probe_len)
    start = a.gpu_trial_start_s if gpu else a.local.trial_start_s
    # A rung at max_t stops nothing: a trial there has ended anyway.
    rungs = [r for r in rung_steps(grace, factor, steps) if r < steps]
    return TrialCost(steps=steps, reports=len(_reports(steps, cfg.train.eval_every)), step_s=step_s,
                     report_s=report_s, final_s=final / rate, start_s=start, rungs=rungs)


def _reports(steps: int, every: int) -> list[int]:
    """The steps a trial reports at (worker.WorkerLoop: every eval_every steps and at the end)."""
    return sorted(set(range(every, steps + 1, every)) | {steps})


def reach_shares(rungs: list[int], factor: float, asha: bool) -> list[tuple[int, float]]:
    """(step, share of trials that train up to it) for each stretch of a trial: ASHA's nominal fractions."""
    if not asha or not rungs:
        return [(0, 1.0)]
    return [(0, 1.0)] + [(rung, factor ** -(i + 1)) for i, rung in enumerate(rungs)]


def expected_progress(steps: int, every: int, rungs: list[int], factor: float, asha: bool) -> tuple[float, float, float]:
    """(steps, reports, share that reaches the end) of the average trial."""
    bounds = reach_shares(rungs, factor, asha)
    reports = _reports(steps, every)
    exp_steps = exp_reports = 0.0
    for i, (begin, share) in enumerate(bounds):
        end = bounds[i + 1][0] if i + 1 < len(bounds) else steps
        exp_steps += share * (end - begin)
        exp_reports += share * sum(1 for r in reports if begin < r <= end)
    return exp_steps, exp_reports, bounds[-1][1]


def checkpoint_saves(cfg: Config, steps: int, rungs: list[int]) -> int:
    """How many checkpoints a trial that runs `steps` saves (rungs and the end, as `raydllm tune` sets it)."""
    train = cfg.train.model_copy(update={"checkpoint_steps": cfg.train.checkpoint_steps or
                                         (rungs if cfg.train.checkpoint_every is None else None)})
    return sum(checkpoint_due(train, step=s, total_steps=steps) for s in _reports(steps, cfg.train.eval_every))


def checkpoint_sizes(cfg: Config, k_max: int) -> dict[str, float]:
    """Bytes of one save and of the export for this config's trials (the predictor at its largest k)."""
    shape = model_shape(cfg.model)
    lam_zero = cfg.jepa.lam == 0
    predictor = 0 if lam_zero else predictor_params(int(shape["hidden_size"]), k_max)
    trainable = None
    if cfg.model.lora.rank:
        trainable = lora_adapter_params(cfg.model.lora.rank, hidden_size=int(shape["hidden_size"]),
                                        mlp_hidden_size=int(shape["mlp_hidden_size"]),
                                        kv_width=int(shape["kv_width"]), n_layers=int(shape["n_layers"])) + predictor
    est = checkpoint_bytes_estimate(shape["n_params"] + (0 if trainable is not None else predictor),
                                    world_size=cfg.train.workers, lam_zero=lam_zero, export_ema=cfg.train.export_ema,
                                    trainable=trainable, export_params=shape["n_params"])
    return {"per_save": est["per_save_bytes"], "export": est["export_bytes"]}


@dataclass
class PhasePlan:
    phase: str
    arm: str
    trials: int
    steps: int
    reports: int
    asha: bool
    cost: TrialCost
    saves: int
    per_save_bytes: float
    export_bytes: float
    gpus_per_trial: int
    eval_every: int

    def trial_seconds(self, case: str, factor: float) -> float:
        if case == "worst" or not self.asha:
            return self.cost.seconds(self.steps, self.reports, 1.0)
        steps, reports, to_end = expected_progress(self.steps, self.eval_every, self.cost.rungs, factor, True)
        return self.cost.seconds(steps, reports, to_end)

    def completed(self, case: str, factor: float) -> float:
        """Trials that reach the end (and keep their checkpoints)."""
        if case == "worst" or not self.asha:
            return float(self.trials)
        return self.trials * reach_shares(self.cost.rungs, factor, True)[-1][1]

    def kept_bytes(self, keep: int) -> float:
        """What one trial that reached the end keeps: its last `keep` saves, the final one with export/."""
        return min(self.saves, keep) * self.per_save_bytes + self.export_bytes


def _grid_size(spec: SweepSpec, keys) -> int:
    return math.prod(len(spec.space[k].grid) for k in keys if spec.space[k].kind == "grid")


def _k_max(spec: SweepSpec, cfg: Config) -> int:
    dist = spec.space.get("jepa.k")
    return int(max(dist.support)) if dist is not None else cfg.jepa.k


def phases(spec: SweepSpec, a: Assumptions = Assumptions()) -> list[PhasePlan]:
    """Every phase's trials, in the order `raydllm tune` runs them."""
    base = validate(base_raw(spec))
    steps = max_steps(spec)
    asha = spec.scheduler.type == "asha"
    grace, factor = spec.scheduler.grace_period, spec.scheduler.reduction_factor
    k_max = _k_max(spec, base)
    gpus = spec.resources.workers if spec.resources.use_gpu else 0
    out: list[PhasePlan] = []

    def add(phase: str, arm: str, trials: int, run_steps: int, run_asha: bool) -> None:
        cfg = base.model_copy(deep=True)
        cfg.train.max_steps = run_steps
        if arm == "baseline":
            cfg.jepa.lam = 0.0
        run_grace = max(1, round(grace * run_steps / steps))  # a compute-matched trial's rungs scale with it
        cost = trial_cost(cfg, steps=run_steps, grace=run_grace, factor=factor, a=a)
        sizes = checkpoint_sizes(cfg, k_max)
        plan = PhasePlan(phase=phase, arm=arm, trials=trials, steps=run_steps, reports=cost.reports, asha=run_asha,
                         cost=cost, saves=checkpoint_saves(cfg, run_steps, cost.rungs),
                         per_save_bytes=sizes["per_save"], export_bytes=sizes["export"], gpus_per_trial=gpus,
                         eval_every=cfg.train.eval_every)
        out.append(plan)

    add("search", "dllm-jepa", spec.num_samples * _grid_size(spec, spec.space), steps, asha)
    arm = baseline_arm(spec)
    baseline_steps = matched(steps) if compute_matched(spec) else steps
    if arm and arm.mode == "searched":
        add("baseline", "baseline", arm.num_samples * _grid_size(spec, baseline_keys(spec)), baseline_steps, asha)
    elif arm:
        add("baseline", "baseline", 1, baseline_steps, False)
    if spec.repeat.top and spec.fresh_seeds:
        seeds = len(spec.fresh_seeds)
        add("repeat", "dllm-jepa", spec.repeat.top * seeds, steps, False)
        if arm:
            winners = spec.repeat.top if spec.objectives else 1  # a Pareto sweep repeats the baseline's front
            add("repeat", "baseline", winners * seeds, baseline_steps, False)
            if compute_matched(spec):  # the compute-matched winner's step-matched twin
                add("repeat", "baseline", winners * seeds, steps, False)
    return out


def load_prices(path: Path = PRICES_FILE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    for key in ("as_of", "source", "instances"):
        if key not in data:
            raise ConfigError(f"{path}: {key}: required")
    for name, row in data["instances"].items():
        for key in ("on_demand", "spot", "gpus"):
            if not isinstance(row.get(key), (int, float)) or row[key] < 0:
                raise ConfigError(f"{path}: instances.{name}.{key}: a number >= 0 required")
    return data


def node_types(cluster_file: Path | None, prices: dict[str, Any], spec: SweepSpec) -> dict[str, Any]:
    """The GPU instance types a trial of `spec` can run on, with their GPU count and prices, and the head's type.
    From cluster.yaml when given (its node types whose resources hold a worker); else every priced GPU instance
    of the space's accelerator type."""
    instances = prices["instances"]
    bundle = {"GPU": 1.0, **spec.resources.per_worker_extra()}
    fitting, head = {}, None
    if cluster_file is not None:
        try:
            cluster = yaml.safe_load(cluster_file.read_text())
            types = cluster["available_node_types"]
        except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
            raise ConfigError(f"--cluster {cluster_file}: not a Ray cluster config ({exc})") from None
        for name, node in types.items():
            instance = (node.get("node_config") or {}).get("InstanceType")
            resources = node.get("resources") or {}
            if name == cluster.get("head_node_type"):
                head = instance
                continue
            if all(resources.get(k, 0) >= v for k, v in bundle.items()):
                if instance not in instances:
                    raise ConfigError(f"{PRICES_FILE}: instances.{instance}: no price for cluster.yaml's node type {name}")
                fitting[instance] = {"gpus": int(resources["GPU"]), **instances[instance]}
    else:
        want = spec.resources.accelerator_type
        fitting = {name: dict(row) for name, row in instances.items()
                   if row["gpus"] and (want is None or row.get("gpu") == want)}
        head = next((name for name, row in instances.items() if not row["gpus"]), None)
    return {"gpu_types": fitting, "head": head, "head_prices": instances.get(head) if head else None}


def plan(spec: SweepSpec, *, space_name: str, cluster_file: Path | None = None, a: Assumptions = Assumptions(),
         prices_file: Path = PRICES_FILE) -> dict[str, Any]:
    """Everything `raydllm tune --plan` prints, as data."""
    rows = phases(spec, a)
    factor = spec.scheduler.reduction_factor
    keep = validate(base_raw(spec)).train.checkpoints_to_keep
    gpu = spec.resources.use_gpu
    start = (a.gpu_sweep_start_s if gpu else a.local.sweep_start_s)
    out: dict[str, Any] = {"space": space_name, "task": spec.task, "preset": spec.preset,
                           "max_concurrent_trials": spec.max_concurrent_trials,
                           "scheduler": {"type": spec.scheduler.type, "grace_period": spec.scheduler.grace_period,
                                         "reduction_factor": factor},
                           "phases": [], "cases": {}}
    for row in rows:
        out["phases"].append({
            "phase": row.phase, "arm": row.arm, "trials": row.trials, "steps_per_trial": row.steps,
            "reports_per_trial": row.reports, "asha": row.asha, "rungs": row.cost.rungs if row.asha else [],
            "seconds_per_step": row.cost.step_s, "seconds_per_report": row.cost.report_s,
            "final_eval_seconds": row.cost.final_s, "trial_start_seconds": row.cost.start_s,
            "checkpoint_saves_per_trial": row.saves, "checkpoint_bytes_per_save": row.per_save_bytes,
            "export_bytes": row.export_bytes,
            "trial_seconds": {case: row.trial_seconds(case, factor) for case in ("worst", "expected")}})
    by_phase: dict[str, list[PhasePlan]] = {}
    for row in rows:
        by_phase.setdefault(row.phase, []).append(row)
    for case in ("worst", "expected"):
        trial_seconds = sum(r.trials * r.trial_seconds(case, factor) for r in rows)
        steps = sum(r.trials * (r.steps if case == "worst" or not r.asha else
                                expected_progress(r.steps, r.eval_every, r.cost.rungs, factor, True)[0]) for r in rows)
        wall = start + sum(
            (a.local.phase_start_s if not gpu else 0.0) +
            max(sum(r.trials * r.trial_seconds(case, factor) for r in group) / spec.max_concurrent_trials,
                max(r.trial_seconds(case, factor) for r in group))
            for group in by_phase.values())
        # Peak storage: the trials that reached the end keep theirs; up to max_concurrent more are mid-run.
        in_flight = max(min(r.saves, keep) * r.per_save_bytes for r in rows) * spec.max_concurrent_trials
        storage = sum(r.completed(case, factor) * r.kept_bytes(keep) for r in rows) + in_flight
        gpu_hours = sum(r.trials * r.trial_seconds(case, factor) * r.gpus_per_trial for r in rows) / 3600
        out["cases"][case] = {"trial_steps": steps, "trial_hours": trial_seconds / 3600, "gpu_hours": gpu_hours,
                              "wall_clock_hours": wall / 3600, "peak_checkpoint_bytes": storage}
    if gpu:
        prices = load_prices(prices_file)
        types = node_types(cluster_file, prices, spec)
        out["prices"] = {"as_of": str(prices["as_of"]), "region": prices.get("region"), "file": str(prices_file),
                         "cluster": str(cluster_file) if cluster_file else None}
        for case, figures in out["cases"].items():
            head = types["head_prices"]
            figures["dollars"] = {
                instance: {market: figures["gpu_hours"] / row["gpus"] * row[market]
                           + (head["on_demand"] * figures["wall_clock_hours"] if head else 0.0)
                           for market in ("on_demand", "spot")}
                for instance, row in types["gpu_types"].items()}
        out["head"] = types["head"]
    out["assumptions"] = {"gpu_tflops": a.gpu.gpu_tflops, "mfu": a.gpu.mfu, "gpu_trial_start_s": a.gpu_trial_start_s,
                          "gpu_sweep_start_s": a.gpu_sweep_start_s, "local_cpu": asdict(a.local),
                          "tokens_per_forward": a.gpu.tokens_per_forward, "prompt_tokens": a.gpu.prompt_tokens}
    return out


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 1e3:.3g} kB"


def _hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def format_plan(result: dict[str, Any]) -> str:
    sched = result["scheduler"]
    lines = [f"{result['space']}: the plan of `raydllm tune {result['task']}` (preset {result['preset']}, "
             f"{result['max_concurrent_trials']} trials at a time, "
             + (f"ASHA grace {sched['grace_period']} x{sched['reduction_factor']:g})" if sched["type"] == "asha"
                else "FIFO)"),
             f"  {'phase':<9}{'arm':<11}{'trials':>7}{'steps':>7}{'reports':>8}  {'s/step':>8}  "
             f"{'trial worst':>11}  {'expected':>9}"]
    for p in result["phases"]:
        lines.append(f"  {p['phase']:<9}{p['arm']:<11}{p['trials']:>7}{p['steps_per_trial']:>7}"
                     f"{p['reports_per_trial']:>8}  {p['seconds_per_step']:>8.3g}  "
                     f"{_hours(p['trial_seconds']['worst'] / 3600):>11}  "
                     f"{_hours(p['trial_seconds']['expected'] / 3600):>9}"
                     + (f"  rungs {p['rungs']}" if p["rungs"] else ""))
    for case, label in (("worst", "worst case (no early stop)"), ("expected", "expected (ASHA's rung fractions)")):
        c = result["cases"][case]
        line = (f"  {label}: {c['trial_steps']:.0f} trial steps, "
                + (f"{c['gpu_hours']:.0f} GPU-hours, " if c["gpu_hours"] else f"{c['trial_hours']:.2g} trial-hours (CPU), ")
                + f"wall-clock {_hours(c['wall_clock_hours'])}, peak checkpoints {_bytes(c['peak_checkpoint_bytes'])}")
        lines.append(line)
        for instance, dollars in (c.get("dollars") or {}).items():
            lines.append(f"      {instance}: ${dollars['on_demand']:,.0f} on demand, ${dollars['spot']:,.0f} spot")
    if "prices" in result:
        p = result["prices"]
        lines.append(f"  prices: {p['region']}, as of {p['as_of']} ({p['file']}); head {result['head']} for the "
                     f"wall-clock included; node types from {p['cluster'] or 'the price file (no cluster.yaml)'}")
    a = result["assumptions"]
    if "prices" in result:
        lines.append(f"  assumed: {a['mfu']:.0%} of {a['gpu_tflops']:.0f} TFLOPS per GPU, a trial's start "
                     f"{a['gpu_trial_start_s'] / 60:.0f} min, the first node's {a['gpu_sweep_start_s'] / 60:.0f} min "
                     f"(raydllm/sweep/plan.py says how each figure is made)")
    else:
        cpu = a["local_cpu"]
        lines.append(f"  measured on a 2-core machine: {cpu['flops_per_worker'] / 1e9:.0f} GFLOPS a CPU worker, "
                     f"a trial's start {cpu['trial_start_s']:.0f} s (raydllm/sweep/plan.py says how each figure is made)")
    return "\n".join(lines)
