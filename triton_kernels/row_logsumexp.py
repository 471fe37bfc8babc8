"""Triton kernels for row-wise log-sum-exp (flashloss.ops.row_logsumexp, backend 'triton').

Forward tiling: one program per row; the row is read in BLOCK_V-wide tiles and each lane keeps its
own online-LSE state (m, s), so a tile costs one exp per element and no cross-lane reduction; the
lanes are merged once at the end. Statistics in fp32 (fp64 for fp64 inputs).
Saved for backward: the [N] LSE only.
Backward tiling: programs over (row, BLOCK_V tile); dx = g * exp(x - lse), rows with lse = -inf
give 0.
Cost: forward N*V exp + N*V*bytes read; backward N*V exp + N*V*bytes read + N*V*bytes written.
Memory-bound on every GPU: the floor is those bytes at HBM bandwidth.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashloss._debug import empty, empty_like

BLOCK_V = 1024


@triton.jit
def _forward_kernel(x_ptr, lse_ptr, V, stride_row, BLOCK: tl.constexpr, ACC_F64: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc_t = tl.float64 if ACC_F64 else tl.float32
    m = tl.full([BLOCK], float("-inf"), acc_t)
    s = tl.zeros([BLOCK], acc_t)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        a = tl.load(x_ptr + row * stride_row + cols, mask=cols < V, other=float("-inf")).to(acc_t)
        m_new = tl.maximum(m, a, propagate_nan=tl.PropagateNan.ALL)
        # shift 0 where the running max is infinite: never inf - inf
        shift = tl.where((m_new == float("inf")) | (m_new == float("-inf")), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(a - shift)
        m = m_new
    big = tl.max(m, axis=0)
    big_shift = tl.where((big == float("inf")) | (big == float("-inf")), 0.0, big)
    total = tl.sum(s * tl.exp(m - big_shift), axis=0)
    tl.store(lse_ptr + row, big_shift + tl.log(total))


@triton.jit
def _backward_kernel(x_ptr, lse_ptr, g_ptr, dx_ptr, V, stride_row, BLOCK: tl.constexpr,
                     ACC_F64: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc_t = tl.float64 if ACC_F64 else tl.float32
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    lse = tl.load(lse_ptr + row)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # masked row: weight 0, not NaN
    g = tl.load(g_ptr + row)
    a = tl.load(x_ptr + row * stride_row + cols, mask=mask, other=0.0).to(acc_t)
    d = g * tl.exp(a - lse)
    tl.store(dx_ptr + row * V + cols, d.to(dx_ptr.dtype.element_ty), mask=mask)


def _block(v: int) -> int:
    return max(16, min(BLOCK_V, triton.next_power_of_2(max(v, 1))))


def forward(x: torch.Tensor) -> torch.Tensor:
    n, v = x.shape
    f64 = x.dtype == torch.float64
    lse = empty(n, dtype=torch.float64 if f64 else torch.float32, device=x.device)
    if n:
        _forward_kernel[(n,)](x, lse, v, x.stride(0), BLOCK=_block(v), ACC_F64=f64)
    return lse


def backward(x: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    n, v = x.shape
    dx = empty_like(x)
    if n and v:
        block = _block(v)
        _backward_kernel[(n, triton.cdiv(v, block))](x, lse, grad, dx, v, x.stride(0), BLOCK=block,
                                                      ACC_F64=x.dtype == torch.float64)
    return dx
