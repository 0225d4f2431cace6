"""Bench layer: peak memory of a block of code, for `raydllm bench sampler`.

On a CUDA device: ``torch.cuda.max_memory_allocated`` after a reset of the peak statistics, minus what was
allocated at the start (tensors the block allocates on the GPU, caching-allocator slack excluded). On CPU: the
process's resident set size, read from /proc/self/statm every 2 ms by a background thread, peak minus the
value at the start (tracemalloc would not see torch's tensors: they are not allocated by Python's allocator).
The CPU figure is a sampled RSS delta: it includes allocator reuse effects and can miss a spike shorter than
the sampling interval."""
from __future__ import annotations

import os
import threading
from typing import Optional

import torch

__all__ = ["PeakMemory"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``; then ``peak.bytes`` (peak above the start) and ``peak.method``."""

    def __init__(self, device: torch.device | str, interval_s: float = 0.002):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.bytes = 0
        self.method = ("torch.cuda.max_memory_allocated" if self.device.type == "cuda"
                       else "sampled RSS delta (/proc/self/statm)")
        self._stop: Optional[threading.Event] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._peak = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.bytes = max(self._peak, _rss_bytes()) - self._start
