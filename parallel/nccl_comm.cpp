// Device collectives through NCCL, stream-ordered.
//
// Each operation: record an event on the compute stream (the data is ready there), make the
// communicator's own stream wait for it, issue the NCCL call on that stream, record a `done` event.
// Handle::wait() makes the compute stream wait for `done` (the host does not block): compute issued
// between the start and the wait overlaps the transfer, as in the host path.
//
// When the last handle goes. Its tensors' memory returns to the caching allocator, which may hand it to
// the next tensor at once; NCCL must be done with it before anything writes there.
//   - Waited on: everything that can use the memory next is ordered after `done` already — kernels and
//     copies on the compute stream (which waits for `done`), later NCCL calls (whose stream waits for an
//     event recorded on the compute stream after that), cudaFree (which synchronises the device). So the
//     handle goes without blocking the host: its events are retired to the communicator's EventPool and
//     counted in the statistics once they complete. (Until the eleventh session every handle synchronised
//     on `done` here, so a "blocking" device collective — async + wait + drop — stopped the host until
//     the GPU had finished it: once per Kraken layer, forward and backward, and at each gradient sync.)
//   - Never waited on: it synchronises on `done` before letting its tensors go.
// Device operations are counted in CommStats when their events are collected: at the communicator's
// next device operation (those that completed by then), or at Communicator::stats() (all of them, waiting
// for any still running).
#include "parallel/communicator_impl.h"

#if KRAKEN_WITH_NCCL

#include <atomic>
#include <cstring>
#include <exception>
#include <mutex>
#include <vector>

#include "runtime/allocator.h"

namespace kraken::parallel::detail {
namespace {

using runtime::DType;

ncclDataType_t nccl_type(DType d) {
  switch (d) {
    case DType::F32: return ncclFloat32;
    case DType::BF16: return ncclBfloat16;
    case DType::I32: return ncclInt32;
    case DType::U16: break;
  }
  KRAKEN_THROW("no NCCL reduction type for ", runtime::dtype_name(d));
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return ncclSum;
    case ReduceOp::Average: return ncclAvg;
    case ReduceOp::Max: return ncclMax;
    case ReduceOp::Min: return ncclMin;
  }
  return ncclSum;
}

cudaStream_t compute_stream_of(int device) { return runtime::compute_stream(runtime::Device::cuda(device)); }

// Makes `device` current for the scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    KRAKEN_PAR_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) KRAKEN_PAR_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

// The timing events of one communicator's operations, reused rather than created per operation, and the
// operations whose handles went after wait(), counted once their `done` event has completed. Shared by
// the communicator and its operations (a handle may outlive the communicator). Thread-safe.
class EventPool {
 public:
  EventPool(int device, std::shared_ptr<StatsCounter> stats) : device_(device), stats_(std::move(stats)) {}
  ~EventPool() {  // no checks: a destructor must not throw
    std::lock_guard<std::mutex> lock(mu_);
    for (const Retired& r : retired_) {
      cudaEventDestroy(r.start);
      cudaEventDestroy(r.done);
    }
    for (cudaEvent_t e : free_) cudaEventDestroy(e);
  }
  EventPool(const EventPool&) = delete;
  EventPool& operator=(const EventPool&) = delete;

  // A free event of the pool's device (new if none is free); the caller records it before reading it.
  cudaEvent_t take() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        cudaEvent_t e = free_.back();
        free_.pop_back();
        return e;
      }
    }
    DeviceGuard guard(device_);
    cudaEvent_t e = nullptr;
    KRAKEN_PAR_CUDA_CHECK(cudaEventCreate(&e));
    return e;
  }
  // An operation waited on and let go: counted (and its events freed) by a later collect().
  void retire(cudaEvent_t start, cudaEvent_t done, int64_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    retired_.push_back({start, done, bytes});
  }
  // Counts the retired operations that have completed; with `block`, waits for all of them first.
  void collect(bool block) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t kept = 0;
    for (const Retired& r : retired_) {
      const cudaError_t status = block ? cudaEventSynchronize(r.done) : cudaEventQuery(r.done);
      if (status == cudaErrorNotReady) {
        // Not an error; cleared in case the runtime keeps it as the last error, which the next kernel's launch
        // check (cudaGetLastError) would report (PyTorch clears it after its queries for that reason).
        (void)cudaGetLastError();
        retired_[kept++] = r;
        continue;
      }
      KRAKEN_PAR_CUDA_CHECK(status);
      float ms = 0.0f;
      KRAKEN_PAR_CUDA_CHECK(cudaEventElapsedTime(&ms, r.start, r.done));
      if (stats_) stats_->add_done(ms * 1e-3, r.bytes);
      free_.push_back(r.start);
      free_.push_back(r.done);
    }
    retired_.resize(kept);
  }

 private:
  struct Retired {
    cudaEvent_t start, done;
    int64_t bytes;
  };
  const int device_;
  const std::shared_ptr<StatsCounter> stats_;
  std::mutex mu_;
  std::vector<cudaEvent_t> free_;
  std::vector<Retired> retired_;
};

