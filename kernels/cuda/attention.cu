// CUDA causal attention, fp32: FlashAttention's tiling (Dao et al. 2022) with shared-memory tiles.
//
// Forward: one block per (query tile of kBr rows, b·h). Key/value tiles of kBc rows stream through
// shared memory; each row keeps a running maximum m and sum l (online softmax, Milakov & Gimelshein
// 2018): with a new tile's scores s, m' = max(m, max s), l' = l·e^{m−m'} + Σ e^{s−m'}, and the output
// accumulator O' = O·e^{m−m'} + e^{s−m'}·v. At the end out = O/l and lse = m + log l.
//
// Backward, without float atomics, as two kernels that write disjoint columns of dqkv:
//   key kernel,   one block per (key tile j, b·h): for every query tile i ≥ j recompute
//                 P = exp(S − lse), dP = dO·vᵀ, dS = P ∘ (dP − Dᵢ) and accumulate dV_j += Pᵀ·dO_i,
//                 dK_j += dSᵀ·q_i/√D in shared memory; write them once.
//   query kernel, one block per (query tile i, b·h): the same dS for key tiles j ≤ i, dQ_i += dS·k_j/√D.
// Dᵢ = Σ_d dO[i, d]·O[i, d] is recomputed by each block from dout and out (a row dot product), so the
// kernels need no workspace. Every output element is owned by one thread that sums in a fixed order:
// results are deterministic run to run.
//
// The kernels are templates on the storage type T of qkv, out, dout and dqkv (kernels/cuda/storage.h):
// f32, or bf16 widened to f32 as the tiles are loaded into shared memory. Everything after the load
// (scores, softmax, products, Dᵢ) is the same f32 arithmetic for both; out and every dqkv element are
// rounded once when written (dqkv: read, added to in f32, rounded). lse is f32 for both.
//
// The bf16 instance is attention_*_bf16_simt_cuda. attention_*_bf16_cuda, at the end, choose between it,
// the tensor-core kernels of attention_tc.cu and attention_mma.cu and cuDNN's fused attention
// (attention_cudnn.cu) (KRAKEN_CUDA_ATTENTION, kernels/cuda/README.md).
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <set>

#include "kernels/attention.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/storage.h"

