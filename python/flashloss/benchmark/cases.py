"""The built-in benchmark cases. Each primitive adds its case here when it lands, with the naive
reference, every flashloss backend and the installed peer libraries as implementations."""
from __future__ import annotations

import torch

from .. import _backend
from .harness import BenchCase, Impl, Size, register_case

FLASHLOSS_BACKENDS = ("torch", "cpu", "cuda", "triton")


def flashloss_available(backend: str):
    def check(device: str) -> tuple[bool, str]:
        if backend == "triton" and device == "cpu":
            return False, "the Triton interpreter is a test tool; its timings mean nothing"
        return _backend.backend_available(backend, device)

    return check


def _seed(size: Size) -> torch.Generator:
    return torch.Generator().manual_seed(sum(size.values()))


# ---------------------------------------------------------------------------------------------
# row_logsumexp: x [N, V] -> lse [N], forward + backward with a random upstream gradient


def _lse_inputs(size: Size, device: str, dtype: torch.dtype):
    gen = _seed(size)
    x = torch.randn(size["N"], size["V"], generator=gen).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.randn(size["N"], generator=gen).to(device=device, dtype=acc)
    return x, g


def _lse_setup(fn):
    def setup(size: Size, device: str, dtype: torch.dtype):
        x, g = _lse_inputs(size, device, dtype)

        def run():
            out = fn(x)
            (gx,) = torch.autograd.grad(out, x, g.to(out.dtype))
            return gx

        return run

    return setup


def _lse_naive(x):
    # what a plain PyTorch user writes (flashloss.ref.row_logsumexp is the test oracle, which also
    # pins the gradient of fully masked rows and is slower)
    return torch.logsumexp(x.float(), dim=-1)


def _lse_flashloss(backend: str):
    def fn(x):
        from ..ops import row_logsumexp

        return row_logsumexp(x, backend=backend)

    return fn


def _lse_naive_bytes(size: Size, device: str, dtype: torch.dtype) -> float:
    # x, (x - m), exp(...) kept for backward, the gradient: ~4 full N*V fp32 tensors
    return 4.0 * size["N"] * size["V"] * 4


register_case(BenchCase(
    name="row_logsumexp",
    description="row-wise log-sum-exp over V, forward + backward (the online-LSE core)",
    sizes_quick=[{"N": 2048, "V": v} for v in (8192, 32768, 131072)],
    sizes_full=[{"N": 4096, "V": v} for v in (8192, 32768, 131072, 262144)],
    flops=lambda s: 4.0 * s["N"] * s["V"],  # exp + add forward, exp + mul backward
    min_bytes=lambda s, dt: 3.0 * s["N"] * s["V"] * torch.finfo(dt).bits / 8,  # read x twice, write dx
    x_key="V",
    warmup_size={"N": 8, "V": 64},
    impls=[
        Impl("naive", "naive", _lse_setup(_lse_naive), estimate_bytes=_lse_naive_bytes),
    ] + [
        Impl(f"flashloss[{b}]", "flashloss", _lse_setup(_lse_flashloss(b)), flashloss_available(b))
        for b in FLASHLOSS_BACKENDS
    ],
))



# ---------------------------------------------------------------------------------------------
# clip_loss: symmetric CLIP loss, forward + backward (gradients to both towers and logit_scale)


def _clip_inputs(size: Size, device: str, dtype: torch.dtype):
    gen = _seed(size)
    n, d = size["N"], size["D"]
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1).to(device=device, dtype=dtype)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1).to(device=device, dtype=dtype)
    scale = torch.tensor(14.0, device=device)
    return img.requires_grad_(True), txt.requires_grad_(True), scale.requires_grad_(True)


def _clip_setup(make_fn):
    def setup(size: Size, device: str, dtype: torch.dtype):
        img, txt, scale = _clip_inputs(size, device, dtype)
        fn = make_fn()

        def run():
            return torch.autograd.grad(fn(img, txt, scale), (img, txt, scale))

        return run

    return setup


def _clip_naive():
    def fn(img, txt, scale):  # what open_clip and most training code write
        logits = scale * img @ txt.T
        labels = torch.arange(img.shape[0], device=img.device)
        return (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.T, labels)) / 2

    return fn


def _installed(module: str, hint: str):
    def check(device: str) -> tuple[bool, str]:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            return False, f"{hint} is not installed"
        return True, ""

    return check


def _clip_open_clip():
    from .anchors import open_clip_loss_module

    loss = open_clip_loss_module().ClipLoss()
    return lambda img, txt, scale: loss(img, txt, scale)


def _clip_inf_cl():
    """Inf-CL (DAMO-NLP-SG/Inf-CLIP): `cal_inf_loss(q, k, labels, scale)` is one direction's mean
    cross-entropy (Triton, CUDA only, head_dim tiles of 256); CLIP averages both directions."""
    from inf_cl import cal_inf_loss

    def fn(img, txt, scale):
        return 0.5 * (cal_inf_loss(img, txt, scale=scale) + cal_inf_loss(txt, img, scale=scale))

    return fn


