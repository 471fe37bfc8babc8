"""One small, valid call of every public loss of flashloss (flashloss.distributed excepted: see
EXCLUDED). Shared by tests/test_compile_families.py (torch.compile
fullgraph vs eager) and tests/test_validation_audit.py (non-contiguous, expanded and no-grad
inputs).

CASES maps a public name to a builder `build(dtype) -> (fn, inputs)`: `inputs` is a list of
tensors (the floating ones that should receive a gradient require grad), `fn(*inputs)` returns a
tensor, a tuple of tensors, a NamedTuple of tensors or a (loss, metrics) pair. `flatten` turns
any of these into a list of tensors. NOT_LOSSES lists the public names that are not loss
functions; EXCLUDED the families hardened elsewhere.
"""
from __future__ import annotations

import torch

import flashloss

# Public names that are not losses (modules, namespaces, helpers without a loss value).
NOT_LOSSES = {
    "__version__", "BACKENDS", "BackendUnavailableError", "backend_available", "compat", "contrastive", "ops",
    "ref", "lm", "preference", "RunningMean", "SortResult",
    "topk_threshold",  # a no-grad helper (hard-negative threshold), covered through hard_negative_nce
    "udm_weight",  # a no-grad weight helper of bco_loss
}
# Families being built on other branches (hardened after their merge).
# flashloss.distributed: with a process group its losses run point-to-point communication inside
# autograd Functions, which torch.compile does not trace (docs/DECISIONS.md, Hardening); without one
# they are the single-process functions of this table. Tested in tests/test_distributed.py.
EXCLUDED = {"distributed", "sorting"}


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def rand(*shape, dtype=torch.float32, grad=True, seed=0, scale=1.0):
    x = (torch.randn(*shape, generator=_g(seed), dtype=torch.float64) * scale).to(dtype)
    return x.requires_grad_(grad)


