// Communicator: validation, the identity path of groups of one, and the MPI bodies of each operation
// (executed by the communication thread in mpi_queue.cpp). Device tensors go to nccl_comm.cpp.
#include "parallel/communicator.h"

#include <climits>
#include <cstring>

#include "kernels/elementwise.h"
#include "parallel/communicator_impl.h"

namespace kraken::parallel {

using runtime::DType;
using runtime::Shape;

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return "sum";
    case ReduceOp::Average: return "average";
    case ReduceOp::Max: return "max";
    case ReduceOp::Min: return "min";
  }
  return "?";
}

void Handle::wait() const {
  if (op_) op_->wait();
}
bool Handle::done() const { return !op_ || op_->done(); }
double Handle::seconds() const { return op_ ? op_->seconds() : 0.0; }

namespace {

// bf16 host tensors: all_reduce only (through an f32 copy, below); device tensors: NCCL's bf16.
void check_reduce_dtype(const char* what, const Tensor& t, ReduceOp op, bool host_bf16_ok = false) {
  const DType d = t.dtype();
  bool ok = d == DType::F32 || d == DType::I32 || (d == DType::BF16 && (t.device().is_cuda() || host_bf16_ok));
  if (op == ReduceOp::Average && d == DType::I32) ok = false;
  if (!ok)
    KRAKEN_THROW(what, ": cannot ", reduce_op_name(op), " ", t.describe(),
                 " (host tensors: f32, or i32 except average, bf16 in all_reduce; device tensors also bf16)");
}

void check_tensor(const char* what, const Tensor& t, const char* which = "tensor") {
  runtime::check_defined(what, t, which);
}

#if !KRAKEN_WITH_NCCL
[[noreturn]] void no_device_backend(const char* what, const Tensor& t) {
  KRAKEN_THROW(what, " on ", t.describe(), ": this build has no NCCL, so device tensors cannot be communicated");
}
#endif

#if KRAKEN_WITH_MPI
MPI_Datatype mpi_type(DType d) {
  switch (d) {
    case DType::F32: return MPI_FLOAT;
    case DType::I32: return MPI_INT;
    default: break;
  }
  KRAKEN_THROW("no MPI reduction type for ", runtime::dtype_name(d));
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
    case ReduceOp::Average: return MPI_SUM;  // then divided by the group size
    case ReduceOp::Max: return MPI_MAX;
    case ReduceOp::Min: return MPI_MIN;
  }
  return MPI_SUM;
}

// MPI counts are ints: larger buffers go in pieces of this many elements (or bytes).
constexpr int64_t kMaxCount = int64_t{1} << 30;

int checked_count(const char* what, int64_t count) {
  if (count > INT_MAX) KRAKEN_THROW(what, ": ", count, " elements per rank exceed MPI's int count");
  return static_cast<int>(count);
}

// Average = sum / n, divided (correctly rounded) rather than multiplied by 1/n.
void divide_in_place(const Tensor& t, int n) {
  float* p = t.data<float>();
  const float d = static_cast<float>(n);
  for (int64_t i = 0, e = t.numel(); i < e; ++i) p[i] /= d;
}

detail::MpiQueue& queue_of(detail::CommunicatorImpl& impl) {
  KRAKEN_CHECK(impl.mpi, "communicator ", impl.name, " of size ", impl.size, " has no MPI communicator");
  return *impl.mpi;
}

std::shared_ptr<detail::HostOp> host_op(detail::CommunicatorImpl& impl, const char* what, int64_t bytes) {
  auto op = std::make_shared<detail::HostOp>();
  op->what = what;
  op->bytes = bytes;
  op->stats = impl.stats;
  return op;
}
#endif

