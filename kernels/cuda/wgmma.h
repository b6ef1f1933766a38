// Hopper's warpgroup tensor-core instructions (sm_90a): wgmma.mma_async m64nNk16 with bf16 operands and
// f32 accumulators, its shared-memory descriptors and fences — what attention_wgmma.cu builds on.
//
// Why not mma.sync (mma_sync.h): on Hopper mma.sync reaches roughly two thirds of the tensor cores' rate;
// wgmma is the instruction that feeds them fully. Four warps (a warpgroup, 128 threads) issue one
// wgmma together: D (64 × N, f32) += A (64 × 16) · B (16 × N), A from shared memory or registers, B from
// shared memory. It is asynchronous: the issuing threads go on, and the accumulators (and A's registers)
// may be touched only after a wgmma.wait_group that covers the instruction's commit group.
//
// Register layouts (PTX ISA, "Register Fragments and Shared Memory Matrix Layouts", wgmma m64nNk16):
// warp w of the warpgroup owns rows 16w .. 16w + 15 and, with g = lane / 4 and t = lane % 4, holds
//   D: d[4j + 0, 1] = D[16w + g][8j + 2t, +1]    d[4j + 2, 3] = D[16w + g + 8][8j + 2t, +1]   (j < N / 8)
//   A: a[0] = A[16w + g][2t, +1]   a[1] = A[16w + g + 8][2t, +1]   a[2] = A[16w + g][2t + 8, +9]
//      a[3] = A[16w + g + 8][2t + 8, +9]   (bf16 pairs, the lower column in the low half)
// — per warp, mma.sync m16n8k16's layouts (mma_sync.h), so the scores' accumulators rounded to bf16 and
// paired are the A operand of the next product, as in attention_mma.cu.
//
// Shared memory operands are described, not addressed: a 64-bit descriptor holds the start address, two
// strides and a swizzle mode (bits 0–13 start >> 4, 16–29 the leading byte offset >> 4, 32–45 the stride
// byte offset >> 4, 62–63 the swizzle, 0 = none). Without swizzle an operand is a grid of "core
// matrices", each 8 rows of 16 bytes stored as 128 contiguous bytes. Our reading of the PTX ISA's
// canonical layouts (and of CUTLASS's comments on them, cute/atom/mma_traits_sm90_gmma.hpp), for a
// 16-bit type, element (row, k) of a K-major operand (rows = M of A or N of B) and element (k, col) of an
// MN-major one (cols = M or N) lie at
//   K-major:  start + (row / 8)·SBO + (k / 8)·LBO + (row % 8)·16 + (k % 8)·2
//   MN-major: start + (col / 8)·SBO + (k / 8)·LBO + (k % 8)·16 + (col % 8)·2
// (LBO steps along K in both, SBO along M or N; an MN-major operand needs the instruction's transpose bit,
// which 16-bit types have). So one tile layout serves a matrix in both roles: the "core-matrix tile" of
// R rows × C columns (C a multiple of 8) stores element (r, c) at tile_offset(r, c, C) below. Read as a
// K-major operand (rows = M or N, columns = K) its LBO is 128 and its SBO 16·C; read as MN-major (rows =
// K, columns = M or N) the LBO is 16·C and the SBO 128. A K-major k of 16 starts 256 bytes further per
// step, an MN-major one 2 row groups (32·C bytes) further. Each core matrix is 128 contiguous bytes, so a
// wgmma's reads and 8 threads' 16-byte writes of one core matrix touch every bank once.
//
// Writes by ordinary stores or cp.async are in the "generic proxy"; wgmma reads shared memory through the
// "async proxy". A thread's writes become visible to wgmma after fence.proxy.async.shared::cta
// (fence_shared_for_wgmma), and other threads' after that fence in each writer and a barrier.
//
// Under the CPU emulation (tests/cuda_emu/wgmma.cpp) each of these is a call into the emulator, which
// decodes the same descriptors, gathers the warpgroup's registers, and lands the results only at the
// wait that covers them (the accumulators read NaN in between).
#pragma once

#include <cstdint>

#if defined(KRAKEN_CUDA_EMULATION)
#include "tests/cuda_emu/emu.h"
#endif

