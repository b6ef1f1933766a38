// CUDA optimizer kernels (equations in kernels/optimizer.h): one fused pass per parameter for AdamW
// and SGD over f32 master weights and state, and fixed-shape reductions in double.
//
// Reductions: a fixed grid of kReducePartials blocks of kReduceThreads threads; thread j of the grid
// accumulates elements j, j + G, j + 2G, … (G = grid size) in order, each block reduces its threads in
// a fixed shared-memory tree into partials[block], and one block then reduces the partials in a fixed
// tree and adds the result to *total. No atomics, so the result is the same bits every run.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/storage.h"
#include "kernels/optimizer.h"

namespace kraken::kernels {
namespace {

using cuda_detail::aligned16;
using cuda_detail::blocks_for;
constexpr int kThreads = 256;
constexpr int kReduceThreads = 256;

#define KRAKEN_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// One AdamW step of one element (kernels/optimizer.h), in registers; decay, step_size and bc2_sqrt come
// from adamw_constants.
__device__ __forceinline__ void adamw_step(float& param, float& m, float& v, float grad, float decay,
                                           float step_size, float bc2_sqrt, float beta1, float beta2, float eps,
                                           float grad_scale) {
  const float g = grad_scale * grad;
  const float mi = beta1 * m + (1.0f - beta1) * g;
  const float vi = beta2 * v + (1.0f - beta2) * (g * g);
  m = mi;
  v = vi;
  const float denom = sqrtf(vi) / bc2_sqrt + eps;
  param = param * decay - step_size * (mi / denom);
}

// copy (null: none): the new parameter's bf16 copy, rounded once (kernels/optimizer.h).
__device__ __forceinline__ void adamw_element(float* param, const float* grad, float* m, float* v, int64_t i,
                                              float decay, float step_size, float bc2_sqrt, float beta1,
                                              float beta2, float eps, float grad_scale,
                                              __nv_bfloat16* copy = nullptr) {
  float p = param[i], mi = m[i], vi = v[i];
  adamw_step(p, mi, vi, grad[i], decay, step_size, bc2_sqrt, beta1, beta2, eps, grad_scale);
  param[i] = p;
  m[i] = mi;
  v[i] = vi;
  if (copy) copy[i] = __float2bfloat16_rn(p);
}

// Elements 4q .. 4q + 3 in 16-byte accesses (all four arrays 16-byte aligned): the same steps.
__device__ __forceinline__ void adamw_quad(float* param, const float* grad, float* m, float* v, int64_t q,
                                           float decay, float step_size, float bc2_sqrt, float beta1, float beta2,
                                           float eps, float grad_scale, __nv_bfloat16* copy) {
  float4 p = reinterpret_cast<float4*>(param)[q], mi = reinterpret_cast<float4*>(m)[q];
  float4 vi = reinterpret_cast<float4*>(v)[q];
  const float4 g = reinterpret_cast<const float4*>(grad)[q];
  adamw_step(p.x, mi.x, vi.x, g.x, decay, step_size, bc2_sqrt, beta1, beta2, eps, grad_scale);
  adamw_step(p.y, mi.y, vi.y, g.y, decay, step_size, bc2_sqrt, beta1, beta2, eps, grad_scale);
  adamw_step(p.z, mi.z, vi.z, g.z, decay, step_size, bc2_sqrt, beta1, beta2, eps, grad_scale);
  adamw_step(p.w, mi.w, vi.w, g.w, decay, step_size, bc2_sqrt, beta1, beta2, eps, grad_scale);
  reinterpret_cast<float4*>(param)[q] = p;
  reinterpret_cast<float4*>(m)[q] = mi;
  reinterpret_cast<float4*>(v)[q] = vi;
  if (copy) {  // one 8-byte store (copy 8-byte aligned where the slice takes quads; two pairs were two stores)
    const __nv_bfloat162 low = __floats2bfloat162_rn(p.x, p.y), high = __floats2bfloat162_rn(p.z, p.w);
    uint2 bits;
    __builtin_memcpy(&bits.x, &low, sizeof(bits.x));
    __builtin_memcpy(&bits.y, &high, sizeof(bits.y));
    reinterpret_cast<uint2*>(copy)[q] = bits;
  }
}

__global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, int64_t n, float decay,
                             float step_size, float bc2_sqrt, float beta1, float beta2, float eps,
                             float grad_scale) {
  KRAKEN_GRID_STRIDE(i, n) {
    adamw_element(param, grad, m, v, i, decay, step_size, bc2_sqrt, beta1, beta2, eps, grad_scale);
  }
}

// Up to kManyTensors slices per launch, passed by value (about 1.6 KiB of kernel parameters). Slice k
// owns blocks [first_block[k], first_block[k + 1]) and strides over its elements with them.
constexpr int kManyTensors = 32;
constexpr int64_t kMaxBlocksPerSlice = 1024;
struct AdamWChunk {
  float* param[kManyTensors];
  const float* grad[kManyTensors];
  float* m[kManyTensors];
  float* v[kManyTensors];
  __nv_bfloat16* copy[kManyTensors];  // null: no bf16 copy
  int64_t n[kManyTensors];
  float decay[kManyTensors];
  int first_block[kManyTensors + 1];
  bool quads[kManyTensors];  // the slice's arrays are 16-byte aligned: 4 elements per access
  int count;
};

__global__ void adamw_many_kernel(AdamWChunk c, float step_size, float bc2_sqrt, float beta1, float beta2, float eps,
                                  float grad_scale) {
  const int b = static_cast<int>(blockIdx.x);
  int k = 0;
  while (k + 1 < c.count && c.first_block[k + 1] <= b) ++k;  // the slice this block belongs to
  const int64_t blocks = c.first_block[k + 1] - c.first_block[k];
  const int64_t first = (b - c.first_block[k]) * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = blocks * blockDim.x;
  int64_t scalar_from = 0;
  if (c.quads[k]) {  // (AdamW moved 63% of an H200's bandwidth with 4-byte accesses)
    const int64_t quads = c.n[k] / 4;
    for (int64_t q = first; q < quads; q += stride)
      adamw_quad(c.param[k], c.grad[k], c.m[k], c.v[k], q, c.decay[k], step_size, bc2_sqrt, beta1, beta2, eps,
                 grad_scale, c.copy[k]);
    scalar_from = 4 * quads;
  }
  for (int64_t i = scalar_from + first; i < c.n[k]; i += stride)
    adamw_element(c.param[k], c.grad[k], c.m[k], c.v[k], i, c.decay[k], step_size, bc2_sqrt, beta1, beta2, eps,
                  grad_scale, c.copy[k]);
}

// One element of SGD (kernels/optimizer.h).
__device__ __forceinline__ void sgd_element(float* param, const float* grad, float* velocity, int64_t i, float lr,
                                            float momentum, float dampening, bool nesterov, float weight_decay,
                                            bool first_step, float grad_scale) {
  const float g = grad_scale * grad[i];
  float d = weight_decay != 0.0f ? g + weight_decay * param[i] : g;
  if (momentum != 0.0f) {
    const float buf = first_step ? d : momentum * velocity[i] + (1.0f - dampening) * d;
    velocity[i] = buf;
    d = nesterov ? d + momentum * buf : buf;
  }
  param[i] -= lr * d;
}

__global__ void sgd_kernel(float* param, const float* grad, float* velocity, int64_t n, float lr, float momentum,
                           float dampening, bool nesterov, float weight_decay, bool first_step, float grad_scale) {
  KRAKEN_GRID_STRIDE(i, n) {
    sgd_element(param, grad, velocity, i, lr, momentum, dampening, nesterov, weight_decay, first_step, grad_scale);
  }
}

// As AdamWChunk, for SGD.
struct SgdChunk {
  float* param[kManyTensors];
  const float* grad[kManyTensors];
  float* velocity[kManyTensors];
  __nv_bfloat16* copy[kManyTensors];  // null: no bf16 copy
  int64_t n[kManyTensors];
  float weight_decay[kManyTensors];
  int first_block[kManyTensors + 1];
  int count;
};

__global__ void sgd_many_kernel(SgdChunk c, float lr, float momentum, float dampening, bool nesterov,
                                bool first_step, float grad_scale) {
  const int b = static_cast<int>(blockIdx.x);
  int k = 0;
  while (k + 1 < c.count && c.first_block[k + 1] <= b) ++k;  // the slice this block belongs to
  const int64_t blocks = c.first_block[k + 1] - c.first_block[k];
  for (int64_t i = (b - c.first_block[k]) * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < c.n[k];
       i += blocks * blockDim.x) {
    sgd_element(c.param[k], c.grad[k], c.velocity[k], i, lr, momentum, dampening, nesterov, c.weight_decay[k],
                first_step, grad_scale);
    if (c.copy[k]) c.copy[k][i] = __float2bfloat16_rn(c.param[k][i]);
  }
}

// Fixed shared-memory tree over kReduceThreads values; thread 0 returns the sum.
__device__ double block_reduce(double value) {
  __shared__ double shared[kReduceThreads];
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kReduceThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  return shared[0];
}

// mode 0: Σ a²; mode 1: Σ (a − b)²; indexed when idx is not null.
__global__ void partial_sums_kernel(double* partials, const float* a, const float* b, const int32_t* idx, int64_t n) {
  double acc = 0.0;
  KRAKEN_GRID_STRIDE(i, n) {
    const int64_t k = idx ? static_cast<int64_t>(idx[i]) : i;
    const double diff = b ? static_cast<double>(a[k]) - static_cast<double>(b[k]) : static_cast<double>(a[k]);
    acc += diff * diff;
  }
  const double block_sum = block_reduce(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = block_sum;
}

__global__ void finish_sum_kernel(double* total, const double* partials) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < kReducePartials; i += kReduceThreads) acc += partials[i];
  const double sum = block_reduce(acc);
  if (threadIdx.x == 0) *total += sum;
}

