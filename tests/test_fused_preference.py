"""FusedLinearPreferenceLoss against the unfused path (full logits = hidden @ W^T, log_softmax,
gather with the causal shift, per-sequence sums, then the same flashloss.preference function),
computed in float64; the fused module runs in float32 (DESIGN.md §6 tolerance 1e-5, relative norms)."""
from __future__ import annotations

import math

import pytest
import torch

import flashloss
from flashloss import preference as P
from flashloss.fused_preference import CPO_FAMILY, DPO_FAMILY, FusedLinearPreferenceLoss

from helpers import assert_close

B, T, H, V = 3, 9, 8, 50
II = -100
BACKENDS = ["torch"] + (["cpu"] if flashloss.backend_available("cpu", "cpu")[0] else [])


def _labels(b, t, gen, prompt=(2, 4)):
    lab = torch.randint(0, V, (b, t), generator=gen)
    for i in range(b):  # prompt of 2-4 tokens, some right padding
        p = prompt[0] + i % (prompt[1] - prompt[0] + 1)
        lab[i, :p] = II
        if i % 2:
            lab[i, t - 1 - i % 3:] = II
    return lab


def _inputs(seed=0, t_rej=None, bias=False):
    gen = torch.Generator().manual_seed(seed)
    t_rej = T if t_rej is None else t_rej
    hc = torch.randn(B, T, H, generator=gen)
    hr = torch.randn(B, t_rej, H, generator=gen)
    w = torch.randn(V, H, generator=gen) * 0.5
    b = torch.randn(V, generator=gen) * 0.1 if bias else None
    lc, lr = _labels(B, T, gen), _labels(B, t_rej, gen, prompt=(1, 3))
    ref_hc = hc + 0.3 * torch.randn(hc.shape, generator=gen)
    ref_hr = hr + 0.3 * torch.randn(hr.shape, generator=gen)
    ref_w = w + 0.1 * torch.randn(w.shape, generator=gen)
    return dict(hc=hc, hr=hr, w=w, b=b, lc=lc, lr=lr, ref_hc=ref_hc, ref_hr=ref_hr, ref_w=ref_w)


# ---------------------------------------------------------------------------------------------
# the unfused path, written out


def _naive_tokens(h, w, b, labels, shift=True, softcap=None, temperature=1.0):
    z = h @ w.T
    if b is not None:
        z = z + b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    if shift:
        z, tgt = z[:, :-1], labels[:, 1:]
    else:
        tgt = labels
    logsm = torch.log_softmax(z, -1)
    mask = tgt != II
    logp = logsm.gather(-1, tgt.clamp_min(0)[..., None])[..., 0] * mask
    ent = -(logsm.exp() * logsm).sum(-1) * mask
    p2 = torch.logsumexp(2 * logsm, -1) * mask
    return dict(logp=logp, mask=mask, ent=ent, zmean=z.mean(-1) * mask, p2=p2)


def _ld_sums(toks, alpha):
    lengths = [t["mask"].sum(1) for t in toks]
    if alpha is None:
        return [t["logp"].sum(1) for t in toks]
    shared = torch.minimum(*lengths)
    out = []
    for t in toks:
        sums = []
        for i in range(t["logp"].shape[0]):
            pos = t["mask"][i].nonzero().squeeze(1)  # completion tokens in order
            lp = t["logp"][i, pos]
            wts = torch.where(torch.arange(pos.numel()) < shared[i], 1.0, alpha).to(lp.dtype)
            sums.append((lp * wts).sum())
        out.append(torch.stack(sums))
    return out


