// The fiber scheduler behind emu.h, and the few CUDA runtime calls the emulated kernels' host code
// makes (this library stands in for libcudart; nothing here touches a GPU).
#include "tests/cuda_emu/emu.h"

#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace kraken_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kWarpScratchBytes = 8 * 1024;
constexpr size_t kWarpgroupScratchBytes = 8 * 1024;
constexpr size_t kMaxDynamicShared = 227 * 1024;  // Hopper's opt-in limit per block
// Every byte 0xFF: as f32 or bf16 a NaN, which survives any arithmetic (a multiply by a masked 0 included),
// so a value read from memory nobody wrote reaches the result.
constexpr unsigned char kPoison = 0xFF;

// kAfterArrival: a thread whose arrival completed an mbarrier phase, parked until nothing else in the
// block can run (mbarrier_arrive).
enum class State {
  kRunnable,
  kAtBlockBarrier,
  kAtWarpBarrier,
  kAtWarpgroupBarrier,
  kAtMbarrier,
  kAfterArrival,
  kAtNamedBarrier,
  kDone
};

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using AlignedBytes = std::unique_ptr<unsigned char[], FreeDeleter>;
AlignedBytes aligned_bytes(size_t bytes, size_t alignment) {
  const size_t rounded = (bytes + alignment - 1) / alignment * alignment;
  return AlignedBytes(static_cast<unsigned char*>(std::aligned_alloc(alignment, rounded)));
}

// AddressSanitizer (the emulation tests also run under it: tests/CMakeLists.txt) must be told of every
// switch between stacks, or it takes the fibers' stacks for overflows of the scheduler's. Without
// ASan these are no-ops.
struct StackSwitch {
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  void start(const void* bottom, size_t size, bool leaving_for_good = false) {
    __sanitizer_start_switch_fiber(leaving_for_good ? nullptr : &fake_stack, bottom, size);
  }
  void finish(const void** from_bottom = nullptr, size_t* from_size = nullptr) {
    __sanitizer_finish_switch_fiber(fake_stack, from_bottom, from_size);
  }
#else
  void start(const void*, size_t, bool = false) {}
  void finish(const void** = nullptr, size_t* = nullptr) {}
#endif
};

// A cp.async not yet landed: `bytes` at dst, the first `src_bytes` from src (read when it lands; global
// memory does not change during a kernel), zeros after.
struct PendingCopy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes, src_bytes;
};

// A wgmma's results for one thread, held until the wait that covers them (none under the descending
// schedule: d null), and what it read, which must not change before that wait: shared memory and the
// thread's A registers (where A came from registers).
struct PendingResults {
  float* d;
  std::vector<float> values;
  std::vector<SharedRead> reads;
  const uint32_t* a_registers;
  uint32_t a_values[4];
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  State state = State::kRunnable;
  ThreadCoords coords;
  int lane = 0, warp = 0;
  StackSwitch stack_switch;                           // (AddressSanitizer's bookkeeping)
  std::vector<PendingCopy> uncommitted;               // cp.async since the last commit
  std::deque<std::vector<PendingCopy>> committed;     // oldest group first
  std::vector<PendingResults> wgmma_uncommitted;      // wgmma since the last commit
  std::deque<std::vector<PendingResults>> wgmma_committed;
  uint32_t waiting_on = 0;  // at an mbarrier: its offset in shared memory, and the parity of the phase
  int waiting_parity = 0;
  int named_id = 0;  // at a named barrier: its id, and the round it waits to complete
  uint64_t named_round = 0;
};

// A named barrier's state (emu.h): the thread count of its current round (0 before the first arrival),
// the arrivals so far, and the number of rounds completed.
struct NamedBarrier {
  int threads = 0, arrived = 0;
  uint64_t rounds = 0;
};
constexpr int kNamedBarriers = 16;

