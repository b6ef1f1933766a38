// The grouped forms of linear and mlp (a leading group dimension G on the weights and the input: a Kraken
// layer's sub-layers stacked), of layernorm, add_layernorm and add_bias_layernorm (x (G, ..., C), one gamma
// and beta per group; a bias (G, C)), sum_stack and stack_many, on the CPU: each equals its
// per-group ops — every group's own slice of the input and weights through the plain op — bit for bit,
// output and every gradient, in f32 and in bf16 (the CPU's widening path), at every EpilogueFusion
// setting; their gradients against central finite differences; G = 1 is the plain op; their errors.
// The CUDA paths (one strided batch per product) are checked against these on a GPU
// (tests/gpu/mlp_cuda_test.cpp).
#include <gtest/gtest.h>

#include <functional>

#include "kernels/elementwise.h"
#include "runtime/allocator.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "tests/support/errors.h"
#include "tests/support/gradcheck.h"
#include "tests/support/op_runs.h"

namespace kraken::runtime {
namespace {

using testing::expect_gradients_match;
using testing::message_of;
using testing::OpFn;
using testing::OpRun;
using testing::random_leaf;
using testing::run_op;

constexpr int64_t kGroups = 3;

Tensor leaf(const Shape& shape, uint64_t seed, float std, DType dtype = DType::F32) {
  Tensor t = random_leaf(shape, seed, std);
  t.set_requires_grad(false);
  if (dtype != DType::F32) t = t.to(dtype);
  t.set_requires_grad(true);
  return t;
}

OpRun run(const OpFn& f, const std::vector<Tensor>& inputs) { return run_op(f, inputs); }

void expect_bits_equal(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  testing::expect_bits_equal(got, want, what, "the per-group ops");
}

void expect_same_run(const OpRun& got, const OpRun& want, const std::string& what) {
  expect_bits_equal(got.out, want.out, what + ": output");
  ASSERT_EQ(got.grads.size(), want.grads.size());
  for (size_t k = 0; k < got.grads.size(); ++k)
    expect_bits_equal(got.grads[k], want.grads[k], what + ": gradient of input " + std::to_string(k));
}

// Group g of a grouped tensor (undefined stays undefined), through ops (so gradients flow back).
Tensor group(const Tensor& t, int64_t g) {
  if (!t.defined()) return t;
  return ops::reshape(ops::slice(t, g, g + 1), Shape(t.shape().begin() + 1, t.shape().end()));
}

// f over each group's slices of every input, the results stacked back along a new first dimension.
Tensor per_group(const std::function<Tensor(const std::vector<Tensor>&)>& f, const std::vector<Tensor>& in) {
  std::vector<Tensor> outs;
  for (int64_t g = 0; g < kGroups; ++g) {
    std::vector<Tensor> slices;
    for (const Tensor& t : in) slices.push_back(group(t, g));
    Tensor y = f(slices);
    Shape one = y.shape();
    one.insert(one.begin(), 1);
    outs.push_back(ops::reshape(y, one));
  }
  return ops::concat(outs, 0);
}

Tensor linear_op(const std::vector<Tensor>& v) { return ops::linear(v[0], v[1], v[2]); }
Tensor mlp_op(const std::vector<Tensor>& v) { return ops::mlp(v[0], v[1], v[2], v[3], v[4]); }
// The LayerNorms take one gamma and beta per group: inputs {x (G, ..., C), gamma_0 … gamma_{G−1},
// beta_0 … beta_{G−1}} (add_layernorm: {a, b, gammas…, betas…}); `operands` of them come first.
std::vector<Tensor> params_of(const std::vector<Tensor>& v, size_t operands, size_t first) {
  return std::vector<Tensor>(v.begin() + static_cast<std::ptrdiff_t>(operands + first),
                             v.begin() + static_cast<std::ptrdiff_t>(operands + first + kGroups));
}
Tensor layernorm_op(const std::vector<Tensor>& v) {
  return ops::layernorm(v[0], params_of(v, 1, 0), params_of(v, 1, kGroups));
}
// Both outputs of add_layernorm, so each one's gradient path is exercised.
Tensor add_layernorm_op(const std::vector<Tensor>& v) {
  std::vector<Tensor> s_out = ops::add_layernorm(v[0], v[1], params_of(v, 2, 0), params_of(v, 2, kGroups));
  return ops::add(ops::scale(s_out[0], 0.5f), s_out[1]);
}
// add_bias_layernorm's inputs: {a, b, bias (G, C), gammas…, betas…}; both outputs again.
Tensor add_bias_layernorm_op(const std::vector<Tensor>& v) {
  std::vector<Tensor> s_out =
      ops::add_bias_layernorm(v[0], v[1], v[2], params_of(v, 3, 0), params_of(v, 3, kGroups));
  return ops::add(ops::scale(s_out[0], 0.5f), s_out[1]);
}
// The same with each group's own plain op, stacked back.
Tensor layernorm_per_group(const std::vector<Tensor>& v) {
  std::vector<Tensor> outs;
  for (int64_t g = 0; g < kGroups; ++g)
    outs.push_back(ops::reshape(ops::layernorm(group(v[0], g), v[1 + g], v[1 + kGroups + g]), {1, 4, 10}));
  return ops::concat(outs, 0);
}
Tensor add_layernorm_per_group(const std::vector<Tensor>& v) {
  std::vector<Tensor> outs;
  for (int64_t g = 0; g < kGroups; ++g) {
    std::vector<Tensor> s_out = ops::add_layernorm(group(v[0], g), group(v[1], g), v[2 + g], v[2 + kGroups + g]);
    outs.push_back(ops::reshape(ops::add(ops::scale(s_out[0], 0.5f), s_out[1]), {1, 4, 10}));
  }
  return ops::concat(outs, 0);
}

Tensor add_bias_layernorm_per_group(const std::vector<Tensor>& v) {
  std::vector<Tensor> outs;
  for (int64_t g = 0; g < kGroups; ++g) {
    std::vector<Tensor> s_out = ops::add_bias_layernorm(group(v[0], g), group(v[1], g), group(v[2], g), v[3 + g],
                                                        v[3 + kGroups + g]);
    outs.push_back(ops::reshape(ops::add(ops::scale(s_out[0], 0.5f), s_out[1]), {1, 4, 10}));
  }
  return ops::concat(outs, 0);
}

std::vector<Tensor> linear_inputs(DType dtype, bool bias, uint64_t seed) {
  return {leaf({kGroups, 2, 5, 8}, seed, 1.0f, dtype), leaf({kGroups, 6, 8}, seed + 1, 0.4f, dtype),
          bias ? leaf({kGroups, 6}, seed + 2, 0.5f, dtype) : Tensor()};
}
std::vector<Tensor> mlp_inputs(DType dtype, bool biases, uint64_t seed) {
  return {leaf({kGroups, 2, 3, 8}, seed, 1.0f, dtype), leaf({kGroups, 16, 8}, seed + 1, 0.4f, dtype),
          biases ? leaf({kGroups, 16}, seed + 2, 0.5f, dtype) : Tensor(), leaf({kGroups, 8, 16}, seed + 3, 0.3f, dtype),
          biases ? leaf({kGroups, 8}, seed + 4, 0.5f, dtype) : Tensor()};
}
// LayerNorm parameters stay f32 under mixed precision.
std::vector<Tensor> layernorm_inputs(DType dtype, bool beta, uint64_t seed) {
  std::vector<Tensor> in = {leaf({kGroups, 4, 10}, seed, 1.5f, dtype)};
  for (int64_t g = 0; g < kGroups; ++g) in.push_back(leaf({10}, seed + 1 + g, 1.0f));
  for (int64_t g = 0; g < kGroups; ++g) in.push_back(beta ? leaf({10}, seed + 11 + g, 1.0f) : Tensor());
  return in;
}
std::vector<Tensor> add_layernorm_inputs(DType dtype, uint64_t seed) {
  std::vector<Tensor> in = {leaf({kGroups, 4, 10}, seed, 1.0f, dtype), leaf({kGroups, 4, 10}, seed + 1, 1.0f, dtype)};
  for (int64_t g = 0; g < 2 * kGroups; ++g) in.push_back(leaf({10}, seed + 2 + g, 1.0f));
  return in;
}

std::vector<Tensor> add_bias_layernorm_inputs(DType dtype, uint64_t seed) {
  std::vector<Tensor> in = {leaf({kGroups, 4, 10}, seed, 1.0f, dtype), leaf({kGroups, 4, 10}, seed + 1, 1.0f, dtype),
                            leaf({kGroups, 10}, seed + 2, 0.5f, dtype)};
  for (int64_t g = 0; g < 2 * kGroups; ++g) in.push_back(leaf({10}, seed + 3 + g, 1.0f));
  return in;
}

TEST(GroupedOps, LinearIsEachGroupsOwnLinearBitForBit) {
  for (DType dtype : {DType::F32, DType::BF16})
    for (bool bias : {true, false}) {
      const auto in = linear_inputs(dtype, bias, dtype == DType::F32 ? 1 : 11);
      const std::string what = std::string(dtype_name(dtype)) + (bias ? ", bias" : ", no bias");
      expect_same_run(run(linear_op, in), run([](const auto& v) { return per_group(linear_op, v); }, in), what);
    }
}

// linear's zero_grad columns (ops::BiasColumns): output, dx and dW the bits of the run without them, the
// bias's gradient too but for those columns of every group, exact zeros — grouped and plain, f32 and bf16.
TEST(GroupedOps, LinearZeroGradColumnsAreZerosAndTheRestItsBits) {
  const ops::BiasColumns zero{2, 3};
  for (DType dtype : {DType::F32, DType::BF16})
    for (bool grouped : {true, false}) {
      const std::string what = std::string(dtype_name(dtype)) + (grouped ? ", grouped" : ", plain");
      std::vector<Tensor> in = linear_inputs(dtype, true, dtype == DType::F32 ? 21 : 31);
      if (!grouped)
        for (Tensor& t : in) t = ops::reshape(ops::slice(t, 1, 2), Shape(t.shape().begin() + 1, t.shape().end())).detach();
      for (Tensor& t : in) t.set_requires_grad(true);
      const OpRun summed = run(linear_op, in);
      const OpRun skipped = run([&](const auto& v) { return ops::linear(v[0], v[1], v[2], zero); }, in);
      expect_bits_equal(skipped.out, summed.out, what + ": output");
      expect_bits_equal(skipped.grads[0], summed.grads[0], what + ": dx");
      expect_bits_equal(skipped.grads[1], summed.grads[1], what + ": dW");
      std::vector<float> want = summed.grads[2];
      const int64_t cols = 6;
      for (size_t g = 0; g < want.size() / cols; ++g)
        for (int64_t c = zero.first; c < zero.first + zero.count; ++c) want[g * cols + static_cast<size_t>(c)] = 0.0f;
      expect_bits_equal(skipped.grads[2], want, what + ": db");
    }
}

// An f32 bias takes its gradient into its own (accumulating) buffer: the zero_grad columns get nothing
// added — what an earlier backward left there stays — and the others their sums, as without them.
TEST(GroupedOps, LinearZeroGradColumnsAddNothingToAnAccumulatedGradient) {
  Tensor x = leaf({5, 8}, 41, 1.0f), w = leaf({6, 8}, 42, 0.4f), b = leaf({6}, 43, 0.5f);
  backward(ops::sum(ops::linear(x, w, b)));  // every column of b.grad is now 5 (the rows)
  const std::vector<float> first = b.grad().to_vector();
  Tensor seed = leaf({5, 6}, 44, 1.0f).detach();
  backward(ops::linear(x, w, b, {1, 2}), seed);
  const std::vector<float> got = b.grad().to_vector(), s = seed.to_vector();
  for (int64_t c = 0; c < 6; ++c) {
    float sum = 0.0f;
    for (int64_t r = 0; r < 5; ++r) sum += s[static_cast<size_t>(r * 6 + c)];
    const bool zeroed = c == 1 || c == 2;
    EXPECT_EQ(got[static_cast<size_t>(c)], zeroed ? first[static_cast<size_t>(c)] : first[static_cast<size_t>(c)] + sum)
        << "column " << c;
  }
}

TEST(GroupedOps, MlpIsEachGroupsOwnMlpBitForBitAtEveryFusionLevel) {
  for (ops::EpilogueFusion fusion :
       {ops::EpilogueFusion::kOff, ops::EpilogueFusion::kGelu, ops::EpilogueFusion::kGeluAndBiasGrads,
        ops::EpilogueFusion::kGeluAndFcBiasGrad}) {
    ops::EpilogueFusionScope scope(fusion);
    for (DType dtype : {DType::F32, DType::BF16})
      for (bool biases : {true, false}) {
        const auto in = mlp_inputs(dtype, biases, dtype == DType::F32 ? 21 : 31);
        const std::string what = std::string(dtype_name(dtype)) + (biases ? ", biases" : ", no biases") +
                                 ", fusion " + std::to_string(static_cast<int>(fusion));
        expect_same_run(run(mlp_op, in), run([](const auto& v) { return per_group(mlp_op, v); }, in), what);
      }
  }
}

TEST(GroupedOps, LayerNormsAreEachGroupsOwnBitForBit) {
  for (DType dtype : {DType::F32, DType::BF16}) {
    for (bool beta : {true, false}) {
      const auto in = layernorm_inputs(dtype, beta, dtype == DType::F32 ? 41 : 51);
      expect_same_run(run(layernorm_op, in), run(layernorm_per_group, in),
                      std::string("layernorm, ") + dtype_name(dtype) + (beta ? ", beta" : ", no beta"));
    }
    const auto in = add_layernorm_inputs(dtype, dtype == DType::F32 ? 61 : 71);
    expect_same_run(run(add_layernorm_op, in), run(add_layernorm_per_group, in),
                    std::string("add_layernorm, ") + dtype_name(dtype));
    const auto biased = add_bias_layernorm_inputs(dtype, dtype == DType::F32 ? 81 : 91);
    expect_same_run(run(add_bias_layernorm_op, biased), run(add_bias_layernorm_per_group, biased),
                    std::string("add_bias_layernorm, ") + dtype_name(dtype));
  }
}

TEST(GroupedOps, SumStackIsTheSumListOfTheBlocks) {
  for (DType dtype : {DType::F32, DType::BF16}) {
    const std::vector<Tensor> in = {leaf({4, 3, 5}, 81, 1.0f, dtype)};
    const OpRun got = run([](const auto& v) { return ops::sum_stack(v[0]); }, in);
    const OpRun want = run(
        [](const auto& v) {
          std::vector<Tensor> blocks;
          for (int64_t g = 0; g < 4; ++g) blocks.push_back(group(v[0], g));
          return ops::sum_list(blocks);
        },
        in);
    expect_same_run(got, want, std::string("sum_stack, ") + dtype_name(dtype));
  }
}

// Group 0 of t as a leaf of one group (1, ...), requiring grad.
Tensor first_group(const Tensor& t) {
  if (!t.defined()) return t;
  Tensor one = ops::slice(t.detach(), 0, 1).clone();
  one.set_requires_grad(true);
  return one;
}

TEST(GroupedOps, OneGroupIsThePlainOpBitForBit) {
  // G = 1 runs the plain op on views: the same bits as the ungrouped call on the same values.
  const auto in = mlp_inputs(DType::F32, true, 91);
  std::vector<Tensor> one;
  for (const Tensor& t : in) one.push_back(first_group(t));
  const OpRun grouped = run(mlp_op, one);
  const OpRun plain = run([](const auto& v) { return mlp_op({group(v[0], 0), group(v[1], 0), group(v[2], 0),
                                                           group(v[3], 0), group(v[4], 0)}); },
                        one);
  expect_same_run(grouped, plain, "mlp, one group");
  const auto lin = linear_inputs(DType::F32, true, 93);
  std::vector<Tensor> lin_one;
  for (const Tensor& t : lin) lin_one.push_back(first_group(t));
  expect_same_run(run(linear_op, lin_one),
                  run([](const auto& v) { return linear_op({group(v[0], 0), group(v[1], 0), group(v[2], 0)}); },
                      lin_one),
                  "linear, one group");
}

TEST(GradCheck, GroupedLinearWithBias) { expect_gradients_match(linear_op, linear_inputs(DType::F32, true, 101)); }

TEST(GradCheck, GroupedMlp) {
  for (ops::EpilogueFusion fusion : {ops::EpilogueFusion::kOff, ops::EpilogueFusion::kGelu}) {
    ops::EpilogueFusionScope scope(fusion);
    expect_gradients_match(mlp_op, mlp_inputs(DType::F32, true, 111));
  }
}

TEST(GradCheck, GroupedLayerNorm) { expect_gradients_match(layernorm_op, layernorm_inputs(DType::F32, true, 121)); }

TEST(GradCheck, GroupedAddLayerNorm) {
  expect_gradients_match(add_layernorm_op, add_layernorm_inputs(DType::F32, 131));
}

TEST(GradCheck, GroupedAddBiasLayerNorm) {
  expect_gradients_match(add_bias_layernorm_op, add_bias_layernorm_inputs(DType::F32, 151));
}

TEST(GradCheck, SumStack) {
  expect_gradients_match([](const auto& v) { return ops::sum_stack(v[0]); }, {random_leaf({3, 2, 4}, 141)});
}

TEST(GroupedOps, StackManyCastsAndStacksEachListAndCastsGradientsBack) {
  // Two lists stacked to bf16 in one node: the values are each tensor's own cast, the gradients each
  // stack's pieces cast back; an undefined list (an absent bias) stays undefined.
  const std::vector<Tensor> a = {leaf({2, 3}, 151, 1.0f), leaf({2, 3}, 152, 1.0f), leaf({2, 3}, 153, 1.0f)};
  const std::vector<Tensor> b = {leaf({4}, 154, 1.0f), leaf({4}, 155, 1.0f), leaf({4}, 156, 1.0f)};
  const std::vector<Tensor> stacks = ops::stack_many({a, {Tensor(), Tensor(), Tensor()}, b}, DType::BF16);
  ASSERT_EQ(stacks.size(), 3u);
  EXPECT_FALSE(stacks[1].defined());
  ASSERT_EQ(stacks[0].shape(), (Shape{3, 2, 3}));
  ASSERT_EQ(stacks[2].shape(), (Shape{3, 4}));
  EXPECT_EQ(stacks[0].dtype(), DType::BF16);
  std::vector<float> want;
  for (const Tensor& t : a) {
    const std::vector<float> v = t.detach().to(DType::BF16).to_vector();
    want.insert(want.end(), v.begin(), v.end());
  }
  expect_bits_equal(stacks[0].to_vector(), want, "stack of a");
  const Tensor seed0 = random_leaf({3, 2, 3}, 157).detach().to(DType::BF16);
  const Tensor seed2 = random_leaf({3, 4}, 158).detach().to(DType::BF16);
  backward({stacks[0], stacks[2]}, {seed0, seed2});
  for (int64_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(a[static_cast<size_t>(i)].grad().defined());
    EXPECT_EQ(a[static_cast<size_t>(i)].grad().dtype(), DType::F32);
    expect_bits_equal(a[static_cast<size_t>(i)].grad().to_vector(), seed0.slice(i, i + 1).to(DType::F32).to_vector(),
                      "gradient of a[" + std::to_string(i) + "]");
    expect_bits_equal(b[static_cast<size_t>(i)].grad().to_vector(), seed2.slice(i, i + 1).to(DType::F32).to_vector(),
                      "gradient of b[" + std::to_string(i) + "]");
  }
}

// Where an f32 input already has a gradient (zeroed in place between steps, a GradSync bucket's view),
// stack_many's and cast_many's backward add the bf16 gradient into it directly: the same bits as the
// engine's way (widen into a new tensor, then add it), the same tensor (not replaced), and an input that
// appears twice gets both contributions.
TEST(GroupedOps, CastGradientsAddIntoExistingF32GradientsWithTheEnginesBits) {
  const std::vector<Tensor> a = {leaf({2, 3}, 171, 1.0f), leaf({2, 3}, 172, 1.0f)};
  const Tensor c = leaf({5}, 173, 1.0f), d = leaf({5}, 174, 1.0f);  // d: no gradient yet (taken as is)
  std::vector<Tensor> before;
  for (Tensor t : {a[0], a[1], c}) {  // (handles: set_grad changes the shared tensor)
    t.set_grad(random_leaf(t.shape(), 175 + before.size(), 3.0f).detach());
    before.push_back(t.grad().clone());
  }
  const Tensor grad_a0 = a[0].grad();
  const std::vector<Tensor> stacks = ops::stack_many({a}, DType::BF16);
  const std::vector<Tensor> casts = ops::cast_many({c, d, c}, DType::BF16);  // c twice
  const Tensor seed_a = random_leaf({2, 2, 3}, 181).detach().to(DType::BF16);
  const Tensor seed_c = random_leaf({5}, 182).detach().to(DType::BF16), seed_d = random_leaf({5}, 183).detach().to(DType::BF16);
  const Tensor seed_c2 = random_leaf({5}, 184).detach().to(DType::BF16);
  backward({stacks[0], casts[0], casts[1], casts[2]}, {seed_a, seed_c, seed_d, seed_c2});
  auto engine_sum = [](const Tensor& g0, const std::vector<Tensor>& adds) {
    std::vector<float> acc = g0.to_vector();
    for (const Tensor& x : adds) kernels::axpy_cpu(acc.data(), x.to(DType::F32).to_vector().data(), 1.0f, x.numel());
    return acc;
  };
  EXPECT_EQ(a[0].grad().impl(), grad_a0.impl()) << "the existing gradient tensor stays";
  for (int64_t i = 0; i < 2; ++i)
    expect_bits_equal(a[static_cast<size_t>(i)].grad().to_vector(),
                      engine_sum(before[static_cast<size_t>(i)], {seed_a.slice(i, i + 1).reshape({2, 3})}),
                      "gradient of a[" + std::to_string(i) + "]");
  expect_bits_equal(c.grad().to_vector(), engine_sum(before[2], {seed_c, seed_c2}), "gradient of c (twice)");
  expect_bits_equal(d.grad().to_vector(), seed_d.to(DType::F32).to_vector(), "gradient of d (its first)");
}

// LayerNorm's parameter gradients go straight into an existing .grad (the kernels accumulate): the
// engine's bits (its add of a fresh gradient into .grad), the same tensor kept, and a leaf given for two
// groups (or as a gamma and a beta) added into once with the other's share left to the engine.
TEST(GroupedOps, LayerNormAddsParameterGradientsIntoExistingOnesWithTheEnginesBits) {
  for (const bool add_first : {false, true}) {
    const std::string what = add_first ? "add_layernorm" : "layernorm";
    const Tensor x = leaf({kGroups, 4, 10}, 301, 1.5f), a = leaf({kGroups, 4, 10}, 302, 1.0f);
    const Tensor g0 = leaf({10}, 303, 1.0f), g1 = leaf({10}, 304, 1.0f), b0 = leaf({10}, 305, 1.0f);
    const Tensor b1 = leaf({10}, 306, 1.0f);  // no gradient before: its first is taken as the engine would
    // g0 is the gamma of groups 0 and 2 and the beta of group 2 too.
    const std::vector<Tensor> gammas = {g0, g1, g0}, betas = {b0, b1, g0};
    std::vector<Tensor> before;
    for (Tensor t : {g0, g1, b0}) {
      t.set_grad(random_leaf({10}, 310 + before.size(), 2.0f).detach());
      before.push_back(t.grad().clone());
    }
    const Tensor grad_g1 = g1.grad();
    const Tensor seed = random_leaf({kGroups, 4, 10}, 320).detach();
    auto forward = [&](const std::vector<Tensor>& gs, const std::vector<Tensor>& bs) {
      return add_first ? ops::add_layernorm(a, x, gs, bs)[1] : ops::layernorm(x, gs, bs);
    };
    backward(forward(gammas, betas), seed);

    // Each group's own contribution, from fresh copies of the parameters (no gradient before).
    std::vector<std::vector<float>> dgamma(kGroups), dbeta(kGroups);
    for (int64_t g = 0; g < kGroups; ++g) {
      std::vector<Tensor> gs, bs;
      for (int64_t k = 0; k < kGroups; ++k) {
        gs.push_back(gammas[static_cast<size_t>(k)].detach().clone().set_requires_grad(k == g));
        bs.push_back(betas[static_cast<size_t>(k)].detach().clone().set_requires_grad(k == g));
      }
      backward(forward(gs, bs), seed);
      dgamma[static_cast<size_t>(g)] = gs[static_cast<size_t>(g)].grad().to_vector();
      dbeta[static_cast<size_t>(g)] = bs[static_cast<size_t>(g)].grad().to_vector();
    }
    auto engine_sum = [](std::vector<float> acc, const std::vector<std::vector<float>>& adds) {
      for (const auto& v : adds) kernels::axpy_cpu(acc.data(), v.data(), 1.0f, static_cast<int64_t>(v.size()));
      return acc;
    };
    EXPECT_EQ(g1.grad().impl(), grad_g1.impl()) << what << ": the existing gradient tensor stays";
    expect_bits_equal(g1.grad().to_vector(), engine_sum(before[1].to_vector(), {dgamma[1]}), what + ": dgamma of group 1");
    expect_bits_equal(b0.grad().to_vector(), engine_sum(before[2].to_vector(), {dbeta[0]}), what + ": dbeta of group 0");
    expect_bits_equal(b1.grad().to_vector(), dbeta[1], what + ": dbeta of group 1 (its first)");
    // g0: added into for group 0's gamma, then the engine adds the other two shares in the order of the
    // node's inputs (the gammas, then the betas).
    expect_bits_equal(g0.grad().to_vector(), engine_sum(before[0].to_vector(), {dgamma[0], dgamma[2], dbeta[2]}),
                      what + ": the shared leaf");

    // Distinct parameters that all have gradients: nothing zeroed for them (the kernels add in place).
    std::vector<Tensor> own_gammas, own_betas;
    for (int64_t k = 0; k < kGroups; ++k) {
      own_gammas.push_back(leaf({10}, 350 + k, 1.0f));
      own_betas.push_back(leaf({10}, 360 + k, 1.0f));
      own_gammas.back().set_grad(Tensor::zeros({10}));
      own_betas.back().set_grad(Tensor::zeros({10}));
    }
    const Tensor loss = forward(own_gammas, own_betas);
    const MemoryTraffic traffic_before = memory_traffic();
    backward(loss, seed);
    const MemoryTraffic moved = memory_traffic() - traffic_before;
    EXPECT_EQ(moved.fills, 0u) << what << ": " << moved.zeroed_bytes << " bytes zeroed";
  }
}

TEST(GradCheck, StackMany) {
  // f32 to f32: copies; and a list of one, which is a view.
  expect_gradients_match(
      [](const auto& v) {
        const std::vector<Tensor> st = ops::stack_many({{v[0], v[1]}, {v[2]}}, DType::F32);
        return ops::add(ops::reshape(st[0], {2, 6}), ops::reshape(ops::concat({st[1], st[1]}, 0), {2, 6}));
      },
      {random_leaf({2, 3}, 161), random_leaf({2, 3}, 162), random_leaf({2, 3}, 163)});
}

// The summed fork on the CPU is its chain, residual_fork(x, y, sum_stack(x)), in f32 and bf16 (the GPU's
// kernels are held to it in tests/gpu/mlp_cuda_test.cpp), and names what is wrong with its operands.
TEST(GroupedOps, SummedResidualForkIsItsChain) {
  for (const DType dtype : {DType::F32, DType::BF16}) {
    const std::vector<Tensor> in = {leaf({3, 2, 5, 8}, 134, 1.0f, dtype), leaf({3, 2, 5, 8}, 135, 1.0f, dtype)};
    const OpRun summed =
        run([](const std::vector<Tensor>& v) { return ops::concat(ops::residual_fork_summed(v[0], v[1]), 0); }, in);
    const OpRun chain = run([](const std::vector<Tensor>& v) {
      return ops::concat(ops::residual_fork(v[0], v[1], ops::sum_stack(v[0])), 0);
    }, in);
    expect_same_run(summed, chain, std::string("summed residual fork, ") + (dtype == DType::F32 ? "f32" : "bf16"));
  }
  const std::string msg =
      message_of([] { ops::residual_fork_summed(Tensor::zeros({3, 5, 8}), Tensor::zeros({3, 5, 4})); });
  EXPECT_NE(msg.find("residual_fork_summed"), std::string::npos) << msg;
}

// The fork with LN2 on the CPU is its two ops (the GPU's kernel is held to them in
// tests/gpu/mlp_cuda_test.cpp), in f32 and bf16, gammas' and betas' gradients included.
TEST(GroupedOps, SummedResidualForkWithLayerNormIsItsTwoOps) {
  for (const DType dtype : {DType::F32, DType::BF16}) {
    const std::vector<Tensor> in = {leaf({3, 2, 5, 8}, 136, 1.0f, dtype), leaf({3, 2, 5, 8}, 137, 1.0f, dtype),
                                    leaf({8}, 138, 0.5f), leaf({8}, 139, 0.5f), leaf({8}, 140, 0.5f), leaf({8}, 141, 0.5f), leaf({8}, 142, 0.5f),
                                    leaf({8}, 143, 0.5f)};
    const OpRun fused = run([](const std::vector<Tensor>& v) {
      return ops::concat(ops::residual_fork_summed_layernorm(v[0], v[1], {v[2], v[3], v[4]}, {v[5], v[6], v[7]}), 0);
    }, in);
    const OpRun two_ops = run([](const std::vector<Tensor>& v) {
      const std::vector<Tensor> a_m = ops::residual_fork_summed(v[0], v[1]);
      return ops::concat({a_m[0], ops::layernorm(a_m[1], {v[2], v[3], v[4]}, {v[5], v[6], v[7]})}, 0);
    }, in);
    expect_same_run(fused, two_ops, std::string("summed fork with LN2, ") + (dtype == DType::F32 ? "f32" : "bf16"));
  }
}

// The residual fork {x + y, y + s} on the CPU is the two adds (the GPU's one kernel each way is held to
// them in tests/gpu/mlp_cuda_test.cpp), in f32 and bf16, and says what is wrong with a bad s.
TEST(GroupedOps, ResidualForkIsTheTwoAdds) {
  for (const DType dtype : {DType::F32, DType::BF16}) {
    const std::vector<Tensor> in = {leaf({3, 2, 5, 8}, 131, 1.0f, dtype), leaf({3, 2, 5, 8}, 132, 1.0f, dtype),
                                    leaf({2, 5, 8}, 133, 1.0f, dtype)};
    const OpRun fork = run(
        [](const std::vector<Tensor>& v) { return ops::concat(ops::residual_fork(v[0], v[1], v[2]), 0); }, in);
    const OpRun adds = run([](const std::vector<Tensor>& v) {
      return ops::concat({ops::add(v[0], v[1]), ops::add(v[1], v[2])}, 0);
    }, in);
    expect_same_run(fork, adds, std::string("residual fork, ") + (dtype == DType::F32 ? "f32" : "bf16"));
  }
  const std::string msg = message_of(
      [] { ops::residual_fork(Tensor::zeros({3, 5, 8}), Tensor::zeros({3, 5, 8}), Tensor::zeros({4, 8})); });
  EXPECT_NE(msg.find("residual_fork"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(3, 5, 8)"), std::string::npos) << msg;
}

TEST(GroupedOps, ShapeErrorsNameTheGroups) {
  const Tensor x = Tensor::zeros({2, 5, 8}), w = Tensor::zeros({3, 6, 8});
  std::string msg = message_of([&] { ops::linear(x, w); });
  EXPECT_NE(msg.find("(3, 6, 8)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(2, 5, 8)"), std::string::npos) << msg;
  msg = message_of([&] { ops::linear(Tensor::zeros({3, 5, 8}), w, Tensor::zeros({6})); });
  EXPECT_NE(msg.find("expected (3, 6)"), std::string::npos) << msg;
  msg = message_of([&] {
    ops::mlp(Tensor::zeros({3, 5, 8}), Tensor::zeros({3, 16, 8}), Tensor(), Tensor::zeros({2, 8, 16}), Tensor());
  });
  EXPECT_NE(msg.find("(2, 8, 16)"), std::string::npos) << msg;
  const std::vector<Tensor> gammas(3, Tensor::ones({10}));
  msg = message_of([&] { ops::layernorm(Tensor::zeros({2, 4, 10}), gammas, {}); });
  EXPECT_NE(msg.find("3 groups"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(2, 4, 10)"), std::string::npos) << msg;
  msg = message_of([&] { ops::layernorm(Tensor::zeros({3, 4, 10}), gammas, std::vector<Tensor>(2)); });
  EXPECT_NE(msg.find("3 gammas and 2 betas"), std::string::npos) << msg;
  msg = message_of([&] {
    ops::layernorm(Tensor::zeros({3, 4, 10}), {Tensor::ones({10}), Tensor::ones({9}), Tensor::ones({10})}, {});
  });
  EXPECT_NE(msg.find("group 1"), std::string::npos) << msg;
  msg = message_of([&] {
    ops::add_bias_layernorm(Tensor::zeros({3, 4, 10}), Tensor::zeros({3, 4, 10}), Tensor::zeros({2, 10}), gammas, {});
  });
  EXPECT_NE(msg.find("bias (2, 10)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("expected (3, 10)"), std::string::npos) << msg;
  msg = message_of([&] { ops::linear(Tensor::zeros({3, 5, 8}), w, Tensor::zeros({3, 6}), {4, 3}); });
  EXPECT_NE(msg.find("zero_grad columns [4, 7)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("6 columns"), std::string::npos) << msg;
  msg = message_of([&] { ops::linear(Tensor::zeros({5, 8}), Tensor::zeros({6, 8}), Tensor(), {0, 2}); });
  EXPECT_NE(msg.find("without a bias"), std::string::npos) << msg;
  msg = message_of([&] { ops::stack_many({{Tensor::zeros({2, 3}), Tensor::zeros({3, 2})}}, DType::F32); });
  EXPECT_NE(msg.find("one shape and dtype"), std::string::npos) << msg;
  msg = message_of([&] { ops::sum_stack(Tensor::zeros({0, 3})); });
  EXPECT_NE(msg.find("sum_stack"), std::string::npos) << msg;
}

}  // namespace
}  // namespace kraken::runtime
