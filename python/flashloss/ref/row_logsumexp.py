import torch


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log sum_j exp(x[..., j]) written the way a user would: a max-shifted exp over the whole
    tensor (one full-size temporary). Statistics dtype follows the primitive: fp64 for fp64, else fp32."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    m = xa.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return (xa - m).exp().sum(dim=-1).log() + m.squeeze(-1)
