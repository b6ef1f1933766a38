// Mixed precision's bf16 weight copies written by the optimizer (KrakenModel::compute_copy_targets,
// optim::Optimizer::set_compute_copies): training that way is the same computation, bit for bit, as
// casting every weight in each forward — the trainer's protocol run by hand on the CPU, for GPT-2's
// degree 1 and a Kraken degree.
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "models/kraken.h"
#include "optim/optimizer.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "runtime/tensor.h"
#include "tests/support/fixtures.h"
#include "train/trainer.h"

namespace kraken {
namespace {

using models::KrakenConfig;
using models::KrakenModel;
using runtime::DType;
using runtime::Tensor;

KrakenConfig tiny(int64_t degree) { return testing::tiny_kraken_config(2, degree); }
Tensor ids(int seed) { return testing::tiny_kraken_ids(seed); }
using testing::f32_bits;

// A bf16 model and its AdamW; with `copies`, the optimizer rewrites the model's bf16 buffers in each
// step (train::share_compute_copies) and the model takes them as current afterwards, as the trainer does.
struct Training {
  std::unique_ptr<KrakenModel> model;
  std::unique_ptr<optim::Optimizer> opt;
  Training(const KrakenConfig& c, bool copies) {
    model = std::make_unique<KrakenModel>(c);
    model->initialize(11);
    model->set_compute_dtype(DType::BF16);
    optim::OptimizerOptions o;
    opt = optim::make_optimizer(o, optim::param_refs(model->named_parameters()));
    if (copies) {
      EXPECT_TRUE(train::share_compute_copies(*model, *opt));
    }
  }
  // One step: loss, backward, update; returns the loss's bits. With `release`, the gradients' buffers
  // are released before it (Module::release_grads, every size), as the trainer does; else zeroed.
  uint32_t step(int seed, bool copies, bool release = false) {
    if (release) {
      model->release_grads(/*min_elements=*/1);
      for (const auto& p : model->named_parameters())  // nothing else holds them here
        EXPECT_FALSE(p.tensor.grad().defined()) << p.name << "'s gradient was kept";
    } else {
      model->zero_grad();
    }
    const Tensor loss = model->loss(ids(seed), ids(seed + 1), nullptr, false);
    runtime::backward(loss);
    opt->step(3e-3f);
    if (copies) model->set_compute_copies_current(true);
    return f32_bits(loss)[0];
  }
};

TEST(ComputeCopies, TrainingOnTheOptimizersCopiesIsTrainingOnCasts) {
  for (const int64_t degree : {int64_t{1}, int64_t{2}}) {
    SCOPED_TRACE("degree " + std::to_string(degree));
    Training cast(tiny(degree), false), kept(tiny(degree), true);
    for (int s = 0; s < 4; ++s) EXPECT_EQ(kept.step(s, true), cast.step(s, false)) << "loss of step " << s;
    const auto a = kept.model->named_parameters(), b = cast.model->named_parameters();
    ASSERT_EQ(a.size(), b.size());
    for (size_t k = 0; k < a.size(); ++k) {
      EXPECT_EQ(f32_bits(a[k].tensor), f32_bits(b[k].tensor)) << a[k].name;
      EXPECT_EQ(f32_bits(a[k].tensor.grad()), f32_bits(b[k].tensor.grad())) << a[k].name << "'s gradient";
    }
    // The optimizer's copies are the new parameters rounded to bf16.
    for (const auto& [param, copy] : kept.model->compute_copy_targets())
      EXPECT_EQ(copy.to_vector(), param.to(DType::BF16).to_vector()) << param.describe();
  }
}

// Released gradients (the trainer's way between steps): each step's first contribution becomes the
// gradient, where zeroed ones add it to zeros — the same values, so the same training bit for bit.
TEST(ComputeCopies, ReleasedGradientsTrainAsZeroedOnes) {
  for (const int64_t degree : {int64_t{1}, int64_t{2}}) {
    SCOPED_TRACE("degree " + std::to_string(degree));
    Training released(tiny(degree), true), zeroed(tiny(degree), true);
    for (int s = 0; s < 4; ++s)
      EXPECT_EQ(released.step(s, true, true), zeroed.step(s, true, false)) << "loss of step " << s;
    const auto a = released.model->named_parameters(), b = zeroed.model->named_parameters();
    ASSERT_EQ(a.size(), b.size());
    for (size_t k = 0; k < a.size(); ++k) {
      EXPECT_EQ(f32_bits(a[k].tensor), f32_bits(b[k].tensor)) << a[k].name;
      EXPECT_EQ(a[k].tensor.grad().to_vector(), b[k].tensor.grad().to_vector()) << a[k].name << "'s gradient";
    }
  }
}

TEST(ComputeCopies, ACurrentForwardReadsTheBuffersAndOtherwiseCasts) {
  // White-box: while current, a forward casts nothing — a buffer changed behind the model's back
  // changes the loss; once no longer current, the forward casts again and the loss is back. The first
  // target is in a layer's stacks (ops::stack_many), the last the head's tied wte (ops::cast_many).
  Training run(tiny(2), true);
  run.step(0, true);
  const Tensor loss = run.model->loss(ids(5), ids(6), nullptr, false);
  const auto targets = run.model->compute_copy_targets();  // (clears "current": new buffers may be made)
  for (const bool head : {false, true}) {
    SCOPED_TRACE(head ? "the head's buffer" : "a layer's stack");
    run.model->set_compute_copies_current(true);
    Tensor copy = head ? targets.back().second : targets.front().second;
    const Tensor saved = copy.clone();
    copy.copy_from(Tensor::zeros(copy.shape(), DType::BF16));
    const Tensor poisoned = run.model->loss(ids(5), ids(6), nullptr, false);
    EXPECT_NE(f32_bits(poisoned), f32_bits(loss)) << "a current forward cast the weights again";
    run.model->set_compute_copies_current(false);
    const Tensor recast = run.model->loss(ids(5), ids(6), nullptr, false);
    EXPECT_EQ(f32_bits(recast), f32_bits(loss)) << "a forward without current copies did not cast";
    EXPECT_EQ(copy.to_vector(), saved.to_vector()) << "the cast did not refill the buffer";
  }
}

TEST(ComputeCopies, NothingIsSharedInF32OrWithAnOptimizerThatMissesABuffer) {
  KrakenModel f32(tiny(1));
  optim::OptimizerOptions o;
  auto all = optim::make_optimizer(o, optim::param_refs(f32.named_parameters()));
  EXPECT_FALSE(train::share_compute_copies(f32, *all)) << "an f32 model has no bf16 copies";
  KrakenModel bf16(tiny(1));
  bf16.set_compute_dtype(DType::BF16);
  std::vector<runtime::NamedParameter> params;
  for (const auto& p : bf16.named_parameters())  // all but one weight with a copy: it would go stale
    if (p.name != "h.0.attn.c_attn.weight") params.push_back(p);
  ASSERT_EQ(params.size() + 1, bf16.named_parameters().size());
  auto some = optim::make_optimizer(o, optim::param_refs(params));
  EXPECT_FALSE(train::share_compute_copies(bf16, *some));
  auto every = optim::make_optimizer(o, optim::param_refs(bf16.named_parameters()));
  EXPECT_TRUE(train::share_compute_copies(bf16, *every));
}

TEST(ComputeCopies, AnOptimizerRejectsACopyThatDoesNotFitItsParameter) {
  KrakenModel model(tiny(1));
  optim::OptimizerOptions o;
  auto opt = optim::make_optimizer(o, optim::param_refs(model.named_parameters()));
  std::vector<Tensor> copies(opt->params().size());
  copies[0] = Tensor::zeros({3}, DType::BF16);
  try {
    opt->set_compute_copies(copies);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(opt->params()[0].name), std::string::npos) << e.what();
  }
  EXPECT_THROW(opt->set_compute_copies(std::vector<Tensor>(2)), Error);
}

}  // namespace
}  // namespace kraken
