// CPU epilogues of primitive B (flashloss.ops.token_logprobs). csrc/ops.cpp computes each tile of
// raw logits x = hidden[r0:r0+rows] W[c0:c0+cols]^T with a GEMM (torch's BLAS) and hands it here
// as a raw pointer; these functions do everything elementwise in one pass per tile.
#pragma once
#include <cstdint>

#include "../core/token_logprobs.h"

namespace flashloss {
namespace cpu {

// T: float (fp32, bf16 and fp16 inputs, whose tiles are fp32) or double (fp64 inputs).
template <typename T>
struct TokenProblem {
  int64_t n, v;
  const T* bias;            // [v] or null
  const int64_t* targets;   // [n]; a row whose target is ignore_index is skipped
  int64_t ignore_index;
  core::LogitMap<T> map;
};

// Every row's state starts empty (m = -inf, sums 0).
template <typename T>
void token_state_init(int64_t n, core::RowState<T>* state);

// Forward over one tile: `tile` [rows, cols] (row stride cols) holds x for rows [r0, r0 + rows)
// and columns [c0, c0 + cols) on entry (bias not added yet); it is overwritten with z. Each valid
// row's state is merged with the tile's statistics (sz only when `entropy`, s2 only when
// `sum_p2`; sum z and the target logit always).
template <typename T>
void token_forward_tile(const TokenProblem<T>& p, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* tile,
                        core::RowState<T>* state, bool entropy, bool sum_p2);

// Outputs [n] from the states (null = not wanted); ignored rows get 0 everywhere.
template <typename T>
void token_forward_finish(const TokenProblem<T>& p, const core::RowState<T>* state, T* logp, T* lse, T* entropy,
                          T* z_sum, T* log_sum_p2);

// Backward over one tile: x on entry, dx = dz * dz/dx on exit (0 on ignored rows), ready for the
// dhidden / dW GEMMs and the dbias column sum. lse and (when h is given) entropy are the forward's
// outputs; upstream gradients g (logp), l (lse), h (entropy), s (z_sum) are [n] or null (= 0).
template <typename T>
void token_backward_tile(const TokenProblem<T>& p, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* tile,
                         const T* lse, const T* entropy, const T* g, const T* l, const T* h, const T* s);

}  // namespace cpu
}  // namespace flashloss
