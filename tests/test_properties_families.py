"""Property tests (hypothesis) for the loss families (issue #9, item 1): invariances that hold for
any input, and agreement of every available backend with every other on random shapes and
options. tests/test_properties.py has the row_logsumexp and primitive-A-vs-reference properties.

Reproducible in CI: every test is derandomized (hypothesis derives its examples from the test, not
from a random seed) and the tensors come from a seeded generator drawn by hypothesis."""
from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashloss
from flashloss import backend_available

SETTINGS = dict(deadline=None, derandomize=True, database=None)


def _backends(op):
    impls = flashloss._backend.registered_ops()[op].impls
    return [b for b in ("torch", "cpu") if b in impls and backend_available(b, "cpu")[0]]


CONTRASTIVE_BACKENDS = _backends("contrastive_lse")
TOKEN_BACKENDS = _backends("token_logprobs")


def _close(a, b, tol=1e-5, what=""):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------ permutation equivariance


@settings(max_examples=12, **SETTINGS)
@given(n=st.integers(2, 17), d=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_contrastive_losses_are_permutation_equivariant(n, d, seed):
    """Permuting the batch (pairs, or embeddings with their labels) permutes per-row losses and
    leaves mean losses unchanged."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b = torch.randn(n, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,), generator=gen)
    perm = torch.randperm(n, generator=gen)
    scale, bias = 2.5, torch.tensor(-0.7, dtype=torch.float64)
    for backend in CONTRASTIVE_BACKENDS:
        kw = dict(backend=backend)
        per = {
            "info_nce": lambda x, y, lab: flashloss.info_nce(x, y, scale=scale, reduction="none", **kw),
            "clip_loss": lambda x, y, lab: flashloss.clip_loss(x, y, scale, reduction="none", **kw),
            "siglip_loss": lambda x, y, lab: flashloss.siglip_loss(x, y, scale, bias, reduction="none", **kw),
            "supcon_loss": lambda x, y, lab: flashloss.supcon_loss(x, lab, no_positive="zero", reduction="none",
                                                                   **kw),
            "dcl_loss": lambda x, y, lab: flashloss.dcl_loss(x, y, reduction="none", **kw),
        }
        for name, f in per.items():
            want = f(a, b, labels)[perm]
            got = f(a[perm], b[perm], labels[perm])
            _close(got, want, 1e-10, f"{backend} {name}")
        # mean losses whose 'none' order is not the row order (pair lists) are invariant
        means = {
            "nt_xent views": lambda x, y, lab: flashloss.nt_xent(x, y, temperature=0.3, **kw),
            "nt_xent labels": lambda x, y, lab: flashloss.nt_xent(x, labels=lab, temperature=0.3, **kw),
            "supcon exclude": lambda x, y, lab: flashloss.supcon_loss(x, lab, **kw),
            "debiased": lambda x, y, lab: flashloss.debiased_contrastive_loss(x, y, **kw),
        }
        for name, f in means.items():
            _close(f(a[perm], b[perm], labels[perm]), f(a, b, labels), 1e-10, f"{backend} {name}")


# ----------------------------------------------------------------------------- shift invariance


@settings(max_examples=12, **SETTINGS)
@given(n=st.integers(1, 13), d=st.integers(1, 8), shift=st.floats(-30, 30), seed=st.integers(0, 2**31 - 1))
def test_softmax_contrastive_losses_are_shift_invariant(n, d, shift, seed):
    """A bias adds one constant to every logit: softmax (LSE - positive) losses do not change, and
    neither do their gradients with respect to the features and the scale."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(shift, dtype=torch.float64, requires_grad=True)
    for backend in CONTRASTIVE_BACKENDS:
        for name, f in (("clip_loss", flashloss.clip_loss),
                        ("info_nce", lambda x, y, sc, bb, backend: flashloss.info_nce(x, y, scale=sc, bias=bb,
                                                                                      backend=backend))):
            base = f(a, b, s, None, backend=backend)
            shifted = f(a, b, s, c, backend=backend)
            _close(shifted, base, 1e-9, f"{backend} {name}")
            g0 = torch.autograd.grad(base, (a, b, s))
            g1 = torch.autograd.grad(shifted, (a, b, s, c))
            for x, y in zip(g1, g0):
                _close(x, y, 1e-9, f"{backend} {name} grad")
            assert abs(g1[3].item()) < 1e-9  # d/dbias of a softmax loss is 0


@settings(max_examples=12, **SETTINGS)
@given(n=st.integers(1, 9), h=st.integers(1, 8), v=st.integers(2, 70), shift=st.floats(-50, 50),
       temperature=st.sampled_from([1.0, 0.5, 2.0]), seed=st.integers(0, 2**31 - 1))
def test_token_logprobs_are_shift_invariant(n, h, v, shift, temperature, seed):
    """log p is invariant to adding a constant to every logit: to the logits themselves
    (logprobs_from_logits) or to the lm_head bias (token_logprobs, linear_cross_entropy); the LSE
    moves by the constant / T."""
    gen = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=gen, dtype=torch.float64)
    w = torch.randn(v, h, generator=gen, dtype=torch.float64)
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    t = torch.randint(0, v, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < 0.3] = -100
    logits = hid @ w.T + bias
    lp = flashloss.logprobs_from_logits(logits, t, temperature=temperature)
    _close(flashloss.logprobs_from_logits(logits + shift, t, temperature=temperature), lp, 1e-9, "logits")
    for backend in TOKEN_BACKENDS:
        kw = dict(temperature=temperature, backend=backend)
        r0 = flashloss.token_logprobs(hid, w, t, bias, outputs=("logp", "lse", "entropy"), **kw)
        r1 = flashloss.token_logprobs(hid, w, t, bias + shift, outputs=("logp", "lse", "entropy"), **kw)
        _close(r1.logp, r0.logp, 1e-9, f"{backend} logp")
        _close(r0.logp, lp, 1e-9, f"{backend} logp vs logits")
        _close(r1.entropy, r0.entropy, 1e-9, f"{backend} entropy")
        valid = t != -100
        _close(r1.lse[valid], r0.lse[valid] + shift / temperature, 1e-9, f"{backend} lse")
        ce0 = flashloss.linear_cross_entropy(hid, w, t, bias, label_smoothing=0.1, **kw)
        ce1 = flashloss.linear_cross_entropy(hid, w, t, bias + shift, label_smoothing=0.1, **kw)
        _close(ce1, ce0, 1e-9, f"{backend} linear_cross_entropy")


