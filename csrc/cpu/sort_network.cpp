// CPU kernels of primitive C. See sort_network.h for the contract and
// python/flashloss/ops/sort_network.py (the torch backend) for the same algorithm in PyTorch.
//
// Layout and tiling. Rows are independent; OpenMP runs groups of G = 8 rows. The values of a
// group live slot-major with the rows in SIMD lanes (V[s][l], l < G): a comparator (slots i, j)
// is then one vector mix for 8 rows, alpha included (fp32 cauchy and logistic through the
// vectorisable core::fast_atan / core::fast_exp) -- per row a network is a chain of dependent
// scalar steps, so lanes across rows are what vectorises. P is built per row in blocks of R = 16
// rows of P: PT[s][l] holds P[r0 + l, slot s], so a comparator mixes two contiguous 16-float
// vectors. P @ W is the sweep of OBJECTIVES.md §4.5 (V <- W from the last comparator to the
// first), O(g * C) per row.
//
// Saved for backward: alpha [B, C] only. The backward recomputes, per group, the value differences
// a - b (tape [C][G]); per row, the P column differences of each 16-row block (tape [C][R]) and the
// W-sweep differences ([C][g]); dL/dalpha collects into [C][G]; then the group's values sweep back.
// Per-thread scratch O(n * (G + R) + C * (2G + R + g)); nothing O(B * n^2 * L).
//
// Cost per row (C comparators, n elements, g position weights): forward ~6C FLOPs for the values
// plus one relaxation per comparator, 6nC with P, 6gC with PW; backward ~3x that. Bytes: x, alpha,
// the outputs and their upstreams once each (P: 4n^2 bytes per row in fp32 dominates when asked).
// Deterministic: no atomics, and the only cross-row sum (dL/dW of a shared W) runs in row order.
#include "sort_network.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../core/fast_math.h"
#include "simd.h"

