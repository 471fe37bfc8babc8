"""Primitive B: per-token log-probs through the lm_head without the N x V logits (DESIGN.md §1.B,
OBJECTIVES.md §2.1-2.3).

Logits z = (1/T) c tanh(a x / c) with x = hidden @ weight^T + bias (c = softcap; without it
z = (a/T) x), computed one (rows x vocabulary chunk) tile at a time and never stored whole.
Outputs (each optional, [N], in fp32; fp64 for fp64 inputs):
  logp        z_y - LSE(z)                       (y = target)
  lse         LSE_v z_v
  entropy     LSE - sum_v p_v z_v
  z_sum       sum_v z_v                          (label smoothing)
  log_sum_p2  log sum_v p_v^2 = LSE(2z) - 2 LSE   (no gradient; WPO)
Rows whose target is `ignore_index` give 0 in every output and receive no gradient.
Backward takes an independent upstream gradient per output and per token (g, l, h, s for logp,
lse, entropy, z_sum) and recomputes each tile once:
  dz_v = g (1[v=y] - p_v) + l p_v - h p_v (z_v - E_p z) + s,   E_p z = LSE - entropy
  dx = dz * dz/dx,  dz/dx = a/T (times 1 - tanh^2 with a softcap)
  dhidden += dx @ W_chunk,  dW_chunk += dx^T @ hidden (fp32),  dbias_chunk += sum_rows dx.
Saved: inputs by reference and the [N] LSE (and entropy when its gradient can be asked for);
nothing of size N x V. A call with no input requiring grad (reference models, or under
torch.no_grad) saves nothing at all.
Cost: forward 2NHV FLOPs, backward 4NHV plus 2NHV recompute (8NHV in all); extra memory
O(N + tile), the tile being a fixed number of fp32 elements whatever V is.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from .. import _backend, _native
from .._debug import empty
from .._validate import FLOAT_DTYPES, check_tensor

OP = "token_logprobs"
OUTPUTS = ("logp", "lse", "entropy", "z_sum", "log_sum_p2")
_BIT = {name: 1 << i for i, name in enumerate(OUTPUTS)}
# outputs whose upstream gradient the backward takes, in this order (log_sum_p2 has none)
GRAD_OUTPUTS = ("logp", "lse", "entropy", "z_sum")


class TokenStats(NamedTuple):
    logp: Optional[torch.Tensor]
    lse: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    z_sum: Optional[torch.Tensor]
    log_sum_p2: Optional[torch.Tensor]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Spec(NamedTuple):
    """Everything about the problem but the tensors (shared by every backend)."""
    ignore_index: int
    inv_temperature: float  # 1/T
    logit_scale: float  # a
    softcap: float  # c; 0.0 = no softcap
    want: int  # bit mask over OUTPUTS; the backward always has the LSE


def logits_from_raw(x: torch.Tensor, spec: Spec) -> torch.Tensor:
    """z from x = hidden @ W^T + b (OBJECTIVES.md §2.1)."""
    if spec.softcap:
        return torch.tanh(x * (spec.logit_scale / spec.softcap)) * (spec.softcap * spec.inv_temperature)
    return x * (spec.logit_scale * spec.inv_temperature)


def raw_grad_factor(z: torch.Tensor, spec: Spec):
    """dz/dx as a function of z: a/T, times 1 - tanh^2 with tanh = z T / c under a softcap."""
    f = spec.logit_scale * spec.inv_temperature
    if spec.softcap:
        t = z * (1.0 / (spec.softcap * spec.inv_temperature))
        return f * (1.0 - t * t)
    return f


# ---------------------------------------------------------------------------------------------
# torch backend: (row block x vocabulary chunk) tiles, online statistics, recompute in backward.

# Tile of the torch backend: (rows, vocabulary columns); None = chosen from TORCH_TILE_ELEMENTS.
# Tests shrink it to cross tile boundaries.
TILE: tuple[int, int] | None = None
TORCH_TILE_ELEMENTS = 1 << 22  # 16 MB of fp32 per tile temporary
TORCH_VOCAB_CHUNK = 4096


def _tile_shape(n: int, v: int) -> tuple[int, int]:
    if TILE is not None:
        return TILE
    cols = min(v, TORCH_VOCAB_CHUNK)
    return max(1, min(n, TORCH_TILE_ELEMENTS // cols)), cols


def _tiles(n: int, v: int):
    rows, cols = _tile_shape(n, v)
    for r0 in range(0, n, rows):
        for c0 in range(0, v, cols):
            yield r0, min(n, r0 + rows), c0, min(v, c0 + cols)


def _raw_tile(hidden, weight, bias, r0, r1, c0, c1, acc):
    """x = hidden[r0:r1] @ weight[c0:c1]^T (+ bias) in the accumulation dtype. Low-precision inputs
    are multiplied in fp32 (exact products of the rounded inputs; the GPU backends use tensor
    cores with fp32 accumulation instead)."""
    x = hidden[r0:r1].to(acc) @ weight[c0:c1].to(acc).T
    if bias is not None:
        x = x + bias[c0:c1].to(acc)
    return x


def _torch_forward(spec: Spec, hidden, weight, bias, targets):
    n, v = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    f = dict(dtype=acc, device=hidden.device)
    m = torch.full((n,), float("-inf"), **f)
    s, sz, s2, zsum, zt = (torch.zeros(n, **f) for _ in range(5))
    need_ent = spec.want & _BIT["entropy"]
    need_p2 = spec.want & _BIT["log_sum_p2"]
    for r0, r1, c0, c1 in _tiles(n, v):
        z = logits_from_raw(_raw_tile(hidden, weight, bias, r0, r1, c0, c1, acc), spec)
        m_old = m[r0:r1]
        m_new = torch.maximum(m_old, z.amax(1))
        alpha = torch.exp(m_old - m_new)
        e = torch.exp(z - m_new[:, None])
        s[r0:r1] = s[r0:r1] * alpha + e.sum(1)
        if need_ent:
            sz[r0:r1] = sz[r0:r1] * alpha + (e * z).sum(1)
        if need_p2:
            s2[r0:r1] = s2[r0:r1] * alpha * alpha + (e * e).sum(1)
        zsum[r0:r1] += z.sum(1)
        t = targets[r0:r1]
        hit = (t >= c0) & (t < c1)
        rows = hit.nonzero().squeeze(1)
        zt[r0 + rows] = z[rows, t[rows] - c0]
        m[r0:r1] = m_new
    valid = targets != spec.ignore_index
    zero = torch.zeros((), **f)
    lse = m + torch.log(s)
    res = {
        "logp": zt - lse,
        "lse": lse,
        "entropy": lse - sz / s,
        "z_sum": zsum,
        "log_sum_p2": torch.log(s2) - 2.0 * torch.log(s),
    }
    return tuple(torch.where(valid, res[o], zero) if spec.want & _BIT[o] else torch.zeros(0, **f) for o in OUTPUTS)


def _torch_backward(spec: Spec, hidden, weight, bias, targets, lse, entropy, g_logp, g_lse, g_ent, g_zsum,
                    needs):
    """needs = (d hidden, d weight, d bias). Upstream gradients are [N] or empty (= zero)."""
    n, v = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    f = dict(dtype=acc, device=hidden.device)
    need_dh, need_dw, need_db = needs
    valid = (targets != spec.ignore_index).to(acc)

    def coef(g):  # upstream restricted to valid rows: ignored rows get no gradient at all
        return g * valid if g.numel() else None

    g, l, h, s = coef(g_logp), coef(g_lse), coef(g_ent), coef(g_zsum)
    ez = (lse - entropy) if h is not None else None
    dh = torch.zeros(n, hidden.shape[1], **f) if need_dh else None
    dw = torch.zeros(v, hidden.shape[1], **f) if need_dw else None
    db = torch.zeros(v, **f) if need_db else None
    for r0, r1, c0, c1 in _tiles(n, v):
        z = logits_from_raw(_raw_tile(hidden, weight, bias, r0, r1, c0, c1, acc), spec)
        p = torch.exp(z - lse[r0:r1, None])
        coef_p = torch.zeros(r1 - r0, **f)  # dz = p * (l - g - h (z - Ez)) + g onehot + s
        if l is not None:
            coef_p = coef_p + l[r0:r1]
        if g is not None:
            coef_p = coef_p - g[r0:r1]
        dz = p * coef_p[:, None]
        if h is not None:
            dz = dz - (h[r0:r1, None] * p) * (z - ez[r0:r1, None])
        if s is not None:
            dz = dz + s[r0:r1, None]
        if g is not None:
            t = targets[r0:r1]
            rows = ((t >= c0) & (t < c1)).nonzero().squeeze(1)
            dz[rows, t[rows] - c0] += g[r0 + rows]
        dx = dz * raw_grad_factor(z, spec)
        if need_dh:
            dh[r0:r1] += dx @ weight[c0:c1].to(acc)
        if need_dw:
            dw[c0:c1] += dx.T @ hidden[r0:r1].to(acc)
        if need_db:
            db[c0:c1] += dx.sum(0)
    return dh, dw, db


# ---------------------------------------------------------------------------------------------
# native backends (cpu, cuda): the (vocabulary chunk x row block) loop and the tile GEMMs in
# csrc/ops.cpp (torch's BLAS / cuBLAS), fused epilogues in csrc/cpu/token_logprobs.cpp and
# csrc/cuda/token_logprobs.cu. The same flashloss_C ops serve both devices (dispatched by device).
# TILE (rows, columns) is passed down; (0, 0) lets the C++ side choose (CPU: 1024 columns x as many
# rows as fit 16 MB of fp32; CUDA: 8192 columns x up to 128 MB).


def _native_tile() -> tuple[int, int]:
    return tuple(TILE) if TILE is not None else (0, 0)


def _native_forward(spec: Spec, hidden, weight, bias, targets):
    acc = acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    outs = [empty(n if spec.want & _BIT[o] else 0, dtype=acc, device=hidden.device) for o in OUTPUTS]
    _native.ops().token_logprobs_forward(hidden, weight, bias, targets, spec.ignore_index, spec.inv_temperature,
                                         spec.logit_scale, spec.softcap, *outs, *_native_tile())
    return tuple(outs)


def _native_backward(spec: Spec, hidden, weight, bias, targets, lse, entropy, g_logp, g_lse, g_ent, g_zsum,
                     needs):
    bits = sum(1 << i for i, need in enumerate(needs) if need)
    grads = _native.ops().token_logprobs_backward(hidden, weight, bias, targets, lse, entropy, g_logp, g_lse, g_ent,
                                                  g_zsum, spec.ignore_index, spec.inv_temperature, spec.logit_scale,
                                                  spec.softcap, bits, *_native_tile())
    return tuple(gr if need else None for gr, need in zip(grads, needs))


_TRITON = "flashloss.triton_kernels.token_logprobs"
_IMPLS: dict = {
    "torch": (_torch_forward, _torch_backward),
    "triton": (_backend.lazy(_TRITON, "forward"), _backend.lazy(_TRITON, "backward")),
}
# CUDA: Triton first (the torch backend is the fallback); to be re-ranked on a GPU measurement.
_AUTO = {"cpu": ("torch",), "cuda": ("triton", "torch")}
_backend.register_op(OP, _IMPLS, auto_order=_AUTO)


def _register_native() -> None:
    if _native.load(warn=False) and hasattr(_native.ops(), "token_logprobs_forward"):
        _IMPLS["cpu"] = (_native_forward, _native_backward)
        # measured (bench/token_logprobs_cpu_target.py, issue #5; N=4096, H=1024, V=32768 fp32,
        # forward+backward, medians of 3): cpu 7.97-9.13 s, torch 9.45-10.49 s, naive 7.35-8.77 s
        _AUTO["cpu"] = ("cpu", "torch")
        _backend.register_op(OP, _IMPLS, auto_order=_AUTO)


def _register_cuda() -> None:
    if _native.compiled_with_cuda() and hasattr(_native.ops(), "token_logprobs_forward"):
        _IMPLS["cuda"] = (_native_forward, _native_backward)
        # Not in the auto order: `auto` on CUDA stays ("triton", "torch") until the cuda backend is
        # measured against Triton on a GPU (bench/); then re-rank _AUTO["cuda"] on the numbers.
        _backend.register_op(OP, _IMPLS, auto_order=_AUTO)


_register_native()
_register_cuda()


# ---------------------------------------------------------------------------------------------
# custom op + autograd


@torch.library.custom_op("flashloss::token_logprobs", mutates_args=())
def _forward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                ignore_index: int, inv_temperature: float, logit_scale: float, softcap: float, want: int,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = Spec(ignore_index, inv_temperature, logit_scale, softcap, want)
    return tuple(_IMPLS[backend][0](spec, hidden, weight, bias, targets))


@_forward_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, inv_temperature, logit_scale, softcap, want, backend):
    acc = acc_dtype(hidden.dtype)
    return tuple(hidden.new_empty(hidden.shape[0] if want & _BIT[o] else 0, dtype=acc) for o in OUTPUTS)


@torch.library.custom_op("flashloss::token_logprobs_backward", mutates_args=())
def _backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                 lse: torch.Tensor, entropy: torch.Tensor, g_logp: torch.Tensor, g_lse: torch.Tensor,
                 g_entropy: torch.Tensor, g_zsum: torch.Tensor, ignore_index: int, inv_temperature: float,
                 logit_scale: float, softcap: float, want: int, needs: list[bool],
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = Spec(ignore_index, inv_temperature, logit_scale, softcap, want)
    grads = _IMPLS[backend][1](spec, hidden, weight, bias, targets, lse, entropy, g_logp, g_lse, g_entropy,
                               g_zsum, tuple(needs))
    acc = acc_dtype(hidden.dtype)
    return tuple(g if g is not None else hidden.new_zeros(0, dtype=acc) for g in grads)


@_backward_op.register_fake
def _(hidden, weight, bias, targets, lse, entropy, g_logp, g_lse, g_entropy, g_zsum, ignore_index,
      inv_temperature, logit_scale, softcap, want, needs, backend):
    acc = acc_dtype(hidden.dtype)
    shapes = [tuple(hidden.shape), tuple(weight.shape), (weight.shape[0],)]
    return tuple(hidden.new_empty(s if need else (0,), dtype=acc) for s, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, inv_temperature, logit_scale, softcap, want, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1], output[2])
    ctx.args = (ignore_index, inv_temperature, logit_scale, softcap, want)
    ctx.backend = backend


def _backward(ctx, g_logp, g_lse, g_ent, g_zsum, g_p2):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    ignore_index, inv_temperature, logit_scale, softcap, want = ctx.args
    acc = acc_dtype(hidden.dtype)
    n = hidden.shape[0]

    def prep(g, name):
        if g is None or g.numel() == 0 or not want & _BIT[name]:
            return hidden.new_zeros(0, dtype=acc)
        return g.to(acc).contiguous()

    grads = [prep(g, o) for g, o in zip((g_logp, g_lse, g_ent, g_zsum), GRAD_OUTPUTS)]
    if grads[2].numel() == 0:
        entropy = hidden.new_zeros(0, dtype=acc)
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    if not any(g.numel() for g in grads) or n == 0:  # nothing flows back: zero gradients, no work
        zeros = [hidden.new_zeros(hidden.shape, dtype=acc), weight.new_zeros(weight.shape, dtype=acc),
                 weight.new_zeros(weight.shape[0], dtype=acc)]
        dh, dw, db = (z if need else None for z, need in zip(zeros, needs))
    else:
        dh, dw, db = _backward_op(hidden, weight, bias, targets, lse, entropy, *grads, ignore_index,
                                  inv_temperature, logit_scale, softcap, want, needs, ctx.backend)
    return (dh.to(hidden.dtype) if needs[0] else None, dw.to(weight.dtype) if needs[1] else None,
            db.to(bias.dtype) if needs[2] else None, None, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public entry points

# Rows whose target is ignore_index are dropped before the vocabulary matmul (they cost nothing);
# tests switch this off to check that every backend also handles ignored rows in place.
COMPACT_IGNORED = True


def _check_scalars(temperature, logit_scale, softcap) -> tuple[float, float, float]:
    for name, val in (("temperature", temperature), ("logit_scale", logit_scale)):
        if isinstance(val, torch.Tensor) or not isinstance(val, (int, float)):
            raise TypeError(f"{name} must be a Python float, got {type(val).__name__}")
        if not (val > 0 and val < float("inf")):
            raise ValueError(f"{name} must be a finite number > 0, got {val}")
    if softcap is not None:
        if isinstance(softcap, torch.Tensor) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be None or a Python float, got {type(softcap).__name__}")
        if not (softcap > 0 and softcap < float("inf")):
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    return 1.0 / float(temperature), float(logit_scale), float(softcap or 0.0)


def _check_targets(name: str, targets, lead_shape, v: int, ignore_index: int, device) -> torch.Tensor:
    check_tensor(name, targets, dtypes=(torch.int64, torch.int32), device=device)
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(f"{name} must have shape {list(lead_shape)} (the leading dimensions of the "
                         f"input), got {list(targets.shape)}")
    targets = targets.long()
    if not torch.compiler.is_compiling() and targets.numel():  # data-dependent; skipped when compiled
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
        if bool(bad.any()):
            raise IndexError(f"{name} must be in [0, {v}) or ignore_index={ignore_index}; "
                             f"got {targets[bad][0].item()}")
    return targets


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    outputs: Sequence[str] = ("logp",),
    backend: str = "auto",
) -> TokenStats:
    """Per-token statistics of z = (1/T) c tanh(a (hidden @ weight^T + bias) / c) without the logits.

    hidden [..., H] (fp32, fp64, bf16, fp16), weight [V, H] (lm_head, same dtype and device),
    bias [V] or None, targets [...] (int64/int32, the leading dimensions of hidden) in [0, V) or
    ignore_index. temperature T, logit_scale a and softcap c are Python floats (c = None: no tanh).
    `outputs`: any of logp, lse, entropy, z_sum, log_sum_p2 (OBJECTIVES.md §2.2-2.3). Returns a
    TokenStats of [...]-shaped fp32 tensors (fp64 for fp64 inputs), None where not requested;
    ignored tokens give 0 and no gradient. Gradients flow to hidden, weight and bias from every
    output but log_sum_p2. Call it with inputs that do not require grad (or under torch.no_grad)
    for a reference model: nothing is saved.
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-d tensor")
    check_tensor("weight", weight, dim=2, dtypes=(hidden.dtype,), device=hidden.device)
    h = hidden.shape[-1]
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"weight must have shape [V, H={h}] (H from hidden's last dimension), got "
                         f"{list(weight.shape)}")
    if v == 0:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1)")
    if bias is not None:
        check_tensor("bias", bias, dim=1, dtypes=(hidden.dtype,), device=hidden.device)
        if bias.shape[0] != v:
            raise ValueError(f"bias must have shape [V={v}], got {list(bias.shape)}")
    inv_t, a, c = _check_scalars(temperature, logit_scale, softcap)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or not outputs:
        raise ValueError(f"outputs must be a non-empty selection of {OUTPUTS}, got {list(outputs)}")
    lead = hidden.shape[:-1]
    targets = _check_targets("targets", targets, lead, v, ignore_index, hidden.device)

    want = _BIT["lse"]  # the backward always needs the LSE
    for o in outputs:
        want |= _BIT[o]
    name = _backend.resolve(OP, backend, hidden.device)
    h2 = hidden.reshape(-1, h)
    t1 = targets.reshape(-1)
    w_c = weight.contiguous()
    b_c = None if bias is None else bias.contiguous()
    idx = None
    if COMPACT_IGNORED and not torch.compiler.is_compiling():
        valid = t1 != ignore_index
        if not bool(valid.all()):
            idx = valid.nonzero().squeeze(1)
            h2, t1 = h2.index_select(0, idx), t1.index_select(0, idx)
    res = _forward_op(h2.contiguous(), w_c, b_c, t1.contiguous(), int(ignore_index), inv_t, a, c, want, name)
    out = []
    for o, r in zip(OUTPUTS, res):
        if o not in outputs:
            out.append(None)
            continue
        if o == "log_sum_p2":
            r = r.detach()  # returned without gradient (OBJECTIVES.md §2.3)
        if idx is not None:  # back to every position; ignored ones hold 0
            r = r.new_zeros(targets.numel()).index_copy(0, idx, r)
        out.append(r.reshape(lead))
    return TokenStats(*out)


