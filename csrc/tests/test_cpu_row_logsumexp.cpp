// ctest: the CPU row log-sum-exp kernels through their raw-pointer interface (no torch),
// against a long-double evaluation; rows that cross several column chunks, masked rows, and
// rows with a leading dimension larger than V.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/row_logsumexp.h"

using flashloss::core::DType;

int main() {
  int failures = 0;
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal(0.0, 4.0);
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {5, 4096}, {2, 4097}, {4, 10000}, {129, 33}};
  for (auto& shape : shapes) {
    const int64_t N = shape[0], V = shape[1], ld = V + 3;
    std::vector<double> x(N * ld, NAN);  // padding beyond V must never be read
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < V; ++j) x[i * ld + j] = normal(rng);
    for (int64_t j = 0; j < V; ++j) x[j] = -INFINITY;  // row 0 fully masked
    std::vector<double> lse(N, NAN), g(N), dx(N * V, NAN);
    for (auto& v : g) v = normal(rng);
    flashloss::cpu::row_logsumexp_forward(DType::f64, x.data(), N, V, ld, lse.data());
    flashloss::cpu::row_logsumexp_backward(DType::f64, x.data(), N, V, ld, lse.data(), g.data(), dx.data());
    for (int64_t i = 0; i < N; ++i) {
      long double m = -INFINITY, s = 0;
      for (int64_t j = 0; j < V; ++j) m = x[i * ld + j] > m ? x[i * ld + j] : m;
      if (m != -INFINITY)
        for (int64_t j = 0; j < V; ++j) s += std::exp(static_cast<long double>(x[i * ld + j]) - m);
      const long double want = m == -INFINITY ? m : m + std::log(s);
      const bool ok = std::isinf(static_cast<double>(want)) ? lse[i] == want
                                                            : std::fabs(lse[i] - want) < 1e-12 * (1 + std::fabs(want));
      if (!ok) { ++failures; std::printf("FAIL lse N=%ld V=%ld row %ld: %.17g vs %.17Lg\n", long(N), long(V), long(i), lse[i], want); }
      for (int64_t j = 0; j < V; ++j) {
        const long double p = m == -INFINITY ? 0 : std::exp(static_cast<long double>(x[i * ld + j]) - want);
        const double d = dx[i * V + j];
        if (!(std::fabs(d - g[i] * p) <= 1e-12)) { ++failures; std::printf("FAIL dx N=%ld V=%ld (%ld,%ld)\n", long(N), long(V), long(i), long(j)); break; }
      }
    }
  }
  if (failures) { std::printf("%d failures\n", failures); return 1; }
  std::printf("cpu_row_logsumexp: all checks passed\n");
  return 0;
}
