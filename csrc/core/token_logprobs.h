// Per-element and per-row math of primitive B (flashloss.ops.token_logprobs), shared by the CPU
// epilogues (csrc/cpu/token_logprobs.cpp, 8 fp32 lanes or scalar fp64) and the CUDA epilogues
// (csrc/cuda/token_logprobs.cu, one element per thread). OBJECTIVES.md §2.1-2.3.
//
// Logits from x = hidden . w_v + b_v:  z = (c/T) tanh(a x / c) (softcap c > 0)  or  z = (a/T) x.
// Per-row vocabulary state, merged chunk by chunk (an online LSE with two extra sums):
//   m   running max of z
//   s   sum_v e^{z_v - m}
//   sz  sum_v e^{z_v - m} (z_v - m)         (entropy; kept relative to m: no cancellation with m)
//   s2  sum_v e^{2 (z_v - m)}               (log sum p^2)
// Outputs: lse = m + log s, entropy = lse - E_p z = log s - sz / s, log sum p^2 = log s2 - 2 log s.
// Backward, with u = z - lse and p = e^u (E_p z = lse - entropy, so z - E_p z = u + entropy):
//   dz_v = g (1[v=y] - p_v) + l p_v - h p_v (u_v + entropy) + s_up
//        = p_v (c0 + c1 u_v) + s_up + g 1[v=y],   c0 = l - g - h entropy,  c1 = -h
//   dx_v = dz_v dz/dx,  dz/dx = a/T, times (1 - t^2), t = z T / c, under a softcap.
// Header-only, free of torch; every function works on scalar Acc (float, double) and, where it is
// a template over F, on the CPU's 8-lane fp32 vectors too (csrc/cpu/simd.h).
#pragma once
#include <math.h>

#include "common.h"
#include "fast_math.h"
#include "online_lse.h"

