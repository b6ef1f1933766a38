// TOML → Config. One Section object per [table] hands out typed values, remembers which keys were
// read, and reports the rest as unknown; every message carries file:line and the key.
#include "train/config.h"

#include <toml++/toml.h>

#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

#include "data/shard.h"
#include "kernels/error.h"

namespace kraken::train {
namespace {

std::string render(const toml::node& node) {
  std::ostringstream out;
  if (auto s = node.as_string()) out << '"' << s->get() << '"';
  else if (auto i = node.as_integer()) out << i->get();
  else if (auto f = node.as_floating_point()) out << f->get();
  else if (auto b = node.as_boolean()) out << (b->get() ? "true" : "false");
  else if (node.is_array()) out << "[...]";
  else if (node.is_table()) out << "{...}";
  return out.str();
}

class Section {
 public:
  Section(const toml::table* table, std::string name, const std::string& file, int header_line)
      : table_(table), name_(std::move(name)), file_(file), header_line_(header_line) {}

  bool present() const { return table_ != nullptr; }

  [[noreturn]] void fail(const std::string& key, const std::string& why) const {
    const toml::node* node = table_ ? table_->get(key) : nullptr;
    const int line = node ? static_cast<int>(node->source().begin.line) : header_line_;
    if (node) KRAKEN_THROW(file_, ":", line, ": [", name_, "] ", key, " = ", render(*node), ": ", why);
    KRAKEN_THROW(file_, ":", line, ": [", name_, "] ", key, ": ", why);
  }

  int64_t integer(const std::string& key, int64_t fallback, int64_t lo, int64_t hi) {
    const toml::node* node = find(key);
    if (!node) return fallback;
    auto v = node->as_integer();
    if (!v) fail(key, "expected an integer");
    if (v->get() < lo || v->get() > hi) fail(key, range_text(lo, hi));
    return v->get();
  }

  double real(const std::string& key, double fallback, double lo, double hi) {
    const toml::node* node = find(key);
    if (!node) return fallback;
    double value;
    if (auto f = node->as_floating_point()) value = f->get();
    else if (auto i = node->as_integer()) value = static_cast<double>(i->get());
    else fail(key, "expected a number");
    if (!(value >= lo && value <= hi) || !std::isfinite(value)) fail(key, real_range_text(lo, hi));
    return value;
  }

  bool boolean(const std::string& key, bool fallback) {
    const toml::node* node = find(key);
    if (!node) return fallback;
    auto v = node->as_boolean();
    if (!v) fail(key, "expected true or false");
    return v->get();
  }

  std::string string(const std::string& key, const std::string& fallback, const std::set<std::string>& allowed = {}) {
    const toml::node* node = find(key);
    if (!node) return fallback;
    auto v = node->as_string();
    if (!v) fail(key, "expected a string");
    if (!allowed.empty() && !allowed.count(v->get())) {
      std::string list;
      for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + ("\"" + a + "\"");
      fail(key, "expected one of " + list);
    }
    return v->get();
  }

  // A string or an array of strings.
  std::vector<std::string> strings(const std::string& key) {
    const toml::node* node = find(key);
    if (!node) return {};
    if (auto s = node->as_string()) return {s->get()};
    auto arr = node->as_array();
    if (!arr) fail(key, "expected a string or an array of strings");
    std::vector<std::string> out;
    for (const toml::node& item : *arr) {
      auto s = item.as_string();
      if (!s) fail(key, "expected an array of strings");
      out.push_back(s->get());
    }
    return out;
  }

  std::vector<int64_t> integers(const std::string& key) {
    const toml::node* node = find(key);
    if (!node) return {};
    auto arr = node->as_array();
    if (!arr) fail(key, "expected an array of integers");
    std::vector<int64_t> out;
    for (const toml::node& item : *arr) {
      auto i = item.as_integer();
      if (!i) fail(key, "expected an array of integers");
      out.push_back(i->get());
    }
    return out;
  }

  // Every key of the table must have been read (sub-tables named in `subtables` are allowed).
  void reject_unknown(const std::set<std::string>& subtables = {}) const {
    if (!table_) return;
    for (auto&& [key, node] : *table_) {
      const std::string k(key.str());
      if (read_.count(k) || subtables.count(k)) continue;
      std::string known;
      for (const auto& r : expected_) known += (known.empty() ? "" : ", ") + r;
      KRAKEN_THROW(file_, ":", key.source().begin.line, ": [", name_, "] unknown key '", k, "' (known keys: ", known, ")");
    }
  }

