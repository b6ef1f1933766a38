// CUDA elementwise kernels: grid-stride loops, one thread per element (8 per thread for the bf16 add
// and GELU where the buffers allow 16-byte accesses). Memory-bound by design; the fused kernels that
// save whole passes over activations live with their op families. The arithmetic kernels are
// templates on the storage type (kernels/cuda/storage.h): the f32 and bf16 entry points run one body,
// f32 in registers either way. The two casts also take a table of tensors per launch (cast_*_many_cuda),
// for the mixed-precision model's weights and their gradients, mostly too small to fill a launch alone.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/check.h"
#include "kernels/cuda/column_sums.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/storage.h"
#include "kernels/elementwise.h"

namespace kraken::kernels {
namespace {

using cuda_detail::aligned16;
using cuda_detail::as_bf16;
using cuda_detail::blocks_for;
using cuda_detail::column_sums;
using cuda_detail::column_sums_fit;
using cuda_detail::load;
using cuda_detail::load8;
using cuda_detail::store;
using cuda_detail::store8;
constexpr int kThreads = 256;
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

#define KRAKEN_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<int64_t>(blockDim.x) * gridDim.x)

__global__ void fill_kernel(float* out, float value, int64_t n) { KRAKEN_GRID_STRIDE(i, n) out[i] = value; }
// The kernels templated on T serve f32 (T = float) and bf16 storage (T = __nv_bfloat16) with one body.
template <typename T>
__global__ void add_kernel(T* out, const T* a, const T* b, int64_t n) {
  KRAKEN_GRID_STRIDE(i, n) store(out + i, load(a + i) + load(b + i));
}
// bf16 a + b, 8 elements per thread in 16-byte accesses (as the GELU kernels below).
__global__ void add_bf16x8_kernel(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b,
                                  int64_t packs) {
  KRAKEN_GRID_STRIDE(p, packs) {
    float va[8], vb[8];
    load8(a + 8 * p, va);
    load8(b + 8 * p, vb);
#pragma unroll
    for (int k = 0; k < 8; ++k) va[k] = va[k] + vb[k];
    store8(out + 8 * p, va);
  }
}
// out[r, :] = a[r, :] + b[:] 8 columns at a time (cols a multiple of 8, every pointer 16-byte aligned):
// the Kraken layer's m = attn + S, S broadcast over the stacked sub-layers (rows = 4, cols = B·T·C),
// where the scalar kernel's 64-bit modulo per element ran at a third of the bandwidth.
__global__ void add_broadcast_bf16x8_kernel(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b,
                                            int64_t packs, int64_t col_packs) {
  KRAKEN_GRID_STRIDE(p, packs) {
    float va[8], vb[8];
    load8(a + 8 * p, va);
    load8(b + 8 * (p % col_packs), vb);
#pragma unroll
    for (int k = 0; k < 8; ++k) va[k] = va[k] + vb[k];
    store8(out + 8 * p, va);
  }
}
__global__ void axpy_kernel(float* y, const float* x, float alpha, int64_t n) {
  KRAKEN_GRID_STRIDE(i, n) y[i] += alpha * x[i];
}
template <typename T>
__global__ void scale_kernel(T* out, const T* x, float alpha, int64_t n) {
  KRAKEN_GRID_STRIDE(i, n) store(out + i, alpha * load(x + i));
}
template <typename T>
__global__ void mul_kernel(T* out, const T* a, const T* b, int64_t n) {
  KRAKEN_GRID_STRIDE(i, n) store(out + i, load(a + i) * load(b + i));
}
template <typename T>
__global__ void add_broadcast_kernel(T* out, const T* a, const T* b, int64_t rows, int64_t cols) {
  KRAKEN_GRID_STRIDE(i, rows * cols) store(out + i, load(a + i) + load(b + i % cols));
}
// Few rows (the wpe gradient: rows = B): one thread per column, rows summed in order.
template <typename TOut, typename TIn>
__global__ void sum_rows_kernel(TOut* db, const TIn* dout, int64_t rows, int64_t cols) {
  KRAKEN_GRID_STRIDE(c, cols) {
    float acc = 0.0f;
    for (int64_t r = 0; r < rows; ++r) acc += load(dout + r * cols + c);
    store(db + c, load(db + c) + acc);
  }
}
// The same for bf16 with 8 columns per thread in 16-byte accesses (cols a multiple of 8, 16-byte aligned
// rows): the Kraken layer's dS, the sum of its n streams' gradients (rows = n, cols = B·T·C), where 2-byte
// loads one column per thread held the kernel to ~40% of an H100's bandwidth. Each column's order as above.
__global__ void sum_rows_bf16x8_kernel(__nv_bfloat16* db, const __nv_bfloat16* dout, int64_t rows, int64_t col_packs) {
  KRAKEN_GRID_STRIDE(p, col_packs) {
    float acc[8] = {}, v[8];
    for (int64_t r = 0; r < rows; ++r) {
      load8(dout + 8 * (r * col_packs + p), v);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] += v[k];
    }
    load8(db + 8 * p, v);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = v[k] + acc[k];
    store8(db + 8 * p, v);
  }
}
// The residual fork (kernels/elementwise.h), 8 elements per thread: position p of a block, every block.
__global__ void residual_fork_bf16x8_kernel(__nv_bfloat16* a, __nv_bfloat16* m, const __nv_bfloat16* x,
                                            const __nv_bfloat16* y, const __nv_bfloat16* s, int64_t blocks,
                                            int64_t packs_per_block) {
  KRAKEN_GRID_STRIDE(p, packs_per_block) {
    float vs[8];
    load8(s + 8 * p, vs);
    for (int64_t g = 0; g < blocks; ++g) {
      const int64_t at = 8 * (g * packs_per_block + p);
      float vx[8], vy[8];
      load8(x + at, vx);
      load8(y + at, vy);
#pragma unroll
      for (int k = 0; k < 8; ++k) vx[k] = vx[k] + vy[k];
      store8(a + at, vx);
#pragma unroll
      for (int k = 0; k < 8; ++k) vy[k] = vy[k] + vs[k];
      store8(m + at, vy);
    }
  }
}
__global__ void residual_fork_backward_bf16x8_kernel(__nv_bfloat16* dy, __nv_bfloat16* ds, const __nv_bfloat16* da,
                                                     const __nv_bfloat16* dm, int64_t blocks,
                                                     int64_t packs_per_block) {
  KRAKEN_GRID_STRIDE(p, packs_per_block) {
    float acc[8] = {};
    for (int64_t g = 0; g < blocks; ++g) {
      const int64_t at = 8 * (g * packs_per_block + p);
      float va[8], vm[8];
      load8(da + at, va);
      load8(dm + at, vm);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        acc[k] += vm[k];
        va[k] = va[k] + vm[k];
      }
      store8(dy + at, va);
    }
    store8(ds + 8 * p, acc);
  }
}
// The residual fork with S = Σ_g x[g] summed in it (kernels/elementwise.h): position p of every block,
// the blocks' x (forward) or dm (backward) held in registers between S's (dS's) sum and the adds. S and dS
// are rounded once to bf16 before they are added, as sum_stack and residual_fork's backward store them.
__device__ __forceinline__ float bf16_rounded(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
template <int kBlocks>
__global__ void residual_fork_summed_bf16x8_kernel(__nv_bfloat16* a, __nv_bfloat16* m, const __nv_bfloat16* x,
                                                   const __nv_bfloat16* y, int64_t packs_per_block) {
  KRAKEN_GRID_STRIDE(p, packs_per_block) {
    float vx[kBlocks][8], vs[8] = {};
#pragma unroll
    for (int g = 0; g < kBlocks; ++g) {
      load8(x + 8 * (g * packs_per_block + p), vx[g]);
#pragma unroll
      for (int k = 0; k < 8; ++k) vs[k] += vx[g][k];
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) vs[k] = bf16_rounded(vs[k]);
#pragma unroll
    for (int g = 0; g < kBlocks; ++g) {
      const int64_t at = 8 * (g * packs_per_block + p);
      float vy[8], va[8];
      load8(y + at, vy);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        va[k] = vx[g][k] + vy[k];
        vy[k] = vy[k] + vs[k];
      }
      store8(a + at, va);
      store8(m + at, vy);
    }
  }
}
// dx may be da and dy dm (in place): every dm is read before any dy is written, and da[g] before dx[g].
template <int kBlocks>
__global__ void residual_fork_summed_backward_bf16x8_kernel(__nv_bfloat16* dx, __nv_bfloat16* dy,
                                                            const __nv_bfloat16* da, const __nv_bfloat16* dm,
                                                            int64_t packs_per_block) {
  KRAKEN_GRID_STRIDE(p, packs_per_block) {
    float vm[kBlocks][8], ds[8] = {};
#pragma unroll
    for (int g = 0; g < kBlocks; ++g) {
      load8(dm + 8 * (g * packs_per_block + p), vm[g]);
#pragma unroll
      for (int k = 0; k < 8; ++k) ds[k] += vm[g][k];
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) ds[k] = bf16_rounded(ds[k]);
#pragma unroll
    for (int g = 0; g < kBlocks; ++g) {
      const int64_t at = 8 * (g * packs_per_block + p);
      float va[8], vd[8];
      load8(da + at, va);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        vd[k] = va[k] + vm[g][k];
        va[k] = va[k] + ds[k];
      }
      store8(dy + at, vd);
      store8(dx + at, va);
    }
  }
}
// Calls f(std::integral_constant<int, blocks>()) for 2 ≤ blocks ≤ 8 (95 registers a thread at 8, no spills);
// false otherwise.
template <typename F>
bool with_fork_blocks(int64_t blocks, F&& f) {
  return cuda_detail::with_constant_in<2, 8>(blocks, f);
}
// Many rows (bias gradients: rows = B·T, cols = C): the two-pass column sums of column_sums.h where cols
// is a multiple of 8 and dout 16-byte aligned; otherwise this kernel. A column per thread would leave
// the GPU nearly empty (C = 768 threads for 8192 rows), so a block owns kSumCols columns and splits the rows into
// kSumGroups interleaved groups (rows g, g + kSumGroups, …, each summed in order), then adds the
// groups in a fixed shared-memory tree. The order depends on `rows` alone: deterministic, no atomics.
constexpr int kSumCols = 8;     // one 32-byte sector of an f32 row
constexpr int kSumGroups = 64;  // 512 threads
template <typename TOut, typename TIn>
__global__ void sum_rows_grouped_kernel(TOut* db, const TIn* dout, int64_t rows, int64_t cols) {
  __shared__ float partial[kSumGroups][kSumCols];
  const int col = threadIdx.x % kSumCols, group = threadIdx.x / kSumCols;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kSumCols + col;
  float acc = 0.0f;
  if (c < cols)
    for (int64_t r = group; r < rows; r += kSumGroups) acc += load(dout + r * cols + c);
  partial[group][col] = acc;
  __syncthreads();
  for (int stride = kSumGroups / 2; stride > 0; stride >>= 1) {
    if (group < stride) partial[group][col] += partial[group + stride][col];
    __syncthreads();
  }
  if (group == 0 && c < cols) store(db + c, load(db + c) + partial[0][col]);
}
// acc += x with f32 acc: the bf16 terms of a sum accumulate here and are rounded once by the caller.
__global__ void accumulate_bf16_kernel(float* acc, const __nv_bfloat16* x, int64_t n) {
  KRAKEN_GRID_STRIDE(i, n) acc[i] += load(x + i);
}
// GELU (tanh form) and its derivative, shared by the scalar and the 8-wide kernels.
__device__ __forceinline__ float gelu_value(float v) {
  const float u = kSqrt2OverPi * (v + kGeluCubic * v * v * v);
  return 0.5f * v * (1.0f + tanhf(u));
}
__device__ __forceinline__ float gelu_grad(float v) {
  const float u = kSqrt2OverPi * (v + kGeluCubic * v * v * v);
  const float t = tanhf(u);
  return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * v * v);
}
template <typename T>
__global__ void gelu_forward_kernel(T* out, const T* x, int64_t n) {
  KRAKEN_GRID_STRIDE(i, n) store(out + i, gelu_value(load(x + i)));
}
template <typename T>
__global__ void gelu_backward_kernel(T* dx, const T* x, const T* dout, int64_t n) {
  KRAKEN_GRID_STRIDE(i, n) store(dx + i, load(dx + i) + gelu_grad(load(x + i)) * load(dout + i));
}
// bf16, 8 elements per thread in 16-byte accesses (with 2-byte accesses GELU moved 27% (forward) and
// 48% (backward) of an H200's bandwidth); the same arithmetic per element as the kernels above.
__global__ void gelu_forward_bf16x8_kernel(__nv_bfloat16* out, const __nv_bfloat16* x, int64_t packs) {
  KRAKEN_GRID_STRIDE(p, packs) {
    float v[8];
    load8(x + 8 * p, v);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = gelu_value(v[k]);
    store8(out + 8 * p, v);
  }
}
__global__ void gelu_backward_bf16x8_kernel(__nv_bfloat16* dx, const __nv_bfloat16* x, const __nv_bfloat16* dout,
                                            int64_t packs) {
  KRAKEN_GRID_STRIDE(p, packs) {
    float v[8], d[8], acc[8];
    load8(x + 8 * p, v);
    load8(dout + 8 * p, d);
    load8(dx + 8 * p, acc);
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[k] = acc[k] + gelu_grad(v[k]) * d[k];
    store8(dx + 8 * p, acc);
  }
}
__global__ void f32_to_bf16_kernel(__nv_bfloat16* out, const float* x, int64_t n) {
  KRAKEN_GRID_STRIDE(i, n) out[i] = __float2bfloat16_rn(x[i]);
}
__global__ void bf16_to_f32_kernel(float* out, const __nv_bfloat16* x, int64_t n) {
  KRAKEN_GRID_STRIDE(i, n) out[i] = __bfloat162float(x[i]);
}
// The casts and the f32 accumulation of bf16 terms, 8 elements per thread (two 16-byte f32 accesses, one
// bf16): the parameters' casts before every forward and their gradients' way back to f32 (0.6 ms of a
// GPT-2 step on an H200 with the scalar kernels). The same rounding per element as the kernels above.
__global__ void f32_to_bf16x8_kernel(__nv_bfloat16* out, const float* x, int64_t packs) {
  KRAKEN_GRID_STRIDE(p, packs) {
    float v[8];
    load8(x + 8 * p, v);
    store8(out + 8 * p, v);
  }
}
__global__ void bf16_to_f32x8_kernel(float* out, const __nv_bfloat16* x, int64_t packs) {
  KRAKEN_GRID_STRIDE(p, packs) {
    float v[8];
    load8(x + 8 * p, v);
    store8(out + 8 * p, v);
  }
}
__global__ void accumulate_bf16x8_kernel(float* acc, const __nv_bfloat16* x, int64_t packs) {
  KRAKEN_GRID_STRIDE(p, packs) {
    float v[8], a[8];
    load8(x + 8 * p, v);
    load8(acc + 8 * p, a);
#pragma unroll
    for (int k = 0; k < 8; ++k) a[k] += v[k];
    store8(acc + 8 * p, a);
  }
}
// out = Σ_k xs[k] over a few bf16 tensors in one pass: from 0 in f32, in the order of the table, one
// rounding (the bits of accumulate_bf16 into zeros, then a cast).
struct SumTable {
  const __nv_bfloat16* x[kSumsPerLaunch];
  int count;
};
__global__ void sum_bf16_kernel(__nv_bfloat16* out, const __grid_constant__ SumTable t, int64_t n) {
  KRAKEN_GRID_STRIDE(i, n) {
    float acc = 0.0f;
    for (int k = 0; k < t.count; ++k) acc += load(t.x[k] + i);
    store(out + i, acc);
  }
}
__global__ void sum_bf16x8_kernel(__nv_bfloat16* out, const __grid_constant__ SumTable t, int64_t packs) {
  KRAKEN_GRID_STRIDE(p, packs) {
    float acc[8] = {}, v[8];
    for (int k = 0; k < t.count; ++k) {
      load8(t.x[k] + 8 * p, v);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += v[j];
    }
    store8(out + 8 * p, acc);
  }
}