#if KRAKEN_WITH_NCCL
detail::NcclComm& nccl_of(Communicator& comm, detail::CommunicatorImpl& impl, const Tensor& t) {
  std::lock_guard<std::mutex> lock(impl.nccl_mutex);
  if (!impl.nccl) {
    // Collective: every rank reaches its first device operation on this communicator at the same point.
    auto broadcast_id = [&comm](void* bytes, size_t n) {
      KRAKEN_CHECK(n % sizeof(int32_t) == 0);
      Tensor host = Tensor::empty({static_cast<int64_t>(n / sizeof(int32_t))}, DType::I32);
      std::memcpy(host.data_ptr(), bytes, n);
      comm.broadcast(host, 0);
      std::memcpy(bytes, host.data_ptr(), n);
    };
    impl.nccl = std::make_unique<detail::NcclComm>(impl.rank, impl.size, t.device().index, broadcast_id, impl.stats);
    impl.nccl_device = t.device().index;
  }
  if (impl.nccl_device != t.device().index)
    KRAKEN_THROW("communicator ", impl.name, " works on cuda:", impl.nccl_device, ", not on ", t.describe());
  return *impl.nccl;
}
#endif

}  // namespace

// ---- construction ---------------------------------------------------------------------------------------

Communicator::Communicator(std::unique_ptr<detail::CommunicatorImpl> impl) : impl_(std::move(impl)) {
  KRAKEN_CHECK(impl_ != nullptr);
}

Communicator::~Communicator() = default;

std::unique_ptr<Communicator> Communicator::single(const std::string& name) {
  auto impl = std::make_unique<detail::CommunicatorImpl>();
  impl->name = name;
  impl->world_ranks = {0};
  return std::make_unique<Communicator>(std::move(impl));
}

int Communicator::rank() const { return impl_->rank; }
int Communicator::size() const { return impl_->size; }
const std::string& Communicator::name() const { return impl_->name; }
const std::vector<int>& Communicator::world_ranks() const { return impl_->world_ranks; }

CommStats Communicator::stats() const {
#if KRAKEN_WITH_NCCL
  {
    // Device operations count when their events are collected (nccl_comm.cpp): all of them, here.
    std::lock_guard<std::mutex> lock(impl_->nccl_mutex);
    if (impl_->nccl) impl_->nccl->collect_finished();
  }
#endif
  std::lock_guard<std::mutex> lock(impl_->stats->mu);
  return impl_->stats->stats;
}

void Communicator::reset_stats() {
  std::lock_guard<std::mutex> lock(impl_->stats->mu);
  impl_->stats->stats = CommStats{};
}

// ---- collectives --------------------------------------------------------------------------------------------

void Communicator::all_reduce(const Tensor& t, ReduceOp op) { all_reduce_async(t, op).wait(); }

Handle Communicator::all_reduce_async(const Tensor& t, ReduceOp op) {
  check_tensor("all_reduce", t);
  check_reduce_dtype("all_reduce", t, op, /*host_bf16_ok=*/true);
  if (impl_->size == 1) return Handle();  // op over one rank is the identity
  if (t.device().is_cuda()) {
#if KRAKEN_WITH_NCCL
    return nccl_of(*this, *impl_, t).all_reduce(t, op);
#else
    no_device_backend("all_reduce", t);
#endif
  }
#if KRAKEN_WITH_MPI
  auto host = host_op(*impl_, "all_reduce", static_cast<int64_t>(t.nbytes()));
  // MPI has no bf16: a bf16 tensor (mixed precision's activations on the CPU) is reduced as an f32
  // copy, the result rounded back once, as the bf16 kernels do (runtime/ops/precision.h).
  const bool widened = t.dtype() == DType::BF16;
  const Tensor target = widened ? t.to(DType::F32) : t;
  host->run = [target, op](MPI_Comm comm) {
    char* base = static_cast<char*>(target.data_ptr());
    const size_t elem = runtime::dtype_size(target.dtype());
    for (int64_t offset = 0; offset < target.numel(); offset += kMaxCount) {
      const int count = static_cast<int>(std::min(kMaxCount, target.numel() - offset));
      KRAKEN_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, base + static_cast<size_t>(offset) * elem, count,
                                     mpi_type(target.dtype()), mpi_op(op), comm));
    }
  };
  if (op == ReduceOp::Average || widened) {
    const int n = op == ReduceOp::Average ? impl_->size : 1;
    host->after = [t, target, n, widened] {
      if (n > 1) divide_in_place(target, n);
      if (widened) kernels::cast_f32_to_bf16_cpu(t.data<uint16_t>(), target.data<float>(), t.numel());
    };
  }
  return queue_of(*impl_).submit(host);
