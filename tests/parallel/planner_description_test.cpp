// The planner's description: cluster and profile files (values and errors naming key and line), and
// the layer list's parameter counts. (A training config becomes a ModelDesc in train/plan.h; its tests
// are in tests/train/auto_plan_test.cpp.)
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <functional>

#include "kernels/error.h"
#include "parallel/planner/description.h"
#include "tests/support/errors.h"

namespace kraken::parallel::planner {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

using ::kraken::testing::message_of;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

const char* kTwoGroups = R"(name = "test"

[[device_type]]
name = "fast"
peak_tflops = 100
memory_bandwidth_gb_per_s = 1000
memory_gib = 40

[[group]]
name = "a"
nodes = 2
devices_per_node = 4
device = "fast"
intra_node_gb_per_s = 200
intra_node_latency_us = 2
inter_node_gb_per_s = 25
inter_node_latency_us = 10

[[group]]
name = "b"
nodes = 1
devices_per_node = 8
device = "V100"
memory_gib = 32
intra_node_gb_per_s = 150
intra_node_latency_us = 3
inter_node_gb_per_s = 12.5
inter_node_latency_us = 20
)";

TEST(PlannerCluster, ParsesGroupsInSiUnits) {
  const Cluster c = parse_cluster(kTwoGroups, "two.toml");
  EXPECT_EQ(c.name, "test");
  ASSERT_EQ(c.groups.size(), 2u);
  EXPECT_EQ(c.total_devices(), 16);
  const NodeGroup& a = c.groups[0];
  EXPECT_EQ(a.nodes, 2);
  EXPECT_EQ(a.devices_per_node, 4);
  EXPECT_DOUBLE_EQ(a.memory_per_device, 40 * kGiB);  // from the file's device type
  EXPECT_DOUBLE_EQ(a.intra_bandwidth, 200e9);
  EXPECT_DOUBLE_EQ(a.intra_latency, 2e-6);
  EXPECT_DOUBLE_EQ(a.inter_bandwidth, 25e9);
  EXPECT_DOUBLE_EQ(a.inter_latency, 10e-6);
  EXPECT_DOUBLE_EQ(c.device_of(a).peak_flops, 100e12);
  EXPECT_DOUBLE_EQ(c.device_of(a).memory_bandwidth, 1000e9);
  EXPECT_DOUBLE_EQ(c.groups[1].memory_per_device, 32 * kGiB);  // the group overrides V100's 16 GiB
  EXPECT_DOUBLE_EQ(c.device_of(c.groups[1]).peak_flops, 125e12);
}

TEST(PlannerCluster, DeviceTypeOverridesOnlyTheGivenFieldsOfABuiltIn) {
  const Cluster c = parse_cluster(R"(
[[device_type]]
name = "H100"
peak_tflops = 500

[[group]]
name = "g"
nodes = 1
devices_per_node = 8
device = "H100"
intra_node_gb_per_s = 450
intra_node_latency_us = 3
)",
                                  "h.toml");
  const DeviceType& d = c.device("H100");
  EXPECT_DOUBLE_EQ(d.peak_flops, 500e12);
  EXPECT_DOUBLE_EQ(d.memory_bandwidth, 3.35e12);  // kept from the table
  EXPECT_DOUBLE_EQ(c.groups[0].memory_per_device, 80 * kGiB);
  // One node: no inter-node link needed; it defaults to the intra-node one.
  EXPECT_DOUBLE_EQ(c.groups[0].inter_bandwidth, 450e9);
}

