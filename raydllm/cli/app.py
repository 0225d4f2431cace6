"""CLI layer: `raydllm train | tune | best | report | eval | pretrain | bench`. Nothing imports the CLI.

Bad input exits with code 2 and one line naming the field or file at fault, checked before Ray starts. `train` and
`tune` are quiet: the libraries' output goes to a log file in the run's folder (`-v` shows it instead). Exit codes:
0 done, 1 failed (for `tune`: any trial failed), 2 bad input, 130 interrupted (re-run the command to resume)."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import traceback
import warnings
from pathlib import Path

from raydllm.core.config import ConfigError, load_config
from raydllm.cli.console import Console
from raydllm.data.tasks.base import DataError

CONSOLE = Console()


def user_errors() -> tuple[type[Exception], ...]:
    """Bad input: exit 2 with one line. (tracking is imported only when a command needs it: MLflow takes
    seconds to import, and bad input is answered before that.)"""
    tracking = sys.modules.get("raydllm.sweep.tracking")
    return (ConfigError, DataError) + ((tracking.TrackingError,) if tracking else ())


def resolve_tracking_uri(cli_value: str | None) -> str:
    from raydllm.sweep.tracking import resolve_tracking_uri as resolve

    return resolve(cli_value)


def _common_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help="task name, e.g. gsm8k")
    p.add_argument("--preset", default="local", help="local | paper | wide-t (default: local)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set jepa.lambda=0 (repeatable)")
    p.add_argument("--data", help="local data file or folder (sets data.source=local)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--storage", help="checkpoint storage: a folder, s3://... or a shared file system path")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")


def _config_from_args(args):
    overrides = list(args.overrides)
    if args.data:
        overrides += ["data.source=local", f"data.path={args.data}"]
    if getattr(args, "workers", None):
        overrides.append(f"train.workers={args.workers}")
    if getattr(args, "name", None):
        overrides.append(f"run.name={args.name}")
    if args.storage:
        overrides.append(f"run.storage_path={args.storage}")
    return load_config(args.task, args.preset, overrides)


def _log_file(storage: str | None, name: str) -> Path:
    """The command's log file: in its run's folder (a local one when checkpoints go to s3:// or similar)."""
    from raydllm.sweep.train import default_storage_path

    folder = storage if storage and "://" not in storage else default_storage_path()
    return Path(folder) / name / "raydllm.log"


def cmd_train(args) -> int:
    from raydllm.sweep.train import prepare_training, run_training

    cfg = prepare_training(_config_from_args(args), tracking_uri=args.tracking_uri)  # bad input: exit 2, before Ray
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    args.resume_hint = f"re-run with --name {cfg.run.name} to resume from its last checkpoint"
    if not args.verbose:
        CONSOLE.quiet(_log_file(cfg.run.storage_path, cfg.run.name))
    outcome = run_training(cfg, tracking_uri=tracking_uri, prepared=True)
    _quiet_ray()
    result = {"run_id": outcome.run_id, "name": outcome.name, "checkpoint": outcome.checkpoint,
              "resumed": outcome.resumed, **outcome.metrics}
    if args.json:
        emit_json(result, default=str)
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}", file=CONSOLE.terminal_out)
    return 0


