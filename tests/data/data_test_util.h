// Helpers shared by the data tests: a temporary directory, raw file writes, error messages, and a
// small synthetic BPE vocabulary (so the loader and prepare tests need no downloaded files).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/tokenizer.h"
#include "kernels/error.h"
#include "tests/support/temp_dir.h"
#include "tests/support/errors.h"

namespace kraken::data::test {

using TempDir = ::kraken::testing::TempDir;

inline void write_file(const std::string& path, const std::string& bytes) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// The raw bytes of an llm.c shard with a header of our choosing (to build broken files).
inline std::string llmc_bytes(int32_t magic, int32_t version, int32_t count, const std::vector<uint16_t>& tokens) {
  std::vector<int32_t> header(256, 0);
  header[0] = magic;
  header[1] = version;
  header[2] = count;
  std::string bytes(reinterpret_cast<const char*>(header.data()), 1024);
  bytes.append(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 2);
  return bytes;
}

using ::kraken::testing::message_of;

#define EXPECT_MESSAGE_HAS(msg, text) EXPECT_NE((msg).find(text), std::string::npos) << "message: " << (msg)

// GPT-2's spelling of a byte string (each byte as its stand-in code point, UTF-8 encoded).
inline std::string gpt2_spell(const std::string& bytes) {
  std::string out;
  for (unsigned char b : bytes) {
    const uint32_t cp = gpt2_byte_to_codepoint(b);
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp));
    } else {
      out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }
  return out;
}

// A small vocabulary: the 256 byte tokens (id = byte), then one token per merge in order, then
// <|endoftext|>. Writes encoder.json and vocab.bpe into `dir`.
inline void write_synthetic_vocab(const std::string& dir, const std::vector<std::pair<std::string, std::string>>& merges) {
  nlohmann::json enc = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) enc[gpt2_spell(std::string(1, static_cast<char>(b)))] = b;
  std::string bpe = "#version: 0.2\n";
  int id = 256;
  for (const auto& [a, b] : merges) {
    const std::string merged = gpt2_spell(a + b);
    if (!enc.contains(merged)) enc[merged] = id++;
    bpe += gpt2_spell(a) + " " + gpt2_spell(b) + "\n";
  }
  enc["<|endoftext|>"] = id;
  write_file(dir + "/encoder.json", enc.dump());
  write_file(dir + "/vocab.bpe", bpe);
}

// Where the GPT-2 vocabulary is: $KRAKEN_GPT2_VOCAB_DIR, else $KRAKEN_SOURCE_DIR/demo/gpt2, else the
// demo folder next to this source file.
inline std::string source_dir() {
  if (const char* s = std::getenv("KRAKEN_SOURCE_DIR")) return s;
  // tests/data/data_test_util.h -> the repository root
  return std::filesystem::path(__FILE__).parent_path().parent_path().parent_path().string();
}
inline std::string gpt2_vocab_dir() {
  if (const char* s = std::getenv("KRAKEN_GPT2_VOCAB_DIR")) return s;
  return source_dir() + "/demo/gpt2";
}

// Skips the calling test when the GPT-2 vocabulary is missing, unless KRAKEN_REQUIRE_DEMO=1 (CI, after
// scripts/setup-demo.sh), where a missing vocabulary fails it.
#define KRAKEN_REQUIRE_GPT2_VOCAB()                                                                        \
  do {                                                                                                     \
    const std::string vocab_dir_ = ::kraken::data::test::gpt2_vocab_dir();                                 \
    if (!std::filesystem::exists(vocab_dir_ + "/encoder.json") ||                                          \
        !std::filesystem::exists(vocab_dir_ + "/vocab.bpe")) {                                             \
      const char* require_ = std::getenv("KRAKEN_REQUIRE_DEMO");                                           \
      if (require_ != nullptr && std::string(require_) == "1")                                             \
        FAIL() << "GPT-2 vocabulary missing in " << vocab_dir_ << " and KRAKEN_REQUIRE_DEMO=1: run scripts/setup-demo.sh"; \
      GTEST_SKIP() << "GPT-2 vocabulary missing in " << vocab_dir_ << ": run scripts/setup-demo.sh";       \
    }                                                                                                      \
  } while (0)

}  // namespace kraken::data::test
