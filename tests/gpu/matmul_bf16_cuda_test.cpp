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

// The training epilogues (matmul_gelu_aux / matmul_dgelu / matmul_bias_grad_bf16_cuda), bf16 throughout,
// against double references from the same bf16 values. Tolerances as above: 5e-4 of the scale for the
// product and the GELU (or its derivative, whose hardware-tanh error is of the same order), plus one
// bf16 ulp of the element for the output's rounding. A bias gradient is a sum of M (or K) terms that
// cuBLASLt may add as bf16-rounded or f32 values: 2⁻⁸ of Σ|terms| more.
double gelu_tanh_grad(double x) {
  const double k = 0.7978845608028654, u = k * (x + 0.044715 * x * x * x), t = std::tanh(u);
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x);
}

void expect_near_reference(const std::vector<float>& got, const std::vector<double>& ref,
                           const std::vector<double>& extra, const std::string& what) {
  double scale = 0.0;
  for (double r : ref) scale = std::max(scale, std::fabs(r));
  double worst = 0.0;
  size_t at = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double allowed = 5e-4 * scale + std::ldexp(std::fabs(ref[i]), -7) + (extra.empty() ? 0.0 : extra[i]) + 1e-30;
    const double ratio = std::fabs(static_cast<double>(got[i]) - ref[i]) / allowed;
    if (!(ratio <= worst)) worst = ratio, at = i;
  }
  std::printf("[gpu-vs-double] %s: worst error %.3g of the allowed\n", what.c_str(), worst);
  EXPECT_LE(worst, 1.0) << what << ": element " << at << " is " << got[at] << ", the reference " << ref[at];
}

// P (M, N) = op(A)·op(B) in double from bf16 values.
std::vector<double> product(const std::vector<float>& av, const std::vector<float>& bv, int64_t M, int64_t N,
                            int64_t K, bool ta, bool tb) {
  std::vector<double> p(static_cast<size_t>(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k)
        acc += static_cast<double>(ta ? av[k * M + m] : av[m * K + k]) * (tb ? bv[n * K + k] : bv[k * N + n]);
      p[m * N + n] = acc;
    }
  return p;
}

