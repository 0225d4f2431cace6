"""CLI layer: `raydllm eval` (score a checkpoint on a task) and `raydllm pretrain` (the embedded model's base)."""
from __future__ import annotations

import json
from pathlib import Path

from raydllm.core.config import ConfigError, load_config
from raydllm.cli.common import emit_json, resolve_tracking_uri


# -- raydllm eval ----------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    if args.harness or args.harness_preset:
        return cmd_harness(args)
    if not args.task:
        raise ConfigError("raydllm eval: name a task (e.g. gsm8k), or --harness TASKS / --harness-preset NAME")
    # None: not given on the command line (a harness preset may supply these); a task run's defaults.
    args.sampler, args.threshold = args.sampler or "exact", 0.9 if args.threshold is None else args.threshold
    args.cache, args.batch_size = args.cache or "none", args.batch_size or 16
    from raydllm.engine.checkpoints import read_checkpoint_meta
    from raydllm.core.config import validate
    from raydllm.data.sft import load_examples
    from raydllm.evaluation.evaluate import (default_sampler, effective_sampler, evaluate_task, load_checkpoint_backbone,
                             prompt_budget, sampler_settings)
    from raydllm.data.tasks import get_task
    from raydllm.sweep.tracking import log_to_run, resolve_target

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    folder, run_id = resolve_target(args.checkpoint, tracking_uri, ema=args.ema)
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
    from raydllm.evaluation.protocol import score_protocol
    protocol = score_protocol(sampler, shots=args.shots, batch_size=args.batch_size, backbone=backbone)
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
                            task=args.task, step=step, weights=variant or None, protocol=protocol)
    if args.predictions:
        Path(args.predictions).write_text("".join(json.dumps(p) + "\n" for p in predictions))
    result = {"checkpoint": str(folder), "run_id": run_id, "step": step, "weights": "base" if args.base else
              ("ema" if args.ema else "online"), "device": str(next(backbone.parameters()).device),
              "dtype": str(next(backbone.parameters()).dtype).removeprefix("torch."), "task": args.task, "split": args.split,
              "shots": args.shots, "sampler": sampler_settings(sampler),
              "protocol": protocol, "metrics": metrics, "logged_as": logged}
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
            print(f"logged to MLflow run {run_id} as {logged}/*, its protocol as tag protocol/{logged}")
    return 0


# -- raydllm eval --harness -------------------------------------------------------------------------------
def cmd_harness(args) -> int:
    """lm-evaluation-harness tasks scored with raydllm's model and samplers (`sweep.harness`)."""
    import tempfile

    from raydllm.evaluation.harness import PRESETS, gsm8k_local_task, require_lm_eval
    from raydllm.sweep.tracking import log_harness_to_run, resolve_target

    require_lm_eval()  # one line naming the extra, before anything loads
    from raydllm.sweep.harness import RaydllmLM, preset_settings, run_harness

    if args.task:
        raise ConfigError(f"raydllm eval --harness: the tasks are lm-eval's (--harness {args.task}), not a "
                          "raydllm task")
    if args.base and args.ema:
        raise ConfigError("--base and --ema: choose one set of weights")
    from raydllm.evaluation.evaluate import eval_device
    eval_device(args.device)  # --device cuda without a GPU: refused here, as `raydllm eval` refuses it
    preset = PRESETS[args.harness_preset] if args.harness_preset else None
    tasks = [t for t in (args.harness or "").split(",") if t] or list(preset.tasks)
    shots = args.harness_shots if args.harness_shots is not None else (preset.num_fewshot if preset else None)
    settings = preset_settings(preset, {"sampler": args.sampler, "steps": args.steps, "gen_length": args.gen_length,
                                        "block_length": args.block_length, "threshold": args.threshold,
                                        "cache": args.cache, "batch_size": args.batch_size, "mc_num": args.mc_num})
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    folder, run_id = resolve_target(args.checkpoint, tracking_uri, ema=args.ema)
    if run_id is not None:  # lm-eval's tasks score their test split: a sweep's trial reads it once (ledger.py)
        from raydllm.sweep.ledger import claim_trial
        claim_trial(tracking_uri, run_id, folder, force=args.force)
    lm = RaydllmLM(str(folder), tracking_uri=tracking_uri, ema=args.ema, base=args.base, device=args.device,
                   progress=not args.no_progress, **settings)
    name = preset.name if preset else "lm-eval"
    with tempfile.TemporaryDirectory() as local:
        include = list(args.harness_include or [])
        if args.data:  # GSM8K from local files: each gsm8k* task becomes <task>_local, reading --data's jsonl
            tasks = [gsm8k_local_task(args.data, local, name=f"{t}_local", base=t) if t.startswith("gsm8k") else t
                     for t in tasks]
            include.append(local)
        # Only local tasks (each includes lm-eval's YAML by path): lm-eval's own task index (10 s) is not needed.
        local_only = bool(args.data) and not args.harness_include and all(t.endswith("_local") for t in tasks)
        metrics, protocol, results = run_harness(lm, tasks, num_fewshot=shots, limit=args.limit, name=name,
                                                 include_path=include or None, include_defaults=not local_only)
    logged = None
    if run_id is not None:
        logged = log_harness_to_run(tracking_uri, run_id, metrics, name=name, protocol=protocol, results=results)
    result = {"checkpoint": str(folder), "run_id": run_id, "harness": name, "tasks": tasks, "protocol": protocol,
              "metrics": metrics, "logged_as": logged}
    if args.json:
        emit_json(result)
    else:
        print(f"checkpoint: {folder}" + (f", run {run_id}" if run_id else "") + f"; lm-eval {protocol['lm_eval']}")
        print(f"protocol {name}: " + ", ".join(f"{k} {v}" for k, v in protocol.items()
                                              if k not in ("name", "lm_eval", "tasks")))
        for key, value in metrics.items():
            print(f"{key:>40}: {value:.4f}" if not key.endswith("/n") else f"{key:>40}: {int(value)}")
        if logged:
            print(f"logged to MLflow run {run_id} as {logged}/*, its protocol as tag protocol/{logged}")
    return 0


