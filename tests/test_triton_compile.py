"""The Triton kernels compile for the GPU without a GPU (tests/triton_compile.py, in a subprocess):
every token_logprobs kernel in every dtype (with and without softcap for bf16 and fp32) at the tile
sizes the launchers pick for H100 (sm_90a), and bf16 for A100 (sm_80), with at most 128 bytes of
register spills, tensor-core (wgmma) dots for bf16/fp16 on sm_90a, and relaxed fire-and-forget
reductions (no acq_rel atomics) in the atomic backward. This is the compile-time half of the GPU
checks; running the kernels needs a GPU (bench/gpu_all.sh)."""
import json
import os
import subprocess
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
@pytest.mark.parametrize("arch,dtypes,pairs", [(90, "", 6), (80, "bf16", 2)], ids=["sm90", "sm80_bf16"])
def test_token_logprobs_kernels_compile(arch, dtypes, pairs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(TESTS_DIR, "triton_compile.py"), "--arch", str(arch),
                          "--dtypes", dtypes], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if rows and "unavailable" in rows[0]:
        pytest.skip(rows[0]["unavailable"])
    assert len(rows) == pairs * 4, out.stdout[-4000:]  # (dtype, softcap) pairs x kernels
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed[0]
    for r in rows:
        what = (f"sm_{arch} {r['kernel']} {r['dtype']} softcap={r['softcap']} ({r['BM']}x{r['BN']}x{r['BK']}, "
                f"{r['warps']} warps)")
        assert r["stack_bytes"] <= 128, f"{what}: {r['stack_bytes']} bytes of spills"
        if r["dtype"] in ("bf16", "fp16") and arch >= 90:
            assert r["wgmma"], f"{what}: no tensor-core dot"
        if r["kernel"] == "bwd":
            assert r["relaxed_red"] and not r["acq_rel_atom"], f"{what}: atomics are not relaxed reductions"


@pytest.mark.slow
def test_sort_network_kernels_compile():
    """Every sort_network kernel (forward, backward) for the sizes and relaxations of
    triton_compile.SORT_CASES in fp32, fp64 and bf16, at the launcher's tiles for H100, within the
    kernels' limits (larger n run the torch implementation): compiles with <= 128 bytes of spills
    and no atomics (the backward's cross-row sums go through per-program partials)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(TESTS_DIR, "triton_compile.py"), "--arch", "90", "--op",
                          "sort_network"], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if rows and "unavailable" in rows[0]:
        pytest.skip(rows[0]["unavailable"])
    assert len(rows) >= 20, out.stdout[-4000:]
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed[0]
    for r in rows:
        what = f"{r['kernel']} {r['case']} {r['dtype']} ({r['ROWS']} rows, {r['warps']} warps)"
        assert r["stack_bytes"] <= 128, f"{what}: {r['stack_bytes']} bytes of spills"
        assert not r["relaxed_red"] and not r["acq_rel_atom"], f"{what}: atomics"