// Many casts in one launch: up to kCastsPerLaunch tensors, their pointers and sizes passed by value (3.7
// KiB of the 4 KiB of kernel parameters). Slice k owns blocks [first_block[k], first_block[k + 1]) and
// strides over its elements with them: 8 per access where both of its buffers are 16-byte aligned (then
// its last n mod 8 one by one), one per access otherwise. Each element is widened or rounded exactly as
// in the one-tensor kernels above, so every output has the bits of its own cast. The same table serves
// two more many-tensor passes: kAdd (bf16 → f32 only), out += the widened element instead of out = it,
// one f32 addition (axpy's with alpha 1); kZero (f32 only, x unused), out = 0.
template <typename From, typename To>
struct CastTable {
  const From* x[kCastsPerLaunch];
  To* out[kCastsPerLaunch];
  int64_t n[kCastsPerLaunch];
  int first_block[kCastsPerLaunch + 1];
  bool wide[kCastsPerLaunch];
  int count;
};
static_assert(sizeof(CastTable<float, __nv_bfloat16>) <= 4000, "kernel parameters are limited to 4 KiB");
constexpr int64_t kMaxBlocksPerCast = 16384;  // 33.5M elements per pass, 8 per thread

enum class ManyPass { kCast, kAdd, kZero };
template <typename From, typename To, ManyPass kPass = ManyPass::kCast>
__global__ void cast_many_kernel(CastTable<From, To> c) {
  static_assert(kPass == ManyPass::kCast || std::is_same_v<To, float>, "only f32 outputs are added into or zeroed");
  const int b = static_cast<int>(blockIdx.x);
  int lo = 0, hi = c.count - 1;  // this block's slice: the last k with first_block[k] <= b
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (c.first_block[mid] <= b)
      lo = mid;
    else
      hi = mid - 1;
  }
  const From* x = c.x[lo];
  To* out = c.out[lo];
  const int64_t n = c.n[lo];
  const int64_t first = (b - c.first_block[lo]) * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = (c.first_block[lo + 1] - c.first_block[lo]) * static_cast<int64_t>(blockDim.x);
  int64_t scalar_from = 0;
  if (c.wide[lo]) {
    const int64_t packs = n / 8;
    for (int64_t p = first; p < packs; p += stride) {
      float v[8] = {};
      if constexpr (kPass != ManyPass::kZero) load8(x + 8 * p, v);
      if constexpr (kPass == ManyPass::kAdd) {
        float o[8];
        load8(out + 8 * p, o);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = o[j] + v[j];
      }
      store8(out + 8 * p, v);
    }
    scalar_from = 8 * packs;
  }
  for (int64_t i = scalar_from + first; i < n; i += stride) {
    if constexpr (kPass == ManyPass::kZero)
      store(out + i, 0.0f);
    else if constexpr (kPass == ManyPass::kAdd)
      store(out + i, load(out + i) + load(x + i));
    else
      store(out + i, load(x + i));
  }
}

