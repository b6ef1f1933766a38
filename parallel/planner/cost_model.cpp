// The `amp` and `kraken` cost models (cost_model.h states both in full).
#include "parallel/planner/cost_model.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <tuple>

#include "kernels/error.h"

namespace kraken::parallel::planner {
namespace {

// Gradients are all-reduced in buckets of this size as the backward produces them (PyTorch DDP's
// default, 25 MiB): each bucket can start once its layers' gradients exist.
constexpr double kBucketBytes = 25.0 * 1024 * 1024;

struct Link {
  double bandwidth = kInfinity;  // bytes/s
  double latency = 0;            // seconds per message
};

Link slower(const Link& a, const Link& b) { return {std::min(a.bandwidth, b.bandwidth), std::max(a.latency, b.latency)}; }

// Ring all-reduce of `bytes` over n ranks: a reduce-scatter and an all-gather, each n − 1 steps that
// move bytes/n over the slowest link, so 2(n − 1)/n · bytes / bw + 2(n − 1) · latency.
double allreduce_seconds(int n, double bytes, const Link& link) {
  if (n <= 1) return 0;
  return 2.0 * (n - 1) / n * bytes / link.bandwidth + 2.0 * (n - 1) * link.latency;
}

struct Location {
  int group = 0;
  int node = 0;  // unique over the cluster
};

// Ranks → devices: group by group in `order`, node by node inside a group.
class RankMap {
 public:
  RankMap(const Cluster& cluster, const std::vector<int>& order) : cluster_(cluster), order_(order) {
    int rank = 0, node = 0;
    for (int g : order) {
      start_rank_.push_back(rank);
      start_node_.push_back(node);
      rank += cluster.groups[g].devices();
      node += cluster.groups[g].nodes;
    }
  }
  Location locate(int rank) const {
    size_t i = start_rank_.size() - 1;
    while (start_rank_[i] > rank) --i;
    const NodeGroup& g = cluster_.groups[order_[i]];
    return {order_[i], start_node_[i] + (rank - start_rank_[i]) / g.devices_per_node};
  }
  Link link(int rank_a, int rank_b) const {
    const Location a = locate(rank_a), b = locate(rank_b);
    const NodeGroup& ga = cluster_.groups[a.group];
    if (a.node == b.node) return {ga.intra_bandwidth, ga.intra_latency};
    const NodeGroup& gb = cluster_.groups[b.group];
    return {std::min(ga.inter_bandwidth, gb.inter_bandwidth), std::max(ga.inter_latency, gb.inter_latency)};
  }

 private:
  const Cluster& cluster_;
  std::vector<int> order_;
  std::vector<int> start_rank_, start_node_;
};

// The slowest link of the ring first, first + stride, …, first + (n − 1)·stride (and back to first).
Link ring_link(const RankMap& map, int first, int stride, int n) {
  Link slowest;
  if (n <= 1) return slowest;
  for (int i = 0; i < n; ++i) slowest = slower(slowest, map.link(first + i * stride, first + ((i + 1) % n) * stride));
  return slowest;
}

struct StageInfo {
  std::vector<int> groups;         // node groups, in rank order
  std::vector<int> types;          // device types present (indices into cluster.device_types), sorted
  int activation_bytes = 2;        // the widest training dtype among them
  double capacity = kInfinity;     // the smallest device memory
  Link tp_link, dp_link, p2p_link;  // the slowest tp ring, dp ring, and link to the next stage
  double amp_p2p_bandwidth = kInfinity;  // AMP: per dp replica the slowest tp lane, averaged
};

}  // namespace

CostModelKind parse_cost_model(const std::string& name) {
  if (name == "amp") return CostModelKind::Amp;
  if (name == "kraken") return CostModelKind::Kraken;
  KRAKEN_THROW("cost model '", name, "': expected \"amp\" or \"kraken\"");
}

const char* cost_model_name(CostModelKind kind) { return kind == CostModelKind::Amp ? "amp" : "kraken"; }

struct Layout::Impl {
  CostModelKind kind = CostModelKind::Kraken;
  const Cluster* cluster = nullptr;
  const ModelDesc* model = nullptr;
  Strategy strategy;
  std::vector<StageInfo> stages;
  std::vector<std::string> class_device;            // per class: its slowest device type (for output)
  std::vector<std::vector<double>> class_compute;   // per class, per layer: forward + backward seconds
  std::vector<std::vector<double>> class_tp;        // per class, per layer: exposed tp seconds
  PipelineProblem problem;

