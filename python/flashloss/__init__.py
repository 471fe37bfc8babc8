"""flashloss: kernels for training objectives that never materialise the big intermediate
(similarity matrices, vocabulary logits, dense permutation products)."""
from ._version import __version__
from . import _native

_native.load(warn=True)  # warns once if flashloss._C is missing; the torch backend still serves

from ._backend import BACKENDS, BackendUnavailableError, backend_available  # noqa: E402
from . import compat, contrastive, distributed, lm, ops, preference, ref, sorting  # noqa: E402
from .compat import ClipLoss, DistillClipLoss, NTXentLoss, SigLipLoss, SupConLoss  # noqa: E402
from .contrastive import (  # noqa: E402
    ISogCLRLoss,
    align_uniform_loss,
    clip_loss,
    dcl_loss,
    debiased_contrastive_loss,
    dexml_loss,
    distill_clip_loss,
    hard_negative_loss,
    hard_negative_nce,
    info_nce,
    isogclr_loss,
    margin_nce,
    mnrl_loss,
    moco_loss,
    nt_xent,
    siglip_loss,
    similarity_kl_loss,
    soft_target_nce,
    supcon_loss,
    topk_threshold,
)
from .lm import focal_loss, linear_cross_entropy, vocab_kl  # noqa: E402
from .fused_preference import FusedLinearPreferenceLoss  # noqa: E402
from .preference import (  # noqa: E402
    RunningMean,
    alphapo_loss,
    bco_loss,
    bradley_terry_loss,
    cpo_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    lipo_lambda_loss,
    npo_loss,
    orpo_loss,
    plackett_luce_loss,
    preference_loss,
    simpo_loss,
    tdpo_loss,
    udm_weight,
)
from .sorting import (  # noqa: E402
    DiffSortNet,
    groco_loss,
    neural_ndcg,
    neural_sort,
    permutation_loss,
    soft_rank,
    spearman_loss,
)
from .ops import (  # noqa: E402
    contrastive_lse,
    logprobs_from_logits,
    row_logsumexp,
    sequence_logprobs,
    sort_network,
    token_logprobs,
)

__all__ = [
    "__version__", "BACKENDS", "BackendUnavailableError", "backend_available", "compat", "contrastive", "distributed",
    "ops", "ref", "lm", "contrastive_lse", "row_logsumexp",
    "token_logprobs", "logprobs_from_logits", "sort_network", "sequence_logprobs", "linear_cross_entropy", "focal_loss", "vocab_kl",
    "info_nce", "margin_nce", "moco_loss", "mnrl_loss", "clip_loss", "siglip_loss", "nt_xent", "supcon_loss", "dcl_loss",
    "debiased_contrastive_loss", "hard_negative_loss", "align_uniform_loss", "soft_target_nce",
    "hard_negative_nce", "topk_threshold", "dexml_loss", "isogclr_loss", "ISogCLRLoss", "distill_clip_loss",
    "similarity_kl_loss",
    "preference", "preference_loss", "dpo_loss", "ipo_loss", "simpo_loss", "cpo_loss", "alphapo_loss", "orpo_loss",
    "kto_loss", "bco_loss", "udm_weight", "npo_loss", "tdpo_loss", "lipo_lambda_loss", "plackett_luce_loss",
    "bradley_terry_loss", "RunningMean", "FusedLinearPreferenceLoss",
    "ClipLoss", "DistillClipLoss", "SigLipLoss", "NTXentLoss", "SupConLoss",
    "sorting", "DiffSortNet", "permutation_loss", "groco_loss", "soft_rank", "spearman_loss", "neural_sort",
    "neural_ndcg",
]