namespace kraken::kernels {
namespace {

using cuda_detail::as_bf16;
using cuda_detail::load;
using cuda_detail::store;

constexpr int kBr = 32;       // query rows per tile
constexpr int kBc = 32;       // key rows per tile (one per lane of a warp)
constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr size_t kDefaultSmem = 48 * 1024;

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct Dims {
  int T, C, NH, D;
  int64_t ld;  // 3C
  float scale;
};

// Loads rows [t0, t0 + n) of one head's D columns (row stride `stride` in global) into dst with row
// pitch `pitch` (f32); rows past T are zero.
template <typename T>
__device__ void load_tile(float* dst, int pitch, const T* src, int64_t stride, int t0, int rows, const Dims& g) {
  for (int idx = threadIdx.x; idx < rows * g.D; idx += blockDim.x) {
    const int r = idx / g.D, d = idx % g.D;
    dst[r * pitch + d] = t0 + r < g.T ? load(src + static_cast<int64_t>(t0 + r) * stride + d) : 0.0f;
  }
}

// ---- forward ------------------------------------------------------------------------------------------
// Shared: q (kBr, D+1), k (kBc, D+1), v (kBc, D), s (kBr, kBc+1), o (kBr, D), m, l, alpha (kBr).
template <typename T>
__global__ void attention_forward_kernel(T* out, float* lse, const T* qkv, Dims g) {
  KRAKEN_DYNAMIC_SHARED(float, smem);
  const int D = g.D, dp = D + 1;
  float* qs = smem;
  float* ks = qs + kBr * dp;
  float* vs = ks + kBc * dp;
  float* ss = vs + kBc * D;
  float* os = ss + kBr * (kBc + 1);
  float* row_m = os + kBr * D;
  float* row_l = row_m + kBr;
  float* row_alpha = row_l + kBr;

  const int bh = blockIdx.y, b = bh / g.NH, h = bh % g.NH;
  const int q0 = blockIdx.x * kBr;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const T* base = qkv + static_cast<int64_t>(b) * g.T * g.ld + h * D;

  load_tile(qs, dp, base, g.ld, q0, kBr, g);
  for (int idx = threadIdx.x; idx < kBr * D; idx += blockDim.x) os[idx] = 0.0f;
  for (int r = threadIdx.x; r < kBr; r += blockDim.x) {
    row_m[r] = -INFINITY;
    row_l[r] = 0.0f;
  }
  const int last_query = min(q0 + kBr, g.T) - 1;
  for (int k0 = 0; k0 <= last_query; k0 += kBc) {
    __syncthreads();  // the previous tile's k, v and p are no longer read
    load_tile(ks, dp, base + g.C, g.ld, k0, kBc, g);
    load_tile(vs, D, base + 2 * g.C, g.ld, k0, kBc, g);
    __syncthreads();
    // S = q·kᵀ/√D with the causal mask; lane = key column, so k rows (pitch D+1) hit distinct banks.
    for (int r = warp; r < kBr; r += kWarps) {
      const int t = q0 + r, key = k0 + lane;
      float dot = 0.0f;
      for (int d = 0; d < D; ++d) dot += qs[r * dp + d] * ks[lane * dp + d];
      ss[r * (kBc + 1) + lane] = (key <= t && t < g.T) ? dot * g.scale : -INFINITY;
    }
    __syncthreads();
    // Online softmax, one warp per row.
    for (int r = warp; r < kBr; r += kWarps) {
      const float s = ss[r * (kBc + 1) + lane];
      const float m_old = row_m[r];
      const float m_new = fmaxf(m_old, warp_max(s));
      // A row past T has seen only −∞: it adds nothing and keeps O = 0, l = 0 (no ∞ − ∞ = NaN).
      const bool empty = m_new == -INFINITY;
      const float p = empty ? 0.0f : expf(s - m_new);
      const float alpha = empty ? 1.0f : expf(m_old - m_new);  // e^{−∞} = 0 on the first tile
      const float psum = warp_sum(p);
      ss[r * (kBc + 1) + lane] = p;
      __syncwarp();
      if (lane == 0) {
        row_m[r] = m_new;
        row_l[r] = row_l[r] * alpha + psum;
        row_alpha[r] = alpha;
      }
    }
    __syncthreads();
    // O = O·alpha + P·v
    for (int idx = threadIdx.x; idx < kBr * D; idx += blockDim.x) {
      const int r = idx / D, d = idx % D;
      float acc = os[idx] * row_alpha[r];
      for (int c = 0; c < kBc; ++c) acc += ss[r * (kBc + 1) + c] * vs[c * D + d];
      os[idx] = acc;
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kBr * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D, t = q0 + r;
    if (t < g.T) store(out + (static_cast<int64_t>(b) * g.T + t) * g.C + h * D + d, os[idx] / row_l[r]);
  }
  for (int r = threadIdx.x; r < kBr; r += blockDim.x)
    if (q0 + r < g.T) lse[static_cast<int64_t>(bh) * g.T + q0 + r] = row_m[r] + logf(row_l[r]);
}

// ---- backward -----------------------------------------------------------------------------------------
// Loads the query tile's q, dO (pitch D+1), lse and Dᵢ = Σ_d dO·O; rows past T get lse = +∞ (so P = 0).
template <typename T>
__device__ void load_query_side(float* qs, float* dos, float* lse_s, float* delta_s, const T* qkv_base, const T* dout,
                                const T* out, const float* lse, int b, int bh, int h, int q0, const Dims& g) {
  const int D = g.D, dp = D + 1;
  const int64_t row0 = static_cast<int64_t>(b) * g.T;
  load_tile(qs, dp, qkv_base, g.ld, q0, kBr, g);
  load_tile(dos, dp, dout + row0 * g.C + h * D, g.C, q0, kBr, g);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int r = warp; r < kBr; r += kWarps) {
    const int t = q0 + r;
    float acc = 0.0f;
    if (t < g.T)
      for (int d = lane; d < D; d += 32)
        acc += load(dout + (row0 + t) * g.C + h * D + d) * load(out + (row0 + t) * g.C + h * D + d);
    acc = warp_sum(acc);
    if (lane == 0) {
      delta_s[r] = acc;
      lse_s[r] = t < g.T ? lse[static_cast<int64_t>(bh) * g.T + t] : INFINITY;
    }
  }
}

// P and dS for (query tile q0, key tile k0): lane = key column, one warp per row.
// P = exp(S − lse) (0 where the key follows the query), dS = P ∘ (dP − Dᵢ) with dP = dO·vᵀ.
__device__ void probabilities_and_ds(float* ps, float* dss, const float* qs, const float* dos, const float* ks,
                                     const float* vs, const float* lse_s, const float* delta_s, int q0, int k0,
                                     const Dims& g) {
  const int D = g.D, dp = D + 1;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int r = warp; r < kBr; r += kWarps) {
    const int t = q0 + r, key = k0 + lane;
    float s = 0.0f, dpv = 0.0f;
    for (int d = 0; d < D; ++d) {
      s += qs[r * dp + d] * ks[lane * dp + d];
      dpv += dos[r * dp + d] * vs[lane * dp + d];
    }
    const float p = (key <= t && t < g.T) ? expf(s * g.scale - lse_s[r]) : 0.0f;
    if (ps) ps[r * (kBc + 1) + lane] = p;
    dss[r * (kBc + 1) + lane] = p * (dpv - delta_s[r]);
  }
}

// Shared: k, v, q, dO (pitch D+1), dK, dV (D), P, dS (kBc+1), lse, Dᵢ.
template <typename T>
__global__ void attention_backward_kv_kernel(T* dqkv, const T* dout, const T* qkv, const T* out, const float* lse,
                                             Dims g) {
  KRAKEN_DYNAMIC_SHARED(float, smem);
  const int D = g.D, dp = D + 1;
  float* ks = smem;
  float* vs = ks + kBc * dp;
  float* qs = vs + kBc * dp;
  float* dos = qs + kBr * dp;
  float* dks = dos + kBr * dp;
  float* dvs = dks + kBc * D;
  float* ps = dvs + kBc * D;
  float* dss = ps + kBr * (kBc + 1);
  float* lse_s = dss + kBr * (kBc + 1);
  float* delta_s = lse_s + kBr;

  const int bh = blockIdx.y, b = bh / g.NH, h = bh % g.NH;
  const int k0 = blockIdx.x * kBc;
  const T* base = qkv + static_cast<int64_t>(b) * g.T * g.ld + h * D;
  load_tile(ks, dp, base + g.C, g.ld, k0, kBc, g);
  load_tile(vs, dp, base + 2 * g.C, g.ld, k0, kBc, g);
  for (int idx = threadIdx.x; idx < kBc * D; idx += blockDim.x) dks[idx] = dvs[idx] = 0.0f;

  for (int q0 = k0 / kBr * kBr; q0 < g.T; q0 += kBr) {  // query tiles that see this key tile
    __syncthreads();
    load_query_side(qs, dos, lse_s, delta_s, base, dout, out, lse, b, bh, h, q0, g);
    __syncthreads();
    probabilities_and_ds(ps, dss, qs, dos, ks, vs, lse_s, delta_s, q0, k0, g);
    __syncthreads();
    // dV += Pᵀ·dO, dK += dSᵀ·q: thread owns (key c, column d).
    for (int idx = threadIdx.x; idx < kBc * D; idx += blockDim.x) {
      const int c = idx / D, d = idx % D;
      float dv = dvs[idx], dk = dks[idx];
      for (int r = 0; r < kBr; ++r) {
        dv += ps[r * (kBc + 1) + c] * dos[r * dp + d];
        dk += dss[r * (kBc + 1) + c] * qs[r * dp + d];
      }
      dvs[idx] = dv;
      dks[idx] = dk;
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kBc * D; idx += blockDim.x) {
    const int c = idx / D, d = idx % D, key = k0 + c;
    if (key >= g.T) continue;
    T* row = dqkv + (static_cast<int64_t>(b) * g.T + key) * g.ld + h * D + d;
    store(row + g.C, load(row + g.C) + g.scale * dks[idx]);  // dk = dSᵀ·q/√D
    store(row + 2 * g.C, load(row + 2 * g.C) + dvs[idx]);   // dv = Pᵀ·dO
  }
}

// Shared: q, dO, k, v (pitch D+1), dQ (D), dS (kBc+1), lse, Dᵢ.
template <typename T>
__global__ void attention_backward_q_kernel(T* dqkv, const T* dout, const T* qkv, const T* out, const float* lse,
                                            Dims g) {
  KRAKEN_DYNAMIC_SHARED(float, smem);
  const int D = g.D, dp = D + 1;
  float* qs = smem;
  float* dos = qs + kBr * dp;
  float* ks = dos + kBr * dp;
  float* vs = ks + kBc * dp;
  float* dqs = vs + kBc * dp;
  float* dss = dqs + kBr * D;
  float* lse_s = dss + kBr * (kBc + 1);
  float* delta_s = lse_s + kBr;

  const int bh = blockIdx.y, b = bh / g.NH, h = bh % g.NH;
  const int q0 = blockIdx.x * kBr;
  const T* base = qkv + static_cast<int64_t>(b) * g.T * g.ld + h * D;
  load_query_side(qs, dos, lse_s, delta_s, base, dout, out, lse, b, bh, h, q0, g);
  for (int idx = threadIdx.x; idx < kBr * D; idx += blockDim.x) dqs[idx] = 0.0f;
  const int last_query = min(q0 + kBr, g.T) - 1;
  for (int k0 = 0; k0 <= last_query; k0 += kBc) {
    __syncthreads();
    load_tile(ks, dp, base + g.C, g.ld, k0, kBc, g);
    load_tile(vs, dp, base + 2 * g.C, g.ld, k0, kBc, g);
    __syncthreads();
    probabilities_and_ds(nullptr, dss, qs, dos, ks, vs, lse_s, delta_s, q0, k0, g);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kBr * D; idx += blockDim.x) {  // dQ += dS·k
      const int r = idx / D, d = idx % D;
      float acc = dqs[idx];
      for (int c = 0; c < kBc; ++c) acc += dss[r * (kBc + 1) + c] * ks[c * dp + d];
      dqs[idx] = acc;
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kBr * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D, t = q0 + r;
    if (t < g.T) {
      T* dq = dqkv + (static_cast<int64_t>(b) * g.T + t) * g.ld + h * D + d;
      store(dq, load(dq) + g.scale * dqs[idx]);  // dq = dS·k/√D
    }
  }
}

Dims make_dims(int64_t T, int64_t C, int64_t NH) {
  KRAKEN_CHECK(NH > 0 && C > 0 && C % NH == 0, "C=", C, " NH=", NH);
  KRAKEN_CHECK(T < (1LL << 31) && C < (1LL << 29), "T=", T, " C=", C);
  Dims g;
  g.T = static_cast<int>(T);
  g.C = static_cast<int>(C);
  g.NH = static_cast<int>(NH);
  g.D = static_cast<int>(C / NH);
  g.ld = 3 * C;
  g.scale = 1.0f / sqrtf(static_cast<float>(g.D));
  return g;
}

// Shared memory above the default 48 KiB must be asked for per kernel (heads of D ≥ 64 need it).
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > kDefaultSmem)
    KRAKEN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

dim3 grid_for(int64_t T, int tile, int64_t BH) {
  KRAKEN_CHECK(BH <= 65535, "B·NH = ", BH, " exceeds the grid's y limit");
  return dim3(static_cast<unsigned>((T + tile - 1) / tile), static_cast<unsigned>(BH));
}

template <typename T>
void attention_forward(T* out, float* lse, const T* qkv, int64_t B, int64_t T_, int64_t C, int64_t NH,
                       CUstream_st* stream) {
  if (B == 0 || T_ == 0) return;
  const Dims g = make_dims(T_, C, NH);
  const int D = g.D;
  const size_t smem = sizeof(float) * (kBr * (D + 1) + kBc * (D + 1) + kBc * D + kBr * (kBc + 1) + kBr * D + 3 * kBr);
  allow_smem(attention_forward_kernel<T>, smem);
  KRAKEN_KERNEL(grid_for(T_, kBr, B * NH), kThreads, smem, stream, attention_forward_kernel<T>)(out, lse, qkv, g);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

template <typename T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* out, const float* lse, int64_t B, int64_t T_,
                        int64_t C, int64_t NH, CUstream_st* stream) {
  if (B == 0 || T_ == 0) return;
  const Dims g = make_dims(T_, C, NH);
  const int D = g.D;
  const size_t smem_kv =
      sizeof(float) * (2 * kBc * (D + 1) + 2 * kBr * (D + 1) + 2 * kBc * D + 2 * kBr * (kBc + 1) + 2 * kBr);
  allow_smem(attention_backward_kv_kernel<T>, smem_kv);
  KRAKEN_KERNEL(grid_for(T_, kBc, B * NH), kThreads, smem_kv, stream, attention_backward_kv_kernel<T>)
  (dqkv, dout, qkv, out, lse, g);
  KRAKEN_CUDA_LAUNCH_CHECK();
  const size_t smem_q =
      sizeof(float) * (2 * kBr * (D + 1) + 2 * kBc * (D + 1) + kBr * D + kBr * (kBc + 1) + 2 * kBr);
  allow_smem(attention_backward_q_kernel<T>, smem_q);
  KRAKEN_KERNEL(grid_for(T_, kBr, B * NH), kThreads, smem_q, stream, attention_backward_q_kernel<T>)
  (dqkv, dout, qkv, out, lse, g);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

}  // namespace

void attention_forward_cuda(float* out, float* lse, const float* qkv, int64_t B, int64_t T, int64_t C, int64_t NH,
                            CUstream_st* stream) {
  attention_forward(out, lse, qkv, B, T, C, NH, stream);
}

void attention_backward_cuda(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                             int64_t B, int64_t T, int64_t C, int64_t NH, CUstream_st* stream) {
  attention_backward(dqkv, dout, qkv, out, lse, B, T, C, NH, stream);
}

void attention_forward_bf16_simt_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, int64_t C,
                                      int64_t NH, CUstream_st* stream) {
  attention_forward(as_bf16(out), lse, as_bf16(qkv), B, T, C, NH, stream);
}

