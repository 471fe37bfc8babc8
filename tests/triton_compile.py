"""Compiles flashloss' Triton kernels for an NVIDIA target without a GPU: Triton's front end, its
TTGIR/LLVM passes and the ptxas bundled with the triton wheel run on any machine. Reports, per
kernel and configuration, whether it compiled, the registers and stack (spill) bytes from the
cubin's resource usage, shared memory, and a few facts about the PTX (tensor-core wgmma, atomic
flavour). Runs in its own process: under TRITON_INTERPRET=1 `triton.jit` builds interpreter
functions, which cannot be compiled.

    python tests/triton_compile.py [--arch 90] [--dtypes bf16,fp32] [--op token_logprobs|sort_network]
        one JSON object per kernel and config
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
# integer arguments that realistic launches pass as multiples of 16 (H = 4096, V = 128256, N = 16384):
# Triton specializes those as divisible by 16, which the pipeliner needs for cp.async
DIVISIBLE = {"N", "V", "H", "stride_h", "stride_w"}


def available() -> tuple[bool, str]:
    cuobjdump = os.path.join(NVIDIA_BIN, "cuobjdump")
    if not os.path.exists(cuobjdump):
        return False, f"the triton wheel has no NVIDIA tools ({NVIDIA_BIN})"
    return True, ""


def compile_kernel(fn, ptr_types: dict, floats: set, consts: dict, warps: int, stages: int, arch: int,
                   doubles: frozenset = frozenset()) -> dict:
    """`floats` / `doubles`: the scalar arguments passed as fp32 / fp64; other scalars are i32."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = "*" + ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in doubles:
            sig[name] = "fp64"
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in DIVISIBLE:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
    ptx = kernel.asm["ptx"]
    return dict(registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                stack_bytes=int(re.search(r"STACK:(\d+)", usage).group(1)), shared_bytes=kernel.metadata.shared,
                wgmma="wgmma.mma_async" in ptx, relaxed_red=bool(re.search(r"red\.global\S*relaxed", ptx)),
                acq_rel_atom=bool(re.search(r"atom\.global\S*acq_rel", ptx)))


def token_logprobs_cases(arch: int, dtypes=None):
    import flashloss.triton_kernels.token_logprobs as tk

    # softcap variants for bf16 and fp32 only (fp16 and fp64 share their code paths)
    for dtype, caps in ((torch.bfloat16, (False, True)), (torch.float16, (False,)), (torch.float32, (False, True)),
                        (torch.float64, (False,))):
        if dtypes and TYPE[dtype] not in dtypes:
            continue
        t = TYPE[dtype]
        acc = "fp64" if dtype == torch.float64 else "fp32"
        low = dtype in (torch.bfloat16, torch.float16)
        for cap in caps:
            common = dict(HAS_BIAS=True, HAS_CAP=cap, IEEE=not low, UPCAST=False,
                          ACC=tl.float64 if dtype == torch.float64 else tl.float32)
            grads = dict(HAS_G=True, HAS_L=True, HAS_H=True, HAS_S=cap, LOW=low)
            cases = [("fwd", tk._fwd_kernel, dict(WANT_ENT=True, WANT_P2=True, GROUP_M=8)),
                     ("bwd", tk._bwd_kernel, dict(NEED_DH=True, NEED_DW=True, NEED_DB=True, GROUP_M=8, **grads)),
                     ("dh", tk._dh_kernel, grads), ("dw", tk._dw_kernel, dict(NEED_DW=True, NEED_DB=True, **grads))]
            for kind, fn, flags in cases:
                cfg = tk._config(kind, dtype, 4096, arch)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                ptrs = {name: (t if name in ("h_ptr", "w_ptr", "b_ptr") else "i64" if name == "t_ptr" else acc)
                        for name in fn.arg_names if name.endswith("_ptr")}
                row = dict(op="token_logprobs", kernel=kind, dtype=t, softcap=cap, arch=arch, warps=warps,
                           stages=stages, **cfg)
                try:
                    row.update(compile_kernel(fn, ptrs, {"inv_t", "scale", "cap", "eps"},
                                              dict(**common, **flags, **cfg), warps, stages, arch), ok=True)
                except Exception as e:  # reported, the test fails on it
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:4000]}")
                yield row


# sort_network: (name, n, want_P, g, relaxation) at the launcher's default tiles for a large batch
SORT_CASES = [("values_n32", 32, False, 0, "cauchy"), ("P_PW_n16", 16, True, 4, "cauchy"),
              ("P_PW_n64", 64, True, 4, "cauchy"), ("P_PW_n32", 32, True, 4, "cauchy"), ("PW_n256_g2", 256, False, 2, "cauchy"),
              ("P_n32_logistic_phi", 32, True, 0, "logistic_phi"), ("P_n32_gaussian", 32, True, 0, "gaussian")]
SORT_BATCH, SORT_SMS = 1 << 16, 132  # H100 SXM


def sort_network_cases(arch: int, dtypes=None):
    import flashloss.triton_kernels.sort_network as sk
    from flashloss.ops.sort_network import RELAX_CODE

    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        t = TYPE[dtype]
        if dtypes and t not in dtypes:
            continue
        acc = "fp64" if dtype == torch.float64 else "fp32"
        for name, n, want_p, g, relax in SORT_CASES:
            if dtype == torch.bfloat16 and name != "P_PW_n64":  # bf16 only changes the x load
                continue
            if not sk.supports(n, want_p, g, dtype):  # served by the torch implementation
                continue
            common = dict(RELAX=RELAX_CODE[relax], WANT_P=want_p, WANT_W=g > 0,
                          ACC=tl.float64 if dtype == torch.float64 else tl.float32)
            for kind, fn, flags in (("fwd", sk._fwd_kernel, {}),
                                    ("bwd", sk._bwd_kernel, dict(HAS_GS=True, NEED_W=g > 0, SHARED_W=g > 0))):
                cfg = sk._config(kind, n, want_p, g, dtype, SORT_BATCH, SORT_SMS)
                warps = cfg.pop("num_warps")
                ptrs = {p: ("i32" if p in ("tab_ptr", "comp_ptr", "rank_ptr") else t if p == "x_ptr" else acc)
                        for p in fn.arg_names if p.endswith("_ptr")}
                row = dict(op="sort_network", kernel=kind, case=name, dtype=t, relaxation=relax, n=n, want_P=want_p,
                           g=g, arch=arch, warps=warps, ROWS=cfg["ROWS"], BN=cfg["BN"], BG=cfg["BG"])
                try:
                    row.update(compile_kernel(fn, ptrs, set(), dict(**common, **flags, **cfg), warps, 1, arch,
                                              doubles=frozenset({"steepness", "art_lambda"})), ok=True)
                except Exception as e:  # reported, the test fails on it
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:4000]}")
                yield row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", default="", help="comma-separated subset of bf16,fp16,fp32,fp64")
    parser.add_argument("--op", default="token_logprobs", choices=("token_logprobs", "sort_network"))
    args = parser.parse_args(argv)
    ok, why = available()
    if not ok:
        print(json.dumps(dict(unavailable=why)))
        return 0
    cases = token_logprobs_cases if args.op == "token_logprobs" else sort_network_cases
    for row in cases(args.arch, [d for d in args.dtypes.split(",") if d] or None):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
