// Where tensor bytes come from: an aligned host allocator and a device allocator per GPU.
//
// The device allocator keeps what it got from cudaMalloc and hands it out again (runtime/block_pool.h),
// so a training step that allocates the same shapes every iteration stops calling cudaMalloc after the
// first one, also near the device's capacity.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "runtime/dtype.h"

struct CUstream_st;

namespace kraken::runtime {

class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* ptr, size_t bytes) = 0;
  virtual const char* name() const = 0;
};

struct AllocatorStats {
  int64_t bytes_in_use = 0;
  int64_t peak_bytes_in_use = 0;
  int64_t bytes_reserved = 0;   // held from the system, cached blocks included
  int64_t system_allocations = 0;  // calls to malloc / cudaMalloc so far
  int64_t system_releases = 0;     // cudaFrees of cached memory (each synchronises the device); host: not counted
};

// 64-byte aligned host memory (a cache line, and the widest vector load).
Allocator& host_allocator();
AllocatorStats host_allocator_stats();

// Caching allocator for cuda:N. Without CUDA in the build, or without a GPU, it throws kraken::Error.
Allocator& device_allocator(int device_index);
AllocatorStats device_allocator_stats(int device_index);

Allocator& allocator_for(const Device& device);

// Tells `observer` of every host allocation (allocated = true) and release while one is set (nullptr:
// none), with the bytes asked for: the CPU tests record a training step's pattern of tensor lifetimes
// and replay it into the device allocator's pool (tests/train/allocation_pattern_test.cpp). Calls come
// under the host allocator's lock, in order. Unset, it costs one atomic load a call.
using AllocationObserver = void (*)(void* context, const void* ptr, size_t bytes, bool allocated);
void set_host_allocation_observer(AllocationObserver observer, void* context);
// Caps what the device allocator holds from the driver on that device (0, the default: no cap). A request
// beyond it is out of memory as on a GPU that small — free segments go back first — so that a test or a
// benchmark can run a step near the capacity without taking the GPU from other processes. The kernels'
// own scratch buffers (kernels/device_memory.h) are outside it.
void set_device_memory_limit(const Device& device, int64_t bytes);
// Gives the device allocator's free segments back to the driver (nothing in use moves): between two
// models in one process, or before handing the device's memory to something else. CPU: nothing.
void release_cached_memory(const Device& device);
// Restarts the peak: peak_bytes_in_use = bytes_in_use now, so a later reading is the peak of what ran
// in between (a benchmark measuring one model after another).
void reset_peak_bytes_in_use(const Device& device);

// ---- device services the runtime needs besides memory -----------------------------------------
// Whether this build has CUDA and this machine a usable GPU; `why_not` says why not.
bool cuda_available(std::string* why_not = nullptr);
int cuda_device_count();
// The CUDA device's name ("NVIDIA H100 80GB HBM3"); empty without CUDA or without that device.
std::string cuda_device_name(int device_index);
// Copies bytes between any two devices (host↔host is memcpy). Stream-ordered on the destination's
// (or source's) compute stream, and the host side may be used (read, or reused) when it returns. It
// returns without waiting for the GPU within one GPU (autograd clones every gradient it accumulates) and
// from the host up to kStagedUploadLimit bytes (copied into a pinned staging buffer, whose DMA the
// stream runs in order: a micro-batch's ids and targets); it waits for the stream on a copy to the host,
// a larger one from it, and between two GPUs (the other device's work is not on that stream). Each wait
// counts in MemoryTraffic::host_waits. (4 MiB: a micro-batch of a million tokens' ids; 16 staging
// buffers a device stay pinned, with the ones they outgrew: at most 128 MiB a device, ~4 MiB in practice. A
// checkpoint's tensors load in 16 MiB chunks, which wait.) Between two GPUs it first waits for the
// source's stream too, so the copy reads what that device's queued work writes.
constexpr size_t kStagedUploadLimit = size_t{4} << 20;
void copy_bytes(void* dst, const Device& dst_device, const void* src, const Device& src_device, size_t bytes);
// Copies `height` rows of `width` bytes between strided buffers on one device (split and concat).
void copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t height,
             const Device& device);
// Sets n bytes to zero on the device.
void zero_bytes(void* dst, const Device& device, size_t bytes);
// What copy_bytes, copy_2d and zero_bytes have moved within one device (host or GPU: not the transfers
// between them) since the process started: passes over memory outside the kernels, which a GPU profile
// of kernels does not list (cudaMemcpyAsync, cudaMemsetAsync). Tests and benchmarks read the difference
// across a step; relaxed counters, exact once the counted work has returned.
struct MemoryTraffic {
  uint64_t copies = 0, copied_bytes = 0;  // copies within one device
  uint64_t fills = 0, zeroed_bytes = 0;   // zero fills
  uint64_t host_waits = 0;  // copies (any devices) that made the host wait for a GPU: a drained queue each
};
MemoryTraffic memory_traffic();
MemoryTraffic operator-(const MemoryTraffic& later, const MemoryTraffic& earlier);
// The stream compute kernels run on for that device (the default stream until streams are set up).
CUstream_st* compute_stream(const Device& device);
void synchronize(const Device& device);

}  // namespace kraken::runtime
