"""`flashloss info` and the benchmark harness end to end (on a tiny case registered here)."""
import json
import os
import subprocess
import sys

import torch

from flashloss.benchmark.harness import BenchCase, Impl, register_case
from flashloss.benchmark.report import format_terminal, run_bench
from helpers import TESTS_DIR


def test_info_reports_every_backend():
    res = subprocess.run([sys.executable, "-m", "flashloss", "info"], capture_output=True, text=True, check=True)
    out = res.stdout
    assert "flashloss 0." in out and "torch" in out
    for name in ("torch", "cpu", "triton", "cuda"):
        assert any(line.split()[:2] == ["cpu", name] for line in out.splitlines() if line.startswith("  ")), name
    assert "row_logsumexp: cpu: cpu" in out


def test_bench_list():
    res = subprocess.run([sys.executable, "-m", "flashloss", "bench", "--list"], capture_output=True,
                         text=True, check=True)
    assert "row_logsumexp" in res.stdout and "naive" in res.stdout


def _setup(fn):
    def setup(size, device, dtype):
        x = torch.randn(size["N"], 256, device=device, dtype=dtype, requires_grad=True)

        def run():
            (g,) = torch.autograd.grad(fn(x).sum(), x)
            return g

        return run

    return setup


TINY = register_case(BenchCase(
    name="tiny_softmax",
    description="test case",
    sizes_quick=[{"N": 256}, {"N": 1024}],
    sizes_full=[{"N": 256}],
    flops=lambda s: 4.0 * s["N"] * 256,
    min_bytes=lambda s, dt: 3.0 * s["N"] * 256 * 4,
    x_key="N",
    impls=[
        Impl("naive", "naive", _setup(lambda x: torch.log_softmax(x, -1)[:, 0])),
        Impl("other", "flashloss", _setup(lambda x: torch.logsumexp(x, -1))),
        Impl("missing", "peer", _setup(lambda x: x), available=lambda d: (False, "not installed here")),
        Impl("huge", "peer", _setup(lambda x: x), estimate_bytes=lambda s, d, t: 1e18),
    ],
    defined_in="test_cli_bench",
))


def test_bench_report_end_to_end(tmp_path):
    report = run_bench(["tiny_softmax"], "cpu", quick=True, out_dir=str(tmp_path), sys_path=[TESTS_DIR])
    rows = report["results"]
    assert len(rows) == 8
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["impl"] for r in ok} == {"naive", "other"}
    for r in ok:
        assert r["time_s"] > 0 and r["peak_extra_bytes"] is not None
        assert 0 < r["roofline_fraction"] and r["gflops"] > 0
        assert r["speedup_vs_naive"] > 0
    naive = [r for r in ok if r["impl"] == "naive"]
    assert all(r["speedup_vs_naive"] == 1.0 for r in naive)
    statuses = {r["impl"]: r["status"] for r in rows}
    assert statuses["missing"] == "unavailable" and statuses["huge"] == "skipped"
    assert report["ceiling"]["matmul_flops_per_s"] > 1e8
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["results"] == json.loads(json.dumps(rows))
    md = (tmp_path / "results.md").read_text()
    assert "| tiny_softmax |" in md and "not installed here" in md
    assert os.path.getsize(tmp_path / "tiny_softmax.png") > 1000
    table = format_terminal(rows)
    assert "speedup vs naive" in table and "note: missing unavailable" in table
