"""The worker loop in one process (a one-rank gloo group, a real DeepSpeed engine, no Ray)."""
from pathlib import Path

import pytest
import torch

from raydllm.core.config import load_config
from raydllm.engine.worker import WorkerLoop

SMALL = ["model.init=random", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.synthetic_size=400",
         "data.val_limit=16", "train.micro_batch_size=8", "train.max_steps=40", "train.lr=3e-3"]


def _loop(*overrides):
    cfg = load_config("gsm8k", "local", SMALL + list(overrides))
    return WorkerLoop(cfg, rank=0, world=1, device=torch.device("cpu"))


def _count_forwards(module):
    counter = {"n": 0}
    module.register_forward_hook(lambda *_: counter.__setitem__("n", counter["n"] + 1))
    return counter


def test_baseline_has_no_ema_and_runs_no_target_forward(process_group):
    loop = _loop("jepa.lambda=0", "train.grad_accum=2")
    assert loop.ema is None
    online = _count_forwards(loop.engine.module.backbone)
    metrics = loop.train_step()
    assert online["n"] == 2 and "loss_jepa" not in metrics


def test_jepa_runs_one_target_forward_per_micro_batch(process_group):
    loop = _loop("jepa.lambda=1", "train.grad_accum=2")
    online, target = _count_forwards(loop.engine.module.backbone), _count_forwards(loop.ema.module)
    before = [p.detach().clone() for p in loop.ema.params]
    metrics = loop.train_step()
    assert online["n"] == 2 and target["n"] == 2 and metrics["loss_jepa"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, loop.ema.params))  # EMA moved after the step


def test_jepa_loss_dropout_skips_target_on_some_steps(process_group):
    loop = _loop("jepa.lambda=1", "jepa.target_prob=0.5")
    target = _count_forwards(loop.ema.module)
    for _ in range(12):
        loop.train_step()
    assert 0 < target["n"] < 12


def test_both_losses_fall(process_group):
    loop = _loop("jepa.lambda=1")
    history = [loop.train_step() for _ in range(40)]
    first = {k: sum(h[k] for h in history[:5]) / 5 for k in ("loss_diff", "loss_jepa")}
    last = {k: sum(h[k] for h in history[-5:]) / 5 for k in ("loss_diff", "loss_jepa")}
    assert last["loss_diff"] < 0.8 * first["loss_diff"], (first, last)
    assert last["loss_jepa"] < first["loss_jepa"], (first, last)


def test_checkpoint_restore_continues_exactly(process_group, tmp_path):
    a = _loop("jepa.lambda=1", "loss.anchor=l2")
    for _ in range(3):
        a.train_step()
    a.save(str(tmp_path))
    for _ in range(2):
        a.train_step()
    b = _loop("jepa.lambda=1", "loss.anchor=l2")
    b.restore(str(tmp_path))
    assert b.step == 3
    for _ in range(2):
        b.train_step()
    for p, q in zip(a.engine.module.parameters(), b.engine.module.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a.ema.params, b.ema.params):
        assert torch.equal(p, q)
    assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr()


def test_ema_in_host_memory_trains_identically(process_group):
    default, offloaded = _loop("jepa.lambda=1"), _loop("jepa.lambda=1", "jepa.ema_device=cpu")
    assert offloaded.ema.offload and not default.ema.offload
    for _ in range(2):
        assert default.train_step() == offloaded.train_step()
    for p, q in zip(default.ema.params, offloaded.ema.params):
        assert torch.equal(p, q)


