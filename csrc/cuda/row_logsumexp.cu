// Row-wise log-sum-exp on CUDA.
//
// Forward tiling: one thread block of kThreads per row; each thread folds a strided slice of the
// row into an online-LSE state (core::lse_push), warps merge states with shuffles
// (core::lse_merge), and the kThreads/32 warp states are merged through shared memory.
// Saved for backward: the [N] LSE only.
// Backward: a grid-stride elementwise kernel, dx = g[i] * exp(x - lse[i]).
// Cost: forward N*V exp, N*V*bytes read; backward N*V exp, N*V*bytes read + N*V*bytes written.
// Memory-bound: the roofline is 1 read (forward) and 1 read + 1 write (backward) of x.
#include <cuda_runtime.h>

#include "../core/online_lse.h"
#include "row_logsumexp.h"

namespace flashloss {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename Acc>
__device__ core::LseState<Acc> warp_merge(core::LseState<Acc> st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    core::LseState<Acc> other;
    other.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    st = core::lse_merge(st, other);
  }
  return st;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const T* __restrict__ x, int64_t V, int64_t ld,
               typename core::AccType<T>::type* __restrict__ lse) {
  using Acc = typename core::AccType<T>::type;
  __shared__ Acc warp_m[kWarps];
  __shared__ Acc warp_s[kWarps];
  const T* row = x + static_cast<int64_t>(blockIdx.x) * ld;
  core::LseState<Acc> st = core::lse_empty<Acc>();
  for (int64_t j = threadIdx.x; j < V; j += kThreads) st = core::lse_push(st, core::to_acc<Acc>(row[j]));
  st = warp_merge(st);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_m[warp] = st.m;
    warp_s[warp] = st.s;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? core::LseState<Acc>{warp_m[lane], warp_s[lane]} : core::lse_empty<Acc>();
    st = warp_merge(st);
    if (lane == 0) lse[blockIdx.x] = core::lse_value(st);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const T* __restrict__ x, int64_t N, int64_t V, int64_t ld,
                const typename core::AccType<T>::type* __restrict__ lse,
                const typename core::AccType<T>::type* __restrict__ g, T* __restrict__ dx) {
  using Acc = typename core::AccType<T>::type;
  const int64_t total = N * V;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = idx / V, j = idx % V;
    const Acc w = core::softmax_weight(core::to_acc<Acc>(x[i * ld + j]), lse[i]);
    dx[idx] = core::Store<T>::from(g[i] * w);
  }
}

template <typename T>
int launch_forward(const void* x, int64_t N, int64_t V, int64_t ld, void* lse, cudaStream_t stream) {
  using Acc = typename core::AccType<T>::type;
  if (N == 0) return 0;
  // One block per row; gridDim.x allows 2^31 - 1 rows.
  forward_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
      static_cast<const T*>(x), V, ld, static_cast<Acc*>(lse));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_backward(const void* x, int64_t N, int64_t V, int64_t ld, const void* lse, const void* g,
                    void* dx, cudaStream_t stream) {
  using Acc = typename core::AccType<T>::type;
  const int64_t total = N * V;
  if (total == 0) return 0;
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;  // grid-stride loop covers the rest
  backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(x), N, V, ld, static_cast<const Acc*>(lse), static_cast<const Acc*>(g),
      static_cast<T*>(dx));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int row_logsumexp_forward(core::DType dtype, const void* x, int64_t N, int64_t V, int64_t ld,
                          void* lse, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case core::DType::f32: return launch_forward<float>(x, N, V, ld, lse, s);
    case core::DType::f64: return launch_forward<double>(x, N, V, ld, lse, s);
    case core::DType::bf16: return launch_forward<core::bf16_t>(x, N, V, ld, lse, s);
    case core::DType::f16: return launch_forward<core::f16_t>(x, N, V, ld, lse, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int row_logsumexp_backward(core::DType dtype, const void* x, int64_t N, int64_t V, int64_t ld,
                           const void* lse, const void* g, void* dx, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case core::DType::f32: return launch_backward<float>(x, N, V, ld, lse, g, dx, s);
    case core::DType::f64: return launch_backward<double>(x, N, V, ld, lse, g, dx, s);
    case core::DType::bf16: return launch_backward<core::bf16_t>(x, N, V, ld, lse, g, dx, s);
    case core::DType::f16: return launch_backward<core::f16_t>(x, N, V, ld, lse, g, dx, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace flashloss
