"""Bench layer: `raydllm bench`, the measurements behind the README's figures (each prints ratios from one run)."""
