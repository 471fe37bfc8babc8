import torch


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log sum_j exp(x[..., j]) written the way a user would: a max-shifted exp over the whole
    tensor (full-size temporaries, autograd saves them). Statistics dtype follows the primitive
    (fp64 for fp64, else fp32). Follows the primitive's contract for a fully masked row: value
    -inf and gradient 0 (plain torch.logsumexp gives a NaN gradient there)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    masked = (xa == float("-inf")).all(dim=-1, keepdim=True)
    xa = torch.where(masked, torch.zeros_like(xa), xa)
    m = xa.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    lse = (xa - m).exp().sum(dim=-1).log() + m.squeeze(-1)
    return torch.where(masked.squeeze(-1), torch.full_like(lse, float("-inf")), lse)
