// Mixed precision in the op set (runtime/ops/precision.h): a bf16 op computes in f32 and rounds each
// output once, forward and backward. On the CPU that is the definition the CUDA bf16 kernels are
// tested against (tests/gpu), so here every op is held to it bit for bit: the bf16 result must equal
// the f32 op on the same (exactly widened) values, rounded to bf16 — not rounded twice, not left f32,
// not computed from inputs rounded differently. Then: mixed dtypes are refused with both named,
// gradients reach f32 master weights through casts, and bf16 gradient sums round once.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "runtime/rng.h"
#include "tests/support/errors.h"
#include "tests/support/gradcheck.h"

namespace kraken::runtime {
namespace {

using ::kraken::testing::message_of;
using ::kraken::testing::random_leaf;

// N(0, std²) values already rounded to bf16, as f32 (so that widening them back is exact).
Tensor bf16_values(const Shape& shape, uint64_t seed, float std = 1.0f) {
  return random_leaf(shape, seed, std).detach().to(DType::BF16).to(DType::F32);
}

std::vector<uint16_t> bits(const Tensor& bf16) {
  EXPECT_EQ(bf16.dtype(), DType::BF16) << bf16.describe();
  const uint16_t* p = bf16.data<uint16_t>();
  return std::vector<uint16_t>(p, p + bf16.numel());
}

using Op = std::function<Tensor(const std::vector<Tensor>&)>;

// Runs `op` once on bf16 copies of `values` and once on f32 copies (the same numbers), seeds backward
// with the same bf16-exact projection, and requires: the bf16 output (bf16, or f32 for a loss) equals
// the f32 output rounded once; each bf16 input's gradient (bf16) equals the f32 gradient rounded once.
// `float_inputs` marks the operands that stay f32 in mixed precision (LayerNorm's gamma and beta):
// they get f32 gradients that must equal the f32 run's exactly.
void expect_rounded_once(const std::string& what, const Op& op, const std::vector<Tensor>& values,
                         const std::vector<bool>& float_inputs = {}) {
  SCOPED_TRACE(what);
  std::vector<Tensor> low, high;
  for (size_t i = 0; i < values.size(); ++i) {
    const bool stays_f32 = i < float_inputs.size() && float_inputs[i];
    Tensor l = stays_f32 ? values[i].clone() : values[i].to(DType::BF16);
    Tensor h = values[i].clone();
    l.set_requires_grad(true);
    h.set_requires_grad(true);
    low.push_back(l);
    high.push_back(h);
  }
  Tensor out_low = op(low), out_high = op(high);
  ASSERT_EQ(out_high.dtype(), DType::F32);
  if (out_low.dtype() == DType::F32) {  // a loss: f32 either way, and the same value
    EXPECT_EQ(out_low.to_vector(), out_high.to_vector());
  } else {
    EXPECT_EQ(bits(out_low), bits(out_high.to(DType::BF16))) << "forward";
  }
  Tensor seed = bf16_values(out_high.shape(), 99);
  backward(out_low, out_low.dtype() == DType::BF16 ? seed.to(DType::BF16) : seed);
  backward(out_high, seed);
  for (size_t i = 0; i < values.size(); ++i) {
    SCOPED_TRACE("gradient of input " + std::to_string(i));
    ASSERT_TRUE(low[i].grad().defined());
    if (low[i].dtype() == DType::F32) {
      EXPECT_EQ(low[i].grad().to_vector(), high[i].grad().to_vector());
    } else {
      EXPECT_EQ(low[i].grad().dtype(), DType::BF16);
      EXPECT_EQ(bits(low[i].grad()), bits(high[i].grad().to(DType::BF16)));
    }
  }
}

TEST(MixedPrecision, ElementwiseOpsRoundOnce) {
  const Tensor a = bf16_values({3, 5, 8}, 1), b = bf16_values({3, 5, 8}, 2), row = bf16_values({8}, 3);
  expect_rounded_once("add", [](const auto& x) { return ops::add(x[0], x[1]); }, {a, b});
  expect_rounded_once("add broadcast", [](const auto& x) { return ops::add(x[0], x[1]); }, {a, row});
  expect_rounded_once("mul", [](const auto& x) { return ops::mul(x[0], x[1]); }, {a, b});
  expect_rounded_once("scale", [](const auto& x) { return ops::scale(x[0], 1.0f / 3.0f); }, {a});
  expect_rounded_once("gelu", [](const auto& x) { return ops::gelu(x[0]); }, {a});
  expect_rounded_once("sum_list", [](const auto& x) { return ops::sum_list({x[0], x[1], x[2]}); },
                      {a, b, bf16_values({3, 5, 8}, 4)});
  expect_rounded_once("softmax", [](const auto& x) { return ops::softmax(x[0]); }, {a});
  expect_rounded_once("mean", [](const auto& x) { return ops::mean(x[0]); }, {a});
}

TEST(MixedPrecision, ProductsRoundOnce) {
  const Tensor x = bf16_values({2, 7, 24}, 5), w = bf16_values({10, 24}, 6, 0.2f), bias = bf16_values({10}, 7);
  expect_rounded_once("linear", [](const auto& v) { return ops::linear(v[0], v[1], v[2]); }, {x, w, bias});
  expect_rounded_once("linear without bias", [](const auto& v) { return ops::linear(v[0], v[1]); }, {x, w});
  expect_rounded_once("matmul N-D · 2-Dᵀ", [](const auto& v) { return ops::matmul(v[0], v[1], false, true); }, {x, w});
  expect_rounded_once("batched matmul", [](const auto& v) { return ops::matmul(v[0], v[1], false, true); },
                      {bf16_values({3, 5, 6}, 8), bf16_values({3, 4, 6}, 9)});
}

TEST(MixedPrecision, NormalisationAttentionAndLossRoundOnce) {
  const Tensor x = bf16_values({2, 6, 16}, 10, 2.0f);
  const Tensor gamma = bf16_values({16}, 11), beta = bf16_values({16}, 12);
  expect_rounded_once("layernorm", [](const auto& v) { return ops::layernorm(v[0], v[1], v[2]); }, {x, gamma, beta},
                      {false, true, true});
  expect_rounded_once("attention", [](const auto& v) { return ops::attention(v[0], 2); }, {bf16_values({2, 9, 24}, 13)});
  Generator ids_gen(14, 0);
  std::vector<int32_t> targets;
  for (int i = 0; i < 12; ++i) targets.push_back(i == 5 ? -1 : static_cast<int32_t>(ids_gen.next_below(11)));
  const Tensor t = Tensor::from_ints(targets, {2, 6});
  expect_rounded_once("cross_entropy", [&](const auto& v) { return ops::cross_entropy(v[0], t, 11, -1); },
                      {bf16_values({2, 6, 16}, 15, 3.0f)});
  Generator a(7, 3), b(7, 3);  // one mask for both runs
  Generator* gens[] = {&a, &b};
  int call = 0;
  expect_rounded_once("dropout", [&](const auto& v) { return ops::dropout(v[0], 0.25f, *gens[call++]); },
                      {bf16_values({4, 33}, 16)});
}

TEST(MixedPrecision, EvaluationLossSumsAcceptBf16Logits) {
  const Tensor logits = bf16_values({5, 12}, 17, 2.0f);
  const Tensor targets = Tensor::from_ints({0, 3, -1, 11, 7}, {5});
  const ops::LossSum f32 = ops::cross_entropy_sum(logits, targets, 12, -1);
  const ops::LossSum bf16 = ops::cross_entropy_sum(logits.to(DType::BF16), targets, 12, -1);
  EXPECT_EQ(bf16.count, 4);
  EXPECT_EQ(bf16.sum, f32.sum);  // the same values, widened exactly, the same f32 arithmetic
}

TEST(MixedPrecision, MixedOperandDtypesAreRefusedNamingBoth) {
  const Tensor f = Tensor::zeros({2, 4}), h = Tensor::zeros({2, 4}, DType::BF16);
  const std::string add = message_of([&] { ops::add(f, h); });
  EXPECT_NE(add.find("mix dtypes"), std::string::npos) << add;
  EXPECT_NE(add.find("f32 (2, 4)"), std::string::npos) << add;
  EXPECT_NE(add.find("bf16 (2, 4)"), std::string::npos) << add;
  const std::string lin = message_of([&] { ops::linear(h, Tensor::zeros({3, 4}, DType::BF16), Tensor::zeros({3})); });
  EXPECT_NE(lin.find("linear"), std::string::npos) << lin;
  EXPECT_NE(lin.find("mix dtypes"), std::string::npos) << lin;
  // LayerNorm's parameters stay f32 under mixed precision; a bf16 gamma is a mistake, said as such.
  const std::string ln = message_of([&] { ops::layernorm(h, Tensor::zeros({4}, DType::BF16), Tensor()); });
  EXPECT_NE(ln.find("gamma"), std::string::npos) << ln;
  const std::string ids = message_of([&] { ops::gelu(Tensor::from_ints({1, 2}, {2})); });
  EXPECT_NE(ids.find("expected f32 or bf16"), std::string::npos) << ids;
}

TEST(MixedPrecision, GradientsReachF32MastersThroughCasts) {
  // y = linear(bf16(x), bf16(W), bf16(b)): W and b are f32 leaves (master weights); their gradients
  // arrive f32, each equal to the bf16 gradient of the cast widened exactly.
  const Tensor x = bf16_values({4, 6, 16}, 20).to(DType::BF16), seed = bf16_values({4, 6, 8}, 23).to(DType::BF16);
  Tensor w = bf16_values({8, 16}, 21, 0.3f), b = bf16_values({8}, 22);
  w.set_requires_grad(true);
  b.set_requires_grad(true);
  Tensor y = ops::linear(x, ops::cast(w, DType::BF16), ops::cast(b, DType::BF16));
  ASSERT_EQ(y.dtype(), DType::BF16);
  backward(y, seed);
  // The same product with bf16 leaves: their gradients are what the casts pass back.
  Tensor wl = w.detach().to(DType::BF16), bl = b.detach().to(DType::BF16);
  wl.set_requires_grad(true);
  bl.set_requires_grad(true);
  backward(ops::linear(x, wl, bl), seed);
  ASSERT_EQ(w.grad().dtype(), DType::F32);
  ASSERT_EQ(b.grad().dtype(), DType::F32);
  EXPECT_EQ(w.grad().to_vector(), wl.grad().to_vector());
  EXPECT_EQ(b.grad().to_vector(), bl.grad().to_vector());
}

// f32 bit patterns, so that -0.0 and 0.0 (or two NaNs) are told apart.
std::vector<uint32_t> f32_bits(const Tensor& f32) {
  EXPECT_EQ(f32.dtype(), DType::F32) << f32.describe();
  const std::vector<float> v = f32.to_vector();
  std::vector<uint32_t> out(v.size());
  if (!v.empty()) std::memcpy(out.data(), v.data(), v.size() * 4);
  return out;
}

// Fresh f32 leaves with the given values (a second set for the per-tensor reference).
std::vector<Tensor> leaves_of(const std::vector<Tensor>& values) {
  std::vector<Tensor> out;
  for (const Tensor& v : values) out.push_back(v.clone().set_requires_grad(true));
  return out;
}

TEST(MixedPrecision, CastManyIsOneCastPerTensorForwardAndBackward) {
  // Lengths on both sides of multiples of 8, an empty tensor, and values beyond bf16's precision.
  const std::vector<Shape> shapes = {{7}, {3, 5}, {8}, {4, 6}, {2, 3, 17}, {1}, {0}, {9}, {1001}};
  std::vector<Tensor> values;
  for (size_t k = 0; k < shapes.size(); ++k) values.push_back(random_leaf(shapes[k], 40 + k, 3.0f).detach());
  const size_t unused = 3;   // its output takes no part in the loss
  const size_t through = 5;  // computed from a leaf by an op (a gradient with history to flow into)
  std::vector<Tensor> many = leaves_of(values), single = leaves_of(values);
  std::vector<Tensor> many_in = many, single_in = single;
  many_in[through] = ops::scale(many[through], -2.0f);
  single_in[through] = ops::scale(single[through], -2.0f);
  // A bf16 input passes through as itself; a constant (no gradient) is cast without history.
  Tensor already = bf16_values({12}, 60).to(DType::BF16);
  already.set_requires_grad(true);
  const Tensor constant = random_leaf({10}, 61).detach();
  many_in.push_back(already);
  many_in.push_back(constant);

  const std::vector<Tensor> outs = ops::cast_many(many_in, DType::BF16);
  ASSERT_EQ(outs.size(), many_in.size());
  EXPECT_TRUE(outs[shapes.size()].same(already)) << "a bf16 input comes back as itself";
  EXPECT_FALSE(outs[shapes.size() + 1].requires_grad()) << "the cast of a constant has no history";
  EXPECT_EQ(bits(outs[shapes.size() + 1]), bits(constant.to(DType::BF16)));

  std::vector<Tensor> roots, seeds, single_roots;
  for (size_t k = 0; k < shapes.size(); ++k) {
    const Tensor one = ops::cast(single_in[k], DType::BF16);
    EXPECT_EQ(outs[k].dtype(), DType::BF16);
    EXPECT_EQ(outs[k].shape(), shapes[k]);
    EXPECT_EQ(bits(outs[k]), bits(one)) << "forward of tensor " << k;
    if (k == unused) continue;
    roots.push_back(outs[k]);
    single_roots.push_back(one);
    seeds.push_back(bf16_values(shapes[k], 70 + k).to(DType::BF16));
  }
  roots.push_back(already);
  seeds.push_back(bf16_values({12}, 90).to(DType::BF16));
  backward(roots, seeds);
  seeds.pop_back();
  backward(single_roots, seeds);
  for (size_t k = 0; k < shapes.size(); ++k) {
    SCOPED_TRACE("gradient of tensor " + std::to_string(k));
    ASSERT_TRUE(many[k].grad().defined());
    if (k == unused) {  // one node: the engine hands it zeros for the output nobody used
      EXPECT_FALSE(single[k].grad().defined());
      EXPECT_EQ(many[k].grad().to_vector(), std::vector<float>(static_cast<size_t>(many[k].numel()), 0.0f));
      continue;
    }
    EXPECT_EQ(f32_bits(many[k].grad()), f32_bits(single[k].grad()));
  }
  EXPECT_EQ(bits(already.grad()), bits(bf16_values({12}, 90).to(DType::BF16))) << "the pass-through's own gradient";
}

TEST(MixedPrecision, CastManyFromBf16RoundsItsGradientsAsCastDoes) {
  const std::vector<Shape> shapes = {{5}, {16}, {3, 11}};
  std::vector<Tensor> many, single;
  for (size_t k = 0; k < shapes.size(); ++k) {
    const Tensor v = bf16_values(shapes[k], 100 + k).to(DType::BF16);
    many.push_back(v.clone().set_requires_grad(true));
    single.push_back(v.clone().set_requires_grad(true));
  }
  const std::vector<Tensor> outs = ops::cast_many(many, DType::F32);
  std::vector<Tensor> single_outs, seeds;
  for (size_t k = 0; k < shapes.size(); ++k) {
    single_outs.push_back(ops::cast(single[k], DType::F32));
    EXPECT_EQ(f32_bits(outs[k]), f32_bits(single_outs[k])) << "forward of tensor " << k;
    seeds.push_back(random_leaf(shapes[k], 110 + k, 5.0f).detach());  // f32 gradients: rounded on the way back
  }
  // A seed of the other dtype (backward() takes any): cast alone on the way back, as cast() would.
  seeds[1] = seeds[1].to(DType::BF16);
  backward(outs, seeds);
  backward(single_outs, seeds);
  for (size_t k = 0; k < shapes.size(); ++k) EXPECT_EQ(bits(many[k].grad()), bits(single[k].grad())) << "tensor " << k;
}

TEST(MixedPrecision, CastManyOfOtherDtypesCastsOneByOne) {
  const Tensor ids = Tensor::from_ints({3, -7, 65536, 0, 12}, {5});
  const Tensor x = random_leaf({6}, 120).detach();
  const std::vector<Tensor> outs = ops::cast_many({ids, x}, DType::F32);
  EXPECT_EQ(outs[0].to_vector(), ids.to(DType::F32).to_vector());
  EXPECT_TRUE(outs[1].same(x));
  EXPECT_TRUE(ops::cast_many({}, DType::BF16).empty());
  const std::string undefined = message_of([&] { ops::cast_many({x, Tensor()}, DType::BF16); });
  EXPECT_NE(undefined.find("cast_many"), std::string::npos) << undefined;
}

TEST(MixedPrecision, Bf16GradientContributionsAreSummedInF32AndRoundedOnce) {
  // x feeds two scales; its gradient is round(round(g/3) + round(g/7)): each branch's backward rounds
  // its own output, and the accumulation adds in f32 and rounds once more.
  Tensor x = bf16_values({64}, 30).to(DType::BF16);
  x.set_requires_grad(true);
  Tensor y = ops::add(ops::scale(x, 1.0f / 3.0f), ops::scale(x, 1.0f / 7.0f));
  const Tensor g = bf16_values({64}, 31);
  backward(y, g.to(DType::BF16));
  const Tensor third = ops::scale(g, 1.0f / 3.0f).to(DType::BF16).to(DType::F32);
  const Tensor seventh = ops::scale(g, 1.0f / 7.0f).to(DType::BF16).to(DType::F32);
  EXPECT_EQ(bits(x.grad()), bits(ops::add(third, seventh).to(DType::BF16)));
}

}  // namespace
}  // namespace kraken::runtime
