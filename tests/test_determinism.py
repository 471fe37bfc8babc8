"""Deterministic mode (issue #9, item 5; README "Determinism").

Atomics: only the Triton backward of primitive B (token_logprobs) uses floating-point atomics
(relaxed fp32 adds, its default scheme). Its deterministic scheme is chosen by
torch.use_deterministic_algorithms(True), FLASHLOSS_TRITON_DETERMINISTIC=1 or the module's
DETERMINISTIC. Every other kernel is deterministic by construction: the Triton kernels of primitive
A and row_logsumexp and the CUDA kernels have no atomics on floating-point results, and the cpu
backend reduces in an order that does not depend on the OpenMP thread count (checked here with
OMP_NUM_THREADS=1 and 2 in subprocesses)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import flashloss
from flashloss import backend_available

HERE = os.path.dirname(os.path.abspath(__file__))
TRITON_TLP = "flashloss.triton_kernels.token_logprobs"


def _tlp_run(backend, n, h, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_(True)
    w = (torch.randn(v, h, generator=g) * 0.3).to(device, dtype).requires_grad_(True)
    b = torch.randn(v, generator=g).to(device, dtype).requires_grad_(True)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    t[::7] = -100
    r = flashloss.token_logprobs(hid, w, t, b, outputs=("logp", "entropy", "z_sum"), backend=backend)
    ups = [torch.randn(n, generator=g).to(device) for _ in range(3)]
    grads = torch.autograd.grad([r.logp, r.entropy, r.z_sum], (hid, w, b), ups)
    return [r.logp, r.entropy, r.z_sum, *grads]


def _bitwise(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what}: result {i} differs between two runs"


def test_triton_deterministic_flag_sources(monkeypatch):
    import importlib

    mod = importlib.import_module(TRITON_TLP)
    monkeypatch.setattr(mod, "DETERMINISTIC", None)
    monkeypatch.delenv("FLASHLOSS_TRITON_DETERMINISTIC", raising=False)
    assert mod.deterministic() is False
    monkeypatch.setenv("FLASHLOSS_TRITON_DETERMINISTIC", "1")
    assert mod.deterministic() is True
    monkeypatch.delenv("FLASHLOSS_TRITON_DETERMINISTIC")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert mod.deterministic() is True
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.interpret
def test_triton_token_logprobs_deterministic_scheme_is_bitwise_reproducible(monkeypatch):
    import importlib

    mod = importlib.import_module(TRITON_TLP)
    monkeypatch.setattr(mod, "DETERMINISTIC", True)
    a = _tlp_run("triton", 9, 16, 40, torch.float32, "cpu")
    b = _tlp_run("triton", 9, 16, 40, torch.float32, "cpu")
    _bitwise(a, b, "triton deterministic (interpreter)")
    ref = _tlp_run("torch", 9, 16, 40, torch.float32, "cpu")
    for x, y in zip(a, ref):  # and it computes the same thing
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_are_bitwise_reproducible(dtype, monkeypatch):
    """Shapes large enough for the atomic scheme to race (many row blocks x vocabulary tiles per
    output element): the deterministic Triton scheme, the CUDA backend and primitive A's Triton and
    CUDA backends give the same bits twice."""
    import importlib

    mod = importlib.import_module(TRITON_TLP)
    monkeypatch.setattr(mod, "DETERMINISTIC", True)
    for backend in ("triton", "cuda"):
        if not backend_available(backend, "cuda")[0]:
            continue
        a = _tlp_run(backend, 2048, 512, 32000, dtype, "cuda")
        b = _tlp_run(backend, 2048, 512, 32000, dtype, "cuda")
        _bitwise(a, b, f"token_logprobs {backend} {dtype}")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4096, 128, generator=g).to("cuda", dtype).requires_grad_(True)
    k = torch.randn(4096, 128, generator=g).to("cuda", dtype).requires_grad_(True)
    s = torch.tensor(10.0, device="cuda", requires_grad=True)
    for backend in ("triton", "cuda"):
        if backend not in flashloss._backend.registered_ops()["contrastive_lse"].impls:
            continue
        runs = []
        for _ in range(2):
            r = flashloss.contrastive_lse(q, k, s, targets=torch.arange(4096, device="cuda"),
                                          outputs=("row_lse", "col_lse", "pos_sum", "col_pos_sum"), backend=backend)
            loss = (r.row_lse - r.pos_sum).sum() + (r.col_lse - r.col_pos_sum).sum()
            runs.append([loss, *torch.autograd.grad(loss, (q, k, s))])
        _bitwise(runs[0], runs[1], f"contrastive_lse {backend} {dtype}")


_SCRIPT = r"""
import sys, torch, flashloss
g = torch.Generator().manual_seed(0)
out = []
q = torch.randn(300, 16, generator=g, requires_grad=True); k = torch.randn(700, 16, generator=g, requires_grad=True)
s = torch.tensor(3.0, requires_grad=True); b = torch.tensor(-1.0, requires_grad=True)
for kw in (dict(labels_q=torch.randint(0, 3, (300,), generator=g), labels_k=torch.randint(0, 3, (700,), generator=g)),
           dict(targets=torch.randint(0, 700, (300,), generator=g))):
    r = flashloss.contrastive_lse(q, k, s, b, outputs=("row_lse", "col_lse", "pos_sum", "col_pos_sum"), backend="cpu",
                                  **kw)
    vals = [r.row_lse, r.col_lse, r.pos_sum, r.col_pos_sum]
    ups = [torch.randn(x.shape, generator=g) for x in vals]
    out += vals + list(torch.autograd.grad(vals, (q, k, s, b), ups))
h = torch.randn(200, 32, generator=g, requires_grad=True); w = torch.randn(3000, 32, generator=g, requires_grad=True)
t = torch.randint(0, 3000, (200,), generator=g)
st = flashloss.token_logprobs(h, w, t, outputs=("logp", "entropy"), backend="cpu")
out += [st.logp, st.entropy] + list(torch.autograd.grad([st.logp, st.entropy], (h, w),
                                                        [torch.randn(200, generator=g), torch.randn(200, generator=g)]))
x = torch.randn(5, 100000, generator=g, requires_grad=True)
l = flashloss.row_logsumexp(x, backend="cpu")
out += [l, torch.autograd.grad(l, x, torch.randn(5, generator=g))[0]]
assert flashloss.__file__ == sys.argv[2], (flashloss.__file__, sys.argv[2])
torch.save([o.detach() for o in out], sys.argv[1])
"""


@pytest.mark.skipif(not backend_available("cpu", "cpu")[0], reason="needs flashloss._C")
def test_cpu_backend_is_bitwise_independent_of_the_thread_count(tmp_path):
    """Primitive A (both positive modes: col_pos_sum and dbias sum over many rows), primitive B and
    row_logsumexp on the cpu backend: the same bits with 1 and 2 OpenMP threads (and per run)."""
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    results = []
    for threads in ("1", "2"):
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(flashloss.__file__)))  # this flashloss
        env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONWARNINGS="ignore",
                   PYTHONPATH=os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")]))
        out = tmp_path / f"out{threads}.pt"
        subprocess.run([sys.executable, str(script), str(out), os.path.abspath(flashloss.__file__)], env=env, check=True, cwd=HERE, timeout=300)
        results.append(torch.load(out))
    _bitwise(results[0], results[1], "cpu backend, OMP_NUM_THREADS 1 vs 2")
