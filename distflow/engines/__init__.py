"""Per-rank engines: generation (inference) and training."""
