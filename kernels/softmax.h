// Softmax over the last dimension of rows of length C, and the vectorisable exp the CPU kernels of
// softmax, cross-entropy (and attention) share.
//
// Forward (numerically stable, the maximum subtracted first):
//   y[r, c] = exp(x[r, c] − m_r) / Σ_k exp(x[r, k] − m_r),   m_r = max_k x[r, k]
// Backward, from y = softmax(x):  dx[r, :] += y[r, :] ∘ (dy[r, :] − Σ_k dy[r, k]·y[r, k]).
// Buffers are contiguous (rows, C); the backward accumulates into dx (the caller zeroes it for "=").
// Every row is reduced by one thread in a fixed order, so results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <cstring>

struct CUstream_st;

namespace kraken::kernels {

// ---- CPU ---------------------------------------------------------------------------------------
void softmax_forward_cpu(float* y, const float* x, int64_t rows, int64_t C);
void softmax_backward_cpu(float* dx, const float* y, const float* dy, int64_t rows, int64_t C);

// ---- CUDA (same contracts, fp32) ----------------------------------------------------------------
void softmax_forward_cuda(float* y, const float* x, int64_t rows, int64_t C, CUstream_st* stream);
void softmax_backward_cuda(float* dx, const float* y, const float* dy, int64_t rows, int64_t C,
                           CUstream_st* stream);

// ---- CPU building block: exp in plain float arithmetic, so `#pragma omp simd` loops vectorise ------
// (glibc's vector expf is only offered under -ffast-math). exp(x) = 2^n·e^r with n = round(x/ln 2)
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

}  // namespace kraken::kernels
