#include "data/shard.h"

#include <fcntl.h>
#include <glob.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "kernels/error.h"

// Shards are little-endian on disk and read in place through the mapping.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "token shards are read in place: little-endian hosts only");

namespace kraken::data {

const char* shard_format_name(ShardFormat format) {
  switch (format) {
    case ShardFormat::Auto: return "auto";
    case ShardFormat::Llmc: return "llm.c";
    case ShardFormat::Raw: return "raw";
  }
  return "?";
}

ShardFormat parse_shard_format(const std::string& text) {
  if (text == "auto") return ShardFormat::Auto;
  if (text == "llmc" || text == "llm.c") return ShardFormat::Llmc;
  if (text == "raw" || text == "nanogpt") return ShardFormat::Raw;
  KRAKEN_THROW("unknown shard format '", text, "': expected auto, llmc or raw");
}

namespace {

std::string errno_text() { return std::strerror(errno); }

// The file's bytes, mapped read only; unmapped and closed when the last TokenShard lets go.
struct Mapping {
  void* base = nullptr;
  size_t bytes = 0;
  ~Mapping() {
    if (base != nullptr) munmap(base, bytes);
  }
};

// Other llm.c files a user may point at by mistake.
constexpr int32_t kLlmcLlama3Magic = 20240801;
constexpr int32_t kLlmcEvalMagic = 20240522;

ShardFormat detect_format(const unsigned char* bytes, int64_t file_bytes) {
  if (file_bytes < 4) return ShardFormat::Raw;
  int32_t w[3] = {};
  std::memcpy(w, bytes, std::min<int64_t>(file_bytes, sizeof(w)) / 4 * 4);
  if (w[0] == kLlmcShardMagic || w[0] == kLlmcLlama3Magic || w[0] == kLlmcEvalMagic) return ShardFormat::Llmc;
  // An llm.c header with a damaged magic: version 1 and a count that matches the size exactly. Reading
  // it as raw would train on the header, so report the magic instead.
  if (file_bytes >= kLlmcHeaderBytes && w[1] == kLlmcShardVersion && w[2] > 0 &&
      kLlmcHeaderBytes + 2 * static_cast<int64_t>(w[2]) == file_bytes)
    return ShardFormat::Llmc;
  return ShardFormat::Raw;
}

}  // namespace

TokenShard TokenShard::open(const std::string& path, ShardFormat format) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) KRAKEN_THROW("token shard ", path, ": cannot open: ", errno_text());
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const std::string why = errno_text();
    ::close(fd);
    KRAKEN_THROW("token shard ", path, ": cannot stat: ", why);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    KRAKEN_THROW("token shard ", path, ": not a regular file");
  }
  const int64_t file_bytes = st.st_size;
  if (file_bytes == 0) {
    ::close(fd);
    KRAKEN_THROW("token shard ", path, ": empty file (0 bytes): a shard needs at least one token");
  }
  auto mapping = std::make_shared<Mapping>();
  mapping->bytes = static_cast<size_t>(file_bytes);
  void* base = mmap(nullptr, mapping->bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  const std::string mmap_error = base == MAP_FAILED ? errno_text() : "";
  ::close(fd);  // the mapping keeps the file alive
  if (base == MAP_FAILED) KRAKEN_THROW("token shard ", path, ": cannot map ", file_bytes, " bytes: ", mmap_error);
  mapping->base = base;
  const auto* bytes = static_cast<const unsigned char*>(base);

  int32_t first_word = 0;
  if (file_bytes >= 4) std::memcpy(&first_word, bytes, 4);
  if (format == ShardFormat::Auto) format = detect_format(bytes, file_bytes);

  TokenShard shard;
  shard.path_ = path;
  shard.format_ = format;
  if (format == ShardFormat::Llmc) {
    if (file_bytes < 4 || first_word != kLlmcShardMagic)
      KRAKEN_THROW("token shard ", path, ": wrong magic ", first_word, " (expected the llm.c shard magic ",
                   kLlmcShardMagic, first_word == kLlmcLlama3Magic ? "; this is llm.c's Llama-3 uint32 shard"
                   : first_word == kLlmcEvalMagic ? "; this is an llm.c eval file" : "", ")");
    if (file_bytes < kLlmcHeaderBytes)
      KRAKEN_THROW("token shard ", path, ": truncated: ", file_bytes, " bytes, shorter than the ", kLlmcHeaderBytes,
                   "-byte llm.c header");
    int32_t header[3];
    std::memcpy(header, bytes, sizeof(header));
    if (header[1] != kLlmcShardVersion)
      KRAKEN_THROW("token shard ", path, ": unsupported version ", header[1], " (expected ", kLlmcShardVersion,
                   "; version 7 is llm.c's Llama-3 uint32 format, which Kraken does not read)");
    const int64_t n = header[2];
    if (n < 0) KRAKEN_THROW("token shard ", path, ": negative token count ", n, " in the header");
    if (n == 0) KRAKEN_THROW("token shard ", path, ": empty shard (the header says 0 tokens)");
    const int64_t expected = kLlmcHeaderBytes + 2 * n;
    if (file_bytes != expected)
      KRAKEN_THROW("token shard ", path, ": size mismatch: the header says ", n, " tokens, so the file must be ",
                   kLlmcHeaderBytes, " + 2*", n, " = ", expected, " bytes, but it is ", file_bytes, " bytes",
                   file_bytes < expected ? " (truncated)" : "");
    shard.size_ = n;
    shard.tokens_ = reinterpret_cast<const uint16_t*>(bytes + kLlmcHeaderBytes);
  } else {
    if (file_bytes % 2 != 0)
      KRAKEN_THROW("token shard ", path, ": raw uint16 shard has an odd size of ", file_bytes,
                   " bytes (expected a whole number of 2-byte tokens)");
    shard.size_ = file_bytes / 2;
    shard.tokens_ = reinterpret_cast<const uint16_t*>(bytes);
  }
  shard.mapping_ = std::move(mapping);
  return shard;
}

