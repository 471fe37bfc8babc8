"""Primitive A: blockwise contrastive log-sum-exp (DESIGN.md §1.A, OBJECTIVES.md §1.0).

Logits S_ij = scale_i * <q_i, k_j> + bias (+ margin on positive pairs) are computed tile by tile
and never stored whole. Outputs (each optional):
  row_lse [N]      LSE_j over the allowed columns of row i
  col_lse [M]      LSE_i over the allowed, valid rows of column j (main k columns only)
  pos_sum [N]      sum_j Y_ij S_ij            pos_count [N]  sum_j Y_ij (no gradient)
  col_pos_sum [M]  sum_i Y_ij S_ij
  row_sigmoid [N]  sum_j softplus(-z_ij S_ij), z = +1 on positives, -1 elsewhere (mode="sigmoid")
Positives Y: `targets` [N] (column per row, -100 = row ignored: no positives, left out of column
statistics) or `labels_q` [N] + `labels_k` [M] (equal labels). `exclude_self` drops the pairs
(i, i) from the LSEs and from the positives (q is k); `exclude_positives` drops the positives from
the LSEs (DCL). `extra_k` adds negative-only columns after k; a block that does not require grad
gets no dK work (MoCo queue).
Backward takes an upstream gradient for every output and recomputes each tile once:
  dS = g_row P_row + g_col P_col + (g_pos + g_colpos) Y + g_sig * (-z sigmoid(-z S))
  dQ_i = scale_i sum_j dS_ij K_j,  dK_j = sum_i scale_i dS_ij Q_i,
  dscale_i = sum_j dS_ij <q_i, k_j>,  dbias = sum_ij dS_ij.
Saved: inputs by reference and the [N] / [M] LSEs. Cost: forward 2NMD FLOPs, backward 4NMD plus
2NMD recompute; extra memory O((N+M)(D+1)) plus one tile.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from .. import _backend, _native
from .._debug import empty
from .._validate import FLOAT_DTYPES, check_tensor

OP = "contrastive_lse"
OUTPUTS = ("row_lse", "col_lse", "pos_sum", "pos_count", "col_pos_sum", "row_sigmoid")
_BIT = {name: 1 << i for i, name in enumerate(OUTPUTS)}


class ContrastiveStats(NamedTuple):
    row_lse: Optional[torch.Tensor]
    col_lse: Optional[torch.Tensor]
    pos_sum: Optional[torch.Tensor]
    pos_count: Optional[torch.Tensor]
    col_pos_sum: Optional[torch.Tensor]
    row_sigmoid: Optional[torch.Tensor]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Problem description shared by the backends: everything but the tensors that carry gradient.


class Spec(NamedTuple):
    m_main: int  # columns of k (the rest of k_all are extra negatives)
    grad_cols: int  # dK is computed for columns [0, grad_cols)
    exclude_self: bool
    exclude_positives: bool
    margin: float
    sigmoid: bool
    want: int  # bit mask over OUTPUTS


# Tile edge of the torch backend (rows and columns) and row block of the cpu backend (None: chosen
# from the problem size). Tests shrink it to cross tile and block boundaries.
TILE: int | None = None


def _tile_size(device: torch.device) -> int:
    if TILE is not None:
        return TILE
    return 4096 if device.type == "cuda" else 1024


def _tile_masks(spec: Spec, r0, r1, c0, c1, targets, labels_q, labels_k, device):
    """Positives Y, allowed (in the LSEs) mask, valid rows and main columns of tile [r0:r1, c0:c1]
    (the hard-negative threshold needs S and is applied by `_threshold`)."""
    rows = torch.arange(r0, r1, device=device)
    cols = torch.arange(c0, c1, device=device)
    main = cols < spec.m_main
    valid = torch.ones(r1 - r0, dtype=torch.bool, device=device)
    if targets is not None and targets.dim() == 2:  # several positives per row, < 0 = padding
        t = targets[r0:r1]
        valid = (t >= 0).any(1)
        Y = (cols[None, None, :] == t[:, :, None]).any(1)
    elif targets is not None:
        t = targets[r0:r1]
        valid = t != -100
        Y = (cols[None, :] == t[:, None]) & valid[:, None]
    elif labels_q is not None:
        lk = labels_k[c0:min(c1, spec.m_main)]
        Y = torch.zeros(r1 - r0, c1 - c0, dtype=torch.bool, device=device)
        Y[:, : lk.shape[0]] = labels_q[r0:r1, None] == lk[None, :]
    else:
        Y = torch.zeros(r1 - r0, c1 - c0, dtype=torch.bool, device=device)
    allowed = torch.ones(r1 - r0, c1 - c0, dtype=torch.bool, device=device)
    if spec.exclude_self:
        self_pair = (cols[None, :] == rows[:, None]) & main[None, :]
        allowed &= ~self_pair
        Y &= ~self_pair
    if spec.exclude_positives:
        allowed &= ~Y
    return Y, allowed, valid, main


def _threshold(allowed, Y, S, thr):
    """Hard-negative mask: negatives with S_ij < thr_i leave the LSEs (positives always stay)."""
    if thr is None:
        return allowed
    return allowed & (Y | (S >= thr[:, None]))


def softplus(x: torch.Tensor) -> torch.Tensor:
    """Exact softplus log(1 + e^x) with the exact gradient sigma(x) everywhere: torch.logaddexp(x, 0)
    computes max(x, 0) + log1p(exp(-|x|)). (torch's F.softplus switches to x above 20, an error of
    e^-20 that float64 tests see; writing max(x,0) + log1p(exp(-|x|)) out by hand gives autograd
    the gradient 1 instead of 1/2 at x = 0 exactly, where clamp and |x| have kinks: a DPO step
    with policy == reference sits exactly there.)"""
    return torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))


def _tile_logits(spec, qb, kb, sb, bias, Y, mrow):
    sim = qb @ kb.T
    S = sb[:, None] * sim
    if bias is not None:
        S = S + bias
    if spec.margin:
        S = S + spec.margin * Y.to(S.dtype)
    if mrow is not None:
        S = S + mrow[:, None] * Y.to(S.dtype)
    return sim, S


def _merge(m, s, tile, dim):
    """Online LSE merge of a masked tile (-inf where excluded) into states (m, s) along dim."""
    m_new = torch.maximum(m, tile.amax(dim=dim))
    shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    t = tile - (shift[:, None] if dim == 1 else shift[None, :])
    return m_new, s * torch.exp(m - shift) + torch.exp(t).sum(dim=dim)


def _finish(m, s):
    shift = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return shift + torch.log(s)


def _prob(S_masked, lse, dim):
    """exp(S - lse) with weight 0 where lse = -inf (an empty row or column)."""
    safe = torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse)
    return torch.exp(S_masked - (safe[:, None] if dim == 1 else safe[None, :]))


def _tiles(n: int, m_all: int, device):
    """(r0, r1, c0, c1) of every tile, row-major."""
    bs = _tile_size(device)
    for r0 in range(0, n, bs):
        for c0 in range(0, m_all, bs):
            yield r0, min(n, r0 + bs), c0, min(m_all, c0 + bs)


def _torch_forward(spec: Spec, q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold):
    n, m_all, m = q.shape[0], k_all.shape[0], spec.m_main
    acc = acc_dtype(q.dtype)
    dev = q.device
    f = dict(dtype=acc, device=dev)
    neg_inf = float("-inf")
    want = spec.want
    row_m, row_s = torch.full((n,), neg_inf, **f), torch.zeros(n, **f)
    col_m, col_s = torch.full((m,), neg_inf, **f), torch.zeros(m, **f)
    pos_sum, pos_cnt, col_pos = torch.zeros(n, **f), torch.zeros(n, **f), torch.zeros(m, **f)
    row_sig = torch.zeros(n, **f)
    for r0, r1, c0, c1 in _tiles(n, m_all, dev):
        qb, sb = q[r0:r1].to(acc), scale[r0:r1]
        Y, allowed, valid, main = _tile_masks(spec, r0, r1, c0, c1, targets, labels_q, labels_k, dev)
        mrow = None if margin_rows is None else margin_rows[r0:r1]
        _, S = _tile_logits(spec, qb, k_all[c0:c1].to(acc), sb, bias, Y, mrow)
        allowed = _threshold(allowed, Y, S, None if neg_threshold is None else neg_threshold[r0:r1])
        col_ok = allowed & valid[:, None] & main[None, :]
        if want & _BIT["row_lse"]:
            row_m[r0:r1], row_s[r0:r1] = _merge(row_m[r0:r1], row_s[r0:r1],
                                                S.masked_fill(~allowed, neg_inf), 1)
        cm = min(c1, m) - c0  # main columns in this tile
        if want & _BIT["col_lse"] and cm > 0:
            col_m[c0:c0 + cm], col_s[c0:c0 + cm] = _merge(
                col_m[c0:c0 + cm], col_s[c0:c0 + cm], S[:, :cm].masked_fill(~col_ok[:, :cm], neg_inf), 0)
        SY = S.masked_fill(~Y, 0.0)
        pos_sum[r0:r1] += SY.sum(1)
        pos_cnt[r0:r1] += Y.sum(1)
        if cm > 0:
            col_pos[c0:c0 + cm] += SY[:, :cm].sum(0)
        if spec.sigmoid:
            z = Y.to(acc) * 2 - 1
            row_sig[r0:r1] += softplus(-z * S).masked_fill(~allowed, 0.0).sum(1)
    out = []
    for name, value in (("row_lse", _finish(row_m, row_s)), ("col_lse", _finish(col_m, col_s)),
                        ("pos_sum", pos_sum), ("pos_count", pos_cnt), ("col_pos_sum", col_pos),
                        ("row_sigmoid", row_sig)):
        out.append(value if want & _BIT[name] else torch.zeros(0, **f))
    return tuple(out)


def _torch_backward(spec: Spec, q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold,
                    row_lse, col_lse, g_row, g_col, g_pos, g_colpos, g_sig, needs):
    n, m_all, m = q.shape[0], k_all.shape[0], spec.m_main
    acc = acc_dtype(q.dtype)
    dev = q.device
    neg_inf = float("-inf")
    want = spec.want
    need_dq, need_dk, need_dscale, need_dbias, need_dmargin = needs
    dq = torch.zeros(n, q.shape[1], dtype=acc, device=dev) if need_dq else None
    dk = torch.zeros(spec.grad_cols, q.shape[1], dtype=acc, device=dev) if need_dk else None
    dscale = torch.zeros(n, dtype=acc, device=dev) if need_dscale else None
    dbias = torch.zeros((), dtype=acc, device=dev) if need_dbias else None
    dmargin = torch.zeros(n, dtype=acc, device=dev) if need_dmargin else None
    for r0, r1, c0, c1 in _tiles(n, m_all, dev):
        qb, sb = q[r0:r1].to(acc), scale[r0:r1]
        kb = k_all[c0:c1].to(acc)
        Y, allowed, valid, main = _tile_masks(spec, r0, r1, c0, c1, targets, labels_q, labels_k, dev)
        mrow = None if margin_rows is None else margin_rows[r0:r1]
        sim, S = _tile_logits(spec, qb, kb, sb, bias, Y, mrow)
        allowed = _threshold(allowed, Y, S, None if neg_threshold is None else neg_threshold[r0:r1])
        col_ok = allowed & valid[:, None] & main[None, :]
        Yf = Y.to(acc)
        dS = torch.zeros_like(S)
        if want & _BIT["row_lse"]:
            dS += g_row[r0:r1, None] * _prob(S.masked_fill(~allowed, neg_inf), row_lse[r0:r1], 1)
        cm = min(c1, m) - c0
        if want & _BIT["col_lse"] and cm > 0:
            dS[:, :cm] += g_col[None, c0:c0 + cm] * _prob(
                S[:, :cm].masked_fill(~col_ok[:, :cm], neg_inf), col_lse[c0:c0 + cm], 0)
        if want & _BIT["pos_sum"]:
            dS += g_pos[r0:r1, None] * Yf
        if want & _BIT["col_pos_sum"] and cm > 0:
            dS[:, :cm] += g_colpos[None, c0:c0 + cm] * Yf[:, :cm]
        if spec.sigmoid:
            z = Yf * 2 - 1
            dS += (g_sig[r0:r1, None] * (-z) * torch.sigmoid(-z * S)).masked_fill(~allowed, 0.0)
        if need_dscale:
            dscale[r0:r1] += (dS * sim).sum(1)
        if need_dbias:
            dbias += dS.sum()
        if need_dmargin:
            dmargin[r0:r1] += (dS * Yf).sum(1)
        dsim = dS * sb[:, None]
        if need_dq:
            dq[r0:r1] += dsim @ kb
        if need_dk and c0 < spec.grad_cols:
            g1 = min(c1, spec.grad_cols) - c0
            dk[c0:c0 + g1] += dsim[:, :g1].T @ qb
    return dq, dk, dscale, dbias, dmargin


# ---------------------------------------------------------------------------------------------
# native backend (cpu): tile GEMMs through torch, fused epilogues in csrc/cpu


def _native_forward(spec: Spec, q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold):
    acc = acc_dtype(q.dtype)
    n = q.shape[0]
    sizes = {"row_lse": n, "col_lse": spec.m_main, "pos_sum": n, "pos_count": n, "col_pos_sum": spec.m_main,
             "row_sigmoid": n}
    outs = [empty(sizes[o] if spec.want & _BIT[o] else 0, dtype=acc, device=q.device) for o in OUTPUTS]
    _native.ops().contrastive_lse_forward(
        q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold, spec.m_main, spec.exclude_self,
        spec.exclude_positives, spec.margin, spec.sigmoid, spec.want, *outs, TILE or 0)
    return tuple(outs)


def _native_backward(spec: Spec, q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold,
                     row_lse, col_lse, g_row, g_col, g_pos, g_colpos, g_sig, needs):
    outs = _native.ops().contrastive_lse_backward(
        q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold, row_lse, col_lse, g_row,
        g_col, g_pos,
        g_colpos, g_sig, spec.m_main, spec.grad_cols, spec.exclude_self, spec.exclude_positives,
        spec.margin, spec.sigmoid, spec.want, sum(1 << i for i, need in enumerate(needs) if need), TILE or 0)
    return tuple(o if need else None for o, need in zip(outs, needs))


_TRITON = "flashloss.triton_kernels.contrastive_lse"
_IMPLS = {
    "torch": (_torch_forward, _torch_backward),
    "triton": (_backend.lazy(_TRITON, "forward"), _backend.lazy(_TRITON, "backward")),
}
# CUDA: Triton first (the torch backend is the fallback); to be re-ranked on a GPU measurement.
_AUTO = {"cpu": ("torch",), "cuda": ("triton", "torch")}
_backend.register_op(OP, _IMPLS, auto_order=_AUTO)


def _register_native() -> None:
    if _native.load(warn=False) and hasattr(_native.ops(), "contrastive_lse_forward"):
        _IMPLS["cpu"] = (_native_forward, _native_backward)
        _AUTO["cpu"] = ("cpu", "torch")
        _backend.register_op(OP, _IMPLS, auto_order=_AUTO)


_register_native()


# ---------------------------------------------------------------------------------------------
# cuda backend: fused kernels in csrc/cuda/contrastive_lse.cu (tensor cores for bf16/fp16, exact
# fp32 FMA, fp64), deterministic. The same flashloss_C ops as the cpu backend, dispatched by
# device, so the launchers are shared (block_rows is ignored on CUDA).


def _register_cuda() -> None:
    if _native.compiled_with_cuda() and hasattr(_native.ops(), "contrastive_lse_forward"):
        _IMPLS["cuda"] = (_native_forward, _native_backward)
        # Not in the auto order yet: `auto` on CUDA stays ("triton", "torch") until the cuda backend
        # is measured against Triton on a GPU (bench/); then re-rank _AUTO["cuda"] on the numbers.
        _backend.register_op(OP, _IMPLS, auto_order=_AUTO)


_register_cuda()


# ---------------------------------------------------------------------------------------------
# custom op + autograd


@torch.library.custom_op("flashloss::contrastive_lse", mutates_args=())
def _forward_op(q: torch.Tensor, k_all: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                margin_rows: Optional[torch.Tensor], targets: Optional[torch.Tensor], labels_q: Optional[torch.Tensor],
                labels_k: Optional[torch.Tensor], neg_threshold: Optional[torch.Tensor], m_main: int,
                grad_cols: int, exclude_self: bool,
                exclude_positives: bool, margin: float, sigmoid: bool, want: int,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor, torch.Tensor]:
    spec = Spec(m_main, grad_cols, exclude_self, exclude_positives, margin, sigmoid, want)
    outs = _IMPLS[backend][0](spec, q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold)
    return tuple(outs)


@_forward_op.register_fake
def _(q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold, m_main, grad_cols,
      exclude_self, exclude_positives, margin, sigmoid, want, backend):
    acc = acc_dtype(q.dtype)
    sizes = {"row_lse": q.shape[0], "col_lse": m_main, "pos_sum": q.shape[0], "pos_count": q.shape[0],
             "col_pos_sum": m_main, "row_sigmoid": q.shape[0]}
    return tuple(q.new_empty(sizes[name] if want & _BIT[name] else 0, dtype=acc) for name in OUTPUTS)


@torch.library.custom_op("flashloss::contrastive_lse_backward", mutates_args=())
def _backward_op(q: torch.Tensor, k_all: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                 margin_rows: Optional[torch.Tensor], targets: Optional[torch.Tensor], labels_q: Optional[torch.Tensor],
                 labels_k: Optional[torch.Tensor], neg_threshold: Optional[torch.Tensor], row_lse: torch.Tensor,
                 col_lse: torch.Tensor,
                 g_row: torch.Tensor, g_col: torch.Tensor, g_pos: torch.Tensor, g_colpos: torch.Tensor,
                 g_sig: torch.Tensor, m_main: int, grad_cols: int, exclude_self: bool,
                 exclude_positives: bool, margin: float, sigmoid: bool, want: int, needs: list[bool],
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = Spec(m_main, grad_cols, exclude_self, exclude_positives, margin, sigmoid, want)
    grads = _IMPLS[backend][1](spec, q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k,
                               neg_threshold, row_lse, col_lse, g_row, g_col, g_pos, g_colpos, g_sig, tuple(needs))
    acc = acc_dtype(q.dtype)
    return tuple(g if g is not None else q.new_zeros(0, dtype=acc) for g in grads)


@_backward_op.register_fake
def _(q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold, row_lse, col_lse, g_row,
      g_col, g_pos, g_colpos, g_sig, m_main, grad_cols, exclude_self, exclude_positives, margin, sigmoid, want,
      needs, backend):
    acc = acc_dtype(q.dtype)
    shapes = [(q.shape[0], q.shape[1]), (grad_cols, q.shape[1]), (q.shape[0],), (), (q.shape[0],)]
    return tuple(q.new_empty(s if need else (0,), dtype=acc) for s, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    (q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold, m_main, grad_cols,
     exclude_self, exclude_positives, margin, sigmoid, want, backend) = inputs
    ctx.save_for_backward(q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold,
                          output[0], output[1])
    ctx.args = (m_main, grad_cols, exclude_self, exclude_positives, margin, sigmoid, want)
    ctx.backend = backend


def _backward(ctx, g_row, g_col, g_pos, g_cnt, g_colpos, g_sig):
    q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold, row_lse, col_lse = ctx.saved_tensors
    m_main, grad_cols, exclude_self, exclude_positives, margin, sigmoid, want = ctx.args
    acc = acc_dtype(q.dtype)

    def prep(g, size):
        if g is None or g.numel() == 0:
            return q.new_zeros(size, dtype=acc)
        return g.to(acc).contiguous()

    n = q.shape[0]
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1] and grad_cols > 0,
             ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[3],
             margin_rows is not None and ctx.needs_input_grad[4]]
    sizes = [n if want & _BIT["row_lse"] else 0, m_main if want & _BIT["col_lse"] else 0,
             n if want & _BIT["pos_sum"] else 0, m_main if want & _BIT["col_pos_sum"] else 0,
             n if want & _BIT["row_sigmoid"] else 0]
    grads = [prep(g, s) for g, s in zip((g_row, g_col, g_pos, g_colpos, g_sig), sizes)]
    dq, dk, dscale, dbias, dmargin = _backward_op(q, k_all, scale, bias, margin_rows, targets, labels_q,
                                                  labels_k, neg_threshold, row_lse, col_lse, *grads, m_main, grad_cols,
                                                  exclude_self, exclude_positives, margin, sigmoid, want,
                                                  needs, ctx.backend)
    if needs[1] and grad_cols < k_all.shape[0]:  # columns without gradient get zeros
        full = q.new_zeros(k_all.shape, dtype=acc)
        full[:grad_cols] = dk
        dk = full
    if needs[1]:
        dk = dk.to(k_all.dtype)
    return (dq.to(q.dtype) if needs[0] else None, dk if needs[1] else None,
            dscale.to(scale.dtype) if needs[2] else None, dbias.to(bias.dtype) if needs[3] else None,
            dmargin.to(margin_rows.dtype) if needs[4] else None,
            None, None, None, None, None, None, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public entry point


def contrastive_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    scale=1.0,
    bias=None,
    *,
    targets: Optional[torch.Tensor] = None,
    labels_q: Optional[torch.Tensor] = None,
    labels_k: Optional[torch.Tensor] = None,
    exclude_self: bool = False,
    exclude_positives: bool = False,
    margin=0.0,
    neg_threshold=None,
    extra_k: Optional[torch.Tensor | Sequence[torch.Tensor]] = None,
    outputs: Sequence[str] = ("row_lse", "pos_sum"),
    mode: str = "softmax",
    backend: str = "auto",
) -> ContrastiveStats:
    """Blockwise contrastive statistics of S = scale * q k^T + bias without storing S.

    q [N, D], k [M, D] (same float dtype and device); scale: float, 0-d tensor or [N] tensor
    (learnable if it requires grad; must be > 0 when a Python float); bias: None, float or 0-d tensor.
    Positives from `targets` [N] (int64, -100 = ignored row), `targets` [N, P] (several positive
    columns per row, entries -1 or -100 = padding; a row with none is ignored), or `labels_q` [N] +
    `labels_k` [M].
    `margin`: float, or a [N] tensor (per-row, differentiable) added to the positive logits.
    `neg_threshold`: None, a float or a [N] tensor (no gradient): hard-negative mask, a pair that is
    not a positive leaves every LSE and sigmoid sum when its logit S_ij (before any margin) is below
    the row's threshold (OBJECTIVES.md §1.16; `flashloss.contrastive.topk_threshold` gives top-k).
    `extra_k`: a tensor [E, D] or a list of them, negative-only columns appended after k.
    `outputs`: any of row_lse, col_lse, pos_sum, pos_count, col_pos_sum, row_sigmoid (the last needs
    mode="sigmoid"). Returns a ContrastiveStats with None for the outputs not requested.
    """
    check_tensor("q", q, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, dim=2, dtypes=(q.dtype,), device=q.device)
    n, d = q.shape
    m = k.shape[0]
    if k.shape[1] != d:
        raise ValueError(f"k must have the same feature dimension as q ({d}), got shape {tuple(k.shape)}")
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown:
        raise ValueError(f"outputs must be among {OUTPUTS}, got {unknown}")
    if mode not in ("softmax", "sigmoid"):
        raise ValueError(f"mode must be 'softmax' or 'sigmoid', got {mode!r}")
    if "row_sigmoid" in outputs and mode != "sigmoid":
        raise ValueError("output 'row_sigmoid' needs mode='sigmoid'")
    if mode == "sigmoid" and "row_sigmoid" not in outputs:
        outputs = outputs + ("row_sigmoid",)
    acc = acc_dtype(q.dtype)

    # scale -> [N] tensor in the accumulation dtype (its gradient flows back through expand/cast)
    if isinstance(scale, torch.Tensor):
        check_tensor("scale", scale, dim=(0, 1), dtypes=FLOAT_DTYPES, device=q.device)
        if scale.dim() == 1 and scale.shape[0] != n:
            raise ValueError(f"scale must be a float, a 0-d tensor or a [N={n}] tensor, got shape {tuple(scale.shape)}")
        # contiguous: kernels index scale[i] directly (an expanded 0-d tensor has stride 0)
        scale_rows = (scale.to(acc).expand(n) if scale.dim() == 0 else scale.to(acc)).contiguous()
    elif isinstance(scale, (int, float)):
        if not scale > 0:
            raise ValueError(f"scale must be > 0 (scale = 1/temperature), got {scale}")
        scale_rows = torch.full((n,), float(scale), dtype=acc, device=q.device)
    else:
        raise TypeError(f"scale must be a float or a tensor, got {type(scale).__name__}")
    if bias is not None:
        if isinstance(bias, (int, float)):
            bias = torch.tensor(float(bias), dtype=acc, device=q.device)
        check_tensor("bias", bias, dim=0, dtypes=FLOAT_DTYPES, device=q.device)
        bias = bias.to(acc)

    if targets is not None and (labels_q is not None or labels_k is not None):
        raise ValueError("give either targets or labels_q + labels_k, not both")
    if targets is not None:
        check_tensor("targets", targets, dim=(1, 2), dtypes=(torch.int64, torch.int32), device=q.device)
        if targets.shape[0] != n:
            raise ValueError(f"targets must have shape [N={n}] or [N={n}, P], got {tuple(targets.shape)}")
        targets = targets.long()
        if targets.dim() == 2:
            targets = targets.contiguous()
        if not torch.compiler.is_compiling():  # a data-dependent check; skipped inside a compiled graph
            pad = (targets == -100) | ((targets == -1) if targets.dim() == 2 else False)
            bad = ~pad & ((targets < 0) | (targets >= m))
            if bool(bad.any()):
                what = "-1 / -100 (padding)" if targets.dim() == 2 else "-100 (ignored)"
                raise IndexError(f"targets must be in [0, {m}) or {what}; got {targets[bad][0].item()}")
    if (labels_q is None) != (labels_k is None):
        raise ValueError("labels_q and labels_k go together")
    if labels_q is not None:
        check_tensor("labels_q", labels_q, dim=1, dtypes=(torch.int64, torch.int32), device=q.device)
        check_tensor("labels_k", labels_k, dim=1, dtypes=(torch.int64, torch.int32), device=q.device)
        if labels_q.shape[0] != n:
            raise ValueError(f"labels_q must have shape [N={n}], got {tuple(labels_q.shape)}")
        if labels_k.shape[0] != m:
            raise ValueError(f"labels_k must have shape [M={m}], got {tuple(labels_k.shape)}")
        labels_q, labels_k = labels_q.long(), labels_k.long()
    if exclude_positives and targets is None and labels_q is None:
        raise ValueError("exclude_positives needs targets or labels")
    margin_rows = None
    if isinstance(margin, torch.Tensor):  # per-row margin on the positives, learnable (AAM)
        check_tensor("margin", margin, dim=1, dtypes=FLOAT_DTYPES, device=q.device)
        if margin.shape[0] != n:
            raise ValueError(f"margin must be a float or a [N={n}] tensor, got shape {tuple(margin.shape)}")
        margin_rows, margin = margin.to(acc).contiguous(), 0.0
    elif not isinstance(margin, (int, float)):
        raise TypeError(f"margin must be a float or a [N] tensor, got {type(margin).__name__}")
    if neg_threshold is not None:
        if isinstance(neg_threshold, (int, float)):
            neg_threshold = torch.full((n,), float(neg_threshold), dtype=acc, device=q.device)
        check_tensor("neg_threshold", neg_threshold, dim=1, dtypes=FLOAT_DTYPES, device=q.device)
        if neg_threshold.shape[0] != n:
            raise ValueError(f"neg_threshold must be a float or a [N={n}] tensor, got shape "
                             f"{tuple(neg_threshold.shape)}")
        neg_threshold = neg_threshold.detach().to(acc).contiguous()  # a mask: no gradient

    # columns: k, then extra blocks that need a gradient, then those that do not (no dK work)
    extras = [] if extra_k is None else ([extra_k] if isinstance(extra_k, torch.Tensor) else list(extra_k))
    for i, e in enumerate(extras):
        check_tensor(f"extra_k[{i}]", e, dim=2, dtypes=(q.dtype,), device=q.device)
        if e.shape[1] != d:
            raise ValueError(f"extra_k[{i}] must have feature dimension {d}, got shape {tuple(e.shape)}")
    grad_extras = [e for e in extras if e.requires_grad]
    plain_extras = [e for e in extras if not e.requires_grad]
    k_all = torch.cat([k] + grad_extras + plain_extras, dim=0) if extras else k
    grad_cols = m + sum(e.shape[0] for e in grad_extras) if (k.requires_grad or grad_extras) else 0
    q_c, k_c = q.contiguous(), k_all.contiguous()

    want = 0
    for name in outputs:
        want |= _BIT[name]
    name = _backend.resolve(OP, backend, q.device)
    res = _forward_op(q_c, k_c, scale_rows, bias, margin_rows, targets, labels_q, labels_k, neg_threshold, m,
                      grad_cols,
                      bool(exclude_self), bool(exclude_positives), float(margin), mode == "sigmoid",
                      want, name)
    return ContrastiveStats(*(r if want & _BIT[o] else None for o, r in zip(OUTPUTS, res)))
