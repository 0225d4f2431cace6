"""raydllm: DLLM-JEPA fine-tuning sweeps for masked-diffusion language models on Ray."""
__version__ = "0.1.0"