void attention_backward_bf16_simt_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                       const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                                       CUstream_st* stream) {
  attention_backward(as_bf16(dqkv), as_bf16(dout), as_bf16(qkv), as_bf16(out), lse, B, T, C, NH, stream);
}

namespace {

// KRAKEN_CUDA_ATTENTION, read once per process (kernels/attention.h).
enum class AttentionChoice { kDefault, kMma, kTc, kSimt, kCudnn, kWgmma, kWgmmaBackward };
AttentionChoice attention_choice() {
  static const AttentionChoice choice = [] {
    const char* env = std::getenv("KRAKEN_CUDA_ATTENTION");
    if (!env || !*env) return AttentionChoice::kDefault;
    if (std::strcmp(env, "mma") == 0) return AttentionChoice::kMma;
    if (std::strcmp(env, "tc") == 0) return AttentionChoice::kTc;
    if (std::strcmp(env, "simt") == 0) return AttentionChoice::kSimt;
    if (std::strcmp(env, "cudnn") == 0) return AttentionChoice::kCudnn;
    if (std::strcmp(env, "wgmma") == 0) return AttentionChoice::kWgmma;
    if (std::strcmp(env, "wgmma-backward") == 0) return AttentionChoice::kWgmmaBackward;
    KRAKEN_THROW("KRAKEN_CUDA_ATTENTION=", env, ": expected mma, tc, simt, cudnn, wgmma or wgmma-backward");
  }();
  return choice;
}

#if KRAKEN_CUDA_EMULATION
// The CPU emulation (tests/cuda_emu) has no cuDNN: every call falls back as where cuDNN refuses a shape.
bool cudnn_supported(int64_t) { return false; }
bool cudnn_usable(std::initializer_list<const void*>, int64_t, int64_t, int64_t, int64_t) { return false; }
void cudnn_forward(uint16_t*, float*, const uint16_t*, int64_t, int64_t, int64_t, int64_t, CUstream_st*) {}
void cudnn_backward(uint16_t*, const uint16_t*, const uint16_t*, const uint16_t*, const float*, int64_t, int64_t,
                    int64_t, int64_t, CUstream_st*) {}
#else
bool cudnn_supported(int64_t D) { return attention_bf16_cudnn_supported(D); }
bool cudnn_usable(std::initializer_list<const void*> buffers, int64_t B, int64_t T, int64_t C, int64_t NH) {
  return attention_bf16_cudnn_usable(buffers.begin(), static_cast<int64_t>(buffers.size()), B, T, C, NH);
}
constexpr auto cudnn_forward = attention_forward_bf16_cudnn_cuda;
constexpr auto cudnn_backward = attention_backward_bf16_cudnn_cuda;
#endif

// Whether this call may go to cuDNN: always where KRAKEN_CUDA_ATTENTION=cudnn asked for it; with the
// variable unset, for the shapes a run repeats (kernels/attention.h): a shape taken once is taken again,
// so a forward and its backward agree, and the set only grows.
// With admit false it only says whether the call would be taken, leaving the set as it is.
bool cudnn_takes_shape(int64_t B, int64_t T, int64_t C, int64_t NH, bool admit = true) {
  if (attention_choice() == AttentionChoice::kCudnn) return true;
  int device = 0;
  KRAKEN_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::set<std::array<int64_t, 5>> taken;
  const std::array<int64_t, 5> key{device, B, T, C, NH};
  std::lock_guard<std::mutex> lock(mutex);
  if (taken.count(key)) return true;
  if (B * T < kAttentionCudnnDefaultMinTokens ||
      static_cast<int64_t>(taken.size()) >= kAttentionCudnnDefaultMaxShapes)
    return false;
  if (admit) taken.insert(key);
  return true;
}

// A test's setting on this thread (attention_wgmma_kernels_override), or -1: the environment's.
thread_local int wgmma_kernels_override = -1;

}  // namespace

