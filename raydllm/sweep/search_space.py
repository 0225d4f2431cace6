"""Sweep layer: search-space YAML files (`search_spaces/<task>.yaml`): schema, validation, and the Tune objects they become.

A file is validated completely before Ray starts: the schema, every config key (by building a trial config
at each end of each distribution), the metric, and the t_L < t_H constraint. The constraint is enforced by
the space itself: every t_L the space can draw is below every t_H it can draw, so the sampler cannot
produce an invalid pair and no trial is spent discovering one.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raydllm.sweep.compute_match import with_match
from raydllm.core.config import ConfigError, Config, deep_merge, parse_overrides, preset_dict, validate

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SEARCHABLE_METRICS = ("val_loss_diff", "loss_diff", "loss_total", "val_accuracy")
METRIC_MODES = {"val_loss_diff": "min", "loss_diff": "min", "loss_total": "min", "val_accuracy": "max"}
# A Pareto sweep's objectives: the searchable metrics, and forgetting (eval.report_probe_chunks, trial.py).
# decode_tokens_per_forward: the fast sampler's answer tokens per forward on the val_accuracy items (max: faster).
OBJECTIVE_MODES = METRIC_MODES | {"wikitext_delta": "min", "decode_tokens_per_forward": "max"}
FORGETTING_PROBE_CHUNKS = 16  # eval.report_probe_chunks when a space optimises wikitext_delta and sets none


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """Exactly one of: choice/grid (a list of values), uniform/loguniform [low, high], randint [low, high]
    (both ends included)."""
    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one distribution of {', '.join(DISTRIBUTIONS)}")
        kind = given[0]
        values = getattr(self, kind)
        if kind in ("choice", "grid") and not values:
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not values[0] < values[1] + (kind == "randint"):
            raise ValueError(f"{kind} needs low < high, got {list(values)}")
        if kind == "loguniform" and values[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    @property
    def support(self) -> list[Any]:
        """Values that bound what the distribution can draw (ends of a range, or every listed value)."""
        values = getattr(self, self.kind)
        return list(values)

    def to_tune(self):
        from ray import tune

        kind, values = self.kind, getattr(self, self.kind)
        if kind == "choice":
            return tune.choice(values)
        if kind == "grid":
            return tune.grid_search(values)
        if kind == "uniform":
            return tune.uniform(*values)
        if kind == "loguniform":
            return tune.loguniform(*values)
        return tune.randint(values[0], values[1] + 1)  # tune.randint excludes the upper end


class AshaSettings(_Strict):
    # asha: early stopping on `step`; fifo: every trial runs to max_t (the full-grid arm of `bench sweep`).
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(gt=0)
    reduction_factor: float = Field(3, gt=1)
    max_t: int | None = Field(None, gt=0)  # default: the trials' train.max_steps


class SearchSettings(_Strict):
    algorithm: Literal["random", "grid", "optuna"] = "random"
    seed: int | None = 0
    # optuna's sampler: TPE (the default with one metric), or NSGA-II (the default with several objectives)
    sampler: Literal["tpe", "nsga2"] | None = None


ACCELERATOR_SHARE = 0.001  # what Ray Train asks of `accelerator_type:<type>` per worker (a node has 1)


class Resources(_Strict):
    workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1, gt=0)
    use_gpu: bool = False
    # The GPU type every worker needs, as Ray names it (e.g. A100-80G): each worker asks for a sliver of the
    # node's `accelerator_type:<type>` resource, as Ray Train's ScalingConfig(accelerator_type=...) does.
    accelerator_type: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    custom: dict[str, float] = {}  # custom Ray resources per worker (e.g. a node type's marker resource)

    @model_validator(mode="after")
    def _gpu_type_needs_gpu(self):
        if self.accelerator_type and not self.use_gpu:
            raise ValueError("accelerator_type needs use_gpu: true")
        return self

    def per_worker_extra(self) -> dict[str, float]:
        """Ray resources each worker asks for beyond CPU and GPU."""
        gpu_type = {f"accelerator_type:{self.accelerator_type}": ACCELERATOR_SHARE} if self.accelerator_type else {}
        return {**gpu_type, **self.custom}


class RepeatSettings(_Strict):
    """Re-run each arm's winner (the DLLM-JEPA arm's best `top` configs and the baseline arm's best) with every
    seed after the first: the fresh seeds the gain is measured on."""
    top: int = Field(0, ge=0)


class BaselineSettings(_Strict):
    """The lambda = 0 arm. `searched`: its own search, under the same scheduler, over every searched key that
    changes the lambda = 0 loss (`baseline_keys`), with `num_samples` trials (default: the DLLM-JEPA arm's).
    `pinned`: one trial at the space's fixed values, only when the space searches no such key. None = whichever
    of the two the space calls for (`baseline: true`)."""
    mode: Literal["searched", "pinned"] | None = None
    num_samples: int | None = Field(None, gt=0)
    # steps: the DLLM-JEPA arm's step count; compute: its FLOPs (4/3 of the steps, rungs alike; compute_match.py)
    match: Literal["steps", "compute"] = "steps"


class SweepSpec(_Strict):
    task: str
    preset: str = "local"
    name: str | None = None
    # The metric a single-objective sweep selects on; in a Pareto sweep (`objectives:`) the one the progress view
    # and the single-metric tables show (default: the first objective that is a searchable metric).
    metric: Literal["val_loss_diff", "loss_diff", "loss_total", "val_accuracy"] | None = None
    mode: Literal["min", "max"] | None = None
    # A Pareto sweep: two or more objectives, in order, each with its mode, e.g. {val_loss_diff: min,
    # wikitext_delta: min}; every trial reports all of them at every report.
    objectives: dict[str, Literal["min", "max"]] | None = None
    fixed: dict[str, Any] = {}
    space: dict[str, Distribution]
    baseline: bool | BaselineSettings = True  # the lambda = 0 arm: true (mode from the space), false, or settings
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
    repeat: RepeatSettings = RepeatSettings()
    scheduler: AshaSettings
    search: SearchSettings = SearchSettings()
    num_samples: int = Field(8, gt=0)
    max_concurrent_trials: int = Field(2, gt=0)
    resources: Resources = Resources()
    max_failures: int = Field(0, ge=0)  # Tune-level retries of a whole trial
    # The effect the space is meant to find, in the metric's units (e.g. 0.018: 1.8 accuracy points): `raydllm
    # detect` checks the selection yardstick against it and says how many fresh seeds the report needs for it.
    target_effect: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.objectives is not None:
            self._check_objectives()
        elif self.metric is None:
            raise ValueError("metric: required (or objectives: for a Pareto sweep)")
        if self.mode is None:
            self.mode = METRIC_MODES[self.metric]
        if self.search.sampler and self.search.algorithm != "optuna":
            raise ValueError(f"search.sampler: {self.search.sampler} is an optuna sampler; search.algorithm is "
                             f"{self.search.algorithm}")
        if "train.seed" in self.space:
            raise ValueError("space.train.seed: seeds are given by `seeds:`, not searched")
        if self.search.algorithm == "optuna" and any(d.kind == "grid" for d in self.space.values()):
            raise ValueError("search.algorithm: optuna cannot run grid distributions; use choice")
        if self.baseline is True:
            self.baseline = BaselineSettings()
        if isinstance(self.baseline, BaselineSettings) and self.baseline.mode == "pinned" \
                and self.baseline.num_samples is not None:
            raise ValueError("baseline.num_samples: a pinned baseline is one trial; give num_samples with "
                             "mode: searched")
        return self

    def _check_objectives(self) -> None:
        if len(self.objectives) < 2:
            raise ValueError("objectives: give at least two (a single one is metric:)")
        for name, mode in self.objectives.items():
            if name not in OBJECTIVE_MODES:
                raise ValueError(f"objectives.{name}: unknown objective; one of {', '.join(OBJECTIVE_MODES)}")
            if mode != OBJECTIVE_MODES[name]:
                raise ValueError(f"objectives.{name}: {name} is better {'lower' if mode == 'max' else 'higher'}, "
                                 f"so its mode is {OBJECTIVE_MODES[name]}, not {mode}")
        if self.metric is None:
            self.metric = next((name for name in self.objectives if name in METRIC_MODES), None)
            if self.metric is None:
                raise ValueError("metric: none of the objectives is a searchable metric; name one with metric:")
        elif self.metric not in self.objectives:
            raise ValueError(f"metric: {self.metric} is not one of the objectives ({', '.join(self.objectives)})")
        if "wikitext_delta" in self.objectives:  # its cost: this many chunks scored at every report
            self.fixed.setdefault("eval.report_probe_chunks", FORGETTING_PROBE_CHUNKS)

    @property
    def selection_seed(self) -> int:
        return self.seeds[0]

    @property
    def fresh_seeds(self) -> list[int]:
        return self.seeds[1:]


def load_spec(path: str | Path, extra_fixed: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a space file; errors are one line naming the file and the key.

    `extra_fixed` (--set values, the data path from --data) joins the file's `fixed:` before validation."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such search-space file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if context is not None and mark is not None and context.line != mark.line:
            problem += f", {exc.context} that starts on line {context.line + 1}"
        raise ConfigError(f"{path}: {where}not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if extra_fixed:
        space = raw.get("space") if isinstance(raw.get("space"), dict) else {}
        searched = sorted(set(extra_fixed) & set(space))
        if searched:
            raise ConfigError(f"{path}: --set {searched[0]}: the space searches this key; fix it in the file instead")
        raw["fixed"] = {**(raw.get("fixed") or {}), **extra_fixed}
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}: {field or 'file'}: {msg}") from None
    check_against_config(spec, path)
    _check_searcher_installed(spec, path)
    return spec


SEARCHER_PACKAGES = {"optuna": "optuna"}  # search.algorithm -> the package Ray Tune's searcher imports


def _check_searcher_installed(spec: SweepSpec, path: Path) -> None:
    import importlib.util

    package = SEARCHER_PACKAGES.get(spec.search.algorithm)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"{path}: search.algorithm: {spec.search.algorithm} needs the {package} package, which "
                          f"is not installed here (pip install {package})")


def base_raw(spec: SweepSpec) -> dict[str, Any]:
    """The config every trial starts from: task <- preset <- resources <- fixed."""
    raw = deep_merge({"task": spec.task}, preset_dict(spec.preset))
    res = spec.resources
    raw = deep_merge(raw, parse_overrides([f"train.workers={res.workers}",
                                           f"train.cpus_per_worker={res.cpus_per_worker}",
                                           f"train.use_gpu={str(res.use_gpu).lower()}"]))
    raw = deep_merge(raw, {"train": {"extra_resources": res.per_worker_extra()}})
    return deep_merge(raw, _nest(spec.fixed))


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def trial_config(spec: SweepSpec, sampled: dict[str, Any], seed: int) -> Config:
    # Every dotted key of a trial's Tune config is a config field (searched, pinned baseline, or seed).
    raw = deep_merge(base_raw(spec), _nest({k: v for k, v in sampled.items() if "." in k}))
    raw = deep_merge(raw, {"train": {"seed": seed}})
    return validate(raw)


def check_against_config(spec: SweepSpec, path: Path) -> None:
    """Build the trial configs at the corners of the space, so a bad key or value fails now, not in trial 5."""
    try:
        base = validate(base_raw(spec), source=f"{path}: fixed")
    except ConfigError as exc:
        raise ConfigError(str(exc)) from None
    if spec.scheduler.max_t is None and not base.train.max_steps:
        raise ConfigError(f"{path}: scheduler.max_t: required when fixed train.max_steps is not set")
    for key, dist in spec.space.items():
        for value in dist.support:
            # A searched t_low is judged against the file's t_high range (its top), not the preset's t_high,
            # and the other way round; the ranges themselves are compared below.
            point = {key: value} | _widest_partner(spec, key)
            try:
                validate(deep_merge(base_raw(spec), _nest(point)))
            except ConfigError as exc:
                raise ConfigError(f"{path}: space.{key}: {exc}") from None
    low = _support(spec, base, "jepa.t_low", lambda c: c.jepa.t_low)
    high = _support(spec, base, "jepa.t_high", lambda c: c.jepa.t_high)
    if max(low) >= min(high):
        raise ConfigError(f"{path}: space.jepa.t_low/jepa.t_high: every t_low must be below every t_high "
                          f"(t_low up to {max(low)}, t_high from {min(high)})")
    for name in spec.objectives or {spec.metric: spec.mode}:
        if name == "val_accuracy" and base.eval.metric != "accuracy":
            raise ConfigError(f"{path}: {'objectives' if spec.objectives else 'metric'}: val_accuracy is reported "
                              f"only with fixed eval.metric: accuracy")
        if name == "decode_tokens_per_forward" and (base.eval.metric != "accuracy" or base.eval.sampler != "fast"):
            raise ConfigError(f"{path}: objectives: decode_tokens_per_forward is reported only with fixed "
                              f"eval.metric: accuracy and eval.sampler: fast (the fast sampler's val_accuracy pass)")
        if name == "wikitext_delta" and not base.eval.report_probe_chunks:
            raise ConfigError(f"{path}: objectives: wikitext_delta is reported only with eval.report_probe_chunks > 0")
        if name == "wikitext_delta" and base.eval.probe_split == "validation":
            raise ConfigError(f"{path}: eval.probe_split: validation is what wikitext_delta selects on; the "
                              f"reported probes must read test")
    resolve_baseline(spec, base, path)
    warmup = math.ceil(base.train.warmup_ratio * (spec.scheduler.max_t or base.train.max_steps))
    if spec.scheduler.type == "asha" and spec.scheduler.grace_period < warmup:
        # Measured (README, bench sweep): mid-warm-up, high learning rates still look worst and are cut.
        warnings.warn(f"{path}: scheduler.grace_period={spec.scheduler.grace_period} ends inside the learning-rate "
                      f"warm-up ({warmup} steps): ASHA would judge trials before they reach their learning rate",
                      stacklevel=2)


def _widest_partner(spec: SweepSpec, key: str) -> dict[str, Any]:
    """For a searched jepa.t_low (t_high): the searched t_high (t_low) value that leaves it the most room."""
    partner = {"jepa.t_low": "jepa.t_high", "jepa.t_high": "jepa.t_low"}.get(key)
    if partner not in spec.space:
        return {}
    values = [v for v in spec.space[partner].support if isinstance(v, (int, float))]
    if not values:
        return {}
    return {partner: max(values) if partner == "jepa.t_high" else min(values)}


def _support(spec: SweepSpec, base: Config, key: str, read) -> list[float]:
    return [float(v) for v in spec.space[key].support] if key in spec.space else [read(base)]


def rung_steps(grace: int, factor: float, max_t: int) -> list[int]:
    """ASHA's milestones below max_t: grace * factor^k (Ray's one-bracket AsyncHyperBandScheduler)."""
    count = int(math.log(max_t / grace) / math.log(factor) + 1) if max_t >= grace else 0
    return sorted(int(grace * factor ** k) for k in range(count))


def max_steps(spec: SweepSpec) -> int:
    return spec.scheduler.max_t or validate(base_raw(spec)).train.max_steps


# One Tune dimension of whole configs: an ASHA sweep's shuffled grid, and the repeat phase's best configs.
GRID_POINT = "point"


def param_space(spec: SweepSpec, dists: dict[str, Distribution] | None = None) -> dict[str, Any]:
    """The Tune space of `dists` (default: the whole space, the DLLM-JEPA arm) on the selection seed."""
    dists = spec.space if dists is None else dists
    grid = {key: dist.grid for key, dist in dists.items() if dist.kind == "grid"}
    shuffle = spec.scheduler.type == "asha" and math.prod(len(v) for v in grid.values()) > 1
    space = {key: dist.to_tune() for key, dist in dists.items() if not (shuffle and key in grid)}
    if shuffle:
        # Tune walks a grid in a fixed nested order, and async ASHA promotes trials that reach a rung before
        # their rivals: when the metric improves along that order (e.g. ascending lr), every new trial beats
        # the ones before and is promoted. Shuffled (seeded, so a resumed sweep sees the same order), the grid
        # reaches ASHA in random order, as random search does.
        from ray import tune

        points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
        random.Random(spec.search.seed or 0).shuffle(points)
        space[GRID_POINT] = tune.grid_search(points)
    return space | {"train.seed": spec.seeds[0]}


def flatten_trial_config(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's config with its whole-config point spread back into its keys (the trial's own keys, such
    as a repeat's new seed, win)."""
    if GRID_POINT not in config:
        return config
    return config[GRID_POINT] | {k: v for k, v in config.items() if k != GRID_POINT}


