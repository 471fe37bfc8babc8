#!/usr/bin/env bash
# Compile-check csrc/ops.cpp with FLASHLOSS_WITH_CUDA on a machine whose torch is a CPU build:
# the CUDA half of the torch glue (wrappers, registrations) is otherwise compiled only where a
# CUDA torch is installed. Syntax and types only (-fsyntax-only): nothing is linked. The CPU wheel
# lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h); an empty stand-in is enough for
# a syntax check. Skipped, with a message, when no CUDA toolkit headers are found.
set -euo pipefail
PY=${PY:-python3}
OUT=${1:-build/cuda_glue}
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
if [ ! -f "$CUDA_INC/cuda_runtime.h" ]; then
  echo "check_cuda_glue: no CUDA headers under $CUDA_INC; skipped"
  exit 0
fi
TORCH_INC=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
PY_INC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
mkdir -p "$OUT/stub/c10/cuda/impl"
[ -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ] || echo '#pragma once' > "$OUT/stub/c10/cuda/impl/cuda_cmake_macros.h"
${CXX:-g++} -std=c++20 -fsyntax-only -Wall -Wextra -Werror -Wno-psabi -DFLASHLOSS_WITH_CUDA \
  -isystem "$OUT/stub" -isystem "$TORCH_INC" -isystem "$TORCH_INC/torch/csrc/api/include" \
  -isystem "$CUDA_INC" -isystem "$PY_INC" -Icsrc csrc/ops.cpp
echo "check_cuda_glue: csrc/ops.cpp compiles with FLASHLOSS_WITH_CUDA"
