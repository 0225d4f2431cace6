"""Core layer: the pure tensor code (masking, the DLLM-JEPA objective, the samplers, the embedded model, the
LLaDA and Dream architectures) and the typed config. No Ray, DeepSpeed or MLflow is imported here."""
