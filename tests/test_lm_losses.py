"""The CE family and vocabulary divergences on top of primitive B (flashloss.lm), and the primitive's
siblings logprobs_from_logits and sequence_logprobs: against dense float64 transcriptions of
OBJECTIVES.md §2 and against torch / TRL where they define the numbers."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import flashloss
from flashloss import backend_available, focal_loss, linear_cross_entropy, vocab_kl
from flashloss.ops import logprobs_from_logits, sequence_logprobs
from flashloss.ref import lm as ref_lm
from helpers import check_against_reference

tlp_mod = importlib.import_module("flashloss.ops.token_logprobs")
lm_mod = importlib.import_module("flashloss.lm")
BACKENDS = [b for b in ("torch", "cpu") if b in flashloss._backend.registered_ops()["token_logprobs"].impls
            and backend_available(b, "cpu")[0]]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(tlp_mod, "TILE", (8, 16))
    monkeypatch.setattr(tlp_mod, "LOGITS_CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(lm_mod, "KL_BLOCK_ROWS", 5)


def _problem(n=23, h=7, v=41, seed=0, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (2 / h ** 0.5)
    bias = torch.randn(v, generator=gen, dtype=torch.float64) * 0.3
    t = torch.randint(0, v, (n,), generator=gen)
    if ignore:
        t[2::5] = -100
    return hidden, weight, bias, t, gen


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy against torch's cross_entropy on the full logits

CE_CASES = {
    "mean": dict(reduction="mean"),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "label_smoothing": dict(label_smoothing=0.1),
    "label_smoothing_none": dict(label_smoothing=0.25, reduction="none"),
    "class_weight": dict(class_weight=True),
    "class_weight_sum": dict(class_weight=True, reduction="sum"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_cross_entropy_matches_torch(backend, case, dtype):
    hidden, weight, bias, t, gen = _problem()
    kw = dict(CE_CASES[case])
    cw = torch.rand(weight.shape[0], generator=gen, dtype=torch.float64) + 0.5 if kw.pop("class_weight", False) else None

    def fn(hidden, weight, bias):
        return linear_cross_entropy(hidden, weight, t, bias, class_weight=None if cw is None else cw.to(hidden.dtype),
                                    backend=backend, **kw)

    def ref(hidden, weight, bias):
        logits = (hidden @ weight.T + bias).float() if hidden.dtype != torch.float64 else hidden @ weight.T + bias
        out = F.cross_entropy(logits, t, weight=None if cw is None else cw.to(logits.dtype), **kw)
        return out

    check_against_reference(fn, ref, [hidden, weight, bias], dtype, naive=ref, name=f"{backend} ce {case}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_z_loss_token_weights_num_items(backend):
    hidden, weight, bias, t, gen = _problem(seed=1)
    tw = torch.rand(t.shape, generator=gen, dtype=torch.float64)
    valid = t != -100

    def dense(hidden, weight, bias, normalize, num_items):
        z = hidden @ weight.T + bias
        lse = torch.logsumexp(z, -1)
        ce = F.cross_entropy(z, t, reduction="none")
        per = torch.where(valid, (ce + 1e-4 * lse ** 2) * tw, 0.0)
        denom = num_items if num_items is not None else (tw[valid].sum() if normalize == "weights" else valid.sum())
        return per.sum() / denom

    for normalize, num_items in (("valid", None), ("weights", None), ("valid", 100)):
        def fn(hidden, weight, bias):
            return linear_cross_entropy(hidden, weight, t, bias, z_loss=1e-4, token_weights=tw.to(hidden.dtype),
                                        normalize=normalize, num_items_in_batch=num_items, backend=backend)

        check_against_reference(fn, lambda h, w, b: dense(h, w, b, normalize, num_items), [hidden, weight, bias],
                                torch.float32, name=f"z-loss {normalize} {num_items}")
    loss, zl = linear_cross_entropy(hidden.float(), weight.float(), t, z_loss=1e-3, return_z_loss=True,
                                    backend=backend)
    lse = torch.logsumexp(hidden @ weight.T, -1)
    torch.testing.assert_close(zl.double(), 1e-3 * (lse[valid] ** 2).mean(), rtol=1e-5, atol=0)
    assert not zl.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_all_ignored_is_zero_with_zero_gradient(backend):
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    t = torch.full((5,), -100)
    for kw in (dict(), dict(label_smoothing=0.2, z_loss=1e-4), dict(class_weight=torch.rand(9))):
        loss = linear_cross_entropy(hidden, weight, t, backend=backend, **kw)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(loss)
        assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)
        hidden.grad = weight.grad = None


def test_linear_cross_entropy_bad_input():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="class_weight and label_smoothing"):
        linear_cross_entropy(h, w, t, class_weight=torch.ones(10), label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"class_weight must have shape \[V=10\]"):
        linear_cross_entropy(h, w, t, class_weight=torch.ones(9))
    with pytest.raises(ValueError, match="token_weights must have the shape of targets"):
        linear_cross_entropy(h, w, t, token_weights=torch.ones(5))
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_cross_entropy(h, w, t, reduction="batchmean")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        linear_cross_entropy(h, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="normalize='weights' needs token_weights"):
        linear_cross_entropy(h, w, t, normalize="weights")
    with pytest.raises(IndexError, match=r"targets must be in \[0, 10\)"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 10]))


# ---------------------------------------------------------------------------------------------
# focal loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma,alpha", [(2.0, None), (0.5, 0.25), (3.0, "per_class"), (0.0, None)])
def test_focal_loss_matches_dense(backend, gamma, alpha):
    hidden, weight, bias, t, gen = _problem(seed=2)
    a = torch.rand(weight.shape[0], generator=gen, dtype=torch.float64) if alpha == "per_class" else alpha
    valid = t != -100

    def fn(hidden, weight):
        aa = a.to(hidden.dtype) if isinstance(a, torch.Tensor) else a
        return focal_loss(hidden, weight, t, gamma=gamma, alpha=aa, reduction="sum", backend=backend)

    def ref(hidden, weight):
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(1, t.clamp_min(0)[:, None])[:, 0]
        at = a[t.clamp_min(0)] if isinstance(a, torch.Tensor) else (1.0 if a is None else a)
        per = -at * (1 - logp.exp()) ** gamma * logp
        return torch.where(valid, per, 0.0).sum()

    check_against_reference(fn, ref, [hidden, weight], torch.float32, name=f"focal {gamma} {alpha}")
    if gamma == 0.0:
        ce = linear_cross_entropy(hidden, weight, t, reduction="sum", backend=backend)
        torch.testing.assert_close(fn(hidden, weight), ce)


# ---------------------------------------------------------------------------------------------
# vocab_kl against the dense formulas of OBJECTIVES.md §2.6 and TRL's generalized_jsd_loss


def _dense_divergence(zs, zt, divergence, beta):
    logps, logpt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ps, pt = logps.exp(), logpt.exp()
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return (pt * (logpt - logps)).sum(-1)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return (ps * (logps - logpt)).sum(-1)
    m = (1 - beta) * ps + beta * pt
    return beta * (pt * (logpt - m.log())).sum(-1) + (1 - beta) * (ps * (logps - m.log())).sum(-1)


KL_CASES = {
    "forward": dict(divergence="forward_kl"),
    "reverse": dict(divergence="reverse_kl"),
    "jsd": dict(divergence="jsd", beta=0.5),
    "jsd_0.1_temperature": dict(divergence="jsd", beta=0.1, temperature=2.0),
    "jsd_beta0": dict(divergence="jsd", beta=0.0),
    "jsd_beta1": dict(divergence="jsd", beta=1.0),
    "forward_t_squared_softcap": dict(divergence="forward_kl", temperature=1.5, t_squared=True, student_softcap=2.0),
}


@pytest.mark.parametrize("case", list(KL_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_vocab_kl_matches_dense(case, dtype):
    gen = torch.Generator().manual_seed(4)
    n, hs, ht, v = 17, 6, 9, 37
    sh = torch.randn(n, hs, generator=gen, dtype=torch.float64)
    sw = torch.randn(v, hs, generator=gen, dtype=torch.float64) * 0.8
    sb = torch.randn(v, generator=gen, dtype=torch.float64) * 0.2
    th = torch.randn(n, ht, generator=gen, dtype=torch.float64)
    tw = torch.randn(v, ht, generator=gen, dtype=torch.float64) * 0.6
    t = torch.randint(0, v, (n,), generator=gen)
    t[::4] = -100
    kw = dict(KL_CASES[case])
    T = kw.get("temperature", 1.0)
    cap = kw.get("student_softcap")

    def fn(sh, sw, sb):
        return vocab_kl(sh, sw, th.to(sh.dtype), tw.to(sh.dtype), t, student_bias=sb, reduction="none", **kw)

    def ref(sh, sw, sb):
        x = sh @ sw.T + sb
        zs = (cap * torch.tanh(x / cap) if cap else x) / T
        zt = (th @ tw.T).to(zs.dtype) / T
        if zs.dtype != torch.float64:
            zs, zt = zs.float(), zt.float()
        d = _dense_divergence(zs, zt, kw["divergence"], kw.get("beta", 0.5))
        if kw.get("t_squared"):
            d = d * T * T
        return torch.where(t != -100, d, 0.0)

    check_against_reference(fn, ref, [sh, sw, sb], dtype, naive=ref, name=f"vocab_kl {case}")


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_vocab_kl_matches_trl_generalized_jsd(beta):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    gen = torch.Generator().manual_seed(6)
    b, seq, h, v = 2, 5, 8, 30
    sh, th = torch.randn(b, seq, h, generator=gen), torch.randn(b, seq, h, generator=gen)
    sw, tw = torch.randn(v, h, generator=gen), torch.randn(v, h, generator=gen)
    labels = torch.randint(0, v, (b, seq), generator=gen)
    labels[0, :2] = -100
    ours = vocab_kl(sh, sw, th, tw, labels, divergence="jsd", beta=beta, temperature=0.9)
    theirs = gkd.GKDTrainer.generalized_jsd_loss(sh @ sw.T, th @ tw.T, labels=labels, beta=beta, temperature=0.9)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_vocab_kl_teacher_gets_no_gradient_and_bad_input():
    sh, sw = torch.randn(4, 5, requires_grad=True), torch.randn(11, 5, requires_grad=True)
    th, tw = torch.randn(4, 3, requires_grad=True), torch.randn(11, 3, requires_grad=True)
    vocab_kl(sh, sw, th, tw).backward()
    assert th.grad is None and tw.grad is None and sw.grad is not None
    with pytest.raises(ValueError, match=r"teacher_weight must have shape \[V=11, H=3\]"):
        vocab_kl(sh, sw, th, torch.randn(12, 3))
    with pytest.raises(ValueError, match="teacher_hidden must have the leading dimensions"):
        vocab_kl(sh, sw, torch.randn(5, 3), tw)
    with pytest.raises(ValueError, match="divergence must be one of"):
        vocab_kl(sh, sw, th, tw, divergence="kl")
    with pytest.raises(ValueError, match="beta must be in"):
        vocab_kl(sh, sw, th, tw, beta=1.5)


# ---------------------------------------------------------------------------------------------
# logprobs_from_logits and sequence_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_logprobs_from_logits_matches_reference(temperature, dtype):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 11, 29, generator=gen, dtype=torch.float64) * 3
    t = torch.randint(0, 29, (3, 11), generator=gen)
    t[1, ::3] = -100

    def fn(x):
        return logprobs_from_logits(x, t, temperature=temperature)

    def ref(x):
        return ref_lm.logprobs_from_logits(x, t, temperature=temperature)

    check_against_reference(fn, ref, [logits], dtype, naive=ref, name=f"logprobs_from_logits T={temperature}")


def test_logprobs_from_logits_matches_trl_selective_log_softmax():
    utils = pytest.importorskip("trl.trainer.utils")
    logits = torch.randn(2, 9, 50)
    t = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(logprobs_from_logits(logits, t), utils.selective_log_softmax(logits, t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs_padded_packed_and_logits_agree(backend):
    gen = torch.Generator().manual_seed(8)
    b, seq, h, v = 3, 7, 6, 25
    hidden = torch.randn(b, seq, h, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (b, seq), generator=gen)
    labels[:, :3] = -100  # prompt
    labels[1, 5:] = -100  # padding
    labels[2, :] = -100  # an empty completion
    r = sequence_logprobs(hidden, weight, labels, backend=backend)
    logq = torch.log_softmax(hidden @ weight.T, -1)[:, :-1]
    tgt = labels[:, 1:]
    tok = torch.where(tgt != -100, logq.gather(-1, tgt.clamp_min(0)[..., None])[..., 0], 0.0)
    torch.testing.assert_close(r.token_logp, tok)
    torch.testing.assert_close(r.sum, tok.sum(1))
    assert r.count.tolist() == (tgt != -100).sum(1).tolist() and r.count[2] == 0
    torch.testing.assert_close(r.mean, tok.sum(1) / (tgt != -100).sum(1).clamp_min(1))
    assert r.mean[2] == 0 and r.sum[2] == 0
    g = torch.randn(b, dtype=torch.float64)
    grads = torch.autograd.grad((r.mean * g).sum(), (hidden, weight))
    assert torch.all(grads[0][2] == 0)  # the empty sequence receives no gradient
    ref_grads = torch.autograd.grad((tok.sum(1) / (tgt != -100).sum(1).clamp_min(1) * g).sum(), (hidden, weight))
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e)
    # the same from logits, and packed without padding (segments of different lengths)
    rl = sequence_logprobs(logits=hidden @ weight.T, labels=labels)
    torch.testing.assert_close(rl.sum, r.sum)
    lengths = [7, 5, 7]
    packed_h = torch.cat([hidden[i, :n] for i, n in enumerate(lengths)])
    packed_l = torch.cat([labels[i, :n] for i, n in enumerate(lengths)])
    cu = torch.tensor([0, 7, 12, 19])
    rp = sequence_logprobs(packed_h, weight, packed_l, cu_seqlens=cu, backend=backend)
    torch.testing.assert_close(rp.sum, r.sum)
    assert rp.count.tolist() == r.count.tolist()


def test_sequence_logprobs_bad_input():
    h, w = torch.randn(2, 5, 4), torch.randn(9, 4)
    lab = torch.randint(0, 9, (2, 5))
    with pytest.raises(ValueError, match=r"labels must have shape \[2, 5\]"):
        sequence_logprobs(h, w, lab[:, :4])
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        sequence_logprobs(h.reshape(10, 4), w, lab.reshape(10), cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="either hidden and weight, or logits"):
        sequence_logprobs(h, w, lab, logits=torch.randn(2, 5, 9))
    with pytest.raises(IndexError, match=r"targets must be in \[0, 9\)"):
        sequence_logprobs(h, w, torch.full((2, 5), 9))
