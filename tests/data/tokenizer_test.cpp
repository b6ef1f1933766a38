// GPT-2 tokenizer: ids equal to two independent reference encoders on a fixture
// (scripts/make_tokenizer_fixture.js); the pre-tokenisation pattern and the BPE merge order checked by
// hand and against a direct transcription of GPT-2's merge loop on a small vocabulary.
#include <gtest/gtest.h>

#include <chrono>
#include <climits>
#include <map>
#include <random>

#include "data/tokenizer.h"
#include "data/unicode_tables.h"
#include "data_test_util.h"

namespace kraken::data {
namespace {

using test::message_of;
using test::TempDir;

nlohmann::json fixture_cases() {
  const std::string path = test::source_dir() + "/tests/data/fixtures/tokenizer_cases.json";
  const std::string text = test::read_file(path);
  if (text.empty()) throw std::runtime_error("missing fixture " + path);
  return nlohmann::json::parse(text).at("cases");
}

const Tokenizer& gpt2() {
  static const Tokenizer tok = Tokenizer::load(test::gpt2_vocab_dir());
  return tok;
}

// ---- against the reference encoders (needs demo/gpt2) ------------------------------------------------

TEST(Tokenizer, EveryFixtureCaseEqualsTheReferenceIds) {
  KRAKEN_REQUIRE_GPT2_VOCAB();
  const nlohmann::json cases = fixture_cases();
  ASSERT_GE(cases.size(), 30u);
  for (const auto& c : cases) {
    const std::string text = c.at("text").get<std::string>();
    const std::vector<int32_t> expected = c.at("ids").get<std::vector<int32_t>>();
    EXPECT_EQ(gpt2().encode(text), expected) << "case " << c.at("name").get<std::string>();
  }
}

TEST(Tokenizer, DecodeInvertsEncodeOnEveryFixtureCase) {
  KRAKEN_REQUIRE_GPT2_VOCAB();
  for (const auto& c : fixture_cases()) {
    const std::string text = c.at("text").get<std::string>();
    EXPECT_EQ(gpt2().decode(gpt2().encode(text)), text) << "case " << c.at("name").get<std::string>();
  }
}

TEST(Tokenizer, KnownIdsOfGpt2) {
  KRAKEN_REQUIRE_GPT2_VOCAB();
  EXPECT_EQ(gpt2().vocab_size(), 50257);
  EXPECT_EQ(gpt2().eot_id(), 50256);
  EXPECT_EQ(gpt2().encode("Hello world"), (std::vector<int32_t>{15496, 995}));
  EXPECT_EQ(gpt2().encode(" the"), (std::vector<int32_t>{262}));
  EXPECT_EQ(gpt2().decode({15496, 11, 995, 0}), "Hello, world!");
  EXPECT_EQ(gpt2().token_bytes(50256), "<|endoftext|>");
  EXPECT_MESSAGE_HAS(message_of([] { gpt2().decode({50257}); }), "token id 50257 is outside the vocabulary [0, 50257)");
}

TEST(Tokenizer, EndOfTextInTheTextIsOrdinaryText) {
  KRAKEN_REQUIRE_GPT2_VOCAB();
  const std::vector<int32_t> ids = gpt2().encode("<|endoftext|>");
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 50256), 0);
  EXPECT_EQ(ids, (std::vector<int32_t>{27, 91, 437, 1659, 5239, 91, 29}));
}

TEST(Tokenizer, InvalidUtf8RoundTripsByteForByte) {
  KRAKEN_REQUIRE_GPT2_VOCAB();
  const std::string bytes = std::string("ok \xff\xfe\xc3 broken \xe2\x82 end\x80", 22);
  EXPECT_EQ(gpt2().decode(gpt2().encode(bytes)), bytes);
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  EXPECT_EQ(gpt2().decode(gpt2().encode(all)), all);
}

