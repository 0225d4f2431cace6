"""From a checkout to a sweep on a cluster, without starting Ray: what a trial asks for, where it may be placed,
what the resource check refuses, the search-space and `raydllm tune` flags that feed them, and the packaging.
(The same checks against a real autoscaler: tests/test_fake_autoscaling.py.)"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

import raydllm.sweep.cluster
from raydllm.cli.app import main
from raydllm.sweep.cluster import NodeShape, cluster_config_proto, per_node, placement
from raydllm.core.config import ConfigError, validate
from raydllm.sweep.search_space import base_raw, load_spec
from raydllm.sweep.train import worker_bundle

REPO = Path(__file__).resolve().parents[1]
GPU_WORKER = {"CPU": 8, "GPU": 1, "accelerator_type:A100-80G": 0.001}


def _aws_shapes(head_up=True) -> list[NodeShape]:
    """cluster.yaml's node types as Ray records them, plus the head that is up."""
    config = cluster_config_proto(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    shapes = [NodeShape("head", {"CPU": 0, "GPU": 0, "trial_slot": 4}, 1)] if head_up else []
    return shapes + [NodeShape(g.name, dict(g.resources), g.max_count) for g in config.node_group_configs
                     if g.max_count]


def test_cluster_yaml_node_types_as_ray_records_them():
    config = cluster_config_proto(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    groups = {g.name: g for g in config.node_group_configs}
    assert "ray.head.default" not in groups  # the head is not launchable
    assert groups["gpu_a100_80gb"].resources["GPU"] == 8 and groups["gpu_a100_80gb"].max_count == 4
    assert groups["gpu_a100_80gb"].resources["accelerator_type:A100-80G"] == 1
    assert groups["gpu_a100_40gb"].max_count == 0  # opt-in type: not launchable as shipped


def test_eight_gpu_trial_goes_on_one_80gb_node():
    # The head has no GPU; only the autoscaler's node types can hold the trial, and one node holds all 8 workers.
    assert placement(GPU_WORKER, 8, _aws_shapes()) == "STRICT_PACK"
    assert per_node(GPU_WORKER, {"CPU": 96, "GPU": 8, "accelerator_type:A100-80G": 1}) == 8


def test_80gb_trial_never_lands_on_40gb_cards():
    only_40gb = [NodeShape("gpu_a100_40gb", {"CPU": 96, "GPU": 8, "accelerator_type:A100-40G": 1}, 4)]
    assert placement(GPU_WORKER, 8, only_40gb) is None


def test_sixteen_gpu_trial_spreads_over_two_nodes_and_seventeen_nodes_never_fit():
    shapes = _aws_shapes()
    assert placement(GPU_WORKER, 16, shapes) == "PACK"  # no node holds 16 GPUs; two 80 GB nodes do
    assert placement(GPU_WORKER, 33, shapes) is None  # 4 nodes x 8 GPUs


def test_check_resources_refuses_with_one_line(monkeypatch):
    from raydllm.sweep.search_space import SweepSpec
    from raydllm.sweep.tune import check_resources

    spec = SweepSpec.model_validate(yaml.safe_load((REPO / "search_spaces" / "gsm8k.yaml").read_text()))
    monkeypatch.setattr(raydllm.sweep.cluster, "node_types_recorded", lambda: True)
    monkeypatch.setattr(raydllm.sweep.cluster, "node_shapes", lambda: _aws_shapes())
    check_resources(spec)  # 8 x A100-80G: a gpu_a100_80gb node holds it
    monkeypatch.setattr(raydllm.sweep.cluster, "node_shapes", lambda: _aws_shapes()[:1])  # record without them
    with pytest.raises(ConfigError, match=r"^resources: a trial needs 8 worker\(s\) of \{CPU: 8, "
                                          r"accelerator_type:A100-80G: 0.001, GPU: 1\}.*head \{CPU: 0, GPU: 0, "
                                          r"trial_slot: 4\}") as err:
        check_resources(spec)
    assert "\n" not in str(err.value)


def _slurm_nodes(gpus: int) -> list[NodeShape]:
    """Two nodes of a fixed allocation, as ray.nodes() shows them: no node-type record."""
    return [NodeShape(f"node {i}abcdef0", {"CPU": 64, "GPU": gpus, "accelerator_type:A100-80G": 1}, 1)
            for i in range(2)]


def test_fixed_allocation_is_checked_against_the_nodes_up(monkeypatch):
    """Slurm (SLURM_JOB_ID) or RAYDLLM_FIXED_CLUSTER=1, no node-type record: a trial that fits the nodes up
    passes; one that none can ever hold is refused in one line naming the largest node."""
    from raydllm.sweep.search_space import SweepSpec
    from raydllm.sweep.tune import check_resources

    spec = SweepSpec.model_validate(yaml.safe_load((REPO / "search_spaces" / "gsm8k.yaml").read_text()))
    monkeypatch.setattr(raydllm.sweep.cluster, "node_types_recorded", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setattr(raydllm.sweep.cluster, "node_shapes", lambda: _slurm_nodes(8))
    check_resources(spec)  # 8 GPUs per node: not refused for lack of the record
    monkeypatch.setattr(raydllm.sweep.cluster, "node_shapes", lambda: _slurm_nodes(2))
    with pytest.raises(ConfigError, match=r"^resources: a trial needs 8 worker\(s\) .*fixed allocation holds "
                                          r"\(largest: node 0abcdef0 \{CPU: 64, GPU: 2, ") as err:
        check_resources(spec)  # 2 nodes x 2 GPUs: 4 of the 8 workers at most
    assert "\n" not in str(err.value)
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("RAYDLLM_FIXED_CLUSTER", "1")
    with pytest.raises(ConfigError, match="largest: node 0abcdef0"):
        check_resources(spec)


def test_unknown_cluster_warns_and_goes_on(monkeypatch, caplog):
    """No record, not a fixed allocation (KubeRay, a hand-started Ray): an autoscaler may still add a node."""
    from raydllm.sweep.search_space import SweepSpec
    from raydllm.sweep.tune import check_resources

    spec = SweepSpec.model_validate(yaml.safe_load((REPO / "search_spaces" / "gsm8k.yaml").read_text()))
    monkeypatch.setattr(raydllm.sweep.cluster, "node_types_recorded", lambda: False)
    monkeypatch.setattr(raydllm.sweep.cluster, "node_shapes", lambda: _aws_shapes()[:1])  # a CPU head alone
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("RAYDLLM_FIXED_CLUSTER", raising=False)
    with caplog.at_level("WARNING", logger="raydllm.sweep.tune"):
        check_resources(spec)
    assert "no autoscaler node-type record" in caplog.text and "going on" in caplog.text


@pytest.mark.parametrize("task", ["gsm8k", "django", "nlrx", "spider"])
def test_shipped_8b_spaces_ask_for_80gb_cards(task):
    spec = load_spec(REPO / "search_spaces" / f"{task}.yaml", {"data.path": "/data"} if task != "gsm8k" else None)
    assert spec.resources.accelerator_type == "A100-80G"
    cfg = validate(base_raw(spec))
    assert worker_bundle(cfg, True) == {"CPU": 8, "accelerator_type:A100-80G": 0.001, "GPU": 1}


def _space(tmp_path, **changes) -> Path:
    raw = yaml.safe_load((REPO / "search_spaces" / "local.yaml").read_text())
    for key, value in changes.items():
        raw[key] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_accelerator_type_needs_gpu(tmp_path):
    path = _space(tmp_path, resources={"workers": 1, "accelerator_type": "A100-80G"})
    with pytest.raises(ConfigError, match=r"space.yaml: resources: accelerator_type needs use_gpu: true"):
        load_spec(path)


def test_space_whose_searcher_is_missing_is_refused(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    path = _space(tmp_path, search={"algorithm": "optuna", "seed": 0})
    with pytest.raises(ConfigError, match=r"space.yaml: search.algorithm: optuna needs the optuna package"):
        load_spec(path)
    load_spec(_space(tmp_path))  # random search needs no extra package


def test_set_values_are_fixed_for_every_trial_and_checked_like_fixed(tmp_path):
    path = _space(tmp_path)
    spec = load_spec(path, {"train.max_steps": 60, "data.val_limit": 32})
    assert spec.fixed["train.max_steps"] == 60 and validate(base_raw(spec)).train.max_steps == 60
    with pytest.raises(ConfigError, match=r"--set jepa.lambda: the space searches this key"):
        load_spec(path, {"jepa.lambda": 0.5})
    with pytest.raises(ConfigError, match=r"space.yaml: fixed: .*max_steps"):
        load_spec(path, {"train.max_steps": -1})


@pytest.mark.parametrize("argv,message", [
    (["tune", "gsm8k", "--preset", "paper"], "--preset paper: tune runs a space file"),
    (["tune", "gsm8k", "--preset", "wide-t"], "use --space FILE (with preset: wide-t) or --set KEY=VALUE"),
    (["tune", "gsm8k", "--preset", "local", "--space", "search_spaces/gsm8k.yaml"], "sets preset: paper"),
    (["tune", "gsm8k", "--preset", "local", "--set", "train.nonsense=1"], "train.nonsense"),
    (["tune", "gsm8k", "--preset", "local", "--set", "jepa.lambda=1"], "--set jepa.lambda"),
])
def test_tune_flags_refused_before_ray_starts(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_default_space_file_is_found_in_the_package(tmp_path, monkeypatch):
    from raydllm.sweep.search_space import default_space_file

    monkeypatch.chdir(tmp_path)  # no search_spaces/ here: the copy that travels with the package
    path = default_space_file("gsm8k")
    assert path.is_file() and path.parent.parent.name == "raydllm"
    assert load_spec(default_space_file("local")).task == "gsm8k"
