#include "data/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

#include "data/unicode_tables.h"
#include "kernels/error.h"

namespace kraken::data {

// ---- GPT-2's byte <-> unicode spelling -------------------------------------------------------------

uint32_t gpt2_byte_to_codepoint(uint8_t byte) {
  // '!'..'~', '¡'..'¬', '®'..'ÿ' stand for themselves; the 68 others take U+0100 + n in byte order.
  static const auto table = [] {
    std::vector<uint32_t> t(256);
    uint32_t n = 0;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[b] = printable ? b : 0x100 + n++;
    }
    return t;
  }();
  return table[byte];
}

namespace {

// ---- UTF-8 and the character classes of the pattern ------------------------------------------------

enum class CharClass : uint8_t { Letter, Number, Space, Other };

struct CodePoint {
  uint32_t value;
  uint32_t length;  // bytes; 1 for an invalid byte, which then counts as Other
  bool valid;
};

// Strict decoding (no overlong forms, no surrogates, nothing above U+10FFFF).
inline CodePoint decode_utf8(const unsigned char* s, size_t n) {
  const unsigned char c = s[0];
  if (c < 0x80) return {c, 1, true};
  uint32_t len, cp, min;
  if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F, min = 0x80;
  else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F, min = 0x800;
  else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07, min = 0x10000;
  else return {c, 1, false};
  if (n < len) return {c, 1, false};
  for (uint32_t i = 1; i < len; ++i) {
    if ((s[i] & 0xC0) != 0x80) return {c, 1, false};
    cp = (cp << 6) | (s[i] & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return {c, 1, false};
  return {cp, len, true};
}

template <size_t N>
bool in_ranges(const unicode::CodeRange (&ranges)[N], uint32_t cp) {
  const auto* it = std::upper_bound(ranges, ranges + N, cp,
                                    [](uint32_t v, const unicode::CodeRange& r) { return v < r.first; });
  return it != ranges && cp <= (it - 1)->last;
}

CharClass classify_slow(uint32_t cp) {
  if (in_ranges(unicode::kWhiteSpaceRanges, cp)) return CharClass::Space;
  if (in_ranges(unicode::kLetterRanges, cp)) return CharClass::Letter;
  if (in_ranges(unicode::kNumberRanges, cp)) return CharClass::Number;
  return CharClass::Other;
}

struct AsciiClasses {
  CharClass c[128];
  AsciiClasses() {
    for (uint32_t i = 0; i < 128; ++i) c[i] = classify_slow(i);
  }
};
const AsciiClasses kAscii;

inline CharClass classify(const CodePoint& cp) {
  if (!cp.valid) return CharClass::Other;
  return cp.value < 128 ? kAscii.c[cp.value] : classify_slow(cp.value);
}

// End of the piece that starts at `pos`: the first alternative of the pattern that matches there, as a
// backtracking regex engine picks it.
size_t piece_end(const unsigned char* s, size_t n, size_t pos) {
  // 's|'t|'re|'ve|'m|'ll|'d  (case-sensitive, ASCII apostrophe only, as in GPT-2)
  if (s[pos] == '\'' && pos + 1 < n) {
    const unsigned char a = s[pos + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return pos + 2;
    if (pos + 2 < n) {
      const unsigned char b = s[pos + 2];
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return pos + 3;
    }
  }
  // ` ?\p{L}+ | ?\p{N}+ | ?[^\s\p{L}\p{N}]+`: an optional space, then a run of one class.
  const size_t q = (s[pos] == ' ' && pos + 1 < n) ? pos + 1 : pos;
  CodePoint cp = decode_utf8(s + q, n - q);
  const CharClass k = classify(cp);
  if (k != CharClass::Space) {
    size_t e = q + cp.length;
    while (e < n) {
      cp = decode_utf8(s + e, n - e);
      if (classify(cp) != k) break;
      e += cp.length;
    }
    return e;
  }
  // `\s+(?!\S)|\s+`: the whole white-space run if it ends the text; else all but its last character
  // (which then joins the next piece, e.g. as the space of " word"), unless that leaves nothing.
  size_t e = pos, last = pos;
  while (e < n) {
    cp = decode_utf8(s + e, n - e);
    if (classify(cp) != CharClass::Space) break;
    last = e;
    e += cp.length;
  }
  if (e == n || last == pos) return e;
  return last;
}

std::string read_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) KRAKEN_THROW(what, " ", path, ": cannot open");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) KRAKEN_THROW(what, " ", path, ": read failed");
  return ss.str();
}

// GPT-2 spelling (UTF-8 of code points from gpt2_byte_to_codepoint) back to bytes; false if a
// character is not one of the 256.
bool unspell(std::string_view spelled, std::string& bytes) {
  static const auto inverse = [] {
    std::vector<int> t(0x200, -1);
    for (int b = 0; b < 256; ++b) t[gpt2_byte_to_codepoint(static_cast<uint8_t>(b))] = b;
    return t;
  }();
  bytes.clear();
  const auto* s = reinterpret_cast<const unsigned char*>(spelled.data());
  for (size_t i = 0; i < spelled.size();) {
    const CodePoint cp = decode_utf8(s + i, spelled.size() - i);
    if (!cp.valid || cp.value >= inverse.size() || inverse[cp.value] < 0) return false;
    bytes.push_back(static_cast<char>(inverse[cp.value]));
    i += cp.length;
  }
  return !bytes.empty();
}

}  // namespace

