// CUDA layer normalisation (equations in kernels/layernorm.h).
//
// Forward and dx: one warp per row, the row's sums reduced by a butterfly of shuffles (a fixed order);
// where C is a multiple of 8 up to 2048 and the rows 16-byte aligned, the row stays in the warp's
// registers and moves in 16-byte pieces (the _x8 kernels).
// dgamma/dbeta: where C is a multiple of 8 up to 1024 and dx is wanted too, in the dx pass (its row
// chunks' sums in shared memory, then the chunks added in order: layernorm_backward_fused_x8_kernel; one
// launch for all groups of a grouped backward, each with its own gamma and gradients); else where C is a
// multiple of 8 and the rows 16-byte aligned, the two-pass column sums of column_sums.h (the same
// scheme over a second read of dout and x); otherwise
// column-parallel without atomics or scratch: a block owns kCols columns and all rows; its kGroups row
// groups accumulate rows g, g + kGroups, … in order, and a fixed shared-memory tree adds the groups.
// Either way every sum has one order, fixed by rows and C. The Kraken layer's residual fork with LN2 after
// it runs as one kernel each way (fork_layernorm_backward_x8_kernel: the grouped one pass's sums, every group
// of a row position in one block, the fork's sums taken from dm in registers).
// The kernels are templates on the storage type T of x, out, dout and dx (kernels/cuda/storage.h):
// float, or bf16 widened on load and rounded once on store; gamma, beta, their gradients, mean and
// rstd are f32 for both, and the arithmetic is the same f32 sequence.
#include <cuda_bf16.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

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
using cuda_detail::load_stored8;
using cuda_detail::load_stored8_streaming;
using cuda_detail::store;
using cuda_detail::store8;
using cuda_detail::Stored8;
using cuda_detail::widen8;

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

// dx = dx_in + rstd·(g − mean(g) − x̂·mean(g ∘ x̂)),  g = dout ∘ gamma  (dx_in: null, dx or another one)
template <typename T>
__global__ void layernorm_backward_dx_kernel(T* dx, const T* dx_in, const T* dout, const T* x, const float* gamma,
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
  const T* dinr = dx_in ? dx_in + r * C : nullptr;
  for (int c0 = lane; c0 < C; c0 += 32 * kBatch) {
    float acc[kBatch] = {}, g[kBatch] = {}, xhat[kBatch] = {};  // (zeroed for the emulation's host compiler)
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int c = c0 + 32 * u;
      if (c < C) {
        acc[u] = dinr ? load(dinr + c) : 0.0f;
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

// ---- rows held in registers, 16-byte accesses ----------------------------------------------------------
// Where C is a multiple of 8 (up to 32 · 8 · kMaxPacks = 2048) and every row 16-byte aligned, lane l of a
// row's warp owns the 8-element packs l, l + 32, … (kPacks of them at most), keeps them in registers and
// touches global memory once per element: the kernels above read x three times (forward) with 2-byte
// accesses (bf16), which held them to 44% (forward) and 36% (backward dx) of an H200's bandwidth. The
// per-element arithmetic is theirs; the row sums add the lane's elements pack by pack, then across the
// warp: another order (tests compare with the CPU at 1e-5 of the scale, as before).
constexpr int kMaxPacks = 8;

// v as stored in T: the fused kernel normalises the rounded sum, as layernorm of s would read it.
__device__ __forceinline__ float as_stored(float v, const float*) { return v; }
__device__ __forceinline__ float as_stored(float v, const __nv_bfloat16*) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

// The row's variance pass and output pass from its packs in registers (sum: the lane's partial sum).
template <int kPacks, typename T>
__device__ __forceinline__ void normalise_row_x8(T* outr, float* mean, float* rstd, const float (&v)[kPacks][8],
                                                 float sum, const float* gamma, const float* beta, int64_t r, int C,
                                                 float eps, int lane) {
  const int packs = C / 8;
  const float mu = warp_sum(sum) / static_cast<float>(C);
  float sq = 0.0f;
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    if (lane + 32 * p >= packs) break;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float d = v[p][i] - mu;
      sq += d * d;
    }
  }
  const float rs = 1.0f / sqrtf(warp_sum(sq) / static_cast<float>(C) + eps);
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int c0 = 8 * (lane + 32 * p);
    if (c0 >= C) break;
    float g[8], b[8] = {}, o[8];
    load8(gamma + c0, g);
    if (beta) load8(beta + c0, b);
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = (v[p][i] - mu) * rs * g[i] + b[i];
    store8(outr + c0, o);
  }
  if (lane == 0) {
    if (mean) mean[r] = mu;
    if (rstd) rstd[r] = rs;
  }
}

template <typename T, int kPacks>
__global__ void layernorm_forward_x8_kernel(T* out, float* mean, float* rstd, const T* x, const float* gamma,
                                            const float* beta, int64_t rows, int C, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;  // whole warps leave together
  float v[kPacks][8] = {};
  float sum = 0.0f;
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int c0 = 8 * (lane + 32 * p);
    if (c0 >= C) break;
    load8(x + r * C + c0, v[p]);
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += v[p][i];
  }
  normalise_row_x8<kPacks>(out + r * C, mean, rstd, v, sum, gamma, beta, r, C, eps, lane);
}

// bias (C,), or null for none: s = a + (b + bias), b + bias rounded to T first — the bits of a broadcast add
// and then the residual add (ops::add_bias_layernorm: the product's bias, taken out of its epilogue so that
// backward can sum its gradient in the LayerNorm's pass).
template <typename T, int kPacks>
__global__ void add_layernorm_forward_x8_kernel(T* s, T* out, float* mean, float* rstd, const T* a, const T* b,
                                                const T* bias, const float* gamma, const float* beta, int64_t rows,
                                                int C, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;
  float v[kPacks][8] = {};
  float sum = 0.0f;
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int c0 = 8 * (lane + 32 * p);
    if (c0 >= C) break;
    float bv[8];
    load8(a + r * C + c0, v[p]);
    load8(b + r * C + c0, bv);
    if (bias) {
      float bb[8];
      load8(bias + c0, bb);
#pragma unroll
      for (int i = 0; i < 8; ++i) bv[i] = as_stored(bv[i] + bb[i], s);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) v[p][i] += bv[i];
    store8(s + r * C + c0, v[p]);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      v[p][i] = as_stored(v[p][i], s);
      sum += v[p][i];
    }
  }
  normalise_row_x8<kPacks>(out + r * C, mean, rstd, v, sum, gamma, beta, r, C, eps, lane);
}

