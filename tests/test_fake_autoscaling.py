"""Autoscaling for real on one machine: a Tune sweep makes Ray's autoscaler add worker nodes, then remove them.

The cluster is Ray's ``fake_multinode`` provider (see tests/fake_cluster.py): a head node with no ``node_slot``
resource and one worker node type. Every trial asks for a whole node (``node_slot``), so nothing fits until the
autoscaler launches worker nodes; once the sweep is done and the nodes are idle for ``idle_timeout_minutes``
(0.25 min = 15 s) the autoscaler terminates them. No raydllm environment variable is set: the resource check
asks Ray (the node types recorded in the GCS, raydllm.sweep.cluster) what the cluster can launch, as on AWS.

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

from fake_cluster import (SHORT_REQUEST_EXPIRY_S, NodeTimeline, fake_autoscaling_cluster,
                          short_request_expiry_job_config)
from raydllm.core.config import ConfigError

NODE_RESOURCES = {"CPU": 1, "node_slot": 1}
MAX_WORKERS = 3
NUM_TRIALS = 2
# The scale-up sweep: a node type of two worker slots and trials of two workers, one slot each, so a trial is a
# whole node, placed there with STRICT_PACK (PACK would let its workers split over two nodes).
PAIR_NODE = {"CPU": 2, "node_slot": 2}
PAIR_WORKER = {"CPU": 1, "node_slot": 1}
IDLE_TIMEOUT_MIN = 0.25  # 15 s. With 0.1 (6 s) a freshly launched node was once removed before its trial
# actor started ("Terminated by autoscaler", trial failed): on 2 busy cores the trial took longer than 6 s from
# node launch to a running actor, and the node counted as idle meanwhile. On a real cluster the timeout is minutes.


def run_sweep(address: str, num_trials: int, resources_per_worker: dict, *, workers: int = 1,
              overrides: dict | None = None, workdir: str | None = None,
              short_request_expiry: bool = False) -> list[dict]:
    """raydllm's real sweep (`raydllm.sweep.tune.run_spec`: Tune + ASHA over TorchTrainer/DeepSpeed trials, MLflow)
    on the cluster at `address`. The node-sized request comes from the space's `resources`, exactly as on
    the real cluster; only the address differs."""
    import ray
    from mlflow.tracking import MlflowClient

    from raydllm.sweep.results import trial_runs
    from raydllm.sweep.search_space import SweepSpec
    from raydllm.sweep.tune import run_spec

    custom = {k: v for k, v in resources_per_worker.items() if k != "CPU"}
    raw = {
        "task": "gsm8k", "preset": "local", "metric": "val_loss_diff",
        "fixed": {"model.init": "random", "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
                  "data.synthetic_size": 200, "data.val_limit": 8, "train.micro_batch_size": 4,
                  "train.max_steps": 4, "train.eval_every": 2, "eval.final": False},
        "space": {"jepa.lambda": {"grid": [0.5, 1.0, 2.0][:num_trials]}},
        "baseline": False, "scheduler": {"grace_period": 4}, "search": {"algorithm": "grid"},
        "num_samples": 1, "max_concurrent_trials": num_trials,
        "resources": {"workers": workers, "cpus_per_worker": resources_per_worker.get("CPU", 1), "custom": custom},
    }
    for key, value in (overrides or {}).items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key != "space" else value
    spec = SweepSpec.model_validate(raw)
    if ray.is_initialized():
        ray.shutdown()
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address
    if short_request_expiry:
        os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"] = short_request_expiry_job_config()
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
        os.environ.pop("RAY_ADDRESS", None) if saved is None else os.environ.__setitem__("RAY_ADDRESS", saved)
        os.environ.pop("RAY_JOB_CONFIG_JSON_ENV_VAR", None)
        if storage:
            storage.cleanup()


class WorkerGroupPlacements(threading.Thread):
    """Records every placement group of Train workers (bundles asking for `marker`) while the driver is
    connected: its strategy and the nodes its bundles were placed on."""

    def __init__(self, marker: str = "node_slot"):
        super().__init__(daemon=True)
        self.marker, self.seen, self.done = marker, {}, threading.Event()

    def run(self):
        import ray

        while not self.done.is_set():
            try:
                if ray.is_initialized():
                    for pg_id, pg in ray.util.placement_group_table().items():
                        nodes = pg.get("bundles_to_node_id") or {}
                        wanted = any(self.marker in b for b in pg.get("bundles", {}).values())
                        if wanted and pg.get("state") == "CREATED" and len(nodes) == len(pg["bundles"]):
                            self.seen[pg_id] = {"strategy": pg["strategy"], "nodes": sorted(set(nodes.values()))}
            except Exception:  # noqa: BLE001 - the driver connects and disconnects under us
                pass
            self.done.wait(0.3)


@pytest.mark.ray
def test_tune_sweep_scales_workers_up_then_down():
    t_start = time.monotonic()
    with fake_autoscaling_cluster(
        head_cpus=1,
        worker_resources=PAIR_NODE,
        max_workers=MAX_WORKERS,
        idle_timeout_minutes=IDLE_TIMEOUT_MIN,
    ) as cluster:
        t_up = time.monotonic() - t_start
        head = [n for n in cluster.alive_nodes() if n["is_head"]]
        assert len(head) == 1 and "node_slot" not in head[0]["resources"]
        assert cluster.worker_count() == 0

        timeline = NodeTimeline(cluster, interval_s=0.5).start()
        placements = WorkerGroupPlacements()
        placements.start()
        try:
            t_sweep0 = time.monotonic()
            results = run_sweep(cluster.address, NUM_TRIALS, PAIR_WORKER, workers=2, short_request_expiry=True)
            t_sweep = time.monotonic() - t_sweep0
            placements.done.set()
            # Scale-down: Ray Train's autoscaling request for a trial's workers outlives the trial until it
            # expires (180 s in Ray 2.60, SHORT_REQUEST_EXPIRY_S here: fake_cluster.shorten_train_request_expiry),
            # then the idle timeout (15 s) + the autoscaler update interval + raylet shutdown.
            t_done = time.monotonic()
            cluster.wait_for_workers(lambda n: n == 0, timeout_s=SHORT_REQUEST_EXPIRY_S + 120)
            t_down = time.monotonic() - t_done
            time.sleep(1.0)  # one more sample at 0
        except BaseException:
            print(cluster.monitor_log_tail(40))
            raise
        finally:
            timeline.stop()
            placements.done.set()
            print(f"\nTrain worker placement groups: {list(placements.seen.values())}")
            print(f"\nfake cluster: head up in {t_up:.1f}s; sweep of {NUM_TRIALS} trials ran"
                  f" {locals().get('t_sweep', float('nan')):.1f}s; all workers gone {locals().get('t_down', float('nan')):.1f}s after it")
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
        # Each trial's two workers: one placement group, STRICT_PACK, both bundles on the same worker node.
        groups = list(placements.seen.values())
        assert len(groups) >= NUM_TRIALS, groups
        assert all(g["strategy"] == "STRICT_PACK" and len(g["nodes"]) == 1 for g in groups), groups
        assert {g["nodes"][0] for g in groups} >= trial_nodes, (groups, trial_nodes)

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


@pytest.mark.ray
def test_trial_no_node_type_can_hold_is_refused_before_scheduling(tmp_path):
    """A trial of 3 workers x {CPU: 1, node_slot: 1} needs 3 slots; the one node type has 2 per node and up to 3
    nodes. STRICT_PACK cannot hold it, but PACK across two nodes can, so it is accepted; a worker asking for
    {CPU: 4} fits no node type at all and is refused by the resource check, before any node is launched or any
    trial exists (the node types come from Ray: no raydllm environment variable is set)."""
    import ray

    from raydllm.sweep.cluster import node_shapes, placement

    assert not any(k.startswith("RAYDLLM") for k in os.environ)
    with fake_autoscaling_cluster(head_cpus=1, worker_resources=PAIR_NODE, max_workers=MAX_WORKERS,
                                  idle_timeout_minutes=IDLE_TIMEOUT_MIN) as cluster:
        ray.init(address=cluster.address, configure_logging=False)
        try:
            shapes = node_shapes()
            assert placement(PAIR_WORKER, 2, shapes) == "STRICT_PACK"  # one launchable node holds both
            assert placement(PAIR_WORKER, 3, shapes) == "PACK"  # two launchable nodes together
            assert placement(PAIR_WORKER, 7, shapes) is None  # 3 nodes x 2 slots
        finally:
            ray.shutdown()
        with pytest.raises(ConfigError, match=r"resources: a trial needs 1 worker\(s\) of \{CPU: 4, node_slot: 1\}"
                                              r".*ray\.worker\.slot \(up to 3\)"):
            run_sweep(cluster.address, 1, {"CPU": 4, "node_slot": 1}, workdir=str(tmp_path))
        assert cluster.worker_count() == 0
        from mlflow.tracking import MlflowClient

        runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
            [e.experiment_id for e in MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()])
        assert not [r for r in runs if r.data.tags.get("raydllm.kind") == "trial"], "a trial was created"
        assert not (tmp_path / "fake-autoscaling").exists(), "Tune started"


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
