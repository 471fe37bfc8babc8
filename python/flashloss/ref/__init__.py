"""Naive full-materialisation references: test oracles (run in float64) and benchmark baselines.
Never a backend: they build every intermediate tensor whole, exactly as a plain PyTorch user would."""
from .contrastive_lse import contrastive_lse
from .row_logsumexp import row_logsumexp
from . import preference
from . import sort_network as sorting
from . import token_logprobs as lm
from .token_logprobs import logprobs_from_logits, token_logprobs

__all__ = ["contrastive_lse", "row_logsumexp", "lm", "preference", "sorting", "token_logprobs", "logprobs_from_logits"]
