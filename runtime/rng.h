// Generator: a position in a Philox stream (kernels/philox.h). Reproducible per (seed, stream): give
// each rank or each purpose its own stream and the draws never overlap or depend on thread counts.
// Its whole state is three integers, so checkpoints save and restore it exactly.
#pragma once

#include <cstdint>

#include "runtime/tensor.h"

namespace kraken::runtime {

struct RngState {
  uint64_t seed = 0;
  uint64_t stream = 0;
  uint64_t offset = 0;
  bool operator==(const RngState& o) const { return seed == o.seed && stream == o.stream && offset == o.offset; }
};

class Generator {
 public:
  explicit Generator(uint64_t seed = 0, uint64_t stream = 0) : state_{seed, stream, 0} {}
  explicit Generator(const RngState& state) : state_(state) {}

  const RngState& state() const { return state_; }
  void set_state(const RngState& state) { state_ = state; }
  uint64_t seed() const { return state_.seed; }
  uint64_t stream() const { return state_.stream; }

  // Claims `blocks` Philox blocks for one kernel launch and returns the first block's offset.
  uint64_t reserve(uint64_t blocks);

  // Host-side draws (one block each): shuffles, sampling.
  uint64_t next_u64();
  double next_double();                          // [0, 1)
  uint64_t next_below(uint64_t bound);           // uniform in [0, bound), unbiased

  // Fills an f32 tensor on its device; the generator advances past what was used.
  void fill_normal(Tensor& t, float mean, float std);
  void fill_uniform(Tensor& t, float low, float high);

 private:
  RngState state_;
};

}  // namespace kraken::runtime
