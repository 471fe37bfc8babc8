#!/usr/bin/env bash
# Compiler launcher for the CUDA objects: runs nvcc, prints its output, and appends the ptxas
# resource report (registers, shared memory, spills) to $FLASHLOSS_PTXAS_REPORT.
set -o pipefail
report="${FLASHLOSS_PTXAS_REPORT:?FLASHLOSS_PTXAS_REPORT must name the report file}"
"$@" 2>&1 | tee -a "$report"
