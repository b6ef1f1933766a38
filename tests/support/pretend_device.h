// A pretend device for the device allocator's pool (runtime/block_pool.h): segments are address ranges
// counted against a capacity, never read or written, so the pool's bookkeeping runs on the CPU as it
// does over cudaMalloc — and "out of memory" happens exactly when the capacity is reached.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>

#include "runtime/block_pool.h"

namespace kraken::testing {

class PretendDevice {
 public:
  explicit PretendDevice(size_t capacity) : capacity_(capacity) {}
  ~PretendDevice() = default;

  runtime::BlockPool::Backing backing() {
    return {[this](size_t bytes) { return obtain(bytes); }, [this](void* p, size_t bytes) { give_back(p, bytes); }};
  }
  size_t used() const { return used_; }
  int64_t obtained() const { return obtained_; }

 private:
  void* obtain(size_t bytes) {
    if (used_ + bytes > capacity_) return nullptr;
    // Addresses never reused and 2 MiB apart at least, as a driver's segments are (the pool may not
    // assume two segments touch: it never merges across them).
    const uintptr_t at = next_;
    next_ += (bytes + (size_t{2} << 20) - 1) / (size_t{2} << 20) * (size_t{2} << 20) + (size_t{2} << 20);
    used_ += bytes;
    obtained_ += 1;
    live_[at] = bytes;
    return reinterpret_cast<void*>(at);
  }
  void give_back(void* p, size_t bytes) {
    auto it = live_.find(reinterpret_cast<uintptr_t>(p));
    if (it == live_.end() || it->second != bytes) std::abort();  // the pool gave back what it never got
    used_ -= bytes;
    live_.erase(it);
  }
  size_t capacity_;
  size_t used_ = 0;
  int64_t obtained_ = 0;
  uintptr_t next_ = uintptr_t{1} << 40;
  std::map<uintptr_t, size_t> live_;
};

}  // namespace kraken::testing
