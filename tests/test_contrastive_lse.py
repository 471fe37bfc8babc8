"""Primitive A (flashloss.ops.contrastive_lse) on every backend against the dense float64
reference: all outputs, all gradients (q, k, extra columns, scalar and per-row scale, bias), odd
shapes crossing tile boundaries, every option an objective uses."""
import importlib

import pytest
import torch

import flashloss
from flashloss import BackendUnavailableError, backend_available
from flashloss.ops import contrastive_lse
from flashloss.ref import contrastive_lse as ref_contrastive
from helpers import check_against_reference

ops_mod = importlib.import_module("flashloss.ops.contrastive_lse")
BACKENDS = [b for b in ("torch", "cpu") if b in flashloss._backend.registered_ops()["contrastive_lse"].impls
            and backend_available(b, "cpu")[0]]
SOFTMAX_OUTS = ("row_lse", "col_lse", "pos_sum", "col_pos_sum")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(ops_mod, "TILE", 16)  # shapes below cross several tiles


def _labels(n, classes, gen):
    return torch.randint(0, classes, (n,), generator=gen)


CONFIGS = {
    "targets": dict(positives="targets"),
    "targets_ignored_rows": dict(positives="targets", ignore=True),
    "labels": dict(positives="labels"),
    "labels_exclude_self": dict(positives="labels", exclude_self=True, same=True),
    "dcl_exclude_positives": dict(positives="labels", exclude_self=True, exclude_positives=True, same=True),
    "margin": dict(positives="targets", margin=-0.35),
    "row_margin": dict(positives="labels", row_margin=True),
    "extra_columns": dict(positives="targets", extra=True),
    "per_row_scale": dict(positives="targets", row_scale=True),
    "sigmoid": dict(positives="targets", mode="sigmoid"),
    "no_positives": dict(positives=None),
    "multi_targets": dict(positives="multi"),
    "multi_targets_exclude_positives": dict(positives="multi", exclude_positives=True, margin=0.3),
    "neg_threshold": dict(positives="targets", ignore=True, threshold=True),
    "neg_threshold_labels_sigmoid": dict(positives="labels", threshold=True, mode="sigmoid"),
}


def build(cfg, n, m, d, seed=0):
    """Inputs (tensors first, for the checker) and a function of those tensors per config."""
    gen = torch.Generator().manual_seed(seed)
    same = cfg.get("same", False)
    m = n if same else m
    q = torch.randn(n, d, generator=gen, dtype=torch.float64)
    k = q.clone() if same else torch.randn(m, d, generator=gen, dtype=torch.float64)
    scale = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5) if cfg.get("row_scale") else \
        torch.tensor(2.5, dtype=torch.float64)
    bias = torch.tensor(-0.7, dtype=torch.float64)
    extra = torch.randn(5, d, generator=gen, dtype=torch.float64)
    margin_rows = torch.rand(n, generator=gen, dtype=torch.float64) - 0.5
    kw = dict(exclude_self=cfg.get("exclude_self", False), exclude_positives=cfg.get("exclude_positives", False),
              margin=cfg.get("margin", 0.0), mode=cfg.get("mode", "softmax"))
    if cfg["positives"] == "targets":
        t = torch.randint(0, m, (n,), generator=gen)
        if cfg.get("ignore"):
            t[::3] = -100
        kw["targets"] = t
    elif cfg["positives"] == "multi":  # up to 3 positives per row, -1 padding, some rows with none
        t = torch.randint(0, m, (n, 3), generator=gen)
        t[torch.rand(n, 3, generator=gen) < 0.4] = -1
        t[::4] = -1
        kw["targets"] = t
    elif cfg["positives"] == "labels":
        kw["labels_q"] = _labels(n, 3, gen)
        kw["labels_k"] = kw["labels_q"].clone() if same else _labels(m, 3, gen)
    if cfg.get("threshold"):  # keeps about half of the negatives of each row
        kw["neg_threshold"] = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 2.5 * d ** 0.5
    outs = SOFTMAX_OUTS + (("row_sigmoid",) if kw["mode"] == "sigmoid" else ())
    if cfg.get("positives") is None:
        outs = ("row_lse", "col_lse")
    use_extra = cfg.get("extra", False)
    row_margin = cfg.get("row_margin", False)

    def make(fn):
        def call(q, k, scale, bias, extra, margin_rows):
            if same:
                k = q  # one tensor: its gradient collects both roles
            kw_call = dict(kw, margin=margin_rows) if row_margin else kw
            res = fn(q, k, scale, bias, extra if use_extra else None, kw_call)
            return tuple(res[o] if isinstance(res, dict) else getattr(res, o) for o in outs)
        return call

    return [q, k, scale, bias, extra, margin_rows], make, kw, outs


