"""lm-evaluation-harness: the `raydllm` model class (raydllm.sweep.harness, raydllm.evaluation.harness), offline.

Tasks read the local GSM8K jsonl (`shared_data`), the model is the embedded tiny base (model.init=pretrained, shipped
in raydllm/assets). Every test but the missing-extra one needs lm_eval (`pip install 'raydllm[harness]'`)."""
import itertools
import json
import math
import os
import sys

# No network: datasets and the Hub read these when they are imported.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from raydllm.cli.app import build_parser
from raydllm.core.config import ConfigError, load_config
from raydllm.core.sampler import decode_generations, sample
from raydllm.engine.backbone import load_backbone
from raydllm.evaluation.evaluate import stop_ids
from raydllm.evaluation.harness import PRESETS, DiffusionLM, cut_at_stops, elbo_loglikelihood, mask_counts


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tiny():
    """(backbone, tokenizer, cfg): the embedded base the local preset starts from."""
    cfg = load_config("gsm8k", "local", [])
    backbone, tokenizer = load_backbone(cfg.model)
    return backbone.eval(), tokenizer, cfg


@pytest.fixture(scope="module")
def gsm8k_tasks(tmp_path_factory, shared_data):
    """(folder of task YAMLs, generation task, loglikelihood task) over the local GSM8K files."""
    pytest.importorskip("lm_eval")
    from raydllm.evaluation.harness import gsm8k_local_task

    SHARED_DATA = shared_data
    if not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file():
        pytest.skip(f"no GSM8K at {SHARED_DATA / 'gsm8k'}")
    folder = tmp_path_factory.mktemp("tasks")
    generation = gsm8k_local_task(SHARED_DATA / "gsm8k", folder)
    # A two-choice task (the gold number or "0"): lm-eval scores it by loglikelihood.
    (folder / "gsm8k_choice_local.yaml").write_text("\n".join([
        "task: gsm8k_choice_local", "dataset_path: json", "dataset_kwargs:", "  data_files:",
        f"    test: {json.dumps(str(SHARED_DATA / 'gsm8k' / 'test.jsonl'))}", "test_split: test",
        "output_type: multiple_choice", 'doc_to_text: "Question: {{question}}\\nAnswer:"',
        "doc_to_choice: \"{{[answer.split('#### ')[-1], '0']}}\"", "doc_to_target: 0",
        "metric_list:", "  - metric: acc", ""]))
    return folder, generation, "gsm8k_choice_local"


class Request:  # what lm-eval hands a model: `.args`
    def __init__(self, *args):
        self.args = args


# -- the ELBO ---------------------------------------------------------------------------------------------
def test_one_token_elbo_is_the_exact_conditional(tiny):
    """With a one-token continuation every draw masks that token with weight 1: the estimate is log p exactly."""
    backbone, tokenizer, _ = tiny
    prefix = tokenizer("Question: 2+2?\nAnswer:", add_special_tokens=False)["input_ids"]
    target = tokenizer(" 4", add_special_tokens=False)["input_ids"][-1:]
    ids = torch.tensor([prefix + [backbone.ids.mask]])
    exact = torch.log_softmax(backbone.logits(ids, None)[0, -1].float(), dim=-1)[target[0]].item()
    for mc_num, batch in ((1, 1), (8, 4)):
        got = elbo_loglikelihood(backbone.logits, prefix, target, mask_id=backbone.ids.mask, mc_num=mc_num,
                                 mc_batch_size=batch, generator=torch.Generator().manual_seed(mc_num))
        assert got == pytest.approx(exact, abs=1e-5)


def exact_elbo(backbone, prefix, target) -> float:
    """The ELBO by enumeration: k uniform in 1..L, every k-subset equally likely, weight L / k."""
    length, total = len(target), 0.0
    for k in range(1, length + 1):
        subsets = list(itertools.combinations(range(length), k))
        for subset in subsets:
            ids = torch.tensor([prefix + [backbone.ids.mask if j in subset else t for j, t in enumerate(target)]])
            logp = torch.log_softmax(backbone.logits(ids, None)[0].float(), dim=-1)
            total += sum(logp[len(prefix) + j, target[j]].item() for j in subset) / k / len(subsets)
    return total


