// kernels/cuda/scratch.h: one growing buffer per (device, slot).
#include "kernels/cuda/scratch.h"

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>

#include "kernels/cuda/check.h"
#include "kernels/cuda/launch.h"  // under the CPU emulation, its cudaMalloc and cudaFree
#include "kernels/device_memory.h"

namespace kraken::kernels {
namespace {
std::atomic<DeviceMemoryReclaimer> reclaimer{nullptr};
}  // namespace

void set_device_memory_reclaimer(DeviceMemoryReclaimer reclaim) { reclaimer.store(reclaim); }

bool device_malloc_or_reclaim(void** ptr, size_t bytes, int device) {
  cudaError_t err = cudaMalloc(ptr, bytes);
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    if (DeviceMemoryReclaimer reclaim = reclaimer.load()) {
      for (const size_t room : {bytes, SIZE_MAX}) {  // room for this buffer, then the whole cache
        reclaim(device, room);
        err = cudaMalloc(ptr, bytes);
        if (err != cudaErrorMemoryAllocation) break;
        (void)cudaGetLastError();
      }
    }
  }
  if (err == cudaErrorMemoryAllocation) (void)cudaGetLastError();
  else KRAKEN_CUDA_CHECK(err);
  return err == cudaSuccess;
}

}  // namespace kraken::kernels

namespace kraken::kernels::cuda_detail {

void* device_scratch(ScratchSlot slot, size_t bytes) {
  struct Buffer {
    void* data = nullptr;
    size_t bytes = 0;
  };
  constexpr int kDevices = 64;
  static std::mutex mutex;
  static Buffer buffers[kDevices][static_cast<int>(ScratchSlot::kCount)];
  int device = 0;
  KRAKEN_CUDA_CHECK(cudaGetDevice(&device));
  KRAKEN_CHECK(device >= 0 && device < kDevices, "device ", device);
  std::lock_guard<std::mutex> lock(mutex);
  Buffer& b = buffers[device][static_cast<int>(slot)];
  if (b.bytes < bytes) {
    if (b.data) KRAKEN_CUDA_CHECK(cudaFree(b.data));
    b.data = nullptr;
    b.bytes = 0;
    if (!device_malloc_or_reclaim(&b.data, bytes, device))
      KRAKEN_THROW("cuda:", device, ": cannot allocate ", bytes, " bytes of kernel scratch space (out of memory, with the "
                   "runtime's cached blocks returned)");
    b.bytes = bytes;
  }
  return b.data;
}

}  // namespace kraken::kernels::cuda_detail
