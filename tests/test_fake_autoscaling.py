"""Autoscaling for real on one machine: a Tune sweep makes Ray's autoscaler add worker nodes, then remove them.

The cluster is Ray's ``fake_multinode`` provider (see tests/fake_cluster.py): a head node with no ``node_slot``
resource and a worker node type with ``{"CPU": 1, "node_slot": 1}``. Every trial asks for one node's worth
(``{"CPU": 1, "node_slot": 1}``), so nothing fits until the autoscaler launches worker nodes; once the sweep is
done and the nodes are idle for ``idle_timeout_minutes`` (0.25 min = 15 s) the autoscaler terminates them.

The asserted node-count sequence is 0 -> >= 2 worker nodes -> 0. `run_sweep` is the one place to swap in
raydllm's real sweep; it receives the cluster address and must leave the driver disconnected when it returns.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import pytest

from fake_cluster import NodeTimeline, fake_autoscaling_cluster

NODE_RESOURCES = {"CPU": 1, "node_slot": 1}
MAX_WORKERS = 3
NUM_TRIALS = 3
IDLE_TIMEOUT_MIN = 0.25  # 15 s. With 0.1 (6 s) a freshly launched node was once removed before its trial
# actor started ("Terminated by autoscaler", trial failed): on 2 busy cores the trial took longer than 6 s from
# node launch to a running actor, and the node counted as idle meanwhile. On a real cluster the timeout is minutes.


def run_sweep(address: str, num_trials: int, resources_per_trial: dict, *, overrides: dict | None = None,
              workdir: str | None = None) -> list[dict]:
    """raydllm's real sweep (`raydllm.tune.run_spec`: Tune + ASHA over TorchTrainer/DeepSpeed trials, MLflow)
    on the cluster at `address`. The node-sized request comes from the space's `resources`, exactly as on
    the real cluster; only the address and RAYDLLM_AUTOSCALING (skip the fits-now check) differ."""
    import ray
    from mlflow.tracking import MlflowClient

    from raydllm.results import trial_runs
    from raydllm.search_space import SweepSpec
    from raydllm.tune import run_spec

    custom = {k: v for k, v in resources_per_trial.items() if k != "CPU"}
    raw = {
        "task": "gsm8k", "preset": "local", "metric": "val_loss_diff",
        "fixed": {"model.init": "random", "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
                  "data.synthetic_size": 200, "data.val_limit": 8, "train.micro_batch_size": 4,
                  "train.max_steps": 4, "train.eval_every": 2, "eval.final": False},
        "space": {"jepa.lambda": {"grid": [0.5, 1.0, 2.0][:num_trials]}},
        "baseline": False, "scheduler": {"grace_period": 4}, "search": {"algorithm": "grid"},
        "num_samples": 1, "max_concurrent_trials": num_trials,
        "resources": {"workers": 1, "cpus_per_worker": resources_per_trial.get("CPU", 1), "custom": custom},
    }
    for key, value in (overrides or {}).items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key != "space" else value
    spec = SweepSpec.model_validate(raw)
    if ray.is_initialized():
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAYDLLM_AUTOSCALING")}
    os.environ.update({"RAY_ADDRESS": address, "RAYDLLM_AUTOSCALING": "1"})
    storage = None if workdir else tempfile.TemporaryDirectory(prefix="raydllm-fake-tune-")
    root = workdir or storage.name
    try:
        uri = f"sqlite:///{root}/mlflow.db"
        outcome = run_spec(spec, space_text=spec.model_dump_json(), space_name="fake-autoscaling.yaml",
                           name="fake-autoscaling", tracking_uri=uri, storage=root, progress=False)
        client = MlflowClient(uri)
        return [{"step": int(r.data.tags.get("raydllm.last_step", 0)), "node_id": r.data.tags.get("raydllm.node_id"),
                 "error": r.data.tags.get("raydllm.error"), "status": r.data.tags.get("raydllm.status"),
                 "resumed_from_step": r.data.tags.get("raydllm.resumed_from_step"), "run_id": r.info.run_id,
                 "steps_logged": [m.step for m in client.get_metric_history(r.info.run_id, "loss_total")]}
                for r in trial_runs(client, client.get_run(outcome.parent_run_id))]
    finally:
        ray.shutdown()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        if storage:
            storage.cleanup()


@pytest.mark.ray
def test_tune_sweep_scales_workers_up_then_down():
    t_start = time.monotonic()
    with fake_autoscaling_cluster(
        head_cpus=1,
        worker_resources=NODE_RESOURCES,
        max_workers=MAX_WORKERS,
        idle_timeout_minutes=IDLE_TIMEOUT_MIN,
    ) as cluster:
        t_up = time.monotonic() - t_start
        head = [n for n in cluster.alive_nodes() if n["is_head"]]
        assert len(head) == 1 and "node_slot" not in head[0]["resources"]
        assert cluster.worker_count() == 0

        timeline = NodeTimeline(cluster, interval_s=0.5).start()
        try:
            t_sweep0 = time.monotonic()
            results = run_sweep(cluster.address, NUM_TRIALS, NODE_RESOURCES)
            t_sweep = time.monotonic() - t_sweep0
            # Scale-down: Ray Train's autoscaling request for a trial's workers outlives the trial until it
            # expires (180 s, AUTOSCALING_REQUESTS_EXPIRE_TIME_S in Ray 2.60), then the idle timeout (15 s)
            # + the autoscaler update interval + raylet shutdown.
            cluster.wait_for_workers(lambda n: n == 0, timeout_s=300)
            time.sleep(1.0)  # one more sample at 0
        except BaseException:
            print(cluster.monitor_log_tail(40))
            raise
        finally:
            timeline.stop()
            print(f"\nfake cluster: head up in {t_up:.1f}s; sweep of {NUM_TRIALS} trials ran"
                  f" {locals().get('t_sweep', float('nan')):.1f}s")
            print("alive worker nodes over time (t = seconds since the head came up; only changes shown):")
            print(timeline.render())
            events = cluster.autoscaler_events()
            print("autoscaler decisions (monitor.log):")
            print("\n".join("  " + e.split(" -- ", 1)[-1][:150] for e in events) or "  (none)")
            if timeline.errors:
                print(f"sampling errors: {timeline.errors[:3]}")

        assert len(results) == NUM_TRIALS
        assert all(r.get("error") is None for r in results), results
        assert all(r.get("step") == 4 for r in results), results
        trial_nodes = {r["node_id"] for r in results}
        head_id = head[0]["node_id"]
        assert head_id not in trial_nodes, "a trial ran on the head, which has no node_slot"
        assert len(trial_nodes) >= 2, f"trials ran on only {trial_nodes}"

        counts = timeline.counts()
        peak = max(counts)
        assert counts[0] == 0, counts
        assert peak >= 2, counts
        assert peak <= MAX_WORKERS, counts
        assert counts[-1] == 0, counts
        # 0 -> ... -> peak -> ... -> 0, in that order.
        i_peak = counts.index(peak)
        assert 0 in counts[:i_peak] and counts[-1] == 0

    print(f"total test time {time.monotonic() - t_start:.1f}s")
    # Nothing of the fake cluster may outlive the context manager (other tests start their own Ray).
    assert not os.path.exists(cluster.temp_dir)


class NodeKiller(threading.Thread):
    """Crashes the node of the first trial that has logged `after_step` steps to MLflow (its curve is flushed
    once the checkpoint at that step is persisted), and records which node and at which step."""

    def __init__(self, cluster, tracking_db: Path, after_step: int):
        super().__init__(daemon=True)
        self.cluster, self.db, self.after_step = cluster, tracking_db, after_step
        self.killed: dict | None = None
        self.done = threading.Event()
        self.errors: list[str] = []

    def run(self):
        import sqlite3

        query = ("select r.run_uuid, t.value, max(m.step) from runs r join tags t on t.run_uuid = r.run_uuid "
                 "join metrics m on m.run_uuid = r.run_uuid where t.key = 'raydllm.node_id' "
                 "and m.key = 'loss_total' group by r.run_uuid")
        while not self.done.is_set() and self.killed is None:
            try:
                if self.db.exists():
                    with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as db:
                        rows = db.execute(query).fetchall()
                    for run_id, node_id, step in rows:
                        if step >= self.after_step:
                            pids = self.cluster.kill_node(node_id)
                            self.killed = {"run_id": run_id, "node_id": node_id, "step": step, "pids": len(pids),
                                           "t": time.monotonic()}
                            break
            except Exception as exc:  # noqa: BLE001 - sqlite busy while trials write: try again
                self.errors.append(repr(exc))
            time.sleep(0.3)


@pytest.mark.ray
def test_worker_node_lost_mid_sweep_trials_rescheduled_and_finish(tmp_path):
    """A worker node crashes (raylet and its workers SIGKILLed) while a trial trains on it: the trial's Ray
    Train worker group is restarted on a node the autoscaler launches, resumes from its last checkpoint, and
    every trial of the sweep finishes with one continuous MLflow curve."""
    max_steps, every = 40, 4
    with fake_autoscaling_cluster(head_cpus=1, worker_resources=NODE_RESOURCES, max_workers=MAX_WORKERS,
                                  idle_timeout_minutes=IDLE_TIMEOUT_MIN) as cluster:
        timeline = NodeTimeline(cluster, interval_s=0.5).start()
        killer = NodeKiller(cluster, tmp_path / "mlflow.db", after_step=2 * every)
        killer.start()
        try:
            results = run_sweep(cluster.address, 2, NODE_RESOURCES, workdir=str(tmp_path), overrides={
                "fixed": {"train.max_steps": max_steps, "train.eval_every": every, "train.max_failures": 3},
                "scheduler": {"type": "fifo"}, "max_failures": 2})
        except BaseException:
            print(cluster.monitor_log_tail(40))
            raise
        finally:
            killer.done.set()
            killer.join(timeout=5)
            timeline.stop()
            print(f"\nkilled: {killer.killed}; killer errors: {killer.errors[:3]}")
            print("alive worker nodes over time:")
            print(timeline.render())
            print("autoscaler decisions (monitor.log):")
            print("\n".join("  " + e.split(" -- ", 1)[-1][:150] for e in cluster.autoscaler_events()) or "  (none)")

    assert killer.killed is not None and killer.killed["pids"] >= 2, "no trial reached the kill step"
    assert len(results) == 2
    assert all(r["status"] == "completed" and r["step"] == max_steps for r in results), results
    for r in results:  # every trial's curve: each step exactly once
        assert r["steps_logged"] == list(range(1, max_steps + 1)), r
    victim = next(r for r in results if r["run_id"] == killer.killed["run_id"])
    # Resumed from a checkpoint it had saved (not from step 0), on another node than the one that died.
    assert victim["resumed_from_step"] is not None, victim
    # (The node dies a moment after MLflow showed `after_step`; the trial may have saved one more checkpoint.)
    assert every <= int(victim["resumed_from_step"]) <= killer.killed["step"] + every, (victim, killer.killed)
    assert victim["node_id"] != killer.killed["node_id"], victim