def naive(loss_type, d, *, ref="hidden", bias=False, beta=0.1, label_smoothing=0.0, convention="trl",
          nll_weight=None, ld_alpha=None, use_weighting=False, dtype=torch.float64, loss_weights=None, **kw):
    """Returns loss, metrics, (hc, hr, w) leaves in `dtype`."""
    hc, hr, w = (d[k].to(dtype).requires_grad_(True) for k in ("hc", "hr", "w"))
    b = d["b"].to(dtype) if bias else None
    toks = [_naive_tokens(hc, w, b, d["lc"]), _naive_tokens(hr, w, b, d["lr"])]
    lengths = [t["mask"].sum(1) for t in toks]
    pc, pr = _ld_sums(toks, ld_alpha)
    nll = -toks[0]["logp"].sum() / lengths[0].sum().clamp_min(1)
    rc = rr = None
    if ref == "hidden":
        with torch.no_grad():
            rw = d["ref_w"].to(dtype)
            rt = [_naive_tokens(d["ref_hc"].to(dtype), rw, None, d["lc"]),
                  _naive_tokens(d["ref_hr"].to(dtype), rw, None, d["lr"])]
            rc, rr = _ld_sums(rt, ld_alpha if convention == "trl" else None)
    elif ref == "logps":
        rc, rr = d["ref_logps"]
        rc, rr = rc.to(dtype), rr.to(dtype)
    if isinstance(loss_type, str) and loss_type in CPO_FAMILY:
        nw = {"cpo": 1.0, "cpo_sigmoid": 1.0, "cpo_hinge": 1.0, "cpo_ipo": 1.0}.get(loss_type, 0.0) \
            if nll_weight is None else nll_weight
        loss, m = P.cpo_loss(pc, pr, nll if nw else None, loss_type=CPO_FAMILY[loss_type], beta=beta, cpo_alpha=nw,
                             label_smoothing=label_smoothing, chosen_lengths=lengths[0], rejected_lengths=lengths[1],
                             **kw)
    elif loss_type == "orpo":
        nw = 1.0 if nll_weight is None else nll_weight
        loss, m = P.orpo_loss(pc, pr, nll * nw if nw else None, beta=beta, chosen_lengths=lengths[0],
                              rejected_lengths=lengths[1])
        if nw:
            m["nll_loss"] = nll.detach()  # the NLL itself, not weighted (TRL's nll_loss)
    else:
        wpo = None
        if use_weighting:
            with torch.no_grad():
                wpo = tuple(torch.exp(((t["logp"] - t["p2"]) * t["mask"]).sum(1) / n.clamp_min(1))
                            for t, n in zip(toks, lengths))
        loss, m = P.preference_loss(pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                                    convention=convention, chosen_lengths=lengths[0], rejected_lengths=lengths[1],
                                    chosen_nll=nll, rpo_alpha=nll_weight or None, wpo_weights=wpo,
                                    loss_weights=loss_weights, **kw)
    with torch.no_grad():
        m["logits/chosen"] = toks[0]["zmean"].sum() / lengths[0].sum().clamp_min(1)
        m["logits/rejected"] = toks[1]["zmean"].sum() / lengths[1].sum().clamp_min(1)
        m["entropy"] = (toks[0]["ent"].sum() + toks[1]["ent"].sum()) / (lengths[0].sum() + lengths[1].sum())
    return loss, m, (hc, hr, w)


def fused(module, d, *, ref="hidden", stacked=True, bias=False):
    hc, hr, w = (d[k].clone().requires_grad_(True) for k in ("hc", "hr", "w"))
    b = d["b"] if bias else None
    kw = {}
    if ref == "hidden":
        kw = dict(ref_weight=d["ref_w"])
        kw["ref_hidden"] = torch.cat([d["ref_hc"], d["ref_hr"]]) if stacked else (d["ref_hc"], d["ref_hr"])
    elif ref == "logps":
        kw = dict(ref_chosen_logps=d["ref_logps"][0], ref_rejected_logps=d["ref_logps"][1])
    if stacked:
        hid = torch.cat([hc, hr])
        loss, m = module(hid, w, torch.cat([d["lc"], d["lr"]]), b, **kw)
    else:
        loss, m = module(hc, w, d["lc"], b, rejected_hidden=hr, rejected_labels=d["lr"], **kw)
    return loss, m, (hc, hr, w)


def check(module, d, naive_kw, *, ref="hidden", stacked=True, bias=False, what="", naive_dtype=torch.float64):
    loss, m, leaves = fused(module, d, ref=ref, stacked=stacked, bias=bias)
    eloss, em, eleaves = naive(module_loss_type(module), d, ref=ref, bias=bias, dtype=naive_dtype, **naive_kw)
    assert torch.isfinite(loss).all()
    assert_close(loss, eloss, torch.float32, f"{what} loss")
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    egrads = torch.autograd.grad(eloss, eleaves, allow_unused=True)
    for name, g, eg in zip(("d hidden chosen", "d hidden rejected", "d weight"), grads, egrads):
        g = torch.zeros_like(leaves[0 if "chosen" in name else 1 if "rejected" in name else 2]) if g is None else g
        eg = torch.zeros_like(g, dtype=torch.float64) if eg is None else eg
        assert torch.isfinite(g).all(), name
        assert_close(g, eg, torch.float32, f"{what} {name}")
    assert set(em) == set(m), (sorted(em), sorted(m))
    # metrics such as rewards are differences of per-sequence sums: their fp32 error scales with
    # the sums (|logps|), not with the difference, so the bound is relative to that scale
    scale = max(1.0, float(em["logps/chosen"].abs()), float(em["logps/rejected"].abs()))
    for k in em:
        assert not m[k].requires_grad, k
        err = abs(float(m[k]) - float(em[k]))
        assert err <= 1e-5 * max(scale, float(em[k].abs())), f"{what} metric {k}: {float(m[k])} vs {float(em[k])}"
    return loss, m