// An mbarrier's state (emu.h): arrivals expected a phase, those still missing from the current one, and
// the number of phases completed (the current phase's parity is phase & 1).
struct Mbarrier {
  int expected = 0, pending = 0;
  uint64_t phase = 0;
};
// An arrival on copies not yet made (the ascending schedule): the thread, the barrier, and its copies
// issued before it, which land when it is made.
struct ArrivalOnCopies {
  int fiber;
  uint32_t barrier;
  std::vector<PendingCopy> copies;
};

// One block's worth of fibers, run on the thread that launched the kernel.
struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<std::vector<unsigned char>> warp_slots;     // warp_exchange: 32 lanes × up to 16 bytes
  std::vector<AlignedBytes> warp_scratch;
  std::vector<AlignedBytes> warpgroup_scratch;
  unsigned char* dynamic_shared = nullptr;
  size_t dynamic_shared_bytes = 0;
  const std::function<void()>* body = nullptr;
  int current = -1;
  std::exception_ptr error;
  const void* scheduler_stack = nullptr;  // the launching thread's stack, as AddressSanitizer reports it
  size_t scheduler_stack_size = 0;
  std::map<uint32_t, Mbarrier> mbarriers;          // by offset in dynamic shared memory
  std::deque<ArrivalOnCopies> arrivals_on_copies;  // oldest first
  NamedBarrier named[kNamedBarriers];
};

thread_local Block* g_block = nullptr;
thread_local Schedule g_schedule = Schedule::kAscending;
thread_local ThreadCoords g_host_coords;  // what coords() returns outside a kernel

