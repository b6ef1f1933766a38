// Cost models: the predicted step time and memory of one parallel strategy.
//
// A strategy is (tp, dp, pp, micro-batch, accumulation steps, a contiguous split of the layer list over
// the pp stages, and the order in which node groups receive ranks). Ranks are numbered
//     rank = tp_idx + tp · dp_idx + tp · dp · pp_idx            (tp innermost, as AMP and our Mesh)
// and given to devices group by group in `group_order`, node by node, so stage j owns the ranks
// [j·tp·dp, (j+1)·tp·dp). Two models, chosen by a key:
//
// `amp` (amp.md §3, the formulas of AMP's code, no more): one layer-time list e_i for the whole
// cluster, the device profiles averaged by their share of the devices; stage times t_j = Σ e_i;
//     T_pipe = (B − 1) · max_j t_j + Σ_j t_j + Σ_{j<pp−1} a / bw_avg(j → j+1)
//     T_dp   = max over (stage j, tp lane) of 2(dp − 1)/dp · P_j / bw_min(dp ring)
//     T      = T_pipe + T_dp
// where a = mbs·T·C fp32 elements, bw_avg is the slowest link among the tp lanes averaged over the dp
// replicas, P_j the stage's parameters in fp32 elements counted as AMP does ((4 + 2e)·k·C² per Kraken
// layer — 12C² for GPT-2 — over tp, plus C·V/tp once if the stage holds the embedding or the LM head).
// No latency, no overlap, no memory term: memory is reported but rejects nothing.
//
// `kraken` (the default; what amp.md §5 asks for):
// - per-stage speed: a stage runs at its slowest device type's layer times;
// - tensor parallelism per layer kind (the tp group lives inside a node): a Kraken layer (degree k,
//   tp | k) all-reduces one (mbs, T, C) tensor per direction behind its attention, so only
//   max(0, t_allreduce − t_attention) counts (backward: behind the attention backward, 2 × forward);
//   degree 1 (Megatron) pays 2 all-reduces forward and 2 backward on the critical path; the
//   vocab-parallel embedding and LM head pay theirs in full;
// - 1F1B: T_pipe = (B − 1) · max_j τ_j + Σ_j τ_j + Σ_{j<pp−1} 2 · p2p_j, τ_j = compute + exposed tp,
//   p2p_j the activation (and, back, its gradient) of one micro-batch over the slowest link;
// - data parallel: a ring all-reduce of the stage's fp32 gradients, 2(dp−1)/dp · bytes / bw plus
//   2(dp−1) latencies per bucket, in 25 MiB buckets overlapped with the last micro-batch's backward
//   (only the part that cannot hide counts) and with the time the final backward still needs to
//   reach stage 0;
// - memory per device: weights, gradients (plus ModelDesc::dp_gradient_buffers copies when dp > 1),
//   optimizer state (AdamW: two fp32 states, plus an fp32 master copy when the weights are 16-bit) and
//   the activations of the micro-batches in flight under 1F1B (stage j of pp holds min(pp − j, B)); a
//   strategy that does not fit is rejected.
// Both break a prediction down as compute + bubble + pp + tp + dp communication = step time.
#pragma once

#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "parallel/planner/description.h"

