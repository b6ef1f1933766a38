// Synthetic objectives as gradient oracles on flat f32 tensors, and a runner that optimises them with a
// base optimizer or OptEx: the test bed of shared/research/optex.md §7 (tests/optim and
// bench/optex_synthetic_bench.cpp share it).
//
//   sphere:     F(θ) = Σ_i θ_i²
//   quadratic:  F(θ) = ½ Σ_i a_i θ_i²,  a_i = 10^{2i/(d−1)} ∈ [1, 100]  (condition number 100)
//   rosenbrock: F(θ) = Σ_{i<d−1} 100(θ_{i+1} − θ_i²)² + (1 − θ_i)²
//   ackley:     F(θ) = −20·exp(−0.2·√(Σθ_i²/d)) − exp(Σ cos(2πθ_i)/d) + 20 + e
// Every one has inf F = 0. Values and gradients are computed in double on the host, in index order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "optim/optex.h"
#include "runtime/rng.h"
#include "runtime/tensor.h"

namespace kraken::optim {

enum class SyntheticKind { Sphere, Quadratic, Rosenbrock, Ackley };

SyntheticKind parse_synthetic_kind(const std::string& name);  // "sphere", "quadratic", "rosenbrock", "ackley"
const char* synthetic_kind_name(SyntheticKind kind);

class SyntheticProblem {
 public:
  SyntheticProblem(SyntheticKind kind, int64_t dim);
  SyntheticKind kind() const { return kind_; }
  int64_t dim() const { return dim_; }
  double value(const float* theta) const;                   // F(θ)
  void gradient(const float* theta, float* grad) const;     // ∇F(θ), rounded to f32
  double value(const runtime::Tensor& theta) const;         // flat CPU f32 tensors of dim elements
  void gradient(const runtime::Tensor& theta, runtime::Tensor& grad) const;

 private:
  SyntheticKind kind_;
  int64_t dim_;
  std::vector<double> curvature_;  // a_i of the quadratic
};

// One optimisation run: θ_0 ~ U(−1, 1)^d from `seed`, then `iterations` sequential iterations of OptEx
// with the given parallelism (1: the base optimizer itself). The oracle returns ∇F plus, when
// noise_std > 0, N(0, noise_std²) per coordinate (fresh noise per call, from `seed`).
struct SyntheticRun {
  SyntheticKind kind = SyntheticKind::Sphere;
  int64_t dim = 1000;
  std::string optimizer = "adam";  // "adam" (AdamW without decay, betas 0.9/0.999, eps 1e-8) or "sgd" (plain)
  float lr = 0.01f;
  int iterations = 40;
  uint64_t seed = 0;
  float noise_std = 0.0f;
  OptExOptions optex;  // parallelism and the estimator
};

struct SyntheticTrace {
  std::vector<double> gap;           // F(θ_t) − inf F for t = 0..iterations
  std::vector<OptExReport> reports;  // one per iteration
};

SyntheticTrace run_synthetic(const SyntheticRun& run);

// Effective speed-up (optex.md §7): the first step k at which the vanilla gap is <= the OptEx gap at
// its last iteration T, divided by T. Returns −1 when vanilla never gets there within its trace.
double effective_speedup(const std::vector<double>& vanilla_gap, const std::vector<double>& optex_gap);

}  // namespace kraken::optim
