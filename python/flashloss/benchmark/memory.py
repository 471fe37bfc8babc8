"""Peak extra memory of a callable, measured in a fresh subprocess (DESIGN.md §7).

"Peak extra memory" is the peak of the process while the callable runs, minus what was live
before it started (the inputs) and minus the tensors it returns (outputs and gradients that exist
anyway). A fresh process means no allocator cache from earlier work can hide an allocation.

Protocol: `target` names a function "package.module:function". Called with `kwargs`, it builds the
inputs and returns a zero-argument `run` callable; `run()` does the work (e.g. forward+backward)
and returns the tensors the caller would keep. `warmup_kwargs`, if given, runs the same target
once at another (small) size first, so that one-time costs (library loading, thread pools,
kernel compilation) are not charged to the measurement.

CPU: the resident-set high-water mark (VmHWM) is reset through /proc/self/clear_refs after the
inputs exist; glibc is told to serve every allocation above 64 KiB with mmap
(MALLOC_MMAP_THRESHOLD_) so freed memory leaves the process and RSS follows live memory.
CUDA: torch.cuda peak allocated bytes after reset_peak_memory_stats.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

_MARK = "FLASHLOSS_MEMORY_RESULT "


def measure_peak_extra(
    target: str,
    kwargs: dict[str, Any] | None = None,
    *,
    device: str = "cpu",
    warmup_kwargs: dict[str, Any] | None = None,
    timeout: float = 600.0,
    sys_path: list[str] | None = None,
) -> dict[str, Any]:
    """Runs `target` in a fresh interpreter and returns a dict with `peak_extra_bytes`,
    `baseline_bytes`, `peak_bytes`, `returned_bytes`. Raises RuntimeError if the child fails
    (the child's stderr tail is in the message); `error == "oom"` results are returned.
    `sys_path` entries are prepended to the child's PYTHONPATH (for targets outside the package)."""
    spec = {"target": target, "kwargs": kwargs or {}, "device": device, "warmup_kwargs": warmup_kwargs}
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env.setdefault("PYTHONWARNINGS", "ignore")
    if sys_path:
        env["PYTHONPATH"] = os.pathsep.join(list(sys_path) + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", "flashloss.benchmark._memory_child", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    raise RuntimeError(
        f"memory measurement of {target}({kwargs}) failed with exit code {proc.returncode}:\n"
        + proc.stderr[-3000:])