// The fork with S summed in it and LN2 (kernels/layernorm.h), a warp per row r of every group. a and m are
// stored and m normalised from its stored values, as layernorm_forward_x8_kernel would read them back.
// kGroups = G known when compiled (G·kPacks ≤ 8; the Kraken 4-way preset's 4 groups of C = 504): every
// group's x and y loaded first, as stored (4 registers a pack), so a row is one round trip to memory (a
// lane's 16 loads of 16 bytes in flight at the preset's shape, where the run-time loop had 2 at a time and
// moved 60% of the bandwidth: 663 µs a call at B = 64 on an H100); a stored while S is summed, so only y
// stays held (117 registers, 2 blocks an SM, no spills). kGroups = 0: G at run time, S from the G rows of x
// first, then each group's x (again, from L2: a block's 8 rows of G groups are ~8·G KB) and y, a round
// trip each. The same arithmetic in the same order either way.
struct ForkNorms {
  const float* gamma[kMaxForkNormGroups];
  const float* beta[kMaxForkNormGroups];
};
constexpr int kMaxForkPacksInFlight = 8;  // G·kPacks of the kernels with every group's row loaded first

// m's pack stored, then its stored values in v, added to sum (what LN2 normalises).
__device__ __forceinline__ void store_fork_m(__nv_bfloat16* m, float (&v)[8], float& sum, int64_t at) {
  store8(m + at, v);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    v[i] = as_stored(v[i], m);
    sum += v[i];
  }
}
// A pack of the fork: m = y + S (a stored before, with S's sum).
__device__ __forceinline__ void fork_m_pack(__nv_bfloat16* m, const float (&yv)[8], const float (&s)[8],
                                            float (&v)[8], float& sum, int64_t at) {
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = yv[i] + s[i];
  store_fork_m(m, v, sum, at);
}
// A pack of the fork: a = x + y and m = y + S in one loop.
__device__ __forceinline__ void fork_pack(__nv_bfloat16* a, __nv_bfloat16* m, const float (&xv)[8],
                                          const float (&yv)[8], const float (&s)[8], float (&v)[8], float& sum,
                                          int64_t at) {
  float av[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    av[i] = xv[i] + yv[i];
    v[i] = yv[i] + s[i];
  }
  store8(a + at, av);
  store_fork_m(m, v, sum, at);
}
// S, summed in f32 over the groups, as stored once (the summed fork's rounding).
template <int kPacks>
__device__ __forceinline__ void round_fork_sum(float (&s)[kPacks][8], const __nv_bfloat16* m) {
#pragma unroll
  for (int p = 0; p < kPacks; ++p)
#pragma unroll
    for (int i = 0; i < 8; ++i) s[p][i] = as_stored(s[p][i], m);
}

// (At least 2 blocks an SM for the kernels that hold every group's row: 117 registers at the preset's shape,
// 159 uncapped. 0, no minimum, for the loop over G: 80 registers at 2 packs, 95 with a minimum of 1.)
template <int kPacks, int kGroups>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, kGroups > 0 ? 2 : 0)
    residual_fork_summed_layernorm_x8_kernel(__nv_bfloat16* a, __nv_bfloat16* m, __nv_bfloat16* out, float* mean,
                                             float* rstd, const __nv_bfloat16* x, const __nv_bfloat16* y,
                                             const __grid_constant__ ForkNorms norms, int groups, int64_t rows,
                                             int C, float eps) {
  static_assert(kGroups == 0 || kGroups * kPacks <= kMaxForkPacksInFlight, "too many packs held");
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;  // whole warps leave together
  float s[kPacks][8] = {};
  if constexpr (kGroups > 0) {
    Stored8<__nv_bfloat16> xs[kGroups][kPacks] = {}, ys[kGroups][kPacks] = {};
#pragma unroll
    for (int g = 0; g < kGroups; ++g)
#pragma unroll
      for (int p = 0; p < kPacks; ++p) {
        const int c0 = 8 * (lane + 32 * p);
        if (c0 >= C) break;
        load_stored8(x + (g * rows + r) * C + c0, xs[g][p]);
        load_stored8(y + (g * rows + r) * C + c0, ys[g][p]);
      }
    // a = x + y needs no S: stored now, so that only y stays held (x's registers go).
#pragma unroll
    for (int g = 0; g < kGroups; ++g)
#pragma unroll
      for (int p = 0; p < kPacks; ++p) {
        const int c0 = 8 * (lane + 32 * p);
        if (c0 >= C) break;
        float xv[8], yv[8], av[8];
        widen8(xs[g][p], xv);
        widen8(ys[g][p], yv);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          s[p][i] += xv[i];
          av[i] = xv[i] + yv[i];
        }
        store8(a + (g * rows + r) * C + c0, av);
      }
    round_fork_sum<kPacks>(s, m);
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      const int64_t row = g * rows + r;
      float v[kPacks][8] = {};
      float sum = 0.0f;
#pragma unroll
      for (int p = 0; p < kPacks; ++p) {
        const int c0 = 8 * (lane + 32 * p);
        if (c0 >= C) break;
        float yv[8];
        widen8(ys[g][p], yv);
        fork_m_pack(m, yv, s[p], v[p], sum, row * C + c0);
      }
      normalise_row_x8<kPacks>(out + row * C, mean, rstd, v, sum, norms.gamma[g], norms.beta[g], row, C, eps,
                               lane);
    }
  } else {
    for (int g = 0; g < groups; ++g) {
#pragma unroll
      for (int p = 0; p < kPacks; ++p) {
        const int c0 = 8 * (lane + 32 * p);
        if (c0 >= C) break;
        float xv[8];
        load8(x + (g * rows + r) * C + c0, xv);
#pragma unroll
        for (int i = 0; i < 8; ++i) s[p][i] += xv[i];
      }
    }
    round_fork_sum<kPacks>(s, m);
    for (int g = 0; g < groups; ++g) {
      const int64_t row = g * rows + r;
      float v[kPacks][8] = {};
      float sum = 0.0f;
#pragma unroll
      for (int p = 0; p < kPacks; ++p) {
        const int c0 = 8 * (lane + 32 * p);
        if (c0 >= C) break;
        float xv[8], yv[8];
        load8(x + row * C + c0, xv);
        load8(y + row * C + c0, yv);
        fork_pack(a, m, xv, yv, s[p], v[p], sum, row * C + c0);
      }
      normalise_row_x8<kPacks>(out + row * C, mean, rstd, v, sum, norms.gamma[g], norms.beta[g], row, C, eps,
                               lane);
    }
  }
}

