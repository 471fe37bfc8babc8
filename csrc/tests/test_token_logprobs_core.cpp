// ctest: the per-element math of primitive B (csrc/core/token_logprobs.h) and core::fast_tanh
// (csrc/core/fast_math.h): tanh accuracy and vector/scalar agreement, the vocabulary state
// (push and merge at every split point against long-double sums, empty sides, -inf logits, NaN),
// the logit map and its derivative, and the backward's per-element expression.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "core/token_logprobs.h"
#include "cpu/simd.h"

using namespace flashloss::core;

#include "check.h"

static void test_fast_tanh() {
  double max_ulp = 0;
  float worst = 0;
  // every 97th float in [-20, 20] (the function is odd; both signs are swept)
  for (float x = -20.f; x < 20.f;) {
    const double want = std::tanh(static_cast<double>(x));
    const float got = fast_tanh(x);
    const float wf = static_cast<float>(want);
    const double ulp = std::fabs(got - want) / (std::nextafter(std::fabs(wf), INFINITY) - std::fabs(wf));
    if (ulp > max_ulp) { max_ulp = ulp; worst = x; }
    uint32_t bits = float_to_bits(x);
    bits = x < 0 ? bits - 97 : bits + 97;
    if (x < 0 && bits <= 0x80000000u) bits = 0;
    x = bits_to_float(bits);
  }
  std::printf("fast_tanh: max error %.3f ulp (at %.9g)\n", max_ulp, worst);
  CHECK(max_ulp <= 2.5, "max error %.3f ulp at %.9g", max_ulp, worst);
  CHECK(fast_tanh(0.f) == 0.f && fast_tanh(100.f) == 1.f && fast_tanh(-100.f) == -1.f, "special values");
  CHECK(fast_tanh(INFINITY) == 1.f && fast_tanh(-INFINITY) == -1.f, "tanh(+-inf)");
  CHECK(std::isnan(fast_tanh(NAN)), "tanh(NaN)");
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> dist(-12.f, 12.f);
  for (int trial = 0; trial < 20000; ++trial) {
    flashloss::cpu::vf8 v;
    for (int k = 0; k < 8; ++k) v[k] = dist(rng) * (trial % 2 ? 0.05f : 1.f);
    const flashloss::cpu::vf8 t = fast_tanh_lanes(v);
    for (int k = 0; k < 8; ++k)
      CHECK(float_to_bits(t[k]) == float_to_bits(fast_tanh(v[k])), "lane %d differs at x=%g", k, v[k]);
  }
}

struct Direct {
  long double lse, entropy, log_sum_p2;
};

static Direct direct(const std::vector<double>& z) {
  long double m = -INFINITY;
  for (double v : z) m = v > m ? v : m;
  long double s = 0, sz = 0, s2 = 0;
  for (double v : z) {
    if (v == -INFINITY) continue;  // weight 0 (and 0 * -inf is not 0)
    const long double e = std::exp(static_cast<long double>(v) - m);
    s += e;
    sz += e * v;
    s2 += e * e;
  }
  const long double lse = m + std::log(s);
  return {lse, lse - sz / s, std::log(s2) - 2 * std::log(s)};
}

template <typename Acc>
static void check_state(const VocabState<Acc>& st, const Direct& want, double tol, const char* what, size_t cut) {
  const double lse = vocab_lse(st), ent = vocab_entropy(st), p2 = vocab_log_sum_p2(st);
  CHECK(std::fabs(lse - want.lse) <= tol * (1 + std::fabs(want.lse)), "%s cut %zu: lse %.17g want %.17Lg", what, cut,
        lse, want.lse);
  CHECK(std::fabs(ent - want.entropy) <= tol * (1 + std::fabs(want.entropy)), "%s cut %zu: entropy %.17g want %.17Lg",
        what, cut, ent, want.entropy);
  CHECK(std::fabs(p2 - want.log_sum_p2) <= tol * (1 + std::fabs(want.log_sum_p2)),
        "%s cut %zu: log_sum_p2 %.17g want %.17Lg", what, cut, p2, want.log_sum_p2);
}

