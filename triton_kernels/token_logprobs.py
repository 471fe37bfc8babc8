"""Triton kernels for primitive B (flashloss.ops.token_logprobs, backend 'triton'), CCE-style.

Notation: N rows (tokens), H hidden size, V vocabulary; b = bytes per input element; BM x BN a
(rows x vocabulary) tile, BK the chunk of H that one tl.dot step consumes. A tile's raw logits
x = hidden[rows] W[cols]^T (+ bias) are built with tl.dot over H in BK chunks (fp32 accumulation;
bf16/fp16 on tensor cores, fp32 and fp64 as IEEE dots of their own precision), then mapped to z
(softcap, logit scale, temperature) in registers. Nothing of size N x V is ever stored.

Forward  (_fwd_kernel, then a few torch ops)
  1-D grid over (row block, vocabulary split) pairs in grouped order: GROUP_M consecutive row
  blocks sweep all splits before the next GROUP_M start, so the programs resident at one time share
  a few hidden row blocks and a few weight ranges in L2 (the usual GEMM swizzle). A program walks
  its split of the vocabulary in BN-column tiles and folds each tile into per-row statistics held
  in registers: running max m, sum e^{z-m}, sum e^{z-m} z (entropy), sum e^{2(z-m)} (log sum p^2),
  sum z (z_sum), and the target logit (picked up in the tile that holds the target column). Each
  program writes its six partials to a [6, splits, N] buffer; torch merges them (max, rescale,
  sum) and masks ignored rows. Splitting the vocabulary lets small N fill the GPU (N = 16384 is
  only 128 row blocks of 128); the partials cost 24 * splits * N bytes.
Backward (two schemes, same math, same tiles)
  atomic (default)  _bwd_kernel, 1-D grid over all (row block, vocabulary tile) pairs in grouped
    order. Recomputes the tile, forms dz and dx = dz * dz/dx in registers, then walks H in BK
    chunks: dhidden[rows] += dx W[cols] and dW[cols] += dx^T hidden[rows] with fp32 (fp64) atomic
    adds, and dbias[cols] += column sums of dx (atomic). The grouped order keeps the atomics'
    targets (GROUP_M row blocks of dhidden, the resident vocabulary tiles of dW) in L2. Atomic
    float adds commute only up to rounding: results can differ in the last bits between runs.
  deterministic     _dh_kernel (grid: row blocks; each program walks the whole vocabulary and
    adds into its own dhidden rows, plain loads and stores) and _dw_kernel (grid: vocabulary
    tiles; each walks all rows into its own dW rows; dbias summed in registers). Every element is
    summed in a fixed order: bitwise reproducible. Costs one more recompute (2NHV FLOPs) and
    re-reads / re-writes each program's accumulator rows once per tile (8NHV/BN bytes for dhidden,
    8NHV/BM for dW, which do not stay in L2 for large H).
    Chosen by DETERMINISTIC = True, FLASHLOSS_TRITON_DETERMINISTIC=1, or
    torch.use_deterministic_algorithms(True) (PyTorch's convention for atomic-based kernels).
  dz_v = g (1[v=y] - p_v) + l p_v - h p_v (z_v - E_p z) + s, p_v = exp(z_v - LSE), E_p z = LSE - entropy.
  Without a softcap dz/dx = a/T is a constant, so the `s` (z_sum upstream, label smoothing) term
  is a rank-1 update done in torch instead of in the tiles: dhidden_i += s_i a/T sum_v W_v,
  dW_v += a/T sum_i s_i hidden_i, dbias_v += a/T sum_i s_i (deterministic; O((N + V) H)). This
  keeps the tile filter effective under label smoothing. With a softcap the term stays in the tiles.
  For bf16/fp16 inputs dx is rounded to the input dtype before the tensor-core dots (as CCE does);
  the accumulators stay fp32.
Filter (CCE): in backward a tile in which every softmax value p is below eps and that holds no
  target column (when logp has an upstream gradient) is skipped: its -p terms are below the
  dtype's resolution relative to the one-hot term. With an entropy gradient each row's p is
  weighed by max(1, |log p| + |entropy|), a bound on that term's entries p |z - E_p z| (p < 1/e).
  eps = FILTER_EPS, or finfo(dtype).eps / 32 (bf16 2^-12, fp16 2^-15, fp32 2^-28) when None. On by
  default for bf16/fp16, off for fp32/fp64 (exact); FLASHLOSS_TRITON_FILTER=0 switches it off, =1
  forces it on. Never on while the `s` term is inside the tiles (softcap with a z_sum gradient).
  Caveat (as for CCE): the skipped mass is bounded per entry, not per row, so on nearly flat
  distributions (large V, untrained models) it can drop a sizeable total mass; switch the filter
  off for such runs.
Saved for backward: the [N] LSE (and entropy when its gradient can be asked for); nothing N x V.
The forward has no atomics and merges in a fixed order: it is deterministic in both schemes.
FLOPs: forward 2NHV; backward atomic 2NHV recompute + 4NHV = 6NHV (8NHV in all),
deterministic 4NHV recompute + 4NHV = 8NHV (10NHV in all); skipped tiles save their 4 * BM * BN * H
update FLOPs (the recompute is always paid). Bytes (L2 level): a tile step reads (BM + BN) BK b;
hidden is read V/BN times and W N/BM times per pass, served from L2 by the grouped order. The
atomic backward issues NHV (1/BM + 1/BN) fp32 reductions (vectorized, relaxed).
At N = 16384, H = 4096, V = 128256, bf16, 128 x 128 tiles: forward 1.7e13 FLOP, backward 5.2e13
FLOP, 1.3e11 reductions (0.54 TB into L2) unless filtered; deterministic: 6.9e13 FLOP and 1.1 TB
of accumulator re-reads/re-writes (64 x 128 / 128 x 64 tiles).
Tiles: fixed per dtype class and architecture (_config), chosen from offline sm_90a / sm_80
compiles (registers and spills from ptxas, at most a few dozen spilled bytes; tests/triton_compile.py),
not from timings: no GPU was available when this was written. The interpreter uses 16 x 16 x 16 so
tiny test shapes cross every boundary.
Triton's autotuner is not used: the backward kernels accumulate into their outputs, so its repeated
benchmark launches would need resets, and the forward's split count depends on BM.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from flashloss._debug import empty

_OUT = ("logp", "lse", "entropy", "z_sum", "log_sum_p2")

# Knobs (module level so that tests and experiments can set them).
SPLITS: int | None = None  # forward vocabulary splits; None = auto (interpreter: 2)
DETERMINISTIC: bool | None = None  # None = FLASHLOSS_TRITON_DETERMINISTIC / torch's deterministic flag
FILTER_EPS: float | None = None  # None = finfo(dtype).eps / 32
GROUP_M = 8  # row blocks per group of the grouped launch order


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# device functions


@triton.jit
def _grouped(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """(m, n) of program `pid` when GROUP_M consecutive m-blocks sweep all n before moving on."""
    per_group = GROUP_M * n_n
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(n_m - first, GROUP_M)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with ACC accumulation. UPCAST: the interpreter's bf16 dot is wrong, give it
    the (exact) fp32 values instead."""
    if UPCAST:
        a = a.to(ACC)
        b = b.to(ACC)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)
    else:
        return tl.dot(a, b, acc, out_dtype=ACC)


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w, inv_t, scale, cap,
                HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """z of the tile rows x cols (rows / cols int64; masked lanes see zero inputs) and dz/dx."""
    x = tl.zeros([BM, BN], dtype=ACC)
    for k0 in range(0, H, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + cols[:, None] * stride_w + kk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        x = _mm(a, tl.trans(b), x, IEEE, ACC, UPCAST)
    if HAS_BIAS:
        x += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    if HAS_CAP:
        u = x * (scale / cap)
        # tanh(u) = 1 - 2 / (e^{2u} + 1), saturating correctly at both ends
        th = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        z = th * (cap * inv_t)
        dzdx = (scale * inv_t) * (1.0 - th * th)
    else:
        z = x * (scale * inv_t)
        dzdx = tl.zeros_like(x) + scale * inv_t
    return z, dzdx


@triton.jit
def _row_coefs(rows, rmask, t_ptr, lse_ptr, ent_ptr, g_ptr, l_ptr, he_ptr, s_ptr, ignore_index,
               HAS_G: tl.constexpr, HAS_L: tl.constexpr, HAS_H: tl.constexpr, HAS_S: tl.constexpr):
    """Per-row data of the backward: target, validity, LSE, the coefficient l - g of p, g, h,
    E_p z and s (zero where absent or the row is ignored / out of range)."""
    t = tl.load(t_ptr + rows, mask=rmask, other=ignore_index)
    valid = rmask & (t != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
    zero = tl.zeros_like(lse)
    cp = zero
    g = zero
    he = zero
    ez = zero
    s = zero
    if HAS_L:
        cp = cp + tl.load(l_ptr + rows, mask=valid, other=0.0)
    if HAS_G:
        g = tl.load(g_ptr + rows, mask=valid, other=0.0)
        cp = cp - g
    if HAS_H:
        he = tl.load(he_ptr + rows, mask=valid, other=0.0)
        ez = lse - tl.load(ent_ptr + rows, mask=valid, other=0.0)
    if HAS_S:
        s = tl.load(s_ptr + rows, mask=valid, other=0.0)
    return t, valid, lse, cp, g, he, ez, s


@triton.jit
def _dx_tile(z, dzdx, cols, cmask, t, valid, lse, cp, g, he, ez, s, eps,
             HAS_G: tl.constexpr, HAS_H: tl.constexpr, HAS_S: tl.constexpr):
    """dx = dz * dz/dx of the tile (0 on masked lanes) and whether the filter keeps the tile
    (always, when eps <= 0: the criterion is >= 0)."""
    live = valid[:, None] & cmask[None, :]
    p = tl.where(live, tl.exp(z - lse[:, None]), 0.0)
    is_t = (cols[None, :] == t[:, None]) & live
    pmax = tl.max(p, axis=1)
    dz = p * cp[:, None]
    if HAS_H:
        dz -= (he[:, None] * p) * (z - ez[:, None])
        # the entropy term's entries are p |z - E_p z| = p |log p + entropy|; p |log p| grows with p
        # below 1/e, so a row's entries are at most pmax max(1, |log pmax| + |entropy|) (1-D work only)
        pmax = pmax * tl.maximum(1.0, tl.abs(lse - ez) - tl.log(tl.maximum(pmax, 1e-30)))
    keep = tl.max(pmax, axis=0) >= eps
    if HAS_G:
        keep = keep | (tl.max(tl.max(is_t.to(tl.int32), axis=1), axis=0) > 0)
        dz += tl.where(is_t, g[:, None], 0.0)
    if HAS_S:
        dz += tl.where(live, s[:, None], 0.0)
    return tl.where(live, dz * dzdx, 0.0), keep


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, part_ptr, N, V, H, stride_h, stride_w, n_rb, splits, v_per_split,
                inv_t, scale, cap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, WANT_ENT: tl.constexpr,
                WANT_P2: tl.constexpr, GROUP_M: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, split = _grouped(tl.program_id(0), n_rb, splits, GROUP_M)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < N
    t = tl.load(t_ptr + rows, mask=rmask, other=-1)
    m = tl.full([BM], float("-inf"), dtype=ACC)
    s = tl.zeros([BM], dtype=ACC)
    sz = tl.zeros([BM], dtype=ACC)
    s2 = tl.zeros([BM], dtype=ACC)
    zs = tl.zeros([BM], dtype=ACC)
    zt = tl.zeros([BM], dtype=ACC)
    v_lo = split * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)
    for c0 in range(v_lo, v_hi, BN):
        cols = (c0 + tl.arange(0, BN)).to(tl.int64)
        cmask = cols < v_hi
        z, _ = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w, inv_t, scale, cap,
                           HAS_BIAS, HAS_CAP, BM, BN, BK, IEEE, ACC, UPCAST)
        z = tl.where(cmask[None, :], z, 0.0)
        zm = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))  # finite: every tile has a valid column
        alpha = tl.exp(m - m_new)
        e = tl.exp(zm - m_new[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        if WANT_ENT:
            sz = sz * alpha + tl.sum(e * z, axis=1)
        if WANT_P2:
            s2 = s2 * alpha * alpha + tl.sum(e * e, axis=1)
        zs += tl.sum(z, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == t[:, None], z, 0.0), axis=1)
        m = m_new
    # partial k of this program at part[k, split, rows] (int64 offsets; `splits` may arrive as a
    # constexpr 1, so only the tensor `split` is cast)
    tl.store(part_ptr + split.to(tl.int64) * N + rows, m, mask=rmask)
    tl.store(part_ptr + (split + splits).to(tl.int64) * N + rows, s, mask=rmask)
    tl.store(part_ptr + (split + 2 * splits).to(tl.int64) * N + rows, sz, mask=rmask)
    tl.store(part_ptr + (split + 3 * splits).to(tl.int64) * N + rows, s2, mask=rmask)
    tl.store(part_ptr + (split + 4 * splits).to(tl.int64) * N + rows, zs, mask=rmask)
    tl.store(part_ptr + (split + 5 * splits).to(tl.int64) * N + rows, zt, mask=rmask)


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, ent_ptr, g_ptr, l_ptr, he_ptr, s_ptr, dh_ptr, dw_ptr, db_ptr,
                N, V, H, stride_h, stride_w, n_rb, n_vt, ignore_index, inv_t, scale, cap, eps,
                HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_G: tl.constexpr, HAS_L: tl.constexpr,
                HAS_H: tl.constexpr, HAS_S: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
                NEED_DB: tl.constexpr, LOW: tl.constexpr, GROUP_M: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """Atomic scheme: one program per (row block, vocabulary tile)."""
    pid_m, pid_n = _grouped(tl.program_id(0), n_rb, n_vt, GROUP_M)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    cols = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rmask = rows < N
    cmask = cols < V
    t, valid, lse, cp, g, he, ez, s = _row_coefs(rows, rmask, t_ptr, lse_ptr, ent_ptr, g_ptr, l_ptr, he_ptr, s_ptr,
                                                 ignore_index, HAS_G, HAS_L, HAS_H, HAS_S)
    z, dzdx = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w, inv_t, scale, cap,
                          HAS_BIAS, HAS_CAP, BM, BN, BK, IEEE, ACC, UPCAST)
    dx, keep = _dx_tile(z, dzdx, cols, cmask, t, valid, lse, cp, g, he, ez, s, eps, HAS_G, HAS_H, HAS_S)
    if keep:
        if NEED_DB:
            tl.atomic_add(db_ptr + cols, tl.sum(dx, axis=0), mask=cmask, sem="relaxed")
        if LOW:  # tensor cores take dx in the input dtype
            dxo = dx.to(h_ptr.dtype.element_ty)
        else:
            dxo = dx
        for k0 in range(0, H, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < H
            if NEED_DH:
                wv = tl.load(w_ptr + cols[:, None] * stride_w + kk[None, :], mask=cmask[:, None] & kmask[None, :],
                             other=0.0)
                part = _mm(dxo, wv, tl.zeros([BM, BK], dtype=ACC), IEEE, ACC, UPCAST)
                tl.atomic_add(dh_ptr + rows[:, None] * H + kk[None, :], part, mask=rmask[:, None] & kmask[None, :],
                              sem="relaxed")
            if NEED_DW:
                hv = tl.load(h_ptr + rows[:, None] * stride_h + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                             other=0.0)
                part = _mm(tl.trans(dxo), hv, tl.zeros([BN, BK], dtype=ACC), IEEE, ACC, UPCAST)
                tl.atomic_add(dw_ptr + cols[:, None] * H + kk[None, :], part, mask=cmask[:, None] & kmask[None, :],
                              sem="relaxed")


@triton.jit
def _dh_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, ent_ptr, g_ptr, l_ptr, he_ptr, s_ptr, dh_ptr,
               N, V, H, stride_h, stride_w, ignore_index, inv_t, scale, cap, eps,
               HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_G: tl.constexpr, HAS_L: tl.constexpr,
               HAS_H: tl.constexpr, HAS_S: tl.constexpr, LOW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """Deterministic scheme, dhidden: one program per row block, vocabulary in order."""
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < N
    t, valid, lse, cp, g, he, ez, s = _row_coefs(rows, rmask, t_ptr, lse_ptr, ent_ptr, g_ptr, l_ptr, he_ptr, s_ptr,
                                                 ignore_index, HAS_G, HAS_L, HAS_H, HAS_S)
    for c0 in range(0, V, BN):
        cols = (c0 + tl.arange(0, BN)).to(tl.int64)
        cmask = cols < V
        z, dzdx = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w, inv_t, scale,
                              cap, HAS_BIAS, HAS_CAP, BM, BN, BK, IEEE, ACC, UPCAST)
        dx, keep = _dx_tile(z, dzdx, cols, cmask, t, valid, lse, cp, g, he, ez, s, eps, HAS_G, HAS_H, HAS_S)
        if keep:
            if LOW:
                dxo = dx.to(h_ptr.dtype.element_ty)
            else:
                dxo = dx
            for k0 in range(0, H, BK):
                kk = k0 + tl.arange(0, BK)
                kmask = kk < H
                wv = tl.load(w_ptr + cols[:, None] * stride_w + kk[None, :], mask=cmask[:, None] & kmask[None, :],
                             other=0.0)
                ptrs = dh_ptr + rows[:, None] * H + kk[None, :]
                omask = rmask[:, None] & kmask[None, :]
                acc = tl.load(ptrs, mask=omask, other=0.0)
                tl.store(ptrs, _mm(dxo, wv, acc, IEEE, ACC, UPCAST), mask=omask)