// dx = dx_in + … for row r from its packs in registers (the warp's lanes, lane l owning packs l, l + 32, …).
template <int kPacks, typename T>
__device__ __forceinline__ void backward_row_x8(T* dx, const T* dx_in, const T* dout, const T* x, const float* gamma,
                                                float mu, float rs, int64_t r, int C, int lane) {
  // (zero-initialised: the emulation's host compiler cannot see that a pack is written before it is read)
  float g[kPacks][8] = {}, centred[kPacks][8] = {};
  float sum_g = 0.0f, sum_gx = 0.0f;
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int c0 = 8 * (lane + 32 * p);
    if (c0 >= C) break;
    float d[8], gm[8];
    load8(dout + r * C + c0, d);
    load8(gamma + c0, gm);
    load8(x + r * C + c0, centred[p]);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      g[p][i] = d[i] * gm[i];
      centred[p][i] -= mu;
      sum_g += g[p][i];
      sum_gx += g[p][i] * centred[p][i] * rs;
    }
  }
  const float mean_g = warp_sum(sum_g) / static_cast<float>(C);
  const float mean_gx = warp_sum(sum_gx) / static_cast<float>(C);
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int c0 = 8 * (lane + 32 * p);
    if (c0 >= C) break;
    float acc[8] = {};
    if (dx_in) load8(dx_in + r * C + c0, acc);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = acc[i] + rs * (g[p][i] - mean_g - centred[p][i] * rs * mean_gx);
    store8(dx + r * C + c0, acc);
  }
}

template <typename T, int kPacks>
__global__ void layernorm_backward_dx_x8_kernel(T* dx, const T* dx_in, const T* dout, const T* x, const float* gamma,
                                                const float* mean, const float* rstd, int64_t rows, int C) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;
  backward_row_x8<kPacks>(dx, dx_in, dout, x, gamma, mean[r], rstd[r], r, C, lane);
}

// dx as above and, in the same pass over dout and x, the chunk's dgamma and dbeta terms: the
// separate two-pass column sums read dout and x a second time (0.44 ms of a GPT-2 step on an H200,
// 1.3 ms for the Kraken 4-way preset's 97 LayerNorms). Block b owns rows [32b, 32b + 32): warp w takes
// rows 32b + w, + 8, + 16, + 24 in order, each lane adding its columns' terms into the warp's slice of
// shared memory; the 8 slices are then added in warp order, and the chunk's totals go to
// partials[(term · chunks + b) · C + c]; column_totals_kernel adds the chunks in a fixed order. Every
// sum's order is fixed by rows and C. Up to kMaxFusedPacks packs per lane (C ≤ 1024), where the row
// stays in registers and the slices take 64·C bytes of shared memory a block.
constexpr int kMaxFusedPacks = 4;
constexpr int kFusedRowsPerWarp = 4;
constexpr int kFusedRows = kWarpsPerBlock * kFusedRowsPerWarp;  // rows per block: a chunk

// The one-pass kernel runs several groups of rows in one launch (a Kraken layer's sub-layers, each with
// its own gamma; kernels/layernorm.h): grid (chunks of a group, groups), block (b, y) does chunk b of
// group y — rows [y·rows, (y + 1)·rows) of the launch, gamma[y], and the partial sums of group y, which
// start kTerms · chunks · C floats after group y − 1's. One group is the plain LayerNorm.
constexpr int kMaxGroupsPerLaunch = 16;
struct GroupTable {
  const float* gamma[kMaxGroupsPerLaunch];
  int64_t rows;  // per group
};
// Block (b, y)'s group: its gamma and partial sums (kTerms sets of them); returns one past its last row.
__device__ __forceinline__ int64_t enter_group(const GroupTable& table, const float*& gamma, float*& partials, int C,
                                               int terms) {
  gamma = table.gamma[blockIdx.y];
  partials += static_cast<int64_t>(blockIdx.y) * terms * gridDim.x * C;
  return (static_cast<int64_t>(blockIdx.y) + 1) * table.rows;
}

// The sums are kept in shared memory, not in registers beside the row, and the row is held as stored
// (Stored8): sums and row in registers took 96 registers a thread at C = 504 (bf16, 2 packs per lane) and
// 128 at C = 768 — 2 blocks of 8 warps per SM, a quarter of the warps an SM can hold, each with one row's
// loads in flight (ptxas; on an H100, 0.184 ms for the bf16 backward of 65536 × 504 where this takes
// 0.122). Here a bf16 row costs 12 registers a pack with dx_in and the launch bounds below ask for 4
// blocks (64 registers; shared memory 64·C bytes a block, 48 KB at C = 768), and dx_in is loaded with the
// row: one round trip to memory a row, not two.
// A slice holds pack P's 8 columns as two float4, every pack's low half first, so that lane l's accesses
// to packs l + 32p are consecutive float4 (no bank conflicts).
// The rows are read with the streaming hint (storage.h, load_stored8_streaming; thirty-first session, not yet
// measured): 3 blocks of 72 KB leave an H100's SM ~28 KB of L1, through which ~110 KB of row loads pass
// while gamma, read twice a pack a row, should stay there.
__device__ __forceinline__ int slice_float4(int pack, int half, int packs) { return half * packs + pack; }
// The column whose sum a slice keeps at float `at` (the inverse of 4·slice_float4(c / 8, (c % 8) / 4, packs)
// + c % 4). The blocks' final sums walk the slices by `at`, so a warp reads 32 consecutive floats; walked
// by column, a warp read two runs of 16 a half-slice apart — the same 16 banks wherever C is a multiple of
// 64 (twofold conflicts).
__device__ __forceinline__ int slice_column(int at, int packs) {
  const int f = at / 4, half = f / packs;
  return 8 * (f - half * packs) + 4 * half + at % 4;
}

// What fits a thread's registers (ptxas -v, sm_90): bf16 rows of 1 or 2 packs a lane take 56 and 64
// registers with dx_in loaded with the row — 4 blocks an SM (≤ 64) — 3 packs 79 (64 if dx_in is loaded
// after the row's sums), 4 packs 80 without; f32 rows of 1–4 packs 56, 76, 96, 118 without. So dx_in
// joins the row's loads for bf16 up to 2 packs (C ≤ 512: the Kraken preset's 504), and the launch bounds
// ask for as many blocks as those counts allow. With a third term (Σ dx, below) the shared memory allows 3
// blocks an SM whatever the registers, so there 3 packs (C = 768: GPT-2's 24 LayerNorms after a bias) load
// dx_in with the row too: 80 registers where 3 blocks allow 85, no spills, and one round trip to memory a
// row instead of two (this kernel moved ~63% of an H100's bandwidth that way at 65536 × 768, fifteenth
// session; the same arithmetic, so the same bits).
template <typename T, int kPacks, int kTerms = 2>
constexpr bool dx_in_with_row() {
  return sizeof(T) == 2 && (kPacks <= 2 || (kTerms == 3 && kPacks == 3));
}
// A third term, Σ_rows dx (kTerms = 3: the bias before add_bias_layernorm's residual add), takes half as
// much shared memory again — 72 KB a block at C = 768, 3 blocks an SM — and the launch bounds ask for no
// more blocks than that leaves room for.
template <typename T, int kPacks, int kTerms = 2>
constexpr int fused_blocks_per_sm() {
  if (kTerms == 3) return kPacks <= 3 ? 3 : 2;
  if (sizeof(T) == 2) return kPacks <= 3 ? 4 : 3;
  return kPacks == 1 ? 4 : (kPacks == 2 ? 3 : 2);
}

