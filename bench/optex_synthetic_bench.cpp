// OptEx on synthetic objectives: the effective speed-up tables of shared/research/optex.md §7 (T5,
// deterministic gradients; T6, noisy gradients), measured with this repository's OptEx.
//
// Effective speed-up at parallelism N = (vanilla steps needed to reach the gap OptEx has after T
// sequential iterations) / T, averaged over seeds; "Target" (N true sequential steps per iteration)
// would score exactly N. Each OptEx iteration takes N gradients, so the speed-up is per sequential
// iteration, not per gradient. Settings as optex.md §7: Matérn-5/2, ℓ = 0.1, σ² = 1e-3, sqrt-norm input
// scaling, T0 = 50 pairs, the last worker's output, θ_0 ~ U(−1, 1)^d, T = 40.
//
// A plain program (not Google Benchmark): build/bin/optex_synthetic_bench [--seeds S] [--iterations T]
// [--large] (also the d = 10^4 rows) [--noise-only].
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "optim/synthetic.h"

using kraken::optim::effective_speedup;
using kraken::optim::run_synthetic;
using kraken::optim::SyntheticKind;
using kraken::optim::SyntheticRun;
using kraken::optim::SyntheticTrace;

namespace {

struct Row {
  SyntheticKind kind;
  const char* optimizer;
  float lr;
  int64_t dim;
  float noise_std;
  int seeds;
};

struct Cell {
  double speedup = 0.0;       // mean over seeds (a seed where vanilla never got there counts its bound)
  bool lower_bound = false;   // some seed's vanilla run never reached the OptEx gap
  double rel_error = 0.0;     // mean ‖μ − g‖/‖g‖ over the run
  double cosine = 0.0;        // mean cos∠(μ, g) over the run
  double overhead_ms = 0.0;   // mean time per iteration outside gradient evaluation
};

Cell measure(const Row& row, int parallelism, int iterations) {
  Cell cell;
  for (int seed = 0; seed < row.seeds; ++seed) {
    SyntheticRun run;
    run.kind = row.kind;
    run.dim = row.dim;
    run.optimizer = row.optimizer;
    run.lr = row.lr;
    run.seed = static_cast<uint64_t>(seed);
    run.noise_std = row.noise_std;
    run.optex.parallelism = parallelism;
    run.iterations = iterations;
    const SyntheticTrace optex = run_synthetic(run);
    // Vanilla long enough to pass OptEx at the largest N with room to spare.
    run.optex.parallelism = 1;
    run.iterations = 2 * 8 * iterations;
    const SyntheticTrace vanilla = run_synthetic(run);
    double s = effective_speedup(vanilla.gap, optex.gap);
    if (s < 0) {
      s = static_cast<double>(run.iterations) / iterations;
      cell.lower_bound = true;
    }
    cell.speedup += s / row.seeds;
    double err = 0.0, cosine = 0.0, overhead = 0.0;
    int err_count = 0;
    for (const auto& r : optex.reports) {
      for (size_t s = 0; s < r.proxy_relative_error.size(); ++s)
        if (std::isfinite(r.proxy_relative_error[s])) {
          err += r.proxy_relative_error[s];
          cosine += r.proxy_cosine[s];
          ++err_count;
        }
      overhead += r.seconds_outside_gradients();
    }
    cell.rel_error += (err_count ? err / err_count : NAN) / row.seeds;
    cell.cosine += (err_count ? cosine / err_count : NAN) / row.seeds;
    cell.overhead_ms += 1e3 * overhead / optex.reports.size() / row.seeds;
  }
  return cell;
}

void print_table(const char* title, const std::vector<Row>& rows, int iterations) {
  std::printf("\n%s (T = %d, mean over seeds. Each cell: effective speed-up, then the mean over the run of\n"
              "‖μ − g‖/‖g‖ and cos∠(μ, g) for the proxy gradient against the true gradient at the same point, and\n"
              "the time per iteration outside gradient evaluation)\n",
              title, iterations);
  std::printf("| objective, optimiser | d | noise | N=2 | N=4 | N=8 |\n|---|---|---|---|---|---|\n");
  for (const Row& row : rows) {
    std::printf("| %s, %s lr %g | %lld | %g |", kraken::optim::synthetic_kind_name(row.kind), row.optimizer, row.lr,
                static_cast<long long>(row.dim), row.noise_std);
    for (int n : {2, 4, 8}) {
      const Cell c = measure(row, n, iterations);
      std::printf(" %s%.2f (err %.2f, cos %.3f, %.2f ms) |", c.lower_bound ? ">" : "", c.speedup, c.rel_error, c.cosine,
                  c.overhead_ms);
      std::fflush(stdout);
    }
    std::printf("\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  int seeds = 3, iterations = 40;
  bool large = false, noise_only = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--seeds") && i + 1 < argc) seeds = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--iterations") && i + 1 < argc) iterations = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--large")) large = true;
    else if (!std::strcmp(argv[i], "--noise-only")) noise_only = true;
    else {
      std::fprintf(stderr, "usage: %s [--seeds S] [--iterations T] [--large] [--noise-only]\n", argv[0]);
      return 2;
    }
  }
  if (!noise_only) {
    std::vector<Row> t5 = {
        {SyntheticKind::Sphere, "adam", 0.01f, 1000, 0.0f, seeds},
        {SyntheticKind::Sphere, "sgd", 0.05f, 1000, 0.0f, seeds},
        {SyntheticKind::Quadratic, "adam", 0.01f, 1000, 0.0f, seeds},
        {SyntheticKind::Quadratic, "sgd", 5e-3f, 1000, 0.0f, seeds},
        {SyntheticKind::Rosenbrock, "adam", 0.01f, 1000, 0.0f, seeds},
        {SyntheticKind::Rosenbrock, "sgd", 5e-4f, 1000, 0.0f, seeds},
        {SyntheticKind::Ackley, "adam", 0.01f, 1000, 0.0f, seeds},
    };
    if (large) {
      t5.push_back({SyntheticKind::Sphere, "adam", 0.01f, 10000, 0.0f, 2});
      t5.push_back({SyntheticKind::Rosenbrock, "adam", 0.01f, 10000, 0.0f, 2});
    }
    print_table("T5: deterministic gradients", t5, iterations);
  }
  const std::vector<Row> t6 = {
      {SyntheticKind::Sphere, "adam", 0.01f, 1000, 0.3f, seeds},
      {SyntheticKind::Sphere, "adam", 0.01f, 1000, 1.0f, seeds},
  };
  print_table("T6: noisy gradients (Gaussian noise per coordinate)", t6, iterations);
  return 0;
}