def module_loss_type(module):
    return module.loss_type


# ---------------------------------------------------------------------------------------------

ALL_TYPES = list(DPO_FAMILY) + list(CPO_FAMILY) + ["orpo"]


def _kw(loss_type):
    kw = {"label_smoothing": 0.1}
    if loss_type in CPO_FAMILY or loss_type == "orpo":
        kw = {"label_smoothing": 0.1} if loss_type not in ("orpo",) else {}
        if loss_type == "alphapo":
            kw["alpha"] = 0.3
    return kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_every_loss_type_matches_unfused(loss_type, backend):
    d = _inputs(seed=1)
    kw = _kw(loss_type)
    ref = "hidden" if loss_type in DPO_FAMILY else None
    mod = FusedLinearPreferenceLoss(loss_type, backend=backend, **kw)
    check(mod, d, kw, ref=ref, what=loss_type)


@pytest.mark.parametrize("ref", ["hidden", "logps", None])
@pytest.mark.parametrize("stacked", [True, False])
def test_reference_modes_and_layouts(ref, stacked):
    d = _inputs(seed=2, t_rej=T if stacked else 7)
    if ref == "logps":
        gen = torch.Generator().manual_seed(5)
        d["ref_logps"] = (-20 * torch.rand(B, generator=gen), -20 * torch.rand(B, generator=gen))
    for lt in ("sigmoid", ["sigmoid", "sft"]):
        check(FusedLinearPreferenceLoss(lt, loss_weights=None if lt == "sigmoid" else [1.0, 0.5]), d,
              {} if lt == "sigmoid" else {"loss_weights": [1.0, 0.5]}, ref=ref, stacked=stacked, what=f"{lt} {ref}")


MODIFIERS = [
    dict(use_weighting=True),
    dict(use_weighting=True, convention="trl_legacy"),
    dict(ld_alpha=0.5),
    dict(ld_alpha=0.3, convention="trl_legacy"),
    dict(nll_weight=0.7),
    dict(ld_alpha=0.5, use_weighting=True, nll_weight=1.0, loss_type=["sigmoid", "ipo"]),
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mods", MODIFIERS, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_wpo_ld_dpo_nll_bias(mods, bias):
    mods = dict(mods)
    lt = mods.pop("loss_type", "sigmoid")
    d = _inputs(seed=3, bias=bias)
    check(FusedLinearPreferenceLoss(lt, **mods), d, mods, bias=bias, what=str(mods))


def test_nll_weight_in_cpo_and_orpo():
    d = _inputs(seed=4)
    for lt, w in (("cpo", 0.4), ("simpo", 0.5), ("orpo", 2.0), ("orpo", 0.0), ("cpo_ipo", 0.0)):
        check(FusedLinearPreferenceLoss(lt, nll_weight=w), d, {"nll_weight": w}, ref=None, what=f"{lt} {w}")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "orpo", "cpo"])
def test_empty_completion(loss_type):
    d = _inputs(seed=6)
    d["lc"][1] = II  # one chosen sequence has no completion token
    d["lr"][2, :] = II
    kw = {"ld_alpha": 0.5, "use_weighting": True} if loss_type in ("sigmoid", "ipo") else {}
    ref = "hidden" if loss_type in DPO_FAMILY else None
    for stacked in (True, False):
        # ORPO clamps a mean log-prob of 0 to -1e-7 in fp32 but -1e-15 in fp64 (preference.orpo_loss):
        # an empty completion hits the clamp, so its unfused path runs in fp32 too
        check(FusedLinearPreferenceLoss(loss_type, **kw), d, kw, ref=ref, stacked=stacked, what="empty",
              naive_dtype=torch.float32 if loss_type == "orpo" else torch.float64)


