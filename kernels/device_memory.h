// Device memory the kernels layer takes for itself (the scratch buffers that grow with a call's shape:
// cuDNN attention's workspace, the two-pass reductions' partial sums; cuBLASLt's workspace) comes
// straight from cudaMalloc, beside the runtime's caching allocator, whose free lists may hold most of
// the GPU. When such an allocation fails, the kernels call the reclaimer the runtime registered (it
// hands the cache's free blocks back to the driver) and try once more: a shape change between runs
// (another batch size, a model after another in one process) is no out-of-memory while memory is
// merely cached.
#pragma once

namespace kraken::kernels {

using DeviceMemoryReclaimer = void (*)(int device);
void set_device_memory_reclaimer(DeviceMemoryReclaimer reclaim);

// cudaMalloc with that one retry: false (the CUDA error cleared) when even the retry fails. CUDA builds.
bool device_malloc_or_reclaim(void** ptr, size_t bytes, int device);

}  // namespace kraken::kernels
