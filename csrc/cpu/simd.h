// Portable 8-lane fp32 vectors for the CPU kernels (GCC/Clang vector extensions: AVX2 when the
// build enables it, two SSE/NEON registers otherwise) and the vector instantiation of
// core::fast_exp_lanes.
#pragma once
#include <cstdint>
#include <cstring>

#include "../core/common.h"
#include "../core/fast_math.h"

namespace flashloss {
namespace cpu {

typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint16_t vu16x8 __attribute__((vector_size(16)));
constexpr int kLanes = 8;

}  // namespace cpu

namespace core {
template <> struct LaneOps<cpu::vf8> {
  static cpu::vi8 to_int(cpu::vf8 v) { return __builtin_convertvector(v, cpu::vi8); }
  static cpu::vf8 as_float(cpu::vi8 bits) { return (cpu::vf8)bits; }  // same-size vector: bit cast
};
}  // namespace core

namespace cpu {

inline vf8 splat(float v) { return vf8{} + v; }
inline vf8 fast_exp(vf8 x) { return core::fast_exp_lanes<vf8>(x); }

inline float hsum(vf8 v) {
  float s = 0;
  for (int k = 0; k < kLanes; ++k) s += v[k];
  return s;
}

inline float hmax(vf8 v) {
  float m = v[0];
  for (int k = 1; k < kLanes; ++k) m = v[k] > m ? v[k] : m;
  return m;
}

// Loads 8 consecutive elements as fp32 (unaligned).
inline vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vf8 load8(const core::bf16_t* p) {
  vu16x8 h;
  std::memcpy(&h, p, sizeof(h));
  return (vf8)(__builtin_convertvector(h, vi8) << 16);
}
inline vf8 load8(const core::f16_t* p) {
  vf8 v;
  for (int k = 0; k < kLanes; ++k) v[k] = core::to_float(p[k]);
  return v;
}

inline void store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }
inline void store8(core::bf16_t* p, vf8 v) {
  for (int k = 0; k < kLanes; ++k) p[k] = core::from_float_bf16(v[k]);
}
inline void store8(core::f16_t* p, vf8 v) {
  for (int k = 0; k < kLanes; ++k) p[k] = core::from_float_f16(v[k]);
}

}  // namespace cpu
}  // namespace flashloss
