// All-reduce bandwidth and overlap on host tensors, under mpirun:
//   mpirun -n 2 --oversubscribe --allow-run-as-root build/bin/allreduce_bench [--max-mb 64]
//
// 1. Bandwidth, 1 KB … 64 MB (f32 sum): the Communicator (blocking call = queue to the communication
//    thread + wait) against MPI_Allreduce called directly on the main thread, which shows what the
//    thread hand-off costs. Time per call is the slowest rank's mean; bus bandwidth = 2(n−1)/n · bytes/t
//    (the traffic of a ring all-reduce, as nccl-tests report it).
// 2. Overlap: a compute loop calibrated to take about as long as the all-reduce, run between starting
//    it and waiting for it. hidden = (t_comm + t_compute − t_both)/t_comm: 1 when the transfer is
//    entirely behind the compute, 0 when nothing overlapped. Done for the Communicator's asynchronous
//    call and, as the baseline that motivates the thread, for MPI_Iallreduce + compute + MPI_Wait with
//    no MPI call in between (Open MPI then progresses the collective only inside MPI_Wait).
// Not a Google Benchmark program (it needs MPI and every rank in step); it has its own main.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/failure.h"
#include "parallel/world.h"

#if KRAKEN_WITH_MPI
#include <mpi.h>
#endif

using kraken::parallel::Communicator;
using kraken::parallel::ReduceOp;
using kraken::parallel::World;
using kraken::runtime::Tensor;

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

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

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
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
    auto begin = Clock::now();
    for (int i = 0; i < iters; ++i) comm.all_reduce(t);
    const double per_call = slowest(comm, seconds_since(begin) / iters);
    double direct = 0.0;
#if KRAKEN_WITH_MPI
    if (World::get().mpi_initialized()) {
      for (int i = 0; i < 2; ++i)
        MPI_Allreduce(MPI_IN_PLACE, t.data_ptr(), static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      MPI_Barrier(MPI_COMM_WORLD);
      begin = Clock::now();
      for (int i = 0; i < iters; ++i)
        MPI_Allreduce(MPI_IN_PLACE, t.data_ptr(), static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      direct = slowest(comm, seconds_since(begin) / iters);
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
  double comm = 0, compute = 0, both = 0, waited = 0;
  double hidden() const { return std::clamp((comm + compute - both) / comm, 0.0, 1.0); }
};

OverlapResult overlap(Communicator& comm, int64_t bytes, bool use_thread) {
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
    MPI_Allreduce(MPI_IN_PLACE, t.data_ptr(), static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
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
  // Calibrate the compute (rank 0 decides, everyone runs the same amount) to take about t_comm.
  auto begin = Clock::now();
  compute(buffer, 4);
  const double per_repeat = seconds_since(begin) / 4;
  const int repeats = agreed(comm, std::max(1, static_cast<int>(result.comm / per_repeat)));
  times.clear();
  for (int r = 0; r < kReps; ++r) {
    begin = Clock::now();
    compute(buffer, repeats);
    times.push_back(seconds_since(begin));
  }
  result.compute = slowest(comm, median(times));
  // Both: start, compute, wait.
  times.clear();
  std::vector<double> waits;
  for (int r = 0; r < kReps; ++r) {
    comm.barrier();
    begin = Clock::now();
    double waited = 0.0;
    if (use_thread) {
      kraken::parallel::Handle h = comm.all_reduce_async(t);
      compute(buffer, repeats);
      const auto w = Clock::now();
      h.wait();
      waited = seconds_since(w);
    } else {
#if KRAKEN_WITH_MPI
      MPI_Request request;
      MPI_Iallreduce(MPI_IN_PLACE, t.data_ptr(), static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD,
                     &request);
      compute(buffer, repeats);
      const auto w = Clock::now();
      MPI_Wait(&request, MPI_STATUS_IGNORE);
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
    std::printf("\n# overlap: async all-reduce with a compute loop of about the same length between start and wait\n");
    std::printf("# hidden = (t_comm + t_compute - t_both) / t_comm (median of 7, slowest rank)\n");
    std::printf("%10s %-26s | %10s %10s %10s %10s | %7s\n", "bytes", "method", "comm ms", "compute ms", "both ms",
                "wait ms", "hidden");
  }
  for (int64_t bytes : {int64_t{1} << 20, int64_t{4} << 20, int64_t{16} << 20, int64_t{64} << 20}) {
    if (bytes > max_bytes) break;
    for (bool use_thread : {true, false}) {
      if (!use_thread && !World::get().mpi_initialized()) continue;
      const OverlapResult r = overlap(comm, bytes, use_thread);
      if (comm.rank() == 0)
        std::printf("%10lld %-26s | %10.2f %10.2f %10.2f %10.2f | %6.0f%%\n", static_cast<long long>(bytes),
                    use_thread ? "Communicator (comm thread)" : "MPI_Iallreduce, no thread", r.comm * 1e3,
                    r.compute * 1e3, r.both * 1e3, r.waited * 1e3, 100 * r.hidden());
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
