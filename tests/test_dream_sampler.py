"""raydllm's Dream sampler (SamplerConfig method "dream") against a re-creation of Dream's `diffusion_generate`
loop (Dream-org's generation_utils `_sample`, as it ships with the Dream checkpoints), written here from that
code's behaviour, on the tiny Dream architecture: every remasking algorithm, temperature 0 and a seeded
temperature > 0 (Dream draws from torch's global RNG: the reference runs after torch.manual_seed(seed), raydllm
with a torch.Generator seeded alike), batched with left padding."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributions as dists
import torch.nn.functional as F

from archs import save_tiny_dream
from raydllm.core.config import ModelConfig
from raydllm.core.sampler import SamplerConfig, sample
from raydllm.engine.backbone import load_backbone
from raydllm.evaluation.evaluate import left_pad

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_tokens(logits, temperature, rule):
    """Dream's sample_tokens without top_p / top_k: (confidence, tokens)."""
    if temperature > 0:
        logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        try:
            tokens = dists.Categorical(probs=probs).sample()
            confidence = torch.gather(probs, -1, tokens.unsqueeze(-1)).squeeze(-1)
        except Exception:  # Dream falls back to the maximum (e.g. no rows)
            confidence, tokens = probs.max(dim=-1)
    else:
        confidence, tokens = probs.max(dim=-1)
    if rule == "topk_margin":
        ordered = torch.sort(probs, dim=-1, descending=True).values
        confidence = ordered[:, 0] - ordered[:, 1]
    if rule == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, tokens


def reference_generate(model, prompt, attention, mask_id, gen, steps, temperature, rule, alg_temp, eps=1e-3):
    """Dream's loop: the raw model, its logits shifted by one, the linspace(1, eps, steps + 1) schedule."""
    x = F.pad(prompt, (0, gen), value=mask_id)
    attention = F.pad(attention, (0, gen), value=1)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = model(x, attention_mask=attention).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if rule == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index]) + mask_id
            transfer = torch.rand(*x0.shape) < p_transfer
            _, x0[transfer] = reference_tokens(mask_logits[transfer], temperature, rule)
            x[mask_index] = x0.clone()
            continue
        confidence, x0 = reference_tokens(mask_logits, temperature, rule)
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        count = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
        full_confidence[mask_index] = confidence
        if count > 0:
            if not alg_temp:
                _, transfer = torch.topk(full_confidence, count)
            else:
                transfer = torch.multinomial(F.softmax(full_confidence / alg_temp, dim=-1), num_samples=count)
            x_ = torch.zeros_like(x) + mask_id
            x_[mask_index] = x0.clone()
            rows = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer)
            x[rows, transfer] = x_[rows, transfer]
    return x


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    backbone = load_backbone(ModelConfig(name=str(save_tiny_dream(tmp_path_factory.mktemp("dream")))))[0]
    torch.manual_seed(0)
    with torch.no_grad():
        for param in backbone.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3)  # spread confidences: the tiny init predicts near-uniformly
    return backbone.eval()


CASES = list(itertools.product(("origin", "maskgit_plus", "topk_margin", "entropy"),
                               ((0.0, 0.0), (0.7, 0.0), (0.7, 0.5)), ((16, 16), (16, 5))))


def test_dream_sampler_token_identical_to_diffusion_generate(dream):
    ids, attention = left_pad([list(b"Q: 3 + 4 = ?\nA:"), list(b"Hi:"), list(b"Tom has 5.")], pad_id=dream.ids.pad)
    mask = dream.ids.mask
    identical = 0
    for seed, (rule, (temperature, alg_temp), (gen, steps)) in enumerate(CASES):
        torch.manual_seed(seed)
        with torch.no_grad():
            expected = reference_generate(dream.model, ids.clone(), attention, mask, gen, steps, temperature,
                                          rule, alg_temp)
        config = SamplerConfig(steps=steps, gen_length=gen, block_length=gen, method="dream",
                               temperature=temperature, dream_algorithm=rule, dream_alg_temp=alg_temp)
        got = sample(dream.logits, ids, attention, mask_id=mask, config=config,
                     generator=torch.Generator().manual_seed(seed))
        identical += bool(torch.equal(got, expected))
    print(f"{identical} of {len(CASES)} Dream runs token-identical to diffusion_generate")
    assert identical == len(CASES)


def test_dream_sampler_rejects_bad_settings():
    with pytest.raises(ValueError, match="dream_algorithm"):
        SamplerConfig(steps=4, gen_length=8, block_length=8, method="dream", dream_algorithm="maskgit")
    with pytest.raises(ValueError, match="one block"):
        SamplerConfig(steps=4, gen_length=8, block_length=4, method="dream")


def test_eval_sampler_dream_resolves_to_dreams_sampler():
    from raydllm.core.config import load_config
    from raydllm.evaluation.evaluate import default_sampler

    cfg = load_config("gsm8k", "local", ["eval.sampler=dream", "eval.dream_algorithm=topk_margin"])
    sampler = default_sampler(cfg, method=cfg.eval.sampler, dream_algorithm=cfg.eval.dream_algorithm)
    assert sampler.method == "dream" and sampler.dream_algorithm == "topk_margin"
    assert sampler.block_length == sampler.gen_length
    with pytest.raises(Exception, match="dream_algorithm"):
        load_config("gsm8k", "local", ["eval.sampler=dream", "eval.dream_algorithm=maskgit"])
