#include "runtime/block_pool.h"

#include <algorithm>
#include <vector>

#include "kernels/error.h"

namespace kraken::runtime {

BlockPool::BlockPool(Backing backing) : backing_(std::move(backing)) {}

BlockPool::~BlockPool() {
  release_free_segments();  // (released blocks merged first)
  // Segments with blocks still in use (a caller's leak) stay with the driver; every record goes.
  for (auto& [ptr, block] : in_use_) delete block;
  for (FreeSet* set : {&free_small_, &free_large_})
    for (Block* block : *set) delete block;
}

size_t BlockPool::round(size_t bytes) {
  if (bytes == 0) bytes = 1;
  return (bytes + kRound - 1) / kRound * kRound;
}

size_t BlockPool::largest_free_block() const {
  size_t largest = 0;
  if (!free_small_.empty()) largest = (*free_small_.rbegin())->size;
  if (!free_large_.empty()) largest = std::max(largest, (*free_large_.rbegin())->size);
  return largest;
}

void* BlockPool::allocate(size_t bytes) {
  const size_t size = round(bytes);
  if (auto q = released_.find(size); q != released_.end() && !q->second.empty()) {  // as released: the fast path
    Block* block = q->second.back();
    q->second.pop_back();
    released_blocks_ -= 1;
    block->released = false;
    stats_.bytes_in_use += static_cast<int64_t>(block->size);
    stats_.peak_bytes_in_use = std::max(stats_.peak_bytes_in_use, stats_.bytes_in_use);
    return block->ptr;
  }
  // A size not released since the last merge: every released block merges first, so the request sees
  // all the free memory there is, as if each had merged when released.
  coalesce();
  const bool small = size <= kSmallRequest;
  Block* fit = nullptr;
  Block* block = take_close_fit(size, small, &fit);
  if (!block) {
    // Nothing free fits closely: a segment of the request's own from the driver, while it has room.
    // When it has none, a free block is split only where what is left could not go back to the driver
    // anyway (a tail of a segment partly in use), or is smaller than the request. A whole free segment
    // at least twice the request goes back instead, and the request's own segment comes (new_segment
    // gives back): the same memory, but what is left is the driver's again, free to become any segment —
    // split off, it would stay pinned behind the request's block for as long as that lives (a tensor
    // that outlives the step, the optimizer's moments made in the first one, would keep half the
    // logits' segment from the next step: tests/train/allocation_pattern_test.cpp ran out of memory so).
    block = new_segment(size, small, /*may_give_back=*/false);
    const bool whole_segment = fit && !fit->prev && !fit->next;
    if (!block && fit && (!whole_segment || fit->size - size < size)) {
      block = fit;
      free_set(small).erase(fit);
    }
    if (!block) block = new_segment(size, small, /*may_give_back=*/true);
    if (!block) return nullptr;
  }
  const size_t rest = block->size - size;
  if (rest >= (small ? kRound : kLargeSplitRest + 1)) {
    auto* tail = new Block;
    tail->ptr = block->ptr + size;
    tail->size = rest;
    tail->small = small;
    tail->prev = block;
    tail->next = block->next;
    if (block->next) block->next->prev = tail;
    block->next = tail;
    block->size = size;
    free_set(small).insert(tail);
  }
  block->free = false;
  block->requested = size;
  in_use_.emplace(block->ptr, block);
  stats_.bytes_in_use += static_cast<int64_t>(block->size);
  stats_.peak_bytes_in_use = std::max(stats_.peak_bytes_in_use, stats_.bytes_in_use);
  return block->ptr;
}

BlockPool::Block* BlockPool::take_close_fit(size_t size, bool small, Block** fit) {
  FreeSet& free = free_set(small);
  Block key;
  key.size = size;  // with a null address: the first block of at least this size
  auto it = free.lower_bound(&key);
  *fit = it != free.end() ? *it : nullptr;
  if (!*fit || (!small && (*fit)->size - size >= kMediumSegment)) return nullptr;
  free.erase(it);
  return *fit;
}

void BlockPool::absorb(Block* first, Block* second) {
  first->size += second->size;
  first->next = second->next;
  if (first->next) first->next->prev = first;
  delete second;
}

void BlockPool::deallocate(void* ptr) {
  auto it = in_use_.find(ptr);
  KRAKEN_CHECK(it != in_use_.end() && !it->second->released, "device allocator: ", ptr,
               " was not allocated here or was released already");
  Block* block = it->second;
  block->released = true;
  released_[block->requested].push_back(block);
  released_blocks_ += 1;
  stats_.bytes_in_use -= static_cast<int64_t>(block->size);
}

void BlockPool::coalesce() {
  if (released_blocks_ == 0) return;
  for (auto& [size, blocks] : released_) {
    for (Block* block : blocks) {
      in_use_.erase(block->ptr);
      block->released = false;
      merge_free(block);
    }
  }
  released_.clear();  // (sizes not asked for again do not stay: the next coalesce visits only new ones)
  released_blocks_ = 0;
}

void BlockPool::merge_free(Block* block) {
  block->free = true;
  FreeSet& free = free_set(block->small);
  if (Block* next = block->next; next && next->free) {
    free.erase(next);
    absorb(block, next);
  }
  if (Block* prev = block->prev; prev && prev->free) {
    free.erase(prev);
    absorb(prev, block);
    block = prev;
  }
  free.insert(block);
}

BlockPool::Block* BlockPool::new_segment(size_t size, bool small, bool may_give_back) {
  const size_t own = (size + kLargeRound - 1) / kLargeRound * kLargeRound;
  size_t segment = small ? kSmallSegment : size < kMediumRequest ? kMediumSegment : own;
  void* ptr = backing_.obtain(segment);
  if (!ptr && !small && segment != own) {  // no room for a shared segment: one of this block's size
    segment = own;
    ptr = backing_.obtain(segment);
  }
  if (!ptr && may_give_back) {  // the fewest free segments first, then all of them
    make_room(segment);
    ptr = backing_.obtain(segment);
    if (!ptr && release_free_segments() > 0) ptr = backing_.obtain(segment);
  }
  if (!ptr) return nullptr;
  auto* block = new Block;
  block->ptr = static_cast<char*>(ptr);
  block->size = segment;
  block->small = small;
  stats_.bytes_reserved += static_cast<int64_t>(segment);
  stats_.system_allocations += 1;
  segments_ += 1;
  return block;
}

int64_t BlockPool::give_back_whole(Block* block) {
  free_set(block->small).erase(block);
  const auto size = static_cast<int64_t>(block->size);
  backing_.give_back(block->ptr, block->size);
  delete block;
  stats_.bytes_reserved -= size;
  stats_.system_releases += 1;
  segments_ -= 1;
  return size;
}

int64_t BlockPool::make_room(size_t bytes) {
  coalesce();
  std::vector<Block*> whole = whole_free_segments();
  std::sort(whole.begin(), whole.end(), [](const Block* a, const Block* b) { return a->size < b->size; });
  auto enough = std::find_if(whole.begin(), whole.end(), [&](const Block* b) { return b->size >= bytes; });
  if (enough != whole.end()) return give_back_whole(*enough);
  int64_t released = 0;
  for (auto it = whole.rbegin(); it != whole.rend() && released < static_cast<int64_t>(bytes); ++it)
    released += give_back_whole(*it);
  return released;
}

int64_t BlockPool::release_free_segments() {
  coalesce();
  int64_t released = 0;
  for (Block* b : whole_free_segments()) released += give_back_whole(b);
  return released;
}

std::vector<BlockPool::Block*> BlockPool::whole_free_segments() const {
  std::vector<Block*> whole;
  for (const FreeSet* set : {&free_small_, &free_large_})
    for (Block* b : *set)
      if (!b->prev && !b->next) whole.push_back(b);
  return whole;
}

void BlockPool::check_consistency() const {
  // Every segment, found from its first block: free ones from the sets, used ones from in_use_.
  std::vector<const Block*> firsts;
  size_t free_blocks = 0;
  for (const FreeSet* set : {&free_small_, &free_large_}) {
    for (const Block* b : *set) {
      KRAKEN_CHECK(b->free, "block ", static_cast<const void*>(b->ptr), " is in a free set but in use");
      KRAKEN_CHECK(b->small == (set == &free_small_), "block ", static_cast<const void*>(b->ptr), " in the wrong set");
      if (!b->prev) firsts.push_back(b);
      free_blocks += 1;
    }
  }
  int64_t released = 0;
  for (const auto& [ptr, b] : in_use_) {
    KRAKEN_CHECK(!b->free && b->ptr == ptr, "in-use record of ", ptr, " disagrees with its block");
    if (!b->prev) firsts.push_back(b);
    if (b->released) released += 1;
  }
  int64_t listed = 0;
  for (const auto& [size, blocks] : released_) {
    for (const Block* b : blocks) {
      KRAKEN_CHECK(b->released && b->requested == size && b->size >= size, "released block ",
                   static_cast<const void*>(b->ptr), " in the list of ", size, " bytes");
      listed += 1;
    }
  }
  KRAKEN_CHECK(released == listed && listed == released_blocks_, released, " blocks released, ", listed,
               " listed, ", released_blocks_, " counted");
  int64_t reserved = 0, in_use = 0;
  size_t blocks = 0, free_seen = 0;
  for (const Block* first : firsts) {
    for (const Block* b = first; b; b = b->next) {
      blocks += 1;
      KRAKEN_CHECK(b->size > 0 && b->size % kRound == 0, "block ", static_cast<const void*>(b->ptr), " of ",
                   b->size, " bytes");
      KRAKEN_CHECK(b->small == first->small, "segment at ", static_cast<const void*>(first->ptr), " mixes kinds");
      if (b->next) {
        KRAKEN_CHECK(b->next->prev == b && b->next->ptr == b->ptr + b->size, "segment at ",
                     static_cast<const void*>(first->ptr), ": blocks do not tile it");
        KRAKEN_CHECK(!(b->free && b->next->free), "two free neighbours at ", static_cast<const void*>(b->ptr));
      }
      reserved += static_cast<int64_t>(b->size);
      if (b->free) free_seen += 1;
      else if (!b->released) in_use += static_cast<int64_t>(b->size);
    }
  }
  KRAKEN_CHECK(static_cast<int64_t>(firsts.size()) == segments_, firsts.size(), " segments found, ", segments_,
               " counted");
  KRAKEN_CHECK(blocks == free_blocks + in_use_.size() && free_seen == free_blocks,
               "blocks reachable from the segments differ from those recorded");
  KRAKEN_CHECK(reserved == stats_.bytes_reserved, "segments hold ", reserved, " bytes, counted ",
               stats_.bytes_reserved);
  KRAKEN_CHECK(in_use == stats_.bytes_in_use, "blocks in use hold ", in_use, " bytes, counted ", stats_.bytes_in_use);
}

}  // namespace kraken::runtime

