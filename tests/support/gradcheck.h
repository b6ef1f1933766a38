// Finite-difference gradient checks shared by every op test.
//
// For an op y = f(x_1, …, x_k) we take a fixed random projection L = Σ_i w_i·y_i, so one backward pass
// (seeded with w) gives every ∂L/∂x, and compare sampled coordinates with central differences
// (L(x + εe_j) − L(x − εe_j)) / 2ε, where L is summed in double on the host.
//
// Why these tolerances are sound in f32: the ops compute in f32 (unit roundoff u = 6e-8). Central
// differences have truncation error ε²/6·|∂³L| and rounding error about u·‖w∘y‖₂/ε (only the outputs
// the perturbation touches differ; the rest are recomputed bit for bit and cancel). With ε = 1e-2,
// inputs and weights of order 1 and at most a few thousand touched outputs, both terms are below
// 1e-3 relative to gradients of order 1, so rtol = 5e-3 with a small atol for near-zero entries fails
// on any real mistake (a wrong sign, factor or index is O(1)) and never on rounding.
#pragma once

#include <functional>
#include <vector>

#include "runtime/tensor.h"

namespace kraken::testing {

struct GradCheckOptions {
  double eps = 1e-2;
  double rtol = 5e-3;
  double atol = 1e-4;
  int max_coords_per_input = 48;  // sampled coordinates per input (all, when the input is smaller)
  uint64_t seed = 1234;
};

using OpFn = std::function<runtime::Tensor(const std::vector<runtime::Tensor>&)>;

// Checks ∂L/∂inputs[i] for every input that requires grad; reports the worst coordinate on failure.
void expect_gradients_match(const OpFn& f, const std::vector<runtime::Tensor>& inputs,
                            const GradCheckOptions& options = {});

// A leaf of the given shape filled with N(0, std²) values from a fixed seed, requiring grad.
runtime::Tensor random_leaf(const runtime::Shape& shape, uint64_t seed, float std = 1.0f);

// max |a − b| and where, for test diagnostics.
struct MaxDiff {
  double value = 0.0;
  int64_t index = -1;
};
MaxDiff max_abs_diff(const std::vector<float>& a, const std::vector<float>& b);

}  // namespace kraken::testing
