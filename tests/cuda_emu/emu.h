// A CPU emulation of the CUDA execution model, enough to run kernels/cuda's kernels in CI.
//
// There is no GPU where CI runs, so without this the CUDA kernels would only ever be compiled there.
// A kernel source compiled with -DKRAKEN_CUDA_EMULATION (tests/cuda_emu/CMakeLists.txt) launches
// through kraken_emu::Launch instead of <<<…>>> (kernels/cuda/launch.h), and every thread of a block
// runs as a fiber on the calling thread: __syncthreads, __syncwarp, the warp shuffles and the WMMA
// operations are points where a fiber waits for the others of its block or warp, so the barrier
// structure of the kernel is executed for real (a barrier some threads never reach is reported as a
// deadlock, as is a warp operation with lanes missing). Blocks run one after another.
//
// What it checks is the kernels' logic: indexing, tiling, masking, reductions, the synchronisation
// pattern, and (through WMMA fragments whose element layout is a scrambled permutation, see mma.h)
// that no code depends on an unspecified fragment layout. What it cannot check: speed, races the
// sequential schedule hides (racecheck on a GPU does that), device math library ulps (host libm here)
// and tensor-core rounding (products are summed in f32 in k order). Dynamic shared memory is filled
// with a poison pattern at every block's start, so a kernel that reads shared memory it never wrote
// sees garbage here as on a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "tests/cuda_emu/schedule.h"

namespace kraken_emu {

// The running thread's coordinates.
struct ThreadCoords {
  uint3 thread_idx{0, 0, 0};
  uint3 block_idx{0, 0, 0};
  dim3 block_dim{1, 1, 1};
  dim3 grid_dim{1, 1, 1};
};
const ThreadCoords& coords();
int lane();  // threadIdx.x % 32 of a 1-D block (the kernels here use 1-D blocks)

void sync_block();  // __syncthreads
void sync_warp();   // __syncwarp
// Every lane of the warp contributes `bytes` at `in`; returns, in `out`, what lane `source` contributed.
void warp_exchange(const void* in, void* out, size_t bytes, int source);
// One bit per lane: bit l set when lane l passed true.
unsigned warp_ballot(bool predicate);
// The warp's own scratch (for the collective WMMA operations), at least 8 KiB, 16-byte aligned.
void* warp_scratch();
void* dynamic_shared();
// Whether [p, p + bytes) lies in the running block's dynamic shared memory.
bool in_dynamic_shared(const void* p, size_t bytes);
[[noreturn]] void trap(const char* what);

// The PTX primitives of kernels/cuda/mma_sync.h (its header has the layouts), warp-collective where the
// instruction is: mma.sync m16n8k16 (d += a·b, bf16 operands, products summed in f32 in k order) and
// ldmatrix .x4 (every lane gives a row address, 16-byte aligned, in dynamic shared memory) gather all
// 32 lanes' operands, so they are warp barriers as a shuffle is (mma_sync.cpp).
void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans);
// cp.async, landing at either end of the window a GPU has: under the ascending schedule the copy is
// queued in the calling thread and lands only when a cp_async_wait covers its group, so a read before
// the wait (or, for another thread's copy, before the barrier after it) sees what was there before —
// poison, or the previous tile; under the descending schedule it lands at once, so a copy into a buffer
// that other warps may still be reading (no barrier between) overwrites it under them. src_bytes <
// bytes fills the rest with zeros.
void cp_async(void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);  // lands all but the `pending` most recent committed groups

// Hopper's warpgroup operations (kernels/cuda/wgmma.h has the layouts; wgmma.cpp). A warpgroup is warps
// 4k .. 4k + 3 of the block; sync_warpgroup is its barrier (every live thread of the four warps meets).
void sync_warpgroup();
// The warpgroup's own scratch, at least 8 KiB, 16-byte aligned.
void* warpgroup_scratch();
// The address a descriptor holds for p: its offset in the block's dynamic shared memory (which stands in
// for the shared window; the kernels' shared memory is all dynamic).
uint32_t shared_window_address(const void* p);
// wgmma.mma_async m64nNk16, bf16 → f32: d (N / 2 per thread) = A·B + (scale_d ? d : 0), A from the
// warpgroup's registers (a != nullptr) or a descriptor, B from a descriptor, trans = 1 for MN-major. A
// warpgroup collective: the operands are read and the product computed at the issue, the results held
// back — the accumulators read NaN — until a wgmma_wait covers the commit group (under the descending
// schedule they land at once). A GPU reads the operands at any time up to that wait, so the wait reads
// the shared ones and A's registers again, under both schedules, and traps where they changed in between.
void wgmma_bf16(float* d, int n, const uint32_t* a, uint64_t a_desc, uint64_t b_desc, int trans_a, int trans_b,
                bool scale_d);
