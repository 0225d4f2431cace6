"""Engine layer: one optimizer step of a worker, and the DeepSpeed engine, EMA target and L2 anchor it runs on.

Per optimizer step: the online model (backbone + predictor, inside DeepSpeed) runs once with grad on the
context view; the EMA target runs once under no_grad on the target view (lambda > 0 only); one backward;
the optimizer step; the EMA update. What changes here is the training method; when a step is checkpointed
or reported is `checkpointing` and `reporting`, and `worker.WorkerLoop` composes the three.
"""
from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from raydllm.engine.backbone import Backbone
from raydllm.core.config import Config
from raydllm.data.sft import collate, micro_batch_indices
from raydllm.core.objective import EmaAdapters, EmaTarget, Losses, Predictor, attach_l2_anchor, dllm_jepa_losses

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


def _predictor_heads(width: int) -> int:
    return next(h for h in (8, 4, 2, 1) if width % h == 0 and width // h >= 16) if width >= 16 else 1


@dataclass
class TrainingParts:
    """What `build_training` hands the worker loop: the DeepSpeed engine around the online model, its lr
    scheduler, the EMA target (None at lambda = 0), the L2 anchor (None unless loss.anchor=l2) and the
    parameter counts reported with every result."""

    engine: object
    scheduler: object
    ema: EmaTarget | EmaAdapters | None
    anchor: object | None
    param_counts: dict[str, float]


def build_training(cfg: Config, backbone: Backbone, *, device: torch.device, bf16: bool,
                   total_steps: int) -> TrainingParts:
    # The baseline never uses the predictor: depth 0 keeps its parameters out of ZeRO's optimizer state.
    depth = cfg.jepa.k if cfg.jepa.lam > 0 else 0
    predictor = Predictor(backbone.hidden_size, depth, n_heads=_predictor_heads(backbone.hidden_size))
    module = OnlineModel(backbone, predictor)
    # lambda = 0 is the baseline: no EMA copy exists and no target forward ever runs.
    # jepa.ema_device=cpu: the EMA master stays in host memory, streamed in for the target forward.
    # LoRA: the base is frozen, so the target is that same base with an EMA of the adapters only.
    lora = backbone.is_lora
    ema_class = EmaAdapters if lora else EmaTarget
    ema = (ema_class(backbone, cfg.jepa.ema_decay, dtype=getattr(torch, cfg.jepa.ema_dtype),
                     device=device, offload=cfg.jepa.ema_device == "cpu")
           if cfg.jepa.lam > 0 else None)
    trainable, total = backbone.parameter_counts()
    n_predictor = sum(p.numel() for p in predictor.parameters())
    param_counts = {"params/trainable": float(trainable + n_predictor),
                    "params/total": float(total + n_predictor)}
    log.info("parameters: %d trainable of %d (LoRA %s)", trainable + n_predictor, total + n_predictor, lora)

    import deepspeed

    optimizer = torch.optim.AdamW(_param_groups(module, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=tuple(cfg.train.adam_betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, cfg.train.warmup_ratio))
    # from_pretrained hands models back in eval mode, where transformers-style checkpointing is off.
    module.train()
    engine, _, _, scheduler = deepspeed.initialize(
        model=module.to(device), optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, bf16))
    # After the engine: theta_base is cloned from the weights the optimizer updates, on their device and
    # in their dtype (bf16 on the GPU under bf16), so no second copy lives in host memory.
    anchor = (attach_l2_anchor(list(engine.module.backbone.parameters()), cfg.loss.l2_lambda,
                               scale=1.0 / cfg.train.grad_accum) if cfg.loss.anchor == "l2" else None)
    return TrainingParts(engine=engine, scheduler=scheduler, ema=ema, anchor=anchor, param_counts=param_counts)


def target_encoder(ema, device: torch.device, bf16: bool):
    """The EMA target's forward (under bf16 autocast when training in bf16), or None without an EMA."""
    if ema is None:
        return None
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
                else nullcontext())

    def encode(ids, attention_mask):
        with autocast:
            return ema.module(ids, attention_mask)

    return encode


def optimizer_step(engine, scheduler, ema, target, cfg: Config, records: list, *, pad_id: int,
                   device: torch.device, step: int, rank: int, world: int) -> dict[str, float]:
    """Optimizer step number `step` (0-based) over cfg.train.grad_accum micro-batches of `records`, then the EMA
    update. Returns the step's mean losses, its token count and the learning rate it ran at."""
    sums = {"loss_total": 0.0, "loss_diff": 0.0, "loss_jepa": 0.0}
    jepa_runs = tokens = 0
    # JEPA loss dropout: the whole step's target branch is on or off, the same decision on all ranks.
    run_target = cfg.jepa.target_prob >= 1.0 or (
        torch.rand((), generator=torch.Generator().manual_seed(cfg.train.seed + step)).item()
        < cfg.jepa.target_prob)
    for micro in range(cfg.train.grad_accum):
        # Masks of (step, micro) depend only on (seed, step, micro, rank): a resumed run draws the same views,
        # and the two arms of a comparison on one seed the same context views (a micro-batch's target view is
        # drawn after its context view, so it cannot shift the next micro-batch's draws).
        generator = torch.Generator().manual_seed(cfg.train.seed * 7919 + step * 104_729
                                                  + micro * 15_485_863 + rank)
        idx = micro_batch_indices(len(records), step=step, micro=micro, rank=rank,
                                  world=world, micro_batch_size=cfg.train.micro_batch_size,
                                  grad_accum=cfg.train.grad_accum, seed=cfg.train.seed)
        batch = collate([records[i] for i in idx], pad_id).to(device)
        losses: Losses = engine(batch.input_ids, batch.attention_mask, batch.maskable, target=target,
                                cfg=cfg, generator=generator, run_target=run_target)
        engine.backward(losses.total)
        engine.step()
        sums["loss_total"] += float(losses.total.detach()) / cfg.train.grad_accum
        sums["loss_diff"] += float(losses.diff) / cfg.train.grad_accum
        if losses.jepa is not None:
            sums["loss_jepa"] += float(losses.jepa) / cfg.train.grad_accum
            jepa_runs += 1
        tokens += batch.tokens
    if ema is not None:
        ema.update(engine.module.backbone.parameters())
    out = {"loss_total": sums["loss_total"], "loss_diff": sums["loss_diff"], "tokens": float(tokens),
           "lr": scheduler.get_last_lr()[0]}
    if jepa_runs:
        out["loss_jepa"] = sums["loss_jepa"]
    return out
