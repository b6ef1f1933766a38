// Mixed precision on the GPU: every op with bf16 operands (the CUDA bf16 kernels and cuBLASLt) against
// the CPU's bf16 path (runtime/ops/precision.h: f32 arithmetic on the widened values, each output
// rounded once), then the bf16 model's loss and master gradients against the CPU's. Skips without a GPU.
//
// Tolerances, relative to the reference tensor's largest magnitude (gpu_test_util.h). Both sides round
// the same f32 quantities once; the f32 quantities differ by summation order (~1e-6 relative), which
// flips a rounding now and then, moving that element by one bf16 ulp: at most 2⁻⁷ of its magnitude
// (bf16 has 8 significant bits), so at most 2⁻⁷·max ≈ 7.8e-3 of the scale. 8e-3 passes exactly that
// and fails anything else. Attention's backward differs once more by construction: the CUDA kernel reads
// the bf16 output O for Dᵢ = Σ dOᵢ·Oᵢ, the CPU reference its f32 output, a 2⁻⁸ relative difference in D
// that reaches dq and dk through dS = P∘(dP − D); 1.6e-2 leaves room for that too. And the CUDA
// attention runs on tensor cores (kernels/cuda/attention_tc.cu), which round P and dS to bf16 before
// the products: tests/gpu/attention_tc_cuda_test.cpp bounds that at 5e-3 of max|out| and 1.2e-2 of
// max|dqkv| (worst cases 3.4e-3 and 8.4e-3 for N(0, 1) inputs like these); the attention bounds add
// those: 8e-3 + 4e-3 for out, 1.6e-2 + 8e-3 for the gradient.
#include <gtest/gtest.h>

#include <cmath>

#include "models/kraken.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "runtime/rng.h"
#include "runtime/safetensors.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/support/fixtures.h"

