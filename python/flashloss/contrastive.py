"""Contrastive objectives (OBJECTIVES.md §1), each a thin function on primitive A
(flashloss.ops.contrastive_lse): the N x M similarity matrix is never stored.

Conventions: `scale` multiplies similarities (scale = 1/temperature; functions that follow a
library whose parameter is a temperature take `temperature`); inputs are raw features unless the
loss says cosine, in which case they are L2-normalised inside the loss (eps 1e-8, part of the
autograd graph). Every loss takes `reduction` ('mean' | 'sum' | 'none') and `backend`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._validate import check_reduction
from .ops.contrastive_lse import contrastive_lse, softplus

EPS = 1e-8


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=EPS)


def _reduce(per_item: torch.Tensor, reduction: str, valid: Optional[torch.Tensor] = None,
            mean_divisor=None) -> torch.Tensor:
    """'none': per item (invalid items 0); 'sum': sum of valid items; 'mean': that sum divided by
    the number of valid items clamped to >= 1 (or by `mean_divisor` where the anchor says so)."""
    check_reduction(reduction)
    if valid is not None:
        per_item = torch.where(valid, per_item, torch.zeros_like(per_item))
    if reduction == "none":
        return per_item
    total = per_item.sum()
    if reduction == "sum":
        return total
    if mean_divisor is not None:
        return total / mean_divisor
    count = per_item.numel() if valid is None else int(valid.sum())
    return total / max(count, 1)


def _scale_arg(scale, temperature, default_temperature):
    if scale is not None and temperature is not None:
        raise ValueError("give scale or temperature, not both")
    if temperature is not None:
        if isinstance(temperature, torch.Tensor):
            return 1.0 / temperature
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return 1.0 / temperature
    return 1.0 / default_temperature if scale is None else scale


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return (a.to(acc) * b.to(acc)).sum(-1)


# ---------------------------------------------------------------------------------------------
# 1.1 InfoNCE, 1.5 MoCo queue, 1.6 MNRL, 1.12 margins


def info_nce(q, k, targets=None, *, scale=None, temperature=None, bias=None, extra_k=None,
             margin=0.0, reduction: str = "mean", backend: str = "auto"):
    """One-direction InfoNCE, l_i = LSE_j S_ij - S_{i, y_i} with S = scale * q k^T + bias
    (= F.cross_entropy(S, targets)). targets default to arange(N); -100 ignores a row.
    `extra_k` adds negative-only columns (a MoCo queue: pass it without grad). `margin` (float or
    [N] tensor) is added to the positive logit (see margin_nce for AM/AAM). Default temperature 0.07."""
    if targets is None:
        if k.shape[0] < q.shape[0]:
            raise ValueError(f"targets default to arange(N) and need M >= N; got N={q.shape[0]}, M={k.shape[0]}")
        targets = torch.arange(q.shape[0], device=q.device)
    s = _scale_arg(scale, temperature, 0.07)
    r = contrastive_lse(q, k, s, bias, targets=targets, extra_k=extra_k, margin=margin,
                        outputs=("row_lse", "pos_sum"), backend=backend)
    return _reduce(r.row_lse - r.pos_sum, reduction, targets != -100)


def margin_nce(q, k, targets=None, *, scale: float = 30.0, margin: float = 0.2, kind: str = "additive",
               reduction: str = "mean", backend: str = "auto"):
    """Cosine softmax with a margin on the positive (OBJECTIVES 1.12): the positive logit becomes
    s * psi(cos theta), psi = cos theta - m ("additive", AM-Softmax / CosFace) or cos(theta + m)
    ("angular", AAM / ArcFace, sin theta clamped >= 1e-6), in numerator and denominator alike.
    Inputs are L2-normalised inside; targets default to arange(N), -100 ignores a row."""
    if kind not in ("additive", "angular"):
        raise ValueError(f"kind must be 'additive' or 'angular', got {kind!r}")
    qn, kn = _normalize(q), _normalize(k)
    if targets is None:
        if k.shape[0] < q.shape[0]:
            raise ValueError(f"targets default to arange(N) and need M >= N; got N={q.shape[0]}, M={k.shape[0]}")
        targets = torch.arange(q.shape[0], device=q.device)
    if kind == "additive":
        return info_nce(qn, kn, targets, scale=scale, margin=-scale * margin, reduction=reduction, backend=backend)
    # angular: a per-row margin s * (cos(theta + m) - cos theta) that carries the gradient of cos theta
    valid = targets != -100
    cos = _row_dot(qn, kn[targets.clamp_min(0)]).clamp(-1.0, 1.0)
    sin = torch.sqrt((1.0 - cos * cos).clamp_min(0.0)).clamp_min(1e-6)
    psi = cos * math.cos(margin) - sin * math.sin(margin)
    delta = torch.where(valid, scale * (psi - cos), torch.zeros_like(cos))
    return info_nce(qn, kn, targets, scale=scale, margin=delta, reduction=reduction, backend=backend)


def moco_loss(q, k_pos, queue, *, temperature: float = 0.07, reduction: str = "mean", backend: str = "auto"):
    """MoCo: logits [<q_i, k+_i>, <q_i, queue_m>] / T; l_i = LSE(all) - <q_i, k+_i>/T. k_pos and the
    queue come from the momentum encoder (give them without grad: no dK work is done for them)."""
    if k_pos.shape != q.shape:
        raise ValueError(f"k_pos must have the shape of q {tuple(q.shape)}, got {tuple(k_pos.shape)}")
    pos = _row_dot(q, k_pos) / temperature
    r = contrastive_lse(q, queue, 1.0 / temperature, outputs=("row_lse",), backend=backend)
    # LSE over {pos_i} U {queue logits}: merge the queue LSE with the single positive logit
    lse = torch.logaddexp(r.row_lse, pos)
    return _reduce(lse - pos, reduction)


def mnrl_loss(anchors, positives, *negatives, scale: float = 20.0, reduction: str = "mean",
              backend: str = "auto"):
    """sentence-transformers MultipleNegativesRankingLoss: cosine similarities x scale between each
    anchor and every candidate cat(positives, *hard negatives); the target of anchor i is candidate i."""
    for i, n in enumerate(negatives):
        if n.shape != positives.shape:
            raise ValueError(f"negatives[{i}] must have the shape of positives {tuple(positives.shape)}, "
                             f"got {tuple(n.shape)}")
    cands = torch.cat([_normalize(positives)] + [_normalize(n) for n in negatives], dim=0)
    return info_nce(_normalize(anchors), cands, scale=scale, reduction=reduction, backend=backend)


# ---------------------------------------------------------------------------------------------
# 1.2 CLIP, 1.10 SigLIP


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, reduction: str = "mean",
              backend: str = "auto"):
    """open_clip ClipLoss: S = logit_scale * img txt^T (+ logit_bias);
    L = (CE(S, arange) + CE(S^T, arange)) / 2. `logit_scale` is the multiplicative scale (open_clip
    passes logit_scale.exp()). 'none' gives the per-pair average of the two directions [N]."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"image_features and text_features must have one shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    n = image_features.shape[0]
    r = contrastive_lse(image_features, text_features, logit_scale, logit_bias,
                        targets=torch.arange(n, device=image_features.device),
                        outputs=("row_lse", "col_lse", "pos_sum", "col_pos_sum"), backend=backend)
    per_pair = 0.5 * ((r.row_lse - r.pos_sum) + (r.col_lse - r.col_pos_sum))
    return _reduce(per_pair, reduction)