#else
  KRAKEN_CHECK(false, "a group of ", impl_->size, " ranks in a build without MPI");
  return Handle();
#endif
}

Tensor Communicator::all_gather(const Tensor& in) {
  check_tensor("all_gather", in, "input");
  if (in.dim() == 0) KRAKEN_THROW("all_gather: input ", in.describe(), " is a scalar; it needs a dim 0");
  Shape shape = in.shape();
  shape[0] *= impl_->size;
  Tensor out = Tensor::empty(shape, in.dtype(), in.device());
  all_gather_async(in, out).wait();
  return out;
}

Handle Communicator::all_gather_async(const Tensor& in, const Tensor& out) {
  check_tensor("all_gather", in, "input");
  check_tensor("all_gather", out, "output");
  runtime::check_same_device("all_gather", in, out);
  Shape expected = in.shape();
  if (expected.empty()) KRAKEN_THROW("all_gather: input ", in.describe(), " is a scalar; it needs a dim 0");
  expected[0] *= impl_->size;
  if (out.shape() != expected || out.dtype() != in.dtype())
    KRAKEN_THROW("all_gather: output ", out.describe(), " should be ", runtime::dtype_name(in.dtype()), " ",
                 runtime::shape_str(expected), " for input ", in.describe(), " on ", impl_->size, " ranks");
  if (impl_->size == 1) {
    Tensor(out).copy_from(in);  // a handle: writes into out's storage
    return Handle();
  }
  if (in.device().is_cuda()) {
#if KRAKEN_WITH_NCCL
    return nccl_of(*this, *impl_, in).all_gather(in, out);
#else
    no_device_backend("all_gather", in);
#endif
  }
#if KRAKEN_WITH_MPI
  auto host = host_op(*impl_, "all_gather", static_cast<int64_t>(in.nbytes()));
  const int bytes = checked_count("all_gather", static_cast<int64_t>(in.nbytes()));
  host->run = [in, out, bytes](MPI_Comm comm) {
    KRAKEN_MPI_CHECK(MPI_Allgather(in.data_ptr(), bytes, MPI_BYTE, out.data_ptr(), bytes, MPI_BYTE, comm));
  };
  return queue_of(*impl_).submit(host);
#else
  return Handle();
#endif
}

Tensor Communicator::reduce_scatter(const Tensor& in, ReduceOp op) {
  check_tensor("reduce_scatter", in, "input");
  if (in.dim() == 0 || in.size(0) % impl_->size != 0)
    KRAKEN_THROW("reduce_scatter: dim 0 of ", in.describe(), " must be a multiple of the group size ", impl_->size);
  Shape shape = in.shape();
  shape[0] /= impl_->size;
  Tensor out = Tensor::empty(shape, in.dtype(), in.device());
  reduce_scatter_async(in, out, op).wait();
  return out;
}

