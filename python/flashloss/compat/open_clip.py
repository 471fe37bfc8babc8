"""Drop-in replacements for open_clip's ClipLoss, DistillClipLoss and SigLipLoss: same constructor
arguments, same forward signatures, same numbers, without the N x N logit matrix. With
world_size > 1, ClipLoss and SigLipLoss run flashloss.distributed on the default process group
(or `group=`)."""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from ..contrastive import clip_loss, distill_clip_loss, siglip_loss


def _single_process(world_size: int, what: str) -> None:
    if world_size > 1:
        raise NotImplementedError(
            f"{what}(world_size={world_size}): the multi-process path is not built for this loss; "
            "flashloss.distributed has clip_loss, siglip_loss, info_nce and supcon_loss")


def _check_process_group(module, group) -> None:
    """open_clip's rank / world_size arguments must describe the group the loss will use."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{type(module).__name__}(world_size={module.world_size}) needs an initialised "
                           "torch.distributed process group (torch.distributed.init_process_group)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if (rank, world) != (module.rank, module.world_size):
        raise ValueError(f"{type(module).__name__}(rank={module.rank}, world_size={module.world_size}) does not "
                         f"match the process group (rank {rank} of {world})")


class ClipLoss(nn.Module):
    """open_clip.ClipLoss: forward(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False) -> (CE(S) + CE(S^T)) / 2 with S = logit_scale * img @ txt^T (+ bias).

    world_size > 1: flashloss.distributed.clip_loss on `group` (default: the default group), with
    open_clip's local_loss / gather_with_grad semantics, numbers and gradients (impl="gather", the
    default), or the ring (impl="ring" / "bidir", for local_loss=True and gather_with_grad=True, the
    same numbers without gathering the batch). `group` and `impl` are flashloss additions."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, backend: str = "auto", group=None, impl: str = "gather"):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("ClipLoss(use_horovod=True) is not supported")
        if impl not in distributed.IMPLS:
            raise ValueError(f"impl must be one of {distributed.IMPLS}, got {impl!r}")
        if impl != "gather" and not (local_loss and gather_with_grad):
            raise ValueError(f"ClipLoss(impl={impl!r}) needs local_loss=True and gather_with_grad=True "
                             "(the other flag combinations are open_clip's all-gather variants: impl='gather')")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.group, self.impl = group, impl

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.world_size > 1:
            _check_process_group(self, self.group)
            loss = distributed.clip_loss(image_features, text_features, logit_scale, logit_bias, group=self.group,
                                         impl=self.impl, local_loss=self.local_loss,
                                         gather_with_grad=self.gather_with_grad, backend=self.backend)
        else:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class DistillClipLoss(ClipLoss):
    """open_clip.DistillClipLoss: forward(image_features, text_features, logit_scale,
    dist_image_features, dist_text_features, dist_logit_scale, output_dict=False) ->
    (contrastive_loss, distill_loss), or {"contrastive_loss", "distill_loss"} with output_dict.
    Single process only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _single_process(self.world_size, "DistillClipLoss")

    def forward(self, image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale, output_dict=False):
        contrastive, distill = distill_clip_loss(image_features, text_features, logit_scale, dist_image_features,
                                                 dist_text_features, dist_logit_scale, backend=self.backend)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


# open_clip's SigLipLoss dist_impl -> flashloss.distributed impl (same numbers and gradients; the
# all-reduce exchange of `reduce` is an all-gather here)
_SIGLIP_IMPL = {"bidir": "bidir", "shift": "ring", "reduce": "gather", "gather": "gather"}


class SigLipLoss(nn.Module):
    """open_clip.SigLipLoss: forward(image_features, text_features, logit_scale, logit_bias,
    output_dict=False) -> -(1/N) sum_ij log sigmoid(z_ij S_ij).

    world_size > 1: flashloss.distributed.siglip_loss on `group` (default: the default group);
    dist_impl 'bidir' and 'shift' run the ring (both ways / one way), 'gather' and 'reduce' the
    all-gather path, each with open_clip's numbers and gradients."""

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None, backend: str = "auto", group=None):
        super().__init__()
        self.cache_labels, self.rank, self.world_size, self.backend = cache_labels, rank, world_size, backend
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in _SIGLIP_IMPL:
            raise ValueError(f"dist_impl must be one of {tuple(_SIGLIP_IMPL)}, got {dist_impl!r}")
        self.group = group

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.world_size > 1:
            _check_process_group(self, self.group)
            loss = distributed.siglip_loss(image_features, text_features, logit_scale, logit_bias, group=self.group,
                                           impl=_SIGLIP_IMPL[self.dist_impl], backend=self.backend)
        else:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
