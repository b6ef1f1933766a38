// The training loop (train/trainer.h), single process or under mpirun.
//
// The parallel layout comes from [parallel]: the world splits into ex × pp × dp × tp ranks
// (parallel/mesh.h). Each rank holds one pipeline stage's layers and, within it, its tensor-parallel
// part (models/kraken.h); its data loader reads its data-parallel slice. One optimizer step:
//   pp = 1: for each micro-batch: forward, loss, backward (gradients accumulate; the data-parallel
//           all-reduce of each bucket starts during the last micro-batch's backward);
//   pp > 1: the 1F1B schedule over the micro-batches (parallel/pipeline.h);
// then wait for the data-parallel buckets, sum the tied embedding's gradients between the first and
// last stage, clip by the global norm (summed over the model-parallel ranks, every parameter counted
// once), and step the optimizer. OptEx (optim.name = "optex") wraps that gradient evaluation: with
// [parallel] optex_groups = N, evaluation s runs on group s and the gradients are exchanged.
#include "train/trainer.h"

#include <omp.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <map>
#include <set>
#include <thread>
#include <unordered_map>

#include "data/loader.h"
#include "data/shard.h"
#include "kernels/attention.h"
#include "kernels/error.h"
#include "kernels/matmul.h"
#include "models/kraken.h"
#include "optim/clip.h"
#include "optim/optex.h"
#include "optim/optimizer.h"
#include "optim/schedule.h"
#include "parallel/failure.h"
#include "parallel/grad_sync.h"
#include "parallel/mesh.h"
#include "parallel/pipeline.h"
#include "parallel/world.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "train/auto_plan.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "train/sharded_state.h"

namespace kraken::train {
namespace {

std::atomic<bool> g_stop{false};

extern "C" void on_stop_signal(int) { g_stop.store(true); }

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Dropout draws from its own Philox stream (one per data-parallel replica), so it never shifts the
// initialisation's draws and replicas drop different units.
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

// The layer range of pipeline stage `stage`: as configured, or as even as possible (earlier stages
// take the remainder).
std::pair<int64_t, int64_t> stage_layers(const Config& c, int stage) {
  const int64_t L = c.model.n_layer, pp = c.parallel.pp;
  int64_t first = 0;
  for (int s = 0; s <= stage; ++s) {
    const int64_t n = c.parallel.layers_per_stage.empty() ? L / pp + (s < L % pp ? 1 : 0)
                                                          : c.parallel.layers_per_stage[static_cast<size_t>(s)];
    if (s == stage) return {first, first + n};
    first += n;
  }
  return {0, L};
}

// OptEx keeps each history point as one flat vector over this rank's parameters ("optex.theta.3").
// A checkpoint stores it per parameter ("optex.theta.3.h.0.attn.c_attn.weight"), so the history is a
// set of logical tensors like the rest of the state and survives a change of layout.
bool is_flat_history(const std::string& name) {
  return name.rfind("optex.theta.", 0) == 0 || name.rfind("optex.grad.", 0) == 0;
}

NamedTensors split_flat_history(const NamedTensors& state, const std::vector<runtime::NamedParameter>& params) {
  NamedTensors out;
  for (const auto& [name, t] : state) {
    if (!is_flat_history(name)) {
      out.emplace_back(name, t);
      continue;
    }
    int64_t offset = 0;
    for (const auto& p : params) {
      const int64_t n = p.tensor.numel();
      out.emplace_back(name + "." + p.name, t.slice(offset, offset + n).reshape(p.tensor.shape()));
      offset += n;
    }
    KRAKEN_CHECK(offset == t.numel(), name, " holds ", t.numel(), " values for ", offset, " parameters");
  }
  return out;
}

// The inverse, for this rank's pieces (already cut to its layout): "optex.theta.3.<param>" for every
// local parameter, in order, back into one flat "optex.theta.3".
NamedTensors join_flat_history(const NamedTensors& pieces, const std::vector<runtime::NamedParameter>& params) {
  NamedTensors out;
  std::map<std::string, runtime::Tensor> by_name;
  std::vector<std::string> flat_names;
  for (const auto& [name, t] : pieces) {
    if (!is_flat_history(name)) {
      out.emplace_back(name, t);
      continue;
    }
    by_name[name] = t;
    // "optex.theta.3.<param>": the flat name is the first three dot-separated fields.
    const size_t a = name.find('.'), b = name.find('.', a + 1), c = name.find('.', b + 1);
    const std::string flat = name.substr(0, c);
    if (std::find(flat_names.begin(), flat_names.end(), flat) == flat_names.end()) flat_names.push_back(flat);
  }
  int64_t total = 0;
  for (const auto& p : params) total += p.tensor.numel();
  for (const std::string& flat : flat_names) {
    runtime::Tensor joined = runtime::Tensor::empty({total}, runtime::DType::F32, params.front().tensor.device());
    int64_t offset = 0;
    for (const auto& p : params) {
      auto it = by_name.find(flat + "." + p.name);
      if (it == by_name.end()) KRAKEN_THROW("checkpoint: OptEx history ", flat, " has no piece for parameter ", p.name);
      joined.slice(offset, offset + p.tensor.numel()).copy_from(it->second.reshape({p.tensor.numel()}));
      offset += p.tensor.numel();
    }
    out.emplace_back(flat, joined);
  }
  return out;
}

}  // namespace

bool share_compute_copies(models::KrakenModel& model, optim::Optimizer& optimizer) {
  std::unordered_map<const runtime::TensorImpl*, runtime::Tensor> copy_of;
  for (const auto& [param, copy] : model.compute_copy_targets()) copy_of[param.impl()] = copy;
  std::vector<runtime::Tensor> copies;
  size_t matched = 0;
  for (const optim::ParamRef& p : optimizer.params()) {
    const auto found = copy_of.find(p.param.impl());
    copies.push_back(found != copy_of.end() ? found->second : runtime::Tensor());
    matched += found != copy_of.end();
  }
  if (copy_of.empty() || matched != copy_of.size()) return false;
  optimizer.set_compute_copies(std::move(copies));
  return true;
}

bool stop_requested() { return g_stop.load(); }
void request_stop() { g_stop.store(true); }

struct Trainer::State {
  Config config;
  TrainerOptions options;
  runtime::Device device;
  std::unique_ptr<parallel::Mesh> mesh;
  bool main_rank = true;  // world rank 0: prints, writes metrics and checkpoints
  std::unique_ptr<models::KrakenModel> model;
  std::vector<runtime::NamedParameter> params;
  std::vector<runtime::Tensor> tied;      // this rank's copy of the tied wte, when pp > 1 and it is first or last
  std::unique_ptr<parallel::GradSync> grad_sync;
  std::unique_ptr<optim::Optimizer> optimizer;  // null when OptEx owns it
  bool optimizer_writes_copies = false;         // it rewrites the model's bf16 copies in each step
  std::unique_ptr<optim::OptEx> optex;
  int64_t optex_bytes = 0;
  optim::LrSchedule schedule;
  std::unique_ptr<data::DataLoader> train_loader;
  std::unique_ptr<data::DataLoader> val_loader;
  runtime::Generator dropout_rng;
  CheckpointStore checkpoints;
  MetricsWriter metrics;
  AutoPlan plan;               // plan = "auto": the planner's layout and prediction
  int64_t step = 0;            // completed optimizer steps (OptEx: sequential iterations)
  int64_t tokens_seen = 0;
  double train_seconds = 0.0;  // accumulated over all runs, for the metrics