def cmd_tune(args) -> int:
    from raydllm.sweep.search_space import default_space_file, load_spec
    from raydllm.sweep.train import check_sweep

    if args.preset not in (None, "local"):
        raise ConfigError(f"--preset {args.preset}: tune runs a space file, whose `preset:` is the trials' base "
                          f"config; use --space FILE (with preset: {args.preset}) or --set KEY=VALUE")
    space = Path(args.space) if args.space else default_space_file("local" if args.preset == "local" else args.task)
    extra = _flat_overrides(args.overrides)
    if args.data:
        extra |= {"data.source": "local", "data.path": str(Path(args.data).resolve())}
    spec = load_spec(space, extra or None)  # validated before Ray starts, --set values at every corner
    if args.preset and spec.preset != args.preset:  # `--preset local --space F` says F is a local space: check it
        raise ConfigError(f"--preset {args.preset}: {space} sets preset: {spec.preset} (a space's base config is "
                          f"its own preset: line); drop --preset")
    if spec.task != args.task:
        raise ConfigError(f"{space}: task is {spec.task!r}, but the command asks for {args.task!r}")
    check_sweep(spec, space_name=str(space), tracking_uri=args.tracking_uri, storage=args.storage)  # before Ray
    from raydllm.sweep.tune import run_spec, sweep_name  # MLflow and torch: seconds to import, so after the checks

    if args.resume:
        from ray import tune

        from raydllm.sweep.train import default_storage_path

        name = args.name or sweep_name(spec, space)
        path = f"{(args.storage or default_storage_path()).rstrip('/')}/{name}"
        if not tune.Tuner.can_restore(path):
            raise ConfigError(f"--resume: no sweep to resume at {path}")
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    name = args.name or sweep_name(spec, space)
    args.resume_hint = "trials stopped, their checkpoints kept; run the same command again to resume"
    if not args.verbose:
        CONSOLE.quiet(_log_file(args.storage, name))
    outcome = run_spec(spec, space_text=space.read_text(), space_name=space.name, name=name,
                       tracking_uri=tracking_uri, storage=args.storage, checked=True,
                       progress=True if args.verbose else CONSOLE.terminal_err)
    _quiet_ray()
    if args.json:
        emit_json({"sweep": outcome.name, "parent_run_id": outcome.parent_run_id,
                   "restored": outcome.restored, "trials": outcome.trials, "failed": outcome.failed})
    else:
        print(outcome.summary, file=CONSOLE.terminal_out)
    if outcome.failed:
        where = f"; the log: {CONSOLE.log_path}" if CONSOLE.log_path else ""
        CONSOLE.note(f"{outcome.failed} of {outcome.trials} trials failed (the tag raydllm.error of their MLflow "
                     f"runs says why{where})")
        return 1
    return 0


def _flat_overrides(pairs: list[str]) -> dict:
    """`--set a.b=1` pairs as a space file's `fixed:` keys (values parsed as YAML scalars, like `train --set`)."""
    from raydllm.core.config import parse_overrides

    flat = {}
    for pair in pairs:
        key, value = pair.partition("=")[0], parse_overrides([pair])
        for part in key.split("."):
            value = value[part]
        flat[key] = value
    return flat


def cmd_best(args) -> int:
    if args.pareto:
        from raydllm.sweep.pareto_results import format_pareto_table, pareto_report

        report = pareto_report(args.task, tracking_uri=resolve_tracking_uri(args.tracking_uri), sweep=args.sweep)
        if args.json:
            emit_json(report, default=str)
        else:
            print(format_pareto_table(report))
        return 0
    from raydllm.sweep.results import best_configs, format_table

    report = best_configs(args.task, tracking_uri=resolve_tracking_uri(args.tracking_uri), top=args.top,
                          sweep=args.sweep)
    if args.json:
        emit_json(report, default=str)
    else:
        print(format_table(report))
    return 0


def cmd_report(args) -> int:
    from raydllm.sweep.report import final_report, format_report

    report = final_report(args.task, tracking_uri=resolve_tracking_uri(args.tracking_uri), sweep=args.sweep,
                          force=args.force, limit=args.limit, shots=args.shots, gen_length=args.gen_length,
                          block_length=args.block_length, steps=args.steps, batch_size=args.batch_size,
                          out_dir=args.out)
    if args.json:
        emit_json(report, default=str)
    else:
        print(format_report(report))
        print(f"\nwritten: {', '.join(report['files'])}; logged to MLflow run {report['parent_run_id']} as report/")
    return 0


def _add_report_command(subparsers) -> None:
    p = subparsers.add_parser("report", help="both arms' winners on the test split across the fresh seeds, once: "
                                             "one table (Markdown, JSON, MLflow)")
    p.add_argument("task")
    p.add_argument("--sweep", help="sweep name (default: the latest)")
    p.add_argument("--force", action="store_true", help="evaluate winners already evaluated on test again")
    p.add_argument("--limit", type=int, help="evaluate only the first N test examples")
    p.add_argument("--shots", type=int, choices=(0, 4), help="few-shot exemplars (default: the trials' "
                                                             "eval.final_shots[0])")
    p.add_argument("--steps", type=int, help="denoising steps (default: the trials' eval.sampler_steps)")
    p.add_argument("--gen-length", type=int, help="answer tokens (default: the trials' eval.gen_length)")
    p.add_argument("--block-length", type=int, help="semi-autoregressive block (default: the trials')")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=".", help="folder for report-<sweep>.md and .json (default: here)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    p.set_defaults(func=cmd_report)


