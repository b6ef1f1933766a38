// Softmax over the last dimension of rows of length C.
//
// Forward (numerically stable, the maximum subtracted first):
//   y[r, c] = exp(x[r, c] − m_r) / Σ_k exp(x[r, k] − m_r),   m_r = max_k x[r, k]
// Backward, from y = softmax(x):  dx[r, :] += y[r, :] ∘ (dy[r, :] − Σ_k dy[r, k]·y[r, k]).
// Buffers are contiguous (rows, C); the backward accumulates into dx (the caller zeroes it for "=").
// Every row is reduced by one thread in a fixed order, so results do not depend on the thread count.
#pragma once

#include <cstdint>

#include "kernels/vector_math.h"  // exp_vectorisable

struct CUstream_st;

namespace kraken::kernels {

// ---- CPU ---------------------------------------------------------------------------------------
void softmax_forward_cpu(float* y, const float* x, int64_t rows, int64_t C);
void softmax_backward_cpu(float* dx, const float* y, const float* dy, int64_t rows, int64_t C);

// ---- CUDA (same contracts, fp32) ----------------------------------------------------------------
void softmax_forward_cuda(float* y, const float* x, int64_t rows, int64_t C, CUstream_st* stream);
void softmax_backward_cuda(float* dx, const float* y, const float* dy, int64_t rows, int64_t C,
                           CUstream_st* stream);

}  // namespace kraken::kernels
