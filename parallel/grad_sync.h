// GradSync: data-parallel gradient averaging, bucketed and overlapped with the backward pass.
//
// The parameters (in registration order) are grouped into buckets of about `bucket_bytes`, in REVERSE
// order, because backward produces the last layers' gradients first. Each bucket owns one flat buffer
// and every parameter's .grad() is a view into it, so the all-reduce reads the gradients where backward
// accumulated them, with no copy. A grad-ready hook on each parameter (run by the autograd engine when
// the parameter has received its last contribution of the pass) counts the bucket down; when it is
// complete — and every earlier bucket has been started, so all ranks issue the buckets in one order —
// its all-reduce (average over the dp group) starts on the communication thread while backward goes on
// with the earlier layers. finish() starts what is left (parameters that took no part in the pass) and
// waits for everything.
//
// Gradient accumulation: set_sync(false) for all micro-batches but the last; their backward passes only
// accumulate into the buffers. Scale each micro-batch's loss by 1/micro_batches as usual.
//
// Typical step:
//   sync.set_sync(false); for micro-batches 0 … M−2: backward(loss_m / M);
//   sync.set_sync(true);  backward(loss_{M−1} / M); sync.finish(); optimizer.step(); zero grads.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "parallel/communicator.h"

namespace kraken::parallel {

struct GradSyncStats {
  int64_t syncs = 0;           // finish() calls that synchronised
  int64_t bytes = 0;           // gradient bytes all-reduced per sync
  double comm_seconds = 0.0;   // Σ how long the bucket all-reduces ran on the communication thread (on a
                               // device: on its stream, counted once done — at a later finish() or stats())
  double wait_seconds = 0.0;   // Σ how long finish() blocked waiting for them (a device's: ~0, the wait
                               // orders the compute stream, not the host)
  // The share of communication that ran behind backward instead of after it: 1 − wait/comm.
  double hidden_fraction() const;
};

struct GradSyncBucket {
  std::vector<size_t> params;  // indices into the parameter list, in bucket order (reverse registration)
  int64_t numel = 0;
};

class GradSync {
 public:
  // All parameters f32 leaves on one device, no duplicates. Existing gradients are copied into the
  // buckets; from now on each .grad() is a view of its bucket (keep it: zero it in place, never replace).
  GradSync(const std::vector<Tensor>& params, Communicator& dp, size_t bucket_bytes = size_t{25} << 20);
  ~GradSync();
  GradSync(const GradSync&) = delete;
  GradSync& operator=(const GradSync&) = delete;

  void set_sync(bool sync);
  bool sync() const;
  // Starts the buckets not yet started and waits for all; a no-op while sync is off.
  void finish();

  const std::vector<GradSyncBucket>& buckets() const;
  // Buckets whose all-reduce has started in the current round (during backward, as they complete).
  size_t started_buckets() const;
  const GradSyncStats& stats() const;
  void reset_stats();

 private:
  struct State;
  std::shared_ptr<State> state_;  // shared with the hooks, which outlive this object in the tensors
};

}  // namespace kraken::parallel