@triton.jit
def _dw_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, ent_ptr, g_ptr, l_ptr, he_ptr, s_ptr, dw_ptr, db_ptr,
               N, V, H, stride_h, stride_w, ignore_index, inv_t, scale, cap, eps,
               HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_G: tl.constexpr, HAS_L: tl.constexpr,
               HAS_H: tl.constexpr, HAS_S: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
               LOW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
               ACC: tl.constexpr, UPCAST: tl.constexpr):
    """Deterministic scheme, dW and dbias: one program per vocabulary tile, rows in order."""
    cols = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)
    cmask = cols < V
    db = tl.zeros([BN], dtype=ACC)
    for r0 in range(0, N, BM):
        rows = (r0 + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < N
        t, valid, lse, cp, g, he, ez, s = _row_coefs(rows, rmask, t_ptr, lse_ptr, ent_ptr, g_ptr, l_ptr, he_ptr,
                                                     s_ptr, ignore_index, HAS_G, HAS_L, HAS_H, HAS_S)
        z, dzdx = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w, inv_t, scale,
                              cap, HAS_BIAS, HAS_CAP, BM, BN, BK, IEEE, ACC, UPCAST)
        dx, keep = _dx_tile(z, dzdx, cols, cmask, t, valid, lse, cp, g, he, ez, s, eps, HAS_G, HAS_H, HAS_S)
        if keep:
            if NEED_DB:
                db += tl.sum(dx, axis=0)
            if NEED_DW:
                if LOW:
                    dxo = dx.to(h_ptr.dtype.element_ty)
                else:
                    dxo = dx
                for k0 in range(0, H, BK):
                    kk = k0 + tl.arange(0, BK)
                    kmask = kk < H
                    hv = tl.load(h_ptr + rows[:, None] * stride_h + kk[None, :],
                                 mask=rmask[:, None] & kmask[None, :], other=0.0)
                    ptrs = dw_ptr + cols[:, None] * H + kk[None, :]
                    omask = cmask[:, None] & kmask[None, :]
                    acc = tl.load(ptrs, mask=omask, other=0.0)
                    tl.store(ptrs, _mm(tl.trans(dxo), hv, acc, IEEE, ACC, UPCAST), mask=omask)
    if NEED_DB:
        tl.store(db_ptr + cols, db, mask=cmask)


