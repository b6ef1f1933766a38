// kraken-plan: the best parallel strategies for a model on a cluster, and the layer profiles they use.
//
//   kraken-plan cluster.toml config.toml [--top K] [--json] [--explain N] [--cost-model amp|kraken]
//               [--profile-file measured.toml ...]
//   kraken-plan --profile config.toml [--out profile.toml] [--device-type NAME] [--max-micro-batch N]
//               [--micro-batches 1,2,4] [--warmup N] [--repeat N] [--threads N]
//
// Prints the top-K strategies (tp, dp, pp, micro-batch, accumulation, layers per stage, which node
// groups host the stages, predicted step time split into compute / bubble / pp / tp / dp
// communication, memory per device); --json writes the same for scripts; --explain N breaks strategy N
// down stage by stage. The config is a Kraken training config, validated as kraken-train validates it
// (its data shards need not exist here); train::model_desc_of turns it into the planner's model.
// --profile measures each layer kind forward + backward on this machine (train/plan.h) and writes the
// profile file. The formats and the models are in parallel/planner/README.md.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include <omp.h>

#include <algorithm>
#include <fstream>

#include "kernels/error.h"
#include "kernels/matmul.h"
#include "parallel/planner/cost_model.h"
#include "parallel/planner/description.h"
#include "parallel/planner/search.h"
#include "train/config.h"
#include "train/plan.h"

