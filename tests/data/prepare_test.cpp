// kraken-prepare: documents in, shards out. The token stream of each split must equal, token for
// token, <|endoftext|> + encode(document) over its documents in order, cut at the shard size; the
// split and the bytes must not depend on the thread count.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>

#include "data/prepare.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "data_test_util.h"

namespace kraken::data {
namespace {

using test::message_of;
using test::TempDir;
using test::write_file;

const std::vector<std::pair<std::string, std::string>> kMerges = {
    {"t", "h"}, {"th", "e"}, {" ", "the"}, {"e", "r"}, {"o", "n"}, {"i", "n"}, {" ", "a"}, {"a", "n"}, {"an", "d"}};

// A corpus of 12 text files (two folders deep, plus a file that is not *.txt) and a JSONL file with
// 5 documents (and a blank line).
std::vector<std::string> make_corpus(const TempDir& dir) {
  for (int i = 0; i < 12; ++i) {
    std::string text = "Document " + std::to_string(i) + ": the other one and another, then more.";
    for (int r = 0; r < i % 4; ++r) text += "\nThe end of line " + std::to_string(r) + " in doc " + std::to_string(i);
    write_file(dir / ("corpus/" + std::string(i < 6 ? "a/" : "b/c/") + "doc" + std::to_string(10 + i) + ".txt"), text);
  }
  write_file(dir / "corpus/README.md", "not a document");
  write_file(dir / "extra.jsonl",
             "{\"text\": \"json one, with \\u00e9\", \"id\": 1}\n"
             "{\"text\": \"json two\"}\n"
             "\n"
             "{\"text\": \"json three\"}\n"
             "{\"text\": \"json four\", \"meta\": {\"x\": [1, 2]}}\n"
             "{\"text\": \"json five and the end\"}");  // no final newline
  return {dir / "corpus", dir / "extra.jsonl"};
}

std::vector<uint16_t> read_split(const std::vector<std::string>& shards) {
  std::vector<uint16_t> all;
  for (const std::string& path : shards) {
    const TokenShard s = TokenShard::open(path, ShardFormat::Llmc);
    all.insert(all.end(), s.tokens(), s.tokens() + s.size());
  }
  return all;
}

PrepareOptions options_for(const TempDir& dir, const std::vector<std::string>& inputs, const std::string& out) {
  PrepareOptions o;
  o.inputs = inputs;
  o.vocab_dir = dir / "vocab";
  o.out_dir = dir / out;
  o.name = "toy";
  o.val_docs = 3;
  o.seed = 11;
  o.shard_tokens = 40;
  o.threads = 2;
  return o;
}

TEST(Prepare, ShardsHoldEachDocumentAfterEndOfTextInOrder) {
  TempDir dir;
  test::write_synthetic_vocab(dir / "vocab", kMerges);
  const std::vector<std::string> inputs = make_corpus(dir);
  const PrepareOptions o = options_for(dir, inputs, "out");
  const PrepareSummary s = prepare_shards(o);

  const DocumentList list = list_documents(inputs);
  ASSERT_EQ(list.documents.size(), 17u);
  EXPECT_EQ(list.files[0], dir / "corpus/a/doc10.txt");  // path order; README.md skipped
  EXPECT_EQ(list.documents[16].line, 6);                  // the blank line 3 is no document
  EXPECT_EQ(s.documents, 17);
  EXPECT_EQ(s.val_documents, 3);
  EXPECT_EQ(s.train_documents, 14);

  // The expected streams, built independently from the documents.
  const Tokenizer tok = Tokenizer::load(o.vocab_dir);
  const std::vector<bool> is_val = choose_validation(17, 0.0, 3, o.seed);
  std::vector<uint16_t> train, val;
  int64_t bytes = 0;
  for (size_t i = 0; i < list.documents.size(); ++i) {
    const std::string text = read_document(list, list.documents[i], "text");
    bytes += static_cast<int64_t>(text.size());
    std::vector<uint16_t>& split = is_val[i] ? val : train;
    split.push_back(static_cast<uint16_t>(tok.eot_id()));
    for (int32_t id : tok.encode(text)) split.push_back(static_cast<uint16_t>(id));
  }
  EXPECT_EQ(read_document(list, list.documents[12], "text"), "json one, with \xc3\xa9");
  EXPECT_EQ(s.bytes, bytes);
  EXPECT_EQ(read_split(s.train_shards), train);
  EXPECT_EQ(read_split(s.val_shards), val);
  EXPECT_EQ(s.train_tokens, static_cast<int64_t>(train.size()));
  EXPECT_EQ(s.val_tokens, static_cast<int64_t>(val.size()));

  // Shards of exactly 40 tokens but the last, named in order.
  ASSERT_EQ(s.train_shards.size(), (train.size() + 39) / 40);
  for (size_t k = 0; k < s.train_shards.size(); ++k) {
    char name[64];
    std::snprintf(name, sizeof(name), "toy_train_%06zu.bin", k);
    EXPECT_EQ(s.train_shards[k], dir / ("out/" + std::string(name)));
    const int64_t size = TokenShard::open(s.train_shards[k]).size();
    EXPECT_EQ(size, k + 1 < s.train_shards.size() ? 40 : static_cast<int64_t>(train.size() - 40 * k));
  }
  EXPECT_EQ(s.val_shards.front(), dir / "out/toy_val_000000.bin");
}

TEST(Prepare, OutputIsTheSameForAnyThreadCount) {
  TempDir dir;
  test::write_synthetic_vocab(dir / "vocab", kMerges);
  const std::vector<std::string> inputs = make_corpus(dir);
  PrepareOptions one = options_for(dir, inputs, "one"), three = options_for(dir, inputs, "three");
  one.threads = 1;
  three.threads = 3;
  const PrepareSummary a = prepare_shards(one), b = prepare_shards(three);
  ASSERT_EQ(a.train_shards.size(), b.train_shards.size());
  for (size_t k = 0; k < a.train_shards.size(); ++k)
    EXPECT_EQ(test::read_file(a.train_shards[k]), test::read_file(b.train_shards[k])) << "train shard " << k;
  EXPECT_EQ(test::read_file(a.val_shards[0]), test::read_file(b.val_shards[0]));
}

TEST(Prepare, ValidationSplitIsDeterministicBySeed) {
  const std::vector<bool> a = choose_validation(1000, 0.05, -1, 7);
  EXPECT_EQ(std::count(a.begin(), a.end(), true), 50);
  EXPECT_EQ(choose_validation(1000, 0.05, -1, 7), a);
  const std::vector<bool> b = choose_validation(1000, 0.05, -1, 8);
  EXPECT_EQ(std::count(b.begin(), b.end(), true), 50);
  EXPECT_NE(a, b);
  // A positive fraction gives at least one document; zero gives none; a count overrides the fraction.
  const std::vector<bool> tiny = choose_validation(100, 0.0005, -1, 1);
  EXPECT_EQ(std::count(tiny.begin(), tiny.end(), true), 1);
  const std::vector<bool> none = choose_validation(100, 0.0, -1, 1);
  EXPECT_EQ(std::count(none.begin(), none.end(), true), 0);
  const std::vector<bool> four = choose_validation(100, 0.5, 4, 1);
  EXPECT_EQ(std::count(four.begin(), four.end(), true), 4);
  EXPECT_MESSAGE_HAS(message_of([] { choose_validation(5, 0.0, 5, 1); }), "5 of 5 documents leaves no training document");
  EXPECT_MESSAGE_HAS(message_of([] { choose_validation(5, 1.0, -1, 1); }), "fraction 1 is outside [0, 1)");
}

TEST(Prepare, JsonlProblemsNameFileAndLine) {
  TempDir dir;
  test::write_synthetic_vocab(dir / "vocab", kMerges);
  const std::string bad = dir / "bad.jsonl";
  auto run_on = [&](const std::string& content, const std::string& field = "text") {
    write_file(bad, content);
    PrepareOptions o = options_for(dir, {bad}, "out");
    o.val_docs = 0;
    o.jsonl_field = field;
    o.overwrite = true;
    return message_of([&] { prepare_shards(o); });
  };
  EXPECT_MESSAGE_HAS(run_on("{\"text\": \"fine\"}\n{\"text\": broken}\n"), bad + ":2: invalid JSON");
  EXPECT_MESSAGE_HAS(run_on("{\"text\": \"fine\"}\n\n{\"body\": \"x\"}\n"), bad + ":3: no field 'text'");
  EXPECT_MESSAGE_HAS(run_on("{\"text\": 5}\n"), bad + ":1: field 'text' is number, expected a string");
  EXPECT_MESSAGE_HAS(run_on("[1, 2]\n"), bad + ":1: expected a JSON object, got array");
  EXPECT_EQ(run_on("{\"body\": \"custom field\"}\n", "body"), "(no error)");
}

TEST(Prepare, ExistingShardsAreRefusedUnlessOverwriteWhichRemovesStaleOnes) {
  TempDir dir;
  test::write_synthetic_vocab(dir / "vocab", kMerges);
  const std::vector<std::string> inputs = make_corpus(dir);
  PrepareOptions o = options_for(dir, inputs, "out");
  prepare_shards(o);
  write_llmc_shard(dir / "out/toy_train_000099.bin", {1, 2, 3});  // a leftover of an earlier, larger run
  write_llmc_shard(dir / "out/other_train_000000.bin", {1, 2, 3});  // another name: untouched
  const std::string msg = message_of([&] { prepare_shards(o); });
  EXPECT_MESSAGE_HAS(msg, "already exists");
  EXPECT_MESSAGE_HAS(msg, "--overwrite");
  o.overwrite = true;
  const PrepareSummary s = prepare_shards(o);
  EXPECT_FALSE(std::filesystem::exists(dir / "out/toy_train_000099.bin"));
  EXPECT_TRUE(std::filesystem::exists(dir / "out/other_train_000000.bin"));
  EXPECT_EQ(expand_patterns({dir / "out/toy_train_*.bin"}), s.train_shards);
}

TEST(Prepare, BadInputsAreNamed) {
  TempDir dir;
  test::write_synthetic_vocab(dir / "vocab", kMerges);
  EXPECT_MESSAGE_HAS(message_of([&] { prepare_shards(options_for(dir, {dir / "nothing"}, "out")); }),
                     "input " + dir / "nothing" + ": no such file or directory");
  std::filesystem::create_directories(dir / "empty");
  write_file(dir / "empty/notes.md", "x");
  EXPECT_MESSAGE_HAS(message_of([&] { prepare_shards(options_for(dir, {dir / "empty"}, "out")); }), "holds no *.txt file");
  PrepareOptions o = options_for(dir, make_corpus(dir), "out");
  o.vocab_dir = dir / "novocab";
  EXPECT_MESSAGE_HAS(message_of([&] { prepare_shards(o); }), dir / "novocab/encoder.json: cannot open");
}

// ---- the program itself ------------------------------------------------------------------------------

// build/tests/kraken_tests_data -> build/bin/kraken-prepare
std::string prepare_binary() {
  return (std::filesystem::read_symlink("/proc/self/exe").parent_path().parent_path() / "bin/kraken-prepare").string();
}

int run_command(const std::string& command) {
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(PrepareTool, RunsEndToEndAndPrintsASummary) {
  const std::string tool = prepare_binary();
  if (!std::filesystem::exists(tool)) GTEST_SKIP() << tool << " is not built";
  TempDir dir;
  test::write_synthetic_vocab(dir / "vocab", kMerges);
  make_corpus(dir);
  const std::string cmd = tool + " " + dir / "corpus" + " " + dir / "extra.jsonl" + " --vocab-dir " + dir / "vocab" +
                          " --out-dir " + dir / "out" + " --name cli --val-docs 2 --shard-tokens 100 --threads 2 > " +
                          dir / "stdout" + " 2> " + dir / "stderr";
  ASSERT_EQ(run_command(cmd), 0) << test::read_file(dir / "stderr");
  const std::string out = test::read_file(dir / "stdout");
  EXPECT_MESSAGE_HAS(out, "documents  17 (train 15, val 2)");
  EXPECT_MESSAGE_HAS(out, "tokens/s");
  EXPECT_MESSAGE_HAS(test::read_file(dir / "stderr"), "prepare: 17/17 documents (100.0%)");
  const std::vector<std::string> train = expand_patterns({dir / "out/cli_train_*.bin"});
  const std::vector<std::string> val = expand_patterns({dir / "out/cli_val_*.bin"});
  int64_t tokens = 0;
  for (const auto& f : train) tokens += TokenShard::open(f).size();
  for (const auto& f : val) tokens += TokenShard::open(f).size();
  EXPECT_MESSAGE_HAS(out, "tokens     " + std::to_string(tokens) + " ");
}

TEST(PrepareTool, ErrorsArePrefixedAndExitWith2) {
  const std::string tool = prepare_binary();
  if (!std::filesystem::exists(tool)) GTEST_SKIP() << tool << " is not built";
  TempDir dir;
  write_file(dir / "a.txt", "text");
  const std::string cmd = tool + " " + dir / "a.txt" + " --vocab-dir " + dir / "missing" + " --out-dir " + dir / "out" +
                          " 2> " + dir / "stderr";
  EXPECT_EQ(run_command(cmd), 2);
  EXPECT_MESSAGE_HAS(test::read_file(dir / "stderr"), "kraken-prepare: error: GPT-2 encoder " + dir / "missing/encoder.json");
  // A usage error (here a missing required option) exits 2 as well.
  EXPECT_EQ(run_command(tool + " " + dir / "a.txt" + " --out-dir " + dir / "out" + " 2> " + dir / "stderr"), 2);
  EXPECT_MESSAGE_HAS(test::read_file(dir / "stderr"), "--vocab-dir is required");
}

}  // namespace
}  // namespace kraken::data
