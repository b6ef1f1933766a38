// Storage types of the CUDA kernels: f32, or bf16 computed in f32 (mixed precision).
//
// A kernel templated on its storage type T reads every element with load() and writes it with
// store(); all arithmetic between them is f32. For T = float both are a plain access, so the f32
// instantiation compiles to the arithmetic the f32 kernel always had (same operations, same order).
// For T = __nv_bfloat16, load() widens exactly and store() rounds once to nearest even: a bf16 kernel
// equals the f32 kernel on the widened inputs followed by one rounding per output element. An
// accumulating output is written as store(p, load(p) + v): read, added in f32, rounded once.
// Element accesses are scalar (2 bytes for bf16), so no alignment beyond the type's own is assumed.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace kraken::kernels::cuda_detail {

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// The public API passes bf16 buffers as uint16_t (bit patterns); the kernels see __nv_bfloat16.
inline __nv_bfloat16* as_bf16(uint16_t* p) { return reinterpret_cast<__nv_bfloat16*>(p); }
inline const __nv_bfloat16* as_bf16(const uint16_t* p) { return reinterpret_cast<const __nv_bfloat16*>(p); }

}  // namespace kraken::kernels::cuda_detail
