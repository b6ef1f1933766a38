// CUDA cross-entropy fused with log-softmax (equations in kernels/cross_entropy.h).
//
// One block per row. The forward reads the row once: each thread keeps an online (max, Σ exp(x − max))
// pair over its strided columns (Milakov & Gimelshein 2018; bf16 rows 8 columns per load where the
// row is 16-byte aligned), and the pairs are merged by a fixed tree
// (shuffle butterfly per warp, then warp 0 over the warps). The backward reads the row once and
// writes its gradient once. The mean is one block summing in double, again in a fixed order.
// Forward and backward are templates on the storage type T of logits and dlogits (kernels/cuda/
// storage.h): f32, or bf16 widened on load with each dlogits element rounded once; losses and lse
// are f32 for both, and the arithmetic is the same f32 sequence. The fused kernel is the forward's
// row reduction followed by the backward's row pass, in one block, from a host dloss: bit for bit the two
// kernels' results; its gradient pass reads the row again from global memory, or, staged, from the shared
// memory its first pass kept it in, or, pipelined (the default), from shared memory cp.async filled while
// the block worked on its previous row (KRAKEN_CUDA_CROSS_ENTROPY).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

#include "kernels/cross_entropy.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/fast_exp.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/mma_sync.h"  // cp.async
#include "kernels/cuda/storage.h"