# ---------------------------------------------------------------------------------------------
# logprobs_from_logits: for callers that already hold the logits. Row chunks of the logits are
# upcast and reduced one at a time: extra memory O(N + chunk), never a log_softmax copy of [N, V].

LOGITS_CHUNK_ELEMENTS = 1 << 22


def _logit_row_chunks(n: int, v: int):
    step = max(1, LOGITS_CHUNK_ELEMENTS // max(v, 1))
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


@torch.library.custom_op("flashloss::logprobs_from_logits", mutates_args=())
def _logits_forward_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                       inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, v = logits.shape
    acc = acc_dtype(logits.dtype)
    logp = empty(n, dtype=acc, device=logits.device)
    lse = empty(n, dtype=acc, device=logits.device)
    for r0, r1 in _logit_row_chunks(n, v):
        x = logits[r0:r1].to(acc)
        if inv_temperature != 1.0:
            x = x * inv_temperature
        t = targets[r0:r1]
        valid = t != ignore_index
        lse_c = torch.logsumexp(x, dim=1)
        zt = x.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
        logp[r0:r1] = torch.where(valid, zt - lse_c, 0.0)
        lse[r0:r1] = lse_c
    return logp, lse


@_logits_forward_op.register_fake
def _(logits, targets, ignore_index, inv_temperature):
    acc = acc_dtype(logits.dtype)
    return logits.new_empty(logits.shape[0], dtype=acc), logits.new_empty(logits.shape[0], dtype=acc)


@torch.library.custom_op("flashloss::logprobs_from_logits_backward", mutates_args=())
def _logits_backward_op(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                        ignore_index: int, inv_temperature: float) -> torch.Tensor:
    """d logits = (g / T) (onehot - softmax(logits / T)), written chunk by chunk into the gradient."""
    n, v = logits.shape
    acc = acc_dtype(logits.dtype)
    out = empty(n, v, dtype=logits.dtype, device=logits.device)
    for r0, r1 in _logit_row_chunks(n, v):
        x = logits[r0:r1].to(acc)
        if inv_temperature != 1.0:
            x = x * inv_temperature
        t = targets[r0:r1]
        valid = t != ignore_index
        gc = torch.where(valid, g[r0:r1], 0.0) * inv_temperature
        d = torch.exp(x - lse[r0:r1, None]).mul_(-gc[:, None])
        d.scatter_add_(1, torch.where(valid, t, 0)[:, None], gc[:, None])
        out[r0:r1] = d
    return out


@_logits_backward_op.register_fake
def _(logits, targets, lse, g, ignore_index, inv_temperature):
    return torch.empty_like(logits)


def _logits_setup(ctx, inputs, output):
    logits, targets, ignore_index, inv_temperature = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.args = (ignore_index, inv_temperature)


def _logits_backward(ctx, g_logp, g_lse):
    logits, targets, lse = ctx.saved_tensors
    if g_logp is None:
        return None, None, None, None
    ignore_index, inv_temperature = ctx.args
    d = _logits_backward_op(logits, targets, lse, g_logp.to(lse.dtype).contiguous(), ignore_index,
                            inv_temperature)
    return d, None, None, None


_logits_forward_op.register_autograd(_logits_backward, setup_context=_logits_setup)


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                         temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) at the targets, for callers that already hold logits [..., V]
    (TRL's `selective_log_softmax`): fp32 result of shape [...], 0 at ignore_index. Memory O(N)
    beyond the logits and their gradient: rows are reduced in chunks, no log_softmax copy."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {list(logits.shape)}")
    inv_t, _, _ = _check_scalars(temperature, 1.0, None)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    lead, v = logits.shape[:-1], logits.shape[-1]
    targets = _check_targets("targets", targets, lead, v, ignore_index, logits.device)
    logp, _ = _logits_forward_op(logits.reshape(-1, v).contiguous(), targets.reshape(-1).contiguous(),
                                 int(ignore_index), inv_t)
    return logp.reshape(lead)


