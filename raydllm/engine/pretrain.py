"""Engine layer: the embedded tiny model's base, offline: its masked-diffusion pretraining and the weights cache.

`model.init: pretrained` starts the tiny model from this base instead of random weights. The base is built
once per shape on first use (about 7 minutes of one CPU core at the default 1200 steps, with a progress bar)
and cached in `~/.cache/raydllm/base-<hash>.pt` (`$RAYDLLM_CACHE` or `$XDG_CACHE_HOME/raydllm` override the folder).

Recipe (all plain torch, in-process, no DeepSpeed or Ray):
* objective: the project's own forward process and loss (`masking.mask_tokens` + `objective.diffusion_loss`,
  eq. 2's per-sequence mean), one mask rate t ~ U(0.05, 1) per row, every non-pad token maskable; each row is
  seen in two such views, and CONTRAST_WEIGHT x InfoNCE (temperature 0.1) between the two views' pooled z
  (`objective.pool`) is added. Without it the base's pooled embeddings collapse: the mean of a byte model's
  last hidden states over a window is close to the same vector for every window (the 300-step base of recipe 1
  had effective rank 1.09 of 128 and cosine diversity 0.0003 by the paper's formulas), so the JEPA loss of a
  fine-tune has nothing to predict (`loss_jepa` ~0.0015 by step 50) and lambda, k, t_H cannot matter;
* text: 3 rows in 4 are random `seq_len`-byte windows of WikiText-2 **valid** (`../shared/data/wikitext/
  valid.txt`; never the test split, which the preservation probe scores); 1 row in 4 is a generated
  GSM8K-format problem laid out as in fine-tuning (`Question: ...\\nAnswer: <work>\\n#### n` then EOS fill),
  so the base knows the answer format a little. The problems come from their own seed
  (`PRETRAIN_PROBLEM_SEED + seed`); fine-tuning train/validation/test skip every one of them (synthetic.py);
* when no WikiText copy is found (a fresh install without the shared data), the prose rows come from text
  the package produces itself: the docstrings of ~90 Python standard-library modules and of raydllm (about
  0.4 MB of English). A log line says which text was used; the choice is part of the cache key;
* AdamW (lr 1.5e-3, betas 0.9/0.98, weight decay 0.01), 5 % warmup then cosine to 10 %, grad clip 1.0.

The cache file is written to a temporary name and renamed into place (atomic), under an exclusive `flock`
on `<file>.lock`, so Ray workers that start together build it once and never read a half-written file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from raydllm.engine.checkpoints import backbone_weights, read_checkpoint_state, torch_load
from raydllm.core.config import ConfigError, ModelConfig
from raydllm.data.corpora import corpus_tag, corpus_text, encode_text
from raydllm.core.masking import mask_tokens
from raydllm.core.model import build_tiny
from raydllm.core.objective import diffusion_loss, pool

log = logging.getLogger(__name__)

RECIPE = "raydllm-base/2"  # bump when the recipe changes: old cache files are then never picked up
DEFAULT_STEPS = 1200
DEFAULT_SEED = 0
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 16
DEFAULT_LR = 1.5e-3
PROBLEM_FRACTION = 0.25
T_MIN = 0.05
CONTRAST_WEIGHT = 0.2
CONTRAST_TEMPERATURE = 0.1


# -- batches ----------------------------------------------------------------------------------------------
class _Mixture:
    """Seeded rows: random windows of the text stream, and generated problems in the fine-tuning layout."""

    def __init__(self, tokenizer, text: str, *, seq_len: int, seed: int, eos_id: int, n_problems: int = 20_000):
        from raydllm.data.tasks.gsm8k import Gsm8kTask, to_example
        from raydllm.data.tasks.synthetic import PRETRAIN_PROBLEM_SEED, gsm8k_format_problems

        self.seq_len, self.eos_id = seq_len, eos_id
        self.stream = encode_text(tokenizer, text)
        if self.stream.numel() <= seq_len:
            raise ValueError(f"pretrain text has {self.stream.numel()} tokens; need more than seq_len={seq_len}")
        task = Gsm8kTask()
        rows = [to_example(r) for r in gsm8k_format_problems(n_problems, seed=PRETRAIN_PROBLEM_SEED + seed)]
        texts = [task.format_prompt(ex) + " " + ex.answer for ex in rows]
        self.problems = [ids[-(seq_len - 1):] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        g = self.generator
        rows = []
        is_problem = torch.rand(batch_size, generator=g) < PROBLEM_FRACTION
        for problem in is_problem.tolist():
            if problem:
                ids = self.problems[int(torch.randint(len(self.problems), (1,), generator=g))]
                rows.append(torch.tensor(ids + [self.eos_id] * (self.seq_len - len(ids)), dtype=torch.long))
            else:
                start = int(torch.randint(self.stream.numel() - self.seq_len, (1,), generator=g))
                rows.append(self.stream[start:start + self.seq_len])
        return torch.stack(rows)


def _lr_factor(step: int, total: int) -> float:
    warmup = max(1, int(0.05 * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -- pretraining -----------------------------------------------------------------------------------------
def _step_loss(model, x0: torch.Tensor, *, mask_id: int, generator: torch.Generator, contrast: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, diffusion part). Eq. 2's per-sequence diffusion loss, each row masked at its own rate
    t ~ U(T_MIN, 1). With `contrast` > 0 each row is seen in two such views and `contrast` x InfoNCE between
    the rows' pooled z (`objective.pool` over visible tokens, temperature CONTRAST_TEMPERATURE) is added:
    each view must pick its row's other view out of the batch, so z carries what the row says instead of
    the byte statistics every window shares (README, "The embedded base")."""
    rows = x0.shape[0]
    views = 2 if contrast > 0 else 1
    x0 = x0.repeat(views, 1)
    t = T_MIN + (1.0 - T_MIN) * torch.rand(views * rows, generator=generator)
    maskable = torch.ones_like(x0, dtype=torch.bool)  # no pad rows here: every token is maskable
    x_t, masked = mask_tokens(x0, t, maskable, mask_token_id=mask_id, generator=generator)
    out = model(input_ids=x_t, attention_mask=torch.ones_like(x0), output_hidden_states=contrast > 0)
    diff = diffusion_loss(out.logits, x0, masked, t=t)
    if contrast == 0:
        return diff, diff.detach()
    z = F.normalize(pool(out.hidden_states[-1], ~masked), dim=-1)
    sim = z[:rows] @ z[rows:].T / CONTRAST_TEMPERATURE
    labels = torch.arange(rows)
    nce = 0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels))
    return diff + contrast * nce, diff.detach()


