// Config → planner inputs, and the layer profiler (train/plan.h).
#include "train/plan.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <memory>
#include <sstream>

#include "kernels/error.h"
#include "models/kraken.h"
#include "optim/optex.h"
#include "runtime/allocator.h"
#include "runtime/autograd.h"
#include "runtime/module.h"
#include "runtime/ops.h"
#include "runtime/rng.h"

namespace kraken::train {

namespace planner = parallel::planner;
using runtime::Tensor;

int64_t global_batch_of(const Config& c) {
  if (c.parallel.global_batch > 0) return c.parallel.global_batch;
  return c.train.batch_size * c.train.grad_accum * c.parallel.dp;
}

planner::ModelDesc model_desc_of(const Config& c) {
  planner::ModelConfig mc;
  mc.n_layer = static_cast<int>(c.model.n_layer);
  mc.n_embd = static_cast<int>(c.model.n_embd);
  mc.n_head = static_cast<int>(c.model.n_head);
  mc.degree = static_cast<int>(c.model.degree);
  mc.mlp_expansion = static_cast<int>(c.model.mlp_expansion);
  mc.context = static_cast<int>(c.model.context);
  mc.seq_len = static_cast<int>(c.train.seq_len);
  mc.vocab_size = static_cast<int>(c.model.vocab_size);
  mc.bias = c.model.bias;
  mc.global_batch = global_batch_of(c);
  mc.vocab_parallel = false;  // models::KrakenModel keeps wte whole on every tp rank
  planner::ModelDesc m = planner::make_model_desc(mc);

  // fp32 weights and gradients; the optimizer's state per parameter.
  const std::string base = c.optim.name == "optex" ? c.optim.optex.base : c.optim.name;
  m.optimizer_states = base == "adamw" ? 2 : (c.optim.momentum != 0.0 ? 1 : 0);
  if (c.optim.name == "optex") {
    // OptEx's history and buffers, per parameter (optim::optex_device_bytes is linear in d).
    optim::OptExOptions xo;
    xo.parallelism = static_cast<int>(c.optim.optex.parallelism);
    xo.estimator.history = c.optim.optex.history;
    const int64_t d = c.model.parameter_count();
    const double per_param = static_cast<double>(optim::optex_device_bytes(d, xo)) / static_cast<double>(d);
    m.optimizer_states += static_cast<int>(std::ceil(per_param / m.bytes_per_optimizer_state));
  }
  // Activations in the precision the run computes in: [train] precision, or, for "auto", the device
  // type's training dtype (bf16 on GPUs, fp32 on CPUs), which is what "auto" resolves to. bf16 on CPU
  // ranks is an emulation that keeps the f32 copies it computes from (runtime/ops/precision.h): it
  // saves no memory there: backward keeps the widened f32 copies, as much as an fp32 run.
  if (c.train.precision == "fp32" || (c.train.precision == "bf16" && c.train.device == "cpu"))
    m.bytes_per_activation = 4;
  else if (c.train.precision == "bf16")
    m.bytes_per_activation = 2;
  // The forward's copies of the layers' product weights, kept until backward: the bf16 casts on a GPU;
  // on CPU ranks computing in bf16, the widened f32 copies the products compute from; in fp32, the
  // stacks of a Kraken layer's sub-layers (degree > 1; degree 1 takes views).
  const bool gpu_bf16 = c.train.precision != "fp32" && c.train.device != "cpu";
  if (gpu_bf16) m.bytes_per_compute_copy = 2;
  else if (c.train.precision == "bf16" || c.model.degree > 1) m.bytes_per_compute_copy = 4;
  m.dp_gradient_buffers = 1;  // parallel::GradSync packs every gradient into flat bucket buffers
  // The trainer releases the big gradients between steps (Trainer: Module::release_grads).
  m.released_gradient_min_elements = static_cast<double>(runtime::Module::kReleasedGradientMinElements);
  m.limits.stage_needs_transformer_layer = true;  // layers_per_stage entries are ≥ 1
  m.limits.accumulation_covers_pipeline = true;   // the trainer's 1F1B needs grad_accum ≥ pp
  // Dropout masks would differ between ranks holding replicated activations, and OptEx's distances
  // would count replicated parameters twice: the trainer refuses tp and pp for both.
  m.limits.data_parallel_only = c.model.dropout > 0 || c.optim.name == "optex";
  return m;
}

Config load_config_for_planning(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) KRAKEN_THROW("cannot open config file '", path, "'");
  std::ostringstream text;
  text << in.rdbuf();
  return parse_config(text.str(), path, /*check_files=*/false);
}

