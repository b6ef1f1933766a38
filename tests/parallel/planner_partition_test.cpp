// The pipeline partition is exactly optimal: it matches brute force over every split on many small
// random problems with heterogeneous stage speeds, boundary costs and memory limits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>

#include "parallel/planner/partition.h"

namespace kraken::parallel::planner {
namespace {

// The best objective over every split into S non-empty contiguous stages, each stage summed directly.
double brute_force(const PipelineProblem& p, std::vector<int>* best_split) {
  double best = kInfinity;
  std::vector<int> split(p.stages + 1, 0);
  split[p.stages] = p.layers;
  std::function<void(int)> place = [&](int j) {  // choose split[j] for j = 1 … S − 1
    if (j == p.stages) {
      const double f = pipeline_objective(p, split);
      if (f < best) {
        best = f;
        *best_split = split;
      }
      return;
    }
    for (int b = split[j - 1] + 1; b <= p.layers - (p.stages - j); ++b) {
      split[j] = b;
      place(j + 1);
    }
  };
  place(1);
  return best;
}

PipelineProblem random_problem(std::mt19937_64& rng, bool with_memory) {
  std::uniform_int_distribution<int> layers_d(1, 9);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  PipelineProblem p;
  p.layers = layers_d(rng);
  p.stages = std::uniform_int_distribution<int>(1, std::min(p.layers, 5))(rng);
  p.micro_batches = std::uniform_int_distribution<int>(1, 8)(rng);
  const int classes = std::uniform_int_distribution<int>(1, 3)(rng);
  for (int c = 0; c < classes; ++c) {
    // Layer costs vary per layer; a class is a device speed (a slow class multiplies every layer), plus
    // noise so that classes are not exact multiples of each other.
    const double speed = 0.5 + 3.0 * u(rng);
    std::vector<double> t(p.layers);
    for (int i = 0; i < p.layers; ++i) t[i] = speed * (0.1 + 10.0 * u(rng));
    p.class_time.push_back(t);
  }
  // Some random problems have equal layers, where ties between splits are everywhere.
  if (u(rng) < 0.2)
    for (auto& t : p.class_time) std::fill(t.begin(), t.end(), t[0]);
  for (int j = 0; j < p.stages; ++j) p.stage_class.push_back(std::uniform_int_distribution<int>(0, classes - 1)(rng));
  p.boundary.assign(std::max(0, p.stages - 1), std::vector<double>(p.layers));
  for (auto& row : p.boundary)
    for (double& b : row) b = u(rng) < 0.3 ? 0.0 : 2.0 * u(rng);
  p.memory_limited = with_memory;
  if (with_memory) {
    double total = 0;
    for (int c = 0; c < classes; ++c) {
      std::vector<double> s(p.layers), a(p.layers);
      for (int i = 0; i < p.layers; ++i) {
        s[i] = 1.0 + 4.0 * u(rng);
        a[i] = 2.0 * u(rng);
        total += s[i] + a[i];
      }
      p.class_static.push_back(s);
      p.class_activation.push_back(a);
      p.class_tied_static.push_back(0.5 * u(rng));
    }
    for (int j = 0; j < p.stages; ++j) {
      p.in_flight.push_back(std::min(p.stages - j, p.micro_batches));
      // Capacities around an even share, so that some splits fit and some do not (and sometimes none).
      p.capacity.push_back(total / classes / p.stages * (0.6 + 1.6 * u(rng)) * p.in_flight.back() / 2 + 1.0);
    }
  }
  return p;
}

// Tolerance: the partition sums prefix differences, brute force sums layer by layer; the two orders of
// at most ~20 additions of numbers below 100 differ by a few ulps, far below 1e-9 relative.
constexpr double kRelTol = 1e-9;

TEST(PlannerPartition, MatchesBruteForceOnRandomHeterogeneousProblems) {
  std::mt19937_64 rng(20240613);
  int compared = 0, infeasible = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const PipelineProblem p = random_problem(rng, trial % 2 == 1);
    std::vector<int> brute_split;
    const double expected = brute_force(p, &brute_split);
    const PartitionResult got = optimal_partition(p);
    if (expected == kInfinity) {
      EXPECT_FALSE(got.feasible) << "trial " << trial;
      ++infeasible;
      continue;
    }
    ASSERT_TRUE(got.feasible) << "trial " << trial << ": brute force found " << expected;
    ASSERT_EQ(int(got.stage_begin.size()), p.stages + 1);
    // The split returned is valid, fits, and its own objective is the optimum.
    const double own = pipeline_objective(p, got.stage_begin);
    EXPECT_NEAR(own, got.objective, kRelTol * expected) << "trial " << trial;
    EXPECT_NEAR(got.objective, expected, kRelTol * expected)
        << "trial " << trial << " layers " << p.layers << " stages " << p.stages << " B " << p.micro_batches;
    ++compared;
  }
  // The generator must exercise both outcomes.
  EXPECT_GT(compared, 2000);
  EXPECT_GT(infeasible, 20);
}

TEST(PlannerPartition, SlowStagesGetFewerLayers) {
  // 12 equal layers, stage 0 twice as fast as stage 1, many micro-batches: the bottleneck is balanced
  // at 8 + 4 layers (8·1 = 4·2).
  PipelineProblem p;
  p.layers = 12;
  p.stages = 2;
  p.micro_batches = 64;
  p.class_time = {std::vector<double>(12, 1.0), std::vector<double>(12, 2.0)};
  p.stage_class = {0, 1};
  p.boundary = {std::vector<double>(12, 0.0)};
  const PartitionResult r = optimal_partition(p);
  EXPECT_EQ(r.stage_begin, (std::vector<int>{0, 8, 12}));
  // (B − 1)·8 + (8 + 8) = 63·8 + 16.
  EXPECT_DOUBLE_EQ(r.objective, 63 * 8.0 + 16.0);
}

TEST(PlannerPartition, BottleneckAtExactlyTheEvenShareIsFound) {
  // Four unit layers on two equal stages: the optimum's bottleneck, 2, equals the lower bound L·t/S
  // the candidate list starts from, and the cheaper cuts (after layer 0 or 2) tempt an unbalanced split.
  PipelineProblem p;
  p.layers = 4;
  p.stages = 2;
  p.micro_batches = 10;
  p.class_time = {std::vector<double>(4, 1.0)};
  p.stage_class = {0, 0};
  p.boundary = {{0.0, 0.5, 0.0, 0.0}};
  const PartitionResult r = optimal_partition(p);
  EXPECT_EQ(r.stage_begin, (std::vector<int>{0, 2, 4}));
  EXPECT_DOUBLE_EQ(r.objective, 9 * 2.0 + 4.0 + 0.5);  // [0, 1, 4] would cost 9·3 + 4 = 31
}

TEST(PlannerPartition, OneMicroBatchMinimisesTheSumOnly) {
  // With B = 1 the objective is Σ τ + boundary: everything goes to the fast class except what must not.
  PipelineProblem p;
  p.layers = 6;
  p.stages = 3;
  p.micro_batches = 1;
  p.class_time = {std::vector<double>(6, 1.0), std::vector<double>(6, 5.0)};
  p.stage_class = {1, 0, 1};
  p.boundary = {std::vector<double>(6, 0.0), std::vector<double>(6, 0.0)};
  const PartitionResult r = optimal_partition(p);
  EXPECT_EQ(r.stage_begin, (std::vector<int>{0, 1, 5, 6}));
  EXPECT_DOUBLE_EQ(r.objective, 5.0 + 4.0 + 5.0);
  EXPECT_EQ(r.programs, 1);
}

TEST(PlannerPartition, MinPeakMemoryMatchesBruteForce) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 500; ++trial) {
    PipelineProblem p = random_problem(rng, true);
    if (p.stages == 1) continue;
    double best = kInfinity;
    std::vector<int> split(p.stages + 1, 0);
    split[p.stages] = p.layers;
    std::function<void(int)> place = [&](int j) {
      if (j == p.stages) {
        double peak = 0;
        for (int s = 0; s < p.stages; ++s) peak = std::max(peak, stage_memory(p, s, split[s], split[s + 1]));
        best = std::min(best, peak);
        return;
      }
      for (int b = split[j - 1] + 1; b <= p.layers - (p.stages - j); ++b) {
        split[j] = b;
        place(j + 1);
      }
    };
    place(1);
    EXPECT_NEAR(min_peak_memory(p), best, kRelTol * best) << "trial " << trial;
  }
}

