"""flashloss.preference (OBJECTIVES.md §3) against
- the float64 transcription of §3 in flashloss.ref.preference (values and gradients, random upstream
  gradients for reduction='none'), for every loss type in both conventions;
- TRL 1.16's own loss code, called without a model: DPOTrainer._compute_loss, KTOTrainer._compute_loss
  and RewardTrainer.compute_loss with a stub `self` and a stub model that returns given per-token
  log-probs / rewards, CPOTrainer.cpo_loss and ORPOTrainer.odds_ratio_loss with a stub `self`.
TRL v0.24.0 (convention="trl_legacy") is not installed: it is checked against the transcription only.
"""
import collections
import math
import types

import pytest
import torch

import flashloss
from flashloss import preference as P
from flashloss.ref import preference as R
from helpers import check_against_reference, rel_err

DPO_TYPES = list(P.LOSS_TYPES)
SMOOTHED = {"cdpo", "robust", "exo_pair", "aot", "aot_unpaired"}


def _pairs(b=7, seed=0, scale=2.0, lengths=True):
    """Per-sequence sums: reference around -20, policy = reference + scale * N(0, 1); lengths 1..12."""
    g = torch.Generator().manual_seed(seed)
    rc = -20.0 + 3.0 * torch.randn(b, generator=g, dtype=torch.float64)
    rr = -22.0 + 3.0 * torch.randn(b, generator=g, dtype=torch.float64)
    pc = rc + scale * torch.randn(b, generator=g, dtype=torch.float64)
    pr = rr + scale * torch.randn(b, generator=g, dtype=torch.float64)
    nw = torch.randint(1, 13, (b,), generator=g)
    nl = torch.randint(1, 13, (b,), generator=g)
    return pc, pr, rc, rr, nw, nl


def _check(fn, ref, inputs, dtype, **kw):
    """check_against_reference with the transcription run in `dtype` as the plain-PyTorch baseline
    (helpers.assert_close: conditioning-limited fp32 gradients, e.g. apo_down's sigma' - sigma')."""
    return check_against_reference(fn, ref, inputs, dtype, naive=ref, **kw)


def _reduce(x, reduction):
    return x if reduction == "none" else (x.sum() if reduction == "sum" else x.mean())


def _legacy_delta(pc, pr, rc, rr, beta):
    """delta of legacy bco_pair with a fresh state: the batch mean of all 2B rewards."""
    return float(torch.cat([beta * (pc - rc), beta * (pr - rr)]).detach().mean())


def _ref_total(types_, pc, pr, rc, rr, nw, nl, beta, convention, **kw):
    nwf, nlf = nw.to(pc.dtype).clamp_min(1), nl.to(pc.dtype).clamp_min(1)
    if convention == "trl_legacy" and "bco_pair" in types_:
        if "ipo" in types_:
            kw["delta"] = _legacy_delta(pc / nwf, pr / nlf, rc / nwf, rr / nlf, beta)
        else:
            kw["delta"] = _legacy_delta(pc, pr, rc, rr, beta)
    return R.dpo_total(types_, pc, pr, rc, rr, beta, convention=convention, nw=nwf, nl=nlf, **kw)


# ---------------------------------------------------------------------------------------------
# every DPO-family loss type x convention against the transcription


CASES = [(t, c, e) for t in DPO_TYPES for c in ("trl", "trl_legacy") for e in (0.0, 0.2)
         if not (t == "exo_pair" and e == 0.0 and c == "trl")]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("loss_type,convention,eps", CASES)
def test_dpo_family_matches_transcription(loss_type, convention, eps, reduction):
    pc, pr, rc, rr, nw, nl = _pairs(b=9, seed=sum(map(ord, loss_type + convention)))
    beta = 0.1

    def fn(pc, pr, rc, rr, nw, nl):
        return P.preference_loss(pc, pr, rc, rr, loss_type, beta, label_smoothing=eps, reduction=reduction,
                                 convention=convention, chosen_lengths=nw, rejected_lengths=nl)[0]

    def ref(pc, pr, rc, rr, nw, nl):
        return _reduce(_ref_total([loss_type], pc, pr, rc, rr, nw, nl, beta, convention, eps=eps), reduction)

    for dtype in ([torch.float32, torch.float64] if reduction == "none" else [torch.float32]):
        _check(fn, ref, [pc, pr, rc, rr, nw, nl], dtype, grad_inputs=[0, 1],
                                name=f"{loss_type}/{convention}/{eps}/{reduction}")


F_CASES = [(t, f, a, c) for t in sorted(P.F_DIVERGENCE_LOSS_TYPES - {"sft"})
           for f, a in (("forward_kl", None), ("js_divergence", None), ("alpha_divergence", None),
                        ("alpha_divergence", 0.3), ("alpha_divergence", 1.0))
           for c in ("trl", "trl_legacy") if not (c == "trl_legacy" and f == "forward_kl")]


@pytest.mark.parametrize("loss_type,fdiv,coef,convention", F_CASES)
def test_f_divergence_scores_match_transcription(loss_type, fdiv, coef, convention):
    pc, pr, rc, rr, nw, nl = _pairs(seed=5, scale=1.5)
    eps = 0.1

    def fn(pc, pr, rc, rr, nw, nl):
        return P.preference_loss(pc, pr, rc, rr, loss_type, 0.5, label_smoothing=eps, reduction="none",
                                 convention=convention, chosen_lengths=nw, rejected_lengths=nl,
                                 f_divergence_type=fdiv, f_alpha_divergence_coef=coef)[0]

    def ref(pc, pr, rc, rr, nw, nl):
        return _ref_total([loss_type], pc, pr, rc, rr, nw, nl, 0.5, convention, eps=eps, fdiv=fdiv, fcoef=coef)

    _check(fn, ref, [pc, pr, rc, rr, nw, nl], torch.float32, grad_inputs=[0, 1],
                            name=f"{loss_type}/{fdiv}/{coef}/{convention}")


COMBOS = {
    "rpo_list": dict(types=["sigmoid", "sft"], weights=[1.0, 0.7]),
    "three": dict(types=["ipo", "nca_pair", "bco_pair"], weights=[0.3, 1.0, 2.0]),
    "with_aot": dict(types=["aot", "apo_down", "sigmoid_norm"], weights=[1.0, 0.5, 1.5], eps=0.1),
    "rpo_alpha": dict(types=["sigmoid"], rpo_alpha=0.6, eps=0.1),
    "wpo": dict(types=["sigmoid", "hinge", "ipo"], wpo=True),
    "dpop": dict(types=["sigmoid", "robust", "discopop"], dpop_lambda=50.0, eps=0.1),
    "rdpo": dict(types=["sigmoid", "hinge", "exo_pair"], rdpo_alpha=0.05, eps=0.1),
    "dpop_rdpo_sft": dict(types=["cdpo", "sft"], dpop_lambda=5.0, rdpo_alpha=0.02, eps=0.2),
}


