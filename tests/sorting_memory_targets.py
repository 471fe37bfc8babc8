"""Subprocess memory targets of the sorting objectives (protocol: flashloss.benchmark.memory)."""
import torch


def groco_fwd_bwd(n: int, backend: str, d: int = 128, k: int = 10):
    """GroCo with two views of batch n, forward + backward: flashloss, or the anchor's dense path
    (B x B cosine matrix, masked_fill, topk, dense P from diffsort-style layer products)."""
    import torch.nn.functional as F

    import flashloss

    gen = torch.Generator().manual_seed(n)
    views = [torch.randn(n, d, generator=gen).requires_grad_(True) for _ in range(2)]

    def run():
        if backend == "naive":
            from flashloss.benchmark.cases import groco_dense

            loss = groco_dense(views, k)
        else:
            loss = flashloss.groco_loss(views, topk_neg=k, backend=backend)
        return torch.autograd.grad(loss, views)

    return run
