// CUDA epilogues of primitive B (flashloss.ops.token_logprobs, backend 'cuda'). Plain C++
// interface: raw device pointers, the stream as an opaque pointer, an int error code (0 = success,
// else a cudaError_t; csrc/cuda/row_logsumexp.h: error_string). No torch. csrc/ops.cpp runs the
// (vocabulary chunk x row block) loop and the GEMMs (cuBLAS through at::mm) and calls these on
// each fp32 / fp64 logits tile. Kernels and their cost: csrc/cuda/token_logprobs.cu; the math:
// csrc/core/token_logprobs.h.
#pragma once
#include <cstdint>

#include "../core/common.h"

namespace flashloss {
namespace cuda {

// "Acc" is the tile / statistics dtype: f64 for fp64 inputs, f32 otherwise.
struct TokenTileArgs {
  core::DType acc;          // f32 or f64
  const void* bias;         // [v] Acc, or null
  const int64_t* targets;   // [n]; rows whose target is ignore_index are skipped / get 0
  int64_t ignore_index;
  double inv_temperature, logit_scale, softcap;  // softcap 0 = none
  int64_t r0, rows, c0, cols;  // the tile: rows [r0, r0 + rows), columns [c0, c0 + cols); row stride cols
};

// state: [n] core::RowState<Acc> (6 Acc values per row), set to empty.
int token_state_init(core::DType acc, int64_t n, void* state, void* stream);

// Merges the tile's statistics (x = hidden . w, bias not yet added) into the rows' states.
// sum e (z-m) and sum e^2 are kept only when `entropy` / `sum_p2`.
int token_forward_tile(const TokenTileArgs& a, const void* tile, void* state, bool entropy, bool sum_p2,
                       void* stream);

// The [n] outputs (Acc; null = not wanted) from the states; ignored rows get 0.
int token_forward_finish(const TokenTileArgs& a, int64_t n, const void* state, void* logp, void* lse,
                         void* entropy, void* z_sum, void* log_sum_p2, void* stream);

// Turns the tile's x into dx = dz dz/dx (0 on ignored rows). Written in place in Acc when
// `keep_acc`, and rounded to `dx_dtype` (bf16 / f16) into dx [rows, cols] when dx is not null.
// lse [n] and entropy [n] (needed when h is given) are the forward's outputs; upstream gradients
// g (logp), l (lse), h (entropy), s (z_sum) are [n] Acc or null (= 0).
int token_backward_tile(const TokenTileArgs& a, void* tile, core::DType dx_dtype, void* dx, bool keep_acc,
                        const void* lse, const void* entropy, const void* g, const void* l, const void* h,
                        const void* s, void* stream);

}  // namespace cuda
}  // namespace flashloss