TEST(Tokenizer, SharedCacheAcrossCallsGivesTheSameIds) {
  KRAKEN_REQUIRE_GPT2_VOCAB();
  BpeCache cache(64);  // small, so it fills and is flushed during the loop
  for (const auto& c : fixture_cases()) {
    const std::string text = c.at("text").get<std::string>();
    std::vector<int32_t> ids;
    gpt2().encode(text, cache, ids);
    EXPECT_EQ(ids, c.at("ids").get<std::vector<int32_t>>()) << "case " << c.at("name").get<std::string>();
  }
}

TEST(Tokenizer, CacheKeepsEachMultiBytePieceOnce) {
  KRAKEN_REQUIRE_GPT2_VOCAB();
  BpeCache cache;
  std::vector<int32_t> ids;
  // Pieces: "the", " cat", " the", " cat", " the", "." -- single bytes skip the cache.
  gpt2().encode("the cat the cat the.", cache, ids);
  EXPECT_EQ(cache.size(), 3u);
  gpt2().encode(" cat the", cache, ids);
  EXPECT_EQ(cache.size(), 3u);
  // 200 distinct words, each seen twice: all 200 stay (nothing is flushed below max_entries).
  std::string text;
  for (int i = 0; i < 400; ++i) text += std::string(" ") + char('a' + (i % 200) / 26) + char('a' + (i % 200) % 26) + "q";
  BpeCache many;
  gpt2().encode(text, many, ids);
  EXPECT_EQ(many.size(), 200u);
  const int32_t* first = nullptr;
  size_t count = 0;
  ASSERT_TRUE(cache.find(" cat", &first, &count));
  EXPECT_EQ(std::vector<int32_t>(first, first + count), gpt2().encode(" cat"));
}

// ---- the pattern, by hand ------------------------------------------------------------------------------

std::vector<std::string> pieces(const std::string& text) {
  std::vector<std::string> out;
  for (std::string_view p : Tokenizer::pretokenize(text)) out.emplace_back(p);
  return out;
}
using Pieces = std::vector<std::string>;

TEST(Pretokenize, FollowsGpt2sPatternAlternativeByAlternative) {
  EXPECT_EQ(pieces("Hello world"), (Pieces{"Hello", " world"}));
  EXPECT_EQ(pieces("I'm here, they're"), (Pieces{"I", "'m", " here", ",", " they", "'re"}));
  // The contractions are lower case only: 'S is punctuation then a letter.
  EXPECT_EQ(pieces("HE'S"), (Pieces{"HE", "'", "S"}));
  EXPECT_EQ(pieces("abc123 4.5"), (Pieces{"abc", "123", " 4", ".", "5"}));
  EXPECT_EQ(pieces(" ?!x"), (Pieces{" ?!", "x"}));
  // \s+(?!\S): a run of spaces leaves its last one to the next word.
  EXPECT_EQ(pieces("a   b"), (Pieces{"a", "  ", " b"}));
  EXPECT_EQ(pieces("a\n\nb"), (Pieces{"a", "\n", "\n", "b"}));
  EXPECT_EQ(pieces("a \n b"), (Pieces{"a", " \n", " b"}));
  EXPECT_EQ(pieces("end   "), (Pieces{"end", "   "}));  // at the end the whole run
  EXPECT_EQ(pieces(" "), (Pieces{" "}));
  EXPECT_EQ(pieces(""), (Pieces{}));
  EXPECT_EQ(pieces("caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac"), (Pieces{"caf\xc3\xa9", " \xe6\x97\xa5\xe6\x9c\xac"}));
}

TEST(Pretokenize, WhiteSpaceIsUnicodeWhiteSpaceNotJavaScripts) {
  // U+0085 (NEL) is White_Space (as Python's and tiktoken's \s), U+FEFF is not (JavaScript's \s has it
  // the other way round, which is why the fixture avoids both).
  EXPECT_EQ(pieces("a\xc2\x85\xc2\x85" "b"), (Pieces{"a", "\xc2\x85", "\xc2\x85", "b"}));
  EXPECT_EQ(pieces("a \xef\xbb\xbf" "b"), (Pieces{"a", " \xef\xbb\xbf", "b"}));
  // NBSP and the ideographic space are white space, but only U+0020 joins the next word.
  EXPECT_EQ(pieces("a\xc2\xa0" "b"), (Pieces{"a", "\xc2\xa0", "b"}));
  EXPECT_EQ(pieces("a\xe3\x80\x80\xe3\x80\x80" "b"), (Pieces{"a", "\xe3\x80\x80", "\xe3\x80\x80", "b"}));
}

