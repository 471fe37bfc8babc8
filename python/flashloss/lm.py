"""Cross-entropy family and vocabulary divergences on top of primitive B (OBJECTIVES.md §2.4-2.6).

Every loss here goes from hidden states and the lm_head weight to the loss without the N x V
logits: `linear_cross_entropy` and `focal_loss` are thin epilogues over the per-token statistics
of `flashloss.ops.token_logprobs` (logp, LSE, sum of logits), so their gradients come from the
primitive's backward with exact per-token upstream gradients. `vocab_kl` compares two models'
distributions token by token and needs both distributions at once: it streams blocks of rows
through both lm_heads (see `_VocabKL` below).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._validate import FLOAT_DTYPES, check_reduction, check_tensor
from .ops.token_logprobs import (Spec, _check_scalars, _check_targets, acc_dtype, logits_from_raw, raw_grad_factor,
                                 token_logprobs)



def _reduce(per_token: torch.Tensor, reduction: str, denom) -> torch.Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total if reduction == "sum" else total / denom


def _mean_denominator(valid: torch.Tensor, num_items_in_batch):
    """N_valid (at least 1), or num_items_in_batch when given (gradient-accumulation-correct)."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            return num_items_in_batch.to(torch.float32)
        if not num_items_in_batch > 0:
            raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")
        return float(num_items_in_batch)
    return valid.sum().clamp_min(1)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    class_weight: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    normalize: str = "valid",
    num_items_in_batch=None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    return_z_loss: bool = False,
    backend: str = "auto",
):
    """Cross-entropy of hidden @ weight^T (+ bias) against `targets` without the logits
    (OBJECTIVES.md §2.4-2.5); numbers as torch.nn.functional.cross_entropy on the full logits.

    Per token: ce_t = (1 - eps)(LSE - z_y) + eps (LSE - mean_v z_v)   (label_smoothing eps, torch
    semantics), times the class weight w_{y_t} if `class_weight` [V] is given (torch `weight=`);
    plus z_loss * LSE_t^2 (PaLM's z-loss, 1e-4 there; not class-weighted); the sum times
    `token_weights` [...] if given. Ignored tokens contribute nothing.
    reduction='mean' divides the sum by: the sum of w_{y_t} over valid tokens with class weights
    (torch rule); else the sum of token weights with normalize='weights'; else num_items_in_batch
    if given; else the number of valid tokens. Denominators are at least 1 (weights: a zero sum
    counts as 1), so an all-ignored batch gives 0, not NaN. 'none' returns the per-token loss [...] (0 at ignored tokens).
    With return_z_loss=True returns (loss, z_loss_term), the second reduced like the loss and
    detached (for logging). Class weights and label smoothing together raise (torch's combined
    rule is rarely what anyone wants; flashloss does not guess).
    """
    check_reduction(reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be >= 0 (the coefficient of LSE^2), got {z_loss}")
    if normalize not in ("valid", "weights"):
        raise ValueError(f"normalize must be 'valid' or 'weights', got {normalize!r}")
    if class_weight is not None and label_smoothing > 0:
        raise ValueError("class_weight and label_smoothing together are not supported: give one of them")
    outs = ["logp"]
    if z_loss > 0 or label_smoothing > 0:
        outs.append("lse")
    if label_smoothing > 0:
        outs.append("z_sum")
    r = token_logprobs(hidden, weight, targets, bias, ignore_index=ignore_index, temperature=temperature,
                       logit_scale=logit_scale, softcap=softcap, outputs=tuple(outs), backend=backend)
    valid = targets != ignore_index
    v = weight.shape[0]
    ce = -r.logp
    if label_smoothing > 0:  # (1-eps)(LSE - z_y) + eps (LSE - sum z / V); 0 at ignored tokens
        ce = (1.0 - label_smoothing) * ce + label_smoothing * (r.lse - r.z_sum / v)
    weights_sum = None
    if class_weight is not None:
        check_tensor("class_weight", class_weight, dim=1, dtypes=FLOAT_DTYPES, device=hidden.device)
        if class_weight.shape[0] != v:
            raise ValueError(f"class_weight must have shape [V={v}], got {list(class_weight.shape)}")
        w_y = torch.where(valid, class_weight.to(ce.dtype)[torch.where(valid, targets, 0).long()], 0.0)
        ce = ce * w_y
        weights_sum = w_y.sum()
    per_token = ce
    z_term = None
    if z_loss > 0:
        z_term = z_loss * r.lse.square()  # lse is 0 at ignored tokens
        per_token = per_token + z_term
    if token_weights is not None:
        check_tensor("token_weights", token_weights, dtypes=FLOAT_DTYPES, device=hidden.device)
        if tuple(token_weights.shape) != tuple(targets.shape):
            raise ValueError(f"token_weights must have the shape of targets {list(targets.shape)}, got "
                             f"{list(token_weights.shape)}")
        tw = torch.where(valid, token_weights.to(per_token.dtype), 0.0)
        per_token = per_token * tw
        z_term = None if z_term is None else z_term * tw
        if normalize == "weights" and class_weight is None:
            weights_sum = tw.sum()  # token-weighted mean (class weights take precedence)
    elif normalize == "weights":
        raise ValueError("normalize='weights' needs token_weights")
    if class_weight is not None or normalize == "weights":  # weighted means divide by the weights
        denom = torch.where(weights_sum > 0, weights_sum, torch.ones_like(weights_sum))
    else:
        denom = _mean_denominator(valid, num_items_in_batch)
    loss = _reduce(per_token, reduction, denom)
    if return_z_loss:
        zl = torch.zeros_like(loss) if z_term is None else _reduce(z_term, reduction, denom)
        return loss, zl.detach()
    return loss


def focal_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    gamma: float = 2.0,
    alpha=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
):
    """Multi-class focal loss from the lm_head (OBJECTIVES.md §2.5): l_t = -alpha_t (1 - p_y)^gamma
    log p_y, an epilogue on the primitive's logp ((1 - p)^gamma = exp(gamma log1mexp(logp))).
    `alpha`: None, a float, or a [V] tensor of per-class weights indexed by the target. 'mean'
    divides by the number of valid tokens (or num_items_in_batch). gamma = 0 is cross-entropy."""
    check_reduction(reduction)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    logp = token_logprobs(hidden, weight, targets, bias, ignore_index=ignore_index, temperature=temperature,
                          logit_scale=logit_scale, softcap=softcap, backend=backend).logp
    valid = targets != ignore_index
    # (1 - p)^gamma; at p == 1 exactly the factor is 0 (log1mexp = -inf, exp(-inf) = 0). pow of
    # -expm1 keeps the gradient finite there for gamma >= 1.
    modulating = torch.pow(-torch.expm1(logp), gamma) if gamma != 0 else torch.ones_like(logp)
    per_token = -modulating * logp
    if alpha is not None:
        if isinstance(alpha, torch.Tensor):
            v = weight.shape[0]
            check_tensor("alpha", alpha, dim=1, dtypes=FLOAT_DTYPES, device=hidden.device)
            if alpha.shape[0] != v:
                raise ValueError(f"alpha must be a float or a [V={v}] tensor, got shape {list(alpha.shape)}")
            per_token = per_token * torch.where(valid, alpha.to(logp.dtype)[torch.where(valid, targets, 0).long()], 0.0)
        elif isinstance(alpha, (int, float)):
            per_token = per_token * float(alpha)
        else:
            raise TypeError(f"alpha must be None, a float or a [V] tensor, got {type(alpha).__name__}")
    per_token = torch.where(valid, per_token, 0.0)
    return _reduce(per_token, reduction, _mean_denominator(valid, num_items_in_batch))


