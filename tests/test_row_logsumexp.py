"""flashloss.ops.row_logsumexp on every backend against the float64 reference."""
import os

import pytest
import torch

import flashloss
from flashloss import BackendUnavailableError, backend_available
from helpers import check_against_reference

CPU_BACKENDS = [b for b in ("torch", "cpu") if backend_available(b, "cpu")[0]]
SHAPES = [(1, 1), (7, 129), (3, 4097), (129, 33), (2, 10000)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def ref(x):
    return flashloss.ref.row_logsumexp(x)


def naive_same_dtype(x):
    return torch.logsumexp(x.float(), dim=-1)


def make_x(shape, masked_row=True, scale=3.0):
    x = torch.randn(*shape, dtype=torch.float64) * scale
    if masked_row and shape[0] > 1:
        x[1] = float("-inf")  # a fully masked row: LSE -inf, gradient 0
    if shape[1] > 2:
        x[0, ::3] = float("-inf")  # partly masked row
    return x


def fn(backend):
    return lambda x: flashloss.row_logsumexp(x, backend=backend)


def test_native_cpu_backend_is_built():
    # The README's install builds flashloss._C; a silent fallback to torch would hide a broken build.
    assert backend_available("cpu", "cpu")[0], backend_available("cpu", "cpu")[1]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, shape, dtype):
    check_against_reference(fn(backend), ref, [make_x(shape)], dtype, naive=naive_same_dtype,
                            name=f"{backend} {shape}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_row_gives_minus_inf_and_zero_gradient(backend):
    x = make_x((4, 50)).float().requires_grad_(True)
    out = flashloss.row_logsumexp(x, backend=backend)
    assert out[1] == float("-inf")
    (g,) = torch.autograd.grad(out, x, torch.randn(4))
    assert torch.all(g[1] == 0) and torch.isfinite(g).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_special_values(backend):
    x = torch.tensor([[1.0, float("inf"), 2.0], [1.0, float("nan"), 0.0], [1e30, 1e30, -1e30],
                      [-1e30, -1e30, -1e30]])
    out = flashloss.row_logsumexp(x, backend=backend)
    assert out[0] == float("inf")
    assert torch.isnan(out[1])
    torch.testing.assert_close(out[2:], torch.logsumexp(x[2:].double(), -1).float())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_leading_dims_and_strides(backend):
    base = torch.randn(3, 4, 70, dtype=torch.float64)
    # non-contiguous along V and along the leading dims
    for x in (base, base.transpose(0, 1), base[..., ::2], base.transpose(1, 2)):
        check_against_reference(fn(backend), ref, [x], torch.float32, name=f"{backend} strided")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    x = make_x((5, 37), masked_row=False).requires_grad_(True)
    assert torch.autograd.gradcheck(fn(backend), (x,), eps=1e-6, atol=1e-8)


@pytest.mark.interpret
@pytest.mark.parametrize("shape", [(1, 1), (3, 40), (2, 1500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_triton_interpreter_matches_reference(shape, dtype):
    check_against_reference(fn("triton"), ref, [make_x(shape)], dtype, naive=naive_same_dtype,
                            name=f"triton {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("shape", SHAPES + [(4, 1 << 20)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference(backend, shape, dtype):
    ok, why = backend_available(backend, "cuda")
    assert ok, why
    check_against_reference(fn(backend), lambda x: ref(x.cpu()).to(x.device),
                            [make_x(shape).cuda()], dtype,
                            naive=naive_same_dtype, name=f"{backend} {shape}")


def test_backends_agree_on_fp32_long_rows():
    x = torch.randn(3, 1 << 18) * 10
    outs = [flashloss.row_logsumexp(x, backend=b) for b in CPU_BACKENDS]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-5)


def test_compile_fullgraph():
    f = torch.compile(lambda x: flashloss.row_logsumexp(x).sum(), fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 100, requires_grad=True)
    f(x).backward()
    torch.testing.assert_close(x.grad, torch.softmax(x.detach(), -1))


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "arg, err, match",
    [
        (torch.ones(3, 4, dtype=torch.int64), TypeError, "x must have dtype"),
        (torch.tensor(1.0), ValueError, "at least 1 dimension"),
        ([[1.0, 2.0]], TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input(arg, err, match):
    with pytest.raises(err, match=match):
        flashloss.row_logsumexp(arg)


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend must be one of"):
        flashloss.row_logsumexp(torch.randn(2, 3), backend="fast")


def test_unavailable_backend_says_why():
    with pytest.raises(BackendUnavailableError, match="cuda.*(CUDA|cuda)"):
        flashloss.row_logsumexp(torch.randn(2, 3), backend="cuda")


def test_empty_rows_and_columns():
    assert flashloss.row_logsumexp(torch.randn(0, 5)).shape == (0,)
    out = flashloss.row_logsumexp(torch.randn(3, 0))
    assert torch.all(out == float("-inf"))
