"""LLaDA's SFT data convention, seeded splits and the data order that makes resume exact."""
import pytest

from raydllm.engine.backbone import load_backbone
from raydllm.core.config import load_config
from raydllm.data.sft import collate, load_examples, micro_batch_indices, tokenize_sft
from raydllm.data.tasks import DataError, get_task


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(load_config("gsm8k", "local", ["model.init=random"]).model)


def test_answers_padded_with_eos_which_are_maskable(tiny):
    backbone, tokenizer = tiny
    cfg = load_config("gsm8k", "local")
    examples = load_examples(cfg, "train")[:6]
    records = tokenize_sft(examples, tokenizer, get_task("gsm8k"), max_prompt_tokens=96, answer_tokens=48,
                           eos_id=backbone.ids.eos)
    batch = collate(records, backbone.ids.pad)
    for row, record in enumerate(records):
        assert len(record.answer_ids) == 48 and record.answer_ids[-1] == backbone.ids.eos
        answer = batch.input_ids[row, batch.maskable[row]]
        assert answer.tolist() == record.answer_ids  # EOS padding is part of the answer
        pad = batch.attention_mask[row] == 0
        assert not batch.maskable[row][pad].any()
        assert (batch.input_ids[row][pad] == backbone.ids.pad).all()
        assert pad[: int(pad.sum())].all()  # prompts are left padded
    assert backbone.ids.pad != backbone.ids.mask


def test_validation_carved_from_train_seeded(shared_data):
    task = get_task("gsm8k")
    path = str(shared_data / "gsm8k")
    train = task.load("train", path, seed=0)
    val = task.load("validation", path, seed=0)
    assert len(train) + len(val) == 7473 and len(val) == round(7473 * 0.05)
    assert not {e.prompt for e in val} & {e.prompt for e in train}
    assert [e.prompt for e in task.load("validation", path, seed=0)] == [e.prompt for e in val]
    assert [e.prompt for e in task.load("validation", path, seed=1)] != [e.prompt for e in val]
    assert len(task.load("test", path)) == 1319
    assert val[0].meta["gold"] is not None and "<<" not in val[0].answer


def test_local_data_errors_name_the_file(tmp_path):
    task = get_task("gsm8k")
    with pytest.raises(DataError, match=str(tmp_path)):
        task.load("train", str(tmp_path))
    (tmp_path / "train.jsonl").write_text('{"question": "q", "reply": "a"}\n')
    with pytest.raises(DataError, match="answer"):
        task.load("train", str(tmp_path))
    with pytest.raises(DataError, match="unknown task"):
        get_task("nope")


def test_local_answer_budget_fits_every_generated_answer_and_a_cut_warns(tiny, caplog):
    """The local preset's data.answer_tokens holds every generated answer with its final `#### n` and an EOS;
    a budget that cuts answers says so (a cut answer teaches the model to stop before the final number)."""
    backbone, tokenizer = tiny
    cfg = load_config("gsm8k", "local")
    examples = load_examples(cfg, "train")
    with caplog.at_level("WARNING", logger="raydllm.data.sft"):
        records = tokenize_sft(examples, tokenizer, get_task("gsm8k"), max_prompt_tokens=96,
                               answer_tokens=cfg.data.answer_tokens, eos_id=backbone.ids.eos)
    assert not caplog.records
    decoded = tokenizer.decode([t for t in records[0].answer_ids if t != backbone.ids.eos])
    assert decoded.strip() == examples[0].answer
    with caplog.at_level("WARNING", logger="raydllm.data.sft"):
        tokenize_sft(examples, tokenizer, get_task("gsm8k"), max_prompt_tokens=96, answer_tokens=20,
                     eos_id=backbone.ids.eos)
    assert "data.answer_tokens=20 cuts" in caplog.text


def test_synthetic_is_gsm8k_format_and_splits_disjoint():
    cfg = load_config("gsm8k", "local")
    train, val, test = (load_examples(cfg, s) for s in ("train", "validation", "test"))
    assert all("####" in e.answer and e.meta["gold"] is not None for e in train[:50])
    assert len(train) + min(len(val), cfg.data.val_limit) <= cfg.data.synthetic_size
    assert test and test[0].prompt != train[0].prompt


def test_micro_batches_disjoint_across_ranks_and_deterministic():
    kwargs = dict(micro_batch_size=4, grad_accum=2, seed=5)
    n = 50
    seen = []
    for step in range(3):
        for micro in range(2):
            for rank in range(2):
                seen += micro_batch_indices(n, step=step, micro=micro, rank=rank, world=2, **kwargs)
    assert len(seen) == 48 and len(set(seen)) == 48  # first epoch: no repeats across ranks and steps
    assert micro_batch_indices(n, step=7, micro=1, rank=1, world=2, **kwargs) == \
        micro_batch_indices(n, step=7, micro=1, rank=1, world=2, **kwargs)