Fiber& current_fiber() {
  if (!g_block || g_block->current < 0) trap("a device built-in was used outside a kernel");
  return g_block->fibers[static_cast<size_t>(g_block->current)];
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield(State state) {
  Fiber& f = current_fiber();
  f.state = state;
  f.stack_switch.start(g_block->scheduler_stack, g_block->scheduler_stack_size);
  swapcontext(&f.context, &g_block->scheduler);
  f.stack_switch.finish();
}

void fiber_main() {
  Block& b = *g_block;
  Fiber& f = b.fibers[static_cast<size_t>(b.current)];
  f.stack_switch.finish(&b.scheduler_stack, &b.scheduler_stack_size);  // arrived from the scheduler
  try {
    (*b.body)();
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  f.state = State::kDone;
  f.stack_switch.start(b.scheduler_stack, b.scheduler_stack_size, true);
  swapcontext(&f.context, &b.scheduler);  // never resumed
}

// Releases warp w if all its live lanes wait at a warp barrier; returns whether it did.
bool release_warp(Block& b, int w) {
  bool all = true, any = false;
  for (Fiber& f : b.fibers) {
    if (f.warp != w || f.state == State::kDone) continue;
    any = true;
    all = all && f.state == State::kAtWarpBarrier;
  }
  if (!any || !all) return false;
  for (Fiber& f : b.fibers)
    if (f.warp == w && f.state == State::kAtWarpBarrier) f.state = State::kRunnable;
  return true;
}

// Releases warpgroup k (warps 4k .. 4k + 3) if all its live threads wait at its barrier.
bool release_warpgroup(Block& b, int k) {
  bool all = true, any = false;
  for (Fiber& f : b.fibers) {
    if (f.warp / 4 != k || f.state == State::kDone) continue;
    any = true;
    all = all && f.state == State::kAtWarpgroupBarrier;
  }
  if (!any || !all) return false;
  for (Fiber& f : b.fibers)
    if (f.warp / 4 == k && f.state == State::kAtWarpgroupBarrier) f.state = State::kRunnable;
  return true;
}

// Releases the block if all its live threads wait at __syncthreads; returns whether it did.
bool release_block(Block& b) {
  bool all = true, any = false;
  for (Fiber& f : b.fibers) {
    if (f.state == State::kDone) continue;
    any = true;
    all = all && f.state == State::kAtBlockBarrier;
  }
  if (!any || !all) return false;
  for (Fiber& f : b.fibers)
    if (f.state == State::kAtBlockBarrier) f.state = State::kRunnable;
  return true;
}

// Makes runnable every thread waiting on an mbarrier whose awaited phase has completed; returns whether any.
bool release_mbarrier_waiters(Block& b) {
  bool any = false;
  for (Fiber& f : b.fibers) {
    if (f.state != State::kAtMbarrier) continue;
    const auto it = b.mbarriers.find(f.waiting_on);
    if (it != b.mbarriers.end() && static_cast<int>(it->second.phase & 1) != f.waiting_parity) {
      f.state = State::kRunnable;
      any = true;
    }
  }
  return any;
}

// Makes runnable every thread waiting at a named barrier whose round has completed; returns whether any.
bool release_named_barrier_waiters(Block& b) {
  bool any = false;
  for (Fiber& f : b.fibers) {
    if (f.state != State::kAtNamedBarrier || b.named[f.named_id].rounds == f.named_round) continue;
    f.state = State::kRunnable;
    any = true;
  }
  return any;
}

// Makes runnable every thread parked after the arrival that completed a phase (mbarrier_arrive); returns
// whether any. The scheduler calls it only once nothing else can run.
bool release_parked_arrivers(Block& b) {
  bool any = false;
  for (Fiber& f : b.fibers) {
    if (f.state != State::kAfterArrival) continue;
    f.state = State::kRunnable;
    any = true;
  }
  return any;
}

std::string describe_deadlock(const Block& b) {
  int at_block = 0, at_warp = 0, at_warpgroup = 0, at_mbarrier = 0, at_named = 0, done = 0;
  for (const Fiber& f : b.fibers) {
    at_block += f.state == State::kAtBlockBarrier;
    at_warp += f.state == State::kAtWarpBarrier;
    at_warpgroup += f.state == State::kAtWarpgroupBarrier;
    at_mbarrier += f.state == State::kAtMbarrier;
    at_named += f.state == State::kAtNamedBarrier;
    done += f.state == State::kDone;
  }
  return "barrier deadlock in block (" + std::to_string(b.fibers[0].coords.block_idx.x) + ", " +
         std::to_string(b.fibers[0].coords.block_idx.y) + ", " + std::to_string(b.fibers[0].coords.block_idx.z) +
         "): " + std::to_string(at_block) + " threads wait at __syncthreads, " + std::to_string(at_warp) +
         " at a warp barrier, " + std::to_string(at_warpgroup) + " at a warpgroup barrier, " +
         std::to_string(at_mbarrier) + " on an mbarrier phase that never completes, " + std::to_string(at_named) +
         " at a named barrier, " + std::to_string(done) + " have returned";
}

// Points the fiber's context at fiber_main on its own stack (kept out of run_grid: getcontext
// "returns twice" as far as the compiler knows, which would pin run_grid's locals).
void start_fiber(Fiber& f) {
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack.get();
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main, 0);
}

}  // namespace

void set_schedule(Schedule schedule) { g_schedule = schedule; }

const ThreadCoords& coords() {
  if (!g_block || g_block->current < 0) return g_host_coords;
  return current_fiber().coords;
}

int lane() { return current_fiber().lane; }

void sync_block() { yield(State::kAtBlockBarrier); }
void sync_warp() { yield(State::kAtWarpBarrier); }

void warp_exchange(const void* in, void* out, size_t bytes, int source) {
  if (bytes > 16) trap("warp_exchange of more than 16 bytes");
  Fiber& f = current_fiber();
  std::vector<unsigned char>& slots = g_block->warp_slots[static_cast<size_t>(f.warp)];
  std::memcpy(slots.data() + 16 * f.lane, in, bytes);
  sync_warp();  // every lane has written
  std::memcpy(out, slots.data() + 16 * (source & 31), bytes);
  sync_warp();  // every lane has read: the slots may be written again
}

