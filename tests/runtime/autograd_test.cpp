// The tape: ordering, accumulation, hooks, freeing, NoGrad.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>

#include "runtime/autograd.h"
#include "runtime/module.h"
#include "runtime/ops.h"

namespace kraken::runtime {
namespace {

TEST(Autograd, ChainRuleThroughSharedInputAddsBothPaths) {
  // L = sum(x∘x + 3x)  =>  dL/dx = 2x + 3
  Tensor x = Tensor::from_vector({1.0f, -2.0f, 0.5f}, {3}).set_requires_grad(true);
  Tensor loss = ops::sum(ops::add(ops::mul(x, x), ops::scale(x, 3.0f)));
  backward(loss);
  EXPECT_EQ(x.grad().to_vector(), (std::vector<float>{5.0f, -1.0f, 4.0f}));
}

TEST(Autograd, GradientsAccumulateAcrossPassesUntilZeroGrad) {
  Tensor x = Tensor::from_vector({1.0f, 2.0f}, {2}).set_requires_grad(true);
  for (int pass = 0; pass < 3; ++pass) backward(ops::sum(ops::scale(x, 2.0f)));
  EXPECT_EQ(x.grad().to_vector(), (std::vector<float>{6.0f, 6.0f}));
  x.zero_grad();
  EXPECT_EQ(x.grad().to_vector(), (std::vector<float>{0.0f, 0.0f}));
  backward(ops::sum(x));
  EXPECT_EQ(x.grad().to_vector(), (std::vector<float>{1.0f, 1.0f}));
}

TEST(Autograd, NoGradRecordsNothing) {
  Tensor x = Tensor::from_vector({1.0f}, {1}).set_requires_grad(true);
  NoGrad guard;
  Tensor y = ops::scale(x, 2.0f);
  EXPECT_FALSE(y.requires_grad());
  EXPECT_EQ(y.grad_fn(), nullptr);
}

TEST(Autograd, SecondBackwardWithoutKeepGraphIsAClearError) {
  Tensor x = Tensor::from_vector({1.0f}, {1}).set_requires_grad(true);
  Tensor loss = ops::sum(ops::scale(x, 2.0f));
  backward(loss);
  EXPECT_THROW(backward(loss), Error);
}

TEST(Autograd, KeepGraphAllowsASecondPass) {
  Tensor x = Tensor::from_vector({1.0f}, {1}).set_requires_grad(true);
  Tensor loss = ops::sum(ops::scale(x, 2.0f));
  backward(loss, Tensor(), /*keep_graph=*/true);
  backward(loss);
  EXPECT_EQ(x.grad().to_vector(), (std::vector<float>{4.0f}));
}

TEST(Autograd, HooksRunOnceAfterTheLastContributionInReverseOrder) {
  // y = a·2, z = y + b, loss = sum(z) + sum(a): a gets two contributions, b one; b's grad is ready
  // first because it is consumed by a later node.
  Tensor a = Tensor::from_vector({1.0f, 1.0f}, {2}).set_requires_grad(true);
  Tensor b = Tensor::from_vector({0.0f, 0.0f}, {2}).set_requires_grad(true);
  std::vector<std::string> order;
  std::vector<float> a_grad_at_hook;
  a.add_grad_ready_hook([&](Tensor& t) {
    order.push_back("a");
    a_grad_at_hook = t.grad().to_vector();
  });
  b.add_grad_ready_hook([&](Tensor&) { order.push_back("b"); });
  Tensor z = ops::add(ops::scale(a, 2.0f), b);
  Tensor loss = ops::add(ops::sum(z), ops::sum(a));
  backward(loss);
  EXPECT_EQ(order, (std::vector<std::string>{"b", "a"}));
  EXPECT_EQ(a_grad_at_hook, (std::vector<float>{3.0f, 3.0f}));
}

TEST(Autograd, LeafInGraphWithoutFlowGetsZeroGradient) {
  Tensor a = Tensor::from_vector({1.0f, 2.0f}, {2}).set_requires_grad(true);
  Tensor b = Tensor::from_vector({3.0f, 4.0f}, {2}).set_requires_grad(true);
  auto parts = ops::split(ops::concat({a, b}, 0), {2, 2}, 0);
  backward(ops::sum(parts[0]));
  EXPECT_EQ(a.grad().to_vector(), (std::vector<float>{1.0f, 1.0f}));
  EXPECT_EQ(b.grad().to_vector(), (std::vector<float>{0.0f, 0.0f}));
}

TEST(Autograd, IndependentGraphsBackwardSeparately) {
  // Two micro-batches in flight at once, as a pipeline schedule keeps them.
  Tensor w = Tensor::from_vector({2.0f}, {1}).set_requires_grad(true);
  Tensor first = ops::sum(ops::mul(w, Tensor::from_vector({3.0f}, {1})));
  Tensor second = ops::sum(ops::mul(w, Tensor::from_vector({5.0f}, {1})));
  backward(second);
  EXPECT_EQ(w.grad().to_vector(), (std::vector<float>{5.0f}));
  backward(first);
  EXPECT_EQ(w.grad().to_vector(), (std::vector<float>{8.0f}));
}

TEST(Autograd, BackwardFromNonScalarNeedsAGradient) {
  Tensor x = Tensor::from_vector({1.0f, 2.0f}, {2}).set_requires_grad(true);
  Tensor y = ops::scale(x, 3.0f);
  EXPECT_THROW(backward(y), Error);
  backward(y, Tensor::from_vector({1.0f, 10.0f}, {2}));
  EXPECT_EQ(x.grad().to_vector(), (std::vector<float>{3.0f, 30.0f}));
}

TEST(Autograd, SavedTensorsAreFreedByBackward) {
  Tensor x = Tensor::from_vector({1.0f, 2.0f}, {2}).set_requires_grad(true);
  std::weak_ptr<Storage> saved_storage;
  Tensor loss;
  {
    Tensor h = ops::scale(x, 2.0f);
    saved_storage = h.impl()->storage;
    loss = ops::sum(ops::gelu(h));  // gelu's closure keeps h's values for backward
  }
  EXPECT_FALSE(saved_storage.expired()) << "gelu must keep its input until backward";
  backward(loss);
  EXPECT_TRUE(saved_storage.expired()) << "backward must release what the op saved";
  EXPECT_TRUE(x.grad().defined());
}

// The engine keeps a gradient without copying it when nothing else can see it, and writes into a
// buffer in place when the buffer is its own. Each case below would go wrong if it took a gradient
// that is seen elsewhere.
TEST(Autograd, AGradientSeenElsewhereIsNeverTakenOrWrittenInPlace) {
  // add returns dy for both inputs: w (a leaf) and h (a node). Taking dy as w's .grad would make the
  // second pass's accumulation write into the caller's dy and into h's gradient.
  Tensor w = Tensor::from_vector({1.0f, 2.0f}, {2}).set_requires_grad(true);
  Tensor v = Tensor::from_vector({3.0f, 4.0f}, {2}).set_requires_grad(true);
  const Tensor dy = Tensor::from_vector({0.5f, -1.0f}, {2});
  Tensor h = ops::scale(v, 3.0f);
  Tensor y = ops::add(w, h);
  backward(y, dy, /*keep_graph=*/true);
  backward(y, dy);
  EXPECT_EQ(dy.to_vector(), (std::vector<float>{0.5f, -1.0f})) << "the caller's gradient changed";
  EXPECT_EQ(w.grad().to_vector(), (std::vector<float>{1.0f, -2.0f}));
  EXPECT_EQ(v.grad().to_vector(), (std::vector<float>{3.0f, -6.0f}));

  // h feeds three consumers; add(h, h) hands the same tensor to both of h's slots' contributions, so
  // the first sum must not be written in place into it. dL/dv = 3·(1 + 1 + 2) per element.
  Tensor v2 = Tensor::from_vector({1.0f, -1.0f}, {2}).set_requires_grad(true);
  Tensor h2 = ops::scale(v2, 3.0f);
  backward(ops::sum(ops::add(ops::add(h2, h2), ops::scale(h2, 2.0f))));
  EXPECT_EQ(v2.grad().to_vector(), (std::vector<float>{12.0f, 12.0f}));

  // A leaf's gradient taken without a copy is still the leaf's own: later passes accumulate into it,
  // and zero_grad clears it, without touching anything else.
  Tensor u = Tensor::from_vector({2.0f}, {1}).set_requires_grad(true);
  backward(ops::sum(ops::mul(u, u)));  // mul's backward makes a fresh gradient: taken as u's .grad
  const Tensor first = u.grad();
  backward(ops::sum(ops::mul(u, u)));
  EXPECT_EQ(u.grad().to_vector(), (std::vector<float>{8.0f}));
  EXPECT_EQ(first.to_vector(), (std::vector<float>{8.0f})) << "the same tensor, accumulated in place";
}

// Module::release_grads: a gradient its parameter holds alone, of at least min_elements, goes (the next
// backward's contribution becomes the gradient); a smaller one, or one whose memory something else
// shares, is zeroed in its own buffer, which those others keep seeing.
TEST(Autograd, ReleasedGradientsAreTheNextContributionAndSharedOnesStayZeroedInPlace) {
  struct Three : Module {
    Tensor big, small, shared;
    Three() {
      big = register_parameter("big", {4}, ParamSpec{});
      small = register_parameter("small", {2}, ParamSpec{});
      shared = register_parameter("shared", {4}, ParamSpec{});
    }
  } m;
  m.initialize(3);
  auto pass = [&] {
    backward(ops::sum(ops::add(ops::add(ops::scale(m.big, 2.0f), ops::scale(m.shared, 3.0f)),
                               ops::sum(ops::scale(m.small, 5.0f)))));
  };
  pass();
  pass();
  const Tensor kept = m.shared.grad();  // a handle held outside the parameter
  const Tensor small_before = m.small.grad();
  EXPECT_EQ(kept.to_vector(), std::vector<float>(4, 6.0f));
  m.release_grads(/*min_elements=*/4);
  EXPECT_FALSE(m.big.grad().defined()) << "held alone and large enough: released";
  EXPECT_TRUE(m.small.grad().same(small_before)) << "below min_elements: the same buffer";
  EXPECT_EQ(m.small.grad().to_vector(), std::vector<float>(2, 0.0f));
  EXPECT_TRUE(m.shared.grad().same(kept)) << "shared: the same buffer";
  EXPECT_EQ(kept.to_vector(), std::vector<float>(4, 0.0f)) << "and zeroed where its other holder sees it";
  pass();
  EXPECT_EQ(m.big.grad().to_vector(), std::vector<float>(4, 2.0f)) << "one pass's gradient, not added to the old";
  EXPECT_EQ(m.small.grad().to_vector(), std::vector<float>(2, 20.0f));  // (5, summed over 4 broadcast elements)
  EXPECT_EQ(kept.to_vector(), std::vector<float>(4, 3.0f));
  // zero_grad keeps every buffer.
  const Tensor big_before = m.big.grad();
  m.zero_grad();
  EXPECT_TRUE(m.big.grad().same(big_before));
  EXPECT_EQ(big_before.to_vector(), std::vector<float>(4, 0.0f));
}

// KRAKEN_AUTOGRAD_SLOW_NODE_MS=x names, on stderr, each backward closure that kept the host x ms or more
// (where a GPU backward synchronises). ctest runs this in a process of its own with x = 20
// (runtime.AutogradSlowNodeDiagnostic); elsewhere it skips, the variable being read once per process.
TEST(Autograd, SlowNodeDiagnosticNamesTheOpThatKeptTheHost) {
  if (!std::getenv("KRAKEN_AUTOGRAD_SLOW_NODE_MS"))
    GTEST_SKIP() << "needs KRAKEN_AUTOGRAD_SLOW_NODE_MS (ctest: runtime.AutogradSlowNodeDiagnostic)";
  Tensor x = Tensor::from_vector({1.0f, 2.0f}, {2}).set_requires_grad(true);
  Tensor y = Tensor::from_vector({1.0f, 2.0f}, {2});
  record("waits_for_the_device", {x}, {y}, [](const std::vector<Tensor>& g) {
    std::this_thread::sleep_for(std::chrono::milliseconds(60));
    return std::vector<Tensor>{g[0]};
  });
  testing::internal::CaptureStderr();
  backward(ops::sum(ops::scale(y, 2.0f)));
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("the backward of waits_for_the_device kept the host"), std::string::npos) << err;
  EXPECT_EQ(err.find("the backward of scale"), std::string::npos) << err;
  EXPECT_EQ(x.grad().to_vector(), (std::vector<float>{2.0f, 2.0f}));
}

}  // namespace
}  // namespace kraken::runtime