void check_training_epilogues(int64_t M, int64_t N, int64_t K) {
  const std::string shape = "M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K);
  const Device gpu = Device::cuda(0);
  auto bf16 = [](const runtime::Shape& s, uint64_t seed, float std) {
    return testing::random_tensor(s, seed, std).to(DType::BF16);
  };
  const float w_std = 1.0f / std::sqrt(static_cast<float>(K));
  {  // forward, as c_fc: out = gelu(x·Wᵀ + b), pre = x·Wᵀ + b (A = x (M, K), B = W (N, K) transposed)
    const Tensor x = bf16({M, K}, 1, 1.0f), w = bf16({N, K}, 2, w_std), b = bf16({N}, 3, 0.5f);
    const std::vector<float> xv = x.to_vector(), wv = w.to_vector(), bv = b.to_vector();
    for (bool with_bias : {true, false}) {
      std::vector<double> pre = product(xv, wv, M, N, K, false, true), out(pre.size());
      for (size_t i = 0; i < pre.size(); ++i) {
        if (with_bias) pre[i] += bv[i % N];
        out[i] = gelu_tanh(pre[i]);
      }
      const Tensor xd = x.to(gpu), wd = w.to(gpu), bd = b.to(gpu);
      Tensor outd = Tensor::empty({M, N}, DType::BF16, gpu), pred = Tensor::empty({M, N}, DType::BF16, gpu);
      const bool fused = matmul_gelu_aux_bf16_cuda(outd.data<uint16_t>(), pred.data<uint16_t>(), xd.data<uint16_t>(),
                                                   wd.data<uint16_t>(), with_bias ? bd.data<uint16_t>() : nullptr, M,
                                                   N, K, false, true, runtime::stream_of(outd));
      ASSERT_TRUE(fused) << shape << ": cuBLASLt has no GELU_AUX" << (with_bias ? "_BIAS" : "")
                         << " algorithm: the MLP would run unfused";
      const std::string w_name = shape + (with_bias ? " GELU_AUX_BIAS" : " GELU_AUX");
      expect_near_reference(outd.to_vector(), out, {}, w_name + ": out");
      expect_near_reference(pred.to_vector(), pre, {}, w_name + ": aux (pre-activation)");
    }
  }
  {  // backward, as c_proj's dx: dpre = (dy·W) ∘ gelu'(pre) (A = dy (M, K), B = W (K, N)), db = Σ_m dpre
    const Tensor dy = bf16({M, K}, 4, 1.0f), w = bf16({K, N}, 5, w_std), pre = bf16({M, N}, 6, 1.5f);
    const std::vector<float> dyv = dy.to_vector(), wv = w.to_vector(), prev = pre.to_vector();
    std::vector<double> dpre = product(dyv, wv, M, N, K, false, false);
    std::vector<double> db(static_cast<size_t>(N), 0.0), db_abs(static_cast<size_t>(N), 0.0);
    for (size_t i = 0; i < dpre.size(); ++i) {
      dpre[i] *= gelu_tanh_grad(prev[i]);
      db[i % N] += dpre[i];
      db_abs[i % N] += std::fabs(dpre[i]);
    }
    for (double& v : db_abs) v = std::ldexp(v, -8);
    const Tensor dyd = dy.to(gpu), wd = w.to(gpu), pred = pre.to(gpu);
    for (bool with_bgrad : {true, false}) {
      Tensor dpred = Tensor::empty({M, N}, DType::BF16, gpu), dbd = Tensor::empty({N}, DType::BF16, gpu);
      const bool fused = matmul_dgelu_bf16_cuda(dpred.data<uint16_t>(), with_bgrad ? dbd.data<uint16_t>() : nullptr,
                                                dyd.data<uint16_t>(), wd.data<uint16_t>(), pred.data<uint16_t>(), M, N,
                                                K, false, false, runtime::stream_of(dpred));
      const std::string w_name = shape + (with_bgrad ? " DGELU_BGRAD" : " DGELU");
      ASSERT_TRUE(fused) << w_name << ": cuBLASLt has no algorithm: the MLP would run unfused";
      expect_near_reference(dpred.to_vector(), dpre, {}, w_name + ": dpre");
      if (with_bgrad) expect_near_reference(dbd.to_vector(), db, db_abs, w_name + ": bias gradient Σ_m dpre");
    }
  }
  {  // weight gradient, as c_proj's dW (M, N) = dyᵀ·u (A = dy (K, M) transposed, B = u (K, N)), db = Σ_k dy
    const Tensor dy = bf16({K, M}, 7, 1.0f), u = bf16({K, N}, 8, 1.0f);
    const std::vector<float> dyv = dy.to_vector(), uv = u.to_vector();
    const std::vector<double> dw = product(dyv, uv, M, N, K, true, false);
    std::vector<double> db(static_cast<size_t>(M), 0.0), db_abs(static_cast<size_t>(M), 0.0);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t m = 0; m < M; ++m) db[m] += dyv[k * M + m], db_abs[m] += std::fabs(dyv[k * M + m]);
    for (double& v : db_abs) v = std::ldexp(v, -8);
    const Tensor dyd = dy.to(gpu), ud = u.to(gpu);
    Tensor dwd = Tensor::empty({M, N}, DType::BF16, gpu), dbd = Tensor::empty({M}, DType::BF16, gpu);
    const bool fused = matmul_bias_grad_bf16_cuda(dwd.data<uint16_t>(), dbd.data<uint16_t>(), dyd.data<uint16_t>(),
                                                  ud.data<uint16_t>(), M, N, K, true, false, runtime::stream_of(dwd));
    ASSERT_TRUE(fused) << shape << " BGRADB: cuBLASLt has no algorithm: the bias gradient would take the column sums";
    expect_near_reference(dwd.to_vector(), dw, {}, shape + " BGRADB: dW");
    expect_near_reference(dbd.to_vector(), db, db_abs, shape + " BGRADB: bias gradient Σ_k dy");
  }
}