# ---------------------------------------------------------------------------------------------
# vocab_kl: divergences between two models' token distributions (OBJECTIVES.md §2.6)

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# Rows per block are chosen so that one block's fp32 [rows, V] temporaries stay near this many
# elements each (about eight of them live at once): memory O(N + block), whatever N is.
KL_BLOCK_ELEMENTS = 1 << 21
KL_BLOCK_ROWS: Optional[int] = None  # tests pin it to cross block boundaries


def _kl_rows(n: int, v: int) -> int:
    if KL_BLOCK_ROWS is not None:
        return KL_BLOCK_ROWS
    return max(1, min(n, KL_BLOCK_ELEMENTS // max(v, 1)))


def _block_logits(hidden, weight_acc, bias, spec: Spec, r0, r1, acc):
    """z for rows [r0, r1) of one model; `weight_acc` is its lm_head already in the accumulation dtype."""
    x = hidden[r0:r1].to(acc) @ weight_acc.T
    if bias is not None:
        x = x + bias.to(acc)
    return logits_from_raw(x, spec)


def _divergence_block(zs, zt, kind: str, beta: float):
    """Per-row divergence and dD/dz^s (z^s already includes 1/T) for one block of rows."""
    logps = torch.log_softmax(zs, dim=1)
    logpt = torch.log_softmax(zt, dim=1)
    ps = logps.exp()
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):  # KL(p^t || p^s)
        pt = logpt.exp()
        div = (pt * (logpt - logps)).sum(1)
        dz = ps - pt
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):  # KL(p^s || p^t)
        diff = logps - logpt
        div = (ps * diff).sum(1)
        dz = ps * (diff - div[:, None])
    else:  # generalised JSD(beta) with m = (1 - beta) p^s + beta p^t
        pt = logpt.exp()
        logm = torch.logaddexp(logps + math.log1p(-beta), logpt + math.log(beta))
        kl_s = (ps * (logps - logm)).sum(1)
        kl_t = (pt * (logpt - logm)).sum(1)
        div = beta * kl_t + (1.0 - beta) * kl_s
        dz = (1.0 - beta) * ps * (logps - logm - kl_s[:, None])
    return div, dz


