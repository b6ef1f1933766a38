// What the two tensor-core attention families (attention_tc.cu: WMMA; attention_mma.cu: mma.sync with
// register-resident softmax) share: the launch dimensions, the copies of head rows between global
// memory and shared tiles, the per-query statistics of the backward (lse, Dᵢ), the padded head sizes
// and their dispatch. Included by those two files only; everything here is file-local to each.
//
// Both use blocks of kWarps = 4 warps owning a tile of kTile = 64 rows, 16 per warp; shared row tiles
// hold bf16 with the head columns padded from D to Dp with zeros; global rows are copied in 16-, 4- or
// 2-byte pieces depending on what D and the pointers' alignment allow (TcDims::vec).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "kernels/cuda/check.h"
#include "kernels/cuda/launch.h"

namespace kraken::kernels {
namespace {

// ==== device code ======================================================================================

constexpr int kTile = 64;           // rows of a block's tile and of each streamed tile
constexpr int kSub = 16;            // the WMMA edge: a warp's rows, a block of keys or queries
constexpr int kWarps = kTile / kSub;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;

struct TcDims {
  int T, C, NH, D;
  int64_t ld;        // 3C: the row stride of qkv and dqkv
  float scale;       // 1/√D
  float scale_log2;  // scale·log₂e: scores in log2 units
  int vec;           // elements per global access: 8, 2 or 1
  int bnh;           // B·NH: the blocks along grid.x of one attention (the mma kernels run several)
};

__device__ __forceinline__ float b2f(uint16_t u) { return __bfloat162float(__ushort_as_bfloat16(u)); }
__device__ __forceinline__ uint16_t f2b(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }

template <int V>
struct alignas(2 * V) Pack {
  uint16_t u[V];
};

// Zeroes `bytes` (a multiple of 16) of shared memory from a 16-byte-aligned p.
__device__ void zero_shared(unsigned char* p, size_t bytes) {
  uint4* q = reinterpret_cast<uint4*>(p);
  for (size_t i = threadIdx.x; i < bytes / 16; i += kThreads) q[i] = make_uint4(0u, 0u, 0u, 0u);
}

// Rows [t0, t0 + rows) of a row-major bf16 matrix with row stride `stride`, columns [0, D), into the
// shared tile dst (pitch ld); rows at or past T are written as zeros, columns D .. Dp are not touched.
template <int V>
__device__ void copy_rows_v(uint16_t* dst, int ld, const uint16_t* src, int64_t stride, int t0, int rows, int T,
                            int D) {
  const int packs = D / V;
  for (int idx = threadIdx.x; idx < rows * packs; idx += kThreads) {
    const int r = idx / packs, c = (idx - r * packs) * V;
    const Pack<V> p =
        t0 + r < T ? *reinterpret_cast<const Pack<V>*>(src + static_cast<int64_t>(t0 + r) * stride + c) : Pack<V>{};
    *reinterpret_cast<Pack<V>*>(dst + r * ld + c) = p;
  }
}

__device__ void copy_rows(uint16_t* dst, int ld, const uint16_t* src, int64_t stride, int t0, const TcDims& g,
                          int rows = kTile) {
  if (g.vec == 8)
    copy_rows_v<8>(dst, ld, src, stride, t0, rows, g.T, g.D);
  else if (g.vec == 2)
    copy_rows_v<2>(dst, ld, src, stride, t0, rows, g.T, g.D);
  else
    copy_rows_v<1>(dst, ld, src, stride, t0, rows, g.T, g.D);
}

// The warp's 16 rows of an f32 shared tile (pitch lds), columns [0, D), to global rows t0 .. t0 + 15
// (row stride `stride`; rows at or past T are skipped): dst = bf16(factor·v), or when accumulating
// dst = bf16(dst + factor·v), added in f32 and rounded once.
template <int V, bool kAccumulate>
__device__ void store_rows_v(uint16_t* dst, int64_t stride, const float* src, int lds, int t0, int T, int D,
                             float factor) {
  const int lane = threadIdx.x % 32, packs = D / V;
  for (int idx = lane; idx < kSub * packs; idx += 32) {
    const int r = idx / packs, c = (idx - r * packs) * V;
    if (t0 + r >= T) break;  // rows grow with idx
    uint16_t* p = dst + static_cast<int64_t>(t0 + r) * stride + c;
    Pack<V> v{};
    if (kAccumulate) v = *reinterpret_cast<const Pack<V>*>(p);
    for (int i = 0; i < V; ++i) {
      const float x = factor * src[r * lds + c + i];
      v.u[i] = f2b(kAccumulate ? b2f(v.u[i]) + x : x);
    }
    *reinterpret_cast<Pack<V>*>(p) = v;
  }
}

template <bool kAccumulate>
__device__ void store_rows(uint16_t* dst, int64_t stride, const float* src, int lds, int t0, float factor,
                           const TcDims& g) {
  if (g.vec == 8)
    store_rows_v<8, kAccumulate>(dst, stride, src, lds, t0, g.T, g.D, factor);
  else if (g.vec == 2)
    store_rows_v<2, kAccumulate>(dst, stride, src, lds, t0, g.T, g.D, factor);
  else
    store_rows_v<1, kAccumulate>(dst, stride, src, lds, t0, g.T, g.D, factor);
}

// lse (in log2 units) and Dᵢ = Σ_d dO·O of the query tile's rows q0 .. q0 + kRows − 1: kThreads/kRows
// threads per row (2 or 4), each summing every such V-element piece, then shuffles; rows at or past T
// get 0 (every score of theirs is masked).
template <int V, int kRows>
__device__ void load_query_rows_v(float* lse_s, float* delta_s, const uint16_t* dout, const uint16_t* out,
                                  const float* lse, int64_t row0, int bh, int h, int q0, const TcDims& g) {
  constexpr int kParts = kThreads / kRows;
  static_assert(kParts * kRows == kThreads && (kParts == 2 || kParts == 4), "2 or 4 threads per row");
  const int rr = threadIdx.x / kParts, part = threadIdx.x % kParts, t = q0 + rr;
  float acc = 0.0f;
  if (t < g.T) {
    const int64_t at = (row0 + t) * g.C + static_cast<int64_t>(h) * g.D;
    for (int c = part * V; c < g.D; c += kParts * V) {
      const Pack<V> x = *reinterpret_cast<const Pack<V>*>(dout + at + c);
      const Pack<V> y = *reinterpret_cast<const Pack<V>*>(out + at + c);
#pragma unroll
      for (int i = 0; i < V; ++i) acc += b2f(x.u[i]) * b2f(y.u[i]);
    }
  }
#pragma unroll
  for (int offset = 1; offset < kParts; offset <<= 1) acc += __shfl_xor_sync(kFull, acc, offset);
  if (part == 0) {
    delta_s[rr] = acc;
    lse_s[rr] = t < g.T ? lse[static_cast<int64_t>(bh) * g.T + t] * kLog2e : 0.0f;
  }
}

template <int kRows = kTile>
__device__ void load_query_rows(float* lse_s, float* delta_s, const uint16_t* dout, const uint16_t* out,
                                const float* lse, int64_t row0, int bh, int h, int q0, const TcDims& g) {
  if (g.vec == 8)
    load_query_rows_v<8, kRows>(lse_s, delta_s, dout, out, lse, row0, bh, h, q0, g);
  else if (g.vec == 2)
    load_query_rows_v<2, kRows>(lse_s, delta_s, dout, out, lse, row0, bh, h, q0, g);
  else
    load_query_rows_v<1, kRows>(lse_s, delta_s, dout, out, lse, row0, bh, h, q0, g);
}


// ==== host code ========================================================================================

constexpr size_t kDefaultSmem = 48 * 1024;
constexpr int64_t kMaxTcHead = 256;

// D padded to a multiple of 16 (the tensor cores' k) up to 128, and above to a multiple of the family's
// kStepAbove128: 32 for the WMMA kernels (half the instantiations, for 14% padding at D = 168, the Kraken
// 4-way heads), 16 for the mma ones (5%: those heads are most of that model's step).
template <int kStepAbove128>
int padded_head(int64_t D) {
  const int64_t step = D <= 128 ? kSub : kStepAbove128;
  return static_cast<int>((D + step - 1) / step * step);
}

// The widest piece (8, 2 or 1 elements) every global row access can use: D a multiple of it (so are C,
// 3C and every head offset) and every pointer aligned to it.
int vector_width(int D, const std::vector<const void*>& ptrs) {
  for (int v : {8, 2}) {
    bool ok = D % v == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % (2 * v) == 0;
    if (ok) return v;
  }
  return 1;
}

// The launch's dimensions, after checking what the kernels assume; `supported` is the family's own
// verdict on the head size (attention_bf16_{tc,mma}_supported), `family` names it in the error.
TcDims make_tc_dims(int64_t B, int64_t T, int64_t C, int64_t NH, const std::vector<const void*>& ptrs,
                    const char* family, bool (*supported)(int64_t)) {
  KRAKEN_CHECK(NH > 0 && C > 0 && C % NH == 0, "C=", C, " NH=", NH);
  KRAKEN_CHECK(supported(C / NH), family, ": head size D = ", C / NH,
               " is not supported on this device (1 ≤ D ≤ 256, within its shared memory per block)");
  KRAKEN_CHECK(T < (1LL << 31) && 3 * C < (1LL << 31), "T=", T, " C=", C);
  KRAKEN_CHECK(B * NH <= 0x7fffffffLL, "B·NH = ", B * NH, " exceeds the grid's x limit");
  KRAKEN_CHECK((T + kTile - 1) / kTile <= 65535, "T = ", T, " needs more than 65535 tiles of ", kTile);
  TcDims g;
  g.T = static_cast<int>(T);
  g.C = static_cast<int>(C);
  g.NH = static_cast<int>(NH);
  g.D = static_cast<int>(C / NH);
  g.ld = 3 * C;
  g.scale = 1.0f / sqrtf(static_cast<float>(g.D));
  g.scale_log2 = g.scale * kLog2e;
  g.vec = vector_width(g.D, ptrs);
  g.bnh = static_cast<int>(B * NH);
  return g;
}

// Whether a family whose largest block needs block_bytes(D) of shared memory runs head size D on the
// current device (1 ≤ D ≤ 256).
bool head_fits_device(int64_t D, size_t (*block_bytes)(int)) {
  if (D < 1 || D > kMaxTcHead) return false;
  int device = 0, optin = 0;
  KRAKEN_CUDA_CHECK(cudaGetDevice(&device));
  KRAKEN_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return block_bytes(static_cast<int>(D)) <= static_cast<size_t>(optin);
}

dim3 tc_grid(int64_t B, int64_t T, int64_t NH) {
  return dim3(static_cast<unsigned>(B * NH), static_cast<unsigned>((T + kTile - 1) / kTile));
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > kDefaultSmem) {
    KRAKEN_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// Calls f(std::integral_constant<int, Dp>()) for the padded size Dp = padded_head<kStepAbove128>(D):
// each family instantiates its kernels for its own padded sizes only.
template <int kStepAbove128, int Dp = kSub, typename F>
void with_padded_head(int D, F&& f) {
  if constexpr (Dp <= kMaxTcHead) {
    if (padded_head<kStepAbove128>(D) == Dp) {
      f(std::integral_constant<int, Dp>());
      return;
    }
    with_padded_head<kStepAbove128, Dp + (Dp < 128 ? kSub : kStepAbove128)>(D, f);
  } else {
    KRAKEN_THROW("tensor-core attention: no kernel for D = ", D);
  }
}

}  // namespace
}  // namespace kraken::kernels