namespace kraken::parallel::planner {

enum class CostModelKind { Amp, Kraken };
CostModelKind parse_cost_model(const std::string& name);  // "amp" | "kraken"; else kraken::Error
const char* cost_model_name(CostModelKind kind);

struct Strategy {
  int tp = 1, dp = 1, pp = 1;
  int micro_batch = 1;
  int accumulation = 1;          // micro-batches per step per data-parallel rank (B)
  std::vector<int> stage_begin;  // pp + 1 layer indices: stage j holds [stage_begin[j], stage_begin[j+1])
  std::vector<int> group_order;  // placement: node groups in rank order; empty means file order
};

struct MemoryUse {
  double weights = 0, gradients = 0, optimizer = 0, activations = 0;
  double total() const { return weights + gradients + optimizer + activations; }
};

struct StagePrediction {
  int first_layer = 0, end_layer = 0;  // layers [first_layer, end_layer) of the layer list
  std::vector<int> groups;             // node groups that host the stage's devices
  std::string device_type;             // the slowest device type among them
  double compute = 0;                  // forward + backward of one micro-batch on one rank
  double tp_comm = 0;                  // exposed tensor-parallel communication per micro-batch
  double p2p = 0;                      // one transfer to the next stage per micro-batch
  double dp_allreduce = 0;             // the whole gradient all-reduce
  double dp_exposed = 0;               // the part the backward does not hide
  int in_flight = 0;                   // micro-batches whose activations are held under 1F1B
  MemoryUse memory;                    // per device
  double memory_capacity = 0;          // the smallest device memory among its devices
  double time() const { return compute + tp_comm; }
};

struct Prediction {
  double step_time = 0;
  double compute = 0, bubble = 0, pp_comm = 0, tp_comm = 0, dp_comm = 0;  // they sum to step_time
  double memory_per_device = 0;  // the largest over stages
  bool fits = true;              // every device holds its stage
  std::vector<StagePrediction> stages;
};

// Predicts one strategy. Throws kraken::Error when the strategy does not match the cluster (tp·dp·pp
// devices, tp inside a node), the model (tp dividing the degree, or n_head for degree 1; a valid
// split), the batch (dp · micro_batch · accumulation = global batch) or the model's RunLimits.
Prediction predict(CostModelKind kind, const Cluster& cluster, const ModelDesc& model,
                   const std::vector<Profile>& profiles, const Strategy& strategy);

// ---- the pieces the search shares with predict() -------------------------------------------

// One layout's layer-partition problem: per-stage layer costs, boundary costs and memory, so that the
// partition search sees exactly what the cost model charges.
//   pipeline objective(split) = (B − 1) · max_j τ_j + Σ_j τ_j + Σ_{j<S−1} boundary[j][last layer of j]
// subject to static + in_flight · activations ≤ capacity on every stage (when memory_limited).
struct PipelineProblem {
  int layers = 0, stages = 0, micro_batches = 1;
  std::vector<int> stage_class;                   // per stage: which per-layer cost lists it uses
  std::vector<std::vector<double>> class_time;    // per class, per layer: τ per micro-batch
  std::vector<std::vector<double>> boundary;      // per stage j < S−1, per layer i: cost of a cut after i
  bool memory_limited = false;
  std::vector<std::vector<double>> class_static;  // per class, per layer: weight/grad/optimizer bytes
  std::vector<std::vector<double>> class_activation;  // per class, per layer: activation bytes, 1 micro-batch
  std::vector<int> in_flight;                     // per stage
  std::vector<double> capacity;                   // per stage, bytes
  std::vector<double> class_tied_static;          // per class: bytes saved when one stage holds all layers
  // Per layer index i (L + 1 entries): may a stage after the first begin at layer i? Empty: anywhere.
  std::vector<char> cut_allowed;
};

// Everything a (tp, dp, pp, micro-batch, placement) fixes before the split is chosen: which devices
// and links each stage has, and the per-layer costs on them.
class Layout {
 public:
  // Validates the strategy against cluster, model and batch; `strategy.stage_begin` is ignored.
  Layout(CostModelKind kind, const Cluster& cluster, const ModelDesc& model, const std::vector<Profile>& profiles,
         const Strategy& strategy);
  ~Layout();
  Layout(Layout&&) noexcept;
  Layout& operator=(Layout&&) noexcept;

  const PipelineProblem& problem() const;
  // The full prediction with one split (stage_begin as in Strategy; validated).
  Prediction evaluate(const std::vector<int>& stage_begin) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

constexpr double kInfinity = std::numeric_limits<double>::infinity();

}  // namespace kraken::parallel::planner
