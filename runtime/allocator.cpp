#include "runtime/allocator.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "kernels/device_memory.h"
#include "kernels/error.h"
#include "runtime/block_pool.h"

#if KRAKEN_WITH_CUDA
#include <cuda_runtime.h>
#define KRAKEN_RT_CUDA_CHECK(expr)                                                                  \
  do {                                                                                              \
    cudaError_t err_ = (expr);                                                                      \
    if (err_ != cudaSuccess)                                                                        \
      KRAKEN_THROW("CUDA error at ", __FILE__, ":", __LINE__, ": ", cudaGetErrorName(err_), " (",   \
                   cudaGetErrorString(err_), ")");                                                  \
  } while (0)
#endif

namespace kraken::runtime {
namespace {

constexpr size_t kHostAlignment = 64;

// Copies that made the host wait for a GPU (MemoryTraffic::host_waits).
std::atomic<uint64_t> g_host_waits{0};

struct ObserverSlot {
  std::atomic<AllocationObserver> observer{nullptr};
  std::atomic<void*> context{nullptr};
};
ObserverSlot& host_observer() {
  static ObserverSlot slot;
  return slot;
}
void tell_observer(const void* ptr, size_t bytes, bool allocated) {
  ObserverSlot& slot = host_observer();
  if (AllocationObserver observer = slot.observer.load(std::memory_order_acquire))
    observer(slot.context.load(std::memory_order_relaxed), ptr, bytes, allocated);
}

// Small blocks come straight from aligned_alloc. Large ones (activations, logits, gradients) are cached
// by their exact rounded size and handed out again: glibc maps every large block afresh and unmaps it
// on free, so a training step that reallocates the same 200 MB of logits each time paid page faults and
// kernel page zeroing for all of it (about 5% of a CPU step, measured with perf). Blocks beyond the
// cache limit (KRAKEN_HOST_CACHE_MB, default 4096) go back to the system.
class HostAllocator final : public Allocator {
 public:
  HostAllocator() {
    if (const char* env = std::getenv("KRAKEN_HOST_CACHE_MB")) cache_limit_ = std::atoll(env) << 20;
  }
  static size_t round(size_t bytes) {
    if (bytes == 0) bytes = kHostAlignment;
    const size_t unit = bytes >= kCachedMin ? 4096 : kHostAlignment;
    return (bytes + unit - 1) / unit * unit;
  }
  void* allocate(size_t bytes) override {
    const size_t size = round(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    void* ptr = nullptr;
    if (size >= kCachedMin) {
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        ptr = it->second.back();
        it->second.pop_back();
        cached_ -= static_cast<int64_t>(size);
      }
    }
    if (!ptr) {
      ptr = std::aligned_alloc(kHostAlignment, size);
      if (!ptr) KRAKEN_THROW("out of host memory allocating ", bytes, " bytes");
      stats_.system_allocations += 1;
      stats_.bytes_reserved += static_cast<int64_t>(size);
    }
    stats_.bytes_in_use += static_cast<int64_t>(size);
    stats_.peak_bytes_in_use = std::max(stats_.peak_bytes_in_use, stats_.bytes_in_use);
    tell_observer(ptr, bytes, true);
    return ptr;
  }
  void deallocate(void* ptr, size_t bytes) override {
    if (!ptr) return;
    const size_t size = round(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    tell_observer(ptr, bytes, false);
    stats_.bytes_in_use -= static_cast<int64_t>(size);
    if (size >= kCachedMin && cached_ + static_cast<int64_t>(size) <= cache_limit_) {
      free_[size].push_back(ptr);
      cached_ += static_cast<int64_t>(size);
      return;
    }
    stats_.bytes_reserved -= static_cast<int64_t>(size);
    std::free(ptr);
  }
  const char* name() const override { return "host"; }
  AllocatorStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.peak_bytes_in_use = stats_.bytes_in_use;
  }

