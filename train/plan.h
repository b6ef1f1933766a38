// The planner's view of a training run, and the profiler behind `kraken-plan --profile`.
//
// parallel/planner/ knows nothing of train/ (it sits below it); this file builds its inputs from the
// one validated Config, so kraken-plan and kraken-train (plan = "auto") read a config the same way.
//
// The profiler measures, with the real model code (models::KrakenModel on runtime ops), the forward +
// backward seconds of one micro-batch through each layer kind the planner models:
//   embedding     a stage holding only wte/wpe: x0 = wte[idx] + wpe[pos], backward with a fixed output
//                 gradient (the stage's concat of x0 into the local streams is included);
//   kraken_layer  one transformer layer at the config's degree, as the paired difference of a stage of
//                 two layers and a stage of one layer (layers 1 and 2: they mix the streams, as every
//                 layer but the first), so the stage's split and concat of its streams cancel out;
//   lm_head       a last stage with no layer: conjunction, LN_f, logits with the tied wte, cross-entropy.
// at every micro-batch size in profile_micro_batches() and every tp in profile_tp_degrees(). One rank's
// share at tp (degree k > 1) is k/tp whole sub-layers with n_head/k heads each, wte whole, and the
// conjunction's (k/tp)·C columns: exactly one rank-share of the model with degree k/tp and n_head/tp, so
// that is what is measured, without the tensor-parallel all-reduces the cost model adds itself. Degree 1
// (Megatron's split matrices) cannot be expressed that way: only tp = 1 is measured and the planner
// scales it to other tp by the analytic model (planner::layer_seconds). Each point: `warmup` untimed
// runs, then `repeat` timed ones; the profile keeps the median.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "parallel/planner/description.h"
#include "train/config.h"

namespace kraken::train {

// Sequences per optimizer step over all data-parallel ranks: [parallel] global_batch when set
// (plan = "auto"), else train.batch_size · train.grad_accum · parallel.dp as written.
int64_t global_batch_of(const Config& config);

// The planner's model for this config: its shape with T = train.seq_len, the global batch, the layer
// list as models::KrakenModel computes it (wte replicated over tp ranks and the logits computed whole
// on each), the optimizer's state per parameter (AdamW 2, SGD with momentum 1, OptEx's history on
// top), GradSync's flat gradient buffers under dp, and kraken-train's limits: every pipeline stage
// holds a transformer layer, grad_accum ≥ pp, and data parallelism only with dropout > 0 or OptEx.
parallel::planner::ModelDesc model_desc_of(const Config& config);

// A training config read and validated like load_config, except that the data shards need not exist
// (kraken-plan runs where the data is not).
Config load_config_for_planning(const std::string& path);

// ---- the profiler --------------------------------------------------------------------------------

struct ProfileOptions {
  std::string device_type = "cpu-2core";  // the device type the file is for (a cluster's `device`)
  int max_micro_batch = 16;               // measure divisors of the global batch up to this
  std::vector<int> micro_batches;         // or exactly these (overrides max_micro_batch)
  int warmup = 1;                         // untimed runs per point
  int repeat = 5;                         // timed runs per point
  uint64_t seed = 1;
};

struct LayerMeasurement {
  parallel::planner::LayerKind kind = parallel::planner::LayerKind::KrakenLayer;
  int tp = 1;
  int micro_batch = 1;
  std::vector<double> samples;  // seconds, one per timed run (a layer: the paired two-minus-one-layer difference)
  // The estimate: the median of the samples for a single stage; for a layer, the fastest two-layer
  // run minus the fastest one-layer run (interference only adds time, so minima are its most robust
  // estimate, and their difference cannot go negative from noise the way one paired difference can).
  double seconds = 0;
};

// The divisors of the global batch up to max_micro_batch (at least {1}): the micro-batch sizes the
// search tries, capped; the planner scales the nearest measurement to larger ones.
std::vector<int> profile_micro_batches(const Config& config, int max_micro_batch);
// Every tp the search may pick that one rank can measure: the divisors of the degree (degree > 1),
// {1} for degree 1.
std::vector<int> profile_tp_degrees(const Config& config);

// Measures every (kind, tp, micro-batch) on config.train.device with the calling thread's OpenMP and
// BLAS settings; `report` (optional) sees each measurement as it completes. The Profile holds the
// medians (format_profile writes it).
parallel::planner::Profile measure_profile(const Config& config, const ProfileOptions& options,
                                           const std::function<void(const LayerMeasurement&)>& report = {});

}  // namespace kraken::train
