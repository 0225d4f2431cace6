"""Sweep layer: what runs inside a Tune trial (a Ray actor): the same TorchTrainer as `raydllm train`, built
from the trial's config, with its workers' reports forwarded to Tune."""
from __future__ import annotations

import json
import time
from typing import Any

from raydllm.sweep import tracking
from mlflow.tracking import MlflowClient

from raydllm.sweep.search_space import rung_steps
from raydllm.sweep.search_space import arm_of, config_key, flatten_trial_config, max_steps, trial_config, trial_label
from raydllm.sweep.compute_match import MATCH_TAG, match_of, trial_steps


# -- inside a trial (a Tune actor) -----------------------------------------------------------------------

def run_trial(config: dict[str, Any], *, spec: dict, tracking_uri: str, experiment: str, parent_run_id: str,
              train_storage: str, phase: str) -> None:
    """One Tune trial: the training engine with this trial's config, reporting to Tune through Train."""
    scheduled_at = time.time()  # Tune placed this trial: from here its time counts as reserved
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raydllm.sweep.search_space import SweepSpec
    from raydllm.sweep.train import build_trainer

    sweep = SweepSpec.model_validate(spec)
    # A shuffled grid point, or a repeat-phase trial: a whole config from the search phase and a new seed.
    config = flatten_trial_config(config)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    cfg = trial_config(sweep, config, int(config["train.seed"]))
    # A compute-matched baseline trial carries its own step count; its rungs scale with it (compute_match.py).
    cfg.train.max_steps, grace = trial_steps(config, max_steps(sweep), sweep.scheduler.grace_period)
    if cfg.train.checkpoint_steps is None and cfg.train.checkpoint_every is None:
        # Checkpoints where ASHA decides and at the end: a resumed trial loses at most one rung of work.
        cfg.train.checkpoint_steps = rung_steps(grace, sweep.scheduler.reduction_factor, cfg.train.max_steps)
    run_id, resumed = tracking.open_run(
        tracking_uri, experiment, key="raydllm.trial_id", name=trial_id, params=cfg.flat() | sampler_params(cfg),
        run_name=trial_label(sweep, config, phase),
        tags={"mlflow.parentRunId": parent_run_id, "raydllm.kind": "trial", "raydllm.phase": phase, "raydllm.status": "running",
              "raydllm.arm": arm_of(cfg.flat()), "raydllm.config_key": config_key(sweep, config),
              **({MATCH_TAG: match_of(config)} if arm_of(cfg.flat()) == "baseline" else {}),
              "raydllm.searched": json.dumps({k: v for k, v in config.items() if "." in k}, sort_keys=True,
                                             default=str)})
    client = MlflowClient(tracking_uri)
    if not resumed:
        client.log_text(run_id, json.dumps(cfg.to_dict(), indent=1), "config.json")
    else:
        run = client.get_run(run_id)
        if run.data.tags.get("raydllm.status") in ("completed", "stopped_early"):
            # The driver recorded this trial's end, but died before Tune saved its own state: a restored sweep
            # must not train it again (nor overturn ASHA's decision to stop it). Hand Tune the final result
            # MLflow holds (Tune insists every result carries the sweep's metric), then end.
            tune.report({**run.data.metrics, "step": int(run.data.tags.get("raydllm.last_step", 0))})
            return
    trainer = build_trainer(cfg, name=f"train-{trial_id}", storage_path=train_storage,
                            tracking={"tracking_uri": tracking_uri, "run_id": run_id},
                            callbacks=[TuneReportCallback()], scheduled_at=scheduled_at)
    trainer.fit()


def sampler_params(cfg) -> dict[str, Any]:
    """The generation settings every trial's accuracy figures use (`eval.*` resolved by default_sampler)."""
    from raydllm.evaluation.evaluate import default_sampler

    sampler = default_sampler(cfg, gen_length=cfg.eval.gen_length, block_length=cfg.eval.block_length,
                              steps=cfg.eval.sampler_steps)
    return {"sampler.gen_length": sampler.gen_length, "sampler.block_length": sampler.block_length,
            "sampler.steps": sampler.steps, "sampler.temperature": sampler.temperature,
            "sampler.remasking": sampler.remasking}