 private:
  static constexpr size_t kCachedMin = 1 << 20;
  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> free_;
  int64_t cached_ = 0;
  int64_t cache_limit_ = int64_t{4096} << 20;
  AllocatorStats stats_;
};

HostAllocator& host_instance() {
  static HostAllocator* instance = new HostAllocator();  // never destroyed: tensors may outlive statics
  return *instance;
}

#if KRAKEN_WITH_CUDA
// The device's memory through a BlockPool (runtime/block_pool.h): best fit, split and merged, so that
// near the device's capacity a step still finds room among the blocks the previous one released. When
// cudaMalloc fails, the pool gives free segments back to the driver and asks again; the kernels' own
// cudaMallocs (scratch buffers, cuBLASLt's workspace) do the same through the reclaimer this allocator
// registers (kernels/device_memory.h).
class CachingDeviceAllocator final : public Allocator {
 public:
  explicit CachingDeviceAllocator(int device)
      : device_(device), pool_(BlockPool::Backing{[this](size_t bytes) { return cuda_malloc(bytes); },
                                                  [this](void* ptr, size_t) { cuda_free(ptr); }}) {}
  void* allocate(size_t bytes) override {
    std::lock_guard<std::mutex> lock(mutex_);
    void* ptr = pool_.allocate(bytes);
    if (!ptr) {
      const AllocatorStats s = pool_.stats();
      KRAKEN_THROW("cuda:", device_, ": cannot allocate ", BlockPool::round(bytes), " bytes (out of memory); in use ",
                   s.bytes_in_use, ", reserved ", s.bytes_reserved, ", largest free block ",
                   pool_.largest_free_block());
    }
    return ptr;
  }
  void deallocate(void* ptr, size_t) override {
    if (!ptr) return;
    std::lock_guard<std::mutex> lock(mutex_);
    pool_.deallocate(ptr);
  }
  const char* name() const override { return "cuda-caching"; }
  AllocatorStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return pool_.stats();
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    pool_.reset_peak();
  }
  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
  }
  // Free segments back to the driver: the fewest that make room for `bytes` (the kernels' reclaimer
  // asks for its buffer's size first), or all of them (SIZE_MAX).
  void release_cached(size_t bytes = SIZE_MAX) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (bytes == SIZE_MAX) pool_.release_free_segments();
    else pool_.make_room(bytes);
  }

 private:
  // nullptr when the device is out of memory (or the limit reached); any other failure is an error.
  // (Called by the pool under mutex_.)
  void* cuda_malloc(size_t bytes) {
    if (limit_ > 0 && pool_.stats().bytes_reserved + static_cast<int64_t>(bytes) > limit_) return nullptr;
    int previous = 0;
    KRAKEN_RT_CUDA_CHECK(cudaGetDevice(&previous));
    KRAKEN_RT_CUDA_CHECK(cudaSetDevice(device_));
    void* ptr = nullptr;
    const cudaError_t err = cudaMalloc(&ptr, bytes);
    cudaSetDevice(previous);
    if (err == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      return nullptr;
    }
    if (err != cudaSuccess)
      KRAKEN_THROW("cuda:", device_, ": cudaMalloc of ", bytes, " bytes: ", cudaGetErrorName(err), " (",
                   cudaGetErrorString(err), ")");
    return ptr;
  }
  void cuda_free(void* ptr) {
    int previous = 0;
    if (cudaGetDevice(&previous) != cudaSuccess) return;
    cudaSetDevice(device_);
    cudaFree(ptr);
    cudaSetDevice(previous);
  }
  int device_;
  std::mutex mutex_;
  int64_t limit_ = 0;  // bytes the pool may hold from the driver; 0: no limit
  BlockPool pool_;
};

CachingDeviceAllocator& device_instance(int index) {
  static std::mutex mutex;
  static std::map<int, CachingDeviceAllocator*> instances;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = instances[index];
  if (!slot) {
    slot = new CachingDeviceAllocator(index);
    // The kernels' own allocations give this cache back before they fail (kernels/device_memory.h).
    kernels::set_device_memory_reclaimer(
        [](int device, size_t bytes) { device_instance(device).release_cached(bytes); });
  }
  return *slot;
}