unsigned warp_ballot(bool predicate) {
  Fiber& f = current_fiber();
  std::vector<unsigned char>& slots = g_block->warp_slots[static_cast<size_t>(f.warp)];
  slots[16 * f.lane] = predicate ? 1 : 0;
  sync_warp();  // every lane has voted
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l)
    if (slots[16 * l]) bits |= 1u << l;
  sync_warp();  // every lane has counted
  return bits;
}

void* warp_scratch() { return g_block->warp_scratch[static_cast<size_t>(current_fiber().warp)].get(); }

void sync_warpgroup() {
  if (g_block->fibers.size() % 128 != 0) trap("a warpgroup operation in a block that is not whole warpgroups");
  yield(State::kAtWarpgroupBarrier);
}

void* warpgroup_scratch() {
  if (g_block->fibers.size() % 128 != 0) trap("a warpgroup operation in a block that is not whole warpgroups");
  return g_block->warpgroup_scratch[static_cast<size_t>(current_fiber().warp / 4)].get();
}

uint32_t shared_window_address(const void* p) {
  if (!in_dynamic_shared(p, 1)) trap("a shared memory descriptor for an address outside the block's shared memory");
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - g_block->dynamic_shared);
}

void hold_wgmma_results(float* d, const float* values, int count, std::vector<SharedRead> reads,
                        const uint32_t* a_registers) {
  PendingResults pending{nullptr, {}, std::move(reads), a_registers, {}};
  if (a_registers) std::memcpy(pending.a_values, a_registers, sizeof pending.a_values);
  if (g_schedule == Schedule::kDescending) {
    std::memcpy(d, values, sizeof(float) * static_cast<size_t>(count));
  } else {
    pending.d = d;
    pending.values.assign(values, values + count);
    for (int i = 0; i < count; ++i) d[i] = std::nanf("");  // not readable before the wait
  }
  current_fiber().wgmma_uncommitted.push_back(std::move(pending));
}

const float* held_wgmma_results(const float* d, int count) {
  Fiber& f = current_fiber();
  auto latest = [&](const std::vector<PendingResults>& group) -> const float* {
    for (auto it = group.rbegin(); it != group.rend(); ++it)
      if (it->d == d) {
        if (it->values.size() != static_cast<size_t>(count)) trap("wgmma: accumulators of another size chained");
        return it->values.data();
      }
    return nullptr;
  };
  if (const float* v = latest(f.wgmma_uncommitted)) return v;
  for (auto it = f.wgmma_committed.rbegin(); it != f.wgmma_committed.rend(); ++it)
    if (const float* v = latest(*it)) return v;
  return nullptr;
}

void wgmma_commit() {
  Fiber& f = current_fiber();
  f.wgmma_committed.push_back(std::move(f.wgmma_uncommitted));
  f.wgmma_uncommitted.clear();
}

void wgmma_wait(int pending) {
  Fiber& f = current_fiber();
  while (f.wgmma_committed.size() > static_cast<size_t>(std::max(pending, 0))) {
    for (const PendingResults& r : f.wgmma_committed.front()) {
      for (const SharedRead& read : r.reads) {
        uint16_t now;
        std::memcpy(&now, g_block->dynamic_shared + read.offset, sizeof now);
        if (now != read.bits)
          trap("wgmma: shared memory that a wgmma in flight reads was written before the wait that covers it");
      }
      if (r.a_registers && std::memcmp(r.a_registers, r.a_values, sizeof r.a_values) != 0)
        trap("wgmma: the A registers of a wgmma in flight were changed before the wait that covers it");
      if (r.d) std::memcpy(r.d, r.values.data(), sizeof(float) * r.values.size());
    }
    f.wgmma_committed.pop_front();
  }
}