// The public API's pointers (bf16 as uint16_t) as the kernels' storage types.
inline const float* storage_ptr(const float* p) { return p; }
inline float* storage_ptr(float* p) { return p; }
inline const __nv_bfloat16* storage_ptr(const uint16_t* p) { return as_bf16(p); }
inline __nv_bfloat16* storage_ptr(uint16_t* p) { return as_bf16(p); }

template <typename From, typename To, ManyPass kPass = ManyPass::kCast, typename OutArg, typename XArg>
void cast_many(OutArg* const* outs, const XArg* const* xs, const int64_t* ns, int64_t count, CUstream_st* s) {
  CastTable<From, To> table{};
  auto launch = [&] {
    if (table.count == 0) return;
    KRAKEN_KERNEL(static_cast<unsigned int>(table.first_block[table.count]), kThreads, 0, s,
                  cast_many_kernel<From, To, kPass>)
    (table);
    KRAKEN_CUDA_LAUNCH_CHECK();
    table = CastTable<From, To>{};
  };
  for (int64_t t = 0; t < count; ++t) {
    if (ns[t] <= 0) continue;
    const int j = table.count;
    table.x[j] = xs ? storage_ptr(xs[t]) : nullptr;
    table.out[j] = storage_ptr(outs[t]);
    table.n[j] = ns[t];
    table.wide[j] = (!xs || aligned16(xs[t])) && aligned16(outs[t]);
    const int64_t units = table.wide[j] ? (ns[t] + 7) / 8 : ns[t];  // threads the slice could use
    const int64_t blocks = std::min<int64_t>(kMaxBlocksPerCast, (units + kThreads - 1) / kThreads);
    table.first_block[j + 1] = table.first_block[j] + static_cast<int>(blocks);
    table.count = j + 1;
    if (table.count == kCastsPerLaunch) launch();
  }
  launch();
}

}  // namespace

