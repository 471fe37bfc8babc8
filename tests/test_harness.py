"""The harness must catch what it exists to catch: each helper against a planted error."""
import math

import pytest
import torch

import flashloss
from flashloss._debug import empty, poison_enabled, poisoning
from helpers import (
    assert_close,
    assert_memory_at_most_linear,
    check_against_reference,
    memory_growth_exponent,
    rel_err,
)


def ref_lse(x):
    return torch.logsumexp(x, dim=-1)


class _PlantedLse(torch.autograd.Function):
    """logsumexp with a configurable defect in forward or backward."""

    @staticmethod
    def forward(ctx, x, defect):
        out = empty(x.shape[0], dtype=x.dtype, device=x.device)
        vals = torch.logsumexp(x, dim=-1)
        if defect == "unwritten":
            out[:-1] = vals[:-1]  # the last element is never written
        else:
            out.copy_(vals)
        if defect == "nan":
            out[0] = float("nan")
        ctx.save_for_backward(x, vals)
        ctx.defect = defect
        return out

    @staticmethod
    def backward(ctx, g):
        x, lse = ctx.saved_tensors
        p = torch.exp(x - lse[:, None])
        if ctx.defect == "wrong_grad":
            return g[:, None] * p * 1.001, None
        if ctx.defect == "ignores_upstream":
            return p, None  # as if the upstream gradient were all ones
        return g[:, None] * p, None


def planted(defect):
    return lambda x: _PlantedLse.apply(x, defect)


X = lambda: [torch.randn(9, 33, dtype=torch.float64)]  # noqa: E731


def test_correct_implementation_passes():
    errs = check_against_reference(planted(None), ref_lse, X(), torch.float32)
    assert errs["out0"] < 1e-6 and errs["grad0"] < 1e-6


def test_catches_wrong_gradient():
    with pytest.raises(AssertionError, match="gradient of input 0"):
        check_against_reference(planted("wrong_grad"), ref_lse, X(), torch.float32)


def test_catches_backward_that_ignores_the_upstream_gradient():
    # With all-ones upstream gradients this defect would be invisible; random ones expose it.
    with pytest.raises(AssertionError, match="gradient"):
        check_against_reference(planted("ignores_upstream"), ref_lse, X(), torch.float32)


def test_catches_unwritten_output_through_poisoning():
    assert poison_enabled(), "conftest must enable FLASHLOSS_POISON"
    with pytest.raises(AssertionError, match="output 0"):
        check_against_reference(planted("unwritten"), ref_lse, X(), torch.float32)


def test_poisoned_allocation_is_nan_and_off_when_disabled():
    with poisoning(True):
        assert torch.isnan(empty(5, dtype=torch.float32, device="cpu")).all()
        assert (empty(5, dtype=torch.int64, device="cpu") == -1).all()
    with poisoning(False):
        assert not poison_enabled()
    assert poison_enabled()


def test_nan_never_passes():
    with pytest.raises(AssertionError, match="output 0"):
        check_against_reference(planted("nan"), ref_lse, X(), torch.float32)
    assert rel_err(torch.tensor([float("nan")]), torch.tensor([1.0])) == math.inf


def test_infinities_must_match_exactly():
    e = torch.tensor([float("-inf"), 1.0])
    assert rel_err(torch.tensor([float("-inf"), 1.0]), e) == 0.0
    assert rel_err(torch.tensor([0.0, 1.0]), e) == math.inf
    assert rel_err(torch.tensor([float("-inf"), float("inf")]), torch.tensor([float("-inf"), 1.0])) == math.inf


def test_tolerance_by_dtype():
    e = torch.ones(100, dtype=torch.float64)
    assert_close(e * (1 + 5e-6), e, torch.float32, "ok")
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(e * (1 + 5e-5), e, torch.float32, "too far")
    assert_close(e * (1 + 1e-2), e, torch.bfloat16, "ok")


def test_low_precision_must_not_be_worse_than_plain_pytorch():
    # A bf16 path that loses more precision than bf16 itself (kept only 4 mantissa bits): it may
    # pass the flat 2e-2 bound on some inputs, but not the "no worse than plain PyTorch" bound.
    def coarse(x):
        m, e = torch.frexp(torch.logsumexp(x.float(), dim=-1))
        return torch.ldexp(torch.round(m * 16) / 16, e)

    x = [torch.randn(64, 40, dtype=torch.float64) * 3]
    naive = lambda x: torch.logsumexp(x.float(), dim=-1)  # noqa: E731
    check_against_reference(naive, ref_lse, x, torch.bfloat16, naive=naive, grad_inputs=[])
    with pytest.raises(AssertionError):
        check_against_reference(coarse, ref_lse, x, torch.bfloat16, naive=naive, grad_inputs=[], tol=1.0)


@pytest.mark.slow
def test_memory_helper_flags_quadratic_allocation():
    make = lambda n: {"n": n}  # noqa: E731
    p_quad = memory_growth_exponent("memory_targets:quadratic_alloc", make, 1024, 4096)
    assert p_quad > 1.7, p_quad
    with pytest.raises(AssertionError, match="grows like"):
        assert_memory_at_most_linear("memory_targets:quadratic_alloc", make, 1024, 4096)
    p_lin = assert_memory_at_most_linear("memory_targets:linear_alloc", make, 16384, 65536)
    assert p_lin < 1.25


def test_import_does_not_load_triton():
    import subprocess
    import sys

    code = "import sys, flashloss; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
