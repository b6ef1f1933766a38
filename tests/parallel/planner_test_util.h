// Clusters for the planner tests: node groups with chosen links, and the built-in device types plus
// test-only ones with round numbers.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "parallel/planner/description.h"

namespace kraken::parallel::planner::test {

inline NodeGroup node_group(const std::string& name, int nodes, int per_node, const std::string& type, double memory,
                            double intra_bw = 100e9, double intra_lat = 2e-6, double inter_bw = 20e9,
                            double inter_lat = 8e-6) {
  NodeGroup g;
  g.name = name;
  g.nodes = nodes;
  g.devices_per_node = per_node;
  g.device_type = type;
  g.memory_per_device = memory;
  g.intra_bandwidth = intra_bw;
  g.intra_latency = intra_lat;
  g.inter_bandwidth = inter_bw;
  g.inter_latency = inter_lat;
  return g;
}

// Degree 2, two layers, C = 8, one head per sub-layer, e = 2, T = 4, V = 64, no biases: 2,792 parameters
// (planner_cost_model_test.cpp counts its memory by hand).
inline ModelDesc kraken_tiny() {
  ModelConfig c;
  c.n_layer = 2;
  c.n_embd = 8;
  c.n_head = 2;
  c.degree = 2;
  c.mlp_expansion = 2;
  c.context = 4;
  c.vocab_size = 64;
  c.bias = false;
  c.global_batch = 8;
  return make_model_desc(c);
}

// A device type whose arithmetic is easy to follow: full efficiency, 1 GB.
inline DeviceType round_device(const std::string& name, double peak_flops, double memory_bandwidth) {
  DeviceType d;
  d.name = name;
  d.peak_flops = peak_flops;
  d.memory_bandwidth = memory_bandwidth;
  d.memory_bytes = 1e9;
  d.compute_efficiency = d.memory_efficiency = 1;
  return d;
}

// The built-in device types, the given extra ones, and the groups.
inline Cluster cluster_with(std::vector<NodeGroup> groups, const std::vector<DeviceType>& extra = {}) {
  Cluster c;
  c.name = "test";
  c.device_types = builtin_device_types();
  c.device_types.insert(c.device_types.end(), extra.begin(), extra.end());
  c.groups = std::move(groups);
  return c;
}

}  // namespace kraken::parallel::planner::test
