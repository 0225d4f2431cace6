"""Generation evaluation, checkpoint loading and `raydllm eval` (MLflow run ids included)."""
import json

import pytest
import torch
import torch.nn as nn

from raydllm.engine.backbone import TokenIds, load_backbone
from raydllm.core.config import ConfigError, load_config
from raydllm.data.sft import load_examples
from raydllm.engine.checkpoints import read_checkpoint_state
from raydllm.cli.app import build_parser
from raydllm.evaluation.evaluate import default_sampler, effective_sampler, evaluate_task, left_pad, load_checkpoint_backbone
from raydllm.core.sampler import SamplerConfig
from raydllm.data.tasks import get_task
from raydllm.core.tokenizer import byte_tokenizer

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.synthetic_size=200",
         "data.answer_tokens=16", "data.max_prompt_tokens=96", "data.val_limit=8", "train.micro_batch_size=4",
         "train.max_steps=2", "train.lr=3e-3"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


class Oracle(nn.Module):
    """A 'model' that knows each prompt's answer: it puts all probability on the answer's next token."""

    def __init__(self, tokenizer, answers: dict[str, str], ids: TokenIds, vocab: int = 260):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.ids, self.vocab, self.tokenizer = ids, vocab, tokenizer
        self.answers = {tuple(tokenizer(p, add_special_tokens=False)["input_ids"]):
                        tokenizer(a, add_special_tokens=False)["input_ids"] + [ids.eos] for p, a in answers.items()}

    def logits(self, input_ids, attention_mask):
        out = torch.full((*input_ids.shape, self.vocab), -10.0)
        for row in range(input_ids.shape[0]):
            real = input_ids[row][attention_mask[row].bool()].tolist()
            prompt = next(p for p in self.answers if tuple(real[:len(p)]) == p)
            target = self.answers[prompt]
            start = input_ids.shape[1] - (len(real) - len(prompt))
            for j in range(start, input_ids.shape[1]):
                k = j - start
                out[row, j, target[k] if k < len(target) else self.ids.eos] = 10.0
        return out


def test_left_pad():
    ids, attention = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and attention.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_evaluate_task_plumbing_with_an_oracle():
    tokenizer = byte_tokenizer()
    task = get_task("gsm8k")
    cfg = load_config("gsm8k", "local", SMALL)
    examples = load_examples(cfg, "test")[:5]
    ids = TokenIds(mask=tokenizer.mask_token_id, pad=tokenizer.pad_token_id, eos=tokenizer.eos_token_id)
    answers = {task.format_prompt(ex): " " + ex.answer for ex in examples}
    answers[task.format_prompt(examples[0])] = " 1 + 1 = 2\n#### 999"  # one wrong answer
    oracle = Oracle(tokenizer, answers, ids)
    sampler = SamplerConfig(steps=32, gen_length=32, block_length=32)
    metrics, predictions = evaluate_task(oracle, tokenizer, task, examples, shots=0, sampler=sampler,
                                         batch_size=2, progress=False)
    assert metrics == {"accuracy": pytest.approx(0.8), "n": 5.0}
    assert [p["gold"] for p in predictions] == [ex.answer for ex in examples]  # input order kept
    assert predictions[1]["generation"].strip() == examples[1].answer  # cut at EOS, no specials
    assert predictions[0]["extracted"] == "999" and predictions[0]["scores"] == {"accuracy": 0.0}
    assert set(predictions[0]) >= {"prompt", "gold", "generation", "extracted", "scores"}


def test_a_cache_the_backbone_cannot_serve_falls_back_with_a_warning(caplog):
    tokenizer = byte_tokenizer()
    task = get_task("gsm8k")
    cfg = load_config("gsm8k", "local", SMALL)
    examples = load_examples(cfg, "test")[:3]
    ids = TokenIds(mask=tokenizer.mask_token_id, pad=tokenizer.pad_token_id, eos=tokenizer.eos_token_id)
    oracle = Oracle(tokenizer, {task.format_prompt(ex): " " + ex.answer for ex in examples}, ids)
    sampler = SamplerConfig(steps=32, gen_length=32, block_length=32, method="fast", cache="dual")
    assert effective_sampler(sampler, oracle).cache == "none" and "parallel decoding alone" in caplog.text
    metrics, _ = evaluate_task(oracle, tokenizer, task, examples, sampler=sampler, progress=False)
    assert metrics["accuracy"] == 1.0


