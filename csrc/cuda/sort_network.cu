// CUDA kernels of primitive C (flashloss.ops.sort_network): the same algorithm as the CPU kernels
// (csrc/cpu/sort_network.cpp), relaxations from csrc/core/sort_network.h.
//
// Tiling: one warp per row (WARPS rows per block). For n <= 32 the row's values live in registers,
// lane s holding slot s: a layer is one __shfl_sync from the lane's partner slot, read from a
// per-block table of lane codes built once from the schedule (shared memory, L x 32 int16: the
// comparator, the partner slot and the lane's side; -1 for an idle lane), so the two lanes of a
// comparator compute the same alpha from the same operands and no synchronisation is needed between
// layers. Above 32 the values live in shared memory and a layer's comparators (disjoint slots) run
// one per lane, __syncwarp between layers. P is built in
// blocks of 32 rows of P: lane l owns P row r0 + l as the shared column PT[s][l] (conflict-free:
// consecutive lanes, consecutive banks), so every comparator is one mix per lane with no
// synchronisation at all. P @ W sweeps W through the comparators backwards in the PW buffer, lane
// k owning column k of W (again no synchronisation).
// Decision: P and P @ W stay in shared memory at every n. Their update is per lane already (lane l
// owns P row l, or column k of W) and needs no communication; in registers a P row would be indexed
// by the schedule's slots, i.e. dynamic register indexing (local memory), and a slot-per-lane
// layout would cost n shuffles per layer against one shared load/store per comparator. The limit is
// shared memory: n <= sort_network_max_n (372 fp32 / 186 fp64 with P, 12288 / 6144 without).
//
// Saved for backward: alpha [B, C]. Backward recomputes the value differences into scratch [B, C],
// keeps dL/dalpha in scratch [B, C], the P column differences of the 32-row block in flight in
// scratch [B, C, 32] (only when P has an upstream; O(B * C * min(n, 32)) bytes of global memory,
// the price of not storing P per layer) and the V tape [B, C, g]; per-comparator sums over the
// lanes are warp shuffles (no atomics: deterministic). dL/dW is written per row; the caller sums
// rows when W is shared.
//
// Cost per row: values ~6C FLOPs + C relaxations; P 6nC; PW 6gC; backward ~3x. Bytes: x, alpha and
// the outputs once (P: 4n^2 per row in fp32); backward adds its scratch traffic 2 * 4 * C * 32.
#include <cuda_runtime.h>

#include <algorithm>

#include "../core/sort_network.h"
#include "sort_network.h"