// matmul_bf16_batched_cuda: `batch` products at element strides, each against its own double reference
// (tolerances of check_case's plain product). stride_b = 0 is one B for every matrix (a shared weight);
// rows of out padded (stride_out > M·N) show that the stride, not M·N, places each result.
void check_batched(int64_t batch, int64_t M, int64_t N, int64_t K, bool ta, bool tb, bool shared_b, bool out_bf16) {
  const std::string what = "batched " + std::to_string(batch) + " × M=" + std::to_string(M) + " N=" +
                           std::to_string(N) + " K=" + std::to_string(K) + (ta ? " Aᵀ" : "") + (tb ? " Bᵀ" : "") +
                           (shared_b ? " one B" : "") + (out_bf16 ? " bf16 out" : " f32 out");
  const int64_t stride_a = M * K, stride_b = shared_b ? 0 : K * N, stride_out = M * N + 8;
  const Tensor a16 = testing::random_tensor({batch * stride_a}, 11).to(DType::BF16);
  const Tensor b16 = testing::random_tensor({shared_b ? K * N : batch * stride_b}, 12).to(DType::BF16);
  const std::vector<float> av = a16.to_vector(), bv = b16.to_vector();
  const Device gpu = Device::cuda(0);
  const Tensor a_dev = a16.to(gpu), b_dev = b16.to(gpu);
  Tensor out = Tensor::full({batch * stride_out}, -7.0f).to(out_bf16 ? DType::BF16 : DType::F32).to(gpu);
  matmul_bf16_batched_cuda(out.data_ptr(), out_bf16, a_dev.data<uint16_t>(), b_dev.data<uint16_t>(), batch, M, N, K,
                           ta, tb, stride_out, stride_a, stride_b, runtime::stream_of(out));
  const std::vector<float> got = out.to_vector();
  double worst_of_all = 0.0;
  for (int64_t i = 0; i < batch; ++i) {
    const std::vector<float> ai(av.begin() + i * stride_a, av.begin() + (i + 1) * stride_a);
    const std::vector<float> bi(bv.begin() + i * stride_b, bv.begin() + i * stride_b + K * N);
    const std::vector<double> ref = product(ai, bi, M, N, K, ta, tb);
    double scale = 0.0;
    for (double r : ref) scale = std::max(scale, std::fabs(r));
    double worst = 0.0;
    for (int64_t j = 0; j < M * N; ++j) {
      const double allowed = 1e-4 * scale + (out_bf16 ? std::ldexp(std::fabs(ref[j]), -7) : 0.0);
      const double ratio = std::fabs(static_cast<double>(got[i * stride_out + j]) - ref[j]) / allowed;
      if (!(ratio <= worst)) worst = ratio;
    }
    EXPECT_LE(worst, 1.0) << what << ": matrix " << i;
    for (int64_t j = M * N; j < stride_out; ++j)
      EXPECT_EQ(got[i * stride_out + j], -7.0f) << what << ": the padding after matrix " << i << " was written";
    if (!(worst <= worst_of_all)) worst_of_all = worst;
  }
  std::printf("[gpu-vs-double] bf16 matmul %s: worst error %.3g of the allowed\n", what.c_str(), worst_of_all);
}
#else
void check_case(int64_t, int64_t, int64_t, bool, bool, MatmulEpilogue, bool) {}
void check_training_epilogues(int64_t, int64_t, int64_t) {}
void check_batched(int64_t, int64_t, int64_t, int64_t, bool, bool, bool, bool) {}
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

TEST(GpuMatmulBf16, StridedBatchesMatchADoubleReference) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  for (bool ta : {false, true})
    for (bool tb : {false, true}) check_batched(4, 64, 96, 128, ta, tb, false, true);
  check_batched(3, 40, 24, 72, false, true, true, true);   // one weight for every matrix
  check_batched(4, 64, 96, 128, true, false, false, false);  // f32 out (a weight gradient's layout)
  check_batched(1, 16, 24, 8, false, false, false, true);    // batch 1: the plain product
  // K above 32,768: one product per matrix (a weight gradient's layout, as at B = 64)
  check_batched(3, 24, 16, 32776, true, false, false, false);
}

