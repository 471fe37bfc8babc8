"""Drop-in replacements for open_clip's ClipLoss, DistillClipLoss and SigLipLoss: same constructor
arguments, same forward signatures, same numbers, without the N x N logit matrix."""
from __future__ import annotations

import torch
from torch import nn

from ..contrastive import clip_loss, distill_clip_loss, siglip_loss


def _single_process(world_size: int, what: str) -> None:
    if world_size > 1:
        raise NotImplementedError(
            f"{what}(world_size={world_size}): the multi-process path (all-gather with open_clip's "
            "local_loss semantics, and the ring) belongs to flashloss.distributed, which is not built yet")


class ClipLoss(nn.Module):
    """open_clip.ClipLoss: forward(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False) -> (CE(S) + CE(S^T)) / 2 with S = logit_scale * img @ txt^T (+ bias)."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, backend: str = "auto"):
        super().__init__()
        _single_process(world_size, "ClipLoss")
        if use_horovod:
            raise NotImplementedError("ClipLoss(use_horovod=True) is not supported")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = clip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class DistillClipLoss(ClipLoss):
    """open_clip.DistillClipLoss: forward(image_features, text_features, logit_scale,
    dist_image_features, dist_text_features, dist_logit_scale, output_dict=False) ->
    (contrastive_loss, distill_loss), or {"contrastive_loss", "distill_loss"} with output_dict."""

    def forward(self, image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale, output_dict=False):
        contrastive, distill = distill_clip_loss(image_features, text_features, logit_scale, dist_image_features,
                                                 dist_text_features, dist_logit_scale, backend=self.backend)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class SigLipLoss(nn.Module):
    """open_clip.SigLipLoss: forward(image_features, text_features, logit_scale, logit_bias,
    output_dict=False) -> -(1/N) sum_ij log sigmoid(z_ij S_ij)."""

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None, backend: str = "auto"):
        super().__init__()
        _single_process(world_size, "SigLipLoss")
        self.cache_labels, self.rank, self.world_size, self.backend = cache_labels, rank, world_size, backend
        self.dist_impl = dist_impl or "bidir"

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
