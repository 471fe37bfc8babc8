"""The primitives: one module each, one contract across backends (DESIGN.md §1)."""
from .contrastive_lse import ContrastiveStats, contrastive_lse
from .row_logsumexp import row_logsumexp
from .token_logprobs import TokenStats, token_logprobs

__all__ = ["ContrastiveStats", "contrastive_lse", "row_logsumexp", "TokenStats", "token_logprobs"]