def test_elbo_mean_is_the_enumeration_and_mc_num_shrinks_its_variance(tiny):
    backbone, tokenizer, _ = tiny
    prefix = tokenizer("The cat sat on the", add_special_tokens=False)["input_ids"]
    target = tokenizer(" mat", add_special_tokens=False)["input_ids"][:3]
    assert len(target) == 3
    exact = exact_elbo(backbone, prefix, target)

    def estimates(mc_num: int, repeats: int = 48) -> torch.Tensor:
        return torch.tensor([elbo_loglikelihood(backbone.logits, prefix, target, mask_id=backbone.ids.mask,
                                                mc_num=mc_num, mc_batch_size=mc_num,
                                                generator=torch.Generator().manual_seed(1000 * mc_num + r))
                             for r in range(repeats)], dtype=torch.float64)

    few, many = estimates(2), estimates(16)
    assert few.var() > 0  # the draws matter: a degenerate case would prove nothing
    for values in (few, many):  # unbiased: the mean within 4 standard errors of the exact ELBO
        assert abs(values.mean().item() - exact) < 4 * math.sqrt(values.var().item() / len(values)) + 1e-6
    assert many.var() < few.var() / 2  # 8x the samples: the variance falls (about 8x)


def test_mask_counts_spread_evenly_over_the_range():
    counts = mask_counts(4, 4, torch.Generator().manual_seed(0))
    assert sorted(counts.tolist()) == [1, 2, 3, 4]  # LLaDA's stratification: batch == length covers every count
    assert all(1 <= c <= 7 for c in mask_counts(7, 3, torch.Generator().manual_seed(1)).tolist())


def test_loglikelihood_requests_and_greedy_check(tiny):
    backbone, tokenizer, cfg = tiny
    lm = DiffusionLM(backbone, tokenizer, cfg, mc_num=4, greedy_check=True)
    context = "Question: what is 3 times 4?\nAnswer:"
    prefix = tokenizer(context, add_special_tokens=True)["input_ids"]
    ids = torch.tensor([prefix])
    from raydllm.core.sampler import SamplerConfig, generate
    own = generate(backbone.logits, ids, torch.ones_like(ids), mask_id=backbone.ids.mask,
                   config=SamplerConfig(steps=3, gen_length=3, block_length=3))[0, len(prefix):].tolist()
    own_text = tokenizer.decode(own)
    assert tokenizer(context + own_text, add_special_tokens=False)["input_ids"][len(prefix):] == own  # bytes
    (ll_own, greedy_own), (ll_other, greedy_other) = lm.loglikelihood(
        [Request(context, own_text), Request(context, "zzz" if own_text != "zzz" else "qqq")])
    assert greedy_own is True and greedy_other is False and ll_own < 0 and ll_other < 0
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([Request("text")])
    with pytest.raises(ConfigError, match="multiple of mc_batch_size"):
        DiffusionLM(backbone, tokenizer, cfg, mc_num=6, mc_batch_size=4).loglikelihood([Request("a", "b")])


# -- generation --------------------------------------------------------------------------------------------
def test_cut_at_stops_takes_the_earliest():
    assert cut_at_stops("12 Question: x </s>", ["</s>", "Question:"]) == "12 "
    assert cut_at_stops("no stop", ["Question:"]) == "no stop" and cut_at_stops("a", []) == "a"


