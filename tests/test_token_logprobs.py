"""Primitive B (flashloss.ops.token_logprobs) on every backend against the dense float64 reference:
every output, gradients of hidden, weight and bias under random per-token upstream gradients for
each output, ignored tokens (compacted away and in place), softcap/temperature/logit_scale, shapes
crossing every tile boundary, bf16; gradcheck; bad input; nothing saved for reference models."""
import importlib

import pytest
import torch

import flashloss
from flashloss import BackendUnavailableError, backend_available
from flashloss.ops import token_logprobs
from flashloss.ref import token_logprobs as ref_token_logprobs
from helpers import check_against_reference

ops_mod = importlib.import_module("flashloss.ops.token_logprobs")
ALL_OUTS = ("logp", "lse", "entropy", "z_sum", "log_sum_p2")
TRITON_MOD = "flashloss.triton_kernels.token_logprobs"


def _impls():
    return flashloss._backend.registered_ops()["token_logprobs"].impls


BACKENDS = [b for b in ("torch", "cpu") if b in _impls() and backend_available(b, "cpu")[0]]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    # shapes below cross several row blocks and vocabulary chunks of every backend
    monkeypatch.setattr(ops_mod, "TILE", (8, 16))


CONFIGS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "ignored": dict(ignore=True),
    "ignored_in_place": dict(ignore=True, compact=False),
    "all_ignored": dict(ignore="all"),
    "temperature_scale": dict(temperature=0.7, logit_scale=1.6, bias=True),
    "softcap": dict(softcap=3.0, temperature=1.3, logit_scale=2.0, ignore=True),
    "logp_only": dict(outs=("logp",)),
    "entropy_lse": dict(outs=("lse", "entropy"), ignore=True, compact=False),
    "other_ignore_index": dict(ignore=True, ignore_index=7),
}