// Host-to-GPU copies of up to kStagedUploadLimit bytes (a micro-batch's token ids and targets, a few
// scalars) go through pinned staging buffers: the host's bytes are copied into one and the DMA from it is
// queued on the stream, so the call returns without waiting for the GPU. From pageable memory a
// cudaMemcpyAsync may first synchronise with the stream (the runtime API's "API synchronization
// behavior"), and copy_bytes used to wait for every copy from the host, which emptied the GPU's queue
// before each micro-batch's forward (the ids, then the targets). A buffer is reused once the event
// recorded after its copy has passed: kSlots uploads later, normally a step or more after its DMA ran.
class UploadStaging {
 public:
  static constexpr size_t kSlots = 16;
  static constexpr size_t kMinCapacity = size_t{64} << 10;

  // Queues the copy of bytes from src (host) to dst (on `device`, the current device) on `stream`.
  void upload(void* dst, const void* src, size_t bytes, int device, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    Ring& ring = rings_[device];
    Slot& slot = ring.slots[ring.next];
    ring.next = (ring.next + 1) % kSlots;
    if (slot.in_flight) {
      const cudaError_t passed = cudaEventQuery(slot.done);
      if (passed == cudaErrorNotReady) {  // kSlots uploads queued behind one the GPU has not reached
        (void)cudaGetLastError();  // (not an error: cleared in case it stays the last error, as nccl_comm.cpp)
        g_host_waits.fetch_add(1, std::memory_order_relaxed);
        KRAKEN_RT_CUDA_CHECK(cudaEventSynchronize(slot.done));
      } else {
        KRAKEN_RT_CUDA_CHECK(passed);
      }
    }
    slot.in_flight = false;
    if (!slot.done) KRAKEN_RT_CUDA_CHECK(cudaEventCreateWithFlags(&slot.done, cudaEventDisableTiming));
    if (slot.capacity < bytes) {
      // A slot sees whatever sizes pass through it (a scalar, then a micro-batch's ids; a checkpoint's
      // tensors), so it may grow mid-run: its old buffer is kept, not freed — cudaFreeHost waits for the
      // whole device, the NCCL stream's work included. Capacities double from 64 KiB, so a slot holds at
      // most twice its largest (8 MiB at the 4 MiB limit).
      if (slot.host) ring.retired.push_back(slot.host);
      slot.host = nullptr, slot.capacity = 0;
      size_t capacity = kMinCapacity;
      while (capacity < bytes) capacity *= 2;
      KRAKEN_RT_CUDA_CHECK(cudaMallocHost(&slot.host, capacity));
      slot.capacity = capacity;
    }
    std::memcpy(slot.host, src, bytes);
    KRAKEN_RT_CUDA_CHECK(cudaMemcpyAsync(dst, slot.host, bytes, cudaMemcpyHostToDevice, stream));
    KRAKEN_RT_CUDA_CHECK(cudaEventRecord(slot.done, stream));
    slot.in_flight = true;
  }

 private:
  struct Slot {
    void* host = nullptr;  // pinned
    size_t capacity = 0;
    cudaEvent_t done = nullptr;
    bool in_flight = false;  // done is recorded after a copy from host
  };
  struct Ring {
    Slot slots[kSlots];
    size_t next = 0;
    std::vector<void*> retired;  // outgrown pinned buffers, never freed (see upload)
  };
  std::mutex mutex_;
  std::map<int, Ring> rings_;  // by device
};

UploadStaging& upload_staging() {
  static UploadStaging* staging = new UploadStaging;  // never destroyed: its buffers outlive the CUDA context
  return *staging;
}
#endif

void require_cuda(int device_index) {
  std::string why;
  if (!cuda_available(&why)) KRAKEN_THROW("device cuda:", device_index, " requested, but ", why);
  if (device_index < 0 || device_index >= cuda_device_count())
    KRAKEN_THROW("device cuda:", device_index, " requested, but this machine has ", cuda_device_count(), " GPU(s)");
}

}  // namespace

Allocator& host_allocator() { return host_instance(); }

