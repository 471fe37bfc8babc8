"""The `flashloss bench` cases through pytest-benchmark: one benchmark per case, quick size and
available implementation (`make bench-pytest`; compare runs with --benchmark-autosave and
--benchmark-compare). Peak memory and the roofline are in `flashloss bench`; this suite is for
timing statistics and regressions between commits."""
import pytest
import torch

from flashloss.benchmark.harness import all_cases

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
    run = impl.setup(size, DEVICE, case.dtypes[DEVICE])
    benchmark.extra_info.update({"flops": case.flops(size), "size": size})
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    benchmark.pedantic(lambda: (run(), sync()), rounds=3, warmup_rounds=1)
