"""Core layer: iterative-unmasking generation for masked-diffusion LMs (LLaDA's sampling scheme).

The answer starts as ``gen_length`` [MASK] tokens after the (left-padded) prompt and is filled in
``steps`` denoising steps, split evenly over ``gen_length // block_length`` semi-autoregressive blocks.
Each step runs ONE forward pass for the whole batch, proposes a token for every masked position, scores
the proposals with the remasking rule, and commits the k most confident masked positions of each row
(k from `transfer_schedule`); everything else stays masked. Positions after the current block are
never committed while that block is open.

Under greedy decoding (temperature 0) `generate` is token-for-token identical to LLaDA's reference
``generate()`` (ML-GSAI/LLaDA ``generate.py``, cfg_scale=0, no EOS options), ties between equal
confidences included: like the reference it ranks each row's whole sequence (-inf outside the candidates)
with ``torch.topk`` at that row's own k, since which tied position topk returns depends on both; with ``temperature > 0`` or
``remasking="random"`` it draws its random numbers in the same order and shapes as the reference, so a
``torch.Generator`` seeded like the reference's global RNG reproduces its samples on CPU
(tests/test_sampler.py checks both against recorded reference outputs).

Behaviour kept from the reference on purpose, for parity:
* a proposal that is itself [MASK] is "committed" as [MASK], so the position stays masked; it remains a
  candidate in later steps (also in later blocks) and may be left masked at the end;
* the per-block transfer count uses the masks inside the block at its start only;
* the Gumbel noise consumes the RNG as a full [B, L, V] float64 draw every step (that is what keeps the
  stream aligned with the reference), but only the current window's numbers are held: the rest are drawn
  in bounded chunks and dropped (`_window_uniform`), so memory is the window's, not [B, L, V] float64.
Greedy steps that commit nothing (``steps_per_block > block_length``) skip the forward pass; that
changes nothing in the output.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from raydllm.core.dream_sampler import DREAM_ALGORITHMS, generate_dream
from raydllm.core.sampling_inputs import start_inputs

__all__ = [
    "CACHE_MODES",
    "CachedForward",
    "LogitsFn",
    "SAMPLER_METHODS",
    "REMASKING_RULES",
    "SamplerConfig",
    "decode_generations",
    "generate",
    "generate_fast",
    "sample",
    "model_logits_fn",
    "sampler_throughput",
    "transfer_schedule",
]

# (input_ids [B, L], attention_mask [B, L] or None) -> logits [B, L, V]
LogitsFn = Callable[[torch.LongTensor, Optional[torch.Tensor]], torch.Tensor]

REMASKING_RULES = ("low_confidence", "random", "margin", "entropy")
SAMPLER_METHODS = ("exact", "fast", "dream")
CACHE_MODES = ("none", "prefix", "dual")

# (input_ids [B, L], attention_mask [B, L] or None, *, cache, start, end) -> (logits, cache): with cache=None a
# full pass (logits [B, L, V] and a fresh cache), else positions [start, end) only, against the cache
# (`backbone.Backbone.forward_with_cache`).
CachedForward = Callable[..., tuple[torch.Tensor, Any]]


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"SamplerConfig.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 128  # denoising steps over the whole answer (forward passes, at most)
    gen_length: int = 256  # answer tokens appended after the prompt
    block_length: int = 128  # semi-autoregressive block; == gen_length: one block
    temperature: float = 0.0  # 0: greedy argmax; > 0: Gumbel-max sampling (float64)
    remasking: str = "low_confidence"  # which proposals to commit first: see REMASKING_RULES
    # "exact": LLaDA's schedule (above); "fast": Fast-dLLM's confidence-threshold parallel decoding (each step
    # commits every masked position of the block whose float64 confidence is >= `threshold`, at least one), with
    # the block KV cache `cache` ("prefix": the positions before the block; "dual": before and after it).
    method: str = "exact"
    threshold: float = 0.9
    cache: str = "none"
    # method "dream": Dream's own diffusion_generate (raydllm.core.dream_sampler): one block, `steps` steps along
    # linspace(1, dream_eps, steps + 1), remasking by `dream_algorithm` (see DREAM_ALGORITHMS).
    dream_algorithm: str = "entropy"
    dream_alg_temp: float = 0.0
    dream_eps: float = 1e-3

    def __post_init__(self) -> None:
        _check_int("steps", self.steps)
        _check_int("gen_length", self.gen_length)
        _check_int("block_length", self.block_length)
        if self.gen_length % self.block_length != 0:
            raise ValueError(
                f"SamplerConfig.gen_length ({self.gen_length}) must be a multiple of "
                f"SamplerConfig.block_length ({self.block_length})")
        if self.steps % self.num_blocks != 0:
            raise ValueError(
                f"SamplerConfig.steps ({self.steps}) must be a multiple of the number of blocks "
                f"gen_length // block_length = {self.num_blocks}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t >= 0.0) or t == float("inf"):
            raise ValueError(f"SamplerConfig.temperature must be a finite number >= 0, got {t!r}")
        if self.remasking not in REMASKING_RULES:
            raise ValueError(f"SamplerConfig.remasking must be one of {REMASKING_RULES}, got {self.remasking!r}")
        if self.method not in SAMPLER_METHODS:
            raise ValueError(f"SamplerConfig.method must be one of {SAMPLER_METHODS}, got {self.method!r}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"SamplerConfig.cache must be one of {CACHE_MODES}, got {self.cache!r}")
        th = self.threshold
        if isinstance(th, bool) or not isinstance(th, (int, float)) or not 0.0 <= th < float("inf"):
            raise ValueError(f"SamplerConfig.threshold must be a finite number >= 0, got {th!r}")
        if self.method == "exact" and self.cache != "none":
            raise ValueError(f"SamplerConfig.cache={self.cache!r} needs method='fast' (the exact sampler "
                             "recomputes every position at every step)")
        if self.method == "dream":
            if self.dream_algorithm not in DREAM_ALGORITHMS:
                raise ValueError(f"SamplerConfig.dream_algorithm must be one of {DREAM_ALGORITHMS}, "
                                 f"got {self.dream_algorithm!r}")
            if self.block_length != self.gen_length or self.cache != "none":
                raise ValueError("SamplerConfig: method='dream' decodes the whole answer as one block without a "
                                 f"cache (block_length={self.block_length}, gen_length={self.gen_length}, "
                                 f"cache={self.cache!r})")
            if not 0.0 < self.dream_eps < 1.0:
                raise ValueError(f"SamplerConfig.dream_eps must be in (0, 1), got {self.dream_eps!r}")
            if not self.dream_alg_temp >= 0.0:
                raise ValueError(f"SamplerConfig.dream_alg_temp must be >= 0, got {self.dream_alg_temp!r}")
        if self.method == "fast" and self.remasking != "low_confidence":
            raise ValueError("SamplerConfig.remasking: the fast sampler thresholds low_confidence "
                             f"probabilities, got {self.remasking!r}")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


def transfer_schedule(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit at each of ``steps`` steps, per row: ``[B] -> [B, steps]`` (int64).

    Every step gets ``n // steps``; the first ``n % steps`` steps get one more, so a row sums to ``n``
    (LLaDA's linear schedule). ``n_masked`` may also be ``[B, 1]``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    n = torch.as_tensor(n_masked).to(torch.int64).reshape(-1)
    if (n < 0).any():
        raise ValueError("n_masked must be >= 0")
    base = torch.div(n, steps, rounding_mode="floor")
    rem = n - base * steps
    extra = torch.arange(steps, device=n.device).unsqueeze(0) < rem.unsqueeze(1)
    return base.unsqueeze(1) + extra.to(torch.int64)


def model_logits_fn(model: Any) -> LogitsFn:
    """Adapter for models called as ``model(input_ids, attention_mask=...)`` returning ``.logits``
    (Hugging Face style, e.g. LLaDA). The attention mask is passed through unchanged (None stays None)."""

    def fn(input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        return model(input_ids, attention_mask=attention_mask).logits

    return fn


# Elements drawn at a time when skipping through the Gumbel stream: 2**22 float64 = 32 MiB.
_NOISE_CHUNK = 1 << 22


def _skip_uniform(count: int, generator: Optional[torch.Generator], device: torch.device) -> None:
    """Advance the RNG by ``count`` float64 uniforms, drawing them in bounded chunks and discarding them."""
    while count > 0:
        n = min(count, _NOISE_CHUNK)
        torch.rand(n, dtype=torch.float64, device=device, generator=generator)
        count -= n


def _window_uniform(full_shape: torch.Size, lo: int, hi: int, generator: Optional[torch.Generator],
                    device: torch.device) -> torch.Tensor:
    """``torch.rand(full_shape, float64)[:, lo:hi]`` ([B, L, V] -> [B, hi - lo, V]) without holding the
    [B, L, V] tensor: row by row, the numbers before and after the window are drawn in bounded chunks and
    dropped, so the window receives the same numbers (the CPU generator fills a tensor serially, in order)
    and the stream ends where the full draw would end. Memory: the window plus one chunk."""
    batch, length, vocab = full_shape
    rows = []
    for _ in range(batch):
        _skip_uniform(lo * vocab, generator, device)
        rows.append(torch.rand((hi - lo, vocab), dtype=torch.float64, device=device, generator=generator))
        _skip_uniform((length - hi) * vocab, generator, device)
    return torch.stack(rows)


def _propose(logits: torch.Tensor, lo: int, hi: int, config: SamplerConfig,
             generator: Optional[torch.Generator], forbid: Optional[int] = None,
             confidence_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposed tokens and their confidence for positions [lo, hi) -> ([B, W], [B, W]). ``forbid``: a token
    id never proposed (its confidence is still read from the unmodified distribution). ``confidence_dtype``:
    the dtype the low_confidence softmax runs in (None: the logits' own, as LLaDA's generate.py; Fast-dLLM
    takes it in float64)."""
    window = logits[:, lo:hi]
    proposal_logits = window
    if forbid is not None:
        proposal_logits = window.clone()
        proposal_logits[..., forbid] = float("-inf")
    if config.temperature > 0:
        # Gumbel-max in float64 as in the reference: exp(l) / (-log U) ** T, argmax. The reference draws U for
        # the whole [B, L, V] logits every step; only the window's numbers are kept (same stream, see
        # `_window_uniform`).
        u = _window_uniform(logits.shape, lo, hi, generator, logits.device)
        x0 = torch.argmax(proposal_logits.to(torch.float64).exp() / (-torch.log(u)) ** config.temperature, dim=-1)
    else:
        x0 = torch.argmax(proposal_logits, dim=-1)

    rule = config.remasking
    if rule == "low_confidence":  # probability of the chosen token under the noise-free model
        p = F.softmax(window if confidence_dtype is None else window.to(confidence_dtype), dim=-1)
        conf = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    elif rule == "random":  # same draw shape/dtype as the reference: [B, L] in the default dtype
        conf = torch.rand(logits.shape[:2], device=logits.device, generator=generator)[:, lo:hi]
    elif rule == "margin":  # top-1 minus top-2 probability
        top2 = F.softmax(window, dim=-1).topk(2, dim=-1).values
        conf = top2[..., 0] - top2[..., 1]
    elif rule == "entropy":  # negative entropy: sum p log p (0 log 0 = 0)
        logp = F.log_softmax(window, dim=-1)
        p = logp.exp()
        conf = torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)
    else:  # unreachable: SamplerConfig validates
        raise ValueError(f"SamplerConfig.remasking: unknown rule {rule!r}")
    return x0, conf


