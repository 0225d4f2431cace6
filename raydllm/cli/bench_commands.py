"""CLI layer: `raydllm bench` and its modes (sweep, gpu, sampler)."""
from __future__ import annotations

import json
from pathlib import Path

from raydllm.core.config import ConfigError, load_config
from raydllm.cli.common import json_default, quiet_ray, emit_json, resolve_tracking_uri


# -- raydllm bench ---------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    if args.mode == "sweep":
        return _cmd_bench_sweep(args)
    if args.mode == "gpu":
        return _cmd_bench_gpu(args)
    if args.mode == "l2":
        from raydllm.bench.l2_anchor import format_l2_report, l2_anchor_strength

        cfg = load_config(args.task, args.preset, args.overrides)
        lambdas = [float(x) for x in args.lambdas.split(",")]
        result = l2_anchor_strength(cfg, lambdas=lambdas, steps=args.steps, threads=args.threads)
        if args.json:
            emit_json(result)
        else:
            print(format_l2_report(result))
        return 0
    if args.mode == "sampler":
        return _cmd_bench_sampler(args)
    if args.mode == "eval":
        return _cmd_bench_eval(args)
    from raydllm.bench.step import format_report, run_bench

    cfg = load_config(args.task, args.preset, args.overrides)
    result = run_bench(cfg, steps=args.steps, warmup=args.warmup,
                       target_prob=args.target_prob if args.target_prob > 0 else None,
                       sampler_batch=args.sampler_batch, sampler_gen_length=args.sampler_gen_length,
                       sampler_steps=args.sampler_steps, split=not args.no_split,
                       threads=args.threads)
    result["preset"] = args.preset
    if args.json:
        emit_json(result, default=json_default)
    else:
        print(format_report(result))
    return 0


def _cmd_bench_sweep(args) -> int:
    """`raydllm bench sweep`: bench.bench_sweep (grid vs ASHA over one search space; starts Ray)."""
    from raydllm.bench.sweep import bench_pareto, bench_sweep, format_pareto_bench
    from raydllm.sweep.search_space import default_space_file

    if args.pareto:
        space = args.space or default_space_file("bench-pareto")
        result = bench_pareto(space, tracking_uri=resolve_tracking_uri(args.tracking_uri), storage=args.storage)
    else:
        space = args.space or default_space_file("bench-sweep")
        result = bench_sweep(space, tracking_uri=resolve_tracking_uri(args.tracking_uri), storage=args.storage)
    quiet_ray()
    if args.json:
        emit_json(result, default=json_default)
    elif args.pareto:
        print(format_pareto_bench(result))
    else:
        print(json.dumps(result, indent=1, default=json_default))
    return 0


def _cmd_bench_gpu(args) -> int:
    """`raydllm bench gpu --llada FOLDER --dream FOLDER`: bench.bench_gpu; a CPU-only machine skips it."""
    import torch

    from raydllm.bench.gpu import bench_gpu, format_gpu_report

    folders = {name: path for name, path in (("llada", args.llada), ("dream", args.dream)) if path}
    if not folders:
        raise ConfigError("bench gpu: give --llada FOLDER and/or --dream FOLDER "
                          "(tiny architectures, see docs/explanation/engine-8b.md)")
    for name, path in folders.items():
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"--{name} {path}: not a Hugging Face model folder (no config.json)")
    if not args.cpu and not torch.cuda.is_available():
        print("raydllm bench gpu: no CUDA device here; skipped (--cpu runs the same parts on the CPU)")
        return 0
    result = bench_gpu(folders, cpu=args.cpu, steps=args.steps)
    if args.json:
        emit_json(result, default=json_default)
    else:
        print(format_gpu_report(result))
    return 0 if result["all_ran"] else 1


def _cmd_bench_sampler(args) -> int:
    """`raydllm bench sampler`: bench.sampler_bench (exact vs fast sampler, one process, no Ray)."""
    from raydllm.bench.sampler import format_sampler_report, sampler_bench

    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        raise ConfigError(f"--lengths {args.lengths}: expected comma-separated integers, e.g. 32,128,256") from None
    result = sampler_bench(checkpoint=args.checkpoint, model=args.model, task=args.task, items=args.items,
                           lengths=lengths, threshold=args.threshold, cache=args.cache,
                           batch_size=args.sampler_batch, threads=args.threads or 1, progress=True)
    if args.json:
        emit_json(result, default=json_default)
    else:
        print(format_sampler_report(result))
    return 0


