"""Contrastive objectives that need more than one positive per row or a hard-negative mask
(OBJECTIVES 1.13 iSogCLR, 1.14 DEXML, 1.16 top-k / threshold negatives) and the distillation losses
(1.2 DistillClipLoss against open_clip, 1.15 similarity KL). Each is checked against open_clip or a
dense float64 transcription of its formula: values and gradients, random upstream gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

import flashloss
from anchors import open_clip_loss_module
from flashloss import backend_available
from helpers import check_against_reference, peak_extra_bytes

BACKENDS = [b for b in ("torch", "cpu") if b in flashloss._backend.registered_ops()["contrastive_lse"].impls
            and backend_available(b, "cpu")[0]]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def unit(*shape, seed=0):
    return F.normalize(randn(*shape, seed=seed), dim=-1)


# ------------------------------------------------------------------------------ 1.16 hard negatives


def _dense_positive_mask(n, m, targets):
    t = targets[:, None] if targets.dim() == 1 else targets
    return (torch.arange(m)[None, None, :] == t[:, :, None]).any(1)


@pytest.mark.parametrize("num", [1, 3, 36, 40])
def test_topk_threshold_is_the_kth_largest_negative(num):
    q, k = randn(23, 6, seed=1), randn(37, 6, seed=2)
    gen = torch.Generator().manual_seed(3)
    targets = torch.stack([torch.randperm(37, generator=gen)[:2] for _ in range(23)])
    targets[::5, 1] = -1  # rows with 1 positive have 36 negatives, the others 35
    thr = flashloss.topk_threshold(q, k, num, 2.0, -0.5, targets=targets, block=8)  # crosses blocks
    S = 2.0 * q @ k.T - 0.5
    neg = S.masked_fill(_dense_positive_mask(23, 37, targets), float("-inf"))
    n_neg = torch.isfinite(neg).sum(1)
    for i in range(23):
        if n_neg[i] < num:  # fewer negatives than k: nothing to drop
            assert torch.isneginf(thr[i])
        else:
            torch.testing.assert_close(thr[i], neg[i].topk(num).values[-1], rtol=0, atol=1e-12)
    assert (n_neg < num).any() == (num >= 36)


def _dense_hard_nce(q, k, scale, targets, num, min_sim):
    S = scale * q @ k.T
    Y = _dense_positive_mask(q.shape[0], k.shape[0], targets)
    neg = S.masked_fill(Y, float("-inf"))
    keep = torch.ones_like(Y)
    if num is not None:
        kth = neg.topk(num, dim=1).values[:, -1:]
        keep &= neg >= kth
    if min_sim is not None:
        keep &= (q @ k.T) >= min_sim
    allowed = Y | keep
    lse = torch.logsumexp(S.masked_fill(~allowed, float("-inf")), dim=1)
    pos = (S * Y).sum(1) / Y.sum(1)
    return (lse - pos).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num, min_sim", [(4, None), (None, 0.1), (6, -0.2)])
@pytest.mark.parametrize("multi", [False, True])
def test_hard_negative_nce_matches_dense(backend, num, min_sim, multi):
    n, m = 19, 30
    gen = torch.Generator().manual_seed(7)
    targets = torch.randint(0, m, (n, 2), generator=gen) if multi else torch.randint(0, m, (n,), generator=gen)
    if multi:
        targets[:, 1] = (targets[:, 0] + 1 + torch.randint(0, m - 1, (n,), generator=gen)) % m  # distinct
    q, k = unit(n, 8, seed=4), unit(m, 8, seed=5)

    def ours(q, k):
        return flashloss.hard_negative_nce(q, k, targets, num_negatives=num, min_similarity=min_sim, scale=5.0,
                                           backend=backend)

    def ref(q, k):
        return _dense_hard_nce(q, k, 5.0, targets, num, min_sim)

    check_against_reference(ours, ref, [q, k], torch.float32, naive=ref, name=f"hard nce {backend}")
    check_against_reference(ours, ref, [q, k], torch.float64, name=f"hard nce {backend}")


def test_hard_negative_nce_keeps_all_negatives_when_k_exceeds_them():
    q, k = unit(9, 5, seed=1), unit(9, 5, seed=2)
    full = flashloss.info_nce(q, k, scale=4.0)
    torch.testing.assert_close(flashloss.hard_negative_nce(q, k, num_negatives=100, scale=4.0), full)
    with pytest.raises(ValueError, match="num_negatives"):
        flashloss.hard_negative_nce(q, k, num_negatives=0)
    with pytest.raises(ValueError, match="give num_negatives"):
        flashloss.hard_negative_nce(q, k)


# ------------------------------------------------------------------------------ 1.14 DEXML


def _dense_dexml(q, k, positives, tau):
    S = F.normalize(q, dim=-1, eps=1e-8) @ F.normalize(k, dim=-1, eps=1e-8).T / tau
    n = q.shape[0]
    total = S.new_zeros(())
    for i in range(n):
        P = [int(x) for x in positives[i] if x >= 0]
        if not P:
            continue
        negs = [j for j in range(k.shape[0]) if j not in P]
        neg_lse = torch.logsumexp(S[i, negs], 0) if negs else S.new_tensor(float("-inf"))
        terms = [S[i, l] - torch.logaddexp(neg_lse, S[i, l]) for l in P]
        total = total - torch.stack(terms).mean()
    return total / n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, m", [(1, 4), (13, 29)])
def test_dexml_matches_dense(backend, n, m):
    gen = torch.Generator().manual_seed(11)
    positives = torch.stack([torch.randperm(m, generator=gen)[:3] for _ in range(n)])
    positives[torch.rand(n, 3, generator=gen) < 0.3] = -1
    if n > 1:
        positives[1] = -1  # a row without positives: contributes 0, counts in N
    q, k = randn(n, 7, seed=12), randn(m, 7, seed=13)

    def ours(q, k):
        return flashloss.dexml_loss(q, k, positives, temperature=0.05, backend=backend)

    def ref(q, k):
        return _dense_dexml(q, k, positives, 0.05)

    check_against_reference(ours, ref, [q, k], torch.float32, naive=ref, name=f"dexml {backend}")
    check_against_reference(ours, ref, [q, k], torch.float64, name=f"dexml {backend}")


def test_dexml_bad_input():
    q, k = randn(3, 4), randn(5, 4)
    with pytest.raises(ValueError, match="once"):
        flashloss.dexml_loss(q, k, torch.tensor([[0, 0], [1, -1], [2, 3]]))
    with pytest.raises(ValueError, match=r"positives must be an int tensor \[N=3, P\]"):
        flashloss.dexml_loss(q, k, torch.tensor([0, 1, 2]))
    with pytest.raises(IndexError, match="targets must be in"):
        flashloss.dexml_loss(q, k, torch.tensor([[0, 5], [1, -1], [2, 3]]))


# ------------------------------------------------------------------------------ 1.13 iSogCLR


def _dense_robust(q, k, tau, rho):
    sim = q @ k.T
    n = q.shape[0]
    h = sim - sim.diag()[:, None]
    off = ~torch.eye(n, dtype=torch.bool)
    z = (h / tau[:, None]).masked_fill(~off, float("-inf"))
    log_mean = torch.logsumexp(z, dim=1) - math.log(n - 1)
    return tau * log_mean + rho * tau


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 17])
def test_isogclr_loss_matches_dense(backend, n):
    img, txt = unit(n, 8, seed=20), unit(n, 8, seed=21)
    gen = torch.Generator().manual_seed(22)
    ti = 0.005 + 0.045 * torch.rand(n, generator=gen, dtype=torch.float64)
    tt = 0.005 + 0.045 * torch.rand(n, generator=gen, dtype=torch.float64)

    def ours(i, t, a, b):
        return flashloss.isogclr_loss(i, t, a, b, rho=8.0, backend=backend)

    def ref(i, t, a, b):
        return _dense_robust(i, t, a, 8.0).mean() + _dense_robust(t, i, b, 8.0).mean()

    check_against_reference(ours, ref, [img, txt, ti, tt], torch.float32, naive=ref, name=f"isogclr {backend}")
    check_against_reference(ours, ref, [img, txt, ti, tt], torch.float64, name=f"isogclr {backend}")


def test_isogclr_estimator_gradient_and_state():
    """Two steps of ISogCLRLoss against the estimator written out densely: u update, loss value,
    and the estimator's gradients for features and temperatures."""
    n, data = 6, 10
    torch.manual_seed(0)
    mod = flashloss.ISogCLRLoss(data, gamma=0.8, rho=8.0, tau_init=0.02).double()
    log_u = {"i": torch.full((data,), float("-inf"), dtype=torch.float64),
             "t": torch.full((data,), float("-inf"), dtype=torch.float64)}
    for step, index in enumerate([torch.tensor([0, 3, 5, 7, 8, 9]), torch.tensor([3, 1, 2, 5, 9, 0])]):
        img = unit(n, 5, seed=30 + step).requires_grad_(True)
        txt = unit(n, 5, seed=40 + step).requires_grad_(True)
        loss = mod(img, txt, index)
        g_img, g_txt, g_ti, g_tt = torch.autograd.grad(loss, (img, txt, mod.tau_image, mod.tau_text))

        # dense estimator
        def direction(q, k, tau, key):
            sim = q @ k.T
            h = sim - sim.diag()[:, None]
            off = ~torch.eye(n, dtype=torch.bool)
            e = torch.exp(h / tau[:, None]) * off  # e^{h/tau} over negatives
            g = e.sum(1) / (n - 1)
            u = torch.logaddexp(log_u[key][index] + math.log(0.2), torch.log(g.detach()) + math.log(0.8))
            log_u[key][index] = u.detach()
            u = u.exp().detach()
            # surrogate with exactly the estimator's gradient
            est = (tau.detach() / u * (e * (h / tau[:, None])).sum(1) / (n - 1)).detach()
            # tau_i (1/u_i) mean_j e^{h_ij/tau_i} grad(h_ij / tau_i): weight (1/u_i) e_ij / (n - 1) on grad h_ij
            feat = (1.0 / u)[:, None] * e.detach() / (n - 1)
            dtau = torch.log(u) + 8.0 - est / tau.detach()
            value = tau * torch.log(g) + 8.0 * tau
            return value, feat, dtau, h

        ti, tt = mod.tau_image.detach()[index].clone(), mod.tau_text.detach()[index].clone()
        qi, qt = img.detach().clone().requires_grad_(True), txt.detach().clone().requires_grad_(True)
        vi, fi, dti, hi = direction(qi, qt, ti, "i")
        vt, ft, dtt, ht = direction(qt, qi, tt, "t")
        torch.testing.assert_close(loss.detach(), vi.mean() + vt.mean())
        torch.testing.assert_close(mod.log_u_image[index], log_u["i"][index].to(mod.log_u_image.dtype))
        # feature gradients: sum_j w_ij dh_ij with w from the estimator, / N for the mean
        want_img, want_txt = torch.autograd.grad(((fi * hi).sum() + (ft * ht).sum()) / n, (qi, qt))
        torch.testing.assert_close(g_img, want_img)
        torch.testing.assert_close(g_txt, want_txt)
        want_ti = torch.zeros(data, dtype=torch.float64).index_add_(0, index, dti / n)
        want_tt = torch.zeros(data, dtype=torch.float64).index_add_(0, index, dtt / n)
        torch.testing.assert_close(g_ti, want_ti)
        torch.testing.assert_close(g_tt, want_tt)


