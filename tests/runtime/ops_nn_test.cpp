// Layernorm, embedding, softmax and cross-entropy: closed-form values, exact zeros where the contract
// promises them, error messages with the numbers in them, and bit-identical results for one and two
// OpenMP threads.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cross_entropy.h"
#include "kernels/softmax.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "runtime/rng.h"
#include "tests/support/gradcheck.h"
#include "tests/support/errors.h"

namespace kraken::runtime {
namespace {

using testing::random_leaf;

using ::kraken::testing::message_of;

#define EXPECT_MESSAGE_HAS(msg, text) EXPECT_NE((msg).find(text), std::string::npos) << (msg)

Tensor random_ids(int64_t n, int64_t bound, uint64_t seed) {
  Generator gen(seed, 5);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = static_cast<int32_t>(gen.next_below(static_cast<uint64_t>(bound)));
  return Tensor::from_ints(ids, {n});
}

// ---- exp used by the CPU kernels ----------------------------------------------------------------

TEST(ExpVectorisable, WithinTwoUlpOfExpOverTheSoftmaxRange) {
  // Callers pass x − max ∈ (−∞, 0]. Float rounding of r and the 8 Horner steps give a few ulp
  // (measured worst: 0.66·2^−23 relative; expf itself 0.5); 2·2^−23 leaves room and still fails on any
  // wrong coefficient or range reduction (those are off by far more).
  double worst = 0.0;
  for (int i = 0; i <= 200000; ++i) {
    const float x = -87.0f * static_cast<float>(i) / 200000.0f;
    const double exact = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::fabs(kernels::exp_vectorisable(x) - exact) / exact);
  }
  EXPECT_LT(worst, 2.0 * std::ldexp(1.0, -23));
  EXPECT_EQ(kernels::exp_vectorisable(0.0f), 1.0f);
  EXPECT_EQ(kernels::exp_vectorisable(-100.0f), 0.0f);
  EXPECT_EQ(kernels::exp_vectorisable(-std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_TRUE(std::isnan(kernels::exp_vectorisable(std::numeric_limits<float>::quiet_NaN())));
}

// ---- layernorm ----------------------------------------------------------------------------------------

TEST(LayerNorm, RowsHaveMeanZeroAndVarianceOneOverOnePlusEpsOverVar) {
  // With gamma = 1 and beta = 0 each row is (x − μ)/√(σ² + eps): mean 0 and variance σ²/(σ² + eps).
  // A large eps makes that factor visibly different from 1, so eps in the wrong place fails.
  const int64_t rows = 6, C = 64;
  const float eps = 0.25f;
  Tensor x = random_leaf({rows, C}, 51, 0.8f);
  x.set_requires_grad(false);
  const std::vector<float> out = ops::layernorm(x, Tensor::ones({C}), Tensor::zeros({C}), eps).to_vector();
  const std::vector<float> xv = x.to_vector();
  for (int64_t r = 0; r < rows; ++r) {
    double mx = 0, my = 0;
    for (int64_t c = 0; c < C; ++c) mx += xv[r * C + c], my += out[r * C + c];
    mx /= C, my /= C;
    double vx = 0, vy = 0;
    for (int64_t c = 0; c < C; ++c) {
      vx += (xv[r * C + c] - mx) * (xv[r * C + c] - mx);
      vy += (out[r * C + c] - my) * (out[r * C + c] - my);
    }
    vx /= C, vy /= C;
    // f32 outputs of order 1 summed over 64 columns: mean off by ~1e-7, variance by ~1e-6 relative.
    EXPECT_NEAR(my, 0.0, 1e-6) << "row " << r;
    EXPECT_NEAR(vy, 1.0 / (1.0 + eps / vx), 1e-5) << "row " << r;
  }
}

TEST(LayerNorm, GammaAndBetaScaleAndShiftTheNormalisedRow) {
  const int64_t C = 5;
  Tensor x = Tensor::from_vector({1, 2, 3, 4, 5, -2, 0, 2, 4, 6}, {2, C});
  Tensor gamma = Tensor::from_vector({1, 2, 3, 0.5f, -1}, {C}), beta = Tensor::from_vector({0, 1, -1, 2, 0}, {C});
  const std::vector<float> out = ops::layernorm(x, gamma, beta, 0.0f).to_vector();
  // Row 0 is 3 + (−2, −1, 0, 1, 2) with σ² = 2, row 1 is 2 + 2·(−2, −1, 0, 1, 2) with σ² = 8: both
  // normalise to (−2, −1, 0, 1, 2)/√2.
  const double k = 1.0 / std::sqrt(2.0);
  const double g[] = {1, 2, 3, 0.5, -1}, b[] = {0, 1, -1, 2, 0}, z[] = {-2, -1, 0, 1, 2};
  for (int r = 0; r < 2; ++r)
    for (int c = 0; c < C; ++c) EXPECT_NEAR(out[r * C + c], z[c] * k * g[c] + b[c], 2e-6) << r << "," << c;
}

TEST(LayerNorm, ShapeMismatchNamesTheShapes) {
  const std::string msg =
      message_of([] { ops::layernorm(Tensor::zeros({2, 4}), Tensor::ones({5}), Tensor::zeros({4})); });
  EXPECT_MESSAGE_HAS(msg, "(5,)");
  EXPECT_MESSAGE_HAS(msg, "(2, 4)");
}

// ---- embedding ----------------------------------------------------------------------------------------

TEST(Embedding, ForwardPicksTheRows) {
  Tensor weight = random_leaf({6, 3}, 52);
  const Tensor ids = Tensor::from_ints({5, 0, 5, 2}, {2, 2});
  Tensor out = ops::embedding(weight, ids);
  ASSERT_EQ(out.shape(), (Shape{2, 2, 3}));
  const std::vector<float> w = weight.to_vector(), o = out.to_vector();
  const int pick[] = {5, 0, 5, 2};
  for (int n = 0; n < 4; ++n)
    for (int c = 0; c < 3; ++c) EXPECT_EQ(o[n * 3 + c], w[pick[n] * 3 + c]);
}

TEST(Embedding, BackwardAddsTheRowsOfRepeatedIdsAndZeroesUnusedOnes) {
  Tensor weight = random_leaf({4, 2}, 53);
  const Tensor ids = Tensor::from_ints({1, 3, 1, 1}, {4});
  Tensor dout = Tensor::from_vector({1, 2, 10, 20, 100, 200, 1000, 2000}, {4, 2});
  backward(ops::embedding(weight, ids), dout);
  const std::vector<float> expected = {0, 0, 1101, 2202, 0, 0, 10, 20};
  EXPECT_EQ(weight.grad().to_vector(), expected);
}

TEST(Embedding, BadIdNamesTheIdItsPositionAndTheTableSize) {
  Tensor weight = Tensor::zeros({5, 3});
  const std::string msg = message_of([&] { ops::embedding(weight, Tensor::from_ints({0, 1, 2, 3, 9, 1}, {2, 3})); });
  EXPECT_MESSAGE_HAS(msg, "id 9");
  EXPECT_MESSAGE_HAS(msg, "(1, 1)");
  EXPECT_MESSAGE_HAS(msg, "[0, 5)");
  const std::string neg = message_of([&] { ops::embedding(weight, Tensor::from_ints({2, -1}, {2})); });
  EXPECT_MESSAGE_HAS(neg, "id -1");
  EXPECT_MESSAGE_HAS(neg, "(1,)");
}

TEST(Embedding, WeightMustBeAMatrixOfFloats) {
  const std::string msg = message_of([] { ops::embedding(Tensor::zeros({5}), Tensor::from_ints({0}, {1})); });
  EXPECT_MESSAGE_HAS(msg, "(5,)");
  const std::string ids_msg = message_of([] { ops::embedding(Tensor::zeros({5, 2}), Tensor::zeros({1})); });
  EXPECT_MESSAGE_HAS(ids_msg, "i32");
}

// ---- softmax ------------------------------------------------------------------------------------------

TEST(Softmax, MatchesTheDoubleReferenceEvenForHugeInputs) {
  // Row 1 sits near 1000, where exp without the max subtracted overflows; row 2 has −inf entries.
  const float inf = std::numeric_limits<float>::infinity();
  Tensor x = Tensor::from_vector({0.5f, -1, 2, 0, 1000, 1001, 999.5f, 1000, -inf, 3, -inf, 1}, {3, 4});
  const std::vector<float> xv = x.to_vector(), y = ops::softmax(x).to_vector();
  for (int r = 0; r < 3; ++r) {
    double m = -INFINITY, s = 0;
    for (int c = 0; c < 4; ++c) m = std::max(m, static_cast<double>(xv[r * 4 + c]));
    for (int c = 0; c < 4; ++c) s += std::exp(xv[r * 4 + c] - m);
    for (int c = 0; c < 4; ++c)  // probabilities ≤ 1 from a few f32 roundings
      EXPECT_NEAR(y[r * 4 + c], std::exp(xv[r * 4 + c] - m) / s, 1e-6) << r << "," << c;
  }
  EXPECT_EQ(y[8], 0.0f);
  EXPECT_EQ(y[10], 0.0f);
}

// ---- cross-entropy --------------------------------------------------------------------------------------

TEST(CrossEntropy, AllEqualLogitsGiveLogOfTheVocabulary) {
  // softmax is uniform over the vocab columns, whatever the padding holds: loss = ln(vocab).
  Tensor logits = Tensor::full({4, 12}, 0.37f);
  const Tensor targets = Tensor::from_ints({0, 9, 3, 3}, {4});
  // Two f32 roundings of numbers below 3: within 1e-6.
  EXPECT_NEAR(ops::cross_entropy(logits, targets, 10).item(), std::log(10.0), 1e-6);
  EXPECT_NEAR(ops::cross_entropy(logits, targets).item(), std::log(12.0), 1e-6);
}

TEST(CrossEntropy, MatchesTheDoubleReferenceAndStaysStableForLargeLogits) {
  const int64_t N = 3, Vp = 7, V = 6;
  Tensor logits = random_leaf({N, Vp}, 54, 3.0f);
  {
    float* p = logits.data<float>();
    for (int64_t v = 0; v < Vp; ++v) p[Vp + v] += 500.0f;  // row 1 near 500: exp would overflow unshifted
  }
  const Tensor targets = Tensor::from_ints({5, 0, 2}, {N});
  const std::vector<float> x = logits.to_vector();
  double expected = 0;
  for (int64_t n = 0; n < N; ++n) {
    double m = -INFINITY, s = 0;
    for (int64_t v = 0; v < V; ++v) m = std::max(m, static_cast<double>(x[n * Vp + v]));
    for (int64_t v = 0; v < V; ++v) s += std::exp(x[n * Vp + v] - m);
    expected += m + std::log(s) - x[n * Vp + targets.to_int_vector()[n]];
  }
  // lse ≈ 500 carries an f32 rounding of 3e-5, divided by 3 rows.
  EXPECT_NEAR(ops::cross_entropy(logits, targets, V).item(), expected / N, 4e-5);
}

// The forward computes the logits' gradient for the dloss the caller expects. The dloss expected gives
// the backward kernel's bits; another dloss rescales once (within one more rounding), and a second
// backward through the same node (keep_graph) with it does not rescale again. The node keeps that
// gradient, not the logits: they are freed with the caller's last handle.
TEST(CrossEntropy, TheForwardsGradientIsForTheExpectedDlossAndRescaledForAnother) {
  const int64_t V = 11;
  const Tensor x0 = random_leaf({6, V}, 71, 2.0f);
  const Tensor targets = Tensor::from_ints({3, 0, -1, 10, 7, 7}, {6});
  auto gradient = [&](float expected, float dloss, int passes) {
    Tensor logits = x0.detach().set_requires_grad(true);
    Tensor loss = ops::scale(ops::cross_entropy(logits, targets, V, -1, expected), dloss);
    for (int p = 0; p < passes; ++p) backward(loss, Tensor(), /*keep_graph=*/p + 1 < passes);
    return logits.grad().to_vector();
  };
  const std::vector<float> exact = gradient(0.5f, 0.5f, 1), rescaled = gradient(1.0f, 0.5f, 1);
  double scale = 0.0;
  for (float v : exact) scale = std::max(scale, static_cast<double>(std::fabs(v)));
  for (size_t i = 0; i < exact.size(); ++i) {
    EXPECT_NEAR(rescaled[i], exact[i], 1e-6 * scale) << i;
    EXPECT_NEAR(gradient(1.0f, 0.5f, 2)[i], 2.0f * exact[i], 2e-6 * scale) << "two passes, element " << i;
  }
  EXPECT_EQ(gradient(0.5f, 0.5f, 2), [&] {
    std::vector<float> twice = exact;
    for (float& v : twice) v += v;
    return twice;
  }()) << "two passes with the expected dloss: twice the same bits";

  std::weak_ptr<Storage> logits_storage;
  Tensor loss;
  {
    Tensor logits = ops::scale(x0.detach().set_requires_grad(true), 1.0f);
    logits_storage = logits.impl()->storage;
    loss = ops::cross_entropy(logits, targets, V);
  }
  EXPECT_TRUE(logits_storage.expired()) << "the loss node must not keep the logits";
  backward(loss);
}

TEST(CrossEntropy, GradientIsSoftmaxMinusOneHotOverCountWithExactZerosElsewhere) {
  // (B, T, Vp) = (2, 2, 9), vocab 7, row (1, 0) ignored: 3 counted rows.
  const int64_t Vp = 9, V = 7;
  Tensor logits = random_leaf({2, 2, Vp}, 55, 2.0f);
  const std::vector<int32_t> t = {6, 1, -100, 0};
  const Tensor targets = Tensor::from_ints(t, {2, 2});
  backward(ops::cross_entropy(logits, targets, V, -100));
  const std::vector<float> x = logits.to_vector(), g = logits.grad().to_vector();
  for (int64_t n = 0; n < 4; ++n) {
    if (t[n] == -100) {
      for (int64_t v = 0; v < Vp; ++v) EXPECT_EQ(g[n * Vp + v], 0.0f) << "ignored row " << n << " col " << v;
      continue;
    }
    for (int64_t v = V; v < Vp; ++v) EXPECT_EQ(g[n * Vp + v], 0.0f) << "padding of row " << n << " col " << v;
    double m = -INFINITY, s = 0;
    for (int64_t v = 0; v < V; ++v) m = std::max(m, static_cast<double>(x[n * Vp + v]));
    for (int64_t v = 0; v < V; ++v) s += std::exp(x[n * Vp + v] - m);
    for (int64_t v = 0; v < V; ++v) {
      const double p = std::exp(x[n * Vp + v] - m) / s;
      // entries ≤ 1/3 from a few f32 roundings
      EXPECT_NEAR(g[n * Vp + v], (p - (v == t[n] ? 1.0 : 0.0)) / 3.0, 1e-6) << n << "," << v;
    }
  }
}

TEST(CrossEntropy, LargeGradientStoredAroundTheCachesIsStillExact) {
  // 160 × 52433 elements is above the CPU kernel's 2^23-element threshold for non-temporal stores,
  // and the odd row length puts most rows' starts off the vector alignment, so the aligned head, the
  // streamed body and the tail of the store are all exercised. The kernels are called directly on
  // buffers filled by a hash: at this size a Philox fill and the tape's copy of a leaf's gradient
  // would take most of a second.
  const int64_t N = 160, Vp = 52433, V = 52400;
  Tensor logits = Tensor::empty({N, Vp});
  float* x = logits.data<float>();
  for (int64_t i = 0; i < N * Vp; ++i)  // uniform in [−4, 4) from the top bits of a multiplicative hash
    x[i] = static_cast<float>((static_cast<uint32_t>(i) * 2654435761u) >> 8) * (8.0f / 16777216.0f) - 4.0f;
  std::vector<int32_t> t = random_ids(N, V, 72).to_int_vector();
  t[2] = -1;
  Tensor losses = Tensor::empty({N}), lse = Tensor::empty({N}), grad = Tensor::empty({N, Vp});
  const float dloss = 1.0f;
  kernels::cross_entropy_forward_cpu(losses.data<float>(), lse.data<float>(), x, t.data(), N, Vp, V, -1);
  kernels::cross_entropy_backward_cpu(grad.data<float>(), x, lse.data<float>(), t.data(), &dloss, N - 1, N, Vp, V, -1);
  const float* g = grad.data<float>();
  for (int64_t v = 0; v < Vp; ++v) ASSERT_EQ(g[2 * Vp + v], 0.0f) << "ignored row, column " << v;
  for (int64_t n : {int64_t{0}, int64_t{1}, N - 1}) {
    for (int64_t v = V; v < Vp; ++v) ASSERT_EQ(g[n * Vp + v], 0.0f) << "padding of row " << n;
    double m = -INFINITY, s = 0;
    for (int64_t v = 0; v < V; ++v) m = std::max(m, static_cast<double>(x[n * Vp + v]));
    for (int64_t v = 0; v < V; ++v) s += std::exp(x[n * Vp + v] - m);
    double worst = 0;
    for (int64_t v = 0; v < V; ++v) {
      const double expected = (std::exp(x[n * Vp + v] - m) / s - (v == t[n] ? 1.0 : 0.0)) / (N - 1);
      worst = std::max(worst, std::fabs(g[n * Vp + v] - expected));
    }
    // entries ≤ 1/159 carried with f32 relative error ~1e-6
    EXPECT_LT(worst, 1e-8) << "row " << n;
  }
}

TEST(CrossEntropy, SumAgreesWithTheMeanTimesTheCount) {
  Tensor logits = random_leaf({3, 5, 40}, 56, 2.0f);
  std::vector<int32_t> t = random_ids(15, 33, 57).to_int_vector();
  t[4] = t[11] = -1;
  const Tensor targets = Tensor::from_ints(t, {3, 5});
  const ops::LossSum s = ops::cross_entropy_sum(logits, targets, 33);
  EXPECT_EQ(s.count, 13);
  const float mean = ops::cross_entropy(logits, targets, 33).item();
  // Both reduce the same per-row losses in the same double order, so they agree to the bit.
  EXPECT_EQ(mean, static_cast<float>(s.sum / static_cast<double>(s.count)));
  EXPECT_NEAR(s.sum, static_cast<double>(mean) * s.count, 1e-5 * s.sum);
}

TEST(CrossEntropy, NoCountedRowGivesZeroLossAndZeroGradient) {
  Tensor logits = random_leaf({2, 4}, 58);
  Tensor loss = ops::cross_entropy(logits, Tensor::from_ints({-1, -1}, {2}));
  EXPECT_EQ(loss.item(), 0.0f);
  backward(loss);
  EXPECT_EQ(logits.grad().to_vector(), std::vector<float>(8, 0.0f));
  EXPECT_EQ(ops::cross_entropy_sum(logits, Tensor::from_ints({-1, -1}, {2})).count, 0);
}

TEST(CrossEntropy, BadTargetNamesTheTargetTheRowAndTheVocabulary) {
  Tensor logits = Tensor::zeros({2, 2, 12});
  // 11 is inside the padded logits but outside vocab 10: still an error.
  const std::string msg =
      message_of([&] { ops::cross_entropy(logits, Tensor::from_ints({1, -1, 11, 2}, {2, 2}), 10); });
  EXPECT_MESSAGE_HAS(msg, "target 11");
  EXPECT_MESSAGE_HAS(msg, "row 2");
  EXPECT_MESSAGE_HAS(msg, "(1, 0)");
  EXPECT_MESSAGE_HAS(msg, "vocab = 10");
  const std::string sum_msg =
      message_of([&] { ops::cross_entropy_sum(logits, Tensor::from_ints({-5, 0, 0, 0}, {2, 2}), 10); });
  EXPECT_MESSAGE_HAS(sum_msg, "target -5");
  EXPECT_MESSAGE_HAS(sum_msg, "row 0");
}

TEST(CrossEntropy, MismatchedShapesAndVocabNameTheNumbers) {
  const std::string msg =
      message_of([] { ops::cross_entropy(Tensor::zeros({4, 10}), Tensor::from_ints({0, 1, 2}, {3})); });
  EXPECT_MESSAGE_HAS(msg, "(3,)");
  EXPECT_MESSAGE_HAS(msg, "(4, 10)");
  const std::string vocab_msg =
      message_of([] { ops::cross_entropy(Tensor::zeros({2, 10}), Tensor::from_ints({0, 1}, {2}), 11); });
  EXPECT_MESSAGE_HAS(vocab_msg, "vocab 11");
  EXPECT_MESSAGE_HAS(vocab_msg, "(2, 10)");
  const std::string dim_msg = message_of([] { ops::cross_entropy(Tensor::zeros({10}), Tensor::from_ints({0}, {1})); });
  EXPECT_MESSAGE_HAS(dim_msg, "(10,)");
}

// ---- determinism: one thread and two give the same bits ---------------------------------------------

// Runs f with `threads` OpenMP threads and returns what it produced.
std::vector<std::vector<float>> with_threads(int threads, const std::function<std::vector<Tensor>()>& f) {
  const int previous = omp_get_max_threads();
  omp_set_num_threads(threads);
  std::vector<std::vector<float>> out;
  for (const Tensor& t : f()) out.push_back(t.to_vector());
  omp_set_num_threads(previous);
  return out;
}

void expect_bitwise_equal(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].size(), b[i].size());
    EXPECT_EQ(std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(float)), 0)
        << "result " << i << " differs; largest difference " << testing::max_abs_diff(a[i], b[i]).value;
  }
}

