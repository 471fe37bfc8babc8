"""Primitive C (flashloss.ops.sort_network) on every CPU-runnable backend against the wire-level
float64 reference (flashloss.ref.sorting): values, P, P @ W, and the gradients of x and W under
random upstream gradients, for every network x padding x relaxation and n in {1, 2, 3, 7, 11, 16,
33, 64}; P doubly stochastic; the hard limit; the schedules; gradcheck; bad input; compile."""
import functools
import importlib
import math

import pytest
import torch

import flashloss
from flashloss import backend_available
from flashloss.ops import sort_network
from flashloss.ops.sort_schedule import hard_sort_check, schedule
from flashloss.ref.sort_network import sort_network as ref_sort_network
from helpers import TOLERANCE, assert_close, rel_err

ops_mod = importlib.import_module("flashloss.ops.sort_network")
RELAXATIONS = ops_mod.RELAXATIONS
NETWORKS = [("odd_even", "exact"), ("bitonic", "exact"), ("bitonic", "diffsort")]
NET_IDS = ["odd_even", "bitonic_exact", "bitonic_diffsort"]
SIZES = [1, 2, 3, 7, 11, 16, 33, 64]
BACKENDS = [b for b in ("torch", "cpu")
            if b in flashloss._backend.registered_ops()["sort_network"].impls and backend_available(b, "cpu")[0]]
STEEPNESS = 3.0
ROWS, GROUPS = 5, 2


def _problem(n, seed, per_row_w=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, n, generator=gen, dtype=torch.float64)
    W = torch.randn(*((ROWS,) if per_row_w else ()), n, GROUPS, generator=gen, dtype=torch.float64)
    ups = (torch.randn(ROWS, n, generator=gen, dtype=torch.float64),
           torch.randn(ROWS, n, n, generator=gen, dtype=torch.float64),
           torch.randn(ROWS, n, GROUPS, generator=gen, dtype=torch.float64))
    return x, W, ups


def _run(fn, x, W, ups, dtype):
    """outputs (sorted, P, PW) and gradients (x, W) of sum(out * upstream) in `dtype`."""
    x = x.to(dtype).requires_grad_(True)
    W = W.to(dtype).requires_grad_(True)
    s, P, PW = fn(x, W)
    loss = sum((o.to(torch.float64) * u).sum() for o, u in zip((s, P, PW), ups))
    gx, gW = torch.autograd.grad(loss, [x, W])
    return (s, P, PW), (gx, gW)


@functools.lru_cache(maxsize=None)
def _reference(network, padding, relaxation, n, seed, per_row_w):
    x, W, ups = _problem(n, seed, per_row_w)

    def ref(x, W):
        s, P = ref_sort_network(x, network, relaxation, STEEPNESS, padding=padding)
        return s, P, P @ W

    return _run(ref, x, W, ups, torch.float64)


