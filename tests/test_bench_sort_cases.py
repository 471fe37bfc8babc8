"""The benchmark cases of primitive C (sort_network, groco_loss) at tiny sizes: every implementation
that runs here gives a finite time and peak memory and the same gradients as the naive path (the
diffsort-style dense layer products; GroCo's dense B x B path); missing ones say why."""
import math

import pytest
import torch

from anchors import require_anchor
from flashloss.benchmark.cases import dense_sort, groco_dense
from flashloss.benchmark.harness import get_case
from flashloss.benchmark.report import Progress, run_case, select_cases

CEILING = {"matmul_flops_per_s": 1e11, "copy_bytes_per_s": 1e10}
TINY = {"sort_network": {"B": 16, "n": 7}, "groco_loss": {"B": 48, "D": 16}}
FLASHLOSS = tuple(f"flashloss[{b}]" for b in ("torch", "cpu", "cuda", "triton"))


def test_sort_cases_list_every_implementation_and_the_issue_targets():
    sort = get_case("sort_network")
    assert [i.name for i in sort.impls] == ["naive", "diffsort", "torchsort[soft_rank]", *FLASHLOSS]
    assert {"B": 1024, "n": 32} in sort.sizes_full  # the CPU target of issue #7
    groco = get_case("groco_loss")
    assert [i.name for i in groco.impls] == ["naive", "diffsort", *FLASHLOSS]
    assert {"B": 4096, "D": 128} in groco.sizes_full
    quick = {c.name for c in select_cases(None, quick=True)}
    assert {"sort_network", "groco_loss"} <= quick
    assert sort.sizes_quick == [{"B": 256, "n": 16}] and groco.sizes_quick == [{"B": 1024, "D": 128}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rows")
@pytest.mark.parametrize("case", ["sort_network", "groco_loss"])
def test_sort_cases_run_at_tiny_size(case):
    rows = run_case(get_case(case), "cpu", True, CEILING, True, Progress(0, enabled=False),
                    ["naive", "flashloss[torch]", "flashloss[cuda]"], sizes=[TINY[case]])
    by_impl = {r["impl"]: r for r in rows}
    for name in ("naive", "flashloss[torch]"):
        r = by_impl[name]
        assert r["status"] == "ok", r
        assert math.isfinite(r["time_s"]) and r["time_s"] > 0 and r["peak_extra_bytes"] is not None
    assert by_impl["flashloss[cuda]"]["status"] == "unavailable" and by_impl["flashloss[cuda]"]["reason"]


@pytest.mark.parametrize("case", ["sort_network", "groco_loss"])
def test_sort_case_implementations_agree(case):
    """Every implementation with P returns the naive path's gradient (fp32): wired with the same
    network, relaxation, steepness and upstreams. torchsort computes other values (soft ranks only)."""
    c = get_case(case)
    grads = {}
    for impl in c.impls:
        if impl.available("cpu")[0] and not impl.name.startswith("torchsort"):
            grads[impl.name] = impl.setup(TINY[case], "cpu", torch.float32)()
    assert "naive" in grads and "flashloss[torch]" in grads
    ref = grads.pop("naive")
    for name, got in grads.items():
        for g, r in zip(got, ref):
            err = ((g.double() - r.double()).norm() / r.double().norm()).item()
            assert err <= 1e-5, (name, err)


def test_naive_baselines_are_diffsort():
    diffsort = require_anchor("diffsort", "the naive baseline transcribes it")
    x = torch.randn(5, 11, dtype=torch.float64)
    for steep in (10.0, 1.0):
        s, P = diffsort.DiffSortNet("odd_even", 11, steepness=steep)(x)
        s2, P2 = dense_sort(x, steep)
        assert torch.allclose(s, s2, atol=1e-14) and torch.allclose(P, P2, atol=1e-14)
    views = [torch.randn(40, 8, dtype=torch.float64) for _ in range(2)]
    sorter = diffsort.DiffSortNet("odd_even", 11, steepness=1)
    a = groco_dense(views, sorter=lambda v: sorter(v)[1])
    b = groco_dense(views)
    assert torch.allclose(a, b, atol=1e-7)  # groco_dense computes in fp32
