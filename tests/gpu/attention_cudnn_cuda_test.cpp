// cuDNN's fused attention (attention_{forward,backward}_bf16_cudnn_cuda, kernels/cuda/attention_cudnn.cu)
// called directly on device buffers, against the contract of kernels/attention.h, as
// attention_tc_cuda_test.cpp checks the hand-written tensor-core kernels: the CPU f32 kernel on exactly
// the bf16 values the GPU reads, rounded once. Head sizes 64 (GPT-2) and 168 (the Kraken 4-way preset:
// C = 504, 3 heads), T from 1 to 257 with ragged last tiles (65, 100, 200, 257). Then: agreement with the
// mma.sync kernels (out, lse, dqkv), bit-identical repeated runs (the backward asks cuDNN for its
// deterministic graph), and the dispatch under KRAKEN_CUDA_ATTENTION (tools/gpu-check.sh runs this file
// once more with KRAKEN_CUDA_ATTENTION=cudnn and with =mma, and with KRAKEN_CUDNN_ATTENTION_BACKWARD=atomic,
// cuDNN's f32 atomic dQ, where repeated runs need equal bits only outside dQ).
//
// Tolerances: those of the mma kernels, for the same reason. cuDNN's graph rounds the probabilities P to
// bf16 before P·V (its second product takes bf16 operands) and dS to bf16 before dSᵀ·Q, and keeps scores,
// softmax, Dᵢ and the statistics in f32: the deviations attention_tc_cuda_test.cpp bounds (worst case
// 3.4e-3 of max|out| and 8.4e-3 of max|dqkv| at these shapes), so rel = 5e-3 (out), 1.2e-2 (dqkv), 1e-5
// (lse) against the rounded CPU reference, and the sums of two such tolerances between cuDNN and mma. One
// difference of form: cuDNN normalises P in f32 and rounds afterwards, so out is not exactly a convex
// combination of the rounded weights; the bound |a − b| ≤ u·Σ_s w_s·|v_s| is of the same size. Measured on an
// H200 (2026-11-26): at most 0.34 of the allowed for out, 0.011 for lse, 0.04 for dqkv against mma.
//
// The backward overwrites dqkv (unlike the other implementations, which add): the device buffer starts
// as NaNs and the result must match the CPU gradient computed into zeros, so every element is written.
//
// Skips where there is no GPU, in the dry run (KRAKEN_GPU_TESTS_ON_CPU=1: these call CUDA directly),
// and — per shape, with cuDNN's reason printed, or for the whole test when cuDNN takes none of its
// shapes — where attention_bf16_cudnn_why_not says cuDNN refuses the shape.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/elementwise.h"
#include "runtime/allocator.h"
#include "runtime/tensor.h"
#include "tests/gpu/attention_test_util.h"
#include "tests/gpu/gpu_test_util.h"

