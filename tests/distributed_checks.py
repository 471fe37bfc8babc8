"""Checks that run inside every rank of a gloo process group (tests/test_distributed.py spawns the
ranks once per world size and turns each check into a pytest test).

Every rank builds the same global batch from fixed seeds, so each rank can compute the
single-process loss on the concatenated batch itself and compare. The DDP convention under test
(flashloss/distributed.py): the average over ranks of the returned losses is the single-process
loss; the gradient reaching rank r's embeddings is W times the single-process gradient of its rows;
the all-reduced gradient of a replicated scalar (logit_scale, logit_bias) divided by W is the
single-process gradient; a real DistributedDataParallel model gets the single-process gradients.

Run as: python distributed_checks.py RANK WORLD INIT_FILE OUT_JSON [CHECK ...]
"""
from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

import flashloss
import flashloss.distributed as fd
import flashloss.ops.contrastive_lse  # noqa: F401  (the module, for its TILE knob)
from flashloss.benchmark.anchors import open_clip_loss_module
from helpers import rel_err

CHECKS: dict = {}
F64 = torch.float64


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


# ---------------------------------------------------------------------------------------------
# helpers


def rank_world():
    return dist.get_rank(), dist.get_world_size()


def randn(*shape, seed, dtype=F64):
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def normed(n, d, seed, dtype=F64):
    return F.normalize(randn(n, d, seed=seed), dim=-1).to(dtype)


def uneven_sizes(world, base=3):
    return [base + (2 * r) % 5 for r in range(world)]  # 3, 5, 4, 6, ...


def rows_of(x, sizes, rank):
    off = sum(sizes[:rank])
    return x[off:off + sizes[rank]]


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def rank_mean(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def close(actual, expected, what, tol=1e-10):
    expected = expected.detach()
    if expected.norm() < 1e-12:  # analytically zero (a softmax loss's bias): absolute
        err = (actual.detach() - expected).abs().max().item()
    else:
        err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} (rank {dist.get_rank()})"


def expect_value_error(call, must_contain, what):
    try:
        call()
    except ValueError as exc:
        for text in must_contain:
            assert text in str(exc), f"{what}: message {str(exc)!r} lacks {text!r}"
        return str(exc)
    raise AssertionError(f"{what}: no ValueError on rank {dist.get_rank()}")


def compare_with_single(what, single_fn, dist_fn, sharded: dict, replicated: dict, rows: list,
                        reductions=("mean", "sum", "none"), tol=1e-10, open_clip_local_mean=False):
    """single_fn(**global inputs, reduction=...) on the concatenated batch against
    dist_fn(**this rank's inputs, reduction=...). sharded: {name: (global tensor, rows per rank)};
    replicated: {name: tensor} (the same on every rank); rows: rows per rank of the loss terms.
    Convention: 'mean' / 'sum': the rank average of the values is the single value, local
    gradients are W x the single gradient rows, all-reduced scalar gradients / W are the single
    gradient; 'none': this rank's terms, and under random upstream weights the gradients with
    factor 1 (the terms are not scaled)."""
    rank, world = rank_world()
    for reduction in reductions:
        g_in = {k: v for k, (v, _) in sharded.items()}
        g_in.update(replicated)
        g_in = {k: (leaf(v) if v.is_floating_point() else v) for k, v in g_in.items()}
        out = single_fn(**g_in, reduction=reduction)
        weights = randn(*out.shape, seed=99)
        objective = (out * weights).sum() if reduction == "none" else out
        float_names = [k for k, v in g_in.items() if v.is_floating_point()]
        grads = dict(zip(float_names, torch.autograd.grad(objective, [g_in[k] for k in float_names])))
        l_in = {k: rows_of(v, sizes, rank) for k, (v, sizes) in sharded.items()}
        l_in.update(replicated)
        l_in = {k: (leaf(v) if v.is_floating_point() else v) for k, v in l_in.items()}
        dout = dist_fn(**l_in, reduction=reduction)
        if reduction == "none":
            close(dout, rows_of(out, rows, rank), f"{what} 'none' terms", tol)
            (dout * rows_of(weights, rows, rank)).sum().backward()
            factor = 1.0
        else:
            close(rank_mean(dout), out, f"{what} '{reduction}': rank average of the losses", tol)
            if reduction == "mean" and open_clip_local_mean:  # equal batches: the local mean, open_clip's number
                terms = single_fn(**{k: v.detach() for k, v in g_in.items()}, reduction="none")
                close(dout, rows_of(terms, rows, rank).mean(), f"{what}: local mean", tol)
            dout.backward()
            factor = float(world)
        for k, (_, sizes) in sharded.items():
            if k in grads:
                close(l_in[k].grad / factor, rows_of(grads[k], sizes, rank), f"{what} '{reduction}': grad of {k}", tol)
        for k in replicated:
            if k in grads:
                total = l_in[k].grad.detach().clone()
                dist.all_reduce(total)
                close(total / factor, grads[k], f"{what} '{reduction}': all-reduced grad of {k}", tol)