template <typename Acc>
static void test_vocab_state(double tol) {
  std::mt19937_64 rng(5);
  std::normal_distribution<double> normal(0.0, 3.0);
  for (int len : {1, 2, 7, 64, 300}) {
    for (int variant = 0; variant < 3; ++variant) {
      std::vector<double> z(len);
      for (auto& v : z) v = normal(rng) + (variant == 1 ? 40.0 : 0.0);  // large offset: shifted sums matter
      if (variant == 2 && len > 2) z[1] = -INFINITY;                     // a masked logit
      const Direct want = direct(z);
      for (size_t cut = 0; cut <= z.size(); ++cut) {
        VocabState<Acc> a = vocab_empty<Acc>(), b = vocab_empty<Acc>();
        for (size_t k = 0; k < cut; ++k) a = vocab_push(a, Acc(z[k]));
        for (size_t k = cut; k < z.size(); ++k) b = vocab_push(b, Acc(z[k]));
        check_state(vocab_merge(a, b), want, tol, "merge", cut);
        check_state(vocab_merge(b, a), want, tol, "merge reversed", cut);
      }
    }
  }
  // empty + empty stays empty (no -inf - -inf); a single element has entropy 0 and sum p^2 = 1
  const VocabState<Acc> e = vocab_merge(vocab_empty<Acc>(), vocab_empty<Acc>());
  CHECK(e.m == -INFINITY && e.s == 0 && e.sz == 0 && e.s2 == 0, "empty merge");
  const VocabState<Acc> one = vocab_merge(vocab_empty<Acc>(), vocab_push(vocab_empty<Acc>(), Acc(3)));
  CHECK(vocab_lse(one) == Acc(3) && vocab_entropy(one) == Acc(0) && vocab_log_sum_p2(one) == Acc(0), "one element");
  CHECK(vocab_push(vocab_empty<Acc>(), Acc(-INFINITY)).s == 0, "-inf leaves the state empty");
  CHECK(std::isnan(vocab_lse(vocab_push(vocab_push(vocab_empty<Acc>(), Acc(1)), Acc(NAN)))), "NaN propagates (push)");
  CHECK(std::isnan(vocab_lse(vocab_merge(vocab_push(vocab_empty<Acc>(), Acc(1)), VocabState<Acc>{Acc(NAN), 1, 0, 1}))),
        "NaN propagates (merge)");
}

template <typename Acc>
static void test_logit_map(double tol) {
  const double cases[][3] = {{1.0, 1.0, 0.0}, {1 / 0.7, 1.6, 0.0}, {1 / 1.3, 2.0, 3.0}, {1.0, 1.0, 30.0}};
  for (auto& c : cases) {
    const LogitMap<Acc> map = make_logit_map<Acc>(c[0], c[1], c[2]);
    for (double x = -7.0; x <= 7.0; x += 0.37) {
      const double want = c[2] > 0 ? c[2] * c[0] * std::tanh(c[1] * x / c[2]) : c[0] * c[1] * x;
      const double dwant = c[2] > 0 ? c[0] * c[1] * (1 - std::pow(std::tanh(c[1] * x / c[2]), 2)) : c[0] * c[1];
      const Acc z = c[2] > 0 ? logit<true>(Acc(x), map) : logit<false>(Acc(x), map);
      const Acc dz = c[2] > 0 ? logit_grad<true>(z, map) : logit_grad<false>(z, map);
      CHECK(std::fabs(z - want) <= tol * (1 + std::fabs(want)), "z(%g) = %.17g want %.17g", x, double(z), want);
      CHECK(std::fabs(dz - dwant) <= 4 * tol * (1 + std::fabs(dwant)), "dz/dx(%g) = %.17g want %.17g", x, double(dz),
            dwant);
    }
  }
}

template <typename Acc>
static void test_dlogit(double tol) {
  // dz_v = g(1[v=y] - p) + l p - h p (z - E z) + s against the direct formula
  const double lse = 2.5, entropy = 1.7, g = 0.3, l = -1.1, h = 0.45, s = 0.2;
  const RowGrad<Acc> rg = row_grad<Acc>(Acc(lse), Acc(entropy), Acc(g), Acc(l), Acc(h), Acc(s));
  for (double z = -6.0; z <= 3.0; z += 0.25) {
    const double p = std::exp(z - lse);
    const double want = -g * p + l * p - h * p * (z - (lse - entropy)) + s;
    const double got = dlogit(Acc(z), rg);
    CHECK(std::fabs(got - want) <= tol * (1 + std::fabs(want)), "dlogit(%g) = %.17g want %.17g", z, got, want);
  }
}

int main() {
  test_fast_tanh();
  test_vocab_state<double>(1e-12);
  test_vocab_state<float>(2e-6);
  test_logit_map<double>(1e-14);
  test_logit_map<float>(1e-6);
  test_dlogit<double>(1e-14);
  test_dlogit<float>(1e-6);
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("token_logprobs core: all checks passed\n");
  return 0;
}
