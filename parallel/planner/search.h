// The search: every strategy that divides the cluster and the batch, each with its optimal layer
// split and the best placement of its stages onto node groups, ranked by predicted step time.
//
// Candidates (tp, dp, pp, micro-batch): tp divides every group's devices per node (a tp group stays
// in a node) and the model (tp | degree for Kraken models, tp | n_head for degree 1); dp · pp · tp is
// the device count; pp ≤ n_layer; dp divides the global batch and the micro-batch divides
// global_batch / dp; accumulation = global_batch / (dp · micro-batch). The model's RunLimits drop the
// shapes its runner cannot run (fewer micro-batches than stages, tp or pp where only dp is allowed).
//
// Placements (the order in which node groups receive ranks, so which groups host which stages): the
// `amp` model keeps the file's order (AMP places nothing). The `kraken` model tries every order of the
// groups when there are at most 4 (24 orders), else the file order and the groups sorted by device
// speed (fastest first and last) and by memory (largest first and last); orders that only swap
// identical groups are tried once. The layer split then gives slow stages fewer layers.
//
// Pruning: a layout whose lower bound (pipeline_lower_bound) cannot beat the k-th best is skipped; a
// split that does not fit in memory is never returned (the partition treats memory as a constraint).
#pragma once

#include <cstdint>
#include <vector>

#include "parallel/planner/cost_model.h"

namespace kraken::parallel::planner {

struct SearchOptions {
  CostModelKind cost_model = CostModelKind::Kraken;
  int top_k = 10;
  // Only the file's order of node groups: the ranks a launcher gives are fixed, so a run (kraken-train
  // with plan = "auto") can take a placement only when it matches the order mpirun numbers the nodes.
  bool file_order_only = false;
};

struct RankedStrategy {
  Strategy strategy;
  Prediction prediction;
};

struct SearchStats {
  int64_t shapes = 0;           // (tp, dp, pp, micro-batch) candidates
  int64_t layouts = 0;          // shapes × placements considered
  int64_t pruned_by_bound = 0;  // layouts skipped by the lower bound
  int64_t no_fit = 0;           // layouts where no split fits in memory
  int64_t programs = 0;         // partition dynamic programs run
  double seconds = 0;
};

struct SearchResult {
  std::vector<RankedStrategy> top;  // best first; one entry per (tp, dp, pp, micro-batch)
  SearchStats stats;
};

// Throws kraken::Error when no candidate divides the cluster and batch, or when nothing fits in memory
// (the message says how much memory per device the least demanding strategy needs).
SearchResult search(const Cluster& cluster, const ModelDesc& model, const std::vector<Profile>& profiles,
                    const SearchOptions& options = {});

// The (tp, dp, pp, micro_batch, accumulation) candidates, without split or placement.
std::vector<Strategy> candidate_shapes(const Cluster& cluster, const ModelDesc& model);

// The group orders the search tries under a cost model (only the file order when file_order_only).
std::vector<std::vector<int>> candidate_placements(const Cluster& cluster, CostModelKind kind,
                                                   bool file_order_only = false);

}  // namespace kraken::parallel::planner
