// plan = "auto" (train/auto_plan.h).
#include "train/auto_plan.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "kernels/error.h"
#include "parallel/failure.h"
#include "parallel/planner/search.h"
#include "parallel/world.h"
#include "runtime/tensor.h"
#include "train/plan.h"

namespace kraken::train {

namespace planner = parallel::planner;

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string seconds_str(double s) {
  char buf[32];
  if (s >= 1) std::snprintf(buf, sizeof buf, "%.3f s", s);
  else std::snprintf(buf, sizeof buf, "%.2f ms", s * 1e3);
  return buf;
}

std::string join(const std::vector<int64_t>& v) {
  std::string out;
  for (int64_t x : v) out += (out.empty() ? "" : ",") + std::to_string(x);
  return out;
}

// The GPU's type in the planner's table, from nvidia-smi's name and memory (gpu_type_of_name).
std::string gpu_type(int index) {
  const std::string command = "nvidia-smi --query-gpu=name,memory.total --format=csv,noheader -i " + std::to_string(index) +
                              " 2>/dev/null";
  std::string text;
  if (FILE* pipe = popen(command.c_str(), "r")) {
    char buf[256];
    while (std::fgets(buf, sizeof buf, pipe)) text += buf;
    pclose(pipe);
  }
  const std::string type = gpu_type_of_name(text);
  if (type.empty())
    KRAKEN_THROW("plan = \"auto\": cannot tell the type of GPU ", index, " (nvidia-smi says '", text,
                 "'); describe the cluster in a file and set [parallel] cluster");
  return type;
}

// Transformer layers of each stage of a split of the layer list.
std::vector<int64_t> transformer_layers_per_stage(const planner::ModelDesc& model, const std::vector<int>& split) {
  std::vector<int64_t> out;
  for (size_t j = 0; j + 1 < split.size(); ++j) {
    int64_t n = 0;
    for (int i = split[j]; i < split[j + 1]; ++i) n += model.layers[i].kind == planner::LayerKind::KrakenLayer;
    out.push_back(n);
  }
  return out;
}

nlohmann::json to_json(const AutoPlan& p) {
  return {{"cluster", p.cluster},
          {"tp", p.tp},
          {"dp", p.dp},
          {"pp", p.pp},
          {"micro_batch", p.micro_batch},
          {"accumulation", p.accumulation},
          {"layers_per_stage", p.layers_per_stage},
          {"stage_hosts", p.stage_hosts},
          {"predicted_step_seconds", p.step_seconds},
          {"compute_s", p.compute},
          {"bubble_s", p.bubble},
          {"pp_comm_s", p.pp_comm},
          {"tp_comm_s", p.tp_comm},
          {"dp_comm_s", p.dp_comm},
          {"memory_per_device_bytes", p.memory_per_device},
          {"alternatives", p.alternatives}};
}

AutoPlan from_json(const nlohmann::json& j) {
  AutoPlan p;
  p.active = true;
  p.cluster = j.at("cluster").get<std::string>();
  p.tp = j.at("tp").get<int>();
  p.dp = j.at("dp").get<int>();
  p.pp = j.at("pp").get<int>();
  p.micro_batch = j.at("micro_batch").get<int>();
  p.accumulation = j.at("accumulation").get<int>();
  p.layers_per_stage = j.at("layers_per_stage").get<std::vector<int64_t>>();
  p.stage_hosts = j.at("stage_hosts").get<std::vector<std::string>>();
  p.step_seconds = j.at("predicted_step_seconds").get<double>();
  p.compute = j.at("compute_s").get<double>();
  p.bubble = j.at("bubble_s").get<double>();
  p.pp_comm = j.at("pp_comm_s").get<double>();
  p.tp_comm = j.at("tp_comm_s").get<double>();
  p.dp_comm = j.at("dp_comm_s").get<double>();
  p.memory_per_device = j.at("memory_per_device_bytes").get<double>();
  p.alternatives = j.at("alternatives").get<std::string>();
  return p;
}

// Rank 0's text to every rank of the world (length, then one i32 per byte).
std::string broadcast_text(parallel::World& world, const std::string& text) {
  if (world.size() == 1) return text;
  runtime::Tensor length = runtime::Tensor::from_ints({static_cast<int32_t>(text.size())}, {1});
  world.communicator().broadcast(length, 0);
  const int32_t n = length.data<int32_t>()[0];
  KRAKEN_CHECK(n > 0, "empty plan message");
  std::vector<int32_t> bytes(static_cast<size_t>(n));
  if (world.rank() == 0)
    for (int32_t i = 0; i < n; ++i) bytes[static_cast<size_t>(i)] = static_cast<unsigned char>(text[static_cast<size_t>(i)]);
  runtime::Tensor payload = runtime::Tensor::from_ints(bytes, {n});
  world.communicator().broadcast(payload, 0);
  std::string out(static_cast<size_t>(n), '\0');
  for (int32_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = static_cast<char>(payload.data<int32_t>()[i]);
  return out;
}

}  // namespace

// ---- AutoPlan ------------------------------------------------------------------------------------

std::string AutoPlan::strategy_line() const {
  std::ostringstream out;
  out << "tp=" << tp << " dp=" << dp << " pp=" << pp << " micro_batch=" << micro_batch
      << " accumulation=" << accumulation;
  if (pp > 1) out << " layers/stage " << join(layers_per_stage);
  return out.str();
}

std::string AutoPlan::describe() const {
  if (!active) return "";
  std::ostringstream out;
  out << "  plan (auto, cluster '" << cluster << "'): " << strategy_line() << "\n";
  out << "  predicted step " << seconds_str(step_seconds) << " = compute " << seconds_str(compute) << " + bubble "
      << seconds_str(bubble) << " + pp " << seconds_str(pp_comm) << " + tp " << seconds_str(tp_comm) << " + dp "
      << seconds_str(dp_comm) << "; memory per device " << std::fixed;
  out.precision(3);
  out << memory_per_device / kGiB << " GiB\n";
  if (!alternatives.empty()) out << alternatives;
  return out.str();
}

double AutoPlan::measured_median() const {
  if (measured.empty()) return 0;
  std::vector<double> v(measured.begin() + (measured.size() > 1 ? 1 : 0), measured.end());
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string AutoPlan::summary() const {
  if (!active || measured.empty()) return "";
  const double m = measured_median();
  const size_t counted = measured.size() > 1 ? measured.size() - 1 : 1;
  char buf[256];
  std::snprintf(buf, sizeof buf, "plan: step time measured %s (median of %zu step%s%s), predicted %s (measured/predicted %.2f)",
                seconds_str(m).c_str(), counted, counted == 1 ? "" : "s", measured.size() > 1 ? ", first left out" : "",
                seconds_str(step_seconds).c_str(), step_seconds > 0 ? m / step_seconds : 0.0);
  return buf;
}

// ---- planning ------------------------------------------------------------------------------------

planner::Cluster detect_cluster(int world_size, int ranks_per_node, const runtime::Device& device,
                                const std::string& device_type) {
  if (world_size < 1 || ranks_per_node < 1 || world_size % ranks_per_node != 0)
    KRAKEN_THROW("plan = \"auto\": cannot describe a job of ", world_size, " ranks with ", ranks_per_node,
                 " per node as whole nodes; describe the cluster in a file and set [parallel] cluster");
  planner::Cluster c;
  c.device_types = planner::builtin_device_types();
  planner::NodeGroup g;
  g.name = "detected";
  g.nodes = world_size / ranks_per_node;
  g.devices_per_node = ranks_per_node;
  g.device_type = !device_type.empty() ? device_type : device.is_cpu() ? "cpu-2core" : gpu_type(device.index);
  const planner::DeviceType& type = c.device(g.device_type);  // throws, naming the known types
  g.memory_per_device = type.memory_bytes;
  if (device.is_cpu()) {
    // The ranks of a node share its memory.
    const double ram = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
    g.memory_per_device = std::min(g.memory_per_device, ram / ranks_per_node);
    // Open MPI's shared-memory transport between two ranks of this machine, measured with a ping-pong
    // (configs/clusters/this_machine.toml): 2 GB/s for large messages, 0.2 µs.
    g.intra_bandwidth = 2e9;
    g.intra_latency = 0.2e-6;
  } else {
    // Assumed: NVLink-class links inside a node (H100/H200 NVLink 4: 450 GB/s each way; A100 NVLink 3:
    // 300; V100 NVLink 2: 150), PCIe 3 for T4 (12 GB/s).
    const std::string& t = g.device_type;
    g.intra_bandwidth = t == "T4" ? 12e9 : t == "V100" ? 150e9 : t.rfind("A100", 0) == 0 ? 300e9 : 450e9;
    g.intra_latency = 3e-6;
  }
  // Assumed between nodes: a 100 Gb/s NIC share per device, 10 µs.
  g.inter_bandwidth = g.nodes > 1 ? 12.5e9 : g.intra_bandwidth;
  g.inter_latency = g.nodes > 1 ? 10e-6 : g.intra_latency;
  c.groups.push_back(g);
  std::ostringstream name;
  name << "detected: " << g.nodes << " node(s) x " << g.devices_per_node << " " << g.device_type;
  c.name = name.str();
  return c;
}

AutoPlan choose_plan(const Config& config, const planner::Cluster& cluster, const std::vector<planner::Profile>& profiles,
                     planner::CostModelKind cost_model) {
  const planner::ModelDesc model = model_desc_of(config);
  planner::SearchOptions options;
  options.cost_model = cost_model;
  options.top_k = 4;  // the best, and three more for the log
  options.file_order_only = true;  // ranks come in the launcher's order, which is the file's
  const planner::SearchResult result = planner::search(cluster, model, profiles, options);
  const planner::RankedStrategy& best = result.top.front();
  AutoPlan p;
  p.active = true;
  p.cluster = cluster.name;
  p.tp = best.strategy.tp;
  p.dp = best.strategy.dp;
  p.pp = best.strategy.pp;
  p.micro_batch = best.strategy.micro_batch;
  p.accumulation = best.strategy.accumulation;
  p.layers_per_stage = transformer_layers_per_stage(model, best.strategy.stage_begin);
  for (const planner::StagePrediction& st : best.prediction.stages) {
    std::string hosts;
    for (int g : st.groups) hosts += (hosts.empty() ? "" : "+") + cluster.groups[static_cast<size_t>(g)].name;
    p.stage_hosts.push_back(hosts);
  }
  const planner::Prediction& q = best.prediction;
  p.step_seconds = q.step_time;
  p.compute = q.compute;
  p.bubble = q.bubble;
  p.pp_comm = q.pp_comm;
  p.tp_comm = q.tp_comm;
  p.dp_comm = q.dp_comm;
  p.memory_per_device = q.memory_per_device;
  for (size_t k = 1; k < result.top.size(); ++k) {
    AutoPlan alt;
    const planner::Strategy& s = result.top[k].strategy;
    alt.tp = s.tp, alt.dp = s.dp, alt.pp = s.pp, alt.micro_batch = s.micro_batch, alt.accumulation = s.accumulation;
    alt.layers_per_stage = transformer_layers_per_stage(model, s.stage_begin);
    p.alternatives += "    next " + std::to_string(k) + ": " + alt.strategy_line() + ", predicted " +
                      seconds_str(result.top[k].prediction.step_time) + "\n";
  }
  return p;
}

void apply_plan(const AutoPlan& plan, Config& config) {
  KRAKEN_CHECK(plan.active && static_cast<int>(plan.layers_per_stage.size()) == plan.pp);
  config.parallel.dp = plan.dp;
  config.parallel.tp = plan.tp;
  config.parallel.pp = plan.pp;
  config.parallel.layers_per_stage = plan.pp > 1 ? plan.layers_per_stage : std::vector<int64_t>{};
  config.train.batch_size = plan.micro_batch;
  config.train.grad_accum = plan.accumulation;
}

AutoPlan plan_layout(Config& config, parallel::World& world) {
  KRAKEN_CHECK(config.parallel.plan == "auto");
  // First the collective every trainer starts with: ranks given different configs (one planning, one
  // not) then fail together here instead of hanging in mismatched collectives.
  parallel::check_same_on_all_ranks("the config file", config.text);
  std::string message;
  if (world.rank() == 0) {
    nlohmann::json reply;
    try {
      const planner::ModelDesc model = model_desc_of(config);
      std::vector<planner::Profile> profiles;
      for (const std::string& path : config.parallel.profile) profiles.push_back(planner::load_profile(path, model));
      planner::Cluster cluster;
      if (!config.parallel.cluster.empty()) {
        cluster = planner::load_cluster(config.parallel.cluster);
        if (cluster.total_devices() != world.size())
          KRAKEN_THROW("[parallel] cluster = \"", config.parallel.cluster, "\" describes ", cluster.total_devices(),
                       " devices, but the job has ", world.size(), " ranks (one per device)");
      } else {
        const runtime::Device device = runtime::parse_device(config.train.device);
        cluster = detect_cluster(world.size(), world.local_size(), device,
                                 profiles.empty() ? "" : profiles.front().device_type);
      }
      for (size_t i = 0; i < profiles.size(); ++i) {
        bool used = false;
        for (const planner::NodeGroup& g : cluster.groups) used = used || g.device_type == profiles[i].device_type;
        if (!used)
          KRAKEN_THROW("[parallel] profile \"", config.parallel.profile[i], "\" was measured for device type '",
                       profiles[i].device_type, "', which no node group of cluster '", cluster.name,
                       "' has: it would not be used (kraken-plan --profile --device-type names the type)");
      }
      const AutoPlan plan = choose_plan(config, cluster, profiles);
      reply = to_json(plan);
      reply["ok"] = true;
    } catch (const Error& e) {
      reply = {{"ok", false}, {"error", std::string("plan = \"auto\": ") + e.what()}};
    }
    message = reply.dump();
  }
  message = broadcast_text(world, message);
  const nlohmann::json reply = nlohmann::json::parse(message);
  if (!reply.at("ok").get<bool>()) KRAKEN_THROW(reply.at("error").get<std::string>());
  AutoPlan plan = from_json(reply);
  apply_plan(plan, config);
  if (world.rank() == 0) {
    // For scripts (bench/plan_quality.sh, the MPI test): what was chosen and predicted.
    std::filesystem::create_directories(config.train.out_dir);
    std::ofstream(config.train.out_dir + "/plan.json") << reply.dump(2) << "\n";
  }
  return plan;
}

std::string gpu_type_of_name(const std::string& text) {
  auto has = [&](const char* part) { return text.find(part) != std::string::npos; };
  if (has("H200")) return "H200";
  if (has("H100")) return "H100";
  if (has("A100")) return has("80GB") || has("81920") ? "A100-80" : "A100-40";
  if (has("V100")) return "V100";
  if (has("T4")) return "T4";
  return "";
}

double gpu_peak_flops(const std::string& name) {
  const std::string type = gpu_type_of_name(name);
  for (const planner::DeviceType& d : planner::builtin_device_types())
    if (!type.empty() && d.name == type) return d.peak_flops;
  return 0.0;
}

}  // namespace kraken::train
