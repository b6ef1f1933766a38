// Files and data the tests share: paths in the source tree, the PyTorch golden fixtures' model config,
// and a small learnable token stream for training tests.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "data/shard.h"
#include "models/kraken.h"
#include "runtime/rng.h"
#include "runtime/safetensors.h"
#include "runtime/tensor.h"

namespace kraken::testing {

// A path under the repository (ctest sets KRAKEN_SOURCE_DIR; "." otherwise).
inline std::string source_path(const std::string& relative) {
  const char* root = std::getenv("KRAKEN_SOURCE_DIR");
  return std::string(root ? root : ".") + "/" + relative;
}

// The model a golden fixture (tests/models/fixtures/make_golden.py) was made with, from its metadata.
inline models::KrakenConfig fixture_config(const runtime::SafetensorsFile& file) {
  const auto& meta = file.metadata();
  auto get = [&](const char* key) { return std::stoll(meta.at(key)); };
  models::KrakenConfig c;
  c.n_layer = get("n_layer");
  c.n_embd = get("n_embd");
  c.n_head = get("n_head");
  c.degree = get("degree");
  c.context = get("context");
  c.vocab_size = get("vocab_size");
  c.mlp_expansion = get("mlp_expansion");
  c.bias = meta.at("bias") == "true";
  return c;
}

// train_000.bin and val_000.bin in `dir`: a noisy counting sequence over `vocab` tokens (next =
// previous + 1 with probability 0.9, else a jump of 2 to 5), which a small model learns quickly.
inline void write_counting_shards(const std::string& dir, int64_t vocab, int64_t tokens_per_shard = 12000) {
  runtime::Generator gen(5, 0);
  for (const char* name : {"train_000.bin", "val_000.bin"}) {
    std::vector<uint16_t> tokens(static_cast<size_t>(tokens_per_shard));
    uint16_t t = 0;
    for (auto& tok : tokens) {
      t = static_cast<uint16_t>((t + 1 + (gen.next_below(8) == 0 ? gen.next_below(5) : 0)) % vocab);
      tok = t;
    }
    data::write_llmc_shard(dir + "/" + name, tokens);
  }
}

// A Kraken model small enough for exact comparisons (C = 16, 4 heads, T = 8, 29 tokens, e = 2), and a
// (2, 8) batch of its token ids: the same batch for the same seed.
inline models::KrakenConfig tiny_kraken_config(int64_t n_layer, int64_t degree) {
  models::KrakenConfig c;
  c.n_layer = n_layer;
  c.n_embd = 16;
  c.n_head = 4;
  c.degree = degree;
  c.context = 8;
  c.vocab_size = 29;
  c.mlp_expansion = 2;
  return c;
}
inline runtime::Tensor tiny_kraken_ids(int seed) {
  std::vector<int32_t> v(16);
  for (int i = 0; i < 16; ++i) v[static_cast<size_t>(i)] = (i * 7 + seed) % 29;
  return runtime::Tensor::from_ints(v, {2, 8});
}

// An f32 tensor's values as their bits, for bit-for-bit comparisons.
inline std::vector<uint32_t> f32_bits(const runtime::Tensor& t) {
  const std::vector<float> v = t.to_vector();
  std::vector<uint32_t> out(v.size());
  if (!v.empty()) std::memcpy(out.data(), v.data(), v.size() * sizeof(float));
  return out;
}

}  // namespace kraken::testing
