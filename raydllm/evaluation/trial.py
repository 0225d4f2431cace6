"""Evaluation layer: what each Ray Train worker of a trial runs: the engine's training loop (`worker.WorkerLoop`)
with the task's generation evaluation and the probes plugged in (in-trial `val_accuracy`, end-of-run figures)."""
from __future__ import annotations

import dataclasses
import time

import torch

from raydllm.engine.backbone import BaseView, load_backbone
from raydllm.core.config import validate
from raydllm.evaluation.evaluate import default_sampler, effective_sampler, evaluate_task, prompt_budget
from raydllm.evaluation.decode_cost import DECODE_OBJECTIVE
from raydllm.evaluation.protocol import protocol_tags, score_protocol
from raydllm.evaluation.item_scores import item_ids, log_item_scores, log_item_values
from raydllm.evaluation.probes import load_mmlu, mmlu_probe, run_probes, stratified_sample, wikitext_chunks, wikitext_loss
from raydllm.evaluation.sharding import Shard
from raydllm.core.sampler import SamplerConfig
from raydllm.data.tasks import get_task
from raydllm.engine.worker import WorkerLoop

# The per-report forgetting objective selects (ASHA rungs, NSGA-II, fronts), so it reads WikiText validation;
# the final probes the report prints read eval.probe_split (test by default). WikiText's validation and test
# are different articles, so the two never share text.
SELECTION_PROBE_SPLIT = "validation"


