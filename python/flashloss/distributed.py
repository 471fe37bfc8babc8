"""Contrastive losses across processes on torch.distributed (DESIGN.md §5): the negatives of every
rank, without any rank holding the global similarity matrix or, on the ring, the global batch.

Setting. Rank r of a process group of W ranks holds N_r queries (images) and M_r keys (texts); the
global batch is the concatenation in rank order, B = sum_r N_r rows. Every function here equals the
single-process flashloss loss on that concatenated batch, gradients included, under the convention
below. Local batch sizes may differ between ranks.

Three implementations (`impl=`):

- ``"gather"``: all-gather the keys (open_clip's `gather_features`), then primitive A on the local
  rows against the gathered keys. With gradient, the backward of the gather is a reduce-scatter.
  Memory per rank O(B * D) (the gathered keys and their gradient); sent per rank and step
  (W-1) * M * D per gathered tensor forward and the same backward. `clip_loss` also follows
  open_clip's `local_loss` and `gather_with_grad` flags exactly (numbers and gradients).
- ``"ring"``: queries stay home; key blocks travel around the ring by point-to-point sends
  (`batch_isend_irecv`), the transfer of the next block posted before the blockwise compute of the
  block in hand. Row statistics (LSE, positive sums, SigLIP sums) accumulate at home. Column
  statistics of a block (CLIP's text -> image direction) travel with it, one step behind, and come
  home as O(M_b) numbers. Backward sends the blocks around again with their column statistics and
  upstream gradients, recomputes each tile with the global LSEs (the primitive's backward op), and
  the key gradients accumulate in a buffer that travels with the block and arrives at its owner:
  a ring reduce-scatter, never an all-reduce of anything global. Memory per rank: the local
  inputs and gradients plus about six key-block-sized buffers (the block in hand, the next one
  arriving, the gradient buffer arriving and the one leaving, the kernel's per-block dq and dk),
  whatever W; nothing B x D or N x B. Sent per rank and step: forward W-1 key blocks (M * D) and,
  for CLIP, 2M statistics per block; backward W-1 key blocks with 3M statistics and W-1 gradient
  buffers (M * D, fp32).
- ``"bidir"``: the ring with key blocks travelling both ways (open_clip SigLIP's `bidir`):
  ceil((W-1)/2) steps to the right, floor((W-1)/2) to the left, each step computing on two blocks;
  a gradient buffer goes straight to its owner after its last hop. Same numbers as ``"ring"``.

Returned value and the DDP gradient convention. Each rank returns

    loss_r = W * share_r,   with  sum_r share_r = L  (the single-process loss on the global batch),

share_r being rank r's part of L: 'mean' -> (sum of rank r's per-item terms) / (global item count),
'sum' -> the sum of rank r's per-item terms. So the average of the returned values over ranks is L;
with equal local batches and 'mean', loss_r is the mean over the local rows, which is the number
open_clip's ClipLoss(local_loss=True) and SigLipLoss return. The backward is collective: the
gradient that reaches rank r's embeddings is d(sum_s loss_s)/d(x_r) = W * dL/dx_r (every rank's
loss depends on every rank's embeddings; the ring / reduce-scatter brings the parts home), and the
gradient of a replicated scalar (logit_scale, logit_bias) on rank r is rank r's part of
W * dL/dscale. DDP averages parameter gradients over the W ranks, which divides both by W: the
model, logit_scale and logit_bias receive exactly the single-process gradient of L. Without DDP,
divide by W yourself (or all-reduce and divide). 'none' returns rank r's per-item terms [N_r] (their
gradients flow to every rank in the same way).

Every rank must call the loss, and its backward, with the same arguments except the tensors' first
dimension: before any large transfer the ranks exchange a few integers per rank (shapes, dtypes,
requires_grad, target ranges) and each rank checks the whole table, so a rank whose inputs
disagree (another D, dtype, or a target out of range) makes every rank raise the same ValueError
instead of hanging. Without an initialised process group (or with W = 1) the functions are the
single-process losses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _backend
from . import contrastive as single_process
from ._validate import FLOAT_DTYPES, check_reduction, check_tensor
from .ops.contrastive_lse import _BIT, OP, acc_dtype, contrastive_lse

IMPLS = ("ring", "bidir", "gather")

__all__ = ["clip_loss", "siglip_loss", "info_nce", "supcon_loss", "IMPLS"]


# ---------------------------------------------------------------------------------------------
# the process group and the agreement check


@dataclass(frozen=True)
class _Group:
    group: Optional[dist.ProcessGroup]
    rank: int
    world: int


def _resolve_group(group) -> _Group:
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("group was given but torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        return _Group(None, 0, 1)
    return _Group(group, dist.get_rank(group), dist.get_world_size(group))


_DTYPE_CODES = {dt: i for i, dt in enumerate(FLOAT_DTYPES)}
# One row of integers per rank; every rank checks the gathered table the same way.
_FIELDS = ("call", "q_dim", "k_dim", "rows", "keys", "q_d", "k_d", "q_dtype", "k_dtype", "q_grad", "k_grad",
           "has_bias", "labels", "valid_rows", "target_min", "target_max", "device")
_NO_TARGET = -(1 << 62)


def _call_code(text: str) -> int:
    """31-bit FNV-1a hash of the call description (pure Python, so torch.compile traces it when no
    process group is active; zlib.crc32 is a C builtin dynamo cannot trace)."""
    h = 0x811C9DC5
    for ch in text.encode():
        h = ((h ^ ch) * 0x01000193) & 0xFFFFFFFF
    return h & 0x7FFFFFFF


def _meta_row(call: str, q, k, bias, labels=None, targets=None) -> list[int]:
    def shape(t, i):
        return int(t.shape[i]) if isinstance(t, torch.Tensor) and t.dim() > i else -1

    row = dict(call=_call_code(call), q_dim=q.dim(), k_dim=k.dim(), rows=shape(q, 0), keys=shape(k, 0),
               q_d=shape(q, 1), k_d=shape(k, 1), q_dtype=_DTYPE_CODES.get(q.dtype, -1),
               k_dtype=_DTYPE_CODES.get(k.dtype, -1), q_grad=int(q.requires_grad), k_grad=int(k.requires_grad),
               has_bias=int(bias is not None), labels=-1,
               valid_rows=shape(q, 0), target_min=_NO_TARGET, target_max=_NO_TARGET,
               device=0 if q.device.type == "cpu" else 1)
    for given in (labels, targets):
        if given is not None:
            row["labels"] = shape(given, 0) if given.dim() == 1 else -2
    if targets is not None:
        kept = targets[targets != -100] if targets.dim() == 1 else targets.new_zeros(0)
        row["valid_rows"] = int(kept.numel())
        if kept.numel():
            row["target_min"], row["target_max"] = int(kept.min()), int(kept.max())
    return [row[f] for f in _FIELDS]


def _agree(g: _Group, row: list[int], device) -> dict[str, list[int]]:
    """All-gathers every rank's row of integers: {field: [value of rank 0, ..., rank W-1]}."""
    if g.world == 1:
        return {f: [v] for f, v in zip(_FIELDS, row)}
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(g.world)]
    dist.all_gather(rows, mine, group=g.group)
    table = torch.stack(rows).cpu()
    return {f: table[:, i].tolist() for i, f in enumerate(_FIELDS)}