def pretrain_tiny(model_cfg: ModelConfig, *, text_path: Path | None = None, steps: int = DEFAULT_STEPS,
                  seed: int = DEFAULT_SEED, seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = DEFAULT_BATCH_SIZE,
                  lr: float = DEFAULT_LR, contrast: float = CONTRAST_WEIGHT, progress: bool = True,
                  stats: dict | None = None, callback=None) -> dict[str, torch.Tensor]:
    """Pretrain the embedded tiny model as a masked diffusion LM; returns its state dict.

    `text_path` None = WikiText-2 valid from the shared data, or the built-in text when that is missing.
    `stats`, when given, receives {"final_loss", "seconds", "steps", "corpus", "tokens"}.
    """
    from tqdm.auto import tqdm


    if model_cfg.name != "tiny":
        raise ConfigError(f"model.init: pretraining is only for the embedded model, not {model_cfg.name!r}")
    seq_len = min(seq_len, model_cfg.max_seq_len)
    torch.manual_seed(seed)
    model, tokenizer = build_tiny(model_cfg)
    text, corpus = corpus_text(text_path)
    data = _Mixture(tokenizer, text, seq_len=seq_len, seed=seed, eos_id=tokenizer.eos_token_id,
                    n_problems=max(1000, min(20_000, steps * batch_size)))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    mask_rng = torch.Generator().manual_seed(seed + 1)
    model.train()
    recent: list[float] = []
    first = None
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"pretrain tiny d{model_cfg.d_model}x{model_cfg.n_layers}", unit="step",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        x0 = data.batch(batch_size)
        loss, diff = _step_loss(model, x0, mask_id=tokenizer.mask_token_id, generator=mask_rng, contrast=contrast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recent = (recent + [diff.item()])[-20:]
        first = recent[-1] if first is None else first
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", refresh=False)
        if callback is not None:
            callback(step + 1, model)
    bar.close()
    seconds = time.perf_counter() - start
    final = sum(recent) / max(1, len(recent))
    log.info("pretrained tiny base: %d steps in %.0f s, final loss %.3f (mean of the last %d steps)", steps,
             seconds, final, len(recent))
    if stats is not None:
        stats.update(first_loss=first, final_loss=final, seconds=seconds, steps=steps, corpus=corpus,
                     tokens=steps * batch_size * seq_len)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- the cache -------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    if os.environ.get("RAYDLLM_CACHE"):
        return Path(os.environ["RAYDLLM_CACHE"]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "raydllm"


def base_key(model_cfg: ModelConfig, *, seed: int | None = None, steps: int | None = None,
             text_path: Path | None = None) -> dict:
    """Everything the base's weights depend on: shape, seed, steps, recipe and which text was used."""
    seed = DEFAULT_SEED if seed is None else seed
    steps = DEFAULT_STEPS if steps is None else steps
    return {"recipe": RECIPE, "vocab": 260, "d_model": model_cfg.d_model, "n_layers": model_cfg.n_layers,
            "n_heads": model_cfg.n_heads, "seed": seed, "steps": steps, "seq_len": DEFAULT_SEQ_LEN,
            "batch_size": DEFAULT_BATCH_SIZE, "lr": DEFAULT_LR, "problems": PROBLEM_FRACTION,
            "contrast": CONTRAST_WEIGHT, "contrast_temperature": CONTRAST_TEMPERATURE,
            "corpus": corpus_tag(text_path)}


def base_path(model_cfg: ModelConfig, *, seed: int | None = None, steps: int | None = None,
              text_path: Path | None = None) -> Path:
    key = json.dumps(base_key(model_cfg, seed=seed, steps=steps, text_path=text_path), sort_keys=True)
    return cache_dir() / f"base-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock on `path` (flock); a no-op where fcntl does not exist (atomic rename remains)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def save_weights(state: dict[str, torch.Tensor], path: Path, meta: dict | None = None) -> None:
    """Write atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"format": RECIPE, "state_dict": state, "meta": meta or {}}, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a shared cache should be readable as usual
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, meta) from a file written by save_weights, or a plain state dict file."""
    blob = torch_load(Path(path))
    if isinstance(blob, dict) and "state_dict" in blob:
        return blob["state_dict"], blob.get("meta", {})
    if isinstance(blob, dict) and "module" in blob:  # a DeepSpeed model-states file
        return backbone_weights(blob["module"]), {}
    return blob, {}



def build_base(model_cfg: ModelConfig, *, seed: int | None = None, steps: int | None = None,
               text_path: Path | None = None, progress: bool = True) -> tuple[Path, dict]:
    """The cached base's path and meta, pretraining it first if it is not cached (once, under a lock)."""
    seed = DEFAULT_SEED if seed is None else seed
    steps = DEFAULT_STEPS if steps is None else steps
    path = base_path(model_cfg, seed=seed, steps=steps, text_path=text_path)
    with _file_lock(path.with_name(path.name + ".lock")):
        if path.exists():
            return path, read_weights(path)[1]
        log.warning("no cached pretrained base for d_model=%d n_layers=%d n_heads=%d; building %s (%d steps)",
                    model_cfg.d_model, model_cfg.n_layers, model_cfg.n_heads, path, steps)
        stats: dict = {}
        state = pretrain_tiny(model_cfg, text_path=text_path, steps=steps, seed=seed, seq_len=DEFAULT_SEQ_LEN,
                              batch_size=DEFAULT_BATCH_SIZE, lr=DEFAULT_LR, progress=progress, stats=stats)
        meta = {"key": base_key(model_cfg, seed=seed, steps=steps, text_path=text_path), **stats}
        save_weights(state, path, meta)
        return path, meta


def _check_shapes(model_cfg: ModelConfig, state: dict[str, torch.Tensor], source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in build_tiny(model_cfg)[0].state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:3]
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:3]
        raise ConfigError(f"model.init={source}: weights do not fit d_model={model_cfg.d_model} "
                          f"n_layers={model_cfg.n_layers} n_heads={model_cfg.n_heads} "
                          f"(missing {missing}, wrong shape {wrong})")


def shipped_base(model_cfg: ModelConfig) -> Path | None:
    """The base shipped in the package for this shape, if any: built by
    `raydllm pretrain --out raydllm/assets/tiny-base-d<d>-l<l>-h<h>.pt` with the default seed and steps
    (from WikiText valid + generated problems here); used whatever text this machine has, so a fresh install
    starts from the same base without spending minutes on pretraining."""
    path = (Path(__file__).resolve().parents[1] / "assets"
            / f"tiny-base-d{model_cfg.d_model}-l{model_cfg.n_layers}-h{model_cfg.n_heads}.pt")
    if not path.is_file():
        return None
    _, meta = read_weights(path)
    key = {k: v for k, v in meta.get("key", {}).items() if k != "corpus"}
    want = {k: v for k, v in base_key(model_cfg).items() if k != "corpus"}
    return path if key == want else None


def load_base_weights(model_cfg: ModelConfig, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """Start weights for the tiny model: init="pretrained" = the cached base of this shape (built on first
    use); init=<path> = that weights file (save_weights format, a plain state dict, a DeepSpeed
    model-states file) or a raydllm checkpoint folder (its backbone weights)."""
    init = model_cfg.init
    if init == "random":
        raise ConfigError("model.init=random has no base weights")
    if init == "pretrained":
        shipped = shipped_base(model_cfg)
        path = shipped if shipped is not None else build_base(model_cfg, progress=progress)[0]
        state, _ = read_weights(path)
    else:
        path = Path(init).expanduser()
        if path.is_dir():
            state = backbone_weights(read_checkpoint_state(path))
        elif path.is_file():
            state, _ = read_weights(path)
        else:
            raise ConfigError(f"model.init={init}: expected random, pretrained, or a weights file / checkpoint "
                              "folder that exists")
    _check_shapes(model_cfg, state, init)
    return state


def prepare_base(model_cfg: ModelConfig) -> None:
    """Build (or find) the tiny model's pretrained base in the calling process, with a progress bar on the
    user's terminal, rather than in every Ray worker at start-up."""
    if model_cfg.name == "tiny" and model_cfg.init == "pretrained":
        load_base_weights(model_cfg, progress=True)