def test_generate_until_cuts_each_answer_at_its_own_until(tiny):
    """Requests with different `until` (and max_gen_toks, when gen_length is not set) in one call."""
    backbone, tokenizer, cfg = tiny
    lm = DiffusionLM(backbone, tokenizer, cfg, batch_size=2)
    contexts = ["Question: 1+1?\nAnswer:", "Question: name a colour.\nAnswer:"]
    whole = lm.generate_until([Request(c, {"until": [], "max_gen_toks": 16}) for c in contexts])
    assert all(len(w) >= 4 for w in whole) and lm.protocol(0)["gen_length"] == 16
    cut = lm.generate_until([Request(contexts[0], {"until": [whole[0][2:4]], "max_gen_toks": 16}),
                             Request(contexts[1], {"until": "never there", "max_gen_toks": 16})])
    assert cut == [whole[0][:whole[0].index(whole[0][2:4])], whole[1]]
    lm.generate_until([Request(contexts[0], {"until": [], "max_gen_toks": 8})])
    assert lm.protocol(0)["gen_length"] == [8, 16]  # every answer length that ran is in the protocol


def test_sampling_at_a_temperature_follows_the_seed(tiny):
    backbone, tokenizer, cfg = tiny
    requests = [Request("Question: 5-3?\nAnswer:", {"until": []})]

    def answers(seed):
        return DiffusionLM(backbone, tokenizer, cfg, gen_length=16, temperature=1.0, seed=seed).generate_until(requests)

    assert answers(1) == answers(1) and answers(1) != answers(2)


@pytest.mark.parametrize("settings", [dict(sampler="exact"),
                                      dict(sampler="fast", threshold=0.3, cache="dual", block_length=16)],
                         ids=["exact", "fast-dual"])
def test_generate_until_through_lm_eval_is_raydllms_sampler(tiny, gsm8k_tasks, settings):
    """simple_evaluate's answers are raydllm's own: each logged context, sampled alone by `sample` (no batch,
    no padding) and cut at the task's `until`, gives the very answer lm-eval recorded from batches of 3."""
    from raydllm.evaluation.evaluate import default_sampler, effective_sampler
    from raydllm.sweep.harness import RaydllmLM, run_harness

    backbone, tokenizer, cfg = tiny
    folder, task, _ = gsm8k_tasks
    lm = RaydllmLM(loaded=(backbone, tokenizer, cfg), gen_length=32, batch_size=3, **settings)
    metrics, protocol, results = run_harness(lm, [task], num_fewshot=1, limit=4, include_path=str(folder),
                                             include_defaults=False, log_samples=True)
    assert metrics[f"{task}/n"] == 4 and 0.0 <= metrics[f"{task}/exact_match/strict-match"] <= 1.0
    assert protocol["sampler"] == settings["sampler"] and protocol["shots"] == 1 and protocol["batch_size"] == 3
    sampler = effective_sampler(default_sampler(cfg, gen_length=32, block_length=settings.get("block_length"),
                                                method=settings["sampler"], threshold=settings.get("threshold", 0.9),
                                                cache=settings.get("cache", "none")), backbone)
    cached = backbone.forward_with_cache if sampler.cache != "none" else None
    answers = []
    for record in results["samples"][task]:
        (context, kwargs), = record["arguments"]
        ids = torch.tensor([tokenizer(context)["input_ids"][-(cfg.model.max_seq_len - 32):]])
        out = sample(backbone.logits, ids, torch.ones_like(ids), mask_id=backbone.ids.mask, config=sampler,
                     cached_forward=cached)
        text = decode_generations(tokenizer, out, ids.shape[1], eos_id=stop_ids(backbone, tokenizer))[0]
        assert record["resps"] == [[cut_at_stops(text, kwargs["until"])]]
        answers.append(text)
    assert any(answers)  # not a vacuous comparison of empty strings


def test_loglikelihood_task_through_lm_eval(tiny, gsm8k_tasks):
    from raydllm.sweep.harness import RaydllmLM, run_harness

    folder, _, task = gsm8k_tasks
    lm = RaydllmLM(loaded=(tiny[0], tiny[1], tiny[2]), mc_num=4)
    metrics, protocol, results = run_harness(lm, [task], num_fewshot=0, limit=2, include_path=str(folder),
                                             include_defaults=False, log_samples=True)
    assert 0.0 <= metrics[f"{task}/acc"] <= 1.0 and metrics[f"{task}/n"] == 2 and protocol["mc_num"] == 4
    scores = [resp[0][0] for record in results["samples"][task] for resp in record["resps"]]
    assert len(scores) == 4 and all(math.isfinite(s) and s < 0 for s in scores)


