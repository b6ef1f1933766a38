// Internals of Communicator, shared by communicator.cpp, mpi_queue.cpp, nccl_comm.cpp, world.cpp and
// mesh.cpp. Not for use outside parallel/ (it includes <mpi.h>).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/mpi_check.h"

namespace kraken::parallel::detail {

using Clock = std::chrono::steady_clock;
inline double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Shared by a communicator and the operations it issued (which may outlive it by a moment).
struct StatsCounter {
  std::mutex mu;
  CommStats stats;
  void add_done(double busy, int64_t bytes) {
    std::lock_guard<std::mutex> lock(mu);
    stats.ops += 1;
    stats.busy_seconds += busy;
    stats.bytes += bytes;
  }
  void add_wait(double waited) {
    std::lock_guard<std::mutex> lock(mu);
    stats.wait_seconds += waited;
  }
};

#if KRAKEN_WITH_MPI
// A host operation for the communication thread: either `run` (a collective, executed to completion)
// or `post` (point-to-point requests, polled until complete), then `after` (e.g. the division of an
// average), all on the communication thread.
class HostOp : public PendingOp {
 public:
  const char* what = "";
  std::function<void(MPI_Comm)> run;
  std::function<void(MPI_Comm, std::vector<MPI_Request>*, std::vector<int64_t>*)> post;
  std::function<void()> after;  // the closures hold the operation's tensors until it completes
  int64_t bytes = 0;
  std::shared_ptr<StatsCounter> stats;

  // Communication-thread state.
  std::vector<MPI_Request> requests;
  std::vector<int64_t> expected_bytes;  // per request: the bytes a receive must get (-1 for sends)
  Clock::time_point started;

  void complete(std::exception_ptr error);
  void wait() override;
  bool done() const override { return finished_.load(std::memory_order_acquire); }
  double seconds() const override { return done() ? seconds_ : 0.0; }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<bool> finished_{false};
  std::exception_ptr error_;
  double seconds_ = 0.0;
};

// The communication thread of one communicator and the MPI_Comm it owns.
class MpiQueue {
 public:
  MpiQueue(MPI_Comm owned, std::string name);
  ~MpiQueue();
  MpiQueue(const MpiQueue&) = delete;
  MpiQueue& operator=(const MpiQueue&) = delete;
  Handle submit(std::shared_ptr<HostOp> op);

 private:
  struct Shared;
  static void loop(std::shared_ptr<Shared> shared);
  std::shared_ptr<Shared> shared_;
};
#endif

#if KRAKEN_WITH_NCCL
class NcclComm;
#endif

struct CommunicatorImpl {
  std::string name;
  int rank = 0;
  int size = 1;
  std::vector<int> world_ranks;
  std::shared_ptr<StatsCounter> stats = std::make_shared<StatsCounter>();
#if KRAKEN_WITH_MPI
  std::unique_ptr<MpiQueue> mpi;  // null for groups of one
#endif
#if KRAKEN_WITH_NCCL
  std::mutex nccl_mutex;
  std::unique_ptr<NcclComm> nccl;  // made on the first device operation (a collective call)
  int nccl_device = -1;
  ~CommunicatorImpl();
#endif
};

#if KRAKEN_WITH_MPI
// Wraps an MPI communicator (owned from now on) as a Communicator. Collective over its group.
std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm owned, const std::string& name);
#endif

#if KRAKEN_WITH_NCCL
// Device operations of one communicator on one GPU (nccl_comm.cpp).
class NcclComm {
 public:
  // Collective over the group: rank 0 makes the unique id and `broadcast_id` hands it to the others.
  NcclComm(int rank, int size, int device, const std::function<void(void*, size_t)>& broadcast_id,
           std::shared_ptr<StatsCounter> stats);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;
  Handle all_reduce(const Tensor& t, ReduceOp op);
  Handle all_gather(const Tensor& in, const Tensor& out);
  Handle reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op);
  Handle broadcast(const Tensor& t, int root);
  Handle send_recv(const std::vector<P2POp>& ops);
  // Counts every operation let go after wait() in the statistics, waiting for those still running.
  void collect_finished();

 private:
  struct State;
  std::unique_ptr<State> state_;
};
#endif

}  // namespace kraken::parallel::detail