# ------------------------------------------------------------------------- backends agree


@pytest.mark.skipif(len(CONTRASTIVE_BACKENDS) < 2, reason="needs the cpu backend (flashloss._C)")
@settings(max_examples=30, **SETTINGS)
@given(n=st.integers(1, 33), m=st.integers(1, 37), d=st.integers(1, 17), positives=st.sampled_from(
    ["targets", "labels", "multi", "none"]), exclude_self=st.booleans(), exclude_positives=st.booleans(),
    per_row_scale=st.booleans(), use_bias=st.booleans(), extra=st.integers(0, 5), sigmoid=st.booleans(),
    threshold=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_contrastive_lse_backends_agree(n, m, d, positives, exclude_self, exclude_positives, per_row_scale, use_bias,
                                        extra, sigmoid, threshold, seed):
    """torch and cpu backends of primitive A: every output and every gradient, fp32, random
    upstream gradients, random options (tile size shrunk so several tiles and row blocks are crossed)."""
    A = sys.modules["flashloss.ops.contrastive_lse"]  # the module (the package exports the function)

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen, requires_grad=True)
    k = torch.randn(m, d, generator=gen, requires_grad=True)
    scale = (torch.rand(n, generator=gen) + 0.5 if per_row_scale else torch.tensor(2.0)).requires_grad_(True)
    bias = torch.tensor(-0.5, requires_grad=True) if use_bias else None
    kw = {}
    if positives == "targets":
        t = torch.randint(0, m, (n,), generator=gen)
        t[torch.rand(n, generator=gen) < 0.2] = -100
        kw["targets"] = t
    elif positives == "labels":
        kw.update(labels_q=torch.randint(0, 4, (n,), generator=gen), labels_k=torch.randint(0, 4, (m,), generator=gen))
    elif positives == "multi":
        t = torch.randint(0, m, (n, 2), generator=gen)
        t[torch.rand(n, 2, generator=gen) < 0.3] = -1
        kw["targets"] = t
    has_pos = positives != "none"
    kw["exclude_self"] = exclude_self
    kw["exclude_positives"] = exclude_positives and has_pos
    if threshold:
        kw["neg_threshold"] = torch.randn(n, generator=gen)
    if extra:
        kw["extra_k"] = torch.randn(extra, d, generator=gen, requires_grad=True)
    outs = ("row_lse", "pos_sum", "pos_count", "col_lse", "col_pos_sum")
    mode = "softmax"
    if sigmoid:
        mode, outs = "sigmoid", outs + ("row_sigmoid",)
    inputs = [x for x in (q, k, scale, bias, kw.get("extra_k")) if x is not None]
    results = {}
    old = A.TILE
    A.TILE = 8
    try:
        for backend in CONTRASTIVE_BACKENDS:
            r = flashloss.contrastive_lse(q, k, scale, bias, outputs=outs, mode=mode, backend=backend, **kw)
            vals = [getattr(r, o) for o in outs]
            g = torch.Generator().manual_seed(1)
            ups = [torch.randn(v.shape, generator=g) for v in vals]
            diff = [(v, u) for v, u in zip(vals, ups) if v.requires_grad]
            grads = torch.autograd.grad([v for v, _ in diff], inputs, [u for _, u in diff], allow_unused=True)
            results[backend] = (vals, grads)
    finally:
        A.TILE = old
    (v0, g0), (v1, g1) = results.values()
    for o, x, y in zip(outs, v1, v0):
        _close(x, y, 2e-5, f"output {o}")
    for i, (x, y) in enumerate(zip(g1, g0)):
        assert (x is None) == (y is None)
        if x is not None:
            _close(x, y, 1e-4, f"gradient of input {i}")