AttentionWgmmaKernels attention_wgmma_kernels() {
  if (wgmma_kernels_override >= 0) return static_cast<AttentionWgmmaKernels>(wgmma_kernels_override);
  static const AttentionWgmmaKernels kernels = [] {
    const char* env = std::getenv("KRAKEN_CUDA_WGMMA");
    if (!env || !*env || std::strcmp(env, "pipelined") == 0) return AttentionWgmmaKernels::kPipelined;
    if (std::strcmp(env, "no-ping-pong") == 0) return AttentionWgmmaKernels::kNoPingPong;
    if (std::strcmp(env, "lockstep") == 0) return AttentionWgmmaKernels::kLockstep;
    KRAKEN_THROW("KRAKEN_CUDA_WGMMA=", env, ": expected pipelined, no-ping-pong or lockstep");
  }();
  return kernels;
}

bool attention_wgmma_kernels_allow(bool pipelined, bool ping_pong) {
  switch (attention_wgmma_kernels()) {
    case AttentionWgmmaKernels::kPipelined: return true;
    case AttentionWgmmaKernels::kNoPingPong: return !(pipelined && ping_pong);
    case AttentionWgmmaKernels::kLockstep: return !pipelined;
  }
  return false;
}

void attention_wgmma_kernels_override(AttentionWgmmaKernels kernels) {
  wgmma_kernels_override = static_cast<int>(kernels);
}
void attention_wgmma_kernels_override_reset() { wgmma_kernels_override = -1; }

