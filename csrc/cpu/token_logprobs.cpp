// CPU epilogues of primitive B (flashloss.ops.token_logprobs, backend 'cpu').
//
// Tiling (csrc/ops.cpp): vocabulary chunks of C columns (outer loop) x row blocks of R rows
// (inner loop; by default C = 1024 and R = 4096 rows: 2^22 fp32 = 16 MB). Per tile the caller
// runs one GEMM x = hidden_blk W_chunk^T [R, C] into a reused fp32 (fp64) buffer and calls these
// functions, which work row by row (OpenMP over rows, 8 fp32 lanes via csrc/cpu/lanes.h; the
// fp64 path is scalar with libm):
//   forward:  pass 1 over the row: z = logit(x + b) written back, chunk max, sum z, target z;
//             pass 2 over the same row (now in L1: C fp32 = 4 KB for C = 1024):
//             e = exp(z - m_c), sum e, sum e (z - m_c) (entropy), sum e^2 (log sum p^2);
//             the chunk's VocabState is merged into the row's running state (core::vocab_merge).
//   backward: one pass: dx = (p (c0 + c1 u) + s) dz/dx with u = z - lse, p = e^u, written in
//             place; + g dz/dx at the target column. Ignored rows are written as 0.
// Each tile element is read from memory once per pass (x comes from the GEMM, dx goes to two
// GEMMs and a column sum). Per element: forward 1 exp (+1 tanh and 1 exp with a softcap),
// ~10 flops; backward 1 exp, ~8 flops. Against 2H flops per element and GEMM (H = 1024: 2048)
// the epilogues are < 2% of the work; the GEMMs (8NHV flops in all) dominate.
// Saved for backward: nothing here (the caller keeps lse and, when needed, entropy).
#include "token_logprobs.h"

#include <cmath>
#include <limits>
#include <type_traits>

#include "lanes.h"

namespace flashloss {
namespace cpu {
namespace {

template <typename T>
using Body = typename std::conditional<std::is_same<T, float>::value, Lane8, Lane1<T>>::type;

// x + bias at columns [j, j + W) of a row (bias pointer already offset to the chunk).
template <class L, typename T>
inline typename L::F raw(const T* row, const T* bias, int64_t j) {
  const typename L::F x = L::load(row + j);
  return bias ? x + L::load(bias + j) : x;
}

// Pass 1 over the W columns at j: z written back; running max and sum of z.
template <bool SC, class L, typename T>
inline void fwd_pass1(const core::LogitMap<T>& map, T* row, const T* bias, int64_t j, typename L::F& vmax,
                      typename L::F& vsum) {
  const typename L::F z = core::logit<SC>(raw<L>(row, bias, j), map);
  L::store(row + j, z);
  vmax = L::sel(L::gtf(z, vmax), z, vmax);
  vsum += z;
}

template <bool ENT, bool P2, class L, typename T>
inline void fwd_pass2(const T* row, int64_t j, typename L::F m, typename L::F& vs, typename L::F& vsz,
                      typename L::F& vs2) {
  const typename L::F d = L::load(row + j) - m;
  const typename L::F e = core::tlp_exp(d);
  vs += e;
  if constexpr (ENT) vsz += e * d;
  if constexpr (P2) vs2 += e * e;
}

template <bool SC, bool ENT, bool P2, typename T>
void forward_tile(const TokenProblem<T>& p, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* tile,
                  core::RowState<T>* state) {
  using B = Body<T>;
  using S1 = Lane1<T>;
  const T* bias = p.bias ? p.bias + c0 : nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r0 + r;
    const int64_t y = p.targets[i];
    if (y == p.ignore_index) continue;
    T* row = tile + r * cols;
    typename B::F vmax = B::splat(-std::numeric_limits<T>::infinity()), vsum = B::splat(T(0));
    T tmax = -std::numeric_limits<T>::infinity(), tsum = 0;
    int64_t j = 0;
    for (; j + B::W <= cols; j += B::W) fwd_pass1<SC, B>(p.map, row, bias, j, vmax, vsum);
    for (; j < cols; ++j) fwd_pass1<SC, S1>(p.map, row, bias, j, tmax, tsum);
    const T bmax = B::hmax(vmax);
    const T m = bmax > tmax ? bmax : tmax;
    core::RowState<T>& st = state[i];
    st.zsum += B::hsum(vsum) + tsum;
    if (y >= c0 && y < c0 + cols) st.zt = row[y - c0];
    if (!(m > -std::numeric_limits<T>::infinity())) {  // every z = -inf (or NaN): no exp of -inf - -inf
      st.v = core::vocab_merge(st.v, core::VocabState<T>{m, T(m == m ? 0 : 1), T(0), T(0)});
      continue;
    }
    typename B::F vs = B::splat(T(0)), vsz = vs, vs2 = vs;
    T ts = 0, tsz = 0, ts2 = 0;
    const typename B::F vm = B::splat(m);
    j = 0;
    for (; j + B::W <= cols; j += B::W) fwd_pass2<ENT, P2, B>(row, j, vm, vs, vsz, vs2);
    for (; j < cols; ++j) fwd_pass2<ENT, P2, S1>(row, j, m, ts, tsz, ts2);
    const core::VocabState<T> chunk{m, B::hsum(vs) + ts, B::hsum(vsz) + tsz, B::hsum(vs2) + ts2};
    st.v = core::vocab_merge(st.v, chunk);
  }
}

template <bool SC, class L, typename T>
inline void bwd_step(const core::LogitMap<T>& map, const core::RowGrad<T>& rg, T* row, const T* bias,
                     int64_t j) {
  const typename L::F z = core::logit<SC>(raw<L>(row, bias, j), map);
  L::store(row + j, core::dlogit(z, rg) * core::logit_grad<SC>(z, map));
}

template <bool SC, typename T>
void backward_tile(const TokenProblem<T>& p, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* tile,
                   const T* lse, const T* entropy, const T* g, const T* l, const T* h, const T* s) {
  using B = Body<T>;
  using S1 = Lane1<T>;
  const T* bias = p.bias ? p.bias + c0 : nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r0 + r;
    const int64_t y = p.targets[i];
    T* row = tile + r * cols;
    if (y == p.ignore_index) {  // no gradient at all (its lse is 0 and must not be used)
      for (int64_t j = 0; j < cols; ++j) row[j] = T(0);
      continue;
    }
    const T g_i = g ? g[i] : T(0);
    const core::RowGrad<T> rg = core::row_grad<T>(lse[i], h ? entropy[i] : T(0), g_i, l ? l[i] : T(0),
                                                  h ? h[i] : T(0), s ? s[i] : T(0));
    const bool hit = g_i != T(0) && y >= c0 && y < c0 + cols;
    T zy = 0;
    if (hit) zy = core::logit<SC>(row[y - c0] + (bias ? bias[y - c0] : T(0)), p.map);
    int64_t j = 0;
    for (; j + B::W <= cols; j += B::W) bwd_step<SC, B>(p.map, rg, row, bias, j);
    for (; j < cols; ++j) bwd_step<SC, S1>(p.map, rg, row, bias, j);
    if (hit) row[y - c0] += g_i * core::logit_grad<SC>(zy, p.map);
  }
}

}  // namespace

