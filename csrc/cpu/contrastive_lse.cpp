// CPU epilogues of primitive A (flashloss.ops.contrastive_lse).
//
// Tiling: csrc/ops.cpp walks row blocks of BR rows; for each it computes the similarity tile
// sim = q[r0:r0+BR] k_all^T [BR, M_all] with one GEMM and calls these epilogues, which rebuild
// S_ij = scale_i sim_ij + bias (+ margin on positives) and the masks lane by lane (8 fp32 lanes,
// csrc/cpu/lanes.h), so the N x M matrix never exists beyond one block of rows.
//   forward:  row pass (OpenMP over rows): S, masks, row max, positive sums, sigmoid terms;
//             S with -inf at excluded pairs is written back; then sum exp(S - max) over the row.
//             column pass (OpenMP over column chunks): per-column max and sum over the block's
//             valid rows, merged into the running column states with core::lse_merge.
//   backward: one pass per row: dS = g_row P_row + g_col P_col + (g_pos + g_colpos) Y + sigmoid
//             term; dscale_i += sum_j dS_ij sim_ij; the tile is overwritten with dS * scale_i for
//             the dQ = dS K and dK = dS^T Q GEMMs done by the caller.
// Saved for backward: nothing here (the caller keeps row/column LSEs).
// Cost per tile: BR*M_all exps forward (+ BR*M_all for the column pass), 1-2 exps per element
// backward; all in cache-resident rows; the GEMMs (2*BR*M_all*D each) dominate for D >= 64.
#include "contrastive_lse.h"

#include <omp.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../core/online_lse.h"
#include "lanes.h"

