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
import time

import pytest

from fake_cluster import NodeTimeline, fake_autoscaling_cluster

NODE_RESOURCES = {"CPU": 1, "node_slot": 1}
MAX_WORKERS = 3
NUM_TRIALS = 3
IDLE_TIMEOUT_MIN = 0.25  # 15 s. With 0.1 (6 s) a freshly launched node was once removed before its trial
# actor started ("Terminated by autoscaler", trial failed): on 2 busy cores the trial took longer than 6 s from
# node launch to a running actor, and the node counted as idle meanwhile. On a real cluster the timeout is minutes.


def run_sweep(address: str, num_trials: int, resources_per_trial: dict) -> list[dict]:
    """raydllm's real sweep (`raydllm.tune.run_spec`: Tune + ASHA over TorchTrainer/DeepSpeed trials, MLflow)
    on the cluster at `address`. The node-sized request comes from the space's `resources`, exactly as on
    the real cluster; only the address and RAYDLLM_AUTOSCALING (skip the fits-now check) differ."""
    import ray
    from mlflow.tracking import MlflowClient

    from raydllm.results import trial_runs
    from raydllm.search_space import SweepSpec
    from raydllm.tune import run_spec

    custom = {k: v for k, v in resources_per_trial.items() if k != "CPU"}
    spec = SweepSpec.model_validate({
        "task": "gsm8k", "preset": "local", "metric": "val_loss_diff",
        "fixed": {"model.init": "random", "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
                  "data.synthetic_size": 200, "data.val_limit": 8, "train.micro_batch_size": 4,
                  "train.max_steps": 4, "train.eval_every": 2, "eval.final": False},
        "space": {"jepa.lambda": {"grid": [0.5, 1.0, 2.0][:num_trials]}},
        "baseline": False, "scheduler": {"grace_period": 4}, "search": {"algorithm": "grid"},
        "num_samples": 1, "max_concurrent_trials": num_trials,
        "resources": {"workers": 1, "cpus_per_worker": resources_per_trial.get("CPU", 1), "custom": custom},
    })
    if ray.is_initialized():
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAYDLLM_AUTOSCALING")}
    os.environ.update({"RAY_ADDRESS": address, "RAYDLLM_AUTOSCALING": "1"})
    storage = tempfile.TemporaryDirectory(prefix="raydllm-fake-tune-")
    try:
        uri = f"sqlite:///{storage.name}/mlflow.db"
        outcome = run_spec(spec, space_text=spec.model_dump_json(), space_name="fake-autoscaling.yaml",
                           name="fake-autoscaling", tracking_uri=uri, storage=storage.name, progress=False)
        client = MlflowClient(uri)
        return [{"step": int(r.data.tags.get("raydllm.last_step", 0)), "node_id": r.data.tags.get("raydllm.node_id"),
                 "error": r.data.tags.get("raydllm.error"), "status": r.data.tags.get("raydllm.status")}
                for r in trial_runs(client, client.get_run(outcome.parent_run_id))]
    finally:
        ray.shutdown()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
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
