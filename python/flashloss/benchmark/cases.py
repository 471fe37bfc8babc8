"""The built-in benchmark cases. Each primitive adds its case here when it lands, with the naive
reference, every flashloss backend and the installed peer libraries as implementations."""
from __future__ import annotations

import torch

from .. import _backend
from .harness import BenchCase, Impl, Size, register_case

FLASHLOSS_BACKENDS = ("torch", "cpu", "cuda", "triton")


def flashloss_available(backend: str):
    def check(device: str) -> tuple[bool, str]:
        if backend == "triton" and device == "cpu":
            return False, "the Triton interpreter is a test tool; its timings mean nothing"
        return _backend.backend_available(backend, device)

    return check


def _seed(size: Size) -> torch.Generator:
    return torch.Generator().manual_seed(sum(size.values()))


# ---------------------------------------------------------------------------------------------
# row_logsumexp: x [N, V] -> lse [N], forward + backward with a random upstream gradient


def _lse_inputs(size: Size, device: str, dtype: torch.dtype):
    gen = _seed(size)
    x = torch.randn(size["N"], size["V"], generator=gen).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.randn(size["N"], generator=gen).to(device=device, dtype=acc)
    return x, g


def _lse_setup(fn):
    def setup(size: Size, device: str, dtype: torch.dtype):
        x, g = _lse_inputs(size, device, dtype)

        def run():
            out = fn(x)
            (gx,) = torch.autograd.grad(out, x, g.to(out.dtype))
            return gx

        return run

    return setup


def _lse_naive(x):
    # what a plain PyTorch user writes (flashloss.ref.row_logsumexp is the test oracle, which also
    # pins the gradient of fully masked rows and is slower)
    return torch.logsumexp(x.float(), dim=-1)


def _lse_flashloss(backend: str):
    def fn(x):
        from ..ops import row_logsumexp

        return row_logsumexp(x, backend=backend)

    return fn


def _lse_naive_bytes(size: Size, device: str, dtype: torch.dtype) -> float:
    # x, (x - m), exp(...) kept for backward, the gradient: ~4 full N*V fp32 tensors
    return 4.0 * size["N"] * size["V"] * 4


register_case(BenchCase(
    name="row_logsumexp",
    description="row-wise log-sum-exp over V, forward + backward (the online-LSE core)",
    sizes_quick=[{"N": 2048, "V": v} for v in (8192, 32768, 131072)],
    sizes_full=[{"N": 4096, "V": v} for v in (8192, 32768, 131072, 262144)],
    flops=lambda s: 4.0 * s["N"] * s["V"],  # exp + add forward, exp + mul backward
    min_bytes=lambda s, dt: 3.0 * s["N"] * s["V"] * torch.finfo(dt).bits / 8,  # read x twice, write dx
    x_key="V",
    warmup_size={"N": 8, "V": 64},
    impls=[
        Impl("naive", "naive", _lse_setup(_lse_naive), estimate_bytes=_lse_naive_bytes),
    ] + [
        Impl(f"flashloss[{b}]", "flashloss", _lse_setup(_lse_flashloss(b)), flashloss_available(b))
        for b in FLASHLOSS_BACKENDS
    ],
))

