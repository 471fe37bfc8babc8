"""Row-wise log-sum-exp: lse[i] = log sum_j exp(x[i, j]) over the last dimension.

The foundation primitive: the online LSE that contrastive rows/columns and vocabulary chunks are
built on, exposed on its own with the full backend contract (DESIGN.md §2) so the registry, the
native build, the Triton path and the test/benchmark harness are exercised end to end.

Contract (every backend):
  forward  x [..., V] (fp32/fp64/bf16/fp16, any strides) -> lse [...] in fp32 (fp64 for fp64 x);
           an all -inf row gives -inf, a +inf element gives +inf, NaN propagates.
  backward upstream g [...] (any values) -> dx = g * exp(x - lse), in x's dtype; rows whose LSE
           is -inf get dx = 0, not NaN.
  saved    x by reference and the [N] LSE; nothing of size N*V.
Cost: forward N*V exp and one read of x; backward N*V exp, one read of x, one write of dx.
"""
from __future__ import annotations

import torch

from .. import _backend, _native
from .._debug import empty, empty_like
from .._validate import FLOAT_DTYPES, check_tensor

OP = "row_logsumexp"

# Columns per chunk of the torch backend are chosen so that one chunk's fp32 temporaries stay
# below this many elements (16 MB): memory O(N + chunk) whatever V is.
TORCH_CHUNK_ELEMENTS = 1 << 22
TORCH_MIN_CHUNK = 128


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# torch backend: column chunks, online merge in PyTorch, recompute in backward.


def _chunk_cols(n_rows: int, n_cols: int) -> int:
    return max(TORCH_MIN_CHUNK, min(n_cols, TORCH_CHUNK_ELEMENTS // max(n_rows, 1)))


def _torch_forward(x: torch.Tensor) -> torch.Tensor:
    n, v = x.shape
    acc = stat_dtype(x.dtype)
    m = torch.full((n,), float("-inf"), dtype=acc, device=x.device)
    s = torch.zeros((n,), dtype=acc, device=x.device)
    step = _chunk_cols(n, v)
    for c0 in range(0, v, step):
        xc = x[:, c0 : c0 + step].to(acc)
        m_new = torch.maximum(m, xc.amax(dim=1))  # propagates NaN
        # Shift by 0 where the max is infinite: never evaluates inf - inf (OBJECTIVES.md §0.2).
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        s = s * torch.exp(m - shift) + torch.exp(xc - shift[:, None]).sum(dim=1)
        m = m_new
    shift = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    out = empty(n, dtype=acc, device=x.device)
    torch.add(shift, torch.log(s), out=out)
    return out


def _torch_backward(x: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    n, v = x.shape
    acc = lse.dtype
    dx = empty_like(x)
    # A -inf LSE (all elements masked) becomes +inf so that exp(x - lse) = 0 there.
    lse_safe = torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse)
    step = _chunk_cols(n, v)
    for c0 in range(0, v, step):
        xc = x[:, c0 : c0 + step].to(acc)
        dx[:, c0 : c0 + step] = grad[:, None] * torch.exp(xc - lse_safe[:, None])
    return dx


# ---------------------------------------------------------------------------------------------
# native backends (cpu, cuda): kernels in csrc/, outputs allocated (and poisoned) here.


def _native_forward(x: torch.Tensor) -> torch.Tensor:
    lse = empty(x.shape[0], dtype=stat_dtype(x.dtype), device=x.device)
    _native.ops().row_logsumexp_forward(x, lse)
    return lse


def _native_backward(x: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    dx = empty_like(x)
    _native.ops().row_logsumexp_backward(x, lse, grad, dx)
    return dx


_TRITON = "flashloss.triton_kernels.row_logsumexp"

_IMPLS = {
    "torch": (_torch_forward, _torch_backward),
    "cpu": (_native_forward, _native_backward),
    "cuda": (_native_forward, _native_backward),
    "triton": (_backend.lazy(_TRITON, "forward"), _backend.lazy(_TRITON, "backward")),
}

# `auto` order from bench/RESULTS.md (CPU: the cpu kernels beat the torch backend at every size
# measured). The CUDA order is provisional until measured on a GPU: the native kernel is a plain
# one-block-per-row reduction, Triton is the fallback.
_backend.register_op(OP, _IMPLS, auto_order={"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")})


# ---------------------------------------------------------------------------------------------
# custom op + autograd: traceable by torch.compile, one contract for all backends.


@torch.library.custom_op("flashloss::row_logsumexp", mutates_args=())
def _forward_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    return _IMPLS[backend][0](x)


@_forward_op.register_fake
def _(x: torch.Tensor, backend: str) -> torch.Tensor:
    return x.new_empty(x.shape[0], dtype=stat_dtype(x.dtype))


@torch.library.custom_op("flashloss::row_logsumexp_backward", mutates_args=())
def _backward_op(x: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, backend: str) -> torch.Tensor:
    return _IMPLS[backend][1](x, lse, grad)


@_backward_op.register_fake
def _(x: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, backend: str) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x, output)
    ctx.backend = backend


def _backward(ctx, grad_lse):
    x, lse = ctx.saved_tensors
    grad = grad_lse.to(lse.dtype).contiguous()
    return _backward_op(x, lse, grad, ctx.backend), None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def row_logsumexp(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """log-sum-exp over the last dimension of `x` [..., V], returned in fp32 (fp64 for fp64 x).

    Differentiable with respect to x; the backward recomputes exp(x - lse) instead of saving the
    softmax. `backend` is one of 'auto', 'torch', 'cpu', 'triton', 'cuda'.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (the reduced one is the last), got a 0-d tensor")
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), x.shape[-1])
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    name = _backend.resolve(OP, backend, x.device)
    return _forward_op(x2, name).reshape(lead)
