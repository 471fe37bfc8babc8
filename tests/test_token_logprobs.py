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
    """The CCE-style backward filter: forced on for fp32 it changes the gradients (tiles really are
    skipped) but only by softmax mass below eps; off (the fp32 default) the result is exact."""
    if "triton" not in _impls():
        pytest.fail("the triton backend of token_logprobs is not registered")
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
