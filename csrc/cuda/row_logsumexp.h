// CUDA launchers for row-wise log-sum-exp. Plain C++ interface (no torch, no CUDA headers needed
// by the caller): the stream is passed as an opaque pointer.
#pragma once
#include <cstdint>

#include "../core/common.h"

namespace flashloss {
namespace cuda {

// Returns 0 on success, else a cudaError_t code (the caller turns it into a Python error).
int row_logsumexp_forward(core::DType dtype, const void* x, int64_t N, int64_t V, int64_t ld,
                          void* lse, void* stream);
int row_logsumexp_backward(core::DType dtype, const void* x, int64_t N, int64_t V, int64_t ld,
                           const void* lse, const void* g, void* dx, void* stream);
const char* error_string(int code);

}  // namespace cuda
}  // namespace flashloss
