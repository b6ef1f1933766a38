// Gradient norms and clipping by global norm (PyTorch's clip_grad_norm_ with the L2 norm).
//
// The squared norm is accumulated in double in a fixed order (each tensor in fixed blocks, tensors in
// the order given), so it is bit-identical for any thread count. Model-parallel ranks each hold part
// of every gradient: they call global_grad_norm_squared on their part, sum the results across ranks,
// and clip with clip_grad_norm_given.
#pragma once

#include <vector>

#include "runtime/tensor.h"

namespace kraken::optim {

// Σ over tensors of Σ_i g_i², in double (f32 tensors on any device).
double global_grad_norm_squared(const std::vector<runtime::Tensor>& grads);
// √(global_grad_norm_squared).
double global_grad_norm(const std::vector<runtime::Tensor>& grads);

// The factor clipping multiplies by: max_norm/(norm + 1e-6) when norm > max_norm, else 1.
double clip_coefficient(double norm, double max_norm);
// Scales every gradient in place by clip_coefficient(norm, max_norm) (a no-op when it is 1).
void clip_grad_norm_given(std::vector<runtime::Tensor>& grads, double norm, double max_norm);
// Computes the global norm, clips, and returns the norm before clipping.
double clip_grad_norm(std::vector<runtime::Tensor>& grads, double max_norm);

}  // namespace kraken::optim
