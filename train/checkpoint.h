// Checkpoints: one directory per step, written atomically, the last K kept.
//
//   <dir>/step_00000100/model.safetensors      every parameter under its dotted name
//                      /optimizer.safetensors  the optimizer's state tensors (OptEx: history too)
//                      /state.json             step, data position, RNG state, optimizer scalars,
//                                              the config text, run counters
// The directory is assembled under a temporary name, every file fsynced, then renamed into place and
// the parent fsynced, so a crash leaves either the old set of checkpoints or the new one, never a
// half-written step. A resumed run reloads all of it and continues bit for bit.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/safetensors.h"
#include "runtime/tensor.h"

namespace kraken::train {

using NamedTensors = std::vector<std::pair<std::string, runtime::Tensor>>;

struct CheckpointContents {
  NamedTensors model;
  NamedTensors optimizer;
  nlohmann::json state;  // must hold "step"
};

class CheckpointStore {
 public:
  CheckpointStore(std::string dir, int64_t keep);

  // Writes step `step` and removes all but the newest `keep`. Returns the checkpoint's directory.
  std::string save(int64_t step, const CheckpointContents& contents);
  // Complete checkpoints (directories named step_N holding state.json), oldest first.
  std::vector<std::pair<int64_t, std::string>> list() const;
  // The newest complete checkpoint's directory, or "" when there is none.
  std::string latest() const;
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  int64_t keep_;
};

// An opened checkpoint: state.json parsed, both safetensors files validated. Every problem (missing
// directory or file, corrupt JSON or tensors) is a kraken::Error naming the path.
struct LoadedCheckpoint {
  std::string dir;
  nlohmann::json state;
  runtime::SafetensorsFile model;
  runtime::SafetensorsFile optimizer;
  int64_t step() const;
};
LoadedCheckpoint open_checkpoint(const std::string& dir);

// Copies the checkpoint's tensors into `targets` (name → live tensor). Missing or unexpected names and
// shape mismatches are errors that name the tensor and the file.
void load_tensors(const runtime::SafetensorsFile& file, const NamedTensors& targets, bool allow_extra = false);

// mkdir -p; errors name the path.
void make_directories(const std::string& path);
// Writes a file atomically (tmp + fsync + rename + fsync of the directory).
void write_file_atomically(const std::string& path, const std::string& contents);

}  // namespace kraken::train