namespace kraken::testing {
namespace {

using runtime::DType;
using runtime::Tensor;
namespace ops = runtime::ops;

constexpr double kOneUlp = 8e-3;
constexpr double kAttentionOut = 1.2e-2;
constexpr double kAttentionGrad = 2.4e-2;

// A bf16 leaf on the CPU with N(0, std²) values.
Tensor bf16_leaf(const runtime::Shape& shape, uint64_t seed, float std = 1.0f) {
  Tensor t = random_tensor(shape, seed, std).to(DType::BF16);
  t.set_requires_grad(true);
  return t;
}

Tensor f32_leaf(const runtime::Shape& shape, uint64_t seed, float std = 1.0f) {
  Tensor t = random_tensor(shape, seed, std);
  t.set_requires_grad(true);
  return t;
}

TEST(GpuMixedPrecision, ElementwiseOpsMatchTheCpuReference) {
  KRAKEN_REQUIRE_GPU();
  const runtime::Shape s{4, 37, 96};  // odd row count, rows of 96 (a multiple of 8) and the odd total below
  expect_matches_cpu([](const auto& x) { return ops::add(x[0], x[1]); }, {bf16_leaf(s, 1), bf16_leaf(s, 2)}, kOneUlp,
                     kOneUlp, "add");
  expect_matches_cpu([](const auto& x) { return ops::add(x[0], x[1]); }, {bf16_leaf(s, 3), bf16_leaf({96}, 4)}, kOneUlp,
                     kOneUlp, "add broadcast (bias gradient summed over 148 rows)");
  expect_matches_cpu([](const auto& x) { return ops::mul(x[0], x[1]); }, {bf16_leaf(s, 5), bf16_leaf(s, 6)}, kOneUlp,
                     kOneUlp, "mul");
  expect_matches_cpu([](const auto& x) { return ops::scale(x[0], -0.37f); }, {bf16_leaf({7, 13}, 7)}, kOneUlp, kOneUlp,
                     "scale (odd size)");
  expect_matches_cpu([](const auto& x) { return ops::gelu(x[0]); }, {bf16_leaf(s, 8, 2.0f)}, kOneUlp, kOneUlp, "gelu");
  expect_matches_cpu([](const auto& x) { return ops::sum_list({x[0], x[1], x[2], x[3]}); },
                     {bf16_leaf(s, 9), bf16_leaf(s, 10), bf16_leaf(s, 11), bf16_leaf(s, 12)}, kOneUlp, kOneUlp,
                     "sum_list of 4 (one rounding)");
  std::vector<Tensor> nine;  // more than kernels::kSumsPerLaunch: the f32 accumulator; an odd size: scalar
  for (uint64_t k = 0; k < 9; ++k) nine.push_back(bf16_leaf({7, 13}, 30 + k));
  expect_matches_cpu([](const auto& x) { return ops::sum_list(x); }, nine, kOneUlp, kOneUlp,
                     "sum_list of 9, odd size (one rounding)");
  runtime::Generator a(21, 4), b(21, 4);
  int call = 0;
  expect_matches_cpu([&](const auto& x) { return ops::dropout(x[0], 0.2f, call++ == 0 ? a : b); },
                     {bf16_leaf({5, 77}, 13)}, kOneUlp, kOneUlp, "dropout (same mask)");
}

TEST(GpuMixedPrecision, ProductsThroughCublasLtMatchTheCpuReference) {
  KRAKEN_REQUIRE_GPU();
  const Tensor x = bf16_leaf({4, 64, 256}, 20), w = bf16_leaf({384, 256}, 21, 0.05f), bias = bf16_leaf({384}, 22);
  {  // the bias gradient in dW's product (level 2)
    ops::EpilogueFusionScope bgradb(ops::EpilogueFusion::kGeluAndBiasGrads);
    expect_matches_cpu([](const auto& v) { return ops::linear(v[0], v[1], v[2]); }, {x, w, bias}, kOneUlp, kOneUlp,
                       "linear with bias (epilogue; its gradient in dW's product, BGRADB, KRAKEN_CUDA_EPILOGUES=2)");
    expect_matches_cpu([](const auto& v) { return ops::linear(v[0], v[1], v[2]); },
                       {bf16_leaf({7, 40}, 35), bf16_leaf({24, 40}, 36, 0.2f), bf16_leaf({24}, 37)}, kOneUlp, kOneUlp,
                       "linear with bias, 7 rows (the BGRADB reduction over an odd K)");
  }
  {  // the bias gradient by the column sums (level 1, the default)
    ops::EpilogueFusionScope column_sums(ops::EpilogueFusion::kGelu);
    expect_matches_cpu([](const auto& v) { return ops::linear(v[0], v[1], v[2]); }, {x, w, bias}, kOneUlp, kOneUlp,
                       "linear with bias, KRAKEN_CUDA_EPILOGUES=1 (bias gradient by column sums)");
  }
  expect_matches_cpu([](const auto& v) { return ops::linear(v[0], v[1]); }, {bf16_leaf({3, 5, 40}, 23),
                     bf16_leaf({24, 40}, 24, 0.2f)}, kOneUlp, kOneUlp, "linear, small odd rows");
  expect_matches_cpu([](const auto& v) { return ops::matmul(v[0], v[1], false, true); },
                     {bf16_leaf({2, 16, 64}, 25), bf16_leaf({520, 64}, 26, 0.1f)}, kOneUlp, kOneUlp,
                     "LM head: activations times the tied table transposed");
  expect_matches_cpu([](const auto& v) { return ops::matmul(v[0], v[1]); }, {bf16_leaf({3, 8, 24}, 27),
                     bf16_leaf({3, 24, 16}, 28)}, kOneUlp, kOneUlp, "batched");
}

TEST(GpuMixedPrecision, LayerNormAttentionAndCrossEntropyMatchTheCpuReference) {
  KRAKEN_REQUIRE_GPU();
  expect_matches_cpu([](const auto& v) { return ops::layernorm(v[0], v[1], v[2]); },
                     {bf16_leaf({6, 33, 200}, 30, 3.0f), f32_leaf({200}, 31), f32_leaf({200}, 32)}, kOneUlp, kOneUlp,
                     "layernorm (bf16 rows, f32 gamma and beta)");
  expect_matches_cpu([](const auto& v) { return ops::layernorm(v[0], v[1], Tensor()); },
                     {bf16_leaf({5, 768}, 33), f32_leaf({768}, 34)}, kOneUlp, kOneUlp, "layernorm without bias");
  // The fused residual add: s rounded to bf16 and normalised from the stored value on both sides; the
  // GPU adds the normalisation's dx to the stream's gradient before rounding, the CPU rounds each then
  // adds (one more rounding): within one ulp.
  expect_matches_cpu(
      [](const auto& v) {
        std::vector<Tensor> s_h = ops::add_layernorm(v[0], v[1], v[2], v[3]);
        return ops::add(ops::scale(s_h[0], 0.7f), s_h[1]);
      },
      {bf16_leaf({4, 33, 200}, 50, 2.0f), bf16_leaf({4, 33, 200}, 51), f32_leaf({200}, 52), f32_leaf({200}, 53)},
      2 * kOneUlp, 2 * kOneUlp, "add_layernorm (both outputs through one more bf16 add)");
  for (int64_t T : {1, 64, 100}) {
    expect_matches_cpu([](const auto& v) { return ops::attention(v[0], 4); }, {bf16_leaf({2, T, 3 * 128}, 35 + T)},
                       kAttentionOut, kAttentionGrad, "attention T = " + std::to_string(T));
  }
  // GPT-2's heads (D = 64), the Kraken 4-way preset's (D = 168) and GPT-2's shape at degree 4's (D = 256):
  // head sizes every attention family takes, the wgmma kernels included (gpu-check runs this test under
  // KRAKEN_CUDA_ATTENTION=wgmma and =wgmma-backward too).
  for (int64_t D : {64, 168, 256}) {
    for (int64_t T : {65, 200}) {
      expect_matches_cpu([](const auto& v) { return ops::attention(v[0], 2); }, {bf16_leaf({2, T, 3 * 2 * D}, 60 + T)},
                         kAttentionOut, kAttentionGrad,
                         "attention D = " + std::to_string(D) + " T = " + std::to_string(T));
    }
  }
  runtime::Generator gen(40, 0);
  std::vector<int32_t> targets;
  for (int i = 0; i < 2 * 50; ++i) targets.push_back(i % 17 == 3 ? -1 : static_cast<int32_t>(gen.next_below(1000)));
  const Tensor t = Tensor::from_ints(targets, {2, 50});
  expect_matches_cpu([&](const auto& v) { return ops::cross_entropy(v[0], v[0].device().is_cpu() ? t : t.to(v[0].device()), 1000, -1); },
                     {bf16_leaf({2, 50, 1024}, 41, 2.0f)}, 1e-5, kOneUlp, "cross-entropy over a padded vocabulary");
}

// A model in mixed precision, the same parameters on the CPU and the GPU: the GPU's loss and f32 master
// gradients against the CPU's mixed-precision run. Both compute the same bf16 quantities; they differ only
// where an f32 reorder flips a rounding, which then travels through the layers: measured between bf16 and
// fp32 on the CPU (tests/models) at 2e-2 of a gradient's norm, so 2e-2 bounds two bf16 runs with room.
void expect_device_tracks_cpu(models::KrakenModel& cpu, models::KrakenModel& dev, const Tensor& ids,
                              const Tensor& targets, const std::string& what) {
  Tensor l_cpu = cpu.loss(ids, targets, nullptr, false);
  Tensor l_dev = dev.loss(ids.to(test_device()), targets.to(test_device()), nullptr, false);
  EXPECT_NEAR(l_dev.item(), l_cpu.item(), 1e-3 * std::fabs(l_cpu.item())) << what;
  std::printf("[gpu-vs-cpu] bf16 %s loss: device %.6f, cpu %.6f\n", what.c_str(), l_dev.item(), l_cpu.item());
  runtime::backward(l_cpu);
  runtime::backward(l_dev);
  const auto pc = cpu.named_parameters(), pd = dev.named_parameters();
  double worst = 0.0;
  std::string worst_name;
  for (size_t k = 0; k < pc.size(); ++k) {
    ASSERT_EQ(pd[k].tensor.grad().dtype(), DType::F32) << pc[k].name;
    const std::vector<float> a = pd[k].tensor.grad().to_vector(), b = pc[k].tensor.grad().to_vector();
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < a.size(); ++i) {
      diff += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
      norm += static_cast<double>(b[i]) * b[i];
    }
    const double rel = std::sqrt(diff / std::max(norm, 1e-30));
    EXPECT_LT(rel, 2e-2) << what << ": " << pc[k].name;
    if (rel >= worst) worst = rel, worst_name = pc[k].name;
  }
  std::printf("[gpu-vs-cpu] bf16 %s: worst gradient relative norm difference %.2e (%s)\n", what.c_str(), worst,
              worst_name.c_str());
}

// The degree-2 golden model (no biases).
TEST(GpuMixedPrecision, Degree2ModelMatchesTheCpuMixedPrecisionModel) {
  KRAKEN_REQUIRE_GPU();
  runtime::SafetensorsFile file = runtime::SafetensorsFile::open(source_path("tests/models/fixtures/kraken2_tiny.safetensors"));
  models::KrakenModel cpu(fixture_config(file)), dev(fixture_config(file), test_device());
  for (auto* m : {&cpu, &dev}) {
    m->set_compute_dtype(DType::BF16);
    for (auto& p : m->named_parameters()) file.load_into("param." + p.name, p.tensor);
  }
  expect_device_tracks_cpu(cpu, dev, file.load("input.ids"), file.load("input.targets"), "degree-2");
}

// A degree-4 model with biases and no dropout (2 heads of 32 a sub-layer): the projection biases in the
// LayerNorms after plain adds — the MLP projections' in the next layer's LN1, layer 0's attention
// projections' in its LN2 (the grouped ops::add_bias_layernorm: one kernel each way on the GPU, the chain
// on the CPU) — and in the products' epilogues (KRAKEN_PROJECTION_BIASES=products), each against the CPU.
TEST(GpuMixedPrecision, Degree4ModelWithBiasesMatchesTheCpuMixedPrecisionModel) {
  KRAKEN_REQUIRE_GPU();
  models::KrakenConfig c;
  c.n_layer = 3;
  c.n_embd = 64;
  c.n_head = 8;
  c.degree = 4;
  c.context = 32;
  c.vocab_size = 300;
  c.mlp_expansion = 2;
  c.bias = true;
  for (const bool in_norms : {true, false}) {
    models::ProjectionBiasesScope placement(in_norms);
    models::KrakenModel cpu(c), dev(c, test_device());
    cpu.initialize(41);
    {
      runtime::NoGrad no_grad;
      runtime::Generator gen(42, 0);
      for (auto& p : cpu.named_parameters()) {  // the biases and LayerNorms away from their init
        Tensor noise = Tensor::empty(p.tensor.shape());
        gen.fill_normal(noise, 0.0f, 0.1f);
        p.tensor.copy_from(ops::add(p.tensor, noise));
      }
      const auto from = cpu.named_parameters();
      auto to = dev.named_parameters();
      for (size_t k = 0; k < from.size(); ++k) to[k].tensor.copy_from(from[k].tensor);
    }
    for (auto* m : {&cpu, &dev}) m->set_compute_dtype(DType::BF16);
    expect_device_tracks_cpu(cpu, dev, random_ids({4, 32}, c.vocab_size, 43), random_ids({4, 32}, c.vocab_size, 44),
                             in_norms ? "degree-4, biases in the norms" : "degree-4, biases in the products");
  }
}

}  // namespace
}  // namespace kraken::testing