GRAD_INPUTS = [0, 1, 2, 3, 5]  # q, k, scale, bias, per-row margin (the extra block is a no-grad queue)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 4), (37, 50, 9), (33, 33, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_matches_reference(backend, config, shape, dtype):
    cfg = CONFIGS[config]
    inputs, make, kw, outs = build(cfg, *shape)
    fn = make(lambda q, k, s, b, e, kw: contrastive_lse(q, k, s, b, extra_k=e, outputs=outs, backend=backend, **kw))
    ref = make(lambda q, k, s, b, e, kw: ref_contrastive(q, k, s, b, extra_k=e, **kw))
    # the extra block is a no-grad queue here; its gradient path is tested separately
    check_against_reference(fn, ref, inputs, dtype, grad_inputs=GRAD_INPUTS, naive=ref,
                            name=f"{backend} {config} {shape}")


@pytest.mark.interpret
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", [(1, 1, 3), (19, 37, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_triton_interpreter_matches_reference(config, shape, dtype):
    cfg = CONFIGS[config]
    inputs, make, kw, outs = build(cfg, *shape)
    fn = make(lambda q, k, s, b, e, kw: contrastive_lse(q, k, s, b, extra_k=e, outputs=outs, backend="triton", **kw))
    ref = make(lambda q, k, s, b, e, kw: ref_contrastive(q, k, s, b, extra_k=e, **kw))
    check_against_reference(fn, ref, inputs, dtype, grad_inputs=GRAD_INPUTS, naive=ref,
                            name=f"triton {config} {shape}")


