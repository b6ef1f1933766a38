#include "train/trainer.h"

#include <omp.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>

#include "data/loader.h"
#include "data/shard.h"
#include "kernels/error.h"
#include "kernels/matmul.h"
#include "models/kraken.h"
#include "optim/clip.h"
#include "optim/optex.h"
#include "optim/optimizer.h"
#include "optim/schedule.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "train/checkpoint.h"
#include "train/metrics.h"

namespace kraken::train {
namespace {

std::atomic<bool> g_stop{false};

extern "C" void on_stop_signal(int) { g_stop.store(true); }

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Dropout draws from its own Philox stream, so it never shifts the initialisation's draws.
constexpr uint64_t kDropoutStream = 0xD50F00Dull;

optim::OptimizerOptions optimizer_options(const OptimConfig& o) {
  optim::OptimizerOptions out;
  out.name = o.name == "optex" ? o.optex.base : o.name;
  out.adamw.beta1 = static_cast<float>(o.beta1);
  out.adamw.beta2 = static_cast<float>(o.beta2);
  out.adamw.eps = static_cast<float>(o.eps);
  out.adamw.weight_decay = static_cast<float>(o.weight_decay);
  out.sgd.momentum = static_cast<float>(o.momentum);
  out.sgd.nesterov = o.nesterov;
  out.sgd.weight_decay = static_cast<float>(o.weight_decay);
  return out;
}

// The model fields of two configs must agree for a checkpoint of one to load into the other.
void check_same_model(const models::KrakenConfig& saved, const models::KrakenConfig& now, const std::string& dir) {
  auto field = [&](const char* name, int64_t a, int64_t b) {
    if (a != b)
      KRAKEN_THROW("checkpoint '", dir, "' was trained with model.", name, " = ", a, ", but the config says ", b,
                   ": its tensors cannot be loaded into this model");
  };
  field("n_layer", saved.n_layer, now.n_layer);
  field("n_embd", saved.n_embd, now.n_embd);
  field("n_head", saved.n_head, now.n_head);
  field("degree", saved.degree, now.degree);
  field("context", saved.context, now.context);
  field("vocab_size", saved.vocab_size, now.vocab_size);
  field("mlp_expansion", saved.mlp_expansion, now.mlp_expansion);
  field("bias", saved.bias, now.bias);
}

optim::OptExOptions optex_options(const Config& c) {
  optim::OptExOptions xo;
  xo.parallelism = static_cast<int>(c.optim.optex.parallelism);
  xo.estimator.lengthscale = c.optim.optex.lengthscale;
  xo.estimator.noise = c.optim.optex.noise;
  xo.estimator.normalize_inputs = c.optim.optex.normalize_inputs;
  xo.estimator.history = c.optim.optex.history;
  xo.estimator.effective_dim = c.optim.optex.effective_dim;
  xo.seed = c.train.seed;
  xo.validate();
  return xo;
}

// What a device can hold: the GPU's memory, or the machine's RAM for the CPU.
double device_memory_bytes(const runtime::Device& device) {
  if (device.is_cpu()) return static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
  return 80e9;  // refined by the CUDA backend; a conservative H100-sized default
}

}  // namespace

bool stop_requested() { return g_stop.load(); }
void request_stop() { g_stop.store(true); }

struct Trainer::State {
  Config config;
  TrainerOptions options;
  runtime::Device device;
  std::unique_ptr<models::KrakenModel> model;
  std::vector<runtime::NamedParameter> params;
  std::unique_ptr<optim::Optimizer> optimizer;  // the optimizer, or null when OptEx owns it
  std::unique_ptr<optim::OptEx> optex;
  optim::LrSchedule schedule;
  std::unique_ptr<data::DataLoader> train_loader;
  std::unique_ptr<data::DataLoader> val_loader;
  runtime::Generator dropout_rng;
  CheckpointStore checkpoints;
  MetricsWriter metrics;
  int64_t optex_bytes = 0;     // what OptEx's history and buffers take
  int64_t step = 0;            // completed optimizer steps (OptEx: sequential iterations)
  int64_t tokens_seen = 0;
  double train_seconds = 0.0;  // accumulated over all runs, for the metrics