void TokenShard::validate_tokens(int64_t vocab_size) const {
  KRAKEN_CHECK(vocab_size > 0);
  // Branch-free maximum first (vectorises); the slow search for the culprit runs only on failure.
  uint16_t max_token = 0;
  for (int64_t i = 0; i < size_; ++i) max_token = std::max(max_token, tokens_[i]);
  if (max_token < vocab_size) return;
  for (int64_t i = 0; i < size_; ++i)
    if (tokens_[i] >= vocab_size)
      KRAKEN_THROW("token shard ", path_, ": token id ", tokens_[i], " at index ", i, " is outside the vocabulary (",
                   "expected ids below ", vocab_size, ")");
}

// ---- writing ---------------------------------------------------------------------------------------

LlmcShardWriter::LlmcShardWriter(const std::string& path) : path_(path), tmp_path_(path + ".tmp") {
  fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) KRAKEN_THROW("token shard ", path_, ": cannot create ", tmp_path_, ": ", errno_text());
  // The header is written by commit(), once the count is known; reserve its bytes now.
  const std::vector<char> zeros(kLlmcHeaderBytes, 0);
  write_bytes(zeros.data(), zeros.size(), 0);
}

LlmcShardWriter::~LlmcShardWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_path_.c_str());
}

void LlmcShardWriter::write_bytes(const void* data, size_t bytes, int64_t offset) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t w = ::pwrite(fd_, p, bytes, offset);
    if (w < 0) {
      if (errno == EINTR) continue;
      KRAKEN_THROW("token shard ", path_, ": write to ", tmp_path_, " failed: ", errno_text());
    }
    p += w;
    bytes -= static_cast<size_t>(w);
    offset += w;
  }
}

void LlmcShardWriter::append(const uint16_t* tokens, int64_t n) {
  KRAKEN_CHECK(!committed_, "append after commit");
  KRAKEN_CHECK(n >= 0);
  // The count is an int32 in the header (llm.c asserts the same).
  if (count_ + n > INT32_MAX)
    KRAKEN_THROW("token shard ", path_, ": more than ", INT32_MAX, " tokens do not fit the llm.c header's int32 count");
  write_bytes(tokens, static_cast<size_t>(n) * 2, kLlmcHeaderBytes + 2 * count_);
  count_ += n;
}

void LlmcShardWriter::commit() {
  KRAKEN_CHECK(!committed_, "commit twice");
  if (count_ == 0) KRAKEN_THROW("token shard ", path_, ": refusing to write an empty shard (0 tokens)");
  int32_t header[kLlmcHeaderWords] = {};
  header[0] = kLlmcShardMagic;
  header[1] = kLlmcShardVersion;
  header[2] = static_cast<int32_t>(count_);
  write_bytes(header, sizeof(header), 0);
  if (::fsync(fd_) != 0) KRAKEN_THROW("token shard ", path_, ": fsync of ", tmp_path_, " failed: ", errno_text());
  if (::close(fd_) != 0) {
    fd_ = -1;
    KRAKEN_THROW("token shard ", path_, ": close of ", tmp_path_, " failed: ", errno_text());
  }
  fd_ = -1;
  if (std::rename(tmp_path_.c_str(), path_.c_str()) != 0)
    KRAKEN_THROW("token shard ", path_, ": rename from ", tmp_path_, " failed: ", errno_text());
  committed_ = true;
  // Make the rename itself durable: fsync the directory that holds the entry.
  const size_t slash = path_.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path_.substr(0, slash));
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

void write_llmc_shard(const std::string& path, const std::vector<uint16_t>& tokens) {
  LlmcShardWriter writer(path);
  writer.append(tokens.data(), static_cast<int64_t>(tokens.size()));
  writer.commit();
}

// ---- globbing --------------------------------------------------------------------------------------

std::vector<std::string> expand_patterns(const std::vector<std::string>& patterns) {
  std::vector<std::string> files;
  for (const std::string& pattern : patterns) {
    glob_t g{};
    const int rc = ::glob(pattern.c_str(), GLOB_ERR, nullptr, &g);
    if (rc == GLOB_NOMATCH) {
      globfree(&g);
      KRAKEN_THROW("no file matches the pattern '", pattern, "'");
    }
    if (rc != 0) {
      globfree(&g);
      KRAKEN_THROW("cannot expand the pattern '", pattern, "': ",
                   rc == GLOB_ABORTED ? "a directory could not be read" : "out of memory");
    }
    for (size_t i = 0; i < g.gl_pathc; ++i) files.emplace_back(g.gl_pathv[i]);
    globfree(&g);
  }
  std::sort(files.begin(), files.end());
  files.erase(std::unique(files.begin(), files.end()), files.end());
  return files;
}

}  // namespace kraken::data
