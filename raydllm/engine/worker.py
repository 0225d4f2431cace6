"""Engine layer: the training loop each Ray Train worker runs, around one DeepSpeed engine.

Per optimizer step (`training_step`): the online model (backbone + predictor, inside DeepSpeed) runs once with
grad on the context view; the EMA target runs once under no_grad on the target view (lambda > 0 only); one
backward; the optimizer step; the EMA update. Every `eval_every` steps all workers compute the validation
diffusion loss, save a checkpoint (DeepSpeed engine + EMA + step; `checkpointing`) and call `ray.train.report`
together (it is a barrier). Rank 0 writes the step-by-step curves to MLflow at the same moment (`reporting`), so
a run resumed from that checkpoint continues one curve with no repeated steps. `WorkerLoop` holds the run's
progress (step, seconds by phase, checkpoint bytes) and composes the three.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from raydllm.engine.backbone import load_backbone
from raydllm.engine.checkpointing import Checkpointer, checkpoint_due
from raydllm.engine.reporting import MetricsSink, RankShare, sink_figures, startup_metrics
from raydllm.engine.training_step import build_training, optimizer_step, target_encoder, use_bf16
from raydllm.core.config import Config, ConfigError
from raydllm.data.sft import collate, load_examples, steps_for, tokenize_sft
from raydllm.core.objective import diffusion_loss
from raydllm.core.masking import mask_tokens
from raydllm.data.tasks import get_task

log = logging.getLogger(__name__)


class WorkerLoop:
    def __init__(self, cfg: Config, *, rank: int, world: int, device: torch.device, tracking: dict | None = None):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.sink = MetricsSink(tracking if rank == 0 else None)
        self.share = RankShare(rank=rank, world=world, device=device)
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

        self.lora = backbone.is_lora
        parts = build_training(cfg, backbone, device=device, bf16=self.bf16, total_steps=self.total_steps)
        self.engine, self.scheduler, self.ema, self.anchor = parts.engine, parts.scheduler, parts.ema, parts.anchor
        self.param_counts = parts.param_counts
        self.checkpoints = Checkpointer(self.engine, tokenizer, rank=rank, world=world, device=device,
                                        lora=self.lora, bf16=self.bf16)
        self.step = 0
        # Worker time by phase (training steps, evaluation, checkpointing), summed over the run's attempts and
        # kept in checkpoints: what the sweep summary's time accounting reads.
        self.seconds = {"train": 0.0, "eval": 0.0, "checkpoint": 0.0}
        self.checkpoint_bytes = 0  # written by all ranks over the run's checkpoints (kept in them too)
        self.target_rng = torch.Generator().manual_seed(cfg.train.seed + 7)

    # -- one optimizer step -------------------------------------------------------------------------
    def _target(self):
        return target_encoder(self.ema, self.device, self.bf16)

    def train_step(self) -> dict[str, float]:
        # self.cfg and self.ema are read per step: the step benchmark switches them between its phases.
        metrics = optimizer_step(self.engine, self.scheduler, self.ema, self._target(), self.cfg, self.train_records,
                                 pad_id=self.ids.pad, device=self.device, step=self.step, rank=self.rank,
                                 world=self.world)
        self.step += 1
        return metrics

    # -- validation ---------------------------------------------------------------------------------
    def validation_loss(self) -> float:
        """Masked-token CE on the validation split, averaged over eval.val_mask_rates, fixed seed."""
        return self.validation_losses()[0]

    @torch.no_grad()
    def validation_losses(self) -> tuple[float, dict[int, float] | None]:
        """(validation_loss, on rank 0 each validation sequence's share of it, else None). A sequence's share is
        its CE summed over its masked tokens (every rate) divided by the mean masked-token count per sequence, so
        the shares' mean is the loss itself; keyed by the sequence's index in the validation split. Both arms of a
        sweep mask the same tokens (the seed), so their shares pair item by item, as per-problem correctness does."""
        model = self.engine.module.backbone
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        row_ce = torch.zeros(len(self.val_records), dtype=torch.float64)
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
                ce = torch.nn.functional.cross_entropy(logits[masked].float(), batch.input_ids[masked],
                                                       reduction="none")
                rows = masked.nonzero()[:, 0].cpu() + start
                row_ce.index_add_(0, rows, ce.double().cpu())
        model.train()
        totals = totals.to(self.device)
        # this rank's sequences are the split's rank, rank + world, ... (val[rank::world])
        mine = {self.rank + i * self.world: float(v) for i, v in enumerate(row_ce)}
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(totals)
            gathered = [None] * self.world
            dist.all_gather_object(gathered, mine)
            mine = {k: v for part in gathered for k, v in part.items()}
        loss = float(totals[0] / totals[1].clamp(min=1))
        if self.rank != 0:
            return loss, None
        mean_count = float(totals[1]) / max(1, len(mine))
        return loss, {k: v / max(mean_count, 1.0) for k, v in sorted(mine.items())}

    def report_validation_loss(self) -> float:
        """The validation loss a report logs; the evaluation layer also logs each sequence's share of it."""
        return self.validation_loss()

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

    # -- checkpoints (`checkpointing`) --------------------------------------------------------------
    def save(self, directory: str) -> None:
        """DeepSpeed engine state (weights, optimizer shards, scheduler) + EMA + step, into `directory`.
        LoRA: the frozen base is left out (rebuilt from model.name / model.init on restore): the checkpoint
        holds the adapters, the predictor, their optimizer state and the EMA adapters."""
        self.checkpoints.save(directory, cfg=self.cfg, ema=self.ema, step=self.step, seconds=self.seconds,
                              checkpoint_bytes=self.checkpoint_bytes)

    def export(self, directory: str) -> None:
        """Rank 0: the backbone as a weights-only `save_pretrained` folder at <directory>/export (with
        train.export_ema the EMA weights beside it); see `Checkpointer.export`."""
        self.checkpoints.export(directory, cfg=self.cfg, ema=self.ema)

    def restore(self, directory: str) -> None:
        client_state = self.checkpoints.restore(directory, ema=self.ema)
        self.step = int(client_state["step"])
        self.seconds |= client_state.get("seconds", {"train": client_state.get("train_seconds", 0.0)})
        self.checkpoint_bytes = int(client_state.get("checkpoint_bytes", 0))

    def checkpoint_due(self) -> bool:
        """At the end; at the first report at or after each of train.checkpoint_steps (where ASHA decides,
        so a resumed trial loses at most one rung of work) and every train.checkpoint_every steps; at every
        report when neither is set."""
        return checkpoint_due(self.cfg.train, step=self.step, total_steps=self.total_steps)

    def _checkpoint_and_report(self, summary: dict) -> None:
        """Save (and at the end export) into a staging folder and report with the checkpoint; see
        `Checkpointer.save_and_report`."""
        self.checkpoint_bytes = self.checkpoints.save_and_report(
            summary, save=self.save, export=self.export if self.step >= self.total_steps else None,
            checkpoint_bytes=self.checkpoint_bytes, upload=self.cfg.train.checkpoint_upload)

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
            # First attempt only: a restarted worker group still carries the trial's original schedule time.
            self.sink.add(self.step, startup_metrics(scheduled_at, entered_at))
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

    # -- reporting (`reporting`) --------------------------------------------------------------------
    def report(self, window: list[dict[str, float]], step_seconds: float) -> None:
        import ray.train

        eval_start = time.perf_counter()
        summary = self.share.window_summary(window, step_seconds)
        summary["val_loss_diff"] = self.report_validation_loss()
        summary["step"] = self.step
        summary |= self.param_counts
        summary.pop("tokens", None)
        if self.cfg.eval.metric == "accuracy":
            summary["val_accuracy"] = self.share.every_rank_value(self.validation_accuracy)
            summary |= self.share.every_rank_dict(self.report_figures)
        if self.cfg.eval.report_probe_chunks:
            probe_start = time.perf_counter()
            summary |= self.share.every_rank_dict(self.forgetting_probe)
            self.seconds["forgetting_probe"] = (self.seconds.get("forgetting_probe", 0.0)
                                                + time.perf_counter() - probe_start)
        if self.step >= self.total_steps and self.cfg.eval.final:
            summary |= self.share.every_rank_dict(self._final_evaluation_once)
        self.seconds["eval"] += time.perf_counter() - eval_start
        # Rank 0's clock for every phase, so each worker reports the same figures.
        summary |= self._rank0_dict(lambda: {f"time/{phase}_s": value for phase, value in self.seconds.items()})
        self.sink.add(self.step, sink_figures(summary))
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

    def _rank0_value(self, compute) -> float:
        """Computed on rank 0 and shared, so every worker reports the same number."""
        return self.share.value(compute)

    def _rank0_dict(self, compute) -> dict[str, float]:
        return self.share.dict(compute)