template <typename T>
void token_state_init(int64_t n, core::RowState<T>* state) {
  for (int64_t i = 0; i < n; ++i) state[i] = core::row_state_init<T>();
}

template <typename T>
void token_forward_tile(const TokenProblem<T>& p, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* tile,
                        core::RowState<T>* state, bool entropy, bool sum_p2) {
  const int k = (p.map.softcap ? 4 : 0) + (entropy ? 2 : 0) + (sum_p2 ? 1 : 0);
  switch (k) {
#define FL_CASE(K, SC, ENT, P2) \
  case K: forward_tile<SC, ENT, P2>(p, r0, rows, c0, cols, tile, state); break;
    FL_CASE(0, false, false, false)
    FL_CASE(1, false, false, true)
    FL_CASE(2, false, true, false)
    FL_CASE(3, false, true, true)
    FL_CASE(4, true, false, false)
    FL_CASE(5, true, false, true)
    FL_CASE(6, true, true, false)
    FL_CASE(7, true, true, true)
#undef FL_CASE
  }
}

template <typename T>
void token_forward_finish(const TokenProblem<T>& p, const core::RowState<T>* state, T* logp, T* lse, T* entropy,
                          T* z_sum, T* log_sum_p2) {
  for (int64_t i = 0; i < p.n; ++i)
    core::row_finish(state[i], p.targets[i] != p.ignore_index, logp ? logp + i : nullptr, lse ? lse + i : nullptr,
                     entropy ? entropy + i : nullptr, z_sum ? z_sum + i : nullptr,
                     log_sum_p2 ? log_sum_p2 + i : nullptr);
}

template <typename T>
void token_backward_tile(const TokenProblem<T>& p, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* tile,
                         const T* lse, const T* entropy, const T* g, const T* l, const T* h, const T* s) {
  if (p.map.softcap) backward_tile<true>(p, r0, rows, c0, cols, tile, lse, entropy, g, l, h, s);
  else backward_tile<false>(p, r0, rows, c0, cols, tile, lse, entropy, g, l, h, s);
}

#define FL_INSTANTIATE(T)                                                                                      \
  template void token_state_init<T>(int64_t, core::RowState<T>*);                                             \
  template void token_forward_tile<T>(const TokenProblem<T>&, int64_t, int64_t, int64_t, int64_t, T*,         \
                                      core::RowState<T>*, bool, bool);                                         \
  template void token_forward_finish<T>(const TokenProblem<T>&, const core::RowState<T>*, T*, T*, T*, T*, T*); \
  template void token_backward_tile<T>(const TokenProblem<T>&, int64_t, int64_t, int64_t, int64_t, T*,        \
                                       const T*, const T*, const T*, const T*, const T*, const T*);
FL_INSTANTIATE(float)
FL_INSTANTIATE(double)
#undef FL_INSTANTIATE

}  // namespace cpu
}  // namespace flashloss
