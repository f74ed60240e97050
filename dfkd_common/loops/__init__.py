"""The loops: one runner (resume, progress, checkpoints) and the units of work that stages supply to it."""
