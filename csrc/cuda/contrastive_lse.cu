// Primitive A on CUDA (flashloss.ops.contrastive_lse, backend 'cuda'): fused, blockwise,
// deterministic (no atomics on any floating-point result), the N x M logit matrix never stored.
// Structure mirrors the verified Triton backend (triton_kernels/contrastive_lse.py) so that the two
// GPU backends can be cross-checked kernel by kernel:
//
//   stats_kernel<AXIS=0>  row statistics      grid ceil(N / BM)       loops over column tiles
//   stats_kernel<AXIS=1>  column statistics   grid ceil(M_main / BN)  loops over row tiles
//   dq_kernel             dQ, dscale, dmargin, per-row-block dbias partials
//                                             grid ceil(N / BM) x ceil(D / BD)
//   dk_kernel             dK for columns < grad_cols
//                                             grid ceil(grad_cols / BN) x ceil(D / BD)
//   sum_kernel            dbias = sum of the row-block partials (one block, fixed order)
//
// Every kernel builds the similarity tile sim = Q[r0:r0+BM] K[c0:c0+BN]^T in shared memory
// (D walked in BK chunks, bounds-masked loads, zero padding, so any D / N / M works), then an
// elementwise epilogue rebuilds S_ij = scale_i sim_ij + bias (+ margin_i on positives) and the
// masks from per-tile row / column metadata staged in shared memory:
//   Y_ij        positives: a per-tile bitmask built from targets [N, P] (P >= 1; -1 = padding),
//               or labels_q[i] == labels_k[j] on main columns, or none
//   allowed_ij  in range, not (exclude_self and i == j < M_main), not (exclude_positives and Y),
//               not (not Y and S_ij < neg_threshold_i)
//   col_ok_ij   allowed and valid_i and j < M_main (column statistics)
//
// Three tile "traits" (the only dtype-dependent code is the tile GEMM and the dP dtype):
//   bf16 / fp16  MmaTraits:  BM = BN = 64, BK = 32, BD = 128, 256 threads (8 warps). Tensor-core
//                nvcuda::wmma m16n16k16 with fp32 accumulation (sm_80 and sm_90a). S tile: warps
//                4 x 2, 16 x 32 each; dQ / dK tile [64, 128]: warps 2 x 4, 32 x 32 each. The second
//                product takes dP = dS * scale_i rounded to the input dtype (as flash-attention).
//   fp32         SimtTraits<float>:  BM = BN = BD = 64, BK = 16, 256 threads, 4 x 4 outputs per
//                thread, exact IEEE fp32 FMA (no TF32: the fp32 contract is 1e-5 relative).
//   fp64         SimtTraits<double>: BM = BN = BD = 32, BK = 16, 64 threads, 4 x 4 per thread.
// Statistics, LSEs and gradients are fp32 (fp64 for fp64 inputs).
//
// Shared memory (dynamic; bytes for bf16/fp16 | fp32 | fp64): row metadata 9 x BM words, column
// metadata 4 x BN words, Y bitmask BM x BN/32 words, Q and K chunks, the fp32/fp64 S tile
// [BM][BN+4]; backward adds the dP tile (16-bit paths: [BM][BN+8] in the input dtype; SIMT
// paths reuse the S tile in place) and the second operand chunk X [64|64|32][BD+pad]
// (K rows for dQ, Q rows for dK). Forward 31488 | 29952 | 21504 bytes, backward 58112 | 47360 |
// 30720 bytes (Layout<Tr>::kForward / kBackward; the bf16/fp16 backward opts in above 48 KB).
//
// Saved for backward (by the Python layer): the inputs by reference and the [N] / [M] LSEs.
// Cost: forward 2 N M_all D FLOPs (+2 N M_main D for column statistics), backward
// (ceil(D/BD) + 1) 2 N M_all D for dQ (S recomputed per D chunk) and (ceil(D/BD) + 1) 2 N G D for
// dK (G = grad_cols); global traffic per kernel ~ (N + M) D bytes from DRAM (tiles are re-read
// from L2: N/BM passes over K, M/BN passes over Q).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "../core/online_lse.h"
#include "contrastive_lse.h"

namespace flashloss {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;

// ---------------------------------------------------------------------------------------------
// Problem description as the kernels see it (typed pointers; null = absent).

template <typename Acc>
struct Params {
  const void* q;
  const void* k;
  int64_t n, m_all, m_main, d;
  const Acc* scale;
  const Acc* bias;
  Acc margin;
  const Acc* margin_rows;
  const int32_t* targets;
  int64_t tpr;  // targets per row
  const uint8_t* valid;
  const int32_t* labels_q;
  const int32_t* labels_k;
  const Acc* thr;  // neg_threshold
  bool excl_self, excl_pos, vec_ok;
  // backward inputs (null when the output was not requested)
  const Acc* row_lse;
  const Acc* col_lse;
  const Acc* g_row;
  const Acc* g_col;
  const Acc* g_pos;
  const Acc* g_colpos;
  const Acc* g_sig;  // null unless sigmoid mode
};

template <typename Acc>
struct StatsOut {
  Acc *row_lse, *col_lse, *pos_sum, *pos_cnt, *col_pos, *row_sig;
};

template <typename Acc>
struct GradOut {
  Acc *dq, *dk, *dscale, *dmargin, *dbias_part;
  int64_t grad_cols;
};

// ---------------------------------------------------------------------------------------------
// Tile traits

template <typename T> struct WmmaType;
template <> struct WmmaType<core::bf16_t> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ type from(float x) { return __float2bfloat16_rn(x); }
};
template <> struct WmmaType<core::f16_t> {
  using type = __half;
  static __device__ __forceinline__ type from(float x) { return __float2half_rn(x); }
};

template <typename T>
struct MmaTraits {
  static constexpr bool kMma = true;
  using Acc = float;
  using Raw = uint16_t;  // storage of the input dtype
  using W = typename WmmaType<T>::type;
  using Conv = WmmaType<T>;  // fp32 -> input dtype (round to nearest even) for dP
  static constexpr int BM = 64, BN = 64, BK = 32, BD = 128, NT = 256;
  static constexpr int VEC = 8;           // elements per 16-byte load
  static constexpr int LDQ = BK + 8;      // Q / K chunks [BM|BN][LDQ], row-major
  static constexpr int LDS = BN + 4;      // S tile [BM][LDS] fp32
  static constexpr int LDP = BN + 8;      // dP tile [BM][LDP] input dtype
  static constexpr int LDX = BD + 8;      // X chunk [64][LDX] input dtype
  static constexpr int UNROLL = 2;        // epilogue unroll
  // __launch_bounds__ minimum blocks per SM: 1 (capping bf16 backward at 128 registers spills)
  static constexpr int MIN_BLOCKS = 1;
  static constexpr int SWM = 16, SWN = 32;  // S warp tile (4 x 2 warps)
  static constexpr int OWM = 32, OWN = 32;  // dQ / dK warp tile (2 x 4 warps)
  static constexpr int Q_BYTES = BM * LDQ * 2;
  static constexpr int K_BYTES = BN * LDQ * 2;
  static constexpr int S_BYTES = BM * LDS * 4;
  static constexpr int P_BYTES = BM * LDP * 2;
  static constexpr int X_BYTES = (BM > BN ? BM : BN) * LDX * 2;
  static_assert((BM / SWM) * (BN / SWN) * 32 == NT, "S warp tiling must cover the tile");
  static_assert((BM / OWM) * (BD / OWN) * 32 == NT && (BN / OWM) * (BD / OWN) * 32 == NT,
                "dQ / dK warp tiling must cover the tile");
};