# Keys that only act through the JEPA term: at lambda = 0 no EMA, predictor or target view exists.
JEPA_ONLY_KEYS = ("jepa.lambda", "jepa.k", "jepa.t_high", "jepa.ema_decay", "jepa.target_prob", "jepa.ema_dtype",
                  "jepa.ema_device")


def baseline_keys(spec: SweepSpec, base: Config | None = None) -> list[str]:
    """The searched keys that change the lambda = 0 arm's training: every key but the JEPA-only ones, and
    jepa.t_low only where it sets L_diff's mask rate. With `jepa.rate_sampling: uniform` (fixed, not searched)
    each sequence's context rate is drawn from U(0, 1) whatever t_low is, and t_low only sets the target view's
    share (`objective.view_rates`): at lambda = 0 it changes nothing."""
    base = base or validate(base_raw(spec))
    uniform = base.jepa.rate_sampling == "uniform" and "jepa.rate_sampling" not in spec.space
    return sorted(k for k in spec.space if k not in JEPA_ONLY_KEYS and not (k == "jepa.t_low" and uniform))


def resolve_baseline(spec: SweepSpec, base: Config, path: Path | str = "space") -> None:
    """Fill in the baseline arm's mode and size, or refuse a baseline that would not be on equal terms."""
    if not isinstance(spec.baseline, BaselineSettings):
        return
    keys = baseline_keys(spec, base)
    mode = spec.baseline.mode or ("searched" if keys else "pinned")
    if mode == "pinned" and keys:
        raise ConfigError(f"{path}: baseline.mode: pinned, but the space searches {', '.join(keys)}, which "
                          f"change{'s' if len(keys) == 1 else ''} the lambda = 0 loss too: a pinned baseline "
                          f"would be confounded; use mode: searched or fix {'it' if len(keys) == 1 else 'them'}")
    if mode == "searched" and not keys:
        raise ConfigError(f"{path}: baseline.mode: searched, but the space searches no key that changes the "
                          f"lambda = 0 loss (only {', '.join(sorted(spec.space))}); use mode: pinned")
    spec.baseline = BaselineSettings(mode=mode, num_samples=(spec.baseline.num_samples or spec.num_samples)
                                     if mode == "searched" else None, match=spec.baseline.match)


