// CPU epilogues of primitive A (flashloss.ops.contrastive_lse). csrc/ops.cpp computes each tile's
// similarities sim = q_blk k_all^T with a GEMM and hands the tile here as raw fp32 pointers.
#pragma once
#include <cstdint>

namespace flashloss {
namespace cpu {

// What every tile needs to rebuild S_ij = scale_i * sim_ij + bias (+ margin on positives) and its
// masks. Pointers index the whole problem (row r0 + i of the tile is global row r0 + i).
template <typename T>  // float (fp32/bf16/fp16 inputs are upcast) or double
struct ContrastiveProblem {
  int64_t n, m_all, m_main;
  const T* scale;          // [n]
  T bias;                  // 0 when absent
  T margin;                // added to every positive logit
  const T* margin_rows;    // [n] or null: per-row margin added to the positives of row i
  const int32_t* targets;  // [n * targets_per_row] or null; -1 = no positive (padding / ignored row)
  int64_t targets_per_row; // P: positive columns listed per row (1 for the [N] form)
  const uint8_t* valid;    // [n] rows that take part in column statistics
  const int32_t* labels_q; // [n] or null (dense ids)
  const int32_t* labels_k; // [m_all] or null (dense ids; extra columns hold -1)
  const T* neg_threshold;  // [n] or null: a non-positive pair with S_ij < neg_threshold[i] is
                           // left out of every LSE and sigmoid sum (hard-negative masks)
  bool exclude_self, exclude_positives, sigmoid;
};

// Forward over one row block [r0, r0 + rows): tile [rows, m_all] holds sim on entry and is
// overwritten. Writes row_lse, pos_sum, pos_cnt, row_sig for those rows (each may be null) and
// merges the block into the column states col_m, col_s [m_main] (null when not wanted);
// col_pos [m_main] accumulates sum_i Y_ij S_ij (may be null).
template <typename T>
void contrastive_forward_tile(const ContrastiveProblem<T>& p, int64_t r0, int64_t rows, T* tile,
                              T* row_lse, T* pos_sum, T* pos_cnt, T* row_sig, T* col_m, T* col_s,
                              T* col_pos);

// Backward over one row block: tile holds sim on entry and dS_ij * scale_i on exit (ready for the
// dQ / dK GEMMs). Upstream gradients may be null (absent outputs). Adds to dscale [n] and
// dmargin [n] = sum_j dS_ij Y_ij (each may be null) and returns this block's part of dbias.
template <typename T>
double contrastive_backward_tile(const ContrastiveProblem<T>& p, int64_t r0, int64_t rows, T* tile,
                                 const T* row_lse, const T* col_lse, const T* g_row, const T* g_col,
                                 const T* g_pos, const T* g_colpos, const T* g_sig, T* dscale, T* dmargin);

}  // namespace cpu
}  // namespace flashloss