namespace kraken::kernels::wgmma {

// Byte offset of element (r, c) in a core-matrix tile of `cols` columns (a multiple of 8), bf16.
__host__ __device__ constexpr int tile_offset(int r, int c, int cols) {
  return ((r >> 3) * (cols >> 3) + (c >> 3)) * 128 + (r & 7) * 16 + (c & 7) * 2;
}

// A descriptor without swizzle: start address (16-byte aligned, in the block's shared memory) and the
// leading (K) and stride (M or N) byte offsets between core matrices.
__host__ __device__ constexpr uint64_t make_descriptor(uint32_t shared_address, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((shared_address >> 4) & 0x3FFFu) |
         static_cast<uint64_t>((lbo >> 4) & 0x3FFFu) << 16 | static_cast<uint64_t>((sbo >> 4) & 0x3FFFu) << 32;
}

// The same descriptor with its leading and stride byte offsets exchanged: the other way to read the PTX
// ISA's prose (its canonical layouts and our emulation read them as above). Only the layout probe uses it,
// so that a GPU that reads a descriptor otherwise says in the same run which reading it follows.
__host__ __device__ constexpr uint64_t exchange_strides(uint64_t desc) {
  const uint64_t lbo = desc >> 16 & 0x3FFFu, sbo = desc >> 32 & 0x3FFFu;
  return (desc & ~(uint64_t{0x3FFFu} << 16 | uint64_t{0x3FFFu} << 32)) | sbo << 16 | lbo << 32;
}

#if defined(KRAKEN_CUDA_EMULATION)

inline uint32_t shared_address(const void* p) { return ::kraken_emu::shared_window_address(p); }
inline void fence() {}
inline void fence_shared_for_wgmma() {}
inline void commit() { ::kraken_emu::wgmma_commit(); }
template <int kPending>
inline void wait() {
  ::kraken_emu::wgmma_wait(kPending);
}
template <int N>
inline void fence_accumulators(float (&)[N]) {}
template <int kCount>
inline void release_registers_to() {}  // (registers are not modelled)
template <int kCount>
inline void take_registers_to() {}
template <int N, int kTransA, int kTransB>
inline void mma(float (&d)[N / 2], uint64_t a_desc, uint64_t b_desc, int scale_d) {
  ::kraken_emu::wgmma_bf16(d, N, nullptr, a_desc, b_desc, kTransA, kTransB, scale_d != 0);
}
template <int N, int kTransB>
inline void mma(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b_desc, int scale_d) {
  ::kraken_emu::wgmma_bf16(d, N, a, 0, b_desc, 0, kTransB, scale_d != 0);
}

#else

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "kernels/cuda/wgmma_instructions.inc"
#define KRAKEN_WGMMA_ASM(...) asm volatile(__VA_ARGS__)
#else
#define KRAKEN_WGMMA_ASM(...) __trap()
#endif

// Orders this thread's earlier register writes (accumulators, A fragments) before the next wgmma.
__device__ __forceinline__ void fence() { KRAKEN_WGMMA_ASM("wgmma.fence.sync.aligned;\n" ::: "memory"); }
// Makes this thread's earlier generic-proxy writes to shared memory visible to wgmma (then a barrier for
// other threads' wgmma).
__device__ __forceinline__ void fence_shared_for_wgmma() {
  KRAKEN_WGMMA_ASM("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Closes the group of wgmma issued since the last commit.
__device__ __forceinline__ void commit() { KRAKEN_WGMMA_ASM("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most kPending committed groups are in flight.
template <int kPending>
__device__ __forceinline__ void wait() {
  KRAKEN_WGMMA_ASM("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving reads or writes of the accumulators across this point (they change
// behind its back between a wgmma and its wait).
template <int N>
__device__ __forceinline__ void fence_accumulators(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (64 × N) = A·B + (scale_d ? d : 0), A and B from descriptors; kTrans* = 1 for an MN-major operand.
template <int N, int kTransA, int kTransB>
__device__ __forceinline__ void mma(float (&d)[N / 2], uint64_t a_desc, uint64_t b_desc, int scale_d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  Instruction<N>::template ss<kTransA, kTransB>(d, a_desc, b_desc, scale_d);
#else
  __trap();
#endif
}
// The same with A from registers (the layout above).
template <int N, int kTransB>
__device__ __forceinline__ void mma(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b_desc, int scale_d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  Instruction<N>::template rs<kTransB>(d, a, b_desc, scale_d);
#else
  __trap();
#endif
}

// Moves registers between the warpgroups of a block (setmaxnreg): every thread of the executing warpgroup
// then has at most kCount (24 .. 256, a multiple of 8) registers, released to or taken from the block's
// pool — a warp-specialised kernel's producer warpgroup gives up what its copies do not need and its
// consumers take it. The kernel's launch bounds set what each thread starts with; a warpgroup that asks
// for more waits until others have released enough. All threads of the warpgroup execute it.
template <int kCount>
__device__ __forceinline__ void release_registers_to() {
  static_assert(kCount >= 24 && kCount <= 256 && kCount % 8 == 0, "setmaxnreg takes 24 .. 256, multiples of 8");
  KRAKEN_WGMMA_ASM("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kCount));
}
template <int kCount>
__device__ __forceinline__ void take_registers_to() {
  static_assert(kCount >= 24 && kCount <= 256 && kCount % 8 == 0, "setmaxnreg takes 24 .. 256, multiples of 8");
  KRAKEN_WGMMA_ASM("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kCount));
}

#undef KRAKEN_WGMMA_ASM

#endif  // KRAKEN_CUDA_EMULATION

// A K-major operand at rows r0.., columns k0 .. k0 + 15 of a core-matrix tile of `cols` columns.
__device__ __forceinline__ uint64_t k_major(const unsigned char* tile, int cols, int r0, int k0) {
  return make_descriptor(shared_address(tile + tile_offset(r0, k0, cols)), 128, 16 * cols);
}
// An MN-major operand at rows (k) k0 .. k0 + 15, columns (M or N) c0.. of a core-matrix tile.
__device__ __forceinline__ uint64_t mn_major(const unsigned char* tile, int cols, int k0, int c0) {
  return make_descriptor(shared_address(tile + tile_offset(k0, c0, cols)), 16 * cols, 128);
}

}  // namespace kraken::kernels::wgmma