namespace flashloss {
namespace core {

// exp / tanh per lane type. On the CPU, fp32 lanes (cpu::vf8 bodies and their scalar float tails)
// use the vectorisable fast_* functions (<= 1.5 / 2 ulp; tails and bodies agree bitwise); on the
// GPU scalar float uses CUDA's expf / tanhf. fp64 uses libm everywhere (gradcheck runs in double).
template <typename F> FL_HD F tlp_exp(F x) { return fast_exp_lanes<F>(x); }
template <> FL_HD double tlp_exp<double>(double x) { return exp(x); }
template <> FL_HD float tlp_exp<float>(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return fast_exp_lanes<float>(x);
#endif
}
template <typename F> FL_HD F tlp_tanh(F x) { return fast_tanh_lanes<F>(x); }
template <> FL_HD double tlp_tanh<double>(double x) { return tanh(x); }
template <> FL_HD float tlp_tanh<float>(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  return fast_tanh_lanes<float>(x);
#endif
}

// x -> z and dz/dx (as a function of z).
template <typename Acc>
struct LogitMap {
  Acc scale;    // a / T: z = scale x without a softcap; dz/dx = scale (times 1 - t^2 with one)
  Acc in;       // a / c  (softcap)
  Acc out;      // c / T  (softcap)
  Acc inv_out;  // T / c  (softcap)
  bool softcap;
};

template <typename Acc>
FL_HD LogitMap<Acc> make_logit_map(double inv_temperature, double logit_scale, double softcap) {
  LogitMap<Acc> m;
  m.scale = Acc(logit_scale * inv_temperature);
  m.softcap = softcap > 0;
  m.in = m.softcap ? Acc(logit_scale / softcap) : Acc(0);
  m.out = m.softcap ? Acc(softcap * inv_temperature) : Acc(0);
  m.inv_out = m.softcap ? Acc(1.0 / (softcap * inv_temperature)) : Acc(0);
  return m;
}

// SOFTCAP is a compile-time copy of map.softcap, so the hot loops carry no branch.
template <bool SOFTCAP, typename F, typename Acc>
FL_HD F logit(F x, const LogitMap<Acc>& map) {
  if constexpr (SOFTCAP) return tlp_tanh<F>(x * map.in) * map.out;
  else return x * map.scale;
}

template <bool SOFTCAP, typename F, typename Acc>
FL_HD F logit_grad(F z, const LogitMap<Acc>& map) {
  if constexpr (SOFTCAP) {
    const F t = z * map.inv_out;
    return (F{} + map.scale) - t * t * map.scale;
  } else {
    return F{} + map.scale;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: vocabulary state of one row.

template <typename Acc>
struct VocabState {
  Acc m, s, sz, s2;
};

template <typename Acc> FL_HD VocabState<Acc> vocab_empty() { return {neg_inf<Acc>(), Acc(0), Acc(0), Acc(0)}; }

// The sums of st expressed relative to a new maximum M >= st.m (an empty side contributes 0;
// -inf - M is never multiplied by 0).
template <typename Acc>
FL_HD VocabState<Acc> vocab_rescale(VocabState<Acc> st, Acc M) {
  if (st.s == Acc(0)) return {M, Acc(0), Acc(0), Acc(0)};
  const Acc d = st.m - M;
  const Acc alpha = fl_exp(d);
  return {M, st.s * alpha, (st.sz + st.s * d) * alpha, st.s2 * alpha * alpha};
}

// (a) + (b) for two disjoint column sets. Same special cases as lse_merge: both empty -> empty;
// a +inf maximum -> (+inf, 1, 0, 1) (value +inf, no inf - inf); NaN propagates through m.
template <typename Acc>
FL_HD VocabState<Acc> vocab_merge(VocabState<Acc> a, VocabState<Acc> b) {
  const Acc M = max_nan(a.m, b.m);
  if (is_nan(M)) return {M, Acc(1), M, Acc(1)};
  if (M == neg_inf<Acc>()) return vocab_empty<Acc>();
  if (M == pos_inf<Acc>()) return {M, Acc(1), Acc(0), Acc(1)};
  const VocabState<Acc> x = vocab_rescale(a, M), y = vocab_rescale(b, M);
  return {M, x.s + y.s, x.sz + y.sz, x.s2 + y.s2};
}

// Adds one logit z (one exp per element unless the maximum moves). NaN propagates.
template <typename Acc>
FL_HD VocabState<Acc> vocab_push(VocabState<Acc> st, Acc z) {
  if (is_nan(z) || is_nan(st.m)) return {is_nan(z) ? z : st.m, Acc(1), is_nan(z) ? z : st.m, Acc(1)};
  if (z == neg_inf<Acc>()) return st;
  if (z > st.m) {
    if (z == pos_inf<Acc>()) return {z, Acc(1), Acc(0), Acc(1)};
    st = vocab_rescale(st, z);
    return {z, st.s + Acc(1), st.sz, st.s2 + Acc(1)};
  }
  if (st.m == pos_inf<Acc>()) return st;
  const Acc d = z - st.m;
  const Acc e = fl_exp(d);
  return {st.m, st.s + e, st.sz + e * d, st.s2 + e * e};
}

template <typename Acc> FL_HD Acc vocab_lse(VocabState<Acc> st) { return lse_value(LseState<Acc>{st.m, st.s}); }
template <typename Acc> FL_HD Acc vocab_entropy(VocabState<Acc> st) { return fl_log(st.s) - st.sz / st.s; }
template <typename Acc> FL_HD Acc vocab_log_sum_p2(VocabState<Acc> st) { return fl_log(st.s2) - Acc(2) * fl_log(st.s); }

// Everything a row carries across vocabulary chunks in the forward.
template <typename Acc>
struct RowState {
  VocabState<Acc> v;
  Acc zsum;  // sum_v z_v
  Acc zt;    // z at the target column (written by the chunk that holds it)
};

template <typename Acc> FL_HD RowState<Acc> row_state_init() { return {vocab_empty<Acc>(), Acc(0), Acc(0)}; }

// The five outputs of one row (each pointer may be null = not wanted); ignored rows give 0.
template <typename Acc>
FL_HD void row_finish(const RowState<Acc>& st, bool valid, Acc* logp, Acc* lse, Acc* entropy, Acc* z_sum,
                      Acc* log_sum_p2) {
  const Acc l = valid ? vocab_lse(st.v) : Acc(0);
  if (logp) *logp = valid ? st.zt - l : Acc(0);
  if (lse) *lse = l;
  if (entropy) *entropy = valid ? vocab_entropy(st.v) : Acc(0);
  if (z_sum) *z_sum = valid ? st.zsum : Acc(0);
  if (log_sum_p2) *log_sum_p2 = valid ? vocab_log_sum_p2(st.v) : Acc(0);
}

// ---------------------------------------------------------------------------------------------
// Backward: per-row coefficients, then one expression per element.

template <typename Acc>
struct RowGrad {
  Acc lse, c0, c1, s, g;
};

// Upstreams g (logp), l (lse), h (entropy), s (z_sum) of a valid row; absent ones are 0.
template <typename Acc>
FL_HD RowGrad<Acc> row_grad(Acc lse, Acc entropy, Acc g, Acc l, Acc h, Acc s) {
  return {lse, l - g - h * entropy, -h, s, g};
}

// dz_v without the target term g 1[v=y] (added once per row by the caller).
template <typename F, typename Acc>
FL_HD F dlogit(F z, const RowGrad<Acc>& r) {
  const F u = z - r.lse;
  const F p = tlp_exp<F>(u);
  return p * (u * r.c1 + r.c0) + r.s;
}

}  // namespace core
}  // namespace flashloss
