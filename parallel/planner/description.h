// What the planner plans for: the cluster, the model as a list of layers, and measured layer times.
//
// Everything here is plain data with no dependency on the runtime, so it can be built from files
// (cluster and profile TOML, the training config) or by hand in tests. Units are SI throughout:
// bytes, seconds, bytes/s, FLOP/s. Files use friendlier units (GiB, GB/s, µs, TFLOP/s) and the readers
// convert; parallel/planner/README.md documents both file formats.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kraken::parallel::planner {

// ---- cluster -----------------------------------------------------------------------------------

// A kind of accelerator (or CPU rank). Peak and bandwidth are the datasheet numbers; the analytic
// layer-time model multiplies them by the efficiencies.
struct DeviceType {
  std::string name;
  double peak_flops = 0;           // dense FLOP/s in the training dtype (bf16/fp16 on GPUs, fp32 on CPU)
  double memory_bandwidth = 0;     // bytes/s
  double memory_bytes = 0;         // default memory per device; a node group may override it
  int activation_bytes = 2;        // bytes per activation element in the training dtype
  double compute_efficiency = 0;   // fraction of peak a transformer layer reaches (analytic model)
  double memory_efficiency = 0;    // fraction of memory bandwidth reached by memory-bound kernels
};

// The built-in table (H100, H200, A100-40, A100-80, V100, T4, cpu-2core); sources in description.cpp.
const std::vector<DeviceType>& builtin_device_types();

// Nodes of one kind: same device type, count, memory and links.
struct NodeGroup {
  std::string name;
  int nodes = 1;
  int devices_per_node = 1;
  std::string device_type;
  double memory_per_device = 0;    // bytes the training may use on one device
  double intra_bandwidth = 0;      // bytes/s one device sends to a peer in the same node, one direction
  double intra_latency = 0;        // seconds per message inside the node
  double inter_bandwidth = 0;      // bytes/s one device sends to a device in another node (its NIC share)
  double inter_latency = 0;        // seconds per message between nodes
  int devices() const { return nodes * devices_per_node; }
};

struct Cluster {
  std::string name;
  std::vector<DeviceType> device_types;  // the built-in table, extended or overridden by the file
  std::vector<NodeGroup> groups;         // in file order
  int total_devices() const;
  // The device type a group uses; throws kraken::Error naming the type when it is not in the table.
  const DeviceType& device_of(const NodeGroup& group) const;
  const DeviceType& device(const std::string& name) const;
};

// Parses a cluster description. `source` names the text in messages (a path); errors say
// "<source>:<line>: <key>: expected ..., got ...", and unknown keys are errors.
Cluster parse_cluster(const std::string& text, const std::string& source);
Cluster load_cluster(const std::string& path);

// ---- model -------------------------------------------------------------------------------------

enum class LayerKind { Embedding, KrakenLayer, LmHead };
const char* layer_kind_name(LayerKind kind);  // "embedding", "kraken_layer", "lm_head"

// The training-config values the planner needs.
struct ModelConfig {
  int n_layer = 12;
  int n_embd = 768;
  int n_head = 12;
  int degree = 1;
  int mlp_expansion = 4;
  int context = 1024;
  int vocab_size = 50257;
  bool bias = true;
  int64_t global_batch = 8;  // sequences per optimizer step, over all data-parallel ranks
  int seq_len = 0;           // tokens per training sequence (0: context); wpe has `context` rows
  // The embedding and the LM head split over the tp ranks by vocabulary (Megatron-LM's vocab-parallel
  // layers). false: every tp rank holds wte whole and computes the logits whole, as models::KrakenModel
  // does today (train::model_desc_of sets it so).
  bool vocab_parallel = true;
  int sequence() const { return seq_len > 0 ? seq_len : context; }
};

// What the program that runs a plan can do, so that the search returns only strategies it can run.
// The defaults allow everything the cost models describe (AMP's layer list can be cut anywhere);
// train::model_desc_of sets kraken-train's limits.
struct RunLimits {
  bool stage_needs_transformer_layer = false;  // no stage of only the embedding or only the LM head
  bool accumulation_covers_pipeline = false;   // pp > 1 needs at least pp micro-batches per step (1F1B)
  bool data_parallel_only = false;             // tp = pp = 1 (kraken-train with dropout or OptEx)
};