def _cuda_and(check):
    def both(device: str) -> tuple[bool, str]:
        if device != "cuda":
            return False, "runs on CUDA only"
        return check(device)

    return both


def _clip_flashloss(backend: str):
    def make():
        from ..contrastive import clip_loss

        return lambda img, txt, scale: clip_loss(img, txt, scale, backend=backend)

    return make


def _square_bytes(factor: float):
    # the dense losses hold ~factor N x N fp32 matrices at their peak
    return lambda size, device, dtype: factor * size["N"] ** 2 * 4


register_case(BenchCase(
    name="clip_loss",
    description="symmetric CLIP loss (open_clip ClipLoss), forward + backward, D=256",
    sizes_quick=[{"N": n, "D": 256} for n in (2048, 4096, 8192)],
    sizes_full=[{"N": n, "D": 256} for n in (4096, 8192, 16384, 32768)],
    flops=lambda s: 8.0 * s["N"] * s["N"] * s["D"],  # 2NMD forward + 4NMD backward + 2NMD recompute
    min_bytes=lambda s, dt: 4.0 * s["N"] * s["D"] * torch.finfo(dt).bits / 8,  # read q, k; write dq, dk
    x_key="N",
    warmup_size={"N": 64, "D": 256},
    impls=[
        Impl("naive", "naive", _clip_setup(_clip_naive), estimate_bytes=_square_bytes(5)),
        Impl("open_clip", "peer", _clip_setup(_clip_open_clip), _installed("open_clip", "open_clip_torch"),
             estimate_bytes=_square_bytes(5)),
        Impl("inf_cl", "peer", _clip_setup(_clip_inf_cl), _cuda_and(_installed("inf_cl", "Inf-CL (inf_cl)"))),
    ] + [
        Impl(f"flashloss[{b}]", "flashloss", _clip_setup(_clip_flashloss(b)), flashloss_available(b))
        for b in FLASHLOSS_BACKENDS
    ],
))


# ---------------------------------------------------------------------------------------------
# nt_xent: SimCLR loss over 2N views (pytorch-metric-learning NTXentLoss), forward + backward


def _ntxent_setup(make_fn):
    def setup(size: Size, device: str, dtype: torch.dtype):
        gen = _seed(size)
        emb = torch.randn(2 * size["N"], size["D"], generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
        labels = torch.arange(size["N"], device=device).repeat(2)
        fn = make_fn()

        def run():
            return torch.autograd.grad(fn(emb, labels), emb)

        return run

    return setup


def _ntxent_naive():
    def fn(emb, labels, t=0.07):
        z = torch.nn.functional.normalize(emb, dim=-1)
        s = (z @ z.T / t).fill_diagonal_(float("-inf"))
        n = emb.shape[0] // 2
        partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(emb.device)
        return torch.nn.functional.cross_entropy(s, partner)

    return fn


def _ntxent_pml():
    from pytorch_metric_learning.losses import NTXentLoss

    loss = NTXentLoss(temperature=0.07)
    return lambda emb, labels: loss(emb, labels)


def _ntxent_flashloss(backend: str):
    def make():
        from ..contrastive import nt_xent

        return lambda emb, labels: nt_xent(emb, labels=labels, temperature=0.07, backend=backend)

    return make


register_case(BenchCase(
    name="nt_xent",
    description="NT-Xent / SimCLR over 2N views (PML NTXentLoss semantics), forward + backward, D=128",
    sizes_quick=[{"N": n, "D": 128} for n in (256, 1024, 2048)],
    sizes_full=[{"N": n, "D": 128} for n in (256, 512, 1024, 2048, 4096, 8192)],
    flops=lambda s: 8.0 * (2 * s["N"]) ** 2 * s["D"],
    min_bytes=lambda s, dt: 2.0 * 2 * s["N"] * s["D"] * torch.finfo(dt).bits / 8,
    x_key="N",
    warmup_size={"N": 32, "D": 128},
    impls=[
        Impl("naive", "naive", _ntxent_setup(_ntxent_naive), estimate_bytes=lambda s, d, t: 5 * (2 * s["N"]) ** 2 * 4),
        Impl("pytorch-metric-learning", "peer", _ntxent_setup(_ntxent_pml),
             _installed("pytorch_metric_learning", "pytorch-metric-learning"),
             # PML builds a [positive pairs, negative pairs] matrix: O(N^3)
             estimate_bytes=lambda s, d, t: 2 * (2 * s["N"]) ** 3 * 4),
    ] + [
        Impl(f"flashloss[{b}]", "flashloss", _ntxent_setup(_ntxent_flashloss(b)), flashloss_available(b))
        for b in FLASHLOSS_BACKENDS
    ],
))


# ---------------------------------------------------------------------------------------------
# clip_loss at the GPU target of issue #4: N = M = 65536, D = 512, bf16, forward + backward.
# CUDA only (on a CPU every implementation reports "runs on CUDA only"); the target is >= 50% of
# the measured bf16 matmul rate counting 8 N M D FLOPs, and faster than Inf-CL at equal memory.


def _always(device: str) -> tuple[bool, str]:
    return True, ""


register_case(BenchCase(
    name="clip_loss_gpu_target",
    description="symmetric CLIP loss at N=65536, D=512 (GPU target), forward + backward",
    sizes_quick=[{"N": 65536, "D": 512}],
    sizes_full=[{"N": n, "D": 512} for n in (16384, 32768, 65536)],
    flops=lambda s: 8.0 * s["N"] * s["N"] * s["D"],
    min_bytes=lambda s, dt: 4.0 * s["N"] * s["D"] * torch.finfo(dt).bits / 8,
    x_key="N",
    warmup_size={"N": 1024, "D": 512},
    impls=[
        Impl("naive", "naive", _clip_setup(_clip_naive), _cuda_and(_always), estimate_bytes=_square_bytes(5)),
        Impl("inf_cl", "peer", _clip_setup(_clip_inf_cl), _cuda_and(_installed("inf_cl", "Inf-CL (inf_cl)"))),
    ] + [
        Impl(f"flashloss[{b}]", "flashloss", _clip_setup(_clip_flashloss(b)), _cuda_and(flashloss_available(b)))
        for b in FLASHLOSS_BACKENDS if b != "cpu"
    ],
))


# ---------------------------------------------------------------------------------------------
# Primitive B: per-token log-probs and cross-entropy through the lm_head.
# Inputs: hidden [N, H], lm_head weight [V, H] (scaled so that logits are O(1)), targets [N] with no
# ignored token (flashloss drops ignored rows before the matmul; a fair comparison has none).


def flashloss_op_available(op: str, backend: str):
    """flashloss_available, and `op` must have an implementation for `backend`: the backends of a
    primitive land one at a time, and a missing one is reported, not run into an error."""
    generic = flashloss_available(backend)

    def check(device: str) -> tuple[bool, str]:
        from .. import ops  # noqa: F401  (registers every op)

        entry = _backend.registered_ops().get(op)
        if entry is None:
            return False, f"flashloss has no op {op!r}"
        if backend not in entry.impls:
            return False, f"{op} has no {backend} backend yet (has: {', '.join(sorted(entry.impls))})"
        return generic(device)

    return check


def _lm_inputs(size: Size, device: str, dtype: torch.dtype):
    n, h, v = size["N"], size["H"], size["V"]
    gen = torch.Generator(device=device).manual_seed(sum(size.values()))
    f = dict(generator=gen, device=device)
    hidden = torch.randn(n, h, **f).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, **f) * h ** -0.5).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), **f)
    g = torch.randn(n, **f)  # per-token upstream gradient: random, never ones
    return hidden, weight, targets, g