TEST(PlannerCluster, ErrorsNameTheKeyAndTheLine) {
  std::string text = kTwoGroups;
  // Line 14 holds group[0]'s intra-node bandwidth.
  const std::string bad_type = std::string(text).replace(text.find("intra_node_gb_per_s = 200"), 25,
                                                         "intra_node_gb_per_s = \"fast\"");
  std::string msg = message_of([&] { parse_cluster(bad_type, "c.toml"); });
  EXPECT_TRUE(contains(msg, "c.toml:14: group[0].intra_node_gb_per_s: expected a number")) << msg;
  EXPECT_TRUE(contains(msg, "\"fast\"")) << msg;

  const std::string unknown = std::string(text).replace(text.find("nodes = 1\n"), 10, "nodez = 1\n");
  msg = message_of([&] { parse_cluster(unknown, "c.toml"); });
  EXPECT_TRUE(contains(msg, "c.toml:21: group[1].nodez: unknown key")) << msg;

  const std::string negative = std::string(text).replace(text.find("nodes = 2"), 9, "nodes = -2");
  msg = message_of([&] { parse_cluster(negative, "c.toml"); });
  EXPECT_TRUE(contains(msg, "c.toml:11: group[0].nodes: expected a positive integer, got -2")) << msg;

  const std::string device = std::string(text).replace(text.find("\"V100\""), 6, "\"B200\"");
  msg = message_of([&] { parse_cluster(device, "c.toml"); });
  EXPECT_TRUE(contains(msg, "c.toml:23: group[1].device: unknown device type 'B200'")) << msg;
  EXPECT_TRUE(contains(msg, "H100")) << msg;  // lists what is known

  // A missing key points at its table's header line.
  const std::string missing = std::string(text).replace(text.find("inter_node_latency_us = 20\n"), 27, "");
  msg = message_of([&] { parse_cluster(missing, "c.toml"); });
  EXPECT_TRUE(contains(msg, "c.toml:19: group[1].inter_node_latency_us: missing")) << msg;

  msg = message_of([&] { parse_cluster("[[group]\nname = 1\n", "s.toml"); });
  EXPECT_TRUE(contains(msg, "s.toml:1:")) << msg;
  EXPECT_TRUE(contains(msg, "TOML syntax error")) << msg;

  msg = message_of([&] { parse_cluster("name = \"x\"\n", "e.toml"); });
  EXPECT_TRUE(contains(msg, "e.toml:1: group: missing")) << msg;

  msg = message_of([] { load_cluster("/nonexistent/cluster.toml"); });
  EXPECT_TRUE(contains(msg, "/nonexistent/cluster.toml: cannot open the cluster file")) << msg;
}

TEST(PlannerCluster, SeveralNodesNeedTheInterNodeLink) {
  const std::string msg = message_of([] {
    parse_cluster(R"([[group]]
name = "g"
nodes = 2
devices_per_node = 8
device = "A100-80"
intra_node_gb_per_s = 300
intra_node_latency_us = 3
)",
                  "n.toml");
  });
  EXPECT_TRUE(contains(msg, "n.toml:1: group[0].inter_node_gb_per_s: missing")) << msg;
}

TEST(PlannerCluster, ExampleClustersParse) {
  // The repository root: KRAKEN_SOURCE_DIR when set, else three levels above this file.
  const char* env = std::getenv("KRAKEN_SOURCE_DIR");
  const std::string root =
      env ? env : std::filesystem::path(__FILE__).parent_path().parent_path().parent_path().string();
  if (!std::filesystem::exists(root + "/configs/clusters")) GTEST_SKIP() << "no configs/clusters under " << root;
  const std::string dir = root + "/configs/clusters/";
  EXPECT_EQ(load_cluster(dir + "this_machine.toml").total_devices(), 2);
  EXPECT_EQ(load_cluster(dir + "this_machine_4ranks.toml").total_devices(), 4);
  EXPECT_EQ(load_cluster(dir + "h100_8.toml").total_devices(), 8);
  EXPECT_EQ(load_cluster(dir + "mixed_a100_v100.toml").total_devices(), 32);
  EXPECT_EQ(load_cluster(dir + "amp_v100_t4.toml").total_devices(), 16);
  EXPECT_EQ(load_cluster(dir + "hetero_1024.toml").total_devices(), 1024);
}

// ---- model -------------------------------------------------------------------------------------

