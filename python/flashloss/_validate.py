"""Argument checks shared by every public function. Each error names the argument and says what
was expected, so a user never meets a NaN, a segfault or a kernel-level assertion instead."""
from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t,
    *,
    dim: int | tuple[int, ...] | None = None,
    dtypes: Iterable[torch.dtype] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None:
        dims = (dim,) if isinstance(dim, int) else dim
        if t.dim() not in dims:
            want = " or ".join(f"{d}-D" for d in dims)
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on device {device} (like the other inputs), got {t.device}")
    return t


REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction) -> None:
    """Every loss takes reduction in ('mean', 'sum', 'none') (DESIGN.md §4)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _named_tensors(name: str, val):
    if isinstance(val, torch.Tensor):
        yield name, val
    elif isinstance(val, (tuple, list)):
        for i, v in enumerate(val):
            yield from _named_tensors(f"{name}[{i}]", v)
    elif isinstance(val, dict):
        for k, v in val.items():
            yield from _named_tensors(k, v)


def same_device(fn):
    """Decorator: every tensor argument of `fn` must be on the device of the first one; the error
    names the argument (instead of a device error from deep inside the arithmetic). Skipped inside
    torch.compile (devices are fixed at trace time there)."""
    import functools
    import inspect

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.compiler.is_compiling():
            first = None
            for name, val in sig.bind_partial(*args, **kwargs).arguments.items():
                for sub, t in _named_tensors(name, val):
                    if first is None:
                        first = (sub, t.device)
                    elif t.device != first[1]:
                        raise ValueError(f"{sub} must be on device {first[1]} (like {first[0]}), got {t.device}")
        return fn(*args, **kwargs)

    return wrapper