# ---------------------------------------------------------------------------------------------
# launchers (the contract of flashloss/ops/token_logprobs.py)


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _config(kind: str, dtype: torch.dtype, h: int, arch: int = 90) -> dict:
    """Tile sizes and launch options of a kernel kind ('fwd', 'bwd', 'dh', 'dw') for compute
    capability `arch` (90 = H100). Chosen from offline compiles (registers and spills reported by
    ptxas for sm_90a and sm_80; tests/triton_compile.py), not from timings: no GPU was available."""
    if _interpret():
        return dict(BM=16, BN=16, BK=16)
    if dtype in (torch.bfloat16, torch.float16):
        bm, bn, bk, warps, stages = {"fwd": (128, 128, 32, 8, 3), "bwd": (128, 128, 32, 8, 3),
                                     "dh": (64, 128, 32, 8, 3), "dw": (128, 64, 32, 8, 3)}[kind]
        if kind == "bwd" and arch < 90:  # mma.sync keeps more in registers: 128 x 128 spills on sm_80
            bm = 64
    elif dtype == torch.float32:  # IEEE fp32 dots (FMA); 4 warps at 64 x 64 spill kilobytes
        bm, bn, bk, warps, stages = 64, 64, 32, 8, 2
    else:  # fp64
        bm, bn, bk, warps, stages = 64, 64, 16, 8, 2
    return dict(BM=bm, BN=bn, BK=min(bk, max(16, triton.next_power_of_2(h))), num_warps=warps, num_stages=stages)