def _quiet_ray() -> None:
    """Shut Ray down before printing results: its forwarded worker logs would otherwise follow them."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stderr.flush()


_RESULT_FD: int | None = None  # the real stdout while a --json command runs (see json_stdout)


@contextlib.contextmanager
def json_stdout(enabled: bool):
    """With --json, stdout carries the result line and nothing else: whatever else is written to it while the
    command runs (DeepSpeed's and Ray's prints, C-level writes included) goes to stderr, so
    `raydllm bench --json | jq` works. `emit_json` writes the result to the real stdout."""
    global _RESULT_FD
    try:
        redirect = enabled and sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):  # stdout replaced (e.g. captured in-process): print as is
        redirect = False
    if not redirect:
        yield
        return
    sys.stdout.flush()
    _RESULT_FD = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(_RESULT_FD, 1)
        os.close(_RESULT_FD)
        _RESULT_FD = None


def emit_json(result, **dumps_kwargs) -> None:
    """One JSON line on the real stdout (the result of a --json command)."""
    line = json.dumps(result, **dumps_kwargs) + "\n"
    if _RESULT_FD is None:
        CONSOLE.terminal_out.write(line)
        CONSOLE.terminal_out.flush()
    else:
        os.write(_RESULT_FD, line.encode())


# -- raydllm eval ----------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from raydllm.engine.checkpoints import read_checkpoint_meta
    from raydllm.core.config import validate
    from raydllm.data.sft import load_examples
    from raydllm.evaluation.evaluate import (default_sampler, effective_sampler, evaluate_task, load_checkpoint_backbone,
                             prompt_budget, sampler_settings)
    from raydllm.data.tasks import get_task
    from raydllm.sweep.tracking import log_to_run, resolve_target

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    folder, run_id = resolve_target(args.checkpoint, tracking_uri)
    if args.split == "test" and run_id is not None:  # a sweep's trial: the test split is read once (ledger.py)
        from raydllm.sweep.ledger import claim_trial
        claim_trial(tracking_uri, run_id, folder, force=args.force)
    if args.base and args.ema:
        raise ConfigError("--base and --ema: choose one set of weights")
    backbone, tokenizer, cfg = load_checkpoint_backbone(folder, ema=args.ema, base=args.base, device=args.device)
    step = 0 if args.base else int(read_checkpoint_meta(folder).get("step", 0))
    data = cfg.data.model_copy(update={"val_limit": 10**9})  # --limit, not the training val_limit, applies
    if args.data:
        data = data.model_copy(update={"source": "local", "path": str(Path(args.data).resolve())})
    raw = cfg.to_dict() | {"task": args.task, "data": data.model_dump(mode="json")}
    eval_cfg = validate(raw)
    task = get_task(args.task)
    examples = load_examples(eval_cfg, args.split)
    if args.limit:
        examples = examples[:args.limit]
    train = load_examples(eval_cfg, "train") if args.shots else []
    if args.cache != "none" and args.sampler != "fast":
        raise ConfigError(f"--cache {args.cache}: needs --sampler fast")
    sampler = default_sampler(cfg, gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                              method=args.sampler, threshold=args.threshold, cache=args.cache)
    sampler = effective_sampler(sampler, backbone)
    metrics, predictions = evaluate_task(backbone, tokenizer, task, examples, shots=args.shots,
                                         train_examples=train, sampler=sampler, batch_size=args.batch_size,
                                         progress=not args.no_progress,
                                         max_prompt_tokens=prompt_budget(cfg, sampler, args.shots))
    logged = None
    if run_id is not None:
        # Which weights and which sampler, in the metric names: a fast-sampler figure never overwrites an exact one.
        variant = "/".join(part for part in ("base" if args.base else "ema" if args.ema else "",
                                             "fast" if sampler.method == "fast" else "") if part)
        logged = log_to_run(tracking_uri, run_id, metrics, predictions, split=args.split, shots=args.shots,
                            task=args.task, step=step, weights=variant or None)
    if args.predictions:
        Path(args.predictions).write_text("".join(json.dumps(p) + "\n" for p in predictions))
    result = {"checkpoint": str(folder), "run_id": run_id, "step": step, "weights": "base" if args.base else
              ("ema" if args.ema else "online"), "device": str(next(backbone.parameters()).device),
              "dtype": str(next(backbone.parameters()).dtype).removeprefix("torch."), "task": args.task, "split": args.split,
              "shots": args.shots, "sampler": sampler_settings(sampler),
              "metrics": metrics, "logged_as": logged}
    if args.json:
        emit_json(result)
    else:
        print(("base model of " if args.base else "") + f"checkpoint: {folder} (step {step})"
              + (f", run {run_id}" if run_id else ""))
        print(f"{args.task} {args.split} {args.shots}-shot, "
              + ", ".join(f"{k} {v}" for k, v in sampler_settings(sampler).items()))
        for key, value in metrics.items():
            print(f"{key:>16}: {value:.4f}" if key != "n" else f"{key:>16}: {int(value)}")
        if logged:
            print(f"logged to MLflow run {run_id} as {logged}/*")
    return 0


def _add_eval_command(subparsers) -> None:
    p = subparsers.add_parser("eval", help="generate answers with a checkpoint and score them on a task")
    p.add_argument("checkpoint", help="a raydllm checkpoint folder (or a Ray run folder), or an MLflow run id")
    p.add_argument("task", help="task name, e.g. gsm8k")
    p.add_argument("--shots", type=int, choices=(0, 4), default=0, help="few-shot exemplars from train (default 0)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--split", choices=("validation", "test"), default="validation",
                   help="default validation; test on a sweep's trial goes through the sweep's test ledger")
    p.add_argument("--force", action="store_true", help="score a trial on test again despite the ledger")
    p.add_argument("--steps", type=int, help="denoising steps (default: gen-length, one token per step)")
    p.add_argument("--gen-length", type=int, help="answer tokens (default: data.answer_tokens rounded up to the block)")
    p.add_argument("--block-length", type=int, help="semi-autoregressive block (default: the whole answer "
                                                    "if <= 64 tokens, else 32)")
    p.add_argument("--sampler", choices=("exact", "fast"), default="exact",
                   help="exact: LLaDA's sampler (default); fast: Fast-dLLM's threshold parallel decoding")
    p.add_argument("--threshold", type=float, default=0.9, help="fast sampler: commit every position of the "
                                                                "block above this confidence (default 0.9)")
    p.add_argument("--cache", choices=("none", "prefix", "dual"), default="none",
                   help="fast sampler: block KV cache (default none; backbones without one fall back to none)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data", help="local data file or folder (default: the checkpoint's data source)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA target weights instead of the online ones")
    p.add_argument("--base", action="store_true", help="evaluate the model this run started from (same data, "
                                                       "prompts and sampler), for a before/after comparison")
    p.add_argument("--device", default="auto", help="where to generate: auto (the first GPU when there is one, in "
                                                    "bf16; else the CPU in float32), cpu, cuda, cuda:N")
    p.add_argument("--predictions", help="also write the predictions jsonl here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.set_defaults(func=cmd_eval)


# -- raydllm pretrain -------------------------------------------------------------------------------------
def cmd_pretrain(args) -> int:
    from raydllm.engine.pretrain import (DEFAULT_SEED, DEFAULT_STEPS, base_key, base_path, build_base, pretrain_tiny, read_weights,
                           save_weights, shipped_base)

    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    args.seed = DEFAULT_SEED if args.seed is None else args.seed

    cfg = load_config("gsm8k", args.preset, [f"model.{kv}" if not kv.startswith("model.") else kv
                                             for kv in args.overrides])
    model_cfg = cfg.model
    if args.out:
        stats: dict = {}
        state = pretrain_tiny(model_cfg, steps=args.steps, seed=args.seed, progress=not args.no_progress,
                              stats=stats)
        path = Path(args.out).expanduser()
        save_weights(state, path, {"key": base_key(model_cfg, seed=args.seed, steps=args.steps), **stats})
        meta, cached = stats, False
    elif (args.seed, args.steps) == (DEFAULT_SEED, DEFAULT_STEPS) and shipped_base(model_cfg) is not None:
        path = shipped_base(model_cfg)  # what model.init=pretrained loads: the base shipped in raydllm/assets
        meta, cached = read_weights(path)[1], True
    else:
        existed = base_path(model_cfg, seed=args.seed, steps=args.steps).exists()
        path, meta = build_base(model_cfg, seed=args.seed, steps=args.steps, progress=not args.no_progress)
        cached = existed
    result = {"weights": str(path), "final_loss": meta.get("final_loss"), "seconds": meta.get("seconds"),
              "steps": args.steps, "seed": args.seed, "corpus": meta.get("corpus"), "cached": cached,
              "d_model": model_cfg.d_model, "n_layers": model_cfg.n_layers, "n_heads": model_cfg.n_heads,
              "embeddings": _base_embeddings(cfg, path)}
    if args.json:
        emit_json(result)
    else:
        loss, z = result["final_loss"], result["embeddings"]
        print(f"weights: {path}" + (" (already cached)" if cached else ""))
        print(f"final loss: {loss:.4f}" if loss is not None else "final loss: unknown")
        print(f"pooled z (both views of {int(z['samples'])} WikiText {cfg.eval.probe_split} windows): effective rank "
              f"{z['eff_rank']:.2f} of {model_cfg.d_model}, cosine diversity {z['cos_diversity']:.3f}")
        if not args.out:
            print("use it with: --set model.init=pretrained")
    return 0


def _base_embeddings(cfg, weights: Path) -> dict[str, float]:
    """The base's collapse statistics by the paper's formulas (probes.embedding_report) at the preset's views."""
    import torch

    from raydllm.engine.backbone import load_backbone
    from raydllm.evaluation.probes import embedding_report

    backbone, tokenizer = load_backbone(cfg.model.model_copy(update={"init": str(weights)}))
    with torch.no_grad():
        return embedding_report(backbone, tokenizer, t_low=cfg.jepa.t_low, t_high=cfg.jepa.t_high,
                                split=cfg.eval.probe_split, seq_len=min(cfg.eval.probe_seq_len, cfg.model.max_seq_len),
                                max_chunks=cfg.eval.probe_chunks, seed=cfg.eval.probe_seed)