# ---------------------------------------------------------------------------------------------
# CLIP and SigLIP against the single-process loss on the concatenated batch (uneven batches)


def _pair_inputs(sizes, d=6, seed=0):
    b = sum(sizes)
    return dict(image_features=(normed(b, d, seed + 1), sizes), text_features=(normed(b, d, seed + 2), sizes))


def _scalars(with_bias=True):
    out = dict(logit_scale=torch.tensor(9.0, dtype=F64))
    if with_bias:
        out["logit_bias"] = torch.tensor(-2.0, dtype=F64)
    return out


def _clip_vs_single(impl, sizes):
    compare_with_single(
        f"clip_loss impl={impl} sizes={sizes}",
        lambda reduction, **kw: flashloss.clip_loss(**kw, reduction=reduction),
        lambda reduction, **kw: fd.clip_loss(**kw, impl=impl, reduction=reduction),
        _pair_inputs(sizes), _scalars(), sizes)


def _siglip_vs_single(impl, sizes):
    compare_with_single(
        f"siglip_loss impl={impl} sizes={sizes}",
        lambda reduction, **kw: flashloss.siglip_loss(**kw, reduction=reduction),
        lambda reduction, **kw: fd.siglip_loss(**kw, impl=impl, reduction=reduction),
        _pair_inputs(sizes, seed=10), dict(logit_scale=torch.tensor(4.0, dtype=F64),
                                           logit_bias=torch.tensor(-3.0, dtype=F64)), sizes)


@check
def clip_ring_uneven_batches_equal_single_process():
    _clip_vs_single("ring", uneven_sizes(dist.get_world_size()))


@check
def clip_bidir_uneven_batches_equal_single_process():
    _clip_vs_single("bidir", uneven_sizes(dist.get_world_size()))


@check
def clip_gather_uneven_batches_equal_single_process():
    _clip_vs_single("gather", uneven_sizes(dist.get_world_size()))


@check
def clip_equal_batches_return_the_local_mean():
    world = dist.get_world_size()
    for impl in ("ring", "gather"):
        compare_with_single(f"clip_loss impl={impl} equal batches",
                            lambda reduction, **kw: flashloss.clip_loss(**kw, reduction=reduction),
                            lambda reduction, **kw: fd.clip_loss(**kw, impl=impl, reduction=reduction),
                            _pair_inputs([4] * world, seed=5), _scalars(with_bias=False), [4] * world,
                            reductions=("mean",), open_clip_local_mean=True)


@check
def siglip_ring_uneven_batches_equal_single_process():
    _siglip_vs_single("ring", uneven_sizes(dist.get_world_size()))


@check
def siglip_bidir_uneven_batches_equal_single_process():
    _siglip_vs_single("bidir", uneven_sizes(dist.get_world_size()))


@check
def siglip_gather_uneven_batches_equal_single_process():
    _siglip_vs_single("gather", uneven_sizes(dist.get_world_size()))


