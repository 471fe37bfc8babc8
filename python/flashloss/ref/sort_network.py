"""Reference relaxed sorting network: a transcription of OBJECTIVES.md §4.1-4.3 at the level of the
original wires (padded wires, descending comparators, virtual -inf wires and pass-throughs exactly
as the spec states them), independent of the slot schedules the backends run. Dense P per batch
element, autograd for gradients; meant for float64 tests and as the naive baseline."""
from __future__ import annotations

import math

import torch


def alpha(a: torch.Tensor, b: torch.Tensor, relaxation: str, steepness: float, art_lambda: float) -> torch.Tensor:
    """The table of OBJECTIVES.md §4.1: probability that a (the lower wire) is the smaller."""
    v = steepness * (b - a)
    if relaxation == "logistic":
        return torch.sigmoid(v)
    if relaxation == "logistic_phi":
        return torch.sigmoid(steepness * (b - a) / ((a - b).abs() + 1e-10) ** art_lambda)
    if relaxation == "gaussian":
        return 0.5 + 0.5 * torch.erf(v / math.sqrt(2))
    if relaxation == "reciprocal":
        return 0.5 * (v / (2 + v.abs()) + 1)
    if relaxation == "cauchy":
        return torch.atan(v) / math.pi + 0.5
    if relaxation == "optimal":
        step = (v > 0.25).to(v.dtype) - (v < -0.25).to(v.dtype)
        return v.clamp(-0.25, 0.25) + 0.5 + step * (0.25 - 1 / (16 * (v.abs() + 1e-10)))
    raise ValueError(f"unknown relaxation {relaxation!r}")


def comparators(network: str, n: int, padding: str = "exact"):
    """(wires, pad, layers): layers of (wire_a, wire_b, descending) on `wires` padded wires, the real
    wire w sitting at pad + w."""
    if network == "odd_even":
        return n, 0, [[(i, i + 1, False) for i in range(layer % 2, n - 1, 2)] for layer in range(n)]
    stages = math.ceil(math.log2(n)) if n > 1 else 0
    wires = 2 ** stages
    layers = []
    for k in range(stages):
        for j in range(k + 1):
            m = 2 ** (k - j)
            layers.append([(i + t, i + t + m, ((i + t) // 2 ** (k + 1)) % 2 == 1)
                           for i in range(0, wires, 2 * m) for t in range(m)])
    return wires, wires - n, layers


def sort_network(x: torch.Tensor, network: str = "odd_even", relaxation: str = "cauchy", steepness: float = 10.0,
                 art_lambda: float = 0.25, padding: str = "exact", return_P: bool = True):
    """(sorted [B, n], P [B, n, n] or None) with sorted = x @ P."""
    bsz, n = x.shape
    wires, pad, layers = comparators(network, n, padding)
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    # per wire: value [B] and P row-block [B, n] (P[:, :, r] is the column of output position r);
    # None marks a virtual -inf wire (exact padding) or a dropped wire (diffsort padding)
    val = [None] * pad + [x[:, w] for w in range(n)]
    col = [None] * pad + [eye[w].expand(bsz, n) for w in range(n)]
    for layer in layers:
        new_val, new_col = list(val), list(col)
        for wa, wb, desc in layer:
            out_min, out_max = (wb, wa) if desc else (wa, wb)
            va, vb = val[wa], val[wb]
            if va is not None and vb is not None:
                al = alpha(va, vb, relaxation, steepness, art_lambda)
                new_val[out_min] = al * va + (1 - al) * vb
                new_val[out_max] = (1 - al) * va + al * vb
                c = al[:, None]
                new_col[out_min] = c * col[wa] + (1 - c) * col[wb]
                new_col[out_max] = (1 - c) * col[wa] + c * col[wb]
            elif va is None and vb is None:
                continue
            elif padding == "diffsort":
                continue  # the real wire passes through unchanged
            else:  # exact padding: the real element goes to out_max, the -inf to out_min
                real = wa if va is not None else wb
                new_val[out_max], new_col[out_max] = val[real], col[real]
                new_val[out_min], new_col[out_min] = None, None
        val, col = new_val, new_col
    sorted_ = torch.stack(val[pad:], 1)
    P = torch.stack(col[pad:], 2) if return_P else None  # P[b, i, r]
    return sorted_, P
