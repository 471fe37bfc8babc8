"""The dpo_fused benchmark case (issue #6) at a tiny size: every implementation that runs here gives
a finite time and the naive path's gradients; Liger is reported CUDA only on a CPU."""
import math

import pytest
import torch

from flashloss.benchmark.harness import get_case
from flashloss.benchmark.report import Progress, run_case, select_cases

TINY = {"B": 2, "T": 12, "H": 16, "V": 64}
CEILING = {"matmul_flops_per_s": 1e11, "copy_bytes_per_s": 1e10}


def test_dpo_fused_case_is_listed_with_its_target():
    c = get_case("dpo_fused")
    assert [i.name for i in c.impls] == ["naive", "liger", *(f"flashloss[{b}]" for b in ("torch", "cpu", "cuda",
                                                                                            "triton"))]
    assert {"B": 8, "T": 512, "H": 1024, "V": 32768} in c.sizes_full  # the CPU target of issue #6
    assert c.flops(TINY) == 6 * 2 * 2 * 12 * 16 * 64 + 2 * 2 * 2 * 12 * 16 * 64
    assert "dpo_fused" not in {x.name for x in select_cases(None, quick=True)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rows")
def test_dpo_fused_runs_at_tiny_size():
    rows = run_case(get_case("dpo_fused"), "cpu", True, CEILING, False, Progress(0, enabled=False),
                    ["naive", "liger", "flashloss[torch]", "flashloss[cpu]"], sizes=[TINY])
    by = {r["impl"]: r for r in rows}
    assert by["liger"]["status"] == "unavailable" and "CUDA only" in by["liger"]["reason"]
    for name in ("naive", "flashloss[torch]"):
        assert by[name]["status"] == "ok" and math.isfinite(by[name]["time_s"]), by[name]
    assert by["flashloss[cpu]"]["status"] in ("ok", "unavailable")


def test_dpo_fused_implementations_agree():
    c = get_case("dpo_fused")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tol = 1e-5 if device == "cpu" else 5e-4
    grads = {i.name: i.setup(TINY, device, torch.float32)() for i in c.impls if i.available(device)[0]}
    ref = grads.pop("naive")
    assert "flashloss[torch]" in grads
    for name, got in grads.items():
        for g, r in zip(got, ref):
            err = ((g.double() - r.double()).norm() / r.double().norm()).item()
            assert err <= tol, (name, err)