class TrialLoop(WorkerLoop):
    """A `WorkerLoop` that also generates answers and runs the probes, sharded over every rank of the trial
    (`sharding.Shard`): the same items and figures as one rank, in a world-th of the time."""

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        # Every rank takes a share of each evaluation pass; without a process group (world 1) it is all one's.
        self.shard = Shard.current() if self.world > 1 else Shard()
        self.tagged_protocols: set[str] = set()  # metrics whose protocol tag is on the run (tagged once)
        self.decode_figures: dict[str, float] = {}  # the last val_accuracy pass's decoding cost (fast sampler)
        # Read before training, so a bad eval.mmlu fails in seconds, not after the run.
        self.mmlu_rows = (stratified_sample(load_mmlu(cfg.eval.mmlu), cfg.eval.mmlu_items, cfg.eval.mmlu_seed)
                          if cfg.eval.mmlu and cfg.eval.final else None)
        self.forgetting_chunks, self.base_wikitext_loss = None, None
        if cfg.eval.report_probe_chunks:
            self._measure_base()

    def _measure_base(self) -> None:
        """Before step 1 the online weights are the base: its WikiText loss on the forgetting probe's chunks
        (every start, resumes included, since reports subtract it), and once per run the base's values of the
        per-report objectives as `base/*` metrics at step 0 (the base model's point on a sweep's Pareto plot)."""
        cfg = self.cfg
        self.forgetting_chunks = wikitext_chunks(
            self.tokenizer, cfg.eval.wikitext_path, split=SELECTION_PROBE_SPLIT,
            seq_len=min(cfg.eval.probe_seq_len, _max_len(cfg)), max_chunks=cfg.eval.report_probe_chunks)
        self.base_wikitext_loss = self._forgetting_loss()
        if self._rank0_value(lambda: float(self.sink.has("base/val_loss_diff"))):
            return  # a resumed run: logged by its first attempt
        base = {"base/val_loss_diff": self.validation_loss(), "base/wikitext_delta": 0.0}
        if cfg.eval.metric == "accuracy":
            base["base/val_accuracy"] = self.share.every_rank_value(self.validation_accuracy)
            base |= {"base/" + k: v for k, v in self.report_figures().items()}
        if self.rank == 0:
            base["base/wikitext_loss"] = self.base_wikitext_loss
        self.sink.add(0, base)
        self.sink.flush()

    def _forgetting_loss(self) -> float:
        cfg = self.cfg
        backbone = self.engine.module.backbone
        return wikitext_loss(backbone, self.tokenizer, chunks=self.forgetting_chunks, seed=cfg.eval.probe_seed,
                             batch_size=cfg.train.micro_batch_size, shard=self.shard)

    def report_figures(self) -> dict[str, float]:
        """Beside val_accuracy in each report: with eval.sampler=fast, its tokens per forward on the same items."""
        return dict(self.decode_figures)

    def forgetting_probe(self) -> dict[str, float]:
        """The forgetting objective at this report: WikiText loss now minus the base's, same chunks and masks."""
        loss = self._forgetting_loss()
        return {"wikitext_loss": loss, "wikitext_delta": loss - self.base_wikitext_loss}

    def sampler(self, method: str = "exact") -> SamplerConfig:
        """The resolved sampler settings of `method` (exact | fast), logged as the run's `sampler.*` params
        (`sampler.fast.*` for the fast one): every evaluation of the run uses them."""
        cfg = self.cfg
        sampler = default_sampler(cfg, gen_length=cfg.eval.gen_length, block_length=cfg.eval.block_length,
                                  steps=cfg.eval.sampler_steps, method=method, threshold=cfg.eval.threshold,
                                  cache=cfg.eval.cache if method == "fast" else "none",
                                  dream_algorithm=cfg.eval.dream_algorithm, dream_alg_temp=cfg.eval.dream_alg_temp)
        prefix = "sampler.fast." if method == "fast" else "sampler."
        self.sink.params({prefix + k: v for k, v in dataclasses.asdict(sampler).items()})
        return sampler

    def tag_protocol(self, protocol: dict, *metrics: str) -> None:
        """Each of `metrics` carries `protocol` on the run (MLflow tag `protocol/<metric>`), once per run."""
        new = {m: protocol for m in metrics if m not in self.tagged_protocols}
        for tag, value in protocol_tags(new).items():
            self.sink.tag(tag, value)
        self.tagged_protocols |= set(new)

    def _generate_metrics(self, limit: int, shots: int, method: str = "exact", decode_cost: dict | None = None
                          ) -> tuple[dict[str, float], list[dict], dict]:
        """(metrics, predictions, protocol) of one generation pass over the first `limit` validation items."""
        cfg = self.cfg
        sampler = self.sampler(method)
        backbone = self.engine.module.backbone
        protocol = score_protocol(effective_sampler(sampler, backbone), shots=shots,
                                  batch_size=cfg.train.micro_batch_size, backbone=backbone)
        backbone.eval()
        try:
            metrics, predictions = evaluate_task(
                backbone, self.tokenizer, get_task(cfg.task), self.val_examples[:limit], shots=shots,
                train_examples=self.train_examples, sampler=sampler, batch_size=cfg.train.micro_batch_size,
                progress=False, max_prompt_tokens=prompt_budget(cfg, sampler, shots), shard=self.shard,
                decode_cost=decode_cost)
            return metrics, predictions, protocol
        finally:
            backbone.train()

    def report_validation_loss(self) -> float:
        """The validation loss, with each sequence's share logged as `items/val_loss_diff.json` (rank 0), so a
        gain in val_loss_diff is paired over sequences and seeds as accuracy is over problems and seeds."""
        loss, shares = self.validation_losses()
        if shares is not None:
            ids = item_ids(self.val_examples)
            log_item_values(self.sink, "val_loss_diff", [ids[i] for i in shares], list(shares.values()), self.step)
        return loss

    def validation_accuracy(self) -> float:
        """The cheap per-report fidelity: `eval.sampler` (fast or exact) on the first `eval.gen_limit` items."""
        cost: dict[str, float] = {}
        metrics, predictions, protocol = self._generate_metrics(self.cfg.eval.gen_limit, 0, self.cfg.eval.sampler,
                                                                decode_cost=cost)
        self.tag_protocol(protocol, "val_accuracy", "base/val_accuracy")
        if self.cfg.eval.sampler == "fast":  # the decode-cost objective: the fast sampler's, on the same items
            self.decode_figures = {DECODE_OBJECTIVE: cost["tokens_per_forward"]}
            self.tag_protocol(protocol, DECODE_OBJECTIVE, "base/" + DECODE_OBJECTIVE)
        primary = get_task(self.cfg.task).primary_metric
        log_item_scores(self.sink, "val_accuracy", self.val_examples[:self.cfg.eval.gen_limit], predictions, primary,
                        self.step)
        return metrics[primary]

    def final_evaluation(self) -> dict[str, float]:
        """Generation accuracy per shot count with the exact sampler, and with `eval.sampler=fast` the fast
        sampler's on the same items too (`final_val_<metric>_fast`, for the rank agreement of the two over a
        sweep's trials); the probes against the base model and MMLU (when eval.mmlu names the data); every rank
        runs its share."""
        cfg = self.cfg
        out: dict[str, float] = {}
        primary = get_task(cfg.task).primary_metric
        methods = {"fast": ("exact", "fast"), "dream": ("dream",)}.get(cfg.eval.sampler, ("exact",))
        for shots in cfg.eval.final_shots:
            for method in methods:
                suffix = "/fast" if method == "fast" else ""
                metrics, _, protocol = self._generate_metrics(cfg.eval.final_limit, shots, method)
                out |= {f"final/val/{shots}shot{suffix}/{k}": float(v) for k, v in metrics.items()}
                headline = "final_val_" + primary + suffix.replace("/", "_")
                if headline not in out:
                    out[headline] = float(metrics[primary])
                    self.tag_protocol(protocol, headline)
                self.tag_protocol(protocol, f"final/val/{shots}shot{suffix}")
        if cfg.eval.probes or self.mmlu_rows is not None:
            finetuned = self.engine.module.backbone.eval()
            if self.lora:  # the frozen base is right there: the same weights with the adapters off
                base = BaseView(finetuned)
            else:
                torch.manual_seed(cfg.train.seed)  # the base = this run's starting weights, rebuilt the same way
                # In the training dtype, as the online model: no float32 copy of an 8B base on a bf16 run.
                base, _ = load_backbone(cfg.model.model_copy(update={"gradient_checkpointing": False}),
                                        dtype=torch.bfloat16 if self.bf16 else torch.float32)
                base.to(self.device).eval()
            with torch.no_grad():
                if cfg.eval.probes:
                    out |= run_probes(base, finetuned, self.tokenizer, t_low=cfg.jepa.t_low, t_high=cfg.jepa.t_high,
                                      wikitext_path=cfg.eval.wikitext_path, split=cfg.eval.probe_split,
                                      seq_len=min(cfg.eval.probe_seq_len, _max_len(cfg)),
                                      max_chunks=cfg.eval.probe_chunks, batch_size=cfg.train.micro_batch_size,
                                      seed=cfg.eval.probe_seed, shard=self.shard)
                if self.mmlu_rows is not None:
                    out |= mmlu_probe(base, finetuned, self.tokenizer, self.mmlu_rows, shard=self.shard)
            finetuned.train()
        return out


def _max_len(cfg) -> int:
    """The embedded model's length limit (a hub model's is not checked here)."""
    return cfg.model.max_seq_len if cfg.model.name == "tiny" else 1 << 30


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point. loop_config = {"config": Config dict, "tracking": {tracking_uri, run_id},
    "scheduled_at": epoch seconds}."""
    entered_at = time.time()
    import ray.train
    import ray.train.torch

    cfg = validate(loop_config["config"])
    context = ray.train.get_context()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    loop = TrialLoop(cfg, rank=context.get_world_rank(), world=context.get_world_size(),
                     device=ray.train.torch.get_device(), tracking=loop_config.get("tracking"))
    loop.run(scheduled_at=loop_config.get("scheduled_at"), entered_at=entered_at)