  void validate();
  void place();
  void cost_layers(const std::vector<Profile>& profiles);
};

void Layout::Impl::validate() {
  const Strategy& s = strategy;
  const ModelConfig& c = model->config;
  const int devices = cluster->total_devices();
  if (s.tp <= 0 || s.dp <= 0 || s.pp <= 0 || s.micro_batch <= 0 || s.accumulation <= 0)
    KRAKEN_THROW("strategy: tp, dp, pp, micro_batch and accumulation must be positive (tp=", s.tp, " dp=", s.dp,
                 " pp=", s.pp, " micro_batch=", s.micro_batch, " accumulation=", s.accumulation, ")");
  if (int64_t(s.tp) * s.dp * s.pp != devices)
    KRAKEN_THROW("strategy: tp·dp·pp = ", s.tp, "·", s.dp, "·", s.pp, " = ", int64_t(s.tp) * s.dp * s.pp,
                 " but the cluster has ", devices, " devices");
  for (const NodeGroup& g : cluster->groups)
    if (g.devices_per_node % s.tp != 0)
      KRAKEN_THROW("strategy: tp = ", s.tp, " must divide the ", g.devices_per_node, " devices per node of group '",
                   g.name, "' (a tp group stays inside a node)");
  if (c.degree > 1 ? c.degree % s.tp != 0 : c.n_head % s.tp != 0)
    KRAKEN_THROW("strategy: tp = ", s.tp, " must divide ",
                 c.degree > 1 ? "the degree (" + std::to_string(c.degree) : "n_head (" + std::to_string(c.n_head),
                 ")");
  if (int64_t(s.dp) * s.micro_batch * s.accumulation != c.global_batch)
    KRAKEN_THROW("strategy: dp·micro_batch·accumulation = ", s.dp, "·", s.micro_batch, "·", s.accumulation, " = ",
                 int64_t(s.dp) * s.micro_batch * s.accumulation, " but the global batch is ", c.global_batch);
  if (s.pp > int(model->layers.size()))
    KRAKEN_THROW("strategy: pp = ", s.pp, " stages for ", model->layers.size(), " layers");
  const RunLimits& limits = model->limits;
  if (limits.stage_needs_transformer_layer && s.pp > c.n_layer)
    KRAKEN_THROW("strategy: pp = ", s.pp, " stages, but every stage needs one of the ", c.n_layer, " transformer layers");
  if (limits.accumulation_covers_pipeline && s.pp > 1 && s.accumulation < s.pp)
    KRAKEN_THROW("strategy: ", s.accumulation, " micro-batches per step cannot fill a pipeline of ", s.pp,
                 " stages (the runner needs accumulation >= pp)");
  if (limits.data_parallel_only && (s.tp > 1 || s.pp > 1))
    KRAKEN_THROW("strategy: tp = ", s.tp, ", pp = ", s.pp, ": the runner supports data parallelism only here");
  std::vector<int> order = s.group_order;
  if (order.empty())
    for (int g = 0; g < int(cluster->groups.size()); ++g) order.push_back(g);
  std::vector<int> sorted = order;
  std::sort(sorted.begin(), sorted.end());
  bool permutation = sorted.size() == cluster->groups.size();
  for (int g = 0; permutation && g < int(sorted.size()); ++g) permutation = sorted[g] == g;
  if (!permutation)
    KRAKEN_THROW("strategy: group_order must name every node group once (", cluster->groups.size(), " groups)");
  strategy.group_order = order;
}

void Layout::Impl::place() {
  const Strategy& s = strategy;
  const RankMap map(*cluster, s.group_order);
  const int per_stage = s.tp * s.dp;
  stages.resize(s.pp);
  for (int j = 0; j < s.pp; ++j) {
    StageInfo& st = stages[j];
    const int base = j * per_stage;
    int previous_group = -1;
    for (int r = base; r < base + per_stage; ++r) {
      const Location loc = map.locate(r);
      if (loc.group == previous_group) continue;  // ranks of one group are contiguous
      previous_group = loc.group;
      const NodeGroup& g = cluster->groups[loc.group];
      st.groups.push_back(loc.group);
      st.capacity = std::min(st.capacity, g.memory_per_device);
      const DeviceType& type = cluster->device_of(g);
      const int t = int(&type - cluster->device_types.data());
      if (std::find(st.types.begin(), st.types.end(), t) == st.types.end()) st.types.push_back(t);
    }
    std::sort(st.types.begin(), st.types.end());
    st.activation_bytes = 0;
    for (int t : st.types)
      st.activation_bytes = std::max(st.activation_bytes, model->activation_bytes(cluster->device_types[t]));
    for (int d = 0; d < s.dp; ++d) st.tp_link = slower(st.tp_link, ring_link(map, base + d * s.tp, 1, s.tp));
    for (int t = 0; t < s.tp; ++t) st.dp_link = slower(st.dp_link, ring_link(map, base + t, s.tp, s.dp));
    if (j + 1 < s.pp) {
      double bandwidth_sum = 0;
      for (int d = 0; d < s.dp; ++d) {
        double lane_min = kInfinity;
        for (int t = 0; t < s.tp; ++t) {
          const int r = base + t + d * s.tp;
          const Link l = map.link(r, r + per_stage);
          st.p2p_link = slower(st.p2p_link, l);
          lane_min = std::min(lane_min, l.bandwidth);
        }
        bandwidth_sum += lane_min;
      }
      st.amp_p2p_bandwidth = bandwidth_sum / s.dp;
    }
  }
}

void Layout::Impl::cost_layers(const std::vector<Profile>& profiles) {
  const Strategy& s = strategy;
  const ModelDesc& m = *model;
  const int L = int(m.layers.size());
  const double tokens = double(s.micro_batch) * m.config.sequence();
  PipelineProblem& p = problem;
  p.layers = L;
  p.stages = s.pp;
  p.micro_batches = s.accumulation;
  p.stage_class.assign(s.pp, 0);
  if (m.limits.stage_needs_transformer_layer) {
    // A stage may start at any transformer layer but the first (the embedding stays with it) and at
    // the LM head never (it stays with the last transformer layer).
    p.cut_allowed.assign(L + 1, 1);
    for (int i = 0; i < L; ++i)
      if (m.layers[i].kind != LayerKind::KrakenLayer || (i > 0 && m.layers[i - 1].kind == LayerKind::Embedding))
        p.cut_allowed[i] = 0;
  }

  if (kind == CostModelKind::Amp) {
    // One list for every stage: each device type's layer times weighted by its share of the devices.
    std::vector<double> e(L, 0.0);
    const double n = cluster->total_devices();
    for (const NodeGroup& g : cluster->groups) {
      const DeviceType& type = cluster->device_of(g);
      for (int i = 0; i < L; ++i)
        e[i] += g.devices() / n * layer_seconds(m, m.layers[i], type, profiles, s.tp, s.micro_batch);
    }
    class_compute = {e};
    class_tp = {std::vector<double>(L, 0.0)};
    class_device = {"average"};
    p.class_time = {e};
    // a = mbs·T·C fp32 elements over a link AMP measures in fp32 elements per second.
    const double a_bytes = 4.0 * tokens * m.config.n_embd;
    p.boundary.assign(std::max(0, s.pp - 1), std::vector<double>(L, 0.0));
    for (int j = 0; j + 1 < s.pp; ++j)
      for (int i = 0; i < L; ++i) p.boundary[j][i] = a_bytes / stages[j].amp_p2p_bandwidth;
    p.memory_limited = false;
    return;
  }

  // Bytes per parameter: weights, gradients (and, under dp, the all-reduce's gradient copies), states.
  const double state_bytes = m.state_bytes_per_param() + (s.dp > 1 ? m.dp_gradient_buffers * m.bytes_per_grad : 0);
  // Kraken: one cost list per distinct (device types, tp link) among the stages.
  std::map<std::tuple<std::vector<int>, double, double>, int> classes;
  for (int j = 0; j < s.pp; ++j) {
    const StageInfo& st = stages[j];
    const auto key = std::make_tuple(st.types, st.tp_link.bandwidth, st.tp_link.latency);
    auto it = classes.find(key);
    if (it != classes.end()) {
      p.stage_class[j] = it->second;
      continue;
    }
    const int cls = int(class_compute.size());
    classes.emplace(key, cls);
    p.stage_class[j] = cls;
    std::vector<double> compute(L, 0.0), tp(L, 0.0);
    double slowest_total = -1;
    std::string slowest;
    for (int t : st.types) {
      const DeviceType& type = cluster->device_types[t];
      double total = 0;
      for (int i = 0; i < L; ++i) {
        const double e = layer_seconds(m, m.layers[i], type, profiles, s.tp, s.micro_batch);
        compute[i] = std::max(compute[i], e);  // every replica waits for the slowest
        total += e;
      }
      if (total > slowest_total) {
        slowest_total = total;
        slowest = type.name;
      }
    }
    if (s.tp > 1) {
      const double ar = allreduce_seconds(s.tp, tokens * m.config.n_embd * st.activation_bytes, st.tp_link);
      for (int i = 0; i < L; ++i) {
        const LayerDesc& layer = m.layers[i];
        double exposed = (layer.tp_allreduce_forward + layer.tp_allreduce_backward) * ar;
        if (layer.tp_allreduce_overlaps_attention) {
          // The forward is a third of forward + backward; attention its FLOP share of the forward.
          const double attention = compute[i] / 3.0 * layer.attention_flops_per_token / layer.flops_per_token;
          exposed += std::max(0.0, ar - attention) + std::max(0.0, ar - 2.0 * attention);
        }
        tp[i] = exposed;
      }
    }
    std::vector<double> time(L), stat(L), act(L);
    for (int i = 0; i < L; ++i) {
      time[i] = compute[i] + tp[i];
      stat[i] = m.layers[i].params_per_rank(s.tp) * state_bytes;
      act[i] = m.layers[i].activation_per_rank(s.tp) * tokens * st.activation_bytes;
    }
    class_compute.push_back(compute);
    class_tp.push_back(tp);
    class_device.push_back(slowest);
    p.class_time.push_back(time);
    p.class_static.push_back(stat);
    p.class_activation.push_back(act);
    p.class_tied_static.push_back(m.tied_params_per_rank(s.tp) * state_bytes);
  }
  p.boundary.assign(std::max(0, s.pp - 1), std::vector<double>(L, 0.0));
  for (int j = 0; j + 1 < s.pp; ++j) {
    const int bytes_per_element = std::max(stages[j].activation_bytes, stages[j + 1].activation_bytes);
    const Link& link = stages[j].p2p_link;
    for (int i = 0; i < L; ++i) {
      const double bytes = m.layers[i].boundary_per_rank(s.tp) * tokens * bytes_per_element;
      p.boundary[j][i] = 2.0 * (link.latency + bytes / link.bandwidth);  // activation forward, gradient back
    }
  }
  p.memory_limited = true;
  p.in_flight.resize(s.pp);
  p.capacity.resize(s.pp);
  for (int j = 0; j < s.pp; ++j) {
    p.in_flight[j] = std::min(s.pp - j, s.accumulation);
    p.capacity[j] = stages[j].capacity;
  }
}

Layout::Layout(CostModelKind kind, const Cluster& cluster, const ModelDesc& model, const std::vector<Profile>& profiles,
               const Strategy& strategy)
    : impl_(std::make_unique<Impl>()) {
  impl_->kind = kind;
  impl_->cluster = &cluster;
  impl_->model = &model;
  impl_->strategy = strategy;
  impl_->strategy.stage_begin.clear();
  impl_->validate();
  impl_->place();
  impl_->cost_layers(profiles);
}

Layout::~Layout() = default;
Layout::Layout(Layout&&) noexcept = default;
Layout& Layout::operator=(Layout&&) noexcept = default;

const PipelineProblem& Layout::problem() const { return impl_->problem; }

Prediction Layout::evaluate(const std::vector<int>& split) const {
  const Impl& im = *impl_;
  const Strategy& s = im.strategy;
  const ModelDesc& m = *im.model;
  const PipelineProblem& p = im.problem;
  const int L = p.layers;
  if (int(split.size()) != s.pp + 1 || split.front() != 0 || split.back() != L)
    KRAKEN_THROW("strategy: stage_begin must have pp + 1 = ", s.pp + 1, " entries from 0 to ", L);
  for (int j = 0; j < s.pp; ++j)
    if (split[j + 1] <= split[j]) KRAKEN_THROW("strategy: stage ", j, " holds no layers (stage_begin must increase)");
  for (int j = 1; j < s.pp; ++j)
    if (!p.cut_allowed.empty() && !p.cut_allowed[split[j]])
      KRAKEN_THROW("strategy: stage ", j, " starts at layer ", split[j],
                   ", but every stage must hold a transformer layer (the embedding and the LM head cannot stand alone)");

  const double tokens = double(s.micro_batch) * m.config.sequence();
  const int B = s.accumulation;
  Prediction pred;
  pred.stages.resize(s.pp);
  double max_time = -1, sum_time = 0;
  int bottleneck = 0;
  std::vector<double> stage_params(s.pp, 0.0);  // per rank
  for (int j = 0; j < s.pp; ++j) {
    StagePrediction& sp = pred.stages[j];
    const StageInfo& st = im.stages[j];
    const int cls = p.stage_class[j];
    sp.first_layer = split[j];
    sp.end_layer = split[j + 1];
    sp.groups = st.groups;
    // AMP has no per-stage speed: name the device type of the stage's first group.
    sp.device_type = im.kind == CostModelKind::Amp ? im.cluster->device_of(im.cluster->groups[st.groups.front()]).name
                                                    : im.class_device[cls];
    double params = 0, released = 0, activation = 0;
    for (int i = split[j]; i < split[j + 1]; ++i) {
      sp.compute += im.class_compute[cls][i];
      sp.tp_comm += im.class_tp[cls][i];
      params += m.layers[i].params_per_rank(s.tp);
      if (m.released_gradient_min_elements > 0)
        released += m.layers[i].params_in_tensors_of_at_least(s.tp, m.released_gradient_min_elements);
      activation += m.layers[i].activation_per_rank(s.tp) * tokens * st.activation_bytes +
                    m.layers[i].compute_copy_per_rank(s.tp) * m.bytes_per_compute_copy;
    }
    if (split[j] == 0 && split[j + 1] == L) params -= m.tied_params_per_rank(s.tp);  // wte stored once
    stage_params[j] = params;
    if (j + 1 < s.pp) {
      const double boundary = p.boundary[j][split[j + 1] - 1];
      sp.p2p = im.kind == CostModelKind::Kraken ? boundary / 2 : boundary;
      pred.pp_comm += boundary;
    }
    sp.in_flight = std::min(s.pp - j, B);
    sp.memory.weights = params * m.bytes_per_param;
    // Released gradients (ModelDesc::released_gradient_min_elements) are absent at the peak only with one
    // micro-batch, one stage and no data parallelism.
    const bool released_at_peak = s.dp == 1 && s.pp == 1 && B == 1;
    sp.memory.gradients =
        (params - (released_at_peak ? released : 0)) * m.bytes_per_grad * (1 + (s.dp > 1 ? m.dp_gradient_buffers : 0));
    sp.memory.optimizer = params * (m.bytes_per_optimizer_state * m.optimizer_states + m.master_bytes());
    sp.memory.activations = activation * sp.in_flight;
    sp.memory_capacity = st.capacity;
    pred.memory_per_device = std::max(pred.memory_per_device, sp.memory.total());
    if (sp.memory.total() > st.capacity) pred.fits = false;

    if (s.dp > 1) {
      if (im.kind == CostModelKind::Amp) {
        // P_j as AMP counts it, in fp32 elements.
        const ModelConfig& c = m.config;
        double amp_params = 0;
        bool holds_embedding_or_head = false;
        for (int i = split[j]; i < split[j + 1]; ++i) {
          if (m.layers[i].kind == LayerKind::KrakenLayer)
            amp_params += (4.0 + 2.0 * c.mlp_expansion) * c.degree * c.n_embd * double(c.n_embd) / s.tp;
          else
            holds_embedding_or_head = true;
        }
        if (holds_embedding_or_head) amp_params += double(c.n_embd) * m.vocab_padded / s.tp;
        sp.dp_allreduce = 2.0 * (s.dp - 1) / s.dp * amp_params * 4.0 / st.dp_link.bandwidth;
        sp.dp_exposed = sp.dp_allreduce;
      } else {
        const double bytes = params * m.bytes_per_grad;
        const double buckets = std::max(1.0, std::ceil(bytes / kBucketBytes));
        sp.dp_allreduce = 2.0 * (s.dp - 1) / s.dp * bytes / st.dp_link.bandwidth +
                          2.0 * (s.dp - 1) * st.dp_link.latency * buckets;
      }
    }
    const double t = sp.time();
    sum_time += t;
    if (t > max_time) {
      max_time = t;
      bottleneck = j;
    }
  }

  if (im.kind == CostModelKind::Amp) {
    for (const StagePrediction& sp : pred.stages) pred.dp_comm = std::max(pred.dp_comm, sp.dp_exposed);
  } else if (s.dp > 1) {
    // Buckets are all-reduced while the last micro-batch's backward runs: with n buckets of equal size
    // (comm a = A/n, compute c = t_b/n each, bucket i ready at i·c), the all-reduces end
    // max(A/n, A − t_b·(n − 1)/n) after the backward does. Stage j's last backward also ends
    // Σ_{i<j} (t_b,i + p2p_i) before stage 0's, which ends the pipeline.
    double slack = 0;
    for (int j = 0; j < s.pp; ++j) {
      StagePrediction& sp = pred.stages[j];
      const double buckets = std::max(1.0, std::ceil(stage_params[j] * m.bytes_per_grad / kBucketBytes));
      const double backward = 2.0 / 3.0 * sp.time();
      sp.dp_exposed = std::max(sp.dp_allreduce / buckets, sp.dp_allreduce - backward * (buckets - 1) / buckets);
      pred.dp_comm = std::max(pred.dp_comm, sp.dp_exposed - slack);
      slack += backward + sp.p2p;
    }
  }

  const StagePrediction& b = pred.stages[bottleneck];
  pred.compute = B * b.compute;
  pred.tp_comm = B * b.tp_comm;
  pred.bubble = sum_time - max_time;
  const double pipeline = (B - 1) * max_time + sum_time + pred.pp_comm;
  pred.step_time = pipeline + pred.dp_comm;
  return pred;
}

Prediction predict(CostModelKind kind, const Cluster& cluster, const ModelDesc& model,
                   const std::vector<Profile>& profiles, const Strategy& strategy) {
  const Layout layout(kind, cluster, model, profiles, strategy);
  return layout.evaluate(strategy.stage_begin);
}

}  // namespace kraken::parallel::planner
