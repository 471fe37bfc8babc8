"""Sorting objectives (OBJECTIVES.md §4.4-4.8), thin functions on primitive C
(flashloss.ops.sort_network): the relaxed permutation matrix P [B, n, n] is formed only where a
loss reads every entry of it (DiffSortNet, permutation_loss); GroCo and the soft ranks read P only
through P @ W and never form it.

- `DiffSortNet`: drop-in for diffsort 0.2.0's module (same constructor, `(sorted, P)` return,
  diffsort's bitonic padding by default so its numbers are reproduced), with nothing to move
  between devices.
- `permutation_loss`: BCE between P and the ground-truth permutation (diffsort's experiments).
- `groco_loss`: GroCo (ninatu/learning_by_sorting `GroCo`), top-k negatives selected in row
  blocks so that the B x B similarity matrix never exists.
- `soft_rank`, `spearman_loss`: expected ranks P @ [0..n-1] and a soft Spearman loss on them.
- `neural_sort`, `sinkhorn_scaling`, `neural_ndcg`: NeuralSort + Sinkhorn + NeuralNDCG (allRank's
  `deterministic_neural_sort`, `sinkhorn_scaling`, `neuralNDCG`, `neuralNDCG_transposed`); dense
  [B, n, n] PyTorch, as allRank (lists are short), not a sorting network.

Every loss takes `reduction` ('mean' | 'sum' | 'none'; 'none' gives one value per list / anchor)
and `backend` (the sort_network backend; accepted and checked where there is nothing to dispatch).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ._backend import _check_name
from ._validate import FLOAT_DTYPES, check_reduction, check_tensor
from .ops.sort_network import RELAXATIONS, _check_scalar, sort_network
from .ops.sort_schedule import NETWORKS, PADDINGS

EPS = 1e-8  # cosine / norm floor (OBJECTIVES.md §0.1)
NDCG_EPS = 1e-10  # allRank DEFAULT_EPS: IDCG floor and Sinkhorn's sum clamp

__all__ = ["DiffSortNet", "permutation_loss", "groco_loss", "soft_rank", "spearman_loss", "neural_sort",
           "sinkhorn_scaling", "neural_ndcg"]


def _acc(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _reduce(per_item: torch.Tensor, reduction: str, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """'none': per item (invalid items 0); 'sum': the sum; 'mean': the sum over the number of valid
    items clamped to >= 1 (OBJECTIVES.md §0.3)."""
    if valid is not None:
        per_item = torch.where(valid, per_item, torch.zeros_like(per_item))
    if reduction == "none":
        return per_item
    total = per_item.sum()
    if reduction == "sum":
        return total
    count = per_item.numel() if valid is None else valid.sum().clamp_min(1)
    return total / count


def _check_sorter_args(network: str, relaxation: str, padding: str, steepness, art_lambda, backend: str):
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {', '.join(NETWORKS)}; got {network!r}")
    if relaxation not in RELAXATIONS:
        raise ValueError(f"relaxation must be one of {', '.join(RELAXATIONS)}; got {relaxation!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}; got {padding!r}")
    _check_name(backend, "backend")
    return _check_scalar("steepness", steepness, positive=True), _check_scalar("art_lambda", art_lambda, positive=False)


def _bce(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise torch BCELoss (log terms clamped at -100, its backward (p - t) / max(p(1-p), 1e-12)).
    p is clipped to [0, 1] first: sums of P can leave [0, 1] by rounding, where BCELoss raises."""
    return F.binary_cross_entropy(p.clamp(0.0, 1.0), target, reduction="none")


# ---------------------------------------------------------------------------------------------
# DiffSortNet (diffsort 0.2.0)


