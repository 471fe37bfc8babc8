// Lane abstraction for CPU epilogues: the same loop body instantiated for one lane (loop tails,
// and the fp64 path) and for 8 fp32 lanes (csrc/cpu/simd.h), so tails and bodies compute
// identical values.
// Masks are int32 lanes holding 0 or -1.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace flashloss {
namespace cpu {

// One lane of T (float: loop tails; double: the fp64 path used by gradcheck, libm exp).
template <typename T>
struct Lane1 {
  using F = T;
  using I = int32_t;
  static constexpr int W = 1;
  static F load(const T* p) { return *p; }
  static I loadi(const int32_t* p) { return *p; }
  static void store(T* p, F v) { *p = v; }
  static F splat(T v) { return v; }
  static I splati(int32_t v) { return v; }
  static I iota(int32_t j) { return j; }
  static I eq(I a, I b) { return -static_cast<int32_t>(a == b); }
  static I lt(I a, I b) { return -static_cast<int32_t>(a < b); }
  static I gtf(F a, F b) { return -static_cast<int32_t>(a > b); }
  static F sel(I m, F a, F b) { return m ? a : b; }
  static F exp(F v) {
    if constexpr (sizeof(T) == 4) return core::fast_exp(v);
    else return std::exp(v);
  }
  static T hsum(F v) { return v; }
  static T hmax(F v) { return v; }
  static int32_t hcount(I m) { return m ? 1 : 0; }
};

struct Lane8 {
  using F = vf8;
  using I = vi8;
  static constexpr int W = kLanes;
  static F load(const float* p) { return load8(p); }
  static I loadi(const int32_t* p) {
    I v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(float* p, F v) { store8(p, v); }
  static F splat(float v) { return cpu::splat(v); }
  static I splati(int32_t v) { return vi8{} + v; }
  static I iota(int32_t j) { return vi8{0, 1, 2, 3, 4, 5, 6, 7} + j; }
  static I eq(I a, I b) { return a == b; }
  static I lt(I a, I b) { return a < b; }
  static I gtf(F a, F b) { return a > b; }
  static F sel(I m, F a, F b) { return m ? a : b; }
  static F exp(F v) { return fast_exp(v); }
  static float hsum(F v) { return cpu::hsum(v); }
  static float hmax(F v) { return cpu::hmax(v); }
  static int32_t hcount(I m) {
    int32_t c = 0;
    for (int k = 0; k < kLanes; ++k) c += m[k] != 0;
    return c;
  }
};

}  // namespace cpu
}  // namespace flashloss
