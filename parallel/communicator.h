// Communicator: collectives and point-to-point messages over one group of ranks.
//
// Host tensors go through MPI, device tensors through NCCL (built when CUDA and NCCL are found; its
// unique id travels over MPI). A group of one rank, a process started without mpirun and a build
// without MPI all take the same path: every collective is an identity and costs nothing.
//
// ORDER. Collectives on a communicator must be issued in the same order on every rank of its group,
// blocking and asynchronous ones alike (MPI and NCCL match them by order, not by name). Point-to-point
// messages are matched by (peer, tag), non-overtaking between one pair; NCCL ignores tags, so on
// device tensors sends and receives must also be issued in matching order.
//
// PROGRESS (host). Open MPI does not progress a non-blocking collective between MPI calls, so an
// MPI_Iallreduce started before a backward pass would mostly run when it is waited on. Instead every
// communicator owns a communication thread (started on first use) that executes queued operations in
// issue order on the communicator's own MPI_Comm: collectives run to completion there (blocking MPI
// calls, so they progress while the caller computes), point-to-point messages are posted non-blocking
// and polled, so a posted receive never blocks the sends queued behind it (1F1B exchanges both ways).
// Blocking calls are an asynchronous call plus wait(), so everything on a communicator keeps one order.
// Measured by bench/allreduce_bench.cpp (2 ranks on the 2-core CI machine): the hand-off costs about
// 5 µs per call (1 KB: 5.4 µs against 0.5 µs for MPI_Allreduce on the caller's thread; equal from
// 256 KB up). While the caller's core is free (a GPU computing, a rank waiting on a pipeline peer),
// 96–100% of a 1–64 MB all-reduce is hidden, against 0% for MPI_Iallreduce with no thread. While every
// core computes, nothing is hidden: on CPU ranks the reduction itself needs a core.
//
// DEVICE. NCCL operations run on a communication stream after an event recorded on the compute stream
// (so they see the data the compute stream produced); Handle::wait() makes the compute stream wait for
// them (it does not block the host), so "blocking" device calls order later kernels, not the CPU; letting
// a waited handle go does not block either (an unwaited one waits for its operation first, so its tensors
// are never reused while NCCL uses them). stats() counts device operations once it has waited for those
// still running (nccl_comm.cpp).
//
// In-place operations (all_reduce, broadcast, recv) write into the tensor they are given; a Tensor is a
// handle, so they take it by const reference. An operation keeps its tensors alive until it completes.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace kraken::parallel {

using runtime::Tensor;

enum class ReduceOp { Sum, Average, Max, Min };
const char* reduce_op_name(ReduceOp op);

namespace detail {
// One asynchronous operation in flight (host: on the communication thread; device: on a stream).
class PendingOp {
 public:
  virtual ~PendingOp() = default;
  virtual void wait() = 0;          // rethrows the operation's error
  virtual bool done() const = 0;    // never blocks
  virtual double seconds() const = 0;  // how long it ran, once done (0 before)
};
struct CommunicatorImpl;
struct StatsCounter;
}  // namespace detail

// A handle on an asynchronous operation. Copies share the operation. A default handle is complete
// (what groups of one rank return). Wait on every handle before using (or freeing) its tensors.
class Handle {
 public:
  Handle() = default;
  explicit Handle(std::shared_ptr<detail::PendingOp> op) : op_(std::move(op)) {}
  // Host: blocks until the result is in the tensors (rethrows a failure). Device: orders the compute
  // stream after the operation.
  void wait() const;
  bool done() const;
  // How long the operation itself took (on the communication thread or the device), once done.
  double seconds() const;

 private:
  std::shared_ptr<detail::PendingOp> op_;
};

// One half of a point-to-point exchange, for send_recv_async.
struct P2POp {
  enum class Kind { Send, Recv };
  Kind kind = Kind::Send;
  Tensor tensor;  // sent from, or received into (its shape and dtype must match the sender's)
  int peer = 0;   // rank in this communicator
  int tag = 0;    // 0 … kMaxTag (MPI only)
};

struct CommStats {
  int64_t ops = 0;            // operations completed
  int64_t bytes = 0;          // payload bytes of those operations (per rank)
  double busy_seconds = 0.0;  // Σ how long they ran on the communication thread or device
  double wait_seconds = 0.0;  // Σ how long callers blocked in Handle::wait()
};

class Communicator {
 public:
  static constexpr int kMaxTag = 32767;  // the smallest MPI_TAG_UB MPI allows

  // A group of just this process (rank 0 of 1, world rank 0): a world of one, or a test's stand-in.
  static std::unique_ptr<Communicator> single(const std::string& name = "self");

  explicit Communicator(std::unique_ptr<detail::CommunicatorImpl> impl);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const;
  int size() const;
  const std::string& name() const;
  // The world rank of each member, in group-rank order.
  const std::vector<int>& world_ranks() const;

  // ---- collectives (every rank of the group, same order) -------------------------------------------
  // In place: t ← op over ranks of t. Host: f32 (all ops), i32 (not Average). Device: f32, bf16, i32.
  void all_reduce(const Tensor& t, ReduceOp op = ReduceOp::Sum);
  Handle all_reduce_async(const Tensor& t, ReduceOp op = ReduceOp::Sum);
  // Concatenates every rank's `in` along dim 0 in rank order: (size·N, …) from (N, …). Any dtype.
  Tensor all_gather(const Tensor& in);
  Handle all_gather_async(const Tensor& in, const Tensor& out);
  // Reduces `in` (size·N, …) over ranks and keeps this rank's rows [rank·N, (rank+1)·N): (N, …).
  Tensor reduce_scatter(const Tensor& in, ReduceOp op = ReduceOp::Sum);
  Handle reduce_scatter_async(const Tensor& in, const Tensor& out, ReduceOp op = ReduceOp::Sum);
  // In place: every rank's t ← root's t. Any dtype.
  void broadcast(const Tensor& t, int root);
  Handle broadcast_async(const Tensor& t, int root);
  void barrier();

  // ---- point to point ---------------------------------------------------------------------------------
  void send(const Tensor& t, int dst, int tag = 0);
  void recv(const Tensor& t, int src, int tag = 0);  // into t, whose shape and dtype must match
  Handle send_async(const Tensor& t, int dst, int tag = 0);
  Handle recv_async(const Tensor& t, int src, int tag = 0);
  // Posts all of `ops` together (NCCL: one group), so that two ranks may each send to and receive
  // from the other without either waiting for the other's receive to be posted first.
  Handle send_recv_async(const std::vector<P2POp>& ops);

  // ---- accounting -------------------------------------------------------------------------------------
  CommStats stats() const;
  void reset_stats();

 private:
  std::unique_ptr<detail::CommunicatorImpl> impl_;
};

}  // namespace kraken::parallel
