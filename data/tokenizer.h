// GPT-2's byte-level BPE tokenizer (Radford et al. 2019, §2.2; OpenAI's gpt-2 src/encoder.py).
//
// Encoding runs in three stages:
//  1. pre-tokenisation: the text is cut into pieces by GPT-2's pattern
//       's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//     implemented by hand over UTF-8 code points (std::regex has no \p{L}); letters, numbers and white
//     space come from data/unicode_tables.h (tools/gen_unicode_tables.py). \s is Unicode White_Space,
//     as in OpenAI's Python original and tiktoken; JavaScript's \s differs on U+0085 and U+FEFF.
//  2. each piece's UTF-8 bytes start as one token per byte;
//  3. BPE: repeatedly merge the adjacent pair with the lowest rank in vocab.bpe, every occurrence of it
//     left to right, until no pair has a rank.
// Encoding is "ordinary" (tiktoken's encode_ordinary): `<|endoftext|>` in the text is plain text; the
// end-of-text id is added by the caller (kraken-prepare puts one before every document).
//
// Bytes that are not valid UTF-8 are each a piece of their own kind ("other") and still encode to
// their byte tokens, so decode(encode(x)) == x for every byte string.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace kraken::data {

// Memo of piece -> token ids. Not thread-safe: give each encoding thread its own.
class BpeCache {
 public:
  explicit BpeCache(size_t max_entries = size_t{1} << 18) : max_entries_(max_entries) {}
  // Returns the cached ids of `piece` in (*first, *count), or false.
  bool find(std::string_view piece, const int32_t** first, size_t* count) const;
  void insert(std::string_view piece, const std::vector<int32_t>& ids);
  size_t size() const { return map_.size(); }

 private:
  struct Entry {
    size_t key_offset;  // into keys_
    size_t ids_offset;  // into ids_
    uint32_t key_size;
    uint32_t ids_size;
  };
  // Keys live in one string and ids in one vector so that a lookup allocates nothing; the map holds
  // string_views into keys_, which therefore must not reallocate while the map is in use: it is
  // reserved up front and the whole cache is dropped when it fills.
  size_t max_entries_;
  std::string keys_;
  std::vector<int32_t> ids_;
  std::unordered_map<std::string_view, Entry> map_;
};

class Tokenizer {
 public:
  static constexpr int32_t kEndOfText = 50256;  // `<|endoftext|>` in GPT-2's vocabulary

  // Reads <dir>/encoder.json and <dir>/vocab.bpe.
  static Tokenizer load(const std::string& dir);
  // encoder.json: {token: id} with tokens in GPT-2's byte-to-unicode spelling, ids 0..V-1 each once.
  // vocab.bpe: a `#version` line, then one merge "left right" per line, best first. Errors name the
  // file and line (or byte offset, for JSON) and what was expected.
  Tokenizer(const std::string& encoder_json_path, const std::string& vocab_bpe_path);

  // Text (UTF-8 bytes) to ids. The overload with a cache appends to `out` and reuses the cache across
  // calls; both are thread-safe on a shared Tokenizer when each thread has its own cache.
  std::vector<int32_t> encode(std::string_view text) const;
  void encode(std::string_view text, BpeCache& cache, std::vector<int32_t>& out) const;
  // Ids to bytes (which are UTF-8 when the ids came from encode). An id outside the vocabulary throws.
  std::string decode(const std::vector<int32_t>& ids) const;
  const std::string& token_bytes(int32_t id) const;

  int32_t vocab_size() const { return static_cast<int32_t>(decoder_.size()); }
  // The id of `<|endoftext|>` (kEndOfText in GPT-2's vocabulary); kraken::Error if the vocabulary has none.
  int32_t eot_id() const;

  // Stage 1 alone: the pieces of `text` in order (they concatenate to `text`).
  static std::vector<std::string_view> pretokenize(std::string_view text);

 private:
  void bpe(std::string_view piece, std::vector<int32_t>& word) const;

  struct Merge {
    int32_t rank;
    int32_t merged;  // id of left + right
  };
  std::vector<std::string> decoder_;  // id -> bytes
  int32_t byte_token_[256] = {};      // byte -> id of its one-byte token
  int32_t eot_id_ = -1;
  std::string encoder_path_;
  std::unordered_map<uint64_t, Merge> merges_;  // (left id << 32 | right id) -> merge
};

// The byte -> code point table GPT-2 uses to spell byte strings as printable text in its vocab files:
// printable Latin-1 bytes stand for themselves, the other 68 bytes for U+0100 upwards in byte order.
uint32_t gpt2_byte_to_codepoint(uint8_t byte);

}  // namespace kraken::data