TEST(Pretokenize, InvalidBytesArePunctuationAndPiecesConcatenateToTheText) {
  EXPECT_EQ(pieces("x\xff\xfe y"), (Pieces{"x", "\xff\xfe", " y"}));
  for (const auto& c : fixture_cases()) {
    const std::string text = c.at("text").get<std::string>();
    std::string joined;
    for (const std::string& p : pieces(text)) {
      EXPECT_FALSE(p.empty());
      joined += p;
    }
    EXPECT_EQ(joined, text);
  }
}

TEST(Pretokenize, UnicodeTablesClassifyKnownCodePoints) {
  auto in = [](const auto& ranges, uint32_t cp) {
    for (const auto& r : ranges)
      if (cp >= r.first && cp <= r.last) return true;
    return false;
  };
  EXPECT_STREQ(unicode::kUnicodeVersion, "14.0.0");
  for (uint32_t cp : {0x41u, 0x7Au, 0xE9u, 0x4E2Du, 0x0416u, 0x05D0u, 0x3042u})
    EXPECT_TRUE(in(unicode::kLetterRanges, cp)) << std::hex << cp;
  for (uint32_t cp : {0x30u, 0x39u, 0xBDu, 0x2167u, 0x0663u, 0x1D7D8u})
    EXPECT_TRUE(in(unicode::kNumberRanges, cp)) << std::hex << cp;
  for (uint32_t cp : {0x21u, 0x1F600u, 0x2764u, 0x200Du, 0xFEFFu}) {
    EXPECT_FALSE(in(unicode::kLetterRanges, cp)) << std::hex << cp;
    EXPECT_FALSE(in(unicode::kNumberRanges, cp)) << std::hex << cp;
  }
}

// ---- BPE merge order on a small vocabulary ---------------------------------------------------------

// GPT-2's merge loop as encoder.py writes it, over strings: find the lowest-ranked pair, merge all of
// its occurrences left to right, repeat. Quadratic, and obviously right.
std::vector<std::string> reference_bpe(const std::string& piece, const std::map<std::pair<std::string, std::string>, int>& ranks) {
  std::vector<std::string> word;
  for (char c : piece) word.emplace_back(1, c);
  while (word.size() > 1) {
    int best = INT_MAX;
    std::pair<std::string, std::string> bigram;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      const auto it = ranks.find({word[i], word[i + 1]});
      if (it != ranks.end() && it->second < best) best = it->second, bigram = it->first;
    }
    if (best == INT_MAX) break;
    std::vector<std::string> merged;
    for (size_t i = 0; i < word.size();) {
      if (i + 1 < word.size() && word[i] == bigram.first && word[i + 1] == bigram.second) {
        merged.push_back(word[i] + word[i + 1]);
        i += 2;
      } else {
        merged.push_back(word[i++]);
      }
    }
    word = merged;
  }
  return word;
}