def flatten(out) -> list[torch.Tensor]:
    """Every tensor of an output, in a fixed order (metrics dicts by sorted key)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flatten(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out if o is not None for t in flatten(o)]
    raise TypeError(f"unexpected output type {type(out).__name__}")


N, D = 6, 5  # contrastive batch
T_, H, V = 4, 8, 11  # LM: 2 sequences of T_ tokens, hidden H, vocabulary V


def _contrastive_lse(dt):
    q, k = rand(N, D, dtype=dt), rand(N + 1, D, dtype=dt, seed=1)
    s = torch.tensor(1.7, dtype=dt, requires_grad=True)
    t = torch.tensor([0, 3, -100, 1, 6, 2])
    return (lambda q, k, s, t: flashloss.contrastive_lse(q, k, s, targets=t, outputs=("row_lse", "col_lse", "pos_sum",
                                                                                       "col_pos_sum"))), [q, k, s, t]


def _pair(fn, dt, **kw):
    a, b = rand(N, D, dtype=dt), rand(N, D, dtype=dt, seed=1)
    return (lambda a, b: fn(a, b, **kw)), [a, b]


def _lm_inputs(dt, ignored=True):
    hid = rand(2 * T_, H, dtype=dt)
    w = rand(V, H, dtype=dt, seed=1, scale=0.5)
    t = torch.randint(0, V, (2 * T_,), generator=_g(2))
    if ignored:
        t[[1, 5]] = -100
    return hid, w, t


def _pref_vecs(b=4, seed=0):
    return [rand(b, dtype=torch.float32, seed=seed + i, scale=3.0) - 10 for i in range(4)]


def _fused(dt):
    hid = rand(4, T_ + 1, H, dtype=dt)
    w = rand(V, H, dtype=dt, seed=1, scale=0.5)
    labels = torch.randint(0, V, (4, T_ + 1), generator=_g(3))
    labels[:, :2] = -100  # prompt
    labels[3, 3:] = -100  # padding
    ref = rand(4, T_ + 1, H, dtype=dt, grad=False, seed=4)
    mod = flashloss.FusedLinearPreferenceLoss("sigmoid", beta=0.2)
    return (lambda h, w, y, r: mod(h, w, y, ref_hidden=r)), [hid, w, labels, ref]


def _isogclr_module(dt):
    mod = flashloss.ISogCLRLoss(16).to(dt)
    a, b = rand(N, D, dtype=dt), rand(N, D, dtype=dt, seed=1)
    idx = torch.tensor([0, 5, 2, 9, 15, 7])
    return (lambda a, b, i: mod(a, b, i)), [a, b, idx]


def _kto(dt):
    lp, lr, pk, rk = _pref_vecs()
    des = torch.tensor([True, False, True, False])
    return (lambda a, b, c, d, e: flashloss.kto_loss(a, b, e, c, d)), [lp, lr, pk, rk, des]


def _lists(fn):
    def build(dt):
        s, r = rand(3, 4, seed=1, scale=2.0), rand(3, 4, seed=2, grad=False, scale=2.0)
        labels = torch.tensor([[3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 0.0, 2.0], [0.0, 2.0, 1.0, 0.0]])
        mask = torch.tensor([[True, True, True, True], [True, True, True, False], [True, True, False, False]])
        return (lambda s, r, y, m: fn(s, r, y, m)), [s, r, labels, mask]
    return build


def _pref(fn, n_args=4, **kw):
    def build(dt):
        vecs = _pref_vecs()[:n_args]
        return (lambda *v: fn(*v, **kw)), vecs
    return build


CASES = {
    "contrastive_lse": _contrastive_lse,
    "row_logsumexp": lambda dt: ((lambda x: flashloss.row_logsumexp(x)), [rand(3, 40, dtype=dt, scale=4.0)]),
    "token_logprobs": lambda dt: ((lambda h, w, t: flashloss.token_logprobs(h, w, t, outputs=("logp", "entropy",
                                                                                               "z_sum"))),
                                  list(_lm_inputs(dt))),
    "logprobs_from_logits": lambda dt: ((lambda x, t: flashloss.logprobs_from_logits(x, t)),
                                        [rand(2 * T_, V, dtype=dt, scale=3.0), _lm_inputs(dt)[2]]),
    "sequence_logprobs": lambda dt: ((lambda h, w, y: flashloss.sequence_logprobs(h.view(2, T_, H), w,
                                                                                  y.view(2, T_))[:2]),
                                     list(_lm_inputs(dt))),
    "linear_cross_entropy": lambda dt: ((lambda h, w, t: flashloss.linear_cross_entropy(h, w, t, label_smoothing=0.1,
                                                                                        z_loss=1e-3)),
                                        list(_lm_inputs(dt))),
    "focal_loss": lambda dt: ((lambda h, w, t: flashloss.focal_loss(h, w, t)), list(_lm_inputs(dt))),
    "vocab_kl": lambda dt: ((lambda h, w, th, tw, t: flashloss.vocab_kl(h, w, th, tw, t)),
                            [*_lm_inputs(dt)[:2], rand(2 * T_, H, dtype=dt, grad=False, seed=5),
                             rand(V, H, dtype=dt, grad=False, seed=6), _lm_inputs(dt)[2]]),
    "info_nce": lambda dt: _pair(flashloss.info_nce, dt, temperature=0.1),
    "margin_nce": lambda dt: _pair(flashloss.margin_nce, dt, kind="angular"),
    "moco_loss": lambda dt: ((lambda q, kp, qu: flashloss.moco_loss(q, kp, qu)),
                             [rand(N, D, dtype=dt), rand(N, D, dtype=dt, seed=1, grad=False),
                              rand(9, D, dtype=dt, seed=2, grad=False)]),
    "mnrl_loss": lambda dt: ((lambda a, p, n: flashloss.mnrl_loss(a, p, n)),
                             [rand(N, D, dtype=dt), rand(N, D, dtype=dt, seed=1), rand(N, D, dtype=dt, seed=2)]),
    "clip_loss": lambda dt: ((lambda a, b, s, c: flashloss.clip_loss(a, b, s, c)),
                             [rand(N, D, dtype=dt), rand(N, D, dtype=dt, seed=1),
                              torch.tensor(2.5, dtype=dt, requires_grad=True),
                              torch.tensor(-0.3, dtype=dt, requires_grad=True)]),
    "siglip_loss": lambda dt: ((lambda a, b, s, c: flashloss.siglip_loss(a, b, s, c)),
                               [rand(N, D, dtype=dt), rand(N, D, dtype=dt, seed=1),
                                torch.tensor(2.5, dtype=dt, requires_grad=True),
                                torch.tensor(-1.0, dtype=dt, requires_grad=True)]),
    "nt_xent": lambda dt: _pair(flashloss.nt_xent, dt, temperature=0.2),
    "supcon_loss": lambda dt: ((lambda e, y: flashloss.supcon_loss(e, y)),
                               [rand(N, D, dtype=dt), torch.tensor([0, 1, 0, 2, 1, 3])]),
    "dcl_loss": lambda dt: _pair(flashloss.dcl_loss, dt, weight_sigma=0.5),
    "debiased_contrastive_loss": lambda dt: _pair(flashloss.debiased_contrastive_loss, dt),
    "hard_negative_loss": lambda dt: _pair(flashloss.hard_negative_loss, dt),
    "align_uniform_loss": lambda dt: _pair(flashloss.align_uniform_loss, dt),
    "soft_target_nce": lambda dt: ((lambda q, k, e: flashloss.soft_target_nce(q, k, target_embeddings=e,
                                                                              temperature=0.2)),
                                   [rand(N, D, dtype=dt), rand(N, D, dtype=dt, seed=1),
                                    rand(N, 3, dtype=dt, seed=2, grad=False)]),
    "hard_negative_nce": lambda dt: _pair(flashloss.hard_negative_nce, dt, num_negatives=2, temperature=0.5),
    "dexml_loss": lambda dt: ((lambda q, k, p: flashloss.dexml_loss(q, k, p, temperature=0.3)),
                              [rand(N, D, dtype=dt), rand(N + 2, D, dtype=dt, seed=1),
                               torch.tensor([[0, 1], [2, -1], [3, 7], [-1, -1], [4, 5], [6, -1]])]),
    "isogclr_loss": lambda dt: ((lambda a, b, ti, tt: flashloss.isogclr_loss(a, b, ti, tt)),
                                [rand(N, D, dtype=dt), rand(N, D, dtype=dt, seed=1),
                                 torch.full((N,), 0.1, dtype=dt, requires_grad=True),
                                 torch.full((N,), 0.2, dtype=dt, requires_grad=True)]),
    "ISogCLRLoss": _isogclr_module,
    "distill_clip_loss": lambda dt: ((lambda a, b, s, c, d: flashloss.distill_clip_loss(a, b, s, c, d, 3.0)),
                                     [rand(N, D, dtype=dt), rand(N, D, dtype=dt, seed=1),
                                      torch.tensor(2.0, dtype=dt, requires_grad=True),
                                      rand(N, 3, dtype=dt, seed=2, grad=False), rand(N, 3, dtype=dt, seed=3, grad=False)]),
    "similarity_kl_loss": lambda dt: ((lambda a, b, c, d: flashloss.similarity_kl_loss(
        a, b, c, d, student_scale=2.0, teacher_scale=3.0, symmetric=True)),
        [rand(N, D, dtype=dt), rand(N, D, dtype=dt, seed=1), rand(N, 3, dtype=dt, seed=2, grad=False),
         rand(N, 3, dtype=dt, seed=3, grad=False)]),
    "preference_loss": lambda dt: ((lambda *v: flashloss.preference_loss(
        *v, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], chosen_lengths=torch.tensor([3, 5, 9, 4]),
        rejected_lengths=torch.tensor([2, 6, 7, 4]))), _pref_vecs()),
    "dpo_loss": _pref(flashloss.dpo_loss, label_smoothing=0.1, loss_type="robust"),
    "ipo_loss": _pref(flashloss.ipo_loss, chosen_lengths=torch.tensor([3, 5, 9, 4]),
                      rejected_lengths=torch.tensor([2, 6, 7, 4])),
    "simpo_loss": _pref(flashloss.simpo_loss, n_args=2),
    "cpo_loss": lambda dt: ((lambda a, b, c: flashloss.cpo_loss(a, b, c, loss_type="hinge")),
                            _pref_vecs()[:2] + [torch.tensor(2.3, requires_grad=True)]),
    "alphapo_loss": _pref(flashloss.alphapo_loss, n_args=2, alpha=0.1),
    "orpo_loss": lambda dt: ((lambda a, b: flashloss.orpo_loss(a, b, chosen_lengths=torch.tensor([3, 5, 9, 4]),
                                                               rejected_lengths=torch.tensor([2, 6, 7, 4]))),
                             _pref_vecs()[:2]),
    "kto_loss": _kto,
    "bco_loss": lambda dt: ((lambda a, b, d: flashloss.bco_loss(a, b, d)),
                            [*_pref_vecs()[:2], torch.tensor([True, False, False, True])]),
    "npo_loss": _pref(flashloss.npo_loss, n_args=2),
    "tdpo_loss": lambda dt: ((lambda *v: flashloss.tdpo_loss(*v)), _pref_vecs() + [rand(4, seed=8).abs(),
                                                                                  rand(4, seed=9).abs()]),
    "lipo_lambda_loss": _lists(flashloss.lipo_lambda_loss),
    "plackett_luce_loss": _lists(flashloss.plackett_luce_loss),
    "bradley_terry_loss": _pref(flashloss.bradley_terry_loss, n_args=2, center_rewards_coefficient=0.01),
    "FusedLinearPreferenceLoss": _fused,
    "ClipLoss": lambda dt: ((lambda a, b, s: flashloss.ClipLoss()(a, b, s)),
                            [rand(N, D, dtype=dt), rand(N, D, dtype=dt, seed=1),
                             torch.tensor(2.5, dtype=dt, requires_grad=True)]),
    "DistillClipLoss": lambda dt: ((lambda a, b, s, c, d: flashloss.DistillClipLoss()(a, b, s, c, d, 3.0)),
                                   [rand(N, D, dtype=dt), rand(N, D, dtype=dt, seed=1),
                                    torch.tensor(2.0, dtype=dt, requires_grad=True),
                                    rand(N, 3, dtype=dt, seed=2, grad=False),
                                    rand(N, 3, dtype=dt, seed=3, grad=False)]),
    "SigLipLoss": lambda dt: ((lambda a, b, s, c: flashloss.SigLipLoss()(a, b, s, c)),
                              [rand(N, D, dtype=dt), rand(N, D, dtype=dt, seed=1),
                               torch.tensor(2.5, dtype=dt, requires_grad=True),
                               torch.tensor(-1.0, dtype=dt, requires_grad=True)]),
    "NTXentLoss": lambda dt: ((lambda e, y: flashloss.NTXentLoss()(e, y)),
                              [rand(N, D, dtype=dt), torch.tensor([0, 1, 0, 2, 1, 2])]),
    "SupConLoss": lambda dt: ((lambda e, y: flashloss.SupConLoss()(e, y)),
                              [rand(N, D, dtype=dt), torch.tensor([0, 1, 0, 2, 1, 3])]),
    # ---- sorting (primitive C)
    "sort_network": lambda dt: ((lambda x, w: flashloss.sort_network(x, "bitonic", "cauchy", 3.0, return_P=True,
                                                                     position_weights=w)),
                                [rand(3, 6, dtype=dt), rand(6, 2, dtype=dt, seed=1)]),
    "DiffSortNet": lambda dt: ((lambda x: flashloss.DiffSortNet("odd_even", 5, steepness=4.0)(x)), [rand(3, 5, dtype=dt)]),
    "permutation_loss": lambda dt: ((lambda x, t: flashloss.permutation_loss(
        flashloss.sort_network(x, steepness=4.0, return_P=True).P, t)), [rand(3, 5, dtype=dt), rand(3, 5, seed=2,
                                                                                                    grad=False)]),
    "groco_loss": lambda dt: ((lambda a, b: flashloss.groco_loss([a, b], topk_neg=3)),
                              [rand(N, D, dtype=dt), rand(N, D, dtype=dt, seed=1)]),
    "soft_rank": lambda dt: ((lambda x: flashloss.soft_rank(x, steepness=2.0)), [rand(3, 7, dtype=dt)]),
    "spearman_loss": lambda dt: ((lambda x, t: flashloss.spearman_loss(x, t, steepness=2.0)),
                                 [rand(3, 7, dtype=dt), rand(3, 7, seed=3, grad=False)]),
    "neural_sort": lambda dt: ((lambda s: flashloss.neural_sort(s, tau=0.5)), [rand(3, 5, dtype=dt)]),
    "neural_ndcg": lambda dt: ((lambda s, y: flashloss.neural_ndcg(s, y, k=3)),
                               [rand(2, 5, dtype=dt), torch.tensor([[2.0, 0.0, 1.0, 3.0, 0.0],
                                                                    [1.0, 0.0, 2.0, -1.0, -1.0]])]),
}


def loss_names() -> set[str]:
    """Every public name of flashloss that is a loss (what CASES must cover)."""
    return {n for n in flashloss.__all__ if n not in NOT_LOSSES and n not in EXCLUDED}