namespace kraken::kernels {
namespace {

using cuda_detail::aligned16;
using cuda_detail::as_bf16;
using cuda_detail::exp2_ftz;
using cuda_detail::load;
using cuda_detail::load8;
using cuda_detail::load_stored8;
using cuda_detail::store;
using cuda_detail::store8;
using cuda_detail::Stored8;
using cuda_detail::widen8;

constexpr int kThreads = 512;
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarps = kThreads / 32;
constexpr int kMeanThreads = 256;
// 16-byte packs a thread loads before it uses the first, on the 8-wide paths: one load in flight per
// thread left the fused kernel, whose blocks alternate a reading phase and a writing phase, latency-bound
// at 58-61% of an H100's bandwidth (4 blocks of 512 threads an SM, 2 staged); the order in which each
// thread's packs are used, and so every sum, is unchanged.
constexpr int kPacksInFlight = 4;

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

// The larger of a and b, NaN if either is: max.NaN.f32 (sm_80 and later), one FMNMX instruction where the
// comparisons it replaces (x > m || x != x, then a select) were three or four for each column. My reading
// of the PTX ISA: +0 is the larger of ±0 (IEEE 754-2019's maximum); the emulation does the same. Which zero a
// row's maximum is only ever reaches the sign of a zero lse (m + log s with s = 1): x − m, and so every
// exponential, is the same for either.
#if defined(KRAKEN_CUDA_EMULATION)
inline float max_nan(float a, float b) {
  if (a != a || b != b) return std::numeric_limits<float>::quiet_NaN();
  if (a == b) return std::signbit(a) ? b : a;
  return a > b ? a : b;
}
#else
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
#endif

// The largest of 8 columns (NaN if any is), as a tree: 7 instructions, 3 deep.
__device__ __forceinline__ float max8_nan(const float (&x)[8]) {
  return max_nan(max_nan(max_nan(x[0], x[1]), max_nan(x[2], x[3])), max_nan(max_nan(x[4], x[5]), max_nan(x[6], x[7])));
}

__device__ inline MaxSum warp_merge(MaxSum v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = merge(v, other);
  }
  return v;
}

// A thread's (max, sum) over its columns v = threadIdx.x, + kThreads, … One column at a time, or with
// kWide (bf16 rows on 16-byte boundaries) 8 columns per 16-byte load (one column at a time, the bf16
// forward moved 22% of an H200's bandwidth). The wide path's exponentials are 2^{(x − m)·log₂e} in one MUFU
// instruction (fast_exp.h): expf's range reduction made them most of the kernel's instructions (39% of the
// bandwidth). x − m is exactly 0 for the maximum, so it still counts 1 exactly; a NaN becomes the maximum
// and propagates.
// Per pack, the wide path takes the 8 columns' maximum (max8_nan), rescales the thread's sum only where that
// is a new running maximum — rare after a row's first packs — and adds the 8 exponentials against the
// running maximum. It used to sum each pack against the pack's own maximum and merge that (max, sum) into
// the thread's, two more exponentials and a dozen instructions a pack: with the gradient pass's per-column
// index tests (write_row_gradient), the fused kernels issued ~165 instructions a pack where the row's bytes
// leave time for fewer (the pipelined kernel: 16 warps an SM, 69% of an H100's bandwidth at 8192 × 50304,
// where the forward kernel alone moves 88%). Every kernel here sums the same way, so the fused kernels keep
// the forward and backward kernels' bits.
// With stage (the staged fused kernel), each pack read is also kept there, at its index; kFromStage (the
// pipelined kernel, whose copies put the row's packs there before), the packs are read from there instead.
template <typename T, bool kWide, bool kFromStage = false>
__device__ MaxSum thread_state(const T* xr, int64_t V, Stored8<T>* stage) {
  MaxSum acc{-INFINITY, 0.0f};
  int64_t first = 0;
  if constexpr (kWide) {
    const int64_t packs = V / 8;
    for (int64_t p0 = threadIdx.x; p0 < packs; p0 += kPacksInFlight * kThreads) {
      Stored8<T> q[kPacksInFlight] = {};
#pragma unroll
      for (int u = 0; u < kPacksInFlight; ++u) {
        const int64_t p = p0 + u * kThreads;
        if (p >= packs) break;
        if constexpr (kFromStage) {
          q[u] = stage[p];
        } else {
          load_stored8(xr + 8 * p, q[u]);
          if (stage) stage[p] = q[u];
        }
      }
#pragma unroll
      for (int u = 0; u < kPacksInFlight; ++u) {
        if (p0 + u * kThreads >= packs) break;
        float x[8];
        widen8(q[u], x);
        const float m = max8_nan(x);
        if (m == -INFINITY) continue;  // all eight −inf: nothing to add
        if (!(m <= acc.m)) {           // a new maximum, or a NaN (which then stays in s): rescale s to it
          acc.s *= exp2_ftz((acc.m - m) * kLog2e);  // the first pack: 0 · 2^−inf = 0
          acc.m = m;
        }
        float sum = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k) sum += exp2_ftz((x[k] - acc.m) * kLog2e);
        acc.s += sum;
      }
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

// Row n's log-sum-exp over its first V columns and its loss, stored; returned to every thread of the
// block when kBroadcast (the fused kernel's gradient pass needs it), else to thread 0 only.
template <typename T, bool kWide, bool kBroadcast, bool kFromStage = false>
__device__ float row_lse(float* losses, float* lse, const T* xr, int32_t t, int64_t n, int64_t V,
                         Stored8<T>* stage = nullptr) {
  MaxSum acc = thread_state<T, kWide, kFromStage>(xr, V, stage);
  __shared__ float part_m[kWarps], part_s[kWarps];
  __shared__ float row;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  acc = warp_merge(acc);
  if (lane == 0) part_m[warp] = acc.m, part_s[warp] = acc.s;
  __syncthreads();
  float l = 0.0f;
  if (warp == 0) {
    MaxSum w = lane < kWarps ? MaxSum{part_m[lane], part_s[lane]} : MaxSum{-INFINITY, 0.0f};
    w = warp_merge(w);
    if (lane == 0) {
      l = w.m + logf(w.s);
      lse[n] = l;
      losses[n] = l - load(xr + t);
      if (kBroadcast) row = l;
    }
  }
  if (kBroadcast) {
    __syncthreads();
    l = row;
  }
  return l;
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
  row_lse<T, kWide, false>(losses, lse, logits + n * Vp, t, n, V);
}

// dr[v] = scale·(exp(x − l) − [v = t]) for v < V; 0 on padding, and everywhere on an ignored row. The
// packs p < staged come from stage (where this thread kept them), the others from xr.
template <typename T, bool kWide>
__device__ void write_row_gradient(T* dr, const T* xr, float l, int32_t t, bool ignored, float scale, int64_t Vp,
                                   int64_t V, const Stored8<T>* stage = nullptr, int64_t staged = 0) {
  if constexpr (kWide) {  // 8 columns per 16-byte load and store (Vp a multiple of 8)
    // The probabilities by the forward's exponential, one MUFU instruction each (fast_exp.h), not expf's
    // range reduction: fewer instructions beside the traffic, though alone it changed little (the fused
    // kernel at 8192 × 50304 on an H100: 0.842 → 0.839 ms). Within a few ulp of expf, far below the bf16
    // rounding of dlogits.
    const float l2 = l * kLog2e;
    const int64_t packs = Vp / 8;
    for (int64_t p0 = threadIdx.x; p0 < packs; p0 += kPacksInFlight * kThreads) {
      Stored8<T> q[kPacksInFlight] = {};
      if (!ignored) {
#pragma unroll
        for (int u = 0; u < kPacksInFlight; ++u) {
          const int64_t p = p0 + u * kThreads;
          if (p >= packs) break;
          if (p < staged)
            q[u] = stage[p];
          else
            load_stored8(xr + 8 * p, q[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kPacksInFlight; ++u) {
        const int64_t p = p0 + u * kThreads;
        if (p >= packs) break;
        float g[8] = {};  // an ignored row stores zeros
        if (!ignored) {
          widen8(q[u], g);
          const int64_t v0 = 8 * p;
          if (v0 + 8 <= V && (t < v0 || t >= v0 + 8)) {  // all of the row's packs but one or two
#pragma unroll
            for (int k = 0; k < 8; ++k) g[k] = scale * exp2_ftz(fmaf(g[k], kLog2e, -l2));
          } else {  // the target's pack, and the pack across V: the same arithmetic column by column
#pragma unroll
            for (int k = 0; k < 8; ++k) {
              const int64_t v = v0 + k;
              const float prob = exp2_ftz(fmaf(g[k], kLog2e, -l2));
              g[k] = v < V ? scale * (v == t ? prob - 1.0f : prob) : 0.0f;
            }
          }
        }
        store8(dr + 8 * p, g);
      }
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

// dlogits[n, v] = (dloss/count)·(exp(x − lse) − [v = t]) for v < V; 0 on padding and on ignored rows.
// 3 blocks an SM, as before the gradient pass had two paths (ptxas then gave the wide kernel 47 registers,
// 2 blocks).
template <typename T, bool kWide>
__global__ void __launch_bounds__(kThreads, 3)
    cross_entropy_backward_kernel(T* dlogits, const T* logits, const float* lse, const int32_t* targets,
                                  const float* dloss, int64_t count, int64_t Vp, int64_t V, int32_t ignore_index) {
  const int64_t n = blockIdx.x;
  const int32_t t = targets[n];
  const bool ignored = t == ignore_index;
  const float scale = ignored ? 0.0f : dloss[0] / static_cast<float>(count);  // count ≥ 1 where counted
  write_row_gradient<T, kWide>(dlogits + n * Vp, logits + n * Vp, ignored ? 0.0f : lse[n], t, ignored, scale, Vp, V);
}

// Row n's loss, lse and gradient in one block (the fused kernels' body): with stage, its packs kept there
// by the first pass, or (kFromStage) read from there, where copies put them before.
template <typename T, bool kWide, bool kFromStage>
__device__ void fused_row(float* losses, float* lse, T* dlogits, const T* logits, const int32_t* targets,
                          float scale, int64_t n, int64_t Vp, int64_t V, int32_t ignore_index, Stored8<T>* stage) {
  const int32_t t = targets[n];
  const T* xr = logits + n * Vp;
  const bool ignored = t == ignore_index;
  float l = 0.0f;
  if (ignored) {
    if (threadIdx.x == 0) losses[n] = 0.0f, lse[n] = 0.0f;
  } else {
    l = row_lse<T, kWide, true, kFromStage>(losses, lse, xr, t, n, V, stage);
  }
  write_row_gradient<T, kWide>(dlogits + n * Vp, xr, l, t, ignored, ignored ? 0.0f : scale, Vp, V, stage,
                               stage && !ignored ? V / 8 : 0);
}

// Forward and backward of row n in one block: its log-sum-exp from a first read of the row, then its
// gradient from a second read. That second read was meant to find the row (≤ 100 KB for GPT-2's
// vocabulary) in L2, but on an H100 it came from memory: 3 blocks of 512 threads an SM (40 registers a
// thread) keep ~400 rows of 100 KB in flight, with as much dlogits written meanwhile, against 50 MB of L2
// (0.829 ms at 8192 × 50304, three passes' bytes at 89% of the bandwidth). scale = dloss/count, computed on the host as the
// backward kernel computes it from dloss[0].
// kStaged (bf16 rows on 16-byte boundaries; 0.773 ms, 0.745–0.749 in the fifteenth session): the first
// pass keeps each 16-byte pack it reads in shared memory, at its index, and the gradient pass takes it
// back from there — each pack by the thread that kept it, so no barrier — so the row comes from memory
// once. Shared memory (V/8)·16 bytes a block (98 KiB for GPT-2's vocabulary: 2 blocks an SM on an H100, 1
// on an A100); the same arithmetic in the same order, so the same bits.
template <typename T, bool kWide, bool kStaged>
__global__ void cross_entropy_fused_kernel(float* losses, float* lse, T* dlogits, const T* logits,
                                           const int32_t* targets, float scale, int64_t Vp, int64_t V,
                                           int32_t ignore_index) {
  static_assert(!kStaged || kWide, "rows are staged in 16-byte packs");
  Stored8<T>* stage = nullptr;
  if constexpr (kStaged) {
    KRAKEN_DYNAMIC_SHARED(uint4, staged_bytes);
    stage = reinterpret_cast<Stored8<T>*>(staged_bytes);
  }
  fused_row<T, kWide, false>(losses, lse, dlogits, logits, targets, scale, blockIdx.x, Vp, V, ignore_index, stage);
}

// The staged kernel's work with the next row's reads in flight: persistent blocks, each taking rows
// blockIdx.x, + gridDim.x, …, with two stages of shared memory. While a block reduces and writes row n
// from one stage, cp.async brings its next row into the other — each thread copies the packs it will
// use itself (p = threadIdx.x + k·kThreads, as in the staged kernel), so its own cp.async wait is all
// the ordering a stage needs, before it is read and before it is refilled. The staged kernel reads a row
// only once, but a block's 512 threads then stop at the row's reductions with nothing else in flight and
// only 2 blocks fit an SM (0.773 ms at 8192 × 50304 on an H100, 64% of the bandwidth); here the memory
// system always has the next rows coming. Shared memory 2·(V/8)·16 bytes (196 KiB for GPT-2's
// vocabulary: one block an SM on an H100; beyond an A100's 163 KiB, where the staged kernel runs). The
// same threads do the same arithmetic on the same packs in the same order: the staged kernel's bits.
// Measured in the fifteenth session on an H100 (bench/RESULTS.md): 0.710 and 0.722 ms against the staged
// kernel's 0.745 and 0.749 at 8192 × 50304 (69% of the bandwidth against 66%); under ncu at GPT-2's B = 64
// (65536 rows) 5.54 ms against 5.76; the training step's difference within its noise. The default since.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_fused_pipelined_kernel(float* losses, float* lse, T* dlogits, const T* logits,
                                         const int32_t* targets, float scale, int64_t N, int64_t Vp, int64_t V,
                                         int32_t ignore_index) {
  KRAKEN_DYNAMIC_SHARED(uint4, staged_bytes);
  const int64_t packs = V / 8;
  Stored8<T>* const stages = reinterpret_cast<Stored8<T>*>(staged_bytes);  // stage k: packs from k·packs
  auto fetch = [&](int64_t row, Stored8<T>* stage) {  // this thread's packs of the row, one copy group
    const T* xr = logits + row * Vp;
    for (int64_t p = threadIdx.x; p < packs; p += kThreads) mma::cp_async_16(stage + p, xr + 8 * p, true);
    mma::cp_async_commit();
  };
  int64_t n = blockIdx.x;
  if (n < N) fetch(n, stages);
  for (int i = 0; n < N; n += gridDim.x, ++i) {
    Stored8<T>* stage = stages + (i & 1) * packs;
    if (n + gridDim.x < N) {
      fetch(n + gridDim.x, stages + ((i + 1) & 1) * packs);  // its last reader was this thread, last row
      mma::cp_async_wait<1>();                     // this row's copies have landed, the next's may not
    } else {
      mma::cp_async_wait<0>();
    }
    fused_row<T, true, true>(losses, lse, dlogits, logits, targets, scale, n, Vp, V, ignore_index, stage);
  }
}

// dlogits *= dloss[0] / assumed[0] where the two differ; then (a kernel of its own, after every block has
// read it) assumed[0] = dloss[0]. Equal — the gradient the fused pass assumed is the one that came — every
// thread reads two floats and leaves.
template <typename T>
__global__ void cross_entropy_rescale_kernel(T* dlogits, const float* dloss, const float* assumed, int64_t n) {
  const float d = dloss[0], a = assumed[0];
  if (d == a) return;
  const float ratio = d / a;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    store(dlogits + i, load(dlogits + i) * ratio);
}
__global__ void cross_entropy_assume_kernel(float* assumed, const float* dloss) { assumed[0] = dloss[0]; }

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

// One block per row: the 8-wide kernel (launch(std::true_type)) for bf16 rows on 16-byte boundaries
// (`wide`), else the one-column one.
template <typename T, typename Launch>
void launch_per_row(int64_t N, bool wide, Launch&& launch) {
  if (N <= 0) return;
  const unsigned int blocks = static_cast<unsigned int>(N);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (wide) {
      launch(std::true_type(), blocks);
      KRAKEN_CUDA_LAUNCH_CHECK();
      return;
    }
  }
  launch(std::false_type(), blocks);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

template <typename T>
void cross_entropy_forward(float* losses, float* lse, const T* logits, const int32_t* targets, int64_t N, int64_t Vp,
                           int64_t V, int32_t ignore_index, CUstream_st* stream) {
  launch_per_row<T>(N, Vp % 8 == 0 && aligned16(logits), [&](auto wide, unsigned int blocks) {
    KRAKEN_KERNEL(blocks, kThreads, 0, stream, cross_entropy_forward_kernel<T, decltype(wide)::value>)
    (losses, lse, logits, targets, Vp, V, ignore_index);
  });
}

template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const float* lse, const int32_t* targets, const float* dloss,
                            int64_t count, int64_t N, int64_t Vp, int64_t V, int32_t ignore_index,
                            CUstream_st* stream) {
  // in the forward pass this was: loss = (1/count)·Σ_n (lse_n − logits[n, t_n])
  launch_per_row<T>(N, Vp % 8 == 0 && aligned16(logits) && aligned16(dlogits), [&](auto wide, unsigned int blocks) {
    KRAKEN_KERNEL(blocks, kThreads, 0, stream, cross_entropy_backward_kernel<T, decltype(wide)::value>)
    (dlogits, logits, lse, targets, dloss, count, Vp, V, ignore_index);
  });
}

// KRAKEN_CUDA_CROSS_ENTROPY, read once: which fused kernel kDefault takes (kernels/cross_entropy.h).
CrossEntropyRowReads default_row_reads() {
  static const CrossEntropyRowReads reads = [] {
    const char* v = std::getenv("KRAKEN_CUDA_CROSS_ENTROPY");
    if (v == nullptr || *v == '\0' || std::string(v) == "pipelined") return CrossEntropyRowReads::kPipelined;
    if (std::string(v) == "staged") return CrossEntropyRowReads::kStagedInSharedMemory;
    if (std::string(v) == "twice") return CrossEntropyRowReads::kTwice;
    KRAKEN_THROW("KRAKEN_CUDA_CROSS_ENTROPY=", v,
                 ": expected pipelined (the row staged in shared memory, the next row's copies in flight; the default), "
                 "staged (the row kept in shared memory, no copies ahead) or twice (read from global memory again)");
  }();
  return reads;
}

// The staged kernel (stages = 1) or the pipelined one (2) where it applies: bf16 rows on 16-byte
// boundaries, `stages` copies of the row's packs within a block's shared memory. False, nothing
// launched, otherwise.
template <typename T>
bool cross_entropy_fused_from_shared(float* losses, float* lse, T* dlogits, const T* logits, const int32_t* targets,
                                     float scale, int64_t N, int64_t Vp, int64_t V, int32_t ignore_index,
                                     CUstream_st* stream, int stages) {
  if constexpr (!std::is_same_v<T, __nv_bfloat16>) {
    return false;
  } else {
    if (N <= 0 || V < 8 || Vp % 8 != 0 || !aligned16(logits) || !aligned16(dlogits)) return false;
    const size_t bytes = static_cast<size_t>(stages) * sizeof(Stored8<T>) * static_cast<size_t>(V / 8);
    int device = 0, optin = 0;
    KRAKEN_CUDA_CHECK(cudaGetDevice(&device));
    KRAKEN_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    if (bytes > static_cast<size_t>(optin)) return false;
    auto allow = [&](auto kernel) {  // above the default, asked for per kernel
      if (bytes > 48 * 1024)
        KRAKEN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    };
    if (stages == 1) {
      allow(cross_entropy_fused_kernel<T, true, true>);
      KRAKEN_KERNEL(static_cast<unsigned int>(N), kThreads, bytes, stream, cross_entropy_fused_kernel<T, true, true>)
      (losses, lse, dlogits, logits, targets, scale, Vp, V, ignore_index);
    } else {
      allow(cross_entropy_fused_pipelined_kernel<T>);
      // As many blocks as the SMs hold at once, each looping over its rows (the results do not depend on
      // the grid; more blocks than fit would wait for whole row lists to finish).
      int per_sm = 0, sms = 0;
      KRAKEN_CUDA_CHECK(
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, cross_entropy_fused_pipelined_kernel<T>, kThreads, bytes));
      KRAKEN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
      const int64_t blocks = std::min<int64_t>(N, static_cast<int64_t>(std::max(per_sm, 1)) * std::max(sms, 1));
      KRAKEN_KERNEL(static_cast<unsigned int>(blocks), kThreads, bytes, stream, cross_entropy_fused_pipelined_kernel<T>)
      (losses, lse, dlogits, logits, targets, scale, N, Vp, V, ignore_index);
    }
    KRAKEN_CUDA_LAUNCH_CHECK();
    return true;
  }
}

template <typename T>
void cross_entropy_fused(float* losses, float* lse, T* dlogits, const T* logits, const int32_t* targets, float dloss,
                         int64_t count, int64_t N, int64_t Vp, int64_t V, int32_t ignore_index, CUstream_st* stream,
                         CrossEntropyRowReads reads) {
  const float scale = count > 0 ? dloss / static_cast<float>(count) : 0.0f;
  if (reads == CrossEntropyRowReads::kDefault) reads = default_row_reads();
  if (reads == CrossEntropyRowReads::kPipelined &&
      cross_entropy_fused_from_shared(losses, lse, dlogits, logits, targets, scale, N, Vp, V, ignore_index, stream, 2))
    return;
  if ((reads == CrossEntropyRowReads::kStagedInSharedMemory || reads == CrossEntropyRowReads::kPipelined) &&
      cross_entropy_fused_from_shared(losses, lse, dlogits, logits, targets, scale, N, Vp, V, ignore_index, stream, 1))
    return;
  launch_per_row<T>(N, Vp % 8 == 0 && aligned16(logits) && aligned16(dlogits), [&](auto wide, unsigned int blocks) {
    KRAKEN_KERNEL(blocks, kThreads, 0, stream, cross_entropy_fused_kernel<T, decltype(wide)::value, false>)
    (losses, lse, dlogits, logits, targets, scale, Vp, V, ignore_index);
  });
}

template <typename T>
void cross_entropy_rescale(T* dlogits, const float* dloss, float* assumed, int64_t n, CUstream_st* stream) {
  if (n <= 0) return;
  // A fixed grid: where nothing is to be done (the usual case) its threads only read two floats.
  constexpr int kRescaleThreads = 256;
  const unsigned int blocks =
      static_cast<unsigned int>(std::min<int64_t>(1024, (n + kRescaleThreads - 1) / kRescaleThreads));
  KRAKEN_KERNEL(blocks, kRescaleThreads, 0, stream, cross_entropy_rescale_kernel<T>)(dlogits, dloss, assumed, n);
  KRAKEN_CUDA_LAUNCH_CHECK();
  KRAKEN_KERNEL(1, 1, 0, stream, cross_entropy_assume_kernel)(assumed, dloss);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

}  // namespace

void cross_entropy_fused_cuda(float* losses, float* lse, float* dlogits, const float* logits, const int32_t* targets,
                              float dloss, int64_t count, int64_t N, int64_t Vp, int64_t V, int32_t ignore_index,
                              CUstream_st* stream, CrossEntropyRowReads reads) {
  cross_entropy_fused(losses, lse, dlogits, logits, targets, dloss, count, N, Vp, V, ignore_index, stream, reads);
}

void cross_entropy_fused_bf16_cuda(float* losses, float* lse, uint16_t* dlogits, const uint16_t* logits,
                                   const int32_t* targets, float dloss, int64_t count, int64_t N, int64_t Vp, int64_t V,
                                   int32_t ignore_index, CUstream_st* stream, CrossEntropyRowReads reads) {
  cross_entropy_fused(losses, lse, as_bf16(dlogits), as_bf16(logits), targets, dloss, count, N, Vp, V, ignore_index,
                      stream, reads);
}

void cross_entropy_rescale_cuda(float* dlogits, const float* dloss, float* assumed, int64_t n, CUstream_st* stream) {
  cross_entropy_rescale(dlogits, dloss, assumed, n, stream);
}

void cross_entropy_rescale_bf16_cuda(uint16_t* dlogits, const float* dloss, float* assumed, int64_t n,
                                     CUstream_st* stream) {
  cross_entropy_rescale(as_bf16(dlogits), dloss, assumed, n, stream);
}

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