@check
def ring_float32_and_both_cpu_backends_across_tiles():
    """fp32 inputs (fp32 statistics on the wire) within the fp32 tolerance of the float64 single
    loss; the torch and cpu backends; tiles smaller than the blocks."""
    rank, world = rank_world()
    sizes = uneven_sizes(world, base=5)
    lse_module = sys.modules["flashloss.ops.contrastive_lse"]
    old = lse_module.TILE
    lse_module.TILE = 2
    try:
        for backend in ("torch", "cpu"):
            (img_g, _), (txt_g, _) = _pair_inputs(sizes, d=8, seed=20).values()
            img, txt = leaf(rows_of(img_g, sizes, rank).float()), leaf(rows_of(txt_g, sizes, rank).float())
            scale = leaf(torch.tensor(7.0))
            loss = fd.clip_loss(img, txt, scale, impl="ring", backend=backend)
            loss.backward()
            I, T, S = leaf(img_g), leaf(txt_g), leaf(torch.tensor(7.0, dtype=F64))
            L = flashloss.clip_loss(I, T, S)
            gI, gT, gS = torch.autograd.grad(L, (I, T, S))
            close(rank_mean(loss.double()), L, f"fp32 {backend}: loss", tol=1e-5)
            close(img.grad.double() / world, rows_of(gI, sizes, rank), f"fp32 {backend}: grad img", tol=1e-5)
            close(txt.grad.double() / world, rows_of(gT, sizes, rank), f"fp32 {backend}: grad txt", tol=1e-5)
            close(rank_mean(scale.grad.double()), gS, f"fp32 {backend}: grad scale", tol=1e-4)
    finally:
        lse_module.TILE = old


# ---------------------------------------------------------------------------------------------
# info_nce and supcon


def _nce_inputs(world, seed=30):
    q_sizes = uneven_sizes(world)
    k_sizes = [s + (r % 2) * 2 for r, s in enumerate(q_sizes)]  # M_r != N_r on odd ranks
    n, m = sum(q_sizes), sum(k_sizes)
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, m, (n,), generator=gen)  # positives on any rank
    targets[::4] = -100
    sharded = dict(q=(randn(n, 7, seed=seed + 1), q_sizes), k=(randn(m, 7, seed=seed + 2), k_sizes),
                   targets=(targets, q_sizes))
    return sharded, q_sizes


@check
def info_nce_equals_single_process_with_targets_on_any_rank():
    world = dist.get_world_size()
    for impl in ("ring", "bidir", "gather"):
        sharded, rows = _nce_inputs(world)
        compare_with_single(
            f"info_nce impl={impl}",
            lambda reduction, targets, **kw: flashloss.info_nce(kw["q"], kw["k"], targets, scale=kw["scale"],
                                                                bias=kw["bias"], reduction=reduction),
            lambda reduction, targets, **kw: fd.info_nce(kw["q"], kw["k"], targets, scale=kw["scale"], bias=kw["bias"],
                                                         impl=impl, reduction=reduction),
            sharded, dict(scale=torch.tensor(3.0, dtype=F64), bias=torch.tensor(0.5, dtype=F64)), rows)


@check
def info_nce_default_targets_pair_rows_of_the_same_rank():
    rank, world = rank_world()
    sizes = [4] * world
    q, k = randn(4 * world, 5, seed=40), randn(4 * world, 5, seed=41)
    L = flashloss.info_nce(q, k, temperature=0.5)
    for impl in ("ring", "gather"):
        loss = fd.info_nce(rows_of(q, sizes, rank), rows_of(k, sizes, rank), temperature=0.5, impl=impl)
        close(rank_mean(loss), L, f"info_nce default targets impl={impl}")


@check
def supcon_equals_single_process_with_positives_across_ranks():
    world = dist.get_world_size()
    sizes = uneven_sizes(world)
    n = sum(sizes)
    labels = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(50))
    labels[1] = 17  # an anchor without positives
    for impl in ("ring", "bidir", "gather"):
        for no_positive in ("exclude", "zero"):
            compare_with_single(
                f"supcon_loss impl={impl} no_positive={no_positive}",
                lambda reduction, **kw: flashloss.supcon_loss(**kw, no_positive=no_positive, temperature=0.2,
                                                              reduction=reduction),
                lambda reduction, **kw: fd.supcon_loss(**kw, no_positive=no_positive, temperature=0.2, impl=impl,
                                                       reduction=reduction),
                dict(embeddings=(randn(n, 6, seed=51), sizes), labels=(labels, sizes)), {}, sizes)


# ---------------------------------------------------------------------------------------------
# open_clip, run in the same process group, against flashloss


def _open_clip_grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