// ---- the profiler --------------------------------------------------------------------------------

std::vector<int> profile_micro_batches(const Config& c, int max_micro_batch) {
  const int64_t g = global_batch_of(c);
  std::vector<int> out;
  for (int64_t d = 1; d <= std::min<int64_t>(g, std::max(1, max_micro_batch)); ++d)
    if (g % d == 0) out.push_back(static_cast<int>(d));
  return out;
}

std::vector<int> profile_tp_degrees(const Config& c) {
  std::vector<int> out;
  if (c.model.degree == 1) return {1};
  for (int64_t t = 1; t <= c.model.degree; ++t)
    if (c.model.degree % t == 0) out.push_back(static_cast<int>(t));
  return out;
}

namespace {

using Clock = std::chrono::steady_clock;

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

Tensor random_normal(const runtime::Shape& shape, runtime::Generator& gen, const runtime::Device& device) {
  Tensor t = Tensor::empty(shape, runtime::DType::F32);
  gen.fill_normal(t, 0.0f, 1.0f);
  return t.to(device);
}

// On the host, as the trainer's batches (the embedding and the loss upload them without waiting for the GPU).
Tensor random_ids(int64_t B, int64_t T, int64_t vocab, runtime::Generator& gen) {
  std::vector<int32_t> ids(static_cast<size_t>(B * T));
  for (auto& id : ids) id = static_cast<int32_t>(gen.next_below(static_cast<uint64_t>(vocab)));
  return Tensor::from_ints(ids, {B, T});
}

// One pipeline stage of the rank-share model, ready to run forward + backward on one micro-batch.
class StageRunner {
 public:
  StageRunner(const models::KrakenConfig& config, const models::ModelShard& shard, const runtime::Device& device,
              runtime::DType compute, int64_t B, int64_t T, runtime::Generator& gen)
      : model_(config, device, shard), device_(device), dropout_(gen.seed(), 0xD50F00Dull) {
    model_.initialize(gen.seed());
    model_.set_compute_dtype(compute);  // the run's precision: bf16 layers are what a GPU run times
    ids_ = random_ids(B, T, config.vocab_size, gen);
    targets_ = random_ids(B, T, config.vocab_size, gen);
    if (!shard.has_embedding) {
      // The boundary activation of the stage before, with a gradient to send back (as in 1F1B).
      input_ = random_normal(model_.boundary_shape(B, T), gen, device).to(compute);
      input_.set_requires_grad(true);
    }
    if (!shard.has_head) output_grad_ = random_normal(model_.boundary_shape(B, T), gen, device).to(compute);
  }

  // Forward + backward of one micro-batch, in seconds (the device is synchronised at both ends).
  double run() {
    runtime::synchronize(device_);
    const auto t0 = Clock::now();
    Tensor out = model_.stage_forward(ids_, input_, &dropout_, /*training=*/true);
    if (model_.shard().has_head)
      runtime::backward(runtime::ops::cross_entropy(out, targets_, model_.config().vocab_size, -1));
    else
      runtime::backward(out, output_grad_);
    runtime::synchronize(device_);
    return std::chrono::duration<double>(Clock::now() - t0).count();
  }

 private:
  models::KrakenModel model_;
  runtime::Device device_;
  runtime::Generator dropout_;
  Tensor ids_, targets_, input_, output_grad_;
};

}  // namespace