# ---------------------------------------------------------------------------------------------
# sequence_logprobs: per-sequence sums and means with the causal shift


class SequenceLogprobs(NamedTuple):
    sum: torch.Tensor  # [B] sum of log-probs over scored tokens
    mean: torch.Tensor  # [B] sum / max(1, count)
    count: torch.Tensor  # [B] number of scored tokens (int64)
    token_logp: torch.Tensor  # per scored position, 0 elsewhere ([B, T-1] padded / [Ntot] packed)


def _shifted_targets(labels: torch.Tensor, ignore_index: int, cu_seqlens: Optional[torch.Tensor]):
    """Position t scores token t + 1 (causal LM); the last position of each sequence scores nothing."""
    nxt = torch.full_like(labels, ignore_index)
    nxt[..., :-1] = labels[..., 1:]
    if cu_seqlens is not None:
        ends = cu_seqlens[1:] - 1  # last position of each packed segment
        nxt[ends[ends >= 0]] = ignore_index
    return nxt


def _segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths,
                                   output_size=total)


def sequence_logprobs(
    hidden: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    logits: Optional[torch.Tensor] = None,
    shift: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
) -> SequenceLogprobs:
    """Per-sequence log-probs of `labels` (OBJECTIVES.md §2.2), from hidden states and the lm_head
    (through token_logprobs, no logits) or from `logits=` (through logprobs_from_logits).

    Padded batches: hidden [B, T, H] (or logits [B, T, V]) and labels [B, T]. Packed batches:
    hidden [Ntot, H] and labels [Ntot] with `cu_seqlens` [S + 1] (int, cumulative segment starts,
    cu_seqlens[0] = 0, cu_seqlens[-1] = Ntot). With `shift=True` (causal LMs) position t is scored
    on labels[t + 1] within its sequence, exactly like `logits[:, :-1]` against `labels[:, 1:]`;
    with shift=False each position is scored on its own label. Prompt and padding tokens carry
    ignore_index and cost nothing. Returns SequenceLogprobs(sum, mean, count, token_logp); mean
    divides by max(1, count), so a sequence with no scored token gives 0, not NaN.
    """
    if logits is not None:
        if hidden is not None or weight is not None:
            raise ValueError("give either hidden and weight, or logits=, not both")
        src, src_name = logits, "logits"
    else:
        if hidden is None or weight is None:
            raise ValueError("sequence_logprobs needs hidden and weight (or logits=)")
        src, src_name = hidden, "hidden"
    if labels is None:
        raise ValueError("labels is required")
    check_tensor(src_name, src, dim=(2, 3) if cu_seqlens is None else 2, dtypes=FLOAT_DTYPES)
    check_tensor("labels", labels, dtypes=(torch.int64, torch.int32), device=src.device)
    if tuple(labels.shape) != tuple(src.shape[:-1]):
        raise ValueError(f"labels must have shape {list(src.shape[:-1])} (the leading dimensions of "
                         f"{src_name}), got {list(labels.shape)}")
    labels = labels.long()
    total = labels.numel()
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, dim=1, dtypes=(torch.int64, torch.int32), device=src.device)
        cu_seqlens = cu_seqlens.long()
        if not torch.compiler.is_compiling():
            ok = cu_seqlens.numel() >= 1 and int(cu_seqlens[0]) == 0 and int(cu_seqlens[-1]) == total and \
                bool((cu_seqlens[1:] >= cu_seqlens[:-1]).all())
            if not ok:
                raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at {total} (the number "
                                 f"of packed tokens), got {cu_seqlens.tolist()}")
    targets = _shifted_targets(labels, ignore_index, cu_seqlens) if shift else labels
    if logits is not None:
        token = logprobs_from_logits(logits, targets, ignore_index=ignore_index, temperature=temperature)
    else:
        token = token_logprobs(hidden, weight, targets, bias, ignore_index=ignore_index, temperature=temperature,
                               logit_scale=logit_scale, softcap=softcap, backend=backend).logp
    scored = targets != ignore_index
    if cu_seqlens is None:
        if labels.dim() == 1:  # a single unpacked sequence
            token, scored = token[None], scored[None]
        total_lp = token.sum(-1)
        count = scored.sum(-1)
        token_out = token[:, :-1] if shift else token
        if labels.dim() == 1:
            token_out = token_out[0]
    else:
        n_seq = cu_seqlens.shape[0] - 1
        seg = _segment_ids(cu_seqlens, total)
        total_lp = token.new_zeros(n_seq).index_add(0, seg, token)
        count = torch.zeros(n_seq, dtype=torch.long, device=src.device).index_add(0, seg, scored.long())
        token_out = token
    mean = total_lp / count.clamp_min(1).to(total_lp.dtype)
    return SequenceLogprobs(total_lp, mean, count, token_out)