void set_host_allocation_observer(AllocationObserver observer, void* context) {
  ObserverSlot& slot = host_observer();
  slot.observer.store(nullptr);  // never the new observer with the old context
  slot.context.store(context);
  slot.observer.store(observer);
}
AllocatorStats host_allocator_stats() { return host_instance().stats(); }

Allocator& device_allocator(int device_index) {
  require_cuda(device_index);
#if KRAKEN_WITH_CUDA
  return device_instance(device_index);
#else
  std::abort();  // unreachable: require_cuda throws
#endif
}

AllocatorStats device_allocator_stats(int device_index) {
#if KRAKEN_WITH_CUDA
  if (cuda_available()) return device_instance(device_index).stats();
#endif
  (void)device_index;
  return {};
}

void set_device_memory_limit(const Device& device, int64_t bytes) {
  KRAKEN_CHECK(device.is_cuda(), "set_device_memory_limit: ", device.str(), " is not a GPU");
  KRAKEN_CHECK(bytes >= 0, "set_device_memory_limit: ", bytes, " bytes");
  require_cuda(device.index);
#if KRAKEN_WITH_CUDA
  device_instance(device.index).set_limit(bytes);
#endif
}

void release_cached_memory(const Device& device) {
  if (device.is_cpu()) return;
  require_cuda(device.index);
#if KRAKEN_WITH_CUDA
  device_instance(device.index).release_cached();
#endif
}

void reset_peak_bytes_in_use(const Device& device) {
  if (device.is_cpu()) {
    host_instance().reset_peak();
    return;
  }
  require_cuda(device.index);
#if KRAKEN_WITH_CUDA
  device_instance(device.index).reset_peak();
#endif
}

Allocator& allocator_for(const Device& device) {
  return device.is_cpu() ? host_allocator() : device_allocator(device.index);
}

bool cuda_available(std::string* why_not) {
#if KRAKEN_WITH_CUDA
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    // Without a driver this is error 35 (insufficient driver), not "0 devices".
    if (why_not) *why_not = std::string("no usable GPU: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
    (void)cudaGetLastError();
    return false;
  }
  if (count == 0) {
    if (why_not) *why_not = "no GPU found (cudaGetDeviceCount returned 0)";
    return false;
  }
  return true;
#else
  if (why_not) *why_not = "this build has no CUDA (configure with -DKRAKEN_CUDA=ON)";
  return false;
#endif
}

int cuda_device_count() {
#if KRAKEN_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

std::string cuda_device_name(int device_index) {
#if KRAKEN_WITH_CUDA
  if (device_index < 0 || device_index >= cuda_device_count()) return "";
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device_index) != cudaSuccess) {
    (void)cudaGetLastError();
    return "";
  }
  return prop.name;
#else
  (void)device_index;
  return "";
#endif
}

CUstream_st* compute_stream(const Device& device) {
  (void)device;
  return nullptr;  // the legacy default stream; the CUDA backend gives each device its own streams
}

namespace {
std::atomic<uint64_t> g_copies{0}, g_copied_bytes{0}, g_fills{0}, g_zeroed_bytes{0};

void count_copy(const Device& dst_device, const Device& src_device, size_t bytes) {
  if (dst_device != src_device) return;
  g_copies.fetch_add(1, std::memory_order_relaxed);
  g_copied_bytes.fetch_add(bytes, std::memory_order_relaxed);
}
}  // namespace

MemoryTraffic memory_traffic() {
  MemoryTraffic t;
  t.copies = g_copies.load(std::memory_order_relaxed);
  t.copied_bytes = g_copied_bytes.load(std::memory_order_relaxed);
  t.fills = g_fills.load(std::memory_order_relaxed);
  t.zeroed_bytes = g_zeroed_bytes.load(std::memory_order_relaxed);
  t.host_waits = g_host_waits.load(std::memory_order_relaxed);
  return t;
}

