"""Naive transcription of OBJECTIVES.md §3 (the preference family): a test oracle, run in float64.

Written from the spec's formulas one loss at a time, independently of flashloss.preference: direct
products instead of stable forms where the spec gives both (sigma(rho/tau) e^{-rho}, 1 - p^{-alpha},
log(1 - e^x)), TRL v0.24.0's own difference form for the legacy alpha-divergence, explicit loops
for the listwise losses. Inputs are per-sequence values; everything is differentiable by autograd.
Use moderate inputs: the naive forms overflow where the library's stable forms do not.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ls(x):
    """log sigma(x) = min(x, 0) - log1p(e^{-|x|}) (OBJECTIVES.md §0.2; F.logsigmoid is the same
    value but ~100x slower per call on small CPU tensors)."""
    return torch.clamp(x, max=0) - torch.log1p(torch.exp(-torch.abs(x)))


def _sig(x):
    return torch.sigmoid(x)


def _zeros_like(x):
    return torch.zeros_like(x)


def f_score(r, kind, coef):
    """s = g(r), OBJECTIVES.md §3.1 table (TRL 1.x)."""
    if kind == "reverse_kl":
        return r
    if kind == "forward_kl":
        return 1 - torch.exp(-r)
    if kind == "js_divergence":
        return math.log(2) + _ls(r)
    if abs(coef - 1) < 1e-6:
        return r
    return (torch.exp((coef - 1) * r) - 1) / (coef - 1)


def legacy_f_logit(r_w, r_l, kind, coef):
    """TRL v0.24.0 logits: Delta_r; JS Delta_r - (softplus(r_w) - softplus(r_l));
    alpha (e^{-a' r_l} - e^{-a' r_w}) / a'."""
    if kind == "reverse_kl":
        return r_w - r_l
    if kind == "js_divergence":
        return (r_w - r_l) - (F.softplus(r_w) - F.softplus(r_l))
    if kind == "alpha_divergence":
        if abs(coef) < 1e-6:
            return r_w - r_l
        return (torch.exp(-coef * r_l) - torch.exp(-coef * r_w)) / coef
    raise ValueError(kind)


