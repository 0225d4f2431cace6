"""Core layer: typed run configuration, validated once at the door.

A run's config is: built-in defaults <- a preset YAML (`raydllm/configs/<preset>.yaml`) <- `--set key=value`
overrides. Every field is checked here; nothing downstream re-validates. Errors are one line naming the
field, raised as `ConfigError` (the CLI turns it into exit code 2).
"""
from __future__ import annotations

import re
import warnings
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the field (or file) at fault."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class LoraSettings(_Section):
    """LoRA adapters (PEFT) on a frozen base: only the adapters and the predictor train. rank 0 = off (full
    fine-tuning)."""
    rank: int = Field(0, ge=0)
    alpha: float | None = Field(None, gt=0)  # None = 2 * rank: the same scaling alpha / rank at every rank
    dropout: float = Field(0.0, ge=0, lt=1)  # > 0 draws from the global RNG: a resumed run is then not bit-exact
    # Which linear layers get adapters: a list of module-name suffixes (PEFT's matching: "q_proj" matches
    # "...layers.3.self_attn.q_proj") or one regular expression that must match a module's full name.
    # None = the backbone's default (backbone.LORA_TARGETS: the embedded model, LLaDA, Dream).
    target_modules: list[str] | str | None = None
    # Load the frozen base in 4-bit NF4 (bitsandbytes; CUDA only, checked when the base is loaded).
    load_in_4bit: bool = False

    @model_validator(mode="after")
    def _quantized_base_needs_adapters(self):
        if self.load_in_4bit and self.rank == 0:
            raise ValueError("model.lora.load_in_4bit needs model.lora.rank > 0 (a 4-bit base cannot be trained)")
        return self