  State(Config c, TrainerOptions o)
      : config(std::move(c)), options(o), checkpoints(config.checkpoint_dir(), config.checkpoint.keep) {}

  const parallel::MeshCoords& coords() const { return mesh->coords(); }
  int pp() const { return mesh->sizes().pp; }
  bool first_stage() const { return mesh->is_first_stage(); }
  bool last_stage() const { return mesh->is_last_stage(); }
};

Trainer::Trainer(Config config, TrainerOptions options) : s_(std::make_unique<State>(std::move(config), options)) {
  State& s = *s_;
  const Config& c = s.config;
  parallel::World& world = parallel::World::get();
  if (s.config.parallel.plan == "auto") s.plan = plan_layout(s.config, world);  // rewrites the layout in c
  const parallel::MeshSizes sizes{static_cast<int>(c.parallel.optex_groups), static_cast<int>(c.parallel.pp),
                                  static_cast<int>(c.parallel.dp), static_cast<int>(c.parallel.tp)};
  if (sizes.world() != world.size())
    KRAKEN_THROW("[parallel] asks for ", sizes.str(), " = ", sizes.world(), " processes, but the job has ", world.size(),
                 world.size() == 1 ? " (start it with mpirun -np N)" : "");
  // Every rank must train the same config: a file edited between launches would silently diverge.
  parallel::check_same_on_all_ranks("the config file", c.text);
  s.mesh = parallel::Mesh::build(world, sizes);
  s.main_rank = world.rank() == 0;
  if (c.model.dropout > 0 && (sizes.tp > 1 || sizes.pp > 1))
    KRAKEN_THROW("model.dropout > 0 is not supported with tensor or pipeline parallelism yet (replicated "
                 "activations would get different masks on different ranks); set dropout = 0");

  // Threads: the config's, else the cores shared among this node's ranks.
  int threads = c.train.threads;
  if (threads <= 0 && world.local_size() > 1)
    threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / world.local_size());
  if (threads > 0) {
    omp_set_num_threads(threads);
    kernels::set_cpu_blas_threads(threads);
  }
  s.device = runtime::parse_device(c.train.device);
  if (s.device.is_cuda()) s.device.index = world.local_rank();