// ---- cache -----------------------------------------------------------------------------------------

bool BpeCache::find(std::string_view piece, const int32_t** first, size_t* count) const {
  const auto it = map_.find(piece);
  if (it == map_.end()) return false;
  *first = ids_.data() + it->second.ids_offset;
  *count = it->second.ids_size;
  return true;
}

void BpeCache::insert(std::string_view piece, const std::vector<int32_t>& ids) {
  // A piece longer than this is rare (long runs of one class) and not worth keeping.
  constexpr size_t kMaxKey = 256;
  if (piece.size() > kMaxKey) return;
  // Reserved once (+ kMaxKey: after a flush any piece fits); from then on keys_ never reallocates.
  const size_t key_bytes = max_entries_ * 16 + kMaxKey;
  if (keys_.capacity() < key_bytes) {
    map_.clear();
    ids_.clear();
    keys_.clear();
    keys_.reserve(key_bytes);
    map_.reserve(max_entries_);
  }
  if (map_.size() >= max_entries_ || keys_.size() + piece.size() > keys_.capacity()) {
    map_.clear();
    keys_.clear();  // keeps its capacity, so string_views into it stay valid until overwritten
    ids_.clear();
  }
  Entry e{keys_.size(), ids_.size(), static_cast<uint32_t>(piece.size()), static_cast<uint32_t>(ids.size())};
  keys_.append(piece);
  ids_.insert(ids_.end(), ids.begin(), ids.end());
  map_.emplace(std::string_view(keys_.data() + e.key_offset, e.key_size), e);
}

// ---- loading ---------------------------------------------------------------------------------------

Tokenizer Tokenizer::load(const std::string& dir) { return Tokenizer(dir + "/encoder.json", dir + "/vocab.bpe"); }

