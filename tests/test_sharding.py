"""Evaluation passes sharded over a two-process gloo group (torch.multiprocessing, no Ray) give the same items, the
same per-item results and the same metrics as one rank, and each rank runs only its share of the forwards."""
import pytest
import torch
import torch.multiprocessing as mp

from raydllm.core.config import load_config
from raydllm.evaluation.sharding import Shard, map_batches

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.answer_tokens=16",
         "data.max_prompt_tokens=64", "data.val_limit=10", "model.init=random"]
MMLU_ROWS = [{"subject": f"s{i % 3}", "question": f"Which letter comes {i} places after A?",
              "choices": ["one", "two", "three", "four"], "answer": i % 4} for i in range(7)]


def _evaluation_passes(shard: Shard) -> dict:
    """Every kind of pass a trial shards (generation, the WikiText loss, drift, views, MMLU) on a tiny model."""
    from raydllm.data.sft import load_examples
    from raydllm.data.tasks import get_task
    from raydllm.engine.backbone import load_backbone
    from raydllm.evaluation.evaluate import default_sampler, evaluate_task
    from raydllm.evaluation.probes import mmlu_subset, run_probes, wikitext_chunks, wikitext_loss

    torch.set_num_threads(1)
    cfg = load_config("gsm8k", "local", SMALL)
    torch.manual_seed(0)
    backbone, tokenizer = load_backbone(cfg.model)
    torch.manual_seed(1)
    other, _ = load_backbone(cfg.model)
    calls = {"logits": 0}
    logits = backbone.logits

    def counted(*args, **kwargs):
        calls["logits"] += 1
        return logits(*args, **kwargs)

    backbone.logits = counted
    examples = load_examples(cfg, "validation")[:10]
    sampler = default_sampler(cfg, gen_length=16, block_length=8, steps=8)
    cost = {}
    metrics, predictions = evaluate_task(backbone, tokenizer, get_task("gsm8k"), examples, sampler=sampler,
                                         batch_size=3, progress=False, shard=shard, max_prompt_tokens=64,
                                         decode_cost=cost)
    generation_calls = calls["logits"]
    chunks = wikitext_chunks(tokenizer, split="validation", seq_len=32, max_chunks=9)
    loss = wikitext_loss(backbone, tokenizer, chunks=chunks, batch_size=2, seed=3, shard=shard)
    probes = run_probes(other, backbone, tokenizer, t_low=0.2, t_high=0.6, split="validation", seq_len=32,
                        max_chunks=9, batch_size=2, seed=3, shard=shard)
    mmlu = mmlu_subset(backbone, tokenizer, MMLU_ROWS, shard=shard)
    return {"metrics": metrics, "predictions": predictions, "loss": loss, "probes": probes, "mmlu": mmlu,
            "generation_calls": generation_calls, "decode_cost": cost}


def _rank(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist

    # A file rendezvous: no TCP port to collide with a neighbour's.
    dist.init_process_group("gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=world)
    try:
        torch.save(_evaluation_passes(Shard.current()), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def passes(tmp_path_factory, shared_data):
    out = str(tmp_path_factory.mktemp("shards") / "result")
    mp.spawn(_rank, args=(2, out), nprocs=2, join=True)
    sharded = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    return _evaluation_passes(Shard()), sharded


def test_sharded_generation_matches_one_rank_item_by_item(passes):
    one, sharded = passes
    assert len(one["predictions"]) == 10
    for rank_result in sharded:  # every rank holds the whole pass
        assert rank_result["predictions"] == one["predictions"]
        assert rank_result["metrics"] == one["metrics"]
        assert rank_result["decode_cost"] == one["decode_cost"] and one["decode_cost"]["row_forwards"] == 10 * 8
    # 10 items in batches of 3 = 4 batches: rank 0 runs batches 0 and 2, rank 1 batches 1 and 3.
    calls = [r["generation_calls"] for r in sharded]
    assert all(c > 0 for c in calls) and sum(calls) == one["generation_calls"]


def test_sharded_probes_match_one_rank(passes):
    one, sharded = passes
    for rank_result in sharded:
        assert rank_result["loss"] == one["loss"]  # summed in one rank's order: equal to the bit
        assert rank_result["probes"] == one["probes"]
        assert rank_result["mmlu"] == one["mmlu"] and one["mmlu"]["n"] == 7.0


def test_map_batches_runs_only_its_share_and_skips_the_rest():
    assert map_batches([1, 2, 3], lambda b: b * 10) == [10, 20, 30]
    assert Shard(1, 2).owns(3) and not Shard(1, 2).owns(2)
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        Shard(2, 2)
    computed, skipped = [], []

    class NoPeers(Shard):  # rank 1 of 2 whose gather brings back the other rank's results as None
        def merge(self, mine):
            return {i: mine.get(i) for i in range(3)}

    out = map_batches([1, 2, 3], lambda b: computed.append(b) or b, NoPeers(1, 2), skipped.append)
    assert computed == [2] and skipped == [1, 3] and out == [None, 2, None]


def test_bench_eval_times_both_arms_and_checks_their_figures(shared_data):
    from raydllm.bench.eval_shards import bench_eval_sharding, format_eval_bench

    cfg = load_config("gsm8k", "local", SMALL + ["eval.gen_limit=6", "eval.final_limit=6", "eval.probe_chunks=4",
                                                 "eval.probe_seq_len=32", "train.micro_batch_size=3",
                                                 "data.synthetic_size=60"])
    result = bench_eval_sharding(cfg, repeats=1)
    assert [arm["workers"] for arm in result["arms"]] == [1, 2]
    assert all(arm["generation_figures_equal"] for arm in result["arms"]) and result["arms"][0]["speedup"] == 1.0
    assert result["arms"][1]["eval_s"] > 0 and "2 worker(s)" in format_eval_bench(result)
    for arm in result["arms"]:  # the phase's parts, each timed to its slowest rank, add up to the phase
        assert set(arm["parts_s"]) == {"val_loss", "val_accuracy", "final_evaluation"}
        assert sum(arm["parts_s"].values()) <= arm["eval_s"] * (1 + 1e-6)
    with pytest.raises(ValueError, match="first world size must be 1"):
        bench_eval_sharding(cfg, worlds=(2,))