def build(cfg, n, h, v, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (2.0 / h ** 0.5)
    bias = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5
    ignore_index = cfg.get("ignore_index", -100)
    t = torch.randint(0, v, (n,), generator=gen)
    if ignore_index >= 0:
        t[t == ignore_index] = (ignore_index + 1) % v
    if cfg.get("ignore") == "all":
        t[:] = ignore_index
    elif cfg.get("ignore"):
        t[1::3] = ignore_index
    kw = dict(ignore_index=ignore_index, temperature=cfg.get("temperature", 1.0),
              logit_scale=cfg.get("logit_scale", 1.0), softcap=cfg.get("softcap"))
    outs = cfg.get("outs", ALL_OUTS)
    use_bias = cfg.get("bias", False)
    inputs = [hidden, weight] + ([bias] if use_bias else [])

    def fn_for(backend):
        def fn(hidden, weight, bias=None):
            r = token_logprobs(hidden, weight, t, bias, outputs=outs, backend=backend, **kw)
            return tuple(getattr(r, o) for o in outs)
        return fn

    def ref(hidden, weight, bias=None):
        r = ref_token_logprobs(hidden, weight, t, bias, outputs=outs, **kw)
        return tuple(r[o] for o in outs)

    return inputs, fn_for, ref


SHAPES = [(1, 1, 1), (7, 5, 33), (37, 9, 50), (20, 16, 129)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_matches_reference(backend, config, shape, dtype, monkeypatch):
    cfg = CONFIGS[config]
    monkeypatch.setattr(ops_mod, "COMPACT_IGNORED", cfg.get("compact", True))
    inputs, fn_for, ref = build(cfg, *shape)
    check_against_reference(fn_for(backend), ref, inputs, dtype, naive=ref, name=f"{backend} {config} {shape}")


@pytest.mark.interpret
@pytest.mark.parametrize("config", ["plain", "bias", "ignored_in_place", "softcap", "entropy_lse", "all_ignored"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (19, 20, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_triton_interpreter_matches_reference(config, shape, dtype, monkeypatch):
    if "triton" not in _impls():
        pytest.fail("the triton backend of token_logprobs is not registered")
    cfg = CONFIGS[config]
    monkeypatch.setattr(ops_mod, "COMPACT_IGNORED", cfg.get("compact", True))
    inputs, fn_for, ref = build(cfg, *shape)
    check_against_reference(fn_for("triton"), ref, inputs, dtype, naive=ref, name=f"triton {config} {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch", "cuda"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 9, 50), (300, 128, 1000), (129, 512, 32011)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_matches_reference(backend, config, shape, dtype, monkeypatch):
    if backend not in _impls():
        pytest.skip(f"the {backend} backend of token_logprobs is not registered (flashloss._C without CUDA)")
    monkeypatch.setattr(ops_mod, "TILE", None)
    cfg = CONFIGS[config]
    monkeypatch.setattr(ops_mod, "COMPACT_IGNORED", cfg.get("compact", True))
    inputs, fn_for, ref = build(cfg, *shape)
    check_against_reference(fn_for(backend), ref, [x.cuda() for x in inputs], dtype, naive=ref,
                            name=f"{backend} {config} {shape}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("shape", [(37, 16, 2 * 1024 + 77), (4100, 4, 1030)], ids=["vocab_tail", "row_blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_default_tiles(backend, shape, dtype, monkeypatch):
    """The native backends with the tiles they choose themselves (TILE = None): a vocabulary that
    is not a multiple of the chunk (1024 columns on the CPU), and more rows than one block holds
    (16 MB of fp32 per tile: 4096 rows at 1024 columns), with ignored rows in place."""
    monkeypatch.setattr(ops_mod, "TILE", None)
    monkeypatch.setattr(ops_mod, "COMPACT_IGNORED", False)
    cfg = dict(bias=True, ignore=True, softcap=4.0, temperature=0.9)
    inputs, fn_for, ref = build(cfg, *shape, seed=3)
    check_against_reference(fn_for(backend), ref, inputs, dtype, naive=ref, name=f"{backend} default tiles {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    inputs, fn_for, _ = build(dict(bias=True, ignore=True, softcap=2.5, temperature=0.8), 9, 4, 21, seed=5)
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    assert torch.autograd.gradcheck(fn_for(backend), tuple(inputs), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dimensions_and_ignored_rows_get_no_gradient(backend):
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(40, 8, generator=gen, requires_grad=True)
    t = torch.randint(0, 40, (3, 5), generator=gen)
    t[1] = -100
    r = token_logprobs(hidden, weight, t, outputs=("logp", "entropy"), backend=backend)
    assert r.logp.shape == (3, 5) and r.entropy.shape == (3, 5) and r.lse is None
    assert torch.all(r.logp[1] == 0) and torch.all(r.entropy[1] == 0)
    (r.logp.sum() + r.entropy.sum()).backward()
    assert torch.all(hidden.grad[1] == 0) and hidden.grad[0].abs().sum() > 0
    expected = torch.log_softmax(hidden.detach() @ weight.detach().T, -1).gather(-1, t.clamp_min(0)[..., None])[..., 0]
    torch.testing.assert_close(r.logp[0], expected[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zero_loss_and_zero_gradients(backend):
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    bias = torch.randn(10, requires_grad=True)
    t = torch.full((6,), -100)
    r = token_logprobs(hidden, weight, t, bias, outputs=("logp", "lse", "entropy"), backend=backend)
    loss = -(r.logp.sum() + r.lse.sum() + r.entropy.sum())
    loss.backward()
    assert loss.item() == 0.0
    for x in (hidden, weight, bias):
        assert x.grad is not None and torch.all(x.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_model_path_saves_nothing(backend):
    hidden, weight = torch.randn(5, 4), torch.randn(9, 4)
    t = torch.randint(0, 9, (5,))
    r = token_logprobs(hidden, weight, t, backend=backend)
    assert r.logp.grad_fn is None  # no autograd node: no saved tensors
    with torch.no_grad():
        r2 = token_logprobs(hidden.requires_grad_(True), weight, t, backend=backend)
    assert r2.logp.grad_fn is None
    torch.testing.assert_close(r.logp, r2.logp)


def test_log_sum_p2_has_no_gradient():
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(9, 4)
    r = token_logprobs(hidden, weight, torch.randint(0, 9, (5,)), outputs=("log_sum_p2",))
    assert not r.log_sum_p2.requires_grad
    p = torch.softmax(hidden.detach() @ weight.T, -1)
    torch.testing.assert_close(r.log_sum_p2, (p * p).sum(-1).log())


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_beyond_the_tile_does_not_grow_with_the_vocabulary(backend):
    """Peak extra memory of forward+backward at V and 4V differs by the returned weight gradient's
    growth only (measured in a subprocess)."""
    from helpers import peak_extra_bytes
    small = peak_extra_bytes("memory_targets:token_logprobs_fwd_bwd", dict(n=512, h=64, v=8192, backend=backend))
    large = peak_extra_bytes("memory_targets:token_logprobs_fwd_bwd", dict(n=512, h=64, v=32768, backend=backend))
    naive_small = 512 * 8192 * 4  # one fp32 logit matrix at the small size
    assert large - small < naive_small / 4, (small, large)


def test_compile_fullgraph():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    t = torch.randint(0, 30, (6,))
    t[2] = -100

    def f(hidden, weight):
        r = token_logprobs(hidden, weight, t, outputs=("logp", "entropy"), backend="torch")
        return (r.logp * 2 + r.entropy).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(hidden, weight)
    out.backward()
    g = hidden.grad.clone()
    hidden.grad = None
    weight.grad = None
    f(hidden, weight).backward()
    torch.testing.assert_close(out, f(hidden, weight))
    torch.testing.assert_close(g, hidden.grad)


H = torch.randn(4, 8)
W = torch.randn(20, 8)
T = torch.randint(0, 20, (4,))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(targets=torch.tensor([0, 1, 20, 3])), IndexError, r"targets must be in \[0, 20\)"),
    (dict(targets=torch.tensor([0, 1, -1, 3])), IndexError, r"targets must be in \[0, 20\) or ignore_index=-100"),
    (dict(targets=torch.tensor([0, 1, 2])), ValueError, r"targets must have shape \[4\]"),
    (dict(targets=T.float()), TypeError, "targets must have dtype"),
    (dict(weight=torch.randn(20, 7)), ValueError, r"weight must have shape \[V, H=8\]"),
    (dict(weight=torch.randn(20, 8, dtype=torch.float64)), TypeError, "weight must have dtype"),
    (dict(hidden=H.long()), TypeError, "hidden must have dtype"),
    (dict(bias=torch.randn(19)), ValueError, r"bias must have shape \[V=20\]"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be None or a finite number > 0"),
    (dict(outputs=("logp", "nll")), ValueError, "outputs must be"),
    (dict(backend="nope"), ValueError, "backend must be one of"),
])
def test_bad_input(kwargs, err, match):
    args = dict(hidden=H, weight=W, targets=T)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        token_logprobs(**args)


def test_missing_backend_raises_clearly():
    if backend_available("triton", "cpu")[0]:
        pytest.skip("triton serves CPU tensors here (TRITON_INTERPRET=1)")
    with pytest.raises(BackendUnavailableError, match="triton"):
        token_logprobs(H, W, T, backend="triton")


@pytest.mark.interpret
def test_triton_filter_skips_negligible_tiles_within_bounds(monkeypatch):
    """The CCE-style backward filter: forced on for fp32 with bf16's threshold (2^-12) it changes
    the gradients (tiles really are skipped) but only by softmax mass below eps; off (the fp32
    default) the result is exact."""
    if "triton" not in _impls():
        pytest.fail("the triton backend of token_logprobs is not registered")
    monkeypatch.setattr(importlib.import_module(TRITON_MOD), "FILTER_EPS", 2.0 ** -12)
    gen = torch.Generator().manual_seed(11)
    n, h, v = 2, 8, 80  # 5 vocabulary tiles of 16, one row block; peaked softmax: most tiles below eps
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen)
    t = torch.randint(0, v, (n,), generator=gen)
    g = torch.randn(n, generator=gen)

    def grads(filter_env):
        monkeypatch.setenv("FLASHLOSS_TRITON_FILTER", filter_env)
        hh, ww = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        r = token_logprobs(hh, ww, t, logit_scale=10.0, backend="triton")
        return torch.autograd.grad(r.logp, (hh, ww), g)

    hh, ww = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = torch.autograd.grad(ref_token_logprobs(hh, ww, t, logit_scale=10.0)["logp"], (hh, ww), g.double())
    off, on = grads("0"), grads("1")
    for a, b, r in zip(off, on, ref):
        assert (a.double() - r).norm() / r.norm() < 1e-5
        assert not torch.equal(a, b)  # something was skipped
        assert (b.double() - r).norm() / r.norm() < 2e-3  # by softmax mass below 2^-12 per entry


def _triton_kernels():
    if "triton" not in _impls():
        pytest.fail("the triton backend of token_logprobs is not registered")
    return importlib.import_module(TRITON_MOD)


@pytest.mark.interpret
@pytest.mark.parametrize("splits,group_m", [(3, 2), (5, 8)])
def test_triton_vocab_tail_several_splits(splits, group_m, monkeypatch):
    """Forward with several vocabulary splits whose last one ends in a partial tile (V = 100 over
    16-column tiles), row blocks in grouped order with a partial last group (3 row blocks, groups
    of 2), every output and gradient, ignored rows in place, bias and softcap."""
    tk = _triton_kernels()
    monkeypatch.setattr(tk, "SPLITS", splits)
    monkeypatch.setattr(tk, "GROUP_M", group_m)
    monkeypatch.setattr(ops_mod, "COMPACT_IGNORED", False)
    n_splits, per_split = tk.split_plan(100, 16, 3, "cpu")
    assert n_splits >= 3 and 100 % per_split and 100 % 16  # several splits, partial last split and tile
    cfg = dict(bias=True, ignore=True, softcap=4.0, temperature=0.9)
    inputs, fn_for, ref = build(cfg, 37, 20, 100, seed=4)
    check_against_reference(fn_for("triton"), ref, inputs, torch.float32, naive=ref,
                            name=f"triton splits={splits} group={group_m}")


def _grads(hidden, weight, bias, t, g, outs=("logp",), **kw):
    hh, ww, bb = (x.clone().requires_grad_(True) for x in (hidden, weight, bias))
    r = token_logprobs(hh, ww, t, bb, outputs=outs, backend="triton", **kw)
    loss = sum((getattr(r, o) * gi).sum() for o, gi in zip(outs, g))
    return (getattr(r, outs[0]),) + torch.autograd.grad(loss, (hh, ww, bb))


def _peaked_problem(dtype, n=6, h=8, v=96, seed=11):
    """A peaked softmax (logit_scale 10): most 16-column tiles hold only p < 2^-12."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = torch.randn(v, h, generator=gen).to(dtype)
    bias = (torch.randn(v, generator=gen) * 0.1).to(dtype)
    t = torch.randint(0, v, (n,), generator=gen)
    g = [torch.randn(n, generator=gen) for _ in range(4)]
    return hidden, weight, bias, t, g


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("outs", [("logp",), ("logp", "z_sum"), ("lse", "entropy")], ids="+".join)
def test_triton_filter_default_on_for_16_bit(dtype, outs, monkeypatch):
    """bf16/fp16 filter on by default: through token_logprobs the gradients stay within the
    bf16/fp16 bound of the float64 reference; in the kernels' fp32 accumulators (before the cast
    to the input dtype hides it) the result differs from the unfiltered one, for both backward
    schemes: tiles really are skipped. With a z_sum gradient (label smoothing) the constant term
    goes around the tiles, so they are still skipped."""
    tk = _triton_kernels()
    assert tk.filter_on(dtype) and not tk.filter_on(torch.float32) and not tk.filter_on(torch.float64)
    monkeypatch.delenv("FLASHLOSS_TRITON_FILTER", raising=False)
    hidden, weight, bias, t, g = _peaked_problem(dtype)
    kw = dict(logit_scale=10.0)
    on = _grads(hidden, weight, bias, t, g, outs, **kw)
    ref_in = [x.double().requires_grad_(True) for x in (hidden, weight, bias)]
    r = ref_token_logprobs(*ref_in[:2], t, ref_in[2], outputs=outs, **kw)
    loss = sum((r[o] * gi.double()).sum() for o, gi in zip(outs, g))
    for a, rr in zip(on[1:], torch.autograd.grad(loss, ref_in)):
        assert (a.double() - rr).norm() / rr.norm() < 2e-2

    want = sum(1 << ALL_OUTS.index(o) for o in set(outs) | {"lse"})
    spec = ops_mod.Spec(-100, 1.0, 10.0, 0.0, want)
    _, lse, ent, _, _ = tk.forward(spec, hidden, weight, bias, t)
    ups = [gi if o in outs else torch.zeros(0) for gi, o in zip(g, ALL_OUTS)]  # logp, lse, entropy, z_sum

    def kernel_grads(filter_env):
        monkeypatch.setenv("FLASHLOSS_TRITON_FILTER", filter_env)
        return tk.backward(spec, hidden, weight, bias, t, lse, ent, *ups, (True, True, True))

    for det in (False, True):
        monkeypatch.setattr(tk, "DETERMINISTIC", det)
        k_on, k_off = kernel_grads("1"), kernel_grads("0")
        assert all(not torch.equal(a, b) for a, b in zip(k_on, k_off))


@pytest.mark.interpret
def test_triton_filter_never_drops_the_softcap_zsum_term(monkeypatch):
    """With a softcap the z_sum term s * dz/dx varies along the vocabulary and stays in the tiles:
    the filter must then keep every tile (forced on, fp32: exact)."""
    tk = _triton_kernels()
    monkeypatch.setattr(tk, "FILTER_EPS", 2.0 ** -12)
    hidden, weight, bias, t, g = _peaked_problem(torch.float32)
    kw = dict(logit_scale=10.0, softcap=5.0)
    outs = ("logp", "z_sum")
    monkeypatch.setenv("FLASHLOSS_TRITON_FILTER", "1")
    on = _grads(hidden, weight, bias, t, g, outs, **kw)
    monkeypatch.setenv("FLASHLOSS_TRITON_FILTER", "0")
    off = _grads(hidden, weight, bias, t, g, outs, **kw)
    for a, b in zip(on, off):
        assert torch.equal(a, b)


@pytest.mark.interpret
@pytest.mark.parametrize("config", ["plain", "softcap", "entropy_lse", "all_ignored"])
def test_triton_deterministic_scheme(config, monkeypatch):
    """The deterministic backward (dhidden kernel over the vocabulary, dW kernel over the rows, no
    atomics): matches the float64 reference like the atomic scheme, and two runs are bitwise
    equal."""
    tk = _triton_kernels()
    monkeypatch.setattr(tk, "DETERMINISTIC", True)
    cfg = dict(CONFIGS[config], bias=True)
    monkeypatch.setattr(ops_mod, "COMPACT_IGNORED", cfg.get("compact", True))
    inputs, fn_for, ref = build(cfg, 19, 20, 37)
    check_against_reference(fn_for("triton"), ref, inputs, torch.float32, naive=ref, name=f"triton det {config}")
    check_against_reference(fn_for("triton"), ref, inputs, torch.bfloat16, naive=ref, name=f"triton det {config}")

    def run():
        xs = [x.float().requires_grad_(True) for x in inputs]
        outs = fn_for("triton")(*xs)
        gen = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
        return list(outs) + list(torch.autograd.grad(loss, xs, allow_unused=True))

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.interpret
def test_triton_deterministic_switch(monkeypatch):
    tk = _triton_kernels()
    monkeypatch.delenv("FLASHLOSS_TRITON_DETERMINISTIC", raising=False)
    assert tk.deterministic() == torch.are_deterministic_algorithms_enabled()
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert tk.deterministic()
        monkeypatch.setenv("FLASHLOSS_TRITON_DETERMINISTIC", "0")
        assert not tk.deterministic()
    finally:
        torch.use_deterministic_algorithms(previous)
    monkeypatch.setenv("FLASHLOSS_TRITON_DETERMINISTIC", "1")
    assert tk.deterministic()
    monkeypatch.setattr(tk, "DETERMINISTIC", False)
    assert not tk.deterministic()


@pytest.mark.interpret
def test_triton_no_rows():
    _triton_kernels()
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    r = token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), outputs=ALL_OUTS, backend="triton")
    assert all(getattr(r, o).shape == (0,) for o in ALL_OUTS)
    (r.logp.sum() + r.entropy.sum() + r.z_sum.sum()).backward()
    assert hidden.grad.shape == (0, 8) and torch.all(weight.grad == 0)