MemoryTraffic operator-(const MemoryTraffic& later, const MemoryTraffic& earlier) {
  MemoryTraffic d;
  d.copies = later.copies - earlier.copies;
  d.copied_bytes = later.copied_bytes - earlier.copied_bytes;
  d.fills = later.fills - earlier.fills;
  d.zeroed_bytes = later.zeroed_bytes - earlier.zeroed_bytes;
  d.host_waits = later.host_waits - earlier.host_waits;
  return d;
}

void copy_bytes(void* dst, const Device& dst_device, const void* src, const Device& src_device, size_t bytes) {
  if (bytes == 0) return;
  count_copy(dst_device, src_device, bytes);
  if (dst_device.is_cpu() && src_device.is_cpu()) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if KRAKEN_WITH_CUDA
  const Device& on = dst_device.is_cuda() ? dst_device : src_device;
  if (dst_device.is_cuda() && src_device.is_cuda() && dst_device.index != src_device.index) {
    // The source's queued work is on its own device's stream, which the copy below (on the destination's)
    // is not ordered after.
    g_host_waits.fetch_add(1, std::memory_order_relaxed);
    KRAKEN_RT_CUDA_CHECK(cudaSetDevice(src_device.index));
    KRAKEN_RT_CUDA_CHECK(cudaStreamSynchronize(compute_stream(src_device)));
  }
  KRAKEN_RT_CUDA_CHECK(cudaSetDevice(on.index));
  cudaStream_t stream = compute_stream(on);
  if (src_device.is_cpu() && bytes <= kStagedUploadLimit) {
    upload_staging().upload(dst, src, bytes, on.index, stream);  // staged: the caller may reuse src at once
    return;
  }
  KRAKEN_RT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream));
  // Within one GPU the stream orders the copy before every later use. Any other copy waits: one to the
  // host because the caller reads the host side next; a large one from the host because the caller may
  // reuse its buffer (a pageable source is staged by the time cudaMemcpyAsync returns, but a pinned one
  // is read by the DMA later); one between GPUs because the other device's work is not on this stream.
  const bool within_one_gpu = dst_device.is_cuda() && src_device.is_cuda() && dst_device.index == src_device.index;
  if (!within_one_gpu) {
    g_host_waits.fetch_add(1, std::memory_order_relaxed);
    KRAKEN_RT_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
#else
  KRAKEN_THROW("copy between ", src_device.str(), " and ", dst_device.str(), ": this build has no CUDA");
#endif
}

void copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t height,
             const Device& device) {
  if (width == 0 || height == 0) return;
  count_copy(device, device, width * height);
  if (device.is_cpu()) {
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
#pragma omp parallel for if (width * height > (1u << 20))
    for (size_t row = 0; row < height; ++row) std::memcpy(d + row * dst_pitch, s + row * src_pitch, width);
    return;
  }
#if KRAKEN_WITH_CUDA
  KRAKEN_RT_CUDA_CHECK(cudaSetDevice(device.index));
  KRAKEN_RT_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height, cudaMemcpyDeviceToDevice,
                                         compute_stream(device)));
#else
  KRAKEN_THROW("copy_2d on ", device.str(), ": this build has no CUDA");
#endif
}

void zero_bytes(void* dst, const Device& device, size_t bytes) {
  if (bytes == 0) return;
  g_fills.fetch_add(1, std::memory_order_relaxed);
  g_zeroed_bytes.fetch_add(bytes, std::memory_order_relaxed);
  if (device.is_cpu()) {
    std::memset(dst, 0, bytes);
    return;
  }
#if KRAKEN_WITH_CUDA
  KRAKEN_RT_CUDA_CHECK(cudaSetDevice(device.index));
  KRAKEN_RT_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, compute_stream(device)));
#else
  KRAKEN_THROW("zero_bytes on ", device.str(), ": this build has no CUDA");
#endif
}

void synchronize(const Device& device) {
#if KRAKEN_WITH_CUDA
  if (device.is_cuda()) {
    KRAKEN_RT_CUDA_CHECK(cudaSetDevice(device.index));
    KRAKEN_RT_CUDA_CHECK(cudaStreamSynchronize(compute_stream(device)));
  }
#else
  (void)device;
#endif
}

}  // namespace kraken::runtime