// One entry of the layer list. Quantities come in a part that tensor parallelism divides across the
// tp ranks (`_split`) and a part every tp rank holds whole (`_replicated`); per rank at degree tp the
// amount is split / tp + replicated. Activation and boundary sizes are elements per token (multiply
// by micro-batch · context · bytes per activation).
struct LayerDesc {
  LayerKind kind = LayerKind::KrakenLayer;
  int index = 0;                       // the transformer layer number l (Kraken layers), else 0
  double params_split = 0, params_replicated = 0;
  double flops_per_token = 0;          // forward, all tp ranks together (×3 for forward + backward)
  double flops_replicated_per_token = 0;  // forward, what every tp rank computes whole (a replicated head)
  double attention_flops_per_token = 0;  // forward, the part before LN2 (what the all-reduce hides behind)
  double activation_split = 0, activation_replicated = 0;  // saved for backward, elements per token
  double boundary_split = 0, boundary_replicated = 0;      // output sent to the next stage, per token
  double traffic_split = 0, traffic_replicated = 0;        // memory traffic of the forward, per token
  // Parameters of which each forward makes a copy that lives until its backward (the products' weights
  // and biases, cast to the compute dtype or stacked for the grouped products): per micro-batch in
  // flight, ModelDesc::bytes_per_compute_copy each.
  double compute_copy_split = 0, compute_copy_replicated = 0;
  // Tensor-parallel all-reduces of one (micro-batch, T, C) tensor per micro-batch when tp > 1:
  int tp_allreduce_forward = 0;        // on the critical path in the forward
  int tp_allreduce_backward = 0;       // on the critical path in the backward
  bool tp_allreduce_overlaps_attention = false;  // Kraken: one per direction, behind the attention
  double params() const { return params_split + params_replicated; }
  double params_per_rank(int tp) const { return params_split / tp + params_replicated; }
  double flops_per_rank(int tp) const { return flops_per_token / tp + flops_replicated_per_token; }
  double activation_per_rank(int tp) const { return activation_split / tp + activation_replicated; }
  double boundary_per_rank(int tp) const { return boundary_split / tp + boundary_replicated; }
  double traffic_per_rank(int tp) const { return traffic_split / tp + traffic_replicated; }
  double compute_copy_per_rank(int tp) const { return compute_copy_split / tp + compute_copy_replicated; }
  // The elements of each parameter tensor, whole, for the gradients released between steps
  // (ModelDesc::released_gradient_min_elements): sharded ones a rank holds 1/tp of (Megatron's splits),
  // distributed ones a rank holds 1/tp of whole (Kraken's sub-layers), replicated ones every rank holds.
  std::vector<double> tensors_sharded, tensors_distributed, tensors_replicated;
  // Parameters per rank in tensors of at least min_elements elements on that rank.
  double params_in_tensors_of_at_least(int tp, double min_elements) const;
};