def _add_pretrain_command(subparsers) -> None:
    # The defaults are pretrain's, filled in by cmd_pretrain: importing it (torch, transformers) takes seconds,
    # which every command would pay while its parser is built.
    p = subparsers.add_parser("pretrain", help="pretrain the embedded tiny model offline (the model.init=pretrained "
                                               "base; cached in ~/.cache/raydllm)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: those of the shipped base)")
    p.add_argument("--seed", type=int, help="seed (default: that of the shipped base)")
    p.add_argument("--out", help="write the weights here instead of the cache (use with --set model.init=PATH)")
    p.add_argument("--preset", default="local", help="preset whose model shape to pretrain (default: local)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model field, e.g. --set model.d_model=256 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.set_defaults(func=cmd_pretrain)


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
    from raydllm.bench.step import format_report, run_bench

    cfg = load_config(args.task, args.preset, args.overrides)
    result = run_bench(cfg, steps=args.steps, warmup=args.warmup,
                       target_prob=args.target_prob if args.target_prob > 0 else None,
                       sampler_batch=args.sampler_batch, sampler_gen_length=args.sampler_gen_length,
                       sampler_steps=args.sampler_steps, split=not args.no_split,
                       threads=args.threads)
    result["preset"] = args.preset
    if args.json:
        emit_json(result, default=_json_default)
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
    _quiet_ray()
    if args.json:
        emit_json(result, default=_json_default)
    elif args.pareto:
        print(format_pareto_bench(result))
    else:
        print(json.dumps(result, indent=1, default=_json_default))
    return 0


def _cmd_bench_gpu(args) -> int:
    """`raydllm bench gpu --llada FOLDER --dream FOLDER`: bench.bench_gpu; a CPU-only machine skips it."""
    import torch

    from raydllm.bench.gpu import bench_gpu, format_gpu_report

    folders = {name: path for name, path in (("llada", args.llada), ("dream", args.dream)) if path}
    if not folders:
        raise ConfigError("bench gpu: give --llada FOLDER and/or --dream FOLDER (tiny architectures, see README)")
    for name, path in folders.items():
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"--{name} {path}: not a Hugging Face model folder (no config.json)")
    if not args.cpu and not torch.cuda.is_available():
        print("raydllm bench gpu: no CUDA device here; skipped (--cpu runs the same parts on the CPU)")
        return 0
    result = bench_gpu(folders, cpu=args.cpu, steps=args.steps)
    if args.json:
        emit_json(result, default=_json_default)
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
        emit_json(result, default=_json_default)
    else:
        print(format_sampler_report(result))
    return 0


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def _add_bench_command(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="baseline vs DLLM-JEPA step cost in one process (ratio, split, tokens/s, memory, sampler)")
    p.add_argument("mode", nargs="?", choices=["step", "sweep", "sampler", "l2", "gpu"], default="step",
                   help="step (default): the one-process step benchmark; sweep: see `raydllm bench sweep -h`; "
                        "sampler: the exact and the fast sampler side by side; "
                        "l2: what strength of the L2-to-base anchor changes the update (--steps per lambda); "
                        "gpu: the tiny LLaDA/Dream folders through every part an 8B trial runs, on the first GPU")
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
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydllm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Find the best DLLM-JEPA fine-tuning configuration for a masked-diffusion LM:\ntune a search "
                    "space with Ray Tune, read the winners back from MLflow,\nreport them on the test split.",
        epilog="examples:\n  raydllm tune gsm8k --preset local   # embedded tiny model, local Ray and MLflow\n"
               "  raydllm best gsm8k\n  raydllm report gsm8k\n\n"
               "exit codes: 0 done, 1 failed, 2 bad input, 130 interrupted (re-run to resume)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="one DLLM-JEPA training run (Ray Train + DeepSpeed), logged to MLflow")
    _common_run_flags(train)
    train.add_argument("--workers", type=int, help="Ray Train workers (sets train.workers)")
    train.add_argument("--name", help="run name; re-running with the same name resumes from its last checkpoint")
    train.set_defaults(func=cmd_train)

    tune = sub.add_parser("tune", help="a Ray Tune + ASHA sweep from a search-space file, every trial in MLflow")
    tune.add_argument("task")
    tune.add_argument("--preset", help="only local: the embedded default's space (search_spaces/local.yaml); "
                      "other presets are a space file's `preset:`")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="fix a config field for every trial, like the space's `fixed:` (repeatable)")
    tune.add_argument("--space", help="search-space YAML (default: search_spaces/<task>.yaml)")
    tune.add_argument("--data", help="local data file or folder for every trial")
    tune.add_argument("--name", help="sweep name (default: sweep-<task>-<space file>); same name = resume")
    tune.add_argument("--resume", action="store_true", help="resume an interrupted sweep (error if none)")
    tune.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    tune.add_argument("--storage", help="where trials keep checkpoints: a folder, s3://..., or a shared FS")
    tune.add_argument("--json", action="store_true", help="print the outcome as JSON on the last line")
    tune.set_defaults(func=cmd_tune)

    best = sub.add_parser("best", help="the best configs of a task's latest sweep, read from MLflow")
    best.add_argument("task")
    best.add_argument("--top", type=int, default=5)
    best.add_argument("--sweep", help="sweep name (default: the latest)")
    best.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    best.add_argument("--json", action="store_true")
    best.add_argument("--pareto", action="store_true",
                      help="a multi-objective sweep's Pareto front on fresh seeds, gains per objective, hypervolume "
                           "by rung")
    best.set_defaults(func=cmd_best)

    _add_report_command(sub)
    _add_eval_command(sub)
    _add_pretrain_command(sub)
    _add_bench_command(sub)
    for command in sub.choices.values():  # `raydllm tune gsm8k -v` as well as `raydllm -v tune gsm8k`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="show Ray's, DeepSpeed's and MLflow's output instead of writing it to the log file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.environ.get("RAY_ADDRESS", "x").strip():  # an empty RAY_ADDRESS means no cluster, as if unset
        del os.environ["RAY_ADDRESS"]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warnings.simplefilter("default" if args.verbose else "ignore", DeprecationWarning)
    CONSOLE.show_warnings()
    try:
        # Quiet commands (train, tune) print results through CONSOLE; json_stdout serves the others and -v.
        with json_stdout(getattr(args, "json", False) and (args.verbose or args.command not in ("train", "tune"))):
            return args.func(args)
    except user_errors() as exc:
        CONSOLE.terminal_err.write(f"raydllm: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        CONSOLE.terminal_err.write(f"\nraydllm: interrupted; {getattr(args, 'resume_hint', 'nothing was saved')}\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - quiet: one line here, the traceback in the log file
        if CONSOLE.log_path is None:
            raise
        traceback.print_exc()
        last = [line for line in str(exc).splitlines() if line.strip()]
        CONSOLE.terminal_err.write(f"raydllm: error: {type(exc).__name__}: {last[-1][:300] if last else ''} "
                                   f"(the traceback is in {CONSOLE.log_path})\n")
        return 1
    finally:
        if CONSOLE.log_path is not None:
            _quiet_ray()  # before the terminal is back: Ray's last words go to the log
        CONSOLE.restore()


if __name__ == "__main__":
    # Through the package module, not this __main__ copy: commands reach json_stdout's state as raydllm.cli.app.
    from raydllm.cli.app import main as package_main

    sys.exit(package_main())
