// CPU kernels of primitive C. See sort_network.h for the contract and
// python/flashloss/ops/sort_network.py (the torch backend) for the same algorithm in PyTorch.
//
// Layout and tiling. Rows are independent: one OpenMP iteration per row, all state in per-thread
// scratch (never O(B * n * n * L)). The values of a row live in a length-n array of slots; a
// comparator c mixes slots i = pairs[c,0] and j = pairs[c,1]. P is handled in blocks of R rows of
// P (input elements): PT[s][l] holds P[r0 + l, slot s], so a comparator mixes two contiguous
// R-vectors (one AVX2 register pair for R = 16 floats). P @ W is the sweep of OBJECTIVES.md §4.5
// (V <- W, comparators from last to first), O(g * C) per row instead of forming P.
//
// Saved for backward: alpha [B, C] only. The backward recomputes per row the value differences
// a - b (C scalars), the P column differences of each comparator per row block (C * R) and the V
// differences (C * g), then sweeps back; per-thread scratch O(n * R + C * (R + g + 2)).
//
// Cost per row (C comparators, n elements, g position weights): forward ~6C FLOPs for the values
// plus one relax_alpha per comparator, 6nC with P, 6gC with PW; backward ~3x that (recompute,
// differences, the reverse sweeps), plus one relax_dalpha per comparator. Bytes: x, alpha, the
// outputs and their upstreams once each (P: 4n^2 bytes per row in fp32 dominates when asked for).
#include "sort_network.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../core/fast_math.h"

