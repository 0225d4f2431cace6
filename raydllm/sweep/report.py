"""Sweep layer: `raydllm report`: the two arms' winners on the test split, once, as one table.

The winners are the ones `raydllm best` names: each arm's best completed config on the selection seed's
validation metric. Their checkpoints from the fresh seeds (never the seed that chose them) answer the test
split with the task's protocol (the sampler and shots of the trials' own final evaluation), and the table holds
per arm mean ± std over those seeds, the paired gain with its t-test, the forgetting (WikiText Δ), drift and
collapse figures the trials logged at their end, the sampler settings and the hardware. It goes to stdout, to
Markdown and JSON files, and to the sweep's parent run in MLflow. The parent run records that the test split
was read for these winners, and its test ledger (sweep/ledger.py) every (config, seed, checkpoint) ever scored:
scoring any of them again is refused unless forced, so the test split cannot quietly become a second validation
split; a sweep that has not finished is refused.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from raydllm.core.config import ConfigError
from raydllm.evaluation.protocol import require_same_protocol
from raydllm.sweep.ledger import claim, entry, require_finished
from raydllm.sweep.results import best_configs, effect_with_interval, paired_test
from raydllm.sweep.verdict import write_description

TEST_TAG = "raydllm.test_report"  # on the parent run: which winners were evaluated on test, and when

# Figures each trial logged at its end (trial.TrialLoop.final_evaluation -> probes.run_probes).
PROBES = {"wikitext_delta": "probe/wikitext_delta", "drift_early": "probe/drift_early",
          "drift_middle": "probe/drift_middle", "drift_late": "probe/drift_late", "eff_rank": "probe/z_eff_rank",
          "std_mean": "probe/z_std_mean", "cos_diversity": "probe/z_cos_diversity",
          "eff_rank_base": "probe/z_base_eff_rank"}


def evaluate_checkpoint(folder: Path, task_name: str, *, split: str, shots: int | None = None,
                        limit: int | None = None, gen_length: int | None = None, block_length: int | None = None,
                        steps: int | None = None, batch_size: int = 16) -> tuple[dict[str, float], list[dict], dict]:
    """(metrics, predictions, protocol) of a trial's checkpoint on a split, as `raydllm eval` scores it: the
    trial's own data source and, unless given, its sampler settings (eval.*) and its first final-evaluation
    shot count."""
    from raydllm.core.config import validate
    from raydllm.data.sft import load_examples
    from raydllm.evaluation.evaluate import evaluate_task, load_checkpoint_backbone, prompt_budget
    from raydllm.data.tasks import get_task
    from raydllm.evaluation.protocol import score_protocol

    backbone, tokenizer, cfg = load_checkpoint_backbone(folder)
    eval_cfg = validate(cfg.to_dict() | {"task": task_name,
                                         "data": cfg.data.model_copy(update={"val_limit": 10**9}).model_dump(mode="json")})
    shots = cfg.eval.final_shots[0] if shots is None else shots
    examples = load_examples(eval_cfg, split)
    examples = examples[:limit] if limit else examples
    sampler = _checkpoint_sampler(cfg, gen_length, block_length, steps)
    metrics, predictions = evaluate_task(backbone, tokenizer, get_task(task_name), examples, shots=shots,
                                         train_examples=load_examples(eval_cfg, "train") if shots else [],
                                         sampler=sampler, batch_size=batch_size, progress=False,
                                         max_prompt_tokens=prompt_budget(cfg, sampler, shots))
    protocol = score_protocol(sampler, shots=shots, batch_size=batch_size, backbone=backbone) | {
        "split": split, "examples": len(examples)}
    return metrics, predictions, protocol


def _checkpoint_sampler(cfg, gen_length: int | None, block_length: int | None, steps: int | None):
    """The exact sampler a trial's checkpoint is scored with: the report's settings, else the trial's eval.*."""
    from raydllm.evaluation.evaluate import default_sampler

    return default_sampler(cfg, gen_length=gen_length or cfg.eval.gen_length,
                           block_length=block_length or cfg.eval.block_length, steps=steps or cfg.eval.sampler_steps)