  State(Config c, TrainerOptions o)
      : config(std::move(c)), options(o), checkpoints(config.checkpoint_dir(), config.checkpoint.keep) {}
};

Trainer::Trainer(Config config, TrainerOptions options) : s_(std::make_unique<State>(std::move(config), options)) {
  State& s = *s_;
  const Config& c = s.config;
  if (c.parallel.dp * c.parallel.tp * c.parallel.pp * c.parallel.optex_groups != 1)
    KRAKEN_THROW("this trainer runs one process; [parallel] asks for dp=", c.parallel.dp, " tp=", c.parallel.tp,
                 " pp=", c.parallel.pp);
  if (c.train.threads > 0) {
    omp_set_num_threads(c.train.threads);
    kernels::set_cpu_blas_threads(c.train.threads);
  }
  s.device = runtime::parse_device(c.train.device);

  // ---- model, initialised from the seed (resume overwrites it below) ----
  s.model = std::make_unique<models::KrakenModel>(c.model, s.device);
  s.model->initialize(c.train.seed);
  s.params = s.model->named_parameters();
  s.dropout_rng = runtime::Generator(c.train.seed, kDropoutStream);

  // ---- optimizer and schedule ----
  auto base = optim::make_optimizer(optimizer_options(c.optim), optim::param_refs(s.params));
  if (c.optim.name == "optex") {
    const optim::OptExOptions xo = optex_options(c);
    const int64_t d = s.model->parameter_count();
    const double need = static_cast<double>(optim::optex_device_bytes(d, xo));
    const double limit = c.optim.optex.max_history_gb > 0 ? c.optim.optex.max_history_gb * 1e9 : 0.5 * device_memory_bytes(s.device);
    if (need > limit)
      KRAKEN_THROW("[optim.optex] history = ", c.optim.optex.history, " and parallelism = ", c.optim.optex.parallelism,
                   " need ", need / 1e9, " GB for ", d, " parameters (2·(history + parallelism)·d floats), more than the ",
                   limit / 1e9, " GB allowed (max_history_gb, default half the device's memory): lower history");
    s.optex_bytes = static_cast<int64_t>(need);
    s.optex = std::make_unique<optim::OptEx>(std::move(base), xo);
  } else {
    s.optimizer = std::move(base);
  }
  s.schedule.kind = optim::parse_schedule_kind(c.optim.schedule);
  s.schedule.max_lr = c.optim.lr;
  s.schedule.min_lr = c.optim.min_lr;
  s.schedule.warmup_steps = c.optim.warmup_steps;
  s.schedule.decay_steps = c.optim.decay_steps > 0 ? c.optim.decay_steps : std::max(c.train.max_steps, c.optim.warmup_steps);
  s.schedule.validate();

  // ---- data ----
  data::LoaderOptions lo;
  lo.batch_size = c.train.batch_size;
  lo.seq_len = c.train.seq_len;
  lo.shuffle = c.data.shuffle;
  lo.seed = c.train.seed;
  lo.format = data::parse_shard_format(c.data.format);
  s.train_loader = std::make_unique<data::DataLoader>(data::expand_patterns(c.data.train), lo);
  if (!c.data.val.empty()) {
    data::LoaderOptions vo = lo;
    vo.shuffle = false;
    s.val_loader = std::make_unique<data::DataLoader>(data::expand_patterns(c.data.val), vo);
  }

  // ---- resume ----
  std::string resume_dir;
  if (c.checkpoint.resume == "auto") resume_dir = s.checkpoints.latest();
  else if (c.checkpoint.resume != "none") resume_dir = c.checkpoint.resume;
  if (!resume_dir.empty()) {
    LoadedCheckpoint ckpt = open_checkpoint(resume_dir);
    if (!ckpt.state.contains("config")) KRAKEN_THROW("checkpoint '", resume_dir, "' has no saved config in state.json");
    const Config saved = parse_config(ckpt.state["config"].get<std::string>(), resume_dir + "/state.json[config]", false);
    check_same_model(saved.model, c.model, resume_dir);
    NamedTensors model_tensors;
    for (const auto& p : s.params) model_tensors.emplace_back(p.name, p.tensor);
    load_tensors(ckpt.model, model_tensors);
    // The optimizer's own loader checks that exactly its state names are there, with its shapes.
    NamedTensors saved_opt;
    for (const std::string& name : ckpt.optimizer.names()) saved_opt.emplace_back(name, ckpt.optimizer.load(name, s.device));
    if (s.optex) s.optex->load_state(saved_opt, ckpt.state.at("optimizer"));
    else s.optimizer->load_state(saved_opt, ckpt.state.at("optimizer"));
    s.train_loader->restore(ckpt.state.at("loader").get<data::LoaderState>());
    const auto& rng = ckpt.state.at("dropout_rng");
    s.dropout_rng.set_state({rng.at("seed").get<uint64_t>(), rng.at("stream").get<uint64_t>(), rng.at("offset").get<uint64_t>()});
    s.step = ckpt.step();
    s.tokens_seen = ckpt.state.value("tokens_seen", int64_t{0});
    s.train_seconds = ckpt.state.value("train_seconds", 0.0);
  }

  make_directories(c.train.out_dir);
  s.metrics = MetricsWriter(c.train.out_dir + "/metrics.jsonl", /*append=*/s.step > 0, s.step);
}

Trainer::~Trainer() = default;

int64_t Trainer::step() const { return s_->step; }
const Config& Trainer::config() const { return s_->config; }

double Trainer::evaluate(int64_t max_batches) {
  State& s = *s_;
  if (!s.val_loader) KRAKEN_THROW("no validation shards ([data] val) to evaluate on");
  runtime::NoGrad no_grad;
  s.val_loader->reset();
  const int64_t batches = max_batches > 0 ? std::min(max_batches, s.val_loader->batches_per_epoch())
                                          : s.val_loader->batches_per_epoch();
  double sum = 0.0;
  int64_t count = 0;
  for (int64_t b = 0; b < batches; ++b) {
    data::Batch batch = s.val_loader->next();
    runtime::Tensor logits = s.model->forward(batch.inputs.to(s.device), nullptr, /*training=*/false);
    const runtime::ops::LossSum part =
        runtime::ops::cross_entropy_sum(logits, batch.targets.to(s.device), s.config.model.vocab_size, -1);
    sum += part.sum;
    count += part.count;
  }
  return count > 0 ? sum / static_cast<double>(count) : 0.0;
}

RunSummary Trainer::run() {
  State& s = *s_;
  const Config& c = s.config;
  RunSummary summary;
  summary.first_step = s.step;

  struct sigaction action {}, old_int{}, old_term{};
  if (s.options.handle_signals) {
    g_stop.store(false);
    action.sa_handler = on_stop_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, &old_int);
    sigaction(SIGTERM, &action, &old_term);
  }

