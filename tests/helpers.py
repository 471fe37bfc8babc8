"""Test helpers (DESIGN.md §6): compare a backend with the float64 reference on every output and
every gradient, with random upstream gradients and the dtype tolerances; measure peak extra
memory in a subprocess and check how it grows. tests/test_harness.py proves each helper catches
a planted error."""
from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import torch

from flashloss.benchmark.memory import measure_peak_extra

# Relative error norms ||actual - expected|| / ||expected|| allowed per input dtype.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    "tf32": 5e-4,
    torch.bfloat16: 2e-2,
    torch.float16: 2e-2,
}
# bf16/fp16 must also be within this of plain PyTorch's own error in the same dtype.
LOW_PRECISION_SLACK = 1e-2


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| in float64 over finite expected entries; a NaN in `actual` (or a value
    where `expected` is non-finite and actual differs) gives inf: NaN never passes."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if torch.isnan(a).any():
        return math.inf
    finite = torch.isfinite(e)
    if not torch.equal(a[~finite], e[~finite]):
        return math.inf  # -inf/+inf entries must match exactly
    a, e = a[finite], e[finite]
    if not torch.isfinite(a).all():
        return math.inf
    denom = e.norm().item()
    diff = (a - e).norm().item()
    if denom == 0.0:
        return diff  # expected all zero: absolute
    return diff / denom


def assert_close(actual, expected, dtype, what: str, baseline_err: float | None = None,
                 tol: float | None = None) -> float:
    """Asserts the dtype tolerance; for bf16/fp16 also err <= baseline_err + 1e-2 when given.
    fp32: a quantity that plain PyTorch in fp32 gets only to within 1/8 of the tolerance or worse
    (a scalar gradient formed by cancellation, e.g. d/dscale summed over rows whose terms cancel
    20x) is conditioning-limited: its error depends on summation order, and another fp32 order may
    be off by up to 8x plain PyTorch's own error (docs/DECISIONS.md)."""
    tol = TOLERANCE[dtype] if tol is None else tol
    err = rel_err(actual, expected)
    if dtype == torch.float32 and baseline_err is not None and 8.0 * baseline_err > tol:
        tol = 8.0 * baseline_err
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})")
    if baseline_err is not None and not err <= baseline_err + LOW_PRECISION_SLACK:
        raise AssertionError(f"{what}: relative error {err:.3e} is worse than plain PyTorch in {dtype} "
                             f"({baseline_err:.3e}) by more than {LOW_PRECISION_SLACK}")
    return err


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _run_with_grads(fn, inputs: Sequence[torch.Tensor], upstream: Sequence[torch.Tensor]):
    outs = _as_tuple(fn(*inputs))
    needs = [x for x in inputs if x.requires_grad]
    pairs = [(o, g) for o, g in zip(outs, upstream) if o.requires_grad]
    grads: tuple = ()
    if needs and pairs:
        grads = torch.autograd.grad([o for o, _ in pairs], needs,
                                    [g.to(o.dtype) for o, g in pairs], allow_unused=True)
    return outs, grads