void wgmma_commit();
void wgmma_wait(int pending);  // lands all but the `pending` most recent committed groups
// One bf16 element of shared memory a wgmma read: its offset in the block's dynamic shared memory and bits.
struct SharedRead {
  uint32_t offset;
  uint16_t bits;
};
// (wgmma.cpp's hand-over to the scheduler: the calling thread's `count` results for d, held until its
// wait, or landed now under the descending schedule; the shared memory it read and its A registers (null
// for A from shared memory), checked at the wait.)
void hold_wgmma_results(float* d, const float* values, int count, std::vector<SharedRead> reads,
                        const uint32_t* a_registers);
// The calling thread's latest held results for d (a wgmma chained onto one not yet waited for accumulates
// onto them, as the GPU orders them), or nullptr when none are held.
const float* held_wgmma_results(const float* d, int count);

// Hopper's shared-memory barriers (kernels/cuda/mbarrier.h has their rules; emu.cpp). The emulation keeps
// each barrier's state beside the block, by its offset in dynamic shared memory, and marks its 8 bytes so
// that a kernel writing over a barrier traps at the barrier's next use, as does a barrier never
// initialised. A wait whose phase has not completed parks the thread as a barrier does. An arrival on
// copies comes after the thread's cp.async before it have landed: under the descending schedule at once
// (they landed at their issue), under the ascending one as late as can be — only once no thread can run
// without it, oldest first — so a consumer that reads a stage before waiting on its "full" barrier sees
// the old bytes, and one the producer refills without waiting on its "empty" barrier is overwritten under
// it (descending). A cp_async_wait lands the thread's copies held for such arrivals too, and makes them.
// An arrival that completes a phase parks the arriving thread until nothing else in the block can run: a
// stage released while it is still read (by a wgmma in flight, or after the arrival) is refilled under the
// reader (with copies landing at once, the descending schedule), and writes made after the arrival that
// should publish them are not there for the readers.
void mbarrier_init(uint64_t* bar, int count);
void mbarrier_arrive(uint64_t* bar);
void mbarrier_wait(uint64_t* bar, int parity);
void mbarrier_arrive_on_copies(uint64_t* bar);

// The block's named barriers (bar.sync / bar.arrive id, threads; kernels/cuda/mbarrier.h): barrier id
// (1 .. 15; 0 is __syncthreads') completes once `threads` threads have arrived, by either call, and the
// count starts again; sync waits for that completion, arrive does not. Traps: an id outside 1 .. 15, a
// count not a positive multiple of 32 or above the block's threads, two counts on one barrier in one
// round, and a block that returns with arrivals on a barrier that never completed (a surplus arrival —
// one round completed early by the same side's arrivals shows as a deadlock instead).
void named_barrier_sync(int id, int threads);
void named_barrier_arrive(int id, int threads);

// Runs body once per thread of every block of the grid.
void run_grid(dim3 grid, dim3 block, size_t dynamic_shared_bytes, const std::function<void()>& body);

// cudaFuncSetAttribute's cudaFuncAttributeMaxDynamicSharedMemorySize is remembered per kernel, as the CUDA
// runtime remembers it: on a GPU a launch that asks a kernel for more than 48 KiB of dynamic shared memory,
// beyond what was so raised for that kernel, fails (an invalid-value launch error) — here it traps, so a
// launcher that forgets the attribute for one of its instantiations fails in CI, not first on a GPU.
// Other attributes are accepted and ignored.
void set_max_dynamic_shared(const void* kernel, int bytes);
void check_dynamic_shared_opt_in(const void* kernel, size_t bytes);

// KRAKEN_KERNEL(grid, block, shared, stream, kernel)(args...): runs kernel(args...) on every thread.
template <typename... Params>
struct Launcher {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t shared;
  template <typename... Args>
  void operator()(Args&&... args) const {
    std::tuple<std::decay_t<Params>...> values(static_cast<Params>(args)...);
    check_dynamic_shared_opt_in(reinterpret_cast<const void*>(kernel), shared);
    run_grid(grid, block, shared, [&] { std::apply(kernel, values); });
  }
};
template <typename... Params>
Launcher<Params...> Launch(dim3 grid, dim3 block, size_t shared, cudaStream_t, void (*kernel)(Params...)) {
  return Launcher<Params...>{kernel, grid, block, shared};
}

