"""Data layer: tasks (their examples, prompts, answer extraction and scoring), corpora, and the SFT batches
the engine trains on."""