namespace flashloss {
namespace cpu {
namespace {

constexpr int64_t R = 16;  // rows of P per block (lanes of the P mixes)
constexpr int64_t G = kLanes;  // rows of x per group (lanes of the value mixes): 8

template <typename T>
inline void mix(T& a, T& b, T al) {
  const T x = a, y = b;
  a = al * x + (T(1) - al) * y;
  b = (T(1) - al) * x + al * y;
}

template <typename T>
inline void mix_lanes(T* __restrict pi, T* __restrict pj, T al, int64_t lanes) {
  for (int64_t l = 0; l < lanes; ++l) mix(pi[l], pj[l], al);
}

template <typename T>
inline void mix_block(T* __restrict pi, T* __restrict pj, T al) {
#pragma omp simd
  for (int64_t l = 0; l < R; ++l) {
    const T x = pi[l], y = pj[l];
    pi[l] = al * x + (T(1) - al) * y;
    pj[l] = (T(1) - al) * x + al * y;
  }
}

// fp32 alpha of the relaxations that have a vectorisable form, over a lane type F (float or the
// 8-lane vf8) so that the vector path and the scalar uses give the same bits: cauchy through
// core::fast_atan (<= 3 ulp), logistic as 1 / (1 + e^-u) (torch.sigmoid's form) through
// core::fast_exp (<= 1.5 ulp). glibc's atanf / expf are scalar calls that gcc does not vectorise.
template <core::Relax K>
constexpr bool kLaneAlpha = K == core::Relax::cauchy || K == core::Relax::logistic;

template <core::Relax K, typename F>
inline F lane_alpha(F d, float s) {
  if constexpr (K == core::Relax::cauchy)
    return core::fast_atan_lanes<F>(d * s) * 0.31830988618379067154f + 0.5f;
  else
    return 1.0f / (1.0f + core::fast_exp_lanes<F>(-(d * s)));
}

// alpha with the relaxation fixed at compile time.
template <core::Relax K, typename T>
inline T alpha_of(T d, T s, T lam) {
  if constexpr (kLaneAlpha<K> && std::is_same_v<T, float>)
    return lane_alpha<K, float>(d, s);
  else
    return core::relax_alpha_k<K>(d, s, lam);
}

template <typename F>
inline void dispatch_relax(core::Relax kind, F&& f) {
  switch (kind) {
    case core::Relax::logistic: f(std::integral_constant<core::Relax, core::Relax::logistic>{}); break;
    case core::Relax::logistic_phi: f(std::integral_constant<core::Relax, core::Relax::logistic_phi>{}); break;
    case core::Relax::gaussian: f(std::integral_constant<core::Relax, core::Relax::gaussian>{}); break;
    case core::Relax::reciprocal: f(std::integral_constant<core::Relax, core::Relax::reciprocal>{}); break;
    case core::Relax::cauchy: f(std::integral_constant<core::Relax, core::Relax::cauchy>{}); break;
    default: f(std::integral_constant<core::Relax, core::Relax::optimal>{}); break;
  }
}

// The values of rows b0 .. b0 + rows (rows <= G; idle lanes hold 0) through the network, slot-major
// V[s][l]. With `alpha_out` the alphas are computed and stored ([B, C], the rows' entries); else
// they are read from `alpha_in`, and `d_tape` [C][G] receives a - b per comparator.
template <core::Relax K, typename T>
inline void values_group(const SortSchedule& s, const core::RelaxParams<T>& p, int64_t b0, int64_t rows, const T* x,
                         T* V, T* alpha_out, const T* alpha_in, T* d_tape) {
  const int64_t n = s.n, C = s.num_comparators;
  for (int64_t sl = 0; sl < n; ++sl)
    for (int64_t l = 0; l < G; ++l) V[sl * G + l] = l < rows ? x[(b0 + l) * n + sl] : T(0);
  const T st = p.steepness, lam = p.art_lambda;
  T al[G];
  for (int64_t c = 0; c < C; ++c) {
    T* vi = V + int64_t(s.pairs[2 * c]) * G;
    T* vj = V + int64_t(s.pairs[2 * c + 1]) * G;
    if constexpr (kLaneAlpha<K> && std::is_same_v<T, float> && G == kLanes) {
      if (alpha_out) {  // one 8-lane atan / exp (gcc does not if-convert the scalar ones)
        const vf8 a = load8(vi), b = load8(vj);
        const vf8 av = lane_alpha<K, vf8>(b - a, st);
        const vf8 lo = av * a + (1.0f - av) * b, hi = (1.0f - av) * a + av * b;
        std::memcpy(vi, &lo, sizeof(lo));
        std::memcpy(vj, &hi, sizeof(hi));
        for (int64_t l = 0; l < rows; ++l) alpha_out[(b0 + l) * C + c] = av[l];
        continue;
      }
    }
    if (alpha_out) {
#pragma omp simd
      for (int64_t l = 0; l < G; ++l) al[l] = alpha_of<K>(vj[l] - vi[l], st, lam);
      for (int64_t l = 0; l < rows; ++l) alpha_out[(b0 + l) * C + c] = al[l];
    } else {
      for (int64_t l = 0; l < G; ++l) al[l] = l < rows ? alpha_in[(b0 + l) * C + c] : T(0.5);
#pragma omp simd
      for (int64_t l = 0; l < G; ++l) d_tape[c * G + l] = vi[l] - vj[l];
    }
#pragma omp simd
    for (int64_t l = 0; l < G; ++l) {
      const T a = vi[l], b = vj[l];
      vi[l] = al[l] * a + (T(1) - al[l]) * b;
      vj[l] = (T(1) - al[l]) * a + al[l] * b;
    }
  }
}

// PT[s][l] = identity rows r0 .. r0 + R (lanes past n stay 0)
template <typename T>
inline void identity_block(T* PT, int64_t n, int64_t r0) {
  std::fill(PT, PT + n * R, T(0));
  for (int64_t l = 0; l < R && r0 + l < n; ++l) PT[(r0 + l) * R + l] = T(1);
}

// V [n, g] = the row's weights moved to the slots holding each output position, swept from the
// last comparator to the first; `vdiff` (when non-null) records V[i] - V[j] before each mix.
template <typename T>
inline void sweep_weights(const SortSchedule& s, const T* al, const T* Wrow, int64_t g, T* V, T* vdiff) {
  const int64_t n = s.n, C = s.num_comparators;
  for (int64_t r = 0; r < n; ++r) std::copy(Wrow + r * g, Wrow + (r + 1) * g, V + int64_t(s.out_slot[r]) * g);
  for (int64_t c = C - 1; c >= 0; --c) {
    T* vi = V + int64_t(s.pairs[2 * c]) * g;
    T* vj = V + int64_t(s.pairs[2 * c + 1]) * g;
    if (vdiff)
      for (int64_t k = 0; k < g; ++k) vdiff[c * g + k] = vi[k] - vj[k];
    mix_lanes(vi, vj, al[c], g);
  }
}

}  // namespace

template <typename T>
void sort_network_forward(const SortSchedule& s, const core::RelaxParams<T>& relax, int64_t B, const T* x,
                          T* sorted, T* alpha, T* P, const T* W, int64_t Bw, int64_t g, T* PW) {
  const int64_t n = s.n, C = s.num_comparators, groups = (B + G - 1) / G;
  dispatch_relax(relax.kind, [&](auto kind) {
#pragma omp parallel
    {
      std::vector<T> V(n * G), PT(P ? n * R : 0), Wv(PW ? n * g : 0);
#pragma omp for schedule(static)
      for (int64_t grp = 0; grp < groups; ++grp) {
        const int64_t b0 = grp * G, rows = std::min(G, B - b0);
        values_group<decltype(kind)::value>(s, relax, b0, rows, x, V.data(), alpha, static_cast<const T*>(nullptr),
                                            static_cast<T*>(nullptr));
        for (int64_t l = 0; l < rows; ++l)
          for (int64_t r = 0; r < n; ++r) sorted[(b0 + l) * n + r] = V[int64_t(s.out_slot[r]) * G + l];
        for (int64_t b = b0; b < b0 + rows; ++b) {
          const T* al = alpha + b * C;
          if (P) {
            T* Pb = P + b * n * n;
            for (int64_t r0 = 0; r0 < n; r0 += R) {
              identity_block(PT.data(), n, r0);
              for (int64_t c = 0; c < C; ++c)
                mix_block(PT.data() + int64_t(s.pairs[2 * c]) * R, PT.data() + int64_t(s.pairs[2 * c + 1]) * R, al[c]);
              const int64_t prow = std::min(R, n - r0);
              for (int64_t l = 0; l < prow; ++l)
                for (int64_t q = 0; q < n; ++q) Pb[(r0 + l) * n + q] = PT[int64_t(s.out_slot[q]) * R + l];
            }
          }
          if (PW) {
            std::fill(Wv.begin(), Wv.end(), T(0));
            sweep_weights(s, al, W + (Bw == 1 ? 0 : b) * n * g, g, Wv.data(), static_cast<T*>(nullptr));
            std::copy(Wv.begin(), Wv.end(), PW + b * n * g);
          }
        }
      }
    }
  });
}

template <typename T>
void sort_network_backward(const SortSchedule& s, const core::RelaxParams<T>& relax, int64_t B, const T* x,
                           const T* alpha, const T* g_sorted, const T* g_P, const T* g_PW, const T* W, int64_t Bw,
                           int64_t g, T* g_x, T* g_W) {
  const int64_t n = s.n, C = s.num_comparators, groups = (B + G - 1) / G;
  const bool shared_w = g_W && Bw == 1;
  // dL/dW summed over rows when W is shared: each row writes its own [n, g] part, summed in row
  // order afterwards, so the result does not depend on the number of threads (bitwise)
  std::vector<T> w_rows(shared_w ? size_t(B) * n * g : 0);
  dispatch_relax(relax.kind, [&](auto kind) {
#pragma omp parallel
    {
      std::vector<T> V(n * G), d_tape(C * G), da(C * G);
      std::vector<T> PT(g_P ? n * R : 0), Gb(g_P ? n * R : 0), pdiff(g_P ? C * R : 0);
      std::vector<T> Wv(g_PW ? n * g : 0), U(g_PW ? n * g : 0), vdiff(g_PW ? C * g : 0);
#pragma omp for schedule(static)
      for (int64_t grp = 0; grp < groups; ++grp) {
        const int64_t b0 = grp * G, rows = std::min(G, B - b0);
        // layer inputs of the group: d_tape[c][l] = a - b (from the saved alphas)
        values_group<decltype(kind)::value>(s, relax, b0, rows, x, V.data(), static_cast<T*>(nullptr), alpha,
                                            d_tape.data());
        std::fill(da.begin(), da.end(), T(0));
        for (int64_t l = 0; l < rows; ++l) {
          const int64_t b = b0 + l;
          const T* al = alpha + b * C;
          if (g_PW) {  // dL/dalpha through P @ W: U = dL/dV swept forwards against the W-sweep tape
            std::fill(Wv.begin(), Wv.end(), T(0));
            sweep_weights(s, al, W + (Bw == 1 ? 0 : b) * n * g, g, Wv.data(), vdiff.data());
            std::copy(g_PW + b * n * g, g_PW + (b + 1) * n * g, U.begin());
            for (int64_t c = 0; c < C; ++c) {
              T* ui = U.data() + int64_t(s.pairs[2 * c]) * g;
              T* uj = U.data() + int64_t(s.pairs[2 * c + 1]) * g;
              T acc = 0;
              for (int64_t k = 0; k < g; ++k) acc += (ui[k] - uj[k]) * vdiff[c * g + k];
              da[c * G + l] += acc;
              mix_lanes(ui, uj, al[c], g);
            }
            if (g_W) {  // dL/dW_s = U; output position r lives in slot out_slot[r]
              T* gw = shared_w ? w_rows.data() + size_t(b) * n * g : g_W + b * n * g;
              for (int64_t r = 0; r < n; ++r) {
                const T* u = U.data() + int64_t(s.out_slot[r]) * g;
                std::copy(u, u + g, gw + r * g);
              }
            }
          }
          if (g_P) {  // dL/dalpha through P, 16 rows of P at a time
            const T* gPb = g_P + b * n * n;
            for (int64_t r0 = 0; r0 < n; r0 += R) {
              identity_block(PT.data(), n, r0);
              for (int64_t c = 0; c < C; ++c) {
                T* pi = PT.data() + int64_t(s.pairs[2 * c]) * R;
                T* pj = PT.data() + int64_t(s.pairs[2 * c + 1]) * R;
                T* pd = pdiff.data() + c * R;
#pragma omp simd
                for (int64_t k = 0; k < R; ++k) pd[k] = pi[k] - pj[k];
                mix_block(pi, pj, al[c]);
              }
              std::fill(Gb.begin(), Gb.end(), T(0));
              const int64_t prow = std::min(R, n - r0);
              for (int64_t k = 0; k < prow; ++k)
                for (int64_t q = 0; q < n; ++q) Gb[int64_t(s.out_slot[q]) * R + k] = gPb[(r0 + k) * n + q];
              for (int64_t c = C - 1; c >= 0; --c) {
                T* gi = Gb.data() + int64_t(s.pairs[2 * c]) * R;
                T* gj = Gb.data() + int64_t(s.pairs[2 * c + 1]) * R;
                const T* pd = pdiff.data() + c * R;
                T acc = 0;
#pragma omp simd reduction(+ : acc)
                for (int64_t k = 0; k < R; ++k) acc += (gi[k] - gj[k]) * pd[k];
                da[c * G + l] += acc;
                mix_block(gi, gj, al[c]);
              }
            }
          }
        }
        // values of the group: reverse sweep, chaining dL/dalpha to each comparator's inputs
        std::fill(V.begin(), V.end(), T(0));
        if (g_sorted)
          for (int64_t l = 0; l < rows; ++l)
            for (int64_t r = 0; r < n; ++r) V[int64_t(s.out_slot[r]) * G + l] = g_sorted[(b0 + l) * n + r];
        const T st = relax.steepness, lam = relax.art_lambda;
        T al[G];
        for (int64_t c = C - 1; c >= 0; --c) {
          T* gi = V.data() + int64_t(s.pairs[2 * c]) * G;
          T* gj = V.data() + int64_t(s.pairs[2 * c + 1]) * G;
          for (int64_t l = 0; l < G; ++l) al[l] = l < rows ? alpha[(b0 + l) * C + c] : T(0.5);
          const T* dc = d_tape.data() + c * G;
          const T* dac = da.data() + c * G;
#pragma omp simd
          for (int64_t l = 0; l < G; ++l) {
            const T a = gi[l], b = gj[l];
            const T dtot = dac[l] + (a - b) * dc[l];
            const T chain = core::relax_dalpha_k<decltype(kind)::value>(-dc[l], al[l], st, lam) * dtot;
            gi[l] = al[l] * a + (T(1) - al[l]) * b - chain;
            gj[l] = (T(1) - al[l]) * a + al[l] * b + chain;
          }
        }
        for (int64_t l = 0; l < rows; ++l)
          for (int64_t sl = 0; sl < n; ++sl) g_x[(b0 + l) * n + sl] = V[sl * G + l];
      }
    }
  });
  if (shared_w) {
    std::fill(g_W, g_W + n * g, T(0));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t e = 0; e < n * g; ++e) g_W[e] += w_rows[size_t(b) * n * g + e];
  }
}

#define FL_SORT_INSTANTIATE(T)                                                                                  \
  template void sort_network_forward<T>(const SortSchedule&, const core::RelaxParams<T>&, int64_t, const T*, T*, \
                                        T*, T*, const T*, int64_t, int64_t, T*);                                 \
  template void sort_network_backward<T>(const SortSchedule&, const core::RelaxParams<T>&, int64_t, const T*,    \
                                         const T*, const T*, const T*, const T*, const T*, int64_t, int64_t, T*, \
                                         T*);
FL_SORT_INSTANTIATE(float)
FL_SORT_INSTANTIATE(double)

}  // namespace cpu
}  // namespace flashloss