def _arch(device) -> int:
    if _interpret():
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _common(spec, hidden) -> dict:
    return dict(inv_t=spec.inv_temperature, scale=spec.logit_scale, cap=spec.softcap or 1.0,
                HAS_CAP=bool(spec.softcap), IEEE=hidden.dtype in (torch.float32, torch.float64),
                ACC=tl.float64 if hidden.dtype == torch.float64 else tl.float32,
                UPCAST=_interpret() and hidden.dtype == torch.bfloat16)


def split_plan(v: int, bn: int, row_blocks: int, device) -> tuple[int, int]:
    """(splits, columns per split) of the forward; every split is non-empty and a multiple of BN
    columns but the last."""
    vocab_tiles = triton.cdiv(v, bn)
    if SPLITS is not None:
        splits = SPLITS
    elif _interpret():
        splits = 2  # exercise the merge on tiny shapes
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        # enough programs for two waves, and enough splits that a group of GROUP_M row blocks
        # finds 16 vocabulary ranges to share its hidden rows across
        splits = max(16, triton.cdiv(2 * sms, row_blocks))
    splits = max(1, min(int(splits), vocab_tiles))
    per_split = triton.cdiv(vocab_tiles, splits) * bn
    return triton.cdiv(v, per_split), per_split


def forward(spec, hidden, weight, bias, targets):
    n, h = hidden.shape
    v = weight.shape[0]
    acc = _acc_torch(hidden.dtype)
    dev = hidden.device
    want = {o: bool(spec.want & (1 << i)) for i, o in enumerate(_OUT)}
    outs = {o: empty(n if want[o] else 0, dtype=acc, device=dev) for o in _OUT}
    if n == 0:
        return tuple(outs[o] for o in _OUT)
    cfg = _config("fwd", hidden.dtype, h, _arch(dev))
    row_blocks = triton.cdiv(n, cfg["BM"])
    splits, per_split = split_plan(v, cfg["BN"], row_blocks, dev)
    part = torch.empty(6, splits, n, dtype=acc, device=dev)
    _fwd_kernel[(row_blocks * splits,)](
        hidden, weight, bias if bias is not None else hidden, targets, part, n, v, h, hidden.stride(0),
        weight.stride(0), row_blocks, splits, per_split, HAS_BIAS=bias is not None, WANT_ENT=want["entropy"],
        WANT_P2=want["log_sum_p2"], GROUP_M=GROUP_M, **cfg, **_common(spec, hidden))
    m, s, sz, s2, zs, zt = part.unbind(0)
    big = m.amax(0)
    w = torch.exp(m - big)
    s_tot = (s * w).sum(0)
    lse = big + torch.log(s_tot)
    valid = targets != spec.ignore_index
    res = {"lse": lse, "logp": zt.sum(0) - lse, "z_sum": zs.sum(0)}
    if want["entropy"]:
        res["entropy"] = lse - (sz * w).sum(0) / s_tot
    if want["log_sum_p2"]:
        res["log_sum_p2"] = torch.log((s2 * w * w).sum(0)) - 2.0 * torch.log(s_tot)
    for o in _OUT:
        if want[o]:
            torch.where(valid, res[o], torch.zeros((), dtype=acc, device=dev), out=outs[o])
    return tuple(outs[o] for o in _OUT)


