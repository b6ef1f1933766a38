// The strategy search (search.h).
#include "parallel/planner/search.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <sstream>
#include <tuple>

#include "kernels/error.h"
#include "parallel/planner/partition.h"

namespace kraken::parallel::planner {
namespace {

std::vector<int64_t> divisors(int64_t n) {
  std::vector<int64_t> d;
  for (int64_t i = 1; i * i <= n; ++i) {
    if (n % i != 0) continue;
    d.push_back(i);
    if (i != n / i) d.push_back(n / i);
  }
  std::sort(d.begin(), d.end());
  return d;
}

// Two groups are interchangeable when everything the cost model reads from them is equal.
auto signature(const NodeGroup& g) {
  return std::make_tuple(g.nodes, g.devices_per_node, g.device_type, g.memory_per_device, g.intra_bandwidth,
                         g.intra_latency, g.inter_bandwidth, g.inter_latency);
}

// "1.25 GiB (1342177280 bytes)": readable, and exact for small test clusters.
std::string memory_str(double bytes) {
  std::ostringstream out;
  out.setf(std::ios::fixed);
  out.precision(2);
  out << bytes / (1024.0 * 1024.0 * 1024.0) << " GiB (";
  out.precision(0);
  out << bytes << " bytes)";
  return out.str();
}

}  // namespace

std::vector<Strategy> candidate_shapes(const Cluster& cluster, const ModelDesc& model) {
  const ModelConfig& c = model.config;
  const int n = cluster.total_devices();
  int per_node = 0;
  for (const NodeGroup& g : cluster.groups) per_node = std::gcd(per_node, g.devices_per_node);
  std::vector<Strategy> shapes;
  for (int64_t tp : divisors(per_node)) {
    if (c.degree > 1 ? c.degree % tp != 0 : c.n_head % tp != 0) continue;
    for (int64_t dp : divisors(n / tp)) {
      const int64_t pp = n / tp / dp;
      if (pp > c.n_layer || c.global_batch % dp != 0) continue;
      if (model.limits.data_parallel_only && (tp > 1 || pp > 1)) continue;
      for (int64_t mbs : divisors(c.global_batch / dp)) {
        if (model.limits.accumulation_covers_pipeline && pp > 1 && c.global_batch / (dp * mbs) < pp) continue;
        Strategy s;
        s.tp = int(tp);
        s.dp = int(dp);
        s.pp = int(pp);
        s.micro_batch = int(mbs);
        s.accumulation = int(c.global_batch / (dp * mbs));
        shapes.push_back(s);
      }
    }
  }
  return shapes;
}

std::vector<std::vector<int>> candidate_placements(const Cluster& cluster, CostModelKind kind, bool file_order_only) {
  const int G = int(cluster.groups.size());
  std::vector<int> file_order(G);
  std::iota(file_order.begin(), file_order.end(), 0);
  if (kind == CostModelKind::Amp || file_order_only) return {file_order};

  std::vector<std::vector<int>> orders;
  if (G <= 4) {
    std::vector<int> o = file_order;
    do orders.push_back(o);
    while (std::next_permutation(o.begin(), o.end()));
  } else {
    orders.push_back(file_order);
    auto sorted_by = [&](auto key, bool descending) {
      std::vector<int> o = file_order;
      std::stable_sort(o.begin(), o.end(), [&](int a, int b) {
        return descending ? key(cluster.groups[a]) > key(cluster.groups[b]) : key(cluster.groups[a]) < key(cluster.groups[b]);
      });
      orders.push_back(o);
    };
    auto speed = [&](const NodeGroup& g) {
      const DeviceType& d = cluster.device_of(g);
      return d.peak_flops * d.compute_efficiency;
    };
    auto memory = [](const NodeGroup& g) { return g.memory_per_device; };
    sorted_by(speed, true);
    sorted_by(speed, false);
    sorted_by(memory, true);
    sorted_by(memory, false);
  }
  // Orders equal up to swapping identical groups place the same devices the same way: keep the first.
  std::vector<std::vector<int>> unique;
  std::vector<std::vector<decltype(signature(cluster.groups[0]))>> seen;
  for (const std::vector<int>& o : orders) {
    std::vector<decltype(signature(cluster.groups[0]))> sig;
    for (int g : o) sig.push_back(signature(cluster.groups[g]));
    if (std::find(seen.begin(), seen.end(), sig) != seen.end()) continue;
    seen.push_back(sig);
    unique.push_back(o);
  }
  return unique;
}

SearchResult search(const Cluster& cluster, const ModelDesc& model, const std::vector<Profile>& profiles,
                    const SearchOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  if (options.top_k <= 0) KRAKEN_THROW("search: top_k must be positive, got ", options.top_k);
  const CostModelKind kind = options.cost_model;
  SearchResult result;
  const std::vector<Strategy> shapes = candidate_shapes(cluster, model);
  const std::vector<std::vector<int>> placements = candidate_placements(cluster, kind, options.file_order_only);
  result.stats.shapes = int64_t(shapes.size());
  if (shapes.empty()) {
    const RunLimits& limits = model.limits;
    KRAKEN_THROW("no (tp, dp, pp, micro-batch) divides the cluster '", cluster.name, "' (",
                 cluster.total_devices(), " devices) and the global batch (", model.config.global_batch,
                 " sequences) with pp ≤ n_layer (", model.config.n_layer, ")",
                 limits.accumulation_covers_pipeline ? ", at least pp micro-batches per step" : "",
                 limits.data_parallel_only ? ", and tp = pp = 1 (data parallelism only)" : "");
  }

  std::vector<RankedStrategy>& top = result.top;
  auto kth_best = [&] {
    return int(top.size()) < options.top_k ? kInfinity : top.back().prediction.step_time;
  };

  for (const Strategy& shape : shapes) {
    RankedStrategy best;
    best.prediction.step_time = kInfinity;
    for (const std::vector<int>& order : placements) {
      Strategy s = shape;
      s.group_order = order;
      ++result.stats.layouts;
      const Layout layout(kind, cluster, model, profiles, s);
      const PipelineProblem& problem = layout.problem();
      const double bound = std::min(kth_best(), best.prediction.step_time);
      if (pipeline_lower_bound(problem) >= bound) {
        ++result.stats.pruned_by_bound;
        continue;
      }
      // The partition is exact for the pipeline; the data-parallel all-reduce depends on each stage's
      // parameters too, so every split the partition search met is judged by the full model.
      const PartitionResult part = optimal_partition(problem, kind == CostModelKind::Kraken && s.dp > 1);
      result.stats.programs += part.programs;
      if (!part.feasible) {
        ++result.stats.no_fit;
        continue;
      }
      std::vector<std::vector<int>> splits = {part.stage_begin};
      for (const std::vector<int>& alt : part.alternatives)
        if (alt != part.stage_begin) splits.push_back(alt);
      for (const std::vector<int>& split : splits) {
        Prediction pred = layout.evaluate(split);
        if (pred.step_time < best.prediction.step_time) {
          best.strategy = s;
          best.strategy.stage_begin = split;
          best.prediction = std::move(pred);
        }
      }
    }
    if (best.prediction.step_time == kInfinity) continue;
    if (best.prediction.step_time >= kth_best()) continue;
    // Insert keeping the order; equal times keep the earlier shape first (deterministic).
    auto at = std::upper_bound(top.begin(), top.end(), best.prediction.step_time,
                               [](double t, const RankedStrategy& r) { return t < r.prediction.step_time; });
    top.insert(at, std::move(best));
    if (int(top.size()) > options.top_k) top.pop_back();
  }

  if (top.empty()) {
    // Nothing fits: say what the least demanding strategy would need (the smallest micro-batch has the
    // smallest activations, so only micro-batch 1 is measured).
    double need = kInfinity;
    Strategy need_at;
    for (const Strategy& shape : shapes) {
      if (shape.micro_batch != 1) continue;
      for (const std::vector<int>& order : placements) {
        Strategy s = shape;
        s.group_order = order;
        const Layout layout(kind, cluster, model, profiles, s);
        const double m = min_peak_memory(layout.problem());
        if (m < need) {
          need = m;
          need_at = s;
        }
      }
    }
    double largest = 0;
    for (const NodeGroup& g : cluster.groups) largest = std::max(largest, g.memory_per_device);
    KRAKEN_THROW("no strategy fits in memory on cluster '", cluster.name, "': the least demanding (tp=", need_at.tp,
                 " dp=", need_at.dp, " pp=", need_at.pp, " micro_batch=1) needs ", memory_str(need),
                 " per device, and the largest device has ", memory_str(largest));
  }
  result.stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

}  // namespace kraken::parallel::planner
