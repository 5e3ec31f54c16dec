// The activation functions of every cell, for host and device code alike.
//
// float uses branch-free approximations that vectorise: tanh is the clamped 13/6 rational
// approximation TensorFlow's CPU kernels use (Eigen's fast tanh), exp the Cephes polynomial.
// Both are within a few ulp of the exact result and propagate NaN. double uses libm.
#pragma once

#include <cmath>

#include "common.h"

namespace tfcells {
TFCELLS_ISA_BEGIN

TFCELLS_HD float BitsToFloat(int bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  return __builtin_bit_cast(float, bits);  // unlike memcpy, lets loops vectorise
#endif
}

// Clamp that keeps NaN (std::min/max would replace it with a bound).
TFCELLS_HD float ClampKeepNan(float x, float lo, float hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

TFCELLS_HD float Exp(float x) {
  x = ClampKeepNan(x, -87.3365447505f, 88.3762626647949f);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick: floorf would not vectorise (it may trap).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  p = p * x * x + x + 1.0f;
  return p * BitsToFloat((static_cast<int>(n) + 127) << 23);
}

TFCELLS_HD float Tanh(float x) {
  const float tiny = 0.0004f;
  const bool is_tiny = (x < tiny) && (x > -tiny);
  x = ClampKeepNan(x, -7.90531110763549805f, 7.90531110763549805f);
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return is_tiny ? x : p / q;
}

TFCELLS_HD float Sigmoid(float x) { return 1.0f / (1.0f + Exp(-x)); }

TFCELLS_HD double Tanh(double x) { return tanh(x); }
TFCELLS_HD double Sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

// Derivatives expressed through the activation's output, as the backward passes need them.
template <typename T>
TFCELLS_HD T TanhGradFromOutput(T y) {
  return T(1) - y * y;
}
template <typename T>
TFCELLS_HD T SigmoidGradFromOutput(T y) {
  return y * (T(1) - y);
}

TFCELLS_ISA_END
}  // namespace tfcells
