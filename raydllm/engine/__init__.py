"""Engine layer: the backbone adapter, the embedded model's base, checkpoints, and the worker's training loop."""
