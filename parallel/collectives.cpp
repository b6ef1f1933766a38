// Collectives as autograd ops. Backward closures capture the group by pointer: groups live in the
// Mesh, which outlives every graph of a training step.
#include "parallel/collectives.h"

#include "kernels/error.h"
#include "runtime/allocator.h"
#include "runtime/autograd.h"

namespace kraken::parallel {

using runtime::DType;
using runtime::Shape;

namespace {

// A new tensor handle over x's storage: an op's output must be a fresh tensor, not x itself.
Tensor alias_of(const Tensor& x) {
  return Tensor::from_storage(x.impl()->storage, x.impl()->offset, x.shape(), x.dtype());
}

// (…, c) → (…, tp·c) from the all-gathered (tp·rows, c): rank r's rows become columns [r·c, (r+1)·c).
Tensor gather_last_dim(const Tensor& x, Communicator& group) {
  const int64_t c = x.size(-1);
  const int64_t rows = c == 0 ? 0 : x.numel() / c;
  const int tp = group.size();
  Tensor gathered = group.all_gather(alias_of(x).reshape({rows, c}));
  Shape shape = x.shape();
  shape.back() = c * tp;
  Tensor out = Tensor::empty(shape, x.dtype(), x.device());
  const size_t elem = runtime::dtype_size(x.dtype());
  for (int r = 0; r < tp; ++r)
    runtime::copy_2d(static_cast<char*>(out.data_ptr()) + static_cast<size_t>(r * c) * elem,
                     static_cast<size_t>(tp * c) * elem,
                     static_cast<const char*>(gathered.data_ptr()) + static_cast<size_t>(r * rows * c) * elem,
                     static_cast<size_t>(c) * elem, static_cast<size_t>(c) * elem, static_cast<size_t>(rows),
                     x.device());
  return out;
}

// (…, C) → (…, C/tp): this rank's columns.
Tensor slice_last_dim(const Tensor& x, Communicator& group) {
  const int tp = group.size();
  const int64_t full = x.size(-1);
  if (full % tp != 0)
    KRAKEN_THROW("scatter_to_tp: last dimension of ", x.describe(), " is not a multiple of the group size ", tp);
  const int64_t c = full / tp;
  const int64_t rows = full == 0 ? 0 : x.numel() / full;
  Shape shape = x.shape();
  shape.back() = c;
  Tensor out = Tensor::empty(shape, x.dtype(), x.device());
  const size_t elem = runtime::dtype_size(x.dtype());
  runtime::copy_2d(out.data_ptr(), static_cast<size_t>(c) * elem,
                   static_cast<const char*>(x.data_ptr()) + static_cast<size_t>(group.rank() * c) * elem,
                   static_cast<size_t>(full) * elem, static_cast<size_t>(c) * elem, static_cast<size_t>(rows),
                   x.device());
  return out;
}

void check_input(const char* op, const Tensor& x) {
  runtime::check_defined(op, x);
  if (x.dtype() != DType::F32 && x.dtype() != DType::BF16)
    KRAKEN_THROW(op, ": ", x.describe(), " is not f32 or bf16 (activations)");
}

}  // namespace

// ---- Megatron's pair ---------------------------------------------------------------------------------------

Tensor copy_to_tp(const Tensor& x, Communicator& group) {
  check_input("copy_to_tp", x);
  Tensor out = alias_of(x);
  if (runtime::needs_grad({x})) {
    Communicator* g = &group;
    runtime::record("copy_to_tp", {x}, {out}, [g](const std::vector<Tensor>& grads) {
      // in the forward pass this was: out = x on every rank, each rank's out feeding its own part of
      // the layer; so dL/dx = Σ_ranks dL/dout (a copy: dout may be shared with other inputs)
      Tensor dx = grads[0].clone();
      g->all_reduce(dx, ReduceOp::Sum);
      return std::vector<Tensor>{dx};
    });
  }
  return out;
}

Tensor reduce_from_tp(const Tensor& x, Communicator& group) {
  check_input("reduce_from_tp", x);
  Tensor out = x.clone();
  group.all_reduce(out, ReduceOp::Sum);
  if (runtime::needs_grad({x})) {
    runtime::record("reduce_from_tp", {x}, {out}, [](const std::vector<Tensor>& grads) {
      // in the forward pass this was: out = Σ_ranks x, the same out on every rank; the loss counts each
      // rank's copy once, so dL/dx = dL/dout on each rank
      return std::vector<Tensor>{grads[0]};
    });
  }
  return out;
}

Tensor gather_from_tp(const Tensor& x, Communicator& group) {
  check_input("gather_from_tp", x);
  if (x.dim() == 0) KRAKEN_THROW("gather_from_tp: ", x.describe(), " has no last dimension");
  Tensor out = gather_last_dim(x, group);
  if (runtime::needs_grad({x})) {
    Communicator* g = &group;
    runtime::record("gather_from_tp", {x}, {out}, [g](const std::vector<Tensor>& grads) {
      // in the forward pass this was: out = concat_ranks(x) along the last dim; dx = this rank's columns
      return std::vector<Tensor>{slice_last_dim(grads[0], *g)};
    });
  }
  return out;
}

Tensor scatter_to_tp(const Tensor& x, Communicator& group) {
  check_input("scatter_to_tp", x);
  if (x.dim() == 0) KRAKEN_THROW("scatter_to_tp: ", x.describe(), " has no last dimension");
  Tensor out = slice_last_dim(x, group);
  if (runtime::needs_grad({x})) {
    Communicator* g = &group;
    runtime::record("scatter_to_tp", {x}, {out}, [g](const std::vector<Tensor>& grads) {
      // in the forward pass this was: out = x[…, rank·c : (rank+1)·c] (x the same on every rank);
      // dx = concat_ranks(dout) along the last dim
      return std::vector<Tensor>{gather_last_dim(grads[0], *g)};
    });
  }
  return out;
}

// ---- Kraken's asynchronous pair ------------------------------------------------------------------------------

PendingReduce start_all_reduce(const Tensor& x, Communicator& group) {
  runtime::check_defined("start_all_reduce", x);
  PendingReduce pending;
  // A copy: the sum must not overwrite x, which its own residual stream still uses.
  Tensor buffer = x.clone();
  // Overlaps whatever the caller computes before wait_all_reduce (Kraken: the next layer's attention).
  pending.handle_ = group.all_reduce_async(buffer, ReduceOp::Sum);
  pending.group_ = &group;
  if (runtime::needs_grad({x})) {
    auto state = std::make_shared<detail::KrakenReduceState>();
    pending.state_ = state;
    runtime::record("start_all_reduce", {x}, {buffer}, [state](const std::vector<Tensor>& grads) {
      // in the forward pass this was: buffer = x, summed over ranks by wait_all_reduce. grads[0] is the
      // buffer wait_all_reduce's backward is all-reducing (Σ_ranks dL/dS); the compute the engine ran
      // since then (the attention backward) hid the transfer, and this is where it is waited on.
      state->backward.wait();
      state->backward = Handle();
      return std::vector<Tensor>{grads[0]};
    });
  }
  pending.buffer_ = buffer;
  return pending;
}

Tensor wait_all_reduce(PendingReduce& pending) {
  if (!pending.valid())
    KRAKEN_THROW("wait_all_reduce: nothing pending (it was already waited on, or never started)");
  Tensor buffer = pending.buffer_;
  pending.buffer_ = Tensor();
  // The forward sum is consumed here (Kraken: at LN2 of the layer after the one that produced x).
  pending.handle_.wait();
  Tensor sum = alias_of(buffer);
  if (runtime::needs_grad({buffer})) {
    std::shared_ptr<detail::KrakenReduceState> state = pending.state_;
    Communicator* group = pending.group_;
    runtime::record("wait_all_reduce", {buffer}, {sum}, [state, group](const std::vector<Tensor>& grads) {
      // in the forward pass this was: S = Σ_ranks x, with S consumed on every rank, so
      // dL/dx = Σ_ranks dL/dS. Start that sum now, behind the backward of the compute between the pair;
      // start_all_reduce's backward waits for it. (A copy: dS may be shared with other inputs.)
      Tensor grad = grads[0].clone();
      state->backward = group->all_reduce_async(grad, ReduceOp::Sum);
      return std::vector<Tensor>{grad};
    });
  }
  return sum;
}

}  // namespace kraken::parallel
