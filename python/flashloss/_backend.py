"""Backend registry (DESIGN.md §2).

Backends: `torch` (portable blockwise PyTorch), `cpu` (C++ kernels in flashloss._C), `triton`
(Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), `cuda` (CUDA C++ kernels
in flashloss._C). `auto` picks, per op and per device type, the first available backend of the
op's preference list; the lists are set from benchmark results (bench/RESULTS.md), not guesses.
FLASHLOSS_BACKEND=<name> replaces `auto` and then behaves like an explicit request: a backend that
cannot serve raises BackendUnavailableError saying how to get it.

Each primitive module registers its implementations with `register_op`; this module knows
nothing about the math.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import _native

BACKENDS = ("torch", "cpu", "triton", "cuda")
BACKEND_CHOICES = BACKENDS + ("auto",)


class BackendUnavailableError(RuntimeError):
    """A backend was requested (argument or FLASHLOSS_BACKEND) that cannot serve these tensors."""


@dataclass
class OpEntry:
    name: str
    impls: dict[str, Any] = field(default_factory=dict)
    # device type -> backends in order of preference for `auto`
    auto_order: dict[str, tuple[str, ...]] = field(default_factory=dict)


_OPS: dict[str, OpEntry] = {}


def register_op(name: str, impls: dict[str, Any], auto_order: dict[str, tuple[str, ...]]) -> OpEntry:
    unknown = set(impls) - set(BACKENDS)
    if unknown:
        raise ValueError(f"op {name}: unknown backends {sorted(unknown)}")
    entry = OpEntry(name, dict(impls), dict(auto_order))
    _OPS[name] = entry
    return entry


def registered_ops() -> dict[str, OpEntry]:
    return dict(_OPS)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_available(name: str, device: torch.device | str) -> tuple[bool, str]:
    """Whether backend `name` can run on tensors of `device`, and if not, why and what to do."""
    device = torch.device(device)
    if name == "torch":
        return True, "pure PyTorch, always available"
    if name == "cpu":
        if not _native.load(warn=False):
            return False, (f"flashloss._C is not built ({_native.load_error()}); run `make install` "
                           "or `pip install --no-build-isolation .` with a C++ compiler")
        if device.type != "cpu":
            return False, f"the cpu backend runs CPU tensors only, got {device.type} tensors"
        return True, "C++ kernels in flashloss._C (OpenMP)"
    if name == "cuda":
        if not _native.load(warn=False):
            return False, f"flashloss._C is not built ({_native.load_error()}); run `make install`"
        if not _native.compiled_with_cuda():
            build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            return False, (f"flashloss._C was built without CUDA kernels (torch {torch.__version__} is "
                           f"{build}): reinstall with a CUDA build of torch and nvcc on PATH "
                           "(`pip install --no-build-isolation .`)")
        if device.type != "cuda":
            return False, f"the cuda backend runs CUDA tensors only, got {device.type} tensors"
        return True, "CUDA C++ kernels in flashloss._C"
    if name == "triton":
        if not _triton_installed():
            return False, "Triton is not installed: `pip install triton` (or `pip install flashloss[triton]`)"
        if device.type == "cuda":
            return True, "Triton kernels"
        if device.type == "cpu":
            if triton_interpret():
                return True, "Triton kernels under the interpreter (TRITON_INTERPRET=1; slow)"
            return False, ("Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                           "before importing flashloss (slow; meant for tests)")
        return False, f"Triton does not run {device.type} tensors"
    raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {name!r}")


def _check_name(backend: str, source: str) -> None:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(BACKEND_CHOICES)}; got {backend!r}")


def resolve(op: str, backend: str | None, device: torch.device | str) -> str:
    """The backend that will run `op` on `device` for the request `backend` (None = 'auto')."""
    entry = _OPS[op]
    device = torch.device(device)
    backend = "auto" if backend is None else backend
    _check_name(backend, "backend")
    source = "backend"
    if backend == "auto":
        env = os.environ.get("FLASHLOSS_BACKEND", "").strip()
        if env and env != "auto":
            _check_name(env, "FLASHLOSS_BACKEND")
            backend, source = env, "FLASHLOSS_BACKEND"
    if backend == "auto":
        for name in entry.auto_order.get(device.type, ("torch",)):
            if name in entry.impls and backend_available(name, device)[0]:
                return name
        return "torch"
    if backend not in entry.impls:
        raise BackendUnavailableError(
            f"{op}: backend {backend!r} ({source}) has no implementation of this op; "
            f"available: {', '.join(sorted(entry.impls))}")
    ok, why = backend_available(backend, device)
    if not ok:
        raise BackendUnavailableError(f"{op}: backend {backend!r} ({source}) is unavailable: {why}")
    return backend


def implementation(op: str, backend: str) -> Any:
    return _OPS[op].impls[backend]


def lazy(module: str, attr: str) -> Callable[..., Any]:
    """A callable that imports `module` on first use (keeps Triton out of `import flashloss`)."""
    cache: dict[str, Any] = {}

    def call(*args, **kwargs):
        if "fn" not in cache:
            cache["fn"] = getattr(importlib.import_module(module), attr)
        return cache["fn"](*args, **kwargs)

    call.__name__ = f"{module}.{attr}"
    return call