# -- raydllm eval --harness ---------------------------------------------------------------------------------
def _checkpoint(folder, cfg, state):
    """The layout worker.WorkerLoop.save leaves (as tests/test_evaluation.py builds it)."""
    (folder / "engine").mkdir(parents=True)
    torch.save({"module": {f"backbone.model.{k}": v for k, v in state.items()}, "step": 7},
               folder / "engine" / "mp_rank_00_model_states.pt")
    (folder / "raydllm.json").write_text(json.dumps({"step": 7, "data_position": 7, "config": cfg.to_dict()}))


def test_cli_harness_preset_scores_a_trial_and_logs_its_protocol(tiny, gsm8k_tasks, shared_data, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    SHARED_DATA = shared_data

    backbone, _, cfg = tiny
    checkpoint = tmp_path / "run" / "checkpoint_000007"
    _checkpoint(checkpoint, cfg, backbone.model.state_dict())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("raydllm-gsm8k", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment, tags={"raydllm.checkpoint": str(checkpoint)}).info.run_id
    # The preset's sampler (fast, block 32, threshold 0.9, dual cache) and shots (5), a shorter answer.
    args = build_parser().parse_args(["eval", run_id, "--harness-preset", "fast-dllm-gsm8k", "--data",
                                      str(SHARED_DATA / "gsm8k"), "--limit", "2", "--gen-length", "32",
                                      "--tracking-uri", uri, "--json", "--no-progress"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["run_id"] == run_id and result["tasks"] == ["gsm8k_local"]
    assert result["metrics"]["gsm8k_local/n"] == 2
    run = client.get_run(run_id).data
    assert "harness/fast-dllm-gsm8k/gsm8k_local/exact_match/strict-match" in run.metrics
    protocol = json.loads(run.tags["protocol/harness/fast-dllm-gsm8k"])
    assert {k: protocol[k] for k in ("name", "sampler", "threshold", "cache", "block_length", "gen_length",
                                     "shots", "dtype", "device_type")} == {
        "name": "fast-dllm-gsm8k", "sampler": "fast", "threshold": 0.9, "cache": "dual", "block_length": 32,
        "gen_length": 32, "shots": 5, "dtype": "float32", "device_type": "cpu"}
    import lm_eval
    assert protocol["lm_eval"] == lm_eval.__version__
    assert [a.path for a in client.list_artifacts(run_id, "harness")] == ["harness/results-fast-dllm-gsm8k.json"]
    args = build_parser().parse_args(["eval", run_id, "gsm8k", "--harness", "gsm8k", "--tracking-uri", uri])
    with pytest.raises(ConfigError, match="tasks are lm-eval's"):
        args.func(args)


def test_presets_are_the_published_protocols():
    llada, fast = PRESETS["llada-gsm8k"], PRESETS["fast-dllm-gsm8k"]
    assert (llada.tasks, llada.num_fewshot, llada.model_args) == (
        ("gsm8k",), 5, {"sampler": "exact", "gen_length": 1024, "steps": 1024, "block_length": 1024})
    assert (fast.tasks, fast.num_fewshot, fast.model_args) == (
        ("gsm8k",), 5, {"sampler": "fast", "gen_length": 256, "block_length": 32, "threshold": 0.9, "cache": "dual"})
    parser = build_parser()
    eval_parser = next(a for a in parser._subparsers._group_actions[0].choices.values()
                       if a.prog.endswith(" eval"))
    choices = next(a.choices for a in eval_parser._actions if a.dest == "harness_preset")
    assert tuple(choices) == tuple(PRESETS)


def test_without_lm_eval_the_harness_is_a_one_line_error(monkeypatch):
    from raydllm.evaluation.harness import require_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'raydllm\[harness\]'"):
        require_lm_eval()
    args = build_parser().parse_args(["eval", "some-run", "--harness", "gsm8k"])
    with pytest.raises(ConfigError, match=r"pip install 'raydllm\[harness\]'"):
        args.func(args)
