"""CLI layer: what each `raydllm <command> --help` tells a user: what the command does, what it prints, and
examples. Kept apart from the flags so the texts read as a whole."""
from __future__ import annotations

import argparse

COMMANDS: dict[str, tuple[str, list[str]]] = {
    "train": ("Train one configuration with Ray Train + DeepSpeed and log it to MLflow (one run).\n"
              "Prints progress lines, then the run's final losses; --json prints them as one JSON line.\n"
              "Re-running with the same --name resumes from the run's last checkpoint.",
              ["raydllm train gsm8k --preset local",
               "raydllm train gsm8k --preset local --set jepa.lambda=0 --name baseline   # the diffusion-only arm"]),
    "tune": ("Run a sweep: Ray Tune searches the space under ASHA for the DLLM-JEPA arm and the diffusion-only\n"
             "baseline arm (same budget each), then re-runs each arm's winner on the fresh seeds. Every trial is a\n"
             "child run of one MLflow parent run. Prints a progress line per change and, at the end, the best\n"
             "configs; --json prints the outcome (sweep name, parent run id, trials, failures).\n"
             "Interrupted (Ctrl-C, a lost driver)? Run the same command again: the sweep resumes.",
             ["raydllm tune gsm8k --preset local              # the embedded default on this machine",
              "raydllm tune gsm8k --space search_spaces/gsm8k.yaml --storage s3://BUCKET/raydllm",
              "raydllm tune gsm8k --plan                      # what the paper sweep costs, before it starts"]),
    "best": ("Read a finished or running sweep back from MLflow: each arm's winner on the selection seed (with the\n"
             "configs within noise of it), the winners' gain on the fresh seeds as an effect with a 95% interval,\n"
             "the minimum detectable effect and each arm's trial count. --pareto: the Pareto front instead.",
             ["raydllm best gsm8k", "raydllm best gsm8k --json | jq .gain", "raydllm best gsm8k --pareto"]),
    "report": ("Score both arms' winners on the test split on the fresh seeds, once: a second look at anything\n"
               "already scored is refused (the sweep's test ledger) unless --force. Writes report-<sweep>.md and\n"
               ".json and the parent run's Description; prints the table and the gain with its interval.",
               ["raydllm report gsm8k", "raydllm report gsm8k --limit 200 --json"]),
    "detect": ("Work out, before a sweep, what its protocol can detect: the standard error of the difference\n"
               "between two configs on the selection items against the space's target_effect, the generation\n"
               "cost of one selection pass, and the report's minimum detectable effect on the fresh seeds and\n"
               "test items (with one more seed, and twice the items). The variances are assumptions (flags);\n"
               "after a sweep, `raydllm best` prints the MDE from the variance it observed.",
               ["raydllm detect gsm8k", "raydllm detect gsm8k --discordance 0.25 --seed-sd 0.01 --json"]),
    "eval": ("Generate answers with one checkpoint (a trial's MLflow run id or a checkpoint folder) and score them\n"
             "on a task's split (validation by default; test goes through the sweep's ledger). Prints the\n"
             "metrics and logs them to the trial's run.",
             ["raydllm eval <run id> gsm8k", "raydllm eval <run id> gsm8k --sampler fast --limit 100"]),
    "pretrain": ("Pretrain the embedded tiny model's base offline (what model.init=pretrained starts from) and\n"
                 "cache it. Prints where the weights went and their held-out loss.",
                 ["raydllm pretrain", "raydllm pretrain --steps 2000 --out ./base.pt"]),
    "bench": ("Measure what the documentation's figures come from, in one process: the step cost of DLLM-JEPA\n"
              "against the baseline (and the memory arithmetic for LLaDA-8B), or one of the modes below. Prints\n"
              "ratios from one run; --json prints the whole report.",
              ["raydllm bench --preset local", "raydllm bench sampler --model ./tiny-llada",
               "raydllm bench sweep --pareto   # grid vs the multi-objective ASHA (starts Ray)"]),
}


PLAN_HELP = ("print what the sweep will cost and run nothing (no Ray): trials per arm and phase, steps and reports "
             "per trial, GPU-hours with no early stop and with ASHA's rung fractions, dollars on demand and spot "
             "(raydllm/assets/aws_prices.yaml), peak checkpoint storage, wall-clock at max_concurrent_trials")


def describe(subparsers: argparse._SubParsersAction) -> None:
    """Give every sub-command its description and examples (raw text: the line breaks above are kept)."""
    for name, command in subparsers.choices.items():
        if name not in COMMANDS:
            continue
        text, examples = COMMANDS[name]
        command.formatter_class = argparse.RawDescriptionHelpFormatter
        command.description = text
        command.epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