class DiffSortNet(torch.nn.Module):
    """Drop-in for `diffsort.DiffSortNet`: sorts `vectors [B, size]` (any leading dimensions here)
    along the last axis with a relaxed sorting network and returns `(sorted, P)` with diffsort's
    convention `sorted = vectors @ P` (P[b, i, r]: weight of input i at ascending position r).

    Arguments are diffsort's, in its order: `sorting_network_type` ('odd_even' | 'bitonic'), `size`,
    `device` (accepted and ignored: flashloss caches the comparator schedule per device itself, so
    the module has no buffers and `.to()`/`.cuda()` need nothing else moved), `steepness`,
    `art_lambda`, `interpolation_type` (deprecated alias of `distribution`, as in diffsort) and
    `distribution` (one of logistic, logistic_phi, gaussian, reciprocal, cauchy, optimal).
    Keyword-only: `padding` ('diffsort', the default, reproduces diffsort's bitonic network
    bit-for-bit, including the n for which it does not sort, e.g. 22; 'exact' sorts every n,
    OBJECTIVES.md §4.2) and `backend`. Costs O(B n C) for C comparators instead of diffsort's
    dense O(B n^3 L) layer products."""

    def __init__(self, sorting_network_type: str, size: int, device=None, steepness: float = 10.0,
                 art_lambda: float = 0.25, interpolation_type: Optional[str] = None,
                 distribution: Optional[str] = "cauchy", *, padding: str = "diffsort", backend: str = "auto"):
        super().__init__()
        if interpolation_type is not None:
            if not (distribution is None or distribution == "cauchy" or distribution == interpolation_type):
                raise ValueError(f"two different distributions were given (distribution={distribution!r}, "
                                 f"interpolation_type={interpolation_type!r}); interpolation_type is diffsort's "
                                 f"deprecated name for distribution: give one")
            distribution = interpolation_type
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        self.steepness, self.art_lambda = _check_sorter_args(sorting_network_type, distribution, padding,
                                                             steepness, art_lambda, backend)
        self.sorting_network_type = sorting_network_type
        self.size = size
        self.distribution = distribution
        self.padding = padding
        self.backend = backend

    @property
    def sorting_network(self) -> list:
        """diffsort keeps its layer matrices here and user code (e.g. learning_by_sorting's GroCo)
        moves them by hand; flashloss has none: reads give [], assignments are ignored."""
        return []

    @sorting_network.setter
    def sorting_network(self, value) -> None:
        pass

    def forward(self, vectors: torch.Tensor):
        check_tensor("vectors", vectors, dtypes=FLOAT_DTYPES)
        if vectors.dim() < 1 or vectors.shape[-1] != self.size:
            raise ValueError(f"DiffSortNet(size={self.size}) sorts the last dimension, which must be {self.size}; "
                             f"got vectors of shape {list(vectors.shape)}")
        r = sort_network(vectors, self.sorting_network_type, self.distribution, self.steepness, self.art_lambda,
                         padding=self.padding, return_P=True, backend=self.backend)
        return r.sorted, r.P

    def extra_repr(self) -> str:
        return (f"{self.sorting_network_type!r}, size={self.size}, steepness={self.steepness}, "
                f"art_lambda={self.art_lambda}, distribution={self.distribution!r}, padding={self.padding!r}")


# ---------------------------------------------------------------------------------------------
# 4.4 permutation loss