#define KRAKEN_LAUNCH(kernel, n, stream, ...)                                          \
  do {                                                                                 \
    if ((n) <= 0) return;                                                              \
    KRAKEN_KERNEL(blocks_for((n), kThreads), kThreads, 0, stream, kernel)(__VA_ARGS__);          \
    KRAKEN_CUDA_LAUNCH_CHECK();                                                        \
  } while (0)

void fill_cuda(float* out, float value, int64_t n, CUstream_st* s) { KRAKEN_LAUNCH(fill_kernel, n, s, out, value, n); }
void add_cuda(float* out, const float* a, const float* b, int64_t n, CUstream_st* s) {
  KRAKEN_LAUNCH(add_kernel<float>, n, s, out, a, b, n);
}
void axpy_cuda(float* y, const float* x, float alpha, int64_t n, CUstream_st* s) {
  KRAKEN_LAUNCH(axpy_kernel, n, s, y, x, alpha, n);
}
void scale_cuda(float* out, const float* x, float alpha, int64_t n, CUstream_st* s) {
  KRAKEN_LAUNCH(scale_kernel<float>, n, s, out, x, alpha, n);
}
void mul_cuda(float* out, const float* a, const float* b, int64_t n, CUstream_st* s) {
  KRAKEN_LAUNCH(mul_kernel<float>, n, s, out, a, b, n);
}
void add_broadcast_cuda(float* out, const float* a, const float* b, int64_t rows, int64_t cols, CUstream_st* s) {
  KRAKEN_LAUNCH(add_broadcast_kernel<float>, rows * cols, s, out, a, b, rows, cols);
}

