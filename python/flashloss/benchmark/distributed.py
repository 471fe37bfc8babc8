"""Per-rank peak memory and step time of the distributed CLIP loss: the ring against the
all-gather paths, at several world sizes (issue #8).

    python -m flashloss.benchmark.distributed --world 2 --world 4 --rows 1024 --dim 1024

For each world size and implementation this spawns W fresh processes on one machine (gloo on CPU
tensors; --device cuda with NCCL needs one GPU per rank). Each rank holds `rows` image and text
embeddings [rows, dim] (fp32 on CPU) and runs forward+backward of the CLIP loss of its rows against
the global batch W * rows:
  ring       flashloss.distributed.clip_loss(impl="ring")    text blocks travel, images stay
  bidir      flashloss.distributed.clip_loss(impl="bidir")   blocks travel both ways
  gather     flashloss.distributed.clip_loss(impl="gather")  all-gather + blockwise loss
  open_clip  open_clip ClipLoss(local_loss=True, gather_with_grad=True): all-gather + dense logits
Time: median over --reps steps, each started after a barrier, of the slowest rank.
Peak extra memory: per rank, the high-water mark of the resident set during one step beyond what
was resident before it (inputs, model) and beyond the returned gradients, as in
flashloss.benchmark.memory (VmHWM reset through /proc/self/clear_refs, large blocks served by mmap);
on CUDA, torch's peak allocated bytes. The table gives the largest rank's value.
Several processes on fewer cores than ranks share the cores: times then measure the
oversubscribed machine, not the algorithm's scaling; memory is unaffected.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

IMPLS = ("ring", "bidir", "gather", "open_clip")
_MARK = "FLASHLOSS_DIST_BENCH "


def _rank_main(spec: dict) -> dict:
    """One rank: init the group, measure, return {"times": [...], "peak_extra_bytes": ...}."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import flashloss.distributed as fd
    from flashloss.benchmark._memory_child import _proc_status

    rank, world, impl = spec["rank"], spec["world"], spec["impl"]
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    torch.set_num_threads(spec["threads"])
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{spec['init']}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=600))
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator().manual_seed(rank)
    n, d = spec["rows"], spec["dim"]
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1).to(device, dtype).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1).to(device, dtype).requires_grad_()
    scale = torch.tensor(14.0, device=device, requires_grad=True)
    if impl == "open_clip":
        from flashloss.benchmark.anchors import open_clip_loss_module

        module = open_clip_loss_module().ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)

        def loss_fn():
            return module(img, txt, scale)
    else:
        def loss_fn():
            return fd.clip_loss(img, txt, scale, impl=impl)

    def step():
        img.grad = txt.grad = scale.grad = None
        loss_fn().backward()
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up: thread pools, first allocations, communicator set-up
    times = []
    for _ in range(spec["reps"]):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    img.grad = txt.grad = scale.grad = None
    dist.barrier()
    returned = 2 * n * d * img.element_size()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_fn().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _proc_status("VmRSS")
        loss_fn().backward()
        peak = _proc_status("VmHWM")
    dist.destroy_process_group()
    return {"times": times, "peak_extra_bytes": max(0, peak - base - returned)}


def run_one(world: int, impl: str, rows: int, dim: int, reps: int, device: str, timeout: float = 1200) -> dict:
    """Spawns `world` ranks for one implementation; returns the slowest rank's median step time and
    the largest rank's peak extra memory."""
    tmp = tempfile.mkdtemp(prefix="flashloss_dist_bench_")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    threads = max(1, (os.cpu_count() or 1) // world)
    procs = []
    for rank in range(world):
        spec = dict(rank=rank, world=world, impl=impl, rows=rows, dim=dim, reps=reps, device=device,
                    threads=threads, init=os.path.join(tmp, "init"))
        procs.append(subprocess.Popen([sys.executable, "-m", "flashloss.benchmark.distributed", "--rank-spec",
                                       json.dumps(spec)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    ranks = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        line = next((x for x in out.splitlines() if x.startswith(_MARK)), None)
        if p.returncode != 0 or line is None:
            for q in procs:
                q.kill()
            raise RuntimeError(f"{impl} at world size {world} failed (exit {p.returncode}):\n{err[-3000:]}")
        ranks.append(json.loads(line[len(_MARK):]))
    step_times = [max(r["times"][i] for r in ranks) for i in range(reps)]
    return {"world": world, "impl": impl, "rows": rows, "dim": dim, "global_batch": world * rows,
            "median_s": statistics.median(step_times), "step_times_s": step_times,
            "peak_extra_bytes": max(r["peak_extra_bytes"] for r in ranks),
            "peak_extra_bytes_per_rank": [r["peak_extra_bytes"] for r in ranks], "threads_per_rank": threads}


def _table(results: list[dict]) -> str:
    lines = ["| ranks | impl | global batch | step time (median) | peak extra memory per rank "
             "| vs all-gather (flashloss) |",
             "|---|---|---|---|---|---|"]
    ref = {r["world"]: r for r in results if r["impl"] == "gather"}
    for r in results:
        base = ref.get(r["world"])
        ratio = (f"{r['median_s'] / base['median_s']:.2f}x time, "
                 f"{r['peak_extra_bytes'] / max(base['peak_extra_bytes'], 1):.2f}x memory") if base else ""
        lines.append(f"| {r['world']} | {r['impl']} | {r['global_batch']} | {r['median_s']:.3f} s | "
                     f"{r['peak_extra_bytes'] / 2**20:.1f} MiB | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, action="append", help="world size (repeatable; default 2 and 4)")
    parser.add_argument("--impl", action="append", choices=IMPLS, help="implementation (repeatable; default all)")
    parser.add_argument("--rows", type=int, default=1024, help="rows per rank")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--rank-spec", help=argparse.SUPPRESS)  # internal: run one rank
    args = parser.parse_args(argv)
    if args.rank_spec:
        print(_MARK + json.dumps(_rank_main(json.loads(args.rank_spec))), flush=True)
        return 0
    results = []
    for world in args.world or [2, 4]:
        for impl in args.impl or IMPLS:
            res = run_one(world, impl, args.rows, args.dim, args.reps, args.device)
            results.append(res)
            print(f"W={world} {impl:9s} {res['median_s']:.3f} s  {res['peak_extra_bytes'] / 2**20:.1f} MiB",
                  flush=True)
    print()
    print(_table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
