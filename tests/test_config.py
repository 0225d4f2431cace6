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


def test_no_hub_code_runs_unless_a_config_asks():
    """trust_remote_code is off by default (raydllm's own classes load LLaDA, Dream and the tiny model), and a
    config that wants the folder's own code says so twice: implementation=remote and trust_remote_code=true."""
    from raydllm.core.config import ModelConfig

    assert ModelConfig().trust_remote_code is False
    assert load_config("gsm8k", "paper").model.trust_remote_code is False
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code: model\.implementation=remote"):
        load_config("gsm8k", "paper", ["model.implementation=remote"])
    assert load_config("gsm8k", "paper", ["model.implementation=remote", "model.trust_remote_code=true"]
                       ).model.trust_remote_code is True


def test_shipped_spaces_pin_a_hub_commit():
    """Every shipped space that downloads a hub model names the commit (model.revision) every node downloads."""
    from pathlib import Path

    from raydllm.core.config import ModelConfig
    from raydllm.sweep.search_space import SweepSpec, base_raw

    import yaml

    hub = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml")):
        spec = SweepSpec.model_validate(yaml.safe_load(path.read_text()))
        model = ModelConfig.model_validate(base_raw(spec)["model"])  # the trials' model, whatever their data
        if model.name != "tiny":
            hub[path.name] = (model.name, model.revision)
    assert len(hub) >= 7 and all(revision for _, revision in hub.values()), hub
    assert {name: revision for name, revision in hub.values()} == {
        "GSAI-ML/LLaDA-8B-Base": "0f2787f2d87eac5eed8a087d5ecd24277e6255b2",
        "Dream-org/Dream-v0-Base-7B": "6572adb5535263e4d1a337b56942ba48b6dee2a9"}
    for bad in ("main", "v1.0", "0f2787f"):
        with pytest.raises(ConfigError, match=r"model\.revision="):
            load_config("gsm8k", "paper", [f"model.revision={bad}"])
    with pytest.raises(ConfigError, match=r"model\.revision: the embedded tiny model"):
        load_config("gsm8k", "local", ["model.revision=" + "a" * 40])


def test_the_revision_reaches_every_hub_download(monkeypatch):
    """load_pretrained hands model.revision to the first hub read (the tokenizer) and to the config read that
    picks the implementation."""
    import transformers

    from raydllm.engine import backbone

    seen = []

    class Read(Exception):
        pass

    def record(what):
        def read(*args, **kwargs):
            seen.append((what, kwargs.get("revision")))
            if what == "tokenizer":
                return object()
            raise Read
        return read

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("tokenizer"))
    monkeypatch.setattr(transformers.PreTrainedConfig, "get_config_dict", record("config"))
    with pytest.raises(Read):
        backbone.load_pretrained("GSAI-ML/LLaDA-8B-Base", trust_remote_code=False, revision="a" * 40)
    assert seen == [("tokenizer", "a" * 40), ("config", "a" * 40)]
