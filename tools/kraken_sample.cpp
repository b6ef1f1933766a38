// kraken-sample CHECKPOINT --prompt TEXT — continues a prompt with a trained model.
#include <CLI/CLI.hpp>

#include <cstdio>

#include "data/tokenizer.h"
#include "train/inference.h"

using namespace kraken;

int main(int argc, char** argv) {
  CLI::App app{"kraken-sample: generate text from a checkpoint"};
  std::string path, prompt = "\n", vocab_dir = "demo/gpt2", device = "cpu";
  train::SampleOptions options;
  uint64_t seed = 1337;
  int64_t samples = 1;
  app.add_option("checkpoint", path, "a checkpoint directory, or a run's checkpoint folder (its newest)")->required();
  app.add_option("--prompt", prompt, "text to continue");
  app.add_option("--tokens", options.max_new_tokens, "new tokens per sample");
  app.add_option("--temperature", options.temperature, "softmax temperature (0: greedy)");
  app.add_option("--top-k", options.top_k, "sample among the k likeliest tokens (0: all)");
  app.add_option("--seed", seed, "random seed");
  app.add_option("--samples", samples, "how many samples");
  app.add_option("--vocab-dir", vocab_dir, "folder with encoder.json and vocab.bpe");
  app.add_option("--device", device, "cpu | cuda | cuda:N");
  CLI11_PARSE(app, argc, argv);
  try {
    const runtime::Device dev = runtime::parse_device(device);
    data::Tokenizer tokenizer = data::Tokenizer::load(vocab_dir);
    train::LoadedModel loaded = train::load_model(path, dev);
    options.stop_token = tokenizer.eot_id();
    const std::vector<int32_t> ids = tokenizer.encode(prompt);
    runtime::Generator rng(seed, 0);
    for (int64_t s = 0; s < samples; ++s) {
      const std::vector<int32_t> out = train::generate(*loaded.model, ids, options, rng);
      std::printf("--- sample %lld (step %lld) ---\n%s%s\n", (long long)s + 1, (long long)loaded.step, prompt.c_str(),
                  tokenizer.decode(out).c_str());
    }
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "kraken-sample: error: %s\n", e.what());
    return 2;
  }
}