namespace flashloss {
namespace cpu {
namespace {

template <typename T>
using Body = typename std::conditional<std::is_same<T, float>::value, Lane8, Lane1<T>>::type;

// S, positives Y and allowed mask for the W columns starting at j of global row i.
template <class L, typename T>
inline void evaluate(const ContrastiveProblem<T>& p, int64_t i, int64_t j, const T* sim_row,
                     typename L::F sc, typename L::F& S, typename L::I& Y, typename L::I& allowed) {
  using I = typename L::I;
  const I col = L::iota(static_cast<int32_t>(j));
  const I main = L::lt(col, L::splati(static_cast<int32_t>(p.m_main)));
  S = sc * L::load(sim_row + j) + L::splat(p.bias);
  Y = L::splati(0);
  if (p.targets) {
    const int32_t* t = p.targets + i * p.targets_per_row;
    for (int64_t k = 0; k < p.targets_per_row; ++k)
      Y = Y | L::eq(col, L::splati(t[k]));  // -1 (padding, ignored row) matches no column
  } else if (p.labels_q) {
    Y = L::eq(L::loadi(p.labels_k + j), L::splati(p.labels_q[i])) & main;
  }
  allowed = L::splati(-1);
  if (p.exclude_self) {
    const I self = L::eq(col, L::splati(static_cast<int32_t>(i))) & main;
    allowed = allowed & ~self;
    Y = Y & ~self;
  }
  if (p.exclude_positives) allowed = allowed & ~Y;
  // hard-negative mask: negatives below the row's threshold leave the LSEs (S has no margin yet)
  if (p.neg_threshold) allowed = allowed & (Y | ~L::gtf(L::splat(p.neg_threshold[i]), S));
  const T margin_i = p.margin + (p.margin_rows ? p.margin_rows[i] : T(0));
  if (margin_i != T(0)) S = L::sel(Y, S + L::splat(margin_i), S);
}

template <typename T>
inline T softplus(T x) {
  return (x > T(0) ? x : T(0)) + std::log1p(std::exp(-std::fabs(x)));
}

template <class L, typename T>
struct RowAcc {
  typename L::F vmax = L::splat(-std::numeric_limits<T>::infinity());
  typename L::F vpos = L::splat(T(0));
  int64_t count = 0;
  double sig = 0;
};

// Pass 1 over W columns: writes S (or -inf where excluded), accumulates the row statistics.
template <class L, typename T>
inline void row_step(const ContrastiveProblem<T>& p, int64_t i, int64_t j, T* row, T sc, RowAcc<L, T>& acc,
                     T* col_pos_local) {
  using F = typename L::F;
  F S;
  typename L::I Y, allowed;
  evaluate<L>(p, i, j, row, L::splat(sc), S, Y, allowed);
  const F neg_inf = L::splat(-std::numeric_limits<T>::infinity());
  const F masked = L::sel(allowed, S, neg_inf);
  acc.vmax = L::sel(L::gtf(masked, acc.vmax), masked, acc.vmax);
  const F sy = L::sel(Y, S, L::splat(T(0)));
  acc.vpos += sy;
  const int32_t c = L::hcount(Y);
  acc.count += c;
  if (c && col_pos_local) L::store(col_pos_local + j, L::load(col_pos_local + j) + sy);
  if (p.sigmoid) {
    for (int k = 0; k < L::W; ++k) {
      T s, y, a;
      if constexpr (L::W == 1) { s = S; y = Y; a = allowed; }
      else { s = S[k]; y = Y[k]; a = allowed[k]; }
      if (a) acc.sig += softplus(y ? -s : s);
    }
  }
  L::store(row + j, masked);
}

// Rows are split into at most kPosChunks fixed chunks (independent of the thread count); each
// chunk adds its column-positive sums into its own buffer, and the buffers are added in chunk
// order, so col_pos_sum is bitwise the same whatever OMP_NUM_THREADS is (per-thread buffers were
// not: the static split of rows over threads changed the summation order).
constexpr int64_t kPosChunks = 128;
// Row sums over the columns (sum exp, positives, dscale, dbias, dmargin) run in T lanes for at most
// kFlush columns, then are added into a double: plain fp32 lane sums over M = 2^20 columns lost
// ~2e-4 relative (each lane adds M/8 terms). Rows of at most kFlush columns are summed as before.
constexpr int64_t kFlush = 4096;

template <typename T>
void forward_rows(const ContrastiveProblem<T>& p, int64_t r0, int64_t rows, T* tile, T* row_lse, T* pos_sum,
                  T* pos_cnt, T* row_sig, T* col_pos) {
  using B = Body<T>;
  using S1 = Lane1<T>;
  const int64_t m = p.m_all;
  const int64_t chunks = rows < kPosChunks ? rows : kPosChunks;
  std::vector<T> col_pos_part(col_pos ? static_cast<size_t>(chunks * (m + B::W)) : 0, T(0));
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    T* cpl = col_pos ? col_pos_part.data() + c * (m + B::W) : nullptr;
    const int64_t c0 = rows * c / chunks, c1 = rows * (c + 1) / chunks;
    for (int64_t r = c0; r < c1; ++r) {
      const int64_t i = r0 + r;
      T* row = tile + r * m;
      const T sc = p.scale[i];
      RowAcc<B, T> acc;
      RowAcc<S1, T> tail;
      int64_t j = 0;
      double pos_flushed = 0;
      for (; j + B::W <= m; j += B::W) {
        if (j && j % kFlush == 0) {
          pos_flushed += static_cast<double>(B::hsum(acc.vpos));
          acc.vpos = B::splat(T(0));
        }
        row_step<B>(p, i, j, row, sc, acc, cpl);
      }
      for (; j < m; ++j) row_step<S1>(p, i, j, row, sc, tail, cpl);
      T mx = B::hmax(acc.vmax);
      mx = tail.vmax > mx ? tail.vmax : mx;
      if (pos_sum) pos_sum[i] = static_cast<T>(pos_flushed + static_cast<double>(B::hsum(acc.vpos) + tail.vpos));
      if (pos_cnt) pos_cnt[i] = static_cast<T>(acc.count + tail.count);
      if (row_sig) row_sig[i] = static_cast<T>(acc.sig + tail.sig);
      if (row_lse) {
        if (mx == -std::numeric_limits<T>::infinity()) {
          row_lse[i] = mx;
        } else {
          typename B::F vs = B::splat(T(0));
          const typename B::F vm = B::splat(mx);
          double flushed = 0;
          j = 0;
          for (; j + B::W <= m; j += B::W) {
            if (j && j % kFlush == 0) {
              flushed += static_cast<double>(B::hsum(vs));
              vs = B::splat(T(0));
            }
            vs += B::exp(B::load(row + j) - vm);
          }
          T s = B::hsum(vs);
          for (; j < m; ++j) s += S1::exp(row[j] - mx);
          row_lse[i] = mx + std::log(static_cast<T>(flushed + static_cast<double>(s)));
        }
      }
    }
  }
  if (col_pos) {
    // chunks in order; columns in parallel (each column's sum keeps the chunk order)
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < p.m_main; ++j) {
      T s = col_pos[j];
      for (int64_t c = 0; c < chunks; ++c) s += col_pos_part[static_cast<size_t>(c * (m + B::W) + j)];
      col_pos[j] = s;
    }
  }
}

// Column statistics of one block, vectorised across columns; merged into (col_m, col_s).
template <typename T>
void forward_columns(const ContrastiveProblem<T>& p, int64_t r0, int64_t rows, const T* tile, T* col_m,
                     T* col_s) {
  using B = Body<T>;
  constexpr int64_t kChunk = 512;
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t chunks = (p.m_main + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t c0 = c * kChunk, c1 = c0 + kChunk < p.m_main ? c0 + kChunk : p.m_main;
    T mx[kChunk + B::W], sm[kChunk + B::W];
    for (int64_t j = 0; j < kChunk + B::W; ++j) { mx[j] = -inf; sm[j] = 0; }
    const int64_t width = c1 - c0, vec_end = width / B::W * B::W;
    for (int64_t r = 0; r < rows; ++r) {
      if (!p.valid[r0 + r]) continue;
      const T* row = tile + r * p.m_all + c0;
      int64_t j = 0;
      for (; j < vec_end; j += B::W) {
        const auto v = B::load(row + j), cur = B::load(mx + j);
        B::store(mx + j, B::sel(B::gtf(v, cur), v, cur));
      }
      for (; j < width; ++j) mx[j] = row[j] > mx[j] ? row[j] : mx[j];
    }
    T shift[kChunk + B::W];
    for (int64_t j = 0; j < width; ++j) shift[j] = std::isinf(mx[j]) ? T(0) : mx[j];
    for (int64_t r = 0; r < rows; ++r) {
      if (!p.valid[r0 + r]) continue;
      const T* row = tile + r * p.m_all + c0;
      int64_t j = 0;
      for (; j < vec_end; j += B::W)
        B::store(sm + j, B::load(sm + j) + B::exp(B::load(row + j) - B::load(shift + j)));
      for (; j < width; ++j) sm[j] += Lane1<T>::exp(row[j] - shift[j]);
    }
    for (int64_t j = 0; j < width; ++j) {
      const core::LseState<T> blk = mx[j] == -inf ? core::lse_empty<T>() : core::LseState<T>{mx[j], sm[j]};
      const core::LseState<T> st = core::lse_merge(core::LseState<T>{col_m[c0 + j], col_s[c0 + j]}, blk);
      col_m[c0 + j] = st.m;
      col_s[c0 + j] = st.s;
    }
  }
}

template <class L, typename T>
struct GradAcc {
  typename L::F dscale = L::splat(T(0));
  typename L::F dbias = L::splat(T(0));
  typename L::F dmargin = L::splat(T(0));
};

template <class L, typename T>
inline void grad_step(const ContrastiveProblem<T>& p, int64_t i, int64_t j, T* row, T sc, T lse_i, T g_row_i,
                      T g_pos_i, T g_sig_i, bool valid_i, const T* col_lse, const T* g_col, const T* g_colpos,
                      GradAcc<L, T>& acc) {
  using F = typename L::F;
  using I = typename L::I;
  F S;
  I Y, allowed;
  const F sim = L::load(row + j);
  evaluate<L>(p, i, j, row, L::splat(sc), S, Y, allowed);
  const F zero = L::splat(T(0));
  F dS = zero;
  if (g_row_i != T(0)) dS += L::splat(g_row_i) * L::sel(allowed, L::exp(S - L::splat(lse_i)), zero);
  if (col_lse && valid_i) {
    const I main = L::lt(L::iota(static_cast<int32_t>(j)), L::splati(static_cast<int32_t>(p.m_main)));
    dS += L::load(g_col + j) * L::sel(allowed & main, L::exp(S - L::load(col_lse + j)), zero);
  }
  if (g_pos_i != T(0)) dS += L::sel(Y, L::splat(g_pos_i), zero);
  if (g_colpos) dS += L::sel(Y, L::load(g_colpos + j), zero);
  if (p.sigmoid && g_sig_i != T(0)) {
    // d softplus(-z S)/dS = -z sigmoid(-z S): positives -sigmoid(-S), negatives sigmoid(S)
    const F one = L::splat(T(1));
    const F zs = L::sel(Y, -S, S);
    const F sig = one / (one + L::exp(-zs));
    dS += L::splat(g_sig_i) * L::sel(allowed, L::sel(Y, -sig, sig), zero);
  }
  acc.dscale += dS * sim;
  acc.dbias += dS;
  acc.dmargin += L::sel(Y, dS, zero);
  L::store(row + j, dS * L::splat(sc));
}

}  // namespace