class ModelConfig(_Section):
    # "tiny" = the embedded bidirectional transformer; anything else is a Hugging Face id or local path.
    name: str = "tiny"
    # Weights to start the tiny model from: "pretrained" = the cached `raydllm pretrain` base, or a path.
    init: str = "random"
    d_model: int = Field(128, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    max_seq_len: int = Field(512, gt=0)
    # Run the model folder's own Python code (transformers' trust_remote_code): off unless a config asks. raydllm's
    # own classes load LLaDA, Dream and the embedded model without it; a hub repo's code would run with the
    # node's rights (its instance profile), so it is opt-in, for model.implementation=remote and foreign models.
    trust_remote_code: bool = False
    # The hub commit every node downloads (a 40-hex commit id, so a later push to the repo changes nothing);
    # None = the repo's main branch as it is at download time. Ignored for local folders and the tiny model.
    revision: str | None = None
    # Whose code runs a LLaDA / Dream folder: "auto" and "raydllm" = raydllm.core.archs (the hub's remote code does not
    # load under transformers 5); "remote" = the folder's own code (trust_remote_code, transformers 4.x).
    implementation: Literal["auto", "raydllm", "remote"] = "auto"
    mask_token_id: int | None = None  # None = the model's own (config / tokenizer / known family)
    shift_logits: bool | None = None  # None = auto: True for Dream-family models (token i predicted at i-1)
    gradient_checkpointing: bool = False
    lora: LoraSettings = LoraSettings()
    # How padded batches reach the backbone (backbone.PADDING_MODES): auto = probed at load time.
    padding: Literal["auto", "mask", "mask_4d", "rows"] = "auto"

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.name == "tiny" and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        return self

    @model_validator(mode="after")
    def _revision_is_a_hub_commit(self):
        if self.revision is None:
            return self
        if self.name == "tiny":
            raise ValueError("model.revision: the embedded tiny model has no hub revision")
        if not re.fullmatch(r"[0-9a-f]{40}", self.revision):
            raise ValueError(f"model.revision={self.revision!r}: give the hub commit's 40-hex-digit id (a branch or "
                             f"tag can move to other code and weights)")
        return self

    @model_validator(mode="after")
    def _remote_code_is_asked_for(self):
        if self.implementation == "remote" and not self.trust_remote_code:
            raise ValueError("model.trust_remote_code: model.implementation=remote runs the model folder's own code; "
                             "set model.trust_remote_code=true to allow it")
        return self


class DataConfig(_Section):
    # hub: datasets.load_dataset(<task hub id>); local: files at `path`; synthetic: generated offline.
    source: Literal["hub", "local", "synthetic"] = "hub"
    path: str | None = None
    max_prompt_tokens: int = Field(256, gt=0)
    # LLaDA SFT convention: answers are padded with EOS to this length and the EOS tokens are learned.
    answer_tokens: int = Field(256, gt=0)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    val_limit: int = Field(256, gt=0)  # validation rows used for the in-trial validation loss
    train_limit: int | None = Field(None, gt=0)
    synthetic_size: int = Field(4000, gt=0)
    split_seed: int = 0

    @model_validator(mode="after")
    def _local_needs_path(self):
        if self.source == "local" and not self.path:
            raise ValueError("data.path is required when data.source is local")
        return self


# Measured on the embedded model (README, "EMA precision"; tests/test_objective.py pins it): 1000 EMA updates at
# decay 0.996 while every weight moves 1e-5 a step (Adam at the paper's lr 1e-5).
BF16_EMA_WARNING = ("jepa.ema_dtype=bfloat16: a bf16 EMA at decay {decay} loses most of its updates (measured: "
                    "with weights moving 1e-5 a step, it keeps 32% of the float32 EMA's motion over 1000 updates and "
                    "43% of its weights never move); use float32, with jepa.ema_device=cpu if memory is short")


class JepaConfig(_Section):
    lam: float = Field(1.0, alias="lambda", ge=0)  # 0 = diffusion-only baseline: no EMA copy, no target pass
    k: int = Field(1, ge=0)  # predictor depth; 0 = identity predictor (no-predictor ablation)
    t_low: float = Field(0.2, gt=0, lt=1)  # context-view mask rate t_L
    t_high: float = Field(0.7, gt=0, lt=1)  # target-view mask rate t_H
    ema_decay: float = Field(0.996, ge=0, lt=1)
    # JEPA loss dropout: the target branch runs on this fraction of steps (LLM-JEPA's jepa_ratio).
    target_prob: float = Field(1.0, ge=0, le=1)
    ema_dtype: Literal["float32", "bfloat16"] = "float32"
    # Mask rates per sequence. "fixed" (paper): every sequence is viewed at t_low and t_high, so L_diff only
    # ever sees rate t_low. "uniform": each sequence draws t_L ~ U(0, 1) (LLaDA's SFT schedule, so L_diff
    # covers the fully masked answers generation starts from) and its target view hides the same share of
    # the context view's visible tokens as the fixed rates do: t_H = t_L + (1 - t_L)(t_high - t_low)/(1 - t_low).
    rate_sampling: Literal["fixed", "uniform"] = "fixed"
    # Where the EMA target lives. "auto": on the training device. "cpu": the master copy stays in host
    # memory (pinned when training on CUDA) and is streamed to the device one module at a time for the
    # target forward: for models whose EMA does not fit next to the ZeRO state (LLaDA-8B on 40 GB cards).
    ema_device: Literal["auto", "cpu"] = "auto"
    # Leave each answer's EOS fill (every EOS after the first) out of z in both views. The fill is the same in
    # every example and visible in both views, so it pulls z_L and z_H together whatever the answer says;
    # the diffusion loss still learns it. Off = the paper's pooling (README, "Pooling and the EOS fill").
    pool_exclude_eos_padding: bool = False

    @model_validator(mode="after")
    def _ordered_rates(self):
        if self.t_low > self.t_high:
            raise ValueError(f"jepa.t_low={self.t_low} must be <= jepa.t_high={self.t_high}")
        if self.t_low == self.t_high and self.lam > 0:
            warnings.warn(f"jepa.t_low == jepa.t_high == {self.t_low}: symmetric-view ablation", stacklevel=2)
        if self.ema_dtype == "bfloat16" and self.lam > 0:
            warnings.warn(BF16_EMA_WARNING.format(decay=self.ema_decay), stacklevel=2)
        return self


class LossConfig(_Section):
    # masked: mean CE over masked tokens (paper eq. 2). answer_length: LLaDA SFT form,
    # sum(CE / t) / answer_length per row, mean over rows.
    diffusion_norm: Literal["masked", "answer_length"] = "masked"
    # l2: the paper's L2-to-base comparison arm, lambda_l2 * ||theta - theta_base||^2 added on the gradient side.
    anchor: Literal["none", "l2"] = "none"
    l2_lambda: float = Field(1e-4, ge=0)


class TrainConfig(_Section):
    lr: float = Field(1e-5, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; None = derived from epochs
    epochs: float = Field(2.0, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, ge=0)
    eval_every: int = Field(50, gt=0)
    # Steps between checkpoints, a multiple of eval_every (checkpoints ride on reports); None = every report.
    # Fewer checkpoints = less time writing them, more steps re-done after a failure.
    checkpoint_every: int | None = Field(None, gt=0)
    # Steps where a scheduler decides (ASHA's rungs; `raydllm tune` fills it in): a checkpoint is saved at the
    # first report at or after each, and at the end, and (with checkpoint_every None) at no other report.
    checkpoint_steps: list[int] | None = None
    # sync: ray.train.report waits for the upload; async: training goes on while Ray uploads (Ray 2.60
    # CheckpointUploadMode.ASYNC) and deletes the staged copy after. Staging folder: $RAYDLLM_LOCAL_DIR,
    # else the node's NVMe at /opt/dlami/nvme when there is one, else the system temp folder.
    checkpoint_upload: Literal["sync", "async"] = "sync"
    # The final checkpoint holds export/ (save_pretrained weights + tokenizer); this adds export/ema/.
    export_ema: bool = False
    seed: int = 42
    zero_stage: int = Field(2, ge=0, le=3)
    bf16: Literal["auto"] | bool = "auto"
    workers: int = Field(2, gt=0)
    use_gpu: Literal["auto"] | bool = "auto"
    cpus_per_worker: float = Field(1, gt=0)
    # Custom Ray resources each worker also asks for, e.g. {"node_slot": 1} to take a whole node.
    extra_resources: dict[str, float] = {}
    checkpoints_to_keep: int = Field(2, gt=0)
    max_failures: int = Field(0, ge=-1)  # Ray Train worker failures tolerated inside one run
    # Worker-group start attempts (60 s each) before a run that cannot get its resources fails, instead
    # of Ray Train's default of retrying forever (a hang). -1 = forever (clusters that autoscale slowly).
    start_attempts: int = Field(10, ge=-1)


    @model_validator(mode="after")
    def _zero3_unsupported(self):
        if self.zero_stage == 3:
            raise ValueError("train.zero_stage=3 is not supported yet: the EMA update, the L2 anchor and rank-0 "
                             "generation assume unpartitioned parameters; use 2")
        return self

    @model_validator(mode="after")
    def _checkpoints_on_reports(self):
        if self.checkpoint_every is not None and self.checkpoint_every % self.eval_every:
            raise ValueError(f"train.checkpoint_every={self.checkpoint_every} must be a multiple of "
                             f"train.eval_every={self.eval_every} (checkpoints are saved with reports)")
        return self


class EvalConfig(_Section):
    # Validation diffusion loss: mean over these mask rates, fixed seed, so trials with different
    # t_L/t_H are compared on the same yardstick.
    val_mask_rates: list[float] = [0.2, 0.5, 0.8]
    val_seed: int = 1234
    # The cheap per-report metric for ASHA: val_loss_diff always; "accuracy" adds val_accuracy from
    # generating answers for the first `gen_limit` validation problems.
    metric: Literal["loss", "accuracy"] = "loss"
    gen_limit: int = Field(32, gt=0)
    # End of a run: generation accuracy on `final_limit` validation problems per shot count, and the
    # probes against the base model (WikiText diffusion loss at 50% masking, layer drift, collapse).
    final: bool = True
    final_limit: int = Field(64, gt=0)
    final_shots: list[int] = [0]
    probes: bool = True
    # WikiText split the final (reported) probes read: "test" (default) or "validation" (the paper's). The
    # per-report forgetting objective, which selects, always reads validation (evaluation/trial.py), so a space
    # that selects on wikitext_delta needs test here (search_space.py refuses validation).
    probe_split: Literal["validation", "test"] = "test"
    wikitext_path: str | None = None  # None: ../shared/data/wikitext/<valid|test>.txt if present, else the hub
    # probe_chunks windows of probe_seq_len tokens: the WikiText loss, the drift, and the collapse statistics
    # (both views of each window; the paper uses 100 samples).
    probe_chunks: int = Field(100, ge=2)
    probe_seq_len: int = Field(256, gt=1)
    probe_seed: int = 0  # masks of the WikiText loss and of the two views, and the 5,000 cosine pairs
    # The forgetting objective of a Pareto sweep, at every report: the WikiText diffusion loss (50% masking,
    # probe_seq_len tokens, probe_seed masks) on the first `report_probe_chunks` chunks of WikiText validation, reported
    # as wikitext_delta = that loss - the base's on the same chunks (the base: these weights before step 1).
    # 0 = off. Its cost is bounded by the chunk count and logged as time/forgetting_probe_s.
    report_probe_chunks: int = Field(0, ge=0)
    # MMLU in the final evaluation, when given: a hub id (e.g. cais/mmlu) or local files in MMLU's format
    # (<subject>_test.csv files, or jsonl rows {subject, question, choices, answer}); a stratified subset of
    # mmlu_items questions (same items for every model: seed mmlu_seed).
    mmlu: str | None = None
    mmlu_items: int = Field(500, gt=0)
    mmlu_seed: int = 0
    # Sampler (None = from data.answer_tokens: one token per step, LLaDA's low-confidence remasking).
    gen_length: int | None = Field(None, gt=0)
    block_length: int | None = Field(None, gt=0)
    sampler_steps: int | None = Field(None, gt=0)
    # Sampler of the in-trial val_accuracy: "exact" (LLaDA's) or "fast" (Fast-dLLM: commit every position of
    # the block above `threshold`, at least one a step; block KV cache `cache` where the backbone has one).
    # Final reports always use the exact sampler; with "fast" they also score the fast one on the same items.
    # "dream": Dream's own diffusion_generate (raydllm.core.dream_sampler) for Dream-family models, in-trial and in
    # the final reports (its scores are comparable with Dream's published ones; the exact sampler is LLaDA's).
    sampler: Literal["exact", "fast", "dream"] = "exact"
    dream_algorithm: Literal["origin", "maskgit_plus", "topk_margin", "entropy"] = "entropy"
    dream_alg_temp: float = Field(0.0, ge=0)
    threshold: float = Field(0.9, ge=0)
    cache: Literal["none", "prefix", "dual"] = "none"

    @model_validator(mode="after")
    def _rates_in_range(self):
        for r in self.val_mask_rates:
            if not 0 < r < 1:
                raise ValueError(f"eval.val_mask_rates entries must be in (0, 1), got {r}")
        if self.cache != "none" and self.sampler != "fast":
            raise ValueError(f"eval.cache={self.cache} needs eval.sampler=fast (the exact sampler has no cache)")
        return self


class RunConfig(_Section):
    name: str | None = None  # fixed name = Ray Train resumes the run with that name
    storage_path: str | None = None  # default: ./raydllm_runs (local); s3://... or shared FS on a cluster


class Config(_Section):
    task: str = "gsm8k"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    jepa: JepaConfig = JepaConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")

    def flat(self) -> dict[str, Any]:
        """`section.key -> value` (`model.lora.rank` for a sub-section), the form MLflow params and `--set` use."""
        return _flat_section(self) | {"task": self.task}


def _flat_section(section: _Section, prefix: str = "") -> dict[str, Any]:
    dumped = section.model_dump(by_alias=True, mode="json")
    out: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        key = field.alias or name
        value = getattr(section, name)
        if isinstance(value, _Section):
            out |= _flat_section(value, f"{prefix}{key}.")
        elif prefix:
            out[prefix + key] = dumped[key]
    return out


PRESETS = ("local", "paper", "wide-t")


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("raydllm").joinpath(f"configs/{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["jepa.lambda=0", "train.lr=1e-4"]` -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        value = yaml.safe_load(raw) if raw else ""
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {part} is not a section")
        node[leaf] = value
    return nested


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate(raw: dict[str, Any], *, source: str = "config") -> Config:
    """Build a Config or raise ConfigError with one line naming the first bad field."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        where = f"{source}: " if source != "config" else ""
        value = f"={err['input']!r}" if err["type"] not in ("extra_forbidden", "missing") and not isinstance(
            err.get("input"), dict) else ""
        raise ConfigError(f"{where}{field or 'config'}{value}: {msg}") from None


def load_config(task: str, preset: str | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> Config:
    raw: dict[str, Any] = {"task": task}
    if preset:
        raw = deep_merge(raw, preset_dict(preset))
    if extra:
        raw = deep_merge(raw, extra)
    if overrides:
        raw = deep_merge(raw, parse_overrides(overrides))
    return validate(raw)