  // ---- this rank's part of the model, initialised from the seed (resume overwrites it below) ----
  models::ModelShard shard;
  std::tie(shard.first_layer, shard.last_layer) = stage_layers(c, s.coords().pp);
  shard.has_embedding = s.first_stage();
  shard.has_head = s.last_stage();
  shard.tp_size = sizes.tp;
  shard.tp_rank = s.coords().tp;
  shard.tp = sizes.tp > 1 ? &s.mesh->tp() : nullptr;
  s.model = std::make_unique<models::KrakenModel>(c.model, s.device, shard);
  s.model->set_compute_dtype(compute_dtype(c.train, s.device));
  s.model->initialize(c.train.seed);
  s.params = s.model->named_parameters();
  if (sizes.pp > 1 && (s.first_stage() || s.last_stage())) s.tied.push_back(s.model->wte());
  s.dropout_rng = runtime::Generator(c.train.seed, kDropoutStream + static_cast<uint64_t>(s.coords().dp));
  if (sizes.dp > 1) {
    std::vector<runtime::Tensor> leaves;
    for (const auto& p : s.params) leaves.push_back(p.tensor);
    s.grad_sync = std::make_unique<parallel::GradSync>(leaves, s.mesh->dp(),
                                                       static_cast<size_t>(c.parallel.bucket_mb * (1 << 20)));
  }

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
    optim::OptExHooks hooks;
    if (sizes.ex > 1) {
      // Group g computes evaluation g; the all-gather over the ex group hands every rank all N.
      const int own = s.coords().ex;
      parallel::Communicator* ex = &s.mesh->ex();
      hooks.owned = [own](int e) { return e == own; };
      hooks.exchange = [own, ex](std::vector<runtime::Tensor>& grads, const std::vector<bool>&) {
        runtime::Tensor mine = grads[static_cast<size_t>(own)].to(runtime::Device::cpu());
        runtime::Tensor all = ex->all_gather(mine.reshape({1, mine.numel()}));
        for (size_t e = 0; e < grads.size(); ++e)
          if (static_cast<int>(e) != own)
            grads[e].copy_from(all.slice(static_cast<int64_t>(e), static_cast<int64_t>(e) + 1).reshape(grads[e].shape()));
      };
    }
    if (sizes.tp * sizes.pp > 1) {
      // Model parallelism: each rank holds part of θ, so kernel distances are partial sums, added up
      // across the model-parallel group. Exchanged as (hi, lo) float pairs and summed in double in rank
      // order, so every rank gets the same sums, to ~48 bits.
      parallel::Communicator* mp = &s.mesh->mp();
      hooks.reduce_partials = [mp](std::vector<double>& values) {
        const int64_t n = static_cast<int64_t>(values.size());
        runtime::Tensor mine = runtime::Tensor::empty({1, 2 * n});
        float* m = mine.data<float>();
        for (int64_t i = 0; i < n; ++i) {
          m[2 * i] = static_cast<float>(values[i]);
          m[2 * i + 1] = static_cast<float>(values[i] - static_cast<double>(m[2 * i]));
        }
        const runtime::Tensor all = mp->all_gather(mine);
        const float* a = all.data<float>();
        for (int64_t i = 0; i < n; ++i) {
          double sum = 0.0;
          for (int r = 0; r < mp->size(); ++r)
            sum += static_cast<double>(a[r * 2 * n + 2 * i]) + static_cast<double>(a[r * 2 * n + 2 * i + 1]);
          values[i] = sum;
        }
      };
    }
    s.optex = std::make_unique<optim::OptEx>(std::move(base), xo, hooks);
    if (sizes.tp * sizes.pp > 1) {
      // Count every logical parameter once: a tp replica on tp rank 0, a tied copy at its owner.
      std::vector<std::pair<int64_t, int64_t>> counted;
      int64_t offset = 0;
      for (const auto& p : s.params) {
        const int64_t n = p.tensor.numel();
        if (!p.spec.tied_copy && (!p.spec.replicated || s.coords().tp == 0)) {
          if (!counted.empty() && counted.back().second == offset) counted.back().second = offset + n;
          else counted.emplace_back(offset, offset + n);
        }
        offset += n;
      }
      s.optex->estimator().set_counted_ranges(std::move(counted));
    }
  } else {
    s.optimizer = std::move(base);
    // Mixed precision: the optimizer rewrites the model's bf16 weight copies in its update (AdamW and
    // SGD, in the same pass on a GPU), so that the forwards after a step cast nothing
    // (KrakenModel::compute_copy_targets; the loop below vouches for them after each step). OptEx moves
    // the parameters by other ways too: its forwards cast as before.
    s.optimizer_writes_copies = share_compute_copies(*s.model, *s.optimizer);
  }
  s.schedule.kind = optim::parse_schedule_kind(c.optim.schedule);
  s.schedule.max_lr = c.optim.lr;
  s.schedule.min_lr = c.optim.min_lr;
  s.schedule.warmup_steps = c.optim.warmup_steps;
  s.schedule.decay_steps = c.optim.decay_steps > 0 ? c.optim.decay_steps : std::max(c.train.max_steps, c.optim.warmup_steps);
  s.schedule.validate();

  // ---- data: this replica's slice (every stage and tp rank of a replica reads the same batches) ----
  data::LoaderOptions lo;
  lo.batch_size = c.train.batch_size;
  lo.seq_len = c.train.seq_len;
  lo.dp_rank = s.coords().dp;
  lo.dp_size = sizes.dp;
  lo.shuffle = c.data.shuffle;
  lo.seed = c.train.seed;
  lo.format = data::parse_shard_format(c.data.format);
  s.train_loader = std::make_unique<data::DataLoader>(data::expand_patterns(c.data.train), lo);
  if (!c.data.val.empty()) {
    data::LoaderOptions vo = lo;
    vo.shuffle = false;
    s.val_loader = std::make_unique<data::DataLoader>(data::expand_patterns(c.data.val), vo);
  }

  // ---- resume: every rank reads its part of the logical checkpoint ----
  std::string resume_dir;
  if (c.checkpoint.resume == "auto") resume_dir = s.checkpoints.latest();
  else if (c.checkpoint.resume != "none") resume_dir = c.checkpoint.resume;
  if (!resume_dir.empty()) {
    LoadedCheckpoint ckpt = open_checkpoint(resume_dir);
    if (!ckpt.state.contains("config")) KRAKEN_THROW("checkpoint '", resume_dir, "' has no saved config in state.json");
    const Config saved = parse_config(ckpt.state["config"].get<std::string>(), resume_dir + "/state.json[config]", false);
    check_same_model(saved.model, c.model, resume_dir);
    std::vector<LocalTensor> targets;
    for (const auto& p : s.params) targets.push_back({p.name, p.tensor, p.spec});
    load_logical(ckpt.model, targets);
    // Every saved state tensor, cut to this rank's piece like its parameter; the optimizer's own loader
    // then checks that exactly its state names are there, with its shapes.
    // State of parameters that live on other pipeline stages stays in the file.
    std::set<std::string> local_params, all_params;
    for (const auto& p : s.params) local_params.insert(p.name);
    for (const std::string& name : ckpt.model.names()) all_params.insert(name);
    all_params.insert("wte.weight");  // saved once, by its owner, but tied copies keep state too
    auto belongs_elsewhere = [&](const std::string& name) {
      for (size_t dot = name.find('.'); dot != std::string::npos; dot = name.find('.', dot + 1)) {
        const std::string param = name.substr(dot + 1);
        if (all_params.count(param)) return !local_params.count(param);
      }
      return false;
    };
    NamedTensors saved_state;
    for (const std::string& name : ckpt.optimizer.names())
      if (!belongs_elsewhere(name)) saved_state.emplace_back(name, runtime::Tensor());
    NamedTensors loaded;
    for (const LocalTensor& t : with_param_specs(saved_state, s.params)) {
      runtime::Tensor logical = ckpt.optimizer.load(t.name, s.device);
      loaded.emplace_back(t.name, t.spec.shard.sharded() ? runtime::take_shard(logical, t.spec.shard) : logical);
    }
    if (s.optex) s.optex->load_state(join_flat_history(loaded, s.params), ckpt.state.at("optimizer"));
    else s.optimizer->load_state(loaded, ckpt.state.at("optimizer"));
    s.train_loader->restore(ckpt.state.at("loader").get<data::LoaderState>());
    s.dropout_rng.set_state({s.dropout_rng.seed(), s.dropout_rng.stream(), ckpt.state.at("dropout_offset").get<uint64_t>()});
    s.step = ckpt.step();
    s.tokens_seen = ckpt.state.value("tokens_seen", int64_t{0});
    s.train_seconds = ckpt.state.value("train_seconds", 0.0);
  }

  if (s.main_rank) {
    make_directories(c.train.out_dir);
    s.metrics = MetricsWriter(c.train.out_dir + "/metrics.jsonl", /*append=*/s.step > 0, s.step);
  }
}