def add_eval_command(subparsers) -> None:
    p = subparsers.add_parser("eval", help="generate answers with a checkpoint and score them on a task")
    p.add_argument("checkpoint", help="a raydllm checkpoint folder (or a Ray run folder), or an MLflow run id")
    p.add_argument("task", nargs="?", help="task name, e.g. gsm8k (none with --harness)")
    p.add_argument("--shots", type=int, choices=(0, 4), default=0, help="few-shot exemplars from train (default 0)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--split", choices=("validation", "test"), default="validation",
                   help="default validation; test on a sweep's trial goes through the sweep's test ledger")
    p.add_argument("--force", action="store_true", help="score a trial on test again despite the ledger")
    p.add_argument("--steps", type=int, help="denoising steps (default: gen-length, one token per step)")
    p.add_argument("--gen-length", type=int, help="answer tokens (default: data.answer_tokens rounded up to the block)")
    p.add_argument("--block-length", type=int, help="semi-autoregressive block (default: the whole answer "
                                                    "if <= 64 tokens, else 32)")
    p.add_argument("--sampler", choices=("exact", "fast"),
                   help="exact: LLaDA's sampler (default); fast: Fast-dLLM's threshold parallel decoding")
    p.add_argument("--threshold", type=float, help="fast sampler: commit every position of the "
                                                                "block above this confidence (default 0.9)")
    p.add_argument("--cache", choices=("none", "prefix", "dual"),
                   help="fast sampler: block KV cache (default none; backbones without one fall back to none)")
    p.add_argument("--batch-size", type=int, help="prompts generated together (default 16)")
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
    h = p.add_argument_group("lm-evaluation-harness (pip install 'raydllm[harness]')")
    h.add_argument("--harness", metavar="TASKS", help="score lm-eval's tasks instead (comma-separated, e.g. "
                                                      "gsm8k); --data DIR: gsm8k* read DIR/{train,test}.jsonl")
    h.add_argument("--harness-preset", choices=("llada-gsm8k", "fast-dllm-gsm8k"),
                   help="a published protocol: its tasks, shots and sampler (other flags override)")
    h.add_argument("--harness-shots", type=int, help="few-shot examples (default: the preset's, else the task's)")
    h.add_argument("--harness-include", action="append", metavar="DIR", help="a folder of lm-eval task YAMLs")
    h.add_argument("--mc-num", type=int, help="Monte Carlo samples of each loglikelihood's ELBO (default 128)")
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


def add_pretrain_command(subparsers) -> None:
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
