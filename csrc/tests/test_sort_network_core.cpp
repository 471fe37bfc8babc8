// ctest: the relaxations of primitive C (csrc/core/sort_network.h): alpha in [0, 1], alpha(0) = 1/2,
// monotone, the derivative against central differences in double, and the runtime switch equal to
// the compile-time kinds.
#include <cmath>
#include <cstdio>

#include "check.h"
#include "core/sort_network.h"

using namespace flashloss::core;

int main() {
  for (int k = 0; k < 6; ++k) {
    const RelaxParams<double> p{Relax(k), 3.0, 0.25};
    CHECK(std::fabs(relax_alpha(0.0, p) - 0.5) < 1e-15, "relax %d", k);
    double prev = -1;
    for (double d = -5; d <= 5; d += 0.01) {
      const double a = relax_alpha(d, p);
      CHECK(a >= 0 && a <= 1 && a >= prev - 1e-15, "relax %d at d=%g", k, d);
      prev = a;
      if (std::fabs(std::fabs(3 * d) - 0.25) < 1e-3 || std::fabs(d) < 1e-3) continue;  // kinks
      const double h = 1e-6;
      const double fd = (relax_alpha(d + h, p) - relax_alpha(d - h, p)) / (2 * h);
      const double an = relax_dalpha(d, a, p);
      if (std::fabs(fd - an) > 1e-6 * (1 + std::fabs(fd))) {
        std::printf("FAIL relax %d at d=%g: dalpha %.12g vs finite difference %.12g\n", k, d, an, fd);
        ++failures;
      }
    }
    // hard limit: a large steepness gives 0/1
    const RelaxParams<double> steep{Relax(k), 1e7, 0.25};
    CHECK(relax_alpha(1.0, steep) > 0.999 && relax_alpha(-1.0, steep) < 0.001, "relax %d", k);
  }
  if (failures) return 1;
  std::printf("sort_network_core: all checks passed\n");
  return 0;
}