Trainer::~Trainer() = default;

int64_t Trainer::step() const { return s_->step; }
const Config& Trainer::config() const { return s_->config; }

std::string Trainer::describe() const {
  const State& s = *s_;
  const Config& c = s.config;
  const auto& m = c.model;
  char buf[1024];
  std::string out;
  std::snprintf(buf, sizeof buf, "  model: %lld layers, n_embd %lld, %lld heads, degree %lld, context %lld, vocab %lld (padded %lld)\n",
                (long long)m.n_layer, (long long)m.n_embd, (long long)m.n_head, (long long)m.degree,
                (long long)m.context, (long long)m.vocab_size, (long long)m.padded_vocab());
  out += buf;
  std::snprintf(buf, sizeof buf, "  parameters: %lld (%.2fM)\n", (long long)m.parameter_count(), m.parameter_count() / 1e6);
  out += buf;
  std::snprintf(buf, sizeof buf, "  layout: %s, %lld processes; batch %lld x %lld tokens x %lld micro-batches x dp %lld = %lld tokens/step\n",
                s.mesh->sizes().str().c_str(), (long long)s.mesh->sizes().world(), (long long)c.train.batch_size,
                (long long)c.train.seq_len, (long long)c.train.grad_accum, (long long)c.parallel.dp,
                (long long)c.tokens_per_step());
  out += buf;
  std::snprintf(buf, sizeof buf, "  device %s, %s, %d threads per process, BLAS %s\n", s.device.str().c_str(),
                s.model->compute_dtype() == runtime::DType::BF16 ? "mixed precision (bf16 activations, f32 weights)"
                                                                 : "fp32",
                omp_get_max_threads(), kernels::cpu_blas_name());
  out += buf;
#if KRAKEN_WITH_CUDA
  if (s.device.is_cuda() && s.model->compute_dtype() == runtime::DType::BF16) {
    // Which attention and epilogues the bf16 step takes (kernels/attention.h, runtime/ops.h): the
    // switches' effect, said once, so that a run's numbers can be told apart.
    const kernels::AttentionBf16Kernels kind = kernels::attention_bf16_kernels(m.head_size());
    std::string attention = kernels::attention_bf16_kernels_label(m.head_size());
    const char* choice = std::getenv("KRAKEN_CUDA_ATTENTION");
    if (kind == kernels::AttentionBf16Kernels::kCudnn && (choice == nullptr || *choice == '\0') &&
        c.train.batch_size * c.train.seq_len < kernels::kAttentionCudnnDefaultMinTokens)
      attention = std::string(kernels::attention_bf16_kernels_name(
                      kernels::attention_bf16_kernels_fallback(m.head_size()))) +
                  " (cuDNN takes B·T of " + std::to_string(kernels::kAttentionCudnnDefaultMinTokens) + " or more)";
    std::snprintf(buf, sizeof buf, "  CUDA: attention %s, cuBLASLt epilogues level %d (KRAKEN_CUDA_ATTENTION, "
                  "KRAKEN_CUDA_EPILOGUES)\n", attention.c_str(), static_cast<int>(runtime::ops::epilogue_fusion()));
    out += buf;
    if (c.model.bias) {
      const bool in_norms = models::projection_biases_in_norms() && c.model.dropout == 0.0f;
      std::snprintf(buf, sizeof buf, "  CUDA: the projections' biases added in the %s (KRAKEN_PROJECTION_BIASES)\n",
                    !in_norms                ? "products' epilogues"
                    : c.model.degree == 1 ? "LayerNorms after the residual adds"
                                          : "LayerNorms after plain residual adds (the next layer's LN1), else the "
                                            "products' epilogues");
      out += buf;
    }
  }
#endif
  std::snprintf(buf, sizeof buf, "  optimizer: %s, lr %.3g (%s schedule, %lld warm-up steps), grad clip %.3g\n",
                c.optim.name.c_str(), c.optim.lr, c.optim.schedule.c_str(), (long long)c.optim.warmup_steps, c.optim.grad_clip);
  out += buf;
  if (s.optex) {
    std::snprintf(buf, sizeof buf, "  optex: parallelism %lld over %lld group(s), history %lld pairs, base %s; %.3f GB of history and buffers\n",
                  (long long)c.optim.optex.parallelism, (long long)c.parallel.optex_groups, (long long)c.optim.optex.history,
                  c.optim.optex.base.c_str(), s.optex_bytes / 1e9);
    out += buf;
  }
  out += s.plan.describe();
  if (s.step > 0) {
    std::snprintf(buf, sizeof buf, "  resumed at step %lld\n", (long long)s.step);
    out += buf;
  }
  return out;
}

