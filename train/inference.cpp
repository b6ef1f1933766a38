#include "train/inference.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include <nlohmann/json.hpp>

#include "data/loader.h"
#include "data/shard.h"
#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "runtime/safetensors.h"
#include "train/checkpoint.h"

namespace kraken::train {

using runtime::Tensor;

LoadedModel load_model(const std::string& path, const runtime::Device& device) {
  std::string dir = path;
  // A run's checkpoint directory (or a run's out_dir) holds step_N subdirectories: take the newest.
  if (const std::string latest = CheckpointStore(path, 1).latest(); !latest.empty()) dir = latest;
  else if (const std::string nested = CheckpointStore(path + "/checkpoints", 1).latest(); !nested.empty()) dir = nested;
  LoadedCheckpoint ckpt = open_checkpoint(dir);
  if (!ckpt.state.contains("config") || !ckpt.state["config"].is_string())
    KRAKEN_THROW("checkpoint '", dir, "' has no saved config in state.json");
  LoadedModel out;
  out.config = parse_config(ckpt.state["config"].get<std::string>(), dir + "/state.json[config]", false);
  out.step = ckpt.step();
  out.model = std::make_unique<models::KrakenModel>(out.config.model, device);
  // The precision the run trained with ([train] precision; "auto" resolves for this device), so that
  // kraken-eval reproduces the run's validation loss.
  out.model->set_compute_dtype(compute_dtype(out.config.train, device));
  NamedTensors targets;
  for (const auto& p : out.model->named_parameters()) targets.emplace_back(p.name, p.tensor);
  load_tensors(ckpt.model, targets);
  return out;
}

PerplexityResult evaluate_perplexity(models::KrakenModel& model, const std::vector<std::string>& patterns,
                                     int64_t batch_size, int64_t seq_len, int64_t max_batches) {
  const auto t0 = std::chrono::steady_clock::now();
  data::LoaderOptions options;
  options.batch_size = batch_size;
  options.seq_len = seq_len;
  options.shuffle = false;
  data::DataLoader loader(data::expand_patterns(patterns), options);
  const int64_t batches =
      max_batches > 0 ? std::min(max_batches, loader.batches_per_epoch()) : loader.batches_per_epoch();
  runtime::NoGrad no_grad;
  double sum = 0.0;
  int64_t count = 0;
  for (int64_t b = 0; b < batches; ++b) {
    data::Batch batch = loader.next();
    Tensor logits = model.forward(batch.inputs, nullptr, false);
    auto part = runtime::ops::cross_entropy_sum(logits, batch.targets, model.config().vocab_size, -1);
    sum += part.sum;
    count += part.count;
  }
  PerplexityResult r;
  r.tokens = count;
  r.mean_loss = count > 0 ? sum / static_cast<double>(count) : 0.0;
  r.perplexity = std::exp(r.mean_loss);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

std::vector<int32_t> generate(models::KrakenModel& model, const std::vector<int32_t>& prompt,
                              const SampleOptions& options, runtime::Generator& rng) {
  if (prompt.empty()) KRAKEN_THROW("generate: the prompt is empty (give at least one token)");
  const int64_t V = model.config().vocab_size, context = model.config().context;
  for (int32_t id : prompt)
    if (id < 0 || id >= V) KRAKEN_THROW("generate: prompt token ", id, " is outside the vocabulary of ", V);
  runtime::NoGrad no_grad;
  std::vector<int32_t> tokens = prompt;
  std::vector<int32_t> out;
  std::vector<float> probs(static_cast<size_t>(V));
  std::vector<int32_t> order(static_cast<size_t>(V));
  for (int64_t n = 0; n < options.max_new_tokens; ++n) {
    // Without a key/value cache every token re-runs the window: fine for demos and short samples.
    const int64_t start = std::max<int64_t>(0, static_cast<int64_t>(tokens.size()) - context);
    std::vector<int32_t> window(tokens.begin() + start, tokens.end());
    // (ids from the host: the embedding checks them there and uploads them; runtime/ops.h)
    Tensor logits = model.forward(Tensor::from_ints(window, {1, static_cast<int64_t>(window.size())}), nullptr, false);
    const std::vector<float> all = logits.to_vector();
    const float* last = all.data() + (static_cast<int64_t>(window.size()) - 1) * logits.size(-1);
    int32_t next;
    if (options.temperature <= 0.0f) {
      next = static_cast<int32_t>(std::max_element(last, last + V) - last);
    } else {
      std::iota(order.begin(), order.end(), 0);
      int64_t keep = V;
      if (options.top_k > 0 && options.top_k < V) {
        keep = options.top_k;
        std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                          [&](int32_t a, int32_t b) { return last[a] > last[b] || (last[a] == last[b] && a < b); });
      }
      float maxv = -INFINITY;
      for (int64_t i = 0; i < keep; ++i) maxv = std::max(maxv, last[order[i]]);
      double total = 0.0;
      for (int64_t i = 0; i < keep; ++i) {
        probs[static_cast<size_t>(i)] = std::exp((last[order[i]] - maxv) / options.temperature);
        total += probs[static_cast<size_t>(i)];
      }
      double u = rng.next_double() * total;
      next = order[static_cast<size_t>(keep - 1)];
      for (int64_t i = 0; i < keep; ++i) {
        u -= probs[static_cast<size_t>(i)];
        if (u < 0) {
          next = order[static_cast<size_t>(i)];
          break;
        }
      }
    }
    tokens.push_back(next);
    out.push_back(next);
    if (next == options.stop_token) break;
  }
  return out;
}

namespace {

// (rows, cols) → (cols, rows): Hugging Face's GPT-2 keeps its Conv1D weights as (in, out).
Tensor transposed(const Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  Tensor src = t.to(runtime::Device::cpu());
  Tensor out = Tensor::empty({cols, rows});
  const float* s = src.data<float>();
  float* d = out.data<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) d[c * rows + r] = s[r * cols + c];
  return out;
}

}  // namespace

