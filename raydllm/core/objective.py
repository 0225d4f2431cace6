"""Core layer: the DLLM-JEPA objective as plain tensor code: no Ray, no DeepSpeed.

L = L_diff(context view) + lambda * (1 - cos(g_phi(z_L), sg(z_H))), where z = LayerNorm(mean of the last
hidden states over non-masked, non-pad tokens), z_L comes from the online backbone on the context view
x_{t_L} (the same forward that gives L_diff) and z_H from the EMA target on x_{t_H} under no_grad.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from raydllm.core.masking import mask_tokens
from raydllm.core.model import Block


def diffusion_loss(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, *, t: float | torch.Tensor,
                   norm: str = "masked", answer_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on masked positions.

    norm="masked" (paper eq. 2): with one rate `t` for the batch, the mean over its masked tokens; with
    per-row rates (`t` a [B] tensor, `jepa.rate_sampling=uniform`), eq. 2's per-sequence mean: the mean
    over each row's masked tokens, then the mean over the rows with any (a token mean would weight a row
    masked at t = 0.9 up to 900x more than one at t = 0.001).
    norm="answer_length": LLaDA's SFT form, sum over masked tokens of CE / t divided by the row's answer
    length, averaged over rows (`answer_lengths` [B] required). `t`: one rate, or a [B] tensor of per-row rates.
    """
    ce = F.cross_entropy(logits[masked].float(), x0[masked], reduction="none")
    if norm == "masked":
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            row = masked.nonzero()[:, 0]
            per_row = torch.zeros(x0.shape[0], device=ce.device).index_add_(0, row, ce)
            counts = masked.sum(dim=1)
            has = counts > 0
            # Rows with nothing masked are left out; a batch with none contributes 0 rather than NaN.
            return (per_row[has] / counts[has]).sum() / has.sum().clamp(min=1)
        return ce.sum() / masked.sum().clamp(min=1)
    if norm == "answer_length":
        if answer_lengths is None:
            raise ValueError("diffusion_loss: norm='answer_length' needs answer_lengths")
        row = masked.nonzero()[:, 0]
        rate = t.to(ce.device, ce.dtype)[row] if isinstance(t, torch.Tensor) else t
        per_row = torch.zeros(x0.shape[0], device=ce.device).index_add_(0, row, ce / rate)
        return (per_row / answer_lengths.clamp(min=1)).mean()
    raise ValueError(f"loss.diffusion_norm: unknown {norm!r}")