class DeviceOp : public PendingOp {
 public:
  DeviceOp(int device, std::vector<Tensor> keep, int64_t bytes, std::shared_ptr<EventPool> events)
      : device_(device), keep_(std::move(keep)), bytes_(bytes), events_(std::move(events)) {
    start_ = events_->take();
    done_ = events_->take();
  }
  ~DeviceOp() override {
    // See the file comment. While unwinding after an error a peer may never come: do not wait then
    // (the job is about to be aborted; cudaEventDestroy of an event still pending is allowed). No
    // checks: a destructor must not throw.
    if (std::uncaught_exceptions() > 0) {
      cudaEventDestroy(start_);
      cudaEventDestroy(done_);
      return;
    }
    if (waited_.load()) {
      events_->retire(start_, done_, bytes_);
      return;
    }
    if (cudaEventSynchronize(done_) == cudaSuccess) {
      events_->retire(start_, done_, bytes_);
      try {
        events_->collect(false);
      } catch (...) {
      }
    } else {
      cudaEventDestroy(start_);
      cudaEventDestroy(done_);
    }
  }
  cudaEvent_t start_event() const { return start_; }
  cudaEvent_t done_event() const { return done_; }

  void wait() override {
    DeviceGuard guard(device_);
    KRAKEN_PAR_CUDA_CHECK(cudaStreamWaitEvent(compute_stream_of(device_), done_, 0));
    waited_.store(true);
  }
  bool done() const override {
    const cudaError_t status = cudaEventQuery(done_);
    if (status == cudaErrorNotReady) {
      (void)cudaGetLastError();  // (as in collect)
      return false;
    }
    KRAKEN_PAR_CUDA_CHECK(status);
    return true;
  }
  double seconds() const override {
    float ms = 0.0f;
    if (!done() || cudaEventElapsedTime(&ms, start_, done_) != cudaSuccess) return 0.0;
    return ms * 1e-3;
  }

 private:
  int device_;
  std::vector<Tensor> keep_;
  int64_t bytes_;
  std::shared_ptr<EventPool> events_;
  cudaEvent_t start_ = nullptr;
  cudaEvent_t done_ = nullptr;
  std::atomic<bool> waited_{false};  // the compute stream waits for done_ (wait() was called)
};

}  // namespace

struct NcclComm::State {
  int rank = 0;
  int size = 1;
  int device = 0;
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  cudaEvent_t ready = nullptr;
  std::shared_ptr<EventPool> events;

  // Orders the communication stream after the compute stream, runs `issue` on it, and returns a
  // handle on the completion.
  template <typename Issue>
  Handle launch(std::vector<Tensor> keep, int64_t bytes, Issue&& issue) {
    DeviceGuard guard(device);
    events->collect(false);  // the operations let go since the last one, where they have completed
    auto op = std::make_shared<DeviceOp>(device, std::move(keep), bytes, events);
    KRAKEN_PAR_CUDA_CHECK(cudaEventRecord(ready, compute_stream_of(device)));
    KRAKEN_PAR_CUDA_CHECK(cudaStreamWaitEvent(stream, ready, 0));
    KRAKEN_PAR_CUDA_CHECK(cudaEventRecord(op->start_event(), stream));
    issue();
    KRAKEN_PAR_CUDA_CHECK(cudaEventRecord(op->done_event(), stream));
    return Handle(op);
  }
};