@pytest.mark.parametrize("convention", ["trl", "trl_legacy"])
@pytest.mark.parametrize("combo", list(COMBOS))
def test_loss_lists_and_modifiers_match_transcription(combo, convention):
    spec = dict(COMBOS[combo])
    pc, pr, rc, rr, nw, nl = _pairs(b=11, seed=11)
    g = torch.Generator().manual_seed(2)
    wpo = (torch.rand(11, generator=g, dtype=torch.float64) * 1.5,
           torch.rand(11, generator=g, dtype=torch.float64) * 1.5) if spec.pop("wpo", False) else None
    types_, weights = spec.pop("types"), spec.pop("weights", None)
    eps = spec.pop("eps", 0.0)
    beta = 0.2

    def fn(pc, pr, rc, rr, nw, nl):
        return P.preference_loss(pc, pr, rc, rr, types_, beta, label_smoothing=eps, reduction="none",
                                 convention=convention, chosen_lengths=nw, rejected_lengths=nl, loss_weights=weights,
                                 wpo_weights=wpo, **spec)[0]

    def ref(pc, pr, rc, rr, nw, nl):
        return _ref_total(types_, pc, pr, rc, rr, nw, nl, beta, convention, weights=weights, eps=eps,
                          wpo=wpo, **spec)

    _check(fn, ref, [pc, pr, rc, rr, nw, nl], torch.float32, grad_inputs=[0, 1], name=combo)


@pytest.mark.parametrize("convention", ["trl", "trl_legacy"])
@pytest.mark.parametrize("loss_type", [t for t in DPO_TYPES if t not in ("aot", "aot_unpaired")])
def test_per_pair_beta_tensor(loss_type, convention):
    pc, pr, rc, rr, nw, nl = _pairs(seed=21)
    beta = torch.tensor([0.05, 0.1, 0.3, 1.0, 0.02, 0.5, 2.0], dtype=torch.float64)

    def fn(pc, pr, rc, rr, nw, nl):
        return P.preference_loss(pc, pr, rc, rr, loss_type, beta, label_smoothing=0.1, reduction="none",
                                 convention=convention, chosen_lengths=nw, rejected_lengths=nl)[0]

    def ref(pc, pr, rc, rr, nw, nl):
        return _ref_total([loss_type], pc, pr, rc, rr, nw, nl, beta, convention, eps=0.1)

    _check(fn, ref, [pc, pr, rc, rr, nw, nl], torch.float32, grad_inputs=[0, 1], name=loss_type)


@pytest.mark.parametrize("beta", [1e-3, 1e3])
@pytest.mark.parametrize("convention", ["trl", "trl_legacy"])
def test_beta_extremes(beta, convention):
    """Every loss type at beta 1e-3 and 1e3 (pair logits up to ~400), float64 against the
    transcription and float32 finite."""
    pc, pr, rc, rr, nw, nl = _pairs(seed=31, scale=0.1)
    for t in DPO_TYPES:
        eps = 0.1

        def fn(pc, pr, rc, rr, nw, nl):
            return P.preference_loss(pc, pr, rc, rr, t, beta, label_smoothing=eps, reduction="none",
                                     convention=convention, chosen_lengths=nw, rejected_lengths=nl)[0]

        def ref(pc, pr, rc, rr, nw, nl):
            return _ref_total([t], pc, pr, rc, rr, nw, nl, beta, convention, eps=eps)

        _check(fn, ref, [pc, pr, rc, rr, nw, nl], torch.float64, grad_inputs=[0, 1], name=t)
        x = pc.float().requires_grad_()
        out = fn(x, pr.float(), rc.float(), rr.float(), nw, nl)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all(), t


@pytest.mark.parametrize("convention", ["trl", "trl_legacy"])
def test_label_smoothing_049(convention):
    pc, pr, rc, rr, nw, nl = _pairs(seed=41)
    for t in ["sigmoid", "cdpo", "robust", "exo_pair", "aot", "aot_unpaired"]:
        def fn(pc, pr, rc, rr, nw, nl):
            return P.preference_loss(pc, pr, rc, rr, t, 0.1, label_smoothing=0.49, reduction="none",
                                     convention=convention)[0]

        def ref(pc, pr, rc, rr, nw, nl):
            return _ref_total([t], pc, pr, rc, rr, nw, nl, 0.1, convention, eps=0.49)

        _check(fn, ref, [pc, pr, rc, rr, nw, nl], torch.float32, grad_inputs=[0, 1], name=t)


@pytest.mark.parametrize("convention", ["trl", "trl_legacy"])
def test_equal_chosen_and_rejected(convention):
    """l_w = l_l and l^r_w = l^r_l: the symmetric values (log 2 for sigmoid, 1 for hinge, 1/(4 beta^2)
    for ipo, ...), every loss finite with finite gradients, and no accuracy for ties (strict >)."""
    pc, _, rc, _, nw, _ = _pairs(seed=51)
    beta = 0.1
    expected = {"sigmoid": math.log(2), "cdpo": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * beta)) ** 2,
                "sigmoid_norm": math.log(2), "discopop": 0.5 * math.log(2) + 0.5}
    for t in DPO_TYPES:
        x = pc.clone().requires_grad_()
        loss, m = P.preference_loss(x, x, rc, rc, t, beta, label_smoothing=0.1, reduction="none",
                                    convention=convention, chosen_lengths=nw, rejected_lengths=nw)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all(), t
        ref = _ref_total([t], pc, pc, rc, rc, nw, nw, beta, convention, eps=0.1)
        assert rel_err(loss, ref) < 1e-12, t
        if t in expected:
            assert torch.allclose(loss, torch.full_like(loss, expected[t]), rtol=1e-12), t
        assert float(m["rewards/accuracies"]) == 0.0