void* dynamic_shared() {
  if (!g_block || !g_block->dynamic_shared) trap("dynamic shared memory used by a kernel launched without any");
  return g_block->dynamic_shared;
}

bool in_dynamic_shared(const void* p, size_t bytes) {
  if (!g_block || !g_block->dynamic_shared) return false;
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= g_block->dynamic_shared && c + bytes <= g_block->dynamic_shared + g_block->dynamic_shared_bytes;
}

namespace {
void land(const PendingCopy& c) {
  std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
  std::memset(c.dst + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
}

// What mbarrier_init writes into a barrier's 8 bytes ("MBAR-EMU"): any other content at a later use means
// the kernel wrote over it.
constexpr uint64_t kMbarrierMark = 0x554D452D5241424DULL;

Mbarrier& mbarrier_at(const void* bar) {
  if (!in_dynamic_shared(bar, 8) || reinterpret_cast<uintptr_t>(bar) % 8 != 0)
    trap("an mbarrier outside the block's dynamic shared memory, or not 8-byte aligned");
  const auto it = g_block->mbarriers.find(shared_window_address(bar));
  if (it == g_block->mbarriers.end()) trap("an mbarrier used before mbarrier_init");
  uint64_t mark;
  std::memcpy(&mark, bar, sizeof mark);
  if (mark != kMbarrierMark) trap("an mbarrier's shared memory was written over after its init");
  return it->second;
}

void arrive_at(Mbarrier& m) {
  if (--m.pending == 0) {
    ++m.phase;
    m.pending = m.expected;
  }
}

// Lands the copies of an arrival on copies, then makes the arrival.
void make_arrival(const ArrivalOnCopies& a) {
  for (const PendingCopy& c : a.copies) land(c);
  arrive_at(mbarrier_at(g_block->dynamic_shared + a.barrier));
}

// Makes every arrival on copies the thread has not made yet, in order (its cp_async_wait: the copies must
// land by then, and the arrivals follow them).
void make_arrivals_on_copies_of(int fiber) {
  std::deque<ArrivalOnCopies>& q = g_block->arrivals_on_copies;
  for (auto it = q.begin(); it != q.end();) {
    if (it->fiber != fiber) {
      ++it;
      continue;
    }
    const ArrivalOnCopies a = std::move(*it);
    it = q.erase(it);
    make_arrival(a);
  }
}
}  // namespace

void mbarrier_init(uint64_t* bar, int count) {
  if (!in_dynamic_shared(bar, 8) || reinterpret_cast<uintptr_t>(bar) % 8 != 0)
    trap("mbarrier_init outside the block's dynamic shared memory, or not 8-byte aligned");
  if (count < 1 || count >= (1 << 20)) trap("mbarrier_init with a count outside 1 .. 2^20 - 1");
  g_block->mbarriers[shared_window_address(bar)] = Mbarrier{count, count, 0};
  std::memcpy(bar, &kMbarrierMark, sizeof kMbarrierMark);
}

// An arrival that completes a phase parks its thread until nothing else in the block can run (the
// scheduler's last resort before an arrival on copies): the threads waiting on that phase, and every other,
// go as far as they can first — a producer refills the stage just released (under the descending schedule
// its copies land at once) and the consumers read what the phase published — before the arriving thread
// takes its next step. So a consumer that releases a stage it still reads (a wgmma in flight, or a read
// after the arrival) and a producer that arrives before its writes are both caught: at that wgmma's wait,
// or by the values read.
void mbarrier_arrive(uint64_t* bar) {
  Mbarrier& m = mbarrier_at(bar);
  const uint64_t phase = m.phase;
  arrive_at(m);
  if (m.phase != phase) yield(State::kAfterArrival);
}

void mbarrier_wait(uint64_t* bar, int parity) {
  const Mbarrier& m = mbarrier_at(bar);
  if (static_cast<int>(m.phase & 1) != (parity & 1)) return;
  Fiber& f = current_fiber();
  f.waiting_on = shared_window_address(bar);
  f.waiting_parity = parity & 1;
  yield(State::kAtMbarrier);
  mbarrier_at(bar);  // (still a barrier: not written over while the thread waited)
}

void mbarrier_arrive_on_copies(uint64_t* bar) {
  mbarrier_at(bar);
  Fiber& f = current_fiber();
  ArrivalOnCopies a{g_block->current, shared_window_address(bar), std::move(f.uncommitted)};
  f.uncommitted.clear();
  for (std::vector<PendingCopy>& group : f.committed) {  // (the groups stay, empty: wait_group counts them)
    a.copies.insert(a.copies.end(), group.begin(), group.end());
    group.clear();
  }
  // The descending schedule landed the copies at their issue: the arrival is made now.
  if (g_schedule == Schedule::kDescending) make_arrival(a);
  else g_block->arrivals_on_copies.push_back(std::move(a));
}

namespace {
// What the emulation counts for tests (schedule.h): launches by threads a block, named-barrier rounds.
std::mutex g_counts_mutex;
std::map<int, int64_t> g_launches_by_block_threads;
std::atomic<int64_t> g_named_rounds{0};

// One arrival on named barrier id by the calling thread; returns the round it belongs to.
uint64_t arrive_at_named(int id, int threads) {
  if (id < 1 || id >= kNamedBarriers) trap("a named barrier id outside 1 .. 15 (0 is __syncthreads')");
  if (threads <= 0 || threads % 32 != 0 || static_cast<size_t>(threads) > g_block->fibers.size())
    trap("a named barrier's thread count is not a positive multiple of 32 within the block");
  NamedBarrier& n = g_block->named[id];
  if (n.arrived > 0 && n.threads != threads) trap("one round of a named barrier with two thread counts");
  n.threads = threads;
  const uint64_t round = n.rounds;
  if (++n.arrived == threads) {
    n.arrived = 0;
    ++n.rounds;
    ++g_named_rounds;
  }
  return round;
}
}  // namespace

void named_barrier_sync(int id, int threads) {
  const uint64_t round = arrive_at_named(id, threads);
  if (g_block->named[id].rounds != round) return;  // the last arrival: the round is complete
  Fiber& f = current_fiber();
  f.named_id = id;
  f.named_round = round;
  yield(State::kAtNamedBarrier);
}

void named_barrier_arrive(int id, int threads) { arrive_at_named(id, threads); }

void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (!in_dynamic_shared(dst, static_cast<size_t>(bytes))) trap("cp.async to outside the block's shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % static_cast<uintptr_t>(bytes) != 0 ||
      reinterpret_cast<uintptr_t>(src) % static_cast<uintptr_t>(bytes) != 0)
    trap("cp.async with a misaligned address");
  if (src_bytes < 0 || src_bytes > bytes) trap("cp.async with src-size outside 0 .. cp-size");
  const PendingCopy copy{static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), bytes, src_bytes};
  // A GPU may land the copy any time between the issue and the wait: the ascending schedule lands it at
  // the wait (a read the wait does not cover sees the old bytes), the descending one at once (a copy
  // into a buffer other warps may still be reading, without a barrier between, overwrites it under them).
  if (g_schedule == Schedule::kDescending) {
    land(copy);
  } else {
    current_fiber().uncommitted.push_back(copy);
  }
}

