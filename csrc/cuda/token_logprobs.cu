// Primitive B on CUDA (flashloss.ops.token_logprobs, backend 'cuda'): the epilogues of the tiled
// lm_head. csrc/ops.cpp walks vocabulary chunks (C = 8192 columns by default) x row blocks (as
// many rows as keep the tile within 2^25 fp32 = 128 MB), writes each tile of raw logits
// x = hidden_blk W_chunk^T [R, C] with cuBLAS (at::mm; fp32 output for bf16/fp16 inputs) into one
// reused buffer and launches these kernels on it (same stream, no synchronisation):
//
//   init_kernel          state[i] = empty                            thread per row
//   forward_tile_kernel  one warp per tile row, 8 warps per block: each lane folds columns
//                        lane, lane + 32, ... into an online state (core::vocab_push: running max,
//                        sum e^(z-m), sum e^(z-m)(z-m), sum e^2(z-m); one exp per element), the
//                        warp merges the 32 states with shuffles (core::vocab_merge) and lane 0
//                        merges the result into the row's state; sum z alongside; the lane that
//                        meets the target column stores the target logit.
//   finish_kernel        the five [N] outputs from the states (0 on ignored rows)  thread per row
//   backward_tile_kernel one warp per row: dx = (p (c0 + c1 u) + s + g 1[v=y]) dz/dx from the
//                        saved lse (core::dlogit), written in place in fp32 (for the dbias column
//                        sum, or as the GEMM operand for fp32/fp64) and/or rounded to the input
//                        dtype for the 16-bit backward GEMMs.
//
// Each tile element is read once per kernel (coalesced: a warp reads 32 consecutive elements of
// a row) and written at most twice (backward); all kernels are memory-bound: forward ~4 bytes,
// backward ~8-10 bytes per logit, against 2H FLOPs per logit for each GEMM. Nothing of size N x V
// is stored; the [N] row state (6 Acc per row) is the only extra memory besides the tile (and the
// 16-bit dx copy of a tile for bf16/fp16). Deterministic: no atomics; every reduction order is
// fixed by the launch shape.
#include <cuda_runtime.h>

#include <cstdint>

#include "../core/token_logprobs.h"
#include "token_logprobs.h"

namespace flashloss {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

template <typename Acc>
__device__ __forceinline__ core::VocabState<Acc> shfl_xor(const core::VocabState<Acc>& st, int offset) {
  return {__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset),
          __shfl_xor_sync(0xffffffffu, st.sz, offset), __shfl_xor_sync(0xffffffffu, st.s2, offset)};
}

template <typename Acc>
struct TileParams {
  const Acc* bias;  // offset to the chunk's first column, or null
  const int64_t* targets;
  int64_t ignore_index, r0, rows, c0, cols;
  core::LogitMap<Acc> map;
};

template <typename Acc>
TileParams<Acc> tile_params(const TokenTileArgs& a) {
  return {a.bias ? static_cast<const Acc*>(a.bias) + a.c0 : nullptr, a.targets, a.ignore_index, a.r0, a.rows,
          a.c0, a.cols, core::make_logit_map<Acc>(a.inv_temperature, a.logit_scale, a.softcap)};
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) init_kernel(int64_t n, core::RowState<Acc>* __restrict__ state) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) state[i] = core::row_state_init<Acc>();
}

