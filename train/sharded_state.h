// Logical checkpoints under parallelism.
//
// A checkpoint always holds the logical model: every parameter whole, once, under its name, and the
// optimizer state likewise. So a run saved at tp = 2, pp = 2 resumes at tp = 1, pp = 1 and back.
// Saving gathers: tensor-parallel pieces are joined on tp rank 0 (runtime::join_shards), then every
// rank of one replica (dp = 0, ex = 0: the world-rank-0 model-parallel group) sends what it owns to
// world rank 0, which writes. Loading is local: every rank reads the logical tensors it needs from the
// file and cuts out its piece (runtime::take_shard).
#pragma once

#include <string>
#include <vector>

#include "parallel/mesh.h"
#include "runtime/module.h"
#include "runtime/safetensors.h"
#include "train/checkpoint.h"

namespace kraken::train {

struct LocalTensor {
  std::string name;      // the logical name
  runtime::Tensor tensor;
  runtime::ParamSpec spec;  // its shard, and whether it is a replica or a tied copy
};

// Optimizer state tensors are named "<prefix>.<parameter name>" and shaped like their parameter:
// they take that parameter's spec. A name that matches no parameter is kept whole (a scalar state).
std::vector<LocalTensor> with_param_specs(const NamedTensors& tensors, const std::vector<runtime::NamedParameter>& params);

// Collective over the world (every rank calls it in the same order). World rank 0 receives the
// logical tensors in a fixed order (its own first, then model-parallel rank by rank); the other ranks
// get an empty list.
NamedTensors gather_logical(const std::vector<LocalTensor>& local, const parallel::Mesh& mesh);

// Loads every target's piece from the logical tensors of `file` (a missing tensor or a shape that does
// not fit the layout is a kraken::Error naming it and the file).
void load_logical(const runtime::SafetensorsFile& file, const std::vector<LocalTensor>& targets);

}  // namespace kraken::train
