// [parallel] plan = "auto" under mpirun -np 4 (issue 7): rank 0 plans, every rank trains the broadcast
// layout, and the run equals the same layout given by hand.
//
// Runs kraken-train on a tiny degree-4 model over 4-device cluster files whose devices are too small for
// a whole replica, so that the plan must split the model (tp or pp), not only replicate it; one cluster
// is one node, the other two nodes behind a slow link (so the plan pipelines across it):
//   1. auto: the layout in <out_dir>/plan.json is kraken-plan's best strategy for the same cluster and
//      config (kraken-plan --json), it splits the model, every step's metrics carry
//      predicted_step_seconds, and the run ends by printing the measured step time beside the predicted one;
//   2. the same layout by hand (dp, tp, pp, layers_per_stage, batch_size, grad_accum): losses equal
//      bit for bit (the same ranks compute the same sums in the same order);
//   3. with no cluster file the cluster is detected (4 ranks on one node) and the run trains;
//   4. a cluster on which nothing fits: kraken-train fails saying how much memory the least demanding
//      strategy needs.
// Not itself an MPI program: ctest runs it and it launches mpirun; it prints "KRAKEN-MPI-OK ranks=4 …"
// only when every check held (a refused mpirun exits 0, so the output is what counts).
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "runtime/rng.h"
#include "tests/support/temp_dir.h"
#include "tests/train/mpi/driver_util.h"

#ifndef KRAKEN_PLAN
#error "KRAKEN_PLAN (the kraken-plan program) must be defined"
#endif

namespace {

using kraken::testing::TempDir;
using namespace kraken::testing::driver;

void check(bool ok, const std::string& what, const std::string& detail = "") {
  g_checks += 1;
  if (!ok) return fail(what, detail);
  std::printf("[ok] %s\n", what.c_str());
  std::fflush(stdout);
}

// driver_util's losses_of, also counting the records that carry a predicted step time.
std::map<int, double> losses_and_predictions(const std::string& metrics, int* predicted_records) {
  std::map<int, double> out;
  std::ifstream in(metrics);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("loss")) continue;
    out[j["step"].get<int>()] = j["loss"].get<double>();
    if (predicted_records && j.contains("predicted_step_seconds") && j["predicted_step_seconds"].get<double>() > 0)
      *predicted_records += 1;
  }
  return out;
}

const char* kModel =
    "[model]\nn_layer = 4\nn_embd = 32\nn_head = 4\ndegree = 4\ncontext = 16\nvocab_size = 97\n";

std::string write_config(const TempDir& dir, const std::string& name, const std::string& train, const std::string& parallel) {
  const std::string text = std::string(kModel) + "[data]\ntrain = \"" + dir / "train.bin" + "\"\nshuffle = false\n" +
                           "[train]\nseq_len = 16\nmax_steps = 6\nout_dir = \"" + dir / ("runs/" + name) + "\"\n" + train +
                           "[optim]\nname = \"adamw\"\nlr = 3e-3\nwarmup_steps = 2\n"
                           "[checkpoint]\nresume = \"none\"\n[parallel]\n" + parallel;
  const std::string path = dir / (name + ".toml");
  std::ofstream(path) << text;
  return path;
}

// Four small CPU ranks on one node, or on two nodes of two behind a slow link (1 MB/s, 1 ms).
std::string write_cluster(const TempDir& dir, const std::string& name, double memory_gib, int nodes) {
  const std::string path = dir / name;
  std::ofstream(path) << "name = \"four small ranks\"\n[[group]]\nname = \"cpu\"\nnodes = " << nodes
                      << "\ndevices_per_node = " << 4 / nodes << "\ndevice = \"cpu-2core\"\nmemory_gib = " << memory_gib
                      << "\nintra_node_gb_per_s = 2\nintra_node_latency_us = 0.2\n"
                      << (nodes > 1 ? "inter_node_gb_per_s = 0.001\ninter_node_latency_us = 1000\n" : "");
  return path;
}

std::string mpirun(const std::string& config) {
  return "timeout 300 " + std::string(KRAKEN_MPIEXEC) + " -n 4 --oversubscribe --allow-run-as-root " + KRAKEN_TRAIN +
         " " + config + " --quiet";
}

