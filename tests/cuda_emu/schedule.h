// What the tests set in the emulation (emu.cpp). The order it runs threads in between barriers: warps and
// lanes ascending, or descending — a kernel missing a barrier reads data not yet written under one of
// them, so the tests run every kernel under both. The emulated device's multiprocessor count: 132, an
// H100's, unless a test sets another, so that a kernel whose grid follows the device shows its loop over
// more work than blocks at a small size. The registers a thread cudaFuncGetAttributes reports for every
// kernel: 168 (what ptxas gives the pipelined attention kernels), unless a test sets another. And what
// it counts, so that a test can tell which kernels a call ran where their results are the same bits: the
// launches whose blocks had `threads` threads, and the named-barrier rounds completed (both since the
// process started).
#pragma once

#include <cstdint>

namespace kraken_emu {

enum class Schedule { kAscending, kDescending };
void set_schedule(Schedule schedule);  // for the calling thread's later launches
void set_multiprocessor_count(int count);
void set_reported_registers(int per_thread);
int64_t launches_with_block_threads(int threads);
int64_t named_barrier_rounds_completed();

}  // namespace kraken_emu
