// The cluster (device table, TOML reader) and the model's layer list.
#include "parallel/planner/description.h"

#include <cmath>

#include "kernels/error.h"
#include "parallel/planner/toml_reader.h"

namespace kraken::parallel::planner {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// Efficiencies of the analytic layer-time model on GPUs. Well-tuned GPT training reaches 40–55% of
// bf16 peak end to end (PaLM reports 46% MFU, Megatron-LM 52% on A100 at 175B); a single layer's
// forward + backward without the optimizer and the pipeline sits at the top of that range, hence 0.5.
// Memory-bound kernels (LayerNorm, GELU, softmax) reach about 70–80% of HBM bandwidth.
constexpr double kGpuComputeEfficiency = 0.5;
constexpr double kGpuMemoryEfficiency = 0.7;

}  // namespace

const std::vector<DeviceType>& builtin_device_types() {
  // Peaks are dense (no 2:4 sparsity) tensor-core throughput in the training dtype, from NVIDIA's
  // datasheets: H100 SXM5 989 TFLOP/s bf16, 3.35 TB/s HBM3; H200 SXM 989 TFLOP/s, 4.8 TB/s, 141 GB
  // (nvidia-smi shows 140 GiB); A100 SXM 312 TFLOP/s bf16 with 1,555 GB/s (40 GB) or 2,039 GB/s
  // (80 GB); V100 SXM2 125 TFLOP/s fp16 tensor, 900 GB/s, 16 GB (the AWS p3 instances AMP used; set
  // memory_gib = 32 for the 32 GB part); T4 65 TFLOP/s fp16, 320 GB/s, 16 GB.
  //
  // cpu-2core is one rank on this project's 2-core AMD EPYC (Zen 4) machine, where each of two MPI
  // ranks gets one core: 100 GFLOP/s is OpenBLAS's single-thread fp32 sgemm measured here (94–101
  // GFLOP/s for n = 512…2048), 23 GB/s a single-thread memcpy counting bytes read plus written. Both
  // are attained rates, so the memory efficiency is 1; the compute efficiency of 0.5 says a whole
  // layer (small matrices, LayerNorm, softmax, GELU) reaches about half of sgemm's best rate. The
  // machine has 23.5 GiB shared by both ranks and other work: 8 GiB per rank.
  static const std::vector<DeviceType> table = {
      {"H100", 989.4e12, 3.35e12, 80 * kGiB, 2, kGpuComputeEfficiency, kGpuMemoryEfficiency},
      {"H200", 989.4e12, 4.8e12, 140 * kGiB, 2, kGpuComputeEfficiency, kGpuMemoryEfficiency},
      {"A100-40", 312e12, 1.555e12, 40 * kGiB, 2, kGpuComputeEfficiency, kGpuMemoryEfficiency},
      {"A100-80", 312e12, 2.039e12, 80 * kGiB, 2, kGpuComputeEfficiency, kGpuMemoryEfficiency},
      {"V100", 125e12, 0.9e12, 16 * kGiB, 2, kGpuComputeEfficiency, kGpuMemoryEfficiency},
      {"T4", 65e12, 0.32e12, 16 * kGiB, 2, kGpuComputeEfficiency, kGpuMemoryEfficiency},
      {"cpu-2core", 100e9, 23e9, 8 * kGiB, 4, 0.5, 1.0},
  };
  return table;
}

// ---- cluster -----------------------------------------------------------------------------------

int Cluster::total_devices() const {
  int n = 0;
  for (const NodeGroup& g : groups) n += g.devices();
  return n;
}

const DeviceType& Cluster::device(const std::string& name) const {
  for (const DeviceType& d : device_types)
    if (d.name == name) return d;
  std::string known;
  for (const DeviceType& d : device_types) known += (known.empty() ? "" : ", ") + d.name;
  KRAKEN_THROW("unknown device type '", name, "' (known: ", known, ")");
}

const DeviceType& Cluster::device_of(const NodeGroup& group) const { return device(group.device_type); }

