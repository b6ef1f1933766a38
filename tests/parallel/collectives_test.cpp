// Collectives as autograd ops on a group of one: each pair reduces to the identity in both directions,
// and the pairs' bookkeeping (wait once, gradients reach the input) holds. Their multi-rank gradients
// are checked against closed forms under mpirun (tests/parallel/mpi/collectives_mpi_test.cpp).
#include <gtest/gtest.h>

#include "kernels/error.h"
#include "parallel/collectives.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"

namespace kraken::parallel {
namespace {

namespace ops = runtime::ops;

TEST(CollectivesOnOneRank, MegatronPairIsIdentityForwardAndBackward) {
  auto tp = Communicator::single("tp");
  Tensor x = Tensor::from_vector({1, -2, 3}, {3}).set_requires_grad(true);
  Tensor w = Tensor::from_vector({0.5f, 2, -1}, {3});
  Tensor y = reduce_from_tp(ops::mul(copy_to_tp(x, *tp), w), *tp);
  EXPECT_EQ(y.to_vector(), (std::vector<float>{0.5f, -4, -3}));
  runtime::backward(ops::sum(y));
  EXPECT_EQ(x.grad().to_vector(), w.to_vector());
}

TEST(CollectivesOnOneRank, GatherAndScatterAlongLastDimAreIdentities) {
  auto tp = Communicator::single("tp");
  Tensor x = Tensor::from_vector({1, 2, 3, 4, 5, 6}, {2, 3}).set_requires_grad(true);
  Tensor w = Tensor::from_vector({1, 0, 2, 0, 3, 1}, {2, 3});
  Tensor y = gather_from_tp(scatter_to_tp(x, *tp), *tp);
  EXPECT_EQ(y.shape(), x.shape());
  EXPECT_EQ(y.to_vector(), x.to_vector());
  runtime::backward(ops::sum(ops::mul(y, w)));
  EXPECT_EQ(x.grad().to_vector(), w.to_vector());
}

TEST(CollectivesOnOneRank, KrakenPairReturnsTheInputAndPassesTheGradientBack) {
  auto tp = Communicator::single("tp");
  Tensor x = Tensor::from_vector({1, 2, 3}, {3}).set_requires_grad(true);
  PendingReduce pending = start_all_reduce(x, *tp);
  EXPECT_TRUE(pending.valid());
  EXPECT_TRUE(pending.done());
  Tensor s = wait_all_reduce(pending);
  EXPECT_FALSE(pending.valid());
  EXPECT_EQ(s.to_vector(), (std::vector<float>{1, 2, 3}));
  EXPECT_FALSE(s.shares_storage(x)) << "the sum must not overwrite x, which its own stream still uses";
  // L = sum(s∘s) + sum(3x): the pair's gradient joins x's own term.
  runtime::backward(ops::add(ops::sum(ops::mul(s, s)), ops::sum(ops::scale(x, 3.0f))));
  EXPECT_EQ(x.grad().to_vector(), (std::vector<float>{5, 7, 9}));
}

TEST(CollectivesOnOneRank, WaitingTwiceIsAnError) {
  auto tp = Communicator::single("tp");
  PendingReduce pending = start_all_reduce(Tensor::zeros({2}), *tp);
  wait_all_reduce(pending);
  EXPECT_THROW(wait_all_reduce(pending), Error);
  PendingReduce never_started;
  EXPECT_THROW(wait_all_reduce(never_started), Error);
}

TEST(CollectivesOnOneRank, ScalarsAndIntegerTensorsAreRejected) {
  auto tp = Communicator::single("tp");
  EXPECT_THROW(scatter_to_tp(Tensor::full({}, 1.0f), *tp), Error);
  EXPECT_THROW(copy_to_tp(Tensor::from_ints({1}, {1}), *tp), Error);
}

}  // namespace
}  // namespace kraken::parallel