void cp_async_commit() {
  Fiber& f = current_fiber();
  f.committed.push_back(std::move(f.uncommitted));
  f.uncommitted.clear();
}

void cp_async_wait(int pending) {
  make_arrivals_on_copies_of(g_block->current);
  Fiber& f = current_fiber();
  while (f.committed.size() > static_cast<size_t>(std::max(pending, 0))) {
    for (const PendingCopy& c : f.committed.front()) land(c);
    f.committed.pop_front();
  }
}

void trap(const char* what) { throw std::runtime_error(std::string("emulated kernel: ") + what); }

namespace {
constexpr size_t kDefaultDynamicShared = 48 * 1024;  // a kernel's dynamic shared memory without the opt-in
std::mutex g_opt_in_mutex;
std::map<const void*, size_t>& opt_in_by_kernel() {
  static std::map<const void*, size_t> raised;
  return raised;
}
}  // namespace

void set_max_dynamic_shared(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(g_opt_in_mutex);
  opt_in_by_kernel()[kernel] = static_cast<size_t>(bytes);
}

void check_dynamic_shared_opt_in(const void* kernel, size_t bytes) {
  if (bytes <= kDefaultDynamicShared) return;
  size_t raised = 0;
  {
    std::lock_guard<std::mutex> lock(g_opt_in_mutex);
    const auto it = opt_in_by_kernel().find(kernel);
    if (it != opt_in_by_kernel().end()) raised = it->second;
  }
  if (bytes > raised)
    trap(("a launch with " + std::to_string(bytes) + " bytes of dynamic shared memory, above 48 KiB and above the " +
          std::to_string(raised) + " cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) raised for " +
          "this kernel: on a GPU the launch fails")
             .c_str());
}

