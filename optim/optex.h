// OptEx: approximately parallelised iterations of a base optimizer (Shu et al., NeurIPS 2024, §4.2–4.3;
// spec: shared/research/optex.md §3, read from the reference JAX code's run_optex).
//
// One sequential iteration t with parallelism N, base optimizer OPT with state S, history H:
//   fit μ from H (μ ≡ 0 below two pairs)                         (optim/optex_estimator.h)
//   θ^(0), S^(0) = θ, S
//   θ^(s), S^(s) = OPT(θ^(s−1), S^(s−1), μ(θ^(s−1)))   s = 1..N−1   (proxy steps, no oracle calls)
//   g_s = ∇f(θ^(s); ξ_{t,s})                             s = 0..N−1   (N true gradients, N micro-batches)
//   θ_t, S_t = OPT(θ^(N−1), S^(N−1), g_{N−1})                        (the last worker's output)
//   H ← last T0 of H + [(θ^(s), g_s), s = 0..N−1]
//
// Single process runs it in place: the parameters and the base state walk the proxy path, and the
// true gradient at each point is taken when the walk is there:
//   for s = 0..N−1:
//     points[s] = θ;  g[s] = oracle(s)                   (the oracle computes at the current parameters)
//     if s < N−1: OPT.step(μ(θ))                          (θ, S ← θ^(s+1), S^(s+1))
//   OPT.step(g[N−1])
// The spec's N workers each also take a true step from their own point, (θ'_s, S'_s) =
// OPT(θ^(s), S^(s), g_s), but only the last worker's output is kept; so worker s < N−1 contributes only
// g_s (to the history), and the one true step that matters is taken from (θ^(N−1), S^(N−1)) — the place
// the in-place walk has reached. No copy of the base state is needed. The next iterate being the last
// worker's is the reference code's choice (idx = −1); the paper's ablation of other selections is
// [UNVERIFIED] and not implemented. So is the "sequential" variant of its Fig. 6(a) ([UNVERIFIED] what
// it is): evaluating the N gradients one after another here does not refit μ in between, so a
// single-process run computes exactly what N parallel workers would (the tests check both forms).
//
// Across rank groups (the multi-group version) every rank walks the same proxy path; evaluation s
// belongs to one group. `owned(s)` says whether this process computes g_s; after the walk `exchange`
// fills in the others, so every rank extends the history with the same pairs. Single process: every s
// is owned and there is nothing to exchange. `reduce_partials` sums partial squared norms and distances
// across model-parallel ranks (identity by default).
//
// The base optimizer's step counter advances by N per sequential iteration (N−1 proxy steps, one true
// step), as in the reference code. N = 1 is exactly the base optimizer: no history is kept, no proxy
// step taken, and the oracle's gradients go straight to OPT.step.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "optim/optex_estimator.h"
#include "optim/optimizer.h"

namespace kraken::optim {

struct OptExOptions {
  int parallelism = 4;                 // N: gradient evaluations per sequential iteration
  KernelEstimatorOptions estimator;    // history T0, lengthscale, noise, normalize_inputs, effective_dim
  uint64_t seed = 0;                   // the estimator's generator (coordinate subsets)
  bool measure_last_point = true;      // also query μ(θ^(N−1)) to report its error (one more O(n·d) query)