// Sizes are above the kernels' threading thresholds, so the two-thread run really splits the work.
TEST(Determinism, LayerNormIsBitIdenticalForOneAndTwoThreads) {
  auto run = [] {
    Tensor x = random_leaf({512, 96}, 60), gamma = random_leaf({96}, 61), beta = random_leaf({96}, 62);
    backward(ops::layernorm(x, gamma, beta), random_leaf({512, 96}, 63).detach());
    return std::vector<Tensor>{ops::layernorm(x, gamma, beta).detach(), x.grad(), gamma.grad(), beta.grad()};
  };
  expect_bitwise_equal(with_threads(1, run), with_threads(2, run));
}

TEST(Determinism, EmbeddingIsBitIdenticalForOneAndTwoThreads) {
  auto run = [] {
    Tensor weight = random_leaf({50, 160}, 64);
    Tensor out = ops::embedding(weight, random_ids(1024, 50, 65));
    backward(out, random_leaf({1024, 160}, 66).detach());
    return std::vector<Tensor>{out.detach(), weight.grad()};
  };
  expect_bitwise_equal(with_threads(1, run), with_threads(2, run));
}

TEST(Determinism, SoftmaxIsBitIdenticalForOneAndTwoThreads) {
  auto run = [] {
    Tensor x = random_leaf({256, 100}, 67, 3.0f);
    Tensor y = ops::softmax(x);
    backward(y, random_leaf({256, 100}, 68).detach());
    return std::vector<Tensor>{y.detach(), x.grad()};
  };
  expect_bitwise_equal(with_threads(1, run), with_threads(2, run));
}

TEST(Determinism, CrossEntropyIsBitIdenticalForOneAndTwoThreads) {
  // Vp = 4500 spans several of the forward's 2048-column chunks.
  auto run = [] {
    Tensor logits = random_leaf({64, 4500}, 69, 4.0f);
    std::vector<int32_t> t = random_ids(64, 4400, 70).to_int_vector();
    t[7] = -1;
    Tensor loss = ops::cross_entropy(logits, Tensor::from_ints(t, {64}), 4400);
    backward(loss);
    return std::vector<Tensor>{loss.detach(), logits.grad()};
  };
  expect_bitwise_equal(with_threads(1, run), with_threads(2, run));
}

}  // namespace
}  // namespace kraken::runtime
