// CUDA launchers for primitive A (flashloss.ops.contrastive_lse, backend 'cuda'). Plain C++
// interface: raw pointers, the stream as an opaque pointer, an int error code (0 = success, else a
// cudaError_t; csrc/cuda/row_logsumexp.h: error_string turns it into text). No torch, no CUDA
// headers needed by the caller. Kernels and their tiling: csrc/cuda/contrastive_lse.cu.
//
// Semantics are those of `_torch_forward` / `_torch_backward` in
// python/flashloss/ops/contrastive_lse.py: S_ij = scale_i <q_i, k_j> + bias (+ margin +
// margin_rows[i] on positive pairs); columns [0, m_main) are main columns, [m_main, m_all) extra
// negatives (never positive, not in column statistics); exclude_self drops (i, i) for main i;
// exclude_positives drops the positives from the allowed set; neg_threshold drops a non-positive
// pair whose S_ij (no margin) is below neg_threshold[i] from the allowed set.
#pragma once
#include <cstdint>

#include "../core/common.h"

namespace flashloss {
namespace cuda {

// "Acc" below is the statistics dtype: double for f64 inputs, float otherwise. Every pointer is a
// device pointer; every array is contiguous.
struct ContrastiveArgs {
  core::DType dtype;          // of q and k
  const void* q;              // [n, d]     (row stride d)
  const void* k;              // [m_all, d] (row stride d)
  int64_t n, m_all, m_main, d;
  const void* scale;          // [n] Acc
  const void* bias;           // one Acc, or null (bias 0)
  double margin;              // added to every positive logit
  const void* margin_rows;    // [n] Acc or null: per-row margin on the positives of row i
  const int32_t* targets;     // [n, targets_per_row] or null; -1 = padding (no positive)
  int64_t targets_per_row;    // P (1 for the [N] form)
  const uint8_t* valid;       // [n]: row takes part in column statistics (has a positive)
  const int32_t* labels_q;    // [n] dense ids >= 0, or null
  const int32_t* labels_k;    // [>= m_all] dense ids, -1 on extra columns, or null
  const void* neg_threshold;  // [n] Acc or null
  bool exclude_self, exclude_positives, sigmoid;
};

// Outputs [n] (row_lse, pos_sum, pos_count, row_sigmoid) and [m_main] (col_lse, col_pos_sum), in
// Acc; a null pointer = not wanted. Every element of a wanted output is written.
int contrastive_lse_forward(const ContrastiveArgs& a, void* row_lse, void* col_lse, void* pos_sum,
                            void* pos_count, void* col_pos_sum, void* row_sigmoid, void* stream);

// Upstream statistics and gradients (Acc; null = absent output, term left out): row_lse, g_row,
// g_pos, g_sig [n]; col_lse, g_col, g_colpos [m_main]. Outputs (Acc; null = not wanted):
// dq [n, d], dk [grad_cols, d] (columns [0, grad_cols) of k), dscale [n], dbias (one element),
// dmargin [n] = sum_j dS_ij Y_ij. `scratch`: max(n, 1) Acc elements, used when dbias is wanted
// (per-row-block partial sums, reduced in a fixed order: deterministic).
int contrastive_lse_backward(const ContrastiveArgs& a, const void* row_lse, const void* col_lse,
                             const void* g_row, const void* g_col, const void* g_pos,
                             const void* g_colpos, const void* g_sig, int64_t grad_cols, void* dq,
                             void* dk, void* dscale, void* dbias, void* dmargin, void* scratch,
                             void* stream);

}  // namespace cuda
}  // namespace flashloss
