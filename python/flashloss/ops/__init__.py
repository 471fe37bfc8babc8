"""The primitives: one module each, one contract across backends (DESIGN.md §1)."""
from .contrastive_lse import ContrastiveStats, contrastive_lse
from .row_logsumexp import row_logsumexp
from .sort_network import SortResult, sort_network
from .token_logprobs import SequenceLogprobs, TokenStats, logprobs_from_logits, sequence_logprobs, token_logprobs

__all__ = ["ContrastiveStats", "contrastive_lse", "row_logsumexp", "TokenStats", "token_logprobs",
           "logprobs_from_logits", "sequence_logprobs", "SequenceLogprobs", "SortResult", "sort_network"]
