#include "data/loader.h"

#include <algorithm>
#include <numeric>

#include "kernels/error.h"
#include "runtime/rng.h"

namespace kraken::data {

using runtime::DType;
using runtime::Tensor;

// ---- state -----------------------------------------------------------------------------------------

bool LoaderState::operator==(const LoaderState& o) const {
  return epoch == o.epoch && shard == o.shard && window == o.window && num_shards == o.num_shards &&
         window_tokens == o.window_tokens && shuffle == o.shuffle && seed == o.seed;
}

void to_json(nlohmann::json& j, const LoaderState& s) {
  j = nlohmann::json{{"epoch", s.epoch},           {"shard", s.shard},     {"window", s.window},
                     {"num_shards", s.num_shards}, {"window_tokens", s.window_tokens},
                     {"shuffle", s.shuffle},       {"seed", s.seed}};
}

namespace {

template <typename T>
void read_key(const nlohmann::json& j, const char* key, T& out) {
  if (!j.is_object()) KRAKEN_THROW("loader state: expected a JSON object, got ", j.type_name());
  const auto it = j.find(key);
  if (it == j.end()) KRAKEN_THROW("loader state: missing key '", key, "'");
  const bool ok = std::is_same<T, bool>::value ? it->is_boolean()
                  : std::is_unsigned<T>::value ? it->is_number_unsigned()
                                               : it->is_number_integer();
  if (!ok) KRAKEN_THROW("loader state: key '", key, "' is ", it->dump(), ", expected ",
                        std::is_same<T, bool>::value ? "true or false" : "an integer");
  out = it->get<T>();
}

}  // namespace

void from_json(const nlohmann::json& j, LoaderState& s) {
  read_key(j, "epoch", s.epoch);
  read_key(j, "shard", s.shard);
  read_key(j, "window", s.window);
  read_key(j, "num_shards", s.num_shards);
  read_key(j, "window_tokens", s.window_tokens);
  read_key(j, "shuffle", s.shuffle);
  read_key(j, "seed", s.seed);
}

// ---- shuffling -------------------------------------------------------------------------------------

namespace {

// SplitMix64's finaliser: nearby (seed, epoch) pairs give unrelated Philox keys.
uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t epoch_key(uint64_t seed, int64_t epoch) { return mix64(seed ^ mix64(static_cast<uint64_t>(epoch))); }

// Fisher-Yates with an unbiased draw: every permutation is equally likely and the result depends only
// on the generator's key and stream.
std::vector<int64_t> permutation(int64_t n, runtime::Generator& gen) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), 0);
  for (int64_t i = n - 1; i > 0; --i) std::swap(p[i], p[gen.next_below(static_cast<uint64_t>(i) + 1)]);
  return p;
}

}  // namespace

// ---- the loader ------------------------------------------------------------------------------------

DataLoader::DataLoader(std::vector<std::string> files, const LoaderOptions& options) : options_(options) {
  const LoaderOptions& o = options_;
  if (o.batch_size < 1) KRAKEN_THROW("data loader: batch size must be >= 1, got ", o.batch_size);
  if (o.seq_len < 1) KRAKEN_THROW("data loader: sequence length must be >= 1, got ", o.seq_len);
  if (o.dp_size < 1) KRAKEN_THROW("data loader: dp_size must be >= 1, got ", o.dp_size);
  if (o.dp_rank < 0 || o.dp_rank >= o.dp_size)
    KRAKEN_THROW("data loader: dp_rank ", o.dp_rank, " is outside [0, ", o.dp_size, ")");
  if (files.empty()) KRAKEN_THROW("data loader: no shard files given");
  window_tokens_ = o.batch_size * o.seq_len * o.dp_size;
  for (const std::string& file : files) {
    TokenShard shard = TokenShard::open(file, o.format);
    if (shard.size() < window_tokens_ + 1)
      KRAKEN_THROW("token shard ", file, ": too small: ", shard.size(), " tokens, but one window of B*T*dp_size + 1 = ",
                   o.batch_size, "*", o.seq_len, "*", o.dp_size, " + 1 = ", window_tokens_ + 1, " tokens is needed");
    if (o.vocab_size > 0) shard.validate_tokens(o.vocab_size);
    num_tokens_ += shard.size();
    shards_.push_back(std::move(shard));
  }
  for (int64_t f = 0; f < static_cast<int64_t>(shards_.size()); ++f) batches_per_epoch_ += windows_in(f);
  reset();
}

