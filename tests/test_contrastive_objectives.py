"""Every contrastive objective against its anchor library (open_clip, pytorch-metric-learning) or,
where the anchor is research code that is not installable, a dense float64 transcription of the
formula in OBJECTIVES.md §1. Values and gradients, random upstream gradients, every CPU backend."""
import math

import pytest
import torch
import torch.nn.functional as F

import flashloss
from anchors import open_clip_loss_module, pml_losses
from flashloss import backend_available
from helpers import check_against_reference, rel_err

BACKENDS = [b for b in ("torch", "cpu") if b in flashloss._backend.registered_ops()["contrastive_lse"].impls
            and backend_available(b, "cpu")[0]]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------ open_clip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_loss_matches_open_clip(backend, n, with_bias):
    oc = open_clip_loss_module()
    img, txt = F.normalize(randn(n, 16, seed=1), dim=-1), F.normalize(randn(n, 16, seed=2), dim=-1)
    scale, bias = torch.tensor(14.3, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    inputs = [img, txt, scale] + ([bias] if with_bias else [])

    def ours(i, t, s, b=None):
        return flashloss.ClipLoss(backend=backend)(i, t, s, b)

    def anchor(i, t, s, b=None):
        return oc.ClipLoss()(i, t, s, logit_bias=b)

    # the bias gradient of a softmax loss is analytically 0 (roundoff either side): checked apart
    check_against_reference(ours, anchor, inputs, torch.float32, grad_inputs=[0, 1, 2], name=f"ClipLoss {backend}")
    if with_bias:
        b = bias.float().requires_grad_(True)
        flashloss.ClipLoss(backend=backend)(img.float(), txt.float(), scale.float(), b).backward()
        assert abs(b.grad.item()) < 1e-6
    out = flashloss.ClipLoss(backend=backend)(img, txt, scale, output_dict=True)
    assert set(out) == {"contrastive_loss"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 9, 40])
def test_siglip_loss_matches_open_clip(backend, n):
    oc = open_clip_loss_module()
    img, txt = F.normalize(randn(n, 12, seed=3), dim=-1), F.normalize(randn(n, 12, seed=4), dim=-1)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)

    def ours(i, t, s, b):
        return flashloss.SigLipLoss(backend=backend)(i, t, s, b)

    def anchor(i, t, s, b):
        return oc.SigLipLoss()(i, t, s, b)

    check_against_reference(ours, anchor, [img, txt, scale, bias], torch.float32, name=f"SigLipLoss {backend}")
    check_against_reference(ours, anchor, [img, txt, scale, bias], torch.bfloat16, naive=anchor,
                            name=f"SigLipLoss bf16 {backend}")


def test_clip_multi_process_arguments_need_a_process_group():
    # world_size > 1 runs flashloss.distributed (tests/test_distributed.py); without a process group
    # the forward says what is missing, and DistillClipLoss stays single-process
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        flashloss.ClipLoss(world_size=2, rank=0)(x, x, 1.0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        flashloss.SigLipLoss(world_size=2, rank=0)(x, x, 1.0, 0.0)
    with pytest.raises(NotImplementedError, match="flashloss.distributed"):
        flashloss.DistillClipLoss(world_size=2, rank=0)
    with pytest.raises(ValueError, match="gather_with_grad"):
        flashloss.ClipLoss(world_size=2, rank=0, impl="ring")


# ------------------------------------------------------------------------------ pytorch-metric-learning


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("labels", [[0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 2, 2, 2, 3], [5, 5]])
def test_ntxent_matches_pml(backend, labels):
    labels = torch.tensor(labels)
    emb = randn(len(labels), 8, seed=5)
    pml = pml_losses().NTXentLoss(temperature=0.07)

    def ours(e):
        return flashloss.NTXentLoss(temperature=0.07, backend=backend)(e, labels)

    def anchor(e):
        return pml(e, labels)

    check_against_reference(ours, anchor, [emb], torch.float32, name=f"NTXent {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ntxent_two_views_equals_label_mode_and_dense_formula(backend):
    z1, z2 = randn(13, 6, seed=6), randn(13, 6, seed=7)
    got = flashloss.nt_xent(z1, z2, temperature=0.2, backend=backend)
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    s = z @ z.T / 0.2
    s.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(13, 26), torch.arange(0, 13)])
    want = F.cross_entropy(s, partner)
    assert rel_err(got, want) < 1e-12
    labels = torch.arange(13).repeat(2)
    assert rel_err(flashloss.nt_xent(torch.cat([z1, z2]), labels=labels, temperature=0.2, backend=backend), want) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("labels", [[0, 1, 2, 0, 1, 2, 3], [0, 0, 1, 1, 1, 4, 4, 9]])