AttentionBf16Kernels attention_bf16_kernels_fallback(int64_t D) {
  if (D <= kAttentionMmaDefaultMaxHead && attention_bf16_mma_supported(D))
    return AttentionBf16Kernels::kTensorCoreMma;
  if (attention_bf16_tc_supported(D)) return AttentionBf16Kernels::kTensorCoreWmma;
  return AttentionBf16Kernels::kSimt;
}

AttentionBf16Kernels attention_bf16_kernels(int64_t D) {
  switch (attention_choice()) {
    case AttentionChoice::kSimt: return AttentionBf16Kernels::kSimt;
    case AttentionChoice::kMma:
      if (attention_bf16_mma_supported(D)) return AttentionBf16Kernels::kTensorCoreMma;
      return AttentionBf16Kernels::kSimt;
    case AttentionChoice::kTc:
      if (attention_bf16_tc_supported(D)) return AttentionBf16Kernels::kTensorCoreWmma;
      return AttentionBf16Kernels::kSimt;
    case AttentionChoice::kCudnn:
    case AttentionChoice::kDefault:
    case AttentionChoice::kWgmma:  // (the wgmma kernels are chosen per call, in the entry points below)
    case AttentionChoice::kWgmmaBackward:
      if (cudnn_supported(D)) return AttentionBf16Kernels::kCudnn;
      break;
  }
  return attention_bf16_kernels_fallback(D);
}

