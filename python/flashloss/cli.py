"""Command line: `flashloss info` and `flashloss bench` (also `python -m flashloss ...`)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys


def _info() -> int:
    import torch

    import flashloss
    from flashloss import _backend, _native

    triton = "not installed"
    if importlib.util.find_spec("triton") is not None:
        import triton as _triton

        triton = _triton.__version__
    print(f"flashloss {flashloss.__version__}")
    print(f"python    {platform.python_version()}")
    print(f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"triton    {triton}")
    native = "loaded" if _native.load(warn=False) else f"not loaded: {_native.load_error()}"
    if _native.load(warn=False):
        native += ", with CUDA kernels" if _native.compiled_with_cuda() else ", CPU kernels only"
    print(f"native    flashloss._C {native}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        print(f"device    cuda: {torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)")
    else:
        print("device    cpu only (torch.cuda.is_available() is False)")
    print(f"cpu       {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    env = os.environ.get("FLASHLOSS_BACKEND")
    if env:
        print(f"FLASHLOSS_BACKEND={env} (replaces 'auto')")
    print("backends:")
    for dev in devices:
        for name in _backend.BACKENDS:
            ok, why = _backend.backend_available(name, dev)
            print(f"  {dev:<4} {name:<7} {'yes' if ok else 'no '}  {why}")
    print("auto choice per op:")
    for op in sorted(_backend.registered_ops()):
        picks = ", ".join(f"{dev}: {_backend.resolve(op, 'auto', dev)}" for dev in devices)
        print(f"  {op}: {picks}")
    return 0


def _parse_size(text: str) -> dict[str, int]:
    """'N=4096,H=1024,V=32768' -> {'N': 4096, 'H': 1024, 'V': 32768}."""
    size: dict[str, int] = {}
    for part in text.split(","):
        key, sep, val = part.partition("=")
        if not sep or not key.strip() or not val.strip().isdigit():
            raise ValueError(f"expected KEY=INT[,KEY=INT...], got {text!r}")
        size[key.strip()] = int(val)
    return size


def _bench(args) -> int:
    import torch

    from flashloss.benchmark.harness import all_cases
    from flashloss.benchmark.report import case_sizes, format_terminal, run_bench

    if args.list:
        for name, case in sorted(all_cases().items()):
            print(f"{name}: {case.description}")
            print(f"  quick sizes: {[case.label(s) for s in case.sizes_quick]}")
            print(f"  full sizes:  {[case.label(s) for s in case.sizes_full]}")
            if not case.in_quick_report:
                print("  not in the default quick report (run with --full, or --quick --case " + name + ")")
            print(f"  implementations: {', '.join(i.name for i in case.impls)}")
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("flashloss bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    known = all_cases()
    for name in args.case or []:
        if name not in known:
            print(f"flashloss bench: unknown case {name!r}; known: {', '.join(sorted(known))}", file=sys.stderr)
            return 2
    sizes = None
    if args.size:
        if not args.case:
            print("flashloss bench: --size needs --case (sizes are per case)", file=sys.stderr)
            return 2
        try:
            sizes = [_parse_size(text) for text in args.size]
            for name in args.case:
                case_sizes(known[name], not args.full, sizes)
        except ValueError as exc:
            print(f"flashloss bench: --size: {exc}", file=sys.stderr)
            return 2
    command = "flashloss bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "flashloss bench"
    report = run_bench(args.case, device, quick=not args.full, out_dir=args.out,
                       memory=not args.no_memory, impls=args.impl, command=command.strip(), sizes=sizes)
    print(format_terminal(report["results"]))
    print(f"\nceiling: {report['ceiling']['matmul_dtype']} matmul "
          f"{report['ceiling']['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, copy "
          f"{report['ceiling']['copy_bytes_per_s'] / 1e9:.1f} GB/s")
    print(f"wrote {args.out}/results.json, {args.out}/results.md"
          + "".join(f", {p}" for p in report["plots"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashloss", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, available backends and why others are not, the device")
    bench = sub.add_parser("bench", help="benchmark report: time, peak memory, ratios, roofline")
    mode = bench.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="embedded quick sizes (the default)")
    mode.add_argument("--full", action="store_true", help="the full size sweep")
    bench.add_argument("--case", action="append", help="run only this case (repeatable)")
    bench.add_argument("--impl", action="append", help="run only this implementation (repeatable)")
    bench.add_argument("--size", action="append", metavar="K=V,...",
                       help="with --case: run this size instead of the case's list, e.g. N=4096,H=1024,V=32768 "
                            "(repeatable; timing repeats still follow --quick/--full)")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    bench.add_argument("--out", default="flashloss-bench", help="output folder (default ./flashloss-bench)")
    bench.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurement")
    bench.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
