// ctest: core::fast_atan accuracy (<= 3 ulp); core::fast_exp accuracy (dense sweep, <= 1.5 ulp where the result is a normal float (1.0 without FMA contraction, 1.003 with it)),
// its special values, and bitwise agreement of the 8-lane vector instantiation with the scalar one.
#include <cmath>
#include <cstdio>
#include <random>

#include "cpu/simd.h"

using flashloss::core::fast_exp;

int main() {
  int failures = 0;
  double max_ulp = 0;
  float worst = 0;
  long checked = 0;
  // every 61st float in the range where exp is a normal float
  for (float x = -87.33f; x < 88.72f;) {
    const double want = std::exp(static_cast<double>(x));
    const float got = fast_exp(x);
    const float wf = static_cast<float>(want);
    const double ulp = std::fabs(got - want) / (std::nextafter(wf, INFINITY) - wf);
    if (ulp > max_ulp) { max_ulp = ulp; worst = x; }
    ++checked;
    uint32_t bits = flashloss::core::float_to_bits(x);
    bits = x < 0 ? bits - 61 : bits + 61;
    if (x < 0 && bits <= 0x80000000u) bits = 0;  // crossed zero
    x = flashloss::core::bits_to_float(bits);
  }
  if (max_ulp > 1.5) { ++failures; std::printf("FAIL fast_exp max error %.3f ulp at %.9g\n", max_ulp, worst); }
  std::printf("fast_exp: %ld points, max error %.3f ulp\n", checked, max_ulp);

  struct { float x, want; } special[] = {{-INFINITY, 0.f}, {-1000.f, 0.f}, {-88.f, 0.f}, {0.f, 1.f},
                                         {89.f, INFINITY}, {INFINITY, INFINITY}};
  for (auto& c : special)
    if (fast_exp(c.x) != c.want) { ++failures; std::printf("FAIL fast_exp(%g) = %g, want %g\n", c.x, fast_exp(c.x), c.want); }
  if (!std::isnan(fast_exp(NAN))) { ++failures; std::printf("FAIL fast_exp(NaN) is not NaN\n"); }
  if (!(fast_exp(88.72f) > 3.3e38f && std::isfinite(fast_exp(88.72f)))) { ++failures; std::printf("FAIL near overflow\n"); }

  std::mt19937 rng(3);
  std::uniform_real_distribution<float> dist(-100.f, 100.f);
  for (int trial = 0; trial < 100000; ++trial) {
    flashloss::cpu::vf8 v;
    for (int k = 0; k < 8; ++k) v[k] = dist(rng);
    if (trial == 0) { v[0] = -INFINITY; v[1] = INFINITY; v[2] = NAN; }
    const flashloss::cpu::vf8 e = flashloss::cpu::fast_exp(v);
    for (int k = 0; k < 8; ++k) {
      const float s = fast_exp(v[k]);
      const bool same = (std::isnan(s) && std::isnan(e[k])) || flashloss::core::float_to_bits(s) == flashloss::core::float_to_bits(e[k]);
      if (!same) { ++failures; std::printf("FAIL vector lane %d: %g vs scalar %g (x=%g)\n", k, e[k], s, v[k]); break; }
    }
  }
  // fast_atan: dense sweep of [-1e4, 1e4] (log-spaced magnitudes) against double atan
  {
    double worst_ulp = 0, worst_x = 0;
    for (int sign = -1; sign <= 1; sign += 2)
      for (double m = 1e-8; m < 1e4; m *= 1.0001) {
        const float x = float(sign * m);
        const float got = flashloss::core::fast_atan(x);
        const double want = std::atan(double(x));
        const float wf = float(want);
        const double ulp = std::fabs(got - want) / std::fabs(std::nextafter(wf, INFINITY) - wf);
        if (ulp > worst_ulp) { worst_ulp = ulp; worst_x = x; }
      }
    if (worst_ulp > 3.0) { ++failures; std::printf("FAIL fast_atan max error %.3f ulp at %.9g\n", worst_ulp, worst_x); }
    std::printf("fast_atan: max error %.3f ulp\n", worst_ulp);
    if (flashloss::core::fast_atan(INFINITY) != float(M_PI / 2) || flashloss::core::fast_atan(-INFINITY) != -float(M_PI / 2) ||
        !std::isnan(flashloss::core::fast_atan(NAN)) || flashloss::core::fast_atan(0.f) != 0.f) {
      ++failures;
      std::printf("FAIL fast_atan special values\n");
    }
  }
  if (failures) { std::printf("%d failures\n", failures); return 1; }
  std::printf("fast_exp: all checks passed\n");
  return 0;
}