double Trainer::evaluate(int64_t max_batches) {
  State& s = *s_;
  if (!s.val_loader) KRAKEN_THROW("no validation shards ([data] val) to evaluate on");
  runtime::NoGrad no_grad;
  s.val_loader->reset();
  const int64_t batches = max_batches > 0 ? std::min(max_batches, s.val_loader->batches_per_epoch())
                                          : s.val_loader->batches_per_epoch();
  const runtime::Shape boundary = s.model->boundary_shape(s.config.train.batch_size, s.config.train.seq_len);
  double sum = 0.0, count = 0.0;
  for (int64_t b = 0; b < batches; ++b) {
    data::Batch batch = s.val_loader->next();
    // Forward only, stage by stage: receive the previous stage's activation, send ours on.
    runtime::Tensor input;
    if (!s.first_stage()) {
      input = runtime::Tensor::empty(boundary, s.model->compute_dtype(), s.device);
      s.mesh->pp().recv(input, s.coords().pp - 1, 7);
    }
    runtime::Tensor out = s.model->stage_forward(batch.inputs, input, nullptr, /*training=*/false);
    if (!s.last_stage()) {
      s.mesh->pp().send(out, s.coords().pp + 1, 7);
      continue;
    }
    const runtime::ops::LossSum part =
        runtime::ops::cross_entropy_sum(out, batch.targets, s.config.model.vocab_size, -1);
    sum += part.sum;
    count += static_cast<double>(part.count);
  }
  // The last stage knows the sums; every replica evaluated its own slice of the validation data.
  runtime::Tensor totals = runtime::Tensor::from_vector({static_cast<float>(sum), static_cast<float>(count)}, {2});
  if (s.pp() > 1) s.mesh->pp().all_reduce(totals);  // the other stages contribute zeros
  if (s.mesh->sizes().dp > 1) s.mesh->dp().all_reduce(totals);
  const std::vector<float> t = totals.to_vector();
  return t[1] > 0 ? static_cast<double>(t[0]) / static_cast<double>(t[1]) : 0.0;
}