AttentionBf16Kernels attention_bf16_kernels_for_call(int64_t B, int64_t T, int64_t C, int64_t NH) {
  KRAKEN_CHECK(NH > 0 && C % NH == 0, "C=", C, " NH=", NH);
  const AttentionBf16Kernels kernels = attention_bf16_kernels(C / NH);
  if (kernels == AttentionBf16Kernels::kCudnn && !cudnn_takes_shape(B, T, C, NH, /*admit=*/false))
    return attention_bf16_kernels_fallback(C / NH);
  return kernels;
}

const char* attention_bf16_kernels_name(AttentionBf16Kernels kernels) {
  switch (kernels) {
    case AttentionBf16Kernels::kSimt: return "simt";
    case AttentionBf16Kernels::kTensorCoreWmma: return "tc";
    case AttentionBf16Kernels::kTensorCoreMma: return "mma";
    case AttentionBf16Kernels::kCudnn: return "cudnn";
  }
  return "?";
}

std::string attention_bf16_kernels_label(int64_t D) {
  const std::string usual = attention_bf16_kernels_name(attention_bf16_kernels(D));
  const AttentionChoice choice = attention_choice();
  const bool wgmma_forward = choice == AttentionChoice::kWgmma && attention_bf16_wgmma_supported(D);
  const bool wgmma_backward = (choice == AttentionChoice::kWgmma || choice == AttentionChoice::kWgmmaBackward) &&
                              attention_bf16_wgmma_backward_supported(D);
  if (!wgmma_forward && !wgmma_backward) return usual;
  const AttentionWgmmaKernels w = attention_wgmma_kernels();
  const std::string wgmma = w == AttentionWgmmaKernels::kLockstep           ? "wgmma (lockstep)"
                            : !attention_bf16_wgmma_pipelined_supported(D) ? "wgmma"
                            : w == AttentionWgmmaKernels::kPipelined       ? "wgmma (pipelined)"
                                                                           : "wgmma (pipelined, no ping-pong)";
  if (wgmma_forward && wgmma_backward) return wgmma;
  if (wgmma_forward) return wgmma + " forward, " + usual + " backward";
  return usual + " forward, " + wgmma + " backward";
}

