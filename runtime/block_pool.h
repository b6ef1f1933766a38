// The device allocator's bookkeeping, apart from CUDA so that the CPU tests can drive it.
//
// Memory comes from the driver in segments (one cudaMalloc each) and goes out in blocks carved from them:
// a request takes the smallest free block that holds it (best fit) and splits off the rest when the rest
// is worth keeping; a released block merges with its free neighbours (once no request of its size has
// taken it back: deallocate() says why). The allocator before it kept one
// free list per exact size and never split: near the device's capacity a step's other sizes found the
// cache full of blocks they could not use, it gave everything back to the driver (cudaFree synchronises
// the device) and the rest of the step allocated it all again, every step.
//
// Policy. Requests round up to 512 B; those of at most 1 MiB share 2 MiB segments of their own (small
// tensors do not pin large segments), those up to 10 MiB share 20 MiB segments (or take one of their own
// size where 20 MiB do not fit), larger ones get a segment of their size rounded to 2 MiB — the numbers
// PyTorch's caching allocator uses, not re-tuned here. A large request takes a free block outright when
// less than 20 MiB would be left; otherwise it asks the driver for its own segment, and when the driver
// has no room it splits a free block that is a segment's tail or less than twice the request, else gives
// whole free segments back (the smallest that makes room, else the largest first until enough has; then
// all) and asks again. Why not split a whole segment far larger than the request: allocate() says.
// Measured on a training step's recorded allocations (tests/train/allocation_pattern_test.cpp): at 20%
// more memory than the step's peak it stops calling the driver from the fourth step, where the exact-size
// cache calls it ~60 times a step; at 1% it still runs, with fewer driver calls (18 and 29 a step at
// degrees 1 and 4, against 35 and 47).
//
// Not thread-safe: the device allocator holds its lock around every call. Blocks are reused as soon as
// they are released: every kernel runs on the device's one compute stream, which orders a block's next
// user after its last (a tensor the communication stream reads is kept alive until it has: parallel/).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <set>
#include <unordered_map>
#include <vector>

#include "runtime/allocator.h"

namespace kraken::runtime {

class BlockPool {
 public:
  // Where segments come from: `obtain` returns nullptr when the device has no room (the error cleared);
  // `give_back` returns a segment obtained before, whole.
  struct Backing {
    std::function<void*(size_t bytes)> obtain;
    std::function<void(void* segment, size_t bytes)> give_back;
  };

  static constexpr size_t kRound = 512;
  static constexpr size_t kSmallRequest = size_t{1} << 20;   // at most this: the small segments
  static constexpr size_t kSmallSegment = size_t{2} << 20;
  static constexpr size_t kMediumRequest = size_t{10} << 20;  // below this: shared 20 MiB segments
  static constexpr size_t kMediumSegment = size_t{20} << 20;
  static constexpr size_t kLargeRound = size_t{2} << 20;
  static constexpr size_t kLargeSplitRest = size_t{1} << 20;  // a large block splits when more is left

  explicit BlockPool(Backing backing);
  // Gives every free segment back; one with a block still in use (a caller's leak) stays with the driver.
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  // The size a request of `bytes` is served with (and counted in bytes_in_use as, when not split further).
  static size_t round(size_t bytes);

  // A block of at least `bytes`; nullptr when even after giving every free segment back the driver has
  // no room for it (nothing has changed but the cache: the caller reports the error).
  void* allocate(size_t bytes);
  // Releases a block from allocate(); anything else is an error (kraken::Error naming the pointer).
  // The block waits, unmerged, in a list of the size it was asked for, and the next request of that
  // size takes it back: a training step asks for the same sizes every step, and merging each block
  // when released and splitting it again costs ~8 times as much host time (bench/block_pool_bench.cpp).
  // A request no list serves merges every released block first (coalesce), so it sees all the free
  // memory there is (tests/train/allocation_pattern_test.cpp's replay makes the same driver calls as
  // with every block merged at once).
  void deallocate(void* ptr);
  // Merges every block released since the last time with its free neighbours, into the free sets.
  void coalesce();
  // Every segment with no block in use back to the driver; the bytes given back.
  int64_t release_free_segments();
  // The fewest such segments that make room for `bytes` in the driver (for memory taken beside the pool):
  // the smallest that alone does, else the largest ones until their sum does; the bytes given back.
  int64_t make_room(size_t bytes);

  // system_allocations / system_releases count the segments obtained and given back.
  AllocatorStats stats() const { return stats_; }
  void reset_peak() { stats_.peak_bytes_in_use = stats_.bytes_in_use; }
  // The size of the largest free block among those merged (tests, diagnostics: coalesce() first for all),
  // and how many segments are held.
  size_t largest_free_block() const;
  int64_t segments() const { return segments_; }
  // Walks every segment and checks what the pool believes of them: blocks tile each segment in address
  // order, no two free blocks are neighbours, the free sets hold exactly the free blocks, the counters
  // match. Throws kraken::Error saying which does not hold. For tests.
  void check_consistency() const;

 private:
  struct Block {
    char* ptr = nullptr;
    size_t size = 0;
    size_t requested = 0;   // the rounded size it was last handed out for (its released list's key)
    bool free = true;
    bool released = false;  // in a released list: not in use, not yet merged (free stays false)
    bool small = false;     // from a small segment (the two kinds never mix)
    Block* prev = nullptr;  // neighbours within the segment, by address; none at its ends
    Block* next = nullptr;
  };
  struct BySizeThenAddress {
    bool operator()(const Block* a, const Block* b) const {
      return a->size != b->size ? a->size < b->size : a->ptr < b->ptr;
    }
  };
  using FreeSet = std::set<Block*, BySizeThenAddress>;

  FreeSet& free_set(bool small) { return small ? free_small_ : free_large_; }
  // A segment for a block of `size`; with may_give_back, free segments go back to the driver when it refuses.
  Block* new_segment(size_t size, bool small, bool may_give_back);
  // Joins `second`, the free block after `first` (neither in a free set), into `first`.
  static void absorb(Block* first, Block* second);
  // A free block (out of any free set) merged with its free neighbours and put in its free set.
  void merge_free(Block* block);
  // Outside the released lists: the free block that serves `size` without the driver (any fit for a
  // small request, one leaving < 20 MiB for a large one), taken out of its set; else nullptr and, in
  // `fit`, the best fit there is (or nullptr).
  Block* take_close_fit(size_t size, bool small, Block** fit);
  std::vector<Block*> whole_free_segments() const;  // free blocks that span their segment
  int64_t give_back_whole(Block* block);             // one of those back to the driver

  Backing backing_;
  FreeSet free_small_, free_large_;
  std::unordered_map<const void*, Block*> in_use_;  // handed out, or released and not yet merged
  std::unordered_map<size_t, std::vector<Block*>> released_;  // by the rounded size they were asked for
  int64_t released_blocks_ = 0;
  AllocatorStats stats_;
  int64_t segments_ = 0;
};

}  // namespace kraken::runtime
