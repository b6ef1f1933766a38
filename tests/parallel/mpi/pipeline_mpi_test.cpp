// The 1F1B schedule on 2 and 4 stages: a toy MLP of 4 blocks split into stages, 4 micro-batches, gives
// the single-process losses and gradients; tied weights on the first and last stage get the gradient
// of both uses.
#include "kernels/error.h"
#include "parallel/failure.h"
#include "parallel/mesh.h"
#include "parallel/pipeline.h"
#include "runtime/autograd.h"
#include "tests/parallel/mpi/mpi_harness.h"
#include "tests/parallel/toy_mlp.h"

using kraken::parallel::Communicator;
using kraken::parallel::Mesh;
using kraken::parallel::MeshSizes;
using kraken::parallel::PipelineStage;
using kraken::runtime::Tensor;
using kraken::testing::MpiHarness;
using kraken::testing::toy_data;
using kraken::testing::toy_loss;
using kraken::testing::ToyMlp;
namespace ops = kraken::runtime::ops;

namespace {

constexpr int kBlocks = 4, kMicroBatches = 4;
constexpr int64_t kRows = 3, kWidth = 5;
constexpr uint64_t kSeed = 21;

Tensor input_of(int mb) { return toy_data(kRows, kWidth, kSeed, 2 * mb); }
Tensor target_of(int mb) { return toy_data(kRows, kWidth, kSeed, 2 * mb + 1); }

void split_mlp(MpiHarness& h, Communicator& pp) {
  const int stages = pp.size(), s = pp.rank();
  const int per_stage = kBlocks / stages, first_block = s * per_stage;
  // One process: all blocks, each micro-batch's loss seeded with 1/M (the step's mean loss).
  const ToyMlp reference(kBlocks, kWidth, 5), model(kBlocks, kWidth, 5);
  std::vector<float> want_losses;
  for (int mb = 0; mb < kMicroBatches; ++mb) {
    Tensor hidden = input_of(mb);
    for (int b = 0; b < kBlocks; ++b) hidden = reference.block(b, hidden);
    Tensor loss = toy_loss(hidden, target_of(mb));
    want_losses.push_back(loss.item());
    kraken::runtime::backward(loss, Tensor::full(loss.shape(), 1.0f / kMicroBatches));
  }
  // This rank: its blocks only.
  PipelineStage stage;
  stage.activation_shape = {kRows, kWidth};
  stage.forward = [&](int mb, const Tensor& input) {
    Tensor hidden = s == 0 ? input_of(mb) : input;
    for (int b = first_block; b < first_block + per_stage; ++b) hidden = model.block(b, hidden);
    return s == stages - 1 ? toy_loss(hidden, target_of(mb)) : hidden;
  };
  const auto result = kraken::parallel::run_1f1b(pp, stage, kMicroBatches);
  // Every micro-batch runs exactly the single-process ops on the same values, and the boundary
  // carries activations and gradients bit for bit, so the results are identical, not just close.
  if (s == stages - 1) h.expect_all_near(result.losses, want_losses, 0, 0, "losses");
  else h.expect(result.losses.empty(), "only the last stage reports losses");
  for (int b = first_block; b < first_block + per_stage; ++b) {
    h.expect_all_near(model.weights[b].grad().to_vector(), reference.weights[b].grad().to_vector(), 0, 0,
                      "block " + std::to_string(b) + " weight gradient");
    h.expect_all_near(model.biases[b].grad().to_vector(), reference.biases[b].grad().to_vector(), 0, 0,
                      "block " + std::to_string(b) + " bias gradient");
  }
}

// The embedding E (C, C) is used on the first stage (h = x·Eᵀ) and again as the head on the last
// (y = h·E); each of those stages holds a copy, and sync_tied_gradients sums their gradients.
void tied_weights(MpiHarness& h, Mesh& mesh) {
  Communicator& pp = mesh.pp();
  const int stages = pp.size(), s = pp.rank();
  const int per_stage = kBlocks / stages, first_block = s * per_stage;
  auto embedding = [] {
    Tensor e = toy_data(kWidth, kWidth, 99, 0);
    return e.set_requires_grad(true);
  };
  const ToyMlp reference(kBlocks, kWidth, 6), model(kBlocks, kWidth, 6);
  Tensor e_ref = embedding();
  for (int mb = 0; mb < kMicroBatches; ++mb) {
    Tensor hidden = ops::linear(input_of(mb), e_ref);
    for (int b = 0; b < kBlocks; ++b) hidden = reference.block(b, hidden);
    Tensor loss = toy_loss(ops::matmul(hidden, e_ref), target_of(mb));
    kraken::runtime::backward(loss, Tensor::full(loss.shape(), 1.0f / kMicroBatches));
  }
  Tensor e = embedding();  // this stage's copy (used only on the first and last stage)
  PipelineStage stage;
  stage.activation_shape = {kRows, kWidth};
  stage.forward = [&](int mb, const Tensor& input) {
    Tensor hidden = s == 0 ? ops::linear(input_of(mb), e) : input;
    for (int b = first_block; b < first_block + per_stage; ++b) hidden = model.block(b, hidden);
    return s == stages - 1 ? toy_loss(ops::matmul(hidden, e), target_of(mb)) : hidden;
  };
  kraken::parallel::run_1f1b(pp, stage, kMicroBatches);
  h.expect(mesh.has_group("embedding") == (mesh.is_first_stage() || mesh.is_last_stage()),
           "the embedding group holds the first and last stage only");
  if (!mesh.has_group("embedding")) return;
  kraken::parallel::sync_tied_gradients({e}, mesh.group("embedding"));
  // The copies' gradients are summed in another order than the single process's one accumulator
  // (stage by stage, then across): a few ulps of values of order 1.
  h.expect_all_near(e.grad().to_vector(), e_ref.grad().to_vector(), 1e-5, 1e-6, "tied embedding gradient");
}

}  // namespace

int main() {
  return kraken::parallel::run_guarded([] {
    MpiHarness h;
    if (kBlocks % h.size() != 0) KRAKEN_THROW("pipeline_mpi_test needs 1, 2 or 4 ranks, not ", h.size());
    auto mesh = Mesh::build(h.world(), MeshSizes{1, h.size(), 1, 1});
    h.run("OneFOneBOverStagesMatchesSingleProcessLossesAndGradients", [&] { split_mlp(h, mesh->pp()); });
    h.run("TiedWeightsOnFirstAndLastStageGetTheGradientOfBothUses", [&] { tied_weights(h, *mesh); });
    return h.finish();
  });
}
