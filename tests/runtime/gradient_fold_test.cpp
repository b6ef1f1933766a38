// Folding a tensor's gradient so far into a backward kernel's own pass (runtime::take_gradient_so_far):
// the engine hands a partial sum over once and forgets it; the ops that fold (layernorm's dx, sum_stack's
// broadcast) give the bits the engine's own sum gave — the same two operands added once — without the
// zero fills and copies around it (runtime::memory_traffic).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "runtime/allocator.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "tests/support/gradcheck.h"

namespace kraken::runtime {
namespace {

using testing::random_leaf;

std::vector<uint32_t> bits(const Tensor& t) {
  const std::vector<float> v = t.to_vector();
  std::vector<uint32_t> out(v.size());
  if (!v.empty()) std::memcpy(out.data(), v.data(), v.size() * sizeof(float));
  return out;
}

// h = 3v feeds a folding op (recorded first) and, recorded after it so that its backward runs first,
// another consumer. The fold finds that consumer's gradient in h's slot, takes it, and returns it plus
// its own 5·dout; the engine must then not add it a second time.
TEST(GradientFold, AClosureTakesTheGradientSoFarAndTheEngineForgetsIt) {
  Tensor v = Tensor::from_vector({1.0f, -2.0f}, {2}).set_requires_grad(true);
  Tensor h = ops::scale(v, 3.0f);
  Tensor folded = Tensor::from_vector({0.0f, 0.0f}, {2});
  std::vector<float> seen;
  bool writable = false, taken_once = false;
  record("fold", {h}, {folded}, [&](const std::vector<Tensor>& g) {
    Tensor so_far = take_gradient_so_far(0);
    if (so_far.defined()) seen = so_far.to_vector();
    writable = writable_in_place(so_far);
    taken_once = !take_gradient_so_far(0).defined() && !take_gradient_so_far(7).defined();
    Tensor own = ops::scale(g[0], 5.0f);
    return std::vector<Tensor>{so_far.defined() ? ops::add(so_far, own) : own};
  });
  backward(ops::add(ops::sum(folded), ops::sum(ops::scale(h, 2.0f))));
  EXPECT_EQ(seen, (std::vector<float>{2.0f, 2.0f})) << "the later consumer's gradient, 2 per element";
  EXPECT_TRUE(writable) << "scale's backward made a gradient nothing else holds";
  EXPECT_TRUE(taken_once) << "a second take (and an input that does not exist) must find nothing";
  EXPECT_EQ(v.grad().to_vector(), (std::vector<float>{21.0f, 21.0f})) << "3·(2 + 5), the 2 counted once";
  EXPECT_FALSE(take_gradient_so_far(0).defined()) << "outside backward there is nothing to take";
}

// add's backward hands one tensor to both of its inputs: h's partial sum is then also h2's gradient, and
// writing it in place would change h2's. A leaf input has no partial sum to hand over.
TEST(GradientFold, ASharedPartialSumIsNotWritableAndALeafHasNone) {
  Tensor v = Tensor::from_vector({1.0f, 2.0f}, {2}).set_requires_grad(true);
  Tensor w = Tensor::from_vector({4.0f, 8.0f}, {2}).set_requires_grad(true);
  Tensor h = ops::scale(v, 3.0f), h2 = ops::scale(w, 1.0f);
  Tensor folded = Tensor::from_vector({0.0f, 0.0f}, {2}), from_leaf = Tensor::from_vector({0.0f, 0.0f}, {2});
  bool writable = true, leaf_has_none = false;
  record("fold", {h}, {folded}, [&](const std::vector<Tensor>& g) {
    Tensor so_far = take_gradient_so_far(0);
    writable = writable_in_place(so_far);
    return std::vector<Tensor>{so_far.defined() ? ops::add(so_far, g[0]) : g[0]};
  });
  record("fold_leaf", {v}, {from_leaf}, [&](const std::vector<Tensor>& g) {
    leaf_has_none = !take_gradient_so_far(0).defined();
    return std::vector<Tensor>{g[0]};
  });
  backward(ops::add(ops::add(ops::sum(folded), ops::sum(from_leaf)), ops::sum(ops::add(h, h2))));
  EXPECT_FALSE(writable) << "h's partial sum is h2's gradient too";
  EXPECT_TRUE(leaf_has_none);
  EXPECT_EQ(w.grad().to_vector(), (std::vector<float>{1.0f, 1.0f}));
  EXPECT_EQ(v.grad().to_vector(), (std::vector<float>{7.0f, 7.0f})) << "3·(1 + 1) + 1";
}

// Without a fold the engine still avoids the copy: add's backward hands one gradient to h and h2, so h's
// partial sum is shared; the next contribution to h is a fresh tensor, and the engine adds the partial sum
// into it rather than into a copy of the partial sum. h2's gradient stays what add gave it.
TEST(GradientFold, TheEngineAddsASharedPartialSumIntoAFreshContribution) {
  const Tensor v0 = random_leaf({64}, 21, 1.0f), w0 = random_leaf({64}, 22, 1.0f);
  Tensor v = v0.detach().set_requires_grad(true), w = w0.detach().set_requires_grad(true);
  Tensor h = ops::scale(v, 3.0f), h2 = ops::scale(w, 1.0f);
  Tensor first = ops::mul(h, h);  // recorded first: its backward comes after add's
  Tensor loss = ops::add(ops::sum(first), ops::sum(ops::add(h, h2)));
  const MemoryTraffic before = memory_traffic();
  backward(loss);
  const MemoryTraffic moved = memory_traffic() - before;
  EXPECT_EQ(moved.copies, 0u) << moved.copied_bytes << " bytes copied";
  const std::vector<float> got = v.grad().to_vector(), v_in = v0.to_vector();
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], 3.0 * (1.0 + 6.0 * v_in[i]), 1e-5) << i;
  EXPECT_EQ(w.grad().to_vector(), std::vector<float>(64, 1.0f));
}

