// Shared definitions for every native backend: the host/device qualifier, the element types the
// kernels accept through raw pointers, and exact conversions to the accumulation type.
// Header-only and free of torch: compiled by g++ (CPU kernels, ctest) and by nvcc (CUDA kernels).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FL_HD __host__ __device__ __forceinline__
#else
#define FL_HD inline
#endif

namespace flashloss {
namespace core {

// Element type codes passed from csrc/ops.cpp to the kernels (raw pointers carry no type).
enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

// Storage-only 16-bit types: the kernels never compute in them, they load and store through
// to_acc / from_acc. Layout-compatible with at::BFloat16 / at::Half / __nv_bfloat16 / __half.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

FL_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);  // (a memcpy here blocks loop vectorisation in gcc)
#endif
}

FL_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

FL_HD float to_float(bf16_t v) { return bits_to_float(uint32_t(v.bits) << 16); }

// IEEE binary16 -> binary32, exact for normals, subnormals, infinities and NaN.
FL_HD float to_float(f16_t v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu;
  uint32_t mant = v.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);  // signed zero
  // subnormal half: value = mant * 2^-24; normalise into a float
  int e = -1;
  do { mant <<= 1; ++e; } while ((mant & 0x400u) == 0);
  return bits_to_float(sign | uint32_t(112 - e) << 23 | ((mant & 0x3ffu) << 13));
}

// float -> bf16 with round-to-nearest-even; NaN stays a (quiet) NaN.
FL_HD bf16_t from_float_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}

// float -> binary16 with round-to-nearest-even, overflow to inf, subnormals, NaN preserved.
FL_HD f16_t from_float_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_t{uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                           // below 2^-14: subnormal or 0
    if (a < 0x33000000u) return f16_t{sign};                       // below half the smallest subnormal
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return f16_t{uint16_t(sign | h)};
  }
  uint32_t h = ((a - 0x38000000u) >> 13);
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return f16_t{uint16_t(sign | h)};
}

// Loads into the accumulation type; stores back with correct rounding.
template <typename Acc> FL_HD Acc to_acc(float v) { return Acc(v); }
template <typename Acc> FL_HD Acc to_acc(double v) { return Acc(v); }
template <typename Acc> FL_HD Acc to_acc(bf16_t v) { return Acc(to_float(v)); }
template <typename Acc> FL_HD Acc to_acc(f16_t v) { return Acc(to_float(v)); }

template <typename T> struct Store;
template <> struct Store<float> { template <typename A> FL_HD static float from(A v) { return float(v); } };
template <> struct Store<double> { template <typename A> FL_HD static double from(A v) { return double(v); } };
template <> struct Store<bf16_t> { template <typename A> FL_HD static bf16_t from(A v) { return from_float_bf16(float(v)); } };
template <> struct Store<f16_t> { template <typename A> FL_HD static f16_t from(A v) { return from_float_f16(float(v)); } };

// Accumulation type: double inputs accumulate in double (gradcheck), everything else in fp32.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

}  // namespace core
}  // namespace flashloss