def permutation_loss(P: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean",
                     backend: str = "auto") -> torch.Tensor:
    """BCE between a relaxed permutation matrix and the true one, as diffsort's experiments train:
    `_, P = sorter(scores); loss = permutation_loss(P, targets)` with `targets [..., n]` the values
    whose ascending order is to be learnt (e.g. the numbers shown in the images). The true matrix is
    Q[i, r] = 1 iff element i has rank r in ascending order of `targets` (= one_hot(argsort(targets))
    transposed; ties keep index order); each entry is torch BCELoss's term (log clamped at -100),
    P clipped to [0, 1] against rounding. Per list: the mean over its n x n entries; 'mean' over
    lists is then the mean over all B n n entries, torch.nn.BCELoss()(P, Q)."""
    check_reduction(reduction)
    _check_name(backend, "backend")
    check_tensor("P", P, dtypes=FLOAT_DTYPES)
    check_tensor("targets", targets, dtypes=None, device=P.device)
    if P.dim() < 2 or P.shape[-1] != P.shape[-2] or tuple(targets.shape) != tuple(P.shape[:-1]):
        raise ValueError(f"P must be [..., n, n] and targets [..., n] with the same leading dimensions; got P "
                         f"{list(P.shape)} and targets {list(targets.shape)}")
    if targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be real numbers, got {targets.dtype}")
    acc = _acc(P)
    order = torch.argsort(targets, dim=-1, stable=True)  # order[r] = element of rank r
    Q = torch.zeros(P.shape, dtype=acc, device=P.device).scatter_(-2, order.unsqueeze(-2), 1.0)
    per_list = _bce(P.to(acc), Q).mean((-2, -1))
    return _reduce(per_list, reduction)


# ---------------------------------------------------------------------------------------------
# 4.5 soft rank, 4.8 soft Spearman


def soft_rank(x: torch.Tensor, network: str = "odd_even", relaxation: str = "cauchy", steepness: float = 10.0,
              art_lambda: float = 0.25, *, padding: str = "exact", backend: str = "auto") -> torch.Tensor:
    """Expected ascending 0-based ranks rho_i = sum_r r P[i, r] of x [..., n] under the relaxed
    sorting network (OBJECTIVES.md §4.5), computed as P @ [0, 1, ..., n-1] without P (O(B C) work
    and memory for C comparators). Same network arguments as `sort_network`; x's dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., n] with n >= 1, got {list(x.shape)}")
    n = x.shape[-1]
    w = torch.arange(n, dtype=_acc(x), device=x.device)[:, None]
    r = sort_network(x, network, relaxation, steepness, art_lambda, padding=padding, position_weights=w,
                     backend=backend)
    return r.PW[..., 0]


def _average_ranks(t: torch.Tensor) -> torch.Tensor:
    """0-based ascending ranks of t [..., n], ties given the mean of the ranks they share."""
    s = torch.sort(t, dim=-1).values.contiguous()
    lo = torch.searchsorted(s, t.contiguous(), right=False)
    hi = torch.searchsorted(s, t.contiguous(), right=True)
    return (lo + hi - 1).to(torch.float64) / 2


def spearman_loss(pred: torch.Tensor, target: torch.Tensor, network: str = "odd_even", relaxation: str = "cauchy",
                  steepness: float = 10.0, art_lambda: float = 0.25, *, padding: str = "exact",
                  reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Soft Spearman loss per list (OBJECTIVES.md §4.8, torchsort's recipe on flashloss's soft rank):
    1 - <rho_c, r_c> / (||rho_c|| ||r_c||) with rho = soft_rank(pred) (network arguments as
    `sort_network`), r the hard ascending ranks of `target` (average ranks for ties), _c = centred;
    norms floored at 1e-8. A list whose target is constant (or n = 1) has no ranking to learn: it gives
    0 and is left out of the 'mean' (like a list with IDCG 0 in NDCG losses). Gradient to pred."""
    check_reduction(reduction)
    check_tensor("pred", pred, dtypes=FLOAT_DTYPES)
    check_tensor("target", target, dtypes=None, device=pred.device)
    if tuple(target.shape) != tuple(pred.shape) or pred.dim() < 1:
        raise ValueError(f"pred and target must have one shape [..., n]; got {list(pred.shape)} and "
                         f"{list(target.shape)}")
    acc = _acc(pred)
    rho = soft_rank(pred, network, relaxation, steepness, art_lambda, padding=padding, backend=backend).to(acc)
    r = _average_ranks(target).to(acc)
    rho_c = rho - rho.mean(-1, keepdim=True)
    r_c = r - r.mean(-1, keepdim=True)
    r_norm = r_c.norm(dim=-1)
    valid = r_norm > 0
    corr = (F.normalize(rho_c, dim=-1, eps=EPS) * r_c).sum(-1) / r_norm.clamp_min(EPS)
    return _reduce(1.0 - corr, reduction, valid)


