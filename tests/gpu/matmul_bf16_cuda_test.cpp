// The cuBLASLt bf16 matrix product (kernels/cuda/matmul_lt.cu) against a double-precision reference
// computed from the same bf16 values: every transpose, every epilogue (none, bias, GELU, bias + GELU),
// f32 and bf16 output, aligned and unaligned shapes. Skips where there is no GPU (and in the dry run:
// there is no CPU version of this kernel to stand in).
//
// Tolerances. Products of two bf16 values are exact in f32, so with f32 output the only error is the
// accumulation over K = 200 terms, ~√K·2⁻²⁴ ≈ 1e-6 of the scale with IEEE adds; tensor cores add in
// their own order and may truncate intermediate sums, so 1e-4 of the scale (≈ 2⁻¹³). With the GELU
// epilogue cuBLASLt may evaluate tanh with the hardware approximation (relative error ≤ 2⁻¹¹), which
// moves 0.5·x·(1 + tanh u) by up to 2.5e-4·|x|: 5e-4 of the scale. With bf16 output each element
// is additionally rounded to 8 significant bits, up to half an ulp = 2⁻⁸ of its magnitude (just above
// a power of two); one ulp, 2⁻⁷ of its magnitude, is allowed on top (a CPU f32 product standing in for
// cuBLASLt reaches 0.96 of the half-ulp bound). Any layout, operand or epilogue mistake is an O(1) error.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "kernels/matmul.h"
#include "runtime/dispatch.h"
#include "runtime/tensor.h"
#include "tests/gpu/gpu_test_util.h"

namespace kraken::kernels {
namespace {

using runtime::Device;
using runtime::DType;
using runtime::Tensor;

#if KRAKEN_WITH_CUDA
double gelu_tanh(double x) { return 0.5 * x * (1.0 + std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))); }

const char* epilogue_name(MatmulEpilogue e) {
  switch (e) {
    case MatmulEpilogue::kNone: return "none";
    case MatmulEpilogue::kBias: return "bias";
    case MatmulEpilogue::kGelu: return "gelu";
    case MatmulEpilogue::kBiasGelu: return "bias+gelu";
  }
  return "?";
}

void check_case(int64_t M, int64_t N, int64_t K, bool ta, bool tb, MatmulEpilogue ep, bool out_bf16) {
  const std::string what = "M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                           (ta ? " Aᵀ" : "") + (tb ? " Bᵀ" : "") + " epilogue " + epilogue_name(ep) +
                           (out_bf16 ? " bf16 out" : " f32 out");
  // Inputs rounded to bf16 once, on the CPU; the reference uses exactly those values.
  const Tensor a16 = testing::random_tensor(ta ? runtime::Shape{K, M} : runtime::Shape{M, K}, 1).to(DType::BF16);
  const Tensor b16 = testing::random_tensor(tb ? runtime::Shape{N, K} : runtime::Shape{K, N}, 2).to(DType::BF16);
  Tensor bias = testing::random_tensor({N}, 3);
  if (out_bf16) bias = bias.to(DType::BF16);
  const std::vector<float> av = a16.to_vector(), bv = b16.to_vector(), biasv = bias.to_vector();
  std::vector<float> ref(static_cast<size_t>(M * N));
  const bool with_bias = ep == MatmulEpilogue::kBias || ep == MatmulEpilogue::kBiasGelu;
  const bool with_gelu = ep == MatmulEpilogue::kGelu || ep == MatmulEpilogue::kBiasGelu;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k)
        acc += static_cast<double>(ta ? av[k * M + m] : av[m * K + k]) * (tb ? bv[n * K + k] : bv[k * N + n]);
      if (with_bias) acc += biasv[n];
      if (with_gelu) acc = gelu_tanh(acc);
      ref[m * N + n] = static_cast<float>(acc);
    }
  }
  const Device gpu = Device::cuda(0);
  const Tensor a_dev = a16.to(gpu), b_dev = b16.to(gpu), bias_dev = bias.to(gpu);
  Tensor out = Tensor::empty({M, N}, out_bf16 ? DType::BF16 : DType::F32, gpu);
  matmul_bf16_cuda(out.data_ptr(), out_bf16, a_dev.data<uint16_t>(), b_dev.data<uint16_t>(),
                   with_bias ? bias_dev.data_ptr() : nullptr, M, N, K, ta, tb, ep, runtime::stream_of(out));
  const std::vector<float> got = out.to_vector();  // bf16 widened exactly
  double scale = 0.0;
  for (float r : ref) scale = std::max(scale, std::fabs(static_cast<double>(r)));
  const double rel = with_gelu ? 5e-4 : 1e-4;
  double worst = 0.0;  // in units of the allowed error
  int64_t at = 0;
  for (int64_t i = 0; i < M * N; ++i) {
    const double allowed = rel * scale + (out_bf16 ? std::ldexp(std::fabs(static_cast<double>(ref[i])), -7) : 0.0);
    const double ratio = std::fabs(static_cast<double>(got[i]) - ref[i]) / allowed;
    if (!(ratio <= worst)) worst = ratio, at = i;  // NaN counts as the worst
  }
  std::printf("[gpu-vs-double] bf16 matmul %s: worst error %.3g of the allowed\n", what.c_str(), worst);
  EXPECT_LE(worst, 1.0) << what << ": element " << at << " (row " << at / N << ", column " << at % N << ") is "
                        << got[at] << ", the reference " << ref[at];
}
#else
void check_case(int64_t, int64_t, int64_t, bool, bool, MatmulEpilogue, bool) {}
#endif

TEST(GpuMatmulBf16, EveryTransposeAndEpilogueMatchesADoubleReference) {
  KRAKEN_REQUIRE_GPU();
  if (testing::gpu_tests_on_cpu()) GTEST_SKIP() << "dry run: the cuBLASLt kernel has no CPU stand-in";
#if !KRAKEN_WITH_CUDA
  GTEST_SKIP() << "this build has no CUDA kernels";
#endif
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (MatmulEpilogue ep : {MatmulEpilogue::kNone, MatmulEpilogue::kBias, MatmulEpilogue::kGelu,
                                MatmulEpilogue::kBiasGelu})
        for (bool out_bf16 : {false, true}) check_case(64, 96, 128, ta, tb, ep, out_bf16);
}

TEST(GpuMatmulBf16, UnalignedShapesMatchADoubleReference) {
  KRAKEN_REQUIRE_GPU();
  if (testing::gpu_tests_on_cpu()) GTEST_SKIP() << "dry run: the cuBLASLt kernel has no CPU stand-in";
#if !KRAKEN_WITH_CUDA
  GTEST_SKIP() << "this build has no CUDA kernels";
#endif
  // Leading dimensions of 67, 72 and 200 elements: rows that do not start on 16-byte boundaries.
  for (bool ta : {false, true})
    for (bool tb : {false, true}) check_case(67, 72, 200, ta, tb, MatmulEpilogue::kBiasGelu, true);
  check_case(1, 5, 3, false, false, MatmulEpilogue::kBias, false);
}

}  // namespace
}  // namespace kraken::kernels