__device__ __forceinline__ void add_float4(float4& s, const float* t) {
  s = make_float4(s.x + t[0], s.y + t[1], s.z + t[2], s.w + t[3]);
}

// A pack's share of the one-pass backward, shared with the fork's fused backward below so that both
// compile the same f32 expressions: the row's two sums for dx (Σ dout∘gamma and Σ dout∘gamma∘x̂) and the
// pack's dgamma and dbeta terms; then, given the sums' means, dx = acc + ∂x (acc: dx_in's pack, or 0).
__device__ __forceinline__ void backward_pack_terms(const float (&dv)[8], const float (&xv)[8], const float (&gm)[8],
                                                    float mu, float rs, bool with_gamma, float& sum_g,
                                                    float& sum_gx, float (&tg)[8], float (&tb)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float g = dv[i] * gm[i], centred = xv[i] - mu;
    sum_g += g;
    sum_gx += g * centred * rs;
    tg[i] = with_gamma ? dv[i] * centred * rs : 0.0f;
    tb[i] = dv[i];
  }
}
__device__ __forceinline__ void backward_pack_dx(const float (&dv)[8], const float (&xv)[8], const float (&gm)[8],
                                                 float mu, float rs, float mean_g, float mean_gx, float (&acc)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float g = dv[i] * gm[i], centred = xv[i] - mu;
    acc[i] = acc[i] + rs * (g - mean_g - centred * rs * mean_gx);
  }
}

template <typename T, int kPacks, int kTerms>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, (fused_blocks_per_sm<T, kPacks, kTerms>()))
    layernorm_backward_fused_x8_kernel(T* dx, const T* dx_in, float* partials, const T* dout, const T* x,
                                       GroupTable table, const float* mean, const float* rstd, int C,
                                       bool with_gamma) {
  static_assert(kPacks <= kMaxFusedPacks, "the one pass takes C up to 32 · 8 · kMaxFusedPacks only");
  static_assert(kTerms == 2 || kTerms == 3, "dgamma and dbeta terms, and Σ dx or not");
  // kWarpsPerBlock slices of [dgamma terms, dbeta terms (, dx)], C floats each
  KRAKEN_DYNAMIC_SHARED(float, sums);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, packs = C / 8;
  const float* gamma = nullptr;
  const int64_t end = enter_group(table, gamma, partials, C, kTerms), first = end - table.rows;
  float4* dg = reinterpret_cast<float4*>(sums + static_cast<int64_t>(kTerms * warp) * C);
  float4* db = dg + 2 * packs;  // (C / 4 float4 a term)
  float4* ds = db + 2 * packs;  // (kTerms = 3 only)
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {  // each lane zeroes the slots it alone adds to
    const int P = lane + 32 * p;
    if (P >= packs) break;
    for (int h = 0; h < 2; ++h) {
      dg[slice_float4(P, h, packs)] = db[slice_float4(P, h, packs)] = make_float4(0, 0, 0, 0);
      if (kTerms == 3) ds[slice_float4(P, h, packs)] = make_float4(0, 0, 0, 0);
    }
  }
  for (int k = 0; k < kFusedRowsPerWarp; ++k) {
    const int64_t r = first + static_cast<int64_t>(blockIdx.x) * kFusedRows + k * kWarpsPerBlock + warp;
    if (r >= end) break;  // (not return: the warp still takes part in the barrier below)
    constexpr bool kEarly = dx_in_with_row<T, kPacks, kTerms>();
    Stored8<T> d[kPacks] = {}, xs[kPacks] = {}, din[kEarly ? kPacks : 1] = {};  // (zeroed for the emulation)
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int c0 = 8 * (lane + 32 * p);
      if (c0 >= C) break;
      load_stored8_streaming(dout + r * C + c0, d[p]);
      load_stored8_streaming(x + r * C + c0, xs[p]);
      if (kEarly && dx_in) load_stored8_streaming(dx_in + r * C + c0, din[kEarly ? p : 0]);
    }
    const float mu = mean[r], rs = rstd[r];
    float sum_g = 0.0f, sum_gx = 0.0f;
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int P = lane + 32 * p, c0 = 8 * P;
      if (c0 >= C) break;
      float dv[8], xv[8], gm[8], tg[8], tb[8];
      widen8(d[p], dv);
      widen8(xs[p], xv);
      load8(gamma + c0, gm);
      backward_pack_terms(dv, xv, gm, mu, rs, with_gamma, sum_g, sum_gx, tg, tb);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        add_float4(dg[slice_float4(P, h, packs)], tg + 4 * h);
        add_float4(db[slice_float4(P, h, packs)], tb + 4 * h);
      }
    }
    const float mean_g = warp_sum(sum_g) / static_cast<float>(C);
    const float mean_gx = warp_sum(sum_gx) / static_cast<float>(C);
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int P = lane + 32 * p, c0 = 8 * P;
      if (c0 >= C) break;
      float dv[8], xv[8], gm[8], acc[8] = {};
      widen8(d[p], dv);
      widen8(xs[p], xv);
      load8(gamma + c0, gm);
      if (kEarly && dx_in) widen8(din[kEarly ? p : 0], acc);
      if (!kEarly && dx_in) load8(dx_in + r * C + c0, acc);
      backward_pack_dx(dv, xv, gm, mu, rs, mean_g, mean_gx, acc);
      store8(dx + r * C + c0, acc);
      if (kTerms == 3) {  // dx as stored: the column sums of the dx tensor would read these values
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = as_stored(acc[i], dx);
#pragma unroll
        for (int h = 0; h < 2; ++h) add_float4(ds[slice_float4(P, h, packs)], acc + 4 * h);
      }
    }
  }
  __syncthreads();
  for (int at = threadIdx.x; at < C; at += blockDim.x) {
    const int c = slice_column(at, packs);
    float total[kTerms] = {};
    for (int w = 0; w < kWarpsPerBlock; ++w)
#pragma unroll
      for (int k = 0; k < kTerms; ++k) total[k] += sums[static_cast<int64_t>(kTerms * w + k) * C + at];
#pragma unroll
    for (int k = 0; k < kTerms; ++k)
      partials[(static_cast<int64_t>(k) * gridDim.x + blockIdx.x) * C + c] = total[k];
  }
}

