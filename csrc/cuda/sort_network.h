// CUDA launchers of primitive C (flashloss.ops.sort_network). Plain C++ interface: no torch, no
// CUDA headers needed by the caller; the stream is an opaque pointer. Tensors as in
// csrc/cpu/sort_network.h (accumulation dtype: float or double, contiguous).
#pragma once
#include <cstdint>

#include "../core/common.h"

namespace flashloss {
namespace cuda {

struct SortLaunch {
  int64_t n, num_comparators, num_layers, B, Bw, g;
  const int32_t* pairs;      // [C, 2]
  const int32_t* layer_ptr;  // [L + 1]
  const int32_t* out_slot;   // [n]
  int relax;                 // core::Relax
  double steepness, art_lambda;
  bool is_double;
};

// The largest n the kernels take (shared memory per warp: values, and with P a [n, 32] block).
int64_t sort_network_max_n(bool with_P, bool is_double);

// Returns 0 on success, else a cudaError_t code.
int sort_network_forward(const SortLaunch& a, const void* x, void* sorted, void* alpha, void* P, const void* W,
                         void* PW, void* stream);

// scratch: [B, C] (value differences) + [B, C] (dL/dalpha) + when g_P: [B, C, 32] (P column
// differences of the row block in flight) + when g_PW: 2 [B, n, g] + [B, C, g]; g_W_rows: [B, n, g]
// per-row parts of dL/dW (the caller sums them when W is shared), else g_W itself.
int64_t sort_network_backward_scratch(const SortLaunch& a, bool with_P, bool with_PW);
int sort_network_backward(const SortLaunch& a, const void* x, const void* alpha, const void* g_sorted,
                          const void* g_P, const void* g_PW, const void* W, void* g_x, void* g_W_rows, void* scratch,
                          void* stream);

}  // namespace cuda
}  // namespace flashloss