void attention_forward_bf16_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, int64_t C,
                                 int64_t NH, CUstream_st* stream) {
  KRAKEN_CHECK(NH > 0 && C % NH == 0, "C=", C, " NH=", NH);
  if (attention_choice() == AttentionChoice::kWgmma && attention_bf16_wgmma_usable(out, qkv, C, NH)) {
    // A backward the wgmma kernels cannot take goes as by default: cuDNN admits the shape here as it would
    // have at the forward.
    if (attention_bf16_kernels(C / NH) == AttentionBf16Kernels::kCudnn) cudnn_takes_shape(B, T, C, NH);
    attention_forward_bf16_wgmma_cuda(out, lse, qkv, B, T, C, NH, stream);  // (as KRAKEN_CUDA_WGMMA asks)
    return;
  }
  AttentionBf16Kernels kernels = attention_bf16_kernels(C / NH);
  if (kernels == AttentionBf16Kernels::kCudnn) {
    if (cudnn_takes_shape(B, T, C, NH) && cudnn_usable({out, lse, qkv, qkv + C, qkv + 2 * C}, B, T, C, NH)) {
      cudnn_forward(out, lse, qkv, B, T, C, NH, stream);
      return;
    }
    kernels = attention_bf16_kernels_fallback(C / NH);
  }
  switch (kernels) {
    case AttentionBf16Kernels::kCudnn: break;  // (taken above)
    case AttentionBf16Kernels::kTensorCoreMma:
      attention_forward_bf16_mma_cuda(out, lse, qkv, B, T, C, NH, stream);
      break;
    case AttentionBf16Kernels::kTensorCoreWmma:
      attention_forward_bf16_tc_cuda(out, lse, qkv, B, T, C, NH, stream);
      break;
    case AttentionBf16Kernels::kSimt: attention_forward_bf16_simt_cuda(out, lse, qkv, B, T, C, NH, stream); break;
  }
}