namespace {
// The two-pass column sums (column_sums.h) where cols is a multiple of 8 and dout 16-byte aligned.
template <typename T>
struct RowOf {
  const T* dout;
  int64_t cols;
  __device__ __forceinline__ void operator()(int64_t r, int64_t c0, float (&t)[1][8]) const {
    load8(dout + r * cols + c0, t[0]);
  }
};
template <typename T>
struct AddToColumn {
  T* db;
  __device__ __forceinline__ void operator()(int64_t c, const float (&totals)[1]) const {
    store(db + c, load(db + c) + totals[0]);
  }
};
// The same for sets of columns (column_sums.h's sets, blockIdx.y the set): db (sets, cols).
template <typename T>
struct AddToSetColumn {
  T* db;
  int64_t cols;
  __device__ __forceinline__ void operator()(int64_t c, const float (&totals)[1]) const {
    T* d = db + static_cast<int64_t>(blockIdx.y) * cols + c;
    store(d, load(d) + totals[0]);
  }
};
// A row without the columns [first, first + count), as one compacted row of cols − count: its column c is
// the row's c below first and c + count from there on. first a multiple of 8 keeps every 8-column group
// of the compacted row on one side of the gap.
struct SkippedColumns {
  int64_t first, count;
  __device__ __forceinline__ int64_t column(int64_t c) const { return c < first ? c : c + count; }
};
template <typename T>
struct RowSkipping {
  const T* dout;
  int64_t cols;
  SkippedColumns skip;
  __device__ __forceinline__ void operator()(int64_t r, int64_t c0, float (&t)[1][8]) const {
    load8(dout + r * cols + skip.column(c0), t[0]);
  }
};
template <typename T>
struct AddToSetColumnSkipping {
  T* db;
  int64_t cols;
  SkippedColumns skip;
  __device__ __forceinline__ void operator()(int64_t c, const float (&totals)[1]) const {
    T* d = db + static_cast<int64_t>(blockIdx.y) * cols + skip.column(c);
    store(d, load(d) + totals[0]);
  }
};
// db (TOut) += the column sums of dout (TIn), every sum in f32 in an order set by rows and cols alone: the
// same bits for bf16 terms as for the same terms widened to f32 (the widening is exact).
template <typename TOut, typename TIn>
void sum_rows(TOut* db, const TIn* dout, int64_t rows, int64_t cols, CUstream_st* s, const char* name) {
  if (rows >= kSumGroups && cols > 0 && cols % 8 == 0 && aligned16(dout)) {
    column_sums<1>(rows, cols, RowOf<TIn>{dout, cols}, AddToColumn<TOut>{db}, s, name);
    return;
  }
  if (rows < kSumGroups) {
    if constexpr (std::is_same_v<TOut, __nv_bfloat16> && std::is_same_v<TIn, __nv_bfloat16>) {
      if (cols % 8 == 0 && aligned16(db) && aligned16(dout)) {
        KRAKEN_LAUNCH(sum_rows_bf16x8_kernel, cols / 8, s, db, dout, rows, cols / 8);
        return;
      }
    }
    if (cols <= 0) return;
    KRAKEN_KERNEL(blocks_for(cols, kThreads), kThreads, 0, s, sum_rows_kernel<TOut, TIn>)(db, dout, rows, cols);
    KRAKEN_CUDA_LAUNCH_CHECK();
    return;
  }
  if (cols <= 0) return;
  const long long blocks = (cols + kSumCols - 1) / kSumCols;
  KRAKEN_CHECK(blocks <= 0x7fffffffLL, name, ": ", cols, " columns");
  KRAKEN_KERNEL(static_cast<unsigned int>(blocks), kSumCols * kSumGroups, 0, s, sum_rows_grouped_kernel<TOut, TIn>)
  (db, dout, rows, cols);
  KRAKEN_CUDA_LAUNCH_CHECK();
}
// db[g] += the column sums of block g of dout, for `groups` consecutive (rows, cols) blocks: one launch of
// each column-sum pass for them all where the two-pass kernels take the shape (each block's sums the bits
// of its own call: column_sums.h's sets), else one sum_rows per block.
template <typename TOut, typename TIn>
void sum_rows_grouped(TOut* db, const TIn* dout, int64_t groups, int64_t rows, int64_t cols, CUstream_st* s,
                      const char* name) {
  if (groups > 1 && rows >= kSumGroups && cols > 0 && aligned16(dout) && column_sums_fit(rows, cols, groups)) {
    column_sums<1>(rows, cols, RowOf<TIn>{dout, cols}, AddToSetColumn<TOut>{db, cols}, s, name, groups);
    return;
  }
  for (int64_t g = 0; g < groups; ++g) sum_rows(db + g * cols, dout + g * rows * cols, rows, cols, s, name);
}
}  // namespace

