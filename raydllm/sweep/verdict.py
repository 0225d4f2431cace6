"""Sweep layer: the verdict where users look: the parent run's Description in MLflow, and the arms' budgets.

The sweep's parent run Description (the tag `mlflow.note.content`, Markdown in the MLflow UI) holds the
verdict: arms, budgets, winners, and every field of the gain that `best` / `report` computed (rendered
generically, so fields added to the gain, such as intervals or the minimum detectable effect, appear without a
change here). Written when a sweep ends (tune) and when `report` runs (the test verdict, below the validation one).
"""
from __future__ import annotations

from typing import Any

NOTE_TAG = "mlflow.note.content"
JEPA_BUDGET_TAG = "raydllm.jepa_num_samples"
BASELINE_BUDGET_TAG = "raydllm.baseline_num_samples"


def arm_budgets(tags: dict[str, str], jepa_trials: int, baseline_trials: int) -> dict[str, Any]:
    """Each arm's searched-trial budget (the parent run's tags; the trials found where a sweep predates them)
    and, when they differ, the line every verdict prints."""
    jepa = int(tags.get(JEPA_BUDGET_TAG) or jepa_trials)
    baseline = int(tags.get(BASELINE_BUDGET_TAG) or baseline_trials)
    line = (f"baseline: {baseline} of the DLLM-JEPA arm's {jepa} trials" if baseline != jepa else None)
    return {"dllm-jepa": jepa, "baseline": baseline, "equal": baseline == jepa, "line": line}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return "–" if value is None else str(value)


def _gain_rows(gain: dict | None) -> list[str]:
    if not gain:
        return ["No gain: an arm has no winner measured on the fresh seeds."]
    rows = ["| gain field | value |", "|---|---|"]
    rows += [f"| {key} | {_fmt(value)} |" for key, value in gain.items() if key not in ("config_key",)]
    return rows


def _winner(row: dict | None) -> str:
    if not row:
        return "–"
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in (row.get("params") or {}).items())
    return f"{row.get('label', row.get('config_key'))} ({params})"


def best_markdown(best: dict) -> str:
    """The validation verdict from `best_configs`' JSON."""
    budgets = best.get("budgets") or {}
    lines = [headline(best.get("gain"), budgets, best.get("metric"), "validation"), "",
             f"## Verdict: sweep {best.get('sweep')}",
             f"Selected on **{best.get('metric')}** ({best.get('mode')}) at seed {best.get('selection_seed')}; "
             f"gains measured on fresh seeds {best.get('fresh_seeds')}.", "",
             "| arm | trials | winner | selection value | fresh mean |", "|---|---|---|---|---|"]
    jepa = best["best"][0] if best.get("best") else None
    for arm, row in (("DLLM-JEPA", jepa), ("baseline", best.get("baseline"))):
        key = "dllm-jepa" if arm == "DLLM-JEPA" else "baseline"
        lines.append(f"| {arm} | {budgets.get(key, '–')} | {_winner(row)} | "
                     f"{_fmt((row or {}).get('selection_value'))} | {_fmt((row or {}).get('fresh_mean'))} |")
    if budgets.get("line"):
        lines += ["", f"**{budgets['line']}**"]
    lines += ["", "### Gain (validation, fresh seeds)", *_gain_rows(best.get("gain"))]
    if best.get("gain_step_matched"):
        lines += ["", "### Gain against the step-matched baseline (validation)", *_gain_rows(best["gain_step_matched"])]
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    """The test verdict from `final_report`'s JSON."""
    lines = [headline(report.get("gain"), report.get("budgets"), report.get("metric"), "test"), "",
             f"## Test verdict ({report.get('metric')}, seeds {report.get('seeds')})", "",
             "| arm | config | test mean | std | n |", "|---|---|---|---|---|"]
    for arm, row in (report.get("arms") or {}).items():
        lines.append(f"| {arm} | {row.get('label')} | {_fmt(row.get('mean'))} | {_fmt(row.get('std'))} | "
                     f"{row.get('n')} |")
    if report.get("budgets", {}).get("line"):
        lines += ["", f"**{report['budgets']['line']}**"]
    lines += ["", "### Gain (test)", *_gain_rows(report.get("gain"))]
    if report.get("gain_step_matched"):
        lines += ["", "### Gain against the step-matched baseline (test)", *_gain_rows(report["gain_step_matched"])]
    return "\n".join(lines)


def headline(gain: dict | None, budgets: dict | None, metric: str | None, split: str) -> str:
    """One line first in the Description (the MLflow UI shows its first lines before "Show more")."""
    budget = (budgets or {}).get("line") or (f"{budgets['dllm-jepa']} trials per arm" if budgets else "")
    if not gain or gain.get("mean") is None:
        return f"**{split}: no gain measured** · {budget}"
    extra = ", ".join(f"{k} {_fmt(v)}" for k, v in gain.items()
                      if k not in ("mean", "differences", "seeds", "label", "config_key", "t", "df")
                      and isinstance(v, (int, float, str)) and v is not None)
    return f"**{split} {metric}: gain (DLLM-JEPA − baseline) {gain['mean']:+.4g}** ({extra}) · {budget}"


def write_description(client, parent_run_id: str, *, best: dict | None = None, report: dict | None = None) -> str:
    """Set the parent run's Description to the verdict; a report's test verdict goes above the validation
    verdict (recomputed from `best` when given, else kept from the note already there)."""
    current = client.get_run(parent_run_id).data.tags.get(NOTE_TAG, "")
    validation = best_markdown(best) if best is not None else current.split("\n\n---\n\n")[-1]
    text = (report_markdown(report) + "\n\n---\n\n" + validation) if report is not None else validation
    client.set_tag(parent_run_id, NOTE_TAG, text)
    return text


def ui_hint(client, parent_run_id: str) -> str:
    """Where the verdict is in the MLflow UI. MLflow 3.17's UI picks its GenAI or model-training view per browser
    (localStorage `mlflow.workflowType`, default GenAI) unless the URL says `workflowType=machine_learning`; the
    experiment tag `mlflow.experimentKind` is read only where that toggle is off. So the link carries it."""
    experiment = client.get_run(parent_run_id).info.experiment_id
    return (f"MLflow UI (`mlflow ui`, then): #/experiments/{experiment}/runs/{parent_run_id}"
            f"?workflowType=machine_learning  (the verdict is the run's Description)")
