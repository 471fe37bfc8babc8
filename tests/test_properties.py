"""Property tests (hypothesis) for row_logsumexp: invariances that hold for any input, checked on
every CPU backend."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashloss
from flashloss import backend_available

BACKENDS = [b for b in ("torch", "cpu") if backend_available(b, "cpu")[0]]

shapes = st.tuples(st.integers(1, 9), st.integers(1, 5000))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, shift=st.floats(-1e3, 1e3), seed=st.integers(0, 2**31 - 1))
def test_shift_and_permutation_invariance(shape, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 5
    perm = torch.randperm(shape[1], generator=gen)
    want = torch.logsumexp(x, dim=-1)
    for backend in BACKENDS:
        lse = flashloss.row_logsumexp(x, backend=backend)
        torch.testing.assert_close(lse, want, rtol=1e-12, atol=1e-12)
        # LSE(x + c) = LSE(x) + c ; LSE is invariant to the order of the columns
        torch.testing.assert_close(flashloss.row_logsumexp(x + shift, backend=backend), want + shift,
                                   rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(flashloss.row_logsumexp(x[:, perm], backend=backend), want,
                                   rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_backends_agree_in_fp32_and_gradient_rows_sum_to_upstream(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen) * 20).requires_grad_(True)
    g = torch.randn(shape[0], generator=gen)
    results = []
    for backend in BACKENDS:
        out = flashloss.row_logsumexp(x, backend=backend)
        (dx,) = torch.autograd.grad(out, x, g)
        # d LSE / dx is a softmax: each gradient row sums to its upstream value
        torch.testing.assert_close(dx.sum(-1), g, rtol=1e-4, atol=1e-5)
        assert math.isfinite(out.sum().item())
        results.append((out, dx))
    for out, dx in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(dx, results[0][1], rtol=1e-5, atol=1e-6)