template <typename A> struct SimtShape;
template <> struct SimtShape<float> { static constexpr int B = 64, NT = 256; };
template <> struct SimtShape<double> { static constexpr int B = 32, NT = 64; };

template <typename A>
struct SimtTraits {
  static constexpr bool kMma = false;
  using Acc = A;
  using Raw = A;
  static constexpr int BM = SimtShape<A>::B, BN = SimtShape<A>::B, BD = SimtShape<A>::B, BK = 16;
  static constexpr int NT = SimtShape<A>::NT, TM = 4, TN = 4;
  static constexpr int UNROLL = sizeof(A) == 4 ? 2 : 1;  // epilogue unroll (fp64: register budget)
  // __launch_bounds__ minimum blocks per SM: fp32 2 (<= 128 registers); fp64 1 (ptxas's default
  // occupancy target spills around the f64 division / log slow paths otherwise)
  static constexpr int MIN_BLOCKS = sizeof(A) == 4 ? 2 : 1;
  static constexpr int VEC = sizeof(A) == 4 ? 4 : 1;  // 16-byte loads of X chunks (fp32)
  static constexpr int LDQ = BM + 4;      // Q / K chunks transposed: [BK][LDQ]
  static constexpr int LDS = BN + 4;      // S tile [BM][LDS]; dP written in place
  static constexpr int LDX = BD + 4;      // X chunk [BM|BN][LDX]
  static constexpr int Q_BYTES = BK * LDQ * int(sizeof(A));
  static constexpr int K_BYTES = BK * LDQ * int(sizeof(A));
  static constexpr int S_BYTES = BM * LDS * int(sizeof(A));
  static constexpr int P_BYTES = 0;
  static constexpr int X_BYTES = BM * LDX * int(sizeof(A));
  static_assert(BM == BN && BN == BD, "the SIMT thread grid serves S, dQ and dK alike");
  static_assert((BM / TM) * (BN / TN) == NT, "SIMT thread grid must cover the tile");
};

constexpr int align128(int x) { return (x + 127) / 128 * 128; }

// Dynamic shared-memory layout. Forward kernels allocate [0, kForward), backward [0, kBackward).
template <class Tr>
struct Layout {
  using Acc = typename Tr::Acc;
  static constexpr int kRowInfo = align128(Tr::BM * (7 * int(sizeof(Acc)) + 2 * 4));
  static constexpr int kColInfo = align128(Tr::BN * (3 * int(sizeof(Acc)) + 4));
  static constexpr int kYmask = align128(Tr::BM * (Tr::BN / 32) * 4);
  static constexpr int oRow = 0;
  static constexpr int oCol = oRow + kRowInfo;
  static constexpr int oY = oCol + kColInfo;
  static constexpr int oQ = oY + kYmask;
  static constexpr int oK = oQ + align128(Tr::Q_BYTES);
  static constexpr int oS = oK + align128(Tr::K_BYTES);
  static constexpr int oP = oS + align128(Tr::S_BYTES);
  static constexpr int oX = oP + align128(Tr::P_BYTES);
  static constexpr int kForward = oP;
  static constexpr int kBackward = oX + align128(Tr::X_BYTES);
  // the S tile doubles as reduction scratch (column kernel: 3 x NT; dq kernel: BM) and, on the
  // MMA path, as the per-warp 16 x 16 fp32 staging of the dQ / dK store (NT / 32 x 256)
  static_assert(Tr::S_BYTES >= 3 * Tr::NT * int(sizeof(Acc)), "S tile too small for scratch");
  static_assert(Tr::S_BYTES >= (Tr::NT / 32) * 256 * 4, "S tile too small for staging");
  static_assert(Tr::BN % 32 == 0, "Y bitmask words");
};

template <class Tr>
struct Smem {
  using Acc = typename Tr::Acc;
  using Raw = typename Tr::Raw;
  using L = Layout<Tr>;
  Acc *sc, *mg, *thr, *lse, *grow, *gpos, *gsig;  // [BM] row metadata
  int32_t *lq, *rflag;                            // rflag bit 0: row in range, bit 1: valid row
  Acc *clse, *gcol, *gcolpos;                     // [BN] column metadata
  int32_t* lk;
  uint32_t* ymask;  // [BM][BN / 32]
  Raw *qs, *ks, *pm, *x;
  Acc* s;
  __device__ explicit Smem(unsigned char* base) {
    Acc* ra = reinterpret_cast<Acc*>(base + L::oRow);
    sc = ra;
    mg = ra + Tr::BM;
    thr = ra + 2 * Tr::BM;
    lse = ra + 3 * Tr::BM;
    grow = ra + 4 * Tr::BM;
    gpos = ra + 5 * Tr::BM;
    gsig = ra + 6 * Tr::BM;
    lq = reinterpret_cast<int32_t*>(ra + 7 * Tr::BM);
    rflag = lq + Tr::BM;
    Acc* ca = reinterpret_cast<Acc*>(base + L::oCol);
    clse = ca;
    gcol = ca + Tr::BN;
    gcolpos = ca + 2 * Tr::BN;
    lk = reinterpret_cast<int32_t*>(ca + 3 * Tr::BN);
    ymask = reinterpret_cast<uint32_t*>(base + L::oY);
    qs = reinterpret_cast<Raw*>(base + L::oQ);
    ks = reinterpret_cast<Raw*>(base + L::oK);
    s = reinterpret_cast<Acc*>(base + L::oS);
    pm = reinterpret_cast<Raw*>(base + L::oP);  // MMA backward only
    x = reinterpret_cast<Raw*>(base + L::oX);   // backward only
  }
};

// ---------------------------------------------------------------------------------------------
// Small math

template <typename Acc> __device__ __forceinline__ Acc fl_log1p(Acc x);
template <> __device__ __forceinline__ float fl_log1p<float>(float x) { return log1pf(x); }
template <> __device__ __forceinline__ double fl_log1p<double>(double x) { return log1p(x); }

// max(x, 0) + log1p(exp(-|x|)) (OBJECTIVES.md §0.2)
template <typename Acc>
__device__ __forceinline__ Acc softplus(Acc x) {
  const Acc ax = x < Acc(0) ? -x : x;
  return (x > Acc(0) ? x : Acc(0)) + fl_log1p(core::fl_exp(-ax));
}

// sigma(x) with the exponent argument always <= 0 (no division by inf, no overflow)
template <typename Acc>
__device__ __forceinline__ Acc sigmoid(Acc x) {
  if (x >= Acc(0)) return Acc(1) / (Acc(1) + core::fl_exp(-x));
  const Acc e = core::fl_exp(x);
  return e / (Acc(1) + e);
}

template <typename Acc>
__device__ __forceinline__ core::LseState<Acc> shfl_xor_lse(core::LseState<Acc> st, int off) {
  core::LseState<Acc> o;
  o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
  o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
  return core::lse_merge(st, o);
}

