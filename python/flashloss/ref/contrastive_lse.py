"""Dense reference for primitive A (flashloss.ops.contrastive_lse): builds the whole logit matrix
and every mask, exactly as the objective is written. Test oracle (run in float64) and benchmark
baseline; differentiable by autograd."""
from __future__ import annotations

import torch


def contrastive_masks(n: int, m_all: int, device, *, targets=None, labels_q=None, labels_k=None,
                      k_offset: int = 0, m_main: int | None = None, exclude_self: bool = False,
                      exclude_positives: bool = False):
    """(Y, allowed, valid_rows): positives [N, M_all] bool, columns allowed in the LSEs
    [N, M_all] bool, and rows that take part in column statistics [N] bool."""
    m_main = m_all - k_offset if m_main is None else m_main
    cols = torch.arange(m_all, device=device)
    main = (cols >= k_offset) & (cols < k_offset + m_main)
    Y = torch.zeros(n, m_all, dtype=torch.bool, device=device)
    valid_rows = torch.ones(n, dtype=torch.bool, device=device)
    if targets is not None and targets.dim() == 2:  # [N, P], entries < 0 are padding
        ok = targets >= 0
        valid_rows = ok.any(1)
        Y = ((cols[None, None, :] == (targets[:, :, None] + k_offset)) & ok[:, :, None]).any(1) & main[None, :]
    elif targets is not None:
        valid_rows = targets != -100
        Y = (cols[None, :] == (targets[:, None] + k_offset)) & valid_rows[:, None] & main[None, :]
    elif labels_q is not None:
        lk = torch.full((m_all,), 0, dtype=labels_k.dtype, device=device)
        lk[k_offset:k_offset + m_main] = labels_k
        Y = (labels_q[:, None] == lk[None, :]) & main[None, :]
    allowed = torch.ones(n, m_all, dtype=torch.bool, device=device)
    if exclude_self:
        rows = torch.arange(n, device=device)
        self_mask = (cols[None, :] == rows[:, None] + k_offset) & (rows[:, None] < m_main)
        allowed &= ~self_mask
        Y = Y & ~self_mask
    if exclude_positives:
        allowed &= ~Y
    return Y, allowed, valid_rows


def _lse(s: torch.Tensor, dim: int) -> torch.Tensor:
    # logsumexp with -inf (not NaN) value and zero gradient for fully masked lines
    empty = torch.isinf(s).all(dim=dim, keepdim=True) & (s < 0).all(dim=dim, keepdim=True)
    safe = torch.where(empty, torch.zeros_like(s), s)
    out = torch.logsumexp(safe, dim=dim)
    return torch.where(empty.squeeze(dim), torch.full_like(out, float("-inf")), out)


def contrastive_lse(q, k, scale=1.0, bias=None, *, targets=None, labels_q=None, labels_k=None,
                    exclude_self=False, exclude_positives=False, margin=0.0, neg_threshold=None, extra_k=None,
                    mode="softmax"):
    """Dense version of flashloss.ops.contrastive_lse; returns the same named outputs (all of them).
    Extra negative columns are appended after k."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    extras = [] if extra_k is None else ([extra_k] if isinstance(extra_k, torch.Tensor) else list(extra_k))
    k_all = torch.cat([k] + list(extras), dim=0).to(acc)
    n, m = q.shape[0], k.shape[0]
    sim = q.to(acc) @ k_all.T
    scale_t = scale if isinstance(scale, torch.Tensor) else torch.tensor(scale, dtype=acc, device=q.device)
    scale_t = scale_t.to(acc)
    S = (scale_t[:, None] if scale_t.dim() == 1 else scale_t) * sim
    if bias is not None:
        S = S + bias
    Y, allowed, valid = contrastive_masks(n, k_all.shape[0], q.device, targets=targets, labels_q=labels_q,
                                          labels_k=labels_k, k_offset=0, m_main=m,
                                          exclude_self=exclude_self, exclude_positives=exclude_positives)
    if neg_threshold is not None:  # hard negatives: drop non-positive pairs below the row threshold
        thr = neg_threshold if isinstance(neg_threshold, torch.Tensor) else torch.full((n,), float(neg_threshold), device=q.device)
        allowed = allowed & (Y | (S >= thr.to(S)[:, None]))
    if isinstance(margin, torch.Tensor):
        S = S + margin.to(acc)[:, None] * Y.to(acc)
    elif margin:
        S = S + margin * Y.to(acc)
    neg_inf = torch.full_like(S, float("-inf"))
    Yf = Y.to(acc)
    out = {}
    if mode == "sigmoid":
        z = 2 * Yf - 1
        out["row_sigmoid"] = torch.where(allowed, torch.logaddexp(torch.zeros_like(S), -z * S),
                                         torch.zeros_like(S)).sum(1)
    out["row_lse"] = _lse(torch.where(allowed, S, neg_inf), 1)
    col_allowed = (allowed & valid[:, None])[:, :m]
    out["col_lse"] = _lse(torch.where(col_allowed, S[:, :m], neg_inf[:, :m]), 0)
    out["pos_sum"] = (torch.where(Y, S, torch.zeros_like(S))).sum(1)
    out["pos_count"] = Yf.sum(1)
    out["col_pos_sum"] = torch.where(Y, S, torch.zeros_like(S))[:, :m].sum(0)
    return out
