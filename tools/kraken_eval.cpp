// kraken-eval CHECKPOINT — perplexity (exp of the mean token loss) over the validation shards.
#include <CLI/CLI.hpp>

#include <cstdio>

#include "train/inference.h"

using namespace kraken;

int main(int argc, char** argv) {
  CLI::App app{"kraken-eval: perplexity of a checkpoint on token shards"};
  std::string path, device = "cpu";
  std::vector<std::string> shards;
  int64_t batches = 0, batch_size = 0, seq_len = 0;
  app.add_option("checkpoint", path, "a checkpoint directory, or a run's checkpoint folder (its newest)")->required();
  app.add_option("--shards", shards, "glob pattern(s) of shards (default: the run's [data] val)");
  app.add_option("--batches", batches, "evaluate at most this many batches (default: all)");
  app.add_option("--batch-size", batch_size, "sequences per batch (default: the run's)");
  app.add_option("--seq-len", seq_len, "tokens per sequence (default: the run's)");
  app.add_option("--device", device, "cpu | cuda | cuda:N");
  CLI11_PARSE(app, argc, argv);
  try {
    const runtime::Device dev = runtime::parse_device(device);
    train::LoadedModel loaded = train::load_model(path, dev);
    if (shards.empty()) shards = loaded.config.data.val;
    if (shards.empty()) KRAKEN_THROW("the checkpoint's config has no [data] val shards; pass --shards");
    const int64_t B = batch_size > 0 ? batch_size : loaded.config.train.batch_size;
    const int64_t T = seq_len > 0 ? seq_len : loaded.config.train.seq_len;
    const train::PerplexityResult r = train::evaluate_perplexity(*loaded.model, shards, B, T, batches);
    std::printf("checkpoint step %lld (%s): val loss %.4f, perplexity %.3f over %lld tokens (%.1f s, %.0f tokens/s)\n",
                (long long)loaded.step, loaded.model->compute_dtype() == runtime::DType::BF16 ? "bf16" : "fp32",
                r.mean_loss, r.perplexity, (long long)r.tokens, r.seconds,
                r.seconds > 0 ? r.tokens / r.seconds : 0.0);
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "kraken-eval: error: %s\n", e.what());
    return 2;
  }
}