@torch.library.custom_op("flashloss::vocab_kl", mutates_args=())
def _vocab_kl_op(s_hidden: torch.Tensor, s_weight: torch.Tensor, s_bias: Optional[torch.Tensor],
                 t_hidden: torch.Tensor, t_weight: torch.Tensor, t_bias: Optional[torch.Tensor],
                 valid: torch.Tensor, kind: str, beta: float, inv_temperature: float, s_scale: float,
                 s_softcap: float, t_scale: float, t_softcap: float) -> torch.Tensor:
    n, v = s_hidden.shape[0], s_weight.shape[0]
    acc = acc_dtype(s_hidden.dtype)
    s_spec = Spec(-100, inv_temperature, s_scale, s_softcap, 0)
    t_spec = Spec(-100, inv_temperature, t_scale, t_softcap, 0)
    out = torch.zeros(n, dtype=acc, device=s_hidden.device)
    s_w, t_w = s_weight.to(acc), t_weight.to(acc)  # no copy for fp32/fp64; one upcast for bf16/fp16
    step = _kl_rows(n, v)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        zs = _block_logits(s_hidden, s_w, s_bias, s_spec, r0, r1, acc)
        zt = _block_logits(t_hidden, t_w, t_bias, t_spec, r0, r1, acc)
        div, _ = _divergence_block(zs, zt, kind, beta)
        out[r0:r1] = torch.where(valid[r0:r1], div, 0.0)
    return out


@_vocab_kl_op.register_fake
def _(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, valid, kind, beta, inv_temperature, s_scale,
      s_softcap, t_scale, t_softcap):
    return s_hidden.new_empty(s_hidden.shape[0], dtype=acc_dtype(s_hidden.dtype))


