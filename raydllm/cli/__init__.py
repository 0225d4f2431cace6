"""CLI layer: the `raydllm` command. Nothing else in the package imports it."""
