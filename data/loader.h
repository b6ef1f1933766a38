// DataLoader: (B, T) input and target batches from token shards, for one data-parallel rank.
//
// The layout is llm.c's (llmc/dataloader.h): a shard of N tokens holds (N - 1) / (B·T·dp_size)
// non-overlapping windows of B·T·dp_size tokens (+1, the last target); rank r takes the r-th B·T slice
// of a window, so the ranks of one step read disjoint slices that tile it. Inputs are the slice's
// first B·T tokens, targets the same tokens shifted by one:
//
//   window start s, rank r:  inputs[b, t] = tok[s + r·B·T + b·T + t],  targets[b, t] = that + 1 position
//
// Sequential mode walks the shards in the given order and the windows in order. Shuffled mode (training)
// permutes the shard order and, within each shard, the window order, drawn from a Philox generator
// keyed by a seed derived from (seed, epoch): every rank computes the same permutations without talking,
// and each epoch gets new ones. At the end of the data the loader wraps around and the epoch counts up.
//
// The position is three integers (epoch, shard, window), the same on every rank; state() and restore()
// save and reinstate it exactly, so a resumed run draws the batches an uninterrupted one would have.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "runtime/tensor.h"

namespace kraken::data {

struct LoaderOptions {
  int64_t batch_size = 1;  // B
  int64_t seq_len = 1;     // T
  int dp_rank = 0;
  int dp_size = 1;
  bool shuffle = false;
  uint64_t seed = 0;
  ShardFormat format = ShardFormat::Auto;
  int64_t vocab_size = 0;  // > 0: scan every shard once and reject ids >= vocab_size
};

// Where the next batch comes from, plus what it was drawn with (checked by restore()).
struct LoaderState {
  int64_t epoch = 0;
  int64_t shard = 0;   // index into this epoch's shard order (not a file index when shuffled)
  int64_t window = 0;  // index into the current shard's window order
  // Checked by restore(): a position means something only for the same files and window layout.
  int64_t num_shards = 0;
  int64_t window_tokens = 0;  // B·T·dp_size
  bool shuffle = false;
  uint64_t seed = 0;
  bool operator==(const LoaderState& o) const;
  bool operator!=(const LoaderState& o) const { return !(*this == o); }
};
void to_json(nlohmann::json& j, const LoaderState& s);
void from_json(const nlohmann::json& j, LoaderState& s);  // kraken::Error naming a missing or bad key

struct Batch {
  runtime::Tensor inputs;   // i32 (B, T) on the CPU
  runtime::Tensor targets;  // i32 (B, T) on the CPU
};

class DataLoader {
 public:
  // Opens every file (see TokenShard::open); a shard with fewer than B·T·dp_size + 1 tokens is an error
  // naming it and the size needed.
  DataLoader(std::vector<std::string> files, const LoaderOptions& options);

  Batch next();
  // The same draw into caller-owned buffers of B·T int32 each.
  void next(int32_t* inputs, int32_t* targets);

  LoaderState state() const;
  void restore(const LoaderState& state);
  void reset();  // back to the first batch of epoch 0 (evaluation passes)

  int64_t batches_per_epoch() const { return batches_per_epoch_; }
  int64_t epoch() const { return epoch_; }
  int64_t num_tokens() const { return num_tokens_; }  // in all shards
  const std::vector<TokenShard>& shards() const { return shards_; }
  const LoaderOptions& options() const { return options_; }

 private:
  std::vector<int64_t> shard_order_for(int64_t epoch) const;
  void start_epoch(int64_t epoch);
  void enter_shard(int64_t shard);
  int64_t windows_in(int64_t file) const;

  LoaderOptions options_;
  std::vector<TokenShard> shards_;
  int64_t window_tokens_ = 0;  // B·T·dp_size
  int64_t batches_per_epoch_ = 0;
  int64_t num_tokens_ = 0;

  int64_t epoch_ = 0;
  int64_t shard_ = 0;
  int64_t window_ = 0;
  std::vector<int64_t> shard_order_;   // this epoch: position -> file index
  std::vector<int64_t> window_order_;  // current shard: position -> window index (empty: identity)
};

}  // namespace kraken::data