@pytest.mark.parametrize("convention", ["trl", "trl_legacy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_log_prob_magnitudes_stay_finite(convention, dtype):
    """Log-probs around -1e4 with log-ratios up to +-2e3 and beta 1: every loss type, divergence and
    the stable forms (DiscoPOP, AlphaPO, ORPO, forward KL, alpha-divergence) finite, no NaN, in
    value and gradient."""
    g = torch.Generator().manual_seed(61)
    b = 8
    rc = -1e4 + 100 * torch.randn(b, generator=g)
    rr = -1e4 + 100 * torch.randn(b, generator=g)
    pc = rc + 1e3 * torch.randn(b, generator=g)
    pr = rr + 1e3 * torch.randn(b, generator=g)
    nw, nl = torch.full((b,), 300), torch.full((b,), 200)
    for t in DPO_TYPES:
        fdivs = ["reverse_kl", "js_divergence", "alpha_divergence"] + ([] if convention == "trl_legacy" else ["forward_kl"])
        for f in fdivs if t in P.F_DIVERGENCE_LOSS_TYPES else ["reverse_kl"]:
            if t == "ipo" and f in ("forward_kl", "alpha_divergence"):
                continue  # scores up to e^80 (the clamp): their square does not fit in float32
            x = pc.to(dtype).requires_grad_()
            y = pr.to(dtype).requires_grad_()
            loss, m = P.preference_loss(x, y, rc.to(dtype), rr.to(dtype), t, 1.0, label_smoothing=0.1,
                                        reduction="none", convention=convention, chosen_lengths=nw,
                                        rejected_lengths=nl, f_divergence_type=f)
            loss.sum().backward()
            for v in (loss, x.grad, *m.values()) + ((y.grad,) if t != "sft" else ()):
                assert torch.isfinite(v).all(), (t, f)
    for lt in P.CPO_LOSS_TYPES:
        x = pc.to(dtype).requires_grad_()
        loss, _ = P.cpo_loss(x, pr.to(dtype), torch.tensor(3.0), loss_type=lt, alpha=0.5, beta=1.0,
                             chosen_lengths=nw, rejected_lengths=nl, reduction="none")
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all(), lt
    for lens in (None, (nw, nl)):  # ORPO on means -1e4 (no lengths) and ~-33
        x = pc.to(dtype).requires_grad_()
        loss, _ = P.orpo_loss(x, pr.to(dtype), torch.tensor(3.0), chosen_lengths=None if lens is None else lens[0],
                              rejected_lengths=None if lens is None else lens[1], reduction="none")
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()


def test_orpo_certain_sequence_is_finite():
    """A mean log-prob of exactly 0 (a certain sequence) is clamped to -1e-7: finite loss and gradient."""
    x = torch.tensor([0.0, -0.5], requires_grad=True)
    loss, _ = P.orpo_loss(x, torch.tensor([-1.0, 0.0]), torch.tensor(1.0))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_discopop_stable_where_the_direct_product_overflows():
    """rho < -88 in float32: TRL's sigma(rho/tau) e^{-rho} is inf * 1 and then NaN in the gradient;
    the stable form gives -log sigma(rho) * sigma(-rho/tau) + exp(log sigma(rho/tau) - rho) ~ -rho."""
    x = torch.tensor([-100.0, -500.0], requires_grad=True)
    loss, _ = P.preference_loss(x, torch.zeros(2), loss_type="discopop", beta=1.0, reduction="none")
    loss.sum().backward()
    assert torch.allclose(loss, torch.tensor([100.0, 500.0])), loss
    assert torch.allclose(x.grad, torch.tensor([-1.0, -1.0]))


# ---------------------------------------------------------------------------------------------
# metrics


@pytest.mark.parametrize("convention", ["trl", "trl_legacy"])
def test_metrics_names_and_values(convention):
    pc, pr, rc, rr, nw, nl = _pairs(seed=71)
    beta = torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.5], dtype=torch.float64)
    x = pc.clone().requires_grad_()
    _, m = P.preference_loss(x, pr, rc, rr, ["sigmoid", "sft"], beta, convention=convention, chosen_lengths=nw,
                             rejected_lengths=nl)
    want = R.dpo_metrics(pc, pr, rc, rr, beta)
    assert set(m) == set(want) | {"nll_loss"}
    for k, v in want.items():
        assert m[k].dim() == 0 and not m[k].requires_grad, k
        assert abs(float(m[k]) - float(v)) < 1e-12, k
    assert abs(float(m["nll_loss"]) - float(-pc.sum() / nw.sum())) < 1e-12
    # legacy ipo: the metrics see the length-averaged log-probs, as TRL v0.24.0
    _, m = P.preference_loss(pc, pr, rc, rr, "ipo", 0.1, convention=convention, chosen_lengths=nw, rejected_lengths=nl)
    if convention == "trl_legacy":
        want = R.dpo_metrics(pc / nw, pr / nl, rc / nw, rr / nl, 0.1)
    else:
        want = R.dpo_metrics(pc, pr, rc, rr, 0.1)
    for k, v in want.items():
        assert abs(float(m[k]) - float(v)) < 1e-12, k
    # f-divergences do not change the logged rewards
    _, m2 = P.preference_loss(pc, pr, rc, rr, "sigmoid", 0.1, f_divergence_type="js_divergence")
    assert abs(float(m2["rewards/margins"]) - float(R.dpo_metrics(pc, pr, rc, rr, 0.1)["rewards/margins"])) < 1e-12


def test_reference_free_is_zero_reference_and_reference_is_detached():
    pc, pr, rc, rr, nw, nl = _pairs(seed=81)
    a, _ = P.preference_loss(pc, pr, None, None, "sigmoid")
    b, _ = P.preference_loss(pc, pr, torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64))
    assert float(a) == float(b)
    r = rc.clone().requires_grad_()
    loss, _ = P.preference_loss(pc.clone().requires_grad_(), pr, r, rr)
    loss.backward()
    assert r.grad is None


def test_bco_pair_legacy_running_mean_over_steps():
    """legacy bco_pair: delta = running mean of the per-call batch means of beta r (one sample per call),
    read after the update; a RunningMean carries it across steps; TRL 1.x has no delta."""
    state = P.RunningMean()
    means = []
    for step in range(3):
        pc, pr, rc, rr, nw, nl = _pairs(seed=90 + step)
        x = pc.clone().requires_grad_()
        loss, _ = P.preference_loss(x, pr, rc, rr, "bco_pair", 0.1, convention="trl_legacy", reduction="none",
                                    bco_state=state)
        means.append(_legacy_delta(pc, pr, rc, rr, 0.1))
        delta = sum(means) / len(means)
        ref = R.dpo_pair_loss("bco_pair", pc, pr, rc, rr, 0.1, convention="trl_legacy", delta=delta)
        assert rel_err(loss, ref) < 1e-12
        assert abs(state.mean - delta) < 1e-12 and abs(state.count - (step + 1)) < 1e-9
    # evaluation: no update
    loss_eval, _ = P.preference_loss(pc, pr, rc, rr, "bco_pair", 0.1, convention="trl_legacy", bco_state=state,
                                     update_bco_state=False)
    assert abs(state.mean - delta) < 1e-15 and state.count == pytest.approx(3)
    assert rel_err(loss_eval, ref.mean()) < 1e-12
    restored = P.RunningMean()
    restored.load_state_dict(state.state_dict())
    assert restored.mean == state.mean and restored.count == state.count


def test_family_aliases():
    pc, pr, rc, rr, nw, nl = _pairs(seed=101)
    assert P.dpo_loss is P.preference_loss
    a, ma = P.ipo_loss(pc, pr, rc, rr, 0.3, chosen_lengths=nw, rejected_lengths=nl, convention="trl_legacy")
    b, mb = P.preference_loss(pc, pr, rc, rr, "ipo", 0.3, chosen_lengths=nw, rejected_lengths=nl,
                              convention="trl_legacy")
    assert float(a) == float(b) and ma.keys() == mb.keys()
    # aot_pair is TRL v0.24.0's name of aot_unpaired
    a, _ = P.preference_loss(pc, pr, rc, rr, "aot_pair")
    b, _ = P.preference_loss(pc, pr, rc, rr, "aot_unpaired")
    assert float(a) == float(b)