void sum_rows_cuda(float* db, const float* dout, int64_t rows, int64_t cols, CUstream_st* s) {
  sum_rows(db, dout, rows, cols, s, "sum_rows_cuda");
}
void sum_rows_grouped_cuda(float* db, const float* dout, int64_t groups, int64_t rows, int64_t cols, CUstream_st* s) {
  sum_rows_grouped(db, dout, groups, rows, cols, s, "sum_rows_grouped_cuda");
}
void gelu_forward_cuda(float* out, const float* x, int64_t n, CUstream_st* s) {
  KRAKEN_LAUNCH(gelu_forward_kernel<float>, n, s, out, x, n);
}
void gelu_backward_cuda(float* dx, const float* x, const float* dout, int64_t n, CUstream_st* s) {
  KRAKEN_LAUNCH(gelu_backward_kernel<float>, n, s, dx, x, dout, n);
}
void cast_f32_to_bf16_cuda(uint16_t* out, const float* x, int64_t n, CUstream_st* s) {
  if (n % 8 == 0 && aligned16(out) && aligned16(x))
    KRAKEN_LAUNCH(f32_to_bf16x8_kernel, n / 8, s, as_bf16(out), x, n / 8);
  else
    KRAKEN_LAUNCH(f32_to_bf16_kernel, n, s, as_bf16(out), x, n);
}
void cast_bf16_to_f32_cuda(float* out, const uint16_t* x, int64_t n, CUstream_st* s) {
  if (n % 8 == 0 && aligned16(out) && aligned16(x))
    KRAKEN_LAUNCH(bf16_to_f32x8_kernel, n / 8, s, out, as_bf16(x), n / 8);
  else
    KRAKEN_LAUNCH(bf16_to_f32_kernel, n, s, out, as_bf16(x), n);
}
void cast_f32_to_bf16_many_cuda(uint16_t* const* outs, const float* const* xs, const int64_t* ns, int64_t count,
                                CUstream_st* s) {
  cast_many<float, __nv_bfloat16>(outs, xs, ns, count, s);
}
void cast_bf16_to_f32_many_cuda(float* const* outs, const uint16_t* const* xs, const int64_t* ns, int64_t count,
                                CUstream_st* s) {
  cast_many<__nv_bfloat16, float>(outs, xs, ns, count, s);
}
void accumulate_bf16_many_cuda(float* const* accs, const uint16_t* const* xs, const int64_t* ns, int64_t count,
                               CUstream_st* s) {
  cast_many<__nv_bfloat16, float, ManyPass::kAdd>(accs, xs, ns, count, s);
}
void zero_many_cuda(float* const* outs, const int64_t* ns, int64_t count, CUstream_st* s) {
  cast_many<float, float, ManyPass::kZero>(outs, static_cast<const float* const*>(nullptr), ns, count, s);
}

