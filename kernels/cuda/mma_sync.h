// The warp-level tensor-core primitives of attention_mma.cu, as PTX: mma.sync m16n8k16 (bf16 operands,
// f32 accumulators), ldmatrix (shared memory → fragments, optionally transposed) and cp.async (global →
// shared without passing through registers). sm_80 and newer.
//
// Unlike WMMA, whose fragment layouts CUDA leaves unspecified, these have layouts the PTX ISA fixes
// ("Matrix Fragments for mma.m16n8k16 with floating point type"; ldmatrix), which is what lets a
// kernel keep the scores in registers and feed them straight back as an A operand. With
// g = lane / 4 and t = lane % 4 ("groupID", "threadID_in_group"):
//   A (16 × 16, row-major), four 32-bit registers of two bf16 each, the lower column in the low half:
//     a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B (16 × 8, k × n), two registers:  b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   C, D (16 × 8, f32):  c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// so the accumulators of two adjacent 16 × 8 products (columns 16j .. 16j+15) are, rounded to bf16
// and paired, exactly the A fragment of the 16 columns as the k of the next product.
//   ldmatrix .x4: lanes 8i .. 8i+7 give the 16-byte-aligned addresses of the 8 rows of 8 × 8 matrix i;
//     r[i] = matrix i [g][2t, 2t+1]; with .trans, r[i] = matrix i [2t][g], [2t+1][g].
//
// Under the CPU emulation (tests/cuda_emu) each of these is a call into the emulator, which implements
// the same layouts with real warp-collective semantics (all 32 lanes meet; cp.async copies land only
// at the wait that covers them).
#pragma once

#include <cstdint>

#if defined(KRAKEN_CUDA_EMULATION)
#include "tests/cuda_emu/emu.h"
#endif

namespace kraken::kernels::mma {

#if defined(KRAKEN_CUDA_EMULATION)

inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::kraken_emu::mma_m16n8k16_bf16(d, a, b);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { ::kraken_emu::ldmatrix_x4(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { ::kraken_emu::ldmatrix_x4(r, row, true); }
inline void cp_async_16(void* dst, const void* src, bool fill) { ::kraken_emu::cp_async(dst, src, 16, fill ? 16 : 0); }
inline void cp_async_4(void* dst, const void* src, bool fill) { ::kraken_emu::cp_async(dst, src, 4, fill ? 4 : 0); }
inline void cp_async_commit() { ::kraken_emu::cp_async_commit(); }
template <int kPending>
inline void cp_async_wait() {
  ::kraken_emu::cp_async_wait(kPending);
}

#else

// d += a·b.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
#endif
}

// 16 bytes from global src to shared dst, asynchronously; when !fill, 16 zero bytes instead (src is
// not read, but must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool fill) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(fill ? 16 : 0)
               : "memory");
#endif
}

// 4 bytes (through L1: .ca, the only kind for pieces under 16 bytes), or 4 zero bytes when !fill.
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool fill) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(fill ? 4 : 0)
               : "memory");
#endif
}

// Closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight. Other threads'
// copies need a barrier after their own wait before this thread may read them.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

#endif  // KRAKEN_CUDA_EMULATION

}  // namespace kraken::kernels::mma
