// Finite-difference checks of layernorm, embedding, softmax and cross-entropy, for every
// differentiable input (tolerances: see tests/support/gradcheck.h).
#include <gtest/gtest.h>

#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "tests/support/gradcheck.h"

namespace kraken::runtime {
namespace {

using testing::expect_gradients_match;
using testing::random_leaf;

// gamma around 1 and beta around 0, as after GPT-2's initialisation, but not exactly, so that a
// gradient that forgot gamma or beta cannot pass.
Tensor gamma_leaf(int64_t C, uint64_t seed) {
  Tensor g = random_leaf({C}, seed, 0.3f);
  {
    NoGrad no_grad;
    float* p = g.data<float>();
    for (int64_t c = 0; c < C; ++c) p[c] += 1.0f;
  }
  return g;
}

TEST(GradCheck, LayerNormInputGammaAndBeta) {
  expect_gradients_match([](const auto& in) { return ops::layernorm(in[0], in[1], in[2]); },
                         {random_leaf({2, 3, 8}, 31, 1.5f), gamma_leaf(8, 32), random_leaf({8}, 33, 0.5f)});
}

TEST(GradCheck, LayerNormOnlyGammaNeedsGrad) {
  Tensor x = random_leaf({5, 6}, 34);
  x.set_requires_grad(false);
  Tensor beta = random_leaf({6}, 36);
  beta.set_requires_grad(false);
  expect_gradients_match([](const auto& in) { return ops::layernorm(in[0], in[1], in[2]); },
                         {x, gamma_leaf(6, 35), beta});
}

TEST(GradCheck, LayerNormOnlyBetaNeedsGrad) {
  Tensor x = random_leaf({5, 6}, 37);
  x.set_requires_grad(false);
  Tensor gamma = gamma_leaf(6, 38);
  gamma.set_requires_grad(false);
  expect_gradients_match([](const auto& in) { return ops::layernorm(in[0], in[1], in[2]); },
                         {x, gamma, random_leaf({6}, 39)});
}

TEST(GradCheck, LayerNormWithoutBeta) {
  // The paper's Kraken models have no biases: LayerNorm is (x − μ)·rstd·gamma alone.
  expect_gradients_match([](const auto& in) { return ops::layernorm(in[0], in[1], Tensor()); },
                         {random_leaf({4, 7}, 40), gamma_leaf(7, 41)});
}

TEST(GradCheck, AddLayerNormThroughBothOutputs) {
  // Both outputs carry gradient (s continues the residual stream): the projection weighs s by 0.7.
  expect_gradients_match(
      [](const auto& in) {
        std::vector<Tensor> s_h = ops::add_layernorm(in[0], in[1], in[2], in[3]);
        return ops::add(ops::scale(s_h[0], 0.7f), s_h[1]);
      },
      {random_leaf({3, 5, 8}, 42), random_leaf({3, 5, 8}, 43), gamma_leaf(8, 44), random_leaf({8}, 45, 0.5f)});
}

TEST(GradCheck, AddLayerNormNormalisedOutputOnly) {
  // Kraken's m_i = attn_i + S feeds LN2 alone: the sum output takes no gradient.
  expect_gradients_match([](const auto& in) { return ops::add_layernorm(in[0], in[1], in[2], Tensor())[1]; },
                         {random_leaf({4, 6}, 46), random_leaf({4, 6}, 47), gamma_leaf(6, 48)});
}

TEST(GradCheck, AddBiasLayerNormThroughBothOutputs) {
  // GPT-2's s = a + (b + bias) with the projection's bias taken into the LayerNorm (f32 here; the GPU's
  // bf16 kernels are held to the chain's bits in tests/gpu/mlp_cuda_test.cpp), both outputs weighted.
  expect_gradients_match(
      [](const auto& in) {
        std::vector<Tensor> s_h = ops::add_bias_layernorm(in[0], in[1], in[2], in[3], in[4]);
        return ops::add(ops::scale(s_h[0], 0.7f), s_h[1]);
      },
      {random_leaf({3, 5, 8}, 56), random_leaf({3, 5, 8}, 57), random_leaf({8}, 58, 0.5f), gamma_leaf(8, 59),
       random_leaf({8}, 60, 0.5f)});
}

TEST(GradCheck, EmbeddingWeightWithRepeatedIds) {
  // id 1 appears three times and 3 twice, so the backward's accumulation is exercised; id 2 never.
  const Tensor ids = Tensor::from_ints({1, 3, 1, 4, 1, 0, 3, 4}, {2, 4});
  expect_gradients_match([ids](const auto& in) { return ops::embedding(in[0], ids); },
                         {random_leaf({5, 4}, 40)});
}

TEST(GradCheck, TokenPositionEmbeddingBothTables) {
  // GPT-2's x0 = wte[ids] + wpe[t] (f32 here; the GPU's bf16 kernel is held to the three ops' bits in
  // tests/gpu/nn_cuda_test.cpp): repeated ids, and wpe rows past T that take no gradient.
  const Tensor ids = Tensor::from_ints({1, 3, 1, 4, 1, 0, 3, 4}, {2, 4});
  expect_gradients_match(
      [ids](const auto& in) { return ops::token_position_embedding(in[0], in[1], ids, DType::F32); },
      {random_leaf({5, 4}, 46), random_leaf({6, 4}, 47)});
}

TEST(GradCheck, SummedResidualForkWithLayerNorm) {
  // The Kraken layer's {x + y, LN2_g(y + Σ_j x_j)} for 3 sub-layers, each with its gamma and beta.
  expect_gradients_match(
      [](const auto& in) {
        const std::vector<Tensor> a_h =
            ops::residual_fork_summed_layernorm(in[0], in[1], {in[2], in[3], in[4]}, {in[5], in[6], in[7]});
        return ops::add(ops::scale(a_h[0], 0.7f), a_h[1]);
      },
      {random_leaf({3, 2, 6}, 48), random_leaf({3, 2, 6}, 49), gamma_leaf(6, 50), gamma_leaf(6, 51),
       gamma_leaf(6, 52), random_leaf({6}, 53, 0.5f), random_leaf({6}, 54, 0.5f), random_leaf({6}, 55, 0.5f)});
}

TEST(GradCheck, Softmax) {
  expect_gradients_match([](const auto& in) { return ops::softmax(in[0]); }, {random_leaf({3, 7}, 41, 1.5f)});
}

TEST(GradCheck, SoftmaxThreeDimensional) {
  expect_gradients_match([](const auto& in) { return ops::softmax(in[0]); }, {random_leaf({2, 2, 5}, 42)});
}

TEST(GradCheck, CrossEntropyWithPaddingColumnsAndIgnoredRow) {
  // (B, T, Vp) = (2, 3, 10) with vocab 8: columns 8 and 9 are padding; row (0, 1) is ignored.
  const Tensor targets = Tensor::from_ints({2, -1, 7, 0, 5, 5}, {2, 3});
  testing::GradCheckOptions every_coordinate;
  every_coordinate.max_coords_per_input = 60;
  expect_gradients_match([targets](const auto& in) { return ops::cross_entropy(in[0], targets, 8, -1); },
                         {random_leaf({2, 3, 10}, 43, 2.0f)}, every_coordinate);
}

TEST(GradCheck, CrossEntropyTwoDimensionalAllColumns) {
  const Tensor targets = Tensor::from_ints({3, 0, 4, 4}, {4});
  expect_gradients_match([targets](const auto& in) { return ops::cross_entropy(in[0], targets); },
                         {random_leaf({4, 5}, 44, 2.0f)});
}

TEST(GradCheck, CrossEntropyAfterLayerNormAndEmbedding) {
  // The three ops chained as in GPT-2's head (embedding → layernorm → tied logits via matmul), so
  // gradients passing from one op's backward into another's are checked too.
  const Tensor ids = Tensor::from_ints({2, 0, 2}, {3});
  const Tensor targets = Tensor::from_ints({1, 2, 0}, {3});
  expect_gradients_match(
      [ids, targets](const auto& in) {
        Tensor h = ops::layernorm(ops::embedding(in[0], ids), in[1], in[2]);
        return ops::cross_entropy(ops::matmul(h, in[0], false, true), targets);
      },
      {random_leaf({4, 6}, 45), gamma_leaf(6, 46), random_leaf({6}, 47, 0.5f)});
}

}  // namespace
}  // namespace kraken::runtime
