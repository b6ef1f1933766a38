// Token shards: llm.c and raw formats read back what was written; every malformed file is rejected
// with a message that names the file and what was expected.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "data/shard.h"
#include "data_test_util.h"

namespace kraken::data {
namespace {

using test::llmc_bytes;
using test::message_of;
using test::TempDir;
using test::write_file;

std::vector<uint16_t> iota_tokens(int n, uint16_t start = 0) {
  std::vector<uint16_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = static_cast<uint16_t>(start + i);
  return t;
}

TEST(Shard, LlmcRoundTripWritesHeaderAndTokens) {
  TempDir dir;
  const std::string path = dir / "a.bin";
  const std::vector<uint16_t> tokens = {50256, 0, 1, 65535, 464, 2068};
  write_llmc_shard(path, tokens);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));  // renamed into place

  const std::string bytes = test::read_file(path);
  ASSERT_EQ(bytes.size(), 1024u + 2 * tokens.size());
  int32_t header[256];
  std::memcpy(header, bytes.data(), 1024);
  EXPECT_EQ(header[0], 20240520);
  EXPECT_EQ(header[1], 1);
  EXPECT_EQ(header[2], 6);
  for (int i = 3; i < 256; ++i) EXPECT_EQ(header[i], 0) << "header word " << i;

  const TokenShard shard = TokenShard::open(path);
  EXPECT_EQ(shard.format(), ShardFormat::Llmc);
  ASSERT_EQ(shard.size(), 6);
  EXPECT_EQ(std::vector<uint16_t>(shard.tokens(), shard.tokens() + 6), tokens);
}

TEST(Shard, CopiesShareTheMappingAfterTheFirstIsGone) {
  TempDir dir;
  write_llmc_shard(dir / "a.bin", iota_tokens(100));
  TokenShard copy;
  {
    const TokenShard original = TokenShard::open(dir / "a.bin");
    copy = original;
  }
  ASSERT_EQ(copy.size(), 100);
  EXPECT_EQ(copy.tokens()[99], 99);
}

TEST(Shard, RawNanoGptFormatIsReadWithoutHeader) {
  TempDir dir;
  const std::vector<uint16_t> tokens = iota_tokens(9, 100);
  write_file(dir / "train.bin", std::string(reinterpret_cast<const char*>(tokens.data()), 18));
  const TokenShard shard = TokenShard::open(dir / "train.bin");
  EXPECT_EQ(shard.format(), ShardFormat::Raw);
  ASSERT_EQ(shard.size(), 9);
  EXPECT_EQ(shard.tokens()[0], 100);
  EXPECT_EQ(shard.tokens()[8], 108);
  // Forcing the raw format reads an llm.c file's header as tokens: 1024 / 2 + N.
  write_llmc_shard(dir / "l.bin", tokens);
  EXPECT_EQ(TokenShard::open(dir / "l.bin", ShardFormat::Raw).size(), 512 + 9);
}

TEST(Shard, WrongMagicPrintsTheValueFound) {
  TempDir dir;
  // The rest of the header is llm.c's, so auto-detection reports the magic instead of reading raw.
  write_file(dir / "m.bin", llmc_bytes(12345, 1, 4, iota_tokens(4)));
  const std::string msg = message_of([&] { TokenShard::open(dir / "m.bin"); });
  EXPECT_MESSAGE_HAS(msg, dir / "m.bin");
  EXPECT_MESSAGE_HAS(msg, "wrong magic 12345");
  EXPECT_MESSAGE_HAS(msg, "20240520");
  // Forced llm.c: any first word but the magic is wrong.
  write_file(dir / "r.bin", std::string("\x07\x00\x08\x00", 4));
  EXPECT_MESSAGE_HAS(message_of([&] { TokenShard::open(dir / "r.bin", ShardFormat::Llmc); }), "wrong magic 524295");
  // llm.c's Llama-3 shards are named as such.
  write_file(dir / "l3.bin", llmc_bytes(20240801, 7, 4, iota_tokens(4)));
  EXPECT_MESSAGE_HAS(message_of([&] { TokenShard::open(dir / "l3.bin"); }), "Llama-3");
}

TEST(Shard, WrongVersionIsRejected) {
  TempDir dir;
  write_file(dir / "v.bin", llmc_bytes(20240520, 2, 4, iota_tokens(4)));
  const std::string msg = message_of([&] { TokenShard::open(dir / "v.bin"); });
  EXPECT_MESSAGE_HAS(msg, dir / "v.bin");
  EXPECT_MESSAGE_HAS(msg, "unsupported version 2 (expected 1");
}

TEST(Shard, FileShorterThanTheHeaderIsTruncated) {
  TempDir dir;
  write_file(dir / "t.bin", llmc_bytes(20240520, 1, 4, {}).substr(0, 100));
  const std::string msg = message_of([&] { TokenShard::open(dir / "t.bin"); });
  EXPECT_MESSAGE_HAS(msg, dir / "t.bin");
  EXPECT_MESSAGE_HAS(msg, "truncated: 100 bytes");
  EXPECT_MESSAGE_HAS(msg, "1024-byte");
}

TEST(Shard, MissingTokensAreASizeMismatchNamingBothSizes) {
  TempDir dir;
  // The header promises 100 tokens, the file holds 50.
  write_file(dir / "s.bin", llmc_bytes(20240520, 1, 100, iota_tokens(50)));
  const std::string msg = message_of([&] { TokenShard::open(dir / "s.bin"); });
  EXPECT_MESSAGE_HAS(msg, dir / "s.bin");
  EXPECT_MESSAGE_HAS(msg, "size mismatch");
  EXPECT_MESSAGE_HAS(msg, "1024 + 2*100 = 1224 bytes");
  EXPECT_MESSAGE_HAS(msg, "but it is 1124 bytes (truncated)");
}

