// OptEx's kernelized gradient estimator (Shu et al., "OptEx: Expediting First-Order Optimization with
// Approximately Parallelized Iterations", NeurIPS 2024, §4.1; spec: shared/research/optex.md §2).
//
// The gradient field gets a GP prior with the separable kernel K(θ, θ′) = k(θ, θ′)·I_d ([UNVERIFIED]
// as a formula in the paper; it is what the reference code computes: one n×n solve shared by all d
// outputs). Given the history H = {(θ_τ, g_τ)}, τ = 1..n, the proxy gradient is the posterior mean
//   μ(θ) = k_n(θ)ᵀ (K_n + σ²I)⁻¹ G_n,   k_n(θ)_τ = k(θ, θ_τ),  (K_n)_ij = k(θ_i, θ_j),  G_n = [g_1; …; g_n]
// with the reference JAX code's choices (optex_jax/OptEx_JAX.py, get_proxy_grad_func):
//   - k = Matérn-5/2 with amplitude 1: k(r) = (1 + √5·r/ℓ + 5r²/(3ℓ²))·exp(−√5·r/ℓ), r = ‖θ̃ − θ̃′‖₂;
//   - σ² (`noise`) is added to the diagonal as a variance (the reference's argument is misnamed `std`);
//   - input scaling (`normalize_inputs`, the reference's normalize_x): θ̃ = θ/s with one scalar
//     s = mean_τ ‖θ_τ‖₂^{1/2} over the history (the mean of square roots of the norms), the same s for
//     queries; computed on the coordinate subset when there is one;
//   - a FIFO of the last T0 pairs; μ ≡ 0 below two pairs;
//   - `effective_dim`: a random subset of that many coordinates, drawn without replacement and anew at
//     every fit, used only for the kernel distances (μ stays d-dimensional).
//
// How it is computed. fit() builds K_n + σ²I in double and factors it by Cholesky (L·Lᵀ), once per
// sequential iteration. A query then solves (K_n + σ²I)·w = k_n(θ) with the factor (O(n²)) and returns
//   μ(θ) = Σ_τ w_τ·g_τ
// — the same μ as k_nᵀα with α = (K_n + σ²I)⁻¹G_n, at the same O(n·d) per query, but without
// materialising α: that saves n·d floats of device memory (as much as the gradient history itself),
// and the solve stays in double where the ill-conditioning of K_n lives; storing α in f32 would
// amplify its rounding by the entries of (K_n + σ²I)⁻¹ (up to 1/σ²), while w ≈ e_τ at a history point.
//
// Distances are taken directly as Σ_i (θ_i − θ′_i)² in double, not as ‖θ‖² + ‖θ′‖² − 2θ·θ′: the points
// of an optimisation path are close compared with their norms, where the expansion cancels most of its
// digits, and the direct form costs the same n·d per query (the dot products would need n passes too).
// Within the history nothing is computed twice: squared norms and pairwise squared distances of
// stored points are cached (the input scale only divides them), so a fit computes the N×n block of
// the newest pairs, O(n·N·d). With a coordinate subset the subset changes every fit and the O(n²·m)
// distances over it are recomputed.
//
// Model parallelism: a rank holding a slice of every θ computes partial squared norms and distances;
// the partial-sum hook (identity by default) sums them across ranks before they are used.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "runtime/rng.h"
#include "runtime/tensor.h"

namespace kraken::optim {

// ℓ is fixed, as in the reference's run_optex: its tuning_mattern helper is never called there, and how
// the paper chose ℓ is [UNVERIFIED]; optex.md §7 finds ℓ ∈ [0.1, 10] robust on the synthetic problems.
struct KernelEstimatorOptions {
  double lengthscale = 0.1;      // ℓ, the reference's default
  double noise = 1e-3;           // σ² added to the Gram diagonal, the reference's value
  bool normalize_inputs = true;  // θ/s with s = mean_τ ‖θ_τ‖^{1/2} (the reference's normalize_x)
  int64_t history = 50;          // T0: (θ, g) pairs kept, oldest dropped first
  int64_t effective_dim = 0;     // 0 (or >= d): all coordinates; else a random subset of this size

  // Throws naming the option when a value is out of range.
  void validate() const;
};

// Matérn-5/2 with amplitude 1 at distance r >= 0.
double matern52(double r, double lengthscale);

// Factors the symmetric n×n row-major `a` in place into its lower Cholesky factor L (a = L·Lᵀ; the
// upper triangle is left as it was). Throws kraken::Error naming `what`, the pivot and its value when a
// pivot is not clearly positive (<= n·ε·a_jj), i.e. a is not numerically positive definite.
void cholesky_factor(std::vector<double>& a, int64_t n, const std::string& what);
// Solves L·Lᵀ·x = b in place (b becomes x) with the factor from cholesky_factor.
void cholesky_solve(const std::vector<double>& l, int64_t n, std::vector<double>& b);

// Sums partial values across model-parallel ranks in place (identity on one rank).
using PartialSumHook = std::function<void(std::vector<double>&)>;

class KernelGradientEstimator {
 public:
  // dim: d, the length of the flat θ and g; device: where they live. The generator draws the subsets.
  KernelGradientEstimator(const KernelEstimatorOptions& options, int64_t dim, runtime::Device device,
                          runtime::Generator generator = runtime::Generator());

