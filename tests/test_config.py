"""Config is validated once at the door: one line naming the field, exit code 2."""
import warnings

import pytest

from raydllm.cli.app import main
from raydllm.core.config import ConfigError, load_config


@pytest.mark.parametrize("override, field", [
    ("jepa.t_low=0.8", "jepa"),           # t_L > t_H (0.7)
    ("jepa.t_high=1.5", "jepa.t_high"),   # outside (0, 1)
    ("jepa.t_low=0", "jepa.t_low"),
    ("jepa.k=-1", "jepa.k"),
    ("jepa.lambda=-0.5", "jepa.lambda"),
    ("train.nonsense=3", "train.nonsense"),
    ("nosection.x=1", "nosection"),
    ("train.lr=abc", "train.lr"),
    ("train.checkpoint_every=30", "train.checkpoint_every=30 must be a multiple of train.eval_every"),
])
def test_bad_values_exit_2_with_one_line(override, field, capsys):
    assert main(["train", "gsm8k", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err, err


def test_error_names_the_field():
    with pytest.raises(ConfigError, match=r"jepa.*t_low=0.8 must be <= jepa.t_high=0.7"):
        load_config("gsm8k", "local", ["jepa.t_low=0.8"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config("gsm8k", "local", ["jepa.lamda=1"])


def test_symmetric_views_allowed_with_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config("gsm8k", "local", ["jepa.t_low=0.5", "jepa.t_high=0.5"])
    assert cfg.jepa.t_low == cfg.jepa.t_high == 0.5
    assert any("symmetric" in str(w.message) for w in caught)


def test_presets_and_overrides():
    paper = load_config("gsm8k", "paper")
    assert (paper.jepa.t_low, paper.jepa.t_high, paper.train.lr) == (0.2, 0.7, 1e-5)
    assert paper.model.name == "GSAI-ML/LLaDA-8B-Base" and paper.train.workers == 8
    assert paper.train.micro_batch_size * paper.train.grad_accum * paper.train.workers == 32
    wide = load_config("gsm8k", "wide-t")
    assert (wide.jepa.t_low, wide.jepa.t_high, wide.train.lr) == (0.1, 0.9, 1.4e-6)
    local = load_config("gsm8k", "local", ["jepa.lambda=0", "train.max_steps=60"])
    assert local.jepa.lam == 0 and local.train.max_steps == 60 and local.data.source == "synthetic"
    assert local.flat()["jepa.lambda"] == 0
    with pytest.raises(ConfigError, match="--preset"):
        load_config("gsm8k", "huge")


def test_ema_device_choice():
    assert load_config("gsm8k", "local").jepa.ema_device == "auto"
    assert load_config("gsm8k", "local", ["jepa.ema_device=cpu"]).jepa.ema_device == "cpu"
    with pytest.raises(ConfigError, match=r"^jepa\.ema_device='gpu': .*'auto' or 'cpu'$"):
        load_config("gsm8k", "local", ["jepa.ema_device=gpu"])
