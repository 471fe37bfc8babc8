"""Dense reference for primitive B (flashloss.ops.token_logprobs) and its siblings: builds the whole
N x V logit matrix and its log-softmax, exactly as a plain PyTorch trainer does. Test oracle (run in
float64) and benchmark baseline ("naive"); differentiable by autograd."""
from __future__ import annotations

import torch


def logits(hidden, weight, bias=None, *, temperature=1.0, logit_scale=1.0, softcap=None):
    """z = (1/T) c tanh(a (hidden @ weight^T + bias) / c) (OBJECTIVES.md §2.1), whole."""
    x = hidden @ weight.T
    if bias is not None:
        x = x + bias
    if softcap is not None:
        return softcap * torch.tanh(logit_scale * x / softcap) / temperature
    return logit_scale * x / temperature


def token_logprobs(hidden, weight, targets, bias=None, *, ignore_index=-100, temperature=1.0, logit_scale=1.0,
                   softcap=None, outputs=("logp",)):
    """Dict of the requested outputs of flashloss.ops.token_logprobs, from the full logits."""
    z = logits(hidden, weight, bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    z = z.float() if z.dtype in (torch.bfloat16, torch.float16) else z
    logq = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(z, dim=-1)
    p = logq.exp()
    res = {
        "logp": logq.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1),
        "lse": lse,
        "entropy": -(p * logq).sum(-1),
        "z_sum": z.sum(-1),
        "log_sum_p2": torch.logsumexp(2 * logq, dim=-1).detach(),
    }
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return {o: torch.where(valid, res[o], zero) for o in outputs}


def logprobs_from_logits(logits, targets, *, ignore_index=-100, temperature=1.0):
    """log_softmax(logits / T) gathered at the targets (0 at ignored positions)."""
    x = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    logq = torch.log_softmax(x / temperature if temperature != 1.0 else x, -1)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    out = logq.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))
