"""The top-level `raydllm --help` is written for users: a description, an example, no internal layer notes."""
from raydllm.cli.app import build_parser


def test_top_level_help_is_for_users():
    text = build_parser().format_help()
    assert "CLI layer" not in text and "Nothing imports" not in text
    assert "masked-diffusion" in text
    assert "raydllm tune gsm8k --preset local" in text
