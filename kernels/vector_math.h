// Elementary functions in plain float arithmetic, so that `#pragma omp simd` loops calling them
// vectorise (glibc offers its vector expf and tanhf only under -ffast-math; the scalar libm calls
// cost the GELU kernels about 6% of a CPU training step). Shared by the CPU kernels of softmax,
// cross-entropy and GELU.
#pragma once

#include <cstdint>
#include <cstring>

namespace kraken::kernels {

// exp(x) = 2^n·e^r with n = round(x/ln 2)
// and r = x − n·ln 2 ∈ [−ln2/2, ln2/2] (Cody–Waite: ln 2 split in a part exact in float and the rest),
// e^r by its Taylor series to degree 7, whose remainder |r|⁸/8! < 6e-9 is below float rounding; the
// result is within a few ulp of expf. Below −87.3 (where expf turns subnormal) it returns 0; above 88
// it saturates at e^88 (our callers only pass x − max ≤ 0). NaN stays NaN.
inline float exp_vectorisable(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;           // 355/512, exact in float
  constexpr float kLn2Lo = -2.12194440054690583e-4f;  // ln 2 − kLn2Hi
  constexpr float kRoundMagic = 12582912.0f;       // 1.5·2^23: adding it rounds to an integer
  const float xc = x > 88.0f ? 88.0f : (x < -88.0f ? -88.0f : x);
  const float t = xc * kLog2e + kRoundMagic;  // n sits in t's low mantissa bits
  const float n = t - kRoundMagic;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n built in the exponent field from t's bits (unsigned arithmetic: no float-to-int conversion,
  // which NaN would make undefined). n ∈ [−127, 127] after the clamp; n = −127 only occurs where the
  // result is flushed to 0 below.
  uint32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof(t_bits));
  const uint32_t bits = (t_bits - 0x4B400000u + 127u) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.3f ? 0.0f : p * two_n;
}

// tanh(u) = 1 − 2/(e^{2u} + 1), through exp_vectorisable. Its absolute error is about 1e-7 over the
// whole range (±1 exactly in the saturated tails, NaN stays NaN); near 0 the *relative* error grows,
// as 1 − (something close to 1) cancels, which is harmless where tanh is added to 1, as in GELU's
// 0.5·x·(1 + tanh u), and makes this unsuitable where tiny tanh values matter on their own.
inline float tanh_vectorisable(float u) { return 1.0f - 2.0f / (exp_vectorisable(2.0f * u) + 1.0f); }

}  // namespace kraken::kernels
