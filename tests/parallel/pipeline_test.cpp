// The 1F1B schedule on a pipeline of one stage equals plain gradient accumulation over the
// micro-batches. Two and four stages run under mpirun (tests/parallel/mpi/pipeline_mpi_test.cpp).
#include <gtest/gtest.h>

#include "kernels/error.h"
#include "parallel/pipeline.h"
#include "runtime/autograd.h"
#include "tests/parallel/toy_mlp.h"

namespace kraken::parallel {
namespace {

using testing::toy_data;
using testing::toy_loss;
using testing::ToyMlp;

constexpr int kMicroBatches = 4;
constexpr int64_t kRows = 3, kWidth = 5;

Tensor whole_model(const ToyMlp& model, int mb) {
  Tensor h = toy_data(kRows, kWidth, 11, 2 * mb);
  for (int b = 0; b < 4; ++b) h = model.block(b, h);
  return toy_loss(h, toy_data(kRows, kWidth, 11, 2 * mb + 1));
}

TEST(PipelineOneStage, MatchesGradientAccumulationBitForBit) {
  ToyMlp reference(4, kWidth, 5), piped(4, kWidth, 5);
  std::vector<float> losses;
  for (int mb = 0; mb < kMicroBatches; ++mb) {
    Tensor loss = whole_model(reference, mb);
    losses.push_back(loss.item());
    runtime::backward(loss, Tensor::full(loss.shape(), 1.0f / kMicroBatches));
  }
  auto pp = Communicator::single("pp");
  PipelineStage stage;
  stage.forward = [&](int mb, const Tensor& input) {
    EXPECT_FALSE(input.defined()) << "the first stage reads its own data";
    return whole_model(piped, mb);
  };
  std::vector<int> backward_order;
  stage.before_backward = [&](int mb) { backward_order.push_back(mb); };
  PipelineResult result = run_1f1b(*pp, stage, kMicroBatches);
  EXPECT_EQ(result.losses, losses);
  EXPECT_EQ(backward_order, (std::vector<int>{0, 1, 2, 3}));
  const auto want = reference.parameters(), got = piped.parameters();
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(got[i].grad().to_vector(), want[i].grad().to_vector()) << i;
}

TEST(PipelineOneStage, LastStageMustReturnOneLossValue) {
  auto pp = Communicator::single("pp");
  PipelineStage stage;
  stage.forward = [](int, const Tensor&) { return Tensor::zeros({2}).set_requires_grad(true); };
  EXPECT_THROW(run_1f1b(*pp, stage, 2), Error);
  stage.forward = nullptr;
  EXPECT_THROW(run_1f1b(*pp, stage, 2), Error);
  stage.forward = [](int, const Tensor&) { return Tensor::zeros({1}).set_requires_grad(true); };
  EXPECT_THROW(run_1f1b(*pp, stage, 0), Error);
}

TEST(TiedGradients, GroupOfOneLeavesGradientsAlone) {
  auto embedding = Communicator::single("embedding");
  Tensor w = Tensor::zeros({2}).set_requires_grad(true);
  w.set_grad(Tensor::from_vector({1, 2}, {2}));
  sync_tied_gradients({w}, *embedding);
  EXPECT_EQ(w.grad().to_vector(), (std::vector<float>{1, 2}));
}

}  // namespace
}  // namespace kraken::parallel
