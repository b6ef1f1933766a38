// 2^x in one MUFU.EX2 instruction (ex2.approx.ftz.f32), for the softmaxes (attention_mma.cu,
// cross_entropy.cu). exp2f without -use_fast_math adds a test and two multiplies for subnormal results,
// and expf a range reduction besides: in those kernels the exponentials are most of the instructions.
// A result under 2^-126 flushes to +0; the softmaxes' terms that small sit beside a largest term of 1
// (or a row sum of at least 1/T), so no f32 sum or product they enter changes. 2^0 is 1 exactly and
// 2^-inf is +0.
//
// Under the CPU emulation (tests/cuda_emu) the correctly rounded std::exp2 stands in for the hardware's
// few-ulp approximation, flushed the same way.
#pragma once

#if defined(KRAKEN_CUDA_EMULATION)
#include <cmath>
#endif

namespace kraken::kernels::cuda_detail {

#if defined(KRAKEN_CUDA_EMULATION)
inline float exp2_ftz(float x) {
  const float r = std::exp2(x);
  return std::fpclassify(r) == FP_SUBNORMAL ? 0.0f : r;
}
#else
__device__ __forceinline__ float exp2_ftz(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}
#endif

}  // namespace kraken::kernels::cuda_detail