def _require_cuda_backend():
    if "cuda" not in flashloss._backend.registered_ops()["contrastive_lse"].impls:
        pytest.skip("the cuda backend of contrastive_lse is not registered: flashloss._C was built without "
                    "CUDA kernels (needs a CUDA build of torch and nvcc at install time)")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch", "cuda"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", [(1, 1, 3), (37, 50, 9), (300, 257, 96), (129, 1000, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_matches_reference(backend, config, shape, dtype):
    if backend == "cuda":
        _require_cuda_backend()
    cfg = CONFIGS[config]
    inputs, make, kw, outs = build(cfg, *shape)
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    fn = make(lambda q, k, s, b, e, kw: contrastive_lse(q, k, s, b, extra_k=e, outputs=outs, backend=backend, **kw))
    ref = make(lambda q, k, s, b, e, kw: ref_contrastive(q, k, s, b, extra_k=e, **kw))
    check_against_reference(fn, ref, [x.cuda() for x in inputs], dtype, grad_inputs=GRAD_INPUTS, naive=ref,
                            name=f"{backend} {config} {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_extra_columns_with_gradient(backend):
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(20, 6, generator=gen, dtype=torch.float64), torch.randn(18, 6, generator=gen, dtype=torch.float64)
    hard, queue = torch.randn(11, 6, generator=gen, dtype=torch.float64), torch.randn(9, 6, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 18, (20,), generator=gen)

    def fn(q, k, hard):
        r = contrastive_lse(q, k, 3.0, targets=t, extra_k=[queue.to(q.dtype), hard], outputs=SOFTMAX_OUTS,
                            backend=backend)
        return tuple(getattr(r, o) for o in SOFTMAX_OUTS)

    def ref(q, k, hard):
        r = ref_contrastive(q, k, 3.0, targets=t, extra_k=[queue, hard])
        return tuple(r[o] for o in SOFTMAX_OUTS)

    check_against_reference(fn, ref, [q, k, hard], torch.float32, name="extra columns with grad")
    # MoCo: neither k (momentum encoder) nor the queue carries gradient; only q gets one
    qq = q.clone().requires_grad_(True)
    r = contrastive_lse(qq, k, 3.0, targets=t, extra_k=queue, backend=backend)
    (r.row_lse - r.pos_sum).sum().backward()
    q2 = q.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(3.0 * q2 @ torch.cat([k, queue]).T, t, reduction="sum").backward()
    torch.testing.assert_close(qq.grad, q2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(11, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (9,), generator=gen)

    def f(q, k, s, b):
        r = contrastive_lse(q, k, s, b, targets=t, outputs=SOFTMAX_OUTS, backend=backend)
        return r.row_lse, r.col_lse, r.pos_sum, r.col_pos_sum

    assert torch.autograd.gradcheck(f, (q, k, s, b), eps=1e-6, atol=1e-8)

    def g(q, k, s, b):
        return contrastive_lse(q, k, s, b, targets=t, mode="sigmoid", outputs=("row_sigmoid",),
                               backend=backend).row_sigmoid

    assert torch.autograd.gradcheck(g, (q, k, s, b), eps=1e-6, atol=1e-8)


def test_bias_gradient_of_a_softmax_loss_is_zero():
    q, k = torch.randn(12, 5), torch.randn(12, 5)
    b = torch.tensor(0.3, requires_grad=True)
    r = contrastive_lse(q, k, 2.0, b, targets=torch.arange(12))
    (r.row_lse - r.pos_sum).mean().backward()
    assert b.grad is not None and abs(b.grad.item()) < 1e-6


def test_compile_fullgraph():
    q = torch.randn(10, 4, requires_grad=True)
    k = torch.randn(10, 4, requires_grad=True)
    t = torch.arange(10)

    def loss(q, k):
        r = contrastive_lse(q, k, 2.0, targets=t, outputs=("row_lse", "pos_sum"))
        return (r.row_lse - r.pos_sum).mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(q, k).backward()
    want = torch.autograd.grad(torch.nn.functional.cross_entropy(2.0 * q @ k.T, t), q)[0]
    torch.testing.assert_close(q.grad, want)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(k=torch.randn(5, 4)), ValueError, "same feature dimension"),
        (dict(k=torch.randn(5, 3, dtype=torch.float64)), TypeError, "k must have dtype"),
        (dict(targets=torch.tensor([0, 1, 9])), IndexError, r"targets must be in \[0, 5\)"),
        (dict(targets=torch.tensor([0, 1])), ValueError, "targets must have shape"),
        (dict(targets=torch.tensor([0.0, 1.0, 2.0])), TypeError, "targets must have dtype"),
        (dict(targets=torch.tensor([[0, -1], [1, 5], [2, -100]])), IndexError, r"targets must be in \[0, 5\) or -1"),
        (dict(targets=torch.tensor([[0, -2], [1, 2], [2, 3]])), IndexError, "got -2"),
        (dict(targets=torch.tensor([0, -1, 2])), IndexError, r"or -100 \(ignored\); got -1"),
        (dict(targets=torch.zeros(3, 2, 2, dtype=torch.long)), ValueError, "targets must be 1-D or 2-D"),
        (dict(neg_threshold=torch.zeros(4)), ValueError, r"neg_threshold must be a float or a \[N=3\]"),
        (dict(neg_threshold=torch.zeros(3, dtype=torch.long)), TypeError, "neg_threshold must have dtype"),
        (dict(neg_threshold=torch.zeros(3, device="meta")), ValueError, "neg_threshold must be on device cpu"),
        (dict(labels_q=torch.tensor([0, 1, 1]), labels_k=torch.tensor([0, 1])), ValueError, "labels_k must have shape"),
        (dict(labels_q=torch.tensor([0, 1, 1])), ValueError, "go together"),
        (dict(scale=-1.0), ValueError, "scale must be > 0"),
        (dict(scale=torch.ones(2)), ValueError, "scale must be"),
        (dict(outputs=("row_lse", "nope")), ValueError, "outputs must be among"),
        (dict(outputs=("row_sigmoid",)), ValueError, "needs mode='sigmoid'"),
        (dict(exclude_positives=True), ValueError, "needs targets or labels"),
        (dict(extra_k=torch.randn(2, 7)), ValueError, r"extra_k\[0\] must have feature dimension"),
        (dict(backend="cuda"), BackendUnavailableError, "cuda"),
        (dict(k=torch.randn(5, 3, device="meta")), ValueError, "k must be on device cpu"),
        (dict(targets=torch.tensor([0, 1, 2], device="meta")), ValueError, "targets must be on device cpu"),
        (dict(scale=torch.tensor(2.0, device="meta")), ValueError, "scale must be on device cpu"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = dict(q=torch.randn(3, 3), k=torch.randn(5, 3))
    args.update(kwargs)
    q, k = args.pop("q"), args.pop("k")
    with pytest.raises(err, match=match):
        contrastive_lse(q, k, **args)


@pytest.mark.interpret
def test_triton_is_deterministic_without_atomics():
    inputs, make, kw, outs = build(CONFIGS["targets"], 40, 45, 24)
    q, k, s, b, _, _ = [x.float().requires_grad_(True) for x in inputs]
    runs = []
    for _ in range(2):
        r = contrastive_lse(q, k, s, b, outputs=outs, backend="triton", **kw)
        grads = torch.autograd.grad(sum((getattr(r, o) * (i + 1)).sum() for i, o in enumerate(outs)), (q, k, s, b))
        runs.append([getattr(r, o) for o in outs] + list(grads))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["targets", "labels_exclude_self", "sigmoid", "row_margin",
                                    "multi_targets_exclude_positives", "neg_threshold_labels_sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_is_deterministic_without_atomics(config, dtype):
    """Two runs give bitwise-equal statistics and gradients (no atomics; dbias reduced in a fixed order)."""
    _require_cuda_backend()
    inputs, make, kw, outs = build(CONFIGS[config], 300, 257, 96)
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    tensors = [x.cuda().to(dtype if i < 2 or i == 4 else torch.float32).requires_grad_(True)
               for i, x in enumerate(inputs)]
    fn = make(lambda q, k, s, b, e, kw: contrastive_lse(q, k, s, b, extra_k=e, outputs=outs, backend="cuda", **kw))
    runs = []
    for _ in range(2):
        res = fn(*tensors)
        loss = sum((r.double() * (i + 1)).sum() for i, r in enumerate(res))
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)  # unused inputs (extra block) give None
        runs.append(list(res) + [g for g in grads if g is not None])
    assert len(runs[0]) == len(runs[1])
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.gpu
def test_cuda_large_bf16_matches_torch_backend(monkeypatch):
    """N = M = 4096, D = 256 in bf16 (many tiles, several D chunks): the cuda backend against the torch
    backend (fp32 accumulation of the same bf16 inputs), every output and gradient."""
    _require_cuda_backend()
    from helpers import rel_err

    monkeypatch.setattr(ops_mod, "TILE", None)  # the torch backend's default tiles, not the tests' 16

    gen = torch.Generator(device="cuda").manual_seed(11)
    n, d = 4096, 256
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, device="cuda"), dim=1).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, device="cuda"), dim=1).bfloat16()
    scale = torch.tensor(14.3, device="cuda")
    bias = torch.tensor(-0.5, device="cuda")
    targets = torch.arange(n, device="cuda")
    targets[::17] = -100
    upstream = [torch.randn(n, generator=gen, device="cuda") for _ in SOFTMAX_OUTS]
    results = {}
    for backend in ("torch", "cuda"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, scale, bias)]
        r = contrastive_lse(*leaves, targets=targets, outputs=SOFTMAX_OUTS, backend=backend)
        outs = [getattr(r, o) for o in SOFTMAX_OUTS]
        grads = torch.autograd.grad(outs, leaves, grad_outputs=upstream)
        results[backend] = outs + list(grads)
    names = list(SOFTMAX_OUTS) + ["dq", "dk", "dscale", "dbias"]
    for name, got, want in zip(names, results["cuda"], results["torch"]):
        err = rel_err(got, want)
        assert err <= 2e-2, f"{name}: relative error {err:.3e} against the torch backend"