TEST(PlannerModel, Gpt2SmallHasTheKnownParameterCount) {
  ModelConfig c;  // GPT-2 small: 12 layers, 768 wide, 12 heads, vocab 50257 padded to 50304, biases
  const ModelDesc m = make_model_desc(c);
  EXPECT_EQ(m.vocab_padded, 50304);
  ASSERT_EQ(m.layers.size(), 14u);
  // V·C + T·C + L·(12C² + 13C) + 2C = 38,633,472 + 786,432 + 85,054,464 + 1,536.
  EXPECT_DOUBLE_EQ(m.total_params(), 124475904.0);
  // Megatron tp splits the matrices and the column-parallel biases: 12C² + 3C + 4C.
  EXPECT_DOUBLE_EQ(m.layers[1].params_split, 12.0 * 768 * 768 + 7 * 768);
  EXPECT_EQ(m.layers[1].tp_allreduce_forward, 2);
  EXPECT_EQ(m.layers[1].tp_allreduce_backward, 2);
  EXPECT_FALSE(m.layers[1].tp_allreduce_overlaps_attention);
}

TEST(PlannerModel, Kraken125MFourWayMatchesThePaperPreset) {
  ModelConfig c;
  c.n_layer = 12;
  c.n_embd = 504;
  c.n_head = 12;
  c.degree = 4;
  c.mlp_expansion = 2;
  c.bias = false;
  c.vocab_size = 50304;
  const ModelDesc m = make_model_desc(c);
  // kraken.md: V·C + T·C + k·L·(4C² + 2eC² + 2C) + k·C² + C
  //   = 25,353,216 + 516,096 + 97,590,528 + 1,016,064 + 504 = 124,476,408 (the preset's "124.5M").
  EXPECT_DOUBLE_EQ(m.total_params(), 124476408.0);
  EXPECT_FALSE(m.layers[1].tp_allreduce_overlaps_attention);  // layer 0 mixes nothing
  EXPECT_TRUE(m.layers[2].tp_allreduce_overlaps_attention);
  EXPECT_DOUBLE_EQ(m.layers[2].boundary_per_rank(2), 2 * 504.0);  // two of the four streams per rank
  EXPECT_DOUBLE_EQ(m.layers[2].params_replicated, 0.0);
}

TEST(PlannerModel, BadShapesAreErrors) {
  ModelConfig c;
  c.degree = 5;  // 12 heads do not split 5 ways
  EXPECT_TRUE(contains(message_of([&] { make_model_desc(c); }), "n_head (12) must be divisible by degree (5)"));
}

// ---- profiles ----------------------------------------------------------------------------------

ModelDesc small_model() {
  ModelConfig c;
  c.n_layer = 4;
  c.n_embd = 128;
  c.n_head = 8;
  c.degree = 2;
  c.mlp_expansion = 2;
  c.bias = false;
  c.context = 256;
  c.vocab_size = 1000;  // padded to 1024
  return make_model_desc(c);
}

const char* kProfile = R"(device = "cpu-2core"
[model]
n_embd = 128
n_head = 8
degree = 2
mlp_expansion = 2
context = 256
vocab_size = 1024
bias = false

[[layer]]
kind = "kraken_layer"
tp = 1
micro_batch = 4
seconds = 0.5

[[layer]]
kind = "lm_head"
tp = 2
micro_batch = 1
seconds = 0.25
)";

TEST(PlannerProfile, MeasuredTimesWinThenScaleThenTheAnalyticModel) {
  const ModelDesc m = small_model();
  const std::vector<Profile> profiles = {parse_profile(kProfile, "p.toml", m)};
  const DeviceType& cpu = builtin_device_types().back();
  ASSERT_EQ(cpu.name, "cpu-2core");
  const LayerDesc& layer = m.layers[1];
  const LayerDesc& head = m.layers.back();
  EXPECT_DOUBLE_EQ(layer_seconds(m, layer, cpu, profiles, 1, 4), 0.5);
  EXPECT_DOUBLE_EQ(layer_seconds(m, head, cpu, profiles, 2, 1), 0.25);
  // Micro-batch 8 was not measured: 4 was, scaled by the analytic model's ratio.
  EXPECT_DOUBLE_EQ(layer_seconds(m, layer, cpu, profiles, 1, 8),
                   0.5 * analytic_layer_seconds(m, layer, cpu, 1, 8) / analytic_layer_seconds(m, layer, cpu, 1, 4));
  // Nothing at tp = 2 for the layer: the tp = 1 entry, scaled by the analytic ratio between the two tp.
  EXPECT_DOUBLE_EQ(layer_seconds(m, layer, cpu, profiles, 2, 4),
                   0.5 * analytic_layer_seconds(m, layer, cpu, 2, 4) / analytic_layer_seconds(m, layer, cpu, 1, 4));
  // Nothing of the kind at all (the embedding), or nothing for the device type: analytic.
  EXPECT_DOUBLE_EQ(layer_seconds(m, m.layers[0], cpu, profiles, 1, 4), analytic_layer_seconds(m, m.layers[0], cpu, 1, 4));
  const DeviceType& h100 = builtin_device_types().front();
  EXPECT_DOUBLE_EQ(layer_seconds(m, layer, h100, profiles, 1, 4), analytic_layer_seconds(m, layer, h100, 1, 4));
}

