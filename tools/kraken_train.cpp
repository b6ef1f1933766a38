// kraken-train config.toml — trains a Kraken model as the config says (README.md, configs/README.md).
#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdio>

#include "parallel/failure.h"
#include "parallel/world.h"
#include "train/config.h"
#include "train/trainer.h"

using namespace kraken;

int main(int argc, char** argv) {
  CLI::App app{"kraken-train: train a Kraken transformer from a TOML config"};
  std::string config_path, resume;
  int64_t steps = -1, stop_after = -1;
  int threads = 0;
  bool quiet = false;
  app.add_option("config", config_path, "training config (TOML)")->required();
  app.add_option("--steps", steps, "override train.max_steps");
  app.add_option("--stop-after", stop_after, "end this run after N steps, with a checkpoint (resume later)");
  app.add_option("--resume", resume, "override checkpoint.resume: auto | none | a checkpoint directory");
  app.add_option("--threads", threads, "override train.threads");
  app.add_flag("--quiet", quiet, "no progress output");
  CLI11_PARSE(app, argc, argv);
  return parallel::run_guarded([&] {
    train::Config config = train::load_config(config_path);
    if (steps >= 0) config.train.max_steps = steps;
    if (!resume.empty()) config.checkpoint.resume = resume;
    if (threads > 0) config.train.threads = threads;
    train::TrainerOptions options;
    options.progress = !quiet;
    options.stop_after_steps = stop_after;
    train::Trainer trainer(config, options);
    const bool main_rank = parallel::World::get().rank() == 0;
    if (main_rank && !quiet) {
      std::printf("kraken-train: %s\n%s", config_path.c_str(), trainer.describe().c_str());
      std::fflush(stdout);
    }
    const train::RunSummary summary = trainer.run();
    if (main_rank) {
      std::printf("done: step %lld/%lld", (long long)summary.steps_done, (long long)config.train.max_steps);
      if (!summary.losses.empty()) std::printf(", last train loss %.4f", summary.losses.back());
      if (summary.val_loss >= 0) std::printf(", val loss %.4f (perplexity %.2f)", summary.val_loss, std::exp(summary.val_loss));
      std::printf(", %.0f tokens/s\n", summary.tokens_per_second);
      if (!summary.last_checkpoint.empty()) std::printf("checkpoint: %s\n", summary.last_checkpoint.c_str());
      if (summary.interrupted) std::printf("stopped by a signal; resume with the same command\n");
    }
    return 0;
  });
}
