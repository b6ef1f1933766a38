// [parallel] plan = "auto": kraken-train asks the planner (parallel/planner/) for its layout.
//
// The trainer makes one call before it builds the mesh:
//   s.plan = plan_layout(s.config, world);
// Rank 0 reads the cluster ([parallel] cluster, or the one detected from MPI: detect_cluster), the
// profiles ([parallel] profile) and the model (model_desc_of), searches, and broadcasts the best
// strategy (or the planner's error, which every rank then throws); every rank writes it into its config:
// parallel.dp, tp, pp and layers_per_stage, train.batch_size (the micro-batch per dp rank) and
// train.grad_accum (micro-batches per step), which keeps the global batch global_batch_of(config). The
// search only returns strategies the trainer can run (model_desc_of sets the planner's RunLimits).
// Rank 0 logs the plan (describe(), and <out_dir>/plan.json); every step's metrics record carries
// predicted_step_seconds beside step_seconds, and the run ends with summary(): the measured median step
// time against the prediction.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "parallel/planner/cost_model.h"
#include "parallel/planner/description.h"
#include "runtime/dtype.h"
#include "train/config.h"

namespace kraken::parallel {
class World;
}

namespace kraken::train {

struct AutoPlan {
  bool active = false;
  std::string cluster;               // the cluster's name (a file, or "detected: …")
  int tp = 1, dp = 1, pp = 1, micro_batch = 1, accumulation = 1;
  std::vector<int64_t> layers_per_stage;  // transformer layers of each stage
  std::vector<std::string> stage_hosts;   // node groups of each stage
  // The prediction: step = compute + bubble + pp + tp + dp (seconds); memory per device in bytes.
  double step_seconds = 0, compute = 0, bubble = 0, pp_comm = 0, tp_comm = 0, dp_comm = 0, memory_per_device = 0;
  std::string alternatives;          // the next strategies of the ranking, one line each (rank 0)
  std::vector<double> measured;      // step times of this run, in order

  std::string strategy_line() const;  // "tp=1 dp=2 pp=2 micro_batch=2 accumulation=4 layers/stage 4,4"
  std::string describe() const;       // the log lines of the start of the run ("" when not active)
  void record_step(double seconds) { measured.push_back(seconds); }
  // The measured median step time (the first step, which allocates and warms caches, left out when
  // there are more) beside the predicted one; "" when not active or no step ran.
  std::string summary() const;
  double measured_median() const;
};

// The cluster of a job as MPI sees it: world_size ranks, ranks_per_node on each node, one device each.
// The device type is `device_type` when given (e.g. a profile's), else cpu-2core for CPU ranks or the
// GPU's type from nvidia-smi. Memory per device: the type's, and on CPU at most the machine's memory
// over the ranks of a node. Links are assumptions stated in auto_plan.cpp (this machine's measured
// shared-memory MPI for CPU ranks, NVLink-class for GPUs in a node, 100 Gb/s between nodes): give a
// cluster file when they matter.
parallel::planner::Cluster detect_cluster(int world_size, int ranks_per_node, const runtime::Device& device,
                                          const std::string& device_type = "");

// The best strategy for `config` on `cluster` (no MPI). Throws kraken::Error when nothing fits (saying
// how much memory the least demanding strategy needs) or nothing divides the cluster and the batch.
AutoPlan choose_plan(const Config& config, const parallel::planner::Cluster& cluster,
                     const std::vector<parallel::planner::Profile>& profiles,
                     parallel::planner::CostModelKind cost_model = parallel::planner::CostModelKind::Kraken);

// Writes the plan's layout into the config (parallel.dp/tp/pp/layers_per_stage, train.batch_size and
// train.grad_accum).
void apply_plan(const AutoPlan& plan, Config& config);

// What the trainer calls (see the file comment). A cluster file whose device count differs from the
// world size is an error naming both.
AutoPlan plan_layout(Config& config, parallel::World& world);

// The planner's device type of a GPU from its name as nvidia-smi or the CUDA runtime gives it
// ("NVIDIA H100 80GB HBM3" → "H100"; "80GB" or a memory of 81920 MiB tells the A100's two sizes
// apart); empty when the GPU is not in the planner's table.
std::string gpu_type_of_name(const std::string& name);
// That type's dense bf16 peak in FLOP/s (planner::builtin_device_types), or 0 when unknown.
double gpu_peak_flops(const std::string& name);

}  // namespace kraken::train