// LN2's backward and the summed fork's backward in one pass (kernels/layernorm.h): dm never goes to
// memory. The fork needs every group's dm at a position (ds = Σ_g dm[g]), so a block takes the grouped
// backward's chunk b — rows 32b .. 32b + 31 of each group, warp w rows 32b + w, + 8, + 16, + 24 in order — for
// all kGroups groups at once, each group with its own kWarpsPerBlock slices (64·kGroups·C bytes: 192 KiB for
// GPT-2's C = 768 at 4 groups, one block an SM). The slices and the partials are laid out and added as the
// grouped kernel's, so launch_column_totals gives the same dgamma and dbeta bits; dm is that kernel's dx with
// no dx_in (0 + ∂x, rounded), and ds, dy and dx are residual_fork_summed_backward_bf16x8_kernel's sums.
// A row position's dout, m and da of every group are loaded first (3·kGroups·kPacks 16-byte loads a lane in
// flight: with 8 warps an SM, one row each would leave too few bytes in flight to cover the latency), so
// kGroups·kPacks ≤ kMaxForkBackwardPacks.
constexpr int kMaxForkBackwardPacks = 12;

__device__ __forceinline__ Stored8<__nv_bfloat16> rounded8(const float (&v)[8]) {
  Stored8<__nv_bfloat16> s;
#pragma unroll
  for (int k = 0; k < 4; ++k) s.q.pair[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);  // (store8's rounding)
  return s;
}

template <int kPacks, int kGroups>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 1)
    fork_layernorm_backward_x8_kernel(__nv_bfloat16* dx, __nv_bfloat16* dy, float* partials,
                                      const __nv_bfloat16* da, const __nv_bfloat16* dout, const __nv_bfloat16* m,
                                      const GroupTable table, const float* mean, const float* rstd, int C,
                                      bool with_gamma, bool with_sums) {
  static_assert(kGroups * kPacks <= kMaxForkBackwardPacks, "too many packs held");
  // with_sums: kGroups × kWarpsPerBlock slices of [dgamma terms, dbeta terms], C floats each (else none)
  float* sums = nullptr;
  if (with_sums) {
    KRAKEN_DYNAMIC_SHARED(float, slices);
    sums = slices;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, packs = C / 8;
  const int64_t rows = table.rows;
  auto slice = [&](int g) {  // group g's dgamma slice of this warp; its dbeta slice follows
    return reinterpret_cast<float4*>(sums + static_cast<int64_t>(2 * (g * kWarpsPerBlock + warp)) * C);
  };
  if (with_sums) {
#pragma unroll
    for (int g = 0; g < kGroups; ++g)
#pragma unroll
      for (int p = 0; p < kPacks; ++p) {  // each lane zeroes the slots it alone adds to
        const int P = lane + 32 * p;
        if (P >= packs) break;
        for (int h = 0; h < 2; ++h)
          slice(g)[slice_float4(P, h, packs)] = slice(g)[2 * packs + slice_float4(P, h, packs)] =
              make_float4(0, 0, 0, 0);
      }
  }
  for (int k = 0; k < kFusedRowsPerWarp; ++k) {
    const int64_t r = static_cast<int64_t>(blockIdx.x) * kFusedRows + k * kWarpsPerBlock + warp;
    if (r >= rows) break;  // (not return: the warp still takes part in the barrier below)
    Stored8<__nv_bfloat16> d[kGroups][kPacks] = {}, xs[kGroups][kPacks] = {}, as[kGroups][kPacks] = {};
#pragma unroll
    for (int g = 0; g < kGroups; ++g)
#pragma unroll
      for (int p = 0; p < kPacks; ++p) {
        const int c0 = 8 * (lane + 32 * p);
        if (c0 >= C) break;
        const int64_t at = (g * rows + r) * C + c0;
        load_stored8_streaming(dout + at, d[g][p]);
        load_stored8_streaming(m + at, xs[g][p]);
        load_stored8_streaming(da + at, as[g][p]);
      }
    Stored8<__nv_bfloat16> dm[kGroups][kPacks] = {};
    float ds[kPacks][8] = {};
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      const float* gamma = table.gamma[g];
      const float mu = mean[g * rows + r], rs = rstd[g * rows + r];
      float sum_g = 0.0f, sum_gx = 0.0f;
#pragma unroll
      for (int p = 0; p < kPacks; ++p) {
        const int P = lane + 32 * p, c0 = 8 * P;
        if (c0 >= C) break;
        float dv[8], xv[8], gm[8], tg[8], tb[8];
        widen8(d[g][p], dv);
        widen8(xs[g][p], xv);
        load8(gamma + c0, gm);
        backward_pack_terms(dv, xv, gm, mu, rs, with_gamma, sum_g, sum_gx, tg, tb);
        if (with_sums) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            add_float4(slice(g)[slice_float4(P, h, packs)], tg + 4 * h);
            add_float4(slice(g)[2 * packs + slice_float4(P, h, packs)], tb + 4 * h);
          }
        }
      }
      const float mean_g = warp_sum(sum_g) / static_cast<float>(C);
      const float mean_gx = warp_sum(sum_gx) / static_cast<float>(C);
#pragma unroll
      for (int p = 0; p < kPacks; ++p) {
        const int c0 = 8 * (lane + 32 * p);
        if (c0 >= C) break;
        float dv[8], xv[8], gm[8], acc[8] = {};
        widen8(d[g][p], dv);
        widen8(xs[g][p], xv);
        load8(gamma + c0, gm);
        backward_pack_dx(dv, xv, gm, mu, rs, mean_g, mean_gx, acc);
        dm[g][p] = rounded8(acc);
        widen8(dm[g][p], acc);  // dm as the fork's backward would read it
#pragma unroll
        for (int i = 0; i < 8; ++i) ds[p][i] += acc[i];
      }
    }
    round_fork_sum<kPacks>(ds, dx);  // (dS rounded once, as the fork's backward stores it)
#pragma unroll
    for (int g = 0; g < kGroups; ++g)
#pragma unroll
      for (int p = 0; p < kPacks; ++p) {
        const int c0 = 8 * (lane + 32 * p);
        if (c0 >= C) break;
        float va[8], vm[8], vd[8];
        widen8(as[g][p], va);
        widen8(dm[g][p], vm);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          vd[i] = va[i] + vm[i];
          va[i] = va[i] + ds[p][i];
        }
        const int64_t at = (g * rows + r) * C + c0;
        store8(dy + at, vd);
        store8(dx + at, va);
      }
  }
  if (!with_sums) return;
  __syncthreads();
  for (int g = 0; g < kGroups; ++g) {
    const float* group = sums + static_cast<int64_t>(2 * g * kWarpsPerBlock) * C;
    float* out = partials + static_cast<int64_t>(2 * g) * gridDim.x * C;  // (the grouped kernel's set stride)
    for (int at = threadIdx.x; at < C; at += blockDim.x) {
      const int c = slice_column(at, packs);
      float total[2] = {};
      for (int w = 0; w < kWarpsPerBlock; ++w)
#pragma unroll
        for (int t = 0; t < 2; ++t) total[t] += group[static_cast<int64_t>(2 * w + t) * C + at];
#pragma unroll
      for (int t = 0; t < 2; ++t) out[(static_cast<int64_t>(t) * gridDim.x + blockIdx.x) * C + c] = total[t];
    }
  }
}

