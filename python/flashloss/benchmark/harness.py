"""Benchmark cases, timing and the machine ceiling.

A BenchCase names an operation, its sizes (a quick list run by default and a full list), its
FLOP and minimum-byte counts per size, and the implementations to compare: the naive PyTorch
reference (flashloss.ref), each flashloss backend, and any installed peer library. Every
implementation is a `setup(size, device, dtype) -> run` function: setup builds the inputs, run()
does forward+backward and returns what the caller keeps, so the same function serves timing here
and the subprocess memory measurement (flashloss.benchmark.memory).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Size = dict[str, int]


@dataclass
class Impl:
    name: str  # shown in tables: "naive", "flashloss[cpu]", "open_clip", ...
    kind: str  # "naive" | "flashloss" | "peer" | "builtin"
    setup: Callable[[Size, str, torch.dtype], Callable[[], Any]]
    # (device) -> (ok, reason); unavailable implementations are listed with the reason
    available: Callable[[str], tuple[bool, str]] = lambda device: (True, "")
    # (size, device, dtype) -> bytes the implementation is expected to need at peak; sizes over the
    # memory budget are reported as skipped instead of being run into the OOM killer
    estimate_bytes: Callable[[Size, str, torch.dtype], float] | None = None


@dataclass
class BenchCase:
    name: str
    description: str
    sizes_quick: list[Size]
    sizes_full: list[Size]
    flops: Callable[[Size], float]  # useful FLOPs of forward+backward
    min_bytes: Callable[[Size, torch.dtype], float]  # compulsory memory traffic of forward+backward
    impls: list[Impl]
    x_key: str  # the size key plotted on the x axis
    dtypes: dict[str, torch.dtype] = field(default_factory=lambda: {"cpu": torch.float32, "cuda": torch.bfloat16})
    # warm-up size for the memory subprocess (loads libraries, compiles kernels)
    warmup_size: Size | None = None
    # module that registers this case: the memory subprocess imports it to find the case again
    defined_in: str = "flashloss.benchmark.cases"
    # False: `flashloss bench --quick` without --case leaves the case out (its anchors' imports and
    # compilation alone would take longer than the whole quick report); --full and --case run it
    in_quick_report: bool = True

    def label(self, size: Size) -> str:
        return " ".join(f"{k}={v}" for k, v in size.items())

    def impl(self, name: str) -> Impl:
        for impl in self.impls:
            if impl.name == name:
                return impl
        raise KeyError(f"case {self.name} has no implementation {name!r}")


_CASES: dict[str, BenchCase] = {}


def register_case(case: BenchCase) -> BenchCase:
    _CASES[case.name] = case
    return case


def all_cases() -> dict[str, BenchCase]:
    from . import cases  # noqa: F401  (registers the built-in cases)

    return dict(_CASES)


def get_case(name: str) -> BenchCase:
    cases = all_cases()
    if name not in cases:
        raise KeyError(f"unknown benchmark case {name!r}; known: {', '.join(sorted(cases))}")
    return cases[name]


def memory_target(case: str, impl: str, size: Size, device: str, dtype: str,
                  defined_in: str = "flashloss.benchmark.cases"):
    """Entry point for the memory subprocess: builds the inputs, returns run()."""
    import importlib

    importlib.import_module(defined_in)
    c = get_case(case)
    return c.impl(impl).setup(size, device, getattr(torch, dtype))


# ---------------------------------------------------------------------------------------------
# timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_callable(run: Callable[[], Any], device: str, *, warmup: int = 1, repeats: int = 5,
                  min_seconds: float = 0.0, max_seconds: float = 30.0) -> dict[str, float]:
    """Median wall time in seconds of run() after warm-up. CUDA: triton.testing.do_bench (CUDA
    events, median) when Triton is present, else CUDA events directly. CPU: perf_counter.
    Stops early once max_seconds of timed runs have accumulated (at least one timed run)."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            ms = do_bench(run, warmup=25, rep=100, return_mode="median")
            return {"median_s": ms / 1e3, "runs": -1}
        except ImportError:
            pass
    for _ in range(warmup):
        run()
        _sync(device)
    times: list[float] = []
    started = time.perf_counter()
    while True:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        if elapsed >= max_seconds or (len(times) >= repeats and elapsed >= min_seconds):
            break
    return {"median_s": statistics.median(times), "runs": len(times)}


# ---------------------------------------------------------------------------------------------
# machine ceiling, measured in the same run as the cases


def measure_ceiling(device: str, quick: bool = True) -> dict[str, Any]:
    """Matmul rate (fp32 on CPU, bf16 on GPU) and copy bandwidth of this machine, measured now."""
    if device == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 3072, torch.float32  # large enough to reach the BLAS peak (1536 does not)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_callable(lambda: a @ b, device, warmup=1, repeats=5, max_seconds=10)["median_s"]
    flops = 2.0 * n**3 / t
    numel = (1 << 26) if device == "cuda" else (1 << 25)  # 256 MB / 128 MB fp32 source
    src = torch.empty(numel, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    tc = time_callable(lambda: dst.copy_(src), device, warmup=1, repeats=5, max_seconds=10)["median_s"]
    bandwidth = 2.0 * src.numel() * src.element_size() / tc  # read + write
    return {
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_size": n,
        "matmul_flops_per_s": flops,
        "copy_bytes_per_s": bandwidth,
        "threads": torch.get_num_threads(),
    }
