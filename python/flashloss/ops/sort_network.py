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
# torch backend: vectorised over rows, one step per layer; backward = autograd of the same steps,
# recomputed in row chunks so that its tape stays bounded.


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


def _layer_index(sched: Schedule) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    pairs = sched.pairs.long()
    return [(lo, hi, pairs[lo:hi, 0], pairs[lo:hi, 1]) for lo, hi in sched.layers()]


def _torch_steps(x, sched, relax, steepness, art_lambda, want_P, W):
    """Differentiable forward on x [B, n] (accumulation dtype). Returns sorted, P or None, PW or
    None, alpha [B, C]."""
    bsz, n = x.shape
    layers = _layer_index(sched)
    out_slot = sched.out_slot.long()
    vals = x
    P = torch.eye(n, dtype=x.dtype, device=x.device).expand(bsz, n, n) if want_P else None
    alphas = []
    for lo, hi, i, j in layers:
        a, b = vals[:, i], vals[:, j]
        alpha = relax_alpha(b - a, relax, steepness, art_lambda)
        alphas.append((alpha, i, j))
        vals = vals.index_copy(1, torch.cat([i, j]), torch.cat([alpha * a + (1 - alpha) * b,
                                                               (1 - alpha) * a + alpha * b], 1))
        if P is not None:
            Pa, Pb, al = P[:, :, i], P[:, :, j], alpha[:, None, :]
            P = P.index_copy(2, torch.cat([i, j]), torch.cat([al * Pa + (1 - al) * Pb, (1 - al) * Pa + al * Pb], 2))
    PW = None
    if W is not None:
        # P = I M_1 ... M_L (each M_l mixes two columns and is symmetric), so P W = M_1 (... (M_L W_s))
        # with W_s the position weights moved to the slots that hold each output position.
        V = torch.zeros(W.shape[0], n, W.shape[2], dtype=W.dtype, device=W.device).index_copy(1, out_slot, W)
        V = V.expand(bsz, n, W.shape[2])
        for alpha, i, j in reversed(alphas):
            Vi, Vj, al = V[:, i], V[:, j], alpha[:, :, None]
            V = V.index_copy(1, torch.cat([i, j]), torch.cat([al * Vi + (1 - al) * Vj, (1 - al) * Vi + al * Vj], 1))
        PW = V
    alpha_all = torch.cat([a for a, _, _ in alphas], 1) if alphas else x.new_zeros(bsz, 0)
    return vals[:, out_slot], (P[:, :, out_slot] if P is not None else None), PW, alpha_all


def _torch_forward(x, sched, relax, steepness, art_lambda, want_P, W):
    acc = acc_dtype(x.dtype)
    with torch.no_grad():
        s, P, PW, alpha = _torch_steps(x.to(acc), sched, relax, steepness, art_lambda, want_P, W)
    return (s.contiguous(), P.contiguous() if P is not None else x.new_zeros(0, dtype=acc),
            PW.contiguous() if PW is not None else x.new_zeros(0, dtype=acc), alpha.contiguous())


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


def _mix(t: torch.Tensor, dim: int, i, j, alpha) -> torch.Tensor:
    """Slots i <- alpha t_i + (1-alpha) t_j, j <- (1-alpha) t_i + alpha t_j along `dim` (alpha is
    broadcast to t_i's shape by the caller)."""
    ti, tj = t.index_select(dim, i), t.index_select(dim, j)
    return t.index_copy(dim, torch.cat([i, j]), torch.cat([alpha * ti + (1 - alpha) * tj,
                                                          (1 - alpha) * ti + alpha * tj], dim))


# rows per backward chunk: the tapes hold ~ rows * C * (1 + n + g) values
TORCH_CHUNK_ELEMS = 1 << 22


