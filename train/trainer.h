// Trainer: the training loop of kraken-train, as a story —
//   build the model, optimizer and data from the config (or resume them from the latest checkpoint);
//   for each step: for each micro-batch, forward + backward (gradients accumulate); clip the global
//   gradient norm; one optimizer step at the scheduled learning rate; log; evaluate and checkpoint
//   every N steps; stop cleanly on SIGINT/SIGTERM after the step in flight, with a checkpoint.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "train/config.h"

namespace kraken::models {
class KrakenModel;
}
namespace kraken::optim {
class Optimizer;
}

namespace kraken::train {

struct TrainerOptions {
  bool progress = true;             // progress bar (TTY) or progress lines on stdout
  int64_t stop_after_steps = -1;    // end this run after that many steps, with a checkpoint (tests, time boxes)
  bool handle_signals = true;       // SIGINT/SIGTERM: finish the step, checkpoint, return
};

struct RunSummary {
  int64_t first_step = 0;           // the step this run started from (0, or the resumed checkpoint's)
  int64_t steps_done = 0;           // completed steps at the end of the run
  std::vector<double> losses;       // the training loss of every step this run took
  double val_loss = -1.0;           // the last evaluation's mean loss (-1: none)
  bool interrupted = false;         // stopped by a signal
  std::string last_checkpoint;      // "" when none was written
  double tokens_per_second = 0.0;   // over this run's steps
};

class Trainer {
 public:
  explicit Trainer(Config config, TrainerOptions options = {});
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  RunSummary run();
  // Mean token loss over `max_batches` validation batches (0: the whole validation set).
  double evaluate(int64_t max_batches);

  int64_t step() const;  // completed optimizer steps
  const Config& config() const;
  // What the run is: model, parameter count, layout, batch, optimizer (OptEx: its memory), resume point.
  std::string describe() const;

 private:
  struct State;
  std::unique_ptr<State> s_;
};

// Mixed precision: hands the model's bf16 weight buffers (KrakenModel::compute_copy_targets) to the
// optimizer, which then rewrites them in each step (optim::Optimizer::set_compute_copies). True where it
// did — a bf16 model whose every buffer belongs to one of the optimizer's parameters —, after which
// whoever steps it may mark the copies current after each step (set_compute_copies_current); false,
// nothing handed over, otherwise (f32, or a buffer the optimizer would leave stale).
bool share_compute_copies(models::KrakenModel& model, optim::Optimizer& optimizer);

// Process-wide stop request, set by the SIGINT/SIGTERM handler the trainer installs.
bool stop_requested();
void request_stop();

}  // namespace kraken::train