namespace {

using namespace kraken::parallel::planner;

std::string fmt_time(double s) {
  char buf[32];
  if (s == 0)
    std::snprintf(buf, sizeof buf, "0");
  else if (s >= 1)
    std::snprintf(buf, sizeof buf, "%.3f s", s);
  else if (s >= 1e-3)
    std::snprintf(buf, sizeof buf, "%.2f ms", s * 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.1f us", s * 1e6);
  return buf;
}

std::string fmt_gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

// "6,6,6,5" or, for long pipelines, run lengths "6×12,5×4".
template <typename T>
std::string run_lengths(const std::vector<T>& items, size_t compress_above = 8) {
  std::ostringstream out;
  if (items.size() <= compress_above) {
    for (size_t i = 0; i < items.size(); ++i) out << (i ? "," : "") << items[i];
    return out.str();
  }
  for (size_t i = 0; i < items.size();) {
    size_t j = i;
    while (j < items.size() && items[j] == items[i]) ++j;
    out << (i ? "," : "") << items[i];
    if (j - i > 1) out << "x" << (j - i);
    i = j;
  }
  return out.str();
}

int transformer_layers(const ModelDesc& model, const StagePrediction& st) {
  int n = 0;
  for (int i = st.first_layer; i < st.end_layer; ++i) n += model.layers[i].kind == LayerKind::KrakenLayer;
  return n;
}

std::string layer_name(const ModelDesc& model, int i) {
  const LayerDesc& l = model.layers[i];
  if (l.kind == LayerKind::Embedding) return "emb";
  if (l.kind == LayerKind::LmHead) return "head";
  return "L" + std::to_string(l.index);
}

std::string layer_range(const ModelDesc& model, const StagePrediction& st) {
  std::vector<std::string> parts;
  int i = st.first_layer;
  if (model.layers[i].kind == LayerKind::Embedding) parts.push_back(layer_name(model, i++));
  int end = st.end_layer;
  const bool head = model.layers[end - 1].kind == LayerKind::LmHead;
  if (head) --end;
  if (i < end) parts.push_back(end - i == 1 ? layer_name(model, i) : layer_name(model, i) + "-" + layer_name(model, end - 1));
  if (head) parts.push_back("head");
  std::string out;
  for (const std::string& p : parts) out += (out.empty() ? "" : ",") + p;
  return out;
}

std::string stage_hosts(const Cluster& cluster, const StagePrediction& st) {
  std::string out;
  for (int g : st.groups) out += (out.empty() ? "" : "+") + cluster.groups[g].name;
  return out;
}

nlohmann::json to_json(const Cluster& cluster, const ModelDesc& model, const RankedStrategy& r, int rank) {
  const Strategy& s = r.strategy;
  const Prediction& p = r.prediction;
  nlohmann::json j;
  j["rank"] = rank;
  j["tp"] = s.tp;
  j["dp"] = s.dp;
  j["pp"] = s.pp;
  j["micro_batch"] = s.micro_batch;
  j["accumulation"] = s.accumulation;
  j["stage_begin"] = s.stage_begin;
  std::vector<std::string> order;
  for (int g : s.group_order) order.push_back(cluster.groups[g].name);
  j["group_order"] = order;
  j["step_time_s"] = p.step_time;
  j["compute_s"] = p.compute;
  j["bubble_s"] = p.bubble;
  j["pp_comm_s"] = p.pp_comm;
  j["tp_comm_s"] = p.tp_comm;
  j["dp_comm_s"] = p.dp_comm;
  j["memory_per_device_bytes"] = p.memory_per_device;
  j["fits"] = p.fits;
  nlohmann::json stages = nlohmann::json::array();
  for (const StagePrediction& st : p.stages) {
    std::vector<std::string> hosts;
    for (int g : st.groups) hosts.push_back(cluster.groups[g].name);
    stages.push_back({{"layers", {st.first_layer, st.end_layer}},
                      {"transformer_layers", transformer_layers(model, st)},
                      {"groups", hosts},
                      {"device_type", st.device_type},
                      {"compute_s", st.compute},
                      {"tp_comm_s", st.tp_comm},
                      {"p2p_s", st.p2p},
                      {"dp_allreduce_s", st.dp_allreduce},
                      {"dp_exposed_s", st.dp_exposed},
                      {"in_flight", st.in_flight},
                      {"memory",
                       {{"weights", st.memory.weights},
                        {"gradients", st.memory.gradients},
                        {"optimizer", st.memory.optimizer},
                        {"activations", st.memory.activations},
                        {"total", st.memory.total()},
                        {"capacity", st.memory_capacity}}}});
  }
  j["stages"] = stages;
  return j;
}

void print_table(const Cluster& cluster, const ModelDesc& model, const SearchResult& result, size_t shown) {
  std::printf("%-4s %3s %5s %3s %4s %5s  %-18s %-24s %10s %10s %10s %10s %10s %10s %10s\n", "rank", "tp", "dp", "pp",
              "mbs", "accum", "layers/stage", "placement", "step", "compute", "bubble", "pp", "tp", "dp", "mem/dev");
  for (size_t k = 0; k < shown; ++k) {
    const RankedStrategy& r = result.top[k];
    const Prediction& p = r.prediction;
    std::vector<int> layers;
    std::vector<std::string> hosts;
    for (const StagePrediction& st : p.stages) {
      layers.push_back(transformer_layers(model, st));
      hosts.push_back(stage_hosts(cluster, st));
    }
    const std::string mem = fmt_gib(p.memory_per_device) + (p.fits ? "" : " (OOM)");
    std::printf("%-4zu %3d %5d %3d %4d %5d  %-18s %-24s %10s %10s %10s %10s %10s %10s %10s\n", k + 1, r.strategy.tp,
                r.strategy.dp, r.strategy.pp, r.strategy.micro_batch, r.strategy.accumulation,
                run_lengths(layers).c_str(), run_lengths(hosts, 3).c_str(), fmt_time(p.step_time).c_str(),
                fmt_time(p.compute).c_str(), fmt_time(p.bubble).c_str(), fmt_time(p.pp_comm).c_str(),
                fmt_time(p.tp_comm).c_str(), fmt_time(p.dp_comm).c_str(), mem.c_str());
  }
}

void explain(const Cluster& cluster, const ModelDesc& model, const RankedStrategy& r, int rank, CostModelKind kind) {
  const Strategy& s = r.strategy;
  const Prediction& p = r.prediction;
  std::printf("\nstrategy %d (cost model %s): tp=%d dp=%d pp=%d micro_batch=%d accumulation=%d\n", rank,
              cost_model_name(kind), s.tp, s.dp, s.pp, s.micro_batch, s.accumulation);
  std::printf("step %s = compute %s + bubble %s + pp %s + tp %s + dp %s\n", fmt_time(p.step_time).c_str(),
              fmt_time(p.compute).c_str(), fmt_time(p.bubble).c_str(), fmt_time(p.pp_comm).c_str(),
              fmt_time(p.tp_comm).c_str(), fmt_time(p.dp_comm).c_str());
  std::printf("(per micro-batch times; compute and tp are the slowest stage's × %d micro-batches)\n", s.accumulation);
  std::printf("%-5s %-16s %-16s %-10s %10s %10s %10s %12s %10s %3s %10s %10s %10s %10s %11s\n", "stage", "layers",
              "hosts", "device", "compute", "tp", "p2p", "dp allreduce", "exposed", "mb", "weights", "grads", "optim",
              "activ", "capacity");
  for (size_t j = 0; j < p.stages.size(); ++j) {
    const StagePrediction& st = p.stages[j];
    std::printf("%-5zu %-16s %-16s %-10s %10s %10s %10s %12s %10s %3d %10s %10s %10s %10s %11s%s\n", j,
                layer_range(model, st).c_str(), stage_hosts(cluster, st).c_str(), st.device_type.c_str(),
                fmt_time(st.compute).c_str(), fmt_time(st.tp_comm).c_str(), fmt_time(st.p2p).c_str(),
                fmt_time(st.dp_allreduce).c_str(), fmt_time(st.dp_exposed).c_str(), st.in_flight,
                fmt_gib(st.memory.weights).c_str(), fmt_gib(st.memory.gradients).c_str(),
                fmt_gib(st.memory.optimizer).c_str(), fmt_gib(st.memory.activations).c_str(),
                fmt_gib(st.memory_capacity).c_str(), st.memory.total() > st.memory_capacity ? "  OOM" : "");
  }
}

std::string fmt_ms(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f", s * 1e3);
  return buf;
}

// kraken-plan --profile: measure, print the table (stderr), write the file (--out, or stdout).
int profile(const std::string& config_path, const std::string& out_path, const kraken::train::ProfileOptions& options,
            int threads) {
  using namespace kraken;
  const train::Config config = train::load_config_for_planning(config_path);
  const ModelDesc model = train::model_desc_of(config);
  if (threads > 0) {
    omp_set_num_threads(threads);
    kernels::set_cpu_blas_threads(threads);
  }
  const std::vector<int> tps = train::profile_tp_degrees(config);
  const std::vector<int> mbs =
      options.micro_batches.empty() ? train::profile_micro_batches(config, options.max_micro_batch) : options.micro_batches;
  std::string mb_list, tp_list;
  for (int mb : mbs) mb_list += (mb_list.empty() ? "" : ",") + std::to_string(mb);
  for (int tp : tps) tp_list += (tp_list.empty() ? "" : ",") + std::to_string(tp);
  std::fprintf(stderr,
               "kraken-plan --profile %s: device %s (type '%s'), %d thread(s), BLAS %s; micro-batches {%s}, tp {%s}; "
               "%d warm-up + %d timed runs per point, median kept\n",
               config_path.c_str(), config.train.device.c_str(), options.device_type.c_str(), omp_get_max_threads(),
               kernels::cpu_blas_name(), mb_list.c_str(), tp_list.c_str(), options.warmup, options.repeat);
  std::fprintf(stderr, "%-13s %3s %5s %12s %12s %12s %8s\n", "kind", "tp", "mbs", "median ms", "min ms", "max ms",
               "spread");
  std::ostringstream table;
  table << "measured by kraken-plan --profile " << config_path << " on " << config.train.device << " ("
        << omp_get_max_threads() << " thread(s), BLAS " << kernels::cpu_blas_name() << "): forward + backward of one\n"
        << "micro-batch per layer kind, " << options.warmup << " warm-up and " << options.repeat
        << " timed runs per point, the median kept (train/plan.h says what runs).\n"
        << "kind           tp   mbs    median ms       min ms       max ms   spread\n";
  const auto report = [&](const kraken::train::LayerMeasurement& m) {
    const auto [lo, hi] = std::minmax_element(m.samples.begin(), m.samples.end());
    char line[160];
    std::snprintf(line, sizeof line, "%-13s %3d %5d %12s %12s %12s %7.1f%%", layer_kind_name(m.kind), m.tp,
                  m.micro_batch, fmt_ms(m.seconds).c_str(), fmt_ms(*lo).c_str(), fmt_ms(*hi).c_str(),
                  100.0 * (*hi - *lo) / m.seconds);
    std::fprintf(stderr, "%s\n", line);
    table << line << "\n";
  };
  const Profile measured = train::measure_profile(config, options, report);
  const std::string text = format_profile(measured, model, table.str());
  if (out_path.empty() || out_path == "-") {
    std::cout << text;
  } else {
    std::ofstream out(out_path);
    out << text;
    if (!out) KRAKEN_THROW("cannot write the profile to '", out_path, "'");
    std::fprintf(stderr, "wrote %s (%zu measurements)\n", out_path.c_str(), measured.entries.size());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kraken-plan: rank parallel strategies (tp, dp, pp, micro-batch, layer split) for a cluster"};
  std::string cluster_path, config_path, cost_model = "kraken";
  int top = 10, explain_rank = 0;
  bool json = false;
  std::vector<std::string> profile_paths;
  std::string profile_config, out_path;
  kraken::train::ProfileOptions profile_options;
  int threads = 1;
  app.add_option("cluster", cluster_path, "cluster description (TOML, see configs/clusters/)");
  app.add_option("config", config_path, "Kraken training config (TOML)");
  app.add_option("--profile", profile_config, "measure the layer kinds of this training config on this machine");
  app.add_option("--out", out_path, "--profile: where to write the profile file (default: standard output)");
  app.add_option("--device-type", profile_options.device_type,
                 "--profile: the device type the profile is for (a cluster file's `device`; default cpu-2core)");
  app.add_option("--max-micro-batch", profile_options.max_micro_batch,
                 "--profile: measure the divisors of the global batch up to this (default 16)")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--micro-batches", profile_options.micro_batches, "--profile: measure exactly these sizes")
      ->delimiter(',');
  app.add_option("--warmup", profile_options.warmup, "--profile: untimed runs per point (default 1)")
      ->check(CLI::Range(0, 1000));
  app.add_option("--repeat", profile_options.repeat, "--profile: timed runs per point, median kept (default 5)")
      ->check(CLI::Range(1, 1000));
  app.add_option("--threads", threads,
                 "--profile: CPU threads (default 1: a cpu-2core device is one rank on one core; 0: OpenMP's choice)")
      ->check(CLI::Range(0, 1024));
  app.add_option("--top", top, "how many strategies to print")->check(CLI::Range(1, 1000000));
  app.add_flag("--json", json, "print JSON for scripts");
  app.add_option("--explain", explain_rank, "break strategy N of the list down stage by stage")
      ->check(CLI::Range(1, 1000000));
  app.add_option("--cost-model", cost_model, "amp (AMP's formulas) or kraken (the default)");
  app.add_option("--profile-file", profile_paths, "measured layer times (TOML; repeatable)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "kraken-plan: error: %s\n", e.what());
    return 2;
  }

  try {
    if (!profile_config.empty()) {
      if (!cluster_path.empty())
        KRAKEN_THROW("--profile takes the training config as its value and no other file (got '", cluster_path, "')");
      return profile(profile_config, out_path, profile_options, threads);
    }
    if (cluster_path.empty() || config_path.empty())
      KRAKEN_THROW("expected a cluster file and a training config (kraken-plan cluster.toml config.toml), or "
                   "--profile config.toml; see --help");
    const CostModelKind kind = parse_cost_model(cost_model);
    const Cluster cluster = load_cluster(cluster_path);
    const ModelDesc model = kraken::train::model_desc_of(kraken::train::load_config_for_planning(config_path));
    std::vector<Profile> profiles;
    for (const std::string& path : profile_paths) {
      profiles.push_back(load_profile(path, model));
      bool used = false;
      for (const NodeGroup& g : cluster.groups) used = used || g.device_type == profiles.back().device_type;
      if (!used)
        std::fprintf(stderr, "kraken-plan: warning: %s is a profile of device type '%s', which no node group of '%s' "
                             "has; it is not used\n",
                     path.c_str(), profiles.back().device_type.c_str(), cluster.name.c_str());
    }
    SearchOptions options;
    options.cost_model = kind;
    options.top_k = std::max(top, explain_rank);
    SearchResult result = search(cluster, model, profiles, options);
    if (explain_rank > int(result.top.size()))
      KRAKEN_THROW("--explain ", explain_rank, ": only ", result.top.size(), " strategies were found");
    const size_t shown = std::min<size_t>(size_t(top), result.top.size());

    if (json) {
      nlohmann::json out;
      out["cluster"] = cluster.name;
      out["devices"] = cluster.total_devices();
      out["cost_model"] = cost_model_name(kind);
      out["global_batch"] = model.config.global_batch;
      out["parameters"] = model.total_params();
      out["search"] = {{"shapes", result.stats.shapes},
                       {"layouts", result.stats.layouts},
                       {"pruned_by_bound", result.stats.pruned_by_bound},
                       {"no_fit", result.stats.no_fit},
                       {"programs", result.stats.programs},
                       {"seconds", result.stats.seconds}};
      nlohmann::json list = nlohmann::json::array();
      for (size_t k = 0; k < shown; ++k) list.push_back(to_json(cluster, model, result.top[k], int(k + 1)));
      out["strategies"] = list;
      if (explain_rank > 0) out["explained"] = explain_rank;
      std::cout << out.dump(2) << "\n";
      return 0;
    }

    const ModelConfig& c = model.config;
    std::printf("cluster '%s': %d devices in %zu group(s); model: %.1fM parameters (n_layer=%d n_embd=%d n_head=%d "
                "degree=%d), global batch %lld x %d tokens; cost model %s\n",
                cluster.name.c_str(), cluster.total_devices(), cluster.groups.size(), model.total_params() / 1e6,
                c.n_layer, c.n_embd, c.n_head, c.degree, static_cast<long long>(c.global_batch), c.context,
                cost_model_name(kind));
    std::printf("searched %lld shapes, %lld layouts (%lld pruned by bound, %lld without a split that fits) in %.3f s\n\n",
                static_cast<long long>(result.stats.shapes), static_cast<long long>(result.stats.layouts),
                static_cast<long long>(result.stats.pruned_by_bound), static_cast<long long>(result.stats.no_fit),
                result.stats.seconds);
    print_table(cluster, model, result, shown);
    if (explain_rank > 0) explain(cluster, model, result.top[explain_rank - 1], explain_rank, kind);
    return 0;
  } catch (const kraken::Error& e) {
    std::fprintf(stderr, "kraken-plan: error: %s\n", e.what());
    return 2;
  }
}
