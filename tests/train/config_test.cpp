// Config validation: every mistake names the file, the line, the key and what was expected.
#include <gtest/gtest.h>

#include "train/config.h"

namespace kraken::train {
namespace {

const char* kValid = R"([model]
n_layer = 2
n_embd = 64
n_head = 4
degree = 2
context = 32

[data]
train = "shards/train_*.bin"
val = ["shards/val_*.bin"]

[train]
batch_size = 2
seq_len = 16
max_steps = 10

[optim]
name = "adamw"
lr = 1e-3
)";

std::string error_of(const std::string& text) {
  try {
    parse_config(text, "job.toml", false);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

void expect_error(const std::string& text, const std::vector<std::string>& fragments) {
  const std::string msg = error_of(text);
  for (const std::string& f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "missing '" << f << "' in: " << msg;
}

TEST(Config, ValidFileParsesWithDefaults) {
  Config c = parse_config(kValid, "job.toml", false);
  EXPECT_EQ(c.model.n_layer, 2);
  EXPECT_EQ(c.model.degree, 2);
  EXPECT_EQ(c.model.mlp_expansion, 2);  // Kraken default for degree > 1
  EXPECT_FALSE(c.model.bias);
  EXPECT_EQ(c.data.train, (std::vector<std::string>{"shards/train_*.bin"}));
  EXPECT_EQ(c.data.val.size(), 1u);
  EXPECT_DOUBLE_EQ(c.optim.lr, 1e-3);
  EXPECT_DOUBLE_EQ(c.optim.min_lr, 1e-4);
  EXPECT_EQ(c.train.grad_accum, 1);
  EXPECT_EQ(c.checkpoint_dir(), "runs/default/checkpoints");
  EXPECT_EQ(c.tokens_per_step(), 2 * 16);
}

TEST(Config, DegreeOneDefaultsToGpt2) {
  std::string text = kValid;
  text.replace(text.find("degree = 2"), 10, "degree = 1");
  Config c = parse_config(text, "job.toml", false);
  EXPECT_EQ(c.model.mlp_expansion, 4);
  EXPECT_TRUE(c.model.bias);
}

TEST(Config, UnknownKeyNamesLineAndKnownKeys) {
  std::string text = kValid;
  text.replace(text.find("context = 32"), 12, "contxt = 32");
  expect_error(text, {"job.toml:6:", "[model]", "unknown key 'contxt'", "context"});
}

TEST(Config, UnknownTableIsAnError) {
  expect_error(std::string(kValid) + "\n[trian]\nx = 1\n", {"job.toml:21", "trian"});
}

TEST(Config, WrongTypeNamesKeyAndExpectation) {
  std::string text = kValid;
  text.replace(text.find("n_layer = 2"), 11, "n_layer = \"two\"");
  expect_error(text, {"job.toml:2:", "[model] n_layer = \"two\"", "expected an integer"});
}

TEST(Config, OutOfRangeValue) {
  std::string text = kValid;
  text.replace(text.find("batch_size = 2"), 14, "batch_size = 0");
  expect_error(text, {"job.toml:13:", "[train] batch_size = 0", "in [1, "});
}

TEST(Config, HeadsMustDivideEvenlyOverSubLayers) {
  std::string text = kValid;
  text.replace(text.find("n_head = 4"), 10, "n_head = 3");
  expect_error(text, {"job.toml:5:", "[model] degree = 2", "n_head = 3", "not divisible"});
}

TEST(Config, EmbeddingMustDivideOverHeads) {
  std::string text = kValid;
  text.replace(text.find("n_embd = 64"), 11, "n_embd = 65");
  expect_error(text, {"job.toml:3:", "[model] n_embd = 65", "not divisible"});
}

TEST(Config, SequenceLongerThanContext) {
  std::string text = kValid;
  text.replace(text.find("seq_len = 16"), 12, "seq_len = 64");
  expect_error(text, {"job.toml:14:", "seq_len = 64", "model.context = 32"});
}

TEST(Config, StringChoicesAreListed) {
  std::string text = kValid;
  text.replace(text.find("name = \"adamw\""), 14, "name = \"adam\"");
  expect_error(text, {"job.toml:18:", "[optim] name = \"adam\"", "\"adamw\"", "\"optex\"", "\"sgd\""});
}

TEST(Config, SyntaxErrorHasLineAndColumn) {
  expect_error("[model]\nn_layer = = 2\n", {"job.toml:2:", "TOML syntax error"});
}

TEST(Config, MissingTrainShards) {
  std::string text = kValid;
  text.replace(text.find("train = \"shards/train_*.bin\""), 28, "");
  expect_error(text, {"[data] train", "required"});
}

TEST(Config, PipelineSplitMustCoverEveryLayer) {
  expect_error(std::string(kValid) + "[parallel]\npp = 2\nlayers_per_stage = [1, 2]\n",
               {"[parallel] layers_per_stage", "adds up to 3", "n_layer = 2"});
}

TEST(Config, TensorParallelMustDivideDegree) {
  std::string text = std::string(kValid) + "[parallel]\ntp = 4\n";
  expect_error(text, {"[parallel] tp = 4", "must divide model.degree = 2"});
}

TEST(Config, OptexTableNeedsOptexOptimizer) {
  expect_error(std::string(kValid) + "[optim.optex]\nparallelism = 4\n", {"[optim.optex]", "name = \"optex\""});
}

TEST(Config, OptexKeysAreValidated) {
  std::string text = kValid;
  text.replace(text.find("name = \"adamw\""), 14, "name = \"optex\"");
  text += "[optim.optex]\nparallelism = 4\nhistory = 1\n";
  expect_error(text, {"[optim.optex] history = 1", "in [2, "});
}

TEST(Config, MissingFileIsAClearError) {
  try {
    load_config("/nonexistent/job.toml");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/job.toml"), std::string::npos);
  }
}

}  // namespace
}  // namespace kraken::train
