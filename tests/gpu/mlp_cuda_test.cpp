// ops::mlp on the GPU in bf16: the fused path (GELU and gelu' in cuBLASLt's epilogues, and the bias
// gradients there at level 2) against the CPU's bf16 reference (the three ops on widened values, each
// output rounded once: runtime/ops/precision.h), the fusion levels against each other on the GPU, and
// the GPT-2 model's loss and gradients with the fusion on against it off. Skips without a GPU; the dry
// run (KRAKEN_GPU_TESTS_ON_CPU=1) runs the plumbing on the CPU, where every level is the three ops.
//
// Tolerances, relative to the reference tensor's largest magnitude (gpu_test_util.h). One bf16 ulp of
// the largest element is 2⁻⁷ of the scale: tests/gpu/mixed_precision_cuda_test.cpp's kOneUlp (8e-3)
// bounds one flipped rounding between two paths that round the same f32 quantities. The fused path
// rounds differently, not just in another order: forward, GELU reads the f32 pre-activation where the
// three ops read it rounded to bf16 (and pre itself is stored rounded, as before); backward, gelu'
// multiplies the f32 product dy·W_proj where the three ops multiply it rounded, and the bias sums add
// f32 values in cuBLASLt's order. Each is at most one more rounding (2⁻⁸ relative) of one input of an
// element, which moves the element by at most one more ulp: 2·kOneUlp = 1.6e-2 for everything. A layout
// or operand mistake (a transposed aux, a bias gradient over the wrong dimension) is an O(1) error.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "models/kraken.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "runtime/safetensors.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/support/fixtures.h"