// Calls f(std::integral_constant<int, kPacks>()) with the packs per lane of a C the kernels above take;
// false (and no call) for any other C.
template <typename F>
bool with_packs_per_lane(int64_t C, F&& f) {
  if (C <= 0 || C % 8 != 0) return false;
  return cuda_detail::with_constant_in<1, kMaxPacks>((C / 8 + 31) / 32, f);
}

bool all_aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  return true;
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
  if (all_aligned16({out, x, gamma, beta}) && with_packs_per_lane(C, [&](auto packs) {
        KRAKEN_KERNEL(row_blocks(rows), kWarpsPerBlock * 32, 0, stream,
                      layernorm_forward_x8_kernel<T, decltype(packs)::value>)
        (out, mean, rstd, x, gamma, beta, rows, static_cast<int>(C), eps);
      })) {
    KRAKEN_CUDA_LAUNCH_CHECK();
    return;
  }
  KRAKEN_KERNEL(row_blocks(rows), kWarpsPerBlock * 32, 0, stream, layernorm_forward_kernel<T>)
  (out, mean, rstd, x, gamma, beta, rows, static_cast<int>(C), eps);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

template <typename T>
void add_layernorm_forward(T* s, T* out, float* mean, float* rstd, const T* a, const T* b, const float* gamma,
                           const float* beta, int64_t rows, int64_t C, float eps, CUstream_st* stream) {
  if (rows <= 0) return;
  if (all_aligned16({s, out, a, b, gamma, beta}) && with_packs_per_lane(C, [&](auto packs) {
        KRAKEN_KERNEL(row_blocks(rows), kWarpsPerBlock * 32, 0, stream,
                      add_layernorm_forward_x8_kernel<T, decltype(packs)::value>)
        (s, out, mean, rstd, a, b, static_cast<const T*>(nullptr), gamma, beta, rows, static_cast<int>(C), eps);
      })) {
    KRAKEN_CUDA_LAUNCH_CHECK();
    return;
  }
  KRAKEN_KERNEL(row_blocks(rows), kWarpsPerBlock * 32, 0, stream, add_layernorm_forward_kernel<T>)(
      s, out, mean, rstd, a, b, gamma, beta, rows, static_cast<int>(C), eps);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

// dgamma[g] += totals (where wanted) for the group blockIdx.y of a grouped launch; with kTerms = 3, dsum[g]
// = the third total, rounded to T (written: add_bias_layernorm's bias gradient is a new tensor).
template <typename T, int kTerms>
struct GroupedParamAccumulate {
  float* dgamma[kMaxGroupsPerLaunch];
  float* dbeta[kMaxGroupsPerLaunch];
  T* dsum[kMaxGroupsPerLaunch];
  __device__ __forceinline__ void operator()(int64_t c, const float (&totals)[kTerms]) const {
    if (float* g = dgamma[blockIdx.y]) g[c] += totals[0];
    if (float* b = dbeta[blockIdx.y]) b[c] += totals[1];
    if constexpr (kTerms == 3) {
      if (T* s = dsum[blockIdx.y]) store(s + c, totals[2]);
    }
  }
};

// The one pass (dx, dgamma and dbeta from one read of dout and x; with dsums, Σ_rows dx too) for G groups
// of `rows` rows each, up to kMaxGroupsPerLaunch a launch; false (nothing launched) where it does not
// apply: no dx, nothing to sum, C not a multiple of 8 up to 1024, or a buffer not 16-byte aligned.
// dsums: null, or G pointers (each (C,) or null).
template <typename T, int kTerms>
void launch_one_pass(T* dx, const T* dx_in, const LayerNormGroupGradients* groups, T* const* dsums, int64_t G,
                     const T* dout, const T* x, const float* mean, const float* rstd, int64_t rows, int64_t C,
                     bool with_gamma, CUstream_st* stream) {
  with_packs_per_lane(C, [&](auto packs) {
    constexpr int kPacks = decltype(packs)::value;
    if constexpr (kPacks <= kMaxFusedPacks) {
      const int64_t chunks = (rows + kFusedRows - 1) / kFusedRows;
      KRAKEN_CHECK(chunks <= 0x7fffffffLL, "layernorm backward: ", rows, " rows");
      for (int64_t g0 = 0; g0 < G; g0 += kMaxGroupsPerLaunch) {
        const int n = static_cast<int>(G - g0 < kMaxGroupsPerLaunch ? G - g0 : kMaxGroupsPerLaunch);
        GroupTable table{};
        GroupedParamAccumulate<T, kTerms> apply{};
        table.rows = rows;
        for (int k = 0; k < n; ++k) {
          table.gamma[k] = groups[g0 + k].gamma;
          apply.dgamma[k] = groups[g0 + k].dgamma;
          apply.dbeta[k] = groups[g0 + k].dbeta;
          apply.dsum[k] = dsums ? dsums[g0 + k] : nullptr;
        }
        const int64_t first = g0 * rows * C;
        float* partials = static_cast<float*>(cuda_detail::device_scratch(
            cuda_detail::ScratchSlot::kColumnSums, sizeof(float) * static_cast<size_t>(kTerms * n * chunks * C)));
        const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(n));
        T* dx_g = dx + first;
        const T* dx_in_g = dx_in ? dx_in + first : nullptr;
        const auto kernel = layernorm_backward_fused_x8_kernel<T, kPacks, kTerms>;
        const size_t bytes = sizeof(float) * kTerms * kWarpsPerBlock * static_cast<size_t>(C);
        if (bytes > 48 * 1024)  // above the default, asked for per kernel (C > 768, or Σ dx at C > 512)
          KRAKEN_CUDA_CHECK(
              cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
        KRAKEN_KERNEL(grid, kWarpsPerBlock * 32, bytes, stream, kernel)
        (dx_g, dx_in_g, partials, dout + first, x + first, table, mean + g0 * rows, rstd + g0 * rows,
         static_cast<int>(C), with_gamma);
        KRAKEN_CUDA_LAUNCH_CHECK();
        cuda_detail::launch_column_totals<kTerms>(partials, chunks, C, apply, stream, n, kTerms * chunks * C);
      }
    }
  });
}

template <typename T>
bool layernorm_backward_one_pass(T* dx, const T* dx_in, const LayerNormGroupGradients* groups, T* const* dsums,
                                 int64_t G, const T* dout, const T* x, const float* mean, const float* rstd,
                                 int64_t rows, int64_t C, CUstream_st* stream) {
  bool any_sums = false, with_gamma = false, aligned = all_aligned16({dx, dx_in, dout, x});
  for (int64_t g = 0; g < G; ++g) {
    any_sums = any_sums || groups[g].dgamma || groups[g].dbeta || (dsums && dsums[g]);
    with_gamma = with_gamma || groups[g].dgamma;
    aligned = aligned && groups[g].gamma && aligned16(groups[g].gamma);
  }
  if (!dx || !any_sums || !aligned || C <= 0 || C % 8 != 0 || C > 32 * 8 * kMaxFusedPacks) return false;
  if (dsums) {
    if constexpr (sizeof(T) == 2)  // (bf16 alone asks for Σ dx: no f32 kernels compiled for it)
      launch_one_pass<T, 3>(dx, dx_in, groups, dsums, G, dout, x, mean, rstd, rows, C, with_gamma, stream);
    else
      return false;
  } else {
    launch_one_pass<T, 2>(dx, dx_in, groups, nullptr, G, dout, x, mean, rstd, rows, C, with_gamma, stream);
  }
  return true;
}

// One group by the kernels that take one gamma: dx alone, then dgamma/dbeta by the column sums.
template <typename T>
void layernorm_backward_separately(T* dx, const T* dx_in, float* dgamma, float* dbeta, const T* dout, const T* x,
                                   const float* gamma, const float* mean, const float* rstd, int64_t rows, int64_t C,
                                   CUstream_st* stream) {
  if (dx) {
    if (!(all_aligned16({dx, dx_in, dout, x, gamma}) && with_packs_per_lane(C, [&](auto packs) {
          KRAKEN_KERNEL(row_blocks(rows), kWarpsPerBlock * 32, 0, stream,
                        layernorm_backward_dx_x8_kernel<T, decltype(packs)::value>)
          (dx, dx_in, dout, x, gamma, mean, rstd, rows, static_cast<int>(C));
        }))) {
      KRAKEN_KERNEL(row_blocks(rows), kWarpsPerBlock * 32, 0, stream, layernorm_backward_dx_kernel<T>)(
          dx, dx_in, dout, x, gamma, mean, rstd, rows, static_cast<int>(C));
    }
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

// G groups of `rows` rows each (kernels/layernorm.h): one pass where it applies, else group by group.
template <typename T>
void layernorm_backward(T* dx, const T* dx_in, const LayerNormGroupGradients* groups, int64_t G, const T* dout,
                        const T* x, const float* mean, const float* rstd, int64_t rows, int64_t C,
                        CUstream_st* stream) {
  // in the forward pass this was: out = x̂·gamma + beta, x̂ = (x − μ)·rstd
  KRAKEN_CHECK(G >= 1, "layernorm backward: ", G, " groups");
  if (rows <= 0) return;
  if (layernorm_backward_one_pass(dx, dx_in, groups, static_cast<T* const*>(nullptr), G, dout, x, mean, rstd, rows,
                                  C, stream))
    return;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t first = g * rows * C;
    layernorm_backward_separately(dx ? dx + first : nullptr, dx && dx_in ? dx_in + first : nullptr, groups[g].dgamma,
                                  groups[g].dbeta, dout + first, x ? x + first : nullptr, groups[g].gamma,
                                  mean + g * rows, rstd + g * rows, rows, C, stream);
  }
}

}  // namespace

void layernorm_forward_cuda(float* out, float* mean, float* rstd, const float* x, const float* gamma,
                            const float* beta, int64_t rows, int64_t C, float eps, CUstream_st* stream) {
  layernorm_forward(out, mean, rstd, x, gamma, beta, rows, C, eps, stream);
}

void layernorm_backward_cuda(float* dx, const float* dx_in, float* dgamma, float* dbeta, const float* dout,
                             const float* x, const float* gamma, const float* mean, const float* rstd, int64_t rows,
                             int64_t C, CUstream_st* stream) {
  const LayerNormGroupGradients one{gamma, dgamma, dbeta};
  layernorm_backward(dx, dx_in, &one, 1, dout, x, mean, rstd, rows, C, stream);
}

void layernorm_backward_grouped_cuda(float* dx, const float* dx_in, const LayerNormGroupGradients* groups, int64_t G,
                                     const float* dout, const float* x, const float* mean, const float* rstd,
                                     int64_t rows_per_group, int64_t C, CUstream_st* stream) {
  layernorm_backward(dx, dx_in, groups, G, dout, x, mean, rstd, rows_per_group, C, stream);
}

void layernorm_forward_bf16_cuda(uint16_t* out, float* mean, float* rstd, const uint16_t* x, const float* gamma,
                                 const float* beta, int64_t rows, int64_t C, float eps, CUstream_st* stream) {
  layernorm_forward(as_bf16(out), mean, rstd, as_bf16(x), gamma, beta, rows, C, eps, stream);
}

void layernorm_backward_bf16_cuda(uint16_t* dx, const uint16_t* dx_in, float* dgamma, float* dbeta,
                                  const uint16_t* dout, const uint16_t* x, const float* gamma, const float* mean,
                                  const float* rstd, int64_t rows, int64_t C, CUstream_st* stream) {
  const LayerNormGroupGradients one{gamma, dgamma, dbeta};
  layernorm_backward(as_bf16(dx), as_bf16(dx_in), &one, 1, as_bf16(dout), as_bf16(x), mean, rstd, rows, C, stream);
}

void layernorm_backward_grouped_bf16_cuda(uint16_t* dx, const uint16_t* dx_in, const LayerNormGroupGradients* groups,
                                          int64_t G, const uint16_t* dout, const uint16_t* x, const float* mean,
                                          const float* rstd, int64_t rows_per_group, int64_t C, CUstream_st* stream) {
  layernorm_backward(as_bf16(dx), as_bf16(dx_in), groups, G, as_bf16(dout), as_bf16(x), mean, rstd, rows_per_group, C,
                     stream);
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

bool add_bias_layernorm_forward_bf16_cuda(uint16_t* s, uint16_t* out, float* mean, float* rstd, const uint16_t* a,
                                          const uint16_t* b, const uint16_t* bias, const float* gamma,
                                          const float* beta, int64_t rows, int64_t C, float eps, CUstream_st* stream) {
  if (rows <= 0 || !bias || !gamma || !all_aligned16({s, out, a, b, bias, gamma, beta})) return false;
  return with_packs_per_lane(C, [&](auto packs) {
    KRAKEN_KERNEL(row_blocks(rows), kWarpsPerBlock * 32, 0, stream,
                  add_layernorm_forward_x8_kernel<__nv_bfloat16, decltype(packs)::value>)
    (as_bf16(s), as_bf16(out), mean, rstd, as_bf16(a), as_bf16(b), as_bf16(bias), gamma, beta, rows,
     static_cast<int>(C), eps);
    KRAKEN_CUDA_LAUNCH_CHECK();
  });
}

bool layernorm_backward_summing_dx_bf16_cuda(uint16_t* dx, const uint16_t* dx_in, const LayerNormGroupGradients* groups,
                                             int64_t G, uint16_t* dx_sums, const uint16_t* dout, const uint16_t* x,
                                             const float* mean, const float* rstd, int64_t rows_per_group, int64_t C,
                                             CUstream_st* stream) {
  if (rows_per_group <= 0 || G < 1 || !dx_sums || C % 8 != 0) return false;
  std::vector<__nv_bfloat16*> sums(static_cast<size_t>(G));
  for (int64_t g = 0; g < G; ++g) {
    sums[static_cast<size_t>(g)] = as_bf16(dx_sums) + g * C;
    if (!aligned16(sums[static_cast<size_t>(g)])) return false;
  }
  return layernorm_backward_one_pass(as_bf16(dx), as_bf16(dx_in), groups, sums.data(), G, as_bf16(dout), as_bf16(x),
                                     mean, rstd, rows_per_group, C, stream);
}

bool residual_fork_summed_layernorm_bf16_cuda(uint16_t* a, uint16_t* m, uint16_t* out, float* mean, float* rstd,
                                              const uint16_t* x, const uint16_t* y, const float* const* gammas,
                                              const float* const* betas, int64_t G, int64_t rows, int64_t C, float eps,
                                              CUstream_st* stream) {
  if (G < 2 || G > kMaxForkNormGroups || !all_aligned16({a, m, out, x, y})) return false;
  ForkNorms norms{};
  for (int64_t g = 0; g < G; ++g) {
    if (!gammas[g] || !aligned16(gammas[g]) || (betas[g] && !aligned16(betas[g]))) return false;
    norms.gamma[g] = gammas[g];
    norms.beta[g] = betas[g];
  }
  return with_packs_per_lane(C, [&](auto packs) {
    if (rows <= 0) return;
    constexpr int kPacks = decltype(packs)::value;
    auto launch = [&](auto groups) {
      KRAKEN_KERNEL(row_blocks(rows), kWarpsPerBlock * 32, 0, stream,
                    residual_fork_summed_layernorm_x8_kernel<kPacks, decltype(groups)::value>)
      (as_bf16(a), as_bf16(m), as_bf16(out), mean, rstd, as_bf16(x), as_bf16(y), norms, static_cast<int>(G), rows,
       static_cast<int>(C), eps);
      KRAKEN_CUDA_LAUNCH_CHECK();
    };
    // Every group's row loaded first where G·kPacks ≤ kMaxForkPacksInFlight, for the G the presets use.
    if constexpr (4 * kPacks <= kMaxForkPacksInFlight)
      if (G == 4) return launch(std::integral_constant<int, 4>());
    if constexpr (2 * kPacks <= kMaxForkPacksInFlight)
      if (G == 2) return launch(std::integral_constant<int, 2>());
    launch(std::integral_constant<int, 0>());
  });
}

bool residual_fork_summed_layernorm_backward_bf16_cuda(uint16_t* dx, uint16_t* dy,
                                                       const LayerNormGroupGradients* groups, int64_t G,
                                                       const uint16_t* da, const uint16_t* dout, const uint16_t* m,
                                                       const float* mean, const float* rstd, int64_t rows, int64_t C,
                                                       CUstream_st* stream) {
  // (C up to the grouped one pass's 1024: above it that backward sums dgamma and dbeta in another order)
  if ((G != 2 && G != 4) || rows <= 0 || C <= 0 || C % 8 != 0 || C > 32 * 8 * kMaxFusedPacks ||
      !all_aligned16({dx, dy, da, dout, m}))
    return false;
  const int64_t chunks = (rows + kFusedRows - 1) / kFusedRows;
  if (chunks > 0x7fffffffLL) return false;
  GroupTable table{};
  GroupedParamAccumulate<__nv_bfloat16, 2> apply{};
  table.rows = rows;
  bool with_gamma = false, with_sums = false;
  for (int64_t g = 0; g < G; ++g) {
    if (!groups[g].gamma || !aligned16(groups[g].gamma)) return false;
    table.gamma[g] = groups[g].gamma;
    apply.dgamma[g] = groups[g].dgamma;
    apply.dbeta[g] = groups[g].dbeta;
    with_gamma = with_gamma || groups[g].dgamma;
    with_sums = with_sums || groups[g].dgamma || groups[g].dbeta;
  }
  const size_t bytes = with_sums ? sizeof(float) * 2 * kWarpsPerBlock * static_cast<size_t>(G * C) : 0;
  int device = 0, optin = 0;
  KRAKEN_CUDA_CHECK(cudaGetDevice(&device));
  KRAKEN_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > static_cast<size_t>(optin)) return false;
  bool launched = false;
  with_packs_per_lane(C, [&](auto packs) {
    constexpr int kPacks = decltype(packs)::value;
    auto launch = [&](auto groups_constant) {
      constexpr int kGroupsHere = decltype(groups_constant)::value;
      if constexpr (kGroupsHere * kPacks <= kMaxForkBackwardPacks && kPacks <= kMaxFusedPacks) {
        float* partials = with_sums ? static_cast<float*>(cuda_detail::device_scratch(
                                          cuda_detail::ScratchSlot::kColumnSums,
                                          sizeof(float) * static_cast<size_t>(2 * G * chunks * C)))
                                    : nullptr;
        const auto kernel = fork_layernorm_backward_x8_kernel<kPacks, kGroupsHere>;
        if (bytes > 48 * 1024)
          KRAKEN_CUDA_CHECK(
              cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
        KRAKEN_KERNEL(static_cast<unsigned>(chunks), kWarpsPerBlock * 32, bytes, stream, kernel)
        (as_bf16(dx), as_bf16(dy), partials, as_bf16(da), as_bf16(dout), as_bf16(m), table, mean, rstd,
         static_cast<int>(C), with_gamma, with_sums);
        KRAKEN_CUDA_LAUNCH_CHECK();
        if (with_sums)
          cuda_detail::launch_column_totals<2>(partials, chunks, C, apply, stream, static_cast<int>(G),
                                               2 * chunks * C);
        launched = true;
      }
    };
    if (G == 4) launch(std::integral_constant<int, 4>());
    else launch(std::integral_constant<int, 2>());
  });
  return launched;
}

}  // namespace kraken::kernels
