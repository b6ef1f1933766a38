// Config: a training job as validated structs, read from TOML.
//
// Every key is checked up front: unknown keys, wrong types, out-of-range values, inconsistent shapes
// and missing files are errors that name the file, the line, the key and what was expected, e.g.
//   configs/demo.toml:7: [model] n_head = 6: n_embd = 256 is not divisible by 6 …
// The keys, their defaults and their meaning are listed in configs/README.md (keep them in sync).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "models/kraken.h"

namespace kraken::train {

struct DataConfig {
  std::vector<std::string> train;  // glob patterns of training shards
  std::vector<std::string> val;    // glob patterns of validation shards (may be empty: no evaluation)
  std::string format = "auto";     // auto | llmc | raw
  bool shuffle = true;
};

struct TrainConfig {
  std::string device = "cpu";      // cpu | cuda (one GPU per rank)
  std::string precision = "auto";  // auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16 (mixed precision)
  uint64_t seed = 1337;
  int64_t batch_size = 4;          // sequences per micro-batch and data-parallel rank
  int64_t seq_len = 256;           // T (≤ model.context)
  int64_t grad_accum = 1;          // micro-batches per optimizer step
  int64_t max_steps = 100;
  int64_t eval_every = 0;          // 0: evaluate only at the end (when there are val shards)
  int64_t eval_batches = 20;       // batches per evaluation (0: the whole val set)
  int64_t log_every = 1;
  int threads = 0;                 // CPU threads per rank (0: what OpenMP chooses)
  std::string out_dir = "runs/default";
};

struct OptExConfig {
  int64_t parallelism = 4;         // N gradient evaluations per sequential iteration
  int64_t history = 50;            // T0, (θ, g) pairs kept
  double lengthscale = 0.1;        // Matérn-5/2 lengthscale ℓ
  double noise = 1e-3;             // σ² added to the kernel's diagonal
  bool normalize_inputs = true;    // the reference code's input scaling (optex.md §2.2)
  int64_t effective_dim = 0;       // random coordinates for kernel distances (0: all)
  std::string base = "adamw";      // adamw | sgd
  double max_history_gb = 0.0;     // refuse a history larger than this (0: 50% of the device's memory)
};

struct OptimConfig {
  std::string name = "adamw";      // adamw | sgd | optex
  double lr = 6e-4;
  double min_lr = 6e-5;
  int64_t warmup_steps = 0;
  int64_t decay_steps = 0;         // 0: max_steps
  std::string schedule = "cosine"; // cosine | linear | constant
  double weight_decay = 0.1;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double momentum = 0.9;
  bool nesterov = false;
  double grad_clip = 1.0;          // global-norm clipping (0: off)
  OptExConfig optex;
};

struct CheckpointConfig {
  int64_t every = 0;               // steps between checkpoints (0: only at the end)
  int64_t keep = 3;                // the last K are kept
  std::string dir;                 // default: <out_dir>/checkpoints
  std::string resume = "auto";     // auto (latest in dir, if any) | none | a checkpoint directory
};

struct ParallelConfig {
  int64_t dp = 1, tp = 1, pp = 1;
  int64_t optex_groups = 1;        // OptEx evaluation groups (each dp × tp × pp)
  std::vector<int64_t> layers_per_stage;  // pipeline split (empty: as even as possible)
  double bucket_mb = 25.0;         // data-parallel all-reduce bucket size
  std::string plan = "manual";     // manual | auto (the AMP planner)
  std::string cluster;             // cluster description for plan = "auto" ("": detected from MPI)
  int64_t global_batch = 0;        // plan = "auto": sequences per step over all dp ranks (0: batch_size · grad_accum)
  std::vector<std::string> profile;  // plan = "auto": measured layer times (kraken-plan --profile)
};

struct Config {
  std::string path;                // the file it came from
  std::string text;                // its full text (saved in checkpoints, compared across ranks)
  models::KrakenConfig model;
  DataConfig data;
  TrainConfig train;
  OptimConfig optim;
  CheckpointConfig checkpoint;
  ParallelConfig parallel;

  std::string checkpoint_dir() const;
  int64_t tokens_per_step() const;  // batch_size · seq_len · grad_accum · dp
};

// Reads and validates a config file. Relative data paths are taken relative to the current directory.
Config load_config(const std::string& path);
// The same from text (`name` is used in messages). `check_files` verifies that data patterns match.
Config parse_config(const std::string& text, const std::string& name, bool check_files = true);
// [train] precision resolved for a device: f32, or bf16 for mixed precision ("auto": bf16 on CUDA).
runtime::DType compute_dtype(const TrainConfig& train, const runtime::Device& device);

}  // namespace kraken::train