NcclComm::NcclComm(int rank, int size, int device, const std::function<void(void*, size_t)>& broadcast_id,
                   std::shared_ptr<StatsCounter> stats)
    : state_(std::make_unique<State>()) {
  state_->rank = rank;
  state_->size = size;
  state_->device = device;
  state_->events = std::make_shared<EventPool>(device, std::move(stats));
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (rank == 0) KRAKEN_NCCL_CHECK(ncclGetUniqueId(&id));
  broadcast_id(&id, sizeof(id));
  DeviceGuard guard(device);
  KRAKEN_NCCL_CHECK(ncclCommInitRank(&state_->comm, size, id, rank));
  KRAKEN_PAR_CUDA_CHECK(cudaStreamCreateWithFlags(&state_->stream, cudaStreamNonBlocking));
  KRAKEN_PAR_CUDA_CHECK(cudaEventCreateWithFlags(&state_->ready, cudaEventDisableTiming));
}

NcclComm::~NcclComm() {
  if (!state_) return;  // no checks below: a destructor must not throw
  cudaSetDevice(state_->device);
  if (state_->stream) cudaStreamSynchronize(state_->stream);
  try {
    state_->events->collect(true);
  } catch (...) {
  }
  if (state_->comm) ncclCommDestroy(state_->comm);
  if (state_->ready) cudaEventDestroy(state_->ready);
  if (state_->stream) cudaStreamDestroy(state_->stream);
}

void NcclComm::collect_finished() { state_->events->collect(true); }

Handle NcclComm::all_reduce(const Tensor& t, ReduceOp op) {
  State& s = *state_;
  return s.launch({t}, static_cast<int64_t>(t.nbytes()), [&] {
    KRAKEN_NCCL_CHECK(ncclAllReduce(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()),
                                    nccl_op(op), s.comm, s.stream));
  });
}

Handle NcclComm::all_gather(const Tensor& in, const Tensor& out) {
  State& s = *state_;
  return s.launch({in, out}, static_cast<int64_t>(in.nbytes()), [&] {
    KRAKEN_NCCL_CHECK(ncclAllGather(in.data_ptr(), out.data_ptr(), in.nbytes(), ncclUint8, s.comm, s.stream));
  });
}

Handle NcclComm::reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op) {
  State& s = *state_;
  return s.launch({in, out}, static_cast<int64_t>(in.nbytes()), [&] {
    KRAKEN_NCCL_CHECK(ncclReduceScatter(in.data_ptr(), out.data_ptr(), static_cast<size_t>(out.numel()),
                                        nccl_type(in.dtype()), nccl_op(op), s.comm, s.stream));
  });
}

Handle NcclComm::broadcast(const Tensor& t, int root) {
  State& s = *state_;
  return s.launch({t}, static_cast<int64_t>(t.nbytes()), [&] {
    KRAKEN_NCCL_CHECK(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.nbytes(), ncclUint8, root, s.comm, s.stream));
  });
}

Handle NcclComm::send_recv(const std::vector<P2POp>& ops) {
  State& s = *state_;
  std::vector<Tensor> keep;
  int64_t bytes = 0;
  for (const P2POp& op : ops) {
    keep.push_back(op.tensor);
    bytes += static_cast<int64_t>(op.tensor.nbytes());
  }
  return s.launch(std::move(keep), bytes, [&] {
    // One group: NCCL posts every send and receive before waiting on any of them.
    KRAKEN_NCCL_CHECK(ncclGroupStart());
    for (const P2POp& op : ops) {
      if (op.kind == P2POp::Kind::Send)
        KRAKEN_NCCL_CHECK(ncclSend(op.tensor.data_ptr(), op.tensor.nbytes(), ncclUint8, op.peer, s.comm, s.stream));
      else
        KRAKEN_NCCL_CHECK(ncclRecv(op.tensor.data_ptr(), op.tensor.nbytes(), ncclUint8, op.peer, s.comm, s.stream));
    }
    KRAKEN_NCCL_CHECK(ncclGroupEnd());
  });
}

CommunicatorImpl::~CommunicatorImpl() = default;

}  // namespace kraken::parallel::detail

#endif  // KRAKEN_WITH_NCCL