def test_supcon_matches_pml(backend, labels):
    labels = torch.tensor(labels)
    emb = randn(len(labels), 8, seed=8)
    pml = pml_losses().SupConLoss(temperature=0.1)

    def ours(e):
        return flashloss.SupConLoss(temperature=0.1, backend=backend)(e, labels)

    check_against_reference(ours, lambda e: pml(e, labels), [emb], torch.float32,
                            name=f"SupCon {backend}")


def test_supcon_hobbitlong_convention():
    labels = torch.tensor([0, 1, 2, 0, 1, 3])  # anchors 2 and 5 have no positive
    emb = randn(6, 5, seed=9)
    z = F.normalize(emb, dim=-1)
    s = z @ z.T / 0.07
    eye = torch.eye(6, dtype=torch.bool)
    lse = torch.logsumexp(s.masked_fill(eye, float("-inf")), 1)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    per = lse - (s * pos).sum(1) / pos.sum(1).clamp_min(1)
    per = torch.where(pos.any(1), per * (0.07 / 0.07), torch.zeros_like(per))
    got = flashloss.supcon_loss(emb, labels, temperature=0.07, no_positive="zero")
    assert rel_err(got, per.mean()) < 1e-12  # mean over all 6 anchors, zeros included
    got_pml = flashloss.supcon_loss(emb, labels, temperature=0.07)
    assert rel_err(got_pml, per[pos.any(1)].mean()) < 1e-12


# ------------------------------------------------------------------------------ dense transcriptions


def dense_info_nce(q, k, t, scale):
    return F.cross_entropy(scale * q @ k.T, t, ignore_index=-100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_with_ignored_rows_and_moco_queue(backend):
    q, k, queue = randn(21, 7, seed=10), randn(25, 7, seed=11), randn(30, 7, seed=12)
    t = torch.randint(0, 25, (21,), generator=torch.Generator().manual_seed(0))
    t[::4] = -100
    check_against_reference(lambda q, k: flashloss.info_nce(q, k, t, temperature=0.1, backend=backend),
                            lambda q, k: dense_info_nce(q, k, t, 10.0), [q, k], torch.float32, name="info_nce")

    def moco_dense(q, k):
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.07
        return F.cross_entropy(logits, torch.zeros(21, dtype=torch.long))

    k_pos = randn(21, 7, seed=13)
    check_against_reference(lambda q, k: flashloss.moco_loss(q, k, queue.to(q.dtype), backend=backend), moco_dense,
                            [q, k_pos], torch.float32, grad_inputs=[0], name="moco")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mnrl_matches_dense(backend):
    a, p, n1, n2 = (randn(11, 9, seed=s) for s in (14, 15, 16, 17))

    def dense(a, p, n1, n2):
        cands = F.normalize(torch.cat([p, n1, n2]), dim=-1)
        return F.cross_entropy(20.0 * F.normalize(a, dim=-1) @ cands.T, torch.arange(11))

    check_against_reference(lambda a, p, n1, n2: flashloss.mnrl_loss(a, p, n1, n2, backend=backend), dense,
                            [a, p, n1, n2], torch.float32, name="mnrl")


def dense_dcl(z1, z2, t, sigma, symmetric, split, detach):
    def one(a, b):
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        n = a.shape[0]
        eye = torch.eye(n, dtype=torch.bool)
        pos = (a * b).sum(1)
        s_aa = (a @ a.T / t).masked_fill(eye, float("-inf"))
        s_ab = (a @ b.T / t).masked_fill(eye, float("-inf"))
        if split:
            neg = torch.logsumexp(s_aa, 1) + torch.logsumexp(s_ab, 1)
        else:
            neg = torch.logsumexp(torch.cat([s_aa, s_ab], 1), 1)
        w = 1.0
        if sigma is not None:
            w = 2.0 - n * torch.softmax(pos / sigma, 0)
            w = w.detach() if detach else w
        return -w * pos / t + neg

    per = one(z1, z2)
    if symmetric:
        per = 0.5 * (per + one(z2, z1))
    return per.mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", [dict(), dict(sigma=0.5), dict(sigma=0.5, detach=True), dict(symmetric=False),
                                     dict(split=True)])