TEST(Shard, ExtraBytesAreASizeMismatch) {
  TempDir dir;
  write_file(dir / "x.bin", llmc_bytes(20240520, 1, 3, iota_tokens(5)));
  const std::string msg = message_of([&] { TokenShard::open(dir / "x.bin"); });
  EXPECT_MESSAGE_HAS(msg, "1024 + 2*3 = 1030 bytes, but it is 1034 bytes");
  EXPECT_EQ(msg.find("truncated"), std::string::npos) << msg;
}

TEST(Shard, EmptyShardsAreRejected) {
  TempDir dir;
  write_file(dir / "h.bin", llmc_bytes(20240520, 1, 0, {}));
  EXPECT_MESSAGE_HAS(message_of([&] { TokenShard::open(dir / "h.bin"); }), "empty shard (the header says 0 tokens)");
  write_file(dir / "z.bin", "");
  const std::string msg = message_of([&] { TokenShard::open(dir / "z.bin"); });
  EXPECT_MESSAGE_HAS(msg, dir / "z.bin");
  EXPECT_MESSAGE_HAS(msg, "empty file (0 bytes)");
  // The writer refuses to produce one.
  EXPECT_MESSAGE_HAS(message_of([&] { write_llmc_shard(dir / "w.bin", {}); }), "empty shard");
  EXPECT_FALSE(std::filesystem::exists(dir / "w.bin"));
  EXPECT_FALSE(std::filesystem::exists(dir / "w.bin.tmp"));
}

TEST(Shard, OddSizedRawFileIsRejected) {
  TempDir dir;
  write_file(dir / "o.bin", std::string(7, '\x01'));
  const std::string msg = message_of([&] { TokenShard::open(dir / "o.bin"); });
  EXPECT_MESSAGE_HAS(msg, dir / "o.bin");
  EXPECT_MESSAGE_HAS(msg, "odd size of 7 bytes");
}

TEST(Shard, MissingFileNamesThePath) {
  TempDir dir;
  const std::string msg = message_of([&] { TokenShard::open(dir / "nope.bin"); });
  EXPECT_MESSAGE_HAS(msg, dir / "nope.bin");
  EXPECT_MESSAGE_HAS(msg, "cannot open");
}

TEST(Shard, ValidateTokensNamesTheFirstIdOutsideTheVocabulary) {
  TempDir dir;
  std::vector<uint16_t> tokens = iota_tokens(10);
  tokens[7] = 50257;
  tokens[9] = 60000;
  write_llmc_shard(dir / "v.bin", tokens);
  const TokenShard shard = TokenShard::open(dir / "v.bin");
  EXPECT_NO_THROW(shard.validate_tokens(60001));
  const std::string msg = message_of([&] { shard.validate_tokens(50257); });
  EXPECT_MESSAGE_HAS(msg, "token id 50257 at index 7");
  EXPECT_MESSAGE_HAS(msg, "below 50257");
}

TEST(Shard, StreamingWriterAppendsInPiecesAndCleansUpWithoutCommit) {
  TempDir dir;
  {
    LlmcShardWriter w(dir / "p.bin");
    const std::vector<uint16_t> a = iota_tokens(3), b = iota_tokens(4, 3);
    w.append(a.data(), 3);
    w.append(b.data(), 4);
    EXPECT_FALSE(std::filesystem::exists(dir / "p.bin"));  // not visible before commit
    w.commit();
  }
  const TokenShard shard = TokenShard::open(dir / "p.bin");
  ASSERT_EQ(shard.size(), 7);
  for (int i = 0; i < 7; ++i) EXPECT_EQ(shard.tokens()[i], i);
  {
    LlmcShardWriter abandoned(dir / "q.bin");
    const uint16_t one = 1;
    abandoned.append(&one, 1);
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "q.bin"));
  EXPECT_FALSE(std::filesystem::exists(dir / "q.bin.tmp"));
}

TEST(Shard, GlobWithNoMatchNamesThePattern) {
  TempDir dir;
  const std::string pattern = dir / "missing_*.bin";
  const std::string msg = message_of([&] { expand_patterns({pattern}); });
  EXPECT_MESSAGE_HAS(msg, "no file matches the pattern '" + pattern + "'");
}

TEST(Shard, GlobResultsAreSortedAndDeduplicated) {
  TempDir dir;
  for (const char* name : {"s_train_000002.bin", "s_train_000000.bin", "s_train_000001.bin", "s_val_000000.bin"})
    write_llmc_shard(dir / name, iota_tokens(2));
  const std::vector<std::string> files = expand_patterns({dir / "s_train_*.bin", dir / "s_*_000000.bin"});
  const std::vector<std::string> expected = {dir / "s_train_000000.bin", dir / "s_train_000001.bin",
                                             dir / "s_train_000002.bin", dir / "s_val_000000.bin"};
  EXPECT_EQ(files, expected);
}

TEST(Shard, ParseShardFormatNamesUnknownText) {
  EXPECT_EQ(parse_shard_format("llmc"), ShardFormat::Llmc);
  EXPECT_EQ(parse_shard_format("raw"), ShardFormat::Raw);
  EXPECT_EQ(parse_shard_format("auto"), ShardFormat::Auto);
  EXPECT_MESSAGE_HAS(message_of([] { parse_shard_format("npy"); }), "unknown shard format 'npy'");
}

}  // namespace
}  // namespace kraken::data
