// The CUDA backend's transformer ops against the CPU: layernorm (with and without beta), embedding,
// softmax, fused attention, fused cross-entropy (padding, ignored rows, the evaluation sum), dropout and
// the Philox fills, forward and backward; and the device ops' errors. Skips where there is no GPU.
//
// Tolerances (relative to the reference's largest magnitude; see gpu_test_util.h):
//   0      embedding (a copy forward; backward, contributions added in kernels/embedding.h's order on both devices),
//          dropout (the same Philox mask and one product per element), uniform fills;
//   1e-5   one reduction of ≤ 1,000 terms per output (layernorm rows, softmax rows, dgamma over rows,
//          cross-entropy's log-sum-exp over V), plus expf (CUDA, 2 ulp) against the CPU's polynomial exp
//          (≤ 1 ulp, tests/runtime/ops_nn_test.cpp);
//   1e-5 / 2e-5  attention forward / backward: the forward is two chained reductions (q·k over D, then
//          P·v over T, tile by tile on the GPU); the backward four (dP, D_i = Σ dO∘O, then dS's
//          products over T and D), and dS = P∘(dP − D_i) subtracts nearly equal numbers on peaked rows.
// Measured on the CPU at these shapes: perturbing the inputs by ±2 ulp (the size of a reordered sum's
// error) moves outputs and gradients by 1e-7 to 5e-7 of their scale for every op here, so each bound
// is 20 to 250 times that noise floor.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>

#include "kernels/random.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "runtime/rng.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/support/errors.h"

