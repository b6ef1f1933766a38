// CUDA softmax over the last dimension (equations in kernels/softmax.h): one block per row, block
// reductions as a shuffle butterfly per warp and then warp 0 over the warps' results, a fixed order.
#include <cmath>

#include "kernels/cuda/check.h"
#include "kernels/cuda/launch.h"
#include "kernels/softmax.h"

namespace kraken::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ inline float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
__device__ inline float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// The block's sum (kMax = false) or maximum (kMax = true) of v, returned to every thread.
template <bool kMax>
__device__ float block_reduce(float v) {
  __shared__ float partial[kWarps];
  __shared__ float result;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < kWarps ? partial[lane] : (kMax ? -INFINITY : 0.0f);
    w = kMax ? warp_max(w) : warp_sum(w);
    if (lane == 0) result = w;
  }
  __syncthreads();
  return result;
}

__global__ void softmax_forward_kernel(float* y, const float* x, int64_t C) {
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * C;
  float* yr = y + static_cast<int64_t>(blockIdx.x) * C;
  float m = -INFINITY;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) m = fmaxf(m, xr[c]);
  m = block_reduce<true>(m);
  const float shift = isfinite(m) ? m : 0.0f;  // a row of −inf: exp(−inf) = 0 rather than NaN
  float sum = 0.0f;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const float e = expf(xr[c] - shift);
    yr[c] = e;
    sum += e;
  }
  const float inv = 1.0f / block_reduce<false>(sum);
  for (int64_t c = threadIdx.x; c < C; c += kThreads) yr[c] *= inv;  // the same thread wrote yr[c]
}

// dx += y ∘ (dy − Σ dy∘y)
__global__ void softmax_backward_kernel(float* dx, const float* y, const float* dy, int64_t C) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * C;
  float dot = 0.0f;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) dot += dy[base + c] * y[base + c];
  dot = block_reduce<false>(dot);
  for (int64_t c = threadIdx.x; c < C; c += kThreads) dx[base + c] += y[base + c] * (dy[base + c] - dot);
}

}  // namespace

void softmax_forward_cuda(float* y, const float* x, int64_t rows, int64_t C, CUstream_st* stream) {
  if (rows <= 0 || C <= 0) return;
  KRAKEN_KERNEL(static_cast<unsigned int>(rows), kThreads, 0, stream, softmax_forward_kernel)(y, x, C);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

void softmax_backward_cuda(float* dx, const float* y, const float* dy, int64_t rows, int64_t C, CUstream_st* stream) {
  // in the forward pass this was: y = exp(x − m)/Σ exp(x − m)
  if (rows <= 0 || C <= 0) return;
  KRAKEN_KERNEL(static_cast<unsigned int>(rows), kThreads, 0, stream, softmax_backward_kernel)(dx, y, dy, C);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

}  // namespace kraken::kernels