def _cmd_bench_eval(args) -> int:
    """`raydllm bench eval`: bench.eval_shards (a trial's evaluation phase on 1 and 2 workers; gloo, no Ray)."""
    from raydllm.bench.eval_shards import bench_eval_sharding, format_eval_bench

    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: must be at least 1")
    cfg = load_config(args.task, args.preset, args.overrides)
    result = bench_eval_sharding(cfg, repeats=args.repeats)
    if args.json:
        emit_json(result, default=json_default)
    else:
        print(format_eval_bench(result))
    return 0 if all(arm["generation_figures_equal"] for arm in result["arms"]) else 1


def add_bench_command(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="baseline vs DLLM-JEPA step cost in one process (ratio, split, tokens/s, memory, sampler)")
    p.add_argument("mode", nargs="?", choices=["step", "sweep", "sampler", "l2", "gpu", "eval"], default="step",
                   help="step (default): the one-process step benchmark; sweep: see `raydllm bench sweep -h`; "
                        "sampler: the exact and the fast sampler side by side; "
                        "l2: what strength of the L2-to-base anchor changes the update (--steps per lambda); "
                        "gpu: the tiny LLaDA/Dream folders through every part an 8B trial runs, on the first GPU; "
                        "eval: a trial's evaluation phase on 2 workers against 1 (sharded generation)")
    p.add_argument("--llada", help="gpu mode: a tiny LLaDA-architecture folder")
    p.add_argument("--dream", help="gpu mode: a tiny Dream-architecture folder")
    p.add_argument("--cpu", action="store_true", help="gpu mode: run the same parts on the CPU (float32)")
    p.add_argument("--lambdas", default="0,1e-4,1e-2,1,100", help="l2 mode: the loss.l2_lambda values "
                                                                   "(comma-separated; 0 = no anchor)")
    p.add_argument("--task", default="gsm8k", help="task whose data to use (default: gsm8k)")
    p.add_argument("--preset", default="local", help="local | paper | wide-t (default: local)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per phase (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per phase, not measured (default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set jepa.k=2 (repeatable)")
    p.add_argument("--target-prob", type=float, default=0.5,
                   help="jepa.target_prob of the loss-dropout phase; 0 skips it (default 0.5)")
    p.add_argument("--sampler-batch", type=int, default=16, help="sampler batch; 0 skips the sampler (default 16)")
    p.add_argument("--sampler-gen-length", type=int, default=32, help="answer tokens generated (default 32)")
    p.add_argument("--sampler-steps", type=int, default=16, help="denoising steps (default 16)")
    p.add_argument("--no-split", action="store_true", help="skip the instrumented per-part steps")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default on CPU: train.cpus_per_worker, "
                                               "as trials run)")
    p.add_argument("--checkpoint", help="sampler mode: a raydllm checkpoint (default: the embedded model's "
                                        "shipped pretrained base)")
    p.add_argument("--model", help="sampler mode: any Hugging Face masked-diffusion folder instead (e.g. a tiny LLaDA)")
    p.add_argument("--items", type=int, default=200, help="sampler mode: validation items (default 200)")
    p.add_argument("--lengths", default="32,128,256", help="sampler mode: generation lengths (default 32,128,256)")
    p.add_argument("--threshold", type=float, default=0.9, help="sampler mode: fast sampler threshold (default 0.9)")
    p.add_argument("--cache", choices=("none", "prefix", "dual"), default="dual",
                   help="sampler mode: fast sampler KV cache (default dual)")
    p.add_argument("--space", help="sweep mode: search-space YAML (default: search_spaces/bench-sweep.yaml, or "
                                   "bench-pareto.yaml with --pareto)")
    p.add_argument("--pareto", action="store_true", help="sweep mode: a multi-objective space as a full grid and "
                                                         "under the multi-objective ASHA: compute and hypervolume")
    p.add_argument("--tracking-uri", help="sweep mode: MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                          "./mlflow.db)")
    p.add_argument("--storage", help="sweep mode: where trials keep checkpoints")
    p.add_argument("--repeats", type=int, default=2, help="eval mode: timed repeats per arm (median; default 2)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.set_defaults(func=cmd_bench)