namespace kraken::runtime {
namespace {

using testing::expect_close;
using testing::expect_matches_cpu;
using testing::random_ids;
using testing::random_tensor;
using testing::test_device;
using testing::to_test_device;

Tensor leaf(const Shape& shape, uint64_t seed, float std = 1.0f) {
  Tensor t = random_tensor(shape, seed, std);
  t.set_requires_grad(true);
  return t;
}

using ::kraken::testing::message_of;

// ---- layernorm ----------------------------------------------------------------------------------------

TEST(GpuLayerNorm, MatchesTheCpuWithAndWithoutBeta) {
  KRAKEN_REQUIRE_GPU();
  // C = 100 is not a multiple of the warp; 75 rows leave a partial block of 8 rows and 13 column
  // blocks for dgamma/dbeta, the last one partial. x has a non-zero mean and scale, as activations do.
  Tensor x = ops::add(random_tensor({3, 25, 100}, 40, 2.0f), Tensor::full({100}, 0.7f));  // mean ≈ 0.7
  x.set_requires_grad(true);
  const Tensor gamma = leaf({100}, 41, 0.5f), beta = leaf({100}, 42, 0.5f);
  expect_matches_cpu([](const std::vector<Tensor>& v) { return ops::layernorm(v[0], v[1], v[2]); }, {x, gamma, beta},
                     1e-5, 1e-5, "layernorm with beta");
  expect_matches_cpu([](const std::vector<Tensor>& v) { return ops::layernorm(v[0], v[1], Tensor()); }, {x, gamma},
                     1e-5, 1e-5, "layernorm without beta");
  // Only the parameters want gradients (dx not computed), and only x (dgamma/dbeta not computed).
  const Tensor frozen_x = random_tensor({64, 48}, 43);
  expect_matches_cpu([](const std::vector<Tensor>& v) { return ops::layernorm(v[0], v[1], v[2]); },
                     {frozen_x, leaf({48}, 44), leaf({48}, 45)}, 1e-5, 1e-5, "layernorm, parameters only");
  expect_matches_cpu([](const std::vector<Tensor>& v) { return ops::layernorm(v[0], v[1], v[2]); },
                     {leaf({64, 48}, 46), random_tensor({48}, 47), random_tensor({48}, 48)}, 1e-5, 1e-5,
                     "layernorm, input only");
}

TEST(GpuLayerNorm, FusedResidualAddMatchesTheCpusTwoOps) {
  KRAKEN_REQUIRE_GPU();
  // One kernel on the GPU (s = a + b stored, then normalised), add then layernorm on the CPU. Both
  // outputs take gradient (s continues the residual stream, weighted 0.7 here), so the fused backward
  // adds the normalisation's dx to the stream's gradient; then the normalised output alone.
  auto both = [](const std::vector<Tensor>& v) {
    std::vector<Tensor> s_h = ops::add_layernorm(v[0], v[1], v[2], v[3]);
    return ops::add(ops::scale(s_h[0], 0.7f), s_h[1]);
  };
  expect_matches_cpu(both, {leaf({3, 25, 100}, 49, 2.0f), leaf({3, 25, 100}, 50), leaf({100}, 51, 0.5f),
                            leaf({100}, 52, 0.5f)}, 1e-5, 1e-5, "add_layernorm, both outputs");
  expect_matches_cpu([](const std::vector<Tensor>& v) { return ops::add_layernorm(v[0], v[1], v[2], Tensor())[1]; },
                     {leaf({37, 64}, 53), leaf({37, 64}, 54), leaf({64}, 55, 0.5f)}, 1e-5, 1e-5,
                     "add_layernorm, normalised output only, no beta");
}

// ---- embedding ------------------------------------------------------------------------------------------

TEST(GpuEmbedding, ForwardAndBackwardAreBitIdenticalToTheCpu) {
  KRAKEN_REQUIRE_GPU();
  // 300 positions over 20 distinct ids: every used row collects ~15 contributions, summed in position
  // order on both devices. V = 130 spans two of the GPU's 128-id blocks; C = 70 is not a multiple of 32.
  const Tensor weight = leaf({130, 70}, 50);
  for (const Tensor& ids : {random_ids({4, 75}, 20, 51), random_ids({300}, 130, 52)}) {
    expect_matches_cpu([](const std::vector<Tensor>& v) { return ops::embedding(v[0], v[1]); }, {weight, ids}, 0.0, 0.0,
                       "embedding " + shape_str(ids.shape()));
  }
}

// Text's frequent tokens: rows with at least embedding_hot_threshold positions are summed slice by slice
// (kernels/embedding.h), on the GPU in parallel, on the CPU in the same order. 8192 positions over GPT-2's
// vocabulary: 8% on id 262, 5% on 11, 4% on 13 and 3% on 286 (262 and 286 in one of the GPU's id blocks
// and one class of it), 0.2% on 198 (~16), the rest uniform (one position or two, a few with 3): the
// threshold is its least, 8, and those five rows are hot. C = 768 (8 columns a lane, the hot slices 4)
// and 70 (one).
TEST(GpuEmbedding, FrequentTokensAreSummedInTheCpusOrder) {
  KRAKEN_REQUIRE_GPU();
  const int64_t N = 8192, V = 50257;
  Generator gen(64, 1);
  std::vector<int32_t> v(static_cast<size_t>(N));
  for (auto& id : v) {
    const uint64_t u = gen.next_below(1000);
    id = u < 80 ? 262 : u < 130 ? 11 : u < 170 ? 13 : u < 200 ? 286 : u < 202 ? 198
                                                 : static_cast<int32_t>(gen.next_below(static_cast<uint64_t>(V)));
  }
  const Tensor ids = Tensor::from_ints(v, {8, N / 8});
  for (const int64_t C : {int64_t{768}, int64_t{70}}) {
    const Tensor weight = leaf({V, C}, 65);
    expect_matches_cpu([](const std::vector<Tensor>& t) { return ops::embedding(t[0], t[1]); }, {weight, ids}, 0.0, 0.0,
                       "embedding with frequent tokens, C = " + std::to_string(C));
  }
}

TEST(GpuEmbedding, AnIdOutsideTheTableIsAnErrorOnTheDevice) {
  KRAKEN_REQUIRE_GPU();
  const Tensor weight = Tensor::zeros({10, 4}, DType::F32, test_device());
  const Tensor ids = Tensor::from_ints({1, 2, 10, 3}, {2, 2}, test_device());
  const std::string msg = message_of([&] { ops::embedding(weight, ids); });
  EXPECT_NE(msg.find("id 10"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(1, 0)"), std::string::npos) << msg;
}

// GPT-2's first activation in bf16: ops::token_position_embedding's one kernel (and its backward from the
// bf16 gradient) against the three ops it stands for, on the GPU, bit for bit — the output, and wte's and
// wpe's gradients after two backward passes (the second adds to what the first left, as a tied head's
// gradient is there before the embedding's). B = 70: wpe's sums take the two-pass column sums, as at a
// training batch; B = 3, a thread per column. wpe has rows past T, whose gradient stays 0.
TEST(GpuEmbedding, TokenPositionEmbeddingHasTheThreeOpsBitsInBf16) {
  KRAKEN_REQUIRE_GPU();  // (in the dry run on the CPU both sides are the three ops)
  for (const int64_t B : {int64_t{70}, int64_t{3}}) {
    const int64_t V = 130, C = 64, T = 33, context = 40;
    const Tensor ids = random_ids({B, T}, V, 56).to(test_device());
    const Tensor weights = random_tensor({B, T, C}, 57).to(test_device());
    std::vector<Tensor> outs, wte_grads, wpe_grads;
    for (const bool fused : {true, false}) {
      Tensor wte = to_test_device(leaf({V, C}, 58)), wpe = to_test_device(leaf({context, C}, 59, 0.1f));
      Tensor out;
      for (int pass = 0; pass < 2; ++pass) {
        out = fused ? ops::token_position_embedding(wte, wpe, ids, DType::BF16)
                    : ops::cast(ops::add(ops::embedding(wte, ids), ops::slice(wpe, 0, T)), DType::BF16);
        backward(ops::sum(ops::mul(ops::cast(out, DType::F32), weights)));
      }
      ASSERT_EQ(out.dtype(), DType::BF16);
      ASSERT_EQ(out.shape(), Shape({B, T, C}));
      outs.push_back(out.to(DType::F32));
      wte_grads.push_back(wte.grad());
      wpe_grads.push_back(wpe.grad());
    }
    const std::string what = "B = " + std::to_string(B);
    expect_close(outs[0], outs[1], 0.0, "x0, fused against three ops, " + what);
    expect_close(wte_grads[0], wte_grads[1], 0.0, "wte's gradient, " + what);
    expect_close(wpe_grads[0], wpe_grads[1], 0.0, "wpe's gradient, " + what);
    const std::vector<float> tail = wpe_grads[0].to_vector();
    for (size_t i = static_cast<size_t>(T * C); i < tail.size(); ++i)
      ASSERT_EQ(tail[i], 0.0f) << "wpe's gradient past row T, element " << i << ", " << what;
  }
  // A frozen token table: only wpe's gradient, still the three ops' bits.
  const int64_t V = 130, C = 64, T = 33;
  const Tensor ids = random_ids({70, T}, V, 60).to(test_device());
  const Tensor wte = random_tensor({V, C}, 61).to(test_device()), weights = random_tensor({70, T, C}, 62).to(test_device());
  std::vector<Tensor> wpe_grads;
  for (const bool fused : {true, false}) {
    Tensor wpe = to_test_device(leaf({T, C}, 63, 0.1f));
    const Tensor out = fused ? ops::token_position_embedding(wte, wpe, ids, DType::BF16)
                             : ops::cast(ops::add(ops::embedding(wte, ids), ops::slice(wpe, 0, T)), DType::BF16);
    backward(ops::sum(ops::mul(ops::cast(out, DType::F32), weights)));
    EXPECT_FALSE(wte.grad().defined()) << "a table that needs no gradient got one";
    wpe_grads.push_back(wpe.grad());
  }
  expect_close(wpe_grads[0], wpe_grads[1], 0.0, "wpe's gradient beside a frozen wte");
}

TEST(GpuEmbedding, TokenPositionEmbeddingNamesAnIdOutsideTheTable) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  const Tensor wte = Tensor::zeros({10, 8}, DType::F32, test_device()), wpe = Tensor::zeros({4, 8}, DType::F32, test_device());
  const Tensor ids = Tensor::from_ints({1, 2, 10, 3}, {2, 2}, test_device());
  const std::string msg = message_of([&] { ops::token_position_embedding(wte, wpe, ids, DType::BF16); });
  EXPECT_NE(msg.find("token_position_embedding: id 10"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(1, 0)"), std::string::npos) << msg;
  const Tensor short_wpe = Tensor::zeros({1, 8}, DType::F32, test_device());
  const std::string rows = message_of([&] { ops::token_position_embedding(wte, short_wpe, Tensor::from_ints({1, 2}, {1, 2}, test_device()), DType::BF16); });
  EXPECT_NE(rows.find("at least T = 2 rows"), std::string::npos) << rows;
}

// ---- softmax --------------------------------------------------------------------------------------------

TEST(GpuSoftmax, MatchesTheCpu) {
  KRAKEN_REQUIRE_GPU();
  // Rows of 1000 (several strides of the 256-thread block) and of 7 (most threads idle).
  for (int64_t C : {1000, 7}) {
    SCOPED_TRACE(C);
    expect_matches_cpu([](const std::vector<Tensor>& v) { return ops::softmax(v[0]); }, {leaf({13, C}, 53, 3.0f)}, 1e-5,
                       1e-5, "softmax");
  }
}

// ---- attention ------------------------------------------------------------------------------------------

TEST(GpuAttention, MatchesTheCpuForHeadSizesAndRaggedLengths) {
  KRAKEN_REQUIRE_GPU();
  // (B, T, C, H): T not a multiple of the 32-row tiles (a partial last tile, rows past T masked), one
  // shorter than a tile, and one exact; head sizes 16, 64 (GPT-2), 128 and 168 (the 4-way 125M preset)
  // — 128 and 168 need more than 48 KiB of shared memory, which the kernels must ask for.
  struct Case {
    int64_t B, T, C, H;
  };
  for (const Case& c : {Case{2, 45, 64, 4}, Case{1, 7, 32, 2}, Case{2, 64, 128, 2}, Case{1, 77, 256, 2},
                        Case{1, 40, 336, 2}}) {
    SCOPED_TRACE("B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) + " C=" + std::to_string(c.C) +
                 " H=" + std::to_string(c.H));
    const int64_t H = c.H;
    expect_matches_cpu([H](const std::vector<Tensor>& v) { return ops::attention(v[0], H); },
                       {leaf({c.B, c.T, 3 * c.C}, 54)}, 1e-5, 2e-5, "attention");
  }
}

// ---- cross-entropy ------------------------------------------------------------------------------------

TEST(GpuCrossEntropy, MatchesTheCpuWithPaddingAndIgnoredRows) {
  KRAKEN_REQUIRE_GPU();
  // Vp = 130 of which V = 100 are real: the 30 padding columns take no part and get exactly 0;
  // targets of −1 are ignored rows (gradient exactly 0). Logits of std 3 make peaked rows.
  const Tensor logits = leaf({3, 7, 130}, 60, 3.0f);
  std::vector<int32_t> t = random_ids({21}, 100, 61).to_int_vector();
  for (int i : {0, 5, 6, 13}) t[static_cast<size_t>(i)] = -1;
  const Tensor targets = Tensor::from_ints(t, {3, 7});
  expect_matches_cpu([](const std::vector<Tensor>& v) { return ops::cross_entropy(v[0], v[1], 100, -1); },
                     {logits, targets}, 1e-5, 1e-5, "cross_entropy");
  // The exact zeros the contract promises, on the device.
  Tensor dev_logits = to_test_device(logits);
  backward(ops::cross_entropy(dev_logits, targets.to(test_device()), 100, -1));
  const std::vector<float> g = dev_logits.grad().to_vector();
  for (int64_t n = 0; n < 21; ++n) {
    for (int64_t v = 0; v < 130; ++v) {
      if (v >= 100 || t[static_cast<size_t>(n)] == -1) {
        ASSERT_EQ(g[n * 130 + v], 0.0f) << "row " << n << " column " << v;
      }
    }
  }
}

TEST(GpuCrossEntropy, MatchesTheCpuAtGpt2VocabularySize) {
  KRAKEN_REQUIRE_GPU();
  // 50304 padded columns, 50257 real: the size the training runs use (each row spans many strides).
  const Tensor logits = leaf({6, 50304}, 62, 2.0f);
  const Tensor targets = random_ids({6}, 50257, 63);
  expect_matches_cpu([](const std::vector<Tensor>& v) { return ops::cross_entropy(v[0], v[1], 50257, -1); },
                     {logits, targets}, 1e-5, 1e-5, "cross_entropy V = 50257");
}

TEST(GpuCrossEntropy, EveryRowIgnoredGivesZeroLossAndGradient) {
  KRAKEN_REQUIRE_GPU();
  Tensor logits = to_test_device(leaf({4, 50}, 64));
  const Tensor targets = Tensor::from_ints({-1, -1, -1, -1}, {4}, test_device());
  const Tensor loss = ops::cross_entropy(logits, targets, -1, -1);
  EXPECT_EQ(loss.item(), 0.0f);
  backward(loss);
  for (float g : logits.grad().to_vector()) ASSERT_EQ(g, 0.0f);
}

TEST(GpuCrossEntropy, EvaluationSumMatchesTheCpu) {
  KRAKEN_REQUIRE_GPU();
  const Tensor logits = random_tensor({2, 9, 70}, 65, 2.0f);
  std::vector<int32_t> t = random_ids({18}, 64, 66).to_int_vector();
  t[3] = -1;
  const Tensor targets = Tensor::from_ints(t, {2, 9});
  const ops::LossSum cpu = ops::cross_entropy_sum(logits, targets, 64, -1);
  const ops::LossSum dev = ops::cross_entropy_sum(logits.to(test_device()), targets.to(test_device()), 64, -1);
  EXPECT_EQ(dev.count, 17);
  EXPECT_EQ(dev.count, cpu.count);
  EXPECT_NEAR(dev.sum, cpu.sum, 1e-5 * std::fabs(cpu.sum));  // per-row log-sum-exp, summed in one order
}

TEST(GpuCrossEntropy, ATargetOutsideTheVocabularyIsAnErrorOnTheDevice) {
  KRAKEN_REQUIRE_GPU();
  const Tensor logits = Tensor::zeros({3, 16}, DType::F32, test_device());
  const Tensor targets = Tensor::from_ints({0, 12, 2}, {3}, test_device());
  const std::string msg = message_of([&] { ops::cross_entropy(logits, targets, 10, -1); });
  EXPECT_NE(msg.find("target 12 at row 1"), std::string::npos) << msg;
}

// ---- dropout and the Philox fills ------------------------------------------------------------------------

TEST(GpuDropout, MasksAndGradientsAreBitIdenticalToTheCpu) {
  KRAKEN_REQUIRE_GPU();
  // The mask is uniform_i ≥ p from the same Philox counter on both devices; the generators advance
  // alike, so two calls in a row (two layers) also agree. n = 10007 is not a multiple of 4 (the last
  // Philox block is partly used).
  for (float p : {0.1f, 0.5f}) {
    SCOPED_TRACE(p);
    Generator g_cpu(77, 9), g_dev(77, 9);
    const Tensor x = leaf({10007}, 70);
    Tensor x_dev = to_test_device(x);
    const Tensor y_cpu = ops::dropout(ops::dropout(x, p, g_cpu), p, g_cpu);
    const Tensor y_dev = ops::dropout(ops::dropout(x_dev, p, g_dev), p, g_dev);
    expect_close(y_dev, y_cpu, 0.0, "dropout output");
    EXPECT_EQ(g_dev.state(), g_cpu.state());
    const Tensor w = random_tensor({10007}, 71);
    backward(y_cpu, w);
    backward(y_dev, w.to(test_device()));
    expect_close(x_dev.grad(), x.grad(), 0.0, "dropout gradient");
    // About (1 − p)² of the elements survive both layers.
    int64_t kept = 0;
    for (float v : y_dev.to_vector()) kept += v != 0.0f;
    EXPECT_NEAR(static_cast<double>(kept) / 10007.0, (1.0 - p) * (1.0 - p), 0.02);
  }
}

TEST(GpuPhilox, UniformFillsAreBitIdenticalAndNormalFillsAgreeToAFewUlps) {
  KRAKEN_REQUIRE_GPU();
  const int64_t n = 100003;
  Generator g_cpu(123, 4), g_dev(123, 4);
  Tensor u_cpu = Tensor::empty({n}), u_dev = Tensor::empty({n}, DType::F32, test_device());
  g_cpu.fill_uniform(u_cpu, -0.5f, 2.0f);
  g_dev.fill_uniform(u_dev, -0.5f, 2.0f);
  expect_close(u_dev, u_cpu, 0.0, "uniform fill");
  // Box–Muller: logf and cosf differ by 1–2 ulp between CUDA and glibc, so each value is within a few
  // ulp of its own magnitude (≤ 6σ here): 1e-6 of the largest is about 10 ulp of it.
  Tensor n_cpu = Tensor::empty({n}), n_dev = Tensor::empty({n}, DType::F32, test_device());
  g_cpu.fill_normal(n_cpu, 0.1f, 0.02f);
  g_dev.fill_normal(n_dev, 0.1f, 0.02f);
  expect_close(n_dev, n_cpu, 1e-6, "normal fill");
  EXPECT_EQ(g_dev.state(), g_cpu.state());
  // The offsets each fill reserved: n/4 blocks for the uniform one, n/2 for the normal one.
  EXPECT_EQ(g_dev.state().offset, kernels::uniform_blocks(n) + kernels::normal_blocks(n));
}

}  // namespace
}  // namespace kraken::runtime
