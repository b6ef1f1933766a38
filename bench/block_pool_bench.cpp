// The device allocator's host cost (runtime/block_pool.h) in a steady state: each iteration is a
// training step's worth of requests — a forward that allocates activations layer by layer, a backward
// that frees them in reverse while allocating and freeing gradients — served from the cached segments
// (the first iteration's segments; no driver call afterwards, as the benchmark checks). The pool runs over
// a pretend device (address ranges, never touched), so the time is the bookkeeping alone: what a step
// adds to the host's issue time, which bounds the GPU at small batches.
//   build/bin/block_pool_bench
#include <benchmark/benchmark.h>

#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "runtime/block_pool.h"

namespace {

using kraken::runtime::BlockPool;

// Segments at increasing addresses, never given back here; `obtained` counts them.
BlockPool::Backing pretend_backing(int64_t* obtained) {
  auto next = std::make_shared<uintptr_t>(uintptr_t{1} << 40);
  return {[next, obtained](size_t bytes) {
            void* p = reinterpret_cast<void*>(*next);
            *next += (bytes + (size_t{4} << 20)) & ~((size_t{2} << 20) - 1);
            *obtained += 1;
            return p;
          },
          [](void*, size_t) {}};
}

// GPT-2-like sizes at B·T = 8·1024 in bf16: per layer ~12 activations of (N, C)..(N, 4C) and a few small.
std::vector<size_t> layer_sizes() {
  const size_t N = 8 * 1024, C = 768, bf16 = 2, f32 = 4;
  return {N * C * bf16, N * f32,     N * f32,         N * 3 * C * bf16, N * C * bf16, N * 12 * f32, N * C * bf16,
          N * C * bf16, N * f32,     N * f32,         N * 4 * C * bf16, N * 4 * C * bf16, N * C * bf16, 3 * C * f32};
}

// The allocator the pool replaced, for its host cost: one free list per rounded size (512 B below 1 MiB,
// 2 MiB above), never split.
class ExactSizeCache {
 public:
  explicit ExactSizeCache(BlockPool::Backing backing) : backing_(std::move(backing)) {}
  static size_t round(size_t bytes) {
    const size_t unit = bytes < (size_t{1} << 20) ? 512 : (size_t{2} << 20);
    return (bytes + unit - 1) / unit * unit;
  }
  void* allocate(size_t bytes) {
    auto& list = free_[round(bytes)];
    if (list.empty()) return backing_.obtain(round(bytes));
    void* p = list.back();
    list.pop_back();
    return p;
  }
  void deallocate(void* p, size_t bytes) { free_[round(bytes)].push_back(p); }

 private:
  BlockPool::Backing backing_;
  std::map<size_t, std::vector<void*>> free_;
};

struct PoolWithSizes {
  int64_t obtained = 0;
  BlockPool pool{pretend_backing(&obtained)};
  void* allocate(size_t bytes) { return pool.allocate(bytes); }
  void deallocate(void* p, size_t) { pool.deallocate(p); }
};

// The pool with every block merged as it is released (no released lists).
struct PoolMergingAtOnce {
  int64_t obtained = 0;
  BlockPool pool{pretend_backing(&obtained)};
  void* allocate(size_t bytes) { return pool.allocate(bytes); }
  void deallocate(void* p, size_t) {
    pool.deallocate(p);
    pool.coalesce();
  }
};

struct CacheWithSizes {
  int64_t obtained = 0;
  ExactSizeCache cache{pretend_backing(&obtained)};
  void* allocate(size_t bytes) { return cache.allocate(bytes); }
  void deallocate(void* p, size_t bytes) { cache.deallocate(p, bytes); }
};

template <typename Allocator>
void BM_TrainingStep(benchmark::State& state) {
  const int layers = static_cast<int>(state.range(0));
  Allocator a;
  const std::vector<size_t> sizes = layer_sizes();
  const size_t logits_bytes = size_t{8} * 1024 * 50304 * 2;
  std::vector<std::pair<void*, size_t>> saved;
  int64_t requests = 0;
  auto step = [&] {
    for (int l = 0; l < layers; ++l)
      for (size_t s : sizes) saved.emplace_back(a.allocate(s), s);
    void* logits = a.allocate(logits_bytes);
    for (int l = layers - 1; l >= 0; --l) {
      // A layer's backward: gradients of its activations come and go; its saved activations go.
      void* grad_out = a.allocate(sizes[0]);
      void* grad_mid = a.allocate(sizes[10]);
      a.deallocate(grad_mid, sizes[10]);
      for (size_t k = 0; k < sizes.size(); ++k) {
        a.deallocate(saved.back().first, saved.back().second);
        saved.pop_back();
      }
      a.deallocate(grad_out, sizes[0]);
    }
    a.deallocate(logits, logits_bytes);
    requests += static_cast<int64_t>(layers) * static_cast<int64_t>(sizes.size() + 2) + 1;
  };
  step();  // the segments
  requests = 0;
  const int64_t segments = a.obtained;
  for (auto _ : state) step();
  if (a.obtained != segments) state.SkipWithError("a steady-state step asked the driver");
  state.SetItemsProcessed(requests);  // allocate + deallocate pairs
  state.counters["segments"] = static_cast<double>(segments);
}
BENCHMARK_TEMPLATE(BM_TrainingStep, PoolWithSizes)->Arg(12)->Arg(48);
BENCHMARK_TEMPLATE(BM_TrainingStep, PoolMergingAtOnce)->Arg(12)->Arg(48);
BENCHMARK_TEMPLATE(BM_TrainingStep, CacheWithSizes)->Arg(12)->Arg(48);

}  // namespace
