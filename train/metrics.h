// What a run tells its user: a progress bar on a terminal, and always one JSON line per step in
// <out_dir>/metrics.jsonl (tools/plot_metrics.py draws the curves from it).
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

namespace kraken::train {

// Appends JSON records to a file, one per line, flushed after each (a crash loses at most a line).
// Only the main rank writes; the others hold a disabled writer.
class MetricsWriter {
 public:
  MetricsWriter() = default;
  // append = true continues an existing file (resume) after dropping records with step > resume_step.
  MetricsWriter(const std::string& path, bool append, int64_t resume_step);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;
  MetricsWriter(MetricsWriter&& other) noexcept;
  MetricsWriter& operator=(MetricsWriter&& other) noexcept;

  void write(const nlohmann::json& record);
  bool enabled() const { return file_ != nullptr; }

 private:
  std::FILE* file_ = nullptr;
};

// One line redrawn in place on a TTY: step, loss, lr, tokens/s, ETA. Off a TTY it prints a plain line
// every `every` steps instead, so CI logs stay readable.
class Progress {
 public:
  Progress(int64_t first_step, int64_t total_steps, bool enabled, int64_t every);
  // mfu (a fraction) is shown when it is not negative.
  void update(int64_t step, double loss, double lr, double tokens_per_s, double mfu = -1.0);
  // Prints a whole line (an evaluation result, a checkpoint) without tearing the bar.
  void message(const std::string& text);
  void finish();

 private:
  int64_t first_step_, total_steps_, every_;
  bool enabled_, tty_, drawn_ = false;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace kraken::train
