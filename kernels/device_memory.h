// Device memory the kernels layer takes for itself (the scratch buffers that grow with a call's shape:
// cuDNN attention's workspace, the two-pass reductions' partial sums; cuBLASLt's workspace) comes
// straight from cudaMalloc, beside the runtime's caching allocator, whose free blocks may hold most of
// the GPU. When such an allocation fails, the kernels call the reclaimer the runtime registered — first
// for the bytes they need (the fewest cached segments go back to the driver), then for everything — and
// try again after each: a shape change between runs (another batch size, a model after another in one
// process) is no out-of-memory while memory is merely cached.
#pragma once

#include <cstddef>

namespace kraken::kernels {

// Gives cached memory of `device` back to the driver: room for `bytes` where it can (SIZE_MAX: all).
using DeviceMemoryReclaimer = void (*)(int device, size_t bytes);
void set_device_memory_reclaimer(DeviceMemoryReclaimer reclaim);

// cudaMalloc with those two retries: false (the CUDA error cleared) when even the last fails. CUDA builds.
bool device_malloc_or_reclaim(void** ptr, size_t bytes, int device);

}  // namespace kraken::kernels