def siglip_loss(image_features, text_features, logit_scale, logit_bias=None, *, negative_only: bool = False,
                reduction: str = "mean", backend: str = "auto"):
    """open_clip SigLipLoss: L = -(1/N) sum_ij log sigmoid(z_ij S_ij), z = +1 on the diagonal and -1
    elsewhere (all -1 with negative_only). Normalised by N, not N^2, as open_clip. 'none' gives the
    per-image sums over texts [N]; 'sum' the total."""
    n = image_features.shape[0]
    targets = None if negative_only else torch.arange(n, device=image_features.device)
    if targets is not None and text_features.shape[0] < n:
        raise ValueError("image_features and text_features must have as many rows unless negative_only")
    r = contrastive_lse(image_features, text_features, logit_scale, logit_bias, targets=targets,
                        outputs=("row_sigmoid",), mode="sigmoid", backend=backend)
    return _reduce(r.row_sigmoid, reduction, mean_divisor=n)


# ---------------------------------------------------------------------------------------------
# 1.3 NT-Xent, 1.4 SupCon


def _views(z1, z2):
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    labels = torch.arange(n, device=z1.device).repeat(2)
    return torch.cat([z1, z2], dim=0), labels


def _check_labels(embeddings, labels):
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a [N={embeddings.shape[0]}] tensor, got {shape}")


def nt_xent(z1, z2=None, *, labels=None, temperature: float = 0.07, reduction: str = "mean",
            backend: str = "auto"):
    """NT-Xent (SimCLR; PML NTXentLoss semantics). Two views: nt_xent(z1, z2), rows of
    Z = normalize(cat(z1, z2)) with positive i +- N, l_i = LSE_{j != i} S_ij - S_{i,p(i)}, mean over 2N.
    Label mode: nt_xent(embeddings, labels=labels): one term per ordered positive pair (a, p),
    l_ap = -S_ap + log(e^{S_ap} + sum_{n: label_n != label_a} e^{S_an}) (other positives of a are not
    in the denominator); 'mean' over pairs, 'none' gives the pair terms (anchor-major order)."""
    if z2 is not None:
        if labels is not None:
            raise ValueError("give two views (z1, z2) or embeddings with labels, not both")
        emb, labels = _views(z1, z2)
    else:
        if labels is None:
            raise ValueError("nt_xent needs a second view z2 or labels")
        emb = z1
        _check_labels(emb, labels)
    z = _normalize(emb)
    # negatives only: LSE over columns with another label
    r = contrastive_lse(z, z, 1.0 / temperature, labels_q=labels, labels_k=labels, exclude_self=True,
                        exclude_positives=True, outputs=("row_lse",), backend=backend)
    neg_lse = r.row_lse
    terms = []
    chunk = 1024
    for a0 in range(0, z.shape[0], chunk):  # positive pairs, a chunk of anchors at a time
        same = labels[a0:a0 + chunk, None] == labels[None, :]
        same[torch.arange(same.shape[0]), torch.arange(a0, a0 + same.shape[0])] = False
        a, p = same.nonzero(as_tuple=True)
        a = a + a0
        s_ap = _row_dot(z[a], z[p]) / temperature
        terms.append(softplus(neg_lse[a] - s_ap))  # log(1 + sum_neg e^{S_an} / e^{S_ap})
    per_pair = torch.cat(terms) if terms else z.new_zeros(0)
    return _reduce(per_pair, reduction)