// ---------------------------------------------------------------------------------------------
// Global -> shared tile loads (bounds-masked, zero padding)

// dst[r][c] = src[row0 + r][col0 + c] for r < ROWS, c < COLS, row-major, leading dimension LD.
// vec_ok (host-checked: d % VEC == 0 and 16-byte aligned base pointers) enables 16-byte loads; a
// vector is then either wholly inside [0, d) or wholly outside, as col0 and c are multiples of VEC.
template <class Tr, int ROWS, int COLS, int LD>
__device__ __forceinline__ void load_tile(typename Tr::Raw* dst, const typename Tr::Raw* src,
                                          int64_t nrows, int64_t row0, int64_t col0, int64_t d,
                                          bool vec_ok) {
  using Raw = typename Tr::Raw;
  if constexpr (Tr::VEC > 1) {
    if (vec_ok) {
      constexpr int VPR = COLS / Tr::VEC;
      static_assert(COLS % Tr::VEC == 0 && (LD * int(sizeof(Raw))) % 16 == 0, "vector layout");
      for (int v = threadIdx.x; v < ROWS * VPR; v += Tr::NT) {
        const int r = v / VPR, c = (v % VPR) * Tr::VEC;
        const int64_t gr = row0 + r, gc = col0 + c;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (gr < nrows && gc < d) val = *reinterpret_cast<const uint4*>(src + gr * d + gc);
        *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
      }
      return;
    }
  }
  for (int v = threadIdx.x; v < ROWS * COLS; v += Tr::NT) {
    const int r = v / COLS, c = v % COLS;
    const int64_t gr = row0 + r, gc = col0 + c;
    dst[r * LD + c] = (gr < nrows && gc < d) ? src[gr * d + gc] : Raw(0);
  }
}

// SIMT chunks are stored transposed: dst[c][r] = src[row0 + r][col0 + c], c < BK.
template <class Tr, int ROWS>
__device__ __forceinline__ void load_tile_t(typename Tr::Raw* dst, const typename Tr::Raw* src,
                                            int64_t nrows, int64_t row0, int64_t col0, int64_t d) {
  using Raw = typename Tr::Raw;
  for (int v = threadIdx.x; v < ROWS * Tr::BK; v += Tr::NT) {
    const int r = v / Tr::BK, c = v % Tr::BK;
    const int64_t gr = row0 + r, gc = col0 + c;
    dst[c * Tr::LDQ + r] = (gr < nrows && gc < d) ? src[gr * d + gc] : Raw(0);
  }
}

// ---------------------------------------------------------------------------------------------
// Similarity tile: sm.s[r][c] = <q_{r0+r}, k_{c0+c}> (0 outside the problem). Starts by writing
// the Q / K chunk buffers (callers must have synchronised after their last read of those) and
// ends with __syncthreads(), so metadata written by the caller before the call is visible after.

template <class Tr>
__device__ __forceinline__ void sim_tile_mma(const Params<float>& p, const Smem<Tr>& sm, int64_t r0,
                                             int64_t c0) {
  using W = typename Tr::W;
  using Raw = typename Tr::Raw;
  constexpr int FN = Tr::SWN / 16;
  const int warp = threadIdx.x / 32;
  const int wr = warp / (Tr::BN / Tr::SWN), wc = warp % (Tr::BN / Tr::SWN);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FN];
