// All-reduce bandwidth and overlap on host tensors, under mpirun:
//   mpirun -n 2 --oversubscribe --allow-run-as-root build/bin/allreduce_bench [--max-mb 64]
//
// 1. Bandwidth, 1 KB … 64 MB (f32 sum): the Communicator (blocking call = queue to the communication
//    thread + wait) against MPI_Allreduce called directly on the main thread, which shows what the
//    thread hand-off costs. Time per call: the median over back-to-back calls, slowest rank; bus
//    bandwidth = 2(n−1)/n · bytes/t (the traffic of a ring all-reduce, as nccl-tests report it).
// 2. Overlap: work of about 1.5× the all-reduce's time between starting it and waiting for it.
//    hidden = (t_comm + t_work − t_both)/t_comm: 1 when the transfer is entirely behind the work, 0
//    when nothing overlapped; "wait" is what was left to wait for at the end. Two kinds of work:
//    `busy`, a compute loop on the rank's core (on CPU ranks it competes with the reduction for the
//    cores), and `sleep`, which leaves the core free (as when a GPU computes). Each for the
//    Communicator's asynchronous call and, as the baseline that motivates the thread, for
//    MPI_Iallreduce + work + MPI_Wait with no MPI call in between.
// Not a Google Benchmark program (it needs MPI and every rank in step); it has its own main.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/failure.h"
#include "parallel/world.h"

#include "parallel/mpi_check.h"  // KRAKEN_MPI_CHECK for the direct MPI calls of the baselines

using kraken::parallel::Communicator;
using kraken::parallel::ReduceOp;
using kraken::parallel::World;
using kraken::runtime::Tensor;

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The slowest rank's value: a collective step takes as long as its slowest member.
double slowest(Communicator& comm, double v) {
  Tensor t = Tensor::full({1}, static_cast<float>(v));
  comm.all_reduce(t, ReduceOp::Max);
  return t.item();
}

// Same number on every rank (rank 0's).
int agreed(Communicator& comm, int v) {
  Tensor t = Tensor::from_ints({v}, {1});
  comm.broadcast(t, 0);
  return t.to_int_vector()[0];
}

// Compute-bound work on a buffer that stays in L2: a stand-in for a layer's backward.
float compute(std::vector<float>& buffer, int repeats) {
  for (int r = 0; r < repeats; ++r)
    for (float& x : buffer) x = x * 0.999f + 0.001f;
  return buffer[0];
}

void bandwidth(Communicator& comm, int64_t max_bytes) {
  const int n = comm.size();
  if (comm.rank() == 0) {
    std::printf("\n# all-reduce (f32 sum), %d ranks: time per call (slowest rank), algorithm and bus bandwidth\n", n);
    std::printf("%10s %8s | %12s %10s %10s | %12s %10s\n", "bytes", "iters", "comm us", "algbw GB/s", "busbw GB/s",
                "direct us", "busbw GB/s");
  }
  for (int64_t bytes = 1024; bytes <= max_bytes; bytes *= 4) {
    const int64_t count = bytes / 4;
    Tensor t = Tensor::full({count}, 1.0f);
    const int iters = static_cast<int>(std::clamp<int64_t>((int64_t{256} << 20) / bytes, 5, 200));
    for (int i = 0; i < 2; ++i) comm.all_reduce(t);  // warm-up (connections, first-touch)
    comm.barrier();
    std::vector<double> times;
    for (int i = 0; i < iters; ++i) {
      const auto begin = Clock::now();
      comm.all_reduce(t);
      times.push_back(seconds_since(begin));
    }
    const double per_call = slowest(comm, median(times));
    double direct = 0.0;
#if KRAKEN_WITH_MPI
    if (World::get().mpi_initialized()) {
      for (int i = 0; i < 2; ++i)
        KRAKEN_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, t.data_ptr(), static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
      KRAKEN_MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD));
      times.clear();
      for (int i = 0; i < iters; ++i) {
        const auto begin = Clock::now();
        KRAKEN_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, t.data_ptr(), static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
        times.push_back(seconds_since(begin));
      }
      direct = slowest(comm, median(times));
    }
#endif
    const double bus = 2.0 * (n - 1) / n;
    if (comm.rank() == 0)
      std::printf("%10lld %8d | %12.1f %10.3f %10.3f | %12.1f %10.3f\n", static_cast<long long>(bytes), iters,
                  per_call * 1e6, bytes / per_call * 1e-9, bus * bytes / per_call * 1e-9, direct * 1e6,
                  direct > 0 ? bus * bytes / direct * 1e-9 : 0.0);
  }
}

struct OverlapResult {
  double comm = 0, work = 0, both = 0, waited = 0;
  double hidden() const { return std::clamp((comm + work - both) / comm, 0.0, 1.0); }
};

enum class Work { Busy, Sleep };

