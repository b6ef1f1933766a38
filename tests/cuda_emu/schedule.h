// The order the emulation runs threads in between barriers (emu.cpp): warps and lanes ascending, or
// descending. A kernel missing a barrier reads data not yet written under one of them, so the tests
// run every kernel under both.
#pragma once

namespace kraken_emu {

enum class Schedule { kAscending, kDescending };
void set_schedule(Schedule schedule);  // for the calling thread's later launches

}  // namespace kraken_emu