def _check(backend, network, padding, relaxation, n, dtype, per_row_w=False, seed=0, tol=None):
    x, W, ups = _problem(n, seed, per_row_w)
    # the reference sees the inputs already rounded to `dtype` (see helpers.check_against_reference)
    x_r, W_r = x.to(dtype).to(torch.float64), W.to(dtype).to(torch.float64)
    def ref(x, W):
        s, P = ref_sort_network(x, network, relaxation, STEEPNESS, padding=padding)
        return s, P, P @ W

    if dtype in (torch.float32, torch.float64):
        ref_outs, ref_grads = _reference(network, padding, relaxation, n, seed, per_row_w)
    else:
        ref_outs, ref_grads = _run(ref, x_r, W_r, ups, torch.float64)

    def ours(x, W):
        r = sort_network(x, network, relaxation, STEEPNESS, padding=padding, return_P=True, position_weights=W,
                         backend=backend)
        assert r.sorted.dtype == x.dtype and r.P.dtype == x.dtype and r.PW.dtype == x.dtype
        return r.sorted, r.P, r.PW

    outs, grads = _run(ours, x, W, ups, dtype)
    # plain PyTorch (the reference network) in the same dtype: deep networks (n = 64: 2016
    # comparators) amplify rounding, and helpers.assert_close allows 8x plain PyTorch's own error
    base = [None] * 5
    if dtype != torch.float64:
        b_outs, b_grads = _run(ref, x, W, ups, dtype)
        base = [rel_err(o, r) for o, r in zip(b_outs + b_grads, ref_outs + ref_grads)]
    label = f"{backend} {network}/{padding} {relaxation} n={n} {dtype}"
    names = ("sorted", "P", "PW", "grad x", "grad W")
    for name, o, r, b in zip(names, outs + grads, ref_outs + ref_grads, base):
        assert_close(o, r, dtype, f"{label} {name}", baseline_err=b, tol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relaxation", RELAXATIONS)
@pytest.mark.parametrize("network,padding", NETWORKS, ids=NET_IDS)
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference_fp32(backend, network, padding, relaxation, n):
    _check(backend, network, padding, relaxation, n, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relaxation", RELAXATIONS)
@pytest.mark.parametrize("network,padding", NETWORKS, ids=NET_IDS)
@pytest.mark.parametrize("n", [3, 11, 33])
def test_matches_reference_fp64(backend, network, padding, relaxation, n):
    _check(backend, network, padding, relaxation, n, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("network,padding", NETWORKS, ids=NET_IDS)
@pytest.mark.parametrize("n", [7, 16])
def test_per_row_position_weights(backend, network, padding, n):
    _check(backend, network, padding, "cauchy", n, torch.float32, per_row_w=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("relaxation", ["cauchy", "logistic_phi", "optimal"])
def test_16_bit_inputs(backend, dtype, relaxation):
    # arithmetic in fp32; only the outputs are rounded to the input dtype
    _check(backend, "odd_even", "exact", relaxation, 11, dtype, tol=TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("network,padding", NETWORKS, ids=NET_IDS)
@pytest.mark.parametrize("relaxation", ["logistic_phi", "cauchy"])
def test_gradcheck_float64(backend, network, padding, relaxation):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 2, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x, W):
        r = sort_network(x, network, relaxation, 2.0, padding=padding, return_P=True, position_weights=W,
                         backend=backend)
        return r.sorted, r.P, r.PW

    assert torch.autograd.gradcheck(f, (x, W))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("network,padding", NETWORKS, ids=NET_IDS)
@pytest.mark.parametrize("n", [5, 22, 33])
def test_P_doubly_stochastic_and_sorted_is_x_at_P(backend, network, padding, n):
    x = torch.randn(8, n, dtype=torch.float64)
    r = sort_network(x, network, "cauchy", 2.0, padding=padding, return_P=True, backend=backend)
    ones = torch.ones(8, n, dtype=torch.float64)
    assert torch.allclose(r.P.sum(1), ones, atol=1e-12) and torch.allclose(r.P.sum(2), ones, atol=1e-12)
    assert (r.P >= 0).all()
    assert torch.allclose((x[:, None, :] @ r.P)[:, 0], r.sorted, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("network,padding", NETWORKS, ids=NET_IDS)
@pytest.mark.parametrize("relaxation", RELAXATIONS)
def test_large_steepness_approaches_the_hard_sort(backend, network, padding, relaxation):
    n = 16  # a power of two: every network sorts
    x = torch.stack([torch.randperm(n, dtype=torch.float64) for _ in range(6)])
    hard, perm = torch.sort(x, dim=1)
    errs = []
    for steepness in (10.0, 1e3, 1e5):
        r = sort_network(x, network, relaxation, steepness, padding=padding, return_P=True, backend=backend)
        errs.append((r.sorted - hard).abs().max().item())
    Q = torch.zeros(6, n, n, dtype=torch.float64).scatter_(1, perm[:, None, :], 1.0)  # Q[b, perm[r], r] = 1
    assert errs[-1] < 1e-2 and errs[-1] <= errs[0], errs
    assert (r.P - Q).abs().max().item() < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_padding_sorts_where_diffsort_padding_does_not(backend):
    x = torch.randn(64, 22, dtype=torch.float64)
    hard = torch.sort(x, dim=1).values
    exact = sort_network(x, "bitonic", "logistic", 1e6, padding="exact", backend=backend).sorted
    diffsort = sort_network(x, "bitonic", "logistic", 1e6, padding="diffsort", backend=backend).sorted
    assert torch.allclose(exact, hard, atol=1e-6)
    assert not torch.allclose(diffsort, hard, atol=1e-3)  # the documented defect, reproduced bit-exactly


def test_schedules():
    for n in range(1, 70):
        assert schedule("odd_even", n).num_comparators == n * (n - 1) // 2
        x = torch.randn(50, n)
        assert hard_sort_check(schedule("odd_even", n), x).all()
        assert hard_sort_check(schedule("bitonic", n, "exact"), x).all()
        k = math.ceil(math.log2(n)) if n > 1 else 0
        assert schedule("bitonic", n, "exact").num_layers <= k * (k + 1) // 2
    broken = [n for n in range(1, 70) if not hard_sort_check(schedule("bitonic", n, "diffsort"),
                                                             torch.randn(400, n)).all()]
    assert broken == [22, 38, 42, 43, 44, 45, 46, 54]  # OBJECTIVES.md §4.2
    assert schedule("bitonic", 32, "exact").num_comparators == 240
    # comparators of one layer touch disjoint slots
    for net, pad in NETWORKS:
        s = schedule(net, 37, pad)
        for lo, hi in s.layers():
            slots = s.pairs[lo:hi].flatten().tolist()
            assert len(slots) == len(set(slots))


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dimensions_and_empty_batch(backend):
    x = torch.randn(2, 3, 9, requires_grad=True)
    r = sort_network(x, return_P=True, position_weights=torch.ones(9, 1), backend=backend)
    assert r.sorted.shape == (2, 3, 9) and r.P.shape == (2, 3, 9, 9) and r.PW.shape == (2, 3, 9, 1)
    flat = sort_network(x.detach().reshape(6, 9), return_P=True, backend=backend)
    assert torch.equal(r.sorted.detach().reshape(6, 9), flat.sorted)
    r.sorted.sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x), atol=1e-6)  # the values' sum is preserved
    e = sort_network(torch.zeros(0, 5), return_P=True, backend=backend)
    assert e.sorted.shape == (0, 5) and e.P.shape == (0, 5, 5)


def test_no_grad_when_x_does_not_require_it():
    W = torch.randn(6, 2, requires_grad=True)
    r = sort_network(torch.randn(4, 6), position_weights=W)
    (gW,) = torch.autograd.grad(r.PW.sum(), W)
    assert gW.shape == W.shape
    assert not sort_network(torch.randn(4, 6)).sorted.requires_grad


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(x=torch.arange(6).reshape(2, 3)), TypeError, "x must have dtype"),
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.zeros(2, 0)), ValueError, "n >= 1"),
    (dict(network="merge"), ValueError, "network must be one of"),
    (dict(relaxation="softmax"), ValueError, "relaxation must be one of"),
    (dict(padding="zeros"), ValueError, "padding must be one of"),
    (dict(steepness=0.0), ValueError, "steepness must be a finite number > 0"),
    (dict(steepness=-1.0), ValueError, "steepness must be a finite number > 0"),
    (dict(steepness=float("inf")), ValueError, "steepness must be a finite number > 0"),
    (dict(steepness=torch.tensor(2.0)), TypeError, "steepness must be a Python float"),
    (dict(art_lambda=-0.5), ValueError, "art_lambda must be a finite number >= 0"),
    (dict(position_weights=torch.ones(4, 1)), ValueError, "position_weights must have shape"),
    (dict(position_weights=torch.ones(5, 1, dtype=torch.int64)), TypeError, "position_weights must have dtype"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_bad_input(kwargs, err, match):
    args = dict(x=torch.randn(3, 5))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        sort_network(**args)


def test_compile_fullgraph():
    def f(x, W):
        r = sort_network(x, "bitonic", "cauchy", 4.0, return_P=True, position_weights=W)
        return r.sorted.square().sum() + r.P.square().sum() + r.PW.sum()

    x = torch.randn(4, 12, requires_grad=True)
    W = torch.randn(12, 3)
    eager = torch.autograd.grad(f(x, W), x)[0]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, W), x)[0]
    assert torch.allclose(eager, got, atol=1e-6)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="flashloss._C not built")
