// 16-bit storage types: what x, the states, the outputs and their gradients may be held in.
// Compute stays float32 (products accumulate in it, the gate math and the LSTM cell state run in
// it); a value is widened when the core reads it and rounded once when the core writes it.
//
// The bit layouts are TensorFlow's (Eigen::bfloat16, Eigen::half) and CUDA's (__nv_bfloat16,
// __half), so tensors of those types are read in place. Rounding is to nearest, ties to even,
// as TensorFlow's casts round: a rounded output is bit for bit tf.cast of the float32 value.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace tfcells {

struct bfloat16 {
  std::uint16_t bits;
};
struct float16 {  // IEEE 754 binary16
  std::uint16_t bits;
};

namespace storage_bits {

TFCELLS_HD std::uint32_t BitsOf(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

TFCELLS_HD float FloatOf(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// The bfloat16 of the float whose bits are u, in the low 16 bits: round to nearest even on the
// upper 16 bits; a NaN stays a (quiet) NaN. For a uint32, or on the CPU a vector of them (the
// bfloat16 pairs of step_gemm.h, a vector at a time).
template <typename U>
TFCELLS_HD U BFloat16BitsOf(U u) {
  const U rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const U quiet_nan = (u >> 16) | 0x0040u;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded;
}

}  // namespace storage_bits

TFCELLS_HD float ToFloat(bfloat16 v) { return storage_bits::FloatOf(std::uint32_t(v.bits) << 16); }

// binary16 to binary32 is exact. The normal case rebiases the exponent by scaling a float whose
// bits are the half's shifted into place; subnormals come out of a float subtraction. The
// method of Maratyszcza's FP16 library: branch-free, so the compiler vectorises the loops.
TFCELLS_HD float ToFloat(float16 v) {
  using namespace storage_bits;
  const std::uint32_t w = std::uint32_t(v.bits) << 16;
  const std::uint32_t sign = w & 0x80000000u;
  const std::uint32_t two_w = w + w;
  const float normalized = FloatOf((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = FloatOf((two_w >> 17) | (126u << 23)) - 0.5f;
  return FloatOf(sign | (two_w < (1u << 27) ? BitsOf(denormalized) : BitsOf(normalized)));
}

template <typename S>
TFCELLS_HD S FromFloat(float f);

// Round to nearest even on the upper 16 bits; a NaN stays a (quiet) NaN.
template <>
TFCELLS_HD bfloat16 FromFloat<bfloat16>(float f) {
  return {std::uint16_t(storage_bits::BFloat16BitsOf(storage_bits::BitsOf(f)))};
}

// Round to nearest even into binary16: adding a power of two that puts the half's last mantissa
// bit at the float's last lets the float addition do the rounding (overflow goes to infinity,
// small values to subnormals or zero); a NaN stays a (quiet) NaN.
template <>
TFCELLS_HD float16 FromFloat<float16>(float f) {
  using namespace storage_bits;
  const float abs_f = FloatOf(BitsOf(f) & 0x7FFFFFFFu);
  float base = (abs_f * 0x1.0p+112f) * 0x1.0p-110f;
  const std::uint32_t w = BitsOf(f);
  const std::uint32_t shl1_w = w + w;
  const std::uint32_t sign = w & 0x80000000u;
  std::uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = FloatOf((bias >> 1) + 0x07800000u) + base;
  const std::uint32_t bits = BitsOf(base);
  const std::uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const std::uint32_t mantissa_bits = bits & 0x00000FFFu;
  const std::uint32_t nonsign = exp_bits + mantissa_bits;
  return {std::uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

}  // namespace tfcells