def baseline_arm(spec: SweepSpec) -> BaselineSettings | None:
    """The resolved baseline settings (mode and num_samples filled in), or None for a sweep without one."""
    if not isinstance(spec.baseline, BaselineSettings):
        return None
    if spec.baseline.mode is None:
        resolve_baseline(spec, validate(base_raw(spec)))
    return spec.baseline


def baseline_point(spec: SweepSpec) -> dict[str, Any]:
    """The pinned lambda = 0 arm: the base config's value for every searched key."""
    flat = validate(base_raw(spec)).flat()
    point = {key: flat[key] for key in spec.space if key in flat}
    point["jepa.lambda"] = 0.0
    return point


def baseline_space(spec: SweepSpec) -> dict[str, Any]:
    """The searched baseline arm's Tune space: lambda = 0, the JEPA-only keys at the base config's values (they
    do nothing at lambda = 0; pinned so its trials are named and grouped alike), and every other searched key
    with the DLLM-JEPA arm's own distribution."""
    keys = baseline_keys(spec)
    point = {k: v for k, v in baseline_point(spec).items() if k not in keys}
    return with_match(spec, param_space(spec, {k: spec.space[k] for k in keys}) | point, max_steps(spec))


def arm_of(config: dict[str, Any]) -> str:
    """"baseline" for a lambda = 0 trial without the L2 anchor, else "dllm-jepa"."""
    lam = float(config.get("jepa.lambda", 1.0))
    return "baseline" if lam == 0 and config.get("loss.anchor", "none") == "none" else "dllm-jepa"


