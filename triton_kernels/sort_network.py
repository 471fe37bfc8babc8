"""Triton kernels for primitive C (flashloss.ops.sort_network, backend 'triton').

Notation: B rows, n elements per row, C comparators in L layers (odd-even: C = n(n-1)/2, L = n;
bitonic: C <= N log2(N)(log2(N)+1)/4 with N = 2^ceil(log2 n), L = log2(N)(log2(N)+1)/2), g columns
of the position weights W; BN = next_pow2(n) slot lanes, BG = next_pow2(g); ROWS rows per program;
b = bytes of the accumulation dtype (4, or 8 for fp64 inputs).

Tiling: one program per block of ROWS rows, everything of a row on chip. The values live in a
[ROWS, BN] register tile whose lanes are the schedule's slots (ops/sort_schedule.py), P in a
[ROWS, BN, BN] tile (rows = input element, lanes = slot), the PW sweep state V and its adjoint U in
[ROWS, BN, BG] tiles. A layer is applied to every slot at once as a gather over the slot axis: the
host compiles the schedule into two int32 tables of shape [L, BN] (cached per schedule and device):
  partner[l, s]  the other slot of s's comparator in layer l (s itself when s is idle or padding)
  comp[l, s]     2c if s is the min slot (pairs[c, 0]) of comparator c, 2c + 1 if the max slot, -1
and a rank table rank[s] (the output position that slot s reads out; the inverse of out_slot).
Per layer, with own = t[s] and p = tl.gather(t, partner[l]) along the slot axis:
  d = b - a = (p - own) on a min lane, (own - p) on a max lane  (the same two operands: the two
      lanes of a comparator compute bit-identical alpha)
  t' = alpha * own + (1 - alpha) * p  on every lane (min: alpha a + (1-alpha) b; max: alpha b +
      (1-alpha) a; idle lanes have p = own and keep their value whatever alpha is).
The same update mixes P's slot columns, V's and U's slot rows, and the adjoints. No branches, no
per-comparator loops; the layer loop is a runtime loop over the table rows (L1/L2 resident).
tl.gather lowers to warp shuffles when the slot axis sits inside a warp, else through shared memory.

Forward (_fwd_kernel): values (and P) in registers through all layers; alpha of comparator c is
  stored by its min lane to alpha[b, c]. Outputs are written in output order through rank (the
  out_slot gather of the torch backend becomes a scatter on store). PW: after the layer loop, a
  block barrier, then V <- W moved to the slots (V[s] = W[rank[s]]) is swept from the last layer
  to the first reading alpha back from the alpha output (OBJECTIVES.md §4.5: P W = M_1 ... M_L W_s);
  V ends in input order and is PW. The barrier makes the alpha stores of all the program's threads
  visible to its loads (bar.sync orders global memory within a CTA). PW is not formed from P: the
  sweep costs O(n g L) instead of O(n^2 L + n^2 g) and needs no P tile, so PW works up to
  MAX_N elements.
Backward (_bwd_kernel): recomputes from x and the saved alpha, in three phases separated by block
  barriers, the tapes going through a global scratch that only the program's own rows touch:
  1. (PW upstream) V sweep from the last layer to the first (alpha read from the input), storing
     vd[c, :] = V[a] - V[b] at each comparator (C * g per row).
  2. Forward layer loop rebuilding the values (tape amb[c] = a - b, C per row), P (tape
     pd[c, :] = P[:, a] - P[:, b], C * n per row; only with a P upstream) and the U sweep
     U <- g_PW, U' = M_l U, adding sum_j (U[a] - U[b]) vd[c, j] to dalpha (tape dpw[c], C per row).
     U after the last layer is dL/dW_s: g_W[rank[s]] = U[s] (per-row W), or summed over the
     program's rows into a per-program partial that torch sums (shared W; deterministic).
  3. Reverse layer loop on the value adjoint gv (and G = dL/dP in slot columns): dalpha = dpw +
     (gv[a] - gv[b]) amb + sum_r (G[r, a] - G[r, b]) pd[c, r]; gv, G mix like the values; the
     chain relax'(d) dalpha goes to gv[b] (+) and gv[a] (-). gv ends in input order: g_x.
  Scratch: C * (1 + [PW] (1 + g) + [P] n) elements of b bytes per row, for at most
  max(ROWS, SCRATCH_ELEMS / that) rows at a time: the wrapper launches the kernel on row chunks and
  reuses one buffer (bounded memory: SCRATCH_ELEMS * b = 128 MB fp32 by default, whatever B is).
Saved for backward (by the op): x, W and alpha [B, C]; nothing of size n^2 or L n.

Cost per row (one comparator = one alpha, two mixes; FLOPs counted as one per add / multiply,
relaxation ~10-30 FLOPs): values ~6C + C * relax, P 3 n C (the tile form mixes every lane of every
layer: 3 n BN L), PW 3 g C (tile form 3 BN BG L). Backward: values ~12C + C * (relax + relax'),
P 8 n C (recompute 3 n C, tape difference n C, reverse 4 n C), PW 9 g C. The kernels are
latency-bound (L dependent steps of a gather and a few FMAs on a small tile), not FLOP-bound.
Bytes per row (HBM): forward reads n (x) [+ n g W] and writes n + C [+ n^2 P] [+ n g PW]; backward
reads n + C + the upstreams (n, n^2, n g) [+ n g W] and writes n [+ n g g_W], plus the scratch
tapes written once and read once (2 C (1 + [PW](1 + g) + [P] n) b; mostly L2-resident for small
chunks). The schedule tables (2 L BN int32) are shared by all programs and stay in L1/L2.

Limits: n <= MAX_N (256) slot lanes for values and PW with BN * BG <= MAX_VG (2048); P needs
n <= MAX_N_P (64, 32 for fp64: a [64, 64] P tile per row, plus G and the P tape tile in the backward).
Beyond a limit the call runs the torch backend's implementation (same contract, same numbers to
rounding) instead of failing, so `auto` (triton first on CUDA) always works; `supports(n, want_P,
g)` tells which path a call takes. Arithmetic is fp32 (fp64 for fp64 inputs); x may be bf16/fp16
(loaded and upcast in registers). steepness and art_lambda arrive as fp64 scalars and are cast to
the accumulation dtype in the kernel (an fp32 kernel argument would round them for fp64 inputs).
Relaxations: atan is Cephes' (atanf for fp32, the rational atan for fp64) and pow is exp(lam log r),
written in Triton so that the interpreter runs the same code as the GPU (it has no libdevice).
Tiles: ROWS from a register budget of ~4096 elements per program (2048 fp64) and at least ~2
programs per SM; num_warps from the tile size. Chosen from offline sm_90a compiles (registers and
spills, tests/triton_compile.py), not from timings: no GPU was available when this was written.
The interpreter uses ROWS = 2 so tiny test batches cross row blocks.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from flashloss._debug import empty

MAX_N = 256  # slot lanes of the values / PW paths (n = 512 spills at sm_90a; tests/triton_compile.py)
MAX_N_P = 64  # P on chip (fp64: 32, where n = 64 spills)
MAX_VG = 2048  # BN * BG of the V / U tiles
SCRATCH_ELEMS = 1 << 25  # backward tape budget per launch (elements of the accumulation dtype)
ROWS: int | None = None  # rows per program; None = _config's choice (tests may pin it)

def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# device functions


@triton.jit
def _atan(x, IS64: tl.constexpr):
    """atan(x) (Cephes: atanf for fp32, ~2 ulp; the P/Q rational atan for fp64, ~1 ulp)."""
    ax = tl.abs(x)
    zero = tl.zeros_like(ax)
    if IS64:
        big = ax > 2.41421356237309504880  # tan(3 pi / 8)
        mid = ax > 0.66
        t = tl.where(big, -1.0 / tl.where(big, ax, zero + 1.0), tl.where(mid, (ax - 1.0) / (ax + 1.0), ax))
        y0 = tl.where(big, zero + 1.57079632679489661923, tl.where(mid, zero + 0.78539816339744830962, zero))
        more = tl.where(big, zero + 6.123233995736765886130e-17,
                        tl.where(mid, zero + 3.061616997868382943065e-17, zero))
        z = t * t
        p = (((-8.750608600031904122785e-1 * z - 1.615753718733365076637e1) * z - 7.500855792314704667340e1) * z
             - 1.228866684490136173410e2) * z - 6.485021904942025371773e1
        q = ((((z + 2.485846490142306297962e1) * z + 1.650270098316988542046e2) * z + 4.328810604912902668951e2) * z
             + 4.853903996359136964868e2) * z + 1.945506571482613964425e2
        r = y0 + ((t * (z * p / q) + t) + more)
    else:
        big = ax > 2.414213562373095
        mid = ax > 0.4142135623730950
        t = tl.where(big, -1.0 / tl.where(big, ax, zero + 1.0), tl.where(mid, (ax - 1.0) / (ax + 1.0), ax))
        y0 = tl.where(big, zero + 1.5707963267948966, tl.where(mid, zero + 0.7853981633974483, zero))
        z = t * t
        r = y0 + ((((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * t
                  + t)
    return tl.where(x < 0, -r, r)


@triton.jit
def _alpha(d, st, lam, RELAX: tl.constexpr, IS64: tl.constexpr):
    """ops.sort_network.relax_alpha for d = b - a (0 logistic, 1 logistic_phi, 2 gaussian,
    3 reciprocal, 4 cauchy, 5 optimal)."""
    if RELAX == 0:
        a = tl.sigmoid(d * st)
    elif RELAX == 1:
        a = tl.sigmoid(d * st / tl.exp(lam * tl.log(tl.abs(d) + 1e-10)))
    elif RELAX == 2:
        a = 0.5 + 0.5 * tl.math.erf(d / (1.0 / st) / 1.4142135623730951)
    elif RELAX == 3:
        v = st * d
        a = 0.5 * (v / (2.0 + tl.abs(v)) + 1.0)
    elif RELAX == 4:
        a = 0.3183098861837907 * _atan(st * d, IS64) + 0.5
    else:
        v = st * d
        step = (v > 0.25).to(d.dtype) - (v < -0.25).to(d.dtype)
        a = tl.minimum(tl.maximum(v, -0.25), 0.25) + 0.5 + step * (0.25 - 0.0625 / (tl.abs(v) + 1e-10))
    return a


@triton.jit
def _dalpha(d, alpha, st, lam, RELAX: tl.constexpr):
    """ops.sort_network.relax_dalpha: d alpha / d d (steepness included)."""
    if RELAX == 0:
        r = st * alpha * (1.0 - alpha)
    elif RELAX == 1:
        rr = tl.abs(d) + 1e-10
        r = alpha * (1.0 - alpha) * st * tl.exp((-lam - 1.0) * tl.log(rr)) * (rr - lam * tl.abs(d))
    elif RELAX == 2:
        v = st * d
        r = st * tl.exp(-0.5 * v * v) / 2.5066282746310002
    elif RELAX == 3:
        v = st * d
        w = 2.0 + tl.abs(v)
        r = st / (w * w)
    elif RELAX == 4:
        v = st * d
        r = st / (3.141592653589793 * (1.0 + v * v))
    else:
        v = tl.abs(st * d)
        w = v + 1e-10
        r = tl.where(v <= 0.25, tl.zeros_like(v) + st, st / (16.0 * (w * w)))
    return r


@triton.jit
def _scalars(steepness, art_lambda, ACC: tl.constexpr):
    """The fp64 scalar arguments in the accumulation dtype. (Under the interpreter they are Python
    floats, which fp64 arithmetic takes at full precision.)"""
    if ACC == tl.float64:  # Python floats would enter the helpers as fp32 under the interpreter
        st = tl.full([1], steepness, tl.float64)
        lam = tl.full([1], art_lambda, tl.float64)
    else:
        st = tl.cast(steepness, tl.float32)
        lam = tl.cast(art_lambda, tl.float32)
    return st, lam


@triton.jit
def _layer(tab_ptr, comp_ptr, l, s, BN: tl.constexpr):
    """Partner slot, comparator index, min-lane and active-lane masks of layer l for lanes s."""
    part = tl.load(tab_ptr + l * BN + s)
    comp = tl.load(comp_ptr + l * BN + s)
    active = comp >= 0
    is_min = active & ((comp & 1) == 0)
    return part, comp >> 1, is_min, active


@triton.jit
def _gather2(t, part, ROWS: tl.constexpr, BN: tl.constexpr):
    """t[:, part] for t [ROWS, BN]."""
    return tl.gather(t, tl.broadcast_to(part[None, :], (ROWS, BN)), 1)


@triton.jit
def _gather_cols(t, part, ROWS: tl.constexpr, BN: tl.constexpr):
    """t[:, :, part] for t [ROWS, BN, BN] (P's slot columns)."""
    return tl.gather(t, tl.broadcast_to(part[None, None, :], (ROWS, BN, BN)), 2)


@triton.jit
def _gather_rows(t, part, ROWS: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr):
    """t[:, part, :] for t [ROWS, BN, BG] (V's / U's slot rows)."""
    return tl.gather(t, tl.broadcast_to(part[None, :, None], (ROWS, BN, BG)), 1)


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _fwd_kernel(x_ptr, tab_ptr, comp_ptr, rank_ptr, alpha_ptr, out_ptr, p_ptr, pw_ptr, w_ptr,
                B, n, C, L, g, stride_wb, steepness: tl.float64, art_lambda: tl.float64,
                RELAX: tl.constexpr, WANT_P: tl.constexpr, WANT_W: tl.constexpr, ROWS: tl.constexpr,
                BN: tl.constexpr, BG: tl.constexpr, ACC: tl.constexpr):
    IS64: tl.constexpr = ACC == tl.float64
    st, lam = _scalars(steepness, art_lambda, ACC)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    rows = rows.to(tl.int64)
    s = tl.arange(0, BN)
    smask = s < n
    m2 = rmask[:, None] & smask[None, :]
    vals = tl.load(x_ptr + rows[:, None] * n + s[None, :], mask=m2, other=0.0).to(ACC)
    if WANT_P:
        eye = (s[:, None] == s[None, :]).to(ACC)
        P = tl.broadcast_to(eye[None, :, :], (ROWS, BN, BN))
    for l in range(L):
        part, c, is_min, active = _layer(tab_ptr, comp_ptr, l, s, BN)
        pv = _gather2(vals, part, ROWS, BN)
        d = tl.where(is_min[None, :], pv - vals, vals - pv)
        alpha = _alpha(d, st, lam, RELAX, IS64)
        tl.store(alpha_ptr + rows[:, None] * C + c[None, :], alpha, mask=rmask[:, None] & is_min[None, :])
        if WANT_P:
            pp = _gather_cols(P, part, ROWS, BN)
            al = alpha[:, None, :]
            P = al * P + (1.0 - al) * pp
        vals = alpha * vals + (1.0 - alpha) * pv
    rank = tl.load(rank_ptr + s)
    tl.store(out_ptr + rows[:, None] * n + rank[None, :], vals, mask=m2)
    if WANT_P:
        m3 = rmask[:, None, None] & smask[None, :, None] & smask[None, None, :]
        tl.store(p_ptr + rows[:, None, None] * n * n + s[None, :, None] * n + rank[None, None, :], P, mask=m3)
    if WANT_W:
        tl.debug_barrier()  # the alpha stores above, by every thread, before the loads below
        j = tl.arange(0, BG)
        mw = rmask[:, None, None] & smask[None, :, None] & (j < g)[None, None, :]
        V = tl.load(w_ptr + rows[:, None, None] * stride_wb + rank[None, :, None] * g + j[None, None, :], mask=mw,
                    other=0.0)
        for k in range(L):
            part, c, is_min, active = _layer(tab_ptr, comp_ptr, L - 1 - k, s, BN)
            al = tl.load(alpha_ptr + rows[:, None] * C + c[None, :], mask=rmask[:, None] & active[None, :],
                         other=0.5)[:, :, None]
            V = al * V + (1.0 - al) * _gather_rows(V, part, ROWS, BN, BG)
        tl.store(pw_ptr + rows[:, None, None] * n * g + s[None, :, None] * g + j[None, None, :], V, mask=mw)


@triton.jit
def _bwd_kernel(x_ptr, alpha_ptr, tab_ptr, comp_ptr, rank_ptr, gs_ptr, gp_ptr, gpw_ptr, w_ptr, gx_ptr, gw_ptr,
                amb_ptr, dpw_ptr, vd_ptr, pd_ptr, row0, blk0, B, n, C, L, g, stride_wb,
                steepness: tl.float64, art_lambda: tl.float64, RELAX: tl.constexpr, HAS_GS: tl.constexpr,
                WANT_P: tl.constexpr, WANT_W: tl.constexpr, NEED_W: tl.constexpr, SHARED_W: tl.constexpr,
                ROWS: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, ACC: tl.constexpr):
    st, lam = _scalars(steepness, art_lambda, ACC)
    lr = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # row within this launch (scratch row)
    rows = row0 + lr
    rmask = rows < B
    rows = rows.to(tl.int64)
    lr = lr.to(tl.int64)
    s = tl.arange(0, BN)
    smask = s < n
    m2 = rmask[:, None] & smask[None, :]
    rank = tl.load(rank_ptr + s)
    j = tl.arange(0, BG)
    jmask = j < g
    mw = rmask[:, None, None] & smask[None, :, None] & jmask[None, None, :]
    # ---- phase 1: V sweep (last layer to first), tape vd[c, :] = V[a] - V[b]
    if WANT_W:
        V = tl.load(w_ptr + rows[:, None, None] * stride_wb + rank[None, :, None] * g + j[None, None, :], mask=mw,
                    other=0.0)
        for k in range(L):
            part, c, is_min, active = _layer(tab_ptr, comp_ptr, L - 1 - k, s, BN)
            al = tl.load(alpha_ptr + rows[:, None] * C + c[None, :], mask=rmask[:, None] & active[None, :],
                         other=0.5)[:, :, None]
            vp = _gather_rows(V, part, ROWS, BN, BG)
            tl.store(vd_ptr + lr[:, None, None] * C * g + c[None, :, None] * g + j[None, None, :], V - vp,
                     mask=rmask[:, None, None] & is_min[None, :, None] & jmask[None, None, :])
            V = al * V + (1.0 - al) * vp
        tl.debug_barrier()
    # ---- phase 2: forward layer loop: tapes amb, pd, dpw; the U sweep
    vals = tl.load(x_ptr + rows[:, None] * n + s[None, :], mask=m2, other=0.0).to(ACC)
    if WANT_P:
        eye = (s[:, None] == s[None, :]).to(ACC)
        P = tl.broadcast_to(eye[None, :, :], (ROWS, BN, BN))
    if WANT_W:
        U = tl.load(gpw_ptr + rows[:, None, None] * n * g + s[None, :, None] * g + j[None, None, :], mask=mw,
                    other=0.0)
    for l in range(L):
        part, c, is_min, active = _layer(tab_ptr, comp_ptr, l, s, BN)
        mmin = rmask[:, None] & is_min[None, :]
        alpha = tl.load(alpha_ptr + rows[:, None] * C + c[None, :], mask=rmask[:, None] & active[None, :], other=0.5)
        pv = _gather2(vals, part, ROWS, BN)
        tl.store(amb_ptr + lr[:, None] * C + c[None, :], vals - pv, mask=mmin)
        if WANT_P:
            pp = _gather_cols(P, part, ROWS, BN)
            tl.store(pd_ptr + lr[:, None, None] * C * n + c[None, None, :] * n + s[None, :, None], P - pp,
                     mask=mmin[:, None, :] & smask[None, :, None])
            al = alpha[:, None, :]
            P = al * P + (1.0 - al) * pp
        if WANT_W:
            up = _gather_rows(U, part, ROWS, BN, BG)
            vd = tl.load(vd_ptr + lr[:, None, None] * C * g + c[None, :, None] * g + j[None, None, :],
                         mask=mmin[:, :, None] & jmask[None, None, :], other=0.0)
            tl.store(dpw_ptr + lr[:, None] * C + c[None, :], tl.sum((U - up) * vd, axis=2), mask=mmin)
            al = alpha[:, :, None]
            U = al * U + (1.0 - al) * up
        vals = alpha * vals + (1.0 - alpha) * pv
    if NEED_W:  # U = dL/dW_s: slot s holds output position rank[s]
        if SHARED_W:
            part_w = tl.sum(tl.where(rmask[:, None, None], U, 0.0), axis=0)
            blk = (blk0 + tl.program_id(0)).to(tl.int64)
            tl.store(gw_ptr + blk * n * g + rank[:, None] * g + j[None, :], part_w,
                     mask=smask[:, None] & jmask[None, :])
        else:
            tl.store(gw_ptr + rows[:, None, None] * n * g + rank[None, :, None] * g + j[None, None, :], U, mask=mw)
    tl.debug_barrier()
    # ---- phase 3: reverse layer loop on the adjoints
    if HAS_GS:
        gv = tl.load(gs_ptr + rows[:, None] * n + rank[None, :], mask=m2, other=0.0)
    else:
        gv = tl.zeros([ROWS, BN], dtype=ACC)
    if WANT_P:
        m3 = rmask[:, None, None] & smask[None, :, None] & smask[None, None, :]
        G = tl.load(gp_ptr + rows[:, None, None] * n * n + s[None, :, None] * n + rank[None, None, :], mask=m3,
                    other=0.0)
    for k in range(L):
        part, c, is_min, active = _layer(tab_ptr, comp_ptr, L - 1 - k, s, BN)
        mact = rmask[:, None] & active[None, :]
        alpha = tl.load(alpha_ptr + rows[:, None] * C + c[None, :], mask=mact, other=0.5)
        amb = tl.load(amb_ptr + lr[:, None] * C + c[None, :], mask=mact, other=0.0)
        gvp = _gather2(gv, part, ROWS, BN)
        da = tl.where(is_min[None, :], gv - gvp, gvp - gv) * amb  # (g'_min - g'_max)(a - b)
        if WANT_W:
            da += tl.load(dpw_ptr + lr[:, None] * C + c[None, :], mask=mact, other=0.0)
        if WANT_P:
            gp = _gather_cols(G, part, ROWS, BN)
            pd = tl.load(pd_ptr + lr[:, None, None] * C * n + c[None, None, :] * n + s[None, :, None],
                         mask=mact[:, None, :] & smask[None, :, None], other=0.0)
            da += tl.sum(tl.where(is_min[None, None, :], G - gp, gp - G) * pd, axis=1)
            al = alpha[:, None, :]
            G = al * G + (1.0 - al) * gp
        gv = alpha * gv + (1.0 - alpha) * gvp
        chain = tl.where(mact, _dalpha(-amb, alpha, st, lam, RELAX) * da, 0.0)
        gv += tl.where(is_min[None, :], -chain, chain)
    tl.store(gx_ptr + rows[:, None] * n + s[None, :], gv, mask=m2)


# ---------------------------------------------------------------------------------------------
# launchers (the backend contract of flashloss/ops/sort_network.py)

_TABLES: dict = {}


def _tables(sched, bn: int, device):
    """(partner [L', BN], comp [L', BN], rank [BN]) int32 on `device`, L' = max(L, 1)."""
    key = (sched.network, sched.n, sched.padding, bn, str(device))
    hit = _TABLES.get(key)
    if hit is None:
        pairs = sched.pairs.cpu().long()
        ptr = sched.layer_ptr.cpu().tolist()
        nl = len(ptr) - 1
        partner = torch.arange(bn, dtype=torch.int64).repeat(max(nl, 1), 1)
        comp = torch.full((max(nl, 1), bn), -1, dtype=torch.int64)
        for l in range(nl):
            c = torch.arange(ptr[l], ptr[l + 1])
            i, j = pairs[c, 0], pairs[c, 1]
            partner[l, i], partner[l, j] = j, i
            comp[l, i], comp[l, j] = 2 * c, 2 * c + 1
        rank = torch.arange(bn, dtype=torch.int64)
        rank[sched.out_slot.cpu().long()] = torch.arange(sched.n)
        hit = tuple(t.to(torch.int32).to(device).contiguous() for t in (partner, comp, rank))
        _TABLES[key] = hit
    return hit


def supports(n: int, want_P: bool, g: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether a call with these sizes runs the Triton kernels (else the torch implementation)."""
    bn = triton.next_power_of_2(max(n, 2))
    bg = triton.next_power_of_2(g) if g else 1
    max_p = MAX_N_P // 2 if dtype == torch.float64 else MAX_N_P
    return bn <= MAX_N and (not want_P or bn <= max_p) and (not g or bn * bg <= MAX_VG)


def _config(kind: str, n: int, want_P: bool, g: int, dtype: torch.dtype, bsz: int, sms: int) -> dict:
    """Rows per program, lane blocks and warps of kernel `kind` ('fwd' | 'bwd') for a launch over
    bsz rows on a GPU with `sms` multiprocessors."""
    bn = triton.next_power_of_2(max(n, 2))
    bg = triton.next_power_of_2(g) if g else 1
    per_row = bn * (1 + (bn if want_P else 0) + (bg if g else 0))
    if ROWS is not None:
        rows = ROWS
    elif _interpret():
        rows = 2
    else:
        budget = (2048 if dtype == torch.float64 else 4096) // (2 if kind == "bwd" else 1)
        rows = max(1, min(64, budget // per_row))
        rows = max(1, min(rows, triton.cdiv(bsz, 2 * sms)))
        rows = 1 << (rows.bit_length() - 1)  # power of two, rounded down
    tile = rows * per_row * (2 if dtype == torch.float64 else 1)
    warps = max(1, min(8, tile // 256))
    warps = 1 << (warps.bit_length() - 1)
    return dict(ROWS=rows, BN=bn, BG=bg, num_warps=warps)


def _sms(device) -> int:
    if _interpret() or device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _acc(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _torch_impl():
    import importlib

    ops_mod = importlib.import_module("flashloss.ops.sort_network")  # (flashloss.ops.sort_network is also a function)

    return ops_mod._torch_forward, ops_mod._torch_backward


def forward(x, sched, relax, steepness, art_lambda, want_P, W):
    from flashloss.ops.sort_network import RELAX_CODE

    bsz, n = x.shape
    g = W.shape[2] if W is not None else 0
    if not supports(n, want_P, g, x.dtype):
        return _torch_impl()[0](x, sched, relax, steepness, art_lambda, want_P, W)
    acc, acc_tl = _acc(x.dtype)
    dev = x.device
    C, L = sched.num_comparators, sched.num_layers
    out = empty(bsz, n, dtype=acc, device=dev)
    P = empty(bsz, n, n, dtype=acc, device=dev) if want_P else empty(0, dtype=acc, device=dev)
    PW = empty(bsz, n, g, dtype=acc, device=dev) if W is not None else empty(0, dtype=acc, device=dev)
    alpha = empty(bsz, C, dtype=acc, device=dev)
    if bsz == 0:
        return out, P, PW, alpha
    cfg = _config("fwd", n, want_P, g, x.dtype, bsz, _sms(dev))
    tab, comp, rank = _tables(sched, cfg["BN"], dev)
    dummy = out
    _fwd_kernel[(triton.cdiv(bsz, cfg["ROWS"]),)](
        x, tab, comp, rank, alpha if C else dummy, out, P if want_P else dummy, PW if W is not None else dummy,
        W if W is not None else dummy, bsz, n, C, L, g, (n * g if W is not None and W.shape[0] > 1 else 0),
        float(steepness), float(art_lambda), RELAX=RELAX_CODE[relax], WANT_P=bool(want_P), WANT_W=W is not None,
        ACC=acc_tl, **cfg)
    return out, P, PW, alpha


def backward(x, alpha, sched, relax, steepness, art_lambda, g_sorted, g_P, g_PW, W, need_W):
    from flashloss.ops.sort_network import RELAX_CODE

    bsz, n = x.shape
    want_P, want_W = g_P.numel() > 0, g_PW.numel() > 0
    g = W.shape[2] if want_W else 0
    if not supports(n, want_P, g, x.dtype):
        return _torch_impl()[1](x, alpha, sched, relax, steepness, art_lambda, g_sorted, g_P, g_PW, W, need_W)
    acc, acc_tl = _acc(x.dtype)
    dev = x.device
    C, L = sched.num_comparators, sched.num_layers
    zero_W = bool(need_W and W is not None and not want_W)  # no PW upstream: W's gradient is zero
    need_W = bool(need_W and want_W)
    g_x = empty(bsz, n, dtype=acc, device=dev)
    none = torch.zeros_like(W) if zero_W else empty(0, dtype=acc, device=dev)
    if bsz == 0:
        return g_x, (torch.zeros_like(W) if need_W else none)
    cfg = _config("bwd", n, want_P, g, x.dtype, bsz, _sms(dev))
    rows_blk = cfg["ROWS"]
    tab, comp, rank = _tables(sched, cfg["BN"], dev)
    shared_w = need_W and W.shape[0] == 1 and bsz > 1
    n_blk = triton.cdiv(bsz, rows_blk)
    if need_W:
        g_W = empty(n_blk, n, g, dtype=acc, device=dev) if shared_w else empty(bsz, n, g, dtype=acc, device=dev)
    # scratch tapes for a chunk of rows (a multiple of ROWS)
    per_row = max(1, C * (1 + ((1 + g) if want_W else 0) + (n if want_P else 0)))
    chunk = min(n_blk, max(1, SCRATCH_ELEMS // (per_row * rows_blk))) * rows_blk
    amb = torch.empty(max(1, chunk * C), dtype=acc, device=dev)
    dpw = torch.empty(max(1, chunk * C) if want_W else 1, dtype=acc, device=dev)
    vd = torch.empty(max(1, chunk * C * g) if want_W else 1, dtype=acc, device=dev)
    pd = torch.empty(max(1, chunk * C * n) if want_P else 1, dtype=acc, device=dev)
    dummy = g_x
    for r0 in range(0, bsz, chunk):
        rows = min(chunk, bsz - r0)
        _bwd_kernel[(triton.cdiv(rows, rows_blk),)](
            x, alpha if C else dummy, tab, comp, rank, g_sorted if g_sorted.numel() else dummy,
            g_P if want_P else dummy, g_PW if want_W else dummy, W if want_W else dummy, g_x,
            g_W if need_W else dummy, amb, dpw, vd, pd, r0, r0 // rows_blk, bsz, n, C, L, g,
            (n * g if want_W and W.shape[0] > 1 else 0), float(steepness), float(art_lambda),
            RELAX=RELAX_CODE[relax], HAS_GS=g_sorted.numel() > 0, WANT_P=want_P, WANT_W=want_W, NEED_W=need_W,
            SHARED_W=shared_w, ACC=acc_tl, **cfg)
    if not need_W:
        return g_x, none
    return g_x, (g_W.sum(0, keepdim=True) if shared_w else g_W)