def test_untrained_tiny_model_batching_does_not_change_answers():
    cfg = load_config("gsm8k", "local", SMALL)
    torch.manual_seed(0)
    backbone, tokenizer = load_backbone(cfg.model)
    task = get_task("gsm8k")
    examples = load_examples(cfg, "test")[:4]
    train = load_examples(cfg, "train")
    sampler = default_sampler(cfg)
    assert (sampler.gen_length, sampler.block_length, sampler.steps) == (16, 16, 16)
    kw = dict(shots=1, train_examples=train, sampler=sampler, progress=False)
    metrics, batched = evaluate_task(backbone, tokenizer, task, examples, batch_size=4, **kw)
    _, single = evaluate_task(backbone, tokenizer, task, examples, batch_size=1, **kw)
    assert metrics["n"] == 4 and 0.0 <= metrics["accuracy"] <= 1.0
    assert [p["generation"] for p in batched] == [p["generation"] for p in single]
    assert batched[0]["prompt"].count("Question:") == 2  # 1 exemplar + the question


def test_default_sampler_rounds_up_to_the_block():
    cfg = load_config("gsm8k", "local", ["data.answer_tokens=48"])
    assert default_sampler(cfg) == SamplerConfig(steps=48, gen_length=48, block_length=48)
    assert default_sampler(cfg, block_length=32) == SamplerConfig(steps=64, gen_length=64, block_length=32)
    assert default_sampler(cfg, block_length=16, steps=24).steps == 24
    with pytest.raises(ConfigError):
        default_sampler(cfg, gen_length=40, block_length=16)
    big = load_config("gsm8k", "local", ["data.answer_tokens=256"])
    assert (default_sampler(big).gen_length, default_sampler(big).block_length) == (256, 32)


def _hand_built_checkpoint(folder, cfg, state):
    """The layout worker.WorkerLoop.save leaves (DeepSpeed 0.19 save_checkpoint, tag "engine", ZeRO <= 2)."""
    (folder / "engine").mkdir(parents=True)
    module = {f"backbone.model.{k}": v for k, v in state.items()}
    module["predictor.blocks.0.qkv.weight"] = torch.zeros(3, 1)
    torch.save({"module": module, "buffer_names": [], "optimizer": None, "lr_scheduler": {}, "global_steps": 7,
                "ds_version": "0.19.8", "step": 7}, folder / "engine" / "mp_rank_00_model_states.pt")
    (folder / "raydllm.json").write_text(json.dumps({"step": 7, "data_position": 7, "config": cfg.to_dict()}))


def test_hand_built_checkpoint_loads(tmp_path):
    cfg = load_config("gsm8k", "local", SMALL)
    torch.manual_seed(3)
    reference, _ = load_backbone(cfg.model)
    _hand_built_checkpoint(tmp_path / "checkpoint_000007", cfg, reference.model.state_dict())
    # A Ray Train run folder resolves to its newest checkpoint.
    backbone, tokenizer, loaded = load_checkpoint_backbone(tmp_path)
    assert loaded == cfg and len(tokenizer) == 260
    assert all(torch.equal(backbone.model.state_dict()[k], v) for k, v in reference.model.state_dict().items())
    with pytest.raises(ConfigError, match="raydllm.json"):
        load_checkpoint_backbone(tmp_path / "nowhere")


def test_worker_checkpoint_loads(process_group, tmp_path):
    """A checkpoint written by the real worker loop (a DeepSpeed engine) round-trips, EMA included."""
    from raydllm.engine.worker import WorkerLoop

    cfg = load_config("gsm8k", "local", SMALL)
    loop = WorkerLoop(cfg, rank=0, world=1, device=torch.device("cpu"))
    loop.train_step()
    loop.save(str(tmp_path))
    assert (tmp_path / "engine" / "mp_rank_00_model_states.pt").is_file()
    assert any(k.startswith("predictor.") for k in read_checkpoint_state(tmp_path))
    backbone, _, loaded = load_checkpoint_backbone(tmp_path)
    assert loaded == cfg
    trained = loop.engine.module.backbone.model.state_dict()
    assert all(torch.equal(backbone.model.state_dict()[k], trained[k]) for k in trained)
    ema, _, _ = load_checkpoint_backbone(tmp_path, ema=True)
    assert all(torch.equal(ema.model.state_dict()[k], v.float()) for k, v in
               {k.removeprefix("model."): v for k, v in loop.ema.state_dict().items()}.items())


