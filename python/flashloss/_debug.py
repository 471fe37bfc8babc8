"""Output poisoning (DESIGN.md §6): every backend writes into tensors that flashloss allocates
through `empty`, and with poisoning on those tensors start as NaN, so an element a kernel forgot
to write fails the comparison instead of passing with stale memory that happens to be right.

On when the environment has FLASHLOSS_POISON=1 (the test suite sets it) or inside `poisoning()`.
"""
from __future__ import annotations

import contextlib
import os

import torch

_poison = os.environ.get("FLASHLOSS_POISON", "0") == "1"


def poison_enabled() -> bool:
    return _poison


def set_poison(enabled: bool) -> bool:
    """Turns poisoning on or off; returns the previous setting."""
    global _poison
    previous, _poison = _poison, bool(enabled)
    return previous


@contextlib.contextmanager
def poisoning(enabled: bool = True):
    previous = set_poison(enabled)
    try:
        yield
    finally:
        set_poison(previous)


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs; NaN-filled (integers: -1) while poisoning is on."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty(t.shape, dtype=dtype or t.dtype, device=t.device)
