"""Triton kernels for primitive A (flashloss.ops.contrastive_lse, backend 'triton').

Tiling (FlashAttention-2 style, no N x M buffer, no atomics, deterministic):
  _stats_kernel   grid over blocks of BM "owned" rows (AXIS=0) or BN owned columns (AXIS=1); each
                  program loops over the other dimension in tiles, builds
                  S = scale_i * q_i.k_j + bias (+ margin on positives) with tl.dot (fp32 accumulate,
                  D walked in BK chunks so any D works), applies the masks, and folds the tile into
                  online-LSE states (m, l) of its rows (or columns), plus positive sums/counts and
                  the sigmoid sum. Column statistics are a second launch with AXIS=1 (a recompute of
                  2NMD FLOPs, only when col_lse / col_pos_sum are requested).
  _dq_kernel      grid over row blocks x D chunks: recomputes S, forms
                  dS = g_row P_row + g_col P_col + (g_pos + g_colpos) Y + sigmoid term, accumulates
                  dQ = (dS * scale) K, dscale_i = sum_j dS sim, and per-row sums of dS (dbias).
  _dk_kernel      grid over column blocks x D chunks: the same dS, accumulates dK = (dS * scale)^T Q.
Saved for backward: the [N] / [M] LSEs. FLOPs: forward 2NMD (+2NMD for column stats), backward
2NMD (dQ) + 2NMD (dK) + 2 x 2NMD recompute. Bytes: (N + M) D per pass.
fp32 inputs use IEEE fp32 dots (tf32 is not accurate enough for the 1e-5 contract).
Tiles: BM x BN autotuned on GPU over _TILE_CONFIGS (key N, M_ALL, D); BK = BD-chunk of D.
Options: several positive columns per row (targets [N, P], loop over P) and a per-row
hard-negative threshold (HAS_THR) are compile-time flags, so plain CLIP pays for neither.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashloss._debug import empty

NEG_INF = float("-inf")


def _interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tile(q_ptr, k_ptr, scale_ptr, bias, margin, mrow_ptr, tgt_ptr, lq_ptr, lk_ptr, thr_ptr, rows, cols, N, M_ALL,
          M_MAIN, D, P, stride_q, stride_k, HAS_MROW: tl.constexpr, HAS_TGT: tl.constexpr, HAS_LAB: tl.constexpr,
          HAS_THR: tl.constexpr, EXCL_SELF: tl.constexpr, EXCL_POS: tl.constexpr, BK: tl.constexpr,
          IEEE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """sim, S, positives Y, allowed mask and row validity of the tile rows x cols."""
    rmask = rows < N
    cmask = cols < M_ALL
    sim = tl.zeros([rows.shape[0], cols.shape[0]], dtype=ACC)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(q_ptr + rows[:, None] * stride_q + kk[None, :], mask=rmask[:, None] & (kk[None, :] < D), other=0.0)
        b = tl.load(k_ptr + cols[:, None] * stride_k + kk[None, :], mask=cmask[:, None] & (kk[None, :] < D), other=0.0)
        if UPCAST:  # the Triton interpreter computes 16-bit dots wrongly: give it fp32
            a = a.to(ACC)
            b = b.to(ACC)
        if IEEE:
            sim += tl.dot(a, tl.trans(b), input_precision="ieee", out_dtype=ACC)
        else:
            sim += tl.dot(a, tl.trans(b), out_dtype=ACC)
    sc = tl.load(scale_ptr + rows, mask=rmask, other=1.0).to(ACC)
    S = sc[:, None] * sim + bias
    main = cols < M_MAIN
    valid = rmask
    if HAS_TGT:  # P positive columns per row, -1 = padding
        t = tl.load(tgt_ptr + rows * P, mask=rmask, other=-1)
        valid = rmask & (t >= 0)
        Y = (cols[None, :] == t[:, None]) & cmask[None, :]
        for p in range(1, P):
            t = tl.load(tgt_ptr + rows * P + p, mask=rmask, other=-1)
            valid = valid | (rmask & (t >= 0))
            Y = Y | ((cols[None, :] == t[:, None]) & cmask[None, :])
    elif HAS_LAB:
        lqv = tl.load(lq_ptr + rows, mask=rmask, other=-2)
        lkv = tl.load(lk_ptr + cols, mask=cmask, other=-3)
        Y = (lkv[None, :] == lqv[:, None]) & main[None, :]
    else:
        Y = (cols[None, :] < 0) & (rows[:, None] < 0)
    allowed = rmask[:, None] & cmask[None, :]
    if EXCL_SELF:
        self_pair = (cols[None, :] == rows[:, None]) & main[None, :]
        allowed = allowed & (self_pair == 0)
        Y = Y & (self_pair == 0)
    if EXCL_POS:
        allowed = allowed & (Y == 0)
    if HAS_THR:  # hard-negative mask on the logit before the margin
        thr = tl.load(thr_ptr + rows, mask=rmask, other=0.0).to(ACC)
        allowed = allowed & (Y | (S >= thr[:, None]))
    mg = tl.zeros([rows.shape[0]], ACC) + margin
    if HAS_MROW:
        mg += tl.load(mrow_ptr + rows, mask=rmask, other=0.0).to(ACC)
    S = tl.where(Y, S + mg[:, None], S)
    return sim, S, Y, allowed, valid


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)); log1p(y) as log(u) * y / (u - 1) with u = 1 + y (exact to a few
    # ulp even when y is below fp32 resolution next to 1, where log(1 + y) would round to 0)
    y = tl.exp(-tl.abs(x))
    u = 1.0 + y
    d = u - 1.0
    l1p = tl.where(d == 0.0, y, tl.log(u) * (y / tl.where(d == 0.0, 1.0, d)))
    return tl.maximum(x, 0.0) + l1p


@triton.jit
def _stats_kernel(q_ptr, k_ptr, scale_ptr, bias, margin, mrow_ptr, tgt_ptr, lq_ptr, lk_ptr, thr_ptr,
                  lse_ptr, pos_ptr, cnt_ptr, sig_ptr, N, M_ALL, M_MAIN, D, P, stride_q, stride_k,
                  AXIS: tl.constexpr, HAS_MROW: tl.constexpr, HAS_THR: tl.constexpr, HAS_TGT: tl.constexpr, HAS_LAB: tl.constexpr, EXCL_SELF: tl.constexpr,
                  EXCL_POS: tl.constexpr, WANT_LSE: tl.constexpr, WANT_POS: tl.constexpr,
                  WANT_SIG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  IEEE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    if AXIS == 0:
        own = pid * BM + tl.arange(0, BM)
        n_own = N
        n_other = M_ALL
    else:
        own = pid * BN + tl.arange(0, BN)
        n_own = M_MAIN
        n_other = N
    m_i = tl.full([own.shape[0]], NEG_INF, ACC)
    l_i = tl.zeros([own.shape[0]], ACC)
    pos = tl.zeros([own.shape[0]], ACC)
    cnt = tl.zeros([own.shape[0]], ACC)
    sig = tl.zeros([own.shape[0]], ACC)
    step = BN if AXIS == 0 else BM
    for o0 in range(0, n_other, step):
        if AXIS == 0:
            rows = own
            cols = o0 + tl.arange(0, BN)
        else:
            rows = o0 + tl.arange(0, BM)
            cols = own
        sim, S, Y, allowed, valid = _tile(q_ptr, k_ptr, scale_ptr, bias, margin, mrow_ptr, tgt_ptr, lq_ptr, lk_ptr,
                                          thr_ptr, rows, cols, N, M_ALL, M_MAIN, D, P, stride_q, stride_k, HAS_MROW,
                                          HAS_TGT, HAS_LAB, HAS_THR, EXCL_SELF, EXCL_POS, BK, IEEE, ACC, UPCAST)
        if AXIS == 1:
            allowed = allowed & valid[:, None] & (cols < M_MAIN)[None, :]
        Sm = tl.where(allowed, S, NEG_INF)
        if WANT_LSE:
            tile_max = tl.max(Sm, axis=1 - AXIS)
            m_new = tl.maximum(m_i, tile_max)
            shift = tl.where(m_new == NEG_INF, 0.0, m_new)
            if AXIS == 0:
                p = tl.exp(Sm - shift[:, None])
            else:
                p = tl.exp(Sm - shift[None, :])
            l_i = l_i * tl.exp(m_i - shift) + tl.sum(p, axis=1 - AXIS)
            m_i = m_new
        if WANT_POS:
            pos += tl.sum(tl.where(Y, S, 0.0), axis=1 - AXIS)
            cnt += tl.sum(Y.to(ACC), axis=1 - AXIS)
        if WANT_SIG:
            z = tl.where(Y, -S, S)
            sig += tl.sum(tl.where(allowed, _softplus(z), 0.0), axis=1)
    omask = own < n_own
    if WANT_LSE:
        shift = tl.where(m_i == NEG_INF, 0.0, m_i)
        tl.store(lse_ptr + own, shift + tl.log(l_i), mask=omask)
    if WANT_POS:
        tl.store(pos_ptr + own, pos, mask=omask)
        if AXIS == 0:
            tl.store(cnt_ptr + own, cnt, mask=omask)
    if WANT_SIG:
        tl.store(sig_ptr + own, sig, mask=omask)


@triton.jit
def _dS(S, Y, allowed, valid, rows, cols, N, M_MAIN, row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, g_pos_ptr,
        g_colpos_ptr, g_sig_ptr, WANT_ROW: tl.constexpr, WANT_COL: tl.constexpr, WANT_POS: tl.constexpr,
        WANT_COLPOS: tl.constexpr, WANT_SIG: tl.constexpr, ACC: tl.constexpr):
    rmask = rows < N
    main = cols < M_MAIN
    dS = tl.zeros(S.shape, ACC)
    if WANT_ROW:
        lse = tl.load(row_lse_ptr + rows, mask=rmask, other=float("inf"))
        lse = tl.where(lse == NEG_INF, float("inf"), lse)
        g = tl.load(g_row_ptr + rows, mask=rmask, other=0.0)
        dS += g[:, None] * tl.where(allowed, tl.exp(S - lse[:, None]), 0.0)
    if WANT_COL:
        clse = tl.load(col_lse_ptr + cols, mask=main, other=float("inf"))
        clse = tl.where(clse == NEG_INF, float("inf"), clse)
        gc = tl.load(g_col_ptr + cols, mask=main, other=0.0)
        ok = allowed & valid[:, None] & main[None, :]
        dS += gc[None, :] * tl.where(ok, tl.exp(S - clse[None, :]), 0.0)
    if WANT_POS:
        gp = tl.load(g_pos_ptr + rows, mask=rmask, other=0.0)
        dS += tl.where(Y, gp[:, None], 0.0)
    if WANT_COLPOS:
        gcp = tl.load(g_colpos_ptr + cols, mask=main, other=0.0)
        dS += tl.where(Y, gcp[None, :], 0.0)
    if WANT_SIG:
        gs = tl.load(g_sig_ptr + rows, mask=rmask, other=0.0)
        zs = tl.where(Y, -S, S)
        sg = 1.0 / (1.0 + tl.exp(-zs))
        dS += gs[:, None] * tl.where(allowed, tl.where(Y, -sg, sg), 0.0)
    return dS


@triton.jit
def _dq_kernel(q_ptr, k_ptr, scale_ptr, bias, margin, mrow_ptr, tgt_ptr, lq_ptr, lk_ptr, thr_ptr, row_lse_ptr,
               col_lse_ptr, g_row_ptr, g_col_ptr, g_pos_ptr, g_colpos_ptr, g_sig_ptr, dq_ptr, dscale_ptr,
               dbias_ptr, dmargin_ptr, N, M_ALL, M_MAIN, D, P, stride_q, stride_k,
               HAS_MROW: tl.constexpr, HAS_THR: tl.constexpr, HAS_TGT: tl.constexpr, HAS_LAB: tl.constexpr, EXCL_SELF: tl.constexpr, EXCL_POS: tl.constexpr,
               WANT_ROW: tl.constexpr, WANT_COL: tl.constexpr, WANT_POS: tl.constexpr,
               WANT_COLPOS: tl.constexpr, WANT_SIG: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
               IEEE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    rmask = rows < N
    acc = tl.zeros([BM, BD], ACC)
    dscale = tl.zeros([BM], ACC)
    dbias = tl.zeros([BM], ACC)
    dmargin = tl.zeros([BM], ACC)
    sc = tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(ACC)
    for c0 in range(0, M_ALL, BN):
        cols = c0 + tl.arange(0, BN)
        sim, S, Y, allowed, valid = _tile(q_ptr, k_ptr, scale_ptr, bias, margin, mrow_ptr, tgt_ptr, lq_ptr, lk_ptr,
                                          thr_ptr, rows, cols, N, M_ALL, M_MAIN, D, P, stride_q, stride_k, HAS_MROW,
                                          HAS_TGT, HAS_LAB, HAS_THR, EXCL_SELF, EXCL_POS, BK, IEEE, ACC, UPCAST)
        dS = _dS(S, Y, allowed, valid, rows, cols, N, M_MAIN, row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr,
                 g_pos_ptr, g_colpos_ptr, g_sig_ptr, WANT_ROW, WANT_COL, WANT_POS, WANT_COLPOS, WANT_SIG, ACC)
        dscale += tl.sum(dS * sim, axis=1)
        dbias += tl.sum(dS, axis=1)
        dmargin += tl.sum(tl.where(Y, dS, 0.0), axis=1)
        kb = tl.load(k_ptr + cols[:, None] * stride_k + dd[None, :], mask=(cols < M_ALL)[:, None] & (dd < D)[None, :],
                     other=0.0)
        if UPCAST:
            kb = kb.to(ACC)
        if IEEE:
            acc += tl.dot(dS * sc[:, None], kb, input_precision="ieee", out_dtype=ACC)
        else:
            acc += tl.dot((dS * sc[:, None]).to(kb.dtype), kb, out_dtype=ACC)
    tl.store(dq_ptr + rows[:, None] * D + dd[None, :], acc, mask=rmask[:, None] & (dd < D)[None, :])
    if tl.program_id(1) == 0:
        tl.store(dscale_ptr + rows, dscale, mask=rmask)
        tl.store(dbias_ptr + rows, dbias, mask=rmask)
        tl.store(dmargin_ptr + rows, dmargin, mask=rmask)


@triton.jit
def _dk_kernel(q_ptr, k_ptr, scale_ptr, bias, margin, mrow_ptr, tgt_ptr, lq_ptr, lk_ptr, thr_ptr, row_lse_ptr,
               col_lse_ptr, g_row_ptr, g_col_ptr, g_pos_ptr, g_colpos_ptr, g_sig_ptr, dk_ptr,
               N, M_ALL, M_MAIN, GRAD_COLS, D, P, stride_q, stride_k,
               HAS_MROW: tl.constexpr, HAS_THR: tl.constexpr, HAS_TGT: tl.constexpr, HAS_LAB: tl.constexpr, EXCL_SELF: tl.constexpr, EXCL_POS: tl.constexpr,
               WANT_ROW: tl.constexpr, WANT_COL: tl.constexpr, WANT_POS: tl.constexpr,
               WANT_COLPOS: tl.constexpr, WANT_SIG: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
               IEEE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    acc = tl.zeros([BN, BD], ACC)
    for r0 in range(0, N, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < N
        sim, S, Y, allowed, valid = _tile(q_ptr, k_ptr, scale_ptr, bias, margin, mrow_ptr, tgt_ptr, lq_ptr, lk_ptr,
                                          thr_ptr, rows, cols, N, M_ALL, M_MAIN, D, P, stride_q, stride_k, HAS_MROW,
                                          HAS_TGT, HAS_LAB, HAS_THR, EXCL_SELF, EXCL_POS, BK, IEEE, ACC, UPCAST)
        dS = _dS(S, Y, allowed, valid, rows, cols, N, M_MAIN, row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr,
                 g_pos_ptr, g_colpos_ptr, g_sig_ptr, WANT_ROW, WANT_COL, WANT_POS, WANT_COLPOS, WANT_SIG, ACC)
        sc = tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(ACC)
        qb = tl.load(q_ptr + rows[:, None] * stride_q + dd[None, :], mask=rmask[:, None] & (dd < D)[None, :],
                     other=0.0)
        if UPCAST:
            qb = qb.to(ACC)
        if IEEE:
            acc += tl.dot(tl.trans(dS * sc[:, None]), qb, input_precision="ieee", out_dtype=ACC)
        else:
            acc += tl.dot(tl.trans((dS * sc[:, None]).to(qb.dtype)), qb, out_dtype=ACC)
    tl.store(dk_ptr + cols[:, None] * D + dd[None, :], acc, mask=(cols < GRAD_COLS)[:, None] & (dd < D)[None, :])


# ---------------------------------------------------------------------------------------------
# launchers (same contract as the other backends; see flashloss/ops/contrastive_lse.py)


# Autotuned tile shapes on GPU (BM x BN similarity tiles, warps, pipeline stages); BK and BD follow
# from D. Every config computes the same function (only the summation order differs) and each
# kernel writes its outputs without accumulating, so the autotuner's repeated launches are
# harmless. Under the interpreter (CPU tests) the fixed 16 x 16 tiles are used. The tuned choice
# is cached per (N, M_ALL, D); FLASHLOSS_TRITON_AUTOTUNE=0 pins the 64 x 64 default.
_TILE_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st)
    for bm, bn, w, st in [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2),
                          (128, 64, 4, 3)]
]
_KEY = ["N", "M_ALL", "D"]
_stats_tuned = triton.autotune(configs=_TILE_CONFIGS, key=_KEY)(_stats_kernel)
_dq_tuned = triton.autotune(configs=_TILE_CONFIGS, key=_KEY)(_dq_kernel)
_dk_tuned = triton.autotune(configs=_TILE_CONFIGS, key=_KEY)(_dk_kernel)


def _autotune() -> bool:
    import os

    return not _interpret() and os.environ.get("FLASHLOSS_TRITON_AUTOTUNE", "1") == "1"


def _launch(plain, tuned, grid, args, kwargs):
    """Runs `tuned` with a grid computed from the chosen BM / BN, or `plain` with the fixed tiles.
    grid(bm, bn) gives the launch grid."""
    if _autotune():
        kw = {k: v for k, v in kwargs.items() if k not in ("BM", "BN")}
        tuned[lambda meta: grid(meta["BM"], meta["BN"])](*args, **kw)
    else:
        plain[grid(kwargs["BM"], kwargs["BN"])](*args, **kwargs)


def _blocks(d: int, device) -> tuple[int, int, int, int]:
    if _interpret():
        return 16, 16, 16, 16
    bk = min(64, max(16, triton.next_power_of_2(d)))
    return 64, 64, bk, min(128, max(16, triton.next_power_of_2(d)))


def _prepare(q, targets, labels_q, labels_k, m_all, m_main):
    dev = q.device
    dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
    tgt = lq = lk = dummy_i
    if targets is not None:
        tgt = torch.where(targets < 0, torch.full_like(targets, -1), targets).to(torch.int32).contiguous()
    if labels_q is not None:
        _, inverse = torch.unique(torch.cat([labels_q, labels_k]), return_inverse=True)
        inverse = inverse.to(torch.int32)
        lq = inverse[: labels_q.shape[0]].contiguous()
        lk = torch.full((m_all,), -1, dtype=torch.int32, device=dev)
        lk[:m_main] = inverse[labels_q.shape[0]:]
    return tgt, lq, lk


def _acc(q):
    return tl.float64 if q.dtype == torch.float64 else tl.float32


def forward(spec, q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold):
    from flashloss.ops.contrastive_lse import OUTPUTS, _BIT, acc_dtype

    n, d = q.shape
    m_all = k_all.shape[0]
    acc = acc_dtype(q.dtype)
    tgt, lq, lk = _prepare(q, targets, labels_q, labels_k, m_all, spec.m_main)
    sizes = {"row_lse": n, "col_lse": spec.m_main, "pos_sum": n, "pos_count": n, "col_pos_sum": spec.m_main,
             "row_sigmoid": n}
    outs = {o: empty(sizes[o] if spec.want & _BIT[o] else 0, dtype=acc, device=q.device) for o in OUTPUTS}
    bm, bn, bk, _ = _blocks(d, q.device)  # BM / BN: the untuned tiles
    b = float(bias) if bias is not None else 0.0
    n_pos = targets.shape[1] if targets is not None and targets.dim() == 2 else 1
    common = dict(HAS_MROW=margin_rows is not None, HAS_THR=neg_threshold is not None, HAS_TGT=targets is not None, HAS_LAB=labels_q is not None, EXCL_SELF=spec.exclude_self,
                  EXCL_POS=spec.exclude_positives, BM=bm, BN=bn, BK=bk, IEEE=q.dtype == torch.float32,
                  ACC=_acc(q), UPCAST=_interpret())
    dummy = torch.zeros(1, dtype=acc, device=q.device)
    mrow = margin_rows if margin_rows is not None else dummy
    thr = neg_threshold if neg_threshold is not None else dummy
    want_row = bool(spec.want & (_BIT["row_lse"] | _BIT["pos_sum"] | _BIT["pos_count"] | _BIT["row_sigmoid"]))
    want_pos = bool(spec.want & (_BIT["pos_sum"] | _BIT["pos_count"]))
    # the kernel writes positive sums and counts together: scratch for the one not requested
    pos_buf = outs["pos_sum"] if outs["pos_sum"].numel() or not want_pos else torch.empty(n, dtype=acc, device=q.device)
    cnt_buf = outs["pos_count"] if outs["pos_count"].numel() or not want_pos else torch.empty(n, dtype=acc, device=q.device)
    if n and want_row:
        _launch(_stats_kernel, _stats_tuned, lambda bm_, bn_: (triton.cdiv(n, bm_),),
                (q, k_all, scale, b, spec.margin, mrow, tgt, lq, lk, thr,
                 outs["row_lse"] if outs["row_lse"].numel() else dummy,
                 pos_buf if pos_buf.numel() else dummy,
                 cnt_buf if cnt_buf.numel() else dummy,
                 outs["row_sigmoid"] if outs["row_sigmoid"].numel() else dummy,
                 n, m_all, spec.m_main, d, n_pos, q.stride(0), k_all.stride(0)),
                dict(AXIS=0, WANT_LSE=bool(spec.want & _BIT["row_lse"]), WANT_POS=want_pos, WANT_SIG=spec.sigmoid,
                     **common))
    want_col = bool(spec.want & (_BIT["col_lse"] | _BIT["col_pos_sum"]))
    if spec.m_main and want_col:
        _launch(_stats_kernel, _stats_tuned, lambda bm_, bn_: (triton.cdiv(spec.m_main, bn_),),
                (q, k_all, scale, b, spec.margin, mrow, tgt, lq, lk, thr,
                 outs["col_lse"] if outs["col_lse"].numel() else dummy,
                 outs["col_pos_sum"] if outs["col_pos_sum"].numel() else dummy, dummy, dummy,
                 n, m_all, spec.m_main, d, n_pos, q.stride(0), k_all.stride(0)),
                dict(AXIS=1, WANT_LSE=bool(spec.want & _BIT["col_lse"]),
                     WANT_POS=bool(spec.want & _BIT["col_pos_sum"]), WANT_SIG=False, **common))
    return tuple(outs[o] for o in OUTPUTS)


def backward(spec, q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold, row_lse, col_lse,
             g_row, g_col, g_pos, g_colpos, g_sig, needs):
    from flashloss.ops.contrastive_lse import _BIT, acc_dtype

    n, d = q.shape
    m_all = k_all.shape[0]
    acc = acc_dtype(q.dtype)
    tgt, lq, lk = _prepare(q, targets, labels_q, labels_k, m_all, spec.m_main)
    bm, bn, bk, bd = _blocks(d, q.device)
    b = float(bias) if bias is not None else 0.0
    dummy = torch.zeros(1, dtype=acc, device=q.device)

    def arg(t):
        return t if t is not None and t.numel() else dummy

    n_pos = targets.shape[1] if targets is not None and targets.dim() == 2 else 1
    flags = dict(HAS_MROW=margin_rows is not None, HAS_THR=neg_threshold is not None, HAS_TGT=targets is not None, HAS_LAB=labels_q is not None, EXCL_SELF=spec.exclude_self,
                 EXCL_POS=spec.exclude_positives, WANT_ROW=bool(spec.want & _BIT["row_lse"]),
                 WANT_COL=bool(spec.want & _BIT["col_lse"]), WANT_POS=bool(spec.want & _BIT["pos_sum"]),
                 WANT_COLPOS=bool(spec.want & _BIT["col_pos_sum"]), WANT_SIG=spec.sigmoid,
                 BM=bm, BN=bn, BK=bk, BD=bd, IEEE=q.dtype == torch.float32, ACC=_acc(q), UPCAST=_interpret())
    stats = (arg(row_lse), arg(col_lse), arg(g_row), arg(g_col), arg(g_pos), arg(g_colpos), arg(g_sig))
    need_dq, need_dk, need_dscale, need_dbias, need_dmargin = needs
    mrow = margin_rows if margin_rows is not None else dummy
    thr = neg_threshold if neg_threshold is not None else dummy
    dq = dscale = dbias = dk = dmargin = None
    if (need_dq or need_dscale or need_dbias or need_dmargin) and n:
        dq_buf = empty(n, d, dtype=acc, device=q.device)
        dscale_buf = empty(n, dtype=acc, device=q.device)
        dbias_rows = empty(n, dtype=acc, device=q.device)
        dmargin_buf = empty(n, dtype=acc, device=q.device)
        _launch(_dq_kernel, _dq_tuned, lambda bm_, bn_: (triton.cdiv(n, bm_), triton.cdiv(d, bd)),
                (q, k_all, scale, b, spec.margin, mrow, tgt, lq, lk, thr, *stats, dq_buf, dscale_buf, dbias_rows,
                 dmargin_buf, n, m_all, spec.m_main, d, n_pos, q.stride(0), k_all.stride(0)), flags)
        dq = dq_buf if need_dq else None
        dscale = dscale_buf if need_dscale else None
        dbias = dbias_rows.sum() if need_dbias else None
        dmargin = dmargin_buf if need_dmargin else None
    elif need_dq or need_dscale or need_dbias or need_dmargin:
        dq = torch.zeros(n, d, dtype=acc, device=q.device) if need_dq else None
        dscale = torch.zeros(n, dtype=acc, device=q.device) if need_dscale else None
        dbias = torch.zeros((), dtype=acc, device=q.device) if need_dbias else None
        dmargin = torch.zeros(n, dtype=acc, device=q.device) if need_dmargin else None
    if need_dk and spec.grad_cols:
        dk = empty(spec.grad_cols, d, dtype=acc, device=q.device)
        if n:
            _launch(_dk_kernel, _dk_tuned, lambda bm_, bn_: (triton.cdiv(spec.grad_cols, bn_), triton.cdiv(d, bd)),
                    (q, k_all, scale, b, spec.margin, mrow, tgt, lq, lk, thr, *stats, dk,
                     n, m_all, spec.m_main, spec.grad_cols, d, n_pos, q.stride(0), k_all.stride(0)), flags)
        else:
            dk.zero_()
    return dq, dk, dscale, dbias, dmargin