def mean_pool(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` [B, L, D] over positions where `keep` [B, L] is True -> [B, D] (float32), no norm."""
    weights = keep.to(torch.float32).unsqueeze(-1)
    summed = (hidden.float() * weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp(min=1.0)


def pool(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """z: LayerNorm(mean of `hidden` [B, L, D] over positions where `keep` [B, L] is True) -> [B, D] (float32)."""
    mean = mean_pool(hidden, keep)
    return F.layer_norm(mean, mean.shape[-1:])


def eos_padding(x0: torch.Tensor, maskable: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, L] bool: the EOS fill of each answer: answer positions holding EOS right after another EOS.
    The first EOS (the learned stop) is not padding."""
    is_eos = (x0 == eos_id) & maskable
    after_eos = torch.zeros_like(is_eos)
    after_eos[:, 1:] = is_eos[:, :-1]
    return is_eos & after_eos


def jepa_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - cos(predicted, sg(target)); the target never receives gradient."""
    return (1.0 - F.cosine_similarity(predicted.float(), target.detach().float(), dim=-1)).mean()


class Predictor(nn.Module):
    """g_phi: k transformer blocks at backbone width applied to the pooled embedding (a length-1 sequence).

    k = 0 is the identity (the paper's no-predictor ablation).
    """

    def __init__(self, width: int, depth: int, n_heads: int = 1):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, n_heads) for _ in range(depth))

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.blocks:
            return z
        dtype = next(self.parameters()).dtype
        h = z.to(dtype).unsqueeze(1)
        for block in self.blocks:
            h = block(h)
        return h.squeeze(1)


class EmaTarget:
    """The target encoder f_theta': an EMA of the online backbone, never trained.

    Kept outside the optimizer (and outside DeepSpeed) in `dtype` (float32 by default: a 0.004 step is
    below bf16 resolution, so a bf16 EMA would stop moving). `update` is one `_foreach_lerp_` per chunk
    of tensors: theta' <- decay * theta' + (1 - decay) * theta.

    `device` is where the target forward computes. `offload=True` keeps the master weights in host memory
    (pinned for CUDA, so host->device copies can be asynchronous) because a float32 8B copy does not fit a
    40 GB card next to the ZeRO state: a pre-hook on every module that directly owns tensors swaps in device
    copies and a post-hook swaps the masters back, so only the modules now running (a leaf and its
    parents' own tensors, if any) hold device weights. The swap is done through `.data`, so `params` and
    `state_dict()` always name the masters.
    Limitation: a module that reads another module's weights outside that module's forward (tied embeddings
    applied with F.linear) sees the host tensor and fails with a device mismatch.
    """

    def __init__(self, online: nn.Module, decay: float, *, dtype: torch.dtype = torch.float32,
                 chunk_size: int = 64, device: torch.device | str | None = None, offload: bool = False):
        self.decay = decay
        self.module = copy.deepcopy(online).to(dtype).eval().requires_grad_(False)
        self.chunk_size = chunk_size  # bounds the temporary casts of online params for huge models
        self.offload = offload
        self.device = torch.device(device) if device is not None else None
        if offload:
            if self.device is None:
                raise ValueError("EmaTarget(offload=True) needs the compute device")
            self._host: dict[int, torch.Tensor] = {}  # id(tensor) -> its host master while swapped out
            self._swapped: dict[int, list[torch.Tensor]] = {}  # id(module) -> the tensors its pre-hook swapped
            self.module.to("cpu")
            if self.device.type == "cuda":
                for t in self._tensors(self.module, recurse=True):
                    t.data = t.data.pin_memory()
            for m in self.module.modules():
                if next(self._tensors(m, recurse=False), None) is not None:
                    m.register_forward_pre_hook(self._to_device)
                    # always_call: a forward that raises still puts the masters back.
                    m.register_forward_hook(self._to_host, always_call=True)
        elif self.device is not None:
            self.module.to(self.device)
        self.params = [p for p in self.module.parameters()]

    @staticmethod
    def _tensors(module: nn.Module, *, recurse: bool):
        yield from module.parameters(recurse=recurse)
        yield from module.buffers(recurse=recurse)

    def _to_device(self, module: nn.Module, args) -> None:
        swapped = []
        for t in self._tensors(module, recurse=False):
            if id(t) in self._host:  # shared with an enclosing module that already swapped it in
                continue
            self._host[id(t)] = t.data
            # copy=True: a real copy even when the compute device is the host (keeps the CPU tests honest).
            t.data = t.data.to(self.device, copy=True, non_blocking=True)
            swapped.append(t)
        self._swapped[id(module)] = swapped

    def _to_host(self, module: nn.Module, args, output) -> None:
        for t in self._swapped.pop(id(module), []):
            t.data = self._host.pop(id(t))  # the device copy is freed here

    @torch.no_grad()
    def update(self, online_params: Iterable[torch.Tensor]) -> None:
        online = list(online_params)
        if len(online) != len(self.params):
            raise ValueError(f"EMA update: {len(online)} online tensors for {len(self.params)} target tensors")
        weight = 1.0 - self.decay
        for start in range(0, len(online), self.chunk_size):
            targets = self.params[start:start + self.chunk_size]
            chunk = online[start:start + self.chunk_size]
            # Move first, cast second: a bf16 online weight crosses PCIe at 2 bytes, not 4. A CUDA->CPU
            # non_blocking copy lands in pinned memory and must be waited for before the CPU reads it.
            moved = [s.to(t.device, non_blocking=True) for s, t in zip(chunk, targets)]
            for device in {s.device for s, t in zip(chunk, targets) if s.is_cuda and not t.is_cuda}:
                torch.cuda.synchronize(device)
            torch._foreach_lerp_(targets, [m.to(t.dtype) for m, t in zip(moved, targets)], weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        # Copies into the existing tensors, so a checkpoint from either placement loads into either.
        self.module.load_state_dict(state)


class EmaAdapters(EmaTarget):
    """The target encoder in LoRA mode: the online backbone's own frozen base with an EMA of its adapters.

    With a frozen base, theta' = (base, EMA of the adapters): the EMA holds only the tensors of `online` that
    require grad, in `dtype` (float32), updated by the inherited `update` after each optimizer step (frozen
    tensors are skipped there). `module` runs the target forward on the SAME modules as the online forward:
    it swaps the EMA tensors into the adapters' `.data` (as the offload mode swaps device copies in), runs
    the backbone in eval mode (adapter dropout off, as the full-mode EMA copy is in eval mode), and puts
    the online tensors and train/eval modes back even when the forward raises. So the target costs the
    adapters' size, not a second backbone. Call it under no_grad: no graph may hold the swapped tensors.
    `offload=True` keeps the EMA in host memory; each forward copies the adapters to the device.
    `state_dict` is {parameter name in `online`: EMA tensor}.
    """

    def __init__(self, online: nn.Module, decay: float, *, dtype: torch.dtype = torch.float32,
                 chunk_size: int = 64, device: torch.device | str | None = None, offload: bool = False):
        self.decay = decay
        self.chunk_size = chunk_size
        self.offload = offload
        self.device = torch.device(device) if device is not None else None
        named = [(name, p) for name, p in online.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("EmaAdapters: the online module has no trainable tensors")
        self.names = [name for name, _ in named]
        self.adapters = [p for _, p in named]
        home = torch.device("cpu") if offload or self.device is None else self.device
        self.params = [p.detach().to(device=home, dtype=dtype, copy=True) for p in self.adapters]
        self.active = False  # True while the target forward runs (the online modules then compute the target)
        self.module = _AdapterSwap(online, self)

    @torch.no_grad()
    def update(self, online_params: Iterable[torch.Tensor]) -> None:
        super().update(p for p in online_params if p.requires_grad)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.params))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.names):
            raise ValueError(f"EMA adapters: the saved names do not match this model's {len(self.names)} adapters")
        for name, target in zip(self.names, self.params):
            target.copy_(state[name])


class _AdapterSwap(nn.Module):
    """`EmaAdapters.module`: calls the online backbone with the EMA adapter tensors swapped in."""

    def __init__(self, online: nn.Module, ema: EmaAdapters):
        super().__init__()
        # Plain attributes, not submodules: this wrapper owns no weights of its own.
        self.__dict__["online"], self.__dict__["ema"] = online, ema

    def forward(self, *args, **kwargs):
        online, ema = self.__dict__["online"], self.__dict__["ema"]
        saved = [p.data for p in ema.adapters]
        modes = [(m, m.training) for m in online.modules()]
        try:
            for p, average in zip(ema.adapters, ema.params):
                p.data = average.to(p.device, non_blocking=True)
            online.eval()
            ema.active = True
            return online(*args, **kwargs)
        finally:
            ema.active = False
            for m, training in modes:
                m.training = training
            for p, data in zip(ema.adapters, saved):
                p.data = data


class L2Anchor:
    """strength * ||theta - theta_base||^2 on the gradient side: one tensor hook per parameter adds
    2 * strength * scale * (theta - theta_base) to the parameter's gradient.

    theta_base is a clone of each parameter as it is when the anchor is attached, on the parameter's
    device and in its dtype: attach it to the weights the optimizer updates (after the DeepSpeed engine is
    built: bf16 on the GPU under bf16 training), so no copy lives in host memory and the hook never mixes
    devices. Tensor hooks fire before DeepSpeed's gradient reduction hooks, so the loss graph is never
    duplicated. `scale` = 1 / gradient-accumulation steps, because the hook fires on every micro-batch
    while DeepSpeed averages micro-batch gradients.

    `measure=True` also sums, per backward, the squared norms of the incoming loss gradient and of the
    anchor term (both in float32), for `raydllm bench l2`; it costs two reductions per parameter.
    Iterating over it gives the hook handles."""

    def __init__(self, params: Iterable[nn.Parameter], strength: float, *, scale: float = 1.0,
                 measure: bool = False):
        self.coef = 2.0 * strength * scale
        self.measure = measure
        self.loss_sq = self.anchor_sq = 0.0
        self.params = [p for p in params if p.requires_grad]
        self.bases = [p.detach().clone() for p in self.params]
        self.handles = [p.register_hook(self._hook(p, base)) for p, base in zip(self.params, self.bases)]

    def _hook(self, p: nn.Parameter, base: torch.Tensor):
        def add_anchor(g: torch.Tensor) -> torch.Tensor:
            anchor = self.coef * (p.detach() - base).to(g.dtype)
            if self.measure:
                self.loss_sq += float(g.float().square().sum())
                self.anchor_sq += float(anchor.float().square().sum())
            return g + anchor
        return add_anchor

    def __iter__(self):
        return iter(self.handles)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bases)

    @torch.no_grad()
    def distance(self) -> tuple[float, float]:
        """(||theta - theta_base||, ||theta_base||) over all anchored parameters, in float32."""
        dist = sum(float((p.float() - b.float()).square().sum()) for p, b in zip(self.params, self.bases))
        norm = sum(float(b.float().square().sum()) for b in self.bases)
        return dist ** 0.5, norm ** 0.5

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def attach_l2_anchor(params: list[nn.Parameter], strength: float, *, scale: float = 1.0,
                     measure: bool = False) -> L2Anchor:
    """The L2-to-base anchor on `params` from now on (see L2Anchor)."""
    return L2Anchor(params, strength, scale=scale, measure=measure)


@dataclass
class Losses:
    total: torch.Tensor
    diff: torch.Tensor
    jepa: torch.Tensor | None  # None when the target branch did not run (lambda = 0 or loss dropout)
    z_low: torch.Tensor
    z_high: torch.Tensor | None
    masked_tokens: int


# (input_ids, attention_mask) -> (logits [B, L, V], last hidden states [B, L, D])
Encoder = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


MIN_RATE = 1e-3  # LLaDA's eps: a drawn rate is never 0 (nothing masked, and 1/t weighting)


def view_rates(batch: int, t_low: float, t_high: float, sampling: str = "fixed",
               generator: torch.Generator | None = None) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """The context and target mask rates: the fixed pair, or per-row rates (see JepaConfig.rate_sampling)."""
    if sampling == "fixed":
        return t_low, t_high
    if sampling != "uniform":
        raise ValueError(f"jepa.rate_sampling: unknown {sampling!r}")
    low = MIN_RATE + (1 - MIN_RATE) * torch.rand(batch, generator=generator)
    share = (t_high - t_low) / (1 - t_low)  # of the tokens the context view leaves visible
    return low, low + (1 - low) * share


def dllm_jepa_losses(online: Encoder, target: Encoder | None, predictor: nn.Module, x0: torch.Tensor,
                     attention_mask: torch.Tensor, maskable: torch.Tensor, *, mask_token_id: int, t_low: float,
                     t_high: float, lam: float, generator: torch.Generator | None = None,
                     diffusion_norm: str = "masked", run_target: bool = True,
                     rate_sampling: str = "fixed", pool_exclude_id: int | None = None) -> Losses:
    """One step's losses. The online encoder runs once (with grad) on the context view; the target
    encoder runs once under no_grad on the target view, and only when lam > 0 and `run_target`.
    `pool_exclude_id`: an EOS id whose answer padding (`eos_padding`) both views leave out of z
    (`jepa.pool_exclude_eos_padding`); the diffusion loss still learns it."""
    unpooled = ~attention_mask.bool()  # positions no view pools: pad, and the EOS fill when asked
    if pool_exclude_id is not None:
        unpooled = unpooled | eos_padding(x0, maskable, pool_exclude_id)
    t_low, t_high = view_rates(x0.shape[0], t_low, t_high, rate_sampling, generator)
    x_low, masked_low = mask_tokens(x0, t_low, maskable, mask_token_id=mask_token_id, generator=generator)
    use_target = lam != 0 and target is not None and run_target
    z_high = None
    if use_target:
        x_high, masked_high = mask_tokens(x0, t_high, maskable, mask_token_id=mask_token_id, generator=generator)
        # The target pass runs first: its temporaries are freed before the online graph is built, instead
        # of stacking on top of the online activations (measured: target forward 22% slower otherwise).
        with torch.no_grad():
            _, hidden_high = target(x_high, attention_mask)
            z_high = pool(hidden_high, ~masked_high & ~unpooled)
            del hidden_high
    logits, hidden = online(x_low, attention_mask)
    answer_lengths = maskable.sum(dim=1) if diffusion_norm == "answer_length" else None
    l_diff = diffusion_loss(logits, x0, masked_low, t=t_low, norm=diffusion_norm, answer_lengths=answer_lengths)
    z_low = pool(hidden, ~masked_low & ~unpooled)
    if not use_target:
        return Losses(l_diff, l_diff.detach(), None, z_low.detach(), None, int(masked_low.sum()))
    l_jepa = jepa_loss(predictor(z_low), z_high)
    return Losses(l_diff + lam * l_jepa, l_diff.detach(), l_jepa.detach(), z_low.detach(), z_high,
                  int(masked_low.sum()))
