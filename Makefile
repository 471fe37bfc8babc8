# flashloss: everything from a bare clone. Needs Python 3.11 (or 3.10+), a C++ compiler and the
# package registries; creates .venv on first use.
#
#   make demo    set up, then `flashloss info` and the benchmark report on the embedded quick sizes
#   make test    set up, then the full test suite (pytest) and the C++ unit tests (ctest)
#
# TORCH_SPEC picks the torch to install: the default is the CPU build 2.13.0; on a GPU machine use
# e.g. `make test TORCH_SPEC=torch` (a CUDA build), then flashloss._C also gets the CUDA kernels.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BENCH_OUT ?= bench/out
CMAKE_BUILD ?= build/cmake

PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
NATIVE_SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test install pytest ctest bench bench-full bench-pytest gpu clean

demo: install
	$(VENV)/bin/flashloss info
	$(VENV)/bin/flashloss bench --quick --out $(BENCH_OUT)

# FLASHLOSS_REQUIRE_ANCHORS=1: an anchor library that .deps installs and a test compares with must be
# importable (tests/anchors.py: require_anchor fails instead of skipping)
test: install
	FLASHLOSS_REQUIRE_ANCHORS=1 $(PY) -m pytest tests -q
	$(MAKE) ctest

install: $(VENV)/.flashloss-installed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

# Third-party dependencies. torch first and pinned: an unpinned torch may pull a multi-GB CUDA
# build on a CPU-only machine. Everything else comes through setup.py's extras.
$(VENV)/.deps: $(VENV)/bin/python setup.py
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q ninja cmake numpy triton pytest pytest-benchmark hypothesis matplotlib \
		pytorch-metric-learning
	$(PY) -m pip install -q --no-deps open_clip_torch  # the tests load only its loss module
	# anchors of primitive B and the preference losses (TRL, Cut Cross-Entropy, Liger-Kernel); torch
	# stays pinned in the same resolver call
	$(PY) -m pip install -q "$(TORCH_SPEC)" trl cut-cross-entropy liger-kernel
	# anchors of primitive C: diffsort (pure Python; the sorting tests require it under `make test`)
	# and torchsort (a benchmark peer for soft ranks, built from source against the installed torch:
	# ~1 min). Its setup.py adds a CUDA extension whenever `nvcc` runs, which fails against a CPU
	# torch, so it is built with a PATH that hides nvcc (CPU kernels only); the line may fail without
	# stopping the build, and the benchmark then lists torchsort as not installed.
	$(PY) -m pip install -q "$(TORCH_SPEC)" diffsort
	-env PATH="$(abspath $(VENV))/bin:/usr/bin:/bin" $(PY) -m pip install -q --no-build-isolation "$(TORCH_SPEC)" torchsort
	touch $@

# The package itself, editable, with flashloss._C built against the installed torch (rebuilt
# when csrc/ or setup.py change).
$(VENV)/.flashloss-installed: $(VENV)/.deps $(NATIVE_SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

pytest: install
	FLASHLOSS_REQUIRE_ANCHORS=1 $(PY) -m pytest tests -q

# Standalone native build: C++ unit tests of csrc/core and csrc/cpu, and (when nvcc is found)
# the csrc/cuda compile check for sm_80/sm_90a with the ptxas report in $(CMAKE_BUILD), and a
# syntax check of the CUDA half of csrc/ops.cpp (cmake/check_cuda_glue.sh).
ctest: $(VENV)/.deps
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release
	cmake --build $(CMAKE_BUILD)
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure
	PY=$(PY) bash cmake/check_cuda_glue.sh build/cuda_glue

bench: demo

bench-full: install
	$(VENV)/bin/flashloss bench --full --out $(BENCH_OUT)

# The same cases through pytest-benchmark (statistics, comparisons between saved runs).
bench-pytest: install
	$(PY) -m pytest bench -q --benchmark-only

# Every GPU test and benchmark in one go (on a machine with a GPU).
gpu:
	bash bench/gpu_all.sh

clean:
	rm -rf build $(CMAKE_BUILD) python/flashloss/*.so *.egg-info python/*.egg-info
