"""Evaluation layer: generation and scoring, the forgetting and collapse probes, and the trial loop that plugs
them into the engine's training loop."""