def test_gradcheck_float64():
    pc, pr, rc, rr, nw, nl = _pairs(b=5, seed=111)
    x, y = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    for t in ["sigmoid", "exo_pair", "discopop", "aot", "ipo", "apo_down"]:
        assert torch.autograd.gradcheck(
            lambda a, b: P.preference_loss(a, b, rc, rr, t, 0.3, label_smoothing=0.1, reduction="none",
                                           chosen_lengths=nw, rejected_lengths=nl,
                                           f_divergence_type="alpha_divergence" if t == "ipo" else "reverse_kl")[0],
            (x, y)), t
    assert torch.autograd.gradcheck(lambda a, b: P.orpo_loss(a / 10, b / 10, reduction="none")[0], (x, y))
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor([[2, 0, 1, 1], [0, 3, 1, 0], [1, 1, 0, 2]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True], [True, False, True, True]])
    assert torch.autograd.gradcheck(lambda z: P.plackett_luce_loss(z, None, lab, mask, reduction="none")[0], (s,))
    assert torch.autograd.gradcheck(lambda z: P.lipo_lambda_loss(z, None, lab, mask, beta=1.0)[0], (s,))


# ---------------------------------------------------------------------------------------------
# the other families against the transcription


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_cpo_family_matches_transcription(loss_type, alpha):
    pc, pr, _, _, nw, nl = _pairs(seed=121)
    pc, pr = pc / 4, pr / 4  # sums around -5, means around -1 (AlphaPO's naive p^{-alpha} stays modest)
    nll = torch.tensor(1.7, dtype=torch.float64)
    uses_mean = loss_type in ("ipo", "simpo")

    def fn(pc, pr, nw, nl, nll):
        return P.cpo_loss(pc, pr, nll, loss_type=loss_type, beta=0.3, cpo_alpha=0.5, label_smoothing=0.1,
                          simpo_gamma=0.4, alpha=alpha, chosen_lengths=nw, rejected_lengths=nl, reduction="none")[0]

    def ref(pc, pr, nw, nl, nll):
        lw, ll = (pc / nw, pr / nl) if uses_mean else (pc, pr)
        eps = 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
        return R.cpo_pair_loss(loss_type, lw, ll, 0.3, eps=eps, gamma=0.4, alpha=alpha) + 0.5 * nll

    _check(fn, ref, [pc, pr, nw, nl, nll], torch.float32, grad_inputs=[0, 1, 4], name=loss_type)
    a, _ = P.simpo_loss(pc, pr, nw, nl, 0.3, 0.4)
    b, _ = P.cpo_loss(pc, pr, loss_type="simpo", beta=0.3, simpo_gamma=0.4, cpo_alpha=0.0, chosen_lengths=nw,
                      rejected_lengths=nl)
    c, _ = P.cpo_loss(pc, pr, loss_type="alphapo", beta=0.3, simpo_gamma=0.4, alpha=0.4, chosen_lengths=nw,
                      rejected_lengths=nl)
    d, _ = P.alphapo_loss(pc, pr, nw, nl, alpha=0.4, beta=0.3, gamma=0.4)
    assert float(a) == float(b) and float(c) == float(d)


def test_orpo_matches_transcription():
    pc, pr, _, _, nw, nl = _pairs(seed=131)
    nll = torch.tensor(2.5, dtype=torch.float64)

    def fn(pc, pr, nw, nl, nll):
        return P.orpo_loss(pc, pr, nll, beta=0.2, chosen_lengths=nw, rejected_lengths=nl, reduction="none")[0]

    def ref(pc, pr, nw, nl, nll):
        return R.orpo_pair_loss(pc / nw, pr / nl, nll, 0.2)

    _check(fn, ref, [pc, pr, nw, nl, nll], torch.float32, grad_inputs=[0, 1, 4], name="orpo")


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_transcription(loss_type):
    pc, pr, rc, rr, _, _ = _pairs(b=10, seed=141)
    g = torch.Generator().manual_seed(3)
    des = torch.rand(10, generator=g) > 0.4
    kl_p, kl_r = pc.roll(1) + 0.5, rc.roll(1)
    beta = torch.linspace(0.05, 0.5, 10, dtype=torch.float64)
    kw = dict(policy_kl_logps=kl_p, ref_kl_logps=kl_r) if loss_type == "kto" else {}

    def fn(lp, lr):
        return P.kto_loss(lp, lr, des, beta=beta, loss_type=loss_type, desirable_weight=1.3,
                          undesirable_weight=0.7, reduction="none", **kw)[0]

    def ref(lp, lr):
        z0 = max(float((kl_p - kl_r).mean()), 0.0)
        return R.kto_example_loss(lp, lr, des, beta, z0, loss_type=loss_type, wd=1.3, wu=0.7)

    _check(fn, ref, [pc, rc], torch.float32, grad_inputs=[0], name=loss_type)
    loss, m = P.kto_loss(pc, rc, des, beta=beta, loss_type=loss_type, desirable_weight=1.3, undesirable_weight=0.7, **kw)
    assert rel_err(loss, ref(pc, rc).mean()) < 1e-12
    rew = beta * (pc - rc)
    assert abs(float(m["rewards/chosen"]) - float(rew[des].mean())) < 1e-12
    assert abs(float(m["logps/rejected"]) - float(pc[~des].mean())) < 1e-12
    assert abs(float(m["rewards/margins"]) - float(rew[des].mean() - rew[~des].mean())) < 1e-12
    # z0 is clamped at 0 and can be given directly
    a, m = P.kto_loss(pc, rc, des, kl=-3.0, reduction="none") if loss_type == "kto" else (None, None)
    if a is not None:
        assert float(m["kl"]) == 0.0
        assert rel_err(a, R.kto_example_loss(pc, rc, des, 0.1, 0.0)) < 1e-12


def test_bco_matches_transcription_and_running_delta():
    state = P.RunningMean()
    seen = []
    for step in range(3):
        pc, pr, rc, rr, _, _ = _pairs(b=8, seed=150 + step)
        des = torch.tensor([True, False, True, True, False, False, True, False])
        u = P.udm_weight(torch.linspace(0.05, 0.95, 8, dtype=torch.float64))
        seen.append(0.2 * (pc - rc))
        delta = float(torch.cat(seen).mean())  # mean over all individual rewards seen so far

        def fn(lp, lr):
            return P.bco_loss(lp, lr, des, beta=0.2, state=P.RunningMean(**state.state_dict()), udm_weights=u,
                              reduction="none")[0]

        def ref(lp, lr):
            return R.bco_example_loss(lp, lr, des, 0.2, delta, u)

        _check(fn, ref, [pc, rc], torch.float64, grad_inputs=[0], name=f"bco step {step}")
        loss, m = P.bco_loss(pc, rc, des, beta=0.2, state=state, udm_weights=u)
        assert abs(float(m["delta"]) - delta) < 1e-12 and abs(state.mean - delta) < 1e-12
        assert rel_err(loss, ref(pc, rc).mean()) < 1e-12
    assert torch.allclose(u, (torch.linspace(0.05, 0.95, 8, dtype=torch.float64) /
                              (1 - torch.linspace(0.05, 0.95, 8, dtype=torch.float64) + 1e-8)).clamp(0.5, 10.0))


