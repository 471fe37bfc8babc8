// CPU kernels for row-wise log-sum-exp (flashloss.ops.row_logsumexp). Raw pointers, no torch.
#pragma once
#include <cstdint>

#include "../core/common.h"

namespace flashloss {
namespace cpu {

// lse[i] = log sum_j exp(x[i, j]) for x [N, V] with row stride `ld` (elements).
// lse is float for f32/bf16/f16 inputs and double for f64 inputs.
void row_logsumexp_forward(core::DType dtype, const void* x, int64_t N, int64_t V, int64_t ld,
                           void* lse);

// dx[i, j] = g[i] * exp(x[i, j] - lse[i]); dx is contiguous [N, V] in the input dtype,
// g and lse in the accumulation type.
void row_logsumexp_backward(core::DType dtype, const void* x, int64_t N, int64_t V, int64_t ld,
                            const void* lse, const void* g, void* dx);

}  // namespace cpu
}  // namespace flashloss
