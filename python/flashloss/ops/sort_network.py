"""Primitive C: relaxed sorting networks (DESIGN.md §1.C, OBJECTIVES.md §4.1-4.5).

x [B, n] runs through a comparator network (odd-even, or bitonic with exact or diffsort padding)
whose conditional swaps are relaxed: comparator c reads a, b, computes
alpha = relax(steepness * (b - a)) and writes min' = alpha*a + (1-alpha)*b, max' = (1-alpha)*a + alpha*b.
Outputs (each optional but `sorted`):
  sorted [B, n]     relaxed ascending values
  P      [B, n, n]  relaxed permutation matrix, diffsort's convention sorted = x @ P
                    (P[b, i, r] = weight of input i at output position r; doubly stochastic)
  PW     [B, n, g]  P @ W for position weights W [n, g] or [B, n, g] (GroCo group sums, soft ranks)
                    without the [B, n, n] P in memory
  alpha  [B, C]     the comparator weights (saved for backward; exposed for diagnostics)
The column-mixing form costs O(B*C) for values, O(B*n*C) with P and O(B*g*C) for PW, against
diffsort's dense O(B*n^3*L) layer products. Backward takes an upstream gradient for each of sorted,
P and PW (and gives one for W too: d(PW)/dW = P^T, which the backward sweep yields for free).

Schedules come from `sort_schedule.schedule(network, n, padding)` (slots, pass-throughs removed) and
are cached per device: nothing has to be moved by hand.

Backend contract (every backend, same arguments):
  forward(x, sched, relax, steepness, art_lambda, want_P, W)
      x [B, n] contiguous (any float dtype; arithmetic in fp32, fp64 for fp64), W None or [Bw, n, g]
      contiguous in the accumulation dtype with Bw in {1, B}
      -> sorted [B, n], P [B, n, n] or [0], PW [B, n, g] or [0], alpha [B, C]  (accumulation dtype)
  backward(x, alpha, sched, relax, steepness, art_lambda, g_sorted, g_P, g_PW, W, need_W)
      upstreams in the accumulation dtype, contiguous, or [0] when absent
      -> g_x [B, n], g_W [Bw, n, g] or [0]
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch

from .. import _backend, _native
from .._debug import empty
from .._validate import FLOAT_DTYPES, check_tensor
from .sort_schedule import NETWORKS, PADDINGS, Schedule, schedule

OP = "sort_network"
RELAXATIONS = ("logistic", "logistic_phi", "gaussian", "reciprocal", "cauchy", "optimal")
RELAX_CODE = {name: i for i, name in enumerate(RELAXATIONS)}


class SortResult(NamedTuple):
    sorted: torch.Tensor
    P: Optional[torch.Tensor]
    PW: Optional[torch.Tensor]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# torch backend: vectorised over rows, one step per layer, every tensor with its slot axis at dim 1
# and updated in place. P is carried transposed (PT[b, slot, input] = P[b, input, slot]) so that a
# slot is a contiguous row of n; a layer whose comparators form an arithmetic progression of slots
# (every odd-even layer) mixes strided views with no gather at all, other layers gather and scatter
# their slots. A mix of P, P @ W or a gradient is two lerps (one fused kernel each); the values keep
# diffsort's expressions so that sorted values stay bit-exact with it. Backward is the analytic sweep of
# OBJECTIVES.md §4.3/4.5 over row chunks, recomputing the layer inputs it needs.


def relax_alpha(d: torch.Tensor, relax: str, steepness: float, art_lambda: float) -> torch.Tensor:
    """alpha for d = b - a, written exactly as diffsort's execute_sort writes it (same rounding)."""
    if relax == "logistic":
        return torch.sigmoid(d * steepness)
    if relax == "logistic_phi":
        return torch.sigmoid(d * steepness / ((-d).abs() + 1e-10).pow(art_lambda))
    if relax == "gaussian":  # diffsort: NormalCDF(d, sigma = 1 / steepness)
        return 0.5 + 0.5 * torch.erf(d / (1 / steepness) / math.sqrt(2))
    v = steepness * d
    if relax == "reciprocal":
        return 0.5 * (v / (2 + v.abs()) + 1)
    if relax == "cauchy":
        return 1 / math.pi * torch.atan(v) + 0.5
    if relax == "optimal":
        return (torch.clamp(v, -0.25, 0.25) + 0.5
                + ((v > 0.25).to(v.dtype) - (v < -0.25).to(v.dtype)) * (0.25 - 1 / 16 / (v.abs() + 1e-10)))
    raise ValueError(f"relaxation must be one of {', '.join(RELAXATIONS)}; got {relax!r}")