def _select_top_k(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean [B, L]: per row the k[row] highest-confidence positions (k on CPU).

    LLaDA's rule, ties included: ``torch.topk`` on each whole row with that row's own k. Which of several
    equal confidences wins depends on the row's length and on k (a batched topk at the largest k, or one
    over a slice of the row, picks other positions), so callers pass the whole sequence with -inf outside
    the candidates, as the reference does.
    """
    selected = torch.zeros(confidence.shape, dtype=torch.bool, device=confidence.device)
    for row, k_row in enumerate(k.tolist()):
        if k_row > 0:
            selected[row, torch.topk(confidence[row], k=k_row).indices] = True
    return selected


def _whole_row(conf: torch.Tensor, candidates: torch.Tensor, lo: int, total: int) -> torch.Tensor:
    """[B, total] confidence: ``conf`` ([B, W], for positions [lo, lo + W)) where ``candidates``, -inf
    everywhere else (prompt, committed tokens, positions after the window), the row `_select_top_k` ranks."""
    row = torch.full((conf.shape[0], total), float("-inf"), dtype=conf.dtype, device=conf.device)
    row[:, lo:lo + conf.shape[1]] = torch.where(candidates, conf, row.new_tensor(float("-inf")))
    return row


@torch.no_grad()
def generate(logits_fn: LogitsFn, prompt_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
             mask_id: int, config: SamplerConfig = SamplerConfig(),
             generator: Optional[torch.Generator] = None) -> torch.LongTensor:
    """Generate ``config.gen_length`` tokens after each (left-padded) prompt: ``[B, P] -> [B, P + gen_length]``.

    ``attention_mask`` (``[B, P]``, 1 = token, 0 = left padding) is extended with ones over the answer and
    passed to ``logits_fn`` at every step; None is passed through as None. Padding must use an id other
    than ``mask_id``. ``generator`` feeds the Gumbel noise (temperature > 0) and the "random" rule; None
    uses torch's global RNG.
    """
    if not isinstance(config, SamplerConfig):
        raise TypeError(f"config must be a SamplerConfig, got {type(config).__name__}")
    x, attention_mask, prompt_len = start_inputs(prompt_ids, attention_mask, mask_id, config)
    batch, total = x.shape

    steps = config.steps_per_block
    uses_rng = config.temperature > 0 or config.remasking == "random"
    checked = False
    for block in range(config.num_blocks):
        start = prompt_len + block * config.block_length
        end = start + config.block_length
        n_masked = (x[:, start:end] == mask_id).sum(dim=1).cpu()
        schedule = transfer_schedule(n_masked, steps)  # [B, steps], on CPU
        for i in range(steps):
            k = schedule[:, i]
            if not uses_rng and int(k.max()) == 0:
                continue  # commits nothing and draws no random numbers: the forward pass is moot
            logits = logits_fn(x, attention_mask)
            if not checked:
                if logits.dim() != 3 or tuple(logits.shape[:2]) != (batch, total):
                    raise ValueError(f"logits_fn returned shape {tuple(logits.shape)}, expected "
                                     f"[{batch}, {total}, vocab]")
                checked = True
            # Candidates: masked positions up to the end of the current block (the prompt holds no masks);
            # they are ranked in the whole row, everything else at -inf, as the reference ranks them.
            x0, conf = _propose(logits, prompt_len, end, config, generator)
            window = x[:, prompt_len:end]
            masked = window == mask_id
            commit = _select_top_k(_whole_row(conf, masked, prompt_len, total), k)[:, prompt_len:end] & masked
            x[:, prompt_len:end] = torch.where(commit, x0, window)
    return x


@torch.no_grad()
def generate_fast(logits_fn: LogitsFn, prompt_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                  mask_id: int, config: SamplerConfig, cached_forward: Optional[CachedForward] = None,
                  generator: Optional[torch.Generator] = None) -> torch.LongTensor:
    """Fast-dLLM's sampler (arXiv 2505.22618), same blocks and output shape as `generate`.

    Parallel decoding: a block is decoded until it holds no [MASK]; each step commits, per row, every masked
    position of the block whose confidence (probability of the proposed token, from a float64 softmax as
    Fast-dLLM takes it) is >= ``config.threshold`` (Fast-dLLM's rule), and at least the most confident one, ranked as `generate` ranks (whole row, ties as the reference).
    [MASK] is never proposed, so every step fills at least one position and a block takes at most
    ``block_length`` steps; ``config.steps`` is not used. Rows whose block is done wait for the others.

    Block KV cache (``config.cache``, needs ``cached_forward``): the block's first step is a full pass that
    also fills the cache; its other steps recompute only the block and the positions after it ("prefix":
    the keys/values of the prompt and finished blocks are reused) or only the block ("dual": those after it
    too). The cache is refreshed at every block, so it is stale only by what the block's own steps change.

    Equal to `generate` when ``threshold > 1`` (no confidence reaches it: one token a step), no cache,
    ``steps == gen_length`` (the exact sampler's one token a step) and the model never proposes [MASK].
    """
    if not isinstance(config, SamplerConfig):
        raise TypeError(f"config must be a SamplerConfig, got {type(config).__name__}")
    if config.remasking != "low_confidence":
        raise ValueError(f"generate_fast: remasking must be low_confidence, got {config.remasking!r}")
    if config.cache != "none" and cached_forward is None:
        raise ValueError(f"generate_fast: cache={config.cache!r} needs a cached_forward (a model with a KV cache)")
    x, attention_mask, prompt_len = start_inputs(prompt_ids, attention_mask, mask_id, config)
    total = x.shape[1]
    for block in range(config.num_blocks):
        start = prompt_len + block * config.block_length
        end = start + config.block_length
        cache = None
        for _ in range(config.block_length):
            masked = x[:, start:end] == mask_id
            if not masked.any():
                break
            if config.cache == "none":
                logits = logits_fn(x, attention_mask)[:, start:end]
            elif cache is None:  # the block's first step: a full pass that fills the cache
                full, cache = cached_forward(x, attention_mask, cache=None, start=0, end=total)
                logits = full[:, start:end]
            else:
                stop = total if config.cache == "prefix" else end
                logits = cached_forward(x, attention_mask, cache=cache, start=start, end=stop)[0][:, :end - start]
            # Fast-dLLM's rule: confidence from a float64 softmax; commit the most confident masked position
            # and every other one whose confidence is >= threshold.
            x0, conf = _propose(logits, 0, end - start, config, generator, forbid=mask_id,
                                confidence_dtype=torch.float64)
            above = ((conf >= config.threshold) & masked).sum(dim=1)
            k = torch.where(masked.any(dim=1), above.clamp(min=1), torch.zeros_like(above)).cpu()
            commit = _select_top_k(_whole_row(conf, masked, start, total), k)[:, start:end] & masked
            x[:, start:end] = torch.where(commit, x0, x[:, start:end])
    return x


def sample(logits_fn: LogitsFn, prompt_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
           mask_id: int, config: SamplerConfig, cached_forward: Optional[CachedForward] = None,
           generator: Optional[torch.Generator] = None) -> torch.LongTensor:
    """`generate`, `generate_fast` or Dream's `generate_dream`, as ``config.method`` says."""
    if config.method == "dream":
        return generate_dream(logits_fn, prompt_ids, attention_mask, mask_id=mask_id, config=config,
                              generator=generator)
    if config.method == "fast":
        return generate_fast(logits_fn, prompt_ids, attention_mask, mask_id=mask_id, config=config,
                             cached_forward=cached_forward, generator=generator)
    return generate(logits_fn, prompt_ids, attention_mask, mask_id=mask_id, config=config, generator=generator)


def decode_generations(tokenizer: Any, output_ids: torch.Tensor, prompt_len: int,
                       eos_id: int | Iterable[int] | None = None) -> list[str]:
    """Decode the answer part (``output_ids[:, prompt_len:]``) of each row, cut before its first EOS.

    ``eos_id`` may be one id or several (e.g. LLaDA's EOS and EoT); None uses ``tokenizer.eos_token_id``
    (no cut when that is None too). Special tokens are skipped when decoding.
    """
    if eos_id is None:
        eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        stops: set[int] = set()
    elif isinstance(eos_id, int):
        stops = {eos_id}
    else:
        stops = {int(e) for e in eos_id}
    texts = []
    for row in output_ids[:, prompt_len:].tolist():
        for j, tok in enumerate(row):
            if tok in stops:
                row = row[:j]
                break
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def sampler_throughput(logits_fn: LogitsFn, prompts: torch.Tensor, attention_mask: Optional[torch.Tensor], *,
                       mask_id: int, config: SamplerConfig, warmup: bool = True) -> dict:
    """Answer tokens per second for the whole batch in one `generate` call versus one prompt at a time.

    Each one-at-a-time prompt has its left padding removed (via ``attention_mask``). Returns timings,
    tokens/s for both, ``speedup`` (batched / one-at-a-time) and, under greedy decoding,
    ``outputs_match`` (the batched answers equal the one-at-a-time ones; None when sampling).
    """
    batch = prompts.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(prompts)
    rows = [prompts[r][attention_mask[r].bool()].unsqueeze(0) for r in range(batch)]
    if warmup:
        generate(logits_fn, rows[0], torch.ones_like(rows[0]), mask_id=mask_id, config=config)

    t0 = time.perf_counter()
    batched = generate(logits_fn, prompts, attention_mask, mask_id=mask_id, config=config)
    batched_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    singles = [generate(logits_fn, r, torch.ones_like(r), mask_id=mask_id, config=config) for r in rows]
    sequential_s = time.perf_counter() - t0

    tokens = batch * config.gen_length
    greedy = config.temperature == 0 and config.remasking != "random"
    match = None
    if greedy:
        p = prompts.shape[1]
        match = all(torch.equal(batched[r, p:], singles[r][0, rows[r].shape[1]:]) for r in range(batch))
    return {
        "batch_size": batch,
        "gen_tokens": tokens,
        "batched_s": batched_s,
        "sequential_s": sequential_s,
        "batched_tokens_per_s": tokens / batched_s,
        "sequential_tokens_per_s": tokens / sequential_s,
        "speedup": sequential_s / batched_s,
        "outputs_match": match,
    }