def filter_on(dtype: torch.dtype) -> bool:
    env = os.environ.get("FLASHLOSS_TRITON_FILTER", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return dtype in (torch.bfloat16, torch.float16)


def filter_eps(dtype: torch.dtype) -> float:
    return float(FILTER_EPS) if FILTER_EPS is not None else torch.finfo(dtype).eps / 32


def deterministic() -> bool:
    if DETERMINISTIC is not None:
        return bool(DETERMINISTIC)
    env = os.environ.get("FLASHLOSS_TRITON_DETERMINISTIC", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return torch.are_deterministic_algorithms_enabled()


def _weighted_row_sum(x: torch.Tensor, w: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """sum_i w_i x_i in `acc`, upcasting at most ~16 MB of rows at a time."""
    out = torch.zeros(x.shape[1], dtype=acc, device=x.device)
    step = max(1, (1 << 22) // max(1, x.shape[1]))
    for r0 in range(0, x.shape[0], step):
        out += w[r0:r0 + step] @ x[r0:r0 + step].to(acc)
    return out


def backward(spec, hidden, weight, bias, targets, lse, entropy, g_logp, g_lse, g_ent, g_zsum, needs):
    n, h = hidden.shape
    v = weight.shape[0]
    acc = _acc_torch(hidden.dtype)
    dev = hidden.device
    need_dh, need_dw, need_db = needs
    dh = torch.zeros(n, h, dtype=acc, device=dev) if need_dh else None
    dw = torch.zeros(v, h, dtype=acc, device=dev) if need_dw else None
    db = torch.zeros(v, dtype=acc, device=dev) if need_db else None
    if n == 0 or not (need_dh or need_dw or need_db):
        return dh, dw, db
    has_g, has_l, has_h, has_s = (x.numel() > 0 for x in (g_logp, g_lse, g_ent, g_zsum))
    hoist_s = has_s and not spec.softcap  # rank-1 term, outside the tiles
    kernel_s = has_s and not hoist_s
    if has_g or has_l or has_h or kernel_s:
        eps = filter_eps(hidden.dtype) if filter_on(hidden.dtype) and not kernel_s else -1.0
        dummy = lse

        def opt(x):
            return x if x is not None and x.numel() else dummy

        args = (hidden, weight, bias if bias is not None else hidden, targets, lse, opt(entropy), opt(g_logp),
                opt(g_lse), opt(g_ent), opt(g_zsum))
        sizes = (n, v, h, hidden.stride(0), weight.stride(0))
        flags = dict(HAS_BIAS=bias is not None, HAS_G=has_g, HAS_L=has_l, HAS_H=has_h, HAS_S=kernel_s,
                     LOW=hidden.dtype in (torch.bfloat16, torch.float16), **_common(spec, hidden))
        if deterministic():
            if need_dh:
                cfg = _config("dh", hidden.dtype, h, _arch(dev))
                _dh_kernel[(triton.cdiv(n, cfg["BM"]),)](
                    *args, dh, *sizes, spec.ignore_index, eps=eps, **cfg, **flags)
            if need_dw or need_db:
                cfg = _config("dw", hidden.dtype, h, _arch(dev))
                _dw_kernel[(triton.cdiv(v, cfg["BN"]),)](
                    *args, dw if need_dw else dummy, db if need_db else dummy, *sizes, spec.ignore_index, eps=eps,
                    NEED_DW=need_dw, NEED_DB=need_db, **cfg, **flags)
        else:
            cfg = _config("bwd", hidden.dtype, h, _arch(dev))
            n_rb, n_vt = triton.cdiv(n, cfg["BM"]), triton.cdiv(v, cfg["BN"])
            _bwd_kernel[(n_rb * n_vt,)](
                *args, dh if need_dh else dummy, dw if need_dw else dummy, db if need_db else dummy, *sizes, n_rb,
                n_vt, spec.ignore_index, eps=eps, NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db,
                GROUP_M=GROUP_M, **cfg, **flags)
    if hoist_s:  # dz gets + s_i on every column; dz/dx = a/T
        sf = torch.where(targets != spec.ignore_index, g_zsum, 0.0) * (spec.logit_scale * spec.inv_temperature)
        if need_dh:
            dh.addr_(sf, weight.sum(0, dtype=acc))
        if need_dw:
            dw += _weighted_row_sum(hidden, sf, acc)[None, :]
        if need_db:
            db += sf.sum()
    return dh, dw, db