def planned_protocols(folders: dict, *, shots: int | None, gen_length: int | None, block_length: int | None,
                      steps: int | None, batch_size: int) -> dict[str, dict]:
    """{"<arm> seed <s>": protocol} each checkpoint will be scored with, read from the checkpoints' configs
    alone (no weights, no test row), so a report whose numbers could not sit side by side stops first."""
    from raydllm.core.config import validate
    from raydllm.engine.checkpoints import read_checkpoint_meta, resolve_checkpoint_dir
    from raydllm.evaluation.evaluate import eval_device, eval_dtype
    from raydllm.evaluation.protocol import score_protocol

    device = eval_device(None)
    out = {}
    for (arm, seed), folder in folders.items():
        cfg = validate(read_checkpoint_meta(resolve_checkpoint_dir(folder))["config"])
        out[f"{arm} seed {seed}"] = score_protocol(
            _checkpoint_sampler(cfg, gen_length, block_length, steps), batch_size=batch_size,
            shots=cfg.eval.final_shots[0] if shots is None else shots,
            dtype=str(eval_dtype(device)).removeprefix("torch."), device_type=device.type)
    return out


def final_report(task: str, *, tracking_uri: str, sweep: str | None = None, force: bool = False,
                 limit: int | None = None, shots: int | None = None, gen_length: int | None = None,
                 block_length: int | None = None, steps: int | None = None, batch_size: int = 16,
                 out_dir: str | Path = ".") -> dict[str, Any]:
    """Evaluate both arms' winners on test across the fresh seeds; write and log the table; return it."""
    from raydllm.data.tasks import get_task
    from raydllm.sweep.tracking import log_to_run, resolve_target

    client = MlflowClient(tracking_uri)
    best = best_configs(task, tracking_uri=tracking_uri, top=1, sweep=sweep)
    name = best["sweep"]
    jepa, base = (best["best"][0] if best["best"] else None), best["baseline"]
    if jepa is None or base is None:
        missing = "DLLM-JEPA" if jepa is None else "baseline"
        raise ConfigError(f"sweep {name}: the {missing} arm has no completed trial on the selection seed: no winner "
                          f"to evaluate")
    seeds = sorted(set(jepa["fresh_seeds"]) & set(base["fresh_seeds"]) - {best["selection_seed"]})
    if not seeds:
        raise ConfigError(f"sweep {name}: the winners have not run on any seed but {best['selection_seed']}, the one "
                          f"that chose them; give the space more seeds and repeat.top >= 1 and re-run the sweep")
    rows = [("dllm-jepa", jepa), ("baseline", base)]
    twin = best.get("baseline_step_matched")  # under match: compute, the baseline winner at equal steps
    if twin is not None and set(seeds) <= set(twin["fresh_seeds"]):
        rows.append(("baseline-steps", twin))
    winners = {arm: row["config_key"] for arm, row in rows} | {"seeds": seeds}
    parent_id = best["parent_run_id"]
    require_finished(client, parent_id, name)
    folders = {(arm, seed): resolve_target(dict(zip(row["fresh_seeds"], row["fresh_run_ids"]))[seed], tracking_uri)[0]
               for arm, row in rows for seed in seeds}
    # Every number of the table under one protocol, checked before the ledger claims any test row.
    require_same_protocol(planned_protocols(folders, shots=shots, gen_length=gen_length, block_length=block_length,
                                            steps=steps, batch_size=batch_size), what=f"report {name}")
    # The ledger, before the first test example is read: an interrupted report has looked at test all the same.
    claim(client, parent_id, [entry(row["config_key"], seed, folders[arm, seed]) for arm, row in rows for seed in seeds],
          force=force, by="report")
    previous = client.get_run(parent_id).data.tags.get(TEST_TAG)
    client.set_tag(parent_id, TEST_TAG, json.dumps({"winners": winners, "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                    "forced": bool(previous and force)}))
    primary = get_task(task).primary_metric
    arms: dict[str, dict] = {}
    protocol: dict = {}
    for arm, row in rows:
        by_seed = dict(zip(row["fresh_seeds"], row["fresh_run_ids"]))
        values, figures, devices, item_scores = [], {k: [] for k in PROBES}, set(), []
        for seed in seeds:
            run_id, folder = by_seed[seed], folders[arm, seed]
            metrics, predictions, protocol = evaluate_checkpoint(
                folder, task, split="test", shots=shots, limit=limit, gen_length=gen_length,
                block_length=block_length, steps=steps, batch_size=batch_size)
            log_to_run(tracking_uri, run_id, metrics, predictions, split="test", shots=protocol["shots"], task=task,
                       protocol=protocol)
            values.append(float(metrics[primary]))
            item_scores.append([float(p["scores"][primary]) for p in predictions])
            run = client.get_run(run_id)
            for key, metric in PROBES.items():
                if metric in run.data.metrics:
                    figures[key].append(float(run.data.metrics[metric]))
            devices.add(run.data.tags.get("raydllm.device", "unknown"))
        arms[arm] = {"label": row["label"], "params": row["params"], "config_key": row["config_key"],
                     "seeds": seeds, "run_ids": [by_seed[s] for s in seeds], "values": values,
                     **_mean_std(values), "validation_selection_value": row["selection_value"],
                     "probes": {k: _mean_std(v) | {"values": v} for k, v in figures.items() if v},
                     "devices": sorted(devices), "item_scores": item_scores}
    gain = test_gain(seeds, arms["dllm-jepa"], arms["baseline"])
    gain_steps = test_gain(seeds, arms["dllm-jepa"], arms["baseline-steps"]) if "baseline-steps" in arms else None
    for row in arms.values():
        row.pop("item_scores")
    parent = client.get_run(parent_id)
    report = {"sweep": name, "task": task, "metric": primary, "split": "test", "protocol": protocol,
              "selection": {"seed": best["selection_seed"], "metric": best["metric"], "mode": best["mode"]},
              "seeds": seeds, "arms": arms, "gain": gain, "gain_step_matched": gain_steps,
              "baseline_match": best.get("baseline_match", "steps"),
              "trial_counts": best.get("trial_counts"),
              "hardware": {"trials": sorted(set(arms["dllm-jepa"]["devices"]) | set(arms["baseline"]["devices"])),
                           "driver": {k: v for k, v in parent.data.tags.items() if k.startswith("host.")}},
              "budgets": best.get("budgets"), "parent_run_id": parent_id}
    markdown = format_report(report)
    write_description(client, parent_id, best=best, report=report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"report-{name}.md").write_text(markdown + "\n")
    (out / f"report-{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    client.log_text(parent_id, markdown + "\n", "report/test.md")
    client.log_dict(parent_id, report, "report/test.json")
    gain = report["gain"]
    client.log_metric(parent_id, f"test/gain_{primary}", gain["mean"])
    for key in ("ci_low", "ci_high", "p_value", "mde"):
        if gain.get(key) is not None:
            client.log_metric(parent_id, f"test/gain_{key}", gain[key])
    report["files"] = [str(out / f"report-{name}.md"), str(out / f"report-{name}.json")]
    return report


def test_gain(seeds: list[int], ours: dict, theirs: dict) -> dict:
    """The paired test gain of arm `ours` over arm `theirs` (higher is better): per seed, the per-problem
    differences (same test problems in the same order), through the two-level bootstrap; the seed-level t-test
    kept apart, never the headline."""
    diffs = [a - b for a, b in zip(ours["values"], theirs["values"])]
    per_seed = {}
    for s, d, mine, other in zip(seeds, diffs, ours["item_scores"], theirs["item_scores"]):
        per_seed[s] = [a - b for a, b in zip(mine, other)] if len(mine) == len(other) and len(mine) > 1 else [d]
    seed_test = paired_test(diffs)
    return {"seeds": seeds, "differences": diffs, "mean": seed_test["mean"], "std": seed_test["std"],
            "n": len(seeds), **effect_with_interval(per_seed), "seed_t_test": seed_test}


def _mean_std(values: list[float]) -> dict[str, float | int | None]:
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def _pm(stats: dict | None, fmt: str = ".3f") -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    spread = fmt.replace("+", "")  # a spread has no sign
    return f"{stats['mean']:{fmt}}" + (f" ± {stats['std']:{spread}}" if stats.get("std") is not None else " (n=1)")


def format_report(report: dict) -> str:
    """The report as one Markdown table with its context lines."""
    p, sel, gain = report["protocol"], report["selection"], report["gain"]
    lines = [f"### {report['task']}: test {report['metric']}, sweep `{report['sweep']}`", "",
             f"Winners chosen on seed {sel['seed']}'s validation {sel['metric']} ({sel['mode']}), completed trials "
             f"only; evaluated on test with the checkpoints of the fresh seeds {report['seeds']}.", "",
             "| arm | config | test " + report["metric"] + " per seed | mean ± std | WikiText Δ | drift early / "
             "middle / late | eff. rank (base) | pooled std | cos. diversity |",
             "|---|---|---|---|---|---|---|---|---|"]
    titles = {"dllm-jepa": "DLLM-JEPA", "baseline": "baseline (λ = 0)" + (", compute-matched" if
              report.get("baseline_match") == "compute" else ""), "baseline-steps": "baseline (λ = 0), step-matched"}
    for arm, title in titles.items():
        if arm not in report["arms"]:
            continue
        a = report["arms"][arm]
        pr = a["probes"]
        drift = " / ".join(_pm(pr.get(f"drift_{part}")) for part in ("early", "middle", "late"))
        rank = _pm(pr.get("eff_rank"), ".2f") + (f" ({pr['eff_rank_base']['mean']:.2f})" if "eff_rank_base" in pr else "")
        lines.append(f"| {title} | {a['label']} | {', '.join(f'{v:.3f}' for v in a['values'])} | {_pm(a)} | "
                     f"{_pm(pr.get('wikitext_delta'), '+.2f')} | {drift} | {rank} | {_pm(pr.get('std_mean'))} | "
                     f"{_pm(pr.get('cos_diversity'))} |")
    from raydllm.sweep.stats import format_effect

    mde = (f" Minimum detectable effect (80% power, α = 0.05): {gain['mde']:.3f}; with one more seed "
           f"{gain['mde_plus_one_seed']:.3f}, with twice the problems {gain['mde_double_items']:.3f}."
           if gain.get("mde") is not None else "")
    counts = report.get("trial_counts") or {}
    budget = (" Trials: " + ", ".join(f"{arm} {c['search']} searched + {c['repeat']} repeats"
                                      for arm, c in sorted(counts.items())) + ".") if counts else ""
    lines += ["", f"Pre-specified comparison (each arm's winner on seed {sel['seed']}), paired gain "
                  f"(DLLM-JEPA − baseline) over seeds {gain['seeds']}: "
                  f"**{format_effect({**gain, 'mean': gain['effect']}, digits=3)}**.{mde}{budget}"]
    steps = report.get("gain_step_matched")
    if steps:
        lines += [f"Step-matched comparison (the same baseline winner at the DLLM-JEPA arm's step count): "
                  f"**{format_effect({**steps, 'mean': steps['effect']}, digits=3)}**."]
    lines += [f"Sampler: {p['gen_length']} answer tokens, blocks of {p['block_length']}, {p['steps']} steps, "
              f"temperature {p['temperature']:g}, {p['remasking']} remasking; {p['shots']}-shot prompts; "
              f"{p['examples']} test examples per checkpoint; batches of {p.get('batch_size', '?')}, "
              f"{p.get('padding_side', '?')}-padded, {p.get('dtype', '?')} on {p.get('device_type', '?')} "
              f"(the same protocol for every number).",
              f"Hardware: trials on {', '.join(report['hardware']['trials'])}; driver "
              + ", ".join(f"{k.removeprefix('host.')} {v}" for k, v in sorted(report['hardware']['driver'].items()))
              + "."]
    return "\n".join(lines)