  const int64_t tokens_per_step = c.tokens_per_step();
  Progress progress(s.step, c.train.max_steps, s.options.progress, c.train.log_every);
  const auto run_start = Clock::now();
  const int64_t tokens_at_start = s.tokens_seen;
  int64_t run_steps = 0;
  const float micro_scale = 1.0f / static_cast<float>(c.train.grad_accum);

  auto save_checkpoint = [&]() {
    CheckpointContents contents;
    for (const auto& p : s.params) contents.model.emplace_back(p.name, p.tensor);
    contents.optimizer = s.optex ? s.optex->state_tensors() : s.optimizer->state_tensors();
    const runtime::RngState rng = s.dropout_rng.state();
    contents.state = {{"config", c.text},
                      {"loader", s.train_loader->state()},
                      {"optimizer", s.optex ? s.optex->state_scalars() : s.optimizer->state_scalars()},
                      {"dropout_rng", {{"seed", rng.seed}, {"stream", rng.stream}, {"offset", rng.offset}}},
                      {"tokens_seen", s.tokens_seen},
                      {"train_seconds", s.train_seconds}};
    summary.last_checkpoint = s.checkpoints.save(s.step, contents);
    progress.message("checkpoint: " + summary.last_checkpoint);
  };
  auto run_eval = [&]() {
    const auto t0 = Clock::now();
    const double val = evaluate(c.train.eval_batches);
    summary.val_loss = val;
    s.metrics.write({{"step", s.step}, {"val_loss", val}, {"val_ppl", std::exp(val)}, {"eval_seconds", seconds_since(t0)}});
    char line[128];
    std::snprintf(line, sizeof line, "step %lld: val loss %.4f, perplexity %.2f", (long long)s.step, val, std::exp(val));
    progress.message(line);
  };