#pragma unroll
  for (int f = 0; f < FN; ++f) wmma::fill_fragment(acc[f], 0.0f);
  const Raw* q = static_cast<const Raw*>(p.q);
  const Raw* k = static_cast<const Raw*>(p.k);
  for (int64_t k0 = 0; k0 < p.d; k0 += Tr::BK) {
    load_tile<Tr, Tr::BM, Tr::BK, Tr::LDQ>(sm.qs, q, p.n, r0, k0, p.d, p.vec_ok);
    load_tile<Tr, Tr::BN, Tr::BK, Tr::LDQ>(sm.ks, k, p.m_all, c0, k0, p.d, p.vec_ok);
    __syncthreads();
    const W* qs = reinterpret_cast<const W*>(sm.qs);
    const W* ks = reinterpret_cast<const W*>(sm.ks);
#pragma unroll
    for (int kk = 0; kk < Tr::BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> a;
      wmma::load_matrix_sync(a, qs + (wr * Tr::SWM) * Tr::LDQ + kk, Tr::LDQ);
#pragma unroll
      for (int f = 0; f < FN; ++f) {
        // B[k][n] = K[c0 + n][k0 + k]: the K chunk read column-major
        wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::col_major> b;
        wmma::load_matrix_sync(b, ks + (wc * Tr::SWN + f * 16) * Tr::LDQ + kk, Tr::LDQ);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < FN; ++f)
    wmma::store_matrix_sync(sm.s + (wr * Tr::SWM) * Tr::LDS + wc * Tr::SWN + f * 16, acc[f], Tr::LDS,
                            wmma::mem_row_major);
  __syncthreads();
}

template <class Tr>
__device__ __forceinline__ void sim_tile_simt(const Params<typename Tr::Acc>& p, const Smem<Tr>& sm,
                                              int64_t r0, int64_t c0) {
  using Acc = typename Tr::Acc;
  const int ty = threadIdx.x / (Tr::BN / Tr::TN), tx = threadIdx.x % (Tr::BN / Tr::TN);
  Acc acc[Tr::TM][Tr::TN];
#pragma unroll
  for (int i = 0; i < Tr::TM; ++i)
#pragma unroll
    for (int j = 0; j < Tr::TN; ++j) acc[i][j] = Acc(0);
  const Acc* q = static_cast<const Acc*>(p.q);
  const Acc* k = static_cast<const Acc*>(p.k);
  for (int64_t k0 = 0; k0 < p.d; k0 += Tr::BK) {
    load_tile_t<Tr, Tr::BM>(sm.qs, q, p.n, r0, k0, p.d);
    load_tile_t<Tr, Tr::BN>(sm.ks, k, p.m_all, c0, k0, p.d);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < Tr::BK; ++kk) {
      Acc a[Tr::TM], b[Tr::TN];
#pragma unroll
      for (int i = 0; i < Tr::TM; ++i) a[i] = sm.qs[kk * Tr::LDQ + ty * Tr::TM + i];
#pragma unroll
      for (int j = 0; j < Tr::TN; ++j) b[j] = sm.ks[kk * Tr::LDQ + tx * Tr::TN + j];
#pragma unroll
      for (int i = 0; i < Tr::TM; ++i)
#pragma unroll
        for (int j = 0; j < Tr::TN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);  // IEEE FMA
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < Tr::TM; ++i)
#pragma unroll
    for (int j = 0; j < Tr::TN; ++j) sm.s[(ty * Tr::TM + i) * Tr::LDS + tx * Tr::TN + j] = acc[i][j];
  __syncthreads();
}

template <class Tr>
__device__ __forceinline__ void sim_tile(const Params<typename Tr::Acc>& p, const Smem<Tr>& sm,
                                         int64_t r0, int64_t c0) {
  if constexpr (Tr::kMma)
    sim_tile_mma<Tr>(p, sm, r0, c0);
  else
    sim_tile_simt<Tr>(p, sm, r0, c0);
}

// ---------------------------------------------------------------------------------------------
// Per-tile metadata in shared memory

template <class Tr>
__device__ __forceinline__ void load_row_info(const Params<typename Tr::Acc>& p, const Smem<Tr>& sm,
                                              int64_t r0) {
  using Acc = typename Tr::Acc;
  const Acc inf = core::pos_inf<Acc>();
  for (int r = threadIdx.x; r < Tr::BM; r += Tr::NT) {
    const int64_t gi = r0 + r;
    const bool in = gi < p.n;
    sm.sc[r] = in ? p.scale[gi] : Acc(0);
    sm.mg[r] = p.margin + (in && p.margin_rows ? p.margin_rows[gi] : Acc(0));
    sm.thr[r] = in && p.thr ? p.thr[gi] : core::neg_inf<Acc>();
    // an empty row (LSE -inf) has P = 0: shift by +inf so exp gives 0, never NaN
    const Acc l = in && p.row_lse ? p.row_lse[gi] : inf;
    sm.lse[r] = l == core::neg_inf<Acc>() ? inf : l;
    sm.grow[r] = in && p.g_row ? p.g_row[gi] : Acc(0);
    sm.gpos[r] = in && p.g_pos ? p.g_pos[gi] : Acc(0);
    sm.gsig[r] = in && p.g_sig ? p.g_sig[gi] : Acc(0);
    sm.lq[r] = in && p.labels_q ? p.labels_q[gi] : -2;  // never equal to a column label
    sm.rflag[r] = in ? (1 | ((p.valid == nullptr || p.valid[gi]) ? 2 : 0)) : 0;
  }
}

template <class Tr>
__device__ __forceinline__ void load_col_info(const Params<typename Tr::Acc>& p, const Smem<Tr>& sm,
                                              int64_t c0) {
  using Acc = typename Tr::Acc;
  const Acc inf = core::pos_inf<Acc>();
  for (int c = threadIdx.x; c < Tr::BN; c += Tr::NT) {
    const int64_t gj = c0 + c;
    const bool in = gj < p.m_all, is_main = gj < p.m_main;
    sm.lk[c] = in && p.labels_k ? p.labels_k[gj] : -3;
    const Acc l = is_main && p.col_lse ? p.col_lse[gj] : inf;
    sm.clse[c] = l == core::neg_inf<Acc>() ? inf : l;
    sm.gcol[c] = is_main && p.g_col ? p.g_col[gj] : Acc(0);
    sm.gcolpos[c] = is_main && p.g_colpos ? p.g_colpos[gj] : Acc(0);
  }
}

// Positives of tile rows [r0, r0+BM) x columns [c0, c0+BN) from targets [n, P]: one thread per
// row sets the bits of its own row (no atomics).
template <class Tr>
__device__ __forceinline__ void build_ymask(const Params<typename Tr::Acc>& p, const Smem<Tr>& sm,
                                            int64_t r0, int64_t c0) {
  constexpr int WPR = Tr::BN / 32;
  static_assert(Tr::BN <= 64, "one 64-bit word of positives per tile row");
  if (p.targets == nullptr) return;
  for (int r = threadIdx.x; r < Tr::BM; r += Tr::NT) {
    uint64_t bits = 0;  // bit c: column c0 + c is a positive of row r0 + r (kept in a register)
    const int64_t gi = r0 + r;
    if (gi < p.n) {
      const int32_t* t = p.targets + gi * p.tpr;
      for (int64_t e = 0; e < p.tpr; ++e) {
        const int64_t tj = t[e];
        if (tj >= c0 && tj < c0 + Tr::BN && tj < p.m_all) bits |= uint64_t(1) << (tj - c0);
      }
    }
#pragma unroll
    for (int w = 0; w < WPR; ++w) sm.ymask[r * WPR + w] = static_cast<uint32_t>(bits >> (32 * w));
  }
}

// S_ij, positive flag and allowed flag of tile element (r, c) = global (gi, gj).
template <class Tr>
__device__ __forceinline__ void evaluate(const Params<typename Tr::Acc>& p, const Smem<Tr>& sm, int r,
                                         int c, int64_t gi, int64_t gj, typename Tr::Acc sim,
                                         typename Tr::Acc bias, typename Tr::Acc& S, bool& Y,
                                         bool& allowed) {
  const bool is_main = gj < p.m_main;
  Y = false;
  if (p.targets)
    Y = (sm.ymask[r * (Tr::BN / 32) + (c >> 5)] >> (c & 31)) & 1u;
  else if (p.labels_q)
    Y = is_main && sm.lq[r] == sm.lk[c];
  allowed = (sm.rflag[r] & 1) && gj < p.m_all;
  if (p.excl_self && gi == gj && is_main) {
    allowed = false;
    Y = false;
  }
  if (p.excl_pos && Y) allowed = false;
  S = sm.sc[r] * sim + bias;
  if (Y)
    S += sm.mg[r];
  else if (S < sm.thr[r])  // hard-negative mask: never removes a positive
    allowed = false;
}

// dS_ij = g_row P_row + g_col P_col + (g_pos + g_colpos) Y + g_sig (-z sigma(-z S)).
template <class Tr>
__device__ __forceinline__ typename Tr::Acc grad_logit(const Params<typename Tr::Acc>& p,
                                                       const Smem<Tr>& sm, int r, int c, int64_t gj,
                                                       typename Tr::Acc S, bool Y, bool allowed) {
  using Acc = typename Tr::Acc;
  Acc ds = Acc(0);
  if (allowed) {
    if (p.row_lse) ds += sm.grow[r] * core::fl_exp(S - sm.lse[r]);
    if (p.col_lse && (sm.rflag[r] & 2) && gj < p.m_main) ds += sm.gcol[c] * core::fl_exp(S - sm.clse[c]);
  }
  if (Y) ds += sm.gpos[r] + sm.gcolpos[c];  // zeros where the output is absent
  if (p.g_sig && allowed) {
    // d softplus(-z S) / dS = -z sigma(-z S): positives -sigma(-S), negatives sigma(S)
    const Acc sg = sigmoid(Y ? -S : S);
    ds += sm.gsig[r] * (Y ? -sg : sg);
  }
  return ds;
}

// dS of the whole tile, scaled by scale_i, written as dP for the second product (input dtype on
// the MMA path, in place over the S tile on the SIMT path). ROW_SUMS: accumulate the per-row
// dscale / dbias / dmargin partials of this thread's row. Thread mapping: TPR = NT / BM
// consecutive threads per row, interleaved columns (conflict-free shared-memory reads).
template <class Tr, bool ROW_SUMS>
__device__ __forceinline__ void grad_tile(const Params<typename Tr::Acc>& p, const Smem<Tr>& sm,
                                          int64_t r0, int64_t c0, typename Tr::Acc bias,
                                          bool write_dp, typename Tr::Acc& dscale,
                                          typename Tr::Acc& dbias, typename Tr::Acc& dmargin) {
  using Acc = typename Tr::Acc;
  constexpr int TPR = Tr::NT / Tr::BM;
  const int r = threadIdx.x / TPR, sub = threadIdx.x % TPR;
  const int64_t gi = r0 + r;
  const Acc sc = sm.sc[r];
#pragma unroll Tr::UNROLL
  for (int jj = 0; jj < Tr::BN / TPR; ++jj) {
    const int c = sub + TPR * jj;
    const int64_t gj = c0 + c;
    const Acc sim = sm.s[r * Tr::LDS + c];
    Acc S;
    bool Y, allowed;
    evaluate<Tr>(p, sm, r, c, gi, gj, sim, bias, S, Y, allowed);
    const Acc ds = grad_logit<Tr>(p, sm, r, c, gj, S, Y, allowed);
    if constexpr (ROW_SUMS) {
      dscale += ds * sim;
      dbias += ds;
      if (Y) dmargin += ds;
    }
    if (write_dp) {
      if constexpr (Tr::kMma)
        reinterpret_cast<typename Tr::W*>(sm.pm)[r * Tr::LDP + c] = Tr::Conv::from(ds * sc);
      else
        sm.s[r * Tr::LDS + c] = ds * sc;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Accumulators of the second product: dQ [BM][BD] += dP [BM][BN] X [BN][BD] (X = K rows) or
// dK [BN][BD] += dP^T [BN][BM] X [BM][BD] (X = Q rows), held across the loop.

template <class Tr>
struct MmaOut {
  static constexpr int FM = Tr::OWM / 16, FN = Tr::OWN / 16;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> f[FM][FN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::fill_fragment(f[i][j], 0.0f);
  }
  __device__ __forceinline__ static int wr() { return (threadIdx.x / 32) / (Tr::BD / Tr::OWN); }
  __device__ __forceinline__ static int wc() { return (threadIdx.x / 32) % (Tr::BD / Tr::OWN); }

  template <bool TRANSPOSE_P>
  __device__ __forceinline__ void add(const Smem<Tr>& sm) {
    using W = typename Tr::W;
    using LayoutA = typename std::conditional<TRANSPOSE_P, wmma::col_major, wmma::row_major>::type;
    const W* P = reinterpret_cast<const W*>(sm.pm);
    const W* X = reinterpret_cast<const W*>(sm.x);
    const int r = wr(), c = wc();
    constexpr int KDIM = TRANSPOSE_P ? Tr::BM : Tr::BN;
#pragma unroll
    for (int kk = 0; kk < KDIM; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, W, LayoutA> a[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::row_major> b[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int row = r * Tr::OWM + i * 16;
        // dQ: A[i][k] = dP[row + i][kk + k] (row-major); dK: A[i][k] = dP[kk + k][row + i]
        const W* src = TRANSPOSE_P ? P + kk * Tr::LDP + row : P + row * Tr::LDP + kk;
        wmma::load_matrix_sync(a[i], src, Tr::LDP);
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(b[j], X + kk * Tr::LDX + c * Tr::OWN + j * 16, Tr::LDX);
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(f[i][j], a[i], b[j], f[i][j]);
    }
  }
  __device__ __forceinline__ void add_dq(const Smem<Tr>& sm) { add<false>(sm); }
  __device__ __forceinline__ void add_dk(const Smem<Tr>& sm) { add<true>(sm); }

  // out[row_base + i][d0 + j] for rows < row_limit, columns < d; staged per warp through a
  // 16 x 16 fp32 slice of the (free) S tile. Callers synchronise before (S tile free).
  __device__ __forceinline__ void store(float* out, int64_t row_base, int64_t row_limit, int64_t d0,
                                        int64_t d, const Smem<Tr>& sm) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* stage = sm.s + warp * 256;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        wmma::store_matrix_sync(stage, f[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int64_t gr = row_base + wr() * Tr::OWM + i * 16 + e / 16;
          const int64_t gc = d0 + wc() * Tr::OWN + j * 16 + e % 16;
          if (gr < row_limit && gc < d) out[gr * d + gc] = stage[e];
        }
        __syncwarp();
      }
  }
};

template <class Tr>
struct SimtOut {
  using Acc = typename Tr::Acc;
  Acc v[Tr::TM][Tr::TN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < Tr::TM; ++i)
#pragma unroll
      for (int j = 0; j < Tr::TN; ++j) v[i][j] = Acc(0);
  }
  __device__ __forceinline__ static int ty() { return threadIdx.x / (Tr::BD / Tr::TN); }
  __device__ __forceinline__ static int tx() { return threadIdx.x % (Tr::BD / Tr::TN); }

  // dQ[ty*TM + i][tx*TN + j] += sum_c dP[ty*TM + i][c] X[c][tx*TN + j]
  __device__ __forceinline__ void add_dq(const Smem<Tr>& sm) {
    const int y = ty(), x = tx();
#pragma unroll 4
    for (int c = 0; c < Tr::BN; ++c) {
      Acc a[Tr::TM], b[Tr::TN];
#pragma unroll
      for (int i = 0; i < Tr::TM; ++i) a[i] = sm.s[(y * Tr::TM + i) * Tr::LDS + c];
#pragma unroll
      for (int j = 0; j < Tr::TN; ++j) b[j] = sm.x[c * Tr::LDX + x * Tr::TN + j];
#pragma unroll
      for (int i = 0; i < Tr::TM; ++i)
#pragma unroll
        for (int j = 0; j < Tr::TN; ++j) v[i][j] = fma(a[i], b[j], v[i][j]);
    }
  }
  // dK[ty*TM + i][tx*TN + j] += sum_r dP[r][ty*TM + i] X[r][tx*TN + j]
  __device__ __forceinline__ void add_dk(const Smem<Tr>& sm) {
    const int y = ty(), x = tx();
#pragma unroll 4
    for (int r = 0; r < Tr::BM; ++r) {
      Acc a[Tr::TM], b[Tr::TN];
#pragma unroll
      for (int i = 0; i < Tr::TM; ++i) a[i] = sm.s[r * Tr::LDS + y * Tr::TM + i];
#pragma unroll
      for (int j = 0; j < Tr::TN; ++j) b[j] = sm.x[r * Tr::LDX + x * Tr::TN + j];
#pragma unroll
      for (int i = 0; i < Tr::TM; ++i)
#pragma unroll
        for (int j = 0; j < Tr::TN; ++j) v[i][j] = fma(a[i], b[j], v[i][j]);
    }
  }
  __device__ __forceinline__ void store(Acc* out, int64_t row_base, int64_t row_limit, int64_t d0,
                                        int64_t d, const Smem<Tr>&) {
    const int y = ty(), x = tx();
#pragma unroll
    for (int i = 0; i < Tr::TM; ++i)
#pragma unroll
      for (int j = 0; j < Tr::TN; ++j) {
        const int64_t gr = row_base + y * Tr::TM + i, gc = d0 + x * Tr::TN + j;
        if (gr < row_limit && gc < d) out[gr * d + gc] = v[i][j];
      }
  }
};

template <class Tr>
using OutAcc = typename std::conditional<Tr::kMma, MmaOut<Tr>, SimtOut<Tr>>::type;

// ---------------------------------------------------------------------------------------------
// Kernels

// stats_kernel<Tr, AXIS>
//   AXIS = 0 (row statistics): block b owns rows [b*BM, b*BM + BM) and walks all M_all columns in
//     BN tiles. Per tile: metadata + Y bitmask, S tile (tensor cores / FMA), then TPR = NT/BM
//     threads per row fold their interleaved columns into an online-LSE state in registers
//     (core::lse_push, one exp per element), the positive sum and count, and the sigmoid sum.
//     The TPR states are merged with shuffles (core::lse_merge) at the end. Writes row_lse,
//     pos_sum, pos_count, row_sigmoid (each optional).
//   AXIS = 1 (column statistics): block b owns main columns [b*BN, b*BN + BN) and walks all N
//     rows in BM tiles; NT/BN threads per column, rows interleaved; states merged through shared
//     memory in a fixed order. Writes col_lse (allowed pairs of valid rows only) and col_pos_sum.
//   FLOPs: 2 BM BN D per tile (2 N M_all D per launch for rows, 2 N M_main' D for columns, M_main'
//   rounded up to BN) + 1 exp per element (+1 log1p, 1 exp for the sigmoid sum). Bytes: Q and K
//   once from DRAM, the walked operand re-read from L2 once per block; 4 bytes per output.
template <class Tr, int AXIS>
__global__ void __launch_bounds__(Tr::NT, Tr::MIN_BLOCKS)
stats_kernel(const Params<typename Tr::Acc> p, const StatsOut<typename Tr::Acc> o) {
  using Acc = typename Tr::Acc;
  extern __shared__ __align__(128) unsigned char smem[];
  const Smem<Tr> sm(smem);
  const Acc bias = p.bias ? *p.bias : Acc(0);
  if constexpr (AXIS == 0) {
    constexpr int TPR = Tr::NT / Tr::BM;
    const int64_t r0 = static_cast<int64_t>(blockIdx.x) * Tr::BM;
    const int r = threadIdx.x / TPR, sub = threadIdx.x % TPR;
    const int64_t gi = r0 + r;
    const bool want_lse = o.row_lse != nullptr, want_sig = o.row_sig != nullptr;
    core::LseState<Acc> st = core::lse_empty<Acc>();
    Acc pos = Acc(0), cnt = Acc(0), sig = Acc(0);
    load_row_info<Tr>(p, sm, r0);
    for (int64_t c0 = 0; c0 < p.m_all; c0 += Tr::BN) {
      __syncthreads();  // the previous tile's epilogue is done with the metadata and S tile
      load_col_info<Tr>(p, sm, c0);
      build_ymask<Tr>(p, sm, r0, c0);
      sim_tile<Tr>(p, sm, r0, c0);
#pragma unroll Tr::UNROLL
      for (int jj = 0; jj < Tr::BN / TPR; ++jj) {
        const int c = sub + TPR * jj;
        const int64_t gj = c0 + c;
        Acc S;
        bool Y, allowed;
        evaluate<Tr>(p, sm, r, c, gi, gj, sm.s[r * Tr::LDS + c], bias, S, Y, allowed);
        if (want_lse && allowed) st = core::lse_push(st, S);
        if (Y) {
          pos += S;
          cnt += Acc(1);
        }
        if (want_sig && allowed) sig += softplus(Y ? -S : S);
      }
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) {
      st = shfl_xor_lse(st, off);
      pos += __shfl_xor_sync(0xffffffffu, pos, off);
      cnt += __shfl_xor_sync(0xffffffffu, cnt, off);
      sig += __shfl_xor_sync(0xffffffffu, sig, off);
    }
    if (sub == 0 && gi < p.n) {
      if (o.row_lse) o.row_lse[gi] = core::lse_value(st);
      if (o.pos_sum) o.pos_sum[gi] = pos;
      if (o.pos_cnt) o.pos_cnt[gi] = cnt;
      if (o.row_sig) o.row_sig[gi] = sig;
    }
  } else {
    constexpr int TPC = Tr::NT / Tr::BN;
    const int64_t c0 = static_cast<int64_t>(blockIdx.x) * Tr::BN;
    const int c = threadIdx.x % Tr::BN, g = threadIdx.x / Tr::BN;
    const int64_t gj = c0 + c;
    const bool is_main = gj < p.m_main, want_lse = o.col_lse != nullptr;
    core::LseState<Acc> st = core::lse_empty<Acc>();
    Acc pos = Acc(0);
    load_col_info<Tr>(p, sm, c0);
    for (int64_t r0 = 0; r0 < p.n; r0 += Tr::BM) {
      __syncthreads();
      load_row_info<Tr>(p, sm, r0);
      build_ymask<Tr>(p, sm, r0, c0);
      sim_tile<Tr>(p, sm, r0, c0);
#pragma unroll Tr::UNROLL
      for (int jj = 0; jj < Tr::BM / TPC; ++jj) {
        const int r = g + TPC * jj;
        const int64_t gi = r0 + r;
        Acc S;
        bool Y, allowed;
        evaluate<Tr>(p, sm, r, c, gi, gj, sm.s[r * Tr::LDS + c], bias, S, Y, allowed);
        if (want_lse && allowed && is_main && (sm.rflag[r] & 2)) st = core::lse_push(st, S);
        if (Y) pos += S;  // Y only on main columns
      }
    }
    __syncthreads();  // S tile free: reuse as [3][NT] scratch
    Acc* red_m = sm.s;
    Acc* red_s = sm.s + Tr::NT;
    Acc* red_p = sm.s + 2 * Tr::NT;
    red_m[threadIdx.x] = st.m;
    red_s[threadIdx.x] = st.s;
    red_p[threadIdx.x] = pos;
    __syncthreads();
    if (g == 0 && is_main) {
      core::LseState<Acc> tot = core::lse_empty<Acc>();
      Acc ptot = Acc(0);
      for (int h = 0; h < TPC; ++h) {
        tot = core::lse_merge(tot, core::LseState<Acc>{red_m[h * Tr::BN + c], red_s[h * Tr::BN + c]});
        ptot += red_p[h * Tr::BN + c];
      }
      if (o.col_lse) o.col_lse[gj] = core::lse_value(tot);
      if (o.col_pos) o.col_pos[gj] = ptot;
    }
  }
}

// dq_kernel: block (bx, by) owns rows [bx*BM, bx*BM + BM) and feature columns [by*BD, by*BD + BD)
//   of dQ; walks all M_all columns in BN tiles: S tile recomputed (full D), dS and dP = dS scale_i
//   (grad_tile), X = K[c0:c0+BN, d0:d0+BD] staged, then dQ += dP X (tensor cores for bf16/fp16 with
//   dP rounded to the input dtype; FMA otherwise). blockIdx.y == 0 also accumulates per-row
//   dscale_i = sum_j dS_ij sim_ij, dmargin_i = sum_j dS_ij Y_ij and dbias rows (in registers,
//   TPR threads per row, shuffle-reduced), writes dscale / dmargin and the block's dbias partial
//   (rows summed in a fixed order). Without dq (only dscale / dbias / dmargin wanted) the grid has
//   one D chunk and the second product is skipped.
//   FLOPs: 2 BM BN D (recompute) + 2 BM BN BD per tile; total (ceil(D/BD) + 1) 2 N M_all D.
//   Bytes: q, k and the O(N + M) statistics; dq written once (fp32).
template <class Tr>
__global__ void __launch_bounds__(Tr::NT, Tr::MIN_BLOCKS)
dq_kernel(const Params<typename Tr::Acc> p, const GradOut<typename Tr::Acc> o) {
  using Acc = typename Tr::Acc;
  using Raw = typename Tr::Raw;
  extern __shared__ __align__(128) unsigned char smem[];
  const Smem<Tr> sm(smem);
  const Acc bias = p.bias ? *p.bias : Acc(0);
  constexpr int TPR = Tr::NT / Tr::BM;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * Tr::BM;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * Tr::BD;
  const int r = threadIdx.x / TPR, sub = threadIdx.x % TPR;
  const int64_t gi = r0 + r;
  const bool want_dq = o.dq != nullptr;
  OutAcc<Tr> acc;
  acc.zero();
  Acc dscale = Acc(0), dbias = Acc(0), dmargin = Acc(0);
  load_row_info<Tr>(p, sm, r0);
  for (int64_t c0 = 0; c0 < p.m_all; c0 += Tr::BN) {
    __syncthreads();  // previous tile: epilogue and second product done with shared memory
    load_col_info<Tr>(p, sm, c0);
    build_ymask<Tr>(p, sm, r0, c0);
    if (want_dq)
      load_tile<Tr, Tr::BN, Tr::BD, Tr::LDX>(sm.x, static_cast<const Raw*>(p.k), p.m_all, c0, d0, p.d,
                                             p.vec_ok);
    sim_tile<Tr>(p, sm, r0, c0);
    grad_tile<Tr, true>(p, sm, r0, c0, bias, want_dq, dscale, dbias, dmargin);
    if (want_dq) {
      __syncthreads();  // dP complete
      acc.add_dq(sm);
    }
  }
#pragma unroll
  for (int off = TPR / 2; off > 0; off >>= 1) {
    dscale += __shfl_xor_sync(0xffffffffu, dscale, off);
    dbias += __shfl_xor_sync(0xffffffffu, dbias, off);
    dmargin += __shfl_xor_sync(0xffffffffu, dmargin, off);
  }
  __syncthreads();  // shared memory free
  if (blockIdx.y == 0) {  // uniform over the block
    Acc* rows = sm.s;  // [BM] dbias per row
    if (sub == 0) {
      if (gi < p.n) {
        if (o.dscale) o.dscale[gi] = dscale;
        if (o.dmargin) o.dmargin[gi] = dmargin;
      }
      rows[r] = gi < p.n ? dbias : Acc(0);
    }
    __syncthreads();
    if (threadIdx.x == 0 && o.dbias_part) {
      Acc total = Acc(0);
      for (int i = 0; i < Tr::BM; ++i) total += rows[i];
      o.dbias_part[blockIdx.x] = total;
    }
    __syncthreads();
  }
  if (want_dq) acc.store(o.dq, r0, p.n, d0, p.d, sm);
}

// dk_kernel: block (bx, by) owns k rows [bx*BN, bx*BN + BN) (< grad_cols) and feature columns
//   [by*BD, by*BD + BD); walks all N rows in BM tiles: S tile recomputed, dP = dS scale_i,
//   X = Q[r0:r0+BM, d0:d0+BD] staged, dK += dP^T X (tensor cores for bf16/fp16, A operand read
//   column-major from the dP tile; FMA otherwise).
//   FLOPs: (ceil(D/BD) + 1) 2 N grad_cols' D. Bytes: q, k, statistics; dk written once (fp32).
template <class Tr>
__global__ void __launch_bounds__(Tr::NT, Tr::MIN_BLOCKS)
dk_kernel(const Params<typename Tr::Acc> p, const GradOut<typename Tr::Acc> o) {
  using Acc = typename Tr::Acc;
  using Raw = typename Tr::Raw;
  extern __shared__ __align__(128) unsigned char smem[];
  const Smem<Tr> sm(smem);
  const Acc bias = p.bias ? *p.bias : Acc(0);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * Tr::BN;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * Tr::BD;
  OutAcc<Tr> acc;
  acc.zero();
  Acc unused0 = Acc(0), unused1 = Acc(0), unused2 = Acc(0);
  load_col_info<Tr>(p, sm, c0);
  for (int64_t r0 = 0; r0 < p.n; r0 += Tr::BM) {
    __syncthreads();
    load_row_info<Tr>(p, sm, r0);
    build_ymask<Tr>(p, sm, r0, c0);
    load_tile<Tr, Tr::BM, Tr::BD, Tr::LDX>(sm.x, static_cast<const Raw*>(p.q), p.n, r0, d0, p.d,
                                           p.vec_ok);
    sim_tile<Tr>(p, sm, r0, c0);
    grad_tile<Tr, false>(p, sm, r0, c0, bias, true, unused0, unused1, unused2);
    __syncthreads();  // dP complete
    acc.add_dk(sm);
  }
  __syncthreads();  // shared memory free (staging)
  acc.store(o.dk, c0, o.grad_cols, d0, p.d, sm);
}

// sum_kernel: out = sum of `count` partials, one block of 256 threads: strided per-thread sums
// then a shared-memory tree, both in a fixed order (deterministic). count = 0 writes 0.
template <typename Acc>
__global__ void __launch_bounds__(256) sum_kernel(const Acc* __restrict__ part, int64_t count, Acc* out) {
  __shared__ Acc buf[256];
  Acc s = Acc(0);
  for (int64_t i = threadIdx.x; i < count; i += 256) s += part[i];
  buf[threadIdx.x] = s;
  __syncthreads();
#pragma unroll
  for (int off = 128; off > 0; off >>= 1) {
    if (static_cast<int>(threadIdx.x) < off) buf[threadIdx.x] += buf[threadIdx.x + off];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = buf[0];
}

// ---------------------------------------------------------------------------------------------
// Launchers

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <class Tr>
Params<typename Tr::Acc> make_params(const ContrastiveArgs& a) {
  using Acc = typename Tr::Acc;
  Params<Acc> p{};
  p.q = a.q;
  p.k = a.k;
  p.n = a.n;
  p.m_all = a.m_all;
  p.m_main = a.m_main;
  p.d = a.d;
  p.scale = static_cast<const Acc*>(a.scale);
  p.bias = static_cast<const Acc*>(a.bias);
  p.margin = static_cast<Acc>(a.margin);
  p.margin_rows = static_cast<const Acc*>(a.margin_rows);
  p.targets = a.targets;
  p.tpr = a.targets_per_row;
  p.valid = a.valid;
  p.labels_q = a.labels_q;
  p.labels_k = a.labels_q ? a.labels_k : nullptr;
  p.thr = static_cast<const Acc*>(a.neg_threshold);
  p.excl_self = a.exclude_self;
  p.excl_pos = a.exclude_positives;
  p.vec_ok = Tr::VEC > 1 && a.d % Tr::VEC == 0 && aligned16(a.q) && aligned16(a.k);
  return p;
}

template <typename Kernel>
int set_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return 0;
  return static_cast<int>(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class Tr>
int run_forward(const ContrastiveArgs& a, void* row_lse, void* col_lse, void* pos_sum, void* pos_cnt,
                void* col_pos, void* row_sig, cudaStream_t stream) {
  using Acc = typename Tr::Acc;
  const Params<Acc> p = make_params<Tr>(a);
  StatsOut<Acc> o;
  o.row_lse = static_cast<Acc*>(row_lse);
  o.col_lse = static_cast<Acc*>(col_lse);
  o.pos_sum = static_cast<Acc*>(pos_sum);
  o.pos_cnt = static_cast<Acc*>(pos_cnt);
  o.col_pos = static_cast<Acc*>(col_pos);
  o.row_sig = a.sigmoid ? static_cast<Acc*>(row_sig) : nullptr;
  constexpr int bytes = Layout<Tr>::kForward;
  const int64_t row_blocks = cdiv(a.n, Tr::BM), col_blocks = cdiv(a.m_main, Tr::BN);
  if (row_blocks > 0x7fffffff || col_blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
  if (a.n > 0 && (o.row_lse || o.pos_sum || o.pos_cnt || o.row_sig)) {
    if (int err = set_smem(stats_kernel<Tr, 0>, bytes)) return err;
    stats_kernel<Tr, 0><<<static_cast<unsigned>(row_blocks), Tr::NT, bytes, stream>>>(p, o);
    if (int err = static_cast<int>(cudaGetLastError())) return err;
  }
  if (a.m_main > 0 && (o.col_lse || o.col_pos)) {
    if (int err = set_smem(stats_kernel<Tr, 1>, bytes)) return err;
    stats_kernel<Tr, 1><<<static_cast<unsigned>(col_blocks), Tr::NT, bytes, stream>>>(p, o);
    if (int err = static_cast<int>(cudaGetLastError())) return err;
  }
  return 0;
}

template <class Tr>
int run_backward(const ContrastiveArgs& a, const void* row_lse, const void* col_lse, const void* g_row,
                 const void* g_col, const void* g_pos, const void* g_colpos, const void* g_sig,
                 int64_t grad_cols, void* dq, void* dk, void* dscale, void* dbias, void* dmargin,
                 void* scratch, cudaStream_t stream) {
  using Acc = typename Tr::Acc;
  Params<Acc> p = make_params<Tr>(a);
  // a term is present when both its statistic and its upstream gradient are given
  p.row_lse = row_lse && g_row ? static_cast<const Acc*>(row_lse) : nullptr;
  p.g_row = p.row_lse ? static_cast<const Acc*>(g_row) : nullptr;
  p.col_lse = col_lse && g_col ? static_cast<const Acc*>(col_lse) : nullptr;
  p.g_col = p.col_lse ? static_cast<const Acc*>(g_col) : nullptr;
  p.g_pos = static_cast<const Acc*>(g_pos);
  p.g_colpos = static_cast<const Acc*>(g_colpos);
  p.g_sig = a.sigmoid ? static_cast<const Acc*>(g_sig) : nullptr;
  GradOut<Acc> o;
  o.dq = static_cast<Acc*>(dq);
  o.dk = static_cast<Acc*>(dk);
  o.dscale = static_cast<Acc*>(dscale);
  o.dmargin = static_cast<Acc*>(dmargin);
  o.dbias_part = dbias ? static_cast<Acc*>(scratch) : nullptr;
  o.grad_cols = grad_cols;
  if (grad_cols < 0 || grad_cols > a.m_all) return static_cast<int>(cudaErrorInvalidValue);
  if (dbias && !scratch) return static_cast<int>(cudaErrorInvalidValue);
  constexpr int bytes = Layout<Tr>::kBackward;
  const int64_t row_blocks = cdiv(a.n, Tr::BM), col_blocks = cdiv(grad_cols, Tr::BN);
  const int64_t d_blocks = cdiv(a.d, Tr::BD);
  if (row_blocks > 0x7fffffff || col_blocks > 0x7fffffff || d_blocks > 65535)
    return static_cast<int>(cudaErrorInvalidValue);
  if (a.n > 0 && (dq || dscale || dbias || dmargin)) {
    // without dq: one D chunk (row sums only); with dq and d = 0: one chunk, nothing stored
    const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(dq && d_blocks > 0 ? d_blocks : 1));
    if (int err = set_smem(dq_kernel<Tr>, bytes)) return err;
    dq_kernel<Tr><<<grid, Tr::NT, bytes, stream>>>(p, o);
    if (int err = static_cast<int>(cudaGetLastError())) return err;
  }
  if (dbias) {  // the partials of the row blocks (none when n = 0: dbias = 0)
    sum_kernel<Acc><<<1, 256, 0, stream>>>(static_cast<const Acc*>(scratch), a.n > 0 ? row_blocks : 0,
                                           static_cast<Acc*>(dbias));
    if (int err = static_cast<int>(cudaGetLastError())) return err;
  }
  if (dk && grad_cols > 0 && a.d > 0) {  // n = 0: the row loop is empty and zeros are stored
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(d_blocks));
    if (int err = set_smem(dk_kernel<Tr>, bytes)) return err;
    dk_kernel<Tr><<<grid, Tr::NT, bytes, stream>>>(p, o);
    if (int err = static_cast<int>(cudaGetLastError())) return err;
  }
  return 0;
}

}  // namespace

int contrastive_lse_forward(const ContrastiveArgs& a, void* row_lse, void* col_lse, void* pos_sum,
                            void* pos_count, void* col_pos_sum, void* row_sigmoid, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case core::DType::f32:
      return run_forward<SimtTraits<float>>(a, row_lse, col_lse, pos_sum, pos_count, col_pos_sum, row_sigmoid, s);
    case core::DType::f64:
      return run_forward<SimtTraits<double>>(a, row_lse, col_lse, pos_sum, pos_count, col_pos_sum, row_sigmoid, s);
    case core::DType::bf16:
      return run_forward<MmaTraits<core::bf16_t>>(a, row_lse, col_lse, pos_sum, pos_count, col_pos_sum, row_sigmoid, s);
    case core::DType::f16:
      return run_forward<MmaTraits<core::f16_t>>(a, row_lse, col_lse, pos_sum, pos_count, col_pos_sum, row_sigmoid, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int contrastive_lse_backward(const ContrastiveArgs& a, const void* row_lse, const void* col_lse,
                             const void* g_row, const void* g_col, const void* g_pos,
                             const void* g_colpos, const void* g_sig, int64_t grad_cols, void* dq,
                             void* dk, void* dscale, void* dbias, void* dmargin, void* scratch,
                             void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case core::DType::f32:
      return run_backward<SimtTraits<float>>(a, row_lse, col_lse, g_row, g_col, g_pos, g_colpos, g_sig, grad_cols,
                                             dq, dk, dscale, dbias, dmargin, scratch, s);
    case core::DType::f64:
      return run_backward<SimtTraits<double>>(a, row_lse, col_lse, g_row, g_col, g_pos, g_colpos, g_sig, grad_cols,
                                              dq, dk, dscale, dbias, dmargin, scratch, s);
    case core::DType::bf16:
      return run_backward<MmaTraits<core::bf16_t>>(a, row_lse, col_lse, g_row, g_col, g_pos, g_colpos, g_sig,
                                                   grad_cols, dq, dk, dscale, dbias, dmargin, scratch, s);
    case core::DType::f16:
      return run_backward<MmaTraits<core::f16_t>>(a, row_lse, col_lse, g_row, g_col, g_pos, g_colpos, g_sig,
                                                  grad_cols, dq, dk, dscale, dbias, dmargin, scratch, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace flashloss