def _torch_backward(x, alpha, sched, relax, steepness, art_lambda, g_sorted, g_P, g_PW, W, need_W):
    """The analytic backward of OBJECTIVES.md §4.3/4.5, vectorised over a chunk of rows. Per chunk:
    a forward pass rebuilds the layer inputs (value differences a - b, and P's column differences
    when P has an upstream); a forward sweep of U = dL/d(PW) through the layers gives the PW part of
    dL/dalpha (and dL/dW at its end); a reverse pass carries dL/dvalues and dL/dP back through the
    layers, adds the value and P parts of dL/dalpha, and chains dL/dalpha to the two inputs of each
    comparator."""
    acc = acc_dtype(x.dtype)
    bsz, n = x.shape
    want_P, want_W = g_P.numel() > 0, g_PW.numel() > 0
    g = W.shape[2] if want_W else 0
    C = sched.num_comparators
    rows = max(1, min(bsz, TORCH_CHUNK_ELEMS // max(1, C * (1 + (n if want_P else 0) + g))))
    layers = _layer_index(sched)
    out_slot = sched.out_slot.long()
    g_x = empty(bsz, n, dtype=acc, device=x.device)
    g_W = torch.zeros_like(W) if (need_W and want_W) else None
    for r0 in range(0, bsz, rows):
        r1 = min(bsz, r0 + rows)
        al = alpha[r0:r1]
        # forward: layer inputs
        vals = x[r0:r1].to(acc)
        P = torch.eye(n, dtype=acc, device=x.device).expand(r1 - r0, n, n) if want_P else None
        a_minus_b, p_diff = [], []
        for lo, hi, i, j in layers:
            a, b, alpha_l = vals[:, i], vals[:, j], al[:, lo:hi]
            a_minus_b.append(a - b)
            vals = _mix(vals, 1, i, j, alpha_l)
            if P is not None:
                p_diff.append(P[:, :, i] - P[:, :, j])
                P = _mix(P, 2, i, j, alpha_l[:, None, :])
        dalpha = torch.zeros(r1 - r0, C, dtype=acc, device=x.device)
        if want_W:
            Wc = W if W.shape[0] == 1 else W[r0:r1]
            # V_l = M_{l+1} ... M_L W_s (the reverse sweep of the forward), kept per layer
            V = torch.zeros(Wc.shape[0], n, g, dtype=acc, device=x.device).index_copy(1, out_slot, Wc)
            V = V.expand(r1 - r0, n, g)
            v_diff = [None] * len(layers)
            for k in range(len(layers) - 1, -1, -1):
                lo, hi, i, j = layers[k]
                v_diff[k] = V[:, i] - V[:, j]
                V = _mix(V, 1, i, j, al[:, lo:hi, None])
            U = g_PW[r0:r1]  # dL/dV_0, then dL/dV_l: U_l = M_l U_{l-1}
            for k, (lo, hi, i, j) in enumerate(layers):
                dalpha[:, lo:hi] += ((U[:, i] - U[:, j]) * v_diff[k]).sum(-1)
                U = _mix(U, 1, i, j, al[:, lo:hi, None])
            if g_W is not None:  # dL/dW_s = U_L; position r lives in slot out_slot[r]
                gw = U[:, out_slot]
                if W.shape[0] == 1:
                    g_W += gw.sum(0, keepdim=True)
                else:
                    g_W[r0:r1] = gw
        # reverse: dL/dvalues and dL/dP in slot space
        gv = torch.zeros(r1 - r0, n, dtype=acc, device=x.device)
        if g_sorted.numel():
            gv[:, out_slot] = g_sorted[r0:r1]
        G = None
        if want_P:
            G = torch.zeros(r1 - r0, n, n, dtype=acc, device=x.device)
            G[:, :, out_slot] = g_P[r0:r1]
        for k in range(len(layers) - 1, -1, -1):
            lo, hi, i, j = layers[k]
            alpha_l = al[:, lo:hi]
            da = dalpha[:, lo:hi] + (gv[:, i] - gv[:, j]) * a_minus_b[k]
            gv = _mix(gv, 1, i, j, alpha_l)
            if G is not None:
                da = da + ((G[:, :, i] - G[:, :, j]) * p_diff[k]).sum(1)
                G = _mix(G, 2, i, j, alpha_l[:, None, :])
            chain = relax_dalpha(-a_minus_b[k], alpha_l, relax, steepness, art_lambda) * da
            gv = gv.index_add(1, torch.cat([i, j]), torch.cat([-chain, chain], 1))
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