TEST(GpuMatmulBf16, TrainingEpiloguesMatchADoubleReference) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  // GELU_AUX(_BIAS), DGELU(_BGRAD) and BGRADB in the row-major mappings ops::mlp uses: 128 rows of 96
  // features (N a multiple of 8, as the aux matrix needs), then an odd row count and K.
  check_training_epilogues(128, 96, 64);
  check_training_epilogues(67, 72, 200);
}

// Where cuBLASLt has no algorithm for an epilogue the entry point declines and ops::mlp quietly runs
// the unfused kernels: correct, but not the point. At GPT-2 124M's MLP products (B·T = 8192 and 1024
// rows, C = 768, H = 3072, in the mappings ops::mlp uses) every training epilogue must be taken.
TEST(GpuMatmulBf16, TrainingEpiloguesHaveAlgorithmsAtGpt2Shapes) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
#if KRAKEN_WITH_CUDA
  const Device gpu = Device::cuda(0);
  const int64_t C = 768, H = 3072;
  const Tensor w_fc = testing::random_tensor({H, C}, 1, 0.02f).to(DType::BF16).to(gpu);
  const Tensor w_proj = testing::random_tensor({C, H}, 2, 0.02f).to(DType::BF16).to(gpu);
  const Tensor b_fc = Tensor::zeros({H}, DType::BF16, gpu);
  for (int64_t rows : {8192, 1024}) {
    const std::string at = "rows = " + std::to_string(rows) + ": ";
    const Tensor x = testing::random_tensor({rows, C}, 3).to(DType::BF16).to(gpu);
    const Tensor dy = testing::random_tensor({rows, C}, 4).to(DType::BF16).to(gpu);
    Tensor u = Tensor::empty({rows, H}, DType::BF16, gpu), pre = Tensor::empty({rows, H}, DType::BF16, gpu);
    Tensor dpre = Tensor::empty({rows, H}, DType::BF16, gpu), db_fc = Tensor::empty({H}, DType::BF16, gpu);
    Tensor dw_proj = Tensor::empty({C, H}, DType::BF16, gpu), db_proj = Tensor::empty({C}, DType::BF16, gpu);
    CUstream_st* s = runtime::stream_of(u);
    EXPECT_TRUE(matmul_gelu_aux_bf16_cuda(u.data<uint16_t>(), pre.data<uint16_t>(), x.data<uint16_t>(),
                                          w_fc.data<uint16_t>(), b_fc.data<uint16_t>(), rows, H, C, false, true, s))
        << at << "c_fc with GELU_AUX_BIAS";
    EXPECT_TRUE(matmul_dgelu_bf16_cuda(dpre.data<uint16_t>(), db_fc.data<uint16_t>(), dy.data<uint16_t>(),
                                       w_proj.data<uint16_t>(), pre.data<uint16_t>(), rows, H, C, false, false, s))
        << at << "dy·W_proj with DGELU_BGRAD";
    EXPECT_TRUE(matmul_dgelu_bf16_cuda(dpre.data<uint16_t>(), nullptr, dy.data<uint16_t>(), w_proj.data<uint16_t>(),
                                       pre.data<uint16_t>(), rows, H, C, false, false, s))
        << at << "dy·W_proj with DGELU";
    EXPECT_TRUE(matmul_bias_grad_bf16_cuda(dw_proj.data<uint16_t>(), db_proj.data<uint16_t>(), dy.data<uint16_t>(),
                                           u.data<uint16_t>(), C, H, rows, true, false, s))
        << at << "dyᵀ·u with BGRADB";
  }
#endif
}

