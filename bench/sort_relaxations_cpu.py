"""Primitive C per relaxation on the CPU: forward+backward of sort_network at B=1024, n=32,
odd-even, steepness 10, fp32, random upstreams, once with P (upstreams on sorted and P) and once
values only (upstream on sorted). Wall time: median of --reps runs after one warm-up. Shows which
relaxations the cpu backend vectorises (cauchy, logistic) and which still call libm per lane.

  PYTHONPATH=python python bench/sort_relaxations_cpu.py [--backend cpu] [--b 1024 --n 32] [--reps 15]
"""
import argparse
import statistics
import time

import torch

import flashloss
from flashloss.ops.sort_network import RELAXATIONS


def median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--b", type=int, default=1024)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.b, args.n, generator=gen, requires_grad=True)
    g_sorted = torch.randn(args.b, args.n, generator=gen)
    g_P = torch.randn(args.b, args.n, args.n, generator=gen)
    print(f"backend={args.backend} B={args.b} n={args.n} odd_even fp32, torch threads {torch.get_num_threads()}")
    print("| relaxation | fwd+bwd with P | fwd+bwd values only |\n|---|---|---|")
    for rel in RELAXATIONS:
        def with_P():
            r = flashloss.sort_network(x, "odd_even", rel, 10.0, return_P=True, backend=args.backend)
            torch.autograd.backward([r.sorted, r.P], [g_sorted, g_P])

        def values_only():
            flashloss.sort_network(x, "odd_even", rel, 10.0, backend=args.backend).sorted.backward(g_sorted)

        print(f"| {rel} | {median_ms(with_P, args.reps):.2f} ms | {median_ms(values_only, args.reps):.2f} ms |")


if __name__ == "__main__":
    main()