// The last window needs one token past its end for the final target, hence the - 1.
int64_t DataLoader::windows_in(int64_t file) const { return (shards_[file].size() - 1) / window_tokens_; }

std::vector<int64_t> DataLoader::shard_order_for(int64_t epoch) const {
  const int64_t n = static_cast<int64_t>(shards_.size());
  if (options_.shuffle) {
    runtime::Generator gen(epoch_key(options_.seed, epoch), 0);
    return permutation(n, gen);
  }
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  return order;
}

void DataLoader::start_epoch(int64_t epoch) {
  epoch_ = epoch;
  shard_order_ = shard_order_for(epoch);
}

void DataLoader::enter_shard(int64_t shard) {
  shard_ = shard;
  window_ = 0;
  window_order_.clear();
  if (options_.shuffle) {
    // Stream 1 + file index: each file's window order is independent of where it falls in the shard order.
    const int64_t file = shard_order_[shard];
    runtime::Generator gen(epoch_key(options_.seed, epoch_), 1 + static_cast<uint64_t>(file));
    window_order_ = permutation(windows_in(file), gen);
  }
}

void DataLoader::reset() {
  start_epoch(0);
  enter_shard(0);
}

void DataLoader::next(int32_t* inputs, int32_t* targets) {
  const int64_t file = shard_order_[shard_];
  const int64_t w = window_order_.empty() ? window_ : window_order_[window_];
  const int64_t slice = options_.batch_size * options_.seq_len;
  const uint16_t* src = shards_[file].tokens() + w * window_tokens_ + options_.dp_rank * slice;
  for (int64_t i = 0; i < slice; ++i) {
    inputs[i] = src[i];
    targets[i] = src[i + 1];
  }
  // Advance so that the state always names the next window to draw.
  if (++window_ == windows_in(file)) {
    if (shard_ + 1 == static_cast<int64_t>(shards_.size())) start_epoch(epoch_ + 1);
    enter_shard(shard_ + 1 == static_cast<int64_t>(shards_.size()) ? 0 : shard_ + 1);
  }
}

Batch DataLoader::next() {
  const runtime::Shape shape{options_.batch_size, options_.seq_len};
  Batch batch{Tensor::empty(shape, DType::I32), Tensor::empty(shape, DType::I32)};
  next(batch.inputs.data<int32_t>(), batch.targets.data<int32_t>());
  return batch;
}

LoaderState DataLoader::state() const {
  LoaderState s;
  s.epoch = epoch_;
  s.shard = shard_;
  s.window = window_;
  s.num_shards = static_cast<int64_t>(shards_.size());
  s.window_tokens = window_tokens_;
  s.shuffle = options_.shuffle;
  s.seed = options_.seed;
  return s;
}

void DataLoader::restore(const LoaderState& s) {
  const int64_t n = static_cast<int64_t>(shards_.size());
  if (s.num_shards != n)
    KRAKEN_THROW("data loader: cannot restore a position saved over ", s.num_shards, " shards: ", n,
                 " shards are given now (the position is meaningful only for the same files)");
  if (s.window_tokens != window_tokens_)
    KRAKEN_THROW("data loader: cannot restore a position saved with windows of ", s.window_tokens,
                 " tokens (B*T*dp_size): this loader uses ", options_.batch_size, "*", options_.seq_len, "*",
                 options_.dp_size, " = ", window_tokens_);
  if (s.shuffle != options_.shuffle || (s.shuffle && s.seed != options_.seed))
    KRAKEN_THROW("data loader: cannot restore a position saved with shuffle=", s.shuffle ? "on" : "off",
                 " seed=", s.seed, ": this loader has shuffle=", options_.shuffle ? "on" : "off", " seed=",
                 options_.seed);
  if (s.epoch < 0) KRAKEN_THROW("data loader: cannot restore a negative epoch ", s.epoch);
  if (s.shard < 0 || s.shard >= n)
    KRAKEN_THROW("data loader: cannot restore shard position ", s.shard, ": expected 0 to ", n - 1);
  // Check the window before touching anything: a failed restore leaves the loader where it was.
  const int64_t file = shard_order_for(s.epoch)[s.shard];
  const int64_t windows = windows_in(file);
  if (s.window < 0 || s.window >= windows)
    KRAKEN_THROW("data loader: cannot restore window ", s.window, " of shard ", shards_[file].path(), ": it has ",
                 windows, " windows of ", window_tokens_, " tokens (expected 0 to ", windows - 1, ")");
  start_epoch(s.epoch);
  enter_shard(s.shard);
  window_ = s.window;
}

}  // namespace kraken::data
