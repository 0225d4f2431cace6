"""Command line (top layer): `raydllm train | tune | best | report | eval | pretrain | bench`. Nothing imports this module.

Bad input exits with code 2 and one line naming the field or file at fault."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path

from .config import ConfigError, load_config
from .tasks.base import DataError
from .tracking import TrackingError, resolve_tracking_uri

USER_ERRORS = (ConfigError, DataError, TrackingError)


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


def cmd_train(args) -> int:
    from .train import run_training

    cfg = _config_from_args(args)
    outcome = run_training(cfg, tracking_uri=resolve_tracking_uri(args.tracking_uri))
    _quiet_ray()
    result = {"run_id": outcome.run_id, "name": outcome.name, "checkpoint": outcome.checkpoint,
              "resumed": outcome.resumed, **outcome.metrics}
    if args.json:
        emit_json(result, default=str)
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")
    return 0


def cmd_tune(args) -> int:
    from .search_space import load_spec
    from .tune import default_space_file, run_sweep, sweep_name

    space = Path(args.space) if args.space else default_space_file("local" if args.preset == "local" else args.task)
    extra = {"data.source": "local", "data.path": str(Path(args.data).resolve())} if args.data else None
    spec = load_spec(space, extra)  # validated before Ray starts
    if spec.task != args.task:
        raise ConfigError(f"{space}: task is {spec.task!r}, but the command asks for {args.task!r}")
    if args.resume:
        from ray import tune

        from .train import default_storage_path

        name = args.name or sweep_name(spec, space)
        path = f"{(args.storage or default_storage_path()).rstrip('/')}/{name}"
        if not tune.Tuner.can_restore(path):
            raise ConfigError(f"--resume: no sweep to resume at {path}")
    outcome = run_sweep(space, tracking_uri=resolve_tracking_uri(args.tracking_uri), storage=args.storage,
                        name=args.name, extra_fixed=extra)
    _quiet_ray()
    if args.json:
        emit_json({"sweep": outcome.name, "parent_run_id": outcome.parent_run_id,
                   "restored": outcome.restored, "trials": outcome.trials})
    return 0


def cmd_best(args) -> int:
    from .results import best_configs, format_table

    report = best_configs(args.task, tracking_uri=resolve_tracking_uri(args.tracking_uri), top=args.top,
                          sweep=args.sweep)
    if args.json:
        emit_json(report, default=str)
    else:
        print(format_table(report))
    return 0


def cmd_report(args) -> int:
    from .report import final_report, format_report

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
        sys.stdout.write(line)
        sys.stdout.flush()
    else:
        os.write(_RESULT_FD, line.encode())


# -- raydllm eval ----------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from .checkpoints import read_checkpoint_meta
    from .config import validate
    from .data import load_examples
    from .evaluation import default_sampler, evaluate_task, load_checkpoint_backbone, prompt_budget
    from .tasks import get_task
    from .tracking import log_to_run, resolve_target

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    folder, run_id = resolve_target(args.checkpoint, tracking_uri)
    if args.base and args.ema:
        raise ConfigError("--base and --ema: choose one set of weights")
    backbone, tokenizer, cfg = load_checkpoint_backbone(folder, ema=args.ema, base=args.base)
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
    sampler = default_sampler(cfg, gen_length=args.gen_length, block_length=args.block_length, steps=args.steps)
    metrics, predictions = evaluate_task(backbone, tokenizer, task, examples, shots=args.shots,
                                         train_examples=train, sampler=sampler, batch_size=args.batch_size,
                                         progress=not args.no_progress,
                                         max_prompt_tokens=prompt_budget(cfg, sampler, args.shots))
    logged = None
    if run_id is not None:
        logged = log_to_run(tracking_uri, run_id, metrics, predictions, split=args.split, shots=args.shots,
                            task=args.task, step=step, weights="base" if args.base else None)
    if args.predictions:
        Path(args.predictions).write_text("".join(json.dumps(p) + "\n" for p in predictions))
    result = {"checkpoint": str(folder), "run_id": run_id, "step": step, "weights": "base" if args.base else
              ("ema" if args.ema else "online"), "task": args.task, "split": args.split,
              "shots": args.shots, "sampler": {"gen_length": sampler.gen_length, "block_length": sampler.block_length,
                                               "steps": sampler.steps},
              "metrics": metrics, "logged_as": logged}
    if args.json:
        emit_json(result)
    else:
        print(("base model of " if args.base else "") + f"checkpoint: {folder} (step {step})"
              + (f", run {run_id}" if run_id else ""))
        print(f"{args.task} {args.split} {args.shots}-shot, gen_length {sampler.gen_length}, block "
              f"{sampler.block_length}, steps {sampler.steps}")
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
    p.add_argument("--split", choices=("validation", "test"), default="test")
    p.add_argument("--steps", type=int, help="denoising steps (default: gen-length, one token per step)")
    p.add_argument("--gen-length", type=int, help="answer tokens (default: data.answer_tokens rounded up to the block)")
    p.add_argument("--block-length", type=int, help="semi-autoregressive block (default: the whole answer "
                                                    "if <= 64 tokens, else 32)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data", help="local data file or folder (default: the checkpoint's data source)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA target weights instead of the online ones")
    p.add_argument("--base", action="store_true", help="evaluate the model this run started from (same data, "
                                                       "prompts and sampler), for a before/after comparison")
    p.add_argument("--predictions", help="also write the predictions jsonl here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.set_defaults(func=cmd_eval)


# -- raydllm pretrain -------------------------------------------------------------------------------------
def cmd_pretrain(args) -> int:
    from .pretrain import base_key, base_path, build_base, pretrain_tiny, save_weights

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
    else:
        existed = base_path(model_cfg, seed=args.seed, steps=args.steps).exists()
        path, meta = build_base(model_cfg, seed=args.seed, steps=args.steps, progress=not args.no_progress)
        cached = existed
    result = {"weights": str(path), "final_loss": meta.get("final_loss"), "seconds": meta.get("seconds"),
              "steps": args.steps, "seed": args.seed, "corpus": meta.get("corpus"), "cached": cached,
              "d_model": model_cfg.d_model, "n_layers": model_cfg.n_layers, "n_heads": model_cfg.n_heads}
    if args.json:
        emit_json(result)
    else:
        loss = result["final_loss"]
        print(f"weights: {path}" + (" (already cached)" if cached else ""))
        print(f"final loss: {loss:.4f}" if loss is not None else "final loss: unknown")
        if not args.out:
            print("use it with: --set model.init=pretrained")
    return 0


def _add_pretrain_command(subparsers) -> None:
    from .pretrain import DEFAULT_SEED, DEFAULT_STEPS

    p = subparsers.add_parser("pretrain", help="pretrain the embedded tiny model offline (the model.init=pretrained "
                                               "base; cached in ~/.cache/raydllm)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (default {DEFAULT_STEPS})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed (default {DEFAULT_SEED})")
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
    from .bench import format_report, run_bench

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
    from .bench import bench_sweep
    from .tune import default_space_file

    space = args.space or default_space_file("bench-sweep")
    result = bench_sweep(space, tracking_uri=resolve_tracking_uri(args.tracking_uri), storage=args.storage)
    _quiet_ray()
    if args.json:
        emit_json(result, default=_json_default)
    else:
        print(json.dumps(result, indent=1, default=_json_default))
    return 0


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def _add_bench_command(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="baseline vs DLLM-JEPA step cost in one process (ratio, split, tokens/s, memory, sampler)")
    p.add_argument("mode", nargs="?", choices=["step", "sweep"], default="step",
                   help="step (default): the one-process step benchmark; sweep: see `raydllm bench sweep -h`")
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
    p.add_argument("--space", help="sweep mode: search-space YAML (default: search_spaces/bench-sweep.yaml)")
    p.add_argument("--tracking-uri", help="sweep mode: MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                          "./mlflow.db)")
    p.add_argument("--storage", help="sweep mode: where trials keep checkpoints")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="one DLLM-JEPA training run (Ray Train + DeepSpeed), logged to MLflow")
    _common_run_flags(train)
    train.add_argument("--workers", type=int, help="Ray Train workers (sets train.workers)")
    train.add_argument("--name", help="run name; re-running with the same name resumes from its last checkpoint")
    train.set_defaults(func=cmd_train)

    tune = sub.add_parser("tune", help="a Ray Tune + ASHA sweep from a search-space file, every trial in MLflow")
    tune.add_argument("task")
    tune.add_argument("--preset", help="local = the embedded default's space (search_spaces/local.yaml)")
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
    best.set_defaults(func=cmd_best)

    _add_report_command(sub)
    _add_eval_command(sub)
    _add_pretrain_command(sub)
    _add_bench_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warnings.simplefilter("default" if args.verbose else "ignore", DeprecationWarning)
    try:
        with json_stdout(getattr(args, "json", False)):
            return args.func(args)
    except USER_ERRORS as exc:
        print(f"raydllm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Through the package module, not this __main__ copy: commands reach json_stdout's state as raydllm.cli.
    from raydllm.cli import main as package_main

    sys.exit(package_main())
