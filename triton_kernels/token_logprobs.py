"""Triton kernels for primitive B (flashloss.ops.token_logprobs, backend 'triton'), CCE-style.

Tiling:
  _fwd_kernel  grid (row blocks of BM, vocabulary splits). Each program walks its split of the
               vocabulary in BN-column tiles; a tile of raw logits x = hidden W^T (+ bias) is built
               with tl.dot over H in BK chunks (fp32 accumulation; bf16/fp16 on tensor cores, fp32
               as IEEE fp32, fp64 as fp64), mapped to z (softcap / scale / temperature) and folded
               into online statistics per row kept in registers: running max m, sum e^{z-m}, sum
               e^{z-m} z (entropy), sum e^{2(z-m)} (log sum p^2), sum z, and the target logit
               (picked up in the tile that holds the target column). Each split writes its six
               partial statistics ([6, splits, N], O(N * splits)); a few torch ops merge them. The
               vocabulary is split so that small-N problems still fill the GPU (N = 16384 rows at
               BM = 64 are only 256 row blocks).
  _bwd_kernel  grid (row blocks, vocabulary tiles): recomputes the tile, forms
               dz = p (l - g) - h p (z - E_p z) + g onehot + s and dx = dz dz/dx in registers, then
               accumulates dhidden += dx W_tile and dW_tile += dx^T hidden_rows over H in BK chunks
               and dbias += column sums, with fp32 (fp64) atomic adds into the accumulators. Not
               bitwise deterministic (atomic order); a deterministic mode is issue #9's.
  Filter (CCE): in backward a tile whose softmax values are all below `eps` and that holds no
  target column contributes only the s * 1 term (z_sum upstream); without that term it is skipped
  entirely. On by default for bf16/fp16 inputs (eps = 2^-12, below their resolution relative to
  1), off for fp32/fp64 (exact); FLASHLOSS_TRITON_FILTER=0 switches it off, =1 forces it on.
Saved for backward: the [N] LSE (and entropy); nothing N x V. FLOPs: forward 2NHV, backward
2NHV recompute + 4NHV (dhidden, dW) = 8NHV in all. Bytes: hidden and W are re-read once per
tile row / column of the grid (N/BM reads of W, V/BN reads of hidden per pass).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from flashloss._debug import empty

_OUT = ("logp", "lse", "entropy", "z_sum", "log_sum_p2")


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w, inv_t, scale, cap,
                HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
                ACC: tl.constexpr, UPCAST: tl.constexpr):
    """z of the tile rows x cols (0 outside the problem) and dz/dx."""
    rmask = rows < N
    cmask = cols < V
    x = tl.zeros([rows.shape[0], cols.shape[0]], dtype=ACC)
    for k0 in range(0, H, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(h_ptr + rows[:, None] * stride_h + kk[None, :], mask=rmask[:, None] & (kk[None, :] < H), other=0.0)
        b = tl.load(w_ptr + cols[:, None] * stride_w + kk[None, :], mask=cmask[:, None] & (kk[None, :] < H), other=0.0)
        if UPCAST:  # the Triton interpreter computes 16-bit dots wrongly: give it fp32
            a = a.to(ACC)
            b = b.to(ACC)
        if IEEE:
            x += tl.dot(a, tl.trans(b), input_precision="ieee", out_dtype=ACC)
        else:
            x += tl.dot(a, tl.trans(b), out_dtype=ACC)
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
def _fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, part_ptr, N, V, H, stride_h, stride_w, v_per_split, SPLITS,
                inv_t, scale, cap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, WANT_ENT: tl.constexpr,
                WANT_P2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
                ACC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
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
        cols = c0 + tl.arange(0, BN)
        cmask = cols < v_hi
        z, _ = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w, inv_t, scale, cap,
                           HAS_BIAS, HAS_CAP, BK, IEEE, ACC, UPCAST)
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
    base = part_ptr + split * N + rows
    stride = SPLITS * N
    tl.store(base, m, mask=rmask)
    tl.store(base + stride, s, mask=rmask)
    tl.store(base + 2 * stride, sz, mask=rmask)
    tl.store(base + 3 * stride, s2, mask=rmask)
    tl.store(base + 4 * stride, zs, mask=rmask)
    tl.store(base + 5 * stride, zt, mask=rmask)


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, ent_ptr, g_ptr, l_ptr, he_ptr, s_ptr, dh_ptr, dw_ptr, db_ptr,
                N, V, H, stride_h, stride_w, ignore_index, inv_t, scale, cap, eps,
                HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_G: tl.constexpr, HAS_L: tl.constexpr,
                HAS_H: tl.constexpr, HAS_S: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
                NEED_DB: tl.constexpr, FILTER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                LOW: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < N
    cmask = cols < V
    t = tl.load(t_ptr + rows, mask=rmask, other=ignore_index)
    valid = rmask & (t != ignore_index)
    live = valid[:, None] & cmask[None, :]
    z, dzdx = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w, inv_t, scale, cap,
                          HAS_BIAS, HAS_CAP, BK, IEEE, ACC, UPCAST)
    lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
    p = tl.where(live, tl.exp(z - lse[:, None]), 0.0)  # ignored rows have lse = 0: never used
    is_t = (cols[None, :] == t[:, None]) & live
    keep = True
    if FILTER:
        if not HAS_S:
            keep = (tl.max(tl.max(p, axis=1), axis=0) >= eps) | (tl.max(tl.max(is_t.to(tl.int32), axis=1), axis=0) > 0)
    if keep:
        coef = tl.zeros([BM], dtype=ACC)
        if HAS_L:
            coef += tl.load(l_ptr + rows, mask=valid, other=0.0)
        if HAS_G:
            g = tl.load(g_ptr + rows, mask=valid, other=0.0)
            coef -= g
        dz = p * coef[:, None]
        if HAS_H:
            he = tl.load(he_ptr + rows, mask=valid, other=0.0)
            ez = lse - tl.load(ent_ptr + rows, mask=valid, other=0.0)
            dz -= (he[:, None] * p) * (z - ez[:, None])
        if HAS_G:
            dz += tl.where(is_t, g[:, None], 0.0)
        if HAS_S:
            dz += tl.where(live, tl.load(s_ptr + rows, mask=valid, other=0.0)[:, None], 0.0)
        dx = tl.where(live, dz * dzdx, 0.0)
        if NEED_DB:
            tl.atomic_add(db_ptr + cols, tl.sum(dx, axis=0), mask=cmask)
        if LOW:  # tensor cores take dx in the input dtype (CCE does the same)
            dxo = dx.to(h_ptr.dtype.element_ty)
        else:
            dxo = dx
        for k0 in range(0, H, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < H
            if NEED_DH:
                wv = tl.load(w_ptr + cols[:, None] * stride_w + kk[None, :], mask=cmask[:, None] & kmask[None, :],
                             other=0.0)
                if UPCAST:
                    wv = wv.to(ACC)
                if IEEE:
                    part = tl.dot(dxo, wv, input_precision="ieee", out_dtype=ACC)
                else:
                    part = tl.dot(dxo, wv, out_dtype=ACC)
                tl.atomic_add(dh_ptr + rows[:, None] * H + kk[None, :], part, mask=rmask[:, None] & kmask[None, :])
            if NEED_DW:
                hv = tl.load(h_ptr + rows[:, None] * stride_h + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                             other=0.0)
                if UPCAST:
                    hv = hv.to(ACC)
                if IEEE:
                    part = tl.dot(tl.trans(dxo), hv, input_precision="ieee", out_dtype=ACC)
                else:
                    part = tl.dot(tl.trans(dxo), hv, out_dtype=ACC)
                tl.atomic_add(dw_ptr + cols[:, None] * H + kk[None, :], part, mask=cmask[:, None] & kmask[None, :])


def _acc(x):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _blocks(h: int, device) -> tuple[int, int, int]:
    if _interpret():
        return 16, 16, 16
    bk = 64 if h >= 64 else max(16, triton.next_power_of_2(h))
    return 64, 128, bk


def _filter_on(dtype: torch.dtype) -> bool:
    env = os.environ.get("FLASHLOSS_TRITON_FILTER", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return dtype in (torch.bfloat16, torch.float16)


FILTER_EPS = 2.0 ** -12


def _common(spec, hidden):
    return dict(inv_t=spec.inv_temperature, scale=spec.logit_scale, cap=spec.softcap or 1.0,
                HAS_CAP=bool(spec.softcap), IEEE=hidden.dtype == torch.float32, ACC=_acc(hidden),
                UPCAST=_interpret())


def forward(spec, hidden, weight, bias, targets):
    n, h = hidden.shape
    v = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    dev = hidden.device
    want = {o: bool(spec.want & (1 << i)) for i, o in enumerate(_OUT)}
    outs = {o: empty(n if want[o] else 0, dtype=acc, device=dev) for o in _OUT}
    if n == 0:
        return tuple(outs[o] for o in _OUT)
    bm, bn, bk = _blocks(h, dev)
    row_blocks = triton.cdiv(n, bm)
    vocab_tiles = triton.cdiv(v, bn)
    if _interpret():
        splits = min(2, vocab_tiles)  # exercise the merge on tiny shapes
    else:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        splits = max(1, min(vocab_tiles, triton.cdiv(4 * sms, row_blocks)))
    v_per_split = triton.cdiv(vocab_tiles, splits) * bn
    splits = triton.cdiv(v, v_per_split)
    part = torch.empty(6, splits, n, dtype=acc, device=dev)
    b = bias if bias is not None else hidden  # dummy pointer when HAS_BIAS is False
    _fwd_kernel[(row_blocks, splits)](
        hidden, weight, b, targets, part, n, v, h, hidden.stride(0), weight.stride(0), v_per_split, splits,
        HAS_BIAS=bias is not None, WANT_ENT=want["entropy"], WANT_P2=want["log_sum_p2"], BM=bm, BN=bn, BK=bk,
        **_common(spec, hidden))
    m, s, sz, s2, zs, zt = part.unbind(0)
    big = m.amax(0)
    w = torch.exp(m - big)  # empty splits have m = -inf: weight 0
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


def backward(spec, hidden, weight, bias, targets, lse, entropy, g_logp, g_lse, g_ent, g_zsum, needs):
    n, h = hidden.shape
    v = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    dev = hidden.device
    need_dh, need_dw, need_db = needs
    dh = torch.zeros(n, h, dtype=acc, device=dev) if need_dh else None
    dw = torch.zeros(v, h, dtype=acc, device=dev) if need_dw else None
    db = torch.zeros(v, dtype=acc, device=dev) if need_db else None
    if n == 0 or not (need_dh or need_dw or need_db):
        return dh, dw, db
    bm, bn, bk = _blocks(h, dev)
    dummy = lse

    def opt(x):
        return x if x is not None and x.numel() else dummy

    _bwd_kernel[(triton.cdiv(n, bm), triton.cdiv(v, bn))](
        hidden, weight, bias if bias is not None else hidden, targets, lse, opt(entropy), opt(g_logp), opt(g_lse),
        opt(g_ent), opt(g_zsum), dh if dh is not None else dummy, dw if dw is not None else dummy,
        db if db is not None else dummy, n, v, h, hidden.stride(0), weight.stride(0), spec.ignore_index,
        eps=FILTER_EPS, HAS_BIAS=bias is not None, HAS_G=g_logp.numel() > 0, HAS_L=g_lse.numel() > 0,
        HAS_H=g_ent.numel() > 0, HAS_S=g_zsum.numel() > 0, NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db,
        FILTER=_filter_on(hidden.dtype), BM=bm, BN=bn, BK=bk,
        LOW=hidden.dtype in (torch.bfloat16, torch.float16) and not _interpret(), **_common(spec, hidden))
    return dh, dw, db
