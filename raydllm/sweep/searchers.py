"""Sweep layer: Optuna samplers as Ray Tune's OptunaSearch must hold them.

Tune saves a sweep's search algorithm with the standard `pickle` (OptunaSearch.save, at every experiment
checkpoint, so that a resumed sweep continues the same search): every object in it must pickle by reference to
an importable class and hold nothing unpicklable.
"""
from __future__ import annotations

import threading

import optuna


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II without its thread lock in the pickled state (Optuna 5 holds one, which cannot be
    pickled); a restored sampler gets a new lock."""

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_thread_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()
