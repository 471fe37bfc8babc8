"""Loading of the native extension flashloss._C (CPU kernels, and CUDA kernels when built).

flashloss must import without it: a failed load warns once and leaves the `torch` backend (and
Triton, where installed) to serve. The reason is kept for `flashloss info` and for the error raised
when a native backend is requested explicitly.
"""
from __future__ import annotations

import importlib
import warnings

import torch

_loaded: bool | None = None
_error: str = ""


def load(warn: bool = True) -> bool:
    """Tries once to load flashloss._C; returns whether the native kernels are usable."""
    global _loaded, _error
    if _loaded is None:
        try:
            importlib.import_module("flashloss._C")
            _loaded = hasattr(torch.ops.flashloss_C, "row_logsumexp_forward")
            if not _loaded:
                _error = "flashloss._C imported but registered no operators"
        except Exception as exc:  # ImportError, or OSError for a torch ABI mismatch
            _loaded = False
            _error = f"{type(exc).__name__}: {exc}"
        if not _loaded and warn:
            warnings.warn(
                "flashloss: the native extension flashloss._C is not available "
                f"({_error}). The `cpu` and `cuda` backends are disabled and the `torch` backend "
                "serves instead. Build it with `make install` (or `pip install "
                "--no-build-isolation .` with a C++ compiler and torch installed).",
                RuntimeWarning,
                stacklevel=3,
            )
    return bool(_loaded)


def load_error() -> str:
    """Why flashloss._C is unusable ('' when it loaded)."""
    load(warn=False)
    return _error


def ops():
    """The torch.ops namespace of the native kernels; only call after load() returned True."""
    return torch.ops.flashloss_C


def compiled_with_cuda() -> bool:
    return load(warn=False) and bool(torch.ops.flashloss_C.compiled_with_cuda())
