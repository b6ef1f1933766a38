// Data parallel on two ranks: a toy model trained 5 SGD steps with each rank on its half of the batch
// (GradSync averaging the gradients) follows the single-process run on the whole batch, with and
// without gradient accumulation.
#include <algorithm>
#include <cmath>

#include "kernels/error.h"
#include "parallel/failure.h"
#include "parallel/grad_sync.h"
#include "runtime/autograd.h"
#include "tests/parallel/mpi/mpi_harness.h"
#include "tests/parallel/toy_mlp.h"

using kraken::parallel::Communicator;
using kraken::parallel::GradSync;
using kraken::parallel::ReduceOp;
using kraken::runtime::NoGrad;
using kraken::runtime::Tensor;
using kraken::testing::MpiHarness;
using kraken::testing::toy_data;
using kraken::testing::toy_loss;
using kraken::testing::ToyMlp;

namespace {

constexpr int kSteps = 5, kBlocks = 3;
constexpr int64_t kBatch = 8, kWidth = 6;
constexpr float kLr = 0.1f;
constexpr uint64_t kSeed = 77;

// The rank's losses and parameters differ from one process only in how the batch mean is summed
// (two means of 4 rows, averaged, against one mean of 8): a few ulps per step, so relative 1e-6 holds
// over 5 steps of SGD at lr 0.1 on this well-conditioned toy, and any mistake in bucketing or
// averaging (a missing or doubled half of the batch) is off by O(1).
constexpr double kRtol = 1e-6, kAtol = 1e-7;

Tensor forward(const ToyMlp& model, const Tensor& x) {
  Tensor h = x;
  for (int b = 0; b < kBlocks; ++b) h = model.block(b, h);
  return h;
}

void sgd_step(const ToyMlp& model) {
  NoGrad no_grad;
  for (const Tensor& p : model.parameters()) {
    float* w = p.data<float>();
    const float* g = p.grad().data<float>();
    for (int64_t i = 0; i < p.numel(); ++i) w[i] -= kLr * g[i];
    Tensor(p).zero_grad();
  }
}

// One process, whole batch: the losses of every step.
std::vector<float> train_single(const ToyMlp& model) {
  std::vector<float> losses;
  for (int step = 0; step < kSteps; ++step) {
    Tensor loss = toy_loss(forward(model, toy_data(kBatch, kWidth, kSeed, 2 * step)),
                           toy_data(kBatch, kWidth, kSeed, 2 * step + 1));
    losses.push_back(loss.item());
    kraken::runtime::backward(loss);
    sgd_step(model);
  }
  return losses;
}

// This rank's half of the batch in `micro` micro-batches; returns the average loss over ranks.
std::vector<float> train_data_parallel(const ToyMlp& model, Communicator& dp, int micro, size_t bucket_bytes,
                                       size_t* buckets) {
  GradSync sync(model.parameters(), dp, bucket_bytes);
  *buckets = sync.buckets().size();
  const int64_t shard = kBatch / dp.size(), rows = shard / micro;
  std::vector<float> losses;
  for (int step = 0; step < kSteps; ++step) {
    const Tensor x = toy_data(kBatch, kWidth, kSeed, 2 * step), t = toy_data(kBatch, kWidth, kSeed, 2 * step + 1);
    float local = 0.0f;
    for (int m = 0; m < micro; ++m) {
      const int64_t begin = dp.rank() * shard + m * rows;
      Tensor loss = toy_loss(forward(model, x.slice(begin, begin + rows)), t.slice(begin, begin + rows));
      local += loss.item() / micro;
      sync.set_sync(m == micro - 1);
      kraken::runtime::backward(loss, Tensor::full(loss.shape(), 1.0f / micro));
    }
    sync.finish();
    Tensor mean = Tensor::full({1}, local);
    dp.all_reduce(mean, ReduceOp::Average);
    losses.push_back(mean.item());
    sgd_step(model);
  }
  return losses;
}

void compare(MpiHarness& h, Communicator& dp, int micro) {
  const ToyMlp single(kBlocks, kWidth, kSeed), parallel(kBlocks, kWidth, kSeed);
  const std::vector<float> want = train_single(single);
  size_t buckets = 0;
  // 100-byte buckets, filled from the last parameter: {b2, W2} {b1, W1} {b0, W0} (bias 24 B, weight 144 B).
  const std::vector<float> got = train_data_parallel(parallel, dp, micro, /*bucket_bytes=*/100, &buckets);
  h.expect(buckets == 3, "three buckets, got " + std::to_string(buckets));
  h.expect_all_near(got, want, kRtol, kAtol, "losses of 5 steps");
  const auto ps = single.parameters(), pp = parallel.parameters();
  for (size_t i = 0; i < ps.size(); ++i)
    h.expect_all_near(pp[i].to_vector(), ps[i].to_vector(), kRtol, kAtol, "parameter " + ps[i].name() + " after 5 steps");
  if (h.rank() == 0) {
    double worst = 0;
    for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(double(got[i]) - want[i]) / std::fabs(want[i]));
    std::printf("  micro-batches %d: largest relative loss difference %.3g\n", micro, worst);
  }
}

}  // namespace

int main() {
  return kraken::parallel::run_guarded([] {
    MpiHarness h(2);
    Communicator& dp = h.world().communicator();
    h.run("DataParallelTrainingMatchesSingleProcessLosses", [&] { compare(h, dp, 1); });
    h.run("DataParallelWithGradientAccumulationMatchesSingleProcessLosses", [&] { compare(h, dp, 2); });
    h.run("BucketsStartDuringBackwardAsSoonAsTheirLayersAreDone", [&] {
      // Buckets {b2, W2} {b1, W1} {b0, W0}. When block 0's bias is ready, blocks 2 and 1 are done, so
      // their buckets are already on the wire while block 0's backward is still running.
      const ToyMlp model(kBlocks, kWidth, kSeed);
      GradSync sync(model.parameters(), dp, 100);
      size_t started_at_b0 = 99;
      Tensor(model.biases[0]).add_grad_ready_hook([&](Tensor&) { started_at_b0 = sync.started_buckets(); });
      Tensor loss = toy_loss(forward(model, toy_data(4, kWidth, 1, dp.rank())), toy_data(4, kWidth, 2, dp.rank()));
      kraken::runtime::backward(loss);
      h.expect(started_at_b0 >= 2, "buckets started when block 0's bias was ready: " + std::to_string(started_at_b0));
      h.expect(sync.started_buckets() == 3, "every bucket started by the end of backward");
      sync.finish();
      h.expect(sync.started_buckets() == 0, "finish() begins a new round");
    });
    h.run("GradSyncAccountsCommunicationAndWaiting", [&] {
      const ToyMlp model(kBlocks, kWidth, kSeed);
      GradSync sync(model.parameters(), dp, 200);
      Tensor loss = toy_loss(forward(model, toy_data(4, kWidth, 1, dp.rank())), toy_data(4, kWidth, 2, dp.rank()));
      kraken::runtime::backward(loss);
      sync.finish();
      h.expect(sync.stats().syncs == 1, "one sync");
      h.expect(sync.stats().bytes == int64_t(kBlocks * (kWidth * kWidth + kWidth) * 4), "bytes per sync");
      h.expect(sync.stats().comm_seconds > 0.0, "communication time recorded");
      h.expect(sync.stats().hidden_fraction() >= 0.0 && sync.stats().hidden_fraction() <= 1.0, "hidden fraction");
    });
    return h.finish();
  });
}
