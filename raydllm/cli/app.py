"""CLI layer: `raydllm train | tune | best | report | eval | pretrain | bench`. Nothing imports the CLI.

Bad input exits with code 2 and one line naming the field or file at fault, checked before Ray starts. `train` and
`tune` are quiet: the libraries' output goes to a log file in the run's folder (`-v` shows it instead). Exit codes:
0 done, 1 failed (for `tune`: any trial failed), 2 bad input, 130 interrupted (re-run the command to resume)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from raydllm.core.config import ConfigError
from raydllm.cli.bench_commands import add_bench_command
from raydllm.cli.common import CONSOLE, add_run_flags, config_from_args, flat_overrides, log_file_for, quiet_ray, emit_json, json_stdout, resolve_tracking_uri, under_ray_job, user_errors
from raydllm.cli.help_texts import PLAN_HELP, describe
from raydllm.cli.evaluate_commands import add_eval_command, add_pretrain_command


def cmd_train(args) -> int:
    from raydllm.sweep.train import prepare_training, run_training

    cfg = prepare_training(config_from_args(args), tracking_uri=args.tracking_uri)  # bad input: exit 2, before Ray
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    args.resume_hint = f"re-run with --name {cfg.run.name} to resume from its last checkpoint"
    if not args.verbose:
        CONSOLE.quiet(log_file_for(cfg.run.storage_path, cfg.run.name))
    outcome = run_training(cfg, tracking_uri=tracking_uri, prepared=True)
    quiet_ray()
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
    extra = flat_overrides(args.overrides)
    if args.data:
        extra |= {"data.source": "local", "data.path": str(Path(args.data).resolve())}
    spec = load_spec(space, extra or None)  # validated before Ray starts, --set values at every corner
    if args.preset and spec.preset != args.preset:  # `--preset local --space F` says F is a local space: check it
        raise ConfigError(f"--preset {args.preset}: {space} sets preset: {spec.preset} (a space's base config is "
                          f"its own preset: line); drop --preset")
    if spec.task != args.task:
        raise ConfigError(f"{space}: task is {spec.task!r}, but the command asks for {args.task!r}")
    if args.plan:
        return _print_plan(args, spec, space)
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
        CONSOLE.quiet(log_file_for(args.storage, name))
    outcome = run_spec(spec, space_text=space.read_text(), space_name=space.name, name=name,
                       tracking_uri=tracking_uri, storage=args.storage, checked=True,
                       progress=True if args.verbose else CONSOLE.terminal_err)
    quiet_ray()
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


def _print_plan(args, spec, space: Path) -> int:
    """`tune --plan`: the sweep's trials, hours, dollars and storage, from the space alone (no Ray, no MLflow)."""
    from raydllm.sweep.plan import format_plan, plan

    cluster = Path(args.cluster) if args.cluster else (Path("cluster.yaml") if Path("cluster.yaml").is_file() else None)
    if cluster is not None and not cluster.is_file():
        raise ConfigError(f"--cluster {cluster}: no such file")
    result = plan(spec, space_name=str(space), cluster_file=cluster)
    if args.json:
        emit_json(result)
    else:
        print(format_plan(result), file=CONSOLE.terminal_out)
    return 0


def cmd_detect(args) -> int:
    from raydllm.core.config import validate
    from raydllm.sweep.power import Assumptions, detect, format_detect
    from raydllm.sweep.search_space import base_raw, default_space_file, load_spec

    space = Path(args.space) if args.space else default_space_file(args.task)
    spec = load_spec(space, {"data.source": "local", "data.path": str(Path(args.data).resolve())} if args.data
                     else None)
    if spec.task != args.task:
        raise ConfigError(f"{space}: task is {spec.task!r}, but the command asks for {args.task!r}")
    for name in ("discordance", "seed_sd"):
        value = getattr(args, name)
        if not 0 <= value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be in [0, 1)")
    if args.tokens_per_forward < 1:
        raise ConfigError(f"--tokens-per-forward {args.tokens_per_forward}: must be at least 1")
    if args.test_items is not None and args.test_items < 1:
        raise ConfigError(f"--test-items {args.test_items}: must be at least 1")
    if args.prompt_tokens < 0:
        raise ConfigError(f"--prompt-tokens {args.prompt_tokens}: must be at least 0")
    assumed = Assumptions(discordance=args.discordance, seed_sd=args.seed_sd,
                          tokens_per_forward=args.tokens_per_forward, prompt_tokens=args.prompt_tokens)
    result = detect(spec, validate(base_raw(spec)), a=assumed, test_items=args.test_items)
    if args.json:
        emit_json(result)
    else:
        print(format_detect(result))
    return 0


def _add_detect_command(subparsers) -> None:
    from raydllm.sweep.power import Assumptions

    defaults = Assumptions()
    p = subparsers.add_parser("detect", help="what a space's protocol can detect: the selection yardstick's "
                                             "noise, the report's minimum detectable effect, the cost per rung")
    p.add_argument("task")
    p.add_argument("--space", help="search-space YAML (default: search_spaces/<task>.yaml)")
    p.add_argument("--data", help="the task's data folder, where the space reads local files (as for tune)")
    p.add_argument("--discordance", type=float, default=defaults.discordance,
                   help=f"assumed share of items two configs disagree on (default {defaults.discordance})")
    p.add_argument("--seed-sd", type=float, default=defaults.seed_sd,
                   help=f"assumed seed-to-seed sd of one config's score (default {defaults.seed_sd})")
    p.add_argument("--tokens-per-forward", type=float, default=defaults.tokens_per_forward,
                   help=f"fast sampler's answer tokens per forward (default {defaults.tokens_per_forward})")
    p.add_argument("--prompt-tokens", type=int, default=defaults.prompt_tokens,
                   help=f"mean prompt length of a selection problem (default {defaults.prompt_tokens})")
    p.add_argument("--test-items", type=int, help="test items the report scores (default: the task's test split)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_detect)


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
    add_run_flags(train)
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
    tune.add_argument("--plan", action="store_true", help=PLAN_HELP)
    tune.add_argument("--cluster", metavar="FILE", help="with --plan: the Ray cluster config whose node types "
                                                        "price the sweep (default: ./cluster.yaml if present)")
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
    _add_detect_command(sub)
    add_eval_command(sub)
    add_pretrain_command(sub)
    add_bench_command(sub)
    describe(sub)
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
        if under_ray_job():  # `ray job logs` shows only the driver's stderr: the log file stays on the head
            traceback.print_exc(file=CONSOLE.terminal_err)
        last = [line for line in str(exc).splitlines() if line.strip()]
        CONSOLE.terminal_err.write(f"raydllm: error: {type(exc).__name__}: {last[-1][:300] if last else ''} "
                                   f"(the traceback is in {CONSOLE.log_path})\n")
        return 1
    finally:
        if CONSOLE.log_path is not None:
            quiet_ray()  # before the terminal is back: Ray's last words go to the log
        CONSOLE.restore()


if __name__ == "__main__":
    sys.exit(main())