namespace kraken::testing {
namespace {

using runtime::DType;
using runtime::Tensor;
namespace ops = runtime::ops;
using ops::EpilogueFusion;

constexpr double kTwoUlps = 1.6e-2;

Tensor bf16_leaf(const runtime::Shape& shape, uint64_t seed, float std = 1.0f) {
  Tensor t = random_tensor(shape, seed, std).to(DType::BF16);
  t.set_requires_grad(true);
  return t;
}

// x (B, T, C), W_fc (H, C) and W_proj (Co, H) scaled by 1/√fan-in so every stage is of order 1 (GELU's
// curved part, not its linear tail), biases of order 0.5; either bias may be left out.
std::vector<Tensor> block(int64_t B, int64_t T, int64_t C, int64_t H, int64_t Co, bool b_fc, bool b_proj,
                          uint64_t seed) {
  return {bf16_leaf({B, T, C}, seed), bf16_leaf({H, C}, seed + 1, 1.0f / std::sqrt(static_cast<float>(C))),
          b_fc ? bf16_leaf({H}, seed + 2, 0.5f) : Tensor(),
          bf16_leaf({Co, H}, seed + 3, 1.0f / std::sqrt(static_cast<float>(H))),
          b_proj ? bf16_leaf({Co}, seed + 4, 0.5f) : Tensor()};
}

Tensor mlp_op(const std::vector<Tensor>& v) { return ops::mlp(v[0], v[1], v[2], v[3], v[4]); }

const char* level_name(EpilogueFusion f) {
  switch (f) {
    case EpilogueFusion::kOff: return "fusion off";
    case EpilogueFusion::kGelu: return "GELU fused";
    case EpilogueFusion::kGeluAndBiasGrads: return "GELU and bias gradients fused";
    case EpilogueFusion::kGeluAndFcBiasGrad: return "GELU and c_fc's bias gradient fused";
  }
  return "?";
}

void expect_each_level_matches_cpu(const std::vector<Tensor>& inputs, const std::string& what) {
  for (EpilogueFusion f : {EpilogueFusion::kGeluAndBiasGrads, EpilogueFusion::kGeluAndFcBiasGrad, EpilogueFusion::kGelu,
                           EpilogueFusion::kOff}) {
    ops::EpilogueFusionScope scope(f);
    expect_matches_cpu(mlp_op, inputs, kTwoUlps, kTwoUlps, what + ", " + level_name(f));
  }
}

TEST(GpuMlp, FusedMatchesTheCpuAtGpt2sMlpShape) {
  KRAKEN_REQUIRE_GPU();
  // C = 768, H = 3072 (GPT-2 124M's MLP), 2 × 512 rows (the model's B·T = 8192 rows change the CPU
  // reference's time, not the GPU's layouts).
  expect_each_level_matches_cpu(block(2, 512, 768, 3072, 768, true, true, 1), "GPT-2 MLP (2, 512, 768)");
}

TEST(GpuMlp, OddShapesMatchTheCpu) {
  KRAKEN_REQUIRE_GPU();
  // 111 rows (odd: cuBLASLt's D has an odd number of columns), C = 48, H = 200 (a multiple of 8: fused).
  expect_each_level_matches_cpu(block(3, 37, 48, 200, 48, true, true, 11), "111 rows, H = 200");
  // H = 44 is not a multiple of 8: cuBLASLt's aux matrix cannot hold pre; the three ops run instead.
  expect_each_level_matches_cpu(block(3, 37, 20, 44, 20, true, true, 21), "H = 44 (the unfused path)");
  // Without biases (the Kraken presets), and without c_proj's (Megatron adds it after the all-reduce).
  expect_each_level_matches_cpu(block(1, 45, 32, 64, 32, false, false, 31), "no biases");
  expect_each_level_matches_cpu(block(1, 45, 32, 64, 24, true, false, 41), "no c_proj bias, Co = 24");
  // A single row, and an input that needs no gradient (only the weights' gradients are formed).
  expect_each_level_matches_cpu(block(1, 1, 16, 64, 16, true, true, 51), "one row");
  std::vector<Tensor> frozen = block(2, 9, 16, 64, 16, true, true, 61);
  frozen[0].set_requires_grad(false);
  expect_each_level_matches_cpu(frozen, "frozen input");
}

// A Kraken layer's sub-layers as one grouped block: x (G, B, T, C), weights (G, ·, ·), biases (G, ·) —
// every product one strided batch (GELU_AUX and DGELU with the aux and bias batch strides), against the
// CPU's per-group reference (tests/runtime/grouped_ops_test.cpp: the grouped CPU op is each group's own).
std::vector<Tensor> grouped_block(int64_t G, int64_t B, int64_t T, int64_t C, int64_t H, bool biases, uint64_t seed) {
  return {bf16_leaf({G, B, T, C}, seed), bf16_leaf({G, H, C}, seed + 1, 1.0f / std::sqrt(static_cast<float>(C))),
          biases ? bf16_leaf({G, H}, seed + 2, 0.5f) : Tensor(),
          bf16_leaf({G, C, H}, seed + 3, 1.0f / std::sqrt(static_cast<float>(H))),
          biases ? bf16_leaf({G, C}, seed + 4, 0.5f) : Tensor()};
}

TEST(GpuMlp, GroupedMatchesTheCpuAtEveryLevel) {
  KRAKEN_REQUIRE_GPU();
  // The Kraken 4-way preset's sub-layer MLP (C = 504, H = 1008, no biases) on 2 × 256 rows per group.
  expect_each_level_matches_cpu(grouped_block(4, 2, 256, 504, 1008, false, 81), "4 groups, Kraken preset MLP");
  // Biases (added per group), odd rows per group (37), two groups.
  expect_each_level_matches_cpu(grouped_block(2, 1, 37, 48, 200, true, 91), "2 groups of 37 rows, biases");
  // H = 44, not a multiple of 8: the three grouped ops.
  expect_each_level_matches_cpu(grouped_block(3, 1, 20, 16, 44, true, 101), "3 groups, H = 44 (unfused)");
}

TEST(GpuGroupedLinear, MatchesTheCpuWithAndWithoutBiases) {
  KRAKEN_REQUIRE_GPU();
  // Without biases one strided-batch product per direction; with them the forward is a product per group
  // with the bias in its epilogue (one rounding, as the CPU's; until the twenty-second session a pass after
  // the product, a second rounding), and the bias gradients one grouped column sum — or, at fusion level
  // 2, each group's in its weight-gradient product (BGRADB, a product per group). Two ulps, as above.
  auto linear_op = [](const std::vector<Tensor>& v) { return ops::linear(v[0], v[1], v[2]); };
  for (EpilogueFusion f : {EpilogueFusion::kGelu, EpilogueFusion::kGeluAndBiasGrads}) {
    ops::EpilogueFusionScope scope(f);
    for (bool bias : {false, true}) {
      const std::vector<Tensor> in = {bf16_leaf({4, 2, 128, 504}, 111), bf16_leaf({4, 1512, 504}, 112, 0.045f),
                                      bias ? bf16_leaf({4, 1512}, 113, 0.5f) : Tensor()};
      expect_matches_cpu(linear_op, in, kTwoUlps, kTwoUlps,
                         std::string("grouped linear, 4 × (256, 504)·(1512, 504)ᵀ") + (bias ? ", biases, " : ", ") +
                             level_name(f));
    }
    // 37 rows and 44 outputs a group: the strides (37 · 44, 44 elements) lose the 16 bytes, so level 2 takes
    // the column sums (and the forward adds the biases after one strided batch).
    const std::vector<Tensor> odd = {bf16_leaf({3, 1, 37, 48}, 114), bf16_leaf({3, 44, 48}, 115, 0.14f),
                                     bf16_leaf({3, 44}, 116, 0.5f)};
    expect_matches_cpu(linear_op, odd, kTwoUlps, kTwoUlps,
                       std::string("grouped linear, 3 × (37, 48)·(44, 48)ᵀ, biases, ") + level_name(f));
  }
}

// c_attn's keys' bias columns (ops::BiasColumns): on the GPU the column sums skip them (their dy unread) —
// grouped as a Kraken layer's, plain as GPT-2's, at fusion levels 1 and 2 (BGRADB sums them all, then they
// are zeroed) — and a shape the skipping sums decline (44 outputs) takes the full sums, then the zeros.
// Against the CPU's run of the same op: the zeros exact, the rest within two ulps as above.
TEST(GpuGroupedLinear, KeysBiasColumnsAreZerosAndTheRestMatchTheCpu) {
  KRAKEN_REQUIRE_GPU();
  for (EpilogueFusion f : {EpilogueFusion::kGelu, EpilogueFusion::kGeluAndBiasGrads}) {
    ops::EpilogueFusionScope scope(f);
    auto qkv_op = [](const std::vector<Tensor>& v) { return ops::linear(v[0], v[1], v[2], {504, 504}); };
    expect_matches_cpu(qkv_op,
                       {bf16_leaf({4, 2, 128, 504}, 131), bf16_leaf({4, 1512, 504}, 132, 0.045f),
                        bf16_leaf({4, 1512}, 133, 0.5f)},
                       kTwoUlps, kTwoUlps, std::string("grouped qkv linear, keys' bias columns, ") + level_name(f));
    expect_matches_cpu(qkv_op,
                       {bf16_leaf({2, 128, 504}, 134), bf16_leaf({1512, 504}, 135, 0.045f), bf16_leaf({1512}, 136, 0.5f)},
                       kTwoUlps, kTwoUlps, std::string("qkv linear, keys' bias columns, ") + level_name(f));
    {  // the keys' columns exact zeros on the device itself (the comparison above is within two ulps)
      const Tensor x = to_test_device(bf16_leaf({4, 2, 128, 504}, 131));
      const Tensor w = to_test_device(bf16_leaf({4, 1512, 504}, 132, 0.045f));
      const Tensor b = to_test_device(bf16_leaf({4, 1512}, 133, 0.5f));
      const Tensor y = ops::linear(x, w, b, {504, 504});
      runtime::backward(ops::sum(ops::mul(ops::cast(y, DType::F32), random_tensor(y.shape(), 140).to(test_device()))));
      const std::vector<float> db = b.grad().to(DType::F32).to_vector();
      for (int64_t g = 0; g < 4; ++g)
        for (int64_t c = 504; c < 1008; ++c)
          ASSERT_EQ(db[static_cast<size_t>(g * 1512 + c)], 0.0f)
              << "keys' bias gradient, group " << g << ", column " << c << ", " << level_name(f);
    }
    auto odd_op = [](const std::vector<Tensor>& v) { return ops::linear(v[0], v[1], v[2], {8, 16}); };
    expect_matches_cpu(odd_op,
                       {bf16_leaf({3, 1, 37, 48}, 137), bf16_leaf({3, 44, 48}, 138, 0.14f), bf16_leaf({3, 44}, 139, 0.5f)},
                       kTwoUlps, kTwoUlps, std::string("grouped linear, 3 × (37, 48)·(44, 48)ᵀ, zero columns, ") +
                                               level_name(f));
  }
}

// The Kraken layer's residual fork (a = X + attn, m = attn + S) in one kernel each way on the GPU; the
// CPU's reference is the two adds, each rounded once, and the engine's sums: the same bits, outputs and
// the gradients of X, attn and S. Block length 504 (the preset's C) takes the kernels; 500 (not a
// multiple of 8) the two adds on the GPU too.
TEST(GpuResidualFork, IsTheTwoAddsBitForBit) {
  KRAKEN_REQUIRE_GPU();
  auto fork_op = [](const std::vector<Tensor>& v) {
    const std::vector<Tensor> a_m = ops::residual_fork(v[0], v[1], v[2]);
    return ops::concat(a_m, 0);
  };
  for (const int64_t C : {int64_t{504}, int64_t{500}}) {
    const std::vector<Tensor> in = {bf16_leaf({4, 2, 64, C}, 121), bf16_leaf({4, 2, 64, C}, 122),
                                    bf16_leaf({2, 64, C}, 123)};
    expect_matches_cpu(fork_op, in, 0.0, 0.0, "residual fork, 4 × (2, 64, " + std::to_string(C) + ")");
  }
}

// The fork with S = Σ_g X[g] summed in its own kernel (ops::residual_fork_summed) against the CPU's chain
// (sum_stack, the two adds; the engine's sums), bit for bit: outputs and the gradients of X and attn. 4
// blocks of 504 take the kernels; 500 (not a multiple of 8) and 9 blocks (more than the kernels hold)
// the chain on the GPU too.
TEST(GpuResidualFork, SummedIsTheChainBitForBit) {
  KRAKEN_REQUIRE_GPU();
  auto fork_op = [](const std::vector<Tensor>& v) { return ops::concat(ops::residual_fork_summed(v[0], v[1]), 0); };
  for (const auto& [G, C] : {std::pair<int64_t, int64_t>{4, 504}, std::pair<int64_t, int64_t>{4, 500},
                             std::pair<int64_t, int64_t>{9, 504}}) {
    const std::vector<Tensor> in = {bf16_leaf({G, 2, 64, C}, 124), bf16_leaf({G, 2, 64, C}, 125)};
    expect_matches_cpu(fork_op, in, 0.0, 0.0,
                       "summed residual fork, " + std::to_string(G) + " × (2, 64, " + std::to_string(C) + ")");
  }
}

// The fork with S summed in it and LN2 in one kernel (ops::residual_fork_summed_layernorm) against its
// two ops on the same GPU, bit for bit: a, LN2's output, and the gradients of X, attn and each sub-layer's
// gamma and beta (the backward one kernel too, residual_fork_summed_layernorm_backward_bf16_cuda, whose
// dgamma and dbeta sums take 192 KiB of shared memory a block at 4 × 768: the emulation allows what Hopper
// does, a GPU is the check). 4 groups of C = 504 (the preset's), 2 and 4 of 768 (GPT-2's width at degree 4),
// with and without betas.
TEST(GpuResidualFork, SummedWithLayerNormIsTheTwoOpsBitForBit) {
  KRAKEN_REQUIRE_GPU();  // (in the dry run on the CPU both sides are the two ops)
  for (const auto& [G, C] : {std::pair<int64_t, int64_t>{4, 504}, std::pair<int64_t, int64_t>{2, 768},
                             std::pair<int64_t, int64_t>{4, 768}}) {
    for (const bool with_betas : {true, false}) {
      const std::string what = std::to_string(G) + " × (2, 64, " + std::to_string(C) + ")" + (with_betas ? "" : ", no betas");
      const Tensor weights = random_tensor({G, 2, 64, C}, 126).to(test_device());
      std::vector<std::vector<Tensor>> outputs, grads;
      for (const bool fused : {true, false}) {
        const Tensor x = to_test_device(bf16_leaf({G, 2, 64, C}, 127)), y = to_test_device(bf16_leaf({G, 2, 64, C}, 128));
        std::vector<Tensor> gammas, betas, params{x, y};
        for (int64_t g = 0; g < G; ++g) {
          Tensor gamma = random_tensor({C}, 129 + static_cast<uint64_t>(g), 0.5f).to(test_device());
          gamma.set_requires_grad(true);
          gammas.push_back(gamma);
          params.push_back(gamma);
          if (with_betas) {
            Tensor beta = random_tensor({C}, 139 + static_cast<uint64_t>(g), 0.5f).to(test_device());
            beta.set_requires_grad(true);
            betas.push_back(beta);
            params.push_back(beta);
          }
        }
        std::vector<Tensor> a_h;
        if (fused) {
          a_h = ops::residual_fork_summed_layernorm(x, y, gammas, betas);
        } else {
          const std::vector<Tensor> a_m = ops::residual_fork_summed(x, y);
          a_h = {a_m[0], ops::layernorm(a_m[1], gammas, betas)};
        }
        runtime::backward(ops::sum(ops::mul(ops::cast(ops::add(a_h[0], a_h[1]), DType::F32), weights)));
        outputs.push_back({a_h[0].to(DType::F32), a_h[1].to(DType::F32)});
        std::vector<Tensor> g;
        for (const Tensor& p : params) g.push_back(p.grad().to(DType::F32));
        grads.push_back(g);
      }
      expect_close(outputs[0][0], outputs[1][0], 0.0, "a, " + what);
      expect_close(outputs[0][1], outputs[1][1], 0.0, "LN2's output, " + what);
      for (size_t k = 0; k < grads[0].size(); ++k)
        expect_close(grads[0][k], grads[1][k], 0.0, "gradient of input " + std::to_string(k) + ", " + what);
    }
  }
}

// A product's bias taken into the LayerNorm after the residual add (ops::add_bias_layernorm) against its
// chain, add(a, add(b, bias)) then layernorm, on the same GPU: s, the output and the gradients of a, b,
// gamma and beta bit for bit (the kernels' arithmetic is the chain's); the bias's gradient, summed in the
// LayerNorm backward's pass in another order, within one bf16 ulp of each column and 10⁻⁵ of the scale.
// 4 × 1024 rows of C = 768 (GPT-2's; a gradient reaching s from the residual stream too) and of 504, and
// C = 1032, where the backward's one pass declines and the column sums take the bias's gradient; and the
// grouped op at GPT-2's shape at degree 4 (4 sub-layers of 1024 rows, each its bias, gamma and beta: the
// MLP projections' biases in the next layer's LN1) against each group's chain.
TEST(GpuAddBiasLayerNorm, IsTheChainsBitsAndItsBiasGradientWithinRounding) {
  KRAKEN_REQUIRE_GPU();  // (in the dry run on the CPU both sides are the chain)
  struct Case {
    int64_t G, C;
  };
  for (const Case k : {Case{1, 768}, Case{1, 504}, Case{1, 1032}, Case{4, 768}}) {
    const int64_t G = k.G, C = k.C;
    const std::string what = "(4, 1024, " + std::to_string(C) + "), " + std::to_string(G) + (G == 1 ? " group" : " groups");
    const Tensor weights_s = random_tensor({4, 1024, C}, 151).to(test_device());
    const Tensor weights_out = random_tensor({4, 1024, C}, 152).to(test_device());
    std::vector<std::vector<Tensor>> outputs, grads;
    for (const bool fused : {true, false}) {
      const Tensor a = to_test_device(bf16_leaf({4, 1024, C}, 153, 2.0f)), b = to_test_device(bf16_leaf({4, 1024, C}, 154));
      const Tensor bias = to_test_device(bf16_leaf(G == 1 ? runtime::Shape{C} : runtime::Shape{G, C}, 155, 0.5f));
      std::vector<Tensor> gammas, betas;
      for (int64_t g = 0; g < G; ++g) {
        gammas.push_back(random_tensor({C}, 156 + 2 * g, 0.5f).to(test_device()));
        betas.push_back(random_tensor({C}, 157 + 2 * g, 0.5f).to(test_device()));
        gammas.back().set_requires_grad(true);
        betas.back().set_requires_grad(true);
      }
      std::vector<Tensor> s_out;
      if (fused) {
        s_out = ops::add_bias_layernorm(a, b, bias, gammas, betas);
      } else if (G == 1) {
        const Tensor s = ops::add(a, ops::add(b, bias));
        s_out = {s, ops::layernorm(s, gammas[0], betas[0])};
      } else {
        auto part = [](const Tensor& t, int64_t g) {
          return ops::reshape(ops::slice(t, g, g + 1), runtime::Shape(t.shape().begin() + 1, t.shape().end()));
        };
        std::vector<Tensor> ss, outs;
        for (int64_t g = 0; g < G; ++g) {
          const Tensor s = ops::add(part(a, g), ops::add(part(b, g), part(bias, g)));
          // The LayerNorm recorded before s's other consumer: the tape runs the newest node first, so s's
          // gradient through the reshape has arrived when the LayerNorm's backward adds its own to it —
          // rounded once, as the fused op does. (Recorded after it, the LayerNorm's ∂x was rounded on its
          // own and then added to the reshape's gradient: a second rounding, not the fused op's bits.)
          const Tensor h = ops::layernorm(s, gammas[static_cast<size_t>(g)], betas[static_cast<size_t>(g)]);
          ss.push_back(ops::reshape(s, {1, 1024, C}));
          outs.push_back(ops::reshape(h, {1, 1024, C}));
        }
        s_out = {ops::concat(ss, 0), ops::concat(outs, 0)};
      }
      runtime::backward(ops::add(ops::sum(ops::mul(ops::cast(s_out[0], DType::F32), weights_s)),
                                 ops::sum(ops::mul(ops::cast(s_out[1], DType::F32), weights_out))));
      outputs.push_back({s_out[0].to(DType::F32), s_out[1].to(DType::F32)});
      std::vector<Tensor> run_grads{a.grad().to(DType::F32), b.grad().to(DType::F32), bias.grad().to(DType::F32)};
      for (int64_t g = 0; g < G; ++g) {
        run_grads.push_back(gammas[static_cast<size_t>(g)].grad().to(DType::F32));
        run_grads.push_back(betas[static_cast<size_t>(g)].grad().to(DType::F32));
      }
      grads.push_back(run_grads);
    }
    expect_close(outputs[0][0], outputs[1][0], 0.0, "s = a + (b + bias), " + what);
    expect_close(outputs[0][1], outputs[1][1], 0.0, "layernorm(s), " + what);
    expect_close(grads[0][0], grads[1][0], 0.0, "da, " + what);
    expect_close(grads[0][1], grads[1][1], 0.0, "db, " + what);
    for (size_t k = 3; k < grads[0].size(); ++k)
      expect_close(grads[0][k], grads[1][k], 0.0,
                   std::string(k % 2 == 1 ? "dgamma" : "dbeta") + " of group " + std::to_string((k - 3) / 2) + ", " + what);
    testing::expect_within_ulp(grads[0][2].to_vector(), grads[1][2].to_vector(), testing::kOneBf16Ulp,
                               1e-5, "dbias, " + what);
  }
}

// Output and gradients of one run at `fusion` on the test device.
struct DeviceRun {
  Tensor out;
  std::vector<Tensor> grads;
};
DeviceRun run_on_device(const std::vector<Tensor>& cpu_inputs, EpilogueFusion fusion) {
  ops::EpilogueFusionScope scope(fusion);
  std::vector<Tensor> inputs;
  for (const Tensor& t : cpu_inputs) inputs.push_back(t.defined() ? to_test_device(t) : Tensor());
  DeviceRun r;
  r.out = mlp_op(inputs);
  Tensor seed = random_tensor(r.out.shape(), 77).to(DType::BF16).to(test_device());
  runtime::backward(r.out, seed);
  for (const Tensor& t : inputs) r.grads.push_back(t.defined() && t.requires_grad() ? t.grad() : Tensor());
  return r;
}

TEST(GpuMlp, FusionLevelsAgreeOnTheGpu) {
  KRAKEN_REQUIRE_GPU();
  const std::vector<Tensor> inputs = block(4, 256, 768, 3072, 768, true, true, 71);
  const DeviceRun off = run_on_device(inputs, EpilogueFusion::kOff);
  const char* names[] = {"dx", "dW_fc", "db_fc", "dW_proj", "db_proj"};
  for (EpilogueFusion f : {EpilogueFusion::kGelu, EpilogueFusion::kGeluAndBiasGrads, EpilogueFusion::kGeluAndFcBiasGrad}) {
    const DeviceRun fused = run_on_device(inputs, f);
    const std::string what = std::string(level_name(f)) + " against the fusion off, on the device: ";
    expect_close(fused.out, off.out, kTwoUlps, what + "output");
    for (size_t k = 0; k < inputs.size(); ++k) expect_close(fused.grads[k], off.grads[k], kTwoUlps, what + names[k]);
  }
  // The same level twice: bit for bit (cuBLASLt's results are reproducible on one GPU and stream).
  const DeviceRun a = run_on_device(inputs, EpilogueFusion::kGeluAndBiasGrads);
  const DeviceRun b = run_on_device(inputs, EpilogueFusion::kGeluAndBiasGrads);
  expect_close(a.out, b.out, 0.0, "fused output, run twice");
  for (size_t k = 0; k < inputs.size(); ++k) expect_close(a.grads[k], b.grads[k], 0.0, std::string("fused ") + names[k] + ", run twice");
}

// GPT-2 (degree 1) in mixed precision on the device: loss and f32 master gradients with the MLP fused
// against the fusion off. The two differ in rounding inside every MLP, which travels through the layers
// as in tests/gpu/mixed_precision_cuda_test.cpp (2e-2 of a gradient's norm bounds two bf16 runs).
void expect_model_levels_agree(const models::KrakenConfig& c, const Tensor& ids, const Tensor& targets,
                               uint64_t init_seed, const std::string& what) {
  struct Result {
    float loss;
    std::vector<std::vector<float>> grads;
    std::vector<std::string> names;
  };
  auto train_step = [&](EpilogueFusion f) {
    ops::EpilogueFusionScope scope(f);
    models::KrakenModel cpu_init(c);
    cpu_init.initialize(init_seed);
    models::KrakenModel model(c, test_device());
    auto src = cpu_init.named_parameters(), dst = model.named_parameters();
    for (size_t i = 0; i < src.size(); ++i) dst[i].tensor.copy_from(src[i].tensor);
    model.set_compute_dtype(DType::BF16);
    Tensor loss = model.loss(ids.to(test_device()), targets.to(test_device()), nullptr, false);
    runtime::backward(loss);
    Result r;
    r.loss = loss.item();
    for (auto& p : model.named_parameters()) r.grads.push_back(p.tensor.grad().to_vector()), r.names.push_back(p.name);
    return r;
  };
  const Result off = train_step(EpilogueFusion::kOff);
  for (EpilogueFusion f : {EpilogueFusion::kGelu, EpilogueFusion::kGeluAndBiasGrads}) {
    const Result on = train_step(f);
    EXPECT_NEAR(on.loss, off.loss, 1e-3 * std::fabs(off.loss)) << what << ", " << level_name(f);
    std::printf("[gpu-fused-vs-unfused] %s, %s: loss %.6f, unfused %.6f\n", what.c_str(), level_name(f), on.loss, off.loss);
    double worst = 0.0;
    std::string worst_name;
    for (size_t k = 0; k < off.grads.size(); ++k) {
      double diff = 0.0, norm = 0.0;
      for (size_t i = 0; i < off.grads[k].size(); ++i) {
        const double d = static_cast<double>(on.grads[k][i]) - off.grads[k][i];
        diff += d * d;
        norm += static_cast<double>(off.grads[k][i]) * off.grads[k][i];
      }
      const double rel = std::sqrt(diff / std::max(norm, 1e-30));
      EXPECT_LT(rel, 2e-2) << what << ", " << level_name(f) << ": gradient of " << off.names[k];
      if (!(rel <= worst)) worst = rel, worst_name = off.names[k];
    }
    std::printf("[gpu-fused-vs-unfused] %s, %s: worst gradient relative norm difference %.2e (%s)\n", what.c_str(),
                level_name(f), worst, worst_name.c_str());
  }
}

TEST(GpuMlp, Gpt2LossAndGradientsMatchTheUnfusedPath) {
  KRAKEN_REQUIRE_GPU();
  // GPT-2's widths (C = 768, H = 3072, 12 heads) at 2 layers, 2 × 128 tokens and a small vocabulary.
  models::KrakenConfig c;
  c.n_layer = 2;
  c.context = 128;
  c.vocab_size = 1000;
  const Tensor ids = random_ids({2, 128}, c.vocab_size, 81), targets = random_ids({2, 128}, c.vocab_size, 82);
  expect_model_levels_agree(c, ids, targets, 83, "GPT-2 widths, 2 layers");
  // The golden tiny GPT-2 (C = 32, H = 128): the fused path at a small shape.
  runtime::SafetensorsFile file = runtime::SafetensorsFile::open(source_path("tests/models/fixtures/gpt2_tiny.safetensors"));
  expect_model_levels_agree(fixture_config(file), file.load("input.ids"), file.load("input.targets"), 84,
                            "gpt2_tiny");
}

}  // namespace
}  // namespace kraken::testing