// x feeds a LayerNorm and a residual-like consumer. Recorded after the LayerNorm, the residual's backward
// runs first and the LayerNorm folds its gradient in (dx = so_far + ∂, one pass); recorded before, the
// engine adds the two after the LayerNorm wrote its own. The same sum, up to its one rounding (the kernel
// may contract so_far + rstd·(…) into one fused multiply-add, where the engine rounded the product
// first), and the folding order must move no (rows, C) tensor outside the kernels: no zero fill for dx,
// no copy of a partial sum.
TEST(GradientFold, LayerNormFoldsTheResidualsGradientInItsOwnPass) {
  const int64_t rows = 48, C = 40;
  const Tensor x0 = random_leaf({rows, C}, 1, 1.0f), w = random_leaf({rows, C}, 2, 1.0f);
  const Tensor gamma = random_leaf({C}, 3, 1.0f), beta = random_leaf({C}, 4, 1.0f);
  std::vector<float> dx[2];
  uint64_t sums[2] = {};
  for (const bool fold : {true, false}) {
    Tensor x = x0.detach().set_requires_grad(true);
    Tensor h = ops::scale(x, 1.5f);  // a node, so that h's gradient is a partial sum the engine keeps
    Tensor residual, y;
    if (!fold) residual = ops::scale(h, 0.5f);
    y = ops::layernorm(h, gamma, beta);
    if (fold) residual = ops::scale(h, 0.5f);
    const Tensor loss = ops::add(ops::sum(ops::mul(y, w.detach())), ops::sum(ops::mul(residual, residual)));
    const MemoryTraffic before = memory_traffic();
    const uint64_t sums_before = gradient_sums();
    backward(loss);
    const MemoryTraffic moved = memory_traffic() - before;
    sums[fold ? 0 : 1] = gradient_sums() - sums_before;
    dx[fold ? 0 : 1] = x.grad().to_vector();
    if (fold) {
      const uint64_t whole = static_cast<uint64_t>(rows * C) * sizeof(float);
      EXPECT_LT(moved.zeroed_bytes, whole) << moved.fills << " zero fills of " << moved.zeroed_bytes << " bytes";
      EXPECT_LT(moved.copied_bytes, whole) << moved.copies << " copies of " << moved.copied_bytes << " bytes";
    }
  }
  double scale = 0.0, worst = 0.0;
  for (float v : dx[1]) scale = std::max(scale, static_cast<double>(std::fabs(v)));
  for (size_t i = 0; i < dx[0].size(); ++i) worst = std::max(worst, std::fabs(static_cast<double>(dx[0][i]) - dx[1][i]));
  EXPECT_LE(worst, 1e-6 * scale) << "the fold must be the engine's sum up to one rounding (scale " << scale << ")";
  EXPECT_EQ(sums[0] + 1, sums[1]) << "the LayerNorm's fold must save the engine's sum for h";
}

// sum_stack's backward broadcasts dS into every block of X. Recorded before X's other consumers (as the
// Kraken layer records S before the layer), it runs last and adds dS into their partial sum in place: no
// copies of dS into a new gradient. The bits equal the engine's sum (sum_stack recorded last).
TEST(GradientFold, SumStackAddsDoutIntoThePartialSumInPlace) {
  const int64_t G = 3, R = 10, C = 16;
  const Tensor x0 = random_leaf({G, R, C}, 11, 1.0f), w = random_leaf({G, R, C}, 12, 1.0f);
  const Tensor u = random_leaf({R, C}, 13, 1.0f);
  std::vector<uint32_t> x_bits[2];
  uint64_t sums[2] = {};
  for (const bool fold : {true, false}) {
    Tensor x = x0.detach().set_requires_grad(true);
    Tensor X = ops::scale(x, 2.0f);
    Tensor S, other;
    if (fold) S = ops::sum_stack(X);
    other = ops::mul(X, w.detach());
    if (!fold) S = ops::sum_stack(X);
    const Tensor loss = ops::add(ops::sum(ops::mul(S, u.detach())), ops::sum(ops::mul(other, other)));
    const MemoryTraffic before = memory_traffic();
    const uint64_t sums_before = gradient_sums();
    backward(loss);
    const MemoryTraffic moved = memory_traffic() - before;
    sums[fold ? 0 : 1] = gradient_sums() - sums_before;
    x_bits[fold ? 0 : 1] = bits(x.grad());
    if (fold) {
      EXPECT_EQ(moved.copies, 0u) << moved.copied_bytes << " bytes copied";
    }
  }
  EXPECT_EQ(x_bits[0], x_bits[1]) << "dS added into the partial sum must be the engine's sum, bit for bit";
  EXPECT_EQ(sums[0] + 1, sums[1]) << "sum_stack's fold must save the engine's sum for X";
}

}  // namespace
}  // namespace kraken::runtime
