// GradSync on one rank: bucketing, gradients as views of the buckets, accumulation and misuse. The
// data-parallel equivalence with a single process runs under mpirun (tests/parallel/mpi).
#include <gtest/gtest.h>

#include "kernels/error.h"
#include "parallel/grad_sync.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"

namespace kraken::parallel {
namespace {

namespace ops = runtime::ops;

std::vector<Tensor> make_params(const std::vector<int64_t>& sizes) {
  std::vector<Tensor> params;
  for (size_t i = 0; i < sizes.size(); ++i)
    params.push_back(Tensor::full({sizes[i]}, 1.0f).set_requires_grad(true).set_name("p" + std::to_string(i)));
  return params;
}

// L = Σ_i (i+1)·sum(p_i)  =>  dL/dp_i = i + 1 everywhere.
Tensor weighted_sum(const std::vector<Tensor>& params) {
  std::vector<Tensor> terms;
  for (size_t i = 0; i < params.size(); ++i) terms.push_back(ops::scale(ops::sum(params[i]), float(i + 1)));
  Tensor loss = terms[0];
  for (size_t i = 1; i < terms.size(); ++i) loss = ops::add(loss, terms[i]);
  return loss;
}

TEST(GradSync, BucketsFillInReverseRegistrationOrder) {
  auto comm = Communicator::single("dp");
  auto params = make_params({4, 4, 4, 4, 4});  // 16 bytes each
  GradSync sync(params, *comm, /*bucket_bytes=*/32);
  ASSERT_EQ(sync.buckets().size(), 3u);
  EXPECT_EQ(sync.buckets()[0].params, (std::vector<size_t>{4, 3}));
  EXPECT_EQ(sync.buckets()[1].params, (std::vector<size_t>{2, 1}));
  EXPECT_EQ(sync.buckets()[2].params, (std::vector<size_t>{0}));
  EXPECT_EQ(sync.buckets()[0].numel, 8);
}

TEST(GradSync, ParameterLargerThanABucketGetsItsOwn) {
  auto comm = Communicator::single("dp");
  auto params = make_params({2, 100, 2});
  GradSync sync(params, *comm, /*bucket_bytes=*/64);
  ASSERT_EQ(sync.buckets().size(), 2u);
  EXPECT_EQ(sync.buckets()[0].params, (std::vector<size_t>{2, 1}));
  EXPECT_EQ(sync.buckets()[1].params, (std::vector<size_t>{0}));
}

TEST(GradSync, GradientsAreViewsOfOneBufferPerBucketAndKeepExistingValues) {
  auto comm = Communicator::single("dp");
  auto params = make_params({3, 5});
  params[1].set_grad(Tensor::full({5}, 7.0f));
  GradSync sync(params, *comm, /*bucket_bytes=*/1 << 20);
  ASSERT_EQ(sync.buckets().size(), 1u);
  EXPECT_TRUE(params[0].grad().shares_storage(params[1].grad()));
  EXPECT_EQ(params[1].grad().to_vector(), std::vector<float>(5, 7.0f));
  EXPECT_EQ(params[0].grad().to_vector(), std::vector<float>(3, 0.0f));
  // Backward accumulates straight into the bucket.
  runtime::backward(weighted_sum(params));
  EXPECT_EQ(params[0].grad().to_vector(), std::vector<float>(3, 1.0f));
  EXPECT_EQ(params[1].grad().to_vector(), std::vector<float>(5, 9.0f));
  sync.finish();
  EXPECT_TRUE(params[0].grad().shares_storage(params[1].grad()));
}

TEST(GradSync, AccumulationOverMicroBatchesSyncsOnlyOnTheLast) {
  auto comm = Communicator::single("dp");
  auto params = make_params({4, 4});
  GradSync sync(params, *comm, 16);
  sync.set_sync(false);
  runtime::backward(weighted_sum(params));
  runtime::backward(weighted_sum(params));
  sync.finish();  // sync off: nothing to do
  EXPECT_EQ(sync.stats().syncs, 0);
  sync.set_sync(true);
  runtime::backward(weighted_sum(params));
  sync.finish();
  EXPECT_EQ(sync.stats().syncs, 1);
  EXPECT_EQ(params[0].grad().to_vector(), std::vector<float>(4, 3.0f));
  EXPECT_EQ(params[1].grad().to_vector(), std::vector<float>(4, 6.0f));
  // The next step starts a new round.
  for (Tensor& p : params) p.zero_grad();
  runtime::backward(weighted_sum(params));
  sync.finish();
  EXPECT_EQ(sync.stats().syncs, 2);
  EXPECT_EQ(params[1].grad().to_vector(), std::vector<float>(4, 2.0f));
}

TEST(GradSync, TwoSyncedBackwardsBeforeFinishAreAnError) {
  auto comm = Communicator::single("dp");
  auto params = make_params({4});
  GradSync sync(params, *comm, 16);
  runtime::backward(weighted_sum(params));
  try {
    runtime::backward(weighted_sum(params));
    FAIL() << "a second synced backward was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("p0"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("set_sync(false)"), std::string::npos) << e.what();
  }
}

TEST(GradSync, ReplacedGradientIsAnErrorAtFinish) {
  auto comm = Communicator::single("dp");
  auto params = make_params({4});
  GradSync sync(params, *comm, 16);
  params[0].set_grad(Tensor::zeros({4}));
  EXPECT_THROW(sync.finish(), Error);
}

TEST(GradSync, InvalidParameterListsAreErrors) {
  auto comm = Communicator::single("dp");
  auto params = make_params({4});
  EXPECT_THROW(GradSync({params[0], params[0]}, *comm, 16), Error);         // listed twice
  EXPECT_THROW(GradSync({Tensor::zeros({2})}, *comm, 16), Error);           // not requiring grad
  EXPECT_THROW(GradSync({ops::scale(params[0], 2.0f)}, *comm, 16), Error);  // not a leaf
  EXPECT_THROW(GradSync(params, *comm, 0), Error);
}

TEST(GradSync, HooksOutliveTheGradSyncHarmlessly) {
  auto comm = Communicator::single("dp");
  auto params = make_params({4});
  { GradSync sync(params, *comm, 16); }
  runtime::backward(weighted_sum(params));
  runtime::backward(weighted_sum(params));  // no "ready twice" error: the hooks are inert now
  EXPECT_EQ(params[0].grad().to_vector(), std::vector<float>(4, 2.0f));
}

}  // namespace
}  // namespace kraken::parallel