  void validate() const;
};

// Device bytes OptEx holds beside the model and the base optimizer, for d parameters: the history
// (2·T0·d floats), the N points and N gradients of one iteration (2·N·d), and the proxy gradient (d).
int64_t optex_device_bytes(int64_t dim, const OptExOptions& options);

// Returns ∇f at the current parameters on micro-batch s: one f32 tensor per parameter, in the base
// optimizer's params() order (e.g. the parameters' .grad() after zero_grad, forward and backward). The
// tensors are copied before the parameters move again, so .grad() buffers may be reused. Gradient
// clipping, if any, belongs in the oracle: the history then holds what the optimizer was given. (The
// reference code logs the loss at θ^(N−1), i.e. the oracle's last call of an iteration.)
using GradientOracle = std::function<std::vector<runtime::Tensor>(int s)>;

struct OptExHooks {
  std::function<bool(int s)> owned;  // null: this process computes every g_s
  // Fills grads[s] (flat, d elements) for every s with owned[s] == false; called once per iteration
  // after the walk, only when some s is not owned.
  std::function<void(std::vector<runtime::Tensor>& grads, const std::vector<bool>& owned)> exchange;
  PartialSumHook reduce_partials;  // null: identity
};

struct OptExReport {
  int64_t iteration = 0;             // sequential iterations completed, this one included
  int64_t gradient_evaluations = 0;  // true gradients taken so far, all groups together
  int parallelism = 1;
  int64_t history_size = 0;          // pairs μ was fitted on this iteration
  // ‖μ(θ^(s)) − g_s‖/‖g_s‖ per s: the proxy gradient against the true gradient later taken at the same
  // point. NaN where μ ≡ 0, where s is not owned, and at s = N−1 unless measure_last_point.
  std::vector<double> proxy_relative_error;
  std::vector<double> proxy_cosine;  // cos∠(μ(θ^(s)), g_s), NaN where the error is
  double seconds_total = 0;      // the whole iteration
  double seconds_gradients = 0;  // inside the oracle
  double seconds_fit = 0;        // estimator fit
  double seconds_proxy = 0;      // copying points, μ queries, proxy steps, error measurements
  double seconds_exchange = 0;   // the exchange callback
  double seconds_update = 0;     // the final true step and the history update

  double seconds_outside_gradients() const { return seconds_total - seconds_gradients; }
  double mean_relative_error() const;  // over the finite entries; NaN when there are none
  double mean_cosine() const;
};

class OptEx {
 public:
  // Every parameter of `base` must be on one device (the history lives there).
  OptEx(std::unique_ptr<Optimizer> base, const OptExOptions& options, OptExHooks hooks = {});

  // One sequential iteration: N oracle calls, N−1 proxy steps and one true step, all at learning rate lr.
  OptExReport step(const GradientOracle& oracle, float lr);

  Optimizer& base() { return *base_; }
  const Optimizer& base() const { return *base_; }
  KernelGradientEstimator& estimator() { return estimator_; }
  const OptExOptions& options() const { return options_; }
  int64_t dim() const { return dim_; }
  int64_t iterations() const { return iterations_; }
  int64_t gradient_evaluations() const { return evaluations_; }

  // Checkpointing: the base state (names prefixed "base."), the history ("optex.theta.<i>",
  // "optex.grad.<i>", oldest first), and as scalars the counters, the estimator's generator state and
  // the base's scalars. An iteration is atomic, so there is no pending walk state between iterations.
  // Resuming continues bit-identically.
  NamedTensors state_tensors() const;
  nlohmann::json state_scalars() const;
  void load_state(const NamedTensors& tensors, const nlohmann::json& scalars);

 private:
  // Per-parameter views into a flat (d,) buffer, in params() order.
  std::vector<runtime::Tensor> views(const runtime::Tensor& flat) const;
  runtime::Tensor new_flat();  // a spare buffer the history gave back, or a new one
  void copy_params_into(const runtime::Tensor& flat) const;
  void copy_into(const runtime::Tensor& flat, const std::vector<runtime::Tensor>& parts) const;
  // Fills report entries s of proxy_relative_error and proxy_cosine for μ against g.
  void measure_error(const runtime::Tensor& mu, const runtime::Tensor& g, int s, OptExReport& report);

  std::unique_ptr<Optimizer> base_;
  OptExOptions options_;
  OptExHooks hooks_;
  runtime::Device device_;
  int64_t dim_ = 0;
  std::vector<int64_t> offsets_;  // of each parameter in the flat vector
  KernelGradientEstimator estimator_;
  std::vector<runtime::Tensor> points_, grads_;  // this iteration's θ^(s) and g_s (reused buffers)
  std::vector<runtime::Tensor> spare_;           // buffers the history gave back
  runtime::Tensor proxy_;                        // μ(θ^(s))
  int64_t iterations_ = 0;
  int64_t evaluations_ = 0;
};

}  // namespace kraken::optim