def _tlp_setup(make_fn):
    """run() = per-token logp [N] (fp32) -> backward with a random per-token upstream gradient."""
    def setup(size: Size, device: str, dtype: torch.dtype):
        hidden, weight, targets, g = _lm_inputs(size, device, dtype)
        fn = make_fn()

        def run():
            logp = fn(hidden, weight, targets)
            return torch.autograd.grad(logp, (hidden, weight), g.to(logp.dtype))

        return run

    return setup


def _tlp_naive():
    """The plain-PyTorch trainer path, as in flashloss.ref: the whole logits, their log_softmax (in
    fp32), a gather. Written out rather than calling the oracle: flashloss.ref.token_logprobs also
    computes LSE, entropy, sum of logits and log sum p^2 over the whole logits, and ref.logits
    applies logit_scale and temperature as two more full passes even when they are 1; either would
    overstate the naive cost."""
    def fn(hidden, weight, targets):
        z = hidden @ weight.T
        return torch.log_softmax(z.float(), dim=-1).gather(-1, targets[:, None])[:, 0]

    return fn


TRL_SEQ_LEN = 512


def _tlp_trl():
    """TRL 1.x: logits = hidden @ W^T as [B, T, V] (T = 512 tokens per sequence, as the trainers
    call it), then `selective_log_softmax(logits, targets)`. On CPU fp32 that is a gather and a
    logsumexp per sequence; on CUDA TRL switches to its fused Triton log-prob kernel."""
    from trl.trainer.utils import selective_log_softmax

    def fn(hidden, weight, targets):
        n = hidden.shape[0]
        t = TRL_SEQ_LEN if n % TRL_SEQ_LEN == 0 else n
        logits = (hidden @ weight.T).view(n // t, t, -1)
        return selective_log_softmax(logits, targets.view(n // t, t)).reshape(n)

    return fn


def _tlp_trl_chunked():
    """TRL 1.x's own fused LM head (`trl.kernels.ChunkedLogProbFunction`, what `add_fused_lm_head`
    runs inside DPOTrainer/GRPOTrainer): cuBLAS/BLAS tiles of [tokens, 32768 vocabulary] folded
    into online-LSE statistics (a Triton kernel on CUDA, torch ops elsewhere), recompute in backward.
    Only log_probs requested."""
    from trl.kernels import ChunkedLogProbFunction

    return lambda hidden, weight, targets: ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768,
                                                                        None, 1.0, ())[0]


def _tlp_cce(impl: str):
    """Cut Cross-Entropy: `linear_cross_entropy(e, c, targets, reduction='none')` is -logp per
    token. impl 'cce' is its Triton kernel (CUDA; default filter_eps='high' gradient filtering);
    'torch_compile' is its portable path: torch.compile of the dense logits + cross_entropy."""
    def make():
        from cut_cross_entropy import linear_cross_entropy

        return lambda hidden, weight, targets: -linear_cross_entropy(hidden, weight, targets,
                                                                     reduction="none", impl=impl)

    return make


def _tlp_liger():
    """Liger-Kernel's fused linear cross-entropy with reduction='none' (-logp per token; since 0.8.5
    the per-token upstream gradient is applied in a recomputing backward). Triton, CUDA only."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda hidden, weight, targets: -liger_fused_linear_cross_entropy(hidden, weight, targets,
                                                                             reduction="none")


def _tlp_flashloss(backend: str):
    def make():
        from ..ops import token_logprobs

        return lambda hidden, weight, targets: token_logprobs(hidden, weight, targets, backend=backend).logp

    return make


def _lm_flops(size: Size) -> float:
    # useful work, the same count for every implementation: forward logits 2NHV, backward
    # dhidden 2NHV + dweight 2NHV (recomputing implementations do 8NHV; the dense ones 6NHV)
    return 6.0 * size["N"] * size["H"] * size["V"]


def _lm_min_bytes(size: Size, dtype: torch.dtype) -> float:
    # read hidden and weight once, write their gradients once; targets (int64), upstream gradient
    # and output (fp32) per token
    n, h, v = size["N"], size["H"], size["V"]
    return 2.0 * (n * h + v * h) * torch.finfo(dtype).bits / 8 + n * (8 + 4 + 4)


def _logits_bytes(factor: float):
    # the dense paths hold ~factor N x V fp32 tensors at their peak (logits, log_softmax, gradients)
    return lambda size, device, dtype: factor * size["N"] * size["V"] * 4


def _cce_installed():
    return _installed("cut_cross_entropy", "cut-cross-entropy")


def _liger_installed():
    return _installed("liger_kernel", "Liger-Kernel (liger-kernel)")


_LM_SIZES_QUICK = [{"N": 512, "H": 256, "V": 8192}]
# the CPU target of issue #5 is N=4096, H=1024, V=32768 (fp32)
_LM_SIZES_FULL = [{"N": 4096, "H": 1024, "V": v} for v in (8192, 32768, 131072)]


def _tlp_impls(cuda_only: bool = False) -> list[Impl]:
    gate = _cuda_and if cuda_only else (lambda check: check)
    backends = [b for b in FLASHLOSS_BACKENDS if not (cuda_only and b == "cpu")]
    return [
        Impl("naive", "naive", _tlp_setup(_tlp_naive), gate(_always), estimate_bytes=_logits_bytes(4)),
        Impl("trl_selective_log_softmax", "peer", _tlp_setup(_tlp_trl), gate(_installed("trl", "trl")),
             estimate_bytes=_logits_bytes(4)),
        Impl("trl_chunked", "peer", _tlp_setup(_tlp_trl_chunked), gate(_installed("trl", "trl"))),
        Impl("cce", "peer", _tlp_setup(_tlp_cce("cce")), _cuda_and(_cce_installed())),
        Impl("cce[torch_compile]", "peer", _tlp_setup(_tlp_cce("torch_compile")), gate(_cce_installed()),
             estimate_bytes=_logits_bytes(4)),
        Impl("liger", "peer", _tlp_setup(_tlp_liger), _cuda_and(_liger_installed())),
    ] + [
        Impl(f"flashloss[{b}]", "flashloss", _tlp_setup(_tlp_flashloss(b)),
             gate(flashloss_op_available("token_logprobs", b)))
        for b in backends
    ]


register_case(BenchCase(
    name="token_logprobs",
    description=("per-token log p(target) from hidden [N,H] and lm_head [V,H] (primitive B), forward + "
                 "backward with a random per-token upstream gradient; FLOPs counted 6NHV for all"),
    sizes_quick=_LM_SIZES_QUICK,
    sizes_full=_LM_SIZES_FULL,
    flops=_lm_flops,
    min_bytes=_lm_min_bytes,
    x_key="V",
    warmup_size={"N": 64, "H": 32, "V": 256},
    impls=_tlp_impls(),
    in_quick_report=False,  # ~1 minute alone at its quick size (TRL import, torch.compile): --full or --case
))

# GPU target of issue #5: N=16384 tokens, H=4096, V=128256 (Llama 3 vocabulary), bf16. CUDA only
# (on a CPU every implementation reports "runs on CUDA only").
register_case(BenchCase(
    name="token_logprobs_gpu_target",
    description="per-token log-probs at N=16384, H=4096, V=128256 (GPU target), forward + backward, bf16",
    sizes_quick=[{"N": 16384, "H": 4096, "V": 128256}],
    sizes_full=[{"N": n, "H": 4096, "V": 128256} for n in (4096, 8192, 16384)],
    flops=_lm_flops,
    min_bytes=_lm_min_bytes,
    x_key="N",
    warmup_size={"N": 64, "H": 64, "V": 256},
    impls=_tlp_impls(cuda_only=True),
    in_quick_report=False,
))


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy: mean cross-entropy of hidden @ W^T against targets, scalar loss, forward +
# backward (the SFT / pretraining loss).


def _lce_setup(make_fn):
    def setup(size: Size, device: str, dtype: torch.dtype):
        hidden, weight, targets, _ = _lm_inputs(size, device, dtype)
        fn = make_fn()

        def run():
            return torch.autograd.grad(fn(hidden, weight, targets), (hidden, weight))

        return run

    return setup


def _lce_naive():
    # what HF-style trainers do: the whole logits, upcast, torch's cross_entropy
    return lambda hidden, weight, targets: torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets)


def _lce_cce(impl: str):
    def make():
        from cut_cross_entropy import linear_cross_entropy

        return lambda hidden, weight, targets: linear_cross_entropy(hidden, weight, targets, impl=impl)

    return make


def _lce_liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda hidden, weight, targets: liger_fused_linear_cross_entropy(hidden, weight, targets)


def _lce_flashloss(backend: str):
    def make():
        import flashloss

        lce = flashloss.linear_cross_entropy
        return lambda hidden, weight, targets: lce(hidden, weight, targets, backend=backend)

    return make


def _lce_flashloss_available(backend: str):
    """flashloss.linear_cross_entropy runs on primitive B: it needs that function and the backend
    of token_logprobs."""
    op_check = flashloss_op_available("token_logprobs", backend)

    def check(device: str) -> tuple[bool, str]:
        import flashloss

        if not callable(getattr(flashloss, "linear_cross_entropy", None)):
            return False, "flashloss.linear_cross_entropy does not exist in this version"
        return op_check(device)

    return check


register_case(BenchCase(
    name="linear_cross_entropy",
    description=("mean cross-entropy of hidden [N,H] @ lm_head [V,H]^T against targets, scalar loss, "
                 "forward + backward; FLOPs counted 6NHV for all"),
    sizes_quick=_LM_SIZES_QUICK,
    sizes_full=_LM_SIZES_FULL,
    flops=_lm_flops,
    min_bytes=_lm_min_bytes,
    x_key="V",
    warmup_size={"N": 64, "H": 32, "V": 256},
    impls=[
        Impl("naive", "naive", _lce_setup(_lce_naive), estimate_bytes=_logits_bytes(4)),
        Impl("cce", "peer", _lce_setup(_lce_cce("cce")), _cuda_and(_cce_installed())),
        Impl("cce[torch_compile]", "peer", _lce_setup(_lce_cce("torch_compile")), _cce_installed(),
             estimate_bytes=_logits_bytes(4)),
        Impl("liger", "peer", _lce_setup(_lce_liger), _cuda_and(_liger_installed())),
    ] + [
        Impl(f"flashloss[{b}]", "flashloss", _lce_setup(_lce_flashloss(b)), _lce_flashloss_available(b))
        for b in FLASHLOSS_BACKENDS
    ],
    in_quick_report=False,
))


# ---------------------------------------------------------------------------------------------
# dpo_fused: DPO (sigmoid) from hidden states, forward + backward, with a forward-only reference
# from its own hidden states and lm_head (issue #6). Sizes: B pairs, T tokens per sequence, H, V;
# the first half of every sequence is prompt (labels = ignore_index), the second half completion.
# Policy hidden [2B, T, H] (chosen rows first) and weight [V, H] require grad; the reference's do not.

_DPO_BETA = 0.1


def _dpo_inputs(size: Size, device: str, dtype: torch.dtype):
    b, t, h, v = size["B"], size["T"], size["H"], size["V"]
    gen = torch.Generator(device=device).manual_seed(sum(size.values()))
    f = dict(generator=gen, device=device)
    hidden = torch.randn(2 * b, t, h, **f).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, **f) * h ** -0.5).to(dtype).requires_grad_(True)
    ref_hidden = (hidden.detach().float() + 0.1 * torch.randn(2 * b, t, h, **f)).to(dtype)
    ref_weight = (weight.detach().float() + 0.1 * h ** -0.5 * torch.randn(v, h, **f)).to(dtype)
    labels = torch.randint(0, v, (2 * b, t), **f)
    labels[:, : t // 2] = -100  # prompt
    return hidden, weight, ref_hidden, ref_weight, labels


def _dpo_setup(make_fn):
    """run() = DPO sigmoid loss (scalar) -> gradients w.r.t. policy hidden and weight."""
    def setup(size: Size, device: str, dtype: torch.dtype):
        hidden, weight, ref_hidden, ref_weight, labels = _dpo_inputs(size, device, dtype)
        fn = make_fn()

        def run():
            return torch.autograd.grad(fn(hidden, weight, ref_hidden, ref_weight, labels), (hidden, weight))

        return run

    return setup


def _dpo_naive():
    """The plain-PyTorch trainer path: the whole logits of policy and reference ([2B, T, V]), log_softmax
    in fp32, a gather of the shifted labels, masked sums per sequence, the DPO sigmoid loss."""
    def seq_logps(hidden, weight, labels):
        logits = (hidden @ weight.T)[:, :-1].float()
        targets = labels[:, 1:]
        mask = targets != -100
        lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        return (lp * mask).sum(1)

    def fn(hidden, weight, ref_hidden, ref_weight, labels):
        chosen, rejected = seq_logps(hidden, weight, labels).chunk(2)
        with torch.no_grad():
            ref_chosen, ref_rejected = seq_logps(ref_hidden, ref_weight, labels).chunk(2)
        h = _DPO_BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))
        return -torch.nn.functional.logsigmoid(h).mean()

    return fn


def _dpo_liger():
    """Liger-Kernel's `LigerFusedLinearDPOLoss` (chunked_loss; torch.compile'd chunks, CUDA only here):
    forward(lin_weight, input, target, bias, ref_input, ref_weight) on the shifted inputs, chosen
    rows first; returns (loss, aux)."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(beta=_DPO_BETA, use_ref_model=True)

    def fn(hidden, weight, ref_hidden, ref_weight, labels):
        return loss_fn(weight, hidden[:, :-1], labels[:, 1:], None, ref_hidden[:, :-1], ref_weight)[0]

    return fn


def _dpo_flashloss(backend: str):
    def make():
        from ..fused_preference import FusedLinearPreferenceLoss

        loss_fn = FusedLinearPreferenceLoss("sigmoid", beta=_DPO_BETA, backend=backend)

        def fn(hidden, weight, ref_hidden, ref_weight, labels):
            return loss_fn(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)[0]

        return fn

    return make


def _dpo_flops(size: Size) -> float:
    # useful work over all 2B T positions, the same count for every implementation: policy forward
    # logits + backward dhidden and dW = 6 (2B T) H V, reference forward = 2 (2B T) H V. flashloss
    # skips the prompt half of the rows (and recomputes the policy logits in backward), so its
    # achieved GFLOP/s in this count is not the rate of its kernels
    n = 2 * size["B"] * size["T"]
    return 8.0 * n * size["H"] * size["V"]


def _dpo_min_bytes(size: Size, dtype: torch.dtype) -> float:
    # read policy and reference hidden states and weights once, write the policy gradients once
    n, h, v = 2 * size["B"] * size["T"], size["H"], size["V"]
    return (3.0 * (n * h + v * h)) * torch.finfo(dtype).bits / 8 + n * 8


def _dpo_logits_bytes(size: Size, device: str, dtype: torch.dtype) -> float:
    # naive: policy logits, their fp32 log_softmax and its gradient, plus the reference's logits
    return 5.0 * 2 * size["B"] * size["T"] * size["V"] * 4


register_case(BenchCase(
    name="dpo_fused",
    description=("DPO sigmoid loss from hidden states [2B,T,H] and lm_head [V,H] with a forward-only reference "
                 "from its own hidden states and lm_head, half of every sequence prompt; forward + backward; "
                 "FLOPs counted 8 (2BT) H V for all (policy 6, reference 2)"),
    sizes_quick=[{"B": 2, "T": 128, "H": 256, "V": 4096}],
    # the CPU target of issue #6 is B=8 pairs, T=512, H=1024, V=32768 (fp32)
    sizes_full=[{"B": 8, "T": 512, "H": 1024, "V": 32768}],
    flops=_dpo_flops,
    min_bytes=_dpo_min_bytes,
    x_key="V",
    warmup_size={"B": 1, "T": 16, "H": 32, "V": 256},
    impls=[
        Impl("naive", "naive", _dpo_setup(_dpo_naive), estimate_bytes=_dpo_logits_bytes),
        Impl("liger", "peer", _dpo_setup(_dpo_liger), _cuda_and(_liger_installed())),
    ] + [
        Impl(f"flashloss[{b}]", "flashloss", _dpo_setup(_dpo_flashloss(b)),
             flashloss_op_available("token_logprobs", b))
        for b in FLASHLOSS_BACKENDS
    ],
    in_quick_report=False,  # the full size is minutes on a CPU; --full or --case
))


# ---------------------------------------------------------------------------------------------
# Primitive C: relaxed sorting networks (issue #7). sort_network: x [B, n] -> (sorted, P) through the
# odd-even network, cauchy, steepness 10, forward + backward with random upstream gradients on both
# sorted and P (the loss reads every entry of P, as diffsort's permutation loss does).


def _odd_even_dense_layers(n: int, device: str, dtype: torch.dtype):
    """diffsort's `odd_even_network(n)` matrices (split_a, split_b, combine_min, combine_max per
    layer; uncovered wires compare with themselves and recombine with weight 1/2)."""
    layers = []
    for layer in range(n):
        shifted, even = layer % 2 == 1, n % 2 == 0
        k = n // 2 + shifted if even else n // 2 + 1
        sa, sb = torch.zeros(k, n), torch.zeros(k, n)
        cmin, cmax = torch.zeros(n, k), torch.zeros(n, k)
        c = 0
        for i in range(int(shifted), n - 1, 2):
            sa[c, i], sb[c, i + 1], cmin[i, c], cmax[i + 1, c] = 1, 1, 1, 1
            c += 1
        passthrough = ([0, n - 1] if shifted else []) if even else ([0] if shifted else [n - 1])
        for w in passthrough:
            sa[c, w], sb[c, w], cmin[w, c], cmax[w, c] = 1, 1, 0.5, 0.5
            c += 1
        layers.append(tuple(t.to(device=device, dtype=dtype) for t in (sa, sb, cmin, cmax)))
    return layers


def dense_sort(x: torch.Tensor, steepness: float = 10.0, layers=None):
    """The naive baseline: diffsort's `execute_sort` (cauchy) on the odd-even network, dense layer
    products: every layer multiplies the [B, n, n] permutation matrix by [n, k] and [k, n] matrices
    (O(B n^3) per layer, O(B n^4) in all), and autograd keeps every layer's P for backward."""
    import math

    bsz, n = x.shape
    layers = layers if layers is not None else _odd_even_dense_layers(n, x.device, x.dtype)
    X = torch.eye(n, dtype=x.dtype, device=x.device).repeat(bsz, 1, 1)
    for sa, sb, cmin, cmax in layers:
        a, b = x @ sa.T, x @ sb.T
        alpha = torch.atan(steepness * (b - a)) / math.pi + 0.5
        aX, bX = X @ sa.T, X @ sb.T
        w_min = alpha.unsqueeze(-2) * aX + (1 - alpha).unsqueeze(-2) * bX
        w_max = (1 - alpha).unsqueeze(-2) * aX + alpha.unsqueeze(-2) * bX
        X = (w_max @ cmax.T.unsqueeze(-3)) + (w_min @ cmin.T.unsqueeze(-3))
        x = (alpha * a + (1 - alpha) * b) @ cmin.T + ((1 - alpha) * a + alpha * b) @ cmax.T
    return x, X


def _sort_setup(make_fn, with_P: bool = True):
    """run() = (sorted, P) -> gradient of x under random upstreams on both (on sorted only when the
    implementation has no P: torchsort's soft ranks)."""
    def setup(size: Size, device: str, dtype: torch.dtype):
        gen = _seed(size)
        bsz, n = size["B"], size["n"]
        x = torch.randn(bsz, n, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
        g_s = torch.randn(bsz, n, generator=gen).to(device=device, dtype=dtype)
        g_P = torch.randn(bsz, n, n, generator=gen).to(device=device, dtype=dtype) if with_P else None
        fn = make_fn(size, device, dtype)

        def run():
            out = fn(x)
            if with_P:
                return torch.autograd.grad(out, x, (g_s, g_P))
            return torch.autograd.grad(out, x, g_s)

        return run

    return setup


def _sort_naive(size, device, dtype):
    layers = _odd_even_dense_layers(size["n"], device, dtype)
    return lambda x: dense_sort(x, 10.0, layers)


def _sort_diffsort(size, device, dtype):
    from diffsort import DiffSortNet

    return DiffSortNet("odd_even", size["n"], device=device, steepness=10.0, distribution="cauchy")


def _sort_torchsort(size, device, dtype):
    """torchsort.soft_rank (regularised isotonic regression, O(n log n) per row): soft ranks only,
    no P: a different relaxation and less output, listed for its speed."""
    import torchsort

    return lambda x: torchsort.soft_rank(x, regularization_strength=0.1)


def _sort_flashloss(backend: str):
    def make(size, device, dtype):
        from ..ops import sort_network

        def fn(x):
            r = sort_network(x, "odd_even", "cauchy", 10.0, return_P=True, backend=backend)
            return r.sorted, r.P

        return fn

    return make


def _sort_comparators(size: Size) -> int:
    return size["n"] * (size["n"] - 1) // 2


def _sort_dense_bytes(size: Size, device: str, dtype: torch.dtype) -> float:
    # autograd keeps ~5 [B, n, n] tensors per layer (aX, bX, w_min, w_max, X), n layers
    return 5.0 * size["n"] * size["B"] * size["n"] ** 2 * 4


register_case(BenchCase(
    name="sort_network",
    description=("relaxed odd-even sort (cauchy, steepness 10) returning sorted values and P, forward + backward "
                 "with random upstreams on both; FLOPs counted 24 n C B (the column-mixing form)"),
    sizes_quick=[{"B": 256, "n": 16}],
    # the CPU target of issue #7 is B = 1024, n = 32 (fp32)
    sizes_full=[{"B": b, "n": n} for n in (16, 32, 64) for b in (256, 1024, 4096)],
    # forward: P's two columns mixed per comparator (6n per row); backward ~3x (recompute + two sweeps)
    flops=lambda s: 24.0 * s["n"] * _sort_comparators(s) * s["B"],
    # read x, write P and sorted; read their upstreams, write dx
    min_bytes=lambda s, dt: 2.0 * s["B"] * (2 * s["n"] + s["n"] ** 2) * torch.finfo(dt).bits / 8,
    x_key="n",
    warmup_size={"B": 8, "n": 8},
    impls=[
        Impl("naive", "naive", _sort_setup(_sort_naive), estimate_bytes=_sort_dense_bytes),
        Impl("diffsort", "peer", _sort_setup(_sort_diffsort), _installed("diffsort", "diffsort"),
             estimate_bytes=_sort_dense_bytes),
        Impl("torchsort[soft_rank]", "peer", _sort_setup(_sort_torchsort, with_P=False),
             _installed("torchsort", "torchsort")),
    ] + [
        Impl(f"flashloss[{b}]", "flashloss", _sort_setup(_sort_flashloss(b)), flashloss_op_available("sort_network", b))
        for b in FLASHLOSS_BACKENDS
    ],
))


# ---------------------------------------------------------------------------------------------
# groco_loss: GroCo over two views [B, D] (k = 10 negatives, odd-even cauchy steepness 1 on n = 11),
# forward + backward. The anchor's path forms the B x B cosine matrix of each view; flashloss
# selects the negatives in row tiles and never holds it.

GROCO_K = 10


def groco_dense(views, k: int = GROCO_K, sorter=None):
    """The dense path of ninatu/learning_by_sorting GroCo (stop_grad, single process): B x B cosine
    similarities with the diagonal at -inf, topk, P from a dense relaxed sort (diffsort-style layer
    products unless `sorter` is given), group sums, clip, the two BCE terms, mean over anchor views."""
    import torch.nn.functional as F

    total = 0.0
    n = k + len(views) - 1
    for a, f in enumerate(views):
        za = F.normalize(f.float(), dim=-1, eps=1e-8)
        pos = torch.stack([(za * F.normalize(p.float(), dim=-1, eps=1e-8).detach()).sum(1)
                           for i, p in enumerate(views) if i != a], 1).sort(1).values
        sims = (za @ za.detach().T).masked_fill(torch.eye(len(za), dtype=torch.bool, device=za.device), float("-inf"))
        x = torch.cat([sims.topk(k, dim=1).values.flip(1), pos], 1)
        P = sorter(x) if sorter is not None else dense_sort(x, 1.0)[1]
        t = (torch.arange(n, device=x.device) >= k).to(x.dtype).expand(len(x), n)[..., None]
        q_pos = P[:, :, k:].sum(2, keepdim=True).clip(0, 1)
        q_neg = P[:, :, :k].sum(2, keepdim=True).clip(0, 1)
        total = total + (F.binary_cross_entropy(q_pos, t) + F.binary_cross_entropy(q_neg, 1 - t)) / 2
    return total / len(views)


def _groco_setup(make_fn):
    def setup(size: Size, device: str, dtype: torch.dtype):
        gen = _seed(size)
        views = [torch.randn(size["B"], size["D"], generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
                 for _ in range(2)]
        fn = make_fn()

        def run():
            return torch.autograd.grad(fn(views), views)

        return run

    return setup


def _groco_naive():
    return lambda views: groco_dense(views)


def _groco_diffsort():
    from diffsort import DiffSortNet

    sorters = {}  # diffsort's network matrices live on the device given at construction

    def sorter(x):
        if x.device not in sorters:
            sorters[x.device] = DiffSortNet("odd_even", GROCO_K + 1, device=x.device, steepness=1,
                                            interpolation_type="cauchy")
        return sorters[x.device](x)[1]

    return lambda views: groco_dense(views, sorter=sorter)


def _groco_flashloss(backend: str):
    def make():
        from ..sorting import groco_loss

        return lambda views: groco_loss(views, topk_neg=GROCO_K, backend=backend)

    return make


register_case(BenchCase(
    name="groco_loss",
    description=("GroCo (learning_by_sorting) over two views [B, D], k = 10 negatives, odd-even cauchy sort of "
                 "n = 11, forward + backward; FLOPs counted 4 B^2 D (the two views' similarity products)"),
    sizes_quick=[{"B": 1024, "D": 128}],
    sizes_full=[{"B": b, "D": 128} for b in (1024, 4096, 16384)],  # the target of issue #7: B = 4096
    flops=lambda s: 4.0 * s["B"] ** 2 * s["D"],
    min_bytes=lambda s, dt: 4.0 * s["B"] * s["D"] * torch.finfo(dt).bits / 8,  # read 2 views, write 2 grads
    x_key="B",
    warmup_size={"B": 64, "D": 128},
    impls=[
        Impl("naive", "naive", _groco_setup(_groco_naive), estimate_bytes=lambda s, d, t: 8.0 * s["B"] ** 2 * 4),
        Impl("diffsort", "peer", _groco_setup(_groco_diffsort), _installed("diffsort", "diffsort"),
             estimate_bytes=lambda s, d, t: 8.0 * s["B"] ** 2 * 4),
    ] + [
        Impl(f"flashloss[{b}]", "flashloss", _groco_setup(_groco_flashloss(b)), flashloss_op_available("sort_network", b))
        for b in FLASHLOSS_BACKENDS
    ],
))
