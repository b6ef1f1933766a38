// Helpers the grouped ops share (runtime/ops.h: a leading group dimension, a Kraken layer's stacked
// sub-layers). Internal to runtime/ops.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/ops.h"
#include "runtime/tensor.h"

namespace kraken::runtime::ops {

// Σ over the rows of each of `groups` consecutive (rows, cols) blocks of d: a new (groups, cols) tensor of
// d's dtype (f32 anywhere, bf16 on CUDA) — the bias gradients of a grouped linear or MLP. The columns of
// `zero` (ops::linear's zero_grad) are zeros, their d unread where the bf16 kernel takes the shape.
Tensor group_row_sums(const Tensor& d, int64_t groups, int64_t rows, int64_t cols, BiasColumns zero = {});
// Zeros in columns [zero.first, zero.first + zero.count) of every row of db (groups, cols).
void zero_bias_columns(const Tensor& db, int64_t groups, int64_t cols, BiasColumns zero);
// out[g] = in[g] + bias[g] on every row, for each of `groups` consecutive (rows, cols) blocks (out may be
// in; bias (groups, cols); f32 anywhere, bf16 on CUDA): a grouped linear's biases, the forward of the
// gradient group_row_sums takes.
void add_group_biases(const Tensor& out, const Tensor& in, const Tensor& bias, int64_t groups, int64_t rows,
                      int64_t cols);

// Records residual_fork_summed's node for outputs a kernel computed (x, y bf16 (G, ...) on a GPU; a and m
// as residual_fork_summed returns them): its backward's kernel, or the chain's ops where that declines.
void record_residual_fork_summed(const Tensor& x, const Tensor& y, const Tensor& a, const Tensor& m);
// That node's backward: {dx, dy} (each undefined where its input needs none) from da and dm (either may be
// undefined: zeros), x and y of `shape`.
std::vector<Tensor> residual_fork_summed_backward(const Shape& shape, bool x_needs, bool y_needs, const Tensor& da,
                                                  const Tensor& dm);

}  // namespace kraken::runtime::ops