_SHORT = {"jepa.lambda": "λ", "jepa.k": "k", "train.lr": "lr"}


def trial_label(spec: SweepSpec, config: dict[str, Any], phase: str) -> str:
    """What a trial is, for its MLflow run name: `baseline lr=1e-3`, `λ=0.5 k=2 t=0.18/0.90 lr=2.9e-3`; a trial
    on a seed other than the selection seed adds it. The baseline names only the keys it searches."""
    baseline = arm_of(config) == "baseline"
    keys = [k for k in (baseline_keys(spec) if baseline else sorted(spec.space)) if k in config]
    parts = ["baseline" if keys or not baseline else "baseline (pinned)"] if baseline else []
    rates = "jepa.t_low" in keys and "jepa.t_high" in keys
    first = [k for k in ("jepa.lambda", "jepa.k") if k in keys]
    rest = [k for k in keys if k not in first and k != "train.lr" and not (rates and k.startswith("jepa.t_"))]
    for key in first:
        parts.append(f"{_SHORT[key]}={_short_value(config[key])}")
    if rates:
        parts.append(f"t={float(config['jepa.t_low']):.2f}/{float(config['jepa.t_high']):.2f}")
    for key in rest + (["train.lr"] if "train.lr" in keys else []):
        parts.append(f"{_SHORT.get(key, key.split('.')[-1])}={_short_value(config[key])}")
    seed = int(config.get("train.seed", spec.selection_seed))
    if phase == "repeat" or seed != spec.selection_seed:
        parts.append(f"seed={seed}")
    return " ".join(parts)


