"""Every accuracy carries its protocol (sampler, steps, length, block, threshold, cache, shots, batch size, padding,
dtype, device type) as an MLflow tag beside it, and `report` refuses to compare numbers whose protocols differ."""
import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from raydllm.core.config import ConfigError, load_config
from raydllm.core.sampler import SamplerConfig
from raydllm.evaluation.protocol import (PROTOCOL_FIELDS, differing_fields, read_protocol, require_same_protocol,
                                         score_protocol)

TINY = ["model.init=random", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.synthetic_size=200",
        "data.val_limit=8", "train.micro_batch_size=4", "train.max_steps=1", "eval.final_limit=3",
        "eval.final_shots=[0,1]", "eval.probes=false", "eval.gen_length=8", "eval.sampler_steps=4",
        "eval.gen_limit=3"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_protocol_fields_of_the_exact_and_the_fast_sampler():
    exact = score_protocol(SamplerConfig(steps=8, gen_length=16, block_length=8), shots=4, batch_size=16,
                           dtype="bfloat16", device_type="cuda")
    fast = score_protocol(SamplerConfig(gen_length=16, block_length=8, steps=16, method="fast", threshold=0.9,
                                        cache="dual"), shots=0, batch_size=8, dtype="float32", device_type="cpu")
    assert set(exact) == set(PROTOCOL_FIELDS)
    assert exact["steps"] == 8 and exact["threshold"] == "-" and exact["padding_side"] == "left"
    assert fast["steps"] == "-" and fast["threshold"] == 0.9 and fast["cache"] == "dual"
    assert differing_fields(exact, fast) == ["sampler", "steps", "threshold", "cache", "remasking", "shots",
                                             "batch_size", "dtype", "device_type"]


def test_require_same_protocol_names_the_differing_fields_in_one_line():
    a = score_protocol(SamplerConfig(steps=8, gen_length=8, block_length=8), shots=0, batch_size=16,
                       dtype="float32", device_type="cpu")
    require_same_protocol({"x": a, "y": dict(a)})  # the same: no complaint
    with pytest.raises(ConfigError) as error:
        require_same_protocol({"jepa seed 1": a, "base seed 1": a | {"batch_size": 8, "dtype": "bfloat16"}})
    message = str(error.value)
    assert "\n" not in message and "batch_size (jepa seed 1: 16; base seed 1: 8)" in message
    assert "dtype (jepa seed 1: float32; base seed 1: bfloat16)" in message and "steps" not in message
    with pytest.raises(ConfigError, match="no protocol recorded for old run"):
        require_same_protocol({"new": a, "old run": None})


def test_trial_scores_carry_their_protocol_tags(process_group, tmp_path, shared_data):
    from raydllm.evaluation.trial import TrialLoop

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    cfg = load_config("gsm8k", "local", TINY + ["eval.sampler=fast", "eval.threshold=0.7"])
    loop = TrialLoop(cfg, rank=0, world=1, device=torch.device("cpu"), tracking={"tracking_uri": uri, "run_id": run_id})
    loop.validation_accuracy()
    out = loop.final_evaluation()
    assert "final_val_accuracy" in out and "final_val_accuracy_fast" in out
    tags = client.get_run(run_id).data.tags
    in_trial = read_protocol(tags, "val_accuracy")
    assert in_trial["sampler"] == "fast" and in_trial["threshold"] == 0.7 and in_trial["batch_size"] == 4
    assert in_trial["dtype"] == "float32" and in_trial["device_type"] == "cpu" and in_trial["shots"] == 0
    final = read_protocol(tags, "final_val_accuracy")
    assert final["sampler"] == "exact" and final["steps"] == 4 and final["gen_length"] == 8
    assert read_protocol(tags, "final_val_accuracy_fast")["sampler"] == "fast"
    assert read_protocol(tags, "final/val/1shot")["shots"] == 1


def test_cli_eval_logs_the_protocol_beside_the_score(tmp_path, capsys):
    from raydllm.cli.app import build_parser
    from raydllm.engine.backbone import load_backbone
    from test_evaluation import SMALL, _hand_built_checkpoint

    cfg = load_config("gsm8k", "local", SMALL)
    torch.manual_seed(0)
    backbone, _ = load_backbone(cfg.model)
    checkpoint = tmp_path / "run" / "checkpoint_000007"
    _hand_built_checkpoint(checkpoint, cfg, backbone.model.state_dict())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("raydllm-gsm8k", artifact_location=(tmp_path / "a").as_uri()),
                               tags={"raydllm.checkpoint": str(checkpoint)}).info.run_id
    args = build_parser().parse_args(["eval", run_id, "gsm8k", "--limit", "3", "--gen-length", "8", "--batch-size",
                                      "2", "--tracking-uri", uri, "--json", "--no-progress"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    logged = read_protocol(client.get_run(run_id).data.tags, "eval/validation/0shot")
    assert logged == result["protocol"] and logged["batch_size"] == 2 and logged["steps"] == 8


def test_report_refuses_winners_scored_under_different_protocols(tmp_path, capsys):
    """The baseline's checkpoints were trained with eval.sampler_steps=4, the DLLM-JEPA arm's with the default:
    their test numbers would come from different samplers, so the report stops before reading the test split."""
    from raydllm.cli.app import main
    from raydllm.engine.backbone import load_backbone
    from test_evaluation import SMALL, _hand_built_checkpoint
    from test_results import BASE, GOOD, _sweep

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    parent = _sweep(uri, [(GOOD, 42, 1.0, "completed"), (GOOD, 123, 1.2, "completed"), (GOOD, 777, 1.1, "completed"),
                          (BASE, 42, 1.5, "completed"), (BASE, 123, 1.7, "completed"), (BASE, 777, 1.4, "completed")])
    client = MlflowClient(uri)
    client.set_terminated(parent)
    for i, run in enumerate(client.search_runs([client.get_run(parent).info.experiment_id],
                                               f"tags.`mlflow.parentRunId` = '{parent}'")):
        baseline = run.data.tags["raydllm.arm"] == "baseline"
        cfg = load_config("gsm8k", "local", SMALL + (["eval.sampler_steps=4"] if baseline else []))
        torch.manual_seed(i)
        backbone, _ = load_backbone(cfg.model)
        folder = tmp_path / f"ckpt{i}" / "checkpoint_000007"
        _hand_built_checkpoint(folder, cfg, backbone.model.state_dict())
        client.set_tag(run.info.run_id, "raydllm.checkpoint", str(folder))
    args = ["report", "gsm8k", "--tracking-uri", uri, "--limit", "2", "--gen-length", "8", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "protocols differ in steps (dllm-jepa seed 123: 8; baseline seed 123: 4" in err
    assert "ledger" not in err and "raydllm.test_report" not in client.get_run(parent).data.tags  # test unread
    assert main(args + ["--steps", "8"]) == 0  # one sampler for all: the table is built
