"""Sweep layer: the `raydllm` model of lm-evaluation-harness, built from a checkpoint folder or a trial's MLflow run id.

Importing this module imports lm_eval (the `harness` extra) and registers the model class with lm-eval's registry,
so only the commands that run the harness import it (`raydllm eval --harness`; `python -m raydllm.sweep.harness`,
lm-eval's own command line with the model registered, as LLaDA's `eval_llada.py` is). It sits in the sweep layer,
not beside `evaluation.harness` (which answers the requests), because a run id is resolved through MLflow
(`tracking.resolve_target`, the resolution `raydllm eval` uses).

    lm_eval --model raydllm --model_args checkpoint=<folder or run id>,sampler=fast,gen_length=256,block_length=32
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from raydllm.core.config import ConfigError
from raydllm.evaluation.evaluate import load_checkpoint_backbone
from raydllm.evaluation.harness import PRESETS, DiffusionLM, HarnessPreset
from raydllm.sweep.tracking import resolve_target, resolve_tracking_uri

log = logging.getLogger(__name__)


@register_model("raydllm")
class RaydllmLM(DiffusionLM, LM):
    """lm-eval's `raydllm` model: `checkpoint` is what `raydllm eval` takes (a checkpoint folder, a Ray run folder,
    a storage URI or an MLflow run id in `tracking_uri`), `ema` / `base` / `device` its weights and device; every
    other model_arg is `DiffusionLM`'s. `loaded` (Python callers): an already loaded (backbone, tokenizer, cfg)."""

    def __init__(self, checkpoint: str | None = None, *, tracking_uri: str | None = None, ema=False, base=False,
                 device: str | None = "auto", loaded: tuple | None = None, max_batch_size=None, **settings):
        LM.__init__(self)
        from raydllm.evaluation.harness import _flag

        self.run_id = None
        if loaded is None:
            if not checkpoint:
                raise ConfigError("harness model_args: checkpoint=<checkpoint folder or MLflow run id> is required")
            self.tracking_uri = resolve_tracking_uri(tracking_uri)
            ema, base = _flag(ema), _flag(base)
            folder, self.run_id = resolve_target(str(checkpoint), self.tracking_uri, ema=ema)
            if ema and base:
                raise ConfigError("harness model_args: ema and base: choose one set of weights")
            if str(device or "").startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's command line passes --device (default cuda) whatever the machine: its own HF model
                # falls back to the CPU too. `raydllm eval --device cuda` is refused before it gets here.
                log.warning("harness: device %s but no CUDA device is visible: running on the CPU", device)
                device = "cpu"
            loaded = load_checkpoint_backbone(folder, ema=ema, base=base, device=device or "auto")
            self.checkpoint = str(folder)
        else:
            self.tracking_uri, self.checkpoint = tracking_uri, checkpoint
        # lm-eval hands its own --batch_size through; "auto" (find the largest that fits) has no meaning here.
        if settings.get("batch_size") in ("auto", None) or str(settings.get("batch_size", "")).startswith("auto"):
            settings.pop("batch_size", None)
        DiffusionLM.__init__(self, *loaded, **settings)
        self._device = self.model_device  # lm-eval's `device` property


def metric_items(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's results as MLflow metric names: `<task>/<metric>/<filter>` (lm-eval writes "metric,filter";
    MLflow allows no comma), numbers only (a stderr lm-eval could not compute is "N/A"), plus `<task>/n`, the
    documents scored."""
    metrics: dict[str, float] = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if key in ("alias", "sample_len") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue
            metric, _, filter_name = key.partition(",")
            metrics["/".join(p for p in (task, metric, filter_name if filter_name != "none" else "") if p)] = \
                float(value)
        samples = results.get("n-samples", {}).get(task)
        if samples:
            metrics[f"{task}/n"] = float(samples.get("effective", samples.get("original", 0)))
    return metrics


def run_harness(lm: DiffusionLM, tasks: Sequence[str], *, num_fewshot: int | None = None, limit: int | None = None,
                include_path: str | list | None = None, include_defaults: bool = True, log_samples: bool = False,
                name: str = "lm-eval", bootstrap_iters: int = 1000
                ) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
    """(metrics, protocol, lm-eval's whole result) of `lm_eval.simple_evaluate` on `tasks` with the raydllm
    model. `include_path`: folders of extra task YAMLs (e.g. `evaluation.harness.gsm8k_local_task`'s);
    include_defaults=False skips indexing lm-eval's own thousands of task files (about 10 s) when every task is
    one of those (a local GSM8K task `include`s lm-eval's YAML by path, which needs no index).
    The protocol is `lm.protocol` (the sampler as it ran, the harness's settings) plus the protocol's `name`
    (a preset's, or "lm-eval"), the tasks, shots as lm-eval ran them, `limit` and lm-eval's version."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path or None, include_defaults=include_defaults)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=log_samples, bootstrap_iters=bootstrap_iters)
    shots = sorted({int(v) for v in results.get("n-shot", {}).values()})
    protocol = lm.protocol(shots[0] if len(shots) == 1 else (num_fewshot or 0))
    if len(shots) > 1:
        protocol["shots"] = shots
    protocol |= {"name": name, "tasks": list(tasks), "limit": limit, "lm_eval": lm_eval.__version__}
    return metric_items(results), protocol, results


def preset_settings(preset: HarnessPreset | str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """A preset's model settings with the given ones (not None) on top."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ConfigError(f"--harness-preset {preset}: not one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    settings = dict(preset.model_args) if preset else {}
    return settings | {k: v for k, v in overrides.items() if v is not None}


if __name__ == "__main__":  # lm-eval's command line with `--model raydllm` registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