def test_weights_only_export_is_what_eval_reads(process_group, tmp_path):
    """The final checkpoint's export/ (save_pretrained + tokenizer + EMA) loads without the DeepSpeed files."""
    from raydllm.engine.worker import WorkerLoop

    cfg = load_config("gsm8k", "local", SMALL + ["train.export_ema=true"])
    loop = WorkerLoop(cfg, rank=0, world=1, device=torch.device("cpu"))
    loop.train_step()
    loop.save(str(tmp_path))
    loop.export(str(tmp_path))
    assert (tmp_path / "export" / "config.json").is_file() and (tmp_path / "export" / "model.py").is_file()
    import shutil

    shutil.rmtree(tmp_path / "engine")  # eval must not need the engine files (weights, optimizer shards)
    backbone, _, loaded = load_checkpoint_backbone(tmp_path, device="cpu")
    assert loaded == cfg and next(backbone.parameters()).dtype == torch.float32  # a CPU run trains in fp32
    trained = loop.engine.module.backbone.model.state_dict()
    assert all(torch.equal(backbone.model.state_dict()[k], trained[k]) for k in trained)
    ema, _, _ = load_checkpoint_backbone(tmp_path, ema=True, device="cpu")
    target = {k.removeprefix("model."): v for k, v in loop.ema.state_dict().items()}
    assert all(torch.equal(ema.model.state_dict()[k], v) for k, v in target.items())
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda"):
            load_checkpoint_backbone(tmp_path, device="cuda")


def _eval_parser():
    return build_parser()