@torch.library.custom_op("flashloss::vocab_kl_backward", mutates_args=())
def _vocab_kl_backward_op(g: torch.Tensor, s_hidden: torch.Tensor, s_weight: torch.Tensor,
                          s_bias: Optional[torch.Tensor], t_hidden: torch.Tensor, t_weight: torch.Tensor,
                          t_bias: Optional[torch.Tensor], valid: torch.Tensor, kind: str, beta: float,
                          inv_temperature: float, s_scale: float, s_softcap: float, t_scale: float,
                          t_softcap: float, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recomputes each block of both models' logits; dz^s = g_t dD/dz^s, then chain through the
    student's softcap/scale/temperature into d hidden, d weight (fp32) and d bias."""
    n, h = s_hidden.shape
    v = s_weight.shape[0]
    acc = acc_dtype(s_hidden.dtype)
    s_spec = Spec(-100, inv_temperature, s_scale, s_softcap, 0)
    t_spec = Spec(-100, inv_temperature, t_scale, t_softcap, 0)
    dh = torch.zeros(n, h, dtype=acc, device=s_hidden.device) if needs[0] else s_hidden.new_zeros(0, dtype=acc)
    dw = torch.zeros(v, h, dtype=acc, device=s_hidden.device) if needs[1] else s_hidden.new_zeros(0, dtype=acc)
    db = torch.zeros(v, dtype=acc, device=s_hidden.device) if needs[2] else s_hidden.new_zeros(0, dtype=acc)
    gv = torch.where(valid, g, 0.0)
    w_acc, t_w = s_weight.to(acc), t_weight.to(acc)
    step = _kl_rows(n, v)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        zs = _block_logits(s_hidden, w_acc, s_bias, s_spec, r0, r1, acc)
        zt = _block_logits(t_hidden, t_w, t_bias, t_spec, r0, r1, acc)
        _, dz = _divergence_block(zs, zt, kind, beta)
        dx = dz * (gv[r0:r1, None] * raw_grad_factor(zs, s_spec))
        if needs[0]:
            dh[r0:r1] = dx @ w_acc
        if needs[1]:
            dw += dx.T @ s_hidden[r0:r1].to(acc)
        if needs[2]:
            db += dx.sum(0)
    return dh, dw, db


@_vocab_kl_backward_op.register_fake
def _(g, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, valid, kind, beta, inv_temperature, s_scale,
      s_softcap, t_scale, t_softcap, needs):
    acc = acc_dtype(s_hidden.dtype)
    shapes = [tuple(s_hidden.shape), tuple(s_weight.shape), (s_weight.shape[0],)]
    return tuple(s_hidden.new_empty(sh if need else (0,), dtype=acc) for sh, need in zip(shapes, needs))


def _vocab_kl_setup(ctx, inputs, output):
    (s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, valid, kind, beta, inv_temperature, s_scale,
     s_softcap, t_scale, t_softcap) = inputs
    ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, valid)
    ctx.args = (kind, beta, inv_temperature, s_scale, s_softcap, t_scale, t_softcap)


def _vocab_kl_backward(ctx, g):
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, valid = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], s_bias is not None and ctx.needs_input_grad[2]]
    dh, dw, db = _vocab_kl_backward_op(g.to(acc_dtype(s_hidden.dtype)).contiguous(), s_hidden, s_weight, s_bias,
                                       t_hidden, t_weight, t_bias, valid, *ctx.args, needs)
    return (dh.to(s_hidden.dtype) if needs[0] else None, dw.to(s_weight.dtype) if needs[1] else None,
            db.to(s_bias.dtype) if needs[2] else None) + (None,) * 11


_vocab_kl_op.register_autograd(_vocab_kl_backward, setup_context=_vocab_kl_setup)


