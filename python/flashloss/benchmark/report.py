"""`flashloss bench`: runs the registered cases and writes the report.

For every case, size and implementation, in one run: median time of forward+backward, peak extra
memory (fresh subprocess), speed and memory relative to the naive PyTorch reference, achieved
GFLOP/s and GB/s, and the fraction of the roofline bound built from this machine's ceiling
measured in the same run: bound = max(FLOPs / matmul rate, min bytes / copy bandwidth).
Outputs: a terminal table, results.json, results.md and PNG plots (time and peak memory against
size) in the output folder.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from typing import Any

import torch

from .. import __version__
from .harness import BenchCase, all_cases, measure_ceiling, time_callable
from .memory import measure_peak_extra


def memory_budget_bytes(device: str) -> float:
    """What one implementation may use: 70% of the memory available now (CPU) or free (GPU)."""
    if device == "cuda":
        return 0.7 * torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return 0.7 * int(line.split()[1]) * 1024
    return float("inf")


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled and sys.stderr.isatty()
        self.plain = enabled and not self.enabled

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            filled = int(width * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label[:60]:<60}")
            sys.stderr.flush()
            if self.done == self.total:
                sys.stderr.write("\n")
        elif self.plain:
            sys.stderr.write(f"[{self.done}/{self.total}] {label}\n")
            sys.stderr.flush()


def _machine(device: str) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "device": device}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def case_sizes(case: BenchCase, quick: bool, sizes: list[dict[str, int]] | None = None) -> list[dict[str, int]]:
    """The sizes to run: `sizes` if given (each must name exactly the case's size keys), else the
    case's quick or full list."""
    if not sizes:
        return case.sizes_quick if quick else case.sizes_full
    keys = set((case.sizes_quick or case.sizes_full)[0])
    for size in sizes:
        if set(size) != keys:
            raise ValueError(f"case {case.name} takes sizes with keys {sorted(keys)}, got {sorted(size)}")
    return [dict(s) for s in sizes]


def run_case(case: BenchCase, device: str, quick: bool, ceiling: dict[str, Any], memory: bool,
             progress: Progress, impl_filter: list[str] | None = None,
             sys_path: list[str] | None = None, sizes: list[dict[str, int]] | None = None) -> list[dict[str, Any]]:
    dtype = case.dtypes[device]
    sizes = case_sizes(case, quick, sizes)
    budget = memory_budget_bytes(device)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        for impl in case.impls:
            if impl_filter and impl.name not in impl_filter:
                continue
            row: dict[str, Any] = {"case": case.name, "size": dict(size), "impl": impl.name,
                                   "kind": impl.kind, "dtype": str(dtype).replace("torch.", ""),
                                   "status": "ok"}
            progress.step(f"{case.name} {case.label(size)} {impl.name}")
            ok, why = impl.available(device)
            if not ok:
                row.update(status="unavailable", reason=why)
                rows.append(row)
                continue
            if impl.estimate_bytes and impl.estimate_bytes(size, device, dtype) > budget:
                row.update(status="skipped", reason=(
                    f"needs ~{impl.estimate_bytes(size, device, dtype) / 2**30:.1f} GiB, "
                    f"budget {budget / 2**30:.1f} GiB"))
                rows.append(row)
                continue
            try:
                run = impl.setup(size, device, dtype)
                t = time_callable(run, device, warmup=1, repeats=3 if quick else 5,
                                  max_seconds=8 if quick else 30)
                del run
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
                if not isinstance(exc, (torch.OutOfMemoryError, MemoryError)) and "alloc" not in str(exc):
                    raise
                row.update(status="oom", reason=str(exc)[:200])
                rows.append(row)
                continue
            row["time_s"] = t["median_s"]
            row["runs"] = t["runs"]
            flops, nbytes = case.flops(size), case.min_bytes(size, dtype)
            row["gflops"] = flops / t["median_s"] / 1e9
            row["gbytes_per_s"] = nbytes / t["median_s"] / 1e9
            bound_s = max(flops / ceiling["matmul_flops_per_s"], nbytes / ceiling["copy_bytes_per_s"])
            row["roofline_fraction"] = bound_s / t["median_s"]
            row["bound"] = ("compute" if flops / ceiling["matmul_flops_per_s"] >= nbytes / ceiling["copy_bytes_per_s"]
                            else "memory")
            if memory:
                spec = {"case": case.name, "impl": impl.name, "device": device,
                        "dtype": str(dtype).replace("torch.", ""), "defined_in": case.defined_in}
                mem = measure_peak_extra(
                    "flashloss.benchmark.harness:memory_target", {**spec, "size": size},
                    device=device, sys_path=sys_path,
                    warmup_kwargs=None if case.warmup_size is None else {**spec, "size": case.warmup_size},
                )
                if mem.get("error") == "oom":
                    row["peak_extra_bytes"] = None
                    row["memory_note"] = "oom"
                else:
                    row["peak_extra_bytes"] = mem["peak_extra_bytes"]
            rows.append(row)
    # ratios against the naive reference at the same size
    for row in rows:
        naive = next((r for r in rows if r["size"] == row["size"] and r["kind"] == "naive"
                      and r["status"] == "ok"), None)
        if naive is None or row["status"] != "ok":
            continue
        row["speedup_vs_naive"] = naive["time_s"] / row["time_s"]
        if row.get("peak_extra_bytes") is not None and naive.get("peak_extra_bytes"):
            row["memory_vs_naive"] = row["peak_extra_bytes"] / naive["peak_extra_bytes"]
    return rows


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


COLUMNS = ["case", "size", "impl", "time", "speedup vs naive", "peak extra mem", "mem vs naive",
           "GFLOP/s", "GB/s", "of roofline"]


def _table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        size = " ".join(f"{k}={v}" for k, v in r["size"].items())
        if r["status"] != "ok":
            out.append([r["case"], size, r["impl"], r["status"], "", "", "", "", "", ""])
            continue
        out.append([
            r["case"], size, r["impl"], f"{r['time_s'] * 1e3:.2f} ms",
            f"{r['speedup_vs_naive']:.2f}x" if "speedup_vs_naive" in r else "-",
            _fmt_bytes(r.get("peak_extra_bytes")),
            f"{r['memory_vs_naive'] * 100:.1f}%" if "memory_vs_naive" in r else "-",
            f"{r['gflops']:.1f}", f"{r['gbytes_per_s']:.1f}",
            f"{r['roofline_fraction'] * 100:.1f}% ({r['bound']})",
        ])
    return out


def _reasons(rows: list[dict[str, Any]]) -> list[str]:
    """One line per implementation that did not run everywhere, with the reason."""
    seen: dict[tuple[str, str], str] = {}
    for r in rows:
        if r["status"] != "ok":
            seen.setdefault((r["impl"], r["status"]), r.get("reason", ""))
    return [f"{impl} {status}: {why}" for (impl, status), why in seen.items()]


def format_terminal(rows: list[dict[str, Any]]) -> str:
    table = [COLUMNS] + _table_rows(rows)
    widths = [max(len(str(line[i])) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    reasons = _reasons(rows)
    if reasons:
        lines += [""] + [f"note: {line}" for line in reasons]
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    c = report["ceiling"]
    m = report["machine"]
    head = [
        f"# flashloss benchmark ({report['mode']}, {report['device']})",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}; flashloss {report['flashloss']}, torch {m['torch']}, "
        f"{m.get('gpu') or m.get('cpu', '?')} ({m['cpu_count']} cores, {c['threads']} torch threads)",
        f"- measured ceiling: {c['matmul_dtype']} matmul {c['matmul_size']}^3 = "
        f"{c['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s; copy bandwidth {c['copy_bytes_per_s'] / 1e9:.1f} GB/s",
        "- time: median of forward+backward; peak extra memory: fresh subprocess, beyond inputs and "
        "returned gradients; roofline: max(FLOPs/matmul rate, min bytes/bandwidth) / time",
        "",
    ]
    table = [COLUMNS] + _table_rows(report["results"])
    body = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(COLUMNS)]
    body += ["| " + " | ".join(str(c) for c in line) + " |" for line in table[1:]]
    notes = _reasons(report["results"])
    if notes:
        body += [""] + [f"- {line}" for line in notes]
    return "\n".join(head + body) + "\n"


def write_plots(report: dict[str, Any], out_dir: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    cases = all_cases()
    for name in sorted({r["case"] for r in report["results"]}):
        rows = [r for r in report["results"] if r["case"] == name and r["status"] == "ok"]
        if not rows:
            continue
        x_key = cases[name].x_key
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        # one line per implementation and per value of the other size keys (a sweep over B and n
        # plotted against n gets one line per B)
        def others(r):
            return tuple((k, v) for k, v in r["size"].items() if k != x_key)

        several = len({others(r) for r in rows}) > 1
        for impl, rest in dict.fromkeys((r["impl"], others(r)) for r in rows):
            pts = sorted(((r["size"][x_key], r) for r in rows if r["impl"] == impl and others(r) == rest),
                         key=lambda p: p[0])
            label = impl + (" " + " ".join(f"{k}={v}" for k, v in rest) if several else "")
            xs = [p[0] for p in pts]
            axes[0].plot(xs, [p[1]["time_s"] * 1e3 for p in pts], marker="o", label=label)
            mem = [(x, p[1].get("peak_extra_bytes")) for x, p in zip(xs, pts)]
            mem = [(x, b / 2**20) for x, b in mem if b is not None]
            if mem:
                axes[1].plot([m[0] for m in mem], [max(m[1], 1e-2) for m in mem], marker="o", label=label)
        for ax, title, unit in ((axes[0], "time (fwd+bwd)", "ms"), (axes[1], "peak extra memory", "MiB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(x_key)
            ax.set_ylabel(unit)
            ax.set_title(f"{name}: {title}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def select_cases(case_names: list[str] | None, quick: bool) -> list[BenchCase]:
    """The named cases; without names every case, less those kept out of the quick report."""
    cases = all_cases()
    if case_names:
        return [cases[n] for n in case_names]
    return [c for c in cases.values() if c.in_quick_report or not quick]


def run_bench(case_names: list[str] | None, device: str, quick: bool, out_dir: str,
              memory: bool = True, impls: list[str] | None = None, command: str = "",
              sys_path: list[str] | None = None, sizes: list[dict[str, int]] | None = None) -> dict[str, Any]:
    """Runs the named cases (default: all; in quick mode all with in_quick_report) at their quick
    or full sizes, or at `sizes` when given, and writes the report to out_dir."""
    selected = select_cases(case_names, quick)
    # (a size that does not fit a case raises here, before any work)
    total = sum(len(case_sizes(c, quick, sizes)) * len(c.impls) for c in selected)
    progress = Progress(total + 1)
    progress.step("machine ceiling")
    ceiling = measure_ceiling(device, quick=quick)
    results: list[dict[str, Any]] = []
    for case in selected:
        results += run_case(case, device, quick, ceiling, memory, progress, impls, sys_path, sizes)
    report = {
        "flashloss": __version__,
        "mode": "quick" if quick else "full",
        "device": device,
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(device),
        "ceiling": ceiling,
        "results": results,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(format_markdown(report))
    report["plots"] = write_plots(report, out_dir)
    return report
