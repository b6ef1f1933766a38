// The exactly optimal contiguous split of the layer list over pipeline stages.
//
// Minimises the 1F1B pipeline objective of a PipelineProblem (cost_model.h)
//     F(split) = (B − 1) · max_j τ_j + Σ_j τ_j + Σ_{j<S−1} boundary_j(cut j)
// over every split into S non-empty contiguous stages in order, where stage j's time τ_j is the sum of
// its class's per-layer times (so a slow stage pays more for the same layers), every stage must fit
// its memory and every stage boundary must be an allowed cut (PipelineProblem::cut_allowed). AMP's pipe_ast enumerates O(L²) bottleneck values and runs an O(L²·S) program for each
// (O(L⁴·S)). Here:
//   g(M) = min Σ_j τ_j + Σ boundary  subject to τ_j ≤ M and memory, for all j
// is one dynamic program over (stage, last layer) whose inner minimum runs over a window of start
// layers that only moves right, so a monotone deque gives it in O(S·L). F* = min over M of
// (B − 1)·M + g(M), and the minimum is reached at a value M that is some stage's time, i.e. one of the
// values P_c[b] − P_c[a] of a class c. g is a non-increasing step function of M; the search over the
// sorted candidate values first binary-searches the smallest feasible M, then splits the candidate
// range in halves, skipping a range where g is constant (the smallest M there wins) or where the bound
// (B − 1)·M_low + g(M_high) cannot beat the best found. In practice a few dozen O(S·L) programs.
// With B = 1 the max term vanishes and one program at M = ∞ is the answer.
#pragma once

#include <vector>

#include "parallel/planner/cost_model.h"

namespace kraken::parallel::planner {

struct PartitionResult {
  bool feasible = false;           // false: no split fits in memory
  double objective = kInfinity;    // F of the split below
  std::vector<int> stage_begin;    // S + 1 entries, 0 … L
  // Other splits the search met, each the best for some bottleneck cap (the search can judge them by a
  // fuller model, e.g. with the data-parallel all-reduce that F leaves out). Filled on request.
  std::vector<std::vector<int>> alternatives;
  int programs = 0;                // dynamic programs run (for the benchmark)
};

PartitionResult optimal_partition(const PipelineProblem& problem, bool keep_alternatives = false);

// F of one split, summed directly layer by layer; kInfinity when a stage does not fit its memory or a
// boundary is not an allowed cut.
double pipeline_objective(const PipelineProblem& problem, const std::vector<int>& stage_begin);

// Memory per device of stage j holding layers [a, b).
double stage_memory(const PipelineProblem& problem, int stage, int a, int b);

// The least peak per-device memory any split reaches (min over splits of max_j memory_j), ignoring
// capacities: what the error says when nothing fits. O(S·L²).
double min_peak_memory(const PipelineProblem& problem);

// A lower bound on F for every split: each layer at its fastest class's time, spread evenly.
double pipeline_lower_bound(const PipelineProblem& problem);

}  // namespace kraken::parallel::planner