void run_grid(dim3 grid, dim3 block, size_t dynamic_shared_bytes, const std::function<void()>& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads <= 0 || threads > 1024) trap("block size outside 1 .. 1024");
  if (dynamic_shared_bytes > kMaxDynamicShared) trap("more dynamic shared memory than a block can have");
  if (g_block) trap("a kernel launched from inside a kernel");
  {
    std::lock_guard<std::mutex> lock(g_counts_mutex);
    ++g_launches_by_block_threads[threads];
  }
  const int warps = (threads + 31) / 32;
  Block b;
  b.body = &body;
  b.fibers.resize(static_cast<size_t>(threads));
  for (Fiber& f : b.fibers) f.stack.reset(new char[kStackBytes]);
  b.warp_slots.assign(static_cast<size_t>(warps), std::vector<unsigned char>(32 * 16));
  for (int w = 0; w < warps; ++w) b.warp_scratch.push_back(aligned_bytes(kWarpScratchBytes, 16));
  for (int k = 0; k < (warps + 3) / 4; ++k) b.warpgroup_scratch.push_back(aligned_bytes(kWarpgroupScratchBytes, 16));
  AlignedBytes shared = dynamic_shared_bytes ? aligned_bytes(dynamic_shared_bytes, 128) : AlignedBytes();
  b.dynamic_shared = shared.get();
  b.dynamic_shared_bytes = dynamic_shared_bytes;
  g_block = &b;
  struct Reset {
    ~Reset() { g_block = nullptr; }
  } reset;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        if (b.dynamic_shared) std::memset(b.dynamic_shared, kPoison, dynamic_shared_bytes);
        b.mbarriers.clear();
        b.arrivals_on_copies.clear();
        for (NamedBarrier& n : b.named) n = NamedBarrier{};
        for (int t = 0; t < threads; ++t) {
          Fiber& f = b.fibers[static_cast<size_t>(t)];
          f.state = State::kRunnable;
          f.uncommitted.clear();  // a block's copies never land in the next one
          f.committed.clear();
          f.wgmma_uncommitted.clear();
          f.wgmma_committed.clear();
          f.lane = t % 32;
          f.warp = t / 32;
          f.coords.thread_idx =
              uint3{static_cast<unsigned>(t) % block.x, (static_cast<unsigned>(t) / block.x) % block.y,
                    static_cast<unsigned>(t) / (block.x * block.y)};
          f.coords.block_idx = uint3{bx, by, bz};
          f.coords.block_dim = block;
          f.coords.grid_dim = grid;
          start_fiber(f);
        }
        // A warp at a time, as far as it goes before a __syncthreads: lanes in turn up to each warp
        // barrier, then the warp again. This exposes a missing barrier as a read of data another warp
        // (or lane) has not written yet; the descending order exposes the mirror-image cases.
        const bool down = g_schedule == Schedule::kDescending;
        for (;;) {
          bool ran = false;
          for (int wi = 0; wi < warps; ++wi) {
            const int w = down ? warps - 1 - wi : wi;
            for (;;) {
              bool warp_ran = false;
              for (int li = 0; li < 32; ++li) {
                const int t = w * 32 + (down ? 31 - li : li);
                if (t >= threads) continue;
                Fiber& f = b.fibers[static_cast<size_t>(t)];
                if (f.state != State::kRunnable) continue;
                b.current = t;
                StackSwitch to_fiber;
                to_fiber.start(f.stack.get(), kStackBytes);
                swapcontext(&b.scheduler, &f.context);
                to_fiber.finish();
                b.current = -1;
                warp_ran = ran = true;
                if (b.error) std::rethrow_exception(b.error);
              }
              if (!release_warp(b, w) && !warp_ran) break;
            }
          }
          bool done = true;
          for (const Fiber& f : b.fibers) done = done && f.state == State::kDone;
          if (done) break;
          bool released = release_block(b);
          for (int k = 0; k < (warps + 3) / 4; ++k) released = release_warpgroup(b, k) || released;
          released = release_mbarrier_waiters(b) || released;
          released = release_named_barrier_waiters(b) || released;
          if (!released && !ran && !release_parked_arrivers(b)) {
            // Nothing can run: the oldest arrival on copies is made now, as late as it can be.
            if (b.arrivals_on_copies.empty()) throw std::runtime_error("emulated kernel: " + describe_deadlock(b));
            const ArrivalOnCopies a = std::move(b.arrivals_on_copies.front());
            b.arrivals_on_copies.pop_front();
            make_arrival(a);
          }
        }
        for (const Fiber& f : b.fibers)
          if (!f.wgmma_uncommitted.empty() || !f.wgmma_committed.empty())
            trap("a thread returned with wgmma results it never waited for");
        for (const NamedBarrier& n : b.named)
          if (n.arrived != 0) trap("a block returned with arrivals on a named barrier whose round never completed");
      }
}

}  // namespace kraken_emu

