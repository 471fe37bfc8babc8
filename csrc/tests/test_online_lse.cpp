// ctest: the online log-sum-exp core (csrc/core/online_lse.h) and the storage conversions
// (csrc/core/common.h), checked against direct long-double evaluation.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "../core/online_lse.h"

using namespace flashloss::core;

#include "check.h"

static long double direct_lse(const std::vector<double>& a) {
  long double m = -INFINITY;
  for (double v : a) m = v > m ? v : m;
  if (m == -INFINITY) return -INFINITY;
  long double s = 0;
  for (double v : a) s += std::exp(static_cast<long double>(v) - m);
  return m + std::log(s);
}

template <typename Acc>
static Acc fold_push(const std::vector<double>& a) {
  LseState<Acc> st = lse_empty<Acc>();
  for (double v : a) st = lse_push(st, Acc(v));
  return lse_value(st);
}

// Split at every cut point and merge the halves: the merge must agree with a single fold.
template <typename Acc>
static void check_merge_splits(const std::vector<double>& a, double tol) {
  const long double want = direct_lse(a);
  for (size_t cut = 0; cut <= a.size(); ++cut) {
    LseState<Acc> left = lse_empty<Acc>(), right = lse_empty<Acc>();
    for (size_t i = 0; i < cut; ++i) left = lse_push(left, Acc(a[i]));
    for (size_t i = cut; i < a.size(); ++i) right = lse_push(right, Acc(a[i]));
    const Acc got = lse_value(lse_merge(left, right));
    const Acc got_rev = lse_value(lse_merge(right, left));
    if (std::isinf(static_cast<double>(want))) {
      CHECK(got == static_cast<Acc>(want), "cut %zu: got %g want %Lg", cut, double(got), want);
    } else {
      CHECK(std::fabs(got - want) <= tol * (1 + std::fabs(want)), "cut %zu: got %.17g want %.17Lg",
            cut, double(got), want);
      CHECK(got == got_rev, "merge not symmetric at cut %zu", cut);
    }
  }
}

static void test_random_rows() {
  std::mt19937_64 rng(1234);
  std::normal_distribution<double> normal(0.0, 30.0);  // wide range: exercises rescaling
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<double> a(1 + trial % 37);
    for (double& v : a) v = normal(rng);
    if (trial % 5 == 0) a[trial % a.size()] = -INFINITY;  // masked entries inside a row
    check_merge_splits<double>(a, 1e-14);
    check_merge_splits<float>(a, 2e-6);
    const long double want = direct_lse(a);
    const double got = fold_push<double>(a);
    if (std::isinf(static_cast<double>(want)))
      CHECK(got == static_cast<double>(want), "push fold of a masked row: %g", got);
    else
      CHECK(std::fabs(got - want) <= 1e-14 * (1 + std::fabs(want)), "push fold");
  }
}

static void test_empty_and_masked() {
  // Empty set: -inf, state (-inf, 0); merging empties never produces NaN.
  LseState<float> e = lse_empty<float>();
  CHECK(lse_value(e) == -INFINITY, "empty value");
  LseState<float> ee = lse_merge(e, e);
  CHECK(ee.m == -INFINITY && ee.s == 0.f, "empty merge (%g, %g)", ee.m, ee.s);
  // A row of only -inf is the empty set.
  std::vector<double> all_masked(9, -INFINITY);
  CHECK(fold_push<float>(all_masked) == -INFINITY, "all -inf row");
  check_merge_splits<float>(all_masked, 0);
  // Empty merged with a single element gives that element exactly.
  LseState<float> one = lse_push(lse_empty<float>(), 3.5f);
  CHECK(lse_value(lse_merge(e, one)) == 3.5f, "empty (+) x");
  CHECK(lse_value(lse_merge(one, e)) == 3.5f, "x (+) empty");
  // softmax weight of a fully masked row is 0, not NaN.
  CHECK(softmax_weight<float>(-INFINITY, -INFINITY) == 0.f, "masked softmax weight");
}

static void test_extremes() {
  // Large magnitudes that overflow a naive exp: fp32 exp overflows at ~88.7.
  std::vector<double> big = {1000.0, 1000.0, -1000.0};
  CHECK(std::fabs(fold_push<float>(big) - (1000.0 + std::log(2.0))) < 1e-3, "big");
  // +inf dominates, with no inf - inf NaN.
  std::vector<double> with_inf = {1.0, INFINITY, 2.0};
  CHECK(fold_push<float>(with_inf) == INFINITY, "+inf element");
  LseState<float> inf_state = lse_push(lse_empty<float>(), INFINITY);
  CHECK(lse_value(lse_merge(inf_state, inf_state)) == INFINITY, "+inf (+) +inf");
  // NaN propagates through push and merge (a plain fmax would drop it).
  std::vector<double> with_nan = {1.0, NAN, 2.0};
  CHECK(std::isnan(fold_push<float>(with_nan)), "NaN push");
  LseState<float> nan_state = lse_push(lse_empty<float>(), NAN);
  CHECK(std::isnan(lse_value(lse_merge(lse_push(lse_empty<float>(), 5.f), nan_state))), "NaN merge right");
  CHECK(std::isnan(lse_value(lse_merge(nan_state, lse_push(lse_empty<float>(), 5.f)))), "NaN merge left");
}

static void test_conversions() {
  // bf16 and f16 round trips on exactly representable values, rounding ties to even.
  const float exact[] = {0.f, -0.f, 1.f, -2.5f, 65504.f, 6.103515625e-05f /* min normal half */,
                         5.960464477539063e-08f /* min subnormal half */, INFINITY, -INFINITY};
  for (float v : exact) {
    CHECK(to_float(from_float_f16(v)) == v, "f16 round trip %g", v);
  }
  CHECK(std::isnan(to_float(from_float_f16(NAN))), "f16 NaN");
  CHECK(to_float(from_float_f16(70000.f)) == INFINITY, "f16 overflow");
  CHECK(to_float(from_float_f16(1.f + 1.f / 2048)) == 1.f, "f16 tie to even (down)");
  CHECK(to_float(from_float_f16(1.f + 3.f / 2048)) == 1.f + 4.f / 2048, "f16 tie to even (up)");
  CHECK(to_float(from_float_bf16(1.f + 1.f / 256)) == 1.f, "bf16 tie to even (down)");
  CHECK(to_float(from_float_bf16(1.f + 3.f / 256)) == 1.f + 4.f / 256, "bf16 tie to even (up)");
  CHECK(std::isnan(to_float(from_float_bf16(NAN))), "bf16 NaN");
  // Every half bit pattern decodes to the value the float conversion re-encodes to the same bits.
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const f16_t h{static_cast<uint16_t>(b)};
    const float f = to_float(h);
    if (std::isnan(f)) continue;
    CHECK(from_float_f16(f).bits == h.bits, "f16 pattern 0x%04x", b);
  }
}

int main() {
  test_random_rows();
  test_empty_and_masked();
  test_extremes();
  test_conversions();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("online_lse: all checks passed\n");
  return 0;
}