def test_cli_eval_by_run_id_logs_to_mlflow(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    cfg = load_config("gsm8k", "local", SMALL)
    torch.manual_seed(0)
    backbone, _ = load_backbone(cfg.model)
    checkpoint = tmp_path / "run" / "checkpoint_000007"
    _hand_built_checkpoint(checkpoint, cfg, backbone.model.state_dict())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("raydllm-gsm8k", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment, tags={"raydllm.checkpoint": str(checkpoint)}).info.run_id

    args = _eval_parser().parse_args(["eval", run_id, "gsm8k", "--limit", "3", "--gen-length", "8",
                                      "--tracking-uri", uri, "--json", "--no-progress"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["run_id"] == run_id and result["metrics"]["n"] == 3 and result["step"] == 7
    assert result["sampler"] == {"sampler": "exact", "gen_length": 8, "block_length": 8, "steps": 8}
    logged = client.get_run(run_id).data.metrics
    assert logged["eval/validation/0shot/n"] == 3 and "eval/validation/0shot/accuracy" in logged
    artifacts = [a.path for a in client.list_artifacts(run_id, "eval")]
    assert artifacts == ["eval/predictions-gsm8k-validation-0shot.jsonl"]
    lines = (tmp_path / "artifacts").rglob("predictions-gsm8k-validation-0shot.jsonl").__next__().read_text().splitlines()
    assert len(lines) == 3 and {"prompt", "generation", "extracted"} <= set(json.loads(lines[0]))

    # A checkpoint path evaluates without MLflow; an unknown id is a one-line user error.
    args = _eval_parser().parse_args(["eval", str(checkpoint), "gsm8k", "--limit", "2", "--gen-length", "8",
                                      "--split", "validation", "--tracking-uri", uri, "--no-progress"])
    assert args.func(args) == 0
    assert "accuracy" in capsys.readouterr().out
    # the fast sampler, its settings in the result
    args = _eval_parser().parse_args(["eval", str(checkpoint), "gsm8k", "--limit", "2", "--gen-length", "8",
                                      "--sampler", "fast", "--threshold", "0.5", "--cache", "dual",
                                      "--tracking-uri", uri, "--no-progress", "--json"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["sampler"] == {"sampler": "fast", "gen_length": 8, "block_length": 8, "threshold": 0.5,
                                 "cache": "dual"} and result["metrics"]["n"] == 2
    args = _eval_parser().parse_args(["eval", str(checkpoint), "gsm8k", "--cache", "dual", "--tracking-uri", uri])
    with pytest.raises(ConfigError, match="--sampler fast"):
        args.func(args)
    args = _eval_parser().parse_args(["eval", "0123456789abcdef0123456789abcdef", "gsm8k", "--tracking-uri", uri])
    with pytest.raises(ConfigError, match="neither a checkpoint"):
        args.func(args)


def test_cli_eval_base_scores_the_model_the_run_started_from(tmp_path, capsys):
    """--base: same data, prompts and sampler, but the run's starting weights; logged apart from the run's own."""
    from mlflow.tracking import MlflowClient

    cfg = load_config("gsm8k", "local", SMALL + ["model.init=random"])  # no base to build
    torch.manual_seed(0)
    trained, _ = load_backbone(cfg.model)
    checkpoint = tmp_path / "run" / "checkpoint_000007"
    _hand_built_checkpoint(checkpoint, cfg, {k: v + 1.0 for k, v in trained.model.state_dict().items()})
    base, _, loaded = load_checkpoint_backbone(checkpoint, base=True)
    assert loaded == cfg
    assert not any(torch.equal(base.model.state_dict()[k], v + 1.0) for k, v in trained.model.state_dict().items())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("raydllm-gsm8k", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment, tags={"raydllm.checkpoint": str(checkpoint)}).info.run_id
    args = _eval_parser().parse_args(["eval", run_id, "gsm8k", "--limit", "2", "--gen-length", "8", "--base",
                                      "--tracking-uri", uri, "--json", "--no-progress"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["weights"] == "base" and result["step"] == 0
    assert client.get_run(run_id).data.metrics["eval/validation/0shot/base/n"] == 2
    # The fast sampler's figures get their own names: they never overwrite the exact sampler's.
    args = _eval_parser().parse_args(["eval", run_id, "gsm8k", "--limit", "3", "--gen-length", "8", "--sampler",
                                      "fast", "--tracking-uri", uri, "--json", "--no-progress"])
    assert args.func(args) == 0
    logged = client.get_run(run_id).data.metrics
    assert logged["eval/validation/0shot/fast/n"] == 3 and "eval/validation/0shot/n" not in logged
    args = _eval_parser().parse_args(["eval", run_id, "gsm8k", "--base", "--ema", "--tracking-uri", uri])
    with pytest.raises(ConfigError, match="--base and --ema"):
        args.func(args)


def test_cli_eval_test_split_of_a_sweep_trial_goes_through_the_ledger(tmp_path, capsys):
    """`raydllm eval <trial> gsm8k --split test` twice: the second is refused (the sweep's test ledger), --force
    scores it again; a validation evaluation is never refused."""
    from mlflow.tracking import MlflowClient

    cfg = load_config("gsm8k", "local", SMALL)
    torch.manual_seed(0)
    backbone, _ = load_backbone(cfg.model)
    checkpoint = tmp_path / "run" / "checkpoint_000007"
    _hand_built_checkpoint(checkpoint, cfg, backbone.model.state_dict())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("raydllm-gsm8k", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment).info.run_id
    run_id = client.create_run(experiment, tags={"raydllm.checkpoint": str(checkpoint), "mlflow.parentRunId": parent,
                                                 "raydllm.config_key": "abc"}).info.run_id
    base = ["eval", run_id, "gsm8k", "--limit", "2", "--gen-length", "8", "--tracking-uri", uri, "--no-progress"]
    for _ in range(2):
        args = _eval_parser().parse_args(base)
        assert args.func(args) == 0
    args = _eval_parser().parse_args(base + ["--split", "test"])
    assert args.func(args) == 0
    with pytest.raises(ConfigError, match="already scored for config abc"):
        args.func(args)
    args = _eval_parser().parse_args(base + ["--split", "test", "--force"])
    assert args.func(args) == 0
