// Using a trained model: load it from a checkpoint, evaluate perplexity, generate text, export it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "models/kraken.h"
#include "runtime/rng.h"
#include "train/config.h"

namespace kraken::train {

struct LoadedModel {
  Config config;  // the config the checkpoint was trained with
  int64_t step = 0;
  std::unique_ptr<models::KrakenModel> model;
};
// Opens a checkpoint directory (or a run's checkpoint dir: the newest checkpoint in it) and loads the
// model it holds onto `device`, computing in the precision the run trained with ([train] precision).
LoadedModel load_model(const std::string& path, const runtime::Device& device = runtime::Device::cpu());

struct PerplexityResult {
  double mean_loss = 0.0;
  double perplexity = 0.0;
  int64_t tokens = 0;
  double seconds = 0.0;
};
// Mean token loss over the shards matched by `patterns`, in (batch_size, seq_len) windows, on the model's
// device (the ids go from the host: runtime/ops.h's embedding); max_batches 0 means all of them.
PerplexityResult evaluate_perplexity(models::KrakenModel& model, const std::vector<std::string>& patterns,
                                     int64_t batch_size, int64_t seq_len, int64_t max_batches);

struct SampleOptions {
  int64_t max_new_tokens = 64;
  float temperature = 1.0f;  // 0: greedy
  int64_t top_k = 0;         // 0: the whole vocabulary
  int32_t stop_token = -1;   // stop after emitting it (e.g. <|endoftext|>); -1: never
};
// Continues `prompt` token by token; the context is the last model.context tokens.
std::vector<int32_t> generate(models::KrakenModel& model, const std::vector<int32_t>& prompt,
                              const SampleOptions& options, runtime::Generator& rng);

// Writes <out_dir>/model.safetensors and config.json with Kraken's own names (the padded vocabulary
// rows removed). For degree 1 the layout is Hugging Face's GPT-2 instead (transformer.* names, Conv1D
// weights stored (in, out)), so GPT2LMHeadModel.from_pretrained(out_dir) loads it. Returns the files.
std::vector<std::string> export_model(const LoadedModel& loaded, const std::string& out_dir, bool hf_layout);

}  // namespace kraken::train