Tokenizer::Tokenizer(const std::string& encoder_json_path, const std::string& vocab_bpe_path) {
  // encoder.json
  const std::string text = read_file(encoder_json_path, "GPT-2 encoder");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    const size_t at = std::min<size_t>(e.byte > 0 ? e.byte - 1 : 0, text.size());
    const size_t line = 1 + std::count(text.begin(), text.begin() + at, '\n');
    KRAKEN_THROW("GPT-2 encoder ", encoder_json_path, ":", line, ": invalid JSON at byte ", e.byte, ": ", e.what());
  }
  if (!j.is_object() || j.empty())
    KRAKEN_THROW("GPT-2 encoder ", encoder_json_path, ": expected a JSON object {token: id}, got ", j.type_name());
  const size_t vocab = j.size();
  decoder_.assign(vocab, std::string());
  std::vector<bool> seen(vocab, false);
  std::unordered_map<std::string, int32_t> encoder;
  encoder.reserve(vocab);
  std::string bytes;
  for (const auto& [key, value] : j.items()) {
    if (!value.is_number_integer() || value.get<int64_t>() < 0 || value.get<int64_t>() >= static_cast<int64_t>(vocab))
      KRAKEN_THROW("GPT-2 encoder ", encoder_json_path, ": token ", nlohmann::json(key).dump(), " has id ", value.dump(),
                   ", expected an integer in [0, ", vocab, ")");
    const int32_t id = value.get<int32_t>();
    if (seen[id]) KRAKEN_THROW("GPT-2 encoder ", encoder_json_path, ": id ", id, " is used twice (again by ",
                               nlohmann::json(key).dump(), ")");
    seen[id] = true;
    if (!unspell(key, bytes))
      KRAKEN_THROW("GPT-2 encoder ", encoder_json_path, ": token ", nlohmann::json(key).dump(),
                   " is not spelled in GPT-2's byte-to-unicode alphabet");
    decoder_[id] = bytes;
    encoder.emplace(bytes, id);
  }
  for (int b = 0; b < 256; ++b) {
    const auto it = encoder.find(std::string(1, static_cast<char>(b)));
    if (it == encoder.end())
      KRAKEN_THROW("GPT-2 encoder ", encoder_json_path, ": no token for the single byte ", b,
                   " (byte-level BPE needs all 256)");
    byte_token_[b] = it->second;
  }
  encoder_path_ = encoder_json_path;
  if (const auto it = encoder.find("<|endoftext|>"); it != encoder.end()) eot_id_ = it->second;
  if (vocab > static_cast<size_t>(kEndOfText) && eot_id_ != kEndOfText)
    KRAKEN_THROW("GPT-2 encoder ", encoder_json_path, ": expected <|endoftext|> at id ", kEndOfText);

  // vocab.bpe
  const std::string merges_text = read_file(vocab_bpe_path, "GPT-2 merges");
  std::vector<std::string_view> lines;
  for (size_t start = 0; start <= merges_text.size();) {
    size_t end = merges_text.find('\n', start);
    if (end == std::string::npos) end = merges_text.size();
    std::string_view line(merges_text.data() + start, end - start);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    lines.push_back(line);
    start = end + 1;
  }
  while (!lines.empty() && lines.back().empty()) lines.pop_back();
  if (lines.empty() || lines[0].substr(0, 8) != "#version")
    KRAKEN_THROW("GPT-2 merges ", vocab_bpe_path, ":1: expected a '#version' line first");
  merges_.reserve(lines.size());
  std::unordered_map<uint64_t, size_t> line_of;  // for the duplicate message
  std::string left, right;
  for (size_t i = 1; i < lines.size(); ++i) {
    const std::string_view line = lines[i];
    const size_t lineno = i + 1;
    const size_t space = line.find(' ');
    if (space == std::string_view::npos || space == 0 || space + 1 == line.size() ||
        line.find(' ', space + 1) != std::string_view::npos)
      KRAKEN_THROW("GPT-2 merges ", vocab_bpe_path, ":", lineno, ": expected two tokens separated by one space, got '",
                   line, "'");
    const std::string_view a = line.substr(0, space), b = line.substr(space + 1);
    if (!unspell(a, left) || !unspell(b, right))
      KRAKEN_THROW("GPT-2 merges ", vocab_bpe_path, ":", lineno, ": '", line,
                   "' is not spelled in GPT-2's byte-to-unicode alphabet");
    const auto ia = encoder.find(left), ib = encoder.find(right), im = encoder.find(left + right);
    if (ia == encoder.end() || ib == encoder.end() || im == encoder.end())
      KRAKEN_THROW("GPT-2 merges ", vocab_bpe_path, ":", lineno, ": the merge '", line, "' names a token (",
                   ia == encoder.end() ? a : ib == encoder.end() ? b : std::string_view("its result"),
                   ") that ", encoder_json_path, " does not have");
    const uint64_t key = (static_cast<uint64_t>(ia->second) << 32) | static_cast<uint32_t>(ib->second);
    const auto [it, inserted] = line_of.emplace(key, lineno);
    if (!inserted)
      KRAKEN_THROW("GPT-2 merges ", vocab_bpe_path, ":", lineno, ": the merge '", line, "' repeats line ", it->second);
    merges_.emplace(key, Merge{static_cast<int32_t>(i - 1), im->second});
  }
}

// ---- encoding --------------------------------------------------------------------------------------

std::vector<std::string_view> Tokenizer::pretokenize(std::string_view text) {
  std::vector<std::string_view> pieces;
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  for (size_t pos = 0; pos < text.size();) {
    const size_t end = piece_end(s, text.size(), pos);
    pieces.push_back(text.substr(pos, end - pos));
    pos = end;
  }
  return pieces;
}