def _first_disagreement(table, field: str) -> Optional[str]:
    values = table[field]
    if all(v == values[0] for v in values):
        return None
    return ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))


def _check_table(table, what: str, q_name: str, k_name: str, *, same_rows: bool = False,
                 labels_name: Optional[str] = None, targets: bool = False) -> None:
    """Raises the same ValueError on every rank when the ranks' inputs disagree."""
    def fail(msg):
        raise ValueError(f"{what}: {msg} (checked on every rank before any large transfer)")

    if _first_disagreement(table, "call"):
        fail("the ranks called different losses or the same loss with different options "
             "(impl, local_loss, gather_with_grad, reduction, ...); every rank must make the same call")
    for name, dim_field in ((q_name, "q_dim"), (k_name, "k_dim")):
        bad = [r for r, v in enumerate(table[dim_field]) if v != 2]
        if bad:
            fail(f"{name} must be 2-D [rows, D] on every rank; rank {bad[0]} passed a "
                 f"{table[dim_field][bad[0]]}-D tensor")
    for r, (a, b) in enumerate(zip(table["q_d"], table["k_d"])):
        if a != b:
            fail(f"{q_name} and {k_name} must have the same feature dimension; rank {r} passed D={a} and D={b}")
    if _first_disagreement(table, "q_d"):
        fail(f"{q_name} must have the same feature dimension D on every rank; got "
             + _first_disagreement(table, "q_d"))
    for field, name in (("q_dtype", q_name), ("k_dtype", k_name)):
        if any(v < 0 for v in table[field]):
            fail(f"{name} must be a float tensor ({', '.join(str(d) for d in FLOAT_DTYPES)}) on every rank")
    if _first_disagreement(table, "q_dtype") or any(a != b for a, b in zip(table["q_dtype"], table["k_dtype"])):
        fail(f"{q_name} and {k_name} must have one dtype on every rank; got "
             + ", ".join(f"rank {r}: {FLOAT_DTYPES[a]}/{FLOAT_DTYPES[b]}"
                         for r, (a, b) in enumerate(zip(table["q_dtype"], table["k_dtype"]))))
    # the backward is collective: which inputs take gradients decides which transfers run
    for field, what_differs in (("q_grad", f"{q_name}.requires_grad"), ("k_grad", f"{k_name}.requires_grad"),
                                ("has_bias", "whether a bias is given"), ("device", "the device type (0 = cpu)")):
        diff = _first_disagreement(table, field)
        if diff:
            fail(f"{what_differs} must be the same on every rank; got {diff}")
    for field, name in (("rows", q_name), ("keys", k_name)):
        bad = [r for r, v in enumerate(table[field]) if v < 1]
        if bad:
            fail(f"every rank needs at least one row of {name}; rank {bad[0]} has none")
    if same_rows:
        for r, (a, b) in enumerate(zip(table["rows"], table["keys"])):
            if a != b:
                fail(f"{q_name} and {k_name} must have the same number of rows on each rank; rank {r} has {a} and {b}")
    if labels_name is not None:
        for r, (a, b) in enumerate(zip(table["labels"], table["rows"])):
            if a != b:
                fail(f"{labels_name} must have shape [N] matching {q_name} on each rank; rank {r} has "
                     f"{'a tensor that is not 1-D' if a == -2 else a} for N={b}")
    if targets:
        total = sum(table["keys"])
        for r, (lo, hi) in enumerate(zip(table["target_min"], table["target_max"])):
            if lo != _NO_TARGET and (lo < 0 or hi >= total):
                fail(f"targets index the concatenated {k_name} of all ranks and must be in [0, {total}) or -100; "
                     f"rank {r} passed {lo if lo < 0 else hi}")