def test_isogclr_bad_input():
    img, txt = unit(4, 3), unit(4, 3, seed=1)
    with pytest.raises(ValueError, match="tau_image must be a"):
        flashloss.isogclr_loss(img, txt, torch.ones(3), torch.ones(4))
    mod = flashloss.ISogCLRLoss(5)
    with pytest.raises(IndexError, match=r"index must be in \[0, 5\)"):
        mod(img.float(), txt.float(), torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="gamma"):
        flashloss.ISogCLRLoss(5, gamma=0.0)


# ------------------------------------------------------------------------------ 1.2 / 1.15 distillation


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("d_teacher", [8, 16, 24])
def test_distill_clip_loss_matches_open_clip(backend, n, d_teacher):
    oc = open_clip_loss_module()
    img, txt = unit(n, 16, seed=50), unit(n, 16, seed=51)
    t_img, t_txt = unit(n, d_teacher, seed=52), unit(n, d_teacher, seed=53)
    scale, t_scale = torch.tensor(14.3, dtype=torch.float64), torch.tensor(30.0, dtype=torch.float64)

    def ours(i, t, s):
        return flashloss.DistillClipLoss(backend=backend)(i, t, s, t_img.to(i.dtype), t_txt.to(i.dtype),
                                                          t_scale.to(i.dtype))

    def anchor(i, t, s):
        return oc.DistillClipLoss()(i, t, s, t_img.to(i.dtype), t_txt.to(i.dtype), t_scale.to(i.dtype))

    check_against_reference(ours, anchor, [img, txt, scale], torch.float32, naive=anchor,
                            name=f"DistillClipLoss {backend}")
    check_against_reference(ours, anchor, [img, txt, scale], torch.float64, name=f"DistillClipLoss {backend}")
    out = flashloss.DistillClipLoss(backend=backend)(img, txt, scale, t_img, t_txt, t_scale, output_dict=True)
    assert set(out) == {"contrastive_loss", "distill_loss"}


