// The cost models against numbers worked out by hand: AMP's formulas, the memory model, Kraken's
// overlapped all-reduce against Megatron's two on the critical path, and the bucketed dp overlap.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "kernels/error.h"
#include "parallel/planner/cost_model.h"
#include "tests/parallel/planner_test_util.h"
#include "tests/support/errors.h"

namespace kraken::parallel::planner {
namespace {

// Relative tolerance for sums of a few dozen doubles computed in a different order than the test's.
constexpr double kRel = 1e-12;

using ::kraken::testing::message_of;

using test::kraken_tiny;
using test::node_group;

Cluster cluster_of(std::vector<NodeGroup> groups) {
  return test::cluster_with(std::move(groups), {test::round_device("A", 1e12, 1e11), test::round_device("B", 1e12, 1e11)});
}

Profile profile(const std::string& device, double embedding, double layer, double head, int tp = 1, int mbs = 1) {
  return {device,
          {{LayerKind::Embedding, tp, mbs, embedding},
           {LayerKind::KrakenLayer, tp, mbs, layer},
           {LayerKind::LmHead, tp, mbs, head}}};
}

// GPT-2-shaped (degree 1): emb, L0, L1, head; C = 64, T = 16, V = 64.
ModelDesc gpt2_tiny(int64_t global_batch) {
  ModelConfig c;
  c.n_layer = 2;
  c.n_embd = 64;
  c.n_head = 4;
  c.context = 16;
  c.vocab_size = 64;
  c.global_batch = global_batch;
  return make_model_desc(c);
}

Strategy strategy(int tp, int dp, int pp, int mbs, int accum, std::vector<int> split, std::vector<int> order = {}) {
  Strategy s;
  s.tp = tp;
  s.dp = dp;
  s.pp = pp;
  s.micro_batch = mbs;
  s.accumulation = accum;
  s.stage_begin = std::move(split);
  s.group_order = std::move(order);
  return s;
}

TEST(PlannerAmpModel, MatchesHandComputedTwoGroupCase) {
  // Two nodes of 2 devices: type A (profile 1, 4, 2 ms) and type B (3, 8, 6 ms); links in bytes/s.
  const Cluster cluster = cluster_of({node_group("fast", 1, 2, "A", 1e9, 100e9, 1e-6, 10e9, 1e-6),
                                      node_group("slow", 1, 2, "B", 1e9, 50e9, 1e-6, 5e9, 1e-6)});
  const ModelDesc model = gpt2_tiny(8);
  const std::vector<Profile> profiles = {profile("A", 1e-3, 4e-3, 2e-3), profile("B", 3e-3, 8e-3, 6e-3)};
  // tp 1, dp 2, pp 2: stage 0 = ranks 0,1 (the A node) holds emb + L0, stage 1 = ranks 2,3 (B) L1 + head.
  const Prediction p = predict(CostModelKind::Amp, cluster, model, profiles, strategy(1, 2, 2, 1, 4, {0, 2, 4}));
  // Averaged by share (½ A + ½ B): e = [2, 6, 6, 4] ms; t_0 = 8 ms, t_1 = 10 ms; B = 4.
  // Boundary: a = mbs·T·C = 1024 fp32 elements = 4096 bytes over the A–B link, min(10, 5) GB/s: 0.8192 µs.
  // T_dp: P_j = 12C² + C·V = 49,152 + 4,096 = 53,248 elements on both stages;
  //   stage 0: 2·1/2 · 53,248·4 B / 100 GB/s = 2.12992 µs; stage 1 over 50 GB/s: 4.25984 µs → max.
  // T = (4 − 1)·10 + (8 + 10) ms + 0.8192 µs + 4.25984 µs.
  const double pp_comm = 4096 / 5e9, dp_comm = 53248.0 * 4 / 50e9;
  EXPECT_NEAR(p.step_time, 0.048 + pp_comm + dp_comm, kRel);
  EXPECT_NEAR(p.compute, 4 * 10e-3, kRel);  // B · t_max
  EXPECT_NEAR(p.bubble, 8e-3, kRel);        // Σ t − t_max
  EXPECT_NEAR(p.pp_comm, pp_comm, kRel * 1e-6);
  EXPECT_EQ(p.tp_comm, 0.0);
  EXPECT_NEAR(p.dp_comm, dp_comm, kRel * 1e-6);
  EXPECT_NEAR(p.stages[0].dp_allreduce, 53248.0 * 4 / 100e9, kRel * 1e-6);
}

TEST(PlannerAmpModel, AveragesTheP2pLinkOverDataParallelReplicas) {
  // X: one node of 4 A devices; Y: one node of 2 B devices. tp 1, dp 3, pp 2: stage 0 = ranks 0,1,2 (X),
  // stage 1 = ranks 3 (X), 4, 5 (Y). Replica links 0→3 inside X (100 GB/s), 1→4 and 2→5 across
  // (min(10, 5) = 5 GB/s): AMP averages them, (100 + 5 + 5)/3 GB/s.
  const Cluster cluster = cluster_of({node_group("x", 1, 4, "A", 1e9, 100e9, 0, 10e9, 0),
                                      node_group("y", 1, 2, "B", 1e9, 50e9, 0, 5e9, 0)});
  const ModelDesc model = gpt2_tiny(6);
  const std::vector<Profile> profiles = {profile("A", 1e-3, 4e-3, 2e-3), profile("B", 3e-3, 8e-3, 6e-3)};
  const Prediction p = predict(CostModelKind::Amp, cluster, model, profiles, strategy(1, 3, 2, 1, 2, {0, 2, 4}));
  // Shares 4/6 and 2/6: e = [5/3, 16/3, 16/3, 10/3] ms; t_0 = 7 ms, t_1 = 26/3 ms; B = 6/(3·1) = 2.
  const double t1 = 26.0 / 3 * 1e-3, t0 = 7e-3;
  const double pp_comm = 4096 / (110e9 / 3);
  // Stage 1's dp ring 3→4→5→3 crosses X–Y twice: slowest 5 GB/s. 2·2/3 · 53,248·4 B / 5 GB/s.
  const double dp_comm = 2.0 * 2 / 3 * 53248 * 4 / 5e9;
  EXPECT_NEAR(p.step_time, (2 - 1) * t1 + t0 + t1 + pp_comm + dp_comm, kRel);
  EXPECT_NEAR(p.pp_comm, pp_comm, kRel * 1e-6);
  EXPECT_NEAR(p.dp_comm, dp_comm, kRel * 1e-6);
  EXPECT_NEAR(p.stages[0].dp_allreduce, 2.0 * 2 / 3 * 53248 * 4 / 100e9, kRel * 1e-6);
}

// kraken_tiny() (planner_test_util.h): degree 2, C = 8, V = 64, 2,792 parameters.
TEST(PlannerKrakenModel, MemoryMatchesHandCount) {
  const ModelDesc m = kraken_tiny();
  // Parameters: emb V·C + T·C = 512 + 32 = 544; a layer k·((4 + 2e)C² + 2C) = 2·528 = 1,056; head V·C
  // (tied copy) + k·C² + C = 512 + 128 + 8 = 648. Total with wte once: 544 + 2,112 + 648 − 512 = 2,792.
  EXPECT_DOUBLE_EQ(m.total_params(), 2792.0);
  // Saved activations per token: a layer k·((4 + 2e)C + H/k + 4C + 4) = 2·(64 + 1 + 36) = 202 (the
  // attention keeps one log-sum-exp per head and token); the head 2V + kC + 2C + 3 = 128 + 16 + 19 = 163
  // (the logits, their gradient during the backward, the conjunction's input, LN_f, the log-sum-exp).
  EXPECT_DOUBLE_EQ(m.layers[1].activation_per_rank(1), 202.0);
  EXPECT_DOUBLE_EQ(m.layers[3].activation_per_rank(1), 163.0);

  // Bytes per parameter: fp32 weights 4 + fp32 grads 4 + AdamW 2·4 (weights are fp32: no master) = 16.
  // cpu-2core keeps fp32 activations (4 bytes); micro-batch 2 is 8 tokens.
  const Cluster cluster = cluster_of({node_group("cpu", 1, 2, "cpu-2core", 1e9, 1e9, 1e-6, 1e9, 1e-6)});
  const Prediction a = predict(CostModelKind::Kraken, cluster, m, {}, strategy(1, 1, 2, 2, 4, {0, 2, 4}));
  // Stage 0 (emb + L0): 1,600 params → 6,400 B weights, 6,400 grads, 12,800 optimizer; activations
  // 202·8·4 = 6,464 B per micro-batch, 2 in flight (pp − 0) → 12,928. Total 38,528.
  EXPECT_DOUBLE_EQ(a.stages[0].memory.weights, 6400.0);
  EXPECT_DOUBLE_EQ(a.stages[0].memory.gradients, 6400.0);
  EXPECT_DOUBLE_EQ(a.stages[0].memory.optimizer, 12800.0);
  EXPECT_DOUBLE_EQ(a.stages[0].memory.activations, 12928.0);
  EXPECT_EQ(a.stages[0].in_flight, 2);
  // Stage 1 (L1 + head): 1,704 params → 27,264 B; activations (202 + 163)·8·4 = 11,680, 1 in flight.
  EXPECT_DOUBLE_EQ(a.stages[1].memory.total(), 27264.0 + 11680.0);
  EXPECT_DOUBLE_EQ(a.memory_per_device, 38944.0);

  // pp = 1 holds the tied weight once: 2,792·16 = 44,672 B; activations (2·202 + 163)·8·4 = 18,144.
  const Prediction b = predict(CostModelKind::Kraken, cluster, m, {}, strategy(1, 2, 1, 2, 2, {0, 4}));
  EXPECT_DOUBLE_EQ(b.memory_per_device, 44672.0 + 18144.0);

  // tp = 2 (tp | degree): a rank holds one sub-layer per layer and half the vocabulary.
  // Params: emb 256 + 32, layers 528 each, head 256 + 64 + 8, tied −256 → 1,416 → 22,656 B.
  // Activations: layers 101 each, head 144/2 + 19 = 91 → 293·8·4 = 9,376.
  const Prediction c = predict(CostModelKind::Kraken, cluster, m, {}, strategy(2, 1, 1, 2, 4, {0, 4}));
  EXPECT_DOUBLE_EQ(c.memory_per_device, 22656.0 + 9376.0);
  EXPECT_TRUE(c.fits);

  // A device of 38,000 bytes holds neither stage of the first strategy (38,528 and 38,944 bytes).
  const Cluster small = cluster_of({node_group("cpu", 1, 2, "cpu-2core", 38000, 1e9, 1e-6, 1e9, 1e-6)});
  EXPECT_FALSE(predict(CostModelKind::Kraken, small, m, {}, strategy(1, 1, 2, 2, 4, {0, 2, 4})).fits);
  EXPECT_TRUE(predict(CostModelKind::Kraken, small, m, {}, strategy(2, 1, 1, 2, 4, {0, 4})).fits);
}

TEST(PlannerKrakenModel, SixteenBitWeightsAddAnFp32Master) {
  ModelDesc m = kraken_tiny();
  m.bytes_per_param = 2;
  m.bytes_per_grad = 2;
  const Cluster cluster = cluster_of({node_group("cpu", 1, 2, "cpu-2core", 1e9, 1e9, 0, 1e9, 0)});
  const Prediction p = predict(CostModelKind::Kraken, cluster, m, {}, strategy(2, 1, 1, 2, 4, {0, 4}));
  // 1,416 params per rank · (2 weights + 2 grads + 8 AdamW + 4 master) = 22,656 B: the same as fp32
  // weights and grads without a master.
  EXPECT_DOUBLE_EQ(p.stages[0].memory.weights + p.stages[0].memory.gradients + p.stages[0].memory.optimizer,
                   1416.0 * 16);
  EXPECT_DOUBLE_EQ(p.stages[0].memory.optimizer, 1416.0 * 12);
}

// Equal sizes except the degree: C = 64, 8 heads, e = 4, 3 layers, T = 32, V = 128.
ModelDesc tp_model(int degree) {
  ModelConfig c;
  c.n_layer = 3;
  c.n_embd = 64;
  c.n_head = 8;
  c.degree = degree;
  c.mlp_expansion = 4;
  c.context = 32;
  c.vocab_size = 128;
  c.bias = false;
  c.global_batch = 4;
  return make_model_desc(c);
}

TEST(PlannerKrakenModel, KrakenTensorParallelismExposesLessThanMegatron) {
  // One node of 4 H100s (bf16 activations) on a 10 GB/s, 5 µs link; tp = 4.
  const Cluster cluster = cluster_of({node_group("n", 1, 4, "H100", 80e9, 10e9, 5e-6, 10e9, 5e-6)});
  // All-reduce of one (1, 32, 64) bf16 tensor over 4 ranks: 2·3/4 · 4,096 B / 10 GB/s + 2·3·5 µs.
  const double ar = 1.5 * 4096 / 10e9 + 6 * 5e-6;
  // Attention's FLOP share of a sub-layer: (8C² + 4TC) / (8C² + 4TC + 4eC²) = 40,960 / 106,496 = 5/13.
  const double share = 40960.0 / 106496.0;
  for (double attention_over_ar : {0.5, 2.0}) {
    // A layer's forward + backward time chosen so its forward attention takes attention_over_ar · ar.
    const double layer = 3.0 * attention_over_ar * ar / share;
    const std::vector<Profile> profiles = {profile("H100", 1e-4, layer, 2e-4, 4)};
    const Prediction k = predict(CostModelKind::Kraken, cluster, tp_model(4), profiles, strategy(4, 1, 1, 1, 4, {0, 5}));
    const Prediction g = predict(CostModelKind::Kraken, cluster, tp_model(1), profiles, strategy(4, 1, 1, 1, 4, {0, 5}));
    // Kraken: embedding 1·ar; layer 0 nothing; layers 1, 2: max(0, ar − a) + max(0, ar − 2a) with
    // a = attention_over_ar·ar; head 2·ar (conjunction forward, vocab-parallel logits backward).
    const double a = attention_over_ar * ar;
    const double per_layer = std::max(0.0, ar - a) + std::max(0.0, ar - 2 * a);
    EXPECT_NEAR(k.stages[0].tp_comm, ar + 2 * per_layer + 2 * ar, kRel * ar);
    // Megatron: embedding ar, 3 layers × (2 forward + 2 backward), head 1 backward: 14·ar.
    EXPECT_NEAR(g.stages[0].tp_comm, 14 * ar, kRel * ar);
    EXPECT_LT(k.stages[0].tp_comm, g.stages[0].tp_comm);
    // The step charges the stage's tp time for each of the 4 micro-batches.
    EXPECT_NEAR(k.tp_comm, 4 * k.stages[0].tp_comm, kRel * ar);
    EXPECT_NEAR(k.stages[0].compute, 1e-4 + 3 * layer + 2e-4, kRel * layer);
  }
}

TEST(PlannerKrakenModel, DataParallelAllReduceHidesBehindBackwardByBuckets) {
  // Degree 2, C = 512, 4 layers: 4·2·(8C² + 2C) + emb + head ≈ 17.4M parameters, 70 MB of fp32 grads:
  // three 25 MiB buckets.
  ModelConfig c;
  c.n_layer = 4;
  c.n_embd = 512;
  c.n_head = 8;
  c.degree = 2;
  c.mlp_expansion = 2;
  c.context = 64;
  c.vocab_size = 1024;
  c.bias = false;
  c.global_batch = 2;
  const ModelDesc m = make_model_desc(c);
  const double params = m.total_params();
  const double bytes = params * 4;
  const double buckets = std::ceil(bytes / (25.0 * 1024 * 1024));
  ASSERT_EQ(buckets, 3.0);
  // Two single-device nodes: the dp ring crosses nodes at 20 GB/s, 10 µs.
  const Cluster cluster = cluster_of({node_group("n", 2, 1, "H100", 80e9, 100e9, 1e-6, 20e9, 10e-6)});
  const double A = 2.0 * 1 / 2 * bytes / 20e9 + 2.0 * 1 * 10e-6 * buckets;
  for (double layer : {1e-4, 1e-2}) {
    const std::vector<Profile> profiles = {profile("H100", 1e-5, layer, 1e-5)};
    const Prediction p = predict(CostModelKind::Kraken, cluster, m, profiles, strategy(1, 2, 1, 1, 1, {0, 6}));
    const double backward = 2.0 / 3.0 * (2e-5 + 4 * layer);
    // n buckets: the all-reduces end max(A/n, A − t_b·(n − 1)/n) after the backward.
    const double exposed = std::max(A / buckets, A - backward * (buckets - 1) / buckets);
    EXPECT_NEAR(p.stages[0].dp_allreduce, A, kRel * A);
    EXPECT_NEAR(p.dp_comm, exposed, kRel * A);
    EXPECT_NEAR(p.step_time, 2e-5 + 4 * layer + exposed, kRel * p.step_time);
  }
}

TEST(PlannerKrakenModel, BreakdownSumsToTheStepTimeAndSlowStagesRunSlower) {
  // A100 and V100 nodes, pp = 2 across them: the V100 stage runs at V100 speed.
  const Cluster cluster = cluster_of({node_group("a100", 1, 4, "A100-80", 80e9, 300e9, 3e-6, 25e9, 8e-6),
                                      node_group("v100", 1, 4, "V100", 32e9, 150e9, 3e-6, 12e9, 8e-6)});
  const ModelDesc m = tp_model(4);
  ModelDesc big = m;
  big.config.global_batch = 16;
  for (CostModelKind kind : {CostModelKind::Amp, CostModelKind::Kraken}) {
    const Prediction p = predict(kind, cluster, big, {}, strategy(2, 2, 2, 2, 4, {0, 3, 5}));
    EXPECT_NEAR(p.compute + p.bubble + p.pp_comm + p.tp_comm + p.dp_comm, p.step_time, kRel * p.step_time);
    EXPECT_GT(p.pp_comm, 0.0);
  }
  const Prediction p = predict(CostModelKind::Kraken, cluster, big, {}, strategy(2, 2, 2, 2, 4, {0, 3, 5}));
  EXPECT_EQ(p.stages[0].device_type, "A100-80");
  EXPECT_EQ(p.stages[1].device_type, "V100");
  // Stage 1 holds L1, L2 and the head, stage 0 the embedding and L0; flip the placement and the same
  // layers on V100 take longer.
  const Prediction flipped =
      predict(CostModelKind::Kraken, cluster, big, {}, strategy(2, 2, 2, 2, 4, {0, 3, 5}, {1, 0}));
  EXPECT_EQ(flipped.stages[0].device_type, "V100");
  EXPECT_GT(flipped.stages[0].compute, p.stages[0].compute);
  EXPECT_LT(flipped.stages[1].compute, p.stages[1].compute);
}

TEST(PlannerKrakenModel, InvalidStrategiesAreErrors) {
  const Cluster cluster = cluster_of({node_group("n", 1, 4, "H100", 80e9, 10e9, 0, 10e9, 0)});
  const ModelDesc m = tp_model(4);  // global batch 4
  auto msg = [&](const Strategy& s) { return message_of([&] { predict(CostModelKind::Kraken, cluster, m, {}, s); }); };
  EXPECT_NE(msg(strategy(2, 1, 1, 1, 4, {0, 5})).find("tp·dp·pp = 2·1·1 = 2 but the cluster has 4 devices"),
            std::string::npos);
  EXPECT_NE(msg(strategy(4, 1, 1, 1, 2, {0, 5})).find("dp·micro_batch·accumulation = 1·1·2 = 2 but the global batch is 4"),
            std::string::npos);
  EXPECT_NE(msg(strategy(1, 2, 2, 1, 2, {0, 5, 5})).find("stage 1 holds no layers"), std::string::npos);
  EXPECT_NE(msg(strategy(1, 2, 2, 1, 2, {0, 5})).find("pp + 1 = 3 entries"), std::string::npos);
  const ModelDesc three = [] {
    ModelConfig c;
    c.n_layer = 2;
    c.n_embd = 48;
    c.n_head = 6;
    c.degree = 3;
    c.global_batch = 4;
    return make_model_desc(c);
  }();
  EXPECT_NE(message_of([&] { predict(CostModelKind::Kraken, cluster, three, {}, strategy(2, 2, 1, 1, 2, {0, 4})); })
                .find("tp = 2 must divide the degree (3)"),
            std::string::npos);
  EXPECT_NE(message_of([] { parse_cost_model("megatron"); }).find("expected \"amp\" or \"kraken\""), std::string::npos);
}

}  // namespace
}  // namespace kraken::parallel::planner