// Steps 1 and 2 of the file comment on one cluster. `one_node`: the plan must split the model with tp
// or pp; otherwise (two nodes) it must pipeline across them.
void auto_versus_by_hand(const TempDir& dir, const std::string& name, const std::string& cluster,
                         const std::string& plan_train, bool one_node) {
  const std::string planned = write_config(dir, name, plan_train, "plan = \"auto\"\ncluster = \"" + cluster + "\"\n");
  nlohmann::json expected;
  {
    const Run r = run(std::string(KRAKEN_PLAN) + " " + cluster + " " + planned + " --json --top 1");
    expected = nlohmann::json::parse(r.output, nullptr, false);
    check(r.exit_code == 0 && !expected.is_discarded() && !expected["strategies"].empty(),
          name + ": kraken-plan ranks the cluster", r.output);
  }
  nlohmann::json plan;
  {
    const Run r = run(mpirun(planned));
    check(r.exit_code == 0, name + ": plan = auto trains under mpirun -np 4", r.output);
    check(r.output.find("plan: step time measured ") != std::string::npos &&
              r.output.find(", predicted ") != std::string::npos,
          name + ": the run ends by printing the measured and the predicted step time", r.output);
    std::ifstream in(dir / ("runs/" + name + "/plan.json"));
    plan = nlohmann::json::parse(in, nullptr, false);
    check(!plan.is_discarded(), name + ": plan.json is written");
  }
  if (g_failures > 0) return;
  const nlohmann::json& best = expected["strategies"][0];
  const int tp = plan["tp"], dp = plan["dp"], pp = plan["pp"], mb = plan["micro_batch"], acc = plan["accumulation"];
  std::printf("[plan] %s: tp=%d dp=%d pp=%d micro_batch=%d accumulation=%d layers/stage %s, predicted %.4f s\n",
              name.c_str(), tp, dp, pp, mb, acc, plan["layers_per_stage"].dump().c_str(),
              plan["predicted_step_seconds"].get<double>());
  check(tp == best["tp"] && dp == best["dp"] && pp == best["pp"] && mb == best["micro_batch"] &&
            acc == best["accumulation"],
        name + ": kraken-train's plan is kraken-plan's best strategy", plan.dump() + "\n" + best.dump());
  if (one_node) check(tp * pp > 1, name + ": the small devices force a model-parallel plan (tp or pp > 1)", plan.dump());
  else check(pp > 1 && tp <= 2, name + ": the pipeline crosses the slow link, tp stays in a node", plan.dump());
  check(tp * dp * pp == 4 && dp * mb * acc == 8, name + ": the plan uses 4 ranks and keeps the global batch of 8",
        plan.dump());
  int predicted_records = 0;
  const std::map<int, double> auto_losses = losses_and_predictions(dir / ("runs/" + name + "/metrics.jsonl"), &predicted_records);
  check(auto_losses.size() == 6 && predicted_records == 6, name + ": every step's metrics carry predicted_step_seconds");

  std::string layers;
  for (const auto& n : plan["layers_per_stage"]) layers += (layers.empty() ? "" : ", ") + std::to_string(n.get<int>());
  const std::string manual = write_config(
      dir, name + "_by_hand", "batch_size = " + std::to_string(mb) + "\ngrad_accum = " + std::to_string(acc) + "\n",
      "dp = " + std::to_string(dp) + "\ntp = " + std::to_string(tp) + "\npp = " + std::to_string(pp) + "\n" +
          (pp > 1 ? "layers_per_stage = [" + layers + "]\n" : ""));
  const Run r = run(mpirun(manual));
  check(r.exit_code == 0, name + ": the same layout by hand trains", r.output);
  const std::map<int, double> manual_losses = losses_of(dir / ("runs/" + name + "_by_hand/metrics.jsonl"));
  std::string detail;
  for (const auto& [step, loss] : auto_losses) {
    char line[128];
    std::snprintf(line, sizeof line, "step %d: auto %.17g, by hand %.17g\n", step, loss,
                  manual_losses.count(step) ? manual_losses.at(step) : NAN);
    detail += line;
  }
  check(manual_losses == auto_losses, name + ": plan = auto and the same layout by hand give bit-identical losses",
        detail);
}

}  // namespace

int main() {
  TempDir dir("kraken_auto_plan_mpi");
  {
    std::vector<uint16_t> tokens(20000);
    kraken::runtime::Generator gen(11, 0);
    uint16_t t = 0;
    for (auto& tok : tokens) tok = t = static_cast<uint16_t>((t + 1 + gen.next_below(3)) % 97);
    kraken::data::write_llmc_shard(dir / "train.bin", tokens);
  }
  // One replica (weights, gradients, AdamW: 16 bytes per parameter, ~136k parameters) plus activations
  // needs about 2.3 MB; 1.6 MB devices hold half of one, so tp or pp must split it. On one node of four
  // the plan takes tp = 4; on two nodes of two behind a slow link tp stays in a node and the pipeline
  // crosses it (pp = 2, with layers_per_stage).
  const std::string plan_train = "batch_size = 2\ngrad_accum = 4\n";  // global batch 8 sequences
  auto_versus_by_hand(dir, "one_node", write_cluster(dir, "one_node_cluster.toml", 0.0015, 1), plan_train, true);
  auto_versus_by_hand(dir, "two_nodes", write_cluster(dir, "two_nodes_cluster.toml", 0.0015, 2), plan_train, false);
  if (g_failures > 0) {
    std::printf("KRAKEN-MPI-FAIL failures=%d checks=%d\n", g_failures, g_checks);
    return 1;
  }

  // 3. No cluster file: 4 ranks on one node are detected.
  {
    const std::string detected = write_config(dir, "detected", plan_train, "plan = \"auto\"\n");
    const Run r = run(mpirun(detected));
    std::ifstream in(dir / "runs/detected/plan.json");
    const nlohmann::json p = nlohmann::json::parse(in, nullptr, false);
    check(r.exit_code == 0 && !p.is_discarded() &&
              p["cluster"].get<std::string>() == "detected: 1 node(s) x 4 cpu-2core" &&
              losses_of(dir / "runs/detected/metrics.jsonl").size() == 6,
          "the cluster detected from MPI plans and trains", r.output + (p.is_discarded() ? "" : p.dump()));
  }

  // 4. Nothing fits: the error says what the least demanding strategy needs.
  {
    const std::string tiny = write_cluster(dir, "tiny_cluster.toml", 0.0001, 1);
    const std::string config = write_config(dir, "oom", plan_train, "plan = \"auto\"\ncluster = \"" + tiny + "\"\n");
    const Run r = run(mpirun(config));
    check(r.exit_code != 0 && r.output.find("no strategy fits in memory on cluster 'four small ranks'") != std::string::npos &&
              r.output.find("needs ") != std::string::npos &&
              r.output.find("per device, and the largest device has 0.00 GiB (107374 bytes)") != std::string::npos,
          "kraken-train says how much memory the least demanding strategy needs", r.output);
  }

  return finish(4);
}