def relax_dalpha(d: torch.Tensor, alpha: torch.Tensor, relax: str, steepness: float,
                 art_lambda: float) -> torch.Tensor:
    """d alpha / d d for d = b - a (steepness included), the derivative of `relax_alpha` as autograd
    takes it (torch's clamp passes the gradient at its bounds; |.| has gradient 0 at 0)."""
    s = steepness
    if relax == "logistic":
        return s * alpha * (1 - alpha)
    if relax == "logistic_phi":
        r = d.abs() + 1e-10
        return alpha * (1 - alpha) * s * r.pow(-art_lambda - 1) * (r - art_lambda * d.abs())
    if relax == "gaussian":
        v = s * d
        return s * torch.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)
    v = s * d
    if relax == "reciprocal":
        return s / (2 + v.abs()) ** 2
    if relax == "cauchy":
        return s / (math.pi * (1 + v * v))
    if relax == "optimal":
        return torch.where(v.abs() <= 0.25, s, s / (16 * (v.abs() + 1e-10) ** 2))
    raise ValueError(f"relaxation must be one of {', '.join(RELAXATIONS)}; got {relax!r}")


class _Layer(NamedTuple):
    lo: int  # comparators lo .. hi - 1 of the schedule
    hi: int
    i: torch.Tensor  # int64 [m] slots of the minima (a side)
    j: torch.Tensor  # int64 [m] slots of the maxima (b side)
    si: Optional[slice]  # the same slots as a slice when they form an arithmetic progression
    sj: Optional[slice]


@functools.lru_cache(maxsize=None)
def _layer_plan(network: str, n: int, padding: str, device: torch.device) -> tuple[_Layer, ...]:
    """The schedule's layers for the torch backend, built once per (network, n, padding, device)
    from the CPU schedule (no device-to-host reads on the hot path)."""
    sched = schedule(network, n, padding)
    pairs = sched.pairs.long()
    out = []
    for lo, hi in sched.layers():
        il, jl = pairs[lo:hi, 0].tolist(), pairs[lo:hi, 1].tolist()
        step = il[1] - il[0] if len(il) > 1 else 1
        regular = step > 0 and all(il[k + 1] - il[k] == step and jl[k + 1] - jl[k] == step
                                   for k in range(len(il) - 1))
        out.append(_Layer(lo, hi, pairs[lo:hi, 0].to(device), pairs[lo:hi, 1].to(device),
                          slice(il[0], il[-1] + 1, step) if regular else None,
                          slice(jl[0], jl[-1] + 1, step) if regular else None))
    return tuple(out)


def _layers(sched: Schedule) -> tuple[_Layer, ...]:
    return _layer_plan(sched.network, sched.n, sched.padding, sched.pairs.device)