namespace kraken::kernels {
namespace {

using runtime::Device;
using runtime::DType;
using runtime::Shape;
using runtime::Tensor;

using Shape4 = testing::AttentionShape;

#if KRAKEN_WITH_CUDA

using Case = testing::AttentionCase;
using testing::DeviceBf16;

constexpr double kOneUlp = testing::kOneBf16Ulp;
constexpr double kRelOut = testing::kTensorCoreRelOut, kRelGrad = testing::kTensorCoreRelGrad,
                 kRelLse = testing::kTensorCoreRelLse;  // as the mma kernels' (above)

Device gpu() { return Device::cuda(0); }
CUstream_st* stream() { return runtime::compute_stream(gpu()); }
std::vector<float> widen(const std::vector<uint16_t>& b) { return testing::widen_bits(b); }

// The inputs of one case and the CPU reference on them (the gradient computed into zeros).
Case make_case(const Shape4& s, uint64_t seed) { return testing::attention_case(s, seed, testing::GradientStart::kZeros); }

enum class Path { kCudnn, kMma, kDispatch };

struct Results {
  std::vector<float> out, lse, dqkv;
  std::vector<uint16_t> out_bits, dqkv_bits;
  std::vector<float> lse_raw;
};

// Forward from qkv; backward from the reference's out and lse into dqkv, which starts as NaNs for cuDNN
// and the dispatch (they must overwrite every element) and as zeros for the kernels that add.
Results run(Path path, const Case& c, int64_t offset = 0) {
  const Shape4& s = c.s;
  const int64_t B = s.B, T = s.T, C = s.C, NH = s.NH;
  const uint16_t kNaN = 0x7fc0;
  DeviceBf16 qkv_d(c.qkv, offset), out_d(std::vector<uint16_t>(static_cast<size_t>(B * T * C), kNaN), offset);
  DeviceBf16 out_in_d(c.out_rounded_bits, offset), dout_d(c.dout, offset);
  const bool overwrites = path == Path::kCudnn || path == Path::kDispatch;  // (the dispatch zeroes for the others)
  DeviceBf16 dqkv_d(std::vector<uint16_t>(static_cast<size_t>(B * T * 3 * C), overwrites ? kNaN : 0), offset);
  Tensor lse_d = Tensor::full({B, NH, T}, -12345.0f).to(gpu());
  const Tensor lse_in_d = Tensor::from_vector(c.lse, {B, NH, T}).to(gpu());
  switch (path) {
    case Path::kCudnn:
      attention_forward_bf16_cudnn_cuda(out_d.ptr(), lse_d.data<float>(), qkv_d.ptr(), B, T, C, NH, stream());
      attention_backward_bf16_cudnn_cuda(dqkv_d.ptr(), dout_d.ptr(), qkv_d.ptr(), out_in_d.ptr(),
                                         lse_in_d.data<float>(), B, T, C, NH, stream());
      break;
    case Path::kMma:
      attention_forward_bf16_mma_cuda(out_d.ptr(), lse_d.data<float>(), qkv_d.ptr(), B, T, C, NH, stream());
      attention_backward_bf16_mma_cuda(dqkv_d.ptr(), dout_d.ptr(), qkv_d.ptr(), out_in_d.ptr(), lse_in_d.data<float>(),
                                       B, T, C, NH, stream());
      break;
    case Path::kDispatch:
      attention_forward_bf16_cuda(out_d.ptr(), lse_d.data<float>(), qkv_d.ptr(), B, T, C, NH, stream());
      attention_backward_bf16_cuda(dqkv_d.ptr(), dout_d.ptr(), qkv_d.ptr(), out_in_d.ptr(), lse_in_d.data<float>(), B,
                                   T, C, NH, stream());
      break;
  }
  Results r;
  r.out_bits = out_d.bits();
  r.dqkv_bits = dqkv_d.bits();
  r.out = widen(r.out_bits);
  r.dqkv = widen(r.dqkv_bits);
  r.lse = lse_d.to_vector();
  return r;
}

void expect_close(const std::vector<float>& got, const std::vector<float>& ref, double rel, bool ulp,
                  const std::string& what) {
  testing::expect_within_ulp(got, ref, ulp ? kOneUlp : 0.0, rel, what);
}

// Whether cuDNN takes the shape; prints why not.
bool cudnn_takes(const Shape4& s, std::string* reasons) {
  const std::string why = attention_bf16_cudnn_why_not(s.B, s.T, s.C, s.NH);
  if (why.empty()) return true;
  std::printf("cuDNN attention %s: not supported: %s\n", s.str().c_str(), why.c_str());
  if (reasons) *reasons += "\n" + s.str() + ": " + why;
  return false;
}

// Runs check(s) for every shape cuDNN takes; false (with the reasons) when it takes none.
template <typename Check>
bool for_supported_shapes(const std::vector<Shape4>& shapes, Check check, std::string* reasons) {
  int ran = 0;
  for (const Shape4& s : shapes) {
    if (!cudnn_takes(s, reasons)) continue;
    check(s);
    ++ran;
  }
  return ran > 0;
}

void check_against_cpu(const Shape4& s) {
  const std::string what = "attention cudnn " + s.str();
  const Case c = make_case(s, 60 + static_cast<uint64_t>(s.T + s.C));
  const Results r = run(Path::kCudnn, c);
  expect_close(r.out, c.out_rounded, kRelOut, true, what + ": out");
  expect_close(r.lse, c.lse, kRelLse, false, what + ": lse");
  expect_close(r.dqkv, c.dqkv, kRelGrad, true, what + ": dqkv (overwritten)");
  // The first row of every head attends to itself alone: weight exactly 1, so out = v₀ exactly.
  const std::vector<float> qkv = widen(c.qkv);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t d = 0; d < s.C; ++d)
      ASSERT_EQ(r.out[static_cast<size_t>(b * s.T * s.C + d)], qkv[static_cast<size_t>(b * s.T * 3 * s.C + 2 * s.C + d)])
          << what << ": out at b=" << b << " t=0 column " << d;
}

void check_against_mma(const Shape4& s) {
  const std::string what = "attention cudnn vs mma " + s.str();
  const Case c = make_case(s, 90 + static_cast<uint64_t>(s.T));
  const Results a = run(Path::kCudnn, c), b = run(Path::kMma, c);
  expect_close(a.out, b.out, 2 * kRelOut, true, what + ": out");
  expect_close(a.lse, b.lse, 2 * kRelLse, false, what + ": lse");
  expect_close(a.dqkv, b.dqkv, 2 * kRelGrad, true, what + ": dqkv");
}

// Under KRAKEN_CUDNN_ATTENTION_BACKWARD=atomic (where cuDNN planned it) dQ is summed in f32 with atomics,
// so only the forward, dK and dV must repeat bit for bit; dQ must agree within the rounding the CPU
// comparison allows (each run is held to the CPU by check_against_cpu).
void check_repeatable(const Shape4& s) {
  const Case c = make_case(s, 150 + static_cast<uint64_t>(s.T));
  const Results a = run(Path::kCudnn, c), b = run(Path::kCudnn, c);
  EXPECT_EQ(a.out_bits, b.out_bits) << s.str() << ": out";
  EXPECT_EQ(a.lse, b.lse) << s.str() << ": lse";
  if (attention_bf16_cudnn_backward_deterministic(s.B, s.T, s.C, s.NH)) {
    EXPECT_EQ(a.dqkv_bits, b.dqkv_bits) << s.str() << ": dqkv (the deterministic backward)";
    std::printf("[gpu-vs-cpu] attention cudnn %s: two runs bit for bit equal (forward and backward)\n",
                s.str().c_str());
    return;
  }
  std::vector<float> dq_a, dq_b;
  std::vector<uint16_t> dkv_a, dkv_b;
  int64_t dq_differ = 0;
  for (int64_t row = 0; row < s.B * s.T; ++row)
    for (int64_t col = 0; col < 3 * s.C; ++col) {
      const size_t i = static_cast<size_t>(row * 3 * s.C + col);
      if (col < s.C) {
        dq_a.push_back(a.dqkv[i]);
        dq_b.push_back(b.dqkv[i]);
        dq_differ += a.dqkv_bits[i] != b.dqkv_bits[i];
      } else {
        dkv_a.push_back(a.dqkv_bits[i]);
        dkv_b.push_back(b.dqkv_bits[i]);
      }
    }
  EXPECT_EQ(dkv_a, dkv_b) << s.str() << ": dK and dV (each key tile's own sums, also in the atomic graph)";
  expect_close(dq_a, dq_b, kRelGrad, true, s.str() + ": dQ of two runs (atomic)");
  std::printf("[gpu-vs-cpu] attention cudnn %s, atomic dQ: forward, dK and dV bit for bit equal; %lld of %zu dQ "
              "values differ between two runs\n",
              s.str().c_str(), static_cast<long long>(dq_differ), dq_a.size());
}

// attention_*_bf16_cuda under KRAKEN_CUDA_ATTENTION: cuDNN where it takes the head size, unless the variable
// names another path; with it unset only for shapes of kAttentionCudnnDefaultMinTokens rows or more (ctest
// runs each test in its own process, so this test's shapes are the first the budget sees). Where cuDNN
// takes a call, bit for bit what the cuDNN entry points give; where not, what the fallback kernels give;
// where a call's buffers are not 16-byte aligned, the fallback's bits too.
void check_dispatch(const Shape4& s) {
  const int64_t D = s.C / s.NH;
  const char* env = std::getenv("KRAKEN_CUDA_ATTENTION");
  const std::string choice = env ? env : "";
  const AttentionBf16Kernels kernels = attention_bf16_kernels(D);
  if (!choice.empty() && choice != "cudnn") {
    EXPECT_NE(kernels, AttentionBf16Kernels::kCudnn) << "KRAKEN_CUDA_ATTENTION=" << choice << ", D = " << D;
    std::printf("KRAKEN_CUDA_ATTENTION=%s: the dispatch takes %s for D = %lld\n", choice.c_str(),
                attention_bf16_kernels_name(kernels), static_cast<long long>(D));
    return;
  }
  const bool supported = attention_bf16_cudnn_supported(D);
  const AttentionBf16Kernels fallback = attention_bf16_kernels_fallback(D);
  EXPECT_EQ(kernels, supported ? AttentionBf16Kernels::kCudnn : fallback) << "D = " << D;
  const bool large_enough = choice == "cudnn" || s.B * s.T >= kAttentionCudnnDefaultMinTokens;
  // (asked before any call of this shape: the query must not take a place in the shape budget itself)
  EXPECT_EQ(attention_bf16_kernels_for_call(s.B, s.T, s.C, s.NH),
            supported && large_enough ? AttentionBf16Kernels::kCudnn : fallback)
      << s.str();
  const Case c = make_case(s, 120 + static_cast<uint64_t>(s.T));
  const bool to_cudnn = supported && large_enough && cudnn_takes(s, nullptr);
  const std::string what = "attention dispatch " + s.str() + " (" + (to_cudnn ? "cudnn" : attention_bf16_kernels_name(fallback)) +
                           (choice.empty() ? ", KRAKEN_CUDA_ATTENTION unset" : ", KRAKEN_CUDA_ATTENTION=cudnn") + ")";
  if (to_cudnn) {
    // The dispatch's and cuDNN's dqkv start as NaNs: equal bits say cuDNN wrote every element.
    const Results a = run(Path::kDispatch, c), b = run(Path::kCudnn, c);
    EXPECT_EQ(a.out_bits, b.out_bits) << what << ": out";
    EXPECT_EQ(a.lse, b.lse) << what << ": lse";
    EXPECT_EQ(a.dqkv_bits, b.dqkv_bits) << what << ": dqkv";
  } else if (fallback == AttentionBf16Kernels::kTensorCoreMma) {
    const Results a = run(Path::kDispatch, c), b = run(Path::kMma, c);
    EXPECT_EQ(a.out_bits, b.out_bits) << what << ": out";
    EXPECT_EQ(a.dqkv_bits, b.dqkv_bits) << what << ": dqkv";
  }
  // Buffers only 2-byte aligned: cuDNN cannot take them, the dispatch falls back, zeroing dqkv (run() gives
  // the dispatch NaNs, the mma kernels zeros) for the fallback to add to.
  if (fallback == AttentionBf16Kernels::kTensorCoreMma) {
    const Results a = run(Path::kDispatch, c, 1), b = run(Path::kMma, c, 1);
    EXPECT_EQ(a.out_bits, b.out_bits) << what << " unaligned: out";
    EXPECT_EQ(a.dqkv_bits, b.dqkv_bits) << what << " unaligned: dqkv";
  }
  std::printf("[gpu-vs-cpu] %s: the dispatching entry points equal their path bit for bit\n", what.c_str());
}

void check_refusals() {
  // D = 42 (not a multiple of 8) and D = 264 (above cuDNN's 256): refused before cuDNN is asked.
  EXPECT_NE(attention_bf16_cudnn_why_not(42).find("multiple of 8"), std::string::npos)
      << attention_bf16_cudnn_why_not(42);
  EXPECT_FALSE(attention_bf16_cudnn_supported(264));
  std::printf("cuDNN attention, D = 64: %s\n",
              attention_bf16_cudnn_supported(64) ? "supported" : attention_bf16_cudnn_why_not(64).c_str());
}

#else  // a build without CUDA: the tests skip before calling these

template <typename Check>
bool for_supported_shapes(const std::vector<Shape4>&, Check, std::string*) { return false; }
void check_against_cpu(const Shape4&) {}
void check_against_mma(const Shape4&) {}
void check_repeatable(const Shape4&) {}
void check_dispatch(const Shape4&) {}
void check_refusals() {}

#endif  // KRAKEN_WITH_CUDA

#define KRAKEN_FOR_CUDNN_SHAPES(shapes, check)                                          \
  do {                                                                                  \
    std::string reasons_;                                                               \
    if (!for_supported_shapes(shapes, check, &reasons_))                                \
      GTEST_SKIP() << "cuDNN takes none of these shapes:" << reasons_;                  \
  } while (0)

TEST(GpuAttentionCudnn, MatchesTheRoundedCpuAndOverwritesDqkv) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  std::vector<Shape4> shapes;
  for (int64_t T : {1, 64, 100, 257}) shapes.push_back({2, T, 3 * 64, 3});  // GPT-2's heads
  for (int64_t T : {65, 200}) shapes.push_back({2, T, 504, 3});            // a Kraken 4-way sub-layer
  KRAKEN_FOR_CUDNN_SHAPES(shapes, check_against_cpu);
}

TEST(GpuAttentionCudnn, AgreesWithTheMmaKernelsLseIncluded) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  KRAKEN_FOR_CUDNN_SHAPES((std::vector<Shape4>{{2, 1024, 4 * 64, 4}, {2, 300, 504, 3}}), check_against_mma);
}

TEST(GpuAttentionCudnn, RepeatedRunsAreBitIdentical) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  KRAKEN_FOR_CUDNN_SHAPES((std::vector<Shape4>{{2, 1024, 4 * 64, 4}, {2, 300, 504, 3}}), check_repeatable);
}

TEST(GpuAttentionCudnn, DispatchHonoursKrakenCudaAttention) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  check_dispatch({2, 100, 2 * 64, 2});   // (B·T below the unset variable's cuDNN minimum)
  check_dispatch({1, 70, 504, 3});
  check_dispatch({2, 1024, 2 * 64, 2});  // (above it)
}

TEST(GpuAttentionCudnn, RefusedShapesSayWhy) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  check_refusals();
}

}  // namespace
}  // namespace kraken::kernels