// Random masks of allowed cuts (kraken-train's stages must each hold a transformer layer, so the
// cuts next to the embedding and the LM head are forbidden). The brute force checks the mask itself.
TEST(PlannerPartition, RespectsForbiddenCutsAndStaysOptimal) {
  std::mt19937_64 rng(99);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  int compared = 0, none_allowed = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    PipelineProblem p = random_problem(rng, trial % 2 == 1);
    p.cut_allowed.assign(p.layers + 1, 1);
    for (int i = 1; i < p.layers; ++i) p.cut_allowed[i] = u(rng) < 0.35 ? 0 : 1;
    double best = kInfinity, best_peak = kInfinity;
    std::vector<int> split(p.stages + 1, 0);
    split[p.stages] = p.layers;
    std::function<void(int)> place = [&](int j) {
      if (j == p.stages) {
        for (int s = 1; s < p.stages; ++s)
          if (!p.cut_allowed[split[s]]) return;
        best = std::min(best, pipeline_objective(p, split));
        if (p.memory_limited) {
          double peak = 0;
          for (int s = 0; s < p.stages; ++s) peak = std::max(peak, stage_memory(p, s, split[s], split[s + 1]));
          best_peak = std::min(best_peak, peak);
        }
        return;
      }
      for (int b = split[j - 1] + 1; b <= p.layers - (p.stages - j); ++b) {
        split[j] = b;
        place(j + 1);
      }
    };
    place(1);
    const PartitionResult got = optimal_partition(p);
    if (best == kInfinity) {
      EXPECT_FALSE(got.feasible) << "trial " << trial;
      ++none_allowed;
      continue;
    }
    ASSERT_TRUE(got.feasible) << "trial " << trial;
    for (int s = 1; s < p.stages; ++s) EXPECT_TRUE(p.cut_allowed[got.stage_begin[s]]) << "trial " << trial;
    EXPECT_NEAR(got.objective, best, kRelTol * best) << "trial " << trial;
    if (p.memory_limited && p.stages > 1) {
      EXPECT_NEAR(min_peak_memory(p), best_peak, kRelTol * best_peak);
    }
    ++compared;
  }
  EXPECT_GT(compared, 1000);
  EXPECT_GT(none_allowed, 20);
}

}  // namespace
}  // namespace kraken::parallel::planner
