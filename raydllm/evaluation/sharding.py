"""Evaluation layer: generation and probe passes sharded over a trial's workers, gathered back in item order.

Every evaluation pass cuts its items into the batches one rank would run (same order, same batch size, so the
same tensors reach the model), hands batch k to rank k mod world, and all-gathers the per-batch results, so
every rank ends up with what a one-rank pass returns, item by item. Nothing is re-batched: a row's padding, and
with it its tokens, do not depend on how many workers the trial has. The RNG streams a pass draws from (masks of
the probes) are drawn on every rank for every batch, in batch order, and only the forward is skipped, so masks
match too. The collective is `torch.distributed`'s object all-gather (gloo on CPU, NCCL on GPUs), in the process
group Ray Train / DeepSpeed set up for the trial.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """This process's share of an evaluation: rank `rank` of `world` takes batches rank, rank + world, ..."""

    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"Shard: rank {self.rank} is not in a world of {self.world}")

    @classmethod
    def current(cls) -> "Shard":
        """The default process group's shard (one rank when torch.distributed is not initialised)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank

    def merge(self, mine: dict[int, Any]) -> dict[int, Any]:
        """{batch index: result} of this rank -> the union of every rank's (one collective; every rank gets it)."""
        if self.world == 1:
            return dict(mine)
        parts: list[dict[int, Any] | None] = [None] * self.world
        dist.all_gather_object(parts, mine)
        merged: dict[int, Any] = {}
        for part in parts:
            merged.update(part or {})
        return merged


ONE_RANK = Shard()


def map_batches(batches: Sequence[Any], compute: Callable[[Any], Any], shard: Shard | None = None,
                skip: Callable[[Any], None] | None = None) -> list[Any]:
    """[compute(batch) for batch in batches], each batch computed on the rank that owns it and gathered back in
    batch order. `skip(batch)` runs instead of `compute` on the other ranks (e.g. to draw the masks the batch
    would have drawn, so the random streams of later batches stay where one rank would have them)."""
    shard = shard or ONE_RANK
    mine = {}
    for index, batch in enumerate(batches):
        if shard.owns(index):
            mine[index] = compute(batch)
        elif skip is not None:
            skip(batch)
    merged = shard.merge(mine)
    return [merged[index] for index in range(len(batches))]