TEST(Bpe, MergesMatchGpt2sLoopOnRandomWords) {
  TempDir dir;
  // Ranks 2 to 4 use tokens that later merges create ("ca", "bb"). Such a merge may fire only after
  // the round that creates its token has merged every occurrence: in "caca", GPT-2 makes ca + ca, and
  // letting "ca c" cut in after the first "c a" would give cac + a instead.
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"a", "a"}, {"a", "b"}, {"a", "ca"}, {"bb", "c"}, {"ca", "c"}, {"b", "a"}, {"aa", "a"}, {"ab", "a"}, {"aa", "aa"},
      {"b", "b"}, {"ab", "ab"}, {"ba", "b"}, {"aaa", "b"}, {"c", "a"}, {"ca", "b"}, {"bb", "bb"}, {"a", "c"}};
  test::write_synthetic_vocab(dir.path(), merges);
  const Tokenizer tok = Tokenizer::load(dir.path());
  std::map<std::pair<std::string, std::string>, int> ranks;
  for (size_t r = 0; r < merges.size(); ++r) ranks.emplace(merges[r], static_cast<int>(r));

  // Left to right and non-overlapping within one merge: "aaa" -> aa + a, "aaaaa" -> aaaa + a.
  EXPECT_EQ(tok.decode({tok.encode("aaa")[0]}), "aaa");  // "aa a" (rank 6) follows "a a"
  std::vector<std::string> caca;
  for (int32_t id : tok.encode("caca")) caca.push_back(tok.token_bytes(id));
  EXPECT_EQ(caca, (std::vector<std::string>{"ca", "ca"}));
  std::mt19937 rng(5);
  for (int trial = 0; trial < 2000; ++trial) {
    std::string word;
    const int len = 1 + static_cast<int>(rng() % 24);
    for (int i = 0; i < len; ++i) word.push_back("abc"[rng() % 3]);
    std::vector<std::string> got;
    for (int32_t id : tok.encode(word)) got.push_back(tok.token_bytes(id));
    EXPECT_EQ(got, reference_bpe(word, ranks)) << "word " << word;
  }
}

TEST(Bpe, LongPieceIsNotQuadratic) {
  TempDir dir;
  test::write_synthetic_vocab(dir.path(), {{"a", "a"}, {"aa", "aa"}, {"aaaa", "aaaa"}});
  const Tokenizer tok = Tokenizer::load(dir.path());
  // One piece of 2^20 letters; the reference loop would take about 10^12 steps.
  const std::string text(size_t{1} << 20, 'a');
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = tok.encode(text);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_EQ(ids.size(), (size_t{1} << 20) / 8);
  EXPECT_EQ(tok.token_bytes(ids[0]), "aaaaaaaa");
  EXPECT_LT(s, 2.0);  // O(m log m): well under a second here; quadratic would not finish
}

// ---- load errors -------------------------------------------------------------------------------------

TEST(TokenizerLoad, ErrorsNameTheFileAndLine) {
  TempDir dir;
  test::write_synthetic_vocab(dir.path(), {{"a", "b"}, {"ab", "c"}});
  EXPECT_NO_THROW(Tokenizer::load(dir.path()));
  const std::string bpe = dir / "vocab.bpe", enc = dir / "encoder.json";

  test::write_file(bpe, "#version: 0.2\na b\nab\n");
  std::string msg = message_of([&] { Tokenizer::load(dir.path()); });
  EXPECT_MESSAGE_HAS(msg, bpe + ":3: expected two tokens separated by one space, got 'ab'");

  test::write_file(bpe, "#version: 0.2\na b\nab x\n");  // "abx" is not in the encoder
  msg = message_of([&] { Tokenizer::load(dir.path()); });
  EXPECT_MESSAGE_HAS(msg, bpe + ":3:");
  EXPECT_MESSAGE_HAS(msg, "does not have");

  test::write_file(bpe, "#version: 0.2\na b\na b\n");
  EXPECT_MESSAGE_HAS(message_of([&] { Tokenizer::load(dir.path()); }), bpe + ":3: the merge 'a b' repeats line 2");

  test::write_file(bpe, "a b\n");
  EXPECT_MESSAGE_HAS(message_of([&] { Tokenizer::load(dir.path()); }), bpe + ":1: expected a '#version' line");

  test::write_file(enc, "{\n\"a\": 0,\n\"b\": }");
  msg = message_of([&] { Tokenizer::load(dir.path()); });
  EXPECT_MESSAGE_HAS(msg, enc + ":3: invalid JSON");

  test::write_file(enc, R"({"a": 0, "b": 0})");
  EXPECT_MESSAGE_HAS(message_of([&] { Tokenizer::load(dir.path()); }), "id 0 is used twice");

  test::write_file(enc, R"({"a": 0, "b": 1})");
  EXPECT_MESSAGE_HAS(message_of([&] { Tokenizer::load(dir.path()); }), "no token for the single byte 0");

  EXPECT_MESSAGE_HAS(message_of([&] { Tokenizer::load(dir / "nowhere"); }), dir / "nowhere/encoder.json: cannot open");
}

}  // namespace
}  // namespace kraken::data
