"""The primitives: one module each, one contract across backends (DESIGN.md §1)."""
from .row_logsumexp import row_logsumexp

__all__ = ["row_logsumexp"]