template <typename Acc, bool SC>
__global__ void __launch_bounds__(kThreads)
forward_tile_kernel(TileParams<Acc> p, const Acc* __restrict__ tile, core::RowState<Acc>* __restrict__ state) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= p.rows) return;  // r is the same for the whole warp
  const int64_t i = p.r0 + r;
  const int64_t y = p.targets[i];
  if (y == p.ignore_index) return;
  const Acc* row = tile + r * p.cols;
  core::VocabState<Acc> st = core::vocab_empty<Acc>();
  Acc zsum = 0;
  for (int64_t j = lane; j < p.cols; j += 32) {
    const Acc x = p.bias ? row[j] + p.bias[j] : row[j];
    const Acc z = core::logit<SC>(x, p.map);
    st = core::vocab_push(st, z);
    zsum += z;
    if (p.c0 + j == y) state[i].zt = z;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    st = core::vocab_merge(st, shfl_xor(st, offset));
    zsum += __shfl_xor_sync(0xffffffffu, zsum, offset);
  }
  if (lane == 0) {
    core::RowState<Acc>& rs = state[i];
    rs.v = core::vocab_merge(rs.v, st);
    rs.zsum += zsum;
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
finish_kernel(int64_t n, const int64_t* __restrict__ targets, int64_t ignore_index,
              const core::RowState<Acc>* __restrict__ state, Acc* logp, Acc* lse, Acc* entropy, Acc* z_sum,
              Acc* log_sum_p2) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  core::row_finish(state[i], targets[i] != ignore_index, logp ? logp + i : nullptr, lse ? lse + i : nullptr,
                   entropy ? entropy + i : nullptr, z_sum ? z_sum + i : nullptr,
                   log_sum_p2 ? log_sum_p2 + i : nullptr);
}

template <typename Acc>
struct Upstream {
  const Acc *lse, *entropy, *g, *l, *h, *s;
};

// Lp: the 16-bit dtype of the rounded copy (or Acc when there is none: dx is then null).
template <typename Acc, bool SC, typename Lp>
__global__ void __launch_bounds__(kThreads)
backward_tile_kernel(TileParams<Acc> p, Acc* __restrict__ tile, Lp* __restrict__ dx, bool keep_acc, Upstream<Acc> u) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= p.rows) return;
  const int64_t i = p.r0 + r;
  const int64_t y = p.targets[i];
  Acc* row = tile + r * p.cols;
  Lp* drow = dx ? dx + r * p.cols : nullptr;
  if (y == p.ignore_index) {  // no gradient (its lse is 0 and must not be used)
    for (int64_t j = lane; j < p.cols; j += 32) {
      if (keep_acc) row[j] = Acc(0);
      if (drow) drow[j] = core::Store<Lp>::from(Acc(0));
    }
    return;
  }
  const core::RowGrad<Acc> rg = core::row_grad<Acc>(u.lse[i], u.h ? u.entropy[i] : Acc(0), u.g ? u.g[i] : Acc(0),
                                                    u.l ? u.l[i] : Acc(0), u.h ? u.h[i] : Acc(0),
                                                    u.s ? u.s[i] : Acc(0));
  for (int64_t j = lane; j < p.cols; j += 32) {
    const Acc x = p.bias ? row[j] + p.bias[j] : row[j];
    const Acc z = core::logit<SC>(x, p.map);
    Acc d = core::dlogit(z, rg);
    if (p.c0 + j == y) d += rg.g;
    d *= core::logit_grad<SC>(z, p.map);
    if (keep_acc) row[j] = d;
    if (drow) drow[j] = core::Store<Lp>::from(d);
  }
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>((rows + kWarps - 1) / kWarps); }
unsigned thread_blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <typename Acc>
int launch_forward(const TokenTileArgs& a, const void* tile, void* state, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return 0;
  const auto p = tile_params<Acc>(a);
  auto* st = static_cast<core::RowState<Acc>*>(state);
  if (p.map.softcap)
    forward_tile_kernel<Acc, true><<<row_blocks(a.rows), kThreads, 0, stream>>>(p, static_cast<const Acc*>(tile), st);
  else
    forward_tile_kernel<Acc, false><<<row_blocks(a.rows), kThreads, 0, stream>>>(p, static_cast<const Acc*>(tile), st);
  return static_cast<int>(cudaGetLastError());
}

template <typename Acc, typename Lp>
int launch_backward_lp(const TokenTileArgs& a, void* tile, void* dx, bool keep_acc, const Upstream<Acc>& u,
                       cudaStream_t stream) {
  const auto p = tile_params<Acc>(a);
  Acc* t = static_cast<Acc*>(tile);
  Lp* d = static_cast<Lp*>(dx);
  if (p.map.softcap)
    backward_tile_kernel<Acc, true, Lp><<<row_blocks(a.rows), kThreads, 0, stream>>>(p, t, d, keep_acc, u);
  else
    backward_tile_kernel<Acc, false, Lp><<<row_blocks(a.rows), kThreads, 0, stream>>>(p, t, d, keep_acc, u);
  return static_cast<int>(cudaGetLastError());
}