def _offsets(sizes: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


# ---------------------------------------------------------------------------------------------
# the ring: streams of key blocks between neighbours


class _Ring:
    """Point-to-point plumbing of the ring. A stream moves key blocks one neighbour per step in
    `direction` (+1: to rank + 1) for `hops` steps; `ring` has one stream of W-1 hops, `bidir` two
    (W//2 to the right, (W-1)//2 to the left), so each rank sees every block exactly once."""

    def __init__(self, g: _Group, bidir: bool):
        self.g = g
        w = g.world
        streams = [(1, w // 2), (-1, (w - 1) // 2)] if bidir else [(1, w - 1)]
        self.streams = [(d, h) for d, h in streams if h > 0]

    def _post(self, ops: list[tuple[str, torch.Tensor, int, int]]) -> list:
        """Posts ops = [(kind 'send' | 'recv', tensor, group rank of the peer, tag)] as one batch
        (NCCL coalesces a batch, so a ring of sends and receives in one batch cannot deadlock; it may
        return one request for the whole batch: wait on all of them). Every rank posts its batches
        in the same order, so each pair of ranks matches its transfers in order."""
        if not ops:
            return []
        p2p = [dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, group=self.g.group, group_peer=peer,
                          tag=tag) for kind, t, peer, tag in ops]
        return dist.batch_isend_irecv(p2p)

    def circulate(self, home: tuple, block_like: Callable[[int], tuple], visit: Callable,
                  payload_like: Optional[Callable[[int], torch.Tensor]] = None,
                  merge: Optional[Callable] = None):
        """Calls visit(block, owner, is_home) on this rank's block, then on every other rank's
        block as the streams bring it, posting the transfer of the next block before computing on
        the current one. If payload_like is given, visit returns a per-block payload that follows
        its block one step behind, merged on the way (merge(arrived, contribution)); after its last
        hop a stream's payload goes straight to the block's owner.
        Returns (payload of the home visit, [payloads that came home, one per stream])."""
        rank, w = self.g.rank, self.g.world
        carry = payload_like is not None
        streams = self.streams
        last = max((h for _, h in streams), default=0)
        hand: list = [home for _ in streams]
        blocks_in: list = [None] * len(streams)

        def post_blocks(step: int) -> list:  # the blocks each stream needs at `step`
            ops = []
            for s, (d, h) in enumerate(streams):
                if h >= step:
                    blocks_in[s] = block_like((rank - d * step) % w)
                    for i, t in enumerate(hand[s]):
                        ops.append(("send", t, (rank + d) % w, 8 * s + i))
                    for i, t in enumerate(blocks_in[s]):
                        ops.append(("recv", t, (rank - d) % w, 8 * s + i))
            return self._post(ops)

        block_works = post_blocks(1)
        home_payload = visit(home, rank, True)
        payload_in: list = [None] * len(streams)
        payload_works: list = [[] for _ in streams]  # the transfer of the payload each stream visits next
        final_works: list = []
        came_home: list = []
        for step in range(1, last + 1):
            for work in block_works:
                work.wait()
            for s, (_, h) in enumerate(streams):
                if h >= step:
                    hand[s] = blocks_in[s]
            block_works = post_blocks(step + 1)
            for s, (d, h) in enumerate(streams):
                if h < step:
                    continue
                owner = (rank - d * step) % w
                contribution = visit(hand[s], owner, False)
                if not carry:
                    continue
                if step >= 2:
                    for work in payload_works[s]:
                        work.wait()
                    payload_works[s] = []  # drops the payload we sent last step
                    contribution = merge(payload_in[s], contribution)
                    payload_in[s] = None
                tag = 8 * s + 7
                if step < h:  # on to the next rank of the stream
                    payload_in[s] = payload_like((rank - d * (step + 1)) % w)
                    payload_works[s] = self._post([("send", contribution, (rank + d) % w, tag),
                                                   ("recv", payload_in[s], (rank - d) % w, tag)])
                else:  # last hop: straight to the owner; ours arrives from rank + d * h
                    came_home.append(payload_like(rank))
                    final_works += self._post([("send", contribution, owner, tag),
                                               ("recv", came_home[-1], (rank + d * step) % w, tag)])
        for work in block_works + final_works:
            work.wait()
        return home_payload, came_home


# ---------------------------------------------------------------------------------------------
# primitive A on one (local queries, key block) pair, through its registered ops


def _want(names: Sequence[str]) -> int:
    bits = 0
    for n in names:
        bits |= _BIT[n]
    return bits


@dataclass
class _RingPlan:
    """Everything about a ring call that is not a differentiable tensor."""
    ring: _Ring
    key_sizes: list[int]
    key_offsets: list[int]
    labels_q: torch.Tensor  # [N_r] int64; positives are the keys with an equal label
    labels_k: Optional[torch.Tensor]  # [M_r] int64 travelling with the block; None: the key's global index
    exclude_self: bool  # drop (i, i) of the home block (q is k)
    columns: bool  # column statistics (CLIP's second direction)
    sigmoid: bool
    want: int
    backend: str

    def key_labels(self, owner: int, block: tuple, device) -> torch.Tensor:
        if self.labels_k is not None:
            return block[1]
        return torch.arange(self.key_sizes[owner], device=device) + self.key_offsets[owner]


def _block_forward(plan: _RingPlan, q, kb, scale_rows, bias, labels_kb, home: bool):
    return torch.ops.flashloss.contrastive_lse(
        q, kb, scale_rows, bias, None, None, plan.labels_q, labels_kb, None, kb.shape[0], 0,
        plan.exclude_self and home, False, 0.0, plan.sigmoid, plan.want, plan.backend)


def _empty(dtype, device):
    return torch.zeros(0, dtype=dtype, device=device)


class _RingStats(torch.autograd.Function):
    """Global statistics of the local queries against every rank's keys, by the ring.
    Outputs (acc dtype; empty where not wanted): row_lse, pos_sum, pos_count [N_r] over all keys,
    col_lse, col_pos_sum [M_r] of the local keys over all queries, row_sigmoid [N_r]."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, plan: _RingPlan):
        acc = acc_dtype(q.dtype)
        dev = q.device
        n, m, d = q.shape[0], k.shape[0], q.shape[1]
        scale_rows = scale.expand(n).contiguous()
        row_lse = torch.full((n,), float("-inf"), dtype=acc, device=dev)
        pos_sum, pos_count, row_sig = (torch.zeros(n, dtype=acc, device=dev) for _ in range(3))

        def visit(block, owner, home):
            nonlocal row_lse, pos_sum, pos_count, row_sig
            kb = block[0]
            out = _block_forward(plan, q, kb, scale_rows, bias, plan.key_labels(owner, block, dev), home)
            if plan.want & _BIT["row_lse"]:
                row_lse = torch.logaddexp(row_lse, out[0])
            if plan.want & _BIT["pos_sum"]:
                pos_sum = pos_sum + out[2]
            if plan.want & _BIT["pos_count"]:
                pos_count = pos_count + out[3]
            if plan.sigmoid:
                row_sig = row_sig + out[5]
            return torch.stack([out[1], out[4]]) if plan.columns else None  # [2, M_b]

        def block_like(owner):
            size = plan.key_sizes[owner]
            kb = torch.empty(size, d, dtype=k.dtype, device=dev)
            return (kb,) if plan.labels_k is None else (kb, torch.empty(size, dtype=torch.int64, device=dev))

        def merge_columns(a, b):
            return torch.stack([torch.logaddexp(a[0], b[0]), a[1] + b[1]])

        home = (k,) if plan.labels_k is None else (k, plan.labels_k)
        cols_home, cols_back = plan.ring.circulate(
            home, block_like, visit,
            (lambda owner: torch.empty(2, plan.key_sizes[owner], dtype=acc, device=dev)) if plan.columns else None,
            merge_columns)
        if plan.columns:
            cols = cols_home
            for c in cols_back:
                cols = merge_columns(cols, c)
            col_lse, col_pos_sum = cols[0].contiguous(), cols[1].contiguous()
        else:
            col_lse, col_pos_sum = _empty(acc, dev), _empty(acc, dev)

        def wanted(t, name):  # each output its own tensor (autograd tracks them one by one)
            return t if plan.want & _BIT[name] else _empty(acc, dev)

        outs = (wanted(row_lse, "row_lse"), wanted(pos_sum, "pos_sum"), wanted(pos_count, "pos_count"),
                col_lse, col_pos_sum, wanted(row_sig, "row_sigmoid"))
        ctx.save_for_backward(q, k, scale, bias, outs[0], col_lse)
        ctx.plan = plan
        ctx.mark_non_differentiable(outs[2])
        return outs

    @staticmethod
    def backward(ctx, g_row, g_pos, _g_count, g_col, g_colpos, g_sig):
        q, k, scale, bias, row_lse, col_lse = ctx.saved_tensors
        plan: _RingPlan = ctx.plan
        acc = acc_dtype(q.dtype)
        dev = q.device
        n, m, d = q.shape[0], k.shape[0], q.shape[1]
        need_dq, need_dk, need_dscale, need_dbias = ctx.needs_input_grad[:4]
        need_dbias = need_dbias and bias is not None

        def upstream(g, bit, size):  # an unused output gets a zero gradient of its size
            if not plan.want & _BIT[bit]:
                return _empty(acc, dev)
            return torch.zeros(size, dtype=acc, device=dev) if g is None else g.to(acc).contiguous()

        g_row, g_pos = upstream(g_row, "row_lse", n), upstream(g_pos, "pos_sum", n)
        g_sig = upstream(g_sig, "row_sigmoid", n)
        g_col, g_colpos = upstream(g_col, "col_lse", m), upstream(g_colpos, "col_pos_sum", m)
        scale_rows = scale.expand(n).contiguous()
        dq = torch.zeros(n, d, dtype=acc, device=dev)
        dscale = torch.zeros((), dtype=acc, device=dev)
        dbias = torch.zeros((), dtype=acc, device=dev)
        needs = [bool(need_dq), bool(need_dk), bool(need_dscale), bool(need_dbias), False]

        def visit(block, owner, home):
            kb = block[0]
            mb = kb.shape[0]
            if plan.columns:  # the owner's global column LSE and upstream gradients travel with the block
                cols = block[-1]
                col_lse_b, g_col_b, g_colpos_b = cols[0], cols[1], cols[2]
            else:
                col_lse_b = g_col_b = g_colpos_b = _empty(acc, dev)
            dq_b, dk_b, dscale_b, dbias_b, _ = torch.ops.flashloss.contrastive_lse_backward(
                q, kb, scale_rows, bias, None, None, plan.labels_q, plan.key_labels(owner, block, dev), None,
                row_lse, col_lse_b, g_row, g_col_b, g_pos, g_colpos_b, g_sig, mb, mb if need_dk else 0,
                plan.exclude_self and home, False, 0.0, plan.sigmoid, plan.want, needs, plan.backend)
            if need_dq:
                dq.add_(dq_b)
            if need_dscale:
                dscale.add_(dscale_b.sum())
            if need_dbias:
                dbias.add_(dbias_b)
            return dk_b if need_dk else None

        def block_like(owner):
            size = plan.key_sizes[owner]
            out = [torch.empty(size, d, dtype=k.dtype, device=dev)]
            if plan.labels_k is not None:
                out.append(torch.empty(size, dtype=torch.int64, device=dev))
            if plan.columns:
                out.append(torch.empty(3, size, dtype=acc, device=dev))
            return tuple(out)

        home = [k] + ([plan.labels_k] if plan.labels_k is not None else [])
        if plan.columns:
            home.append(torch.stack([col_lse, g_col, g_colpos]))
        dk_home, dk_back = plan.ring.circulate(
            tuple(home), block_like, visit,
            (lambda owner: torch.empty(plan.key_sizes[owner], d, dtype=acc, device=dev)) if need_dk else None,
            lambda arrived, contribution: contribution.add_(arrived))
        dk = None
        if need_dk:
            dk = dk_home
            for part in dk_back:
                dk.add_(part)
            dk = dk.to(k.dtype)
        return (dq.to(q.dtype) if need_dq else None, dk,
                dscale.to(scale.dtype) if need_dscale else None,
                dbias.to(bias.dtype) if need_dbias else None, None)


def _ring_stats(g: _Group, bidir: bool, q, k, scale, bias, key_sizes, *, labels_q, labels_k=None,
                exclude_self=False, outputs: Sequence[str], sigmoid=False, backend="auto"):
    plan = _RingPlan(ring=_Ring(g, bidir), key_sizes=list(key_sizes), key_offsets=_offsets(key_sizes),
                     labels_q=labels_q.long().contiguous(),
                     labels_k=None if labels_k is None else labels_k.long().contiguous(),
                     exclude_self=exclude_self, columns="col_lse" in outputs, sigmoid=sigmoid,
                     want=_want(outputs), backend=_backend.resolve(OP, backend, q.device))
    return _RingStats.apply(q.contiguous(), k.contiguous(), scale, bias, plan)


# ---------------------------------------------------------------------------------------------
# the all-gather path


# torch >= 2.13 names; the older ones are deprecated there
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    """x [n, D] of every rank -> [W * n, D] in rank order; backward: reduce-scatter (sum) of the
    gradient, so each rank receives the sum over all ranks' losses of the gradient of its rows."""

    @staticmethod
    def forward(ctx, x, g: _Group):
        ctx.g = g
        out = x.new_empty((g.world * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather_single(out, x.contiguous(), group=g.group)
        return out

    @staticmethod
    def backward(ctx, grad):
        g = ctx.g
        out = grad.new_empty((grad.shape[0] // g.world,) + tuple(grad.shape[1:]))
        _reduce_scatter_single(out, grad.contiguous(), group=g.group)
        return out, None


def _gather_rows(g: _Group, x: torch.Tensor, sizes: Sequence[int], with_grad: bool,
                 keep_local_grad: bool = False) -> torch.Tensor:
    """Concatenation of every rank's x [sizes[r], ...] in rank order. Ranks pad to the largest
    size (all-gather needs one shape) and the padding is cut off again. with_grad: the backward is a
    reduce-scatter. Without: nothing flows back, except that keep_local_grad makes this rank's
    slice x itself, so its local gradient flows (open_clip's local_loss=False)."""
    if g.world == 1:
        return x
    top = max(sizes)
    pad = [0, 0] * (x.dim() - 1) + [0, top - x.shape[0]]
    padded = F.pad(x, pad, value=-1 if not x.is_floating_point() else 0.0) if x.shape[0] < top else x
    if with_grad:
        gathered = _AllGather.apply(padded, g)
    else:
        with torch.no_grad():
            gathered = _AllGather.apply(padded.detach(), g)
    parts = list(gathered.split(top))
    if keep_local_grad and not with_grad:
        parts[g.rank] = padded
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


# ---------------------------------------------------------------------------------------------
# shared argument handling and the per-rank share of the loss


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _as_scalar_tensor(name: str, value, like: torch.Tensor, acc) -> torch.Tensor:
    """A Python number or 0-d tensor as a 0-d tensor in the accumulation dtype (the gradient of a
    tensor flows back through the cast)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a float or a 0-d tensor in the distributed losses, "
                             f"got shape {tuple(value.shape)}")
        check_tensor(name, value, dtypes=FLOAT_DTYPES, device=like.device)
        return value.to(acc)
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), dtype=acc, device=like.device)
    raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")


def _check_features(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _rank_share(per_item: torch.Tensor, reduction: str, world: int, global_count: int,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W * (this rank's share of the single-process loss): see the module docstring."""
    if valid is not None:
        per_item = torch.where(valid, per_item, torch.zeros_like(per_item))
    if reduction == "none":
        return per_item
    total = per_item.sum()
    if reduction == "sum":
        return total * world
    return total * (world / max(global_count, 1))


# ---------------------------------------------------------------------------------------------
# public losses


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, group=None, impl: str = "ring",
              local_loss: bool = True, gather_with_grad: bool = True, reduction: str = "mean",
              backend: str = "auto"):
    """open_clip's ClipLoss over a process group: L = (CE(S, y) + CE(S^T, y)) / 2 on the global batch,
    S = logit_scale * img txt^T (+ logit_bias), y the matching pair, each CE a mean over the B pairs.

    image_features, text_features: this rank's [N_r, D] (N_r may differ between ranks).
    Returns W * (this rank's share), share_r = sum over the local pairs i of
    (CE_row_i + CE_col_i) / 2 / B ('mean'): the local mean for equal local batches, open_clip's
    local_loss=True number (module docstring: DDP's averaging then gives the single-process gradient).
    'none': the per-pair terms of the local pairs [N_r].

    impl="ring" / "bidir": text blocks travel, images stay; each rank computes the row LSE of its
    images and the column LSE of its texts over the global batch (the column statistics of a text
    block travel with it and come home). local_loss / gather_with_grad must stay True.
    impl="gather": open_clip's gather_features and both flags with open_clip's numbers and gradients:
    local_loss=True: local rows against the gathered columns (the loss above); local_loss=False:
    every rank computes the global L (returned as is, [B] per pair for 'none'); gather_with_grad=False
    gathers without gradient (open_clip's default; the gradient reaching the embeddings is then not
    W * dL/dx: with local_loss=False it is dL/dx, 1/W of what the convention needs; see
    docs/DECISIONS.md)."""
    check_reduction(reduction)
    _check_impl(impl)
    _check_features("image_features", image_features)
    _check_features("text_features", text_features)
    if impl != "gather" and not (local_loss and gather_with_grad):
        raise ValueError("local_loss=False or gather_with_grad=False are open_clip's all-gather variants; "
                         "use impl='gather' for them (the ring computes local rows with full gradients)")
    g = _resolve_group(group)
    if g.world == 1:  # no process group (or a single process): the single-process loss
        return single_process.clip_loss(image_features, text_features, logit_scale, logit_bias, reduction=reduction,
                                        backend=backend)
    call = f"clip_loss|{impl}|{local_loss}|{gather_with_grad}|{reduction}"
    table = _agree(g, _meta_row(call, image_features, text_features, logit_bias), image_features.device)
    _check_table(table, "clip_loss", "image_features", "text_features", same_rows=True)
    acc = acc_dtype(image_features.dtype)
    scale = _as_scalar_tensor("logit_scale", logit_scale, image_features, acc)
    bias = None if logit_bias is None else _as_scalar_tensor("logit_bias", logit_bias, image_features, acc)
    sizes = table["rows"]
    total, offset, n = sum(sizes), _offsets(sizes)[g.rank], image_features.shape[0]
    if impl == "gather" and not local_loss:  # open_clip: every rank computes the global loss
        all_img = _gather_rows(g, image_features, sizes, gather_with_grad, keep_local_grad=True)
        all_txt = _gather_rows(g, text_features, sizes, gather_with_grad, keep_local_grad=True)
        return single_process.clip_loss(all_img, all_txt, scale, bias, reduction=reduction, backend=backend)
    if impl == "gather":
        all_img = _gather_rows(g, image_features, sizes, gather_with_grad)
        all_txt = _gather_rows(g, text_features, sizes, gather_with_grad)
        targets = torch.arange(n, device=image_features.device) + offset
        r_img = contrastive_lse(image_features, all_txt, scale, bias, targets=targets, outputs=("row_lse", "pos_sum"),
                                backend=backend)
        r_txt = contrastive_lse(text_features, all_img, scale, bias, targets=targets, outputs=("row_lse", "pos_sum"),
                                backend=backend)
        per_pair = 0.5 * ((r_img.row_lse - r_img.pos_sum) + (r_txt.row_lse - r_txt.pos_sum))
    else:
        labels = torch.arange(n, device=image_features.device) + offset
        row_lse, pos_sum, _, col_lse, col_pos_sum, _ = _ring_stats(
            g, impl == "bidir", image_features, text_features, scale, bias, sizes, labels_q=labels,
            outputs=("row_lse", "pos_sum", "col_lse", "col_pos_sum"), backend=backend)
        per_pair = 0.5 * ((row_lse - pos_sum) + (col_lse - col_pos_sum))
    return _rank_share(per_pair, reduction, g.world, total)


def siglip_loss(image_features, text_features, logit_scale, logit_bias=None, *, group=None, impl: str = "ring",
                reduction: str = "mean", backend: str = "auto"):
    """open_clip's SigLipLoss over a process group: L = -(1/B) sum_ij log sigmoid(z_ij S_ij) on the
    global batch, z = +1 for the matching pair, -1 elsewhere (normalised by the B images, as open_clip).

    Returns W * (this rank's share) with share_r = (sum over the local images of their sums over all
    texts) / B: for equal local batches the sum over all texts divided by N_r, the number open_clip's
    SigLipLoss returns on each rank with any dist_impl. 'none': per local image sums [N_r].

    impl="ring" (open_clip's `shift`): text blocks pass to the right neighbour W-1 times;
    impl="bidir" (open_clip's `bidir`): text blocks travel both ways, ceil((W-1)/2) steps; in both the
    send of the next block overlaps the compute of the block in hand, nothing but the blocks and
    their gradient buffers moves (a sigmoid loss has no normalisers), and each block's gradient
    returns to its owner. impl="gather": all-gather of the texts with gradient (open_clip's `gather`)."""
    check_reduction(reduction)
    _check_impl(impl)
    _check_features("image_features", image_features)
    _check_features("text_features", text_features)
    g = _resolve_group(group)
    if g.world == 1:  # no process group (or a single process): the single-process loss
        return single_process.siglip_loss(image_features, text_features, logit_scale, logit_bias,
                                          reduction=reduction, backend=backend)
    table = _agree(g, _meta_row(f"siglip_loss|{impl}|{reduction}", image_features, text_features, logit_bias),
                   image_features.device)
    _check_table(table, "siglip_loss", "image_features", "text_features", same_rows=True)
    acc = acc_dtype(image_features.dtype)
    scale = _as_scalar_tensor("logit_scale", logit_scale, image_features, acc)
    bias = None if logit_bias is None else _as_scalar_tensor("logit_bias", logit_bias, image_features, acc)
    sizes = table["rows"]
    total, offset, n = sum(sizes), _offsets(sizes)[g.rank], image_features.shape[0]
    labels = torch.arange(n, device=image_features.device) + offset
    if impl == "gather":
        all_txt = _gather_rows(g, text_features, sizes, with_grad=True)
        per_image = contrastive_lse(image_features, all_txt, scale, bias, targets=labels, outputs=("row_sigmoid",),
                                    mode="sigmoid", backend=backend).row_sigmoid
    else:
        per_image = _ring_stats(g, impl == "bidir", image_features, text_features, scale, bias, sizes,
                                labels_q=labels, outputs=("row_sigmoid",), sigmoid=True, backend=backend)[5]
    return _rank_share(per_image, reduction, g.world, total)


def info_nce(q, k, targets=None, *, group=None, impl: str = "ring", scale=None, temperature=None, bias=None,
             reduction: str = "mean", backend: str = "auto"):
    """One-direction InfoNCE over a process group: l_i = LSE_j S_ij - S_{i, y_i} over the keys of
    every rank, S = scale * q k^T + bias, for the local queries q [N_r, D] and local keys k [M_r, D].
    `targets` [N_r] index the concatenation of all ranks' keys in rank order (-100 ignores a row);
    by default query i of rank r is paired with key i of rank r (needs M_r >= N_r). Default
    temperature 0.07. Returns W * (this rank's share) of the single-process mean over the valid rows
    of the global batch ('sum': of the sum); 'none': per local row [N_r] (ignored rows 0).
    impl="ring" / "bidir": key blocks travel; "gather": all-gather of the keys with gradient."""
    check_reduction(reduction)
    _check_impl(impl)
    _check_features("q", q)
    _check_features("k", k)
    if targets is not None:
        check_tensor("targets", targets, dtypes=(torch.int64, torch.int32), device=q.device)
    g = _resolve_group(group)
    if g.world == 1:  # no process group (or a single process): the single-process loss
        return single_process.info_nce(q, k, targets, scale=scale, temperature=temperature, bias=bias,
                                       reduction=reduction, backend=backend)
    call = f"info_nce|{impl}|{reduction}|{targets is None}"
    table = _agree(g, _meta_row(call, q, k, bias, targets=targets), q.device)
    _check_table(table, "info_nce", "q", "k", labels_name=None if targets is None else "targets",
                 targets=targets is not None)
    if targets is None:
        short = [r for r, (a, b) in enumerate(zip(table["rows"], table["keys"])) if a > b]
        if short:
            raise ValueError(f"info_nce: targets default to query i <-> key i of the same rank and need "
                             f"M_r >= N_r; rank {short[0]} has N={table['rows'][short[0]]}, "
                             f"M={table['keys'][short[0]]} (checked on every rank before any large transfer)")
        targets = torch.arange(q.shape[0], device=q.device) + _offsets(table["keys"])[g.rank]
    targets = targets.long()
    acc = acc_dtype(q.dtype)
    s = _as_scalar_tensor("scale", single_process._scale_arg(scale, temperature, 0.07), q, acc)
    b = None if bias is None else _as_scalar_tensor("bias", bias, q, acc)
    valid = targets != -100
    if impl == "gather":
        all_k = _gather_rows(g, k, table["keys"], with_grad=True)
        r = contrastive_lse(q, all_k, s, b, targets=targets, outputs=("row_lse", "pos_sum"), backend=backend)
        row_lse, pos_sum = r.row_lse, r.pos_sum
    else:
        labels_q = torch.where(valid, targets, torch.full_like(targets, -1))  # -1 matches no key
        row_lse, pos_sum = _ring_stats(g, impl == "bidir", q, k, s, b, table["keys"], labels_q=labels_q,
                                       outputs=("row_lse", "pos_sum"), backend=backend)[:2]
    return _rank_share(row_lse - pos_sum, reduction, g.world, sum(table["valid_rows"]), valid)


def supcon_loss(embeddings, labels, *, group=None, impl: str = "ring", temperature: float = 0.1,
                no_positive: str = "exclude", base_temperature: float = 0.07, reduction: str = "mean",
                backend: str = "auto"):
    """Supervised contrastive loss (L_out, flashloss.supcon_loss) over a process group: anchors are
    the local embeddings [N_r, D] with labels [N_r]; candidates are the embeddings of every rank
    (the anchor itself excluded), positives the candidates with the anchor's label on any rank.
    no_positive='exclude' drops anchors without a positive from the global mean (the count is one
    all-reduce of an integer); 'zero' keeps them with loss 0 and scales by T / base_temperature.
    Returns W * (this rank's share) of the single-process loss ('none': per local anchor [N_r]).
    impl="ring" / "bidir": embedding blocks travel with their labels; "gather": all-gather with gradient."""
    check_reduction(reduction)
    _check_impl(impl)
    if no_positive not in ("exclude", "zero"):
        raise ValueError(f"no_positive must be 'exclude' or 'zero', got {no_positive!r}")
    _check_features("embeddings", embeddings)
    check_tensor("labels", labels, dtypes=(torch.int64, torch.int32), device=embeddings.device)
    g = _resolve_group(group)
    if g.world == 1:  # no process group (or a single process): the single-process loss
        return single_process.supcon_loss(embeddings, labels, temperature=temperature, no_positive=no_positive,
                                          base_temperature=base_temperature, reduction=reduction, backend=backend)
    table = _agree(g, _meta_row(f"supcon_loss|{impl}|{no_positive}|{reduction}", embeddings, embeddings, None,
                                labels=labels), embeddings.device)
    _check_table(table, "supcon_loss", "embeddings", "embeddings", labels_name="labels")
    labels = labels.long()
    z = F.normalize(embeddings, dim=-1, eps=single_process.EPS)
    acc = acc_dtype(z.dtype)
    s = torch.tensor(1.0 / temperature, dtype=acc, device=z.device)
    sizes = table["rows"]
    outs = ("row_lse", "pos_sum", "pos_count")
    if impl == "gather":
        # this rank's block first, so that the anchors' self pairs are the primitive's (i, i)
        all_z = _gather_rows(g, z, sizes, with_grad=True)
        all_labels = _gather_rows(g, labels, sizes, with_grad=False)
        off = _offsets(sizes)[g.rank]
        order = torch.cat([torch.arange(off, sum(sizes)), torch.arange(0, off)]).to(z.device)
        r = contrastive_lse(z, all_z[order], s, labels_q=labels, labels_k=all_labels[order], exclude_self=True,
                            outputs=outs, backend=backend)
        row_lse, pos_sum, pos_count = r.row_lse, r.pos_sum, r.pos_count
    else:
        row_lse, pos_sum, pos_count = _ring_stats(g, impl == "bidir", z, z, s, None, sizes, labels_q=labels,
                                                  labels_k=labels, exclude_self=True, outputs=outs,
                                                  backend=backend)[:3]
    has_pos = pos_count > 0
    per_row = row_lse - pos_sum / pos_count.clamp_min(1)
    if no_positive == "zero":
        per_row = torch.where(has_pos, per_row * (temperature / base_temperature), torch.zeros_like(per_row))
        return _rank_share(per_row, reduction, g.world, sum(sizes))
    count = int(has_pos.sum())
    if reduction == "mean" and g.world > 1:
        counts = torch.tensor([count], dtype=torch.int64, device=z.device)
        dist.all_reduce(counts, group=g.group)
        count = int(counts.item())
    return _rank_share(per_row, reduction, g.world, count, has_pos)