// ---- the CUDA runtime calls of the emulated host code ------------------------------------------------
// One emulated device, 0, with Hopper's limits (emu.h maps the CUDA names onto these).
namespace kraken_emu {
cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}
namespace {
int registers_reported = 168;
}
void set_reported_registers(int per_thread) { registers_reported = per_thread; }
int64_t launches_with_block_threads(int threads) {
  std::lock_guard<std::mutex> lock(g_counts_mutex);
  const auto it = g_launches_by_block_threads.find(threads);
  return it == g_launches_by_block_threads.end() ? 0 : it->second;
}
int64_t named_barrier_rounds_completed() { return g_named_rounds.load(); }
int reported_registers() { return registers_reported; }

int blocks_per_multiprocessor(int block_size, size_t dynamic_shared_bytes) {
  const size_t by_threads = 2048 / static_cast<size_t>(std::max(block_size, 1));
  const size_t by_shared = (228 * 1024) / (dynamic_shared_bytes + 1024);
  return static_cast<int>(std::min(by_threads, by_shared));
}
int g_multiprocessors = 132;
void set_multiprocessor_count(int count) { g_multiprocessors = count; }
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(kMaxDynamicShared); return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = g_multiprocessors; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t get_last_error() { return cudaSuccess; }
cudaError_t malloc_device(void** p, size_t bytes) {
  const size_t rounded = (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
  *p = std::aligned_alloc(256, rounded);
  if (!*p) return cudaErrorMemoryAllocation;
  std::memset(*p, kPoison, rounded);
  return cudaSuccess;
}
cudaError_t free_device(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t memset_async(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
}  // namespace kraken_emu
