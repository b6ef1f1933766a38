// CUDA layer normalisation (equations in kernels/layernorm.h).
//
// Forward and dx: one warp per row, the row's sums reduced by a butterfly of shuffles (a fixed order).
// dgamma/dbeta: where C is a multiple of 8 and the rows 16-byte aligned, the two-pass column sums of
// column_sums.h (row chunks spread over the GPU, then the chunks added in order); otherwise
// column-parallel without atomics or scratch: a block owns kCols columns and all rows; its kGroups row
// groups accumulate rows g, g + kGroups, … in order, and a fixed shared-memory tree adds the groups.
// Either way every sum has one order, fixed by rows and C.
// The kernels are templates on the storage type T of x, out, dout and dx (kernels/cuda/storage.h):
// float, or bf16 widened on load and rounded once on store; gamma, beta, their gradients, mean and
// rstd are f32 for both, and the arithmetic is the same f32 sequence.
#include "kernels/cuda/check.h"
#include "kernels/cuda/column_sums.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/storage.h"
#include "kernels/layernorm.h"

namespace kraken::kernels {
namespace {

using cuda_detail::aligned16;
using cuda_detail::as_bf16;
using cuda_detail::column_sums;
using cuda_detail::load;
using cuda_detail::load8;
using cuda_detail::store;

constexpr int kWarpsPerBlock = 8;  // rows per block in the row kernels
constexpr int kCols = 8;           // dgamma/dbeta: 8 columns (one 32-byte sector) per row group
constexpr int kGroups = 64;        // … times 64 row groups = 512 threads
constexpr int kUnroll = 8;         // dgamma/dbeta: rows whose loads are in flight together per thread
constexpr int kBatch = 8;          // dx: elements per lane whose loads are in flight together

__device__ inline float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One row of the forward, given the lane's partial sum of its elements c = lane, lane + 32, …: the
// variance pass and the output pass. A warp per row; each lane reads only elements it summed (and, in
// the fused kernel, wrote itself), so no synchronisation is needed.
template <typename T>
__device__ __forceinline__ void layernorm_row(T* out, float* mean, float* rstd, const T* xr, float sum,
                                              const float* gamma, const float* beta, int64_t r, int C, float eps,
                                              int lane) {
  const float mu = warp_sum(sum) / static_cast<float>(C);
  float sq = 0.0f;
  for (int c = lane; c < C; c += 32) {
    const float d = load(xr + c) - mu;
    sq += d * d;
  }
  const float rs = 1.0f / sqrtf(warp_sum(sq) / static_cast<float>(C) + eps);
  T* outr = out + r * C;
  for (int c = lane; c < C; c += 32) store(outr + c, (load(xr + c) - mu) * rs * gamma[c] + (beta ? beta[c] : 0.0f));
  if (lane == 0) {
    if (mean) mean[r] = mu;
    if (rstd) rstd[r] = rs;
  }
}

template <typename T>
__global__ void layernorm_forward_kernel(T* out, float* mean, float* rstd, const T* x, const float* gamma,
                                         const float* beta, int64_t rows, int C, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;  // whole warps leave together
  const T* xr = x + r * C;
  float sum = 0.0f;
  for (int c = lane; c < C; c += 32) sum += load(xr + c);
  layernorm_row(out, mean, rstd, xr, sum, gamma, beta, r, C, eps, lane);
}

// s = a + b stored (rounded to T), summed as stored, then the row normalised from s.
template <typename T>
__global__ void add_layernorm_forward_kernel(T* s, T* out, float* mean, float* rstd, const T* a, const T* b,
                                             const float* gamma, const float* beta, int64_t rows, int C, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;
  const T* ar = a + r * C;
  const T* br = b + r * C;
  T* sr = s + r * C;
  float sum = 0.0f;
  for (int c = lane; c < C; c += 32) {
    store(sr + c, load(ar + c) + load(br + c));
    sum += load(sr + c);  // the stored (rounded) value, as layernorm of s would read it
  }
  layernorm_row(out, mean, rstd, static_cast<const T*>(sr), sum, gamma, beta, r, C, eps, lane);
}

// dx += rstd·(g − mean(g) − x̂·mean(g ∘ x̂)),  g = dout ∘ gamma
template <typename T>
__global__ void layernorm_backward_dx_kernel(T* dx, const T* dout, const T* x, const float* gamma,
                                             const float* mean, const float* rstd, int64_t rows, int C) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;
  const T* xr = x + r * C;
  const T* doutr = dout + r * C;
  const float mu = mean[r], rs = rstd[r];
  float sum_g = 0.0f, sum_gx = 0.0f;
  for (int c = lane; c < C; c += 32) {
    const float g = load(doutr + c) * gamma[c];
    sum_g += g;
    sum_gx += g * (load(xr + c) - mu) * rs;
  }
  const float mean_g = warp_sum(sum_g) / static_cast<float>(C);
  const float mean_gx = warp_sum(sum_gx) / static_cast<float>(C);
  // kBatch elements per lane are loaded before any is stored: dx may alias nothing here, but the
  // compiler cannot know, so element by element every load of dx waited for the previous store (the
  // bf16 kernel took 92 µs for 8192 × 768 on an H200, 0.5 TB/s). Same arithmetic per element.
  T* dxr = dx + r * C;
  for (int c0 = lane; c0 < C; c0 += 32 * kBatch) {
    float acc[kBatch], g[kBatch], xhat[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int c = c0 + 32 * u;
      if (c < C) {
        acc[u] = load(dxr + c);
        g[u] = load(doutr + c) * gamma[c];
        xhat[u] = (load(xr + c) - mu) * rs;
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int c = c0 + 32 * u;
      if (c < C) store(dxr + c, acc[u] + rs * (g[u] - mean_g - xhat[u] * mean_gx));
    }
  }
}

// dgamma += Σ_r dout ∘ x̂,  dbeta += Σ_r dout; block b owns columns [b·kCols, (b + 1)·kCols).
template <typename T>
__global__ void layernorm_backward_params_kernel(float* dgamma, float* dbeta, const T* dout, const T* x,
                                                 const float* mean, const float* rstd, int64_t rows, int C) {
  __shared__ float sg[kGroups][kCols];
  __shared__ float sb[kGroups][kCols];
  const int col = threadIdx.x % kCols, group = threadIdx.x / kCols;
  const int c = blockIdx.x * kCols + col;
  float acc_g = 0.0f, acc_b = 0.0f;
  if (c < C) {
    // kUnroll rows' loads are issued before their sums: one row at a time left each thread waiting on
    // one load after another (96 blocks for C = 768 cannot hide that latency; the bf16 kernel moved
    // 11% of the peak bandwidth on an H200). The sums keep their row order, so results are unchanged.
    int64_t r = group;
    for (; r + (kUnroll - 1) * kGroups < rows; r += kUnroll * kGroups) {
      float d[kUnroll], centred[kUnroll], rs[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t ru = r + u * kGroups;
        d[u] = load(dout + ru * C + c);
        centred[u] = dgamma ? load(x + ru * C + c) - mean[ru] : 0.0f;
        rs[u] = dgamma ? rstd[ru] : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (dgamma) acc_g += d[u] * centred[u] * rs[u];
        acc_b += d[u];
      }
    }
    for (; r < rows; r += kGroups) {
      const float d = load(dout + r * C + c);
      if (dgamma) acc_g += d * (load(x + r * C + c) - mean[r]) * rstd[r];
      acc_b += d;
    }
  }
  sg[group][col] = acc_g;
  sb[group][col] = acc_b;
  __syncthreads();
  for (int stride = kGroups / 2; stride > 0; stride >>= 1) {
    if (group < stride) {
      sg[group][col] += sg[group + stride][col];
      sb[group][col] += sb[group + stride][col];
    }
    __syncthreads();
  }
  if (group == 0 && c < C) {
    if (dgamma) dgamma[c] += sg[0][col];
    if (dbeta) dbeta[c] += sb[0][col];
  }
}

unsigned int row_blocks(int64_t rows) {
  return static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// dgamma and dbeta by the two-pass column sums (column_sums.h): row r's terms at columns c0 .. c0 + 7 are
// dout ∘ x̂ (the same f32 expression as the one-pass kernel above) and dout.
template <typename T>
struct LayerNormParamTerms {
  const T* dout;
  const T* x;
  const float* mean;
  const float* rstd;
  int64_t C;
  bool with_gamma;
  __device__ __forceinline__ void operator()(int64_t r, int64_t c0, float (&t)[2][8]) const {
    load8(dout + r * C + c0, t[1]);
    if (with_gamma) {
      float xv[8];
      load8(x + r * C + c0, xv);
      const float m = mean[r], rs = rstd[r];
#pragma unroll
      for (int i = 0; i < 8; ++i) t[0][i] = t[1][i] * (xv[i] - m) * rs;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) t[0][i] = 0.0f;
    }
  }
};
struct LayerNormParamAccumulate {
  float* dgamma;
  float* dbeta;
  __device__ __forceinline__ void operator()(int64_t c, const float (&totals)[2]) const {
    if (dgamma) dgamma[c] += totals[0];
    if (dbeta) dbeta[c] += totals[1];
  }
};

template <typename T>
void layernorm_forward(T* out, float* mean, float* rstd, const T* x, const float* gamma, const float* beta,
                       int64_t rows, int64_t C, float eps, CUstream_st* stream) {
  if (rows <= 0) return;
  KRAKEN_KERNEL(row_blocks(rows), kWarpsPerBlock * 32, 0, stream, layernorm_forward_kernel<T>)
  (out, mean, rstd, x, gamma, beta, rows, static_cast<int>(C), eps);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

template <typename T>
void add_layernorm_forward(T* s, T* out, float* mean, float* rstd, const T* a, const T* b, const float* gamma,
                           const float* beta, int64_t rows, int64_t C, float eps, CUstream_st* stream) {
  if (rows <= 0) return;
  KRAKEN_KERNEL(row_blocks(rows), kWarpsPerBlock * 32, 0, stream, add_layernorm_forward_kernel<T>)(
      s, out, mean, rstd, a, b, gamma, beta, rows, static_cast<int>(C), eps);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

template <typename T>
void layernorm_backward(T* dx, float* dgamma, float* dbeta, const T* dout, const T* x, const float* gamma,
                        const float* mean, const float* rstd, int64_t rows, int64_t C, CUstream_st* stream) {
  // in the forward pass this was: out = x̂·gamma + beta, x̂ = (x − μ)·rstd
  if (rows <= 0) return;
  if (dx) {
    KRAKEN_KERNEL(row_blocks(rows), kWarpsPerBlock * 32, 0, stream, layernorm_backward_dx_kernel<T>)(
        dx, dout, x, gamma, mean, rstd, rows, static_cast<int>(C));
    KRAKEN_CUDA_LAUNCH_CHECK();
  }
  if ((dgamma || dbeta) && C % 8 == 0 && rows >= kGroups && aligned16(dout) && aligned16(x)) {
    column_sums<2>(rows, C, LayerNormParamTerms<T>{dout, x, mean, rstd, C, dgamma != nullptr},
                   LayerNormParamAccumulate{dgamma, dbeta}, stream, "layernorm backward");
  } else if (dgamma || dbeta) {
    const unsigned int blocks = static_cast<unsigned int>((C + kCols - 1) / kCols);
    KRAKEN_KERNEL(blocks, kCols * kGroups, 0, stream, layernorm_backward_params_kernel<T>)
    (dgamma, dbeta, dout, x, mean, rstd, rows, static_cast<int>(C));
    KRAKEN_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace

void layernorm_forward_cuda(float* out, float* mean, float* rstd, const float* x, const float* gamma,
                            const float* beta, int64_t rows, int64_t C, float eps, CUstream_st* stream) {
  layernorm_forward(out, mean, rstd, x, gamma, beta, rows, C, eps, stream);
}

void layernorm_backward_cuda(float* dx, float* dgamma, float* dbeta, const float* dout, const float* x,
                             const float* gamma, const float* mean, const float* rstd, int64_t rows, int64_t C,
                             CUstream_st* stream) {
  layernorm_backward(dx, dgamma, dbeta, dout, x, gamma, mean, rstd, rows, C, stream);
}

void layernorm_forward_bf16_cuda(uint16_t* out, float* mean, float* rstd, const uint16_t* x, const float* gamma,
                                 const float* beta, int64_t rows, int64_t C, float eps, CUstream_st* stream) {
  layernorm_forward(as_bf16(out), mean, rstd, as_bf16(x), gamma, beta, rows, C, eps, stream);
}

void layernorm_backward_bf16_cuda(uint16_t* dx, float* dgamma, float* dbeta, const uint16_t* dout, const uint16_t* x,
                                  const float* gamma, const float* mean, const float* rstd, int64_t rows, int64_t C,
                                  CUstream_st* stream) {
  layernorm_backward(as_bf16(dx), dgamma, dbeta, as_bf16(dout), as_bf16(x), gamma, mean, rstd, rows, C, stream);
}

void add_layernorm_forward_cuda(float* s, float* out, float* mean, float* rstd, const float* a, const float* b,
                                const float* gamma, const float* beta, int64_t rows, int64_t C, float eps,
                                CUstream_st* stream) {
  add_layernorm_forward(s, out, mean, rstd, a, b, gamma, beta, rows, C, eps, stream);
}

void add_layernorm_forward_bf16_cuda(uint16_t* s, uint16_t* out, float* mean, float* rstd, const uint16_t* a,
                                     const uint16_t* b, const float* gamma, const float* beta, int64_t rows, int64_t C,
                                     float eps, CUstream_st* stream) {
  add_layernorm_forward(as_bf16(s), as_bf16(out), mean, rstd, as_bf16(a), as_bf16(b), gamma, beta, rows, C, eps,
                        stream);
}

}  // namespace kraken::kernels