// ---- bf16 storage -----------------------------------------------------------------------------------
void add_bf16_cuda(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t n, CUstream_st* s) {
  if (n % 8 == 0 && aligned16(out) && aligned16(a) && aligned16(b))
    KRAKEN_LAUNCH(add_bf16x8_kernel, n / 8, s, as_bf16(out), as_bf16(a), as_bf16(b), n / 8);
  else
    KRAKEN_LAUNCH(add_kernel<__nv_bfloat16>, n, s, as_bf16(out), as_bf16(a), as_bf16(b), n);
}
void scale_bf16_cuda(uint16_t* out, const uint16_t* x, float alpha, int64_t n, CUstream_st* s) {
  KRAKEN_LAUNCH(scale_kernel<__nv_bfloat16>, n, s, as_bf16(out), as_bf16(x), alpha, n);
}
void mul_bf16_cuda(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t n, CUstream_st* s) {
  KRAKEN_LAUNCH(mul_kernel<__nv_bfloat16>, n, s, as_bf16(out), as_bf16(a), as_bf16(b), n);
}
void add_broadcast_bf16_cuda(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t rows, int64_t cols,
                             CUstream_st* s) {
  if (cols > 0 && cols % 8 == 0 && aligned16(out) && aligned16(a) && aligned16(b)) {
    KRAKEN_LAUNCH(add_broadcast_bf16x8_kernel, rows * cols / 8, s, as_bf16(out), as_bf16(a), as_bf16(b),
                  rows * cols / 8, cols / 8);
    return;
  }
  KRAKEN_LAUNCH(add_broadcast_kernel<__nv_bfloat16>, rows * cols, s, as_bf16(out), as_bf16(a), as_bf16(b), rows,
                cols);
}
void sum_rows_bf16_cuda(uint16_t* db, const uint16_t* dout, int64_t rows, int64_t cols, CUstream_st* s) {
  sum_rows(as_bf16(db), as_bf16(dout), rows, cols, s, "sum_rows_bf16_cuda");
}
void sum_rows_grouped_bf16_cuda(uint16_t* db, const uint16_t* dout, int64_t groups, int64_t rows, int64_t cols,
                                CUstream_st* s) {
  sum_rows_grouped(as_bf16(db), as_bf16(dout), groups, rows, cols, s, "sum_rows_grouped_bf16_cuda");
}
bool sum_rows_skipping_bf16_cuda(uint16_t* db, const uint16_t* dout, int64_t groups, int64_t rows, int64_t cols,
                                 int64_t skip_first, int64_t skip_count, CUstream_st* s) {
  const int64_t kept = cols - skip_count;
  KRAKEN_CHECK(groups >= 1 && skip_first >= 0 && skip_count >= 0 && skip_first + skip_count <= cols,
               "sum_rows_skipping_bf16_cuda: columns [", skip_first, ", ", skip_first + skip_count, ") of ", cols);
  // (The conditions under which sum_rows and sum_rows_grouped take the two-pass sums, for the kept columns.)
  if (kept <= 0 || rows < kSumGroups || cols % 8 != 0 || skip_first % 8 != 0 || skip_count % 8 != 0 ||
      !aligned16(dout) || !column_sums_fit(rows, kept, groups))
    return false;
  const SkippedColumns skip{skip_first, skip_count};
  column_sums<1>(rows, kept, RowSkipping<__nv_bfloat16>{as_bf16(dout), cols, skip},
                 AddToSetColumnSkipping<__nv_bfloat16>{as_bf16(db), cols, skip}, s, "sum_rows_skipping_bf16_cuda",
                 groups);
  return true;
}
void sum_rows_bf16_to_f32_cuda(float* db, const uint16_t* dout, int64_t rows, int64_t cols, CUstream_st* s) {
  sum_rows(db, as_bf16(dout), rows, cols, s, "sum_rows_bf16_to_f32_cuda");
}
void accumulate_bf16_cuda(float* acc, const uint16_t* x, int64_t n, CUstream_st* s) {
  if (n % 8 == 0 && aligned16(acc) && aligned16(x))
    KRAKEN_LAUNCH(accumulate_bf16x8_kernel, n / 8, s, acc, as_bf16(x), n / 8);
  else
    KRAKEN_LAUNCH(accumulate_bf16_kernel, n, s, acc, as_bf16(x), n);
}
bool residual_fork_bf16_cuda(uint16_t* a, uint16_t* m, const uint16_t* x, const uint16_t* y, const uint16_t* s,
                             int64_t blocks, int64_t per_block, CUstream_st* stream) {
  if (per_block % 8 != 0 || !aligned16(a) || !aligned16(m) || !aligned16(x) || !aligned16(y) || !aligned16(s))
    return false;
  if (blocks > 0 && per_block > 0)
    KRAKEN_KERNEL(blocks_for(per_block / 8, kThreads), kThreads, 0, stream, residual_fork_bf16x8_kernel)
    (as_bf16(a), as_bf16(m), as_bf16(x), as_bf16(y), as_bf16(s), blocks, per_block / 8);
  KRAKEN_CUDA_LAUNCH_CHECK();
  return true;
}
bool residual_fork_backward_bf16_cuda(uint16_t* dy, uint16_t* ds, const uint16_t* da, const uint16_t* dm,
                                      int64_t blocks, int64_t per_block, CUstream_st* stream) {
  if (per_block % 8 != 0 || !aligned16(dy) || !aligned16(ds) || !aligned16(da) || !aligned16(dm)) return false;
  if (per_block > 0)
    KRAKEN_KERNEL(blocks_for(per_block / 8, kThreads), kThreads, 0, stream, residual_fork_backward_bf16x8_kernel)
    (as_bf16(dy), as_bf16(ds), as_bf16(da), as_bf16(dm), blocks, per_block / 8);
  KRAKEN_CUDA_LAUNCH_CHECK();
  return true;
}
bool residual_fork_summed_bf16_cuda(uint16_t* a, uint16_t* m, const uint16_t* x, const uint16_t* y, int64_t blocks,
                                    int64_t per_block, CUstream_st* stream) {
  if (per_block % 8 != 0 || !aligned16(a) || !aligned16(m) || !aligned16(x) || !aligned16(y)) return false;
  return with_fork_blocks(blocks, [&](auto count) {
    if (per_block <= 0) return;
    KRAKEN_KERNEL(blocks_for(per_block / 8, kThreads), kThreads, 0, stream,
                  residual_fork_summed_bf16x8_kernel<decltype(count)::value>)
    (as_bf16(a), as_bf16(m), as_bf16(x), as_bf16(y), per_block / 8);
    KRAKEN_CUDA_LAUNCH_CHECK();
  });
}
bool residual_fork_summed_backward_bf16_cuda(uint16_t* dx, uint16_t* dy, const uint16_t* da, const uint16_t* dm,
                                             int64_t blocks, int64_t per_block, CUstream_st* stream) {
  if (per_block % 8 != 0 || !aligned16(dx) || !aligned16(dy) || !aligned16(da) || !aligned16(dm)) return false;
  return with_fork_blocks(blocks, [&](auto count) {
    if (per_block <= 0) return;
    KRAKEN_KERNEL(blocks_for(per_block / 8, kThreads), kThreads, 0, stream,
                  residual_fork_summed_backward_bf16x8_kernel<decltype(count)::value>)
    (as_bf16(dx), as_bf16(dy), as_bf16(da), as_bf16(dm), per_block / 8);
    KRAKEN_CUDA_LAUNCH_CHECK();
  });
}
void sum_bf16_cuda(uint16_t* out, const uint16_t* const* xs, int64_t count, int64_t n, CUstream_st* s) {
  KRAKEN_CHECK(1 <= count && count <= kSumsPerLaunch, "sum_bf16_cuda: ", count, " tensors, expected 1 to ",
               kSumsPerLaunch);
  SumTable table{};
  table.count = static_cast<int>(count);
  bool wide = n % 8 == 0 && aligned16(out);
  for (int64_t k = 0; k < count; ++k) {
    table.x[k] = as_bf16(xs[k]);
    wide = wide && aligned16(xs[k]);
  }
  if (wide)
    KRAKEN_LAUNCH(sum_bf16x8_kernel, n / 8, s, as_bf16(out), table, n / 8);
  else
    KRAKEN_LAUNCH(sum_bf16_kernel, n, s, as_bf16(out), table, n);
}
void gelu_forward_bf16_cuda(uint16_t* out, const uint16_t* x, int64_t n, CUstream_st* s) {
  if (n % 8 == 0 && aligned16(out) && aligned16(x))
    KRAKEN_LAUNCH(gelu_forward_bf16x8_kernel, n / 8, s, as_bf16(out), as_bf16(x), n / 8);
  else
    KRAKEN_LAUNCH(gelu_forward_kernel<__nv_bfloat16>, n, s, as_bf16(out), as_bf16(x), n);
}
void gelu_backward_bf16_cuda(uint16_t* dx, const uint16_t* x, const uint16_t* dout, int64_t n, CUstream_st* s) {
  if (n % 8 == 0 && aligned16(dx) && aligned16(x) && aligned16(dout))
    KRAKEN_LAUNCH(gelu_backward_bf16x8_kernel, n / 8, s, as_bf16(dx), as_bf16(x), as_bf16(dout), n / 8);
  else
    KRAKEN_LAUNCH(gelu_backward_kernel<__nv_bfloat16>, n, s, as_bf16(dx), as_bf16(x), as_bf16(dout), n);
}

}  // namespace kraken::kernels