def test_cpu_backend_is_bitwise_independent_of_the_thread_count():
    code = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from flashloss.ops import sort_network
g = torch.Generator().manual_seed(5)
x = torch.randn(301, 13, generator=g, requires_grad=True)
W = torch.randn(13, 3, generator=g, requires_grad=True)
r = sort_network(x, "bitonic", "cauchy", 3.0, return_P=True, position_weights=W, backend="cpu")
loss = (r.sorted * torch.randn(r.sorted.shape, generator=g)).sum() + (r.P * torch.randn(r.P.shape, generator=g)).sum() \
    + (r.PW * torch.randn(r.PW.shape, generator=g)).sum()
gx, gW = torch.autograd.grad(loss, [x, W])
torch.save([r.sorted, r.P, r.PW, gx, gW], sys.argv[2])
"""
    import os
    import subprocess
    import sys
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        outs = []
        for threads in (1, 2):
            path = os.path.join(tmp, f"{threads}.pt")
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            subprocess.run([sys.executable, "-c", code, str(threads), path], check=True, env=env)
            outs.append(torch.load(path))
        for a, b in zip(*outs):
            assert torch.equal(a, b)


GPU_BACKENDS = ["torch", "triton", "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("relaxation", RELAXATIONS)
@pytest.mark.parametrize("network,padding", NETWORKS, ids=NET_IDS)
@pytest.mark.parametrize("n", [1, 2, 7, 16, 33, 64, 200])
def test_gpu_matches_reference(backend, network, padding, relaxation, n):
    """Every GPU backend on CUDA tensors against the float64 reference (computed on the CPU)."""
    if not backend_available(backend, "cuda")[0]:
        pytest.skip(backend_available(backend, "cuda")[1])
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(37, n, generator=gen, dtype=torch.float64)
    W = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    ups = (torch.randn(37, n, generator=gen, dtype=torch.float64), torch.randn(37, n, n, generator=gen,
                                                                                dtype=torch.float64),
           torch.randn(37, n, 3, generator=gen, dtype=torch.float64))

    def ref(x, W):
        s, P = ref_sort_network(x, network, relaxation, STEEPNESS, padding=padding)
        return s, P, P @ W

    ref_outs, ref_grads = _run(ref, x, W, ups, torch.float64)
    b_outs, b_grads = _run(ref, x, W, ups, torch.float32)

    def ours(x, W):
        r = sort_network(x.cuda(), network, relaxation, STEEPNESS, padding=padding, return_P=True,
                         position_weights=W.cuda(), backend=backend)
        return r.sorted.cpu(), r.P.cpu(), r.PW.cpu()

    outs, grads = _run(ours, x, W, ups, torch.float32)
    for k, (o, r, b) in enumerate(zip(outs + grads, ref_outs + ref_grads, b_outs + b_grads)):
        assert_close(o, r, torch.float32, f"{backend} {network}/{padding} {relaxation} n={n} item {k}",
                     baseline_err=rel_err(b, r))


# ---------------------------------------------------------------------------------------------
# Triton under the interpreter (CPU tensors; tiny shapes: the interpreter is slow). ROWS is 2 there,
# so the 5-row problems cross row blocks, and the shared-W gradient sums per-program partials.


@pytest.mark.interpret
@pytest.mark.parametrize("relaxation", RELAXATIONS)
@pytest.mark.parametrize("network,padding", NETWORKS, ids=NET_IDS)
@pytest.mark.parametrize("n", [1, 3, 7, 16])
def test_triton_interpreter_matches_reference(network, padding, relaxation, n):
    _check("triton", network, padding, relaxation, n, torch.float32)


@pytest.mark.interpret
@pytest.mark.parametrize("network,padding", NETWORKS, ids=NET_IDS)
def test_triton_interpreter_fp64_per_row_weights_and_16_bit(network, padding):
    _check("triton", network, padding, "logistic_phi", 11, torch.float64)
    _check("triton", network, padding, "cauchy", 11, torch.float32, per_row_w=True)
    _check("triton", network, padding, "cauchy", 11, torch.bfloat16, tol=TOLERANCE[torch.bfloat16])


@pytest.mark.interpret
def test_triton_beyond_its_limits_runs_the_torch_implementation():
    tk = importlib.import_module("flashloss.triton_kernels.sort_network")
    assert tk.supports(64, True, 0) and not tk.supports(65, True, 0) and not tk.supports(33, True, 0, torch.float64)
    assert not tk.supports(tk.MAX_N + 1, False, 0)
    _check("triton", "odd_even", "exact", "cauchy", 65, torch.float32)  # P at n = 65: torch path, same contract