template <typename T>
void contrastive_forward_tile(const ContrastiveProblem<T>& p, int64_t r0, int64_t rows, T* tile, T* row_lse,
                              T* pos_sum, T* pos_cnt, T* row_sig, T* col_m, T* col_s, T* col_pos) {
  forward_rows(p, r0, rows, tile, row_lse, pos_sum, pos_cnt, row_sig, col_pos);
  if (col_m) forward_columns(p, r0, rows, tile, col_m, col_s);
}

template <typename T>
double contrastive_backward_tile(const ContrastiveProblem<T>& p, int64_t r0, int64_t rows, T* tile,
                                 const T* row_lse, const T* col_lse, const T* g_row, const T* g_col,
                                 const T* g_pos, const T* g_colpos, const T* g_sig, T* dscale, T* dmargin) {
  using B = Body<T>;
  using S1 = Lane1<T>;
  const T inf = std::numeric_limits<T>::infinity();
  // per-row dbias partials added in row order below: the result does not depend on the thread
  // count (an OpenMP reduction combines the threads' partial sums in an unspecified order)
  std::vector<double> dbias_rows(static_cast<size_t>(rows), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r0 + r;
    T* row = tile + r * p.m_all;
    const T sc = p.scale[i];
    // an empty row (LSE -inf) has P = 0: shift by +inf so exp gives 0, never NaN
    const T lse_i = row_lse ? (row_lse[i] == -inf ? inf : row_lse[i]) : inf;
    const T g_row_i = row_lse && g_row ? g_row[i] : T(0);
    const T g_pos_i = g_pos ? g_pos[i] : T(0);
    const T g_sig_i = g_sig ? g_sig[i] : T(0);
    const bool valid_i = p.valid[i] != 0;
    GradAcc<B, T> acc;
    GradAcc<S1, T> tail;
    int64_t j = 0;
    double ds = 0, db = 0, dm = 0;  // flushed every kFlush columns
    for (; j + B::W <= p.m_all; j += B::W) {
      if (j && j % kFlush == 0) {
        ds += static_cast<double>(B::hsum(acc.dscale));
        db += static_cast<double>(B::hsum(acc.dbias));
        dm += static_cast<double>(B::hsum(acc.dmargin));
        acc = GradAcc<B, T>();
      }
      grad_step<B>(p, i, j, row, sc, lse_i, g_row_i, g_pos_i, g_sig_i, valid_i, col_lse, g_col, g_colpos, acc);
    }
    for (; j < p.m_all; ++j)
      grad_step<S1>(p, i, j, row, sc, lse_i, g_row_i, g_pos_i, g_sig_i, valid_i, col_lse, g_col, g_colpos, tail);
    if (dscale) dscale[i] += static_cast<T>(ds + static_cast<double>(B::hsum(acc.dscale) + tail.dscale));
    if (dmargin) dmargin[i] += static_cast<T>(dm + static_cast<double>(B::hsum(acc.dmargin) + tail.dmargin));
    dbias_rows[static_cast<size_t>(r)] = db + static_cast<double>(B::hsum(acc.dbias) + tail.dbias);
  }
  double dbias = 0;
  for (int64_t r = 0; r < rows; ++r) dbias += dbias_rows[static_cast<size_t>(r)];
  return dbias;
}

template void contrastive_forward_tile<float>(const ContrastiveProblem<float>&, int64_t, int64_t, float*, float*,
                                              float*, float*, float*, float*, float*, float*);
template void contrastive_forward_tile<double>(const ContrastiveProblem<double>&, int64_t, int64_t, double*,
                                               double*, double*, double*, double*, double*, double*, double*);
template double contrastive_backward_tile<float>(const ContrastiveProblem<float>&, int64_t, int64_t, float*,
                                                 const float*, const float*, const float*, const float*,
                                                 const float*, const float*, const float*, float*, float*);
template double contrastive_backward_tile<double>(const ContrastiveProblem<double>&, int64_t, int64_t, double*,
                                                  const double*, const double*, const double*, const double*,
                                                  const double*, const double*, const double*, double*, double*);

}  // namespace cpu
}  // namespace flashloss