def test_dcl_matches_dense(backend, variant):
    sigma, sym = variant.get("sigma"), variant.get("symmetric", True)
    split, detach = variant.get("split", False), variant.get("detach", False)
    z1, z2 = randn(17, 6, seed=18), randn(17, 6, seed=19)

    def ours(a, b):
        return flashloss.dcl_loss(a, b, temperature=0.1, weight_sigma=sigma, symmetric=sym,
                                  negatives="split" if split else "joint", detach_weight=detach, backend=backend)

    check_against_reference(ours, lambda a, b: dense_dcl(a, b, 0.1, sigma, sym, split, detach), [z1, z2],
                            torch.float32, name=f"dcl {variant}")


def dense_debiased(z1, z2, t, tau_plus, beta=None):
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n2 = z.shape[0]
    n = n2 // 2
    sim = torch.exp(z @ z.T / t)
    partner = torch.cat([torch.arange(n, n2), torch.arange(0, n)])
    pos = sim[torch.arange(n2), partner]
    mask = torch.ones(n2, n2, dtype=torch.bool)
    mask[torch.arange(n2), torch.arange(n2)] = False
    mask[torch.arange(n2), partner] = False
    neg = sim[mask].view(n2, n2 - 2)
    n_neg = n2 - 2
    if beta is None:
        total = neg.sum(-1)
    else:
        imp = (beta * neg.log()).exp()
        total = (imp * neg).sum(-1) / imp.mean(-1)
    ng = (-tau_plus * n_neg * pos + total) / (1 - tau_plus)
    ng = torch.clamp(ng, min=n_neg * math.e ** (-1 / t))
    return (-torch.log(pos / (pos + ng))).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau_plus", [0.0, 0.1, 0.5])
def test_debiased_and_hard_negative_match_dense(backend, tau_plus):
    z1, z2 = randn(9, 5, seed=20), randn(9, 5, seed=21)
    check_against_reference(
        lambda a, b: flashloss.debiased_contrastive_loss(a, b, temperature=0.5, tau_plus=tau_plus, backend=backend),
        lambda a, b: dense_debiased(a, b, 0.5, tau_plus), [z1, z2], torch.float32, name="debiased")
    check_against_reference(
        lambda a, b: flashloss.hard_negative_loss(a, b, temperature=0.5, tau_plus=tau_plus, beta=1.0, backend=backend),
        lambda a, b: dense_debiased(a, b, 0.5, tau_plus, beta=1.0), [z1, z2], torch.float32, name="hcl")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalized", [True, False])