namespace {

void read_device_type(const toml::table& table, const std::string& source, int index, Cluster& cluster) {
  detail::TableReader r(table, source, "device_type[" + std::to_string(index) + "]");
  r.allow_only({"name", "peak_tflops", "memory_bandwidth_gb_per_s", "memory_gib", "activation_bytes",
                "compute_efficiency", "memory_efficiency"});
  const std::string name = r.string("name");
  DeviceType* existing = nullptr;
  for (DeviceType& d : cluster.device_types)
    if (d.name == name) existing = &d;
  DeviceType fresh;
  fresh.name = name;
  fresh.activation_bytes = 2;
  fresh.compute_efficiency = kGpuComputeEfficiency;
  fresh.memory_efficiency = kGpuMemoryEfficiency;
  // A known name overrides only the fields given; a new one needs the three that have no default.
  DeviceType& d = existing ? *existing : fresh;
  if (!existing || r.has("peak_tflops")) d.peak_flops = r.positive_number("peak_tflops") * 1e12;
  if (!existing || r.has("memory_bandwidth_gb_per_s"))
    d.memory_bandwidth = r.positive_number("memory_bandwidth_gb_per_s") * 1e9;
  if (!existing || r.has("memory_gib")) d.memory_bytes = r.positive_number("memory_gib") * kGiB;
  if (r.has("activation_bytes")) {
    const int64_t b = r.integer("activation_bytes");
    if (b != 2 && b != 4) r.fail("activation_bytes", "expected 2 (bf16/fp16) or 4 (fp32), got " + std::to_string(b));
    d.activation_bytes = static_cast<int>(b);
  }
  for (const char* key : {"compute_efficiency", "memory_efficiency"}) {
    if (!r.has(key)) continue;
    const double e = r.number(key);
    if (!(e > 0 && e <= 1)) r.fail(key, "expected a fraction in (0, 1], got " + std::to_string(e));
    (std::string(key) == "compute_efficiency" ? d.compute_efficiency : d.memory_efficiency) = e;
  }
  if (!existing) cluster.device_types.push_back(fresh);
}

NodeGroup read_group(const toml::table& table, const std::string& source, int index, const Cluster& cluster,
                     bool single_node) {
  detail::TableReader r(table, source, "group[" + std::to_string(index) + "]");
  r.allow_only({"name", "nodes", "devices_per_node", "device", "memory_gib", "intra_node_gb_per_s",
                "intra_node_latency_us", "inter_node_gb_per_s", "inter_node_latency_us"});
  NodeGroup g;
  g.name = r.string("name");
  g.nodes = static_cast<int>(r.positive_integer("nodes"));
  g.devices_per_node = static_cast<int>(r.positive_integer("devices_per_node"));
  g.device_type = r.string("device");
  const DeviceType* type = nullptr;
  for (const DeviceType& d : cluster.device_types)
    if (d.name == g.device_type) type = &d;
  if (!type) {
    std::string known;
    for (const DeviceType& d : cluster.device_types) known += (known.empty() ? "" : ", ") + d.name;
    r.fail("device", "unknown device type '" + g.device_type + "'; expected one of " + known +
                         " or a [[device_type]] defined in this file");
  }
  g.memory_per_device = r.has("memory_gib") ? r.positive_number("memory_gib") * kGiB : type->memory_bytes;
  g.intra_bandwidth = r.positive_number("intra_node_gb_per_s") * 1e9;
  g.intra_latency = r.non_negative_number("intra_node_latency_us") * 1e-6;
  // Links between nodes only matter when there is more than one node in the cluster.
  if (single_node && !r.has("inter_node_gb_per_s")) {
    g.inter_bandwidth = g.intra_bandwidth;
    g.inter_latency = g.intra_latency;
    if (r.has("inter_node_latency_us")) g.inter_latency = r.non_negative_number("inter_node_latency_us") * 1e-6;
  } else {
    g.inter_bandwidth = r.positive_number("inter_node_gb_per_s") * 1e9;
    g.inter_latency = r.non_negative_number("inter_node_latency_us") * 1e-6;
  }
  return g;
}

}  // namespace