  // Device bytes of a full history: T0 pairs of d floats each for θ and g.
  static int64_t history_bytes(int64_t dim, int64_t history);

  // Appends (θ, g), flat f32 tensors of d elements on the device, kept as given (not copied: the caller
  // must not write to them afterwards). A full history drops its oldest pair and returns it, so its
  // buffers can be reused.
  std::optional<std::pair<runtime::Tensor, runtime::Tensor>> push(runtime::Tensor theta, runtime::Tensor grad);
  void clear();
  int64_t size() const { return static_cast<int64_t>(entries_.size()); }
  const runtime::Tensor& theta(int64_t i) const;  // i = 0 is the oldest
  const runtime::Tensor& grad(int64_t i) const;

  // Prepares μ from the current history: subset, input scale, K_n + σ²I and its Cholesky factor.
  void fit();
  // Whether the last fit saw at least two pairs (otherwise μ ≡ 0).
  bool defined() const { return fitted_n_ >= 2; }
  int64_t fitted_size() const { return fitted_n_; }
  // out = μ(θ) (flat, d elements, on the device). Returns defined(); writes zeros when μ ≡ 0.
  bool predict(const runtime::Tensor& theta, runtime::Tensor& out);
  // k(θ, θ_τ) for the pairs of the last fit, with the scale and subset predict uses.
  std::vector<double> kernel_row(const runtime::Tensor& theta);
  // w = (K_n + σ²I)⁻¹ k_n(θ): μ(θ) = Σ_τ w_τ g_τ.
  std::vector<double> weights(const runtime::Tensor& theta);

  double input_scale() const { return scale_; }
  const std::vector<int32_t>& subset() const { return subset_; }  // empty: every coordinate
  const std::vector<double>& gram() const { return gram_; }       // K_n + σ²I of the last fit, row-major

  const KernelEstimatorOptions& options() const { return options_; }
  int64_t dim() const { return dim_; }
  const runtime::Device& device() const { return device_; }
  runtime::Generator& generator() { return generator_; }
  const runtime::Generator& generator() const { return generator_; }
  void set_partial_sum_hook(PartialSumHook hook) { reduce_ = std::move(hook); }
  // Model parallelism: the coordinate ranges [begin, end) of the flat vector this rank counts in norms
  // and distances. A parameter replicated on every tensor-parallel rank, or a tied copy, is counted on
  // one rank only, so that the summed partials equal the single-process sums. Empty: every coordinate.
  // Not combined with effective_dim (each rank would draw its own subset).
  void set_counted_ranges(std::vector<std::pair<int64_t, int64_t>> ranges);
  // Σ x² and Σ (x − row)² over the counted ranges (all of x when there are none).
  double counted_sum_squares(const runtime::Tensor& x) const;
  std::vector<double> counted_squared_distances(const runtime::Tensor& x, const std::vector<runtime::Tensor>& rows) const;

 private:
  struct Entry {
    runtime::Tensor theta, grad;
    uint64_t id = 0;
    double sq_norm = -1.0;  // full-dimension ‖θ‖², cached (-1: not yet known)
  };
  void check_flat(const char* what, const runtime::Tensor& t) const;
  void draw_subset();
  double kernel_of_sq_distance(double sq_distance) const;
  void reduce(std::vector<double>& values) const;

  KernelEstimatorOptions options_;
  int64_t dim_;
  runtime::Device device_;
  runtime::Generator generator_;
  PartialSumHook reduce_;
  std::vector<std::pair<int64_t, int64_t>> counted_;

  std::vector<Entry> entries_;  // oldest first (n <= T0, so erasing the front is cheap)
  uint64_t next_id_ = 0;
  std::map<std::pair<uint64_t, uint64_t>, double> sq_dist_;  // full-dimension cache, key (older id, newer id)

  // The last fit (stale once the history changes: queries then refuse until fit() runs again).
  int64_t fitted_n_ = 0;
  bool stale_ = true;
  std::vector<int32_t> subset_;
  runtime::Tensor subset_index_;  // subset_ on the device (i32)
  double scale_ = 1.0;
  std::vector<double> gram_, factor_;
};

}  // namespace kraken::optim
