"""Issue #5 target for primitive B on the CPU: forward+backward of token_logprobs(...).logp with a
random upstream at N=4096, H=1024, V=32768 (fp32), against naive PyTorch (full logits,
log_softmax, gather, autograd). Wall time: median of --reps runs (interleaved across backends) after one
warm-up at a small size; peak extra memory: flashloss.benchmark.memory in a fresh subprocess (tests/memory_targets.py
token_logprobs_fwd_bwd). Also reports the machine's fp32 matmul ceiling and the achieved rate
(8NHV FLOPs for flashloss, 6NHV for naive).

  PYTHONPATH=python python bench/token_logprobs_cpu_target.py [--backends naive,torch,cpu]
      [--n 4096 --h 1024 --v 32768] [--reps 2] [--memory]
"""
import argparse
import os
import statistics
import sys
import time

import torch

import flashloss
from flashloss.benchmark.memory import measure_peak_extra

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests")


def naive(hidden, weight, t):
    logits = hidden @ weight.T
    return torch.log_softmax(logits, -1).gather(-1, t[:, None])[:, 0]


def run_once(backend, hidden, weight, t, g):
    t0 = time.perf_counter()
    if backend == "naive":
        logp = naive(hidden, weight, t)
    else:
        logp = flashloss.ops.token_logprobs(hidden, weight, t, backend=backend).logp
    torch.autograd.grad(logp, (hidden, weight), g)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="naive,torch,cpu")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--memory", action="store_true")
    a = ap.parse_args()
    print(f"flashloss from {os.path.dirname(flashloss.__file__)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    x = torch.randn(4096, 4096)
    x @ x
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x @ x
        best = min(best, time.perf_counter() - t0)
    ceiling = 2 * 4096 ** 3 / best / 1e9
    print(f"fp32 matmul ceiling (4096^3, best of 3): {ceiling:.1f} GFLOP/s", flush=True)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.n, a.h, generator=gen).requires_grad_(True)
    weight = (torch.randn(a.v, a.h, generator=gen) / a.h ** 0.5).requires_grad_(True)
    t = torch.randint(0, a.v, (a.n,), generator=gen)
    g = torch.randn(a.n, generator=gen)
    backends = a.backends.split(",")
    for backend in backends:
        run_once(backend, hidden[:64].detach().requires_grad_(True), weight[:512].detach().requires_grad_(True),
                 t[:64] % 512, g[:64])
    # interleaved (rep by rep over the backends), so that load from other processes on a shared
    # machine hits every backend alike
    times = {b: [] for b in backends}
    for _ in range(a.reps):
        for backend in backends:
            times[backend].append(run_once(backend, hidden, weight, t, g))
    for backend in backends:
        med = statistics.median(times[backend])
        flops = (6 if backend == "naive" else 8) * a.n * a.h * a.v
        line = (f"{backend:6s} time {med:7.2f} s (runs {', '.join(f'{x:.2f}' for x in times[backend])}); "
                f"{flops / med / 1e9:6.1f} GFLOP/s = {flops / med / 1e9 / ceiling:.0%} of ceiling")
        if a.memory:
            r = measure_peak_extra("memory_targets:token_logprobs_fwd_bwd",
                                   dict(n=a.n, h=a.h, v=a.v, backend=backend), sys_path=[TESTS],
                                   warmup_kwargs=dict(n=64, h=a.h, v=512, backend=backend))
            line += f"; peak extra {r['peak_extra_bytes'] / 2**20:8.1f} MiB"
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