// Which GELU cuBLASLt's epilogue computes: GPT-2's tanh form (kernels/elementwise.h) or the erf form.
// They differ by at most 4.7e-4 (at x ≈ −2.7), less than the scale-relative tolerance above allows, so
// here P = x exactly (x bf16 in column 0 of A, a one in row 0 of B, zeros elsewhere), 2048 values of x
// over [−6, 6], f32 output, and the root-mean-square error against each form: a hardware tanh
// approximation scatters around the form it approximates, the wrong form is off by its systematic gap.
TEST(GpuMatmulBf16, GeluEpilogueIsTheTanhForm) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
#if KRAKEN_WITH_CUDA
  const int64_t M = 2048, N = 8, K = 8;
  std::vector<float> av(static_cast<size_t>(M * K), 0.0f), bv(static_cast<size_t>(K * N), 0.0f);
  for (int64_t m = 0; m < M; ++m) av[m * K] = -6.0f + 12.0f * static_cast<float>(m) / static_cast<float>(M - 1);
  for (int64_t n = 0; n < N; ++n) bv[n] = 1.0f;
  const Tensor a = Tensor::from_vector(av, {M, K}).to(DType::BF16), b = Tensor::from_vector(bv, {K, N}).to(DType::BF16);
  const std::vector<float> x = a.to_vector();  // the bf16 values
  const Device gpu = Device::cuda(0);
  const Tensor ad = a.to(gpu), bd = b.to(gpu);
  Tensor out = Tensor::empty({M, N}, DType::F32, gpu);
  matmul_bf16_cuda(out.data_ptr(), false, ad.data<uint16_t>(), bd.data<uint16_t>(), nullptr, M, N, K, false, false,
                   MatmulEpilogue::kGelu, runtime::stream_of(out));
  const std::vector<float> got = out.to_vector();
  double se_tanh = 0.0, se_erf = 0.0;
  for (int64_t m = 0; m < M; ++m) {
    const double xm = x[m * K], erf_form = 0.5 * xm * (1.0 + std::erf(xm / std::sqrt(2.0)));
    for (int64_t n = 0; n < N; ++n) {
      const double g = got[m * N + n];
      se_tanh += (g - gelu_tanh(xm)) * (g - gelu_tanh(xm));
      se_erf += (g - erf_form) * (g - erf_form);
    }
  }
  const double rms_tanh = std::sqrt(se_tanh / (M * N)), rms_erf = std::sqrt(se_erf / (M * N));
  std::printf("[gpu-vs-double] cuBLASLt GELU epilogue: rms error %.3g against the tanh form, %.3g against erf\n",
              rms_tanh, rms_erf);
  EXPECT_LT(rms_tanh, 0.5 * rms_erf) << "cuBLASLt's GELU is not closer to GPT-2's tanh form than to the erf form";
#endif
}

TEST(GpuMatmulBf16, TrainingEpiloguesDeclineWhatCublasLtCannotHold) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
#if KRAKEN_WITH_CUDA
  // N = 12 is not a multiple of 8 (the aux matrix's leading dimension), and a pre-activation 2 bytes
  // past a 16-byte boundary: both report false and leave the output untouched.
  const Device gpu = Device::cuda(0);
  const Tensor a = testing::random_tensor({5, 16}, 1).to(DType::BF16).to(gpu);
  const Tensor b = testing::random_tensor({12, 16}, 2).to(DType::BF16).to(gpu);
  Tensor out = Tensor::zeros({5, 12}, DType::BF16, gpu), pre = Tensor::zeros({5 * 16 + 1}, DType::BF16, gpu);
  EXPECT_FALSE(matmul_gelu_aux_bf16_cuda(out.data<uint16_t>(), pre.data<uint16_t>(), a.data<uint16_t>(),
                                         b.data<uint16_t>(), nullptr, 5, 12, 16, false, true, runtime::stream_of(out)));
  EXPECT_FALSE(matmul_dgelu_bf16_cuda(out.data<uint16_t>(), nullptr, a.data<uint16_t>(), b.data<uint16_t>(),
                                      pre.data<uint16_t>(), 5, 12, 16, false, true, runtime::stream_of(out)));
  const Tensor b16 = testing::random_tensor({16, 16}, 3).to(DType::BF16).to(gpu);
  Tensor out16 = Tensor::zeros({5, 16}, DType::BF16, gpu);
  EXPECT_FALSE(matmul_gelu_aux_bf16_cuda(out16.data<uint16_t>(), pre.data<uint16_t>() + 1, a.data<uint16_t>(),
                                         b16.data<uint16_t>(), nullptr, 5, 16, 16, false, true,
                                         runtime::stream_of(out16)));
  for (float v : out.to_vector()) ASSERT_EQ(v, 0.0f);
  for (float v : out16.to_vector()) ASSERT_EQ(v, 0.0f);
#endif
}

}  // namespace
}  // namespace kraken::kernels