def test_softcap_temperature_shift_false():
    d = _inputs(seed=7)
    mod = FusedLinearPreferenceLoss("sigmoid", softcap=3.0, temperature=0.7, backend="torch")
    hc, hr, w = (d[k].clone().requires_grad_(True) for k in ("hc", "hr", "w"))
    loss, _ = mod(torch.cat([hc, hr]), w, torch.cat([d["lc"], d["lr"]]), shift=False)
    toks = [_naive_tokens(h.double(), w.double(), None, lab, shift=False, softcap=3.0, temperature=0.7)
            for h, lab in ((hc, d["lc"]), (hr, d["lr"]))]
    eloss, _ = P.preference_loss(toks[0]["logp"].sum(1), toks[1]["logp"].sum(1))
    assert_close(loss, eloss, torch.float32, "softcap/temperature/shift=False")


def test_reference_saves_nothing(monkeypatch):
    d = _inputs(seed=8)
    seen = {}
    orig = P.preference_loss

    def spy(pc, pr, rc=None, rr=None, **kw):
        seen["ref"] = (rc, rr)
        return orig(pc, pr, rc, rr, **kw)

    monkeypatch.setattr(P, "preference_loss", spy)
    mod = FusedLinearPreferenceLoss("sigmoid", backend="torch")
    ref_h = torch.cat([d["ref_hc"], d["ref_hr"]]).requires_grad_(True)  # even a reference that requires grad
    ref_w = d["ref_w"].clone().requires_grad_(True)
    hid = torch.cat([d["hc"], d["hr"]]).requires_grad_(True)
    w = d["w"].clone().requires_grad_(True)
    labels = torch.cat([d["lc"], d["lr"]])

    def saved_bytes(**kw):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = mod(hid, w, labels, **kw)
        return loss, total[0]

    loss, with_ref_hidden = saved_bytes(ref_hidden=ref_h, ref_weight=ref_w)
    rc, rr = seen["ref"]
    assert rc.grad_fn is None and rr.grad_fn is None and not rc.requires_grad and not rr.requires_grad
    _, with_ref_logps = saved_bytes(ref_chosen_logps=rc, ref_rejected_logps=rr)
    assert with_ref_hidden == with_ref_logps  # the reference pass adds nothing to the graph
    loss.backward()
    assert ref_h.grad is None and ref_w.grad is None


def test_prompt_rows_never_reach_the_lm_head(monkeypatch):
    import flashloss.fused_preference as F

    d = _inputs(seed=9)
    rows = []
    orig = F.token_logprobs

    def spy(x, *a, **kw):
        rows.append(x.shape[0])
        return orig(x, *a, **kw)

    monkeypatch.setattr(F, "token_logprobs", spy)
    labels = torch.cat([d["lc"], d["lr"]])
    FusedLinearPreferenceLoss("sigmoid")(torch.cat([d["hc"], d["hr"]]), d["w"], labels,
                                         ref_hidden=torch.cat([d["ref_hc"], d["ref_hr"]]))
    scored = int((labels[:, 1:] != II).sum())
    assert rows == [scored, scored]


def test_errors():
    d = _inputs()
    hid, lab = torch.cat([d["hc"], d["hr"]]), torch.cat([d["lc"], d["lr"]])
    with pytest.raises(ValueError, match="reference-free"):
        FusedLinearPreferenceLoss("simpo")(hid, d["w"], lab, ref_hidden=hid)
    with pytest.raises(ValueError, match="single loss types"):
        FusedLinearPreferenceLoss(["sigmoid", "simpo"])
    with pytest.raises(ValueError, match="unknown loss_type"):
        FusedLinearPreferenceLoss("nope")
    with pytest.raises(ValueError, match="alpha"):
        FusedLinearPreferenceLoss("alphapo")
    with pytest.raises(TypeError, match="formed by"):
        FusedLinearPreferenceLoss("sigmoid", rpo_alpha=1.0)
    with pytest.raises(ValueError, match="DPO family only"):
        FusedLinearPreferenceLoss("orpo", ld_alpha=0.5)
    with pytest.raises(ValueError, match="not both"):
        FusedLinearPreferenceLoss()(hid, d["w"], lab, ref_hidden=hid, ref_chosen_logps=torch.zeros(B),
                                    ref_rejected_logps=torch.zeros(B))
    with pytest.raises(ValueError, match="odd"):
        FusedLinearPreferenceLoss()(hid[1:], d["w"], lab[1:])
    assert math.isfinite(float(FusedLinearPreferenceLoss()(hid, d["w"], lab)[0]))