void attention_backward_bf16_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                  const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH, CUstream_st* stream) {
  KRAKEN_CHECK(NH > 0 && C % NH == 0, "C=", C, " NH=", NH);
  const AttentionChoice choice = attention_choice();
  if ((choice == AttentionChoice::kWgmma || choice == AttentionChoice::kWgmmaBackward) &&
      attention_bf16_wgmma_backward_usable(dqkv, dout, qkv, out, C, NH)) {
    // (written over dqkv: no zeroing pass, 3·B·T·C elements a layer written and read back for nothing)
    attention_backward_bf16_wgmma_overwrite_cuda(dqkv, dout, qkv, out, lse, B, T, C, NH, stream);
    return;
  }
  AttentionBf16Kernels kernels = attention_bf16_kernels(C / NH);
  if (kernels == AttentionBf16Kernels::kCudnn) {
    // (the same shape and buffer checks as the forward's, so both take cuDNN or neither, as long as the
    // forward's buffers were aligned like these; the fallback adds into the zeros dqkv holds)
    if (cudnn_takes_shape(B, T, C, NH) &&
        cudnn_usable({dqkv, dqkv + C, dqkv + 2 * C, dout, qkv, qkv + C, qkv + 2 * C, out, lse}, B, T, C, NH)) {
      cudnn_backward(dqkv, dout, qkv, out, lse, B, T, C, NH, stream);
      return;
    }
    kernels = attention_bf16_kernels_fallback(C / NH);
  }
  // The hand-written kernels add into dqkv: zeros first, here, so that the caller need not zero a buffer
  // that cuDNN (the default path) overwrites — 3·B·T·C elements a layer, a pass of its own.
  KRAKEN_CUDA_CHECK(cudaMemsetAsync(dqkv, 0, static_cast<size_t>(B * T * 3 * C) * sizeof(uint16_t), stream));
  switch (kernels) {
    case AttentionBf16Kernels::kCudnn: break;  // (taken above)
    case AttentionBf16Kernels::kTensorCoreMma:
      attention_backward_bf16_mma_cuda(dqkv, dout, qkv, out, lse, B, T, C, NH, stream);
      break;
    case AttentionBf16Kernels::kTensorCoreWmma:
      attention_backward_bf16_tc_cuda(dqkv, dout, qkv, out, lse, B, T, C, NH, stream);
      break;
    case AttentionBf16Kernels::kSimt:
      attention_backward_bf16_simt_cuda(dqkv, dout, qkv, out, lse, B, T, C, NH, stream);
      break;
  }
}

}  // namespace kraken::kernels
