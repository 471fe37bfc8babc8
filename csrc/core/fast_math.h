// Vectorisable exp for fp32 loops on the CPU (and usable on the device).
//
// Why: glibc's expf is scalar (its vector variants need -ffast-math, which also breaks the -inf
// handling the online LSE relies on), so a loop of expf runs at a few ns per element and every
// softmax-style CPU kernel becomes exp-bound. fast_exp is written once over a lane type F: the
// scalar `float` and the 8-lane GCC vector `csrc/cpu/simd.h: vf8` both instantiate it, so the
// vector kernels and their scalar tails compute bit-identical values.
//
// Method (Cephes expf): n = round(x / ln2) (by the 1.5*2^23 trick: no vector floor needed),
// r = x - n*ln2 with ln2 in two parts, exp(r) by a degree-6 polynomial on [-ln2/2, ln2/2], times
// 2^n built in the exponent field (in two halves so n = 128 does not overflow early).
// Accuracy: <= 1.5 ulp for results >= 2^-126 (ctest checks a dense sweep; measured 1.003 with
// FMA contraction, 0.99 without). Results below 2^-126
// flush to 0 (softmax weights that small never matter); -inf -> 0, x > 88.72 -> +inf, NaN -> NaN.
#pragma once
#include <cstdint>

#include "common.h"

namespace flashloss {
namespace core {

// Float <-> int conversions per lane type; csrc/cpu/simd.h specialises it for its vectors.
template <typename F> struct LaneOps;
template <> struct LaneOps<float> {
  static FL_HD int32_t to_int(float v) { return static_cast<int32_t>(v); }
  static FL_HD float as_float(int32_t bits) { return bits_to_float(static_cast<uint32_t>(bits)); }
};

template <typename F>
FL_HD F fast_exp_lanes(F x) {
  const F lo = F{} + -87.3365448f, hi = F{} + 88.7228394f;
  F xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const F round_magic = F{} + 12582912.0f;
  const F n = (xc * 1.44269504088896341f + round_magic) - round_magic;
  F r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const auto ni = LaneOps<F>::to_int(n);
  const auto n1 = ni >> 1;
  const auto n2 = ni - n1;
  F y = p * LaneOps<F>::as_float((n1 + 127) << 23) * LaneOps<F>::as_float((n2 + 127) << 23);
  y = x < lo ? F{} : y;
  y = x > hi ? F{} + __builtin_inff() : y;
  y = x != x ? x : y;
  return y;
}

FL_HD float fast_exp(float x) { return fast_exp_lanes<float>(x); }

// Vectorisable tanh for fp32 lanes (softcapped logits, primitive B), same lane types as
// fast_exp_lanes. Method (Cephes tanhf): |x| < 0.625: x + x^3 P(x^2), a degree-4 odd polynomial
// (no cancellation near 0); otherwise 1 - 2 / (exp(2|x|) + 1) with the sign restored, which
// saturates to +-1 for large |x| (exp overflows to +inf, 2/inf = 0). Both branches are evaluated
// and selected per lane. Accuracy: <= 2 ulp (ctest test_token_logprobs_core checks a dense sweep).
// NaN -> NaN (NaN >= 0.625 is false, so the polynomial branch, which propagates it, is taken).
template <typename F>
FL_HD F fast_tanh_lanes(F x) {
  const F zero = F{}, one = F{} + 1.0f;
  const F ax = x < zero ? -x : x;
  const F e = fast_exp_lanes<F>(ax + ax);
  F big = one - (F{} + 2.0f) / (e + one);
  big = x < zero ? -big : big;
  const F s = x * x;
  F p = F{} + -5.70498872745e-3f;
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  const F small = p * s * x + x;
  return ax >= F{} + 0.625f ? big : small;
}

FL_HD float fast_tanh(float x) { return fast_tanh_lanes<float>(x); }

// Vectorisable atan for fp32 lanes (the cauchy relaxation of primitive C, one per comparator).
// glibc's atanf is a scalar call (~10 ns): a sorting network's forward was atan-bound. Method
// (Cephes atanf): reduce |x| to [0, tan(pi/8)] with atan(x) = pi/2 + atan(-1/x) above tan(3pi/8)
// and pi/4 + atan((x-1)/(x+1)) above tan(pi/8), then a degree-4 polynomial in x^2; sign restored.
// All branches are evaluated and selected per lane. Accuracy <= 3 ulp (2.6 measured; ctest
// test_fast_exp sweeps it); +-inf -> +-pi/2, NaN -> NaN.
template <typename F>
FL_HD F fast_atan_lanes(F x) {
  const F zero = F{}, one = F{} + 1.0f;
  const F ax = x < zero ? -x : x;
  const auto big = ax > F{} + 2.414213562373095f;
  const auto mid = ax > F{} + 0.4142135623730950f;
  F xr = big ? -one / ax : (mid ? (ax - one) / (ax + one) : ax);
  const F y0 = big ? F{} + 1.5707963267948966f : (mid ? F{} + 0.7853981633974483f : zero);
  const F z = xr * xr;
  F p = F{} + 8.05374449538e-2f;
  p = p * z - 1.38776856032e-1f;
  p = p * z + 1.99777106478e-1f;
  p = p * z - 3.33329491539e-1f;
  const F y = y0 + (p * z * xr + xr);
  return x < zero ? -y : y;
}

FL_HD float fast_atan(float x) { return fast_atan_lanes<float>(x); }

}  // namespace core
}  // namespace flashloss