@check
def clip_gather_matches_open_clip_for_every_flag_combination():
    """open_clip's ClipLoss and flashloss (function and drop-in module) give the same value and the
    same gradients on every rank for all four (local_loss, gather_with_grad) combinations. For
    the combinations with gather_with_grad, DDP averaging gives the single-process gradient; for
    open_clip's default (False, False) the embeddings get 1/W of it while logit_scale gets all of it
    (documented in docs/DECISIONS.md, reproduced, not fixed)."""
    oc = open_clip_loss_module()
    rank, world = rank_world()
    sizes = [5] * world
    (img_g, _), (txt_g, _) = _pair_inputs(sizes, seed=60).values()
    I, T, S = leaf(img_g), leaf(txt_g), leaf(torch.tensor(8.0, dtype=F64))
    gI, gT, gS = torch.autograd.grad(flashloss.clip_loss(I, T, S), (I, T, S))
    for local_loss in (False, True):
        for with_grad in (False, True):
            tag = f"local_loss={local_loss} gather_with_grad={with_grad}"
            ref_in = [leaf(rows_of(img_g, sizes, rank)), leaf(rows_of(txt_g, sizes, rank)), leaf(S)]
            ref = oc.ClipLoss(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world)(*ref_in)
            ref_grads = _open_clip_grads(ref, ref_in)
            for ours_fn in ("function", "module"):
                ours_in = [leaf(t) for t in ref_in]
                if ours_fn == "function":
                    ours = fd.clip_loss(*ours_in, impl="gather", local_loss=local_loss, gather_with_grad=with_grad)
                else:
                    ours = flashloss.ClipLoss(local_loss=local_loss, gather_with_grad=with_grad, rank=rank,
                                              world_size=world)(*ours_in)
                close(ours, ref, f"{tag} {ours_fn}: value vs open_clip")
                for name, a, b in zip(("img", "txt", "scale"), torch.autograd.grad(ours, ours_in), ref_grads):
                    close(a, b, f"{tag} {ours_fn}: grad {name} vs open_clip")
            g_img, g_txt, g_scale = ref_grads
            close(rank_mean(g_scale), gS, f"{tag}: DDP-averaged logit_scale grad = single process")
            factor = world if with_grad else 1  # the embedding gradient open_clip produces
            if with_grad or not local_loss:
                close(g_img / factor, rows_of(gI, sizes, rank), f"{tag}: img grad = {factor} x single process")
                close(g_txt / factor, rows_of(gT, sizes, rank), f"{tag}: txt grad = {factor} x single process")


@check
def clip_ring_matches_open_clip_local_loss_gather_with_grad():
    oc = open_clip_loss_module()
    rank, world = rank_world()
    sizes = [4] * world
    (img_g, _), (txt_g, _) = _pair_inputs(sizes, seed=70).values()
    args = [leaf(rows_of(img_g, sizes, rank)), leaf(rows_of(txt_g, sizes, rank)),
            leaf(torch.tensor(11.0, dtype=F64)), leaf(torch.tensor(-1.0, dtype=F64))]
    ref = oc.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(*args)
    ref_grads = torch.autograd.grad(ref, args)
    for impl in ("ring", "bidir"):
        ours_in = [leaf(t) for t in args]
        ours = flashloss.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world,
                                  impl=impl)(*ours_in)
        close(ours, ref, f"ClipLoss(impl={impl}) value vs open_clip")
        ours_grads = torch.autograd.grad(ours, ours_in)
        for name, a, b in zip(("img", "txt"), ours_grads, ref_grads):
            close(a, b, f"ClipLoss(impl={impl}) grad {name} vs open_clip")
        # the ring splits logit_scale's gradient between ranks differently; the rank sums agree
        for name, a, b in zip(("scale", "bias"), ours_grads[2:], ref_grads[2:]):
            close(rank_mean(a), rank_mean(b), f"ClipLoss(impl={impl}) all-reduced grad {name} vs open_clip")