TEST(PlannerProfile, AnalyticTimeIsThreeForwardRooflines) {
  const ModelDesc m = small_model();
  const DeviceType& cpu = builtin_device_types().back();
  const double C = 128, T = 256, k = 2, e = 2, H = 8;
  // Forward FLOPs per token of a Kraken layer: k·(2(4 + 2e)C² + 4TC) = 2·(16·16384 + 131072) = 786,432.
  const double flops = k * (2 * (4 + 2 * e) * C * C + 4 * T * C);
  EXPECT_DOUBLE_EQ(m.layers[1].flops_per_token, flops);
  // Compute-bound on this CPU type: tokens·flops / (100 GFLOP/s · 0.5), ×3 for forward + backward.
  const double tokens = 2 * T;
  const double compute = tokens * flops / (100e9 * 0.5);
  // Memory: twice the saved activations (k·((4 + 2e)C + H/k + 4C + 4) elements per token: the attention
  // keeps a log-sum-exp per head, not its T×T probabilities) in fp32, plus the weights once.
  const double act = k * ((4 + 2 * e) * C + H / k + 4 * C + 4);
  const double bytes = 2 * act * tokens * 4 + k * ((4 + 2 * e) * C * C + 2 * C) * 4;
  const double memory = bytes / 23e9;
  EXPECT_GT(compute, memory);
  EXPECT_DOUBLE_EQ(analytic_layer_seconds(m, m.layers[1], cpu, 1, 2), 3 * std::max(compute, memory));
}

TEST(PlannerProfile, ErrorsNameTheKeyAndTheLine) {
  const ModelDesc m = small_model();
  const std::string text = kProfile;
  std::string msg = message_of([&] {
    parse_profile(std::string(text).replace(text.find("n_embd = 128"), 12, "n_embd = 256"), "p.toml", m);
  });
  EXPECT_TRUE(contains(msg, "p.toml:3: model.n_embd: the profile was measured with 256 but the model has 128")) << msg;

  msg = message_of([&] {
    parse_profile(std::string(text).replace(text.find("\"lm_head\""), 9, "\"lm-head\""), "p.toml", m);
  });
  EXPECT_TRUE(contains(msg, "p.toml:18: layer[1].kind: expected \"embedding\", \"kraken_layer\" or \"lm_head\"")) << msg;

  msg = message_of([&] { parse_profile(std::string(text).replace(text.find("tp = 2"), 6, "tp = 3"), "p.toml", m); });
  EXPECT_TRUE(contains(msg, "p.toml:19: layer[1].tp: expected a divisor of the degree (2), got 3")) << msg;

  msg = message_of([&] {
    parse_profile(std::string(text).replace(text.find("seconds = 0.25"), 14, "seconds = -1.0"), "p.toml", m);
  });
  EXPECT_TRUE(contains(msg, "p.toml:21: layer[1].seconds: expected a positive number")) << msg;

  msg = message_of([&] { parse_profile(text + "unit = \"s\"\n", "p.toml", m); });
  EXPECT_TRUE(contains(msg, "p.toml:22: layer[1].unit: unknown key")) << msg;  // TOML puts it in the last table

  msg = message_of([&] {
    parse_profile(text + "[[layer]]\nkind = \"lm_head\"\ntp = 2\nmicro_batch = 1\nseconds = 1.0\n", "p.toml", m);
  });
  EXPECT_TRUE(contains(msg, "p.toml:22: layer[2]: a second measurement of lm_head at tp = 2, micro_batch = 1")) << msg;
}

}  // namespace
}  // namespace kraken::parallel::planner