 private:
  const toml::node* find(const std::string& key) {
    expected_.insert(key);
    read_.insert(key);
    return table_ ? table_->get(key) : nullptr;
  }
  static std::string range_text(int64_t lo, int64_t hi) {
    std::ostringstream out;
    if (hi == INT64_MAX) out << "expected an integer >= " << lo;
    else out << "expected an integer in [" << lo << ", " << hi << "]";
    return out.str();
  }
  static std::string real_range_text(double lo, double hi) {
    std::ostringstream out;
    if (hi >= 1e300) out << "expected a finite number >= " << lo;
    else out << "expected a number in [" << lo << ", " << hi << "]";
    return out.str();
  }

  const toml::table* table_;
  std::string name_;
  std::string file_;
  int header_line_;
  std::set<std::string> read_;
  std::set<std::string> expected_;
};

constexpr int64_t kBig = INT64_MAX;
constexpr double kHuge = 1e308;

Section section(const toml::table& root, const std::string& key, const std::string& file) {
  const toml::node* node = root.get(key);
  if (node && !node->is_table())
    KRAKEN_THROW(file, ":", node->source().begin.line, ": '", key, "' must be a table ([", key, "])");
  const toml::table* table = node ? node->as_table() : nullptr;
  return Section(table, key, file, table ? static_cast<int>(table->source().begin.line) : 1);
}

}  // namespace

std::string Config::checkpoint_dir() const {
  return checkpoint.dir.empty() ? train.out_dir + "/checkpoints" : checkpoint.dir;
}

int64_t Config::tokens_per_step() const { return train.batch_size * train.seq_len * train.grad_accum * parallel.dp; }

runtime::DType compute_dtype(const TrainConfig& train, const runtime::Device& device) {
  if (train.precision == "bf16") return runtime::DType::BF16;
  if (train.precision == "fp32") return runtime::DType::F32;
  return device.is_cuda() ? runtime::DType::BF16 : runtime::DType::F32;
}

Config parse_config(const std::string& text, const std::string& name, bool check_files) {
  toml::table root;
  try {
    root = toml::parse(text, name);
  } catch (const toml::parse_error& e) {
    KRAKEN_THROW(name, ":", e.source().begin.line, ":", e.source().begin.column, ": TOML syntax error: ", e.description());
  }
  for (auto&& [key, node] : root) {
    static const std::set<std::string> kTables = {"model", "data", "train", "optim", "checkpoint", "parallel"};
    if (!kTables.count(std::string(key.str())))
      KRAKEN_THROW(name, ":", key.source().begin.line, ": unknown table or key '", key.str(),
                   "' (known tables: [model], [data], [train], [optim], [optim.optex], [checkpoint], [parallel])");
  }
  Config c;
  c.path = name;
  c.text = text;

  // ---- [model] ----
  Section model = section(root, "model", name);
  if (!model.present()) KRAKEN_THROW(name, ": the [model] table is missing");
  auto& m = c.model;
  m.n_layer = model.integer("n_layer", m.n_layer, 1, 4096);
  m.n_embd = model.integer("n_embd", m.n_embd, 1, 1 << 20);
  m.n_head = model.integer("n_head", m.n_head, 1, 1 << 16);
  m.degree = model.integer("degree", m.degree, 1, 1024);
  m.context = model.integer("context", m.context, 1, 1 << 24);
  m.vocab_size = model.integer("vocab_size", m.vocab_size, 1, 65536);
  m.mlp_expansion = model.integer("mlp_expansion", m.degree == 1 ? 4 : 2, 1, 64);
  m.bias = model.boolean("bias", m.degree == 1);
  m.dropout = static_cast<float>(model.real("dropout", 0.0, 0.0, 0.999));
  model.reject_unknown();
  if (m.n_head % m.degree != 0)
    model.fail("degree", "n_head = " + std::to_string(m.n_head) + " is not divisible by degree = " +
                             std::to_string(m.degree) + " (every sub-layer needs n_head / degree heads)");
  if (m.n_embd % m.heads_per_sublayer() != 0)
    model.fail("n_embd", "not divisible by the " + std::to_string(m.heads_per_sublayer()) +
                             " heads of a sub-layer (n_head / degree)");

  // ---- [data] ----
  Section data_table = section(root, "data", name);
  c.data.train = data_table.strings("train");
  c.data.val = data_table.strings("val");
  c.data.format = data_table.string("format", "auto", {"auto", "llmc", "raw"});
  c.data.shuffle = data_table.boolean("shuffle", true);
  data_table.reject_unknown();
  if (c.data.train.empty()) data_table.fail("train", "the training shards are required (a glob pattern or a list of them)");

  // ---- [train] ----
  Section train = section(root, "train", name);
  auto& t = c.train;
  t.device = train.string("device", "cpu");
  if (!(t.device == "cpu" || t.device == "cuda")) train.fail("device", "expected \"cpu\" or \"cuda\"");
  t.precision = train.string("precision", "auto");
  if (!(t.precision == "auto" || t.precision == "fp32" || t.precision == "bf16"))
    train.fail("precision", "expected \"auto\", \"fp32\" or \"bf16\"");
  t.seed = static_cast<uint64_t>(train.integer("seed", 1337, 0, kBig));
  t.batch_size = train.integer("batch_size", t.batch_size, 1, 1 << 20);
  t.seq_len = train.integer("seq_len", std::min<int64_t>(m.context, 256), 1, 1 << 24);
  t.grad_accum = train.integer("grad_accum", 1, 1, 1 << 20);
  t.max_steps = train.integer("max_steps", t.max_steps, 0, kBig);
  t.eval_every = train.integer("eval_every", 0, 0, kBig);
  t.eval_batches = train.integer("eval_batches", 20, 0, kBig);
  t.log_every = train.integer("log_every", 1, 1, kBig);
  t.threads = static_cast<int>(train.integer("threads", 0, 0, 1024));
  t.out_dir = train.string("out_dir", "runs/default");
  train.reject_unknown();
  if (t.seq_len > m.context)
    train.fail("seq_len", "longer than the model's context (model.context = " + std::to_string(m.context) + ")");
  if (t.out_dir.empty()) train.fail("out_dir", "must not be empty");

  // ---- [optim] and [optim.optex] ----
  Section optim = section(root, "optim", name);
  auto& o = c.optim;
  o.name = optim.string("name", "adamw", {"adamw", "sgd", "optex"});
  o.lr = optim.real("lr", o.lr, 0.0, 1e3);
  o.min_lr = optim.real("min_lr", o.lr / 10, 0.0, 1e3);
  o.warmup_steps = optim.integer("warmup_steps", 0, 0, kBig);
  o.decay_steps = optim.integer("decay_steps", 0, 0, kBig);
  o.schedule = optim.string("schedule", "cosine", {"cosine", "linear", "constant"});
  o.weight_decay = optim.real("weight_decay", o.weight_decay, 0.0, 1e3);
  o.beta1 = optim.real("beta1", o.beta1, 0.0, 0.999999);
  o.beta2 = optim.real("beta2", o.beta2, 0.0, 0.999999999);
  o.eps = optim.real("eps", o.eps, 1e-30, 1.0);
  o.momentum = optim.real("momentum", o.momentum, 0.0, 0.999999);
  o.nesterov = optim.boolean("nesterov", false);
  o.grad_clip = optim.real("grad_clip", o.grad_clip, 0.0, kHuge);
  if (o.min_lr > o.lr) optim.fail("min_lr", "must not exceed lr");
  if (o.nesterov && o.momentum == 0.0) optim.fail("nesterov", "needs momentum > 0");

  const toml::node* optex_node = optim.present() ? root["optim"].as_table()->get("optex") : nullptr;
  if (optex_node && !optex_node->is_table())
    KRAKEN_THROW(name, ":", optex_node->source().begin.line, ": [optim] optex must be a table ([optim.optex])");
  Section optex(optex_node ? optex_node->as_table() : nullptr, "optim.optex", name,
                optex_node ? static_cast<int>(optex_node->source().begin.line) : 1);
  auto& x = o.optex;
  x.parallelism = optex.integer("parallelism", x.parallelism, 1, 1024);
  x.history = optex.integer("history", x.history, 2, 100000);
  x.lengthscale = optex.real("lengthscale", x.lengthscale, 1e-12, kHuge);
  x.noise = optex.real("noise", x.noise, 0.0, kHuge);
  x.normalize_inputs = optex.boolean("normalize_inputs", true);
  x.effective_dim = optex.integer("effective_dim", 0, 0, kBig);
  x.base = optex.string("base", "adamw", {"adamw", "sgd"});
  x.max_history_gb = optex.real("max_history_gb", 0.0, 0.0, kHuge);
  optex.reject_unknown();
  optim.reject_unknown({"optex"});
  if (optex_node && o.name != "optex")
    KRAKEN_THROW(name, ":", optex_node->source().begin.line, ": [optim.optex] is set but [optim] name = \"", o.name,
                 "\"; set name = \"optex\" to use it");
  if (o.name == "optex" && x.noise == 0.0)
    optex.fail("noise", "must be > 0: it keeps the kernel matrix invertible");

  // ---- [checkpoint] ----
  Section ckpt = section(root, "checkpoint", name);
  c.checkpoint.every = ckpt.integer("every", 0, 0, kBig);
  c.checkpoint.keep = ckpt.integer("keep", 3, 1, kBig);
  c.checkpoint.dir = ckpt.string("dir", "");
  c.checkpoint.resume = ckpt.string("resume", "auto");
  ckpt.reject_unknown();

  // ---- [parallel] ----
  Section par = section(root, "parallel", name);
  auto& p = c.parallel;
  p.dp = par.integer("dp", 1, 1, 1 << 20);
  p.tp = par.integer("tp", 1, 1, 1 << 20);
  p.pp = par.integer("pp", 1, 1, 1 << 20);
  p.optex_groups = par.integer("optex_groups", 1, 1, 1 << 20);
  p.layers_per_stage = par.integers("layers_per_stage");
  p.bucket_mb = par.real("bucket_mb", 25.0, 0.001, 1e6);
  p.plan = par.string("plan", "manual", {"manual", "auto"});
  p.cluster = par.string("cluster", "");
  p.global_batch = par.integer("global_batch", 0, 1, 1 << 30);
  p.profile = par.strings("profile");
  par.reject_unknown();
  if (m.degree > 1 && m.degree % p.tp != 0)
    par.fail("tp", "must divide model.degree = " + std::to_string(m.degree) + " (each tp rank owns whole sub-layers)");
  if (m.degree == 1 && m.n_head % p.tp != 0)
    par.fail("tp", "must divide model.n_head = " + std::to_string(m.n_head) + " (Megatron-style tp splits heads)");
  if (p.pp > m.n_layer) par.fail("pp", "more pipeline stages than layers (model.n_layer = " + std::to_string(m.n_layer) + ")");
  if (!p.layers_per_stage.empty()) {
    if (static_cast<int64_t>(p.layers_per_stage.size()) != p.pp)
      par.fail("layers_per_stage", "needs one entry per pipeline stage (pp = " + std::to_string(p.pp) + ")");
    int64_t total = 0;
    for (int64_t n : p.layers_per_stage) {
      if (n < 1) par.fail("layers_per_stage", "every stage needs at least one layer");
      total += n;
    }
    if (total != m.n_layer)
      par.fail("layers_per_stage", "adds up to " + std::to_string(total) + ", but model.n_layer = " + std::to_string(m.n_layer));
  }
  if (p.plan == "manual" && !p.cluster.empty()) par.fail("cluster", "is only used with plan = \"auto\"");
  if (p.plan == "manual" && p.global_batch > 0) par.fail("global_batch", "is only used with plan = \"auto\"");
  if (p.plan == "manual" && !p.profile.empty()) par.fail("profile", "is only used with plan = \"auto\"");
  if (p.plan == "auto") {
    // The planner chooses the layout: a value here would be silently replaced.
    const toml::table* written = root["parallel"].as_table();
    if (written->contains("optex_groups"))
      par.fail("optex_groups", "the planner plans one dp × tp × pp job, not OptEx evaluation groups; use "
                               "plan = \"manual\" for optex_groups");
    for (const char* key : {"dp", "tp", "pp", "layers_per_stage"})
      if (written->contains(key))
        par.fail(key, "is chosen by the planner with plan = \"auto\"; remove it (the global batch is "
                      "[parallel] global_batch, default [train] batch_size · grad_accum)");
  }
  if (p.optex_groups > 1 && o.name != "optex") par.fail("optex_groups", "needs [optim] name = \"optex\"");
  if (p.optex_groups > 1 && o.optex.parallelism != p.optex_groups)
    par.fail("optex_groups", "must equal [optim.optex] parallelism = " + std::to_string(o.optex.parallelism) +
                                 " (one evaluation group per parallel evaluation)");
  if (p.pp > 1 && t.grad_accum < p.pp)
    train.fail("grad_accum", "a pipeline of " + std::to_string(p.pp) +
                                 " stages needs at least that many micro-batches per step (grad_accum >= pp)");

  if (check_files) {
    // Missing shards are a config error: name the key and its line, not only the pattern.
    for (const char* key : {"train", "val"}) {
      const auto& patterns = std::string(key) == "train" ? c.data.train : c.data.val;
      if (patterns.empty()) continue;
      try {
        data::expand_patterns(patterns);
      } catch (const Error& e) {
        data_table.fail(key, e.what());
      }
    }
  }
  return c;
}

Config load_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) KRAKEN_THROW("cannot open config file '", path, "'");
  std::ostringstream text;
  text << in.rdbuf();
  return parse_config(text.str(), path, true);
}

}  // namespace kraken::train