RunSummary Trainer::run() {
  State& s = *s_;
  const Config& c = s.config;
  const parallel::MeshSizes& sizes = s.mesh->sizes();
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

  const int64_t tokens_per_evaluation = c.tokens_per_step();
  const int64_t evaluations_per_step = s.optex ? c.optim.optex.parallelism : 1;
  // MFU on GPUs the planner knows, as llm.c computes it: its FLOPs per token (6·N + 6·k·L·C·T,
  // KrakenConfig::training_flops_per_token) × tokens/s over the dense bf16 peak of every GPU of the job
  // (as bench/gpu_train_bench.cpp reports it; fp32 runs are measured against the same peak). Not on
  // CPUs, whose peak depends on the machine.
  const double job_peak_flops =
      s.device.is_cpu() ? 0.0 : gpu_peak_flops(runtime::cuda_device_name(s.device.index)) * sizes.world();
  const double flops_per_token = c.model.training_flops_per_token(c.train.seq_len);
  Progress progress(s.step, c.train.max_steps, s.options.progress && s.main_rank, c.train.log_every);
  const auto run_start = Clock::now();
  const int64_t tokens_at_start = s.tokens_seen;
  int64_t run_steps = 0;
  const int64_t A = c.train.grad_accum;
  const float micro_scale = 1.0f / static_cast<float>(A);
  const runtime::Shape boundary = s.model->boundary_shape(c.train.batch_size, c.train.seq_len);

  auto save_checkpoint = [&]() {
    std::vector<LocalTensor> model_tensors;
    for (const auto& p : s.params) model_tensors.push_back({p.name, p.tensor, p.spec});
    CheckpointContents contents;
    contents.model = gather_logical(model_tensors, *s.mesh);
    contents.optimizer = gather_logical(
        with_param_specs(s.optex ? split_flat_history(s.optex->state_tensors(), s.params) : s.optimizer->state_tensors(),
                         s.params),
        *s.mesh);
    if (s.main_rank) {
      contents.state = {{"config", c.text},
                        {"loader", s.train_loader->state()},
                        {"optimizer", s.optex ? s.optex->state_scalars() : s.optimizer->state_scalars()},
                        {"dropout_offset", s.dropout_rng.state().offset},
                        {"layout", sizes.str()},
                        {"tokens_seen", s.tokens_seen},
                        {"train_seconds", s.train_seconds}};
      summary.last_checkpoint = s.checkpoints.save(s.step, contents);
      progress.message("checkpoint: " + summary.last_checkpoint);
    }
    // Nobody starts the next step (or returns) before the checkpoint is on disk.
    s.mesh->group("world").barrier();
  };
  auto run_eval = [&]() {
    const auto t0 = Clock::now();
    const double val = evaluate(c.train.eval_batches);
    summary.val_loss = val;
    s.metrics.write({{"step", s.step},
                     {"val_loss", val},
                     {"val_ppl", std::exp(val)},
                     {"elapsed_s", s.train_seconds},
                     {"tokens_seen", s.tokens_seen},
                     {"eval_seconds", seconds_since(t0)}});
    char line[128];
    std::snprintf(line, sizeof line, "step %lld: val loss %.4f, perplexity %.2f", (long long)s.step, val, std::exp(val));
    progress.message(line);
  };

  // One gradient evaluation at the current parameters: grad_accum micro-batches, synchronised across
  // data-parallel replicas and pipeline stages, clipped. Returns the gradients (the parameters' .grad()).
  double loss_sum = 0.0, grad_norm = 0.0;
  int64_t batches_this_step = 0;  // drawn from the loader in this optimizer step (OptEx groups skip)
  auto next_batch = [&]() {
    batches_this_step += 1;
    return s.train_loader->next();
  };
  // clip_in_place: OptEx keeps the gradients it is given in its history, so they are clipped here;
  // the plain optimizers fold the clipping factor into their update instead (one pass less).
  auto evaluate_gradient = [&](int64_t evaluation, bool clip_in_place) {
    // OptEx groups: evaluation e reads micro-batches [e·A, (e + 1)·A) of this step's stream, exactly as
    // a single process running the N evaluations one after another would.
    while (batches_this_step < evaluation * A) next_batch();
    // (The gradients' big buffers are released rather than zeroed: each one's first contribution of the
    // backward below becomes it. Module::release_grads.)
    s.model->release_grads();
    for (auto& t : s.tied) t.zero_grad();
    std::vector<data::Batch> batches;
    for (int64_t micro = 0; micro < A; ++micro) batches.push_back(next_batch());
    double local_loss = 0.0;
    // (pp = 1) The losses are read after the gradient norm, whose read waits for the backward anyway:
    // loss.item() between a forward and its backward would make the host wait for the GPU there, and
    // leave the GPU idle while the backward is issued; read before the norm, a second wait.
    std::vector<runtime::Tensor> losses;
    if (s.pp() == 1) {
      for (int64_t micro = 0; micro < A; ++micro) {
        if (s.grad_sync) s.grad_sync->set_sync(micro == A - 1);
        // (micro_scale: the loss's gradient in the backward below, for which its forward computes the
        // logits' gradient in the same pass)
        runtime::Tensor loss = s.model->loss(batches[micro].inputs, batches[micro].targets,
                                             &s.dropout_rng, /*training=*/true, micro_scale);
        losses.push_back(loss.detach());
        runtime::backward(runtime::ops::scale(loss, micro_scale));
      }
    } else {
      parallel::PipelineStage stage;
      stage.activation_shape = boundary;
      stage.activation_dtype = s.model->compute_dtype();
      stage.device = s.device;
      stage.forward = [&](int mb, const runtime::Tensor& input) {
        const data::Batch& b = batches[static_cast<size_t>(mb)];
        runtime::Tensor out = s.model->stage_forward(b.inputs, input, &s.dropout_rng);
        if (!s.last_stage()) return out;
        // (run_1f1b seeds each micro-batch's backward with 1/A, micro_scale)
        return runtime::ops::cross_entropy(out, b.targets, c.model.vocab_size, -1, micro_scale);
      };
      stage.before_backward = [&](int mb) {
        if (s.grad_sync) s.grad_sync->set_sync(mb == A - 1);
      };
      const parallel::PipelineResult result = parallel::run_1f1b(s.mesh->pp(), stage, static_cast<int>(A));
      for (float l : result.losses) local_loss += l;
    }
    if (s.grad_sync) s.grad_sync->finish();
    if (!s.tied.empty()) parallel::sync_tied_gradients(s.tied, s.mesh->group("embedding"));

    std::vector<runtime::Tensor> grads, counted;
    for (const auto& p : s.params) {
      // A parameter the backward did not reach has a zero gradient (released, it has none).
      if (!p.tensor.grad().defined())
        runtime::Tensor(p.tensor).set_grad(
            runtime::Tensor::zeros(p.tensor.shape(), p.tensor.dtype(), p.tensor.device()));
      grads.push_back(p.tensor.grad());
      // A replica or tied copy is counted once: on tp rank 0, at its owner.
      if (!p.spec.tied_copy && (!p.spec.replicated || s.coords().tp == 0)) counted.push_back(p.tensor.grad());
    }
    double sq = optim::global_grad_norm_squared(counted);  // (waits for the backward)
    if (losses.size() == 1) {
      local_loss += losses[0].item();
    } else if (!losses.empty()) {  // the micro-batches' losses side by side, then one read (one copy, one wait)
      std::vector<runtime::Tensor> rows;
      for (const runtime::Tensor& loss : losses) rows.push_back(runtime::ops::reshape(loss, {1}));
      for (float l : runtime::ops::concat(rows, 0).to_vector()) local_loss += l;
    }
    // The loss lives on the last stage: sum over stages (the others add 0), average over replicas.
    runtime::Tensor loss_t = runtime::Tensor::from_vector({static_cast<float>(local_loss)}, {1});
    if (s.pp() > 1) s.mesh->pp().all_reduce(loss_t);
    if (sizes.dp > 1) s.mesh->dp().all_reduce(loss_t, parallel::ReduceOp::Average);
    loss_sum += loss_t.item();
    if (sizes.tp * sizes.pp > 1) {
      runtime::Tensor t = runtime::Tensor::from_vector({static_cast<float>(sq)}, {1});
      s.mesh->mp().all_reduce(t);
      sq = t.item();
    }
    grad_norm = std::sqrt(sq);
    if (clip_in_place && c.optim.grad_clip > 0) optim::clip_grad_norm_given(grads, grad_norm, c.optim.grad_clip);
    return grads;
  };

  // The model's bf16 copies are the parameters' current values only between this loop's steps (set
  // after each plain optimizer step, which rewrote them): whatever follows the loop may change the
  // parameters some other way.
  struct CopiesCurrentOnlyInTheLoop {
    models::KrakenModel& model;
    ~CopiesCurrentOnlyInTheLoop() { model.set_compute_copies_current(false); }
  } copies_guard{*s.model};
  while (s.step < c.train.max_steps) {
    const auto t0 = Clock::now();
    const double lr = s.schedule.at(s.step);
    loss_sum = 0.0;
    batches_this_step = 0;
    int64_t evaluations = 0;
    nlohmann::json record;
    if (s.optex) {
      // One sequential iteration: N gradient evaluations (optim/optex.h); with optex_groups = N each
      // group computes one and the exchange gives everyone all N.
      const optim::OptExReport report = s.optex->step(
          [&](int e) {
            evaluations += 1;
            return evaluate_gradient(e, /*clip_in_place=*/true);
          },
          static_cast<float>(lr));
      while (batches_this_step < c.optim.optex.parallelism * A) next_batch();
      record = {{"grad_evals", report.gradient_evaluations},
                {"optex_history", report.history_size},
                {"optex_rel_error", std::isfinite(report.mean_relative_error()) ? nlohmann::json(report.mean_relative_error()) : nlohmann::json()},
                {"optex_cosine", std::isfinite(report.mean_cosine()) ? nlohmann::json(report.mean_cosine()) : nlohmann::json()},
                {"optex_outside_gradients_s", report.seconds_outside_gradients()}};
    } else {
      std::vector<runtime::Tensor> grads = evaluate_gradient(0, /*clip_in_place=*/false);
      evaluations = 1;
      const double clip = c.optim.grad_clip > 0 ? optim::clip_coefficient(grad_norm, c.optim.grad_clip) : 1.0;
      s.optimizer->step(grads, static_cast<float>(lr), static_cast<float>(clip));
      if (s.optimizer_writes_copies) s.model->set_compute_copies_current(true);  // the step rewrote them
    }
    s.step += 1;  // (the next gradient evaluation zeroes the gradients; no second pass over them here)
    run_steps += 1;
    s.tokens_seen += tokens_per_evaluation * evaluations_per_step;
    const double dt = seconds_since(t0);
    s.train_seconds += dt;
    // The mean loss over this step's evaluations; with OptEx groups each rank saw only its own, so
    // average over the groups too.
    double loss = loss_sum / static_cast<double>(A * std::max<int64_t>(evaluations, 1));
    if (s.optex && sizes.ex > 1) {
      runtime::Tensor t = runtime::Tensor::from_vector({static_cast<float>(loss)}, {1});
      s.mesh->ex().all_reduce(t, parallel::ReduceOp::Average);
      loss = t.item();
    }
    summary.losses.push_back(loss);
    if (!std::isfinite(loss)) KRAKEN_THROW("the training loss became ", loss, " at step ", s.step, "; lower optim.lr?");
    const double tokens_per_second = static_cast<double>(tokens_per_evaluation * evaluations_per_step) / dt;
    record.update({{"step", s.step},
                   {"loss", loss},
                   {"lr", lr},
                   {"grad_norm", grad_norm},
                   {"step_seconds", dt},
                   {"elapsed_s", s.train_seconds},
                   {"tokens_per_second", tokens_per_second},
                   {"tokens_seen", s.tokens_seen}});
    const double mfu = job_peak_flops > 0.0 ? flops_per_token * tokens_per_second / job_peak_flops : -1.0;
    if (mfu >= 0.0) record["mfu"] = mfu;
    if (s.plan.active) {
      record["predicted_step_seconds"] = s.plan.step_seconds;
      s.plan.record_step(dt);
    }
    // Communication: how long the collectives ran and how long compute stood waiting for them (the
    // difference ran behind compute). bench/parallel_bench.sh reads these.
    if (s.grad_sync) {
      const parallel::GradSyncStats& g = s.grad_sync->stats();
      record["dp_comm_s"] = g.comm_seconds;
      record["dp_wait_s"] = g.wait_seconds;
      s.grad_sync->reset_stats();
    }
    if (sizes.tp > 1) {
      const parallel::CommStats t = s.mesh->tp().stats();
      record["tp_comm_s"] = t.busy_seconds;
      record["tp_wait_s"] = t.wait_seconds;
      record["tp_ops"] = t.ops;
      s.mesh->tp().reset_stats();
    }
    s.metrics.write(record);
    progress.update(s.step - 1, loss, lr, tokens_per_second, mfu);

    // Stop together: a signal may reach the ranks at different moments.
    bool stop = stop_requested() || (s.options.stop_after_steps >= 0 && run_steps >= s.options.stop_after_steps);
    if (sizes.world() > 1) {
      runtime::Tensor flag = runtime::Tensor::from_vector({stop ? 1.0f : 0.0f}, {1});
      s.mesh->group("world").all_reduce(flag, parallel::ReduceOp::Max);
      stop = flag.item() > 0;
    }
    const bool last = s.step == c.train.max_steps;
    if (s.val_loader && ((c.train.eval_every > 0 && s.step % c.train.eval_every == 0) || last)) run_eval();
    if ((c.checkpoint.every > 0 && s.step % c.checkpoint.every == 0) || last || stop) save_checkpoint();
    if (stop && !last) {
      summary.interrupted = stop_requested();
      break;
    }
  }
  progress.finish();
  if (s.main_rank && s.plan.active && run_steps > 0) std::printf("%s\n", s.plan.summary().c_str());
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