def test_npo_and_tdpo_match_transcription():
    pc, pr, rc, rr, _, _ = _pairs(seed=161)
    retain = torch.tensor(1.9, dtype=torch.float64)

    def fn(lp, lr, retain):
        return P.npo_loss(lp, lr, beta=0.3, retain_nll=retain, retain_weight=0.5, reduction="none")[0]

    def ref(lp, lr, retain):
        return R.npo_example_loss(lp, lr, 0.3) + 0.5 * retain

    _check(fn, ref, [pc, rc, retain], torch.float32, grad_inputs=[0, 2], name="npo")
    g = torch.Generator().manual_seed(4)
    kw_, kl_ = torch.rand(7, generator=g, dtype=torch.float64) * 3, torch.rand(7, generator=g, dtype=torch.float64) * 3
    for version in (1, 2):
        def fn(pc, pr, rc, rr, kw, kl):
            return P.tdpo_loss(pc, pr, rc, rr, kw, kl, beta=0.2, alpha=0.4, version=version, reduction="none")[0]

        def ref(pc, pr, rc, rr, kw, kl):
            return R.tdpo_pair_loss(pc, pr, rc, rr, kw, kl, 0.2, 0.4, version)

        _check(fn, ref, [pc, pr, rc, rr, kw_, kl_], torch.float32, grad_inputs=[0, 1, 4, 5],
                                name=f"tdpo{version}")
    _, m = P.tdpo_loss(pc, pr, rc, rr, kw_, kl_, beta=0.2)
    assert abs(float(m["rewards/chosen"]) - float((0.2 * (pc - rc + kw_)).mean())) < 1e-12


def _lists(seed=171, L=5, K=6):
    g = torch.Generator().manual_seed(seed)
    lp = -10 + 2 * torch.randn(L, K, generator=g, dtype=torch.float64)
    lr = -10 + 2 * torch.randn(L, K, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (L, K), generator=g)
    mask = torch.rand(L, K, generator=g) > 0.25
    mask[0] = True
    mask[1, :] = False
    mask[1, 2] = True  # a list with one item: no pair, zero ListMLE term
    lp[2, 3] = lp[2, 1]  # a score tie (LiPO ranks ties by index)
    lr[2, 3] = lr[2, 1]
    return lp, lr, labels, mask


def test_lipo_lambda_matches_loops():
    lp, lr, labels, mask = _lists()

    def fn(lp, lr):
        return P.lipo_lambda_loss(lp, lr, labels, mask, beta=0.5, reduction="none")[0]

    def ref(lp, lr):
        return R.lipo_list_loss(0.5 * (lp - lr), labels, mask)

    _check(fn, ref, [lp, lr], torch.float32, grad_inputs=[0], name="lipo")
    loss, m = P.lipo_lambda_loss(lp, lr, labels, mask, beta=0.5)
    per = ref(lp, lr)
    n_valid = sum(1 for b in range(5) if any(labels[b, i] > labels[b, j] and mask[b, i] and mask[b, j]
                                             for i in range(6) for j in range(6)))
    assert rel_err(loss, per.sum() / n_valid) < 1e-12
    assert set(m) == {"rewards/mean", "rewards/accuracies", "num_pairs"}


def test_plackett_luce_matches_allrank_form():
    lp, lr, labels, mask = _lists(seed=181)

    def fn(lp, lr):
        return P.plackett_luce_loss(lp, lr, labels, mask, beta=0.5, reduction="none")[0]

    def ref(lp, lr):
        return R.listmle_list_loss(0.5 * (lp - lr), labels, mask)

    _check(fn, ref, [lp, lr], torch.float32, grad_inputs=[0], name="listmle")
    x = lp.clone().requires_grad_()
    loss, m = P.plackett_luce_loss(x, lr, labels, mask, beta=0.5)
    loss.backward()
    assert rel_err(loss, ref(lp, lr).mean()) < 1e-12  # no fully padded list: the mean over all lists
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    assert set(m) == {"rewards/mean", "top1_accuracy"}
    # ties in labels are broken by index: swapping two tied items' scores changes the loss accordingly
    s = torch.tensor([[1.0, 3.0, 2.0]], dtype=torch.float64)
    lab = torch.tensor([[1, 1, 0]])
    got, _ = P.plackett_luce_loss(s, None, lab, beta=1.0)
    want = (torch.logsumexp(s[0], 0) - 1.0) + (torch.logsumexp(s[0, 1:], 0) - 3.0)
    assert abs(float(got) - float(want)) < 1e-12


