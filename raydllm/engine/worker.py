"""Engine layer: the training loop each Ray Train worker runs, around one DeepSpeed engine.

Per optimizer step: the online model (backbone + predictor, inside DeepSpeed) runs once with grad on the
context view; the EMA target runs once under no_grad on the target view (lambda > 0 only); one backward;
the optimizer step; the EMA update. Every `eval_every` steps all workers compute the validation
diffusion loss, save a checkpoint (DeepSpeed engine + EMA + step) and call `ray.train.report` together
(it is a barrier). Rank 0 writes the step-by-step curves to MLflow at the same moment, so a run resumed
from that checkpoint continues one curve with no repeated steps.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from raydllm.engine.backbone import Backbone, load_backbone
from raydllm.engine.checkpoints import DS_TAG, EXPORT_DIR, EXPORT_EMA, folder_bytes, staging_dir
from raydllm.core.config import Config, ConfigError
from raydllm.data.sft import collate, load_examples, micro_batch_indices, steps_for, tokenize_sft
from raydllm.core.objective import EmaAdapters, EmaTarget, Losses, Predictor, attach_l2_anchor, diffusion_loss, dllm_jepa_losses
from raydllm.core.masking import mask_tokens
from raydllm.data.tasks import get_task

log = logging.getLogger(__name__)


class OnlineModel(nn.Module):
    """What DeepSpeed trains: the backbone f_theta and the predictor g_phi. The EMA target stays outside."""

    def __init__(self, backbone: Backbone, predictor: Predictor):
        super().__init__()
        self.backbone = backbone
        self.predictor = predictor

    def forward(self, input_ids, attention_mask, maskable, *, target, cfg: Config, generator, run_target: bool
                ) -> Losses:
        return dllm_jepa_losses(self.backbone, target, self.predictor, input_ids, attention_mask, maskable,
                                mask_token_id=self.backbone.ids.mask, t_low=cfg.jepa.t_low,
                                t_high=cfg.jepa.t_high, lam=cfg.jepa.lam, generator=generator,
                                diffusion_norm=cfg.loss.diffusion_norm, run_target=run_target,
                                rate_sampling=cfg.jepa.rate_sampling,
                                pool_exclude_id=self.backbone.ids.eos if cfg.jepa.pool_exclude_eos_padding else None)


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def deepspeed_config(cfg: Config, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def use_bf16(cfg: Config, device: torch.device) -> bool:
    if cfg.train.bf16 != "auto":
        return cfg.train.bf16
    # bf16 where the hardware runs it natively; CPUs emulate most bf16 matmuls, which is slower than fp32.
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _param_groups(module: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)  # no decay on biases and norm gains
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # DeepSpeed drops empty groups (LoRA's baseline trains only 2-D adapters), which would leave the lr
    # scheduler one learning rate too many.
    return [g for g in groups if g["params"]]


class MetricsSink:
    """Rank 0's MLflow writer: buffers per-step points and flushes them after each persisted checkpoint.

    On a resume, steps already in MLflow are skipped. The checkpoint Ray resumes from can be older than
    the last flush (a kill between persisting a checkpoint and Ray registering it), and the re-done steps
    are the same steps with the same values (data and masks are functions of the step), so skipping them
    keeps one continuous curve with every step exactly once.
    """

    KEYS = ("loss_total", "loss_diff", "loss_jepa", "lr", "tokens_per_s", "val_loss_diff", "time/train_s",
            "time/eval_s", "time/checkpoint_s", "checkpoint/bytes", "val_accuracy", "wikitext_loss", "wikitext_delta",
            "time/forgetting_probe_s", "decode_tokens_per_forward")

    def __init__(self, tracking: dict | None):
        self.client = None
        self.points: list = []
        self.logged_upto: dict[str, int] = {}
        if tracking and tracking.get("run_id"):
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=tracking["tracking_uri"])
            self.run_id = tracking["run_id"]
            for key in self.KEYS:
                history = self.client.get_metric_history(self.run_id, key)
                if history:
                    self.logged_upto[key] = max(m.step for m in history)

    def add(self, step: int, values: dict[str, float]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.points += [Metric(k, float(v), now, step) for k, v in values.items()
                        if v is not None and step > self.logged_upto.get(k, -1)]

    def has(self, key: str) -> bool:
        return self.client is not None and key in self.client.get_run(self.run_id).data.metrics

    def tag(self, key: str, value: str) -> None:
        if self.client is not None:
            self.client.set_tag(self.run_id, key, value)

    def params(self, values: dict[str, object]) -> None:
        """Run parameters (e.g. the resolved sampler settings); logging the same value again is a no-op."""
        if self.client is not None:
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in values.items()])

    def flush(self) -> None:
        if self.client is None or not self.points:
            return
        for start in range(0, len(self.points), 1000):  # MLflow's log_batch limit
            self.client.log_batch(self.run_id, metrics=self.points[start:start + 1000])
        self.points = []


class WorkerLoop:
    def __init__(self, cfg: Config, *, rank: int, world: int, device: torch.device, tracking: dict | None = None):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.sink = MetricsSink(tracking if rank == 0 else None)
        self.bf16 = use_bf16(cfg, device)
        torch.manual_seed(cfg.train.seed)  # same init on every rank; data differs by rank below

        # Straight into the training dtype: a bf16 run never holds a float32 copy of the weights.
        backbone, tokenizer = load_backbone(cfg.model, dtype=torch.bfloat16 if self.bf16 else torch.float32)
        self.ids = backbone.ids
        self.tokenizer = tokenizer
        task = get_task(cfg.task)
        encode = dict(max_prompt_tokens=cfg.data.max_prompt_tokens, answer_tokens=cfg.data.answer_tokens,
                      eos_id=backbone.ids.eos)
        self.train_examples = load_examples(cfg, "train")
        self.val_examples = load_examples(cfg, "validation")
        self.train_records = tokenize_sft(self.train_examples, tokenizer, task, **encode)
        val = tokenize_sft(self.val_examples, tokenizer, task, **encode)
        self.val_records = val[rank::world]
        self.total_steps = steps_for(cfg, len(self.train_records))

        # The baseline never uses the predictor: depth 0 keeps its parameters out of ZeRO's optimizer state.
        depth = cfg.jepa.k if cfg.jepa.lam > 0 else 0
        predictor = Predictor(backbone.hidden_size, depth, n_heads=_predictor_heads(backbone.hidden_size))
        module = OnlineModel(backbone, predictor)
        # lambda = 0 is the baseline: no EMA copy exists and no target forward ever runs.
        # jepa.ema_device=cpu: the EMA master stays in host memory, streamed in for the target forward.
        # LoRA: the base is frozen, so the target is that same base with an EMA of the adapters only.
        self.lora = backbone.is_lora
        ema_class = EmaAdapters if self.lora else EmaTarget
        self.ema = (ema_class(backbone, cfg.jepa.ema_decay, dtype=getattr(torch, cfg.jepa.ema_dtype),
                              device=device, offload=cfg.jepa.ema_device == "cpu")
                    if cfg.jepa.lam > 0 else None)
        trainable, total = backbone.parameter_counts()
        n_predictor = sum(p.numel() for p in predictor.parameters())
        self.param_counts = {"params/trainable": float(trainable + n_predictor),
                             "params/total": float(total + n_predictor)}
        log.info("parameters: %d trainable of %d (LoRA %s)", trainable + n_predictor, total + n_predictor, self.lora)

        import deepspeed

        optimizer = torch.optim.AdamW(_param_groups(module, cfg.train.weight_decay), lr=cfg.train.lr,
                                      betas=tuple(cfg.train.adam_betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_with_warmup(self.total_steps, cfg.train.warmup_ratio))
        # from_pretrained hands models back in eval mode, where transformers-style checkpointing is off.
        module.train()
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module.to(device), optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, self.bf16))
        # After the engine: theta_base is cloned from the weights the optimizer updates, on their device and
        # in their dtype (bf16 on the GPU under bf16), so no second copy lives in host memory.
        self.anchor = (attach_l2_anchor(list(self.engine.module.backbone.parameters()), cfg.loss.l2_lambda,
                                        scale=1.0 / cfg.train.grad_accum) if cfg.loss.anchor == "l2" else None)
        self.step = 0
        # Worker time by phase (training steps, evaluation, checkpointing), summed over the run's attempts and
        # kept in checkpoints: what the sweep summary's time accounting reads.
        self.seconds = {"train": 0.0, "eval": 0.0, "checkpoint": 0.0}
        self.checkpoint_bytes = 0  # written by all ranks over the run's checkpoints (kept in them too)
        self.target_rng = torch.Generator().manual_seed(cfg.train.seed + 7)

    # -- one optimizer step -------------------------------------------------------------------------
    def _target(self):
        if self.ema is None:
            return None
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16
                    else nullcontext())

        def encode(ids, attention_mask):
            with autocast:
                return self.ema.module(ids, attention_mask)

        return encode

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        sums = {"loss_total": 0.0, "loss_diff": 0.0, "loss_jepa": 0.0}
        jepa_runs = tokens = 0
        # JEPA loss dropout: the whole step's target branch is on or off, the same decision on all ranks.
        run_target = cfg.jepa.target_prob >= 1.0 or (
            torch.rand((), generator=torch.Generator().manual_seed(cfg.train.seed + self.step)).item()
            < cfg.jepa.target_prob)
        target = self._target()
        for micro in range(cfg.train.grad_accum):
            # Masks of (step, micro) depend only on (seed, step, micro, rank): a resumed run draws the same views,
            # and the two arms of a comparison on one seed the same context views (a micro-batch's target view is
            # drawn after its context view, so it cannot shift the next micro-batch's draws).
            generator = torch.Generator().manual_seed(cfg.train.seed * 7919 + self.step * 104_729
                                                      + micro * 15_485_863 + self.rank)
            idx = micro_batch_indices(len(self.train_records), step=self.step, micro=micro, rank=self.rank,
                                      world=self.world, micro_batch_size=cfg.train.micro_batch_size,
                                      grad_accum=cfg.train.grad_accum, seed=cfg.train.seed)
            batch = collate([self.train_records[i] for i in idx], self.ids.pad).to(self.device)
            losses: Losses = self.engine(batch.input_ids, batch.attention_mask, batch.maskable, target=target,
                                         cfg=cfg, generator=generator, run_target=run_target)
            self.engine.backward(losses.total)
            self.engine.step()
            sums["loss_total"] += float(losses.total.detach()) / cfg.train.grad_accum
            sums["loss_diff"] += float(losses.diff) / cfg.train.grad_accum
            if losses.jepa is not None:
                sums["loss_jepa"] += float(losses.jepa) / cfg.train.grad_accum
                jepa_runs += 1
            tokens += batch.tokens
        if self.ema is not None:
            self.ema.update(self.engine.module.backbone.parameters())
        self.step += 1
        out = {"loss_total": sums["loss_total"], "loss_diff": sums["loss_diff"], "tokens": float(tokens),
               "lr": self.scheduler.get_last_lr()[0]}
        if jepa_runs:
            out["loss_jepa"] = sums["loss_jepa"]
        return out

    # -- validation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self) -> float:
        """Masked-token CE on the validation split, averaged over eval.val_mask_rates, fixed seed."""
        model = self.engine.module.backbone
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        mbs = self.cfg.train.micro_batch_size
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        for r_i, rate in enumerate(self.cfg.eval.val_mask_rates):
            generator = torch.Generator().manual_seed(self.cfg.eval.val_seed + 1000 * r_i + self.rank)
            for start in range(0, len(self.val_records), mbs):
                batch = collate(self.val_records[start:start + mbs], self.ids.pad).to(self.device)
                x_t, masked = mask_tokens(batch.input_ids, rate, batch.maskable, mask_token_id=self.ids.mask,
                                          generator=generator)
                with autocast:
                    logits, _ = model(x_t, batch.attention_mask)
                n = int(masked.sum())
                totals[0] += float(diffusion_loss(logits, batch.input_ids, masked, t=rate)) * n
                totals[1] += n
        model.train()
        totals = totals.to(self.device)
        if dist.is_initialized():
            dist.all_reduce(totals)
        return float(totals[0] / totals[1].clamp(min=1))

    # -- evaluation hooks: the engine trains; the evaluation layer (`trial.TrialLoop`) fills these in -----------
    def validation_accuracy(self) -> float:
        """The task metric on a validation subset (`eval.metric: accuracy`); called on every rank (the
        evaluation layer shards the generation over them)."""
        raise ConfigError("eval.metric=accuracy: this loop has no generation evaluation (use trial.TrialLoop)")

    def report_figures(self) -> dict[str, float]:
        """Figures the evaluation layer adds beside val_accuracy in a report (e.g. decoding cost); none here."""
        return {}

    def final_evaluation(self) -> dict[str, float]:
        """End-of-run figures (generation, probes); called on every rank. The engine alone has none."""
        return {}

    def forgetting_probe(self) -> dict[str, float]:
        """`eval.report_probe_chunks`: the forgetting objective at this report (wikitext_delta); every rank."""
        raise ConfigError("eval.report_probe_chunks: this loop has no forgetting probe (use trial.TrialLoop)")

    def _final_evaluation_once(self) -> dict[str, float]:
        # A run restored at its final checkpoint has usually logged its final evaluation already (rank 0's sink
        # knows; every rank follows it, since the evaluation is a collective).
        if self._rank0_value(lambda: float(self.sink.has("final_val_" + get_task(self.cfg.task).primary_metric))):
            return {}
        return self.final_evaluation()

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """DeepSpeed engine state (weights, optimizer shards, scheduler) + EMA + step, into `directory`.
        LoRA: the frozen base is left out (rebuilt from model.name / model.init on restore): the checkpoint
        holds the adapters, the predictor, their optimizer state and the EMA adapters."""
        self.engine.save_checkpoint(directory, tag=DS_TAG, save_latest=False,
                                    client_state={"step": self.step, "seconds": self.seconds,
                                                  "checkpoint_bytes": self.checkpoint_bytes},
                                    exclude_frozen_parameters=self.lora)
        if self.rank == 0:
            if self.ema is not None:
                torch.save(self.ema.state_dict(), os.path.join(directory, "ema.pt"))
            Path(directory, "raydllm.json").write_text(json.dumps(
                {"step": self.step, "data_position": self.step, "seconds": self.seconds,
                 "checkpoint_bytes": self.checkpoint_bytes, "config": self.cfg.to_dict()}, indent=1))

    def export(self, directory: str) -> None:
        """Rank 0: the backbone as a weights-only `save_pretrained` folder in the training dtype (bf16 under
        bf16 training, float32 on CPU runs), with its tokenizer and modeling code, at <directory>/export;
        with train.export_ema the EMA weights beside it (export/ema/model.safetensors). `raydllm eval` loads
        this instead of the DeepSpeed files, and never reads optimizer state."""
        if self.rank != 0:
            return
        if self.cfg.train.zero_stage >= 3:
            log.warning("train.zero_stage=3 shards the weights: no export/ written (eval reads the engine files)")
            return
        from safetensors.torch import save_file

        folder = Path(directory, EXPORT_DIR)
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        model = self.engine.module.backbone.model
        if getattr(model, "_auto_class", None) is None:
            # The embedded model: register its classes so the folder carries model.py and an auto_map, and
            # loads through AutoModel(trust_remote_code) like a hub model. Remote-code models already are.
            type(model.config).register_for_auto_class()
            type(model).register_for_auto_class("AutoModel")
        state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        if self.cfg.train.export_ema and self.ema is not None:
            (folder / EXPORT_EMA).parent.mkdir(parents=True, exist_ok=True)
            ema = {k.removeprefix("model."): v.detach().to(dtype).contiguous()
                   for k, v in self.ema.state_dict().items()}
            save_file(_untied(ema), str(folder / EXPORT_EMA))

    def restore(self, directory: str) -> None:
        # LoRA: the checkpoint has no base weights; this loop built the base already.
        _, client_state = self.engine.load_checkpoint(directory, tag=DS_TAG, load_optimizer_states=True,
                                                      load_lr_scheduler_states=True, load_module_strict=not self.lora)
        self.step = int(client_state["step"])
        self.seconds |= client_state.get("seconds", {"train": client_state.get("train_seconds", 0.0)})
        self.checkpoint_bytes = int(client_state.get("checkpoint_bytes", 0))
        if self.ema is not None:
            # Through host memory: the offloaded EMA's masters live there, and a resident one is copied
            # into place without a second full copy on the GPU.
            self.ema.load_state_dict(torch.load(os.path.join(directory, "ema.pt"), map_location="cpu"))

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, scheduled_at: float | None = None, entered_at: float | None = None) -> None:
        """Train to the end, reporting every eval_every steps. `scheduled_at` (epoch seconds): when the
        trial was scheduled; the time from then to the first step is logged as time/startup_s, split at
        `entered_at` (when this worker's loop function began) into time/startup/ray_s (Ray Train's controller
        and worker processes, their imports, the process group) and time/startup/init_s (model, data,
        DeepSpeed engine, checkpoint restore)."""
        import ray
        import ray.train

        self.sink.tag("raydllm.node_id", ray.get_runtime_context().get_node_id())  # where rank 0 trains
        # The accelerator the trial trained on (the driver's hardware tags describe the head, often CPU-only).
        self.sink.tag("raydllm.device", torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                      else "cpu")
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                self.restore(directory)
            log.info("rank %d resumed at step %d", self.rank, self.step)
            self.sink.tag("raydllm.resumed_from_step", str(self.step))
        window: list[dict[str, float]] = []
        step_seconds = 0.0
        if self.step >= self.total_steps:
            # Restored from the final checkpoint (killed after it was saved, before the run was marked done):
            # report the final state again so Tune and the driver see this run's last metrics.
            self.report(window, step_seconds)
        if scheduled_at is not None and self.step < self.total_steps and not self.sink.has("time/startup_s"):
            # Ray worker start, DeepSpeed init, model and data load: what a user pays before any training.
            # First attempt only: a restarted worker group still carries the trial's original schedule time.
            now = time.time()
            startup = {"time/startup_s": now - scheduled_at}
            if entered_at is not None:
                startup |= {"time/startup/ray_s": entered_at - scheduled_at, "time/startup/init_s": now - entered_at}
            self.sink.add(self.step, startup)
        while self.step < self.total_steps:
            start = time.perf_counter()
            metrics = self.train_step()
            elapsed = time.perf_counter() - start
            step_seconds += elapsed
            self.seconds["train"] += elapsed
            metrics["tokens_per_s"] = metrics["tokens"] * self.world / elapsed
            window.append(metrics)
            self.sink.add(self.step, {k: v for k, v in metrics.items() if k != "tokens"})
            if not math.isfinite(metrics["loss_total"]):
                raise FloatingPointError(f"non-finite loss {metrics['loss_total']} at step {self.step}")
            if self.step % self.cfg.train.eval_every == 0 or self.step == self.total_steps:
                self.report(window, step_seconds)
                window, step_seconds = [], 0.0

    def report(self, window: list[dict[str, float]], step_seconds: float) -> None:
        import ray.train

        eval_start = time.perf_counter()
        summary = _mean_across_ranks(window, self.device)
        summary["val_loss_diff"] = self.validation_loss()
        summary["step"] = self.step
        summary |= self.param_counts
        if window:
            summary["tokens_per_s"] = sum(m["tokens"] for m in window) * self.world / max(step_seconds, 1e-9)
        summary.pop("tokens", None)
        if self.cfg.eval.metric == "accuracy":
            summary["val_accuracy"] = self._every_rank_value(self.validation_accuracy)
            summary |= self._every_rank_dict(self.report_figures)
        if self.cfg.eval.report_probe_chunks:
            probe_start = time.perf_counter()
            summary |= self._every_rank_dict(self.forgetting_probe)
            self.seconds["forgetting_probe"] = (self.seconds.get("forgetting_probe", 0.0)
                                                + time.perf_counter() - probe_start)
        if self.step >= self.total_steps and self.cfg.eval.final:
            summary |= self._every_rank_dict(self._final_evaluation_once)
        self.seconds["eval"] += time.perf_counter() - eval_start
        # Rank 0's clock for every phase, so each worker reports the same figures.
        summary |= self._rank0_dict(lambda: {f"time/{phase}_s": value for phase, value in self.seconds.items()})
        self.sink.add(self.step, {k: v for k, v in summary.items() if k != "time/checkpoint_s"
                                  and k.startswith(("val_", "final", "probe/", "time/", "params/", "wikitext_",
                                                    "decode_"))
                                  and isinstance(v, float)})
        if self.checkpoint_due():
            checkpoint_start = time.perf_counter()
            self._checkpoint_and_report(summary)
            self.seconds["checkpoint"] += time.perf_counter() - checkpoint_start
            self.sink.add(self.step, {"time/checkpoint_s": self._rank0_value(lambda: self.seconds["checkpoint"]),
                                      "checkpoint/bytes": float(self.checkpoint_bytes)})
        else:
            ray.train.report(summary)
        # After the checkpoint is persisted. Steps past the last checkpoint are re-done with the same values on
        # a resume and skipped then, so the curve keeps every step once.
        self.sink.flush()


    def checkpoint_due(self) -> bool:
        """At the end; at the first report at or after each of train.checkpoint_steps (where ASHA decides,
        so a resumed trial loses at most one rung of work) and every train.checkpoint_every steps; at every
        report when neither is set."""
        train = self.cfg.train
        if self.step >= self.total_steps:
            return True
        if train.checkpoint_steps is None and train.checkpoint_every is None:
            return True
        at_rung = any(self.step - train.eval_every < s <= self.step for s in train.checkpoint_steps or ())
        return at_rung or bool(train.checkpoint_every and self.step % train.checkpoint_every == 0)

    def _checkpoint_and_report(self, summary: dict) -> None:
        """Save into a staging folder (the node's NVMe where there is one), count the bytes every rank wrote,
        and report with the checkpoint: synchronously (the folder is removed after the upload), or
        asynchronously (Ray uploads while training goes on, and deletes the staged folder after)."""
        import ray.train

        directory = tempfile.mkdtemp(prefix="raydllm-ckpt-", dir=staging_dir())
        try:
            self.save(directory)  # carries the seconds so far; this checkpoint's own cost is counted next
            if self.step >= self.total_steps:
                try:
                    self.export(directory)
                except Exception as exc:  # noqa: BLE001 - e.g. remote code save_pretrained cannot write
                    # The trial's result must not hang on it: eval falls back to the engine's model states.
                    log.warning("export/ not written (%s: %s); `raydllm eval` will read the DeepSpeed model "
                                "states instead", type(exc).__name__, exc)
                    shutil.rmtree(Path(directory, EXPORT_DIR), ignore_errors=True)
            written = torch.tensor([folder_bytes(directory)], dtype=torch.float64, device=self.device)
            if dist.is_initialized() and self.world > 1:
                dist.all_reduce(written)
            self.checkpoint_bytes += int(written.item())
            if self.rank == 0:  # the tally in raydllm.json includes this checkpoint
                meta = Path(directory, "raydllm.json")
                meta.write_text(json.dumps(json.loads(meta.read_text()) | {"checkpoint_bytes": self.checkpoint_bytes},
                                           indent=1))
            summary["checkpoint/bytes"] = float(self.checkpoint_bytes)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
            if self.cfg.train.checkpoint_upload == "async":
                from ray.train import CheckpointUploadMode

                ray.train.report(summary, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                                 delete_local_checkpoint_after_upload=True)
                directory = None  # Ray's now
            else:
                ray.train.report(summary, checkpoint=checkpoint)
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)

    def _rank0_value(self, compute) -> float:
        """Computed on rank 0 and shared, so every worker reports the same number."""
        value = torch.tensor([compute() if self.rank == 0 else 0.0], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and self.world > 1:
            dist.broadcast(value, src=0)
        return float(value[0])

    def _every_rank_value(self, compute) -> float:
        """Computed by every rank together (a sharded evaluation), rank 0's figure shared, so every worker
        reports the same number to the bit."""
        value = torch.tensor([compute()], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and self.world > 1:
            dist.broadcast(value, src=0)
        return float(value[0])

    def _every_rank_dict(self, compute) -> dict[str, float]:
        holder = [compute()]
        if dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def _rank0_dict(self, compute) -> dict[str, float]:
        holder = [compute() if self.rank == 0 else None]
        if dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(holder, src=0)
        return holder[0]


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied embeddings): give each its own."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def _predictor_heads(width: int) -> int:
    return next(h for h in (8, 4, 2, 1) if width % h == 0 and width // h >= 16) if width >= 16 else 1


def _mean_across_ranks(window: list[dict[str, float]], device: torch.device) -> dict[str, float]:
    keys = ["loss_total", "loss_diff", "loss_jepa", "lr"]
    values = torch.zeros(len(keys) * 2, dtype=torch.float64)
    for m in window:
        for i, key in enumerate(keys):
            if key in m:
                values[2 * i] += m[key]
                values[2 * i + 1] += 1
    values = values.to(device)
    if dist.is_initialized():
        dist.all_reduce(values)
    out = {}
    for i, key in enumerate(keys):
        if values[2 * i + 1] > 0:
            out[key] = float(values[2 * i] / values[2 * i + 1])
    return out


