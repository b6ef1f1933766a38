// Token shards on disk: llm.c's `.bin` (a 1024-byte header, then uint16 tokens) and nanoGPT's raw
// uint16 `.bin` (no header).
//
// llm.c (dev/data/data_common.py, llmc/dataloader.h): the header is 256 little-endian int32 words,
// word 0 the magic 20240520, word 1 the version 1, word 2 the token count N, the rest zero; N uint16
// little-endian tokens follow, and the file is exactly 1024 + 2N bytes. nanoGPT (data/openwebtext/
// prepare.py): the whole file is uint16 tokens, N = size / 2.
//
// Shards are opened by memory mapping, read only: a loader touches only the windows it draws, and the
// page cache is shared by every rank on a node.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace kraken::data {

inline constexpr int32_t kLlmcShardMagic = 20240520;
inline constexpr int32_t kLlmcShardVersion = 1;
inline constexpr int64_t kLlmcHeaderWords = 256;
inline constexpr int64_t kLlmcHeaderBytes = kLlmcHeaderWords * 4;  // 1024

enum class ShardFormat {
  // Detect: a file that starts with an llm.c magic (20240520; also 20240801, Llama-3 shards, and
  // 20240522, eval files, which are then rejected by name) or whose header is llm.c's but for the
  // magic (word 1 = 1 and 1024 + 2 * word 2 = file size; then the wrong magic is reported) is read as
  // llm.c, anything else as raw uint16. A raw file whose first two tokens happen to spell the magic
  // (0x5A18 then 0x0135, as 20240520 = 0x01355A18) is taken for llm.c and rejected by its header
  // checks: force Raw for such a file.
  Auto,
  Llmc,  // llm.c: header + uint16 tokens
  Raw,   // nanoGPT: uint16 tokens, no header
};
const char* shard_format_name(ShardFormat format);  // "auto", "llm.c", "raw"
// "auto", "llmc" (or "llm.c"), "raw" (or "nanogpt"); anything else throws kraken::Error naming it.
ShardFormat parse_shard_format(const std::string& text);

// A read-only view of one shard's tokens, mapped from its file. Cheap to copy: copies share the mapping,
// which is released with the last copy.
class TokenShard {
 public:
  TokenShard() = default;
  // Opens and checks the header and size; every problem throws kraken::Error naming the file and what
  // was expected. An empty shard (no tokens) is an error too: nothing can be drawn from it.
  static TokenShard open(const std::string& path, ShardFormat format = ShardFormat::Auto);

  const std::string& path() const { return path_; }
  ShardFormat format() const { return format_; }  // Llmc or Raw, never Auto
  int64_t size() const { return size_; }          // number of tokens
  const uint16_t* tokens() const { return tokens_; }

  // Full scan: throws kraken::Error naming the file, the first token id >= vocab_size and its index.
  void validate_tokens(int64_t vocab_size) const;

 private:
  std::string path_;
  ShardFormat format_ = ShardFormat::Raw;
  int64_t size_ = 0;
  const uint16_t* tokens_ = nullptr;
  std::shared_ptr<const void> mapping_;  // keeps the mapping alive; munmap on release
};

// Writes an llm.c shard token by token without holding it in memory: the tokens go to `<path>.tmp`,
// commit() writes the header, fsyncs and renames onto `path`, so a reader never sees a half-written
// shard. A writer destroyed before commit() removes its temporary file.
class LlmcShardWriter {
 public:
  explicit LlmcShardWriter(const std::string& path);
  ~LlmcShardWriter();
  LlmcShardWriter(const LlmcShardWriter&) = delete;
  LlmcShardWriter& operator=(const LlmcShardWriter&) = delete;

  void append(const uint16_t* tokens, int64_t n);
  int64_t size() const { return count_; }
  const std::string& path() const { return path_; }
  void commit();

 private:
  void write_bytes(const void* data, size_t bytes, int64_t offset);
  std::string path_;
  std::string tmp_path_;
  int fd_ = -1;
  int64_t count_ = 0;
  bool committed_ = false;
};

// One call: writes `tokens` as an llm.c shard at `path`, atomically (tmp + fsync + rename).
void write_llmc_shard(const std::string& path, const std::vector<uint16_t>& tokens);

// glob(3) each pattern; the union, sorted by name and without duplicates. A pattern that matches
// nothing throws kraken::Error naming it (a typo in a path must not silently train on fewer shards).
std::vector<std::string> expand_patterns(const std::vector<std::string>& patterns);

}  // namespace kraken::data
