"""Sweep layer: what the Ray cluster can hold: the nodes up now and the node types its autoscaler can launch.

Ray keeps the autoscaler's node types in the GCS: the `ClusterConfig` record (resources, min and max count of each
worker node type) that `ray._private.state.state.get_cluster_config()` reads, the record Ray Data plans its own
autoscaling with. Newer Ray autoscalers (v2) report it themselves; Ray 2.60's autoscalers (v1 and v2) do not, so
the head reports it once after `ray start`: `python -m raydllm.sweep.cluster <autoscaling config>` (cluster.yaml's
head_start_ray_commands, tests/fake_cluster.py). A trial's request is then checked against what can ever exist,
not against the head alone: an autoscaling cluster starts with no GPU node at all.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodeShape:
    """A node that is up (count 1) or a node type the autoscaler can launch (count: its max_workers)."""
    name: str
    resources: dict[str, float]
    count: int


def cluster_config_proto(autoscaling: dict):
    """The autoscaler config's worker node types as Ray's `ClusterConfig` (the head is not launchable; each
    type's max_count is capped by the cluster-wide max_workers)."""
    from ray.core.generated import autoscaler_pb2

    out = autoscaler_pb2.ClusterConfig()
    cap = int(autoscaling.get("max_workers", sys.maxsize))
    for name, node_type in autoscaling.get("available_node_types", {}).items():
        if name == autoscaling.get("head_node_type"):
            continue
        group = out.node_group_configs.add()
        group.name = name
        group.min_count = int(node_type.get("min_workers", 0))
        group.max_count = min(int(node_type.get("max_workers", cap)), cap)
        for key, value in (node_type.get("resources") or {}).items():
            group.resources[key] = int(value)  # the autoscaler schema allows integers only
    return out


def report_node_types(config_path: str | Path, gcs_address: str) -> int:
    """Record the autoscaler's node types in the GCS; returns how many worker node types were reported."""
    import yaml
    from ray._raylet import GcsClient

    config = cluster_config_proto(yaml.safe_load(Path(config_path).expanduser().read_text()))
    GcsClient(address=gcs_address).report_cluster_config(config.SerializeToString())
    return len(config.node_group_configs)


def node_shapes() -> list[NodeShape]:
    """The alive nodes' total resources and the launchable node types, from the connected cluster's GCS."""
    import ray
    from ray._private.state import state

    shapes = [NodeShape(f"node {n['NodeID'][:8]}", dict(n["Resources"]), 1) for n in ray.nodes() if n["Alive"]]
    config = state.get_cluster_config()
    for group in config.node_group_configs if config else []:
        if group.max_count != 0:
            count = sys.maxsize if group.max_count < 0 else group.max_count
            shapes.append(NodeShape(group.name, dict(group.resources), count))
    return shapes


def node_types_recorded() -> bool:
    """Whether the connected cluster's GCS holds an autoscaler node-type record (none on Slurm, on a hand-started
    `ray start`, on KubeRay without it)."""
    from ray._private.state import state

    return state.get_cluster_config() is not None


def fixed_allocation() -> bool:
    """Whether the nodes that are up are all the cluster will ever have: inside a Slurm job (SLURM_JOB_ID), or
    where the launcher says so (RAYDLLM_FIXED_CLUSTER=1, e.g. a hand-started Ray without an autoscaler)."""
    return bool(os.environ.get("SLURM_JOB_ID")) or os.environ.get("RAYDLLM_FIXED_CLUSTER", "") in ("1", "true")


def largest(bundle: dict[str, float], shapes: list[NodeShape]) -> NodeShape | None:
    """The node holding the most workers of `bundle`; ties broken by GPUs, then CPUs."""
    return max(shapes, default=None, key=lambda s: (per_node(bundle, s.resources), s.resources.get("GPU", 0),
                                                    s.resources.get("CPU", 0)))


def per_node(bundle: dict[str, float], resources: dict[str, float]) -> int:
    """How many workers asking for `bundle` one node with `resources` holds."""
    fits = [math.floor(resources.get(key, 0) / need + 1e-9) for key, need in bundle.items() if need > 0]
    return min(fits) if fits else sys.maxsize


def placement(bundle: dict[str, float], workers: int, shapes: list[NodeShape]) -> str | None:
    """STRICT_PACK when some node (up or launchable) holds every worker, PACK when only several nodes together
    can, None when the cluster can never hold them. (A launched node counts both as up and under its type: the
    check errs towards accepting; it exists to refuse what can never run, not to predict waiting.)"""
    if any(per_node(bundle, s.resources) >= workers for s in shapes):
        return "STRICT_PACK"
    if sum(min(per_node(bundle, s.resources) * s.count, workers) for s in shapes) >= workers:
        return "PACK"
    return None


def _res(r: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(r.items())
                           if not k.startswith(("node:", "memory", "object_store"))) + "}"


def describe(shapes: list[NodeShape]) -> str:
    """One line: what the cluster's nodes and node types offer (for a refusal message)."""
    return "; ".join(f"{s.name}{'' if s.count == 1 else f' (up to {s.count})'} {_res(s.resources)}"
                     for s in shapes) or "no nodes"


def describe_node(shape: NodeShape | None) -> str:
    return f"{shape.name} {_res(shape.resources)}" if shape else "no nodes"


if __name__ == "__main__":  # python -m raydllm.sweep.cluster <autoscaling config> [gcs address], on the head
    from ray._private.services import canonicalize_bootstrap_address_or_die

    # Default: the cluster `ray start --head` started on this machine.
    address = canonicalize_bootstrap_address_or_die(sys.argv[2] if len(sys.argv) > 2 else "auto")
    print(f"reported {report_node_types(sys.argv[1], address)} worker node types to the GCS at {address}")
