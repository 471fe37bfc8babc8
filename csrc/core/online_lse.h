// Online log-sum-exp: the one piece of math every flashloss reduction over a long axis shares
// (contrastive rows/columns, vocabulary chunks). OBJECTIVES.md §0.2.
//
// State (m, s) stands for the value m + log(s): m is a running maximum, s = sum_j exp(a_j - m).
//   empty set          (-inf, 0)          value -inf
//   merge (m1,s1)+(m2,s2) = (M, s1*e^(m1-M) + s2*e^(m2-M)), M = max(m1, m2)
//   if M = -inf the result is (-inf, 0): -inf - (-inf) is never evaluated.
//   if M = +inf the result is (+inf, 1): the value is +inf, again without inf - inf.
//   NaN anywhere propagates to the value (a plain fmax would silently drop it).
#pragma once
#include <cmath>

#include "common.h"

namespace flashloss {
namespace core {

template <typename Acc> FL_HD Acc fl_exp(Acc x);
template <> FL_HD float fl_exp<float>(float x) { return expf(x); }
template <> FL_HD double fl_exp<double>(double x) { return exp(x); }
template <typename Acc> FL_HD Acc fl_log(Acc x);
template <> FL_HD float fl_log<float>(float x) { return logf(x); }
template <> FL_HD double fl_log<double>(double x) { return log(x); }

template <typename Acc> FL_HD Acc neg_inf() { return -Acc(INFINITY); }
template <typename Acc> FL_HD Acc pos_inf() { return Acc(INFINITY); }
template <typename Acc> FL_HD bool is_nan(Acc x) { return x != x; }

template <typename Acc>
struct LseState {
  Acc m;  // running maximum (-inf when empty)
  Acc s;  // sum of exp(a - m)   (0 when empty)
};

template <typename Acc> FL_HD LseState<Acc> lse_empty() { return {neg_inf<Acc>(), Acc(0)}; }

// Maximum that propagates NaN from either side.
template <typename Acc> FL_HD Acc max_nan(Acc a, Acc b) {
  if (is_nan(a)) return a;
  if (is_nan(b)) return b;
  return a > b ? a : b;
}

template <typename Acc>
FL_HD LseState<Acc> lse_merge(LseState<Acc> a, LseState<Acc> b) {
  const Acc M = max_nan(a.m, b.m);
  if (is_nan(M)) return {M, Acc(1)};
  if (M == neg_inf<Acc>()) return lse_empty<Acc>();
  if (M == pos_inf<Acc>()) return {M, Acc(1)};
  // exp(-inf - M) = 0 for an empty side, so no further branch is needed.
  return {M, a.s * fl_exp(a.m - M) + b.s * fl_exp(b.m - M)};
}

// Adds one element a to the state. Same rules as lse_merge(state, (a, 1)), one exp per element.
template <typename Acc>
FL_HD LseState<Acc> lse_push(LseState<Acc> st, Acc a) {
  if (is_nan(a) || is_nan(st.m)) return {is_nan(a) ? a : st.m, Acc(1)};
  if (a == neg_inf<Acc>()) return st;
  if (a == pos_inf<Acc>() || st.m == pos_inf<Acc>()) return {pos_inf<Acc>(), Acc(1)};
  if (a > st.m) return {a, st.s * fl_exp(st.m - a) + Acc(1)};  // st.m = -inf gives 0*0 + 1
  return {st.m, st.s + fl_exp(a - st.m)};
}

// m + log(s); the empty state gives -inf.
template <typename Acc> FL_HD Acc lse_value(LseState<Acc> st) {
  if (st.m == neg_inf<Acc>()) return neg_inf<Acc>();
  if (st.m == pos_inf<Acc>() || is_nan(st.m)) return st.m;
  return st.m + fl_log(st.s);
}

// exp(a - lse): the softmax weight recomputed in backward. Rows whose LSE is -inf (every element
// masked) get weight 0, so their gradient is 0 rather than NaN.
template <typename Acc> FL_HD Acc softmax_weight(Acc a, Acc lse) {
  if (lse == neg_inf<Acc>()) return Acc(0);
  return fl_exp(a - lse);
}

}  // namespace core
}  // namespace flashloss
