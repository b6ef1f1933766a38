// Hopper's shared-memory barriers with phases (mbarrier, sm_90 here), the pieces of a producer → consumer
// pipeline that needs no __syncthreads: a "full" barrier per stage that the producer's copies complete and
// an "empty" one the consumers complete once they are done reading — FlashAttention-3's structure, which
// the wgmma attention (attention_wgmma.cu) needs to keep its tensor cores busy (bench/RESULTS.md,
// twenty-second session).
//
// An mbarrier is 8 bytes of shared memory, 8-byte aligned. init(bar, n): a phase completes after n
// arrivals, and the count starts again for the next phase. wait(bar, parity) returns once the phase of
// that parity has completed — the barrier's current phase has the other parity: on a fresh barrier
// wait(bar, 1) returns at once and wait(bar, 0) waits for the first phase. So in a ring of stages, tile t
// in stage t % stages, round r = t / stages, the consumers wait(full, r & 1) and the producer
// wait(empty, (r & 1) ^ 1). A thread may only wait for the current phase or the one before; further
// ahead the parity is ambiguous.
// arrive_on_copies(bar): an arrival made once every cp.async this thread issued before it has landed
// (cp.async.mbarrier.arrive.noinc: it does not add to the count, so n counts these arrivals too). The
// barrier's completion makes those writes visible to the threads that waited on it (the generic proxy;
// a wgmma reading them still needs wgmma::fence_shared_for_wgmma after the wait).
//
//
// Named barriers (bar.sync / bar.arrive id, threads; namespace named_barrier below), the other kind a
// warp-specialised kernel uses: barrier id (1 .. 15; 0 is __syncthreads') completes once `threads` threads
// (a multiple of 32, whole warps) have arrived, and starts counting again. sync<id>(n) arrives and waits
// for the completion; arrive<id>(n) arrives and goes on. So two warpgroups take turns: one syncs on its
// barrier with n = 256, the other arrives on it once it is done with its turn. An arrival the other side
// does not await in that round completes the round without it (a hang or a skipped turn later).
// sync_if / arrive_if: the same where cond holds (the same for every thread of a warp), as one predicated
// instruction rather than a branch around it. The difference matters to ptxas: with the turns' branches
// in a loop of asynchronous wgmma, it serialised the dq and dk/dv kernels' products (its C7513 "wgmma
// serialized due to non wgmma instructions defining input registers"); predicated, it keeps them in
// flight (scripts/check-ptxas.sh holds every kernel to that).
//
// Under the CPU emulation (tests/cuda_emu) these are calls into the emulator, which waits as a barrier
// waits and lands a copy's bytes only when its arrival is needed (emu.h).
#pragma once

#include <cstdint>

#if defined(KRAKEN_CUDA_EMULATION)
#include "tests/cuda_emu/emu.h"
#endif

namespace kraken::kernels::mbarrier {

#if defined(KRAKEN_CUDA_EMULATION)

inline void init(uint64_t* bar, int count) { ::kraken_emu::mbarrier_init(bar, count); }
inline uint64_t arrive(uint64_t* bar) {
  ::kraken_emu::mbarrier_arrive(bar);
  return 0;
}
inline void wait(uint64_t* bar, int parity) { ::kraken_emu::mbarrier_wait(bar, parity); }
inline void arrive_on_copies(uint64_t* bar) { ::kraken_emu::mbarrier_arrive_on_copies(bar); }

#else

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// (Until the other threads pass a __syncthreads after it, no thread may use the barrier.)
__device__ __forceinline__ void init(uint64_t* bar, int count) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(count) : "memory");
#endif
}

// Returns the barrier's state before the arrival (an opaque token; callers here have no use for it).
__device__ __forceinline__ uint64_t arrive(uint64_t* bar) {
  uint64_t state = 0;
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];\n" : "=l"(state) : "r"(shared_address(bar)) : "memory");
#endif
  return state;
}

// try_wait suspends the thread for a while in hardware before it fails; the loop covers the rest.
__device__ __forceinline__ void wait(uint64_t* bar, int parity) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(shared_address(bar)),
      "r"(parity)
      : "memory");
#endif
}

__device__ __forceinline__ void arrive_on_copies(uint64_t* bar) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(shared_address(bar)) : "memory");
#endif
}

#endif  // KRAKEN_CUDA_EMULATION

}  // namespace kraken::kernels::mbarrier

namespace kraken::kernels::named_barrier {

// (The id a constant: with an id in a register, ptxas reserves all 16 of the block's barriers.)
#if defined(KRAKEN_CUDA_EMULATION)
template <int kId>
inline void sync(int threads) {
  ::kraken_emu::named_barrier_sync(kId, threads);
}
template <int kId>
inline void arrive(int threads) {
  ::kraken_emu::named_barrier_arrive(kId, threads);
}
template <int kId>
inline void sync_if(bool cond, int threads) {
  if (cond) ::kraken_emu::named_barrier_sync(kId, threads);
}
template <int kId>
inline void arrive_if(bool cond, int threads) {
  if (cond) ::kraken_emu::named_barrier_arrive(kId, threads);
}
#else
template <int kId>
__device__ __forceinline__ void sync(int threads) {
  static_assert(kId >= 1 && kId < 16, "named barriers 1 .. 15 (0 is __syncthreads')");
  asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "r"(threads) : "memory");
}
template <int kId>
__device__ __forceinline__ void arrive(int threads) {
  static_assert(kId >= 1 && kId < 16, "named barriers 1 .. 15 (0 is __syncthreads')");
  asm volatile("bar.arrive %0, %1;\n" ::"n"(kId), "r"(threads) : "memory");
}
// One predicated bar instruction; op: "sync" or "arrive".
#define KRAKEN_NAMED_BARRIER_IF(op, id, cond, threads)                                                   \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %0, 0;\n@p bar." op " %1, %2;\n}\n" ::"r"(static_cast<int>(cond)), \
               "n"(id), "r"(threads)                                                                     \
               : "memory")
template <int kId>
__device__ __forceinline__ void sync_if(bool cond, int threads) {
  static_assert(kId >= 1 && kId < 16, "named barriers 1 .. 15 (0 is __syncthreads')");
  KRAKEN_NAMED_BARRIER_IF("sync", kId, cond, threads);
}
template <int kId>
__device__ __forceinline__ void arrive_if(bool cond, int threads) {
  static_assert(kId >= 1 && kId < 16, "named barriers 1 .. 15 (0 is __syncthreads')");
  KRAKEN_NAMED_BARRIER_IF("arrive", kId, cond, threads);
}
#undef KRAKEN_NAMED_BARRIER_IF
#endif

}  // namespace kraken::kernels::named_barrier