def _dense_similarity_kl(sq, sk, tq, tk, ss, ts):
    A = (ts[:, None] if ts.dim() else ts) * tq @ tk.T
    B = (ss[:, None] if ss.dim() else ss) * sq @ sk.T
    return F.kl_div(B.log_softmax(1), A.log_softmax(1), log_target=True, reduction="none").sum(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric, row_scale", [(False, False), (False, True), (True, False)])
def test_similarity_kl_matches_dense(backend, symmetric, row_scale):  # symmetric + row scale: a ValueError
    n, m = 11, 14
    sq, sk = unit(n, 6, seed=60), unit(m, 6, seed=61)
    tq, tk = unit(n, 9, seed=62), unit(m, 9, seed=63)
    ss = (1.0 + torch.rand(n, generator=torch.Generator().manual_seed(64), dtype=torch.float64)) * 5 if row_scale \
        else torch.tensor(7.0, dtype=torch.float64)
    ts = torch.tensor(12.0, dtype=torch.float64)

    def ours(a, b, s):
        return flashloss.similarity_kl_loss(a, b, tq.to(a.dtype), tk.to(a.dtype), student_scale=s,
                                            teacher_scale=ts.to(a.dtype), symmetric=symmetric, backend=backend)

    def ref(a, b, s):
        rows = _dense_similarity_kl(a, b, tq.to(a.dtype), tk.to(a.dtype), s, ts.to(a.dtype)).mean()
        if not symmetric:
            return rows
        cols = _dense_similarity_kl(b, a, tk.to(a.dtype), tq.to(a.dtype), s, ts.to(a.dtype)).mean()
        return 0.5 * (rows + cols)

    check_against_reference(ours, ref, [sq, sk, ss], torch.float32, naive=ref, name=f"similarity KL {backend}")
    check_against_reference(ours, ref, [sq, sk, ss], torch.float64, name=f"similarity KL {backend}")


def test_distill_with_a_low_precision_teacher_keeps_the_students_dtype():
    """A bf16 teacher is read in the student's dtype: same numbers as the teacher upcast by hand."""
    img, txt = unit(9, 16, seed=80).float(), unit(9, 16, seed=81).float()
    t_img, t_txt = unit(9, 24, seed=82).bfloat16(), unit(9, 24, seed=83).bfloat16()
    scale = torch.tensor(10.0)
    a = img.clone().requires_grad_(True)
    _, d_low = flashloss.distill_clip_loss(a, txt, scale, t_img, t_txt, 20.0)
    (g_low,) = torch.autograd.grad(d_low, a)
    b = img.clone().requires_grad_(True)
    _, d_up = flashloss.distill_clip_loss(b, txt, scale, t_img.float(), t_txt.float(), 20.0)
    (g_up,) = torch.autograd.grad(d_up, b)
    assert d_low.dtype == torch.float32 and g_low.dtype == torch.float32
    torch.testing.assert_close(d_low, d_up)
    torch.testing.assert_close(g_low, g_up)


def test_similarity_kl_is_zero_for_identical_models():
    q, k = unit(10, 5, seed=70), unit(12, 5, seed=71)
    kl = flashloss.similarity_kl_loss(q, k, q, k, student_scale=8.0, teacher_scale=8.0, reduction="none")
    assert kl.abs().max() < 1e-10


def test_similarity_kl_bad_input():
    q, k = unit(4, 3), unit(5, 3, seed=1)
    with pytest.raises(ValueError, match="symmetric similarity_kl_loss needs scalar scales"):
        flashloss.similarity_kl_loss(q, k, q, k, student_scale=torch.ones(4, dtype=torch.float64), teacher_scale=1.0,
                                     symmetric=True)
    with pytest.raises(ValueError, match="student_q and teacher_q"):
        flashloss.similarity_kl_loss(q, k, q[:3], k, student_scale=1.0, teacher_scale=1.0)


@pytest.mark.slow
def test_distill_clip_loss_extra_memory_is_linear():
    """The teacher-weighted sums run through fused attention: no N x N matrix (open_clip's module
    builds four)."""
    from helpers import assert_memory_at_most_linear, memory_growth_exponent

    assert_memory_at_most_linear("memory_targets:distill_clip_fwd_bwd", lambda n: {"n": n, "backend": "cpu"},
                                 2048, 8192, floor_bytes=4 << 20)
    p_naive = memory_growth_exponent("memory_targets:distill_clip_fwd_bwd", lambda n: {"n": n, "backend": "naive"},
                                     2048, 8192, floor_bytes=4 << 20)
    assert p_naive > 1.7, p_naive
    big = peak_extra_bytes("memory_targets:distill_clip_fwd_bwd", {"n": 8192, "backend": "cpu"},
                           {"n": 128, "backend": "cpu"})
    assert big < 8192 * 8192 * 4 // 4, big
