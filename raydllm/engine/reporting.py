"""Engine layer: what a worker reports and to whom: per-step curves to MLflow (rank 0), the same figures on every rank.

`ray.train.report` is a barrier all workers call with the same metrics, so the figures only rank 0 computes
(task accuracy, probes, its clock) are shared from it (`RankShare`); the training losses are averaged over ranks.
Rank 0's `MetricsSink` writes the step-by-step curves to MLflow after each persisted checkpoint, so a run resumed
from that checkpoint continues one curve with no repeated steps.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

# The training losses a report averages over its window of steps and over ranks.
WINDOW_KEYS = ("loss_total", "loss_diff", "loss_jepa", "lr")
# The report's figures that go to MLflow beside the per-step curves (time/checkpoint_s is written once the
# checkpoint it times is done).
SINK_PREFIXES = ("val_", "final", "probe/", "time/", "params/", "wikitext_", "decode_")


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


class RankShare:
    """Figures every rank reports alike: computed on rank 0 and broadcast, or averaged over ranks."""

    def __init__(self, *, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device

    def value(self, compute) -> float:
        """Computed on rank 0 and shared, so every worker reports the same number."""
        value = torch.tensor([compute() if self.rank == 0 else 0.0], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and self.world > 1:
            dist.broadcast(value, src=0)
        return float(value[0])

    def dict(self, compute) -> dict[str, float]:
        holder = [compute() if self.rank == 0 else None]
        if dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def every_rank_value(self, compute) -> float:
        """Computed by every rank together (a sharded evaluation), rank 0's figure shared, so every worker
        reports the same number to the bit."""
        value = torch.tensor([compute()], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and self.world > 1:
            dist.broadcast(value, src=0)
        return float(value[0])

    def every_rank_dict(self, compute) -> dict[str, float]:
        holder = [compute()]
        if dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def window_summary(self, window: list[dict[str, float]], step_seconds: float) -> dict[str, float]:
        """The steps since the last report: mean losses and lr over them and over ranks, and the tokens per
        second of all ranks over their training time."""
        summary = _mean_across_ranks(window, self.device)
        if window:
            summary["tokens_per_s"] = sum(m["tokens"] for m in window) * self.world / max(step_seconds, 1e-9)
        return summary


def startup_metrics(scheduled_at: float, entered_at: float | None) -> dict[str, float]:
    """Ray worker start, DeepSpeed init, model and data load: what a user pays before any training, from
    `scheduled_at` to now, split at `entered_at` when known."""
    now = time.time()
    startup = {"time/startup_s": now - scheduled_at}
    if entered_at is not None:
        startup |= {"time/startup/ray_s": entered_at - scheduled_at, "time/startup/init_s": now - entered_at}
    return startup


def sink_figures(summary: dict) -> dict[str, float]:
    """The report's figures MLflow gets at the report's step (the per-step curves are logged per step)."""
    return {k: v for k, v in summary.items() if k != "time/checkpoint_s" and k.startswith(SINK_PREFIXES)
            and isinstance(v, float)}


def _mean_across_ranks(window: list[dict[str, float]], device: torch.device) -> dict[str, float]:
    keys = list(WINDOW_KEYS)
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
