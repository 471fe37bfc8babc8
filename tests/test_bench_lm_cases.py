"""The benchmark cases of primitive B (token_logprobs, token_logprobs_gpu_target,
linear_cross_entropy) at a tiny size: every implementation that runs on this machine gives a finite
time and peak memory and the same gradients as the naive path; the others are reported
unavailable with a reason. Also the `--size` option and the quick-report selection."""
import math

import pytest
import torch

from flashloss import cli
from flashloss.benchmark.harness import get_case
from flashloss.benchmark.report import Progress, run_case, select_cases

TINY = {"N": 64, "H": 32, "V": 256}
LM_CASES = ("token_logprobs", "linear_cross_entropy")
ANCHORS_ON_CPU = ("trl_selective_log_softmax", "trl_chunked", "cce[torch_compile]")  # the slow imports / compiles
CUDA_ONLY = ("cce", "liger")
FLASHLOSS = tuple(f"flashloss[{b}]" for b in ("torch", "cpu", "cuda", "triton"))


def test_lm_cases_list_every_implementation():
    tlp = get_case("token_logprobs")
    assert [i.name for i in tlp.impls] == ["naive", "trl_selective_log_softmax", "trl_chunked", "cce", "cce[torch_compile]",
                                           "liger", *FLASHLOSS]
    lce = get_case("linear_cross_entropy")
    assert [i.name for i in lce.impls] == ["naive", "cce", "cce[torch_compile]", "liger", *FLASHLOSS]
    gpu = get_case("token_logprobs_gpu_target")
    assert gpu.sizes_quick == [{"N": 16384, "H": 4096, "V": 128256}]
    assert {"N": 4096, "H": 1024, "V": 32768} in tlp.sizes_full  # the CPU target of issue #5
    # one FLOP count for every implementation: 6 N H V
    assert tlp.flops(TINY) == lce.flops(TINY) == 6 * 64 * 32 * 256
    if not torch.cuda.is_available():
        for impl in gpu.impls:
            ok, why = impl.available("cpu")
            assert not ok and "CUDA only" in why, impl.name


def _check_rows(rows, expect_ok, memory):
    by_impl = {r["impl"]: r for r in rows}
    for name in expect_ok:
        r = by_impl[name]
        assert r["status"] == "ok", (name, r)
        assert math.isfinite(r["time_s"]) and r["time_s"] > 0, name
        if memory:
            assert r["peak_extra_bytes"] is not None and r["peak_extra_bytes"] >= 0, name
        assert r["gflops"] > 0 and 0 < r["roofline_fraction"], name
    for name in CUDA_ONLY:
        if name in by_impl:
            assert by_impl[name]["status"] == "unavailable" and "CUDA only" in by_impl[name]["reason"]
    for name in FLASHLOSS:  # available or not depending on the build; never an unexplained gap
        if name not in by_impl:
            continue
        r = by_impl[name]
        assert r["status"] in ("ok", "unavailable"), r
        if r["status"] == "unavailable":
            assert r["reason"], name
        else:
            assert math.isfinite(r["time_s"]) and (r.get("peak_extra_bytes") is not None or not memory)
    if "flashloss[triton]" in by_impl:  # on CPU: the interpreter is not timed, or no backend yet
        assert by_impl["flashloss[triton]"]["status"] == "unavailable"


# a fixed ceiling instead of measuring one (the report's own test measures it)
CEILING = {"matmul_flops_per_s": 1e11, "copy_bytes_per_s": 1e10}


def _run(case, impls, memory):
    return run_case(get_case(case), "cpu", True, CEILING, memory, Progress(0, enabled=False), impls, sizes=[TINY])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rows")
def test_lm_cases_run_at_tiny_size():
    impls = ["naive", *CUDA_ONLY, *FLASHLOSS]
    for case, memory in (("token_logprobs", True), ("linear_cross_entropy", False)):
        rows = _run(case, impls, memory)
        assert [r["impl"] for r in rows] == [i.name for i in get_case(case).impls if i.name in impls]
        assert all(r["size"] == TINY for r in rows)
        _check_rows(rows, ["naive", "flashloss[torch]"], memory)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rows")
def test_lm_case_anchors_run_on_cpu():
    """TRL and CCE's torch.compile path run on CPU (their imports and compilation take ~30 s here),
    and the linear_cross_entropy rows get their memory measured."""
    rows = _run("token_logprobs", list(ANCHORS_ON_CPU), True)
    _check_rows(rows, list(ANCHORS_ON_CPU), True)
    rows = _run("linear_cross_entropy", ["naive", "cce[torch_compile]", *CUDA_ONLY, *FLASHLOSS], True)
    _check_rows(rows, ["naive", "cce[torch_compile]", "flashloss[torch]"], True)


@pytest.mark.slow
@pytest.mark.parametrize("case", LM_CASES)
def test_lm_case_implementations_agree(case):
    """Every implementation that runs here returns the naive path's gradients (fp32): the anchors
    are wired with the right sign, reduction and upstream gradient. On CUDA the Triton kernels
    multiply fp32 in tf32 (DESIGN.md §6: 5e-4)."""
    c = get_case(case)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tol = 1e-5 if device == "cpu" else 5e-4
    size = {"N": 128, "H": 64, "V": 512}
    grads = {}
    for impl in c.impls:
        if impl.available(device)[0]:
            grads[impl.name] = impl.setup(size, device, torch.float32)()
    assert "naive" in grads and "flashloss[torch]" in grads
    ref = grads.pop("naive")
    for name, got in grads.items():
        assert len(got) == 2  # d hidden, d weight
        for g, r in zip(got, ref):
            err = ((g.double() - r.double()).norm() / r.double().norm()).item()
            assert err <= tol, (name, err)


def test_quick_report_leaves_out_the_heavy_cases():
    quick = {c.name for c in select_cases(None, quick=True)}
    full = {c.name for c in select_cases(None, quick=False)}
    assert {"row_logsumexp", "clip_loss", "nt_xent"} <= quick
    for name in (*LM_CASES, "token_logprobs_gpu_target"):
        assert name in full and name not in quick
    assert [c.name for c in select_cases(["token_logprobs"], quick=True)] == ["token_logprobs"]


def test_bench_size_option(capsys):
    assert cli._parse_size("N=4096,H=1024,V=32768") == {"N": 4096, "H": 1024, "V": 32768}
    with pytest.raises(ValueError):
        cli._parse_size("N=4096,H")
    assert cli.main(["bench", "--size", "N=64,H=32,V=256", "--device", "cpu"]) == 2
    assert "--size needs --case" in capsys.readouterr().err
    assert cli.main(["bench", "--case", "token_logprobs", "--size", "N=64,D=32", "--device", "cpu"]) == 2
    assert "takes sizes with keys ['H', 'N', 'V']" in capsys.readouterr().err
