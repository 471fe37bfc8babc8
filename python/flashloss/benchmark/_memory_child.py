"""Child side of flashloss.benchmark.memory.measure_peak_extra (run as a module in a fresh
interpreter; see that module for the protocol). Prints one result line."""
from __future__ import annotations

import json
import sys
from typing import Any

from flashloss.benchmark.memory import _MARK


def _resolve(target: str):
    import importlib

    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _tensor_bytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o) for o in obj.values())
    return 0


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import gc

    import torch

    fn = _resolve(spec["target"])
    cuda = spec["device"] == "cuda"
    if spec.get("warmup_kwargs") is not None:
        out = fn(**spec["warmup_kwargs"])()
        del out
    gc.collect()
    try:
        run = fn(**spec["kwargs"])
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            baseline = _proc_status("VmRSS")
        out = run()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _proc_status("VmHWM")
    except (torch.OutOfMemoryError, MemoryError) as exc:
        return {"error": "oom", "message": str(exc)[:500]}
    returned = _tensor_bytes(out)
    return {
        "peak_extra_bytes": max(0, peak - baseline - returned),
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "returned_bytes": returned,
    }


if __name__ == "__main__":
    result = _child(json.loads(sys.argv[1]))
    print(_MARK + json.dumps(result), flush=True)