// BPE as GPT-2's encoder.py defines it: while some adjacent pair has a rank, take the lowest-ranked
// pair and merge all its occurrences, left to right. A heap of (rank, position) over a linked list
// makes that O(m log m) instead of the reference's O(m^2) (a megabyte-long run of letters must not
// stall kraken-prepare). One round pops every entry of the lowest rank (all are the same pair, as
// ranks are unique) in position order; the pairs the round creates are pushed only after it, so
// within a round no other pair can cut in, exactly as in the reference's single pass.
void Tokenizer::bpe(std::string_view piece, std::vector<int32_t>& word) const {
  KRAKEN_CHECK(piece.size() < static_cast<size_t>(INT32_MAX), "piece of ", piece.size(), " bytes");
  const int32_t m = static_cast<int32_t>(piece.size());
  word.resize(m);
  for (int32_t i = 0; i < m; ++i) word[i] = byte_token_[static_cast<unsigned char>(piece[i])];
  if (m < 2) return;

  struct Candidate {
    int32_t rank, pos;  // pos: index of the pair's left node
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  thread_local std::vector<int32_t> next, prev;
  thread_local std::vector<char> dead;  // a node merged into its left neighbour
  thread_local std::vector<Candidate> heap, pending;
  next.resize(m);
  prev.resize(m);
  dead.assign(m, 0);
  for (int32_t i = 0; i < m; ++i) next[i] = i + 1 < m ? i + 1 : -1, prev[i] = i - 1;
  const auto min_first = std::greater<Candidate>();  // std::*_heap put the largest on top: invert
  // The merge of the pair whose left node is `left` (word[] of a live node is its current token).
  auto merge_at = [&](int32_t left) -> const Merge* {
    const int32_t right = next[left];
    if (right < 0) return nullptr;
    const auto it = merges_.find((static_cast<uint64_t>(word[left]) << 32) | static_cast<uint32_t>(word[right]));
    return it == merges_.end() ? nullptr : &it->second;
  };
  heap.clear();
  for (int32_t i = 0; i + 1 < m; ++i)
    if (const Merge* mg = merge_at(i)) heap.push_back({mg->rank, i});
  std::make_heap(heap.begin(), heap.end(), min_first);

  while (!heap.empty()) {
    const int32_t rank = heap.front().rank;
    pending.clear();
    while (!heap.empty() && heap.front().rank == rank) {
      std::pop_heap(heap.begin(), heap.end(), min_first);
      const int32_t left = heap.back().pos;
      heap.pop_back();
      // Stale if the left node was merged away or either token changed since the entry was pushed.
      const Merge* mg = dead[left] ? nullptr : merge_at(left);
      if (mg == nullptr || mg->rank != rank) continue;
      const int32_t right = next[left];
      word[left] = mg->merged;
      dead[right] = 1;
      next[left] = next[right];
      if (next[right] >= 0) prev[next[right]] = left;
      if (prev[left] >= 0) pending.push_back({0, prev[left]});
      pending.push_back({0, left});
    }
    for (const Candidate& c : pending) {
      if (dead[c.pos]) continue;
      if (const Merge* mg = merge_at(c.pos)) {
        heap.push_back({mg->rank, c.pos});
        std::push_heap(heap.begin(), heap.end(), min_first);
      }
    }
  }
  int32_t out = 0;
  for (int32_t i = 0; i >= 0; i = next[i]) word[out++] = word[i];
  word.resize(out);
}

void Tokenizer::encode(std::string_view text, BpeCache& cache, std::vector<int32_t>& out) const {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  thread_local std::vector<int32_t> word;
  for (size_t pos = 0; pos < text.size();) {
    const size_t end = piece_end(s, text.size(), pos);
    const std::string_view piece = text.substr(pos, end - pos);
    pos = end;
    if (piece.size() == 1) {
      out.push_back(byte_token_[static_cast<unsigned char>(piece[0])]);
      continue;
    }
    const int32_t* ids = nullptr;
    size_t count = 0;
    if (cache.find(piece, &ids, &count)) {
      out.insert(out.end(), ids, ids + count);
      continue;
    }
    bpe(piece, word);
    out.insert(out.end(), word.begin(), word.end());
    cache.insert(piece, word);
  }
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  BpeCache cache(4096);
  std::vector<int32_t> out;
  out.reserve(text.size() / 3);
  encode(text, cache, out);
  return out;
}

int32_t Tokenizer::eot_id() const {
  if (eot_id_ < 0) KRAKEN_THROW("GPT-2 encoder ", encoder_path_, ": the vocabulary has no <|endoftext|> token");
  return eot_id_;
}

// ---- decoding --------------------------------------------------------------------------------------

const std::string& Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id >= vocab_size()) KRAKEN_THROW("token id ", id, " is outside the vocabulary [0, ", vocab_size(), ")");
  return decoder_[id];
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (const int32_t id : ids) out += token_bytes(id);
  return out;
}

}  // namespace kraken::data
