"""The sorting objectives (OBJECTIVES.md §4.4-4.8) against their anchors: DiffSortNet against the
`diffsort` package (values, P and gradients with random upstreams), GroCo against a dense float64
transcription of ninatu/learning_by_sorting `losses/groco.py` (`GroCo.compute_loss`), NeuralSort /
Sinkhorn / NeuralNDCG against a float64 transcription of allRank's `loss_utils.py` and
`neuralNDCG.py` (allRank 1.4.3 pins torch <= 1.8 and imports torchvision, scikit-learn and gcsfs, so
it is not installed), the permutation loss against torch BCELoss on diffsort's ground truth, soft
ranks and the soft Spearman loss against the dense P of flashloss.ref. Backends: "torch" and "auto"
(whatever is registered for the CPU); every comparison in fp32 (tolerance 1e-5) and float64."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import flashloss
from anchors import require_anchor
from flashloss import sorting
from flashloss.ref import sorting as ref_sorting
from helpers import assert_memory_at_most_linear, check_against_reference, memory_growth_exponent, rel_err

BACKENDS = ["torch", "auto"]
RELAXATIONS = ["logistic", "logistic_phi", "gaussian", "reciprocal", "cauchy", "optimal"]
NETWORKS = ["odd_even", "bitonic"]
SIZES = [2, 3, 7, 11, 16, 33, 64]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The shapes here are tiny: thousands of small ops per network. On a loaded 2-core machine
    OpenMP's thread hand-offs made them 10-30x slower than one thread; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_anchors_required_under_make_test():
    """`make test` installs diffsort and sets FLASHLOSS_REQUIRE_ANCHORS=1: then it must import."""
    if os.environ.get("FLASHLOSS_REQUIRE_ANCHORS") != "1":
        pytest.skip("FLASHLOSS_REQUIRE_ANCHORS is not 1 (outside `make test`)")
    import diffsort  # noqa: F401  (an ImportError fails the test)


# ------------------------------------------------------------------------------ DiffSortNet vs diffsort


# every network x relaxation x n through "auto" (what users get); "torch" named explicitly on cauchy
DIFFSORT_PARAMS = [(net, rel, n, "auto") for net in NETWORKS for rel in RELAXATIONS for n in SIZES] + [
    (net, "cauchy", n, "torch") for net in NETWORKS for n in SIZES]


@pytest.mark.parametrize("network,relaxation,n,backend", DIFFSORT_PARAMS)
def test_diffsortnet_matches_diffsort(network, relaxation, n, backend):
    diffsort = require_anchor("diffsort", "the DiffSortNet anchor")
    x = randn(3, n, seed=n)

    def ours(v):
        return flashloss.DiffSortNet(network, n, distribution=relaxation, backend=backend)(v)

    def anchor(v):
        return diffsort.DiffSortNet(network, n, distribution=relaxation)(v)

    # naive=anchor: diffsort's own fp32 error sets the bar where the gradient is conditioning-limited
    # (long networks, steep relaxations: helpers.assert_close allows 8x plain PyTorch's fp32 error there)
    check_against_reference(ours, anchor, [x], torch.float32, naive=anchor, name=f"{network} {relaxation} n={n} fp32")
    # float64: diffsort's gaussian backward divides by sigma stored as a float32 tensor (1e-8 relative)
    tol = 1e-7 if relaxation == "gaussian" else None
    check_against_reference(ours, anchor, [x], torch.float64, tol=tol, name=f"{network} {relaxation} n={n} fp64")


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("relaxation", RELAXATIONS)
def test_torch_backend_sorted_values_are_bit_exact_with_diffsort(network, relaxation):
    """The torch backend writes alpha and each comparator's min / max with diffsort's expressions
    (docs/DECISIONS.md), so its fp32 sorted values equal diffsort's bit for bit; P is only close
    (diffsort multiplies layer matrices)."""
    diffsort = require_anchor("diffsort", "the DiffSortNet anchor")
    for n in (2, 7, 16, 33):
        x = randn(16, n, seed=n, dtype=torch.float32)
        theirs, _ = diffsort.DiffSortNet(network, n, steepness=5.0, distribution=relaxation)(x)
        ours = flashloss.sort_network(x, network, relaxation, 5.0, padding="diffsort", backend="torch").sorted
        assert torch.equal(ours, theirs), f"{network} {relaxation} n={n}: max diff {(ours - theirs).abs().max()}"


def test_diffsortnet_interpolation_type_and_positional_arguments():
    diffsort = require_anchor("diffsort", "the DiffSortNet anchor")
    x = randn(4, 7, seed=1)
    # diffsort's positional order: (type, size, device, steepness, art_lambda, interpolation_type, distribution)
    ours = flashloss.DiffSortNet("bitonic", 7, "cpu", 3.0, 0.5, "logistic_phi")
    theirs = diffsort.DiffSortNet("bitonic", 7, "cpu", 3.0, 0.5, "logistic_phi")
    assert ours.distribution == "logistic_phi" and ours.steepness == 3.0 and ours.art_lambda == 0.5
    for a, b in zip(ours(x), theirs(x)):
        assert rel_err(a, b) < 1e-12
    with pytest.raises(ValueError, match="two different distributions"):
        flashloss.DiffSortNet("odd_even", 4, interpolation_type="logistic", distribution="gaussian")


def test_diffsortnet_has_nothing_to_move():
    """No parameters, no buffers: .to()/.double()/.cuda() need nothing else moved (diffsort's pitfall
    was a sorting_network list that stayed on the device given at construction)."""
    m = flashloss.DiffSortNet("bitonic", 5, device="cuda")  # device is accepted and ignored
    assert list(m.parameters()) == [] and list(m.buffers()) == [] and m.state_dict() == {}
    x = randn(2, 5, seed=2)
    s0, P0 = m(x)
    m = m.to("cpu").double().float()
    s1, P1 = m(x)
    assert torch.equal(s0, s1) and torch.equal(P0, P1)
    m.sorting_network = [[t.to("cpu") for t in layer] for layer in m.sorting_network]  # anchor-style code runs
    assert m.sorting_network == []
    assert torch.allclose(s1, (x[:, None, :] @ P1)[:, 0], atol=1e-12)
    if torch.cuda.is_available():
        sc, Pc = m.cuda()(x.cuda())
        assert rel_err(sc, s0) < 1e-10 and rel_err(Pc, P0) < 1e-10


def test_diffsortnet_matches_diffsort_after_to():
    diffsort = require_anchor("diffsort", "the DiffSortNet anchor")
    x = randn(3, 11, seed=3)
    ours = flashloss.DiffSortNet("odd_even", 11).to(torch.device("cpu"))
    theirs = diffsort.DiffSortNet("odd_even", 11, device="cpu")
    for a, b in zip(ours(x), theirs(x)):
        assert rel_err(a, b) < 1e-12


def test_diffsortnet_padding_and_leading_dims():
    x = randn(2, 3, 22, seed=4)
    s, P = flashloss.DiffSortNet("bitonic", 22)(x)
    assert s.shape == (2, 3, 22) and P.shape == (2, 3, 22, 22)
    se, _ = flashloss.DiffSortNet("bitonic", 22, padding="exact", steepness=1e4)(x)
    assert torch.allclose(se, torch.sort(x, -1).values, atol=1e-3)  # exact padding sorts n = 22


def test_diffsortnet_bad_inputs():
    m = flashloss.DiffSortNet("odd_even", 6)
    with pytest.raises(ValueError, match="must be 6"):
        m(torch.randn(3, 5))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.arange(12).reshape(2, 6))
    with pytest.raises(TypeError):
        m([[1.0] * 6])
    with pytest.raises(ValueError, match="network must be one of"):
        flashloss.DiffSortNet("bubble", 6)
    with pytest.raises(ValueError, match="relaxation must be one of"):
        flashloss.DiffSortNet("odd_even", 6, distribution="softmax")
    with pytest.raises(ValueError, match="relaxation must be one of"):
        flashloss.DiffSortNet("odd_even", 6, distribution=None)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="steepness"):
            flashloss.DiffSortNet("odd_even", 6, steepness=bad)
    with pytest.raises(ValueError, match="size"):
        flashloss.DiffSortNet("odd_even", 0)
    with pytest.raises(ValueError, match="padding"):
        flashloss.DiffSortNet("odd_even", 6, padding="zeros")
    with pytest.raises(ValueError, match="backend"):
        flashloss.DiffSortNet("odd_even", 6, backend="gpu")


# ------------------------------------------------------------------------------ permutation loss


def _perm_target(t):
    # diffsort's experiments: one_hot(argsort(labels)).transpose(-2, -1)
    return F.one_hot(torch.argsort(t, dim=-1, stable=True), t.shape[-1]).transpose(-2, -1).to(torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("network,n", [("odd_even", 5), ("bitonic", 12), ("odd_even", 16)])
def test_permutation_loss_matches_bce_on_diffsort_ground_truth(network, n, backend):
    x = randn(4, n, seed=n)
    t = randn(4, n, seed=n + 1)
    t[0, :3] = 0.5  # ties: kept in index order

    def ours(v):
        _, P = flashloss.DiffSortNet(network, n, backend=backend)(v)
        return flashloss.permutation_loss(P, t, reduction="mean"), flashloss.permutation_loss(P, t, reduction="none")

    def reference(v):
        _, P = ref_sorting.sort_network(v, network, "cauchy", 10.0, padding="diffsort")
        Q = _perm_target(t)
        per_list = F.binary_cross_entropy(P, Q, reduction="none").mean((-2, -1))
        return torch.nn.BCELoss()(P, Q), per_list

    check_against_reference(ours, reference, [x], torch.float32, name=f"permutation_loss {network} n={n}")
    check_against_reference(ours, reference, [x], torch.float64, name=f"permutation_loss {network} n={n} fp64")
    _, P = flashloss.DiffSortNet(network, n)(x)
    assert torch.allclose(flashloss.permutation_loss(P, t, reduction="sum"),
                          flashloss.permutation_loss(P, t, reduction="none").sum())


def test_permutation_loss_clamps_the_log_like_bceloss():
    P = torch.eye(4, dtype=torch.float64)[[1, 0, 2, 3]][None].requires_grad_(True)  # two hard mistakes
    t = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    loss = flashloss.permutation_loss(P, t)
    Pr = P.detach().clone().requires_grad_(True)
    ref = torch.nn.BCELoss()(Pr, _perm_target(t))
    assert loss.item() == pytest.approx(ref.item()) and loss.item() == pytest.approx(4 * 100 / 16)
    loss.backward()
    ref.backward()
    assert torch.isfinite(P.grad).all() and torch.allclose(P.grad, Pr.grad)


def test_permutation_loss_bad_inputs():
    with pytest.raises(ValueError, match="P must be"):
        flashloss.permutation_loss(torch.rand(2, 4, 4), torch.rand(2, 5))
    with pytest.raises(ValueError, match="reduction"):
        flashloss.permutation_loss(torch.rand(2, 4, 4), torch.rand(2, 4), reduction="avg")
    with pytest.raises(TypeError):
        flashloss.permutation_loss(torch.rand(2, 4, 4).long(), torch.rand(2, 4))


# ------------------------------------------------------------------------------ GroCo


def groco_oracle(views, n_pos=None, k=10, relaxation="cauchy", steepness=1.0, stop_grad=True, sorter=None,
                 per_sample=False):
    """ninatu/learning_by_sorting GroCo.forward / compute_loss (distributed=False), dense and in
    float64: cosine similarities with norms floored at 1e-8, the B x B similarity matrix of the
    anchor view with the diagonal at -inf, topk + flip, cat(neg, pos), dense P from a relaxed
    odd-even sort, P summed over the negative and the positive ranks, clipped, two BCELoss terms
    averaged, mean over anchor views. `per_sample` gives the per-sample terms instead (mean over
    anchor views of each sample's mean BCE over its n entries, the two terms averaged)."""
    n_augs = len(views)
    n_pos = n_augs if n_pos is None else n_pos
    if sorter is None:
        def sorter(x):
            return ref_sorting.sort_network(x, "odd_even", relaxation, steepness, 0.25)[1]

    def norm(a, eps=1e-8):
        return a / torch.max(a.norm(dim=1)[:, None], eps * torch.ones_like(a.norm(dim=1)[:, None]))

    total = 0
    for a in range(n_augs):
        anchor = views[a].double()
        positives = [views[p].double() for p in range(n_pos) if p != a]
        pos_sims = torch.stack([(norm(anchor) * norm(p.detach() if stop_grad else p)).sum(1) for p in positives], 1)
        negatives = anchor
        neg_sims = norm(anchor) @ norm(negatives.detach() if stop_grad else negatives).T
        neg_sims = neg_sims.masked_fill(torch.eye(len(anchor), dtype=torch.bool), -float("inf"))
        pos_sims, _ = torch.sort(pos_sims, dim=1)
        neg_sims, _ = torch.topk(neg_sims, k=k, dim=1)
        neg_sims = torch.flip(neg_sims, dims=[1])
        sims = torch.cat((neg_sims, pos_sims), dim=1)
        P = sorter(sims)
        targets = torch.arange(sims.shape[1])[None].repeat(sims.shape[0], 1)
        perm_target = F.one_hot(torch.argsort(targets, dim=-1)).transpose(-2, -1).double()
        pred_neg = torch.clip(P[:, :, :k].sum(dim=2, keepdim=True), 0, 1)
        pred_pos = torch.clip(P[:, :, k:].sum(dim=2, keepdim=True), 0, 1)
        tgt_neg = torch.clip(perm_target[:, :, :k].sum(dim=2, keepdim=True), 0, 1)
        tgt_pos = torch.clip(perm_target[:, :, k:].sum(dim=2, keepdim=True), 0, 1)
        if per_sample:
            term = (F.binary_cross_entropy(pred_pos, tgt_pos, reduction="none").mean((1, 2))
                    + F.binary_cross_entropy(pred_neg, tgt_neg, reduction="none").mean((1, 2))) / 2
        else:
            term = (torch.nn.BCELoss()(pred_pos, tgt_pos) + torch.nn.BCELoss()(pred_neg, tgt_neg)) / 2
        total = total + term
    return total / n_augs


GROCO_CONFIGS = [
    # (batch, dim, views, positive views, k, stop_grad, relaxation, steepness)
    (7, 5, 2, None, 3, True, "cauchy", 1.0),
    (33, 16, 2, None, 10, True, "cauchy", 1.0),
    (40, 8, 3, None, 10, False, "cauchy", 1.0),
    (29, 12, 4, 2, 6, True, "cauchy", 1.0),  # multi-crop: views 3, 4 sort n_pos + k = 8 values
    (20, 6, 2, None, 5, True, "logistic", 4.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", GROCO_CONFIGS, ids=lambda c: f"B{c[0]}-V{c[2]}-Vp{c[3]}-k{c[4]}-sg{int(c[5])}-{c[6]}")
def test_groco_matches_dense_oracle(cfg, backend, monkeypatch):
    bsz, dim, n_views, n_pos, k, stop_grad, relaxation, steep = cfg
    # small tiles, so the row-blocked top-k selection and gathered dot products run several blocks
    monkeypatch.setattr(sorting, "GROCO_TILE_ELEMS", 5 * bsz)
    monkeypatch.setattr(sorting, "GROCO_GATHER_ELEMS", 3 * k * dim)
    views = [randn(bsz, dim, seed=10 + v) for v in range(n_views)]

    def ours(*vs):
        kw = dict(num_positive_views=n_pos, topk_neg=k, stop_grad=stop_grad, relaxation=relaxation,
                  steepness=steep, backend=backend)
        return flashloss.groco_loss(list(vs), **kw), flashloss.groco_loss(list(vs), reduction="none", **kw)

    def oracle(*vs):
        kw = dict(n_pos=n_pos, k=k, relaxation=relaxation, steepness=steep, stop_grad=stop_grad)
        return groco_oracle(list(vs), **kw), groco_oracle(list(vs), per_sample=True, **kw)

    check_against_reference(ours, oracle, views, torch.float32, name=f"groco {cfg} fp32")
    check_against_reference(ours, oracle, views, torch.float64, name=f"groco {cfg} fp64")


def test_groco_matches_oracle_with_diffsort_sorter():
    """The oracle with the anchor's own sorter (diffsort.DiffSortNet, odd_even, cauchy, steepness 1)."""
    diffsort = require_anchor("diffsort", "GroCo's sorter")
    views = [randn(24, 10, seed=20 + v) for v in range(2)]
    sorter = diffsort.DiffSortNet("odd_even", 11, steepness=1, interpolation_type="cauchy")

    def oracle(*vs):
        return groco_oracle(list(vs), sorter=lambda x: sorter(x)[1])

    check_against_reference(lambda *vs: flashloss.groco_loss(list(vs)), oracle, views, torch.float32,
                            name="groco vs diffsort sorter")


def test_groco_tensor_input_reductions_and_gradient_flow():
    views = randn(2, 16, 8, seed=5).float().requires_grad_(True)
    loss = flashloss.groco_loss(views, topk_neg=4)
    per = flashloss.groco_loss(views, topk_neg=4, reduction="none")
    assert per.shape == (16,) and torch.allclose(loss, per.mean()) and torch.allclose(
        flashloss.groco_loss(views, topk_neg=4, reduction="sum"), per.sum())
    loss.backward()
    assert torch.isfinite(views.grad).all() and views.grad.abs().sum() > 0


def test_groco_bad_inputs():
    v = [torch.randn(8, 4), torch.randn(8, 4)]
    with pytest.raises(ValueError, match="topk_neg"):
        flashloss.groco_loss(v, topk_neg=8)
    with pytest.raises(ValueError, match="at least 2 views"):
        flashloss.groco_loss(v[:1])
    with pytest.raises(ValueError, match="num_positive_views"):
        flashloss.groco_loss(v, num_positive_views=3, topk_neg=2)
    with pytest.raises(ValueError, match="shape"):
        flashloss.groco_loss([v[0], torch.randn(8, 5)], topk_neg=2)
    with pytest.raises(TypeError, match="dtype"):
        flashloss.groco_loss([v[0], v[1].long()], topk_neg=2)
    with pytest.raises(ValueError, match="relaxation"):
        flashloss.groco_loss(v, topk_neg=2, relaxation="softmax")
    with pytest.raises(ValueError, match="steepness"):
        flashloss.groco_loss(v, topk_neg=2, steepness=0.0)


@pytest.mark.slow
def test_groco_extra_memory_grows_linearly_in_batch():
    """The B x B similarity matrix is never formed: peak extra memory of forward+backward grows at
    most linearly in B (D = 128, k = 10, two views); the dense anchor path grows quadratically."""
    def make(backend):
        return lambda n: {"n": n, "backend": backend}

    p = assert_memory_at_most_linear("sorting_memory_targets:groco_fwd_bwd", make("torch"), 2048, 8192,
                                     floor_bytes=1 << 20)
    p_naive = memory_growth_exponent("sorting_memory_targets:groco_fwd_bwd", make("naive"), 2048, 8192,
                                     floor_bytes=1 << 20)
    assert p_naive > 1.7, (p, p_naive)


# ------------------------------------------------------------------------------ soft rank, Spearman


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("network,padding,n", [("odd_even", "exact", 9), ("bitonic", "exact", 13),
                                               ("bitonic", "diffsort", 12), ("odd_even", "exact", 1)])
def test_soft_rank_matches_dense_P(network, padding, n, backend):
    x = randn(5, n, seed=n)

    def ours(v):
        return flashloss.soft_rank(v, network, "cauchy", 5.0, padding=padding, backend=backend)

    def reference(v):
        _, P = ref_sorting.sort_network(v, network, "cauchy", 5.0, padding=padding)
        return P @ torch.arange(n, dtype=v.dtype)

    check_against_reference(ours, reference, [x], torch.float32, name=f"soft_rank {network} {padding} n={n}")
    check_against_reference(ours, reference, [x], torch.float64, name=f"soft_rank {network} {padding} n={n} fp64")
    hard = flashloss.soft_rank(x, network, steepness=1e5, padding=padding)  # cauchy's heavy tails: ~1e-3 off
    assert torch.equal(hard.round(), x.argsort(-1).argsort(-1).double())


def _average_ranks_loop(t):
    out = torch.empty(t.shape, dtype=torch.float64)
    for b in range(t.shape[0]):
        vals = t[b].tolist()
        for i, v in enumerate(vals):
            less = sum(1 for u in vals if u < v)
            equal = sum(1 for u in vals if u == v)
            out[b, i] = less + (equal - 1) / 2
    return out


def spearman_oracle(pred, target, per_list=False, steepness=10.0):
    """OBJECTIVES.md §4.8 in float64: soft ranks from the dense P, average ranks of the target,
    centred, normalised, 1 - <., .>; lists with a constant target excluded from the mean."""
    _, P = ref_sorting.sort_network(pred, "odd_even", "cauchy", steepness)
    rho = P @ torch.arange(pred.shape[1], dtype=pred.dtype)
    r = _average_ranks_loop(target)
    rho_c, r_c = rho - rho.mean(1, keepdim=True), r - r.mean(1, keepdim=True)
    loss = 1 - (rho_c * r_c).sum(1) / (rho_c.norm(dim=1) * r_c.norm(dim=1).clamp_min(1e-300))
    valid = r_c.norm(dim=1) > 0
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss if per_list else loss.sum() / valid.sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_spearman_loss_matches_oracle(backend):
    pred = randn(6, 10, seed=7)
    target = torch.randint(0, 4, (6, 10), generator=torch.Generator().manual_seed(8)).double()  # many ties
    target[5] = 2.0  # constant target: no ranking, left out of the mean

    def ours(p):
        return (flashloss.spearman_loss(p, target, backend=backend),
                flashloss.spearman_loss(p, target, reduction="none", backend=backend))

    def oracle(p):
        return spearman_oracle(p, target), spearman_oracle(p, target, per_list=True)

    check_against_reference(ours, oracle, [pred], torch.float32, name="spearman fp32")
    check_against_reference(ours, oracle, [pred], torch.float64, name="spearman fp64")
    assert sorting._average_ranks(target).tolist() == _average_ranks_loop(target).tolist()
    # a perfect prediction with hard ranks: loss ~ 0; reversed: ~ 2
    t = randn(3, 8, seed=9)
    assert flashloss.spearman_loss(t, t, steepness=1e5).item() == pytest.approx(0.0, abs=1e-6)
    assert flashloss.spearman_loss(-t, t, steepness=1e5).item() == pytest.approx(2.0, abs=1e-6)


# ------------------------------------------------------------------------------ NeuralSort, NeuralNDCG (allRank)


def allrank_neural_sort(s, tau, mask):
    """allRank loss_utils.deterministic_neural_sort, s [B, n, 1], float64, on the CPU."""
    n = s.size()[1]
    one = torch.ones((n, 1), dtype=s.dtype)
    s = s.masked_fill(mask[:, :, None], -1e8)
    A_s = torch.abs(s - s.permute(0, 2, 1))
    A_s = A_s.masked_fill(mask[:, :, None] | mask[:, None, :], 0.0)
    B = torch.matmul(A_s, torch.matmul(one, torch.transpose(one, 0, 1)))
    temp = [n - m + 1 - 2 * (torch.arange(n - m) + 1) for m in mask.squeeze(-1).sum(dim=1)]
    temp = [t.type(s.dtype) for t in temp]
    temp = [torch.cat((t, torch.zeros(n - len(t), dtype=s.dtype))) for t in temp]
    scaling = torch.stack(temp)
    s = s.masked_fill(mask[:, :, None], 0.0)
    C = torch.matmul(s, scaling.unsqueeze(-2))
    P_max = (C - B).permute(0, 2, 1)
    P_max = P_max.masked_fill(mask[:, :, None] | mask[:, None, :], -math.inf)
    P_max = P_max.masked_fill(mask[:, :, None] & mask[:, None, :], 1.0)
    return torch.softmax(P_max / tau, -1)


def allrank_sinkhorn(mat, mask=None, tol=1e-6, max_iter=50):
    if mask is not None:
        mat = mat.masked_fill(mask[:, None, :] | mask[:, :, None], 0.0)
        mat = mat.masked_fill(mask[:, None, :] & mask[:, :, None], 1.0)
    for _ in range(max_iter):
        mat = mat / mat.sum(dim=1, keepdim=True).clamp(min=1e-10)
        mat = mat / mat.sum(dim=2, keepdim=True).clamp(min=1e-10)
        if torch.max(torch.abs(mat.sum(dim=2) - 1.)) < tol and torch.max(torch.abs(mat.sum(dim=1) - 1.)) < tol:
            break
    if mask is not None:
        mat = mat.masked_fill(mask[:, None, :] | mask[:, :, None], 0.0)
    return mat


def allrank_dcg(y_pred, y_true, k):
    """allRank metrics.dcg(y_pred, y_true, ats=[k]) with the powered gain, padded items (-1) last."""
    y_true, y_pred = y_true.clone(), y_pred.clone()
    k = min(k, y_true.shape[1])
    mask = y_true == -1
    y_pred[mask] = float("-inf")
    y_true[mask] = 0.0
    _, idx = y_pred.sort(descending=True, dim=-1)
    true_sorted = torch.gather(y_true, 1, idx)
    discounts = 1.0 / torch.log2(torch.arange(true_sorted.shape[1], dtype=torch.float64) + 2.0)
    gains = torch.pow(2, true_sorted) - 1
    return torch.cumsum((gains * discounts)[:, :k], dim=1)[:, k - 1]


def allrank_neural_ndcg(y_pred, y_true, k=None, tau=1.0, transposed=False, per_list=False):
    """allRank neuralNDCG / neuralNDCG_transposed (deterministic, powered relevancies), float64;
    per_list: the per-list -NDCG (0 where IDCG = 0) instead of the mean."""
    k = y_true.shape[1] if k is None else k
    mask = y_true == -1
    P_hat = allrank_neural_sort(y_pred.unsqueeze(-1), tau, mask).unsqueeze(0)
    P_hat = allrank_sinkhorn(P_hat.view(-1, P_hat.shape[2], P_hat.shape[3]), mask, tol=1e-6, max_iter=50)[None]
    discounts = 1.0 / torch.log2(torch.arange(y_true.shape[-1], dtype=torch.float64) + 2.0)
    idcg = allrank_dcg(y_true, y_true, k)[None]  # [1, B]
    if transposed:
        discounts[k:] = 0.0
        exp_disc = torch.matmul(P_hat.permute(0, 1, 3, 2), discounts[None, None, :, None]).squeeze(-1)
        ndcg = ((torch.pow(2.0, y_true) - 1)[None] * exp_disc).sum(dim=2) / (idcg + 1e-10)
    else:
        P_hat = P_hat.masked_fill(mask[None, :, :, None] | mask[None, :, None, :], 0.0)
        gains = torch.pow(2.0, y_true.masked_fill(mask, 0.0)) - 1.0
        ground_truth = torch.matmul(P_hat, gains[None, :, :, None]).squeeze(-1)
        ndcg = (ground_truth * discounts)[:, :, :k].sum(dim=-1) / (idcg + 1e-10)
    idcg_mask = idcg == 0.0
    ndcg = ndcg.masked_fill(idcg_mask, 0.0)
    if per_list:
        return -ndcg[0]
    if idcg_mask.all():
        return ndcg.sum() * 0
    return -ndcg.sum() / (~idcg_mask).sum()


def _ranking_batch():
    scores = randn(6, 8, seed=11)
    labels = torch.tensor([
        [2, 0, 1, 3, 0, 1, 0, 2],
        [1, 0, 2, 0, 1, -1, -1, -1],   # padded tail
        [0, 0, 0, 0, 0, 0, 0, 0],      # IDCG 0: left out of the mean
        [0, 0, 0, -1, -1, -1, -1, -1],  # IDCG 0 with padding
        [4, 3, 2, 1, 0, 0, 1, -1],
        [1, -1, -1, -1, -1, -1, -1, -1],  # one valid item
    ], dtype=torch.float64)
    return scores, labels


def test_neural_sort_and_sinkhorn_match_allrank():
    scores, labels = _ranking_batch()
    mask = labels == -1
    for tau in (1.0, 0.3):
        def ours(s):
            P = flashloss.neural_sort(s, tau, mask)
            return P, sorting.sinkhorn_scaling(P, mask)

        def reference(s):
            P = allrank_neural_sort(s.unsqueeze(-1), tau, mask)
            return P, allrank_sinkhorn(P, mask)

        check_against_reference(ours, reference, [scores], torch.float32, name=f"neural_sort tau={tau}")
        check_against_reference(ours, reference, [scores], torch.float64, name=f"neural_sort tau={tau} fp64")
    # without a mask: rows are descending ranks, P_hat @ s -> sorted descending as tau -> 0
    s = torch.randperm(6, generator=torch.Generator().manual_seed(12)).double().repeat(3, 1)
    P = flashloss.neural_sort(s, tau=1e-2)
    assert torch.allclose(P @ s[..., None], s.sort(-1, descending=True).values[..., None], atol=1e-6)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("k", [None, 3, 20])
def test_neural_ndcg_matches_allrank(k, transposed):
    scores, labels = _ranking_batch()

    def ours(s):
        return (flashloss.neural_ndcg(s, labels, k=k, transposed=transposed),
                flashloss.neural_ndcg(s, labels, k=k, transposed=transposed, reduction="none"))

    def reference(s):
        return (allrank_neural_ndcg(s, labels, k=k, transposed=transposed),
                allrank_neural_ndcg(s, labels, k=k, transposed=transposed, per_list=True))

    check_against_reference(ours, reference, [scores], torch.float32, name=f"neural_ndcg k={k} T={transposed}")
    check_against_reference(ours, reference, [scores], torch.float64, name=f"neural_ndcg k={k} T={transposed} fp64")
    per = flashloss.neural_ndcg(scores, labels, k=k, transposed=transposed, reduction="none")
    assert per[2] == 0 and per[3] == 0
    assert torch.allclose(flashloss.neural_ndcg(scores, labels, k=k, transposed=transposed), per.sum() / 4)


def test_neural_ndcg_edge_cases():
    # every list without a relevant item: 0, not NaN, and a zero gradient
    s = randn(2, 4, seed=13).requires_grad_(True)
    loss = flashloss.neural_ndcg(s, torch.tensor([[0.0, 0, 0, -1], [0, 0, 0, 0]]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s.grad))
    # a well-separated correct ranking gives NDCG ~ 1 (allRank's own test: 1 - loss ~ ndcg)
    y = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert flashloss.neural_ndcg(torch.tensor([[30.0, 20.0, 10.0, 0.0]]), y).item() == pytest.approx(-1.0, abs=1e-4)
    with pytest.raises(ValueError, match="trailing"):
        flashloss.neural_ndcg(randn(1, 4), torch.tensor([[1.0, -1.0, 0.0, 2.0]]))
    with pytest.raises(ValueError, match="k must be"):
        flashloss.neural_ndcg(randn(1, 4), torch.tensor([[1.0, 0.0, 0.0, 2.0]]), k=0)
    with pytest.raises(ValueError, match="tau"):
        flashloss.neural_sort(randn(1, 4), tau=0.0)
    with pytest.raises(ValueError, match="shape"):
        flashloss.neural_ndcg(randn(1, 4), torch.tensor([[1.0, 0.0, 2.0]]))