def _pair(t: torch.Tensor, L: _Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(t's a-side slots, b-side slots): views for regular layers, gathered copies otherwise."""
    if L.si is not None:
        return t[:, L.si], t[:, L.sj]
    return t.index_select(1, L.i), t.index_select(1, L.j)


def _mix_(t: torch.Tensor, L: _Layer, al: torch.Tensor, diffsort_rounding: bool = False) -> None:
    """In place along dim 1: slot i <- al t_i + (1 - al) t_j, slot j <- (1 - al) t_i + al t_j.
    With `diffsort_rounding` (the values) written as diffsort writes it, so sorted values are
    bit-exact with diffsort; otherwise (P, P @ W, gradients) as two lerps, one fused kernel each."""
    ti, tj = _pair(t, L)
    if diffsort_rounding:
        new_i, new_j = al * ti + (1 - al) * tj, (1 - al) * ti + al * tj
    else:
        new_i, new_j = torch.lerp(tj, ti, al), torch.lerp(ti, tj, al)
    if L.si is not None:
        ti.copy_(new_i)
        tj.copy_(new_j)
    else:
        t.index_copy_(1, L.i, new_i)
        t.index_copy_(1, L.j, new_j)


def _add_pair_(t: torch.Tensor, L: _Layer, chain: torch.Tensor) -> None:
    """t[:, i] -= chain, t[:, j] += chain (dL/dalpha chained to the comparator's two inputs)."""
    if L.si is not None:
        t[:, L.si] -= chain
        t[:, L.sj] += chain
    else:
        t.index_add_(1, L.i, chain, alpha=-1)
        t.index_add_(1, L.j, chain)


def _identity_rows(rows: int, n: int, dtype, device) -> torch.Tensor:
    return torch.eye(n, dtype=dtype, device=device).repeat(rows, 1, 1)


def _slot_weights(W: torch.Tensor, rows: int, out_slot: torch.Tensor) -> torch.Tensor:
    """[rows, n, g]: the position weights moved to the slots holding each output position."""
    V = torch.empty(rows, W.shape[1], W.shape[2], dtype=W.dtype, device=W.device)
    V.index_copy_(1, out_slot, W.expand(rows, -1, -1))
    return V


def _torch_forward(x, sched, relax, steepness, art_lambda, want_P, W):
    acc = acc_dtype(x.dtype)
    bsz, n = x.shape
    layers = _layers(sched)
    out_slot = sched.out_slot.long()
    with torch.no_grad():
        vals = x.to(acc, copy=True)
        PT = _identity_rows(bsz, n, acc, x.device) if want_P else None
        alpha = empty(bsz, sched.num_comparators, dtype=acc, device=x.device)
        for L in layers:
            a, b = _pair(vals, L)
            al = relax_alpha(b - a, relax, steepness, art_lambda)
            alpha[:, L.lo:L.hi] = al
            _mix_(vals, L, al, diffsort_rounding=True)
            if PT is not None:
                _mix_(PT, L, al[:, :, None])
        PW = x.new_zeros(0, dtype=acc)
        if W is not None:
            # P = I M_1 ... M_L with each M_l a symmetric two-column mix, so P W = M_1 (... (M_L W_s))
            PW = _slot_weights(W, bsz, out_slot)
            for L in reversed(layers):
                _mix_(PW, L, alpha[:, L.lo:L.hi, None])
        P = PT.index_select(1, out_slot).transpose(1, 2).contiguous() if PT is not None else x.new_zeros(0, dtype=acc)
        return vals.index_select(1, out_slot), P, PW, alpha


# rows per backward chunk: the tapes hold ~ rows * C * (1 + n + g) values
TORCH_CHUNK_ELEMS = 1 << 22


def _torch_backward(x, alpha, sched, relax, steepness, art_lambda, g_sorted, g_P, g_PW, W, need_W):
    """The analytic backward of OBJECTIVES.md §4.3/4.5, vectorised over a chunk of rows. Per chunk:
    a forward pass rebuilds the layer inputs (value differences a - b, and P's slot differences when
    P has an upstream); a forward sweep of U = dL/d(PW) through the layers gives the PW part of
    dL/dalpha (and dL/dW at its end); a reverse pass carries dL/dvalues and dL/dP back through the
    layers, adds the value and P parts of dL/dalpha, and chains dL/dalpha to the two inputs of each
    comparator."""
    acc = acc_dtype(x.dtype)
    bsz, n = x.shape
    want_P, want_W = g_P.numel() > 0, g_PW.numel() > 0
    g = W.shape[2] if want_W else 0
    C = sched.num_comparators
    rows = max(1, min(bsz, TORCH_CHUNK_ELEMS // max(1, C * (1 + (n if want_P else 0) + g))))
    layers = _layers(sched)
    out_slot = sched.out_slot.long()
    g_x = empty(bsz, n, dtype=acc, device=x.device)
    g_W = torch.zeros_like(W) if (need_W and want_W) else None
    for r0 in range(0, bsz, rows):
        r1 = min(bsz, r0 + rows)
        al = alpha[r0:r1]
        # forward: layer inputs
        vals = x[r0:r1].to(acc, copy=True)
        PT = _identity_rows(r1 - r0, n, acc, x.device) if want_P else None
        a_minus_b, p_diff = [], []
        for L in layers:
            a, b = _pair(vals, L)
            a_minus_b.append(a - b)
            alpha_l = al[:, L.lo:L.hi]
            _mix_(vals, L, alpha_l, diffsort_rounding=True)
            if PT is not None:
                pa, pb = _pair(PT, L)
                p_diff.append(pa - pb)
                _mix_(PT, L, alpha_l[:, :, None])
        dalpha = torch.zeros(r1 - r0, C, dtype=acc, device=x.device)
        if want_W:
            Wc = W if W.shape[0] == 1 else W[r0:r1]
            # V_l = M_{l+1} ... M_L W_s (the reverse sweep of the forward), its slot differences kept
            V = _slot_weights(Wc, r1 - r0, out_slot)
            v_diff = [None] * len(layers)
            for k in range(len(layers) - 1, -1, -1):
                L = layers[k]
                va, vb = _pair(V, L)
                v_diff[k] = va - vb
                _mix_(V, L, al[:, L.lo:L.hi, None])
            U = g_PW[r0:r1].clone()  # dL/dV_0, then dL/dV_l: U_l = M_l U_{l-1}
            for k, L in enumerate(layers):
                ua, ub = _pair(U, L)
                dalpha[:, L.lo:L.hi] += ((ua - ub) * v_diff[k]).sum(-1)
                _mix_(U, L, al[:, L.lo:L.hi, None])
            if g_W is not None:  # dL/dW_s = U_L; position r lives in slot out_slot[r]
                gw = U.index_select(1, out_slot)
                if W.shape[0] == 1:
                    g_W += gw.sum(0, keepdim=True)
                else:
                    g_W[r0:r1] = gw
        # reverse: dL/dvalues and dL/dPT in slot space
        gv = torch.zeros(r1 - r0, n, dtype=acc, device=x.device)
        if g_sorted.numel():
            gv.index_copy_(1, out_slot, g_sorted[r0:r1])
        GT = None
        if want_P:
            GT = torch.zeros(r1 - r0, n, n, dtype=acc, device=x.device)
            GT.index_copy_(1, out_slot, g_P[r0:r1].transpose(1, 2))
        for k in range(len(layers) - 1, -1, -1):
            L = layers[k]
            alpha_l = al[:, L.lo:L.hi]
            ga, gb = _pair(gv, L)
            da = dalpha[:, L.lo:L.hi] + (ga - gb) * a_minus_b[k]
            _mix_(gv, L, alpha_l)
            if GT is not None:
                Ga, Gb = _pair(GT, L)
                da += ((Ga - Gb) * p_diff[k]).sum(-1)
                _mix_(GT, L, alpha_l[:, :, None])
            _add_pair_(gv, L, relax_dalpha(-a_minus_b[k], alpha_l, relax, steepness, art_lambda) * da)
        g_x[r0:r1] = gv
    return g_x, (g_W if g_W is not None else x.new_zeros(0, dtype=acc))


# ---------------------------------------------------------------------------------------------
# backend registry

_IMPLS: dict = {"torch": (_torch_forward, _torch_backward)}
_AUTO = {"cpu": ("torch",), "cuda": ("torch",)}
_backend.register_op(OP, _IMPLS, auto_order=_AUTO)


def _register_native() -> None:
    if _native.load(warn=False) and hasattr(_native.ops(), "sort_network_forward"):
        _IMPLS["cpu"] = (_native_forward, _native_backward)
        _AUTO["cpu"] = ("cpu", "torch")
        _backend.register_op(OP, _IMPLS, auto_order=_AUTO)
    if _native.compiled_with_cuda() and hasattr(_native.ops(), "sort_network_forward"):
        _IMPLS["cuda"] = (_native_forward, _native_backward)
        _backend.register_op(OP, _IMPLS, auto_order=_AUTO)


def _native_forward(x, sched, relax, steepness, art_lambda, want_P, W):
    acc = acc_dtype(x.dtype)
    bsz, n = x.shape
    xa = x.to(acc).contiguous()
    sorted_ = empty(bsz, n, dtype=acc, device=x.device)
    alpha = empty(bsz, sched.num_comparators, dtype=acc, device=x.device)
    P = empty(bsz, n, n, dtype=acc, device=x.device) if want_P else x.new_zeros(0, dtype=acc)
    PW = empty(bsz, n, W.shape[2], dtype=acc, device=x.device) if W is not None else x.new_zeros(0, dtype=acc)
    _native.ops().sort_network_forward(xa, sched.pairs, sched.layer_ptr, sched.out_slot, RELAX_CODE[relax], steepness, art_lambda, W,
                                       sorted_, alpha, P, PW)
    return sorted_, P, PW, alpha


def _native_backward(x, alpha, sched, relax, steepness, art_lambda, g_sorted, g_P, g_PW, W, need_W):
    acc = acc_dtype(x.dtype)
    g_x = empty(*x.shape, dtype=acc, device=x.device)
    g_W = empty(*W.shape, dtype=acc, device=x.device) if (need_W and g_PW.numel()) else x.new_zeros(0, dtype=acc)
    _native.ops().sort_network_backward(x.to(acc).contiguous(), alpha, sched.pairs, sched.layer_ptr, sched.out_slot,
                                        RELAX_CODE[relax],
                                        steepness, art_lambda, g_sorted, g_P, g_PW, W if g_PW.numel() else None,
                                        g_x, g_W)
    return g_x, g_W


_TRITON = "flashloss.triton_kernels.sort_network"


def _register_triton() -> None:
    import importlib.util
    if importlib.util.find_spec(_TRITON) is not None:
        _IMPLS["triton"] = (_backend.lazy(_TRITON, "forward"), _backend.lazy(_TRITON, "backward"))
        _AUTO["cuda"] = ("triton",) + tuple(b for b in _AUTO["cuda"] if b != "triton")
        _backend.register_op(OP, _IMPLS, auto_order=_AUTO)


_register_native()
try:
    _register_triton()
except ModuleNotFoundError:  # flashloss.triton_kernels itself missing (never in an install)
    pass


# ---------------------------------------------------------------------------------------------
# custom op + autograd


@torch.library.custom_op("flashloss::sort_network", mutates_args=())
def _forward_op(x: torch.Tensor, W: Optional[torch.Tensor], network: str, padding: str, relaxation: str,
                steepness: float, art_lambda: float, want_P: bool,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    sched = schedule(network, x.shape[1], padding).to(x.device)
    return tuple(_IMPLS[backend][0](x, sched, relaxation, steepness, art_lambda, want_P, W))


@_forward_op.register_fake
def _(x, W, network, padding, relaxation, steepness, art_lambda, want_P, backend):
    acc = acc_dtype(x.dtype)
    bsz, n = x.shape
    c = schedule(network, n, padding).num_comparators
    return (x.new_empty(bsz, n, dtype=acc), x.new_empty((bsz, n, n) if want_P else (0,), dtype=acc),
            x.new_empty((bsz, n, W.shape[2]) if W is not None else (0,), dtype=acc), x.new_empty(bsz, c, dtype=acc))


@torch.library.custom_op("flashloss::sort_network_backward", mutates_args=())
def _backward_op(x: torch.Tensor, alpha: torch.Tensor, g_sorted: torch.Tensor, g_P: torch.Tensor,
                 g_PW: torch.Tensor, W: Optional[torch.Tensor], network: str, padding: str, relaxation: str,
                 steepness: float, art_lambda: float, need_W: bool,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    sched = schedule(network, x.shape[1], padding).to(x.device)
    return tuple(_IMPLS[backend][1](x, alpha, sched, relaxation, steepness, art_lambda, g_sorted, g_P, g_PW, W,
                                    need_W))


@_backward_op.register_fake
def _(x, alpha, g_sorted, g_P, g_PW, W, network, padding, relaxation, steepness, art_lambda, need_W, backend):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape, dtype=acc), x.new_empty(W.shape if need_W else (0,), dtype=acc)


def _setup_context(ctx, inputs, output):
    x, W, network, padding, relaxation, steepness, art_lambda, want_P, backend = inputs
    ctx.save_for_backward(x, W, output[3])
    ctx.args = (network, padding, relaxation, steepness, art_lambda)
    ctx.backend = backend


def _backward(ctx, g_sorted, g_P, g_PW, g_alpha):
    x, W, alpha = ctx.saved_tensors
    acc = acc_dtype(x.dtype)

    def prep(g, present):
        return g.to(acc).contiguous() if (present and g is not None) else x.new_zeros(0, dtype=acc)

    g_sorted = prep(g_sorted, True)
    g_P = prep(g_P, g_P is not None and g_P.numel() > 0)
    g_PW = prep(g_PW, W is not None)
    need_W = W is not None and ctx.needs_input_grad[1]
    g_x, g_W = _backward_op(x, alpha, g_sorted, g_P, g_PW, W, *ctx.args, need_W, ctx.backend)
    if need_W and g_W.shape != W.shape:  # no upstream reached P @ W
        g_W = torch.zeros_like(W)
    return (g_x.to(x.dtype), g_W if need_W else None, None, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public entry point


def _check_scalar(name: str, value, positive: bool) -> float:
    if isinstance(value, torch.Tensor) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0) or (not positive and value < 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return value


def sort_network(
    x: torch.Tensor,
    network: str = "odd_even",
    relaxation: str = "cauchy",
    steepness: float = 10.0,
    art_lambda: float = 0.25,
    *,
    padding: str = "exact",
    return_P: bool = False,
    position_weights: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> SortResult:
    """Relaxed sort of the last dimension of x [..., n] through a sorting network.

    Returns SortResult(sorted [..., n], P [..., n, n] if return_P else None, PW [..., n, g] if
    position_weights [n, g] (or [..., n, g]) is given else None), all in x's dtype. P follows
    diffsort (sorted = x @ P); PW = P @ position_weights, computed without P. `padding` ("exact",
    the default, or "diffsort") only matters for bitonic networks of non-power-of-two n: diffsort's
    padding does not sort n = 22, 38, 42-46, 54, ... even in the hard limit (OBJECTIVES.md §4.2).
    Gradients flow to x and to position_weights (when it requires grad)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., n] with n >= 1, got {list(x.shape)}")
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {', '.join(NETWORKS)}; got {network!r}")
    if relaxation not in RELAXATIONS:
        raise ValueError(f"relaxation must be one of {', '.join(RELAXATIONS)}; got {relaxation!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}; got {padding!r}")
    steepness = _check_scalar("steepness", steepness, positive=True)
    art_lambda = _check_scalar("art_lambda", art_lambda, positive=False)
    lead, n = tuple(x.shape[:-1]), x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    W = None
    if position_weights is not None:
        check_tensor("position_weights", position_weights, dtypes=FLOAT_DTYPES, device=x.device)
        pw = position_weights
        if pw.dim() == 2 and pw.shape[0] == n:
            W = pw[None]
        elif pw.dim() == x.dim() + 1 and tuple(pw.shape[:-1]) == lead + (n,):
            W = pw.reshape(-1, n, pw.shape[-1])
        else:
            raise ValueError(f"position_weights must have shape [n, g] or [..., n, g] with x's leading "
                             f"dimensions (n = {n}); got {list(pw.shape)} for x of shape {list(x.shape)}")
        W = W.to(acc_dtype(x.dtype)).contiguous()
    name = _backend.resolve(OP, backend, x.device)
    s, P, PW, _ = _forward_op(x2, W, network, padding, relaxation, steepness, art_lambda, bool(return_P), name)
    s = s.to(x.dtype).reshape(x.shape)
    P = P.to(x.dtype).reshape(lead + (n, n)) if return_P else None
    PW = PW.to(x.dtype).reshape(lead + (n, W.shape[2])) if W is not None else None
    return SortResult(s, P, PW)