def test_align_uniform_matches_dense(backend, normalized):
    x, y = randn(15, 4, seed=22), randn(15, 4, seed=23)
    if normalized:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)

    def unif(v):
        return torch.pdist(v, p=2).pow(2).mul(-2.0).exp().mean().log()

    def dense(x, y):
        return (x - y).norm(dim=1).pow(2).mean() + 0.5 * (unif(x) + unif(y))

    check_against_reference(lambda x, y: flashloss.align_uniform_loss(x, y, backend=backend), dense, [x, y],
                            torch.float32, name="align_uniform")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_soft_target_nce_matches_dense(backend, symmetric):
    q, k, u = randn(12, 6, seed=24), randn(12, 6, seed=25), randn(12, 3, seed=26)
    w = torch.rand(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w[3] = 0  # a row with no target mass is invalid

    def dense(q, k, w):
        s = 10.0 * q @ k.T
        valid = w.sum(1) > 0
        row = torch.logsumexp(s, 1) - (w / w.sum(1, keepdim=True).clamp_min(1e-30) * s).sum(1)
        row = row[valid].mean()
        if not symmetric:
            return row
        valid_c = w.sum(0) > 0
        col = torch.logsumexp(s, 0) - (w / w.sum(0, keepdim=True).clamp_min(1e-30) * s).sum(0)
        return 0.5 * (row + col[valid_c].mean())

    check_against_reference(
        lambda q, k: flashloss.soft_target_nce(q, k, target_weights=w, scale=10.0, symmetric=symmetric, backend=backend),
        lambda q, k: dense(q, k, w), [q, k], torch.float32, name="soft targets")
    un = F.normalize(u, dim=-1)
    w_cwcl = (1 + un @ un.T) / 2
    check_against_reference(
        lambda q, k: flashloss.soft_target_nce(q, k, target_embeddings=u, scale=10.0, symmetric=symmetric, backend=backend),
        lambda q, k: dense(q, k, w_cwcl), [q, k], torch.float32, name="cwcl")


# ------------------------------------------------------------------------------ reductions and errors


@pytest.mark.parametrize("fn", ["info_nce", "clip_loss", "siglip_loss", "nt_xent", "supcon_loss", "dcl_loss"])
def test_reductions_are_consistent(fn):
    a, b = randn(8, 4, seed=27).float(), randn(8, 4, seed=28).float()
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3])
    call = {
        "info_nce": lambda r: flashloss.info_nce(a, b, reduction=r),
        "clip_loss": lambda r: flashloss.clip_loss(a, b, 5.0, reduction=r),
        "siglip_loss": lambda r: flashloss.siglip_loss(a, b, 5.0, -3.0, reduction=r),
        "nt_xent": lambda r: flashloss.nt_xent(a, b, reduction=r),
        "supcon_loss": lambda r: flashloss.supcon_loss(a, labels, reduction=r),
        "dcl_loss": lambda r: flashloss.dcl_loss(a, b, reduction=r),
    }[fn]
    none, total, mean = call("none"), call("sum"), call("mean")
    assert none.dim() == 1 and torch.isfinite(none).all()
    torch.testing.assert_close(none.sum(), total)
    divisor = 8 if fn == "siglip_loss" else none.numel()
    torch.testing.assert_close(mean, total / divisor)
    with pytest.raises(ValueError, match="reduction must be"):
        call("avg")


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: flashloss.clip_loss(torch.randn(4, 3), torch.randn(5, 3), 1.0), ValueError, "one shape"),
        (lambda: flashloss.info_nce(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0), ValueError, "temperature must be > 0"),
        (lambda: flashloss.info_nce(torch.randn(6, 3), torch.randn(4, 3)), ValueError, "M >= N"),
        (lambda: flashloss.supcon_loss(torch.randn(4, 3), torch.tensor([0, 1])), ValueError, "labels must be"),
        (lambda: flashloss.nt_xent(torch.randn(4, 3)), ValueError, "needs a second view"),
        (lambda: flashloss.dcl_loss(torch.randn(4, 3), torch.randn(4, 3), negatives="both"), ValueError, "negatives must be"),
        (lambda: flashloss.align_uniform_loss(torch.randn(4, 3), torch.randn(4, 3), reduction="none"), ValueError, "'mean' only"),
        (lambda: flashloss.debiased_contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), tau_plus=1.0), ValueError, "tau_plus"),
        (lambda: flashloss.mnrl_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(3, 3)), ValueError, r"negatives\[0\]"),
    ],
)
def test_objective_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_learnable_temperature(backend):
    # iSogCLR-style: temperature tau [N] with gradient, S_ij = sim_ij / tau_i (OBJECTIVES 1.13)
    q, k = randn(10, 5, seed=30), randn(10, 5, seed=31)
    tau = torch.rand(10, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.05 + 0.02
    check_against_reference(
        lambda q, k, tau: flashloss.info_nce(q, k, temperature=tau, backend=backend),
        lambda q, k, tau: F.cross_entropy((q @ k.T) / tau[:, None], torch.arange(10)),
        [q, k, tau], torch.float32, name="per-row temperature")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["additive", "angular"])
def test_margin_nce_matches_dense(backend, kind):
    q, k = randn(14, 6, seed=32), randn(16, 6, seed=33)
    t = torch.randint(0, 16, (14,), generator=torch.Generator().manual_seed(3))
    t[5] = -100
    s, m = 30.0, 0.2

    def dense(q, k):
        cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T
        valid = t != -100
        tc = t.clamp_min(0)
        c = cos[torch.arange(14), tc]
        if kind == "additive":
            psi = c - m
        else:
            sin = torch.sqrt((1 - c * c).clamp_min(0)).clamp_min(1e-6)
            psi = c * math.cos(m) - sin * math.sin(m)
        logits = cos.clone()
        logits[torch.arange(14), tc] = torch.where(valid, psi, c)
        return F.cross_entropy(s * logits, t, ignore_index=-100)

    check_against_reference(lambda q, k: flashloss.margin_nce(q, k, t, scale=s, margin=m, kind=kind, backend=backend),
                            dense, [q, k], torch.float32, name=f"margin {kind}")