Cluster parse_cluster(const std::string& text, const std::string& source) {
  const toml::table root = detail::parse_toml(text, source);
  detail::TableReader r(root, source, "");
  r.allow_only({"name", "device_type", "group"});
  Cluster cluster;
  cluster.name = r.string_or("name", source);
  cluster.device_types = builtin_device_types();

  if (const toml::node* types = root.get("device_type")) {
    const toml::array* arr = types->as_array();
    if (!arr || !arr->is_array_of_tables()) r.fail("device_type", "expected [[device_type]] tables");
    for (size_t i = 0; i < arr->size(); ++i) read_device_type(*arr->get(i)->as_table(), source, int(i), cluster);
  }

  const toml::node* groups = root.get("group");
  if (!groups) detail::fail_at(source, 1, "group", "missing; expected at least one [[group]] of nodes");
  const toml::array* arr = groups->as_array();
  if (!arr || !arr->is_array_of_tables() || arr->empty())
    r.fail("group", "expected one or more [[group]] tables");
  // Count nodes first: a one-node cluster needs no inter-node link.
  int64_t node_count = 0;
  for (size_t i = 0; i < arr->size(); ++i) {
    const toml::node* n = arr->get(i)->as_table()->get("nodes");
    node_count += (n && n->is_integer()) ? *n->value<int64_t>() : 2;
  }
  for (size_t i = 0; i < arr->size(); ++i) {
    NodeGroup g = read_group(*arr->get(i)->as_table(), source, int(i), cluster, node_count == 1);
    for (const NodeGroup& other : cluster.groups)
      if (other.name == g.name)
        detail::fail_at(source, static_cast<int>(arr->get(i)->source().begin.line),
                        "group[" + std::to_string(i) + "].name", "duplicate group name '" + g.name + "'");
    cluster.groups.push_back(g);
  }
  return cluster;
}

Cluster load_cluster(const std::string& path) { return parse_cluster(detail::read_text_file(path, "cluster"), path); }

// ---- model -------------------------------------------------------------------------------------

const char* layer_kind_name(LayerKind kind) {
  switch (kind) {
    case LayerKind::Embedding: return "embedding";
    case LayerKind::KrakenLayer: return "kraken_layer";
    case LayerKind::LmHead: return "lm_head";
  }
  return "?";
}

double LayerDesc::params_in_tensors_of_at_least(int tp, double min_elements) const {
  double n = 0;
  for (double t : tensors_sharded)
    if (t / tp >= min_elements) n += t / tp;
  for (double t : tensors_distributed)
    if (t >= min_elements) n += t / tp;
  for (double t : tensors_replicated)
    if (t >= min_elements) n += t;
  return n;
}

double ModelDesc::total_params() const {
  double n = -tied_params_split - tied_params_replicated;
  for (const LayerDesc& l : layers) n += l.params();
  return n;
}