def test_l2_anchor_holds_the_engines_weights_on_their_device_and_dtype(process_group):
    loop = _loop("jepa.lambda=0", "loss.anchor=l2", "loss.l2_lambda=1.0", "train.bf16=true")
    params = [p for p in loop.engine.module.backbone.parameters() if p.requires_grad]
    assert len(loop.anchor.bases) == len(params)
    for p, base in zip(params, loop.anchor.bases):
        assert base.dtype == p.dtype == torch.bfloat16 and base.device == p.device
        assert torch.equal(base, p) and base.data_ptr() != p.data_ptr()
    loop.anchor.measure = True
    loop.train_step()
    loop.train_step()
    assert loop.anchor.anchor_sq > 0 and loop.anchor.distance()[0] > 0


def test_checkpoints_at_rungs_and_the_end_only(process_group):
    loop = _loop("train.eval_every=5", "train.max_steps=40", "train.checkpoint_steps=[10,30]")
    due = []
    for step in range(5, 45, 5):
        loop.step = step
        due.append(loop.checkpoint_due())
    assert due == [False, True, False, False, False, True, False, True]  # steps 10, 30 and 40
    every = _loop("train.eval_every=5", "train.max_steps=40")
    every.step = 5
    assert every.checkpoint_due()  # nothing set: every report
def test_both_arms_on_one_seed_see_the_same_batches_and_context_views(process_group, monkeypatch):
    """The gain is paired by seed: at lambda = 0 and lambda = 1 the same seed gives the same micro-batches and
    the same context masks (the JEPA arm's target-view draws must not shift the next micro-batch's)."""
    import raydllm.engine.training_step as worker

    seen = []

    def recording(*args, generator, **kwargs):
        seen[-1].append((args[3].clone(), generator.get_state().clone()))  # x0 and the RNG the views are drawn from
        return real(*args, generator=generator, **kwargs)

    real = worker.dllm_jepa_losses
    monkeypatch.setattr(worker, "dllm_jepa_losses", recording)
    for lam in ("0", "1"):
        seen.append([])
        loop = _loop(f"jepa.lambda={lam}", "train.grad_accum=2")
        loop.train_step()
        loop.train_step()
    baseline, jepa = seen
    assert len(baseline) == len(jepa) == 4
    for (x_b, rng_b), (x_j, rng_j) in zip(baseline, jepa):
        assert torch.equal(x_b, x_j) and torch.equal(rng_b, rng_j)


def test_validation_loss_shares_per_sequence_average_to_it_and_reach_mlflow(process_group, tmp_path):
    """Each validation sequence's share of val_loss_diff (its masked CE / the mean masked count) is logged as
    items/val_loss_diff.json with the same item ids as per-problem correctness, and the shares' mean is the loss:
    the sweep layer pairs a loss gain over sequences and seeds."""
    import json

    from mlflow.tracking import MlflowClient

    from raydllm.core.config import load_config
    from raydllm.evaluation.item_scores import item_ids
    from raydllm.evaluation.trial import TrialLoop

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    cfg = load_config("gsm8k", "local", ["model.init=random", "model.d_model=32", "model.n_layers=2",
                                         "model.n_heads=2", "data.synthetic_size=200", "data.val_limit=7",
                                         "train.micro_batch_size=3", "eval.final=false"])
    loop = TrialLoop(cfg, rank=0, world=1, device=torch.device("cpu"),
                     tracking={"tracking_uri": uri, "run_id": run_id})
    loss, shares = loop.validation_losses()
    assert loss == pytest.approx(loop.validation_loss(), rel=1e-12)  # the same masks: the same figure
    # equal up to the float32 rounding of the per-batch means the loss sums
    assert sorted(shares) == list(range(7)) and sum(shares.values()) / 7 == pytest.approx(loss, rel=1e-6)
    assert len(set(shares.values())) > 1  # sequences differ: an item-level spread to bootstrap
    assert loop.report_validation_loss() == pytest.approx(loss, rel=1e-12)
    logged = json.loads((Path(client.download_artifacts(run_id, "items/val_loss_diff.json", str(tmp_path)))).read_text())
    ids = item_ids(loop.val_examples)
    assert logged["scores"] == pytest.approx({ids[i]: v for i, v in shares.items()})
