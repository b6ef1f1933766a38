// Shared by the bf16 attention tests that call the kernels on device buffers directly
// (attention_tc_cuda_test.cpp: the mma, WMMA and SIMT kernels; attention_cudnn_cuda_test.cpp: cuDNN's):
// one case's inputs as bf16 bits, the CPU f32 kernel's results on exactly those values (the
// reference), and device buffers placed a chosen number of elements off alignment.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace kraken::testing {

// The tolerances of the bf16 tensor-core attentions against the rounded CPU reference, relative to the
// reference's largest magnitude (attention_tc_cuda_test.cpp derives them: P and dS rounded to bf16
// before their products): out, dqkv (both also within one bf16 ulp of each element), lse.
constexpr double kTensorCoreRelOut = 5e-3, kTensorCoreRelGrad = 1.2e-2, kTensorCoreRelLse = 1e-5;

struct AttentionShape {
  int64_t B, T, C, NH;
  std::string str() const;  // "B=… T=… D=… NH=…"
};

// The bits of a bf16 tensor on the CPU, and bf16 bits widened to f32 (exact).
std::vector<uint16_t> bits_of(const runtime::Tensor& bf16_cpu);
std::vector<float> widen_bits(const std::vector<uint16_t>& bits);

// One case: qkv, dout and the starting dqkv0 as bf16 bits (N(0, 1) values rounded to bf16; dqkv0 N(0,
// 0.5²) where the kernels under test add into dqkv, zeros where they overwrite it), and the CPU f32
// kernel on exactly those values: out (rounded once, as values and as bits), lse, and dqkv0 + the
// gradient computed from the rounded out and that lse, rounded once.
struct AttentionCase {
  AttentionShape s;
  std::vector<uint16_t> qkv, dout, dqkv0, out_rounded_bits;
  std::vector<float> out_rounded, lse, dqkv;
};
enum class GradientStart { kZeros, kRandom };
AttentionCase attention_case(const AttentionShape& s, uint64_t seed, GradientStart dqkv0);

#if KRAKEN_WITH_CUDA
// A device buffer (on cuda:0) of bf16 values starting `offset` elements into its allocation (offset 1:
// only 2-byte aligned, which sends the kernels to their scalar paths, or cuDNN's dispatch to others).
struct DeviceBf16 {
  runtime::Tensor storage;
  int64_t offset = 0, n = 0;
  DeviceBf16(const std::vector<uint16_t>& values, int64_t offset);
  uint16_t* ptr() const { return storage.data<uint16_t>() + offset; }
  std::vector<uint16_t> bits() const;
  std::vector<float> values() const { return widen_bits(bits()); }
};
#endif

}  // namespace kraken::testing