def test_bradley_terry_matches_transcription():
    g = torch.Generator().manual_seed(191)
    rc, rr = torch.randn(9, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    margin = torch.rand(9, generator=g, dtype=torch.float64)

    def fn(rc, rr):
        return P.bradley_terry_loss(rc, rr, margin, center_rewards_coefficient=0.01, label_smoothing=0.1,
                                    reduction="none")[0]

    def ref(rc, rr):
        return R.bradley_terry_pair_loss(rc, rr, margin, 0.01, 0.1)

    _check(fn, ref, [rc, rr], torch.float32, name="bt")


# ---------------------------------------------------------------------------------------------
# TRL 1.16's own loss code, called with stub objects


@pytest.fixture(scope="module")
def trl():
    pytest.importorskip("trl")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning: CPO and ORPO live in trl.experimental
        from trl.experimental.cpo.cpo_trainer import CPOTrainer
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer
    from trl.trainer.reward_trainer import RewardTrainer
    return types.SimpleNamespace(DPO=DPOTrainer, KTO=KTOTrainer, CPO=CPOTrainer, ORPO=ORPOTrainer, RM=RewardTrainer)


class _StubModel:
    """Stands in for the model: returns fixed outputs (per-token log-probs, rewards) for any inputs."""

    def __init__(self, forward):
        self.training = True
        self._forward = forward

    def __call__(self, **kwargs):
        return self._forward(**kwargs)


def _accelerator():
    return types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def _metric_store():
    return collections.defaultdict(lambda: collections.defaultdict(list))


def _token_batch(rows, t, seed):
    """Per-token log-probs [rows, t-1] (zero outside the completion), completion mask [rows, t] with
    a prompt of at least one token (so TRL's shifted and unshifted counts agree)."""
    g = torch.Generator().manual_seed(seed)
    cm = torch.zeros(rows, t, dtype=torch.long)
    for i in range(rows):
        n = int(torch.randint(1, t - 1, (1,), generator=g))
        cm[i, t - n:] = 1
    ptl = (-1.5 + 0.8 * torch.randn(rows, t - 1, generator=g, dtype=torch.float64)) * cm[:, 1:]
    lsp2 = (-1.0 + 0.3 * torch.randn(rows, t - 1, generator=g, dtype=torch.float64)) * cm[:, 1:]
    return ptl, cm, lsp2


def _trl_dpo(trl, ptl, cm, lsp2, ref_c, ref_r, *, loss_types, loss_weights=None, beta=0.1, eps=0.0,
             fdiv="reverse_kl", fcoef=0.5, use_weighting=False):
    outputs = types.SimpleNamespace(log_probs=ptl, entropy=torch.zeros_like(ptl), mean_logits=torch.zeros_like(ptl),
                                    is_top1=torch.zeros_like(ptl, dtype=torch.bool), log_sum_sq_probs=lsp2)
    model = _StubModel(lambda **kw: outputs)
    stub = types.SimpleNamespace(
        model=model, accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type=fdiv, f_alpha_divergence_coef=fcoef, beta=beta, loss_types=list(loss_types),
        loss_weights=loss_weights or [1.0] * len(loss_types), label_smoothing=eps, use_weighting=use_weighting,
        args=types.SimpleNamespace(discopop_tau=0.05), _metrics=_metric_store(), _total_train_tokens=0, _tp_size=1)
    rows, t = cm.shape
    inputs = dict(input_ids=torch.zeros(rows, t, dtype=torch.long), attention_mask=torch.ones(rows, t, dtype=torch.long),
                  completion_mask=cm, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    loss = trl.DPO._compute_loss(stub, model, inputs, False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


TRL_DPO_CASES = (
    [dict(loss_types=[t], eps={"exo_pair": 0.1, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.15}.get(t, 0.0))
     for t in DPO_TYPES if t != "cdpo"]
    + [dict(loss_types=[t], fdiv=f, fcoef=a, eps=0.1 if t in ("exo_pair", "robust") else 0.0)
       for t in ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm")
       for f, a in (("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3))]
    + [dict(loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
       dict(loss_types=["ipo", "nca_pair", "bco_pair", "apo_zero"], loss_weights=[0.3, 1.0, 2.0, 0.5]),
       dict(loss_types=["sigmoid"], use_weighting=True),
       dict(loss_types=["ipo", "sigmoid_norm"], use_weighting=True, beta=0.5),  # (TRL 1.16 fails on sft with
       # use_weighting: an in-place multiply of the expanded scalar NLL; flashloss has no such limit)
       dict(loss_types=["discopop"], beta=2.0), dict(loss_types=["sppo_hard"], beta=1e-3)]
)


@pytest.mark.parametrize("case", TRL_DPO_CASES, ids=lambda c: "+".join(c["loss_types"]) + "-" + "-".join(
    f"{k}={v}" for k, v in c.items() if k != "loss_types"))
def test_dpo_matches_trl_dpo_trainer(trl, case):
    """Loss, gradient w.r.t. the per-token log-probs and metrics, in float64 (TRL's alpha-divergence
    only runs in float32: float32 there, to 1e-5); TRL forms exo_pair's log eps in float32 (1e-6)."""
    b, t = 6, 11
    dtype = torch.float32 if case.get("fdiv") == "alpha_divergence" else torch.float64
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    if "exo_pair" in case["loss_types"]:
        tol = max(tol, 1e-6)
    ptl0, cm, lsp2 = _token_batch(2 * b, t, seed=len(str(case)))
    ptl0, lsp2 = ptl0.to(dtype), lsp2.to(dtype)
    g = torch.Generator().manual_seed(7)
    ref_c = (-8.0 + 2 * torch.randn(b, generator=g, dtype=torch.float64)).to(dtype)
    ref_r = (-9.0 + 2 * torch.randn(b, generator=g, dtype=torch.float64)).to(dtype)
    case = dict(case)
    use_weighting = case.get("use_weighting", False)

    ptl = ptl0.clone().requires_grad_()
    trl_loss, trl_m = _trl_dpo(trl, ptl, cm, lsp2, ref_c, ref_r, **case)
    (trl_grad,) = torch.autograd.grad(trl_loss, ptl)

    ptl2 = ptl0.clone().requires_grad_()
    scm = cm[:, 1:]
    logps = (ptl2 * scm).sum(1)
    lengths = scm.sum(1)
    pc, pr = logps.chunk(2)
    nw, nl = lengths.chunk(2)
    wpo = None
    if use_weighting:
        with torch.no_grad():
            w = torch.exp(((ptl0 - lsp2) * scm).sum(1) / lengths.clamp_min(1))
        wpo = w.chunk(2)
    loss, m = P.preference_loss(pc, pr, ref_c, ref_r, case["loss_types"], case.get("beta", 0.1),
                                label_smoothing=case.get("eps", 0.0), loss_weights=case.get("loss_weights"),
                                chosen_lengths=nw, rejected_lengths=nl, f_divergence_type=case.get("fdiv", "reverse_kl"),
                                f_alpha_divergence_coef=case.get("fcoef", 0.5), wpo_weights=wpo)
    (grad,) = torch.autograd.grad(loss, ptl2)
    assert rel_err(loss, trl_loss) < tol
    assert rel_err(grad * scm, trl_grad * scm) < tol  # completion tokens (TRL sums padding zeros too)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected"):
        assert abs(float(m[k]) - trl_m[k]) < 1e-7, k


def test_dpo_trl_raises_where_trl_raises(trl):
    """TRL 1.x's f-divergence restriction and exo_pair's eps > 0, with the same loss types."""
    pc, pr, rc, rr, nw, nl = _pairs()
    with pytest.raises(ValueError, match="only supported with the loss types"):
        P.preference_loss(pc, pr, rc, rr, ["sigmoid", "nca_pair"], f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="exo_pair"):
        P.preference_loss(pc, pr, rc, rr, "exo_pair")
    # the same allowed set as TRL's DPOTrainer.__init__ (plus flashloss's cdpo)
    import inspect
    import re
    literal = re.search(r"f_divergence_loss_types = \{([^}]*)\}", inspect.getsource(trl.DPO.__init__)).group(1)
    assert set(re.findall(r'"(\w+)"', literal)) == P.F_DIVERGENCE_LOSS_TYPES - {"cdpo"}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_trl_kto_trainer(trl, loss_type):
    b, t, tk = 8, 9, 10
    ptl0, cm, _ = _token_batch(b, t, seed=3)
    kl_ptl, kcm, _ = _token_batch(b, tk, seed=4)
    labels = torch.tensor([True, False, True, True, False, True, False, False])
    g = torch.Generator().manual_seed(5)
    ref_logps = (ptl0 * cm[:, 1:]).sum(1) + 0.7 * torch.randn(b, generator=g, dtype=torch.float64)
    ref_kl = (kl_ptl * kcm[:, 1:]).sum(1) - 0.4 + 0.3 * torch.randn(b, generator=g, dtype=torch.float64)
    ptl = ptl0.clone().requires_grad_()

    def forward(**kw):
        lp = kl_ptl if kw["input_ids"].shape[1] == tk else ptl
        return types.SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp))

    model = _StubModel(forward)
    stub = types.SimpleNamespace(
        model=model, accelerator=_accelerator(), calculate_KL=loss_type == "kto", loss_type=loss_type, beta=0.2,
        desirable_weight=1.4, undesirable_weight=0.8, precompute_ref_logps=True, aux_loss_enabled=False,
        _metrics=_metric_store(), _total_train_tokens=0, _tp_size=1)
    stub._compute_kl_logps = types.MethodType(trl.KTO._compute_kl_logps, stub)
    inputs = dict(input_ids=torch.zeros(b, t, dtype=torch.long), attention_mask=torch.ones(b, t, dtype=torch.long),
                  completion_mask=cm, KL_input_ids=torch.zeros(b, tk, dtype=torch.long),
                  KL_attention_mask=torch.ones(b, tk, dtype=torch.long), KL_completion_mask=kcm, label=labels,
                  ref_logps=ref_logps, ref_KL_logps=ref_kl)
    trl_loss = trl.KTO._compute_loss(stub, model, inputs, False)
    (trl_grad,) = torch.autograd.grad(trl_loss, ptl)
    trl_m = {k: v[-1] for k, v in stub._metrics["train"].items()}

    ptl2 = ptl0.clone().requires_grad_()
    kw = dict(policy_kl_logps=(kl_ptl * kcm[:, 1:]).sum(1), ref_kl_logps=ref_kl) if loss_type == "kto" else {}
    loss, m = P.kto_loss((ptl2 * cm[:, 1:]).sum(1), ref_logps, labels, beta=0.2, loss_type=loss_type,
                         desirable_weight=1.4, undesirable_weight=0.8, **kw)
    (grad,) = torch.autograd.grad(loss, ptl2)
    assert rel_err(loss, trl_loss) < 1e-12
    assert rel_err(grad * cm[:, 1:], trl_grad * cm[:, 1:]) < 1e-12  # completion tokens
    for k in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert abs(float(m[k]) - trl_m[k]) < 1e-12, k


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo", "alphapo"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, -0.2])
def test_cpo_matches_trl_cpo_trainer(trl, loss_type, alpha):
    pc, pr, _, _, nw, nl = _pairs(seed=201)
    pc, pr = pc / 5, pr / 5
    uses_mean = loss_type in ("ipo", "simpo", "alphapo")
    nll = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    trl_type, cpo_alpha = ("simpo", 0.0) if loss_type == "alphapo" else (loss_type, 0.8)
    stub = types.SimpleNamespace(alpha=alpha, loss_type=trl_type, beta=0.25, simpo_gamma=0.6, label_smoothing=0.1,
                                 accelerator=_accelerator())
    x, y = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    lw, ll = (x / nw, y / nl) if uses_mean else (x, y)
    losses, cw, cl = trl.CPO.cpo_loss(stub, lw, ll)
    trl_loss = losses.mean() + cpo_alpha * nll
    trl_grads = torch.autograd.grad(trl_loss, (x, y, nll))

    x2, y2, nll2 = pc.clone().requires_grad_(), pr.clone().requires_grad_(), nll.detach().clone().requires_grad_()
    loss, m = P.cpo_loss(x2, y2, nll2, loss_type=loss_type, beta=0.25, cpo_alpha=cpo_alpha, label_smoothing=0.1,
                         simpo_gamma=0.6, alpha=alpha, chosen_lengths=nw, rejected_lengths=nl)
    grads = torch.autograd.grad(loss, (x2, y2, nll2), allow_unused=True)
    grads = [torch.zeros_like(nll2) if g is None else g for g in grads]  # cpo_alpha = 0: the NLL is not used
    assert rel_err(loss, trl_loss) < 1e-12
    for a, b in zip(grads, trl_grads):
        assert rel_err(a, b) < 1e-12
    assert abs(float(m["rewards/chosen"]) - float(cw.mean())) < 1e-12
    assert abs(float(m["rewards/accuracies"]) - float((cw > cl).double().mean())) < 1e-12
    assert abs(float(m["logps/chosen"]) - float(lw.detach().mean())) < 1e-12


def test_orpo_matches_trl_orpo_trainer(trl):
    """TRL computes ORPO in float32 whatever the input dtype: compared in float32."""
    pc, pr, _, _, nw, nl = _pairs(seed=211)
    pc, pr = pc.float(), pr.float()
    stub = types.SimpleNamespace(beta=0.15, accelerator=_accelerator())
    nll = torch.tensor(2.2)
    x, y = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, cw, cl, ratio, log_odds = trl.ORPO.odds_ratio_loss(stub, x / nw, y / nl)
    trl_loss = nll - losses.mean()
    trl_grads = torch.autograd.grad(trl_loss, (x, y))
    x2, y2 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    loss, m = P.orpo_loss(x2, y2, nll, beta=0.15, chosen_lengths=nw, rejected_lengths=nl)
    grads = torch.autograd.grad(loss, (x2, y2))
    assert rel_err(loss, trl_loss) < 1e-6
    for a, b in zip(grads, trl_grads):
        assert rel_err(a, b) < 1e-5
    for k, v in (("log_odds_ratio", ratio), ("log_odds_chosen", log_odds), ("rewards/chosen", cw.mean()),
                 ("rewards/rejected", cl.mean())):
        v = float(v.detach())
        assert abs(float(m[k]) - v) < 1e-6 * max(1.0, abs(v)), k


@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (True, 0.01)])
def test_bradley_terry_matches_trl_reward_trainer(trl, margin, center):
    g = torch.Generator().manual_seed(221)
    rc0, rr0 = torch.randn(9, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    m_ = torch.rand(9, generator=g, dtype=torch.float64) if margin else None
    rc, rr = rc0.clone().requires_grad_(), rr0.clone().requires_grad_()
    out = types.SimpleNamespace(logits=torch.cat([rc, rr])[:, None])
    model = _StubModel(lambda **kw: out)
    stub = types.SimpleNamespace(model=model, accelerator=_accelerator(), _metrics=_metric_store(),
                                 args=types.SimpleNamespace(center_rewards_coefficient=center),
                                 _total_train_tokens=0, _tp_size=1)
    inputs = dict(attention_mask=torch.ones(18, 3, dtype=torch.long))
    if margin:
        inputs["margin"] = m_
    trl_loss = trl.RM.compute_loss(stub, model, inputs)
    trl_grads = torch.autograd.grad(trl_loss, (rc, rr))
    trl_m = {k: v[-1] for k, v in stub._metrics["train"].items()}
    rc2, rr2 = rc0.clone().requires_grad_(), rr0.clone().requires_grad_()
    loss, m = P.bradley_terry_loss(rc2, rr2, m_, center_rewards_coefficient=center)
    grads = torch.autograd.grad(loss, (rc2, rr2))
    assert rel_err(loss, trl_loss) < 1e-12
    for a, b in zip(grads, trl_grads):
        assert rel_err(a, b) < 1e-12
    for k in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
        assert abs(float(m[k]) - trl_m[k]) < 1e-7, k


# ---------------------------------------------------------------------------------------------
# argument errors


def test_errors_name_the_argument():
    pc, pr, rc, rr, nw, nl = _pairs()
    f32 = torch.zeros(3)
    cases = [
        (dict(loss_type="dpo"), ValueError, r"unknown loss_type 'dpo'; valid loss types are \['sigmoid'"),
        (dict(loss_type=["sigmoid", "kto"]), ValueError, "unknown loss_type 'kto'"),
        (dict(loss_type=[]), ValueError, "non-empty list"),
        (dict(policy_rejected=f32), ValueError, r"policy_rejected must have shape \[7\]"),
        (dict(ref_chosen=f32), ValueError, r"ref_chosen must have shape \[7\]"),
        (dict(ref_rejected=None), ValueError, "give both ref_chosen and ref_rejected"),
        (dict(policy_chosen=pc[:, None]), ValueError, "policy_chosen must be 1-D"),
        (dict(policy_chosen=pc.tolist()), TypeError, "policy_chosen must be a torch.Tensor"),
        (dict(loss_type="ipo"), ValueError, "ipo need chosen_lengths"),
        (dict(chosen_lengths=nw[:3], rejected_lengths=nl), ValueError, r"chosen_lengths must have shape \[7\]"),
        (dict(chosen_lengths=nw), ValueError, "give both chosen_lengths and rejected_lengths"),
        (dict(beta=torch.ones(3)), ValueError, r"beta must be a float, a 0-d tensor or a per-item \[B=7\]"),
        (dict(beta=0.0), ValueError, "beta must be > 0"),
        (dict(beta=-1.0), ValueError, "beta must be > 0"),
        (dict(beta="0.1"), TypeError, "beta must be a float"),
        (dict(label_smoothing=0.6), ValueError, r"label_smoothing must be in \[0.0, 0.5\]"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be in"),
        (dict(loss_type="robust", label_smoothing=0.5), ValueError, r"\[0, 0.5\) for loss_type 'robust'"),
        (dict(loss_type="exo_pair"), ValueError, "exo_pair' needs label_smoothing > 0"),
        (dict(loss_type="nca_pair", f_divergence_type="alpha_divergence"), ValueError, "only supported with"),
        (dict(f_divergence_type="kl"), ValueError, "f_divergence_type must be one of"),
        (dict(f_divergence_type="forward_kl", convention="trl_legacy"), ValueError, "has no 'forward_kl'"),
        (dict(convention="trl2"), ValueError, "convention must be one of"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(backend="gpu"), ValueError, "backend must be"),
        (dict(loss_weights=[1.0, 2.0]), ValueError, "loss_weights must have one weight per loss type"),
        (dict(loss_type="aot", beta=torch.ones(7)), ValueError, "beta must be a scalar"),
        (dict(loss_type="aot", wpo_weights=(pc, pc)), ValueError, "wpo_weights are not supported with aot"),
        (dict(wpo_weights=pc), ValueError, "wpo_weights must be a pair"),
        (dict(loss_type="sft"), ValueError, "need chosen_nll, or chosen_lengths"),
        (dict(loss_type="nca_pair", dpop_lambda=50.0), ValueError, "dpop_lambda modify the pair logit"),
        (dict(rdpo_alpha=0.1), ValueError, "rdpo_alpha need chosen_lengths"),
        (dict(bco_state=P.RunningMean()), ValueError, "bco_state is only used by loss_type 'bco_pair'"),
        (dict(discopop_tau=0.0), ValueError, "discopop_tau must be in"),
    ]
    base = dict(policy_chosen=pc, policy_rejected=pr, ref_chosen=rc, ref_rejected=rr)
    for kw, exc, msg in cases:
        args = dict(base)
        args.update(kw)
        with pytest.raises(exc, match=msg):
            P.preference_loss(**args)
    with pytest.raises(ValueError, match="cpo_loss needs chosen_nll"):
        P.cpo_loss(pc, pr)
    with pytest.raises(ValueError, match="unknown loss_type 'dpo' for cpo_loss"):
        P.cpo_loss(pc, pr, loss_type="dpo", cpo_alpha=0.0)
    with pytest.raises(TypeError, match="desirable must be a bool tensor"):
        P.kto_loss(pc, rc, torch.ones(7), kl=0.0)
    with pytest.raises(ValueError, match="needs the KL batch"):
        P.kto_loss(pc, rc, torch.ones(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="give retain_nll or retain_kl"):
        P.npo_loss(pc, rc, retain_nll=torch.tensor(1.0), retain_kl=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"labels must have shape \[5, 6\]"):
        P.plackett_luce_loss(torch.zeros(5, 6), None, torch.zeros(5, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        P.lipo_lambda_loss(torch.zeros(5, 6), None, torch.zeros(5, 6, dtype=torch.long), torch.ones(5, 6))
    with pytest.raises(ValueError, match="version must be 1"):
        P.tdpo_loss(pc, pr, rc, rr, pc, pr, version=3)


def test_public_names_exported():
    for name in ("preference_loss", "dpo_loss", "ipo_loss", "simpo_loss", "cpo_loss", "alphapo_loss", "orpo_loss",
                 "kto_loss", "bco_loss", "npo_loss", "tdpo_loss", "lipo_lambda_loss", "plackett_luce_loss",
                 "bradley_terry_loss", "RunningMean", "udm_weight"):
        assert name in flashloss.__all__ and getattr(flashloss, name) is getattr(P, name), name


def test_gradient_at_policy_equal_to_reference_is_exact():
    """At the first DPO step the policy is the reference: every pair logit is exactly 0, where a
    hand-written max(x, 0) + log1p(exp(-|x|)) gets autograd's gradient wrong (1 instead of 1/2).
    Regression test: found by the TRL DPOTrainer integration test."""
    c = torch.tensor([-13.0, -12.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-13.5, -12.2], dtype=torch.float64, requires_grad=True)
    loss, _ = flashloss.preference_loss(c, r, c.detach(), r.detach(), loss_type="sigmoid", beta=0.1)
    gc, gr = torch.autograd.grad(loss, (c, r))
    # d/dl_w of -log sigma(beta (r_w - r_l)) at 0 is -beta / 2, averaged over 2 pairs
    torch.testing.assert_close(gc, torch.full_like(gc, -0.025))
    torch.testing.assert_close(gr, torch.full_like(gr, 0.025))
    from flashloss.ops.contrastive_lse import softplus
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(softplus(x).sum(), x)
    torch.testing.assert_close(g, torch.full_like(g, 0.5))
