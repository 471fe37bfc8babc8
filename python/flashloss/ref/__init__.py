"""Naive full-materialisation references: test oracles (run in float64) and benchmark baselines.
Never a backend: they build every intermediate tensor whole, exactly as a plain PyTorch user would."""
from .row_logsumexp import row_logsumexp

__all__ = ["row_logsumexp"]