namespace flashloss {
namespace cpu {
namespace {

constexpr int64_t R = 16;  // rows of P per block (lanes of the inner mixes)

template <typename T>
inline void mix(T& a, T& b, T al) {
  const T x = a, y = b;
  a = al * x + (T(1) - al) * y;
  b = (T(1) - al) * x + al * y;
}

template <typename T>
inline void mix_lanes(T* __restrict pi, T* __restrict pj, T al, int64_t lanes) {
  for (int64_t l = 0; l < lanes; ++l) {
    const T x = pi[l], y = pj[l];
    pi[l] = al * x + (T(1) - al) * y;
    pj[l] = (T(1) - al) * x + al * y;
  }
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

// PT[s][l] = identity rows r0 .. r0 + R (lanes past n stay 0)
template <typename T>
inline void identity_block(T* PT, int64_t n, int64_t r0) {
  std::fill(PT, PT + n * R, T(0));
  for (int64_t l = 0; l < R && r0 + l < n; ++l) PT[(r0 + l) * R + l] = T(1);
}

// V [n, g] = W (the row's weights) moved to the slots holding each output position, then swept
// from the last comparator to the first; when vdiff is non-null it records V[i] - V[j] before each
// comparator's mix (the backward's tape).
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

// alpha with the relaxation fixed at compile time; fp32 cauchy uses the vectorisable fast_atan
// (<= 3 ulp) so that a layer's alphas compute as one SIMD loop.
template <core::Relax K, typename T>
inline T alpha_of(T d, T s, T lam) {
  if constexpr (K == core::Relax::cauchy && std::is_same_v<T, float>)
    return core::fast_atan(s * d) * 0.31830988618379067154f + 0.5f;
  else
    return core::relax_alpha_k<K>(d, s, lam);
}

// The values of one row through the network: alphas of a layer in one (vectorisable) loop, since
// its comparators touch disjoint slots; `d_out` (when non-null) receives a - b per comparator.
template <core::Relax K, typename T>
inline void values_forward(const SortSchedule& s, const core::RelaxParams<T>& p, T* v, T* al, T* dl, bool compute_alpha,
                           T* d_out) {
  for (int64_t layer = 0; layer < s.num_layers; ++layer) {
    const int64_t lo = s.layer_ptr[layer], hi = s.layer_ptr[layer + 1];
    for (int64_t c = lo; c < hi; ++c) dl[c - lo] = v[s.pairs[2 * c + 1]] - v[s.pairs[2 * c]];
    if (compute_alpha) {
      const T st = p.steepness, lam = p.art_lambda;
#pragma omp simd
      for (int64_t k = 0; k < hi - lo; ++k) al[lo + k] = alpha_of<K>(dl[k], st, lam);
    }
    for (int64_t c = lo; c < hi; ++c) {
      if (d_out) d_out[c] = -dl[c - lo];
      mix(v[s.pairs[2 * c]], v[s.pairs[2 * c + 1]], al[c]);
    }
  }
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

int64_t max_layer_width(const SortSchedule& s) {
  int64_t w = 0;
  for (int64_t l = 0; l < s.num_layers; ++l) w = std::max<int64_t>(w, s.layer_ptr[l + 1] - s.layer_ptr[l]);
  return w;
}

}  // namespace

template <typename T>
void sort_network_forward(const SortSchedule& s, const core::RelaxParams<T>& relax, int64_t B, const T* x,
                          T* sorted, T* alpha, T* P, const T* W, int64_t Bw, int64_t g, T* PW) {
  const int64_t n = s.n, C = s.num_comparators, width = max_layer_width(s);
  dispatch_relax(relax.kind, [&](auto kind) {
#pragma omp parallel
  {
    std::vector<T> v(n), dl(width + 1), PT(P ? n * R : 0), V(PW ? n * g : 0);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* xr = x + b * n;
      T* al = alpha + b * C;
      std::copy(xr, xr + n, v.begin());
      values_forward<decltype(kind)::value>(s, relax, v.data(), al, dl.data(), true, static_cast<T*>(nullptr));
      for (int64_t r = 0; r < n; ++r) sorted[b * n + r] = v[s.out_slot[r]];
      if (P) {
        T* Pb = P + b * n * n;
        for (int64_t r0 = 0; r0 < n; r0 += R) {
          identity_block(PT.data(), n, r0);
          for (int64_t c = 0; c < C; ++c)
            mix_block(PT.data() + int64_t(s.pairs[2 * c]) * R, PT.data() + int64_t(s.pairs[2 * c + 1]) * R, al[c]);
          const int64_t rows = std::min(R, n - r0);
          for (int64_t l = 0; l < rows; ++l)
            for (int64_t q = 0; q < n; ++q) Pb[(r0 + l) * n + q] = PT[int64_t(s.out_slot[q]) * R + l];
        }
      }
      if (PW) {
        std::fill(V.begin(), V.end(), T(0));
        sweep_weights(s, al, W + (Bw == 1 ? 0 : b) * n * g, g, V.data(), static_cast<T*>(nullptr));
        std::copy(V.begin(), V.end(), PW + b * n * g);
      }
    }
  }
  });
}

template <typename T>
void sort_network_backward(const SortSchedule& s, const core::RelaxParams<T>& relax, int64_t B, const T* x,
                           const T* alpha, const T* g_sorted, const T* g_P, const T* g_PW, const T* W, int64_t Bw,
                           int64_t g, T* g_x, T* g_W) {
  const int64_t n = s.n, C = s.num_comparators, width = max_layer_width(s);
  const bool shared_w = g_W && Bw == 1;
  // dL/dW summed over rows when W is shared: each row writes its own [n, g] part, summed in row
  // order afterwards, so the result does not depend on the number of threads (bitwise)
  std::vector<T> w_rows(shared_w ? size_t(B) * n * g : 0);
  dispatch_relax(relax.kind, [&](auto kind) {
#pragma omp parallel
  {
    std::vector<T> v(n), d(C), da(C), gv(n), dl(width + 1);
    std::vector<T> PT(g_P ? n * R : 0), G(g_P ? n * R : 0), pdiff(g_P ? C * R : 0);
    std::vector<T> V(g_PW ? n * g : 0), U(g_PW ? n * g : 0), vdiff(g_PW ? C * g : 0);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* al = alpha + b * C;
      // layer inputs: d[c] = a - b (the saved alphas, not recomputed)
      std::copy(x + b * n, x + (b + 1) * n, v.begin());
      values_forward<decltype(kind)::value>(s, relax, v.data(), const_cast<T*>(al), dl.data(), false, d.data());
      std::fill(da.begin(), da.end(), T(0));
      if (g_PW) {  // dL/dalpha through P @ W: U = dL/dV swept forwards against the V tape
        std::fill(V.begin(), V.end(), T(0));
        sweep_weights(s, al, W + (Bw == 1 ? 0 : b) * n * g, g, V.data(), vdiff.data());
        std::copy(g_PW + b * n * g, g_PW + (b + 1) * n * g, U.begin());
        for (int64_t c = 0; c < C; ++c) {
          T* ui = U.data() + int64_t(s.pairs[2 * c]) * g;
          T* uj = U.data() + int64_t(s.pairs[2 * c + 1]) * g;
          T acc = 0;
          for (int64_t k = 0; k < g; ++k) acc += (ui[k] - uj[k]) * vdiff[c * g + k];
          da[c] += acc;
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
      if (g_P) {  // dL/dalpha through P, R rows of P at a time
        const T* gPb = g_P + b * n * n;
        for (int64_t r0 = 0; r0 < n; r0 += R) {
          identity_block(PT.data(), n, r0);
          for (int64_t c = 0; c < C; ++c) {
            T* pi = PT.data() + int64_t(s.pairs[2 * c]) * R;
            T* pj = PT.data() + int64_t(s.pairs[2 * c + 1]) * R;
            T* pd = pdiff.data() + c * R;
#pragma omp simd
            for (int64_t l = 0; l < R; ++l) pd[l] = pi[l] - pj[l];
            mix_block(pi, pj, al[c]);
          }
          std::fill(G.begin(), G.end(), T(0));
          const int64_t rows = std::min(R, n - r0);
          for (int64_t l = 0; l < rows; ++l)
            for (int64_t q = 0; q < n; ++q) G[int64_t(s.out_slot[q]) * R + l] = gPb[(r0 + l) * n + q];
          for (int64_t c = C - 1; c >= 0; --c) {
            T* gi = G.data() + int64_t(s.pairs[2 * c]) * R;
            T* gj = G.data() + int64_t(s.pairs[2 * c + 1]) * R;
            const T* pd = pdiff.data() + c * R;
            T acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t l = 0; l < R; ++l) acc += (gi[l] - gj[l]) * pd[l];
            da[c] += acc;
            mix_block(gi, gj, al[c]);
          }
        }
      }
      // values: reverse sweep, chaining dL/dalpha to the comparator's inputs
      std::fill(gv.begin(), gv.end(), T(0));
      if (g_sorted)
        for (int64_t r = 0; r < n; ++r) gv[s.out_slot[r]] = g_sorted[b * n + r];
      for (int64_t c = C - 1; c >= 0; --c) {
        T& gi = gv[s.pairs[2 * c]];
        T& gj = gv[s.pairs[2 * c + 1]];
        const T dtot = da[c] + (gi - gj) * d[c];
        mix(gi, gj, al[c]);
        const T chain =
            core::relax_dalpha_k<decltype(kind)::value>(-d[c], al[c], relax.steepness, relax.art_lambda) * dtot;
        gi -= chain;
        gj += chain;
      }
      std::copy(gv.begin(), gv.end(), g_x + b * n);
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