def supcon_loss(embeddings, labels, *, temperature: float = 0.1, no_positive: str = "exclude",
                base_temperature: float = 0.07, reduction: str = "mean", backend: str = "auto"):
    """Supervised contrastive loss L_out: S = normalize(e) normalize(e)^T / T,
    l_i = LSE_{a != i} S_ia - mean_{p in P(i)} S_ip. Rows without positives: 'exclude' (PML,
    default T = 0.1) drops them from the mean; 'zero' (HobbitLong/SupContrast, T = 0.07) keeps them
    with loss 0 and multiplies every l_i by T / base_temperature."""
    if no_positive not in ("exclude", "zero"):
        raise ValueError(f"no_positive must be 'exclude' or 'zero', got {no_positive!r}")
    _check_labels(embeddings, labels)
    z = _normalize(embeddings)
    r = contrastive_lse(z, z, 1.0 / temperature, labels_q=labels, labels_k=labels, exclude_self=True,
                        outputs=("row_lse", "pos_sum", "pos_count"), backend=backend)
    has_pos = r.pos_count > 0
    per_row = r.row_lse - r.pos_sum / r.pos_count.clamp_min(1)
    if no_positive == "zero":
        per_row = per_row * (temperature / base_temperature)
        per_row = torch.where(has_pos, per_row, torch.zeros_like(per_row))
        return _reduce(per_row, reduction)
    return _reduce(per_row, reduction, has_pos)


# ---------------------------------------------------------------------------------------------
# 1.7 DCL / DCLW, 1.8 debiased and hard-negative contrastive