@check
def siglip_matches_open_clip_for_every_dist_impl():
    oc = open_clip_loss_module()
    rank, world = rank_world()
    sizes = [4] * world
    (img_g, _), (txt_g, _) = _pair_inputs(sizes, seed=80).values()
    args = [leaf(rows_of(img_g, sizes, rank)), leaf(rows_of(txt_g, sizes, rank)),
            leaf(torch.tensor(10.0, dtype=F64)), leaf(torch.tensor(-10.0, dtype=F64))]
    I, T, S, Bb = leaf(img_g), leaf(txt_g), leaf(args[2]), leaf(args[3])
    single_grads = torch.autograd.grad(flashloss.siglip_loss(I, T, S, Bb), (I, T, S, Bb))
    for dist_impl in ("bidir", "shift", "gather", "reduce"):
        ref = oc.SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)(*args)
        ref_grads = torch.autograd.grad(ref, args)
        ours_in = [leaf(t) for t in args]
        ours = flashloss.SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)(*ours_in)
        close(ours, ref, f"SigLipLoss(dist_impl={dist_impl}) value vs open_clip")
        ours_grads = torch.autograd.grad(ours, ours_in)
        for name, a, b in zip(("img", "txt"), ours_grads, ref_grads):
            close(a, b, f"SigLipLoss(dist_impl={dist_impl}) grad {name} vs open_clip")
        for name, a, b, s in zip(("scale", "bias"), ours_grads[2:], ref_grads[2:], single_grads[2:]):
            close(rank_mean(a), rank_mean(b), f"SigLipLoss(dist_impl={dist_impl}) all-reduced grad {name}")
            close(rank_mean(a), s, f"SigLipLoss(dist_impl={dist_impl}) DDP-averaged grad {name} = single")
        for name, a, s in zip(("img", "txt"), ours_grads, single_grads):
            close(a / world, rows_of(s, sizes, rank), f"SigLipLoss(dist_impl={dist_impl}) grad {name} = W x single")


# ---------------------------------------------------------------------------------------------
# DDP: a real DistributedDataParallel model gets the single-process gradient


class _Towers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(90)
        self.image = torch.nn.Linear(8, 6).double()
        self.text = torch.nn.Linear(8, 6).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.3, dtype=F64))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-1.5, dtype=F64))

    def forward(self, x_img, x_txt):
        return (F.normalize(self.image(x_img), dim=-1), F.normalize(self.text(x_txt), dim=-1),
                self.logit_scale.exp(), self.logit_bias)


@check
def ddp_model_gradients_equal_single_process():
    from torch.nn.parallel import DistributedDataParallel

    rank, world = rank_world()
    sizes = uneven_sizes(world)
    b = sum(sizes)
    x_img, x_txt = randn(b, 8, seed=91), randn(b, 8, seed=92)
    cases = [(loss, impl) for loss in ("clip", "siglip") for impl in ("ring", "bidir", "gather")]
    for loss_name, impl in cases:
        single_model = _Towers()
        model = DistributedDataParallel(copy.deepcopy(single_model))
        img, txt, scale, bias = model(rows_of(x_img, sizes, rank), rows_of(x_txt, sizes, rank))
        dist_fn = fd.clip_loss if loss_name == "clip" else fd.siglip_loss
        dist_fn(img, txt, scale, bias, impl=impl).backward()  # DDP averages the gradients here
        single_fn = flashloss.clip_loss if loss_name == "clip" else flashloss.siglip_loss
        single_fn(*single_model(x_img, x_txt)).backward()
        for (name, p), q in zip(model.module.named_parameters(), single_model.parameters()):
            close(p.grad, q.grad, f"DDP {loss_name} impl={impl}: gradient of {name}")


# ---------------------------------------------------------------------------------------------
# errors: raised on every rank, never a hang


