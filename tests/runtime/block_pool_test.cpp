// The device allocator's pool (runtime/block_pool.h) on a pretend device: segments are address ranges
// counted against a capacity, never touched, so the pool's splitting, merging and giving back run on the
// CPU exactly as they do over cudaMalloc. tests/train/allocation_pattern_test.cpp replays a training
// step through it; tests/gpu/model_cuda_test.cpp checks the real allocator on a GPU.
#include "runtime/block_pool.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <random>
#include <vector>

#include "kernels/error.h"
#include "tests/support/pretend_device.h"

namespace kraken::runtime {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

TEST(BlockPool, SmallRequestsShareOneSegmentAndMergeBackIntoIt) {
  testing::PretendDevice device(64 * kMiB);
  BlockPool pool(device.backing());
  void* a = pool.allocate(1000);  // 1024
  void* b = pool.allocate(100);   // 512
  void* c = pool.allocate(kMiB);  // the largest small request
  EXPECT_EQ(pool.stats().system_allocations, 1);
  EXPECT_EQ(pool.stats().bytes_reserved, static_cast<int64_t>(BlockPool::kSmallSegment));
  EXPECT_EQ(pool.stats().bytes_in_use, static_cast<int64_t>(1024 + 512 + kMiB));
  EXPECT_EQ(static_cast<char*>(b), static_cast<char*>(a) + 1024);  // carved in order from the segment's start
  EXPECT_EQ(static_cast<char*>(c), static_cast<char*>(b) + 512);
  pool.check_consistency();
  pool.deallocate(b);
  EXPECT_EQ(pool.allocate(200), b);  // the same rounded size: straight from its released list
  pool.deallocate(b);  // a hole between two blocks in use
  pool.deallocate(a);
  pool.check_consistency();
  pool.coalesce();  // a merges with the hole (allocate does this before it would ask the driver)
  pool.check_consistency();
  EXPECT_EQ(pool.allocate(1500), a);  // best fit: the 1536-byte hole, not the tail
  pool.deallocate(a);
  pool.deallocate(c);
  pool.coalesce();  // everything merges back into the one segment
  pool.check_consistency();
  EXPECT_EQ(pool.largest_free_block(), BlockPool::kSmallSegment);
  EXPECT_EQ(pool.stats().bytes_in_use, 0);
  EXPECT_EQ(pool.release_free_segments(), static_cast<int64_t>(BlockPool::kSmallSegment));
  EXPECT_EQ(device.used(), 0u);
  EXPECT_EQ(pool.stats().system_releases, 1);
}

TEST(BlockPool, ReleasedBlocksWaitForTheirSizeAndMergeBeforeTheDriverIsAsked) {
  testing::PretendDevice device(100 * kMiB);
  BlockPool pool(device.backing());
  void* a = pool.allocate(64 * kMiB);
  pool.deallocate(a);
  EXPECT_EQ(pool.stats().bytes_in_use, 0);
  EXPECT_EQ(pool.largest_free_block(), 0u);  // released, not merged yet
  pool.check_consistency();
  EXPECT_EQ(pool.allocate(64 * kMiB - 100), a);  // the same rounded size: as released
  pool.deallocate(a);
  // Another size: nothing merged fits, so the released blocks merge before the driver would be asked,
  // and 50 MiB fits the 64 closely (14 MiB left, split off).
  void* b = pool.allocate(50 * kMiB);
  EXPECT_EQ(b, a);
  EXPECT_EQ(pool.stats().system_allocations, 1);
  EXPECT_EQ(pool.largest_free_block(), 14 * kMiB);
  pool.check_consistency();
  pool.deallocate(b);
  EXPECT_THROW(pool.deallocate(b), Error);  // released twice, before merging
  EXPECT_EQ(pool.release_free_segments(), static_cast<int64_t>(64 * kMiB));  // merged first
  pool.check_consistency();
}

TEST(BlockPool, SegmentSizesFollowTheRequest) {
  testing::PretendDevice device(1024 * kMiB);
  BlockPool pool(device.backing());
  void* medium = pool.allocate(3 * kMiB);  // a shared 20 MiB segment
  EXPECT_EQ(device.used(), BlockPool::kMediumSegment);
  void* medium2 = pool.allocate(5 * kMiB);  // from the same segment
  EXPECT_EQ(pool.segments(), 1);
  void* large = pool.allocate(33 * kMiB + 1);  // its own segment, rounded to 2 MiB
  EXPECT_EQ(device.used(), BlockPool::kMediumSegment + 34 * kMiB);
  void* small = pool.allocate(4096);  // small requests never take from large segments
  EXPECT_EQ(pool.segments(), 3);
  pool.check_consistency();
  for (void* p : {medium, medium2, large, small}) pool.deallocate(p);
  pool.check_consistency();
  EXPECT_EQ(pool.segments(), 3);  // cached, not given back
  EXPECT_EQ(pool.release_free_segments(), static_cast<int64_t>(device.used()));
  EXPECT_EQ(device.used(), 0u);
}

TEST(BlockPool, LargeBlocksSplitOnlyWhenMoreThanOneMebibyteIsLeft) {
  testing::PretendDevice device(1024 * kMiB);
  BlockPool pool(device.backing());
  void* big = pool.allocate(64 * kMiB);
  pool.deallocate(big);
  void* almost = pool.allocate(63 * kMiB);  // 1 MiB left: not worth a block of its own
  EXPECT_EQ(almost, big);
  EXPECT_EQ(pool.stats().bytes_in_use, static_cast<int64_t>(64 * kMiB));
  pool.deallocate(almost);
  void* part = pool.allocate(62 * kMiB - 512);  // 2 MiB + 512 left: split
  EXPECT_EQ(pool.stats().bytes_in_use, static_cast<int64_t>(62 * kMiB - 512));
  void* rest = pool.allocate(2 * kMiB);  // from the split-off tail, no new segment
  EXPECT_EQ(static_cast<char*>(rest), static_cast<char*>(part) + 62 * kMiB - 512);
  EXPECT_EQ(pool.stats().system_allocations, 1);
  pool.check_consistency();
  pool.deallocate(part);
  pool.deallocate(rest);
  pool.coalesce();
  EXPECT_EQ(pool.largest_free_block(), 64 * kMiB);
  pool.check_consistency();
}

TEST(BlockPool, BestFitTakesTheSmallestFreeBlockThatHoldsTheRequest) {
  testing::PretendDevice device(1024 * kMiB);
  BlockPool pool(device.backing());
  void* a = pool.allocate(40 * kMiB);
  void* b = pool.allocate(12 * kMiB);
  void* c = pool.allocate(24 * kMiB);
  pool.deallocate(a);
  pool.deallocate(b);
  pool.deallocate(c);
  EXPECT_EQ(pool.allocate(20 * kMiB), c);  // 24 MiB is the tightest fit; 40 would also hold it
  EXPECT_EQ(pool.allocate(12 * kMiB), b);
  EXPECT_EQ(pool.allocate(30 * kMiB), a);
  EXPECT_EQ(pool.stats().system_allocations, 3);
}

TEST(BlockPool, AFullDeviceGetsBackTheFewestFreeSegmentsThatMakeRoom) {
  testing::PretendDevice device(95 * kMiB);
  BlockPool pool(device.backing());
  void* a = pool.allocate(30 * kMiB);
  void* b = pool.allocate(40 * kMiB);
  void* c = pool.allocate(20 * kMiB);
  void* kept = pool.allocate(4 * kMiB);  // a shared 20 MiB segment does not fit: one of its own 4 MiB
  EXPECT_EQ(device.used(), 94 * kMiB);
  EXPECT_EQ(pool.stats().system_releases, 0);
  pool.deallocate(a);
  pool.deallocate(b);
  pool.deallocate(c);
  // 70 MiB: no free segment makes room alone, so the largest go back first until enough has: 40 + 30.
  void* d = pool.allocate(70 * kMiB);
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(pool.stats().system_releases, 2);
  EXPECT_EQ(device.used(), 94 * kMiB);  // the 20 MiB segment stays cached
  pool.deallocate(d);
  // A small request needs a 2 MiB segment of its own kind: the smallest free segment that alone makes
  // room goes back (the 20), not the 70.
  void* small = pool.allocate(4096);
  ASSERT_NE(small, nullptr);
  EXPECT_EQ(pool.stats().system_releases, 3);
  EXPECT_EQ(device.used(), 76 * kMiB);
  EXPECT_EQ(pool.allocate(70 * kMiB), d);  // still cached
  pool.deallocate(d);
  pool.deallocate(small);
  pool.deallocate(kept);
  pool.check_consistency();
}

// With the driver out of room, a whole free segment at least twice the request goes back and the
// request gets its own (what is left stays the driver's, not pinned behind the new block); one less
// than twice the request is split.
TEST(BlockPool, AFullDeviceSplitsAWholeFreeSegmentOnlyWhenTheRequestIsMoreThanHalfOfIt) {
  testing::PretendDevice device(100 * kMiB);
  BlockPool pool(device.backing());
  void* big = pool.allocate(64 * kMiB);
  void* other = pool.allocate(30 * kMiB);
  pool.deallocate(big);
  EXPECT_EQ(device.used(), 94 * kMiB);
  void* quarter = pool.allocate(20 * kMiB);  // 64 ≥ 2 × 20: given back, 20 obtained
  EXPECT_NE(quarter, big);
  EXPECT_EQ(pool.stats().system_releases, 1);
  EXPECT_EQ(device.used(), 50 * kMiB);
  pool.deallocate(quarter);
  void* filler = pool.allocate(64 * kMiB);  // the free 20 goes back to make room: 30 + 64 in use
  EXPECT_EQ(device.used(), 94 * kMiB);
  EXPECT_EQ(pool.stats().system_releases, 2);
  pool.deallocate(filler);
  // 40 MiB: 24 would be left of the free 64, too much for a close fit, so the driver is asked first;
  // it has no room and 64 is less than twice 40: split, no segment given back or obtained.
  const int64_t obtained = device.obtained();
  void* most = pool.allocate(40 * kMiB);
  EXPECT_EQ(most, filler);
  EXPECT_EQ(pool.stats().system_releases, 2);
  EXPECT_EQ(device.obtained(), obtained);
  pool.check_consistency();
  pool.deallocate(most);
  pool.deallocate(other);
}

// What the kernels' reclaimer asks for when their own cudaMalloc fails (kernels/device_memory.h): room
// for its buffer from the fewest free segments; a segment with a block in use never goes.
TEST(BlockPool, MakingRoomGivesBackTheFewestFreeSegments) {
  testing::PretendDevice device(1024 * kMiB);
  BlockPool pool(device.backing());
  std::vector<void*> blocks;
  for (size_t mib : {10, 30, 50, 70}) blocks.push_back(pool.allocate(mib * kMiB));
  for (size_t i = 0; i < 3; ++i) pool.deallocate(blocks[i]);  // the 70 stays in use
  EXPECT_EQ(pool.make_room(20 * kMiB), static_cast<int64_t>(30 * kMiB));  // the smallest that alone does
  EXPECT_EQ(device.used(), 130 * kMiB);
  EXPECT_EQ(pool.make_room(100 * kMiB), static_cast<int64_t>(60 * kMiB));  // all there is: 50, then 10
  EXPECT_EQ(device.used(), 70 * kMiB);
  EXPECT_EQ(pool.make_room(1), 0);
  pool.check_consistency();
  pool.deallocate(blocks[3]);
}

TEST(BlockPool, AMediumRequestTakesASegmentOfItsOwnSizeWhenTwentyMebibytesDoNotFit) {
  testing::PretendDevice device(16 * kMiB);
  BlockPool pool(device.backing());
  void* a = pool.allocate(5 * kMiB + 1);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(device.used(), 6 * kMiB);
  void* b = pool.allocate(9 * kMiB);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(device.used(), 16 * kMiB);
  pool.deallocate(a);
  pool.deallocate(b);
  pool.check_consistency();
}

TEST(BlockPool, OutOfMemoryReturnsNullAndKeepsWhatIsInUse) {
  testing::PretendDevice device(50 * kMiB);
  BlockPool pool(device.backing());
  void* a = pool.allocate(30 * kMiB);
  void* free_later = pool.allocate(2 * kMiB);
  pool.deallocate(free_later);  // a free 20 MiB segment: given back before the pool gives up
  EXPECT_EQ(pool.allocate(21 * kMiB), nullptr);
  EXPECT_EQ(pool.stats().bytes_in_use, static_cast<int64_t>(30 * kMiB));
  EXPECT_EQ(device.used(), 30 * kMiB);
  pool.check_consistency();
  EXPECT_NE(pool.allocate(20 * kMiB), nullptr);  // and what does fit still comes
  pool.deallocate(a);
}

TEST(BlockPool, ReleasingWhatItDidNotHandOutIsAnError) {
  testing::PretendDevice device(64 * kMiB);
  BlockPool pool(device.backing());
  void* a = pool.allocate(4096);
  EXPECT_THROW(pool.deallocate(static_cast<char*>(a) + 512), Error);  // inside a block
  pool.deallocate(a);
  EXPECT_THROW(pool.deallocate(a), Error);  // twice
  pool.check_consistency();
}

// Random requests and releases of every size class, with the live blocks checked for overlap against
// each other and the pool's bookkeeping walked as it goes.
TEST(BlockPool, RandomTrafficNeverOverlapsAndAlwaysAddsUp) {
  testing::PretendDevice device(3072 * kMiB);
  BlockPool pool(device.backing());
  std::mt19937_64 rng(7);
  std::map<uintptr_t, size_t> live;  // address -> bytes asked for
  auto draw_size = [&] {
    switch (rng() % 4) {
      case 0: return static_cast<size_t>(1 + rng() % 4096);
      case 1: return static_cast<size_t>(1 + rng() % kMiB);
      case 2: return static_cast<size_t>(kMiB + rng() % (9 * kMiB));
      default: return static_cast<size_t>(10 * kMiB + rng() % (90 * kMiB));
    }
  };
  int64_t failures = 0;
  for (int step = 0; step < 20000; ++step) {
    if (!live.empty() && (rng() % 100 < 48 || live.size() > 200)) {
      auto it = live.begin();
      std::advance(it, static_cast<long>(rng() % live.size()));
      pool.deallocate(reinterpret_cast<void*>(it->first));
      live.erase(it);
    } else {
      const size_t bytes = draw_size();
      void* p = pool.allocate(bytes);
      if (!p) {  // possible when 200 blocks of up to 100 MiB meet 3 GiB
        failures += 1;
        continue;
      }
      const auto at = reinterpret_cast<uintptr_t>(p);
      EXPECT_EQ(at % BlockPool::kRound, 0u);
      auto next = live.lower_bound(at);
      if (next != live.end()) {
        ASSERT_LE(at + bytes, next->first) << "overlaps the next live block";
      }
      if (next != live.begin()) {
        auto prev = std::prev(next);
        ASSERT_LE(prev->first + prev->second, at) << "overlaps the previous live block";
      }
      live.emplace(at, bytes);
    }
    if (step % 1000 == 0) pool.check_consistency();
  }
  pool.check_consistency();
  EXPECT_LT(failures, 2000);
  for (auto& [at, bytes] : live) pool.deallocate(reinterpret_cast<void*>(at));
  EXPECT_EQ(pool.stats().bytes_in_use, 0);
  pool.release_free_segments();
  EXPECT_EQ(device.used(), 0u);
  EXPECT_EQ(pool.segments(), 0);
  pool.check_consistency();
}

}  // namespace
}  // namespace kraken::runtime