@pytest.mark.skipif(len(TOKEN_BACKENDS) < 2, reason="needs the cpu backend (flashloss._C)")
@settings(max_examples=30, **SETTINGS)
@given(n=st.integers(1, 21), h=st.integers(1, 12), v=st.integers(1, 90), use_bias=st.booleans(),
       temperature=st.sampled_from([1.0, 0.7]), logit_scale=st.sampled_from([1.0, 2.0]),
       softcap=st.sampled_from([None, 5.0]), ignored=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_token_logprobs_backends_agree(n, h, v, use_bias, temperature, logit_scale, softcap, ignored, seed):
    """torch and cpu backends of primitive B: every output with gradient, and the gradients of
    hidden, weight and bias under random upstream gradients; ignored rows (any fraction,
    including all) give 0 and no gradient."""
    gen = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=gen, requires_grad=True)
    w = torch.randn(v, h, generator=gen, requires_grad=True)
    bias = torch.randn(v, generator=gen, requires_grad=True) if use_bias else None
    t = torch.randint(0, v, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < ignored] = -100
    outs = ("logp", "lse", "entropy", "z_sum")
    inputs = [x for x in (hid, w, bias) if x is not None]
    ups = [torch.randn(n, generator=gen) for _ in outs]
    results = []
    for backend in TOKEN_BACKENDS:
        r = flashloss.token_logprobs(hid, w, t, bias, temperature=temperature, logit_scale=logit_scale,
                                     softcap=softcap, outputs=outs, backend=backend)
        vals = [getattr(r, o) for o in outs]
        results.append((vals, torch.autograd.grad(vals, inputs, ups)))
    (v0, g0), (v1, g1) = results[0], results[1]
    for o, x, y in zip(outs, v1, v0):
        _close(x, y, 2e-5, f"output {o}")
        assert torch.all(x[t == -100] == 0)
    for i, (x, y) in enumerate(zip(g1, g0)):
        _close(x, y, 1e-4, f"gradient of input {i}")
    assert torch.all(g1[0][t == -100] == 0)


@pytest.mark.interpret
@settings(max_examples=6, **SETTINGS)
@given(n=st.integers(1, 9), h=st.integers(1, 16), v=st.integers(1, 40), use_bias=st.booleans(),
       softcap=st.sampled_from([None, 4.0]), seed=st.integers(0, 2**31 - 1))
