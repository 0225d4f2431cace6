"""Bench layer: what the step benchmark measures with: a one-rank process group, and forward hooks and
timestamps that split one optimizer step into its parts (which partition the step's wall time).
"""
from __future__ import annotations

import os
import socket
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


PARTS = ("data", "online_forward", "target_forward", "predictor_jepa_loss", "backward", "optimizer_step",
         "ema_update", "other")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def one_rank_group(device: torch.device):
    """A one-process group (gloo on CPU, nccl on CUDA) unless one exists; torn down if created here."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _minor_faults() -> int:
    """Minor page faults of this process so far (fresh pages the kernel had to map and zero); 0 where
    getrusage is unavailable. On CPU they show allocations that glibc handed back to the OS and takes again."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timeline:
    """Charges wall time to the current part; `enter(part)` closes the running one and opens `part`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.part: str | None = None
        self.t = 0.0
        self.faults = 0
        self.totals: dict[str, float] = defaultdict(float)
        self.fault_totals: dict[str, int] = defaultdict(int)
        self.active = False

    def enter(self, part: str | None) -> None:
        if not self.active:
            return
        sync(self.device)
        now = time.perf_counter()
        faults = _minor_faults()
        if self.part is not None:
            self.totals[self.part] += now - self.t
            self.fault_totals[self.part] += faults - self.faults
        self.part, self.t, self.faults = part, now, faults


class StepInstrument:
    """Hooks that split `train_step` into parts; inert unless the timeline is active."""

    def __init__(self, loop, ema):
        self.loop = loop
        self.timeline = _Timeline(loop.device)
        self.positions = 0  # padded positions the online backbone processed (for the FLOP model)
        tl = self.timeline
        backbone = loop.engine.module.backbone

        def count(_module, args, kwargs):
            if getattr(ema, "active", False):  # LoRA: the target forward runs the online modules (EmaAdapters)
                return
            ids = args[0] if args else kwargs.get("input_ids")
            if isinstance(ids, torch.Tensor):
                self.positions += int(ids.numel())
            tl.enter("online_forward")

        self.handles = [
            backbone.register_forward_pre_hook(count, with_kwargs=True),
            ema.module.register_forward_pre_hook(lambda *_: tl.enter("target_forward")),
            loop.engine.module.predictor.register_forward_pre_hook(lambda *_: tl.enter("predictor_jepa_loss")),
        ]
        self.engine = loop.engine
        self.ema = ema
        self._patch(loop.engine, "backward", "backward")
        self._patch(loop.engine, "step", "optimizer_step")
        self._patch(ema, "update", "ema_update")

    def _patch(self, obj, name: str, part: str) -> None:
        original = getattr(obj, name)
        tl = self.timeline

        def wrapped(*args, **kwargs):
            tl.enter(part)
            try:
                return original(*args, **kwargs)
            finally:
                tl.enter("other")

        setattr(obj, name, wrapped)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for obj, name in ((self.engine, "backward"), (self.engine, "step"), (self.ema, "update")):
            obj.__dict__.pop(name, None)

    def timed_step(self) -> tuple[float, dict[str, float], dict[str, int]]:
        tl = self.timeline
        tl.totals = defaultdict(float)
        tl.fault_totals = defaultdict(int)
        tl.active = True
        tl.part = None
        tl.enter("data")
        start = tl.t
        try:
            self.loop.train_step()
        finally:
            tl.enter(None)
            tl.active = False
        return tl.t - start, dict(tl.totals), dict(tl.fault_totals)
