"""Failed node launches (quota, InsufficientInstanceCapacity) from the autoscaler's status, in the progress view:
each failure one line, once, and only this sweep's."""
import io
import time

from ray.autoscaler.v2.schema import ClusterStatus, LaunchRequest

from raydllm.sweep import launches
from raydllm.sweep.callbacks import SweepProgress
from raydllm.sweep.launches import LaunchWatch, failure_line, new_failures


def _failed(node_type="gpu_a100_80gb", instance="p4de.24xlarge", at=1_000_000.0, reason="", count=1):
    return LaunchRequest(instance_type_name=instance, ray_node_type_name=node_type, count=count,
                         state=LaunchRequest.Status.FAILED, request_ts_s=int(at) - 5, failed_ts_s=int(at),
                         details=reason)


CAPACITY = ("InsufficientInstanceCapacity: We currently do not have sufficient p4de.24xlarge capacity in the "
            "Availability Zone you requested (us-west-2a).\nTraceback (most recent call last): ...")


def test_a_failure_is_one_line_with_the_clouds_reason():
    line = failure_line(_failed(reason=CAPACITY, count=2))
    assert line.startswith("launch failed ") and "\n" not in line
    assert ": 2 x p4de.24xlarge (gpu_a100_80gb): InsufficientInstanceCapacity: We currently" in line
    assert failure_line(_failed(reason="")).endswith("(gpu_a100_80gb): no reason given")
    assert len(failure_line(_failed(reason="x" * 1000))) < 300


def test_each_failure_once_and_none_from_before_the_sweep():
    seen = set()
    old = _failed(at=900_000.0, reason="VcpuLimitExceeded: an earlier sweep's")
    quota = _failed(at=1_000_100.0, reason="VcpuLimitExceeded: You have requested more vCPU capacity")
    status = ClusterStatus(failed_launches=[quota, old])
    lines = new_failures(status, seen, since_s=1_000_000.0)
    assert len(lines) == 1 and "VcpuLimitExceeded: You have requested" in lines[0]
    assert new_failures(status, seen, since_s=1_000_000.0) == []  # already shown
    capacity = _failed(at=1_000_200.0, reason=CAPACITY)
    assert [l.split(": ", 2)[2] for l in new_failures(ClusterStatus(failed_launches=[quota, capacity]), seen,
                                                      1_000_000.0)] == [CAPACITY.splitlines()[0]]


def test_progress_view_shows_failures_above_its_line(monkeypatch):
    calls = []

    def status(address, timeout):
        calls.append(address)
        return ClusterStatus(failed_launches=[_failed(at=time.time(), reason=CAPACITY)])

    monkeypatch.setattr("ray.autoscaler.v2.sdk.get_cluster_status", status)
    stream = io.StringIO()
    watch = LaunchWatch("10.0.0.1:6379", every_s=30.0, since_s=time.time() - 60)
    view = SweepProgress("val_loss_diff", "min", ["train.lr"], 4, 8, stream=stream, launches=watch)
    view.update([])
    view.update([])  # within every_s: the autoscaler is not asked again, the failure not repeated
    out = stream.getvalue().splitlines()
    assert calls == ["10.0.0.1:6379"]
    assert sum("launch failed" in line for line in out) == 1 and "InsufficientInstanceCapacity" in out[0]
    assert any(line.startswith("[search ") for line in out)


def test_a_cluster_without_autoscaler_state_is_left_alone(monkeypatch):
    def unavailable(address, timeout):
        raise RuntimeError("no autoscaler")

    monkeypatch.setattr("ray.autoscaler.v2.sdk.get_cluster_status", unavailable)
    watch = LaunchWatch("10.0.0.1:6379", every_s=0.0)
    assert watch.poll() == [] and watch.working is False and watch.poll() == []
    assert LaunchWatch(None).poll() == []
    assert launches.current_gcs_address() is None  # no Ray here: nothing to ask