def test_triton_token_logprobs_agrees_with_torch_under_the_interpreter(n, h, v, use_bias, softcap, seed):
    """The Triton backend of primitive B (interpreter, tiny shapes) against the torch backend."""
    if "triton" not in flashloss._backend.registered_ops()["token_logprobs"].impls:
        pytest.fail("the triton backend of token_logprobs is not registered")
    gen = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=gen, requires_grad=True)
    w = torch.randn(v, h, generator=gen, requires_grad=True)
    bias = torch.randn(v, generator=gen, requires_grad=True) if use_bias else None
    t = torch.randint(0, v, (n,), generator=gen)
    t[0] = -100
    inputs = [x for x in (hid, w, bias) if x is not None]
    res = []
    for backend in ("torch", "triton"):
        r = flashloss.token_logprobs(hid, w, t, bias, softcap=softcap, outputs=("logp", "entropy"), backend=backend)
        g = torch.Generator().manual_seed(2)
        ups = [torch.randn(n, generator=g), torch.randn(n, generator=g)]
        res.append(([r.logp, r.entropy], torch.autograd.grad([r.logp, r.entropy], inputs, ups)))
    for x, y in zip(res[1][0] + list(res[1][1]), res[0][0] + list(res[0][1])):
        _close(x, y, 1e-4, "triton vs torch")


# ---------------------------------------------------------------------------------------------
# sorting networks (primitive C)

SORT_BACKENDS = _backends("sort_network")
SORT_NETS = [("odd_even", "exact"), ("bitonic", "exact"), ("bitonic", "diffsort")]
SORT_RELAX = ["logistic", "logistic_phi", "gaussian", "reciprocal", "cauchy", "optimal"]


@settings(max_examples=25, **SETTINGS)
@given(net=st.sampled_from(SORT_NETS), relax=st.sampled_from(SORT_RELAX), rows=st.integers(1, 4),
       n=st.integers(1, 40), steepness=st.floats(0.05, 50.0), seed=st.integers(0, 2**31 - 1))
def test_sort_network_P_doubly_stochastic_and_backends_agree(net, relax, rows, n, steepness, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    W = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    gs, gP = torch.randn(rows, n, generator=gen, dtype=torch.float64), torch.randn(rows, n, n, generator=gen,
                                                                                     dtype=torch.float64)
    results = []
    for backend in SORT_BACKENDS:
        r = flashloss.sort_network(x, net[0], relax, steepness, padding=net[1], return_P=True, position_weights=W,
                                   backend=backend)
        ones = torch.ones(rows, n, dtype=torch.float64)
        torch.testing.assert_close(r.P.sum(1), ones, rtol=0, atol=1e-12)  # columns (output positions)
        torch.testing.assert_close(r.P.sum(2), ones, rtol=0, atol=1e-12)  # rows (input elements)
        assert (r.P >= 0).all() and (r.P <= 1 + 1e-12).all()
        torch.testing.assert_close((x[:, None, :] @ r.P)[:, 0], r.sorted, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r.P @ W, r.PW, rtol=1e-10, atol=1e-12)
        (gx,) = torch.autograd.grad((r.sorted * gs).sum() + (r.P * gP).sum(), x)
        results.append((r.sorted, r.P, gx))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@settings(max_examples=15, **SETTINGS)
@given(net=st.sampled_from(SORT_NETS[:2]), relax=st.sampled_from(SORT_RELAX), n=st.integers(2, 24),
       seed=st.integers(0, 2**31 - 1))
def test_sort_network_monotone_limit_and_permutation_invariance(net, relax, n, seed):
    """Networks that sort (odd-even; bitonic with exact padding): the distance to the hard sort does
    not grow along a steepness ladder and ends below 1e-3 (distinct inputs spaced >= 1); the sorted
    output ignores the order of the inputs in the hard limit, and soft ranks follow the inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randperm(n, generator=gen).to(torch.float64)[None] + torch.rand(1, n, generator=gen,
                                                                              dtype=torch.float64) * 0.1
    hard = torch.sort(x, dim=1).values
    dist = [(flashloss.sort_network(x, net[0], relax, s, padding=net[1]).sorted - hard).abs().max().item()
            for s in (0.5, 5.0, 50.0, 5e3, 5e5)]
    assert all(b <= a + 1e-9 for a, b in zip(dist, dist[1:])), dist
    assert dist[-1] < 1e-3, dist
    perm = torch.randperm(n, generator=gen)
    a = flashloss.sort_network(x, net[0], relax, 5e5, padding=net[1]).sorted
    b = flashloss.sort_network(x[:, perm], net[0], relax, 5e5, padding=net[1]).sorted
    torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
    ranks = flashloss.soft_rank(x, net[0], relax, 5e5, padding=net[1])
    torch.testing.assert_close(flashloss.soft_rank(x[:, perm], net[0], relax, 5e5, padding=net[1]), ranks[:, perm],
                               rtol=0, atol=1e-3)
