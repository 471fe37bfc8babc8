// Row-wise log-sum-exp on the CPU.
//
// Tiling: each row is cut into column chunks of kChunk elements; the (row, chunk) pairs are the
// OpenMP work items, so a single very long row (V = 2^20) still uses every core. Each item
// produces one online-LSE state; the per-row states are merged with core::lse_merge.
// Saved for backward: nothing but the [N] LSE (the caller keeps x by reference).
// Cost: forward N*V exp + N*V adds, reads N*V elements once; backward N*V exp, reads x once and
// writes dx once. Memory beyond input and output: N * ceil(V / kChunk) states.
#include "row_logsumexp.h"

#include <omp.h>

#include <vector>

#include "../core/online_lse.h"

namespace flashloss {
namespace cpu {
namespace {

constexpr int64_t kChunk = 4096;

template <typename T>
void forward_impl(const T* x, int64_t N, int64_t V, int64_t ld, typename core::AccType<T>::type* lse) {
  using Acc = typename core::AccType<T>::type;
  const int64_t chunks = V > 0 ? (V + kChunk - 1) / kChunk : 0;
  std::vector<core::LseState<Acc>> partial(static_cast<size_t>(N * chunks));
#pragma omp parallel for schedule(static) if (N * V > 32768)
  for (int64_t item = 0; item < N * chunks; ++item) {
    const int64_t i = item / chunks, c = item % chunks;
    const T* row = x + i * ld;
    const int64_t lo = c * kChunk, hi = lo + kChunk < V ? lo + kChunk : V;
    // Two passes over an L1/L2-resident chunk: max, then sum of exp(a - max). Cheaper than one
    // rescaling push per element, same (m, s) state.
    Acc m = core::neg_inf<Acc>();
    bool has_nan = false;
    for (int64_t j = lo; j < hi; ++j) {
      const Acc a = core::to_acc<Acc>(row[j]);
      has_nan |= core::is_nan(a);
      m = a > m ? a : m;
    }
    core::LseState<Acc> st;
    if (has_nan) {
      st = {Acc(NAN), Acc(1)};
    } else if (m == core::neg_inf<Acc>() || m == core::pos_inf<Acc>()) {
      st = m == core::neg_inf<Acc>() ? core::lse_empty<Acc>() : core::LseState<Acc>{m, Acc(1)};
    } else {
      Acc s = 0;
      for (int64_t j = lo; j < hi; ++j) s += core::fl_exp(core::to_acc<Acc>(row[j]) - m);
      st = {m, s};
    }
    partial[item] = st;
  }
#pragma omp parallel for schedule(static) if (N > 1024)
  for (int64_t i = 0; i < N; ++i) {
    core::LseState<Acc> st = core::lse_empty<Acc>();
    for (int64_t c = 0; c < chunks; ++c) st = core::lse_merge(st, partial[i * chunks + c]);
    lse[i] = core::lse_value(st);
  }
}

template <typename T>
void backward_impl(const T* x, int64_t N, int64_t V, int64_t ld,
                   const typename core::AccType<T>::type* lse,
                   const typename core::AccType<T>::type* g, T* dx) {
  using Acc = typename core::AccType<T>::type;
  const int64_t chunks = V > 0 ? (V + kChunk - 1) / kChunk : 0;
#pragma omp parallel for schedule(static) if (N * V > 32768)
  for (int64_t item = 0; item < N * chunks; ++item) {
    const int64_t i = item / chunks, c = item % chunks;
    const int64_t lo = c * kChunk, hi = lo + kChunk < V ? lo + kChunk : V;
    const T* row = x + i * ld;
    T* drow = dx + i * V;
    const Acc gi = g[i], li = lse[i];
    for (int64_t j = lo; j < hi; ++j)
      drow[j] = core::Store<T>::from(gi * core::softmax_weight(core::to_acc<Acc>(row[j]), li));
  }
}

template <typename T>
void dispatch_forward(const void* x, int64_t N, int64_t V, int64_t ld, void* lse) {
  using Acc = typename core::AccType<T>::type;
  forward_impl<T>(static_cast<const T*>(x), N, V, ld, static_cast<Acc*>(lse));
}

template <typename T>
void dispatch_backward(const void* x, int64_t N, int64_t V, int64_t ld, const void* lse,
                       const void* g, void* dx) {
  using Acc = typename core::AccType<T>::type;
  backward_impl<T>(static_cast<const T*>(x), N, V, ld, static_cast<const Acc*>(lse),
                   static_cast<const Acc*>(g), static_cast<T*>(dx));
}

}  // namespace

void row_logsumexp_forward(core::DType dtype, const void* x, int64_t N, int64_t V, int64_t ld,
                           void* lse) {
  switch (dtype) {
    case core::DType::f32: return dispatch_forward<float>(x, N, V, ld, lse);
    case core::DType::f64: return dispatch_forward<double>(x, N, V, ld, lse);
    case core::DType::bf16: return dispatch_forward<core::bf16_t>(x, N, V, ld, lse);
    case core::DType::f16: return dispatch_forward<core::f16_t>(x, N, V, ld, lse);
  }
}

void row_logsumexp_backward(core::DType dtype, const void* x, int64_t N, int64_t V, int64_t ld,
                            const void* lse, const void* g, void* dx) {
  switch (dtype) {
    case core::DType::f32: return dispatch_backward<float>(x, N, V, ld, lse, g, dx);
    case core::DType::f64: return dispatch_backward<double>(x, N, V, ld, lse, g, dx);
    case core::DType::bf16: return dispatch_backward<core::bf16_t>(x, N, V, ld, lse, g, dx);
    case core::DType::f16: return dispatch_backward<core::f16_t>(x, N, V, ld, lse, g, dx);
  }
}

}  // namespace cpu
}  // namespace flashloss
