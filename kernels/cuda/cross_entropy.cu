// CUDA cross-entropy fused with log-softmax (equations in kernels/cross_entropy.h).
//
// One block per row. The forward reads the row once: each thread keeps an online (max, Σ exp(x − max))
// pair over its strided columns (Milakov & Gimelshein 2018; bf16 rows 8 columns per load where the
// row is 16-byte aligned), and the pairs are merged by a fixed tree
// (shuffle butterfly per warp, then warp 0 over the warps). The backward reads the row once and
// writes its gradient once. The mean is one block summing in double, again in a fixed order.
// Forward and backward are templates on the storage type T of logits and dlogits (kernels/cuda/
// storage.h): f32, or bf16 widened on load with each dlogits element rounded once; losses and lse
// are f32 for both, and the arithmetic is the same f32 sequence.
#include <cmath>
#include <type_traits>

#include "kernels/cross_entropy.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/fast_exp.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/storage.h"

namespace kraken::kernels {
namespace {

using cuda_detail::aligned16;
using cuda_detail::as_bf16;
using cuda_detail::exp2_ftz;
using cuda_detail::load;
using cuda_detail::load8;
using cuda_detail::store;
using cuda_detail::store8;

constexpr int kThreads = 512;
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarps = kThreads / 32;
constexpr int kMeanThreads = 256;

// Running log-sum-exp state: Σ_i exp(x_i) = s·exp(m).
struct MaxSum {
  float m;
  float s;
};

// Merges two states. Each lane of the butterfly merges in its own fixed order (and only lane 0's
// result is used), so the result does not depend on scheduling.
__device__ inline MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};  // both empty: nothing to rescale (and no −inf − −inf)
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// merge with the wide path's exponential (thread_state).
__device__ inline MaxSum merge_exp2(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, a.s * exp2_ftz((a.m - m) * kLog2e) + b.s * exp2_ftz((b.m - m) * kLog2e)};
}

__device__ inline MaxSum warp_merge(MaxSum v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = merge(v, other);
  }
  return v;
}

// A thread's (max, sum) over its columns v = threadIdx.x, + kThreads, … One column at a time, or with
// kWide (bf16 rows on 16-byte boundaries) 8 columns per 16-byte load, folded into one state before
// the merge: one rescale per 8 columns instead of per new maximum, and an eighth of the load
// instructions (one column at a time, the bf16 forward moved 22% of an H200's bandwidth). The wide
// path's exponentials are 2^{(x − m)·log₂e} in one MUFU instruction (fast_exp.h): expf's range
// reduction made them most of the kernel's instructions (39% of the bandwidth). x − m is exactly 0 for
// the maximum, so it still counts 1 exactly; a NaN becomes the maximum and propagates.
template <typename T, bool kWide>
__device__ MaxSum thread_state(const T* xr, int64_t V) {
  MaxSum acc{-INFINITY, 0.0f};
  int64_t first = 0;
  if constexpr (kWide) {
    const int64_t packs = V / 8;
    for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
      float x[8];
      load8(xr + 8 * p, x);
      float m = -INFINITY;
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if (x[k] > m || x[k] != x[k]) m = x[k];
      if (m == -INFINITY) continue;  // all eight −inf: nothing to add
      float sum = 0.0f;
#pragma unroll
      for (int k = 0; k < 8; ++k) sum += exp2_ftz((x[k] - m) * kLog2e);
      acc = merge_exp2(acc, MaxSum{m, sum});
    }
    first = packs * 8;
  }
  for (int64_t v = first + threadIdx.x; v < V; v += kThreads) {
    const float x = load(xr + v);
    if (x > acc.m) {
      acc.s = acc.s * expf(acc.m - x) + 1.0f;  // rescale to the new maximum; exp(x − x) = 1
      acc.m = x;
    } else if (x != -INFINITY) {
      acc.s += expf(x - acc.m);  // NaN lands here and propagates
    }
  }
  return acc;
}

template <typename T, bool kWide>
__global__ void cross_entropy_forward_kernel(float* losses, float* lse, const T* logits, const int32_t* targets,
                                             int64_t Vp, int64_t V, int32_t ignore_index) {
  const int64_t n = blockIdx.x;
  const int32_t t = targets[n];
  if (t == ignore_index) {  // the whole block leaves: skipped rows cost nothing, their lse is unused
    if (threadIdx.x == 0) losses[n] = 0.0f, lse[n] = 0.0f;
    return;
  }
  const T* xr = logits + n * Vp;
  MaxSum acc = thread_state<T, kWide>(xr, V);
  __shared__ float part_m[kWarps], part_s[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  acc = warp_merge(acc);
  if (lane == 0) part_m[warp] = acc.m, part_s[warp] = acc.s;
  __syncthreads();
  if (warp == 0) {
    MaxSum w = lane < kWarps ? MaxSum{part_m[lane], part_s[lane]} : MaxSum{-INFINITY, 0.0f};
    w = warp_merge(w);
    if (lane == 0) {
      const float l = w.m + logf(w.s);
      lse[n] = l;
      losses[n] = l - load(xr + t);
    }
  }
}

// dlogits[n, v] = scale·(exp(x − lse) − [v = t]) for v < V; 0 on padding and on ignored rows.
template <typename T, bool kWide>
__global__ void cross_entropy_backward_kernel(T* dlogits, const T* logits, const float* lse, const int32_t* targets,
                                              const float* dloss, int64_t count, int64_t Vp, int64_t V,
                                              int32_t ignore_index) {
  const int64_t n = blockIdx.x;
  const int32_t t = targets[n];
  T* dr = dlogits + n * Vp;
  const bool ignored = t == ignore_index;
  const float scale = ignored ? 0.0f : dloss[0] / static_cast<float>(count);  // count ≥ 1 where counted
  const T* xr = logits + n * Vp;
  const float l = ignored ? 0.0f : lse[n];
  if constexpr (kWide) {  // 8 columns per 16-byte load and store (Vp a multiple of 8); the same values
    for (int64_t p = threadIdx.x; p < Vp / 8; p += kThreads) {
      float g[8] = {};  // an ignored row stores zeros
      if (!ignored) {
        load8(xr + 8 * p, g);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const int64_t v = 8 * p + k;
          const float prob = expf(g[k] - l);
          g[k] = v < V ? scale * (v == t ? prob - 1.0f : prob) : 0.0f;
        }
      }
      store8(dr + 8 * p, g);
    }
    return;
  }
  if (ignored) {
    for (int64_t v = threadIdx.x; v < Vp; v += kThreads) store(dr + v, 0.0f);
    return;
  }
  for (int64_t v = threadIdx.x; v < Vp; v += kThreads) {
    float g = 0.0f;
    if (v < V) {
      const float p = expf(load(xr + v) - l);
      g = scale * (v == t ? p - 1.0f : p);  // p − 1 before scaling: no cancellation
    }
    store(dr + v, g);
  }
}