// Up to kManyTensors tensors per launch. Thread j of the grid (G threads) takes, tensor after tensor,
// the 16-byte pieces j, j + G, … of each whose pointer allows them, then its elements past the last
// whole piece (or all of them, one by one, where the pointer does not), squaring in double in that
// order, so the sum's order is fixed by the sizes and alignments alone. Four pieces are loaded before
// any is added: one 4-byte load at a time per thread kept only ~0.3 MB in flight over the grid, a
// quarter of an H200's bandwidth (0.46 ms for GPT-2's gradients, where 0.12 ms is the bytes' time).
struct SquaresChunk {
  const float* x[kManyTensors];
  int64_t n[kManyTensors];
  bool wide[kManyTensors];
  int count;
};

__device__ __forceinline__ void add_squares(double& acc, const float4& q) {
  acc += static_cast<double>(q.x) * q.x;
  acc += static_cast<double>(q.y) * q.y;
  acc += static_cast<double>(q.z) * q.z;
  acc += static_cast<double>(q.w) * q.w;
}

__global__ void partial_squares_many_kernel(double* partials, SquaresChunk c) {
  const int64_t G = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double acc = 0.0;
  for (int k = 0; k < c.count; ++k) {
    const float* x = c.x[k];
    const int64_t n = c.n[k];
    int64_t scalar_from = 0;
    if (c.wide[k]) {
      const float4* q = reinterpret_cast<const float4*>(x);
      const int64_t pieces = n / 4;
      int64_t p = j;
      for (; p + 3 * G < pieces; p += 4 * G) {
        const float4 a = q[p], b = q[p + G], d = q[p + 2 * G], e = q[p + 3 * G];
        add_squares(acc, a);
        add_squares(acc, b);
        add_squares(acc, d);
        add_squares(acc, e);
      }
      for (; p < pieces; p += G) add_squares(acc, q[p]);
      scalar_from = 4 * pieces;
    }
    for (int64_t i = scalar_from + j; i < n; i += G) {
      const double v = static_cast<double>(x[i]);
      acc += v * v;
    }
  }
  const double block_sum = block_reduce(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = block_sum;
}

void reduce_into(double* total, double* partials, const float* a, const float* b, const int32_t* idx, int64_t n,
                 CUstream_st* stream) {
  if (n <= 0) return;
  KRAKEN_KERNEL(kReducePartials, kReduceThreads, 0, stream, partial_sums_kernel)(partials, a, b, idx, n);
  KRAKEN_CUDA_LAUNCH_CHECK();
  KRAKEN_KERNEL(1, kReduceThreads, 0, stream, finish_sum_kernel)(total, partials);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

// Passed by value (2 KiB of kernel parameters): the row pointers and their weights.
struct WeightedRows {
  const float* rows[kWeightedRowsPerLaunch];
  double weights[kWeightedRowsPerLaunch];
  int count;
};

__global__ void weighted_sum_rows_kernel(float* out, WeightedRows rows, int64_t n, bool accumulate) {
  KRAKEN_GRID_STRIDE(i, n) {
    double acc = 0.0;
    for (int r = 0; r < rows.count; ++r) acc += rows.weights[r] * static_cast<double>(rows.rows[r][i]);
    out[i] = accumulate ? out[i] + static_cast<float>(acc) : static_cast<float>(acc);
  }
}

// The per-call constants, computed once in double and rounded to f32 (kernels/optimizer.h); both
// AdamW entry points use these, which is what keeps them bit-identical per element.
struct AdamWConstants {
  float step_size, bc2_sqrt;
};
AdamWConstants adamw_constants(float lr, float beta1, float beta2, int64_t step) {
  const double t = static_cast<double>(step);
  return {static_cast<float>(lr / (1.0 - std::pow(static_cast<double>(beta1), t))),
          static_cast<float>(std::sqrt(1.0 - std::pow(static_cast<double>(beta2), t)))};
}
float adamw_decay(float lr, float weight_decay) {
  return static_cast<float>(1.0 - static_cast<double>(lr) * weight_decay);
}

}  // namespace

void adamw_update_cuda(float* param, const float* grad, float* m, float* v, int64_t n, float lr, float beta1,
                       float beta2, float eps, float weight_decay, int64_t step, CUstream_st* stream,
                       float grad_scale) {
  if (n <= 0) return;
  const AdamWConstants k = adamw_constants(lr, beta1, beta2, step);
  KRAKEN_KERNEL(blocks_for(n, kThreads), kThreads, 0, stream, adamw_kernel)
  (param, grad, m, v, n, adamw_decay(lr, weight_decay), k.step_size, k.bc2_sqrt, beta1, beta2, eps, grad_scale);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

void sgd_update_cuda(float* param, const float* grad, float* velocity, int64_t n, float lr, float momentum,
                     float dampening, bool nesterov, float weight_decay, bool first_step, CUstream_st* stream,
                     float grad_scale) {
  if (n <= 0) return;
  KRAKEN_KERNEL(blocks_for(n, kThreads), kThreads, 0, stream, sgd_kernel)
  (param, grad, velocity, n, lr, momentum, dampening, nesterov, weight_decay, first_step, grad_scale);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

void adamw_update_many_cuda(const AdamWSlice* slices, int64_t count, float lr, float beta1, float beta2, float eps,
                            int64_t step, CUstream_st* stream, float grad_scale) {
  const AdamWConstants k = adamw_constants(lr, beta1, beta2, step);
  AdamWChunk chunk{};
  auto launch = [&] {
    if (chunk.count == 0 || chunk.first_block[chunk.count] == 0) return;
    KRAKEN_KERNEL(static_cast<unsigned int>(chunk.first_block[chunk.count]), kThreads, 0, stream, adamw_many_kernel)
    (chunk, k.step_size, k.bc2_sqrt, beta1, beta2, eps, grad_scale);
    KRAKEN_CUDA_LAUNCH_CHECK();
  };
  for (int64_t s = 0; s < count; ++s) {
    const AdamWSlice& x = slices[s];
    if (x.n <= 0) continue;
    const int j = chunk.count;
    chunk.param[j] = x.param;
    chunk.grad[j] = x.grad;
    chunk.m[j] = x.m;
    chunk.v[j] = x.v;
    chunk.copy[j] = reinterpret_cast<__nv_bfloat16*>(x.copy);
    chunk.n[j] = x.n;
    chunk.decay[j] = adamw_decay(lr, x.weight_decay);
    chunk.quads[j] = aligned16(x.param) && aligned16(x.grad) && aligned16(x.m) && aligned16(x.v) &&
                     reinterpret_cast<uintptr_t>(x.copy) % 8 == 0;
    const int64_t blocks = std::min<int64_t>(kMaxBlocksPerSlice, (x.n + kThreads - 1) / kThreads);
    chunk.first_block[j + 1] = chunk.first_block[j] + static_cast<int>(blocks);
    chunk.count = j + 1;
    if (chunk.count == kManyTensors) {
      launch();
      chunk = AdamWChunk{};
    }
  }
  launch();
}

void sgd_update_many_cuda(const SgdSlice* slices, int64_t count, float lr, float momentum, float dampening,
                          bool nesterov, bool first_step, CUstream_st* stream, float grad_scale) {
  SgdChunk chunk{};
  auto launch = [&] {
    if (chunk.count == 0 || chunk.first_block[chunk.count] == 0) return;
    KRAKEN_KERNEL(static_cast<unsigned int>(chunk.first_block[chunk.count]), kThreads, 0, stream, sgd_many_kernel)
    (chunk, lr, momentum, dampening, nesterov, first_step, grad_scale);
    KRAKEN_CUDA_LAUNCH_CHECK();
  };
  for (int64_t s = 0; s < count; ++s) {
    const SgdSlice& x = slices[s];
    if (x.n <= 0) continue;
    KRAKEN_CHECK(momentum == 0.0f || x.velocity != nullptr, "sgd_update_many_cuda: momentum needs a velocity");
    const int j = chunk.count;
    chunk.param[j] = x.param;
    chunk.grad[j] = x.grad;
    chunk.velocity[j] = x.velocity;
    chunk.copy[j] = reinterpret_cast<__nv_bfloat16*>(x.copy);
    chunk.n[j] = x.n;
    chunk.weight_decay[j] = x.weight_decay;
    const int64_t blocks = std::min<int64_t>(kMaxBlocksPerSlice, (x.n + kThreads - 1) / kThreads);
    chunk.first_block[j + 1] = chunk.first_block[j] + static_cast<int>(blocks);
    chunk.count = j + 1;
    if (chunk.count == kManyTensors) {
      launch();
      chunk = SgdChunk{};
    }
  }
  launch();
}

void sum_squares_accumulate_cuda(double* total, double* partials, const float* x, int64_t n, CUstream_st* stream) {
  reduce_into(total, partials, x, nullptr, nullptr, n, stream);
}

void sum_squares_many_accumulate_cuda(double* total, double* partials, const float* const* xs, const int64_t* sizes,
                                      int64_t count, CUstream_st* stream) {
  SquaresChunk chunk{};
  auto launch = [&] {
    if (chunk.count == 0) return;
    KRAKEN_KERNEL(kReducePartials, kReduceThreads, 0, stream, partial_squares_many_kernel)(partials, chunk);
    KRAKEN_CUDA_LAUNCH_CHECK();
    KRAKEN_KERNEL(1, kReduceThreads, 0, stream, finish_sum_kernel)(total, partials);
    KRAKEN_CUDA_LAUNCH_CHECK();
  };
  for (int64_t s = 0; s < count; ++s) {
    if (sizes[s] <= 0) continue;
    const int k = chunk.count;
    chunk.x[k] = xs[s];
    chunk.n[k] = sizes[s];
    chunk.wide[k] = aligned16(xs[s]);
    chunk.count = k + 1;
    if (chunk.count == kManyTensors) {
      launch();
      chunk = SquaresChunk{};
    }
  }
  launch();
}

void squared_distance_accumulate_cuda(double* total, double* partials, const float* a, const float* b, int64_t n,
                                      CUstream_st* stream) {
  reduce_into(total, partials, a, b, nullptr, n, stream);
}

void squared_distance_indexed_accumulate_cuda(double* total, double* partials, const float* a, const float* b,
                                              const int32_t* idx, int64_t m, CUstream_st* stream) {
  reduce_into(total, partials, a, b, idx, m, stream);
}

void weighted_sum_rows_cuda(float* out, const float* const* rows, const double* weights, int64_t count, int64_t n,
                            CUstream_st* stream) {
  if (n <= 0) return;
  if (count == 0) {
    KRAKEN_CUDA_CHECK(cudaMemsetAsync(out, 0, static_cast<size_t>(n) * sizeof(float), stream));
    return;
  }
  for (int64_t first = 0; first < count; first += kWeightedRowsPerLaunch) {
    WeightedRows chunk{};
    chunk.count = static_cast<int>(std::min<int64_t>(kWeightedRowsPerLaunch, count - first));
    for (int r = 0; r < chunk.count; ++r) {
      chunk.rows[r] = rows[first + r];
      chunk.weights[r] = weights[first + r];
    }
    KRAKEN_KERNEL(blocks_for(n, kThreads), kThreads, 0, stream, weighted_sum_rows_kernel)(out, chunk, n, first > 0);
    KRAKEN_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace kraken::kernels