struct ModelDesc {
  ModelConfig config;
  int vocab_padded = 0;           // vocab_size rounded up to a multiple of 64
  // Bytes per parameter of the weights, the gradients and each optimizer state. Kraken keeps fp32
  // weights (they are the master copy) and fp32 gradients; AdamW holds two fp32 states. A 16-bit
  // weight copy would need an fp32 master as well: master_bytes() says how much.
  int bytes_per_param = 4;
  int bytes_per_grad = 4;
  int bytes_per_optimizer_state = 4;
  int optimizer_states = 2;
  // 0: the device type's training dtype decides (fp32 on CPU, bf16/fp16 on GPUs).
  int bytes_per_activation = 0;
  // Extra fp32 gradient copies a data-parallel rank keeps for the all-reduce (kraken-train's GradSync
  // packs every gradient into flat bucket buffers: 1). Counted only when dp > 1.
  int dp_gradient_buffers = 0;
  // kraken-train releases each gradient buffer of at least this many elements between steps instead of
  // zeroing it (runtime::Module::release_grads; 0: none is released). Only a data-parallel bucket's views
  // are kept whatever their size. With one micro-batch a step, one stage and no data parallelism, those
  // gradients do not exist at the step's peak, the forward's end: the backward makes them as it frees
  // the activations. Otherwise an earlier micro-batch's backward made them before a later forward's
  // peak, and every gradient counts.
  double released_gradient_min_elements = 0;
  // Bytes of each LayerDesc::compute_copy parameter's per-forward copy (0: the forward computes from the
  // parameters themselves). kraken-train: 2 under mixed precision on a GPU (the bf16 casts), 4 on the
  // CPU's bf16 emulation (the widened copies) and for fp32 Kraken layers of degree > 1 (the stacks).
  int bytes_per_compute_copy = 0;
  std::vector<LayerDesc> layers;  // embedding, n_layer Kraken layers, LM head + loss
  // The LM head's weight is the embedding's (tied); a stage holding both stores it once.
  double tied_params_split = 0, tied_params_replicated = 0;
  RunLimits limits;

  double tied_params_per_rank(int tp) const { return tied_params_split / tp + tied_params_replicated; }

  int master_bytes() const { return bytes_per_param < 4 ? 4 : 0; }
  // Weights, gradients, optimizer states and master copy, per parameter.
  double state_bytes_per_param() const {
    return bytes_per_param + bytes_per_grad + bytes_per_optimizer_state * optimizer_states + master_bytes();
  }
  int activation_bytes(const DeviceType& device) const {
    return bytes_per_activation > 0 ? bytes_per_activation : device.activation_bytes;
  }
  double total_params() const;  // every parameter once (the tied weight counted once)
};

// Validates the config (positive sizes, n_head divisible by degree, n_embd by the heads of a
// sub-layer) and derives the layer list. A Kraken training config becomes a ModelDesc through
// train::model_desc_of (train/plan.h), which reads the validated train::Config.
ModelDesc make_model_desc(const ModelConfig& config);

// ---- measured layer times ----------------------------------------------------------------------

// Forward + backward seconds of one micro-batch through one layer kind on one rank, tensor-parallel
// communication excluded (the rank computes its tp share: k/tp sub-layers, or 1/tp of the matrices).
struct ProfileEntry {
  LayerKind kind = LayerKind::KrakenLayer;
  int tp = 1;
  int micro_batch = 1;
  double seconds = 0;
};

struct Profile {
  std::string device_type;
  std::vector<ProfileEntry> entries;
};

// Reads a profile file and checks that its [model] shape is the model's (a profile of another shape
// would silently mislead the planner). Errors name the key and the line.
Profile parse_profile(const std::string& text, const std::string& source, const ModelDesc& model);
Profile load_profile(const std::string& path, const ModelDesc& model);
// The profile file for `profile`, measured on `model`'s shape; parse_profile reads it back exactly
// (seconds are written with 17 significant digits). `comment` lines (without '#') go on top.
std::string format_profile(const Profile& profile, const ModelDesc& model, const std::string& comment = "");

// The analytic forward + backward time of one layer per micro-batch on one rank: three times the
// forward's roofline max(FLOPs / (peak · compute efficiency), bytes / (bandwidth · memory efficiency)).
double analytic_layer_seconds(const ModelDesc& model, const LayerDesc& layer, const DeviceType& device, int tp,
                              int micro_batch);

// The layer time the cost models use: a measured entry for (device, kind, tp, micro-batch) when one
// exists; else a measured entry of the same kind and tp at the nearest micro-batch, scaled by the
// analytic model's ratio between the two micro-batch sizes; else the entry of the same kind at the
// nearest tp (then the nearest micro-batch), scaled by the analytic ratio between the two (tp,
// micro-batch) points; else the analytic time.
double layer_seconds(const ModelDesc& model, const LayerDesc& layer, const DeviceType& device,
                     const std::vector<Profile>& profiles, int tp, int micro_batch);

}  // namespace kraken::parallel::planner