Handle Communicator::reduce_scatter_async(const Tensor& in, const Tensor& out, ReduceOp op) {
  check_tensor("reduce_scatter", in, "input");
  check_tensor("reduce_scatter", out, "output");
  check_reduce_dtype("reduce_scatter", in, op);
  runtime::check_same_device("reduce_scatter", in, out);
  if (in.dim() == 0 || in.size(0) % impl_->size != 0)
    KRAKEN_THROW("reduce_scatter: dim 0 of ", in.describe(), " must be a multiple of the group size ", impl_->size);
  Shape expected = in.shape();
  expected[0] /= impl_->size;
  if (out.shape() != expected || out.dtype() != in.dtype())
    KRAKEN_THROW("reduce_scatter: output ", out.describe(), " should be ", runtime::dtype_name(in.dtype()), " ",
                 runtime::shape_str(expected), " for input ", in.describe(), " on ", impl_->size, " ranks");
  if (impl_->size == 1) {
    Tensor(out).copy_from(in);  // a handle: writes into out's storage
    return Handle();
  }
  if (in.device().is_cuda()) {
#if KRAKEN_WITH_NCCL
    return nccl_of(*this, *impl_, in).reduce_scatter(in, out, op);
#else
    no_device_backend("reduce_scatter", in);
#endif
  }
#if KRAKEN_WITH_MPI
  auto host = host_op(*impl_, "reduce_scatter", static_cast<int64_t>(in.nbytes()));
  const int count = checked_count("reduce_scatter", out.numel());
  host->run = [in, out, count, op](MPI_Comm comm) {
    KRAKEN_MPI_CHECK(
        MPI_Reduce_scatter_block(in.data_ptr(), out.data_ptr(), count, mpi_type(in.dtype()), mpi_op(op), comm));
  };
  if (op == ReduceOp::Average) {
    const int n = impl_->size;
    host->after = [out, n] { divide_in_place(out, n); };
  }
  return queue_of(*impl_).submit(host);
#else
  return Handle();
#endif
}

void Communicator::broadcast(const Tensor& t, int root) { broadcast_async(t, root).wait(); }

Handle Communicator::broadcast_async(const Tensor& t, int root) {
  check_tensor("broadcast", t);
  if (root < 0 || root >= impl_->size)
    KRAKEN_THROW("broadcast: root ", root, " is not a rank of communicator ", impl_->name, " (size ", impl_->size, ")");
  if (impl_->size == 1) return Handle();
  if (t.device().is_cuda()) {
#if KRAKEN_WITH_NCCL
    return nccl_of(*this, *impl_, t).broadcast(t, root);
#else
    no_device_backend("broadcast", t);
#endif
  }
#if KRAKEN_WITH_MPI
  auto host = host_op(*impl_, "broadcast", static_cast<int64_t>(t.nbytes()));
  host->run = [t, root](MPI_Comm comm) {
    char* base = static_cast<char*>(t.data_ptr());
    const int64_t total = static_cast<int64_t>(t.nbytes());
    for (int64_t offset = 0; offset < total; offset += kMaxCount) {
      const int count = static_cast<int>(std::min(kMaxCount, total - offset));
      KRAKEN_MPI_CHECK(MPI_Bcast(base + offset, count, MPI_BYTE, root, comm));
    }
  };
  return queue_of(*impl_).submit(host);
#else
  return Handle();
#endif
}

void Communicator::barrier() {
  if (impl_->size == 1) return;
#if KRAKEN_WITH_MPI
  auto host = host_op(*impl_, "barrier", 0);
  host->run = [](MPI_Comm comm) { KRAKEN_MPI_CHECK(MPI_Barrier(comm)); };
  queue_of(*impl_).submit(host).wait();
#endif
}

// ---- point to point --------------------------------------------------------------------------------------

void Communicator::send(const Tensor& t, int dst, int tag) { send_async(t, dst, tag).wait(); }
void Communicator::recv(const Tensor& t, int src, int tag) { recv_async(t, src, tag).wait(); }

Handle Communicator::send_async(const Tensor& t, int dst, int tag) {
  return send_recv_async({P2POp{P2POp::Kind::Send, t, dst, tag}});
}

Handle Communicator::recv_async(const Tensor& t, int src, int tag) {
  return send_recv_async({P2POp{P2POp::Kind::Recv, t, src, tag}});
}

