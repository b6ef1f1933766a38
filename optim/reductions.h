// Double-precision reductions over flat f32 tensors, on the tensors' device, results on the host.
// Shared by gradient clipping and the OptEx estimator; every one has a fixed summation order
// (kernels/optimizer.h), so results do not depend on the thread count.
#pragma once

#include <vector>

#include "runtime/tensor.h"

namespace kraken::optim {

// Σ_k Σ_i xs[k][i]², tensors in order (each may be on any device).
double sum_squares(const std::vector<runtime::Tensor>& xs);
// out[r] = ‖q − rows[r]‖², all on q's device, every tensor of q's element count.
std::vector<double> squared_distances(const runtime::Tensor& q, const std::vector<runtime::Tensor>& rows);
// Σ_j (a[idx[j]] − b[idx[j]])² with idx an i32 tensor on a's device; b undefined gives Σ_j a[idx[j]]².
double squared_distance_indexed(const runtime::Tensor& a, const runtime::Tensor& b, const runtime::Tensor& idx);
// out = Σ_r weights[r]·rows[r] (accumulated in double), all on out's device.
void weighted_sum_rows(runtime::Tensor& out, const std::vector<runtime::Tensor>& rows, const std::vector<double>& weights);

}  // namespace kraken::optim