// The CUDA runtime calls the kernels' host code makes, answered for one emulated Hopper device.
cudaError_t get_device(int* device);
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t get_last_error();
cudaError_t memset_async(void* p, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t malloc_device(void** p, size_t bytes);  // host memory, 256-byte aligned, filled with poison
cudaError_t free_device(void* p);
// (cudaFuncSetAttribute: func_set_attribute below.)
template <typename Function>
cudaError_t func_set_attribute(Function* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
    set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
  }
  return cudaSuccess;
}
// cudaFuncGetAttributes: the emulation has no registers, so numRegs is what ptxas gives the kernels that
// ask (the pipelined attention kernels: 168 a thread under their launch bounds of 384), or what a test set
// (schedule.h).
int reported_registers();
template <typename Function>
cudaError_t func_get_attributes(cudaFuncAttributes* attributes, Function*) {
  *attributes = cudaFuncAttributes{};
  attributes->numRegs = reported_registers();
  return cudaSuccess;
}
// Blocks an SM holds at once, by threads (2048) and shared memory (228 KiB an SM, 1 KiB of it reserved
// per block) alone: the emulation has no registers to count.
int blocks_per_multiprocessor(int block_size, size_t dynamic_shared_bytes);
template <typename Function>
cudaError_t occupancy_max_active_blocks(int* blocks, Function*, int block_size, size_t dynamic_shared_bytes) {
  *blocks = blocks_per_multiprocessor(block_size, dynamic_shared_bytes);
  return cudaSuccess;
}

}  // namespace kraken_emu

#define cudaGetDevice ::kraken_emu::get_device
#define cudaDeviceGetAttribute ::kraken_emu::device_get_attribute
#define cudaGetLastError ::kraken_emu::get_last_error
#define cudaFuncSetAttribute ::kraken_emu::func_set_attribute
#define cudaFuncGetAttributes ::kraken_emu::func_get_attributes
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor ::kraken_emu::occupancy_max_active_blocks
#define cudaMemsetAsync ::kraken_emu::memset_async
#define cudaMalloc ::kraken_emu::malloc_device
#define cudaFree ::kraken_emu::free_device

// The CUDA built-ins the kernels use. (The real cuda_runtime.h, included above for its types, declares
// none of these for a host compiler.)
#define threadIdx (::kraken_emu::coords().thread_idx)
#define blockIdx (::kraken_emu::coords().block_idx)
#define blockDim (::kraken_emu::coords().block_dim)
#define gridDim (::kraken_emu::coords().grid_dim)
#define __syncthreads() ::kraken_emu::sync_block()
#define __syncwarp(...) ::kraken_emu::sync_warp()
#define __trap() ::kraken_emu::trap("__trap()")
// Static __shared__ arrays are function-local statics: one per kernel, shared by the block's fibers
// (blocks run one at a time, so one copy is the block's).
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
// (A kernel parameter read in place, without a thread's copy: the emulation's parameters are the host's.)
#undef __grid_constant__
#define __grid_constant__

// CUDA's integer min and max (device functions there; the kernels call them unqualified).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }  // 1 + the lowest set bit, 0 for 0
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }  // one rounding, as on the GPU
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}
// ld.global.cs (evict-first): a cache hint, the same bytes as a plain load.
template <typename T>
T __ldcs(const T* p) {
  return *p;
}

// Integer atomics: the fibers of the emulation run on one thread, one at a time, so a plain
// read-modify-write is atomic here.
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}

// The bit of every lane of the warp whose predicate is non-zero (all 32 lanes must call it).
inline unsigned __ballot_sync(unsigned /*mask*/, int predicate) { return ::kraken_emu::warp_ballot(predicate != 0); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask, int /*width*/ = 32) {
  T out;
  ::kraken_emu::warp_exchange(&value, &out, sizeof(T), ::kraken_emu::lane() ^ lane_mask);
  return out;
}
template <typename T>
T __shfl_sync(unsigned /*mask*/, T value, int source, int /*width*/ = 32) {
  T out;
  ::kraken_emu::warp_exchange(&value, &out, sizeof(T), source & 31);
  return out;
}
