// Collectives as autograd ops, in named mirror pairs called at one visible spot per layer.
//
// Megatron-LM's pair for tensor-parallel layers (column-parallel linear, then row-parallel linear):
//   copy_to_tp(x, group)      forward: identity          backward: all-reduce (sum) of dx
//   reduce_from_tp(y, group)  forward: all-reduce (sum)  backward: identity
// and, for a vocabulary-parallel head, split/gather along the last dimension:
//   scatter_to_tp(x, group)   forward: keep this rank's slice of the last dim   backward: all-gather
//   gather_from_tp(x, group)  forward: all-gather along the last dim            backward: keep own slice
//
// Kraken's pair, asynchronous in both directions (research/kraken.md, "Parallel mapping"):
//   PendingReduce p = start_all_reduce(x, group);   // S = Σ_ranks x starts on the communication thread
//   … compute that does not need S (the next layer's attention) …
//   Tensor s = wait_all_reduce(p);                   // blocks only for what is left of the transfer
// S is consumed on every rank, so dL/dx = Σ_ranks dL/dS: backward needs one all-reduce as well. The
// wait op's backward STARTS it (as soon as dS exists, i.e. after the MLP and LN2 backward of the layer
// that consumed S); the start op's backward, which the engine reaches later — the attention backward
// recorded between the two ops runs in between — WAITS for it. So the forward transfer hides behind the
// next layer's attention forward and the backward transfer behind its attention backward.
//
// Every rank of the group must call these in the same order (they are collectives), and a rank whose S
// takes no part in its loss still runs the backward of its pair only if the others do: keep the graphs
// of all ranks alike.
#pragma once

#include <memory>

#include "parallel/communicator.h"

namespace kraken::parallel {

Tensor copy_to_tp(const Tensor& x, Communicator& group);
Tensor reduce_from_tp(const Tensor& x, Communicator& group);
// x (…, C/tp) → (…, C), ranks' slices side by side in rank order. f32.
Tensor gather_from_tp(const Tensor& x, Communicator& group);
// x (…, C) → (…, C/tp), this rank's slice. C must be a multiple of the group size. f32.
Tensor scatter_to_tp(const Tensor& x, Communicator& group);

namespace detail {
// Shared by the two backward closures of one pair: the wait op's backward starts the gradient's
// all-reduce, the start op's backward waits for it.
struct KrakenReduceState {
  Handle backward;
};
}  // namespace detail

// A sum that is on its way. Move-only; wait on it exactly once.
class PendingReduce {
 public:
  PendingReduce() = default;
  PendingReduce(PendingReduce&&) = default;
  PendingReduce& operator=(PendingReduce&&) = default;
  PendingReduce(const PendingReduce&) = delete;
  PendingReduce& operator=(const PendingReduce&) = delete;
  bool valid() const { return buffer_.defined(); }
  bool done() const { return handle_.done(); }  // never blocks

 private:
  friend PendingReduce start_all_reduce(const Tensor& x, Communicator& group);
  friend Tensor wait_all_reduce(PendingReduce& pending);
  Tensor buffer_;  // receives the sum; carries the start op's autograd history
  Handle handle_;
  Communicator* group_ = nullptr;
  std::shared_ptr<detail::KrakenReduceState> state_;
};

PendingReduce start_all_reduce(const Tensor& x, Communicator& group);
Tensor wait_all_reduce(PendingReduce& pending);

}  // namespace kraken::parallel
