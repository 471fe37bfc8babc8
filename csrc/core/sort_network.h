// Relaxed conditional swaps of primitive C (OBJECTIVES.md §4.1), shared by the CPU and CUDA kernels.
// A comparator reads a (lower wire) and b, d = b - a, and mixes them with alpha = relax(s * d), the
// probability that a is the smaller. Written exactly like the torch backend's relax_alpha /
// relax_dalpha (python/flashloss/ops/sort_network.py), which the tests hold to the float64
// reference. Header-only, no torch.
#pragma once
#include <cmath>

#include "common.h"

namespace flashloss {
namespace core {

enum class Relax : int { logistic = 0, logistic_phi = 1, gaussian = 2, reciprocal = 3, cauchy = 4, optimal = 5 };

template <typename T>
struct RelaxParams {
  Relax kind;
  T steepness;
  T art_lambda;
};

template <typename T>
FL_HD T sigmoid_(T u) {
  return T(1) / (T(1) + exp(-u));
}

// alpha for d = b - a, the relaxation fixed at compile time (kernels dispatch once per call).
template <Relax K, typename T>
FL_HD T relax_alpha_k(T d, T s, T lam) {
  if constexpr (K == Relax::logistic) {
    return sigmoid_(d * s);
  } else if constexpr (K == Relax::logistic_phi) {
    return sigmoid_(d * s / pow(fabs(d) + T(1e-10), lam));
  } else if constexpr (K == Relax::gaussian) {
    return T(0.5) + T(0.5) * erf(s * d * T(0.70710678118654752440));
  } else if constexpr (K == Relax::reciprocal) {
    const T v = s * d;
    return T(0.5) * (v / (T(2) + fabs(v)) + T(1));
  } else if constexpr (K == Relax::cauchy) {
    return atan(s * d) * T(0.31830988618379067154) + T(0.5);
  } else {
    const T v = s * d;
    const T c = v < T(-0.25) ? T(-0.25) : (v > T(0.25) ? T(0.25) : v);
    const T step = T(v > T(0.25)) - T(v < T(-0.25));
    return c + T(0.5) + step * (T(0.25) - T(1) / (T(16) * (fabs(v) + T(1e-10))));
  }
}

// d alpha / d d (steepness included), given alpha = relax_alpha_k(d): the derivative autograd takes
// of the torch formulas (clamp passes the gradient at its bounds; |.| has gradient 0 at 0).
template <Relax K, typename T>
FL_HD T relax_dalpha_k(T d, T alpha, T s, T lam) {
  if constexpr (K == Relax::logistic) {
    return s * alpha * (T(1) - alpha);
  } else if constexpr (K == Relax::logistic_phi) {
    const T r = fabs(d) + T(1e-10);
    return alpha * (T(1) - alpha) * s * pow(r, -lam - T(1)) * (r - lam * fabs(d));
  } else if constexpr (K == Relax::gaussian) {
    const T v = s * d;
    return s * exp(T(-0.5) * v * v) * T(0.39894228040143267794);
  } else if constexpr (K == Relax::reciprocal) {
    const T q = T(2) + fabs(s * d);
    return s / (q * q);
  } else if constexpr (K == Relax::cauchy) {
    const T v = s * d;
    return s * T(0.31830988618379067154) / (T(1) + v * v);
  } else {
    const T av = fabs(s * d);
    const T q = av + T(1e-10);
    return av <= T(0.25) ? s : s / (T(16) * q * q);
  }
}

// Runtime-kind versions (tests, scalar tails).
template <typename T>
FL_HD T relax_alpha(T d, const RelaxParams<T>& p) {
  switch (p.kind) {
    case Relax::logistic: return relax_alpha_k<Relax::logistic>(d, p.steepness, p.art_lambda);
    case Relax::logistic_phi: return relax_alpha_k<Relax::logistic_phi>(d, p.steepness, p.art_lambda);
    case Relax::gaussian: return relax_alpha_k<Relax::gaussian>(d, p.steepness, p.art_lambda);
    case Relax::reciprocal: return relax_alpha_k<Relax::reciprocal>(d, p.steepness, p.art_lambda);
    case Relax::cauchy: return relax_alpha_k<Relax::cauchy>(d, p.steepness, p.art_lambda);
    default: return relax_alpha_k<Relax::optimal>(d, p.steepness, p.art_lambda);
  }
}

template <typename T>
FL_HD T relax_dalpha(T d, T alpha, const RelaxParams<T>& p) {
  switch (p.kind) {
    case Relax::logistic: return relax_dalpha_k<Relax::logistic>(d, alpha, p.steepness, p.art_lambda);
    case Relax::logistic_phi: return relax_dalpha_k<Relax::logistic_phi>(d, alpha, p.steepness, p.art_lambda);
    case Relax::gaussian: return relax_dalpha_k<Relax::gaussian>(d, alpha, p.steepness, p.art_lambda);
    case Relax::reciprocal: return relax_dalpha_k<Relax::reciprocal>(d, alpha, p.steepness, p.art_lambda);
    case Relax::cauchy: return relax_dalpha_k<Relax::cauchy>(d, alpha, p.steepness, p.art_lambda);
    default: return relax_dalpha_k<Relax::optimal>(d, alpha, p.steepness, p.art_lambda);
  }
}

}  // namespace core
}  // namespace flashloss
