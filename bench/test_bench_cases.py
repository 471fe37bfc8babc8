"""The `flashloss bench` cases through pytest-benchmark: one benchmark per case, quick size and
available implementation (`make bench-pytest`; compare runs with --benchmark-autosave and
--benchmark-compare). Peak memory and the roofline are in `flashloss bench`; this suite is for
timing statistics and regressions between commits. Every registered case is here, also those left
out of the default quick report (token_logprobs, linear_cross_entropy: their anchors' imports and
compilation happen in setup, outside the timed rounds); CUDA-only cases skip on a CPU."""
import pytest
import torch

from flashloss.benchmark.harness import all_cases
from flashloss.benchmark.report import memory_budget_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PARAMS = [
    pytest.param(case, size, impl, id=f"{case.name}-{case.label(size).replace(' ', ',')}-{impl.name}")
    for case in all_cases().values()
    for size in case.sizes_quick
    for impl in case.impls
]


@pytest.mark.parametrize("case, size, impl", PARAMS)
def test_case(benchmark, case, size, impl):
    ok, why = impl.available(DEVICE)
    if not ok:
        pytest.skip(why)
    dtype = case.dtypes[DEVICE]
    if impl.estimate_bytes and impl.estimate_bytes(size, DEVICE, dtype) > memory_budget_bytes(DEVICE):
        # the same rule as `flashloss bench`: an implementation that cannot fit is reported, not run
        pytest.skip(f"{impl.name} needs ~{impl.estimate_bytes(size, DEVICE, dtype) / 2**30:.1f} GiB here")
    run = impl.setup(size, DEVICE, case.dtypes[DEVICE])
    benchmark.extra_info.update({"flops": case.flops(size), "size": size})
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    benchmark.pedantic(lambda: (run(), sync()), rounds=3, warmup_rounds=1)
