"""Engine layer: a worker's checkpoints: when one is due, what it saves, how a run resumes from it, the final export.

Every rank saves its part of the DeepSpeed engine (weights, optimizer shards, scheduler); rank 0 adds the EMA,
the step and raydllm.json (layout in `checkpoints`). The folder is staged on the node (its NVMe where there is
one) and handed to `ray.train.report` with the report, synchronously or asynchronously. The run's progress
(step, seconds by phase, checkpoint bytes) stays on `worker.WorkerLoop`; a `Checkpointer` is given it per call.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from raydllm.engine.checkpoint_policy import checkpoint_due  # noqa: F401 - the worker's import of it
from raydllm.engine.checkpoints import DS_TAG, EXPORT_DIR, EXPORT_EMA, folder_bytes, staging_dir
from raydllm.core.config import Config

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves, restores and exports one worker's DeepSpeed engine (+ the EMA on rank 0)."""

    def __init__(self, engine, tokenizer, *, rank: int, world: int, device: torch.device, lora: bool, bf16: bool):
        self.engine, self.tokenizer = engine, tokenizer
        self.rank, self.world, self.device, self.lora, self.bf16 = rank, world, device, lora, bf16

    def save(self, directory: str, *, cfg: Config, ema, step: int, seconds: dict[str, float],
             checkpoint_bytes: int) -> None:
        """DeepSpeed engine state (weights, optimizer shards, scheduler) + EMA + step, into `directory`.
        LoRA: the frozen base is left out (rebuilt from model.name / model.init on restore): the checkpoint
        holds the adapters, the predictor, their optimizer state and the EMA adapters."""
        self.engine.save_checkpoint(directory, tag=DS_TAG, save_latest=False,
                                    client_state={"step": step, "seconds": seconds,
                                                  "checkpoint_bytes": checkpoint_bytes},
                                    exclude_frozen_parameters=self.lora)
        if self.rank == 0:
            if ema is not None:
                torch.save(ema.state_dict(), os.path.join(directory, "ema.pt"))
            Path(directory, "raydllm.json").write_text(json.dumps(
                {"step": step, "data_position": step, "seconds": seconds,
                 "checkpoint_bytes": checkpoint_bytes, "config": cfg.to_dict()}, indent=1))

    def export(self, directory: str, *, cfg: Config, ema) -> None:
        """Rank 0: the backbone as a weights-only `save_pretrained` folder in the training dtype (bf16 under
        bf16 training, float32 on CPU runs), with its tokenizer and modeling code, at <directory>/export;
        with train.export_ema the EMA weights beside it (export/ema/model.safetensors). `raydllm eval` loads
        this instead of the DeepSpeed files, and never reads optimizer state."""
        if self.rank != 0:
            return
        if cfg.train.zero_stage >= 3:
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
        if cfg.train.export_ema and ema is not None:
            (folder / EXPORT_EMA).parent.mkdir(parents=True, exist_ok=True)
            ema_state = {k.removeprefix("model."): v.detach().to(dtype).contiguous()
                         for k, v in ema.state_dict().items()}
            save_file(_untied(ema_state), str(folder / EXPORT_EMA))

    def restore(self, directory: str, *, ema) -> dict:
        """Loads the engine (and the EMA) from `directory`; returns the saved client state ({"step", ...})."""
        # LoRA: the checkpoint has no base weights; this loop built the base already.
        _, client_state = self.engine.load_checkpoint(directory, tag=DS_TAG, load_optimizer_states=True,
                                                      load_lr_scheduler_states=True, load_module_strict=not self.lora)
        if ema is not None:
            # Through host memory: the offloaded EMA's masters live there, and a resident one is copied
            # into place without a second full copy on the GPU.
            ema.load_state_dict(torch.load(os.path.join(directory, "ema.pt"), map_location="cpu"))
        return client_state

    def save_and_report(self, summary: dict, *, save: Callable[[str], None], export: Callable[[str], None] | None,
                        checkpoint_bytes: int, upload: str) -> int:
        """Save (`save`, then `export` at the end of the run) into a staging folder (the node's NVMe where there
        is one), count the bytes every rank wrote, and report with the checkpoint: synchronously (the folder is
        removed after the upload), or asynchronously (`upload: async`: Ray uploads while training goes on, and
        deletes the staged folder after). Returns the run's checkpoint bytes including this checkpoint."""
        import ray.train

        directory = tempfile.mkdtemp(prefix="raydllm-ckpt-", dir=staging_dir())
        try:
            save(directory)  # carries the seconds so far; this checkpoint's own cost is counted next
            if export is not None:
                try:
                    export(directory)
                except Exception as exc:  # noqa: BLE001 - e.g. remote code save_pretrained cannot write
                    # The trial's result must not hang on it: eval falls back to the engine's model states.
                    log.warning("export/ not written (%s: %s); `raydllm eval` will read the DeepSpeed model "
                                "states instead", type(exc).__name__, exc)
                    shutil.rmtree(Path(directory, EXPORT_DIR), ignore_errors=True)
            written = torch.tensor([folder_bytes(directory)], dtype=torch.float64, device=self.device)
            if dist.is_initialized() and self.world > 1:
                dist.all_reduce(written)
            checkpoint_bytes += int(written.item())
            if self.rank == 0:  # the tally in raydllm.json includes this checkpoint
                meta = Path(directory, "raydllm.json")
                meta.write_text(json.dumps(json.loads(meta.read_text()) | {"checkpoint_bytes": checkpoint_bytes},
                                           indent=1))
            summary["checkpoint/bytes"] = float(checkpoint_bytes)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
            if upload == "async":
                from ray.train import CheckpointUploadMode

                ray.train.report(summary, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                                 delete_local_checkpoint_after_upload=True)
                directory = None  # Ray's now
            else:
                ray.train.report(summary, checkpoint=checkpoint)
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
        return checkpoint_bytes


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied embeddings): give each its own."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out