ModelDesc make_model_desc(const ModelConfig& c) {
  auto require = [](bool ok, const auto&... what) {
    if (!ok) KRAKEN_THROW("model: ", what...);
  };
  require(c.n_layer > 0, "n_layer must be positive, got ", c.n_layer);
  require(c.n_embd > 0, "n_embd must be positive, got ", c.n_embd);
  require(c.n_head > 0, "n_head must be positive, got ", c.n_head);
  require(c.degree > 0, "degree must be positive, got ", c.degree);
  require(c.n_head % c.degree == 0, "n_head (", c.n_head, ") must be divisible by degree (", c.degree, ")");
  const int heads_per_split = c.n_head / c.degree;
  require(c.n_embd % heads_per_split == 0, "n_embd (", c.n_embd, ") must be divisible by the heads of a sub-layer (",
          heads_per_split, ")");
  require(c.mlp_expansion > 0, "mlp_expansion must be positive, got ", c.mlp_expansion);
  require(c.context > 0, "context must be positive, got ", c.context);
  require(c.seq_len >= 0 && c.seq_len <= c.context, "seq_len must be in [0, context = ", c.context, "], got ",
          c.seq_len);
  require(c.vocab_size > 0, "vocab_size must be positive, got ", c.vocab_size);
  require(c.global_batch > 0, "the global batch must be positive, got ", c.global_batch);

  ModelDesc m;
  m.config = c;
  m.vocab_padded = (c.vocab_size + 63) / 64 * 64;
  // T is the trained sequence length (attention cost, activations); wpe keeps `context` rows.
  const double C = c.n_embd, e = c.mlp_expansion, k = c.degree, T = c.sequence(), H = c.n_head, V = m.vocab_padded;
  const double b = c.bias ? 1 : 0;
  const bool vp = c.vocab_parallel;

  // Embedding: x0 = wte[idx] + wpe[pos]. Vocab-parallel: each rank looks up its rows of wte and one
  // all-reduce sums the partial results. Otherwise wte is replicated and the lookup is whole on every
  // rank; Kraken's tp then sums dL/dx0 over the ranks' streams (copy_to_tp: one all-reduce backward).
  // wpe is replicated either way.
  LayerDesc emb;
  emb.kind = LayerKind::Embedding;
  (vp ? emb.params_split : emb.params_replicated) = V * C;
  emb.params_replicated += double(c.context) * C;
  (vp ? emb.tensors_sharded : emb.tensors_replicated).push_back(V * C);  // wte
  emb.tensors_replicated.push_back(double(c.context) * C);            // wpe
  emb.boundary_replicated = C;           // x0 (B, T, C): every sub-layer of layer 0 reads it
  emb.traffic_replicated = 3 * C;        // read a wte row and a wpe row, write x0
  emb.tp_allreduce_forward = vp ? 1 : 0;
  emb.tp_allreduce_backward = !vp && c.degree > 1 ? 1 : 0;
  m.layers.push_back(emb);

  // A Kraken layer: k full-width GPT-2 blocks (sub-layers) with H/k heads each (kraken.md). Degree 1 is
  // exactly GPT-2 with Megatron-style tp.
  // Per sub-layer and token, forward FLOPs (2 per multiply-add): c_attn 6C², attn c_proj 2C², c_fc
  // 2eC², mlp c_proj 2eC², and QKᵀ plus AV 4TC (PaLM's accounting, no causal discount — twice what our
  // causal kernels compute, which skip the masked half: a GPT-2 layer's analytic time is ~10% high at
  // T = 1024; profiled times are measured). Attention is what runs before LN2: 8C² + 4TC.
  const double attention_flops = 8 * C * C + 4 * T * C;
  const double sublayer_flops = attention_flops + 4 * e * C * C;
  // Parameters per sub-layer: ln_1 and ln_2 (C each, +C bias), c_attn 3C² (+3C), c_proj C² (+C),
  // c_fc eC² (+eC), mlp c_proj eC² (+C).
  const double sublayer_params = (4 + 2 * e) * C * C + 2 * C + b * (2 * C + 3 * C + C + e * C + C);
  // Saved for backward per sub-layer and token, as our runtime's ops keep them: LN1 input and output
  // (2C) and its mean/rstd (2), q, k, v (3C), the attention output (C, also c_proj's input) and its
  // per-head log-sum-exp (H/k: the backward recomputes the probabilities, no T×T matrix is kept), LN2
  // input and output (2C) and mean/rstd (2), GELU input and output (2eC).
  const double replicated_act = 4 * C + 4;  // the LayerNorm inputs/outputs and statistics
  const double split_act = (4 + 2 * e) * C + H / k;
  for (int l = 0; l < c.n_layer; ++l) {
    LayerDesc layer;
    layer.kind = LayerKind::KrakenLayer;
    layer.index = l;
    layer.flops_per_token = k * sublayer_flops;
    layer.attention_flops_per_token = k * attention_flops;
    // The products' weights and biases (what a forward copies: LayerDesc::compute_copy_*).
    const double product_params = (4 + 2 * e) * C * C + b * (3 * C + C + e * C + C);
    // Each sub-layer's tensors, as the model registers them: ln_1, c_attn, attn c_proj, ln_2, c_fc, mlp
    // c_proj (weights, then the biases where the model has them).
    const std::vector<double> matrices = {3 * C * C, C * C, e * C * C, e * C * C}, gains = {C, C};
    const std::vector<double> split_biases = {3 * C, e * C}, proj_biases = {C, C};
    if (c.degree > 1) {
      // tp | k: a rank owns k/tp whole sub-layers, so everything divides.
      for (int i = 0; i < c.degree; ++i) {
        for (double t : matrices) layer.tensors_distributed.push_back(t);
        for (double t : gains) layer.tensors_distributed.push_back(t);
        if (c.bias) {
          for (double t : split_biases) layer.tensors_distributed.push_back(t);
          for (double t : proj_biases) layer.tensors_distributed.push_back(t);
          for (double t : gains) layer.tensors_distributed.push_back(t);  // the LayerNorms' biases
        }
      }
      layer.params_split = k * sublayer_params;
      layer.compute_copy_split = k * product_params;
      layer.activation_split = k * (split_act + replicated_act);
      layer.boundary_split = k * C;  // the k sub-layer streams x_i (B, T, C); a rank sends its own
      // Layer l ≥ 1 needs S = Σ_j x_j of layer l−1: one all-reduce per direction that runs behind this
      // layer's attention (forward) and attention backward. Layer 0 reads x0 and mixes nothing.
      layer.tp_allreduce_overlaps_attention = l > 0;
    } else {
      // Megatron: c_attn and c_fc column-parallel (weights and biases split), both c_proj row-parallel
      // (weights split, biases replicated); LayerNorms replicated. Two all-reduces on the critical path
      // in each direction: after each row-parallel c_proj forward, at each column-parallel input backward.
      layer.params_split = (4 + 2 * e) * C * C + b * (3 * C + e * C);
      layer.params_replicated = sublayer_params - layer.params_split;
      layer.tensors_sharded = matrices;
      layer.tensors_replicated = gains;
      if (c.bias) {
        for (double t : split_biases) layer.tensors_sharded.push_back(t);
        for (double t : proj_biases) layer.tensors_replicated.push_back(t);
        for (double t : gains) layer.tensors_replicated.push_back(t);
      }
      layer.compute_copy_split = layer.params_split;
      layer.compute_copy_replicated = b * 2 * C;  // the two c_proj biases
      layer.activation_split = split_act;
      layer.activation_replicated = replicated_act;
      layer.boundary_replicated = C;
      layer.tp_allreduce_forward = 2;
      layer.tp_allreduce_backward = 2;
    }
    // The forward writes every saved tensor once and reads it once more as the next op's input.
    layer.traffic_split = 2 * layer.activation_split;
    layer.traffic_replicated = 2 * layer.activation_replicated;
    m.layers.push_back(layer);
  }

  // LM head + loss: (degree > 1) the row-parallel conjunction kC → C and its all-reduce, then LN_f, the
  // logits with the tied wte, softmax cross-entropy. Vocab-parallel: each rank computes its columns of
  // the logits and the logits' input gradient is an all-reduce over the vocab shards in the backward;
  // otherwise every rank computes all of them.
  // Kept per token: the cross-entropy's forward writes the logits' gradient (Vp) while the logits (Vp)
  // are alive, and keeps the gradient and the log-sum-exp (1) until backward (the logits go once the
  // forward returns). Both count like saved activations because the stage holding the head has exactly
  // one micro-batch in flight (1F1B's last stage runs each backward right after its forward). LN_f keeps
  // its input, output and statistics (2C + 2).
  LayerDesc head;
  head.kind = LayerKind::LmHead;
  (vp ? head.params_split : head.params_replicated) = V * C;  // the tied wte copy (stored once with the embedding)
  head.params_replicated += C + b * C;  // ln_f
  // (The tied wte's tensor is the embedding's: listed there. A stage holding the head alone holds a copy,
  // but pp > 1 releases nothing at the peak anyway.)
  head.tensors_replicated.push_back(C);
  if (c.bias) head.tensors_replicated.push_back(C);
  (vp ? head.flops_per_token : head.flops_replicated_per_token) = 2 * C * V;
  (vp ? head.activation_split : head.activation_replicated) = V;
  head.activation_replicated += 2 * C + 2 + 1;  // LN_f input, output, statistics; the log-sum-exp
  head.tp_allreduce_backward = vp ? 1 : 0;
  if (c.degree > 1) {
    head.params_split += k * C * C;
    head.params_replicated += b * C;  // conjunction bias, added after the all-reduce
    head.tensors_sharded.push_back(k * C * C);
    if (c.bias) head.tensors_replicated.push_back(C);
    head.flops_per_token += 2 * k * C * C;
    head.activation_split += k * C;   // concat_i(x_i), the conjunction's input
    head.tp_allreduce_forward = 1;
  }
  head.traffic_split = 2 * head.activation_split;
  head.traffic_replicated = 2 * head.activation_replicated;
  (vp ? head.activation_split : head.activation_replicated) += V;  // the logits' gradient (not forward traffic)
  m.layers.push_back(head);
  (vp ? m.tied_params_split : m.tied_params_replicated) = V * C;
  return m;
}

}  // namespace kraken::parallel::planner
