#!/usr/bin/env bash
# Every GPU check and benchmark in one command, for a machine with an NVIDIA GPU and a CUDA build
# of torch already installed (PYTHON names its interpreter; default python3):
#   1. build flashloss._C with the CUDA kernels (editable install, no dependency changes)
#   2. flashloss info
#   3. the GPU-marked tests, then the whole suite, then the Triton interpreter tests
#   4. ctest + the nvcc compile check (ptxas report)
#   5. the full benchmark on the GPU: every case, including the GPU targets (clip_loss_gpu_target,
#      token_logprobs_gpu_target) and primitive B against TRL, Cut Cross-Entropy and Liger-Kernel
#      (token_logprobs, linear_cross_entropy)
# Results go to $OUT (default bench/out/gpu): logs, results.json/.md, plots.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() { echo "=== $*"; }

step build
$PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$OUT/build.log" || status=1
step info
$PY -m flashloss info 2>&1 | tee "$OUT/info.txt"
step "gpu tests"
$PY -m pytest tests -m gpu -q -rs 2>&1 | tee "$OUT/pytest_gpu.log" || status=1
step "all tests (Triton on the GPU)"
$PY -m pytest tests -q -m "not gpu" 2>&1 | tail -30 | tee "$OUT/pytest_all.log" || status=1
step "Triton interpreter tests"
TRITON_INTERPRET=1 $PY -m pytest tests -m interpret -q 2>&1 | tail -10 | tee "$OUT/pytest_interpret.log" || status=1
step ctest
if command -v cmake >/dev/null; then
  (cmake -S . -B build/cmake-gpu -DCMAKE_BUILD_TYPE=Release && cmake --build build/cmake-gpu \
    && ctest --test-dir build/cmake-gpu --output-on-failure) 2>&1 | tail -30 | tee "$OUT/ctest.log" || status=1
  cp build/cmake-gpu/ptxas_report.txt "$OUT/" 2>/dev/null || true
fi
step benchmark
$PY -m flashloss bench --full --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