def dcl_loss(z1, z2, *, temperature: float = 0.1, weight_sigma: Optional[float] = None,
             symmetric: bool = True, negatives: str = "joint", detach_weight: bool = False,
             reduction: str = "mean", backend: str = "auto"):
    """Decoupled contrastive learning: the positive is not in the denominator.
    l_i = -w_i <a_i, b_i>/T + LSE over {<a_i, a_j>/T, <a_i, b_j>/T : j != i}; L = average of both
    directions (symmetric=True, lightly) or the z1 -> z2 direction (raminnakhli). DCLW:
    weight_sigma=0.5 gives w = 2 - N softmax_i(<a_i, b_i>/sigma) (detach_weight=True as lightly).
    negatives='split' sums two LSEs, one per view block (lightly)."""
    if negatives not in ("joint", "split"):
        raise ValueError(f"negatives must be 'joint' or 'split', got {negatives!r}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    a_all, b_all = _normalize(z1), _normalize(z2)
    n = z1.shape[0]
    idx = torch.arange(n, device=z1.device)

    def one_direction(a, b):
        pos = _row_dot(a, b)
        if negatives == "joint":
            r = contrastive_lse(a, torch.cat([a, b]), 1.0 / temperature, labels_q=idx,
                                labels_k=torch.cat([idx, idx]), exclude_positives=True,
                                outputs=("row_lse",), backend=backend)
            neg = r.row_lse
        else:
            r1 = contrastive_lse(a, a, 1.0 / temperature, exclude_self=True, outputs=("row_lse",), backend=backend)
            r2 = contrastive_lse(a, b, 1.0 / temperature, targets=idx, exclude_positives=True,
                                 outputs=("row_lse",), backend=backend)
            neg = r1.row_lse + r2.row_lse
        w = 1.0
        if weight_sigma is not None:
            w = 2.0 - n * torch.softmax(pos / weight_sigma, dim=0)
            if detach_weight:
                w = w.detach()
        return -w * pos / temperature + neg

    per_row = one_direction(a_all, b_all)
    if symmetric:
        per_row = 0.5 * (per_row + one_direction(b_all, a_all))
    return _reduce(per_row, reduction)


def _debiased(z1, z2, temperature, tau_plus, beta, reduction, backend):
    if not 0 <= tau_plus < 1:
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
    emb, labels = _views(z1, z2)
    z = _normalize(emb)
    n2 = z.shape[0]
    n_neg = n2 - 2
    if n_neg < 1:
        raise ValueError("debiased / hard-negative losses need a batch of at least 2 pairs")
    partner = torch.cat([torch.arange(n2 // 2, n2), torch.arange(0, n2 // 2)]).to(z.device)
    pos = _row_dot(z, z[partner]) / temperature
    kw = dict(labels_q=labels, labels_k=labels, exclude_self=True, exclude_positives=True,
              outputs=("row_lse",), backend=backend)
    if beta is None:  # log sum_j e_j over the 2N - 2 negatives
        log_neg = contrastive_lse(z, z, 1.0 / temperature, **kw).row_lse
    else:  # log( N_neg sum e^{(1+beta)s} / sum e^{beta s} ), importance weights not detached
        hi = contrastive_lse(z, z, (1.0 + beta) / temperature, **kw).row_lse
        lo = contrastive_lse(z, z, beta / temperature, **kw).row_lse
        log_neg = math.log(n_neg) + hi - lo
    # Ng = max((sum_neg - tau+ N_neg e^pos) / (1 - tau+), N_neg e^{-1/t}), in log space
    m = torch.maximum(log_neg, pos)
    num = torch.exp(log_neg - m) - tau_plus * n_neg * torch.exp(pos - m)
    log_ng = torch.where(num > 0, m + torch.log(num.clamp_min(1e-38) / (1 - tau_plus)),
                         torch.full_like(m, float("-inf")))
    log_ng = torch.clamp_min(log_ng, math.log(n_neg) - 1.0 / temperature)
    return _reduce(softplus(log_ng - pos), reduction)


def debiased_contrastive_loss(z1, z2, *, temperature: float = 0.5, tau_plus: float = 0.1,
                              reduction: str = "mean", backend: str = "auto"):
    """Debiased contrastive loss (chingyaoc/DCL) over 2N views: l_i = -log(pos / (pos + Ng)),
    Ng = max((sum_neg e - tau+ N_neg pos) / (1 - tau+), N_neg e^{-1/t}). The clamp assumes unit vectors."""
    return _debiased(z1, z2, temperature, tau_plus, None, reduction, backend)


def hard_negative_loss(z1, z2, *, temperature: float = 0.5, tau_plus: float = 0.1, beta: float = 1.0,
                       reduction: str = "mean", backend: str = "auto"):
    """Hard-negative contrastive loss (joshr17/HCL): the debiased loss with sum_neg e replaced by
    N_neg sum e^{1+beta} / sum e^{beta} (two row LSEs at scales (1+beta)/t and beta/t)."""
    return _debiased(z1, z2, temperature, tau_plus, beta, reduction, backend)


# ---------------------------------------------------------------------------------------------
# 1.9 alignment and uniformity, 1.11 soft targets


def uniformity(x, *, t: float = 2.0, backend: str = "auto"):
    """log mean_{i != j} exp(-t ||x_i - x_j||^2) without the N x N distance matrix: the squared
    distance is folded into an inner product of augmented vectors,
    -t||x_i - x_j||^2 = 2t <[x_i, |x_i|^2, 1], [x_j, -1/2, -|x_j|^2/2]>."""
    n = x.shape[0]
    if n < 2:
        raise ValueError("uniformity needs at least 2 rows")
    sq = (x * x).sum(-1, keepdim=True)
    ones = torch.ones_like(sq)
    qa = torch.cat([x, sq, ones], dim=1)
    ka = torch.cat([x, -0.5 * ones, -0.5 * sq], dim=1)
    r = contrastive_lse(qa, ka, 2.0 * t, exclude_self=True, outputs=("row_lse",), backend=backend)
    return torch.logsumexp(r.row_lse, dim=0) - math.log(n * (n - 1))


def align_uniform_loss(x, y, *, alpha: float = 2.0, t: float = 2.0, lam: float = 1.0,
                       reduction: str = "mean", backend: str = "auto"):
    """Wang & Isola: L = mean ||x_i - y_i||^alpha + lam * (L_unif(x) + L_unif(y)) / 2.
    A batch-level statistic: only reduction='mean' is defined (uniformity has no per-item form)."""
    if reduction != "mean":
        raise ValueError("align_uniform_loss supports reduction='mean' only: uniformity is a batch statistic")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    align = (x - y).norm(dim=1).pow(alpha).mean()
    return align + lam * 0.5 * (uniformity(x, t=t, backend=backend) + uniformity(y, t=t, backend=backend))


def soft_target_nce(q, k, *, target_weights=None, target_embeddings=None, scale=None, temperature=None,
                    symmetric: bool = False, reduction: str = "mean", backend: str = "auto"):
    """InfoNCE against soft targets T_ij = W_ij / sum_j W_ij: l_i = LSE_j S_ij - sum_j T_ij S_ij.
    Either `target_weights` W [N, M] (nonnegative) or `target_embeddings` U [N, D'] (CWCL: W_ij =
    (1 + <u_i, u_j>)/2 with u normalised, no gradient; N = M). sum_j W_ij S_ij is formed as
    scale_i <q_i, (W K)_i>, so nothing N x M is built beyond a given W. Rows with sum_j W_ij = 0 are
    invalid. symmetric=True averages with the column direction (scalar scale only)."""
    s = _scale_arg(scale, temperature, 0.07)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if (target_weights is None) == (target_embeddings is None):
        raise ValueError("give exactly one of target_weights or target_embeddings")
    qa, ka = q.to(acc), k.to(acc)
    if target_weights is not None:
        w = target_weights.to(acc).detach()
        if w.shape != (q.shape[0], k.shape[0]):
            raise ValueError(f"target_weights must have shape [N, M] = {(q.shape[0], k.shape[0])}, got {tuple(w.shape)}")
        wk, wsum_row = w @ ka, w.sum(1)
        wq, wsum_col = w.T @ qa, w.sum(0)
    else:
        u = _normalize(target_embeddings.to(acc).detach())
        if u.shape[0] != q.shape[0] or q.shape[0] != k.shape[0]:
            raise ValueError("target_embeddings needs N = M rows, one per pair")
        usum = u.sum(0)
        wk = 0.5 * (ka.sum(0, keepdim=True) + u @ (u.T @ ka))
        wq = 0.5 * (qa.sum(0, keepdim=True) + u @ (u.T @ qa))
        wsum_row = wsum_col = 0.5 * (u.shape[0] + u @ usum)
    r = contrastive_lse(q, k, s, outputs=("row_lse", "col_lse") if symmetric else ("row_lse",), backend=backend)
    s_rows = s if not isinstance(s, torch.Tensor) or s.dim() == 0 else s.to(acc)
    valid = wsum_row > 0
    per_row = r.row_lse - s_rows * (qa * wk).sum(1) / wsum_row.clamp_min(1e-30)
    if not symmetric:
        return _reduce(per_row, reduction, valid)
    if isinstance(s, torch.Tensor) and s.dim() == 1:
        raise ValueError("symmetric soft_target_nce needs a scalar scale")
    per_col = r.col_lse - s * (ka * wq).sum(1) / wsum_col.clamp_min(1e-30)
    valid_c = wsum_col > 0
    return 0.5 * (_reduce(per_row, reduction, valid) + _reduce(per_col, reduction, valid_c))


# ---------------------------------------------------------------------------------------------
# 1.16 hard-negative selection masks


def topk_threshold(q, k, num_negatives: int, scale=1.0, bias=None, *, targets=None, labels_q=None, labels_k=None,
                   exclude_self: bool = False, block: int = 2048):
    """Per-row logit of the `num_negatives`-th largest negative, for `contrastive_lse(...,
    neg_threshold=...)` (OBJECTIVES 1.16: top-k hard negatives). No gradient: the mask is a
    selection, the kept logits keep theirs. Blockwise (memory O(N*k + block^2)), cost 2NMD.
    Negatives are the columns that are neither positives nor excluded self pairs; a row with fewer
    negatives than `num_negatives` gets -inf (all kept). Ties at the threshold are all kept."""
    if not isinstance(num_negatives, int) or num_negatives < 1:
        raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
    n, m = q.shape[0], k.shape[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # the primitive reads contiguous q and k; so does this pass (a stride-0 k took another GEMM
    # path with other rounding, and ties at the threshold then fell on the wrong side)
    q, k = q.contiguous(), k.contiguous()
    with torch.no_grad():
        sc = scale.detach().to(acc) if isinstance(scale, torch.Tensor) else torch.tensor(float(scale), dtype=acc)
        sc = sc.to(q.device).expand(n) if sc.dim() == 0 else sc.to(q.device)
        b = 0.0 if bias is None else (bias.detach().to(acc) if isinstance(bias, torch.Tensor) else float(bias))
        # running k best per row, starting at -inf: a row with fewer than k negatives keeps a -inf
        best = torch.full((n, num_negatives), float("-inf"), dtype=acc, device=q.device)
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            qb = q[r0:r1].detach().to(acc)
            run = best[r0:r1]
            for c0 in range(0, m, block):
                c1 = min(m, c0 + block)
                S = sc[r0:r1, None] * (qb @ k[c0:c1].detach().to(acc).T) + b
                cols = torch.arange(c0, c1, device=q.device)
                drop = torch.zeros_like(S, dtype=torch.bool)
                if targets is not None:
                    t = targets[r0:r1]
                    t = t[:, None] if t.dim() == 1 else t
                    drop |= (cols[None, None, :] == t[:, :, None]).any(1)
                elif labels_q is not None:
                    drop |= labels_q[r0:r1, None] == labels_k[None, c0:c1]
                if exclude_self:
                    drop |= cols[None, :] == torch.arange(r0, r1, device=q.device)[:, None]
                S = S.masked_fill(drop, float("-inf"))
                run = torch.cat([run, S], dim=1).topk(num_negatives, dim=1).values
            best[r0:r1] = run
    return best[:, -1]


def hard_negative_nce(q, k, targets=None, *, num_negatives: Optional[int] = None, min_similarity=None,
                      scale=None, temperature=None, bias=None, reduction: str = "mean", backend: str = "auto"):
    """InfoNCE whose denominator keeps the positive and only the hard negatives of each row
    (OBJECTIVES 1.16): the `num_negatives` highest-scoring negatives (top-k, ties kept) and/or those
    with similarity <q_i, k_j> >= `min_similarity`. The selection is a mask without gradient
    applied before the LSE; kept logits keep their gradient. targets as in info_nce ([N] or
    [N, P] with several positives per row, -1 padding; every positive stays in the denominator)."""
    if num_negatives is None and min_similarity is None:
        raise ValueError("give num_negatives (top-k) and/or min_similarity (threshold)")
    if targets is None:
        if k.shape[0] < q.shape[0]:
            raise ValueError(f"targets default to arange(N) and need M >= N; got N={q.shape[0]}, M={k.shape[0]}")
        targets = torch.arange(q.shape[0], device=q.device)
    s = _scale_arg(scale, temperature, 0.07)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    thr = torch.full((q.shape[0],), float("-inf"), dtype=acc, device=q.device)
    if num_negatives is not None:
        thr = topk_threshold(q, k, num_negatives, s, bias, targets=targets)
    if min_similarity is not None:  # similarity units -> the row's logit units
        s_rows = s.detach().to(acc) if isinstance(s, torch.Tensor) else float(s)
        b = 0.0 if bias is None else (bias.detach().to(acc) if isinstance(bias, torch.Tensor) else float(bias))
        thr = torch.clamp_min(thr, s_rows * float(min_similarity) + b)
    r = contrastive_lse(q, k, s, bias, targets=targets, neg_threshold=thr, outputs=("row_lse", "pos_sum", "pos_count"),
                        backend=backend)
    valid = r.pos_count > 0
    # several positives: the mean positive logit (one positive: its logit), as supcon's L_out form
    return _reduce(r.row_lse - r.pos_sum / r.pos_count.clamp_min(1), reduction, valid)


# ---------------------------------------------------------------------------------------------
# 1.14 DEXML decoupled softmax


def dexml_loss(q, k, positives, *, temperature: float = 0.05, reduction: str = "mean", backend: str = "auto"):
    """DEXML decoupled softmax (OBJECTIVES 1.14). Query i has the positive set P_i = the entries >= 0
    of row i of `positives` [N, P] (-1 padding; entries distinct). S = cos(q, k) / temperature;
    for each positive l: denom_il = logaddexp(LSE_{j not in P_i} S_ij, S_il), the other positives
    left out; l_i = -(1/|P_i|) sum_l (S_il - denom_il) = mean_l softplus(LSE_neg_i - S_il).
    'mean' divides by N: rows without positives give 0 and count (the anchor's convention).
    The negatives' LSE comes from primitive A with exclude_positives; the |P_i| positive logits are
    gathered (memory O(N*P*D))."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not isinstance(positives, torch.Tensor) or positives.dim() != 2 or positives.shape[0] != q.shape[0]:
        shape = tuple(positives.shape) if isinstance(positives, torch.Tensor) else type(positives).__name__
        raise ValueError(f"positives must be an int tensor [N={q.shape[0]}, P] (-1 = padding), got {shape}")
    positives = positives.long()
    if not torch.compiler.is_compiling():
        srt = positives.sort(dim=1).values
        if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
            raise ValueError("positives must list each positive column of a row once")
    qn, kn = _normalize(q), _normalize(k)
    s = 1.0 / temperature
    r = contrastive_lse(qn, kn, s, targets=positives, exclude_positives=True, outputs=("row_lse",), backend=backend)
    ok = positives >= 0
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    S_pos = s * (qn.to(acc)[:, None, :] * kn.to(acc)[positives.clamp_min(0)]).sum(-1)  # [N, P]
    terms = softplus(r.row_lse[:, None] - S_pos).masked_fill(~ok, 0.0)
    per_row = terms.sum(1) / ok.sum(1).clamp_min(1)
    return _reduce(per_row, reduction, mean_divisor=q.shape[0])


# ---------------------------------------------------------------------------------------------
# 1.13 iSogCLR: per-row temperatures, robust loss, moving-average estimator


def isogclr_loss(image_features, text_features, tau_image, tau_text, *, rho: float = 8.0, reduction: str = "mean",
                 backend: str = "auto"):
    """iSogCLR robust contrastive loss, in-batch form (OBJECTIVES 1.13). Per image i (and per text,
    with the roles swapped): l_i = tau_i * log mean_{j != i} exp((sim_ij - sim_ii) / tau_i) + rho * tau_i,
    with learnable per-sample temperatures `tau_image`, `tau_text` [N] (give them with grad; keep them
    in [0.005, 0.05] in the optimizer step, as iSogCLR projects). Features as given (normalised by
    the model, as open_clip). 'mean': mean over images + mean over texts (the anchor sums the two
    directions); 'none': [N] per-pair sums. See ISogCLRLoss for the moving-average estimator."""
    n = image_features.shape[0]
    if text_features.shape != image_features.shape:
        raise ValueError(f"image_features and text_features must have one shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    for name, t in (("tau_image", tau_image), ("tau_text", tau_text)):
        if not isinstance(t, torch.Tensor) or t.shape != (n,):
            raise ValueError(f"{name} must be a [N={n}] tensor of temperatures")
    if n < 2:
        raise ValueError("isogclr_loss needs at least 2 pairs (each row needs a negative)")
    _, log_g_i = _robust_direction(image_features, text_features, tau_image, backend)
    _, log_g_t = _robust_direction(text_features, image_features, tau_text, backend)
    acc = log_g_i.dtype
    per_i = tau_image.to(acc) * (log_g_i + rho)
    per_t = tau_text.to(acc) * (log_g_t + rho)
    if reduction == "none":
        return per_i + per_t
    return _reduce(per_i, reduction) + _reduce(per_t, reduction)


def _robust_direction(q, k, tau, backend):
    """Per row, at scale 1/tau_i with h_ij = sim_ij - sim_ii over the negatives j != i:
    (LSE_{j != i} S_ij - S_ii, log g_i) with log g_i = log mean_{j != i} exp(h_ij / tau_i)."""
    n = q.shape[0]
    r = contrastive_lse(q, k, 1.0 / tau, targets=torch.arange(n, device=q.device), exclude_positives=True,
                        outputs=("row_lse", "pos_sum"), backend=backend)
    gap = r.row_lse - r.pos_sum
    return gap, gap - math.log(k.shape[0] - 1)


class ISogCLRLoss(torch.nn.Module):
    """iSogCLR with its stateful moving-average estimator (Qiu et al. 2023; OBJECTIVES 1.13 [K]).

    Holds per-sample temperatures `tau_image`, `tau_text` [data_size] (parameters, init `tau_init`)
    and moving averages u_i of g_i = mean_{j != i} exp(h_ij / tau_i), kept as log u (the max-shift
    b_i of the anchor, done exactly: no overflow at tau = 0.005). forward(image_features,
    text_features, index) updates log u[index] <- log((1 - gamma) u + gamma g) for the batch and
    returns a loss whose gradient is iSogCLR's estimator: features get tau_i * (1/u_i) *
    mean_j e^{h_ij/tau_i} grad(h_ij/tau_i) (the batch softmax reweighted by g_i / u_i), and
    tau_i gets log u_i + rho - (1/u_i) mean_j e^{h_ij/tau_i} h_ij / tau_i. Its value is the in-batch
    robust loss (isogclr_loss). Call `clamp_temperatures_()` after the optimizer step.
    Single process (the estimator state is indexed by dataset id, so batches must carry `index`)."""

    def __init__(self, data_size: int, *, gamma: float = 0.8, rho: float = 8.0, tau_init: float = 0.01,
                 tau_min: float = 0.005, tau_max: float = 0.05, backend: str = "auto"):
        super().__init__()
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if not 0 < tau_min <= tau_init <= tau_max:
            raise ValueError(f"need 0 < tau_min <= tau_init <= tau_max, got {tau_min}, {tau_init}, {tau_max}")
        self.gamma, self.rho, self.tau_min, self.tau_max, self.backend = gamma, rho, tau_min, tau_max, backend
        self.tau_image = torch.nn.Parameter(torch.full((data_size,), float(tau_init)))
        self.tau_text = torch.nn.Parameter(torch.full((data_size,), float(tau_init)))
        # log u; -inf = never seen (the anchor starts u at 0: its first update gives gamma * g)
        self.register_buffer("log_u_image", torch.full((data_size,), float("-inf")))
        self.register_buffer("log_u_text", torch.full((data_size,), float("-inf")))

    @torch.no_grad()
    def clamp_temperatures_(self):
        self.tau_image.clamp_(self.tau_min, self.tau_max)
        self.tau_text.clamp_(self.tau_min, self.tau_max)

    def _direction(self, q, k, tau, buf_name, index):
        log_u_buf = getattr(self, buf_name)
        gap, log_g = _robust_direction(q, k, tau, self.backend)
        with torch.no_grad():
            old = log_u_buf[index].to(log_g.dtype)
            log_u = torch.logaddexp(old + math.log1p(-self.gamma) if self.gamma < 1 else torch.full_like(old, -math.inf),
                                    log_g.detach() + math.log(self.gamma))
            if torch.compiler.is_compiling():
                # Out of place inside a compiled graph: AOTAutograd's min-cut partitioner may
                # recompute `old` in backward from the buffer input, which an in-place update
                # has already overwritten by then (wrong gradients; docs/DECISIONS.md "Hardening").
                setattr(self, buf_name, log_u_buf.index_put((index,), log_u.to(log_u_buf.dtype)))
            else:
                log_u_buf[index] = log_u.to(log_u_buf.dtype)
            w = torch.exp(log_g.detach() - log_u)  # g_i / u_i
        tau_a = tau.to(gap.dtype)
        surrogate = (tau_a.detach() * w) * gap + tau_a * (log_u + self.rho)
        value = tau_a * (log_g + self.rho)
        return surrogate + (value - surrogate).detach()

    def forward(self, image_features, text_features, index):
        n = image_features.shape[0]
        if text_features.shape != image_features.shape:
            raise ValueError("image_features and text_features must have one shape")
        if n < 2:
            raise ValueError("ISogCLRLoss needs at least 2 pairs per batch")
        if not isinstance(index, torch.Tensor) or index.shape != (n,) or index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"index must be an int tensor [N={n}] of dataset ids")
        if not torch.compiler.is_compiling() and bool(((index < 0) | (index >= self.tau_image.shape[0])).any()):
            raise IndexError(f"index must be in [0, {self.tau_image.shape[0]})")
        index = index.to(self.tau_image.device).long()
        li = self._direction(image_features, text_features, self.tau_image[index], "log_u_image", index)
        lt = self._direction(text_features, image_features, self.tau_text[index], "log_u_text", index)
        return li.mean() + lt.mean()


# ---------------------------------------------------------------------------------------------
# 1.2 teacher distillation, 1.15 similarity-distribution distillation


def _teacher_weighted(teacher_q, teacher_k, teacher_scale, values):
    """O_i = sum_j softmax_j(teacher_scale_i <tq_i, tk_j>) values_j without the N x M matrix: this
    is exactly attention output, so torch's fused scaled_dot_product_attention computes it
    blockwise (FlashAttention / memory-efficient kernels on CUDA, the flash kernel on CPU), with
    the gradient for `values` only (the teacher has none). The flash kernels need equal head
    dimensions: the narrower side is zero-padded (dot products unchanged)."""
    # in the values' (student's) dtype, so the student's gradient keeps its precision
    tq = teacher_q.detach().to(values.dtype)
    tk = teacher_k.detach().to(values.dtype)
    ts = teacher_scale.detach().to(values.dtype) if isinstance(teacher_scale, torch.Tensor) else float(teacher_scale)
    tq = tq * (ts[:, None] if isinstance(ts, torch.Tensor) and ts.dim() == 1 else ts)
    dt, dv = tq.shape[1], values.shape[1]
    v = values
    if dt < dv:
        tq = F.pad(tq, (0, dv - dt))
        tk = F.pad(tk, (0, dv - dt))
    elif dv < dt:
        v = F.pad(v, (0, dt - dv))
    out = F.scaled_dot_product_attention(tq[None, None], tk[None, None], v[None, None], scale=1.0)[0, 0]
    return out[:, :dv]


def _check_pair(a, b, name_a, name_b):
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} must be [N, D] with the same N, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def distill_clip_loss(image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                      dist_logit_scale, *, reduction: str = "mean", backend: str = "auto"):
    """open_clip DistillClipLoss (OBJECTIVES 1.2): returns (contrastive_loss, distill_loss) with
    distill = 1/2 sum over both directions of mean_i[-sum_j softmax(S^T)_ij log softmax(S)_ij],
    S = logit_scale img txt^T (student), S^T = dist_logit_scale dimg dtxt^T (teacher, no gradient).
    -sum_j p^T_ij log p_ij = lse_i - logit_scale <img_i, sum_j p^T_ij txt_j>: the teacher-weighted
    sum is a fused attention pass, the LSEs come from primitive A; nothing N x N is stored."""
    _check_pair(image_features, text_features, "image_features", "text_features")
    _check_pair(dist_image_features, dist_text_features, "dist_image_features", "dist_text_features")
    if dist_image_features.shape[0] != image_features.shape[0]:
        raise ValueError("teacher and student features must have the same batch size")
    n = image_features.shape[0]
    r = contrastive_lse(image_features, text_features, logit_scale, targets=torch.arange(n, device=image_features.device),
                        outputs=("row_lse", "col_lse", "pos_sum", "col_pos_sum"), backend=backend)
    contrastive = _reduce(0.5 * ((r.row_lse - r.pos_sum) + (r.col_lse - r.col_pos_sum)), reduction)
    acc = r.row_lse.dtype
    o_img = _teacher_weighted(dist_image_features, dist_text_features, dist_logit_scale, text_features)
    o_txt = _teacher_weighted(dist_text_features, dist_image_features, dist_logit_scale, image_features)
    ls = logit_scale.to(acc) if isinstance(logit_scale, torch.Tensor) else logit_scale
    ce_img = r.row_lse - ls * _row_dot(image_features, o_img)
    ce_txt = r.col_lse - ls * _row_dot(text_features, o_txt)
    distill = _reduce(0.5 * (ce_img + ce_txt), reduction)
    return contrastive, distill


def similarity_kl_loss(student_q, student_k, teacher_q, teacher_k, *, student_scale, teacher_scale,
                       symmetric: bool = False, reduction: str = "mean", backend: str = "auto"):
    """Similarity-distribution distillation (OBJECTIVES 1.15): l_i = KL(softmax A_i || softmax B_i)
    with teacher logits A = teacher_scale tq tk^T (no gradient) and student B = student_scale
    sq sk^T, = sum_j p^T_ij (A_ij - B_ij) - lse^A_i + lse^B_i; gradient dB = p^B - p^T.
    `symmetric` averages with the column direction (the same with q and k swapped). Scales: floats
    or tensors (the student's may require grad). Memory O((N + M) D)."""
    _check_pair(student_q, teacher_q, "student_q", "teacher_q")
    _check_pair(student_k, teacher_k, "student_k", "teacher_k")

    def direction(sq, sk, tq, tk, dim_outputs):
        rs = contrastive_lse(sq, sk, student_scale, outputs=dim_outputs, backend=backend)
        with torch.no_grad():
            rt = contrastive_lse(tq.detach(), tk.detach(), teacher_scale if not isinstance(teacher_scale, torch.Tensor)
                                 else teacher_scale.detach(), outputs=dim_outputs, backend=backend)
        return rs, rt

    def one_way(sq, sk, tq, tk, lse_s, lse_t):
        acc = lse_s.dtype
        ss = student_scale.to(acc) if isinstance(student_scale, torch.Tensor) else student_scale
        ts = teacher_scale.detach().to(acc) if isinstance(teacher_scale, torch.Tensor) else teacher_scale
        cross = ss * _row_dot(sq, _teacher_weighted(tq, tk, teacher_scale, sk))  # sum_j p^T_ij B_ij
        with torch.no_grad():
            self_t = ts * _row_dot(tq, _teacher_weighted(tq, tk, teacher_scale, tk.detach()))  # sum_j p^T A
        return (self_t - lse_t) - cross + lse_s

    outs = ("row_lse", "col_lse") if symmetric else ("row_lse",)
    if symmetric and any(isinstance(s, torch.Tensor) and s.dim() == 1 for s in (student_scale, teacher_scale)):
        raise ValueError("symmetric similarity_kl_loss needs scalar scales")
    rs, rt = direction(student_q, student_k, teacher_q, teacher_k, outs)
    per_row = one_way(student_q, student_k, teacher_q, teacher_k, rs.row_lse, rt.row_lse)
    if not symmetric:
        return _reduce(per_row, reduction)
    per_col = one_way(student_k, student_q, teacher_k, teacher_q, rs.col_lse, rt.col_lse)
    return 0.5 * (_reduce(per_row, reduction) + _reduce(per_col, reduction))