Handle Communicator::send_recv_async(const std::vector<P2POp>& ops) {
  if (ops.empty()) return Handle();
  int64_t bytes = 0;
  for (const P2POp& op : ops) {
    const char* what = op.kind == P2POp::Kind::Send ? "send" : "recv";
    check_tensor(what, op.tensor);
    if (op.peer < 0 || op.peer >= impl_->size || op.peer == impl_->rank)
      KRAKEN_THROW(what, ": peer ", op.peer, " is not another rank of communicator ", impl_->name, " (rank ",
                   impl_->rank, " of ", impl_->size, ")");
    if (op.tag < 0 || op.tag > kMaxTag) KRAKEN_THROW(what, ": tag ", op.tag, " outside 0…", kMaxTag);
    if (op.tensor.device().is_cuda() != ops[0].tensor.device().is_cuda())
      KRAKEN_THROW("send_recv: mixes host and device tensors (", ops[0].tensor.describe(), ", ",
                   op.tensor.describe(), ")");
    bytes += static_cast<int64_t>(op.tensor.nbytes());
  }
  if (ops[0].tensor.device().is_cuda()) {
#if KRAKEN_WITH_NCCL
    return nccl_of(*this, *impl_, ops[0].tensor).send_recv(ops);
#else
    no_device_backend("send_recv", ops[0].tensor);
#endif
  }
#if KRAKEN_WITH_MPI
  auto host = host_op(*impl_, ops.size() == 1 ? (ops[0].kind == P2POp::Kind::Send ? "send" : "recv") : "send_recv",
                      bytes);
  host->post = [ops](MPI_Comm comm, std::vector<MPI_Request>* requests, std::vector<int64_t>* expected) {
    for (const P2POp& op : ops) {
      char* base = static_cast<char*>(op.tensor.data_ptr());
      const int64_t total = static_cast<int64_t>(op.tensor.nbytes());
      // Pieces of one message share the tag; MPI keeps messages of one pair and tag in order.
      for (int64_t offset = 0; offset < total || (total == 0 && offset == 0); offset += kMaxCount) {
        const int count = static_cast<int>(std::min(kMaxCount, total - offset));
        MPI_Request request = MPI_REQUEST_NULL;
        if (op.kind == P2POp::Kind::Send) {
          KRAKEN_MPI_CHECK(MPI_Isend(base + offset, count, MPI_BYTE, op.peer, op.tag, comm, &request));
          expected->push_back(-1);
        } else {
          KRAKEN_MPI_CHECK(MPI_Irecv(base + offset, count, MPI_BYTE, op.peer, op.tag, comm, &request));
          expected->push_back(count);
        }
        requests->push_back(request);
        if (total == 0) break;
      }
    }
  };
  return queue_of(*impl_).submit(host);
#else
  return Handle();
#endif
}

// ---- MPI groups ----------------------------------------------------------------------------------------------

#if KRAKEN_WITH_MPI
namespace detail {
std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm owned, const std::string& name) {
  auto impl = std::make_unique<CommunicatorImpl>();
  impl->name = name;
  KRAKEN_MPI_CHECK(MPI_Comm_rank(owned, &impl->rank));
  KRAKEN_MPI_CHECK(MPI_Comm_size(owned, &impl->size));
  MPI_Group group = MPI_GROUP_NULL, world = MPI_GROUP_NULL;
  KRAKEN_MPI_CHECK(MPI_Comm_group(owned, &group));
  KRAKEN_MPI_CHECK(MPI_Comm_group(MPI_COMM_WORLD, &world));
  std::vector<int> ranks(static_cast<size_t>(impl->size));
  for (int i = 0; i < impl->size; ++i) ranks[static_cast<size_t>(i)] = i;
  impl->world_ranks.resize(ranks.size());
  KRAKEN_MPI_CHECK(MPI_Group_translate_ranks(group, impl->size, ranks.data(), world, impl->world_ranks.data()));
  KRAKEN_MPI_CHECK(MPI_Group_free(&group));
  KRAKEN_MPI_CHECK(MPI_Group_free(&world));
  if (impl->size > 1) {
    impl->mpi = std::make_unique<MpiQueue>(owned, name);
  } else {
    KRAKEN_MPI_CHECK(MPI_Comm_free(&owned));  // a group of one never communicates
  }
  return std::make_unique<Communicator>(std::move(impl));
}
}  // namespace detail
#endif

}  // namespace kraken::parallel
