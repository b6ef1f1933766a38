// DataLoader: exact windows on shards whose token at position p is p, so every batch can be checked
// against the closed form of the layout.
#include <gtest/gtest.h>

#include <algorithm>

#include "data/loader.h"
#include "data_test_util.h"

namespace kraken::data {
namespace {

using test::message_of;
using test::TempDir;

// A shard holding first, first + 1, ..., first + n - 1.
std::string counting_shard(const TempDir& dir, const std::string& name, int n, int first = 0) {
  std::vector<uint16_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = static_cast<uint16_t>(first + i);
  write_llmc_shard(dir / name, t);
  return dir / name;
}

LoaderOptions opts(int64_t B, int64_t T, int rank = 0, int size = 1, bool shuffle = false, uint64_t seed = 0) {
  LoaderOptions o;
  o.batch_size = B;
  o.seq_len = T;
  o.dp_rank = rank;
  o.dp_size = size;
  o.shuffle = shuffle;
  o.seed = seed;
  return o;
}

std::vector<int32_t> ints(const runtime::Tensor& t) { return t.to_int_vector(); }

TEST(Loader, SequentialBatchesAreConsecutiveWindowsWithShiftedTargets) {
  TempDir dir;
  // B=2, T=4: windows of 8 tokens; (100 - 1) / 8 = 12 windows.
  DataLoader loader({counting_shard(dir, "a.bin", 100)}, opts(2, 4));
  EXPECT_EQ(loader.batches_per_epoch(), 12);
  for (int k = 0; k < 3; ++k) {
    const Batch b = loader.next();
    EXPECT_EQ(b.inputs.shape(), (runtime::Shape{2, 4}));
    EXPECT_EQ(b.inputs.dtype(), runtime::DType::I32);
    const std::vector<int32_t> in = ints(b.inputs), tg = ints(b.targets);
    for (int i = 0; i < 8; ++i) {
      EXPECT_EQ(in[i], 8 * k + i) << "batch " << k << " element " << i;
      EXPECT_EQ(tg[i], 8 * k + i + 1) << "batch " << k << " element " << i;
    }
  }
}

TEST(Loader, DataParallelRanksTakeDisjointSlicesThatTileTheWindow) {
  TempDir dir;
  const std::string shard = counting_shard(dir, "a.bin", 200);
  // B=2, T=3, dp_size=2: a window of 12 tokens per step, rank r at offset 6r.
  DataLoader r0({shard}, opts(2, 3, 0, 2)), r1({shard}, opts(2, 3, 1, 2));
  EXPECT_EQ(r0.batches_per_epoch(), (200 - 1) / 12);
  for (int step = 0; step < 4; ++step) {
    const std::vector<int32_t> a = ints(r0.next().inputs), b = ints(r1.next().inputs);
    std::vector<int32_t> both(a);
    both.insert(both.end(), b.begin(), b.end());
    for (int i = 0; i < 12; ++i) EXPECT_EQ(both[i], 12 * step + i) << "step " << step;
  }
  EXPECT_EQ(r0.state(), r1.state());  // the position is the same on every rank
}

TEST(Loader, WrapsAroundAtTheEndAndCountsEpochs) {
  TempDir dir;
  // Two shards: 3 windows of 4 (13 tokens, the last only a target) and 2 windows (9 tokens).
  DataLoader loader({counting_shard(dir, "a.bin", 13), counting_shard(dir, "b.bin", 9, 1000)}, opts(1, 4));
  ASSERT_EQ(loader.batches_per_epoch(), 5);
  const std::vector<int32_t> starts = {0, 4, 8, 1000, 1004};
  for (int epoch = 0; epoch < 2; ++epoch) {
    for (int k = 0; k < 5; ++k) {
      EXPECT_EQ(loader.epoch(), epoch);
      const Batch b = loader.next();
      EXPECT_EQ(ints(b.inputs)[0], starts[k]) << "epoch " << epoch << " batch " << k;
      EXPECT_EQ(ints(b.targets)[3], starts[k] + 4);
    }
  }
  EXPECT_EQ(loader.epoch(), 2);
}

TEST(Loader, ShuffledEpochIsAPermutationOfAllWindowsAndReproducible) {
  TempDir dir;
  const std::vector<std::string> files = {counting_shard(dir, "a.bin", 161), counting_shard(dir, "b.bin", 81, 10000),
                                          counting_shard(dir, "c.bin", 121, 20000)};
  const LoaderOptions o = opts(2, 4, 0, 1, true, 1234);
  DataLoader loader(files, o), again(files, o), other(files, opts(2, 4, 0, 1, true, 99));
  ASSERT_EQ(loader.batches_per_epoch(), 20 + 10 + 15);
  std::vector<int32_t> epoch0, epoch1, other0;
  for (int64_t k = 0; k < loader.batches_per_epoch(); ++k) {
    const int32_t first = ints(loader.next().inputs)[0];
    EXPECT_EQ(ints(again.next().inputs)[0], first) << "batch " << k;
    epoch0.push_back(first);
    other0.push_back(ints(other.next().inputs)[0]);
  }
  for (int64_t k = 0; k < loader.batches_per_epoch(); ++k) epoch1.push_back(ints(loader.next().inputs)[0]);

  std::vector<int32_t> all;
  for (int w = 0; w < 20; ++w) all.push_back(8 * w);
  for (int w = 0; w < 10; ++w) all.push_back(10000 + 8 * w);
  for (int w = 0; w < 15; ++w) all.push_back(20000 + 8 * w);
  for (const auto* order : {&epoch0, &epoch1, &other0}) {
    std::vector<int32_t> sorted(*order);
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(sorted, all);  // every window exactly once
  }
  std::vector<int32_t> sequential(all);
  EXPECT_NE(epoch0, sequential);
  EXPECT_NE(epoch0, epoch1);  // reshuffled every epoch
  EXPECT_NE(epoch0, other0);  // the seed matters
  // Windows of one shard stay together (llm.c's scheme: shard order, then window order within it).
  int switches = 0;
  for (size_t k = 1; k < epoch0.size(); ++k) switches += epoch0[k] / 10000 != epoch0[k - 1] / 10000;
  EXPECT_EQ(switches, 2);
}

TEST(Loader, ShuffledRanksDrawTheSameWindow) {
  TempDir dir;
  const std::vector<std::string> files = {counting_shard(dir, "a.bin", 400), counting_shard(dir, "b.bin", 300, 1000)};
  DataLoader r0(files, opts(2, 5, 0, 2, true, 7)), r1(files, opts(2, 5, 1, 2, true, 7));
  for (int k = 0; k < 30; ++k) {
    const std::vector<int32_t> a = ints(r0.next().inputs), b = ints(r1.next().inputs);
    EXPECT_EQ(a[0] % 20, 0);
    EXPECT_EQ(b[0], a[0] + 10) << "step " << k;
  }
}

void expect_restore_continues(const std::vector<std::string>& files, const LoaderOptions& o, int before, int after) {
  DataLoader straight(files, o);
  for (int k = 0; k < before; ++k) straight.next();
  const nlohmann::json saved = straight.state();  // as a checkpoint stores it
  std::vector<std::vector<int32_t>> expected;
  for (int k = 0; k < after; ++k) {
    const Batch b = straight.next();
    std::vector<int32_t> both = ints(b.inputs), tg = ints(b.targets);
    both.insert(both.end(), tg.begin(), tg.end());
    expected.push_back(both);
  }
  DataLoader resumed(files, o);
  resumed.next();  // somewhere else first, so restore must really move it
  resumed.restore(nlohmann::json::parse(saved.dump()).get<LoaderState>());
  for (int k = 0; k < after; ++k) {
    const Batch b = resumed.next();
    std::vector<int32_t> both = ints(b.inputs), tg = ints(b.targets);
    both.insert(both.end(), tg.begin(), tg.end());
    EXPECT_EQ(both, expected[k]) << "batch " << k << " after restoring at " << before;
  }
  EXPECT_EQ(resumed.state(), straight.state());
}

TEST(Loader, RestoreMidEpochContinuesExactlyAsAnUninterruptedLoader) {
  TempDir dir;
  const std::vector<std::string> files = {counting_shard(dir, "a.bin", 161), counting_shard(dir, "b.bin", 81, 10000)};
  // 30 batches per epoch: restore inside a shard, at a shard boundary and across the epoch's end.
  for (int before : {0, 7, 20, 29, 33}) {
    expect_restore_continues(files, opts(2, 4), before, 12);
    expect_restore_continues(files, opts(2, 4, 0, 1, true, 42), before, 12);
    expect_restore_continues(files, opts(1, 4, 1, 2, true, 42), before, 12);
  }
}

TEST(Loader, StateRoundTripsThroughJson) {
  LoaderState s;
  s.epoch = 3;
  s.shard = 1;
  s.window = 17;
  s.num_shards = 4;
  s.window_tokens = 4096;
  s.shuffle = true;
  s.seed = 0xFFFFFFFFFFFFFFF0ull;  // a full 64-bit seed survives
  const nlohmann::json j = s;
  EXPECT_EQ(j.at("window").get<int64_t>(), 17);
  EXPECT_EQ(nlohmann::json::parse(j.dump()).get<LoaderState>(), s);
  nlohmann::json missing = j;
  missing.erase("window");
  EXPECT_MESSAGE_HAS(message_of([&] { missing.get<LoaderState>(); }), "missing key 'window'");
  nlohmann::json wrong = j;
  wrong["epoch"] = "three";
  EXPECT_MESSAGE_HAS(message_of([&] { wrong.get<LoaderState>(); }), "key 'epoch' is \"three\", expected an integer");
}

TEST(Loader, RestoreRejectsAStateThatDoesNotFitTheFiles) {
  TempDir dir;
  const std::string a = counting_shard(dir, "a.bin", 41), b = counting_shard(dir, "b.bin", 81);
  DataLoader loader({a, b}, opts(2, 4));  // windows: 5 in a, 10 in b
  LoaderState s = loader.state();
  s.window = 5;
  for (int k = 0; k < 7; ++k) loader.next();
  const LoaderState before = loader.state();
  std::string msg = message_of([&] { loader.restore(s); });
  EXPECT_MESSAGE_HAS(msg, "window 5 of shard " + a);
  EXPECT_MESSAGE_HAS(msg, "it has 5 windows");
  EXPECT_EQ(loader.state(), before);  // a failed restore leaves the position alone

  s = loader.state();
  s.shard = 2;
  EXPECT_MESSAGE_HAS(message_of([&] { loader.restore(s); }), "shard position 2: expected 0 to 1");
  s = loader.state();
  s.num_shards = 3;
  EXPECT_MESSAGE_HAS(message_of([&] { loader.restore(s); }), "saved over 3 shards: 2 shards are given now");
  s = loader.state();
  s.window_tokens = 16;
  EXPECT_MESSAGE_HAS(message_of([&] { loader.restore(s); }), "windows of 16 tokens");
  DataLoader shuffled({a, b}, opts(2, 4, 0, 1, true, 5));
  s = shuffled.state();
  s.seed = 6;
  EXPECT_MESSAGE_HAS(message_of([&] { shuffled.restore(s); }), "shuffle=on seed=6: this loader has shuffle=on seed=5");
}

TEST(Loader, ResetStartsTheFirstEpochAgain) {
  TempDir dir;
  DataLoader loader({counting_shard(dir, "a.bin", 41)}, opts(1, 8, 0, 1, true, 3));
  const std::vector<int32_t> first = ints(loader.next().inputs);
  for (int k = 0; k < 7; ++k) loader.next();
  EXPECT_EQ(loader.epoch(), 1);
  loader.reset();
  EXPECT_EQ(loader.epoch(), 0);
  EXPECT_EQ(ints(loader.next().inputs), first);
}

TEST(Loader, ShardTooSmallForOneWindowNamesItAndTheSizeNeeded) {
  TempDir dir;
  const std::string small = counting_shard(dir, "small.bin", 16);
  // B=2, T=4, dp_size=2: 2*4*2 + 1 = 17 tokens needed.
  const std::string msg = message_of([&] { DataLoader({small}, opts(2, 4, 0, 2)); });
  EXPECT_MESSAGE_HAS(msg, small);
  EXPECT_MESSAGE_HAS(msg, "16 tokens");
  EXPECT_MESSAGE_HAS(msg, "2*4*2 + 1 = 17 tokens");
  EXPECT_NO_THROW(DataLoader({counting_shard(dir, "ok.bin", 17)}, opts(2, 4, 0, 2)));
}

TEST(Loader, BadOptionsAndVocabularyChecksAreErrors) {
  TempDir dir;
  const std::string a = counting_shard(dir, "a.bin", 100, 50200);
  EXPECT_MESSAGE_HAS(message_of([&] { DataLoader({a}, opts(2, 4, 2, 2)); }), "dp_rank 2 is outside [0, 2)");
  EXPECT_MESSAGE_HAS(message_of([&] { DataLoader({}, opts(2, 4)); }), "no shard files");
  LoaderOptions o = opts(2, 4);
  o.vocab_size = 50257;
  EXPECT_MESSAGE_HAS(message_of([&] { DataLoader({a}, o); }), "token id 50257 at index 57");
}

}  // namespace
}  // namespace kraken::data
