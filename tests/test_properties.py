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


# ------------------------------------------------------------------------------ primitive A

CONTRASTIVE_BACKENDS = [b for b in ("torch", "cpu")
                        if b in flashloss._backend.registered_ops()["contrastive_lse"].impls
                        and backend_available(b, "cpu")[0]]
ALL_OUTS = ("row_lse", "col_lse", "pos_sum", "pos_count", "col_pos_sum")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), m=st.integers(1, 45), d=st.integers(1, 20), classes=st.integers(1, 6),
       exclude_self=st.booleans(), exclude_positives=st.booleans(), use_labels=st.booleans(),
       margin=st.sampled_from([0.0, -0.5, 0.3]), seed=st.integers(0, 2**31 - 1))
def test_contrastive_backends_agree_with_reference(n, m, d, classes, exclude_self, exclude_positives,
                                                   use_labels, margin, seed):
    from flashloss.ref import contrastive_lse as ref

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(m, d, generator=gen, dtype=torch.float64)
    if use_labels:
        kw = dict(labels_q=torch.randint(0, classes, (n,), generator=gen),
                  labels_k=torch.randint(0, classes, (m,), generator=gen))
    else:
        t = torch.randint(0, m, (n,), generator=gen)
        t[torch.rand(n, generator=gen) < 0.2] = -100
        kw = dict(targets=t)
    kw.update(exclude_self=exclude_self, exclude_positives=exclude_positives, margin=margin)
    want = ref(q, k, 1.7, 0.1, **kw)
    for backend in CONTRASTIVE_BACKENDS:
        got = flashloss.contrastive_lse(q, k, 1.7, 0.1, outputs=ALL_OUTS, backend=backend, **kw)
        for name in ALL_OUTS:
            torch.testing.assert_close(getattr(got, name), want[name], rtol=1e-10, atol=1e-10,
                                       msg=lambda s: f"{backend} {name}: {s}")


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 30), d=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_clip_loss_is_permutation_invariant(n, d, seed):
    # permuting the pairs permutes the per-pair losses and leaves the mean unchanged
    gen = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    perm = torch.randperm(n, generator=gen)
    for backend in CONTRASTIVE_BACKENDS:
        per = flashloss.clip_loss(img, txt, 3.0, reduction="none", backend=backend)
        per_p = flashloss.clip_loss(img[perm], txt[perm], 3.0, reduction="none", backend=backend)
        torch.testing.assert_close(per_p, per[perm], rtol=1e-5, atol=1e-5)