// loss = Σ losses / count in double: strided per-thread sums, then a fixed shared-memory tree.
__global__ void cross_entropy_mean_kernel(float* loss, const float* losses, int64_t N, int64_t count) {
  __shared__ double partial[kMeanThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < N; i += kMeanThreads) acc += losses[i];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kMeanThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) loss[0] = count > 0 ? static_cast<float>(partial[0] / static_cast<double>(count)) : 0.0f;
}

template <typename T>
void cross_entropy_forward(float* losses, float* lse, const T* logits, const int32_t* targets, int64_t N, int64_t Vp,
                           int64_t V, int32_t ignore_index, CUstream_st* stream) {
  if (N <= 0) return;
  const unsigned int blocks = static_cast<unsigned int>(N);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (Vp % 8 == 0 && aligned16(logits)) {
      KRAKEN_KERNEL(blocks, kThreads, 0, stream, cross_entropy_forward_kernel<T, true>)
      (losses, lse, logits, targets, Vp, V, ignore_index);
      KRAKEN_CUDA_LAUNCH_CHECK();
      return;
    }
  }
  KRAKEN_KERNEL(blocks, kThreads, 0, stream, cross_entropy_forward_kernel<T, false>)
  (losses, lse, logits, targets, Vp, V, ignore_index);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const float* lse, const int32_t* targets, const float* dloss,
                            int64_t count, int64_t N, int64_t Vp, int64_t V, int32_t ignore_index,
                            CUstream_st* stream) {
  // in the forward pass this was: loss = (1/count)·Σ_n (lse_n − logits[n, t_n])
  if (N <= 0) return;
  const unsigned int blocks = static_cast<unsigned int>(N);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (Vp % 8 == 0 && aligned16(logits) && aligned16(dlogits)) {
      KRAKEN_KERNEL(blocks, kThreads, 0, stream, cross_entropy_backward_kernel<T, true>)
      (dlogits, logits, lse, targets, dloss, count, Vp, V, ignore_index);
      KRAKEN_CUDA_LAUNCH_CHECK();
      return;
    }
  }
  KRAKEN_KERNEL(blocks, kThreads, 0, stream, cross_entropy_backward_kernel<T, false>)
  (dlogits, logits, lse, targets, dloss, count, Vp, V, ignore_index);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

}  // namespace

void cross_entropy_forward_cuda(float* losses, float* lse, const float* logits, const int32_t* targets, int64_t N,
                                int64_t Vp, int64_t V, int32_t ignore_index, CUstream_st* stream) {
  cross_entropy_forward(losses, lse, logits, targets, N, Vp, V, ignore_index, stream);
}

void cross_entropy_mean_cuda(float* loss, const float* losses, int64_t N, int64_t count, CUstream_st* stream) {
  KRAKEN_KERNEL(1, kMeanThreads, 0, stream, cross_entropy_mean_kernel)(loss, losses, N, count);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

void cross_entropy_backward_cuda(float* dlogits, const float* logits, const float* lse, const int32_t* targets,
                                 const float* dloss, int64_t count, int64_t N, int64_t Vp, int64_t V,
                                 int32_t ignore_index, CUstream_st* stream) {
  cross_entropy_backward(dlogits, logits, lse, targets, dloss, count, N, Vp, V, ignore_index, stream);
}

void cross_entropy_forward_bf16_cuda(float* losses, float* lse, const uint16_t* logits, const int32_t* targets,
                                     int64_t N, int64_t Vp, int64_t V, int32_t ignore_index, CUstream_st* stream) {
  cross_entropy_forward(losses, lse, as_bf16(logits), targets, N, Vp, V, ignore_index, stream);
}

void cross_entropy_backward_bf16_cuda(uint16_t* dlogits, const uint16_t* logits, const float* lse,
                                      const int32_t* targets, const float* dloss, int64_t count, int64_t N, int64_t Vp,
                                      int64_t V, int32_t ignore_index, CUstream_st* stream) {
  cross_entropy_backward(as_bf16(dlogits), as_bf16(logits), lse, targets, dloss, count, N, Vp, V, ignore_index,
                         stream);
}

}  // namespace kraken::kernels