template <typename Acc>
int launch_backward(const TokenTileArgs& a, void* tile, core::DType dx_dtype, void* dx, bool keep_acc,
                    const void* lse, const void* entropy, const void* g, const void* l, const void* h, const void* s,
                    cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return 0;
  const Upstream<Acc> u{static_cast<const Acc*>(lse), static_cast<const Acc*>(entropy), static_cast<const Acc*>(g),
                        static_cast<const Acc*>(l),   static_cast<const Acc*>(h),       static_cast<const Acc*>(s)};
  if (dx != nullptr && dx_dtype == core::DType::bf16)
    return launch_backward_lp<Acc, core::bf16_t>(a, tile, dx, keep_acc, u, stream);
  if (dx != nullptr && dx_dtype == core::DType::f16)
    return launch_backward_lp<Acc, core::f16_t>(a, tile, dx, keep_acc, u, stream);
  if (dx != nullptr) return static_cast<int>(cudaErrorInvalidValue);  // a rounded copy is 16-bit only
  return launch_backward_lp<Acc, Acc>(a, tile, nullptr, keep_acc, u, stream);
}

}  // namespace

int token_state_init(core::DType acc, int64_t n, void* state, void* stream) {
  if (n == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  if (acc == core::DType::f64)
    init_kernel<double><<<thread_blocks(n), kThreads, 0, s>>>(n, static_cast<core::RowState<double>*>(state));
  else
    init_kernel<float><<<thread_blocks(n), kThreads, 0, s>>>(n, static_cast<core::RowState<float>*>(state));
  return static_cast<int>(cudaGetLastError());
}

int token_forward_tile(const TokenTileArgs& a, const void* tile, void* state, bool entropy, bool sum_p2,
                       void* stream) {
  // The CUDA kernel keeps all four sums whatever is wanted: it is memory-bound, the extra FMAs
  // are free, and one instantiation per dtype x softcap keeps the binary small.
  (void)entropy;
  (void)sum_p2;
  auto s = static_cast<cudaStream_t>(stream);
  if (a.acc == core::DType::f64) return launch_forward<double>(a, tile, state, s);
  return launch_forward<float>(a, tile, state, s);
}

int token_forward_finish(const TokenTileArgs& a, int64_t n, const void* state, void* logp, void* lse,
                         void* entropy, void* z_sum, void* log_sum_p2, void* stream) {
  if (n == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  if (a.acc == core::DType::f64)
    finish_kernel<double><<<thread_blocks(n), kThreads, 0, s>>>(
        n, a.targets, a.ignore_index, static_cast<const core::RowState<double>*>(state), static_cast<double*>(logp),
        static_cast<double*>(lse), static_cast<double*>(entropy), static_cast<double*>(z_sum),
        static_cast<double*>(log_sum_p2));
  else
    finish_kernel<float><<<thread_blocks(n), kThreads, 0, s>>>(
        n, a.targets, a.ignore_index, static_cast<const core::RowState<float>*>(state), static_cast<float*>(logp),
        static_cast<float*>(lse), static_cast<float*>(entropy), static_cast<float*>(z_sum),
        static_cast<float*>(log_sum_p2));
  return static_cast<int>(cudaGetLastError());
}

int token_backward_tile(const TokenTileArgs& a, void* tile, core::DType dx_dtype, void* dx, bool keep_acc,
                        const void* lse, const void* entropy, const void* g, const void* l, const void* h,
                        const void* s, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (a.acc == core::DType::f64)
    return launch_backward<double>(a, tile, dx_dtype, dx, keep_acc, lse, entropy, g, l, h, s, st);
  return launch_backward<float>(a, tile, dx_dtype, dx, keep_acc, lse, entropy, g, l, h, s, st);
}

}  // namespace cuda
}  // namespace flashloss