planner::Profile measure_profile(const Config& c, const ProfileOptions& options,
                                 const std::function<void(const LayerMeasurement&)>& report) {
  if (options.repeat < 1) KRAKEN_THROW("profile: repeat must be at least 1, got ", options.repeat);
  if (options.warmup < 0) KRAKEN_THROW("profile: warmup must be at least 0, got ", options.warmup);
  if (options.device_type.empty()) KRAKEN_THROW("profile: the device type name is empty");
  model_desc_of(c);  // the shape must be one the planner can describe
  const runtime::Device device = runtime::parse_device(c.train.device);
  std::vector<int> micro_batches = options.micro_batches;
  if (micro_batches.empty()) micro_batches = profile_micro_batches(c, options.max_micro_batch);
  for (int mb : micro_batches)
    if (mb < 1) KRAKEN_THROW("profile: micro-batch sizes must be positive, got ", mb);
  const int64_t T = c.train.seq_len;

  planner::Profile profile;
  profile.device_type = options.device_type;
  runtime::Generator gen(options.seed, 0);
  for (int tp : profile_tp_degrees(c)) {
    // One rank's share at tp: the model of degree k/tp with n_head/tp heads (plan.h), three layers so
    // that layers 1 and 2 exist and mix their streams like every layer after the first.
    models::KrakenConfig share = c.model;
    share.degree = c.model.degree / tp;
    share.n_head = c.model.n_head / tp;
    share.n_layer = 3;
    for (int mb : micro_batches) {
      auto stage = [&](int64_t first, int64_t last, bool embedding, bool head) {
        models::ModelShard shard;
        shard.first_layer = first;
        shard.last_layer = last;
        shard.has_embedding = embedding;
        shard.has_head = head;
        return std::make_unique<StageRunner>(share, shard, device, compute_dtype(c.train, device), mb, T, gen);
      };
      struct Point {
        planner::LayerKind kind;
        std::vector<std::unique_ptr<StageRunner>> runners;  // two: the time is runners[1] − runners[0]
      };
      std::vector<Point> points;
      points.push_back({planner::LayerKind::Embedding, {}});
      points.back().runners.push_back(stage(0, 0, true, false));
      points.push_back({planner::LayerKind::KrakenLayer, {}});
      points.back().runners.push_back(stage(1, 2, false, false));
      points.back().runners.push_back(stage(1, 3, false, false));
      points.push_back({planner::LayerKind::LmHead, {}});
      points.back().runners.push_back(stage(3, 3, false, true));
      for (Point& point : points) {
        for (int w = 0; w < options.warmup; ++w)
          for (auto& r : point.runners) r->run();
        LayerMeasurement m;
        m.kind = point.kind;
        m.tp = tp;
        m.micro_batch = mb;
        // The two-stage difference is taken run by run (paired, so slow drifts cancel) for the spread
        // the report shows; the estimate itself is the difference of the two stages' fastest runs,
        // which interference from other processes (it only ever adds time) cannot push below zero.
        std::vector<double> fastest(point.runners.size(), 1e300);
        for (int rep = 0; rep < options.repeat; ++rep) {
          std::vector<double> t;
          for (auto& r : point.runners) t.push_back(r->run());
          for (size_t k = 0; k < t.size(); ++k) fastest[k] = std::min(fastest[k], t[k]);
          m.samples.push_back(t.size() == 1 ? t[0] : t[1] - t[0]);
        }
        m.seconds = fastest.size() == 1 ? median_of(m.samples) : fastest[1] - fastest[0];
        if (!(m.seconds > 0))
          KRAKEN_THROW("profile: the ", planner::layer_kind_name(m.kind), " at tp = ", tp, ", micro-batch ", mb,
                       " measured ", m.seconds, " s (the two-layer stage was not slower than the one-layer stage); "
                       "the machine is too noisy: raise --repeat or measure on an idle machine");
        profile.entries.push_back({m.kind, tp, mb, m.seconds});
        if (report) report(m);
      }
    }
  }
  return profile;
}

}  // namespace kraken::train