def dpo_pair_loss(loss_type, pc, pr, rc, rr, beta, *, eps=0.0, convention="trl", nw=None, nl=None,
                  fdiv="reverse_kl", fcoef=None, tau=0.05, nll=None, delta=0.0, h_shift=None):
    """One DPO-family per-pair loss [B] (OBJECTIVES.md §3.2). Legacy ipo averaging is the caller's
    (dpo_total). `h_shift(h)` adds the DPOP / R-DPO modifiers to the pair logit."""
    legacy = convention == "trl_legacy"
    if rc is None:
        rc, rr = _zeros_like(pc), _zeros_like(pr)
    r_w, r_l = pc - rc, pr - rr
    if fcoef is None:
        fcoef = 1.0 if legacy else 0.5
    if legacy:
        dlt = legacy_f_logit(r_w, r_l, fdiv, fcoef)
        s_w = f_score(r_w, fdiv, 1 - fcoef) if fdiv == "alpha_divergence" else f_score(r_w, fdiv, None)
        s_l = f_score(r_l, fdiv, 1 - fcoef) if fdiv == "alpha_divergence" else f_score(r_l, fdiv, None)
    else:
        s_w, s_l = f_score(r_w, fdiv, fcoef), f_score(r_l, fdiv, fcoef)
        dlt = s_w - s_l
    shift = h_shift if h_shift is not None else (lambda h: h)
    h = shift(beta * dlt)
    if loss_type == "sigmoid":
        if legacy:
            return -(1 - eps) * _ls(h) - eps * _ls(-h)
        return -_ls(h)
    if loss_type == "cdpo":
        return -(1 - eps) * _ls(h) - eps * _ls(-h)
    if loss_type == "hinge":
        return torch.clamp(1 - h, min=0)
    if loss_type == "ipo":
        if legacy:
            return (dlt - 1 / (2 * beta)) ** 2
        return (s_w / nw - s_l / nl - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        e = eps if eps > 0 else 1e-3
        return _sig(h) * (_ls(h) - math.log(1 - e)) + _sig(-h) * (_ls(-h) - math.log(e))
    if loss_type == "nca_pair":
        return -_ls(beta * r_w) - 0.5 * _ls(-beta * r_w) - 0.5 * _ls(-beta * r_l)
    if loss_type == "robust":
        return (-(1 - eps) * _ls(h) + eps * _ls(-h)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        if legacy:
            return -_ls(beta * r_w - delta) - _ls(-(beta * r_l - delta))
        return -_ls(beta * r_w) - _ls(-beta * r_l)
    if loss_type == "sppo_hard":
        return (r_w - 1 / (2 * beta)) ** 2 + (r_l + 1 / (2 * beta)) ** 2
    if loss_type == "aot":
        d = torch.sort(pc - pr)[0] - torch.sort(rc - rr)[0]
        return -(1 - eps) * _ls(beta * d) - eps * _ls(-beta * d)
    if loss_type in ("aot_unpaired", "aot_pair"):
        d = torch.sort(r_w)[0] - torch.sort(r_l)[0]
        return -(1 - eps) * _ls(beta * d) - eps * _ls(-beta * d)
    if loss_type == "apo_zero":
        return 1 - _sig(beta * r_w) + _sig(beta * r_l)
    if loss_type == "apo_down":
        return _sig(beta * r_w) + 1 - _sig(beta * (r_w - r_l))
    if loss_type == "discopop":
        rho = shift(beta * (r_w - r_l)) if legacy else h
        return (1 - _sig(rho / tau)) * (-_ls(rho)) + _sig(rho / tau) * torch.exp(-rho)
    if loss_type == "sft":
        return nll * torch.ones_like(pc)
    if loss_type == "sigmoid_norm":
        return -_ls(beta * (s_w / nw - s_l / nl))
    raise ValueError(loss_type)


def dpo_total(types, pc, pr, rc, rr, beta, *, weights=None, convention="trl", nw=None, nl=None, nll=None,
              rpo_alpha=None, wpo=None, dpop_lambda=None, rdpo_alpha=None, **kw):
    """Per-pair total sum_k lambda_k loss_k (+ rpo_alpha NLL), times the WPO weight, as §3.2-3.3.
    nll None: -sum(pc)/sum(nw) (token mean over the chosen completions, raw sums)."""
    legacy = convention == "trl_legacy"
    weights = weights or [1.0] * len(types)
    if nll is None and nw is not None:
        nll = -pc.sum() / nw.sum()
    if rc is None:
        rc, rr = _zeros_like(pc), _zeros_like(pr)
    if legacy and "ipo" in types:
        pc, pr, rc, rr = pc / nw, pr / nl, rc / nw, rr / nl

    def h_shift(h):
        if dpop_lambda is not None:
            h = h - beta * dpop_lambda * torch.clamp(rc - pc, min=0)
        if rdpo_alpha is not None:
            h = h + rdpo_alpha * (nw - nl)
        return h

    total = 0
    for t, lam in zip(types, weights):
        total = total + lam * dpo_pair_loss(t, pc, pr, rc, rr, beta, convention=convention, nw=nw, nl=nl, nll=nll,
                                            h_shift=h_shift, **kw)
    if rpo_alpha is not None:
        total = total + rpo_alpha * nll
    if wpo is not None:
        w = wpo[0] * wpo[1]
        total = total * (torch.clamp(w, max=1) if legacy else w)
    return total


def dpo_metrics(pc, pr, rc, rr, beta):
    """§3.9: rewards beta r (raw r), strict accuracy, margins, mean log-probs."""
    if rc is None:
        rc, rr = _zeros_like(pc), _zeros_like(pr)
    cw, cl = beta * (pc - rc), beta * (pr - rr)
    return {"rewards/chosen": cw.mean(), "rewards/rejected": cl.mean(),
            "rewards/accuracies": (cw > cl).double().mean(), "rewards/margins": (cw - cl).mean(),
            "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}


def cpo_pair_loss(loss_type, lw, ll, beta, *, eps=0.0, gamma=0.5, alpha=0.0):
    """§3.4 CPO / SimPO / AlphaPO per pair, on the log-probs the loss uses (means for ipo/simpo)."""
    if alpha != 0:
        lw = (1 - torch.exp(lw) ** (-alpha)) / alpha
        ll = (1 - torch.exp(ll) ** (-alpha)) / alpha
    d = lw - ll
    if loss_type == "sigmoid":
        return -(1 - eps) * _ls(beta * d) - eps * _ls(-beta * d)
    if loss_type == "hinge":
        return torch.clamp(1 - beta * d, min=0)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    z = beta * d - gamma
    return -(1 - eps) * _ls(z) - eps * _ls(-z)


def orpo_pair_loss(mw, ml, nll, beta):
    """§3.4 ORPO per pair on mean log-probs: NLL - beta log sigma(o_w - o_l), o = m - log(1 - e^m)."""
    o_w = mw - torch.log(1 - torch.exp(mw))
    o_l = ml - torch.log(1 - torch.exp(ml))
    return nll - beta * _ls(o_w - o_l)


def kto_example_loss(lp, lr, desirable, beta, z0=None, *, loss_type="kto", wd=1.0, wu=1.0):
    """§3.5 KTO per example (input order)."""
    r = lp - lr
    out = []
    for i in range(r.shape[0]):
        b = beta[i] if isinstance(beta, torch.Tensor) and beta.dim() == 1 else beta
        if loss_type == "kto":
            v = wd * (1 - _sig(b * (r[i] - z0))) if desirable[i] else wu * (1 - _sig(b * (z0 - r[i])))
        else:
            v = wd * (1 - _sig(b * r[i])) if desirable[i] else wu * _sig(b * r[i])
        out.append(v)
    return torch.stack(out)


def bco_example_loss(lp, lr, desirable, beta, delta, u=None):
    """§3.5 BCO per example: -log sigma(R - delta), undesirable u (-log sigma(-(R - delta)))."""
    rew = beta * (lp - lr)
    out = []
    for i in range(rew.shape[0]):
        if desirable[i]:
            out.append(-_ls(rew[i] - delta))
        else:
            out.append((1.0 if u is None else u[i]) * -_ls(-(rew[i] - delta)))
    return torch.stack(out)


def npo_example_loss(lp, lr, beta):
    """§3.5 NPO: -(2/beta) log sigma(-beta r)."""
    return -(2 / beta) * _ls(-beta * (lp - lr))


def tdpo_pair_loss(pc, pr, rc, rr, kw, kl, beta, alpha=0.5, version=2):
    """§3.6 TDPO1/2."""
    m = (pc - rc) - (pr - rr)
    if version == 1:
        logits = m - (kl - kw)
    else:
        logits = m - alpha * (kl - kw.detach())
    return -_ls(beta * logits)


def lipo_list_loss(s, labels, mask):
    """§3.7 LiPO-lambda per list by explicit loops over pairs; ranks by descending score, ties by index."""
    out = []
    for b in range(s.shape[0]):
        idx = [i for i in range(s.shape[1]) if mask[b, i]]
        vals = s[b].detach()
        ranked = sorted(idx, key=lambda i: (-float(vals[i]), i))
        rank = {i: k + 1 for k, i in enumerate(ranked)}
        total = s.new_zeros(())
        for i in idx:
            for j in idx:
                if labels[b, i] > labels[b, j]:
                    gi, gj = 2.0 ** float(labels[b, i]) - 1, 2.0 ** float(labels[b, j]) - 1
                    di, dj = 1 / math.log2(1 + rank[i]), 1 / math.log2(1 + rank[j])
                    total = total + abs(gi - gj) * abs(di - dj) * F.softplus(-(s[b, i] - s[b, j]))
        out.append(total)
    return torch.stack(out)


def listmle_list_loss(s, labels, mask):
    """§3.7 ListMLE in allRank's form (max-shifted exp, reversed cumsum), padding excluded, ties by
    index, without the 1e-10."""
    out = []
    for b in range(s.shape[0]):
        idx = [i for i in range(s.shape[1]) if mask[b, i]]
        order = sorted(idx, key=lambda i: (-float(labels[b, i]), i))
        x = s[b, order]
        m = x.max()
        xm = x - m
        cums = torch.flip(torch.cumsum(torch.flip(torch.exp(xm), [0]), 0), [0])
        out.append((torch.log(cums) - xm).sum())
    return torch.stack(out)


def bradley_terry_pair_loss(rc, rr, margin=None, c=None, eps=0.0):
    """§3.8 -(1-eps) log sigma(d) - eps log sigma(-d) + c (r_c + r_r)^2, d = r_c - r_r - m."""
    d = rc - rr - (0 if margin is None else margin)
    loss = -(1 - eps) * _ls(d) - eps * _ls(-d)
    if c is not None:
        loss = loss + c * (rc + rr) ** 2
    return loss
