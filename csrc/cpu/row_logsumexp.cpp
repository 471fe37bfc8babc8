// Row-wise log-sum-exp on the CPU.
//
// Tiling: each row is cut into column chunks of kChunk elements; the (row, chunk) pairs are the
// OpenMP work items, so a single very long row (V = 2^20) still uses every core. Each item
// produces one online-LSE state; the per-row states are merged with core::lse_merge.
// Saved for backward: nothing but the [N] LSE (the caller keeps x by reference).
// Inner loops run on 8-lane vectors (csrc/cpu/simd.h) with core::fast_exp; fp64 stays scalar.
// Cost: forward N*V exp + N*V adds, reads N*V elements once (twice from L1); backward N*V exp,
// reads x once and writes dx once. Memory beyond input and output: N * ceil(V / kChunk) states.
#include "row_logsumexp.h"

#include <omp.h>

#include <vector>

#include "../core/online_lse.h"
#include "simd.h"

namespace flashloss {
namespace cpu {
namespace {

constexpr int64_t kChunk = 4096;

// One chunk of a row folded into an online-LSE state: a max pass and a sum-of-exp pass over an
// L1-resident chunk (one exp per element instead of one rescale per element).
// fp32/bf16/f16 inputs: 8-lane vectors with fast_exp; fp64 inputs: scalar libm exp (the fp64 path
// exists for gradcheck, where accuracy is the point).
template <typename T>
core::LseState<float> fold_chunk(const T* row, int64_t lo, int64_t hi) {
  vf8 vmax = splat(-INFINITY);
  vi8 nan_lanes = vi8{};
  int64_t j = lo;
  for (; j + kLanes <= hi; j += kLanes) {
    const vf8 a = load8(row + j);
    nan_lanes |= (a != a);
    vmax = a > vmax ? a : vmax;
  }
  float m = hmax(vmax);
  bool has_nan = false;
  for (int k = 0; k < kLanes; ++k) has_nan |= nan_lanes[k] != 0;
  for (int64_t t = j; t < hi; ++t) {
    const float a = core::to_acc<float>(row[t]);
    has_nan |= a != a;
    m = a > m ? a : m;
  }
  if (has_nan) return {NAN, 1.f};
  if (m == -INFINITY) return core::lse_empty<float>();
  if (m == INFINITY) return {INFINITY, 1.f};
  vf8 vs = vf8{};
  const vf8 vm = splat(m);
  for (j = lo; j + kLanes <= hi; j += kLanes) vs += fast_exp(load8(row + j) - vm);
  float s = hsum(vs);
  for (; j < hi; ++j) s += core::fast_exp(core::to_acc<float>(row[j]) - m);
  return {m, s};
}

core::LseState<double> fold_chunk(const double* row, int64_t lo, int64_t hi) {
  core::LseState<double> st = core::lse_empty<double>();
  for (int64_t j = lo; j < hi; ++j) st = core::lse_push(st, row[j]);
  return st;
}

template <typename T>
void grad_chunk(const T* row, int64_t lo, int64_t hi, float lse, float g, T* drow) {
  // lse = -inf: every element is masked, the gradient is 0 (fast_exp(-inf) = 0 gives that).
  const float shift = lse == -INFINITY ? INFINITY : lse;
  const vf8 vshift = splat(shift), vg = splat(g);
  int64_t j = lo;
  for (; j + kLanes <= hi; j += kLanes) store8(drow + j, vg * fast_exp(load8(row + j) - vshift));
  for (; j < hi; ++j)
    drow[j] = core::Store<T>::from(g * core::fast_exp(core::to_acc<float>(row[j]) - shift));
}

void grad_chunk(const double* row, int64_t lo, int64_t hi, double lse, double g, double* drow) {
  for (int64_t j = lo; j < hi; ++j) drow[j] = g * core::softmax_weight(row[j], lse);
}

template <typename T>
void forward_impl(const T* x, int64_t N, int64_t V, int64_t ld, typename core::AccType<T>::type* lse) {
  using Acc = typename core::AccType<T>::type;
  const int64_t chunks = V > 0 ? (V + kChunk - 1) / kChunk : 0;
  std::vector<core::LseState<Acc>> partial(static_cast<size_t>(N * chunks));
#pragma omp parallel for schedule(static) if (N * V > 32768)
  for (int64_t item = 0; item < N * chunks; ++item) {
    const int64_t i = item / chunks, c = item % chunks;
    const int64_t lo = c * kChunk, hi = lo + kChunk < V ? lo + kChunk : V;
    partial[item] = fold_chunk(x + i * ld, lo, hi);
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
  const int64_t chunks = V > 0 ? (V + kChunk - 1) / kChunk : 0;
#pragma omp parallel for schedule(static) if (N * V > 32768)
  for (int64_t item = 0; item < N * chunks; ++item) {
    const int64_t i = item / chunks, c = item % chunks;
    const int64_t lo = c * kChunk, hi = lo + kChunk < V ? lo + kChunk : V;
    grad_chunk(x + i * ld, lo, hi, lse[i], g[i], dx + i * V);
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
