"""Comparator schedules of the relaxed sorting networks (OBJECTIVES.md §4.2), compiled to slots.

Every network (odd-even; bitonic with diffsort's or exact padding) is compiled once per (network,
n, padding) into the one form all four backends execute:

  pairs    int32 [C, 2]   comparator c reads a = x[i], b = x[j] (i = pairs[c, 0], j = pairs[c, 1]),
                          alpha = relax(steepness * (b - a)), and writes the relaxed minimum
                          alpha*a + (1-alpha)*b to slot i and the maximum (1-alpha)*a + alpha*b to
                          slot j. P's slot columns i and j mix the same way.
  layer_ptr int32 [L+1]   comparators of layer l are pairs[layer_ptr[l]:layer_ptr[l+1]]; within a
                          layer they touch disjoint slots, so running them one after another equals
                          running them at once (CPU kernels ignore layers, GPU kernels sync per layer).
  out_slot int32 [n]      output position r (ascending, 0-based) reads slot out_slot[r].

Why slots: a descending comparator of the bitonic network writes its minimum to the higher wire,
and exact padding routes real elements past virtual -inf wires. Both are pure relabellings of where
an element lives, decided by the network alone, not by the data. Tracking the labelling here turns
every comparator into the same ascending two-slot update, drops pass-through and virtual
comparators entirely, and leaves one gather (out_slot) at the end. `a` is always the element on the
lower wire of the original comparator, so alpha is bit-for-bit the quantity diffsort computes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

NETWORKS = ("odd_even", "bitonic")
PADDINGS = ("exact", "diffsort")


@dataclass(frozen=True)
class Schedule:
    network: str
    n: int
    padding: str
    pairs: torch.Tensor  # int32 [C, 2]
    layer_ptr: torch.Tensor  # int32 [L + 1]
    out_slot: torch.Tensor  # int32 [n]

    @property
    def num_comparators(self) -> int:
        return int(self.pairs.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.layer_ptr.shape[0]) - 1

    def layers(self) -> list[tuple[int, int]]:
        ptr = self.layer_ptr.tolist()
        return [(ptr[k], ptr[k + 1]) for k in range(len(ptr) - 1)]

    def to(self, device: torch.device | str) -> "Schedule":
        return _on_device(self, torch.device(device))


def _odd_even(n: int):
    layers = []
    for layer in range(n):
        layers.append([(i, i + 1) for i in range(layer % 2, n - 1, 2)])
    return layers, list(range(n))


def _bitonic(n: int, padding: str):
    num_stages = (n - 1).bit_length()  # ceil(log2 n); 0 for n = 1
    wires = 1 << num_stages
    pad = wires - n
    # slot[w]: storage slot of the element on padded wire w; virtual wires (exact padding) hold -inf
    slot = [w - pad if w >= pad else -1 for w in range(wires)]
    layers = []
    for stage in range(num_stages):
        for sub in range(stage + 1):
            m = 1 << (stage - sub)
            layer = []
            for i in range(0, wires, 2 * m):
                for t in range(m):
                    lo, hi = i + t, i + t + m
                    descending = (lo >> (stage + 1)) & 1 == 1
                    out_min, out_max = (hi, lo) if descending else (lo, hi)
                    if padding == "diffsort":
                        # diffsort drops the top `pad` wires: a comparator touching one passes the
                        # real wire through unchanged (and the dropped wires never move)
                        if lo >= pad and hi >= pad:
                            layer.append((slot[lo], slot[hi]))
                            slot[out_min], slot[out_max] = slot[lo], slot[hi]
                        continue
                    s_lo, s_hi = slot[lo], slot[hi]
                    if s_lo >= 0 and s_hi >= 0:
                        layer.append((s_lo, s_hi))
                        slot[out_min], slot[out_max] = s_lo, s_hi
                    elif s_lo >= 0 or s_hi >= 0:  # one virtual -inf wire: hard routing, no arithmetic
                        slot[out_max], slot[out_min] = max(s_lo, s_hi), -1
            layers.append(layer)
    out_slot = slot[pad:]
    if any(s < 0 for s in out_slot):  # cannot happen: -inf wires sink below every real element
        raise AssertionError(f"bitonic({n}) left a virtual wire among the outputs")
    return layers, out_slot


@functools.lru_cache(maxsize=None)
def schedule(network: str, n: int, padding: str = "exact") -> Schedule:
    """The compiled comparator schedule (CPU tensors; cached). `padding` only matters for bitonic
    networks of non-power-of-two n."""
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {', '.join(NETWORKS)}; got {network!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}; got {padding!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of elements to sort must be an int >= 1, got {n!r}")
    layers, out_slot = _odd_even(n) if network == "odd_even" else _bitonic(n, padding)
    layers = [layer for layer in layers if layer]
    flat = [pair for layer in layers for pair in layer]
    ptr = [0]
    for layer in layers:
        ptr.append(ptr[-1] + len(layer))
    pairs = torch.tensor(flat, dtype=torch.int32).reshape(-1, 2)
    return Schedule(network, n, padding, pairs, torch.tensor(ptr, dtype=torch.int32),
                    torch.tensor(out_slot, dtype=torch.int32))


_DEVICE_CACHE: dict[tuple, Schedule] = {}


def _on_device(sched: Schedule, device: torch.device) -> Schedule:
    if device.type == "cpu":
        return sched
    key = (sched.network, sched.n, sched.padding, str(device))
    hit = _DEVICE_CACHE.get(key)
    if hit is None:
        hit = Schedule(sched.network, sched.n, sched.padding, sched.pairs.to(device), sched.layer_ptr.to(device),
                       sched.out_slot.to(device))
        _DEVICE_CACHE[key] = hit
    return hit


def hard_sort_check(sched: Schedule, x: torch.Tensor) -> torch.Tensor:
    """Runs the schedule with hard compare-exchange (the steepness -> inf limit) on x [B, n]; True
    per row where the result is ascending. Tests use it to show which networks sort."""
    y = x.clone()
    for c in range(sched.num_comparators):
        i, j = sched.pairs[c].tolist()
        a, b = y[:, i].clone(), y[:, j].clone()
        y[:, i], y[:, j] = torch.minimum(a, b), torch.maximum(a, b)
    out = y[:, sched.out_slot.long()]
    return (out[:, 1:] >= out[:, :-1]).all(1)