  while (s.step < c.train.max_steps) {
    const auto t0 = Clock::now();
    const double lr = s.schedule.at(s.step);
    // One gradient evaluation: grad_accum micro-batches at the current parameters, clipped. The
    // losses it saw are added to loss_sum, its norm before clipping kept in grad_norm.
    double loss_sum = 0.0, grad_norm = 0.0;
    int64_t evaluations = 0;
    auto evaluate_gradient = [&]() {
      s.model->zero_grad();
      for (int64_t micro = 0; micro < c.train.grad_accum; ++micro) {
        data::Batch batch = s.train_loader->next();
        runtime::Tensor loss = s.model->loss(batch.inputs.to(s.device), batch.targets.to(s.device), &s.dropout_rng);
        loss_sum += loss.item();
        runtime::backward(runtime::ops::scale(loss, micro_scale));
      }
      std::vector<runtime::Tensor> grads;
      for (const auto& p : s.params) grads.push_back(p.tensor.grad());
      grad_norm = c.optim.grad_clip > 0 ? optim::clip_grad_norm(grads, c.optim.grad_clip) : optim::global_grad_norm(grads);
      evaluations += 1;
      return grads;
    };
    nlohmann::json record;
    if (s.optex) {
      // One sequential iteration: N gradient evaluations on N micro-batch groups (optim/optex.h).
      const optim::OptExReport report = s.optex->step([&](int) { return evaluate_gradient(); }, static_cast<float>(lr));
      record = {{"grad_evals", report.gradient_evaluations},
                {"optex_history", report.history_size},
                {"optex_rel_error", std::isfinite(report.mean_relative_error()) ? nlohmann::json(report.mean_relative_error()) : nlohmann::json()},
                {"optex_cosine", std::isfinite(report.mean_cosine()) ? nlohmann::json(report.mean_cosine()) : nlohmann::json()},
                {"optex_outside_gradients_s", report.seconds_outside_gradients()}};
    } else {
      std::vector<runtime::Tensor> grads = evaluate_gradient();
      s.optimizer->step(grads, static_cast<float>(lr));
    }
    s.model->zero_grad();
    s.step += 1;
    run_steps += 1;
    s.tokens_seen += tokens_per_step * evaluations;
    const double dt = seconds_since(t0);
    s.train_seconds += dt;
    const double loss = loss_sum / static_cast<double>(c.train.grad_accum * evaluations);
    summary.losses.push_back(loss);
    if (!std::isfinite(loss)) KRAKEN_THROW("the training loss became ", loss, " at step ", s.step, "; lower optim.lr?");
    const double tokens_per_second = static_cast<double>(tokens_per_step * evaluations) / dt;
    record.update({{"step", s.step},
                   {"loss", loss},
                   {"lr", lr},
                   {"grad_norm", grad_norm},
                   {"step_seconds", dt},
                   {"elapsed_s", s.train_seconds},
                   {"tokens_per_second", tokens_per_second},
                   {"tokens_seen", s.tokens_seen}});
    s.metrics.write(record);
    progress.update(s.step - 1, loss, lr, tokens_per_second);

    const bool last = s.step == c.train.max_steps;
    const bool stop = stop_requested() || (s.options.stop_after_steps >= 0 && run_steps >= s.options.stop_after_steps);
    if (s.val_loader && ((c.train.eval_every > 0 && s.step % c.train.eval_every == 0) || last)) run_eval();
    if ((c.checkpoint.every > 0 && s.step % c.checkpoint.every == 0) || last || stop) save_checkpoint();
    if (stop && !last) {
      summary.interrupted = stop_requested();
      break;
    }
  }
  progress.finish();
  const double elapsed = seconds_since(run_start);
  summary.steps_done = s.step;
  summary.tokens_per_second = elapsed > 0 ? static_cast<double>(s.tokens_seen - tokens_at_start) / elapsed : 0.0;
  if (s.options.handle_signals) {
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGTERM, &old_term, nullptr);
  }
  return summary;
}

}  // namespace kraken::train