OverlapResult overlap(Communicator& comm, int64_t bytes, bool use_thread, Work kind) {
  const int64_t count = bytes / 4;
  Tensor t = Tensor::full({count}, 1.0f);
  std::vector<float> buffer(64 * 1024, 1.0f);  // 256 KB
  constexpr int kReps = 7;
  auto all_reduce_blocking = [&] {
    if (use_thread) {
      comm.all_reduce(t);
      return;
    }
#if KRAKEN_WITH_MPI
    KRAKEN_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, t.data_ptr(), static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
#endif
  };
  OverlapResult result;
  // t_comm alone.
  std::vector<double> times;
  all_reduce_blocking();
  for (int r = 0; r < kReps; ++r) {
    comm.barrier();
    const auto begin = Clock::now();
    all_reduce_blocking();
    times.push_back(slowest(comm, seconds_since(begin)));
  }
  result.comm = median(times);
  // Work of about 1.5 t_comm (rank 0 calibrates, every rank does the same amount).
  compute(buffer, 2);  // warm-up
  auto begin = Clock::now();
  compute(buffer, 32);
  const double per_repeat = seconds_since(begin) / 32;
  const int repeats = agreed(comm, std::max(1, static_cast<int>(1.5 * result.comm / per_repeat)));
  const double nap = 1.5 * result.comm;
  auto work = [&] {
    if (kind == Work::Busy)
      compute(buffer, repeats);
    else
      std::this_thread::sleep_for(std::chrono::duration<double>(nap));
  };
  times.clear();
  for (int r = 0; r < kReps; ++r) {
    begin = Clock::now();
    work();
    times.push_back(seconds_since(begin));
  }
  result.work = slowest(comm, median(times));
  // Both: start, work, wait.
  times.clear();
  std::vector<double> waits;
  for (int r = 0; r < kReps; ++r) {
    comm.barrier();
    begin = Clock::now();
    double waited = 0.0;
    if (use_thread) {
      kraken::parallel::Handle h = comm.all_reduce_async(t);
      work();
      const auto w = Clock::now();
      h.wait();
      waited = seconds_since(w);
    } else {
#if KRAKEN_WITH_MPI
      MPI_Request request;
      KRAKEN_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, t.data_ptr(), static_cast<int>(count), MPI_FLOAT, MPI_SUM,
                                      MPI_COMM_WORLD, &request));
      work();
      const auto w = Clock::now();
      KRAKEN_MPI_CHECK(MPI_Wait(&request, MPI_STATUS_IGNORE));
      waited = seconds_since(w);
#endif
    }
    times.push_back(slowest(comm, seconds_since(begin)));
    waits.push_back(slowest(comm, waited));
  }
  result.both = median(times);
  result.waited = median(waits);
  return result;
}

void overlap_table(Communicator& comm, int64_t max_bytes) {
  if (comm.rank() == 0) {
    std::printf("\n# overlap: async all-reduce with work of ~1.5x its time between start and wait (median of 7,"
                " slowest rank)\n");
    std::printf("# hidden = (t_comm + t_work - t_both) / t_comm; wait = time left to wait after the work\n");
    std::printf("%10s %-5s %-12s | %10s %10s %10s %10s | %7s\n", "bytes", "work", "method", "comm ms", "work ms",
                "both ms", "wait ms", "hidden");
  }
  for (int64_t bytes : {int64_t{1} << 20, int64_t{4} << 20, int64_t{16} << 20, int64_t{64} << 20}) {
    if (bytes > max_bytes) break;
    for (Work kind : {Work::Sleep, Work::Busy}) {
      for (bool use_thread : {true, false}) {
        if (!use_thread && !World::get().mpi_initialized()) continue;
        const OverlapResult r = overlap(comm, bytes, use_thread, kind);
        if (comm.rank() == 0)
          std::printf("%10lld %-5s %-12s | %10.2f %10.2f %10.2f %10.2f | %6.0f%%\n", static_cast<long long>(bytes),
                      kind == Work::Busy ? "busy" : "sleep", use_thread ? "comm thread" : "Iallreduce", r.comm * 1e3,
                      r.work * 1e3, r.both * 1e3, r.waited * 1e3, 100 * r.hidden());
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  return kraken::parallel::run_guarded([&] {
    int64_t max_mb = 64;
    for (int i = 1; i + 1 < argc; ++i)
      if (std::strcmp(argv[i], "--max-mb") == 0) max_mb = std::atoll(argv[i + 1]);
    World& world = World::get();
    Communicator& comm = world.communicator();
    if (world.size() < 2) {
      std::printf("allreduce_bench: run it under mpirun with 2 or more ranks (this is a world of one)\n");
      return 0;
    }
    bandwidth(comm, max_mb << 20);
    overlap_table(comm, max_mb << 20);
    return 0;
  });
}