def vocab_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: Optional[torch.Tensor] = None,
    *,
    divergence: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    t_squared: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
):
    """Token-level divergence between a student's and a teacher's vocabulary distributions, each
    from its own hidden states [..., H_s] / [..., H_t] and lm_head [V, H_s] / [V, H_t] (same V),
    without either logit matrix (OBJECTIVES.md §2.6).

    divergence: 'forward_kl' = KL(p^t || p^s) (Hinton KD; TDPO's token KL with the reference as
    teacher), 'reverse_kl' = KL(p^s || p^t), 'jsd' = generalised JSD(beta) with
    m = (1 - beta) p^s + beta p^t: beta KL(p^t || m) + (1 - beta) KL(p^s || m); beta = 0 is forward
    KL and beta = 1 reverse KL (TRL GKD / Liger jsd_beta conventions). Both distributions use the
    same temperature; no T^2 factor unless t_squared=True (classic KD). The teacher gets no
    gradient. `targets` [...] (optional) only marks ignored positions (== ignore_index).
    reduction 'mean' = sum over valid tokens / N_valid (or num_items_in_batch); 'none' gives [...].
    Rows are streamed in blocks through both lm_heads (forward and a recomputing backward);
    extra memory O(N + block x V), independent of N beyond the O(N) outputs.
    """
    check_reduction(reduction)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    check_tensor("student_hidden", student_hidden, dtypes=FLOAT_DTYPES)
    dev, dt = student_hidden.device, student_hidden.dtype
    check_tensor("student_weight", student_weight, dim=2, dtypes=(dt,), device=dev)
    check_tensor("teacher_hidden", teacher_hidden, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor("teacher_weight", teacher_weight, dim=2, dtypes=(teacher_hidden.dtype,), device=dev)
    lead = student_hidden.shape[:-1]
    if tuple(teacher_hidden.shape[:-1]) != tuple(lead):
        raise ValueError(f"teacher_hidden must have the leading dimensions of student_hidden {list(lead)}, got "
                         f"{list(teacher_hidden.shape)}")
    hs, ht = student_hidden.shape[-1], teacher_hidden.shape[-1]
    if student_weight.shape[1] != hs:
        raise ValueError(f"student_weight must have shape [V, H={hs}], got {list(student_weight.shape)}")
    v = student_weight.shape[0]
    if tuple(teacher_weight.shape) != (v, ht):
        raise ValueError(f"teacher_weight must have shape [V={v}, H={ht}] (same vocabulary as the student), got "
                         f"{list(teacher_weight.shape)}")
    for name, b, width in (("student_bias", student_bias, v), ("teacher_bias", teacher_bias, v)):
        if b is not None:
            check_tensor(name, b, dim=1, dtypes=FLOAT_DTYPES, device=dev)
            if b.shape[0] != width:
                raise ValueError(f"{name} must have shape [V={v}], got {list(b.shape)}")
    inv_t, s_scale, s_cap = _check_scalars(temperature, student_logit_scale, student_softcap)
    _, t_scale, t_cap = _check_scalars(temperature, teacher_logit_scale, teacher_softcap)
    if targets is not None:
        targets = _check_targets("targets", targets, lead, v, ignore_index, dev)
        valid = targets != ignore_index
    else:
        valid = torch.ones(lead, dtype=torch.bool, device=dev)
    # The teacher is read in the student's dtype (no gradient; a bf16 teacher must not round the
    # student's fp32 arithmetic).
    t_h = teacher_hidden.detach().reshape(-1, ht).to(dt).contiguous()
    t_w = teacher_weight.detach().to(dt).contiguous()
    t_b = None if teacher_bias is None else teacher_bias.detach().to(dt).contiguous()
    s_b = None if student_bias is None else student_bias.to(dt).contiguous()
    per_token = _vocab_kl_op(student_hidden.reshape(-1, hs).contiguous(), student_weight.contiguous(), s_b,
                             t_h, t_w, t_b, valid.reshape(-1).contiguous(), divergence, float(beta), inv_t, s_scale,
                             s_cap, t_scale, t_cap).reshape(lead)
    if t_squared:
        per_token = per_token * (float(temperature) ** 2)
    return _reduce(per_token, reduction, _mean_denominator(valid, num_items_in_batch))