@check
def mismatched_inputs_raise_the_same_error_on_every_rank():
    rank, world = rank_world()
    odd = rank == world - 1
    who = f"rank {world - 1}"

    def pair(d, n=3, dtype=F64):
        return randn(n, d, seed=1, dtype=dtype), randn(n, d, seed=2, dtype=dtype)

    messages = set()
    d = 4 + odd  # one rank passes another feature dimension
    for impl in fd.IMPLS:
        messages.add(expect_value_error(lambda: fd.clip_loss(*pair(d), 5.0, impl=impl),
                                        [f"{who}: 5", "feature dimension"], f"clip D {impl}"))
        expect_value_error(lambda: fd.siglip_loss(*pair(d), 5.0, -1.0, impl=impl), [who], f"siglip D {impl}")
        expect_value_error(lambda: fd.info_nce(*pair(d), impl=impl), [who], f"info_nce D {impl}")
        expect_value_error(lambda: fd.supcon_loss(pair(d)[0], torch.arange(3), impl=impl), [who], f"supcon D {impl}")
    # another dtype, no rows, a target out of range, labels of the wrong length, another impl
    expect_value_error(lambda: fd.clip_loss(*pair(4, dtype=torch.float32 if odd else F64), 5.0), ["dtype"], "dtype")
    expect_value_error(lambda: fd.clip_loss(*pair(4, n=0 if odd else 3), 5.0), [who, "at least one row"], "empty")
    bad_targets = torch.tensor([0, 1, 999 if odd else 2])
    expect_value_error(lambda: fd.info_nce(*pair(4), bad_targets), [who, "999"], "targets")
    expect_value_error(lambda: fd.supcon_loss(pair(4)[0], torch.arange(2 if odd else 3)), [who, "labels"], "labels")
    expect_value_error(lambda: fd.clip_loss(*pair(4), 5.0, impl="gather" if odd else "ring"), ["same call"], "impl")
    img, txt = pair(4)
    expect_value_error(lambda: fd.clip_loss(img, txt[:2] if odd else txt, 5.0), [who, "same number of rows"], "rows")
    # every rank raised the same message
    gathered = [None] * world
    dist.all_gather_object(gathered, sorted(messages))
    assert all(m == gathered[0] for m in gathered), f"ranks raised different messages: {gathered}"
    # and the group still works afterwards
    loss = fd.clip_loss(*pair(4), 5.0)
    close(rank_mean(loss), flashloss.clip_loss(*[torch.cat([t] * world) for t in pair(4)], 5.0), "after errors")


@check
def compat_rank_and_world_size_must_match_the_group():
    rank, world = rank_world()
    img, txt = randn(3, 4, seed=1), randn(3, 4, seed=2)
    expect_value_error(lambda: flashloss.ClipLoss(rank=(rank + 1) % world, world_size=world)(img, txt, 2.0),
                       ["does not match the process group"], "ClipLoss rank")
    expect_value_error(lambda: flashloss.SigLipLoss(rank=rank, world_size=world + 1)(img, txt, 2.0, 0.0),
                       ["does not match the process group"], "SigLipLoss world_size")


# ---------------------------------------------------------------------------------------------
# memory: what the ring holds does not grow with the number of ranks


def _vm_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_extra_bytes(impl, n_local=256, d=2048):
    """Peak RSS of one fp32 CLIP forward+backward beyond the inputs and the returned gradients
    (glibc serves large blocks with mmap here: MALLOC_MMAP_THRESHOLD_ set by the parent)."""
    rank, world = rank_world()
    img = leaf(normed(n_local, d, seed=100 + rank, dtype=torch.float32))
    txt = leaf(normed(n_local, d, seed=200 + rank, dtype=torch.float32))
    scale = leaf(torch.tensor(10.0))
    fd.clip_loss(img, txt, scale, impl=impl).backward()  # warm-up: thread pools, first allocations
    img.grad = txt.grad = scale.grad = None
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _vm_kib("VmRSS")
    fd.clip_loss(img, txt, scale, impl=impl).backward()
    peak = _vm_kib("VmHWM")
    grads = 2 * n_local * d * 4
    return max(0, (peak - base) * 1024 - grads)


@check
def record_peak_memory_ring_and_gather():
    """Records per-rank peak extra bytes (tests/test_distributed.py compares world sizes)."""
    RECORDED["peak_extra_ring"] = peak_extra_bytes("ring")
    RECORDED["peak_extra_gather"] = peak_extra_bytes("gather")


RECORDED: dict = {}


# ---------------------------------------------------------------------------------------------


def main(argv):
    rank, world, init_file, out = int(argv[0]), int(argv[1]), argv[2], argv[3]
    names = argv[4:] or list(CHECKS)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = {}
    for name in names:
        torch.manual_seed(0)
        try:
            CHECKS[name]()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[name] = traceback.format_exc()
        dist.barrier()
    results["recorded"] = RECORDED
    with open(out, "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1:])
