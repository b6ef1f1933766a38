// What the planner needs to drive kraken-train: the runner's limits (every stage holds a transformer
// layer, enough micro-batches for the pipeline, data parallelism only), the model as KrakenModel
// computes it (wte whole on every tp rank), GradSync's gradient copies, the launcher's rank order, the
// trained sequence length, and the profile file written and read back exactly.
#include <gtest/gtest.h>

#include <functional>

#include "kernels/error.h"
#include "parallel/planner/search.h"
#include "tests/parallel/planner_test_util.h"
#include "tests/support/errors.h"

namespace kraken::parallel::planner {
namespace {

using ::kraken::testing::message_of;

NodeGroup group(const std::string& name, int nodes, int per_node, const std::string& type, double memory) {
  return test::node_group(name, nodes, per_node, type, memory, 10e9, 2e-6, 10e9, 2e-6);
}

Cluster cluster_of(std::vector<NodeGroup> groups) { return test::cluster_with(std::move(groups)); }

// Degree 2, C = 64, 4 heads, e = 2, no biases, T = 32, a large vocabulary so that the LM head weighs
// more than any transformer layer (an unconstrained split would isolate it on a stage of its own).
ModelConfig head_heavy(int n_layer, int64_t global_batch) {
  ModelConfig c;
  c.n_layer = n_layer;
  c.n_embd = 64;
  c.n_head = 4;
  c.degree = 2;
  c.mlp_expansion = 2;
  c.bias = false;
  c.context = 32;
  c.vocab_size = 16384;
  c.global_batch = global_batch;
  return c;
}

int transformer_layers(const ModelDesc& m, int a, int b) {
  int n = 0;
  for (int i = a; i < b; ++i) n += m.layers[i].kind == LayerKind::KrakenLayer;
  return n;
}

TEST(PlannerRunLimits, EveryStageHoldsATransformerLayerWhenTheRunnerNeedsIt) {
  const Cluster cluster = cluster_of({group("cpu", 1, 4, "cpu-2core", 8e9)});
  ModelDesc free = make_model_desc(head_heavy(4, 16));
  SearchOptions o;
  o.top_k = 50;
  // Without the limit the best 4-stage split puts the LM head alone on the last stage.
  bool head_alone = false;
  for (const RankedStrategy& r : search(cluster, free, {}, o).top) {
    const Strategy& s = r.strategy;
    if (s.pp > 1 && transformer_layers(free, s.stage_begin[s.pp - 1], s.stage_begin[s.pp]) == 0) head_alone = true;
  }
  EXPECT_TRUE(head_alone) << "the test model no longer tempts a split that isolates the head";

  ModelDesc limited = free;
  limited.limits.stage_needs_transformer_layer = true;
  int pipelined = 0;
  for (const RankedStrategy& r : search(cluster, limited, {}, o).top) {
    const Strategy& s = r.strategy;
    for (int j = 0; j < s.pp; ++j)
      EXPECT_GE(transformer_layers(limited, s.stage_begin[j], s.stage_begin[j + 1]), 1)
          << "tp=" << s.tp << " dp=" << s.dp << " pp=" << s.pp << " stage " << j;
    pipelined += s.pp > 1;
  }
  EXPECT_GT(pipelined, 0);
  // predict() refuses a split the runner cannot build, naming the problem.
  Strategy s;
  s.pp = 2;
  s.dp = 2;
  s.micro_batch = 2;
  s.accumulation = 4;
  s.stage_begin = {0, 1, int(limited.layers.size())};  // the embedding alone
  EXPECT_NE(message_of([&] { predict(CostModelKind::Kraken, cluster, limited, {}, s); })
                .find("every stage must hold a transformer layer"),
            std::string::npos);
}

TEST(PlannerRunLimits, CandidatesKeepEnoughMicroBatchesAndDataParallelOnly) {
  const Cluster cluster = cluster_of({group("cpu", 1, 4, "cpu-2core", 8e9)});
  ModelDesc m = make_model_desc(head_heavy(4, 8));
  const size_t all = candidate_shapes(cluster, m).size();
  m.limits.accumulation_covers_pipeline = true;
  const std::vector<Strategy> filled = candidate_shapes(cluster, m);
  EXPECT_LT(filled.size(), all);  // e.g. pp = 4, dp = 1, micro-batch 4 (2 micro-batches) is gone
  for (const Strategy& s : filled) {
    if (s.pp > 1) {
      EXPECT_GE(s.accumulation, s.pp);
    }
  }
  m.limits.data_parallel_only = true;
  for (const Strategy& s : candidate_shapes(cluster, m)) {
    EXPECT_EQ(s.tp, 1);
    EXPECT_EQ(s.pp, 1);
  }
  // Nothing left: the error says which limits removed the candidates.
  const Cluster three = cluster_of({group("cpu", 1, 3, "cpu-2core", 8e9)});  // dp = 3 does not divide 8
  const std::string msg = message_of([&] { search(three, m, {}); });
  EXPECT_NE(msg.find("tp = pp = 1 (data parallelism only)"), std::string::npos) << msg;
}

TEST(PlannerRunLimits, ReplicatedVocabularyIsWholeOnEveryTensorParallelRank) {
  ModelConfig c = head_heavy(2, 8);
  const ModelDesc split = make_model_desc(c);
  c.vocab_parallel = false;
  const ModelDesc whole = make_model_desc(c);
  const double V = 16384, C = 64, k = 2;
  EXPECT_DOUBLE_EQ(whole.total_params(), split.total_params());  // the same parameters, placed differently
  const LayerDesc& emb = whole.layers.front();
  const LayerDesc& head = whole.layers.back();
  EXPECT_DOUBLE_EQ(emb.params_per_rank(2), V * C + 32 * C);  // wte and wpe whole
  EXPECT_DOUBLE_EQ(split.layers.front().params_per_rank(2), V * C / 2 + 32 * C);
  // The logits are computed whole on every rank; only the conjunction's columns divide.
  EXPECT_DOUBLE_EQ(head.flops_per_rank(2), 2 * C * V + 2 * k * C * C / 2);
  EXPECT_DOUBLE_EQ(split.layers.back().flops_per_rank(2), (2 * C * V + 2 * k * C * C) / 2);
  // Kraken tp: dL/dx0 summed over the ranks' streams (backward), the conjunction's all-reduce (forward).
  EXPECT_EQ(emb.tp_allreduce_forward, 0);
  EXPECT_EQ(emb.tp_allreduce_backward, 1);
  EXPECT_EQ(head.tp_allreduce_forward, 1);
  EXPECT_EQ(head.tp_allreduce_backward, 0);
  EXPECT_DOUBLE_EQ(whole.tied_params_per_rank(2), V * C);
  EXPECT_DOUBLE_EQ(split.tied_params_per_rank(2), V * C / 2);
  // One stage at tp = 2 stores wte once, whole: 16 bytes per parameter of weights, grads and AdamW.
  Strategy s;
  s.tp = 2;
  s.micro_batch = 1;
  s.accumulation = 8;
  s.stage_begin = {0, int(whole.layers.size())};
  const Cluster two = cluster_of({group("cpu", 1, 2, "cpu-2core", 8e9)});
  double params = -V * C;
  for (const LayerDesc& l : whole.layers) params += l.params_per_rank(2);
  EXPECT_DOUBLE_EQ(predict(CostModelKind::Kraken, two, whole, {}, s).stages[0].memory.weights, 4 * params);
}

TEST(PlannerRunLimits, DataParallelGradientBuffersCountOnlyUnderDp) {
  const Cluster two = cluster_of({group("cpu", 1, 2, "cpu-2core", 8e9)});
  ModelDesc m = make_model_desc(head_heavy(2, 8));
  m.dp_gradient_buffers = 1;
  Strategy dp;
  dp.dp = 2;
  dp.micro_batch = 1;
  dp.accumulation = 4;
  dp.stage_begin = {0, int(m.layers.size())};
  const Prediction p = predict(CostModelKind::Kraken, two, m, {}, dp);
  EXPECT_DOUBLE_EQ(p.stages[0].memory.gradients, 2 * p.stages[0].memory.weights);  // grads + the flat copy
  Strategy pp = dp;
  pp.dp = 1;
  pp.pp = 2;
  pp.accumulation = 8;
  pp.stage_begin = {0, 2, int(m.layers.size())};
  const Prediction q = predict(CostModelKind::Kraken, two, m, {}, pp);
  EXPECT_DOUBLE_EQ(q.stages[0].memory.gradients, q.stages[0].memory.weights);
}

TEST(PlannerRunLimits, FileOrderOnlyKeepsTheLaunchersRankOrder) {
  // A slow group listed first: the free search may put the fast group first, a run cannot.
  const Cluster cluster = cluster_of({group("slow", 1, 2, "T4", 16e9), group("fast", 1, 2, "H100", 80e9)});
  EXPECT_EQ(candidate_placements(cluster, CostModelKind::Kraken, true), (std::vector<std::vector<int>>{{0, 1}}));
  SearchOptions o;
  o.file_order_only = true;
  o.top_k = 20;
  for (const RankedStrategy& r : search(cluster, make_model_desc(head_heavy(4, 8)), {}, o).top)
    EXPECT_EQ(r.strategy.group_order, (std::vector<int>{0, 1}));
}

TEST(PlannerRunLimits, TheTrainedSequenceLengthSetsTokensNotPositions) {
  ModelConfig c = head_heavy(2, 8);
  const ModelDesc full = make_model_desc(c);
  c.seq_len = 16;  // half the context
  const ModelDesc half = make_model_desc(c);
  // wpe keeps its context rows; the attention's FLOPs and the tokens per micro-batch follow seq_len.
  EXPECT_DOUBLE_EQ(half.layers.front().params(), full.layers.front().params());
  EXPECT_DOUBLE_EQ(full.layers[1].attention_flops_per_token - half.layers[1].attention_flops_per_token,
                   2 * 4 * (32 - 16) * 64.0);
  const DeviceType& cpu = builtin_device_types().back();
  EXPECT_LT(analytic_layer_seconds(half, half.layers[1], cpu, 1, 4), analytic_layer_seconds(full, full.layers[1], cpu, 1, 4));
  c.seq_len = 64;
  EXPECT_NE(message_of([&] { make_model_desc(c); }).find("seq_len must be in [0, context = 32]"), std::string::npos);
}

TEST(PlannerRunLimits, ProfileFileRoundTripsExactly) {
  ModelConfig c = head_heavy(2, 8);
  c.seq_len = 16;
  const ModelDesc m = make_model_desc(c);
  Profile p;
  p.device_type = "cpu-2core";
  p.entries = {{LayerKind::Embedding, 1, 1, 0.00023629},
               {LayerKind::KrakenLayer, 2, 4, 0.0059631089999999994},
               {LayerKind::LmHead, 1, 16, 1.0 / 3.0},
               {LayerKind::LmHead, 2, 16, 2.0}};
  // Two comment lines, a blank, device, a blank, [model] on line 6: seq_len is its sixth key, line 12.
  const std::string text = format_profile(p, m, "measured by a test\nsecond line");
  EXPECT_EQ(text.rfind("# measured by a test\n# second line\n", 0), 0u) << text;
  const Profile back = parse_profile(text, "round.toml", m);
  EXPECT_EQ(back.device_type, p.device_type);
  ASSERT_EQ(back.entries.size(), p.entries.size());
  for (size_t i = 0; i < p.entries.size(); ++i) {
    EXPECT_EQ(back.entries[i].kind, p.entries[i].kind);
    EXPECT_EQ(back.entries[i].tp, p.entries[i].tp);
    EXPECT_EQ(back.entries[i].micro_batch, p.entries[i].micro_batch);
    EXPECT_EQ(back.entries[i].seconds, p.entries[i].seconds);  // bit-exact: 17 significant digits
  }
  // A profile of another sequence length is refused, naming the key and its line.
  ModelConfig other = c;
  other.seq_len = 32;
  const std::string msg = message_of([&] { parse_profile(text, "round.toml", make_model_desc(other)); });
  EXPECT_NE(msg.find("round.toml:12: model.seq_len: the profile was measured with sequences of 16 tokens but the "
                     "model trains on 32"),
            std::string::npos)
      << msg;
}

}  // namespace
}  // namespace kraken::parallel::planner