namespace flashloss {
namespace cuda {
namespace {

using core::Relax;

constexpr int kLanes = 32;
constexpr int kMaxWarps = 4;
constexpr int64_t kSmemBytes = 48 * 1024;

struct Geo {
  int64_t n, C, L, B, Bw, g;
  const int32_t* pairs;
  const int32_t* layer_ptr;
  const int32_t* out_slot;
  int warps;          // rows per block
  int64_t per_warp;   // shared elements per warp
};

template <typename T>
__device__ __forceinline__ void mix(T& a, T& b, T al) {
  const T x = a, y = b;
  a = al * x + (T(1) - al) * y;
  b = (T(1) - al) * x + al * y;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr unsigned kFull = 0xffffffffu;

// Lane codes of the register path (n <= 32): codes[l * 32 + s] = (c << 6) | (high << 5) | partner
// for the comparator c of layer l that touches slot s (high: s is its max side j), -1 when slot s
// is idle in layer l or s >= n. c < 496 for n <= 32, so a code fits in int16. Built by the whole
// block; every thread of the block must call it (it synchronises the block).
__device__ void build_lane_codes(const Geo& geo, int16_t* codes) {
  for (int64_t k = threadIdx.x; k < geo.L * kLanes; k += blockDim.x) codes[k] = -1;
  __syncthreads();
  for (int64_t l = 0; l < geo.L; ++l)
    for (int64_t c = geo.layer_ptr[l] + threadIdx.x; c < geo.layer_ptr[l + 1]; c += blockDim.x) {
      const int i = geo.pairs[2 * c], j = geo.pairs[2 * c + 1];
      codes[l * kLanes + i] = int16_t((c << 6) | j);
      codes[l * kLanes + j] = int16_t((c << 6) | 32 | i);
    }
  __syncthreads();
}

__device__ __forceinline__ int code_partner(int code, int lane) { return code >= 0 ? (code & 31) : lane; }

// The register path's forward sweep of one row (n <= 32; every lane of the warp calls it): lane s
// enters with slot s's value and leaves with its value after the last layer. With kComputeAlpha
// each comparator's alpha is computed and stored in al_out[c] (the forward); otherwise it is read
// from al_in[c] and the layer input a - b is stored in d[c] (the backward's recompute).
template <typename T, Relax K, bool kComputeAlpha>
__device__ __forceinline__ T register_sweep(const Geo& geo, const int16_t* codes, int lane, T val, T st, T lam,
                                            T* al_out, const T* al_in, T* d) {
  for (int64_t l = 0; l < geo.L; ++l) {
    const int code = codes[l * kLanes + lane];
    const T other = __shfl_sync(kFull, val, code_partner(code, lane));
    if (code >= 0) {
      const bool high = (code & 32) != 0;
      const int64_t c = code >> 6;
      T a;
      if constexpr (kComputeAlpha) {
        // d = b - a with a the min side's value: the same operands, hence bits, on both lanes
        a = core::relax_alpha_k<K>(high ? val - other : other - val, st, lam);
        if (!high) al_out[c] = a;
      } else {
        a = al_in[c];
        if (!high) d[c] = val - other;
      }
      val = high ? (T(1) - a) * other + a * val : a * val + (T(1) - a) * other;
    }
  }
  return val;
}

template <typename T, Relax K>
__global__ void forward_kernel(Geo geo, T st, T lam, const T* __restrict__ x, T* __restrict__ sorted,
                               T* __restrict__ alpha, T* __restrict__ P, const T* __restrict__ W, T* __restrict__ PW) {
  extern __shared__ unsigned char smem_raw[];
  const int warp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t b = int64_t(blockIdx.x) * geo.warps + warp;
  int16_t* codes = reinterpret_cast<int16_t*>(smem_raw + geo.warps * geo.per_warp * sizeof(T));
  if (geo.n <= kLanes) build_lane_codes(geo, codes);  // before the early exit: it syncs the block
  if (b >= geo.B) return;  // uniform per warp
  const int64_t n = geo.n, C = geo.C;
  T* v = reinterpret_cast<T*>(smem_raw) + warp * geo.per_warp;
  T* PT = v + n;
  T* al = alpha + b * C;
  if (n <= kLanes) {  // registers: lane s holds slot s, one shuffle per layer
    const T val = register_sweep<T, K, true>(geo, codes, lane, lane < n ? x[b * n + lane] : T(0), st, lam, al, nullptr, nullptr);
    const T out = __shfl_sync(kFull, val, lane < n ? geo.out_slot[lane] : 0);
    if (lane < n) sorted[b * n + lane] = out;
    __syncwarp();  // the alpha row is read by every lane of the P and P @ W passes
  } else {
    for (int64_t s = lane; s < n; s += kLanes) v[s] = x[b * n + s];
    __syncwarp();
    for (int64_t l = 0; l < geo.L; ++l) {
      const int64_t lo = geo.layer_ptr[l], hi = geo.layer_ptr[l + 1];
      for (int64_t c = lo + lane; c < hi; c += kLanes) {
        const int i = geo.pairs[2 * c], j = geo.pairs[2 * c + 1];
        const T a = core::relax_alpha_k<K>(v[j] - v[i], st, lam);
        al[c] = a;
        mix(v[i], v[j], a);
      }
      __syncwarp();
    }
    for (int64_t r = lane; r < n; r += kLanes) sorted[b * n + r] = v[geo.out_slot[r]];
  }
  if (P) {
    for (int64_t r0 = 0; r0 < n; r0 += kLanes) {
      for (int64_t s = 0; s < n; ++s) PT[s * kLanes + lane] = T(s == r0 + lane);
      for (int64_t c = 0; c < C; ++c)
        mix(PT[geo.pairs[2 * c] * kLanes + lane], PT[geo.pairs[2 * c + 1] * kLanes + lane], al[c]);
      if (r0 + lane < n)
        for (int64_t q = 0; q < n; ++q) P[(b * n + r0 + lane) * n + q] = PT[geo.out_slot[q] * kLanes + lane];
    }
  }
  if (PW) {
    const int64_t g = geo.g;
    T* V = PW + b * n * g;
    const T* Wr = W + (geo.Bw == 1 ? 0 : b) * n * g;
    for (int64_t k = lane; k < g; k += kLanes) {
      for (int64_t r = 0; r < n; ++r) V[geo.out_slot[r] * g + k] = Wr[r * g + k];
      for (int64_t c = C - 1; c >= 0; --c) mix(V[geo.pairs[2 * c] * g + k], V[geo.pairs[2 * c + 1] * g + k], al[c]);
    }
  }
}

template <typename T, Relax K>
__global__ void backward_kernel(Geo geo, T st, T lam, const T* __restrict__ x, const T* __restrict__ alpha,
                                const T* __restrict__ g_sorted, const T* __restrict__ g_P, const T* __restrict__ g_PW,
                                const T* __restrict__ W, T* __restrict__ g_x, T* __restrict__ g_W_rows, T* scratch) {
  extern __shared__ unsigned char smem_raw[];
  const int warp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t b = int64_t(blockIdx.x) * geo.warps + warp;
  int16_t* codes = reinterpret_cast<int16_t*>(smem_raw + geo.warps * geo.per_warp * sizeof(T));
  if (geo.n <= kLanes) build_lane_codes(geo, codes);  // before the early exit: it syncs the block
  if (b >= geo.B) return;
  const int64_t n = geo.n, C = geo.C, g = geo.g, B = geo.B;
  T* v = reinterpret_cast<T*>(smem_raw) + warp * geo.per_warp;
  T* PT = v + n;
  const T* al = alpha + b * C;
  T* d = scratch + b * C;          // a - b per comparator
  T* da = scratch + B * C + b * C;  // dL/dalpha
  T* rest = scratch + 2 * B * C;
  // layer inputs
  for (int64_t c = lane; c < C; c += kLanes) da[c] = T(0);
  if (n <= kLanes) {  // registers and shuffles, as in the forward
    register_sweep<T, K, false>(geo, codes, lane, lane < n ? x[b * n + lane] : T(0), st, lam, nullptr, al, d);
    __syncwarp();
  } else {
    for (int64_t s = lane; s < n; s += kLanes) v[s] = x[b * n + s];
    __syncwarp();
    for (int64_t l = 0; l < geo.L; ++l) {
      const int64_t lo = geo.layer_ptr[l], hi = geo.layer_ptr[l + 1];
      for (int64_t c = lo + lane; c < hi; c += kLanes) {
        const int i = geo.pairs[2 * c], j = geo.pairs[2 * c + 1];
        d[c] = v[i] - v[j];
        mix(v[i], v[j], al[c]);
      }
      __syncwarp();
    }
  }
  if (g_P) {  // P path, 32 rows of P per pass; lane sums of each comparator by shuffles
    T* pdiff = rest + b * C * kLanes;
    for (int64_t r0 = 0; r0 < n; r0 += kLanes) {
      for (int64_t s = 0; s < n; ++s) PT[s * kLanes + lane] = T(s == r0 + lane);
      for (int64_t c = 0; c < C; ++c) {
        T& pi = PT[geo.pairs[2 * c] * kLanes + lane];
        T& pj = PT[geo.pairs[2 * c + 1] * kLanes + lane];
        pdiff[c * kLanes + lane] = pi - pj;
        mix(pi, pj, al[c]);
      }
      for (int64_t s = 0; s < n; ++s) PT[s * kLanes + lane] = T(0);  // now G, the upstream of this block
      if (r0 + lane < n)
        for (int64_t q = 0; q < n; ++q) PT[geo.out_slot[q] * kLanes + lane] = g_P[(b * n + r0 + lane) * n + q];
      for (int64_t c = C - 1; c >= 0; --c) {
        T& gi = PT[geo.pairs[2 * c] * kLanes + lane];
        T& gj = PT[geo.pairs[2 * c + 1] * kLanes + lane];
        const T part = warp_sum((gi - gj) * pdiff[c * kLanes + lane]);
        if (lane == 0) da[c] += part;
        mix(gi, gj, al[c]);
      }
    }
    rest += B * C * kLanes;
    __syncwarp();
  }
  if (g_PW) {  // P @ W path: the V tape, then U = dL/dV forwards; lane k owns column k
    T* V = rest + b * n * g;
    T* U = rest + B * n * g + b * n * g;
    T* vdiff = rest + 2 * B * n * g + b * C * g;
    const T* Wr = W + (geo.Bw == 1 ? 0 : b) * n * g;
    for (int64_t k = lane; k < g; k += kLanes) {
      for (int64_t r = 0; r < n; ++r) V[geo.out_slot[r] * g + k] = Wr[r * g + k];
      for (int64_t c = C - 1; c >= 0; --c) {
        T& vi = V[geo.pairs[2 * c] * g + k];
        T& vj = V[geo.pairs[2 * c + 1] * g + k];
        vdiff[c * g + k] = vi - vj;
        mix(vi, vj, al[c]);
      }
      for (int64_t s = 0; s < n; ++s) U[s * g + k] = g_PW[(b * n + s) * g + k];
    }
    for (int64_t c = 0; c < C; ++c) {  // all lanes walk every comparator (the shuffle needs them)
      T part = T(0);
      for (int64_t k = lane; k < g; k += kLanes) {
        T& ui = U[geo.pairs[2 * c] * g + k];
        T& uj = U[geo.pairs[2 * c + 1] * g + k];
        part += (ui - uj) * vdiff[c * g + k];
        mix(ui, uj, al[c]);
      }
      part = warp_sum(part);
      if (lane == 0) da[c] += part;
    }
    if (g_W_rows)
      for (int64_t k = lane; k < g; k += kLanes)
        for (int64_t r = 0; r < n; ++r) g_W_rows[(b * n + r) * g + k] = U[geo.out_slot[r] * g + k];
    __syncwarp();
  }
  // values, from the last layer back, chaining dL/dalpha to each comparator's inputs
  for (int64_t s = lane; s < n; s += kLanes) v[s] = T(0);
  __syncwarp();
  if (g_sorted)
    for (int64_t r = lane; r < n; r += kLanes) v[geo.out_slot[r]] = g_sorted[b * n + r];
  __syncwarp();
  if (n <= kLanes) {  // registers: lane s carries dL/d(slot s) back through the layers
    T gv = lane < n ? v[lane] : T(0);
    for (int64_t l = geo.L - 1; l >= 0; --l) {
      const int code = codes[l * kLanes + lane];
      const T other = __shfl_sync(kFull, gv, code_partner(code, lane));
      if (code >= 0) {
        const bool high = (code & 32) != 0;
        const int64_t c = code >> 6;
        const T a = al[c], dc = d[c];
        const T gi = high ? other : gv, gj = high ? gv : other;  // the min and max sides' upstreams
        const T dtot = da[c] + (gi - gj) * dc;
        const T chain = core::relax_dalpha_k<K>(-dc, a, st, lam) * dtot;
        gv = high ? ((T(1) - a) * gi + a * gj) + chain : (a * gi + (T(1) - a) * gj) - chain;
      }
    }
    if (lane < n) g_x[b * n + lane] = gv;
    return;
  }
  for (int64_t l = geo.L - 1; l >= 0; --l) {
    const int64_t lo = geo.layer_ptr[l], hi = geo.layer_ptr[l + 1];
    for (int64_t c = lo + lane; c < hi; c += kLanes) {
      const int i = geo.pairs[2 * c], j = geo.pairs[2 * c + 1];
      T gi = v[i], gj = v[j];
      const T dtot = da[c] + (gi - gj) * d[c];
      mix(gi, gj, al[c]);
      const T chain = core::relax_dalpha_k<K>(-d[c], al[c], st, lam) * dtot;
      v[i] = gi - chain;
      v[j] = gj + chain;
    }
    __syncwarp();
  }
  for (int64_t s = lane; s < n; s += kLanes) g_x[b * n + s] = v[s];
}

Geo geometry(const SortLaunch& a, bool with_P, int64_t elem) {
  Geo geo{a.n, a.num_comparators, a.num_layers, a.B, a.Bw, a.g, a.pairs, a.layer_ptr, a.out_slot, 1, 0};
  geo.per_warp = a.n + (with_P ? a.n * kLanes : 0);
  geo.warps = int(std::max<int64_t>(1, std::min<int64_t>(kMaxWarps, kSmemBytes / std::max<int64_t>(1, geo.per_warp * elem))));
  return geo;
}

// Dynamic shared memory: the warps' rows, then (register path, n <= 32) the block's lane codes.
size_t smem_bytes(const Geo& geo, int64_t elem) {
  return size_t(geo.warps * geo.per_warp * elem) + (geo.n <= kLanes ? size_t(geo.L * kLanes) * sizeof(int16_t) : 0);
}

template <typename F>
void dispatch(int relax, F&& f) {
  switch (Relax(relax)) {
    case Relax::logistic: f(std::integral_constant<Relax, Relax::logistic>{}); break;
    case Relax::logistic_phi: f(std::integral_constant<Relax, Relax::logistic_phi>{}); break;
    case Relax::gaussian: f(std::integral_constant<Relax, Relax::gaussian>{}); break;
    case Relax::reciprocal: f(std::integral_constant<Relax, Relax::reciprocal>{}); break;
    case Relax::cauchy: f(std::integral_constant<Relax, Relax::cauchy>{}); break;
    default: f(std::integral_constant<Relax, Relax::optimal>{}); break;
  }
}

template <typename T>
int forward_t(const SortLaunch& a, const void* x, void* sorted, void* alpha, void* P, const void* W, void* PW,
              cudaStream_t stream) {
  const Geo geo = geometry(a, P != nullptr, sizeof(T));
  const dim3 grid(unsigned((a.B + geo.warps - 1) / geo.warps)), block(unsigned(geo.warps * kLanes));
  const size_t smem = smem_bytes(geo, sizeof(T));
  dispatch(a.relax, [&](auto kind) {
    forward_kernel<T, decltype(kind)::value><<<grid, block, smem, stream>>>(
        geo, T(a.steepness), T(a.art_lambda), static_cast<const T*>(x), static_cast<T*>(sorted), static_cast<T*>(alpha),
        static_cast<T*>(P), static_cast<const T*>(W), static_cast<T*>(PW));
  });
  return int(cudaGetLastError());
}

template <typename T>
int backward_t(const SortLaunch& a, const void* x, const void* alpha, const void* g_sorted, const void* g_P,
               const void* g_PW, const void* W, void* g_x, void* g_W_rows, void* scratch, cudaStream_t stream) {
  const Geo geo = geometry(a, g_P != nullptr, sizeof(T));
  const dim3 grid(unsigned((a.B + geo.warps - 1) / geo.warps)), block(unsigned(geo.warps * kLanes));
  const size_t smem = smem_bytes(geo, sizeof(T));
  dispatch(a.relax, [&](auto kind) {
    backward_kernel<T, decltype(kind)::value><<<grid, block, smem, stream>>>(
        geo, T(a.steepness), T(a.art_lambda), static_cast<const T*>(x), static_cast<const T*>(alpha),
        static_cast<const T*>(g_sorted), static_cast<const T*>(g_P), static_cast<const T*>(g_PW),
        static_cast<const T*>(W), static_cast<T*>(g_x), static_cast<T*>(g_W_rows), static_cast<T*>(scratch));
  });
  return int(cudaGetLastError());
}

}  // namespace

int64_t sort_network_max_n(bool with_P, bool is_double) {
  const int64_t elem = is_double ? 8 : 4;
  return with_P ? kSmemBytes / (elem * (kLanes + 1)) : kSmemBytes / elem;
}

int sort_network_forward(const SortLaunch& a, const void* x, void* sorted, void* alpha, void* P, const void* W,
                         void* PW, void* stream) {
  if (a.B == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return a.is_double ? forward_t<double>(a, x, sorted, alpha, P, W, PW, s)
                     : forward_t<float>(a, x, sorted, alpha, P, W, PW, s);
}

int64_t sort_network_backward_scratch(const SortLaunch& a, bool with_P, bool with_PW) {
  return 2 * a.B * a.num_comparators + (with_P ? a.B * a.num_comparators * kLanes : 0) +
         (with_PW ? 2 * a.B * a.n * a.g + a.B * a.num_comparators * a.g : 0);
}

int sort_network_backward(const SortLaunch& a, const void* x, const void* alpha, const void* g_sorted,
                          const void* g_P, const void* g_PW, const void* W, void* g_x, void* g_W_rows, void* scratch,
                          void* stream) {
  if (a.B == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return a.is_double ? backward_t<double>(a, x, alpha, g_sorted, g_P, g_PW, W, g_x, g_W_rows, scratch, s)
                     : backward_t<float>(a, x, alpha, g_sorted, g_P, g_PW, W, g_x, g_W_rows, scratch, s);
}

}  // namespace cuda
}  // namespace flashloss