def _short_value(value) -> str:
    if isinstance(value, float) and value and not 1e-2 <= abs(value) < 1e4:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def config_key(spec: SweepSpec, sampled: dict[str, Any]) -> str:
    """A stable id for a config apart from its seed: trials with the same key are seed repeats."""
    values = {k: v for k, v in sorted(sampled.items()) if "." in k and k != "train.seed"}
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


def default_space_file(task: str) -> Path:
    """search_spaces/<task>.yaml in the working directory, else the copy installed with the package (package
    data: raydllm/search_spaces links to the checkout's search_spaces/ and is copied into the wheel)."""
    local = Path("search_spaces") / f"{task}.yaml"
    if local.exists():
        return local
    packaged = Path(__file__).resolve().parents[1] / "search_spaces" / f"{task}.yaml"
    if packaged.exists():
        return packaged
    raise ConfigError(f"--space: no search_spaces/{task}.yaml here; pass --space FILE")


def searcher_sizes(budget: int) -> dict[str, int]:
    """A searcher's settings from ITS arm's trial budget, so neither arm's searcher is sized by the other's:
    NSGA-II's generation is half the budget (the evolution runs at least once), TPE's random start-up trials a
    third of it (Optuna's default of 10 would leave an 8-trial arm all random), at least 1 and at most 10."""
    return {"population_size": max(2, min(50, budget // 2)), "n_startup_trials": max(1, min(10, budget // 3))}
