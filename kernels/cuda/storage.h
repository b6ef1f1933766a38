// Storage types of the CUDA kernels: f32, or bf16 computed in f32 (mixed precision).
//
// A kernel templated on its storage type T reads every element with load() and writes it with
// store(); all arithmetic between them is f32. For T = float both are a plain access, so the f32
// instantiation compiles to the arithmetic the f32 kernel always had (same operations, same order).
// For T = __nv_bfloat16, load() widens exactly and store() rounds once to nearest even: a bf16 kernel
// equals the f32 kernel on the widened inputs followed by one rounding per output element. An
// accumulating output is written as store(p, load(p) + v): read, added in f32, rounded once.
// Element accesses are scalar (2 bytes for bf16), so no alignment beyond the type's own is assumed;
// load8/store8 move 8 bf16 elements as one 16-byte access (8 f32 as two), for kernels whose caller
// checked that the pointers are 16-byte aligned (aligned16). They widen and round exactly as load/store do.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kraken::kernels::cuda_detail {

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

struct alignas(16) Bf16x8 {
  __nv_bfloat162 pair[4];
};
// Eight bf16 in and out of memory as one 16-byte access: through a uint4, because a Bf16x8 copied as
// itself is copied pair by pair — four 4-byte loads or stores in the PTX, which ptxas keeps as four
// (every "16-byte" bf16 access of these kernels was four until the thirteenth session). The bytes are
// the same either way.
__device__ __forceinline__ Bf16x8 load_bf16x8(const __nv_bfloat16* p) {
  const uint4 bits = *reinterpret_cast<const uint4*>(p);
  Bf16x8 q;
  static_assert(sizeof(q) == sizeof(bits), "eight bf16 are 16 bytes");
  __builtin_memcpy(static_cast<void*>(&q), &bits, sizeof(q));  // (void*: a bit copy, meant)
  return q;
}
__device__ __forceinline__ void store_bf16x8(__nv_bfloat16* p, const Bf16x8& q) {
  uint4 bits;
  __builtin_memcpy(&bits, &q, sizeof(bits));
  *reinterpret_cast<uint4*>(p) = bits;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
  const Bf16x8 q = load_bf16x8(p);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = __bfloat1622float2(q.pair[k]);
    v[2 * k] = f.x;
    v[2 * k + 1] = f.y;
  }
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&v)[8]) {
  Bf16x8 q;
#pragma unroll
  for (int k = 0; k < 4; ++k) q.pair[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
  store_bf16x8(p, q);
}
// f32: two 16-byte accesses (p 16-byte aligned), for kernels templated on T that use load8/store8.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
// 8 elements as stored, for a kernel that holds a row in registers across a reduction: a bf16 pack is 4
// registers where its 8 widened floats are 8. load_stored8 is the same 16-byte access(es) as load8, and
// widen8 of what it loaded gives load8's floats exactly.
template <typename T>
struct Stored8;
template <>
struct Stored8<__nv_bfloat16> {
  Bf16x8 q;
};
template <>
struct Stored8<float> {
  float4 a, b;
};
__device__ __forceinline__ void load_stored8(const __nv_bfloat16* p, Stored8<__nv_bfloat16>& s) {
  s.q = load_bf16x8(p);
}
__device__ __forceinline__ void load_stored8(const float* p, Stored8<float>& s) {
  s.a = reinterpret_cast<const float4*>(p)[0];
  s.b = reinterpret_cast<const float4*>(p)[1];
}
// load_stored8 with the cache-streaming hint (ld.global.cs: evict first), for the rows a kernel reads once
// while it reads a few small vectors (gamma) over and over: the streamed rows then give way first in L1
// — which is small beside a block's large shared memory: 28 KB an SM where the one-pass LayerNorm
// backward's 3 blocks hold 216 KB (H100) — rather than gamma. The same bytes as load_stored8.
__device__ __forceinline__ void load_stored8_streaming(const __nv_bfloat16* p, Stored8<__nv_bfloat16>& s) {
  const uint4 bits = __ldcs(reinterpret_cast<const uint4*>(p));
  __builtin_memcpy(static_cast<void*>(&s.q), &bits, sizeof(bits));
}
__device__ __forceinline__ void load_stored8_streaming(const float* p, Stored8<float>& s) {
  s.a = __ldcs(reinterpret_cast<const float4*>(p));
  s.b = __ldcs(reinterpret_cast<const float4*>(p) + 1);
}
__device__ __forceinline__ void widen8(const Stored8<__nv_bfloat16>& s, float (&v)[8]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = __bfloat1622float2(s.q.pair[k]);
    v[2 * k] = f.x;
    v[2 * k + 1] = f.y;
  }
}
__device__ __forceinline__ void widen8(const Stored8<float>& s, float (&v)[8]) {
  v[0] = s.a.x, v[1] = s.a.y, v[2] = s.a.z, v[3] = s.a.w, v[4] = s.b.x, v[5] = s.b.y, v[6] = s.b.z, v[7] = s.b.w;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The public API passes bf16 buffers as uint16_t (bit patterns); the kernels see __nv_bfloat16.
inline __nv_bfloat16* as_bf16(uint16_t* p) { return reinterpret_cast<__nv_bfloat16*>(p); }
inline const __nv_bfloat16* as_bf16(const uint16_t* p) { return reinterpret_cast<const __nv_bfloat16*>(p); }

}  // namespace kraken::kernels::cuda_detail
