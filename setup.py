"""Build and install flashloss.

The Python package lives in python/flashloss and the Triton kernels in triton_kernels/ (installed
as flashloss.triton_kernels, so they never shadow Triton's own `triton_kernels`). The native
extension flashloss._C is built against the torch that is already installed, so install with
`pip install --no-build-isolation .` (the Makefile does): an isolated build environment would pull
a second, multi-GB torch just to compile.

  * CPU kernels (csrc/cpu, OpenMP) are always compiled when torch is importable.
  * CUDA kernels (csrc/cuda) are added when torch is a CUDA build and a CUDA toolkit is found.
  * FLASHLOSS_NO_NATIVE=1 skips the extension (the `torch` backend still serves everything);
    FLASHLOSS_NO_CUDA=1 skips only the CUDA kernels.
"""
import glob
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "python", "flashloss", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def cpu_isa_flags():
    """SIMD flags for the CPU kernels. The extension is compiled on the machine that runs it (pip
    install from source), so AVX2+FMA are enabled when this CPU has them; the 8-lane vector code
    in csrc/cpu/simd.h then maps onto one AVX register. FLASHLOSS_CPU_FLAGS overrides (e.g. ""
    for a portable build that runs on any x86-64)."""
    if "FLASHLOSS_CPU_FLAGS" in os.environ:
        return os.environ["FLASHLOSS_CPU_FLAGS"].split()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= set(flags) else []


def native_extensions():
    if os.environ.get("FLASHLOSS_NO_NATIVE") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("flashloss: torch is not importable at build time; installing without flashloss._C")
        return [], {}
    rel = lambda paths: [os.path.relpath(p, HERE) for p in paths]  # noqa: E731
    sources = ["csrc/ops.cpp"] + rel(sorted(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))))
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wextra", "-Wno-psabi"] + cpu_isa_flags()
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("FLASHLOSS_NO_CUDA") != "1"
    )
    kwargs = dict(
        name="flashloss._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if with_cuda:
        sources += rel(sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))))
        ext = CUDAExtension(
            sources=sources,
            define_macros=[("FLASHLOSS_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math",
                         "-gencode=arch=compute_80,code=sm_80",
                         "-gencode=arch=compute_90a,code=sm_90a"],
            },
            **kwargs,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)
    print(f"flashloss: building flashloss._C ({'CPU + CUDA' if with_cuda else 'CPU'} kernels)")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    name="flashloss",
    version=read_version(),
    description="Memory-efficient kernels for training objectives: contrastive, preference, sorting",
    python_requires=">=3.10",
    package_dir={"flashloss": "python/flashloss", "flashloss.triton_kernels": "triton_kernels"},
    packages=[
        "flashloss",
        "flashloss.ops",
        "flashloss.ref",
        "flashloss.benchmark",
        "flashloss.compat",
        "flashloss.triton_kernels",
    ],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "bench": ["matplotlib"],
        # anchors the tests compare numbers with (open_clip's loss module is loaded by path, so its
        # heavy dependencies are not needed: install it with --no-deps, as the Makefile does)
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.0", "matplotlib",
                 "pytorch-metric-learning"],
    },
    entry_points={"console_scripts": ["flashloss=flashloss.cli:main"]},
    zip_safe=False,
)