std::vector<std::string> export_model(const LoadedModel& loaded, const std::string& out_dir, bool hf_layout) {
  const models::KrakenConfig& m = loaded.config.model;
  if (hf_layout && m.degree != 1)
    KRAKEN_THROW("the Hugging Face GPT-2 layout needs a degree-1 model; this one has degree ", m.degree);
  if (hf_layout && !m.bias) KRAKEN_THROW("the Hugging Face GPT-2 layout needs biases (model.bias = true)");
  make_directories(out_dir);
  std::vector<std::pair<std::string, Tensor>> tensors;
  nlohmann::json config;
  for (const auto& p : loaded.model->named_parameters()) {
    Tensor t = p.tensor.to(runtime::Device::cpu());
    std::string name = p.name;
    if (hf_layout) {
      // GPT-2 on the Hub: unpadded vocabulary, transformer.* prefix, Conv1D (in, out) weights.
      if (name == "wte.weight") t = t.slice(0, m.vocab_size);
      const bool conv1d = name.find("attn.c_attn.weight") != std::string::npos ||
                          name.find("attn.c_proj.weight") != std::string::npos ||
                          name.find("mlp.c_fc.weight") != std::string::npos ||
                          name.find("mlp.c_proj.weight") != std::string::npos;
      if (conv1d) t = transposed(t);
      name = "transformer." + name;
    } else {
      // The Kraken authors' names (research/kraken.md "Interchange"): transformer.h.{split}.{layer}.…
      if (name.rfind("h.", 0) == 0 && m.degree > 1) {
        const size_t a = name.find('.', 2), b = name.find('.', a + 1);
        const std::string layer = name.substr(2, a - 2), split = name.substr(a + 1, b - a - 1);
        name = "h." + split + "." + layer + name.substr(b);
      }
      name = "transformer." + name;
    }
    tensors.emplace_back(name, t);
  }
  if (hf_layout) {
    config = {{"model_type", "gpt2"},
              {"architectures", {"GPT2LMHeadModel"}},
              {"vocab_size", m.vocab_size},
              {"n_positions", m.context},
              {"n_ctx", m.context},
              {"n_embd", m.n_embd},
              {"n_layer", m.n_layer},
              {"n_head", m.n_head},
              {"n_inner", m.mlp_expansion * m.n_embd},
              {"activation_function", "gelu_new"},
              {"layer_norm_epsilon", 1e-5},
              {"resid_pdrop", 0.0},
              {"embd_pdrop", 0.0},
              {"attn_pdrop", 0.0},
              {"initializer_range", 0.02},
              {"scale_attn_weights", true},
              {"tie_word_embeddings", true},
              {"bos_token_id", 50256},
              {"eos_token_id", 50256},
              {"torch_dtype", "float32"}};
  } else {
    config = {{"model_type", "kraken"},
              {"n_layer", m.n_layer},
              {"n_head", m.n_head},
              {"n_heads_in_split", m.heads_per_sublayer()},
              {"n_embd", m.n_embd},
              {"degree", m.degree},
              {"ffn_expansion", m.mlp_expansion},
              {"bias", m.bias},
              {"vocab_size", m.padded_vocab()},
              {"real_vocab_size", m.vocab_size},
              {"block_size", m.context},
              {"dropout", 0.0},
              {"tied_lm_head", "lm_head.weight = transformer.wte.weight"}};
  }
  config["kraken_step"] = loaded.step;
  const std::string model_path = out_dir + "/model.safetensors", config_path = out_dir + "/config.json";
  runtime::save_safetensors(model_path, tensors, {{"format", "pt"}});
  write_file_atomically(config_path, config.dump(2) + "\n");
  return {model_path, config_path};
}

}  // namespace kraken::train