# ---------------------------------------------------------------------------------------------
# 4.6 GroCo

# similarity tile of the top-k selection: [rows, B] with rows * B <= this many elements (4 MiB fp32)
GROCO_TILE_ELEMS = 1 << 20
# rows per block of the gathered dot products: rows * k * D <= this many elements
GROCO_GATHER_ELEMS = 1 << 20


class _GatheredDot(torch.autograd.Function):
    """out[i, j] = <a_i, b_{idx[i, j]}> for a [B, D], b [Bb, D], idx [B, k], computed in row blocks:
    saves a, b (references) and idx only, so memory is O(B (k + D)), never O(B k D) or O(B^2)."""

    @staticmethod
    def forward(ctx, a, b, idx):
        bsz, k = idx.shape
        out = a.new_empty(bsz, k)
        rows = max(1, GROCO_GATHER_ELEMS // max(1, k * a.shape[1]))
        for r0 in range(0, bsz, rows):
            r1 = min(bsz, r0 + rows)
            out[r0:r1] = torch.bmm(b[idx[r0:r1]], a[r0:r1, :, None])[..., 0]
        ctx.save_for_backward(a, b, idx)
        return out

    @staticmethod
    def backward(ctx, g):
        a, b, idx = ctx.saved_tensors
        bsz, k = idx.shape
        ga = torch.empty_like(a) if ctx.needs_input_grad[0] else None
        gb = torch.zeros_like(b) if ctx.needs_input_grad[1] else None
        rows = max(1, GROCO_GATHER_ELEMS // max(1, k * a.shape[1]))
        for r0 in range(0, bsz, rows):
            r1 = min(bsz, r0 + rows)
            gi, ii = g[r0:r1], idx[r0:r1]
            if ga is not None:
                ga[r0:r1] = torch.bmm(gi[:, None, :], b[ii])[:, 0]
            if gb is not None:
                gb.index_add_(0, ii.reshape(-1), (gi[:, :, None] * a[r0:r1, None, :]).reshape(-1, a.shape[1]))
        return ga, gb, None


def _topk_negatives(za: torch.Tensor, zn: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest <za_i, zn_j> over j != i, ascending, for unit rows za, zn [B, D]. Selection in
    row tiles [rows, B] without gradient; the kept values recomputed with gradient by _GatheredDot."""
    bsz = za.shape[0]
    idx = torch.empty(bsz, k, dtype=torch.long, device=za.device)
    rows = max(1, min(bsz, GROCO_TILE_ELEMS // bsz))
    with torch.no_grad():
        for r0 in range(0, bsz, rows):
            r1 = min(bsz, r0 + rows)
            tile = za[r0:r1].detach() @ zn.detach().T
            ar = torch.arange(r1 - r0, device=za.device)
            tile[ar, ar + r0] = float("-inf")  # self is not a negative
            idx[r0:r1] = tile.topk(k, dim=1).indices.flip(1)
    return _GatheredDot.apply(za, zn, idx)


def groco_loss(views: Union[Sequence[torch.Tensor], torch.Tensor], *, num_positive_views: Optional[int] = None,
               topk_neg: int = 10, network: str = "odd_even", relaxation: str = "cauchy", steepness: float = 1.0,
               art_lambda: float = 0.25, stop_grad: bool = True, reduction: str = "mean",
               backend: str = "auto") -> torch.Tensor:
    """GroCo (OBJECTIVES.md §4.6; anchor ninatu/learning_by_sorting `losses/groco.py`, `GroCo`).

    `views`: V >= 2 projector outputs f_1..f_V [B, D] (a sequence or a [V, B, D] tensor; computed in
    fp32, fp64 for fp64 input); the first `num_positive_views` (default V, >= 2) are full views usable
    as positives (multi-crop puts them first). For each anchor view a: positives cos(f_a[b], f_p[b])
    for the positive views p != a (ascending); negatives the `topk_neg` largest cos(f_a[b], f_a[j]),
    j != b, in the batch of view a (ascending); x = cat(negatives, positives); q_e = clip(sum of
    P[e, r] over the positive ranks r >= topk_neg, 0, 1) from the relaxed sort of x; loss_a = mean
    BCE(q, 1[e >= topk_neg]) (the anchor's two BCE terms are equal). Loss = mean over anchor views;
    'none' gives [B]: per sample, the mean over anchor views of its mean BCE. `stop_grad=True` (the
    anchor's default): positives and negatives are constants and only f_a gets gradient.

    Memory: the B x B similarity matrix is never formed. Negatives are selected in row tiles of at
    most GROCO_TILE_ELEMS similarities and only the kept [B, k] are recomputed with gradient; the
    sort reads P only through the group sum P @ 1[r >= k]; peak extra memory is O(B (k + D)).
    Single process: negatives come from the local batch (the anchor's `distributed=True` all-gathers
    them; not supported here yet). Network defaults are the anchor's: odd_even, cauchy, steepness 1."""
    check_reduction(reduction)
    steepness, art_lambda = _check_sorter_args(network, relaxation, "exact", steepness, art_lambda, backend)
    if isinstance(views, torch.Tensor):
        check_tensor("views", views, dim=3, dtypes=FLOAT_DTYPES)
        views = list(views.unbind(0))
    else:
        views = list(views)
    if len(views) < 2:
        raise ValueError(f"groco_loss needs at least 2 views, got {len(views)}")
    for i, v in enumerate(views):
        check_tensor(f"views[{i}]", v, dim=2, dtypes=FLOAT_DTYPES, device=views[0].device)
        if v.shape != views[0].shape:
            raise ValueError(f"every view must have the shape of views[0] {list(views[0].shape)}; "
                             f"views[{i}] is {list(v.shape)}")
    n_views = len(views)
    n_pos = n_views if num_positive_views is None else num_positive_views
    if isinstance(n_pos, bool) or not isinstance(n_pos, int) or not 2 <= n_pos <= n_views:
        raise ValueError(f"num_positive_views must be an int in [2, {n_views}] (the number of views), got {n_pos!r}")
    bsz = views[0].shape[0]
    if isinstance(topk_neg, bool) or not isinstance(topk_neg, int) or not 0 <= topk_neg <= bsz - 1:
        raise ValueError(f"topk_neg must be an int in [0, B - 1] = [0, {bsz - 1}] (negatives come from the other "
                         f"samples of the batch), got {topk_neg!r}")
    acc = _acc(*views)
    z = [F.normalize(v.to(acc), dim=-1, eps=EPS) for v in views]
    k = topk_neg
    per_sample = None
    for a in range(n_views):
        za = z[a]
        others = [z[p] for p in range(n_pos) if p != a]
        pos = torch.stack([(za * (zp.detach() if stop_grad else zp)).sum(-1) for zp in others], 1)
        pos = torch.sort(pos, dim=1).values
        neg = _topk_negatives(za, za.detach() if stop_grad else za, k)
        x = torch.cat([neg, pos], 1)
        n = x.shape[1]
        is_pos = torch.arange(n, device=x.device) >= k
        q = sort_network(x, network, relaxation, steepness, art_lambda, position_weights=is_pos.to(acc)[:, None],
                         backend=backend).PW[..., 0]
        loss_a = _bce(q, is_pos.to(acc).expand(bsz, n)).mean(1)
        per_sample = loss_a if per_sample is None else per_sample + loss_a
    return _reduce(per_sample / n_views, reduction)


# ---------------------------------------------------------------------------------------------
# 4.7 NeuralSort, Sinkhorn, NeuralNDCG (allRank)


def _check_trailing_padding(mask: torch.Tensor) -> None:
    if torch.compiler.is_compiling():  # data-dependent; skipped in a compiled graph like the other value checks
        return
    if mask.shape[-1] > 1 and bool((mask[..., :-1] & ~mask[..., 1:]).any()):
        raise ValueError("padded items (mask True / label == padded_value_indicator) must be trailing in every "
                         "list, as allRank's NeuralSort assumes")


def neural_sort(s: torch.Tensor, tau: float = 1.0, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deterministic NeuralSort (Grover et al. 2019; allRank `deterministic_neural_sort` with its
    masking) of scores s [..., n]: P_hat [..., n, n] with P_hat[i, j] = softmax_j(((n_v + 1 - 2i) s_j -
    sum_k |s_j - s_k|) / tau), i = 1..n_v the rank in *descending* order (P_hat @ s ~ s sorted
    descending: rows are ranks, columns items, the transpose of DiffSortNet's P), sums and softmax
    over the n_v valid items. `mask` [..., n] (True = padded; padded items must be trailing): rows
    and columns of padded items are 0 except the padded x padded block, uniform over the padded
    columns (allRank's values before its Sinkhorn step). fp32 (fp64 for fp64 input)."""
    check_tensor("s", s, dtypes=FLOAT_DTYPES)
    if s.dim() < 1:
        raise ValueError("s must have shape [..., n]")
    if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and tau > 0):
        raise ValueError(f"tau must be a number > 0, got {tau!r}")
    n = s.shape[-1]
    if mask is None:
        mask = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    else:
        check_tensor("mask", mask, dtypes=(torch.bool,), device=s.device)
        if mask.shape != s.shape:
            raise ValueError(f"mask must have the shape of s {list(s.shape)}, got {list(mask.shape)}")
        _check_trailing_padding(mask)
    acc = _acc(s)
    s = s.to(acc).masked_fill(mask, 0.0)
    pair_pad = mask[..., :, None] | mask[..., None, :]
    both_pad = mask[..., :, None] & mask[..., None, :]
    a_sum = (s[..., :, None] - s[..., None, :]).abs().masked_fill(pair_pad, 0.0).sum(-1)  # [..., n] per item j
    n_valid = (~mask).sum(-1, keepdim=True).to(acc)
    i = torch.arange(1, n + 1, device=s.device, dtype=acc)
    scaling = torch.where(i <= n_valid, n_valid + 1 - 2 * i, torch.zeros((), dtype=acc, device=s.device))
    logits = scaling[..., :, None] * s[..., None, :] - a_sum[..., None, :]  # [..., rank i, item j]
    logits = logits.masked_fill(pair_pad, float("-inf")).masked_fill(both_pad, 1.0)
    return torch.softmax(logits / tau, dim=-1)


def sinkhorn_scaling(mat: torch.Tensor, mask: Optional[torch.Tensor] = None, tol: float = 1e-6,
                     max_iter: int = 50) -> torch.Tensor:
    """allRank's `sinkhorn_scaling` of mat [..., n, n]: with a mask [..., n] (True = padded) the rows
    and columns of padded items are set to 0 and the padded x padded block to 1; then up to max_iter
    times divide by the column sums, then by the row sums (each clamped >= 1e-10), stopping once every
    row and column sum of the whole batch is within tol of 1 (a global test, as allRank's, so one
    list's result can depend on the others'); finally padded rows/columns are zeroed. Gradient
    through every iteration."""
    check_tensor("mat", mat, dtypes=FLOAT_DTYPES)
    if mat.dim() < 2 or mat.shape[-1] != mat.shape[-2]:
        raise ValueError(f"mat must be [..., n, n], got {list(mat.shape)}")
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,), device=mat.device)
        if tuple(mask.shape) != tuple(mat.shape[:-1]):
            raise ValueError(f"mask must be [..., n] = {list(mat.shape[:-1])}, got {list(mask.shape)}")
        pair_pad = mask[..., :, None] | mask[..., None, :]
        mat = mat.masked_fill(pair_pad, 0.0).masked_fill(mask[..., :, None] & mask[..., None, :], 1.0)
    def step(m):
        m = m / m.sum(dim=-2, keepdim=True).clamp(min=NDCG_EPS)
        m = m / m.sum(dim=-1, keepdim=True).clamp(min=NDCG_EPS)
        with torch.no_grad():
            done = ((m.sum(dim=-1) - 1).abs().max() < tol) & ((m.sum(dim=-2) - 1).abs().max() < tol)
        return m, done

    if torch.compiler.is_compiling():
        # no data-dependent break in a graph: every iteration runs, and once the batch has converged
        # the matrix is frozen by a select, so values and gradients equal eager's early stop
        stopped = torch.zeros((), dtype=torch.bool, device=mat.device)
        for _ in range(max_iter):
            new, done = step(mat)
            mat = torch.where(stopped, mat, new)
            stopped = stopped | done
    else:
        for _ in range(max_iter):
            mat, done = step(mat)
            if bool(done):
                break
    if mask is not None:
        mat = mat.masked_fill(pair_pad, 0.0)
    return mat


def neural_ndcg(scores: torch.Tensor, labels: torch.Tensor, k: Optional[int] = None, tau: float = 1.0, *,
                transposed: bool = False, padded_value_indicator: float = -1, max_iter: int = 50,
                tol: float = 1e-6, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """NeuralNDCG@k loss (OBJECTIVES.md §4.7; allRank `neuralNDCG` / `neuralNDCG_transposed`,
    deterministic, powered relevancies): P_hat = Sinkhorn(NeuralSort(scores, tau)) with items whose
    label == `padded_value_indicator` (-1, trailing) masked out; gains g = 2^y - 1, discounts
    d_i = 1 / log2(i + 1) (i = 1-based rank); NDCG = sum_{i <= k} d_i (P_hat g)_i / (IDCG@k + 1e-10),
    or with `transposed=True` sum_j g_j (P_hat^T d^(k))_j / (IDCG@k + 1e-10) with d^(k)_i = 0 past k.
    Loss per list = -NDCG; lists with IDCG@k = 0 (no relevant valid item) give 0 and are left out of
    the 'mean' (an all-zero batch gives 0). k defaults to n (the list length). `backend` is accepted
    for the common signature (dense [B, n, n] PyTorch, as allRank)."""
    check_reduction(reduction)
    _check_name(backend, "backend")
    check_tensor("scores", scores, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor("labels", labels, dtypes=None, device=scores.device)
    if labels.shape != scores.shape:
        raise ValueError(f"labels must have the shape of scores {list(scores.shape)}, got {list(labels.shape)}")
    n = scores.shape[1]
    if k is None:
        k = n
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1 or None, got {k!r}")
    acc = _acc(scores)
    mask = labels == padded_value_indicator
    P = sinkhorn_scaling(neural_sort(scores, tau, mask), mask, tol=tol, max_iter=max_iter)
    y = labels.to(acc).masked_fill(mask, 0.0)
    gains = torch.pow(2.0, y) - 1.0
    disc = 1.0 / torch.log2(torch.arange(n, device=scores.device, dtype=acc) + 2.0)
    kk = min(k, n)
    disc_k = torch.where(torch.arange(n, device=scores.device) < kk, disc, torch.zeros_like(disc))
    idcg = (torch.sort(gains, dim=-1, descending=True).values * disc_k).sum(-1)
    if transposed:
        dcg = (gains * (P.transpose(-2, -1) @ disc_k[:, None])[..., 0]).sum(-1)
    else:
        dcg = ((P @ gains[..., None])[..., 0] * disc_k).sum(-1)
    valid = idcg != 0
    return _reduce(-dcg / (idcg + NDCG_EPS), reduction, valid)
