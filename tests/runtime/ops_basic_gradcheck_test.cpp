// Finite-difference checks of the shape, elementwise, reduction, matmul, linear and dropout ops.
#include <gtest/gtest.h>

#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "tests/support/gradcheck.h"

namespace kraken::runtime {
namespace {

using testing::expect_gradients_match;
using testing::random_leaf;

TEST(GradCheck, Add) {
  expect_gradients_match([](const auto& in) { return ops::add(in[0], in[1]); },
                         {random_leaf({3, 5}, 1), random_leaf({3, 5}, 2)});
}

TEST(GradCheck, AddBroadcastTrailing) {
  expect_gradients_match([](const auto& in) { return ops::add(in[0], in[1]); },
                         {random_leaf({2, 3, 4}, 1), random_leaf({3, 4}, 2)});
}

TEST(GradCheck, Mul) {
  expect_gradients_match([](const auto& in) { return ops::mul(in[0], in[1]); },
                         {random_leaf({4, 6}, 3), random_leaf({4, 6}, 4)});
}

TEST(GradCheck, Scale) {
  expect_gradients_match([](const auto& in) { return ops::scale(in[0], -1.7f); }, {random_leaf({7}, 5)});
}

TEST(GradCheck, Gelu) {
  expect_gradients_match([](const auto& in) { return ops::gelu(in[0]); }, {random_leaf({64}, 6, 2.0f)});
}

TEST(GradCheck, SumList) {
  expect_gradients_match([](const auto& in) { return ops::sum_list(in); },
                         {random_leaf({2, 3}, 7), random_leaf({2, 3}, 8), random_leaf({2, 3}, 9)});
}

TEST(GradCheck, Sum) {
  expect_gradients_match([](const auto& in) { return ops::sum(in[0]); }, {random_leaf({5, 3}, 10)});
}

TEST(GradCheck, Mean) {
  expect_gradients_match([](const auto& in) { return ops::mean(in[0]); }, {random_leaf({5, 3}, 11)});
}

TEST(GradCheck, MatmulAllTransposes) {
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "trans_a=" << ta << " trans_b=" << tb);
      Shape a = ta ? Shape{5, 4} : Shape{4, 5}, b = tb ? Shape{3, 5} : Shape{5, 3};
      expect_gradients_match([ta, tb](const auto& in) { return ops::matmul(in[0], in[1], ta, tb); },
                             {random_leaf(a, 12), random_leaf(b, 13)});
    }
}

TEST(GradCheck, MatmulBatched) {
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "trans_a=" << ta << " trans_b=" << tb);
      Shape a = ta ? Shape{2, 5, 4} : Shape{2, 4, 5}, b = tb ? Shape{2, 3, 5} : Shape{2, 5, 3};
      expect_gradients_match([ta, tb](const auto& in) { return ops::matmul(in[0], in[1], ta, tb); },
                             {random_leaf(a, 14), random_leaf(b, 15)});
    }
}

TEST(GradCheck, MatmulRowsTimesMatrix) {
  for (bool tb : {false, true}) {
    Shape b = tb ? Shape{3, 5} : Shape{5, 3};
    expect_gradients_match([tb](const auto& in) { return ops::matmul(in[0], in[1], false, tb); },
                           {random_leaf({2, 4, 5}, 16), random_leaf(b, 17)});
  }
}

TEST(GradCheck, LinearWithBias) {
  expect_gradients_match([](const auto& in) { return ops::linear(in[0], in[1], in[2]); },
                         {random_leaf({2, 3, 6}, 18), random_leaf({4, 6}, 19), random_leaf({4}, 20)});
}

TEST(GradCheck, LinearWithoutBias) {
  expect_gradients_match([](const auto& in) { return ops::linear(in[0], in[1]); },
                         {random_leaf({5, 6}, 21), random_leaf({4, 6}, 22)});
}

TEST(GradCheck, Reshape) {
  expect_gradients_match([](const auto& in) { return ops::gelu(ops::reshape(in[0], {3, -1})); },
                         {random_leaf({2, 3, 2}, 23)});
}

TEST(GradCheck, Slice) {
  expect_gradients_match([](const auto& in) { return ops::gelu(ops::slice(in[0], 1, 3)); },
                         {random_leaf({4, 3}, 24)});
}

TEST(GradCheck, SplitAlongMiddleDimension) {
  expect_gradients_match(
      [](const auto& in) {
        auto parts = ops::split(in[0], {1, 3, 2}, 1);
        // weight the parts differently so a mixed-up gradient cannot cancel
        return ops::concat({ops::scale(parts[2], 2.0f), parts[0], ops::gelu(parts[1])}, 1);
      },
      {random_leaf({2, 6, 3}, 25)});
}

TEST(GradCheck, ConcatLastDimension) {
  expect_gradients_match([](const auto& in) { return ops::concat({in[0], in[1]}, -1); },
                         {random_leaf({3, 2}, 26), random_leaf({3, 5}, 27)});
}

TEST(GradCheck, Dropout) {
  // The mask must be the same in every evaluation: each call starts from a copy of one generator.
  Generator base(99, 3);
  expect_gradients_match(
      [base](const auto& in) {
        Generator gen = base;
        return ops::dropout(in[0], 0.3f, gen);
      },
      {random_leaf({8, 16}, 28)});
}

TEST(Dropout, DropsAboutPAndScalesTheRest) {
  Generator gen(5, 0);
  Tensor x = Tensor::ones({100000});
  const std::vector<float> y = ops::dropout(x, 0.25f, gen).to_vector();
  int64_t zeros = 0;
  for (float v : y) {
    if (v == 0.0f) ++zeros;
    else EXPECT_FLOAT_EQ(v, 1.0f / 0.75f);
  }
  // Binomial(1e5, 0.25): std = 137, so ±1000 is a 7-sigma band.
  EXPECT_NEAR(static_cast<double>(zeros), 25000.0, 1000.0);
}

TEST(Dropout, EvalModeIsIdentity) {
  Generator gen(5, 0);
  Tensor x = random_leaf({10}, 29);
  EXPECT_TRUE(ops::dropout(x, 0.5f, gen, /*training=*/false).same(x));
}

}  // namespace
}  // namespace kraken::runtime