def check_against_reference(
    fn: Callable[..., torch.Tensor | tuple],
    ref: Callable[..., torch.Tensor | tuple],
    inputs: Sequence[torch.Tensor],
    dtype: torch.dtype,
    *,
    grad_inputs: Sequence[int] | None = None,
    naive: Callable[..., torch.Tensor | tuple] | None = None,
    tol: float | None = None,
    name: str = "",
) -> dict[str, float]:
    """Runs `ref` in float64 and `fn` in `dtype` on the same values; compares every output and the
    gradient of every input in `grad_inputs` (default: all floating inputs) under random upstream
    gradients (never ones). For bf16/fp16, `naive` (plain PyTorch run in `dtype`) sets the
    baseline error that `fn` may exceed by at most 1e-2. Returns the measured errors."""
    if grad_inputs is None:
        grad_inputs = [i for i, x in enumerate(inputs) if x.is_floating_point()]

    low = dtype in (torch.bfloat16, torch.float16)

    def prepared(cast: torch.dtype | None):
        out = []
        for i, x in enumerate(inputs):
            y = x.detach().clone()
            if y.is_floating_point():
                # The float64 reference sees the inputs already rounded to `dtype`: the comparison
                # measures the implementation's arithmetic, not the rounding of its inputs (which
                # no implementation can undo and which is ill-conditioned for tiny shapes).
                y = y.to(dtype).to(cast)
            out.append(y.requires_grad_(i in grad_inputs))
        return out

    ref_in = prepared(torch.float64)
    ref_out = _as_tuple(ref(*ref_in))
    gen = torch.Generator().manual_seed(1234)
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in ref_out]
    ref_out, ref_grads = _run_with_grads(ref, ref_in, upstream)

    def errors_of(f):
        ins = prepared(dtype)
        outs, grads = _run_with_grads(f, ins, upstream)
        return outs, grads

    outs, grads = errors_of(fn)
    base_outs = base_grads = None
    if (low or dtype == torch.float32) and naive is not None:
        base_outs, base_grads = errors_of(naive)
    if len(outs) != len(ref_out):
        raise AssertionError(f"{name}: {len(outs)} outputs, reference has {len(ref_out)}")
    errs: dict[str, float] = {}
    for k, (o, r) in enumerate(zip(outs, ref_out)):
        base = rel_err(base_outs[k], r) if base_outs is not None else None
        errs[f"out{k}"] = assert_close(o, r, dtype, f"{name} output {k}", base, tol)
    for k, (g, r) in enumerate(zip(grads, ref_grads)):
        label = f"{name} gradient of input {grad_inputs[k]}"
        if r is None and g is None:
            continue
        if g is None or r is None:
            raise AssertionError(f"{label}: one side has no gradient (got {g is None}, ref {r is None})")
        base = rel_err(base_grads[k], r) if base_grads is not None and base_grads[k] is not None else None
        errs[f"grad{grad_inputs[k]}"] = assert_close(g, r, dtype, label, base, tol)
    return errs


# ---------------------------------------------------------------------------------------------
# memory


def peak_extra_bytes(target: str, kwargs: dict, warmup_kwargs: dict | None = None,
                     device: str = "cpu") -> int:
    """Peak extra bytes of `target` (see flashloss.benchmark.memory) in a fresh subprocess; test
    targets may live in tests/ (it is put on the child's path)."""
    result = measure_peak_extra(target, kwargs, device=device, warmup_kwargs=warmup_kwargs,
                                sys_path=[TESTS_DIR])
    if "error" in result:
        raise AssertionError(f"{target}({kwargs}) failed: {result}")
    return int(result["peak_extra_bytes"])


def memory_growth_exponent(target: str, make_kwargs: Callable[[int], dict], n_small: int,
                           n_large: int, floor_bytes: int = 1 << 20, device: str = "cpu") -> float:
    """Fitted exponent p of peak extra memory ~ n^p between two sizes. Memory below
    `floor_bytes` (allocator granularity, thread stacks) is raised to it, so an implementation
    that allocates (almost) nothing reads as p ~ 0."""
    warm = make_kwargs(max(1, n_small // 16))
    small = max(peak_extra_bytes(target, make_kwargs(n_small), warm, device), floor_bytes)
    large = max(peak_extra_bytes(target, make_kwargs(n_large), warm, device), floor_bytes)
    return math.log(large / small) / math.log(n_large / n_small)


def assert_memory_at_most_linear(target: str, make_kwargs: Callable[[int], dict], n_small: int,
                                 n_large: int, **kw) -> float:
    """Peak extra memory grows at most linearly in n (exponent <= 1.25; quadratic reads ~2)."""
    p = memory_growth_exponent(target, make_kwargs, n_small, n_large, **kw)
    if not p <= 1.25:
        raise AssertionError(f"{target}: peak extra memory grows like n^{p:.2f} between n={n_small} "
                             f"and n={n_large}; expected at most linear")
    return p
