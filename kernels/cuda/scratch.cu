// kernels/cuda/scratch.h: one growing buffer per (device, slot).
#include "kernels/cuda/scratch.h"

#include <cuda_runtime.h>

#include <mutex>

#include "kernels/cuda/check.h"
#include "kernels/cuda/launch.h"  // under the CPU emulation, its cudaMalloc and cudaFree

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
    KRAKEN_CUDA_CHECK(cudaMalloc(&b.data, bytes));
    b.bytes = bytes;
  }
  return b.data;
}

}  // namespace kraken::kernels::cuda_detail
