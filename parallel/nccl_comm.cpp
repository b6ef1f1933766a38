// Device collectives through NCCL, stream-ordered.
//
// Each operation: record an event on the compute stream (the data is ready there), make the
// communicator's own stream wait for it, issue the NCCL call on that stream, record a `done` event.
// Handle::wait() makes the compute stream wait for `done` (the host does not block): compute issued
// between the start and the wait overlaps the transfer, as in the host path. An operation whose handle
// is dropped unwaited synchronises on `done` before letting its tensors go, so their memory is never
// reused while NCCL still reads or writes it.
#include "parallel/communicator_impl.h"

#if KRAKEN_WITH_NCCL

#include <cstring>
#include <exception>

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

class DeviceOp : public PendingOp {
 public:
  DeviceOp(int device, std::vector<Tensor> keep, int64_t bytes, std::shared_ptr<StatsCounter> stats)
      : device_(device), keep_(std::move(keep)), bytes_(bytes), stats_(std::move(stats)) {
    KRAKEN_PAR_CUDA_CHECK(cudaEventCreate(&start_));
    KRAKEN_PAR_CUDA_CHECK(cudaEventCreate(&done_));
  }
  ~DeviceOp() override {
    // See the file comment. While unwinding after an error a peer may never come: do not wait then
    // (the job is about to be aborted). No checks: a destructor must not throw.
    if (std::uncaught_exceptions() == 0 && cudaEventSynchronize(done_) == cudaSuccess) {
      float ms = 0.0f;
      if (cudaEventElapsedTime(&ms, start_, done_) == cudaSuccess && stats_) stats_->add_done(ms * 1e-3, bytes_);
    }
    cudaEventDestroy(start_);
    cudaEventDestroy(done_);
  }
  cudaEvent_t start_event() const { return start_; }
  cudaEvent_t done_event() const { return done_; }

  void wait() override {
    DeviceGuard guard(device_);
    KRAKEN_PAR_CUDA_CHECK(cudaStreamWaitEvent(compute_stream_of(device_), done_, 0));
  }
  bool done() const override {
    const cudaError_t status = cudaEventQuery(done_);
    if (status == cudaErrorNotReady) return false;
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
  std::shared_ptr<StatsCounter> stats_;
  cudaEvent_t start_ = nullptr;
  cudaEvent_t done_ = nullptr;
};

}  // namespace

struct NcclComm::State {
  int rank = 0;
  int size = 1;
  int device = 0;
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  cudaEvent_t ready = nullptr;
  std::shared_ptr<StatsCounter> stats;

  // Orders the communication stream after the compute stream, runs `issue` on it, and returns a
  // handle on the completion.
  template <typename Issue>
  Handle launch(std::vector<Tensor> keep, int64_t bytes, Issue&& issue) {
    DeviceGuard guard(device);
    auto op = std::make_shared<DeviceOp>(device, std::move(keep), bytes, stats);
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
  state_->stats = std::move(stats);
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
  if (state_->comm) ncclCommDestroy(state_->comm);
  if (state_->ready) cudaEventDestroy(state_->ready);
  if (state_->stream) cudaStreamDestroy(state_->stream);
}

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
