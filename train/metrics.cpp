#include "train/metrics.h"

#include <unistd.h>

#include <fstream>
#include <sstream>
#include <vector>

#include "kernels/error.h"

namespace kraken::train {

MetricsWriter::MetricsWriter(const std::string& path, bool append, int64_t resume_step) {
  if (append) {
    // Keep the records up to the checkpoint we resume from; later ones belong to the abandoned tail.
    std::vector<std::string> kept;
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      auto record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (record.is_discarded()) continue;  // a torn last line from a crash
      if (record.contains("step") && record["step"].get<int64_t>() > resume_step) continue;
      kept.push_back(line);
    }
    file_ = std::fopen(path.c_str(), "w");
    if (!file_) KRAKEN_THROW("cannot write metrics file '", path, "'");
    for (const std::string& k : kept) std::fprintf(file_, "%s\n", k.c_str());
  } else {
    file_ = std::fopen(path.c_str(), "w");
    if (!file_) KRAKEN_THROW("cannot write metrics file '", path, "'");
  }
  std::fflush(file_);
}

MetricsWriter::~MetricsWriter() {
  if (file_) std::fclose(file_);
}

MetricsWriter::MetricsWriter(MetricsWriter&& other) noexcept : file_(other.file_) { other.file_ = nullptr; }

MetricsWriter& MetricsWriter::operator=(MetricsWriter&& other) noexcept {
  if (this != &other) {
    if (file_) std::fclose(file_);
    file_ = other.file_;
    other.file_ = nullptr;
  }
  return *this;
}

void MetricsWriter::write(const nlohmann::json& record) {
  if (!file_) return;
  const std::string line = record.dump();
  std::fprintf(file_, "%s\n", line.c_str());
  std::fflush(file_);
}

Progress::Progress(int64_t first_step, int64_t total_steps, bool enabled, int64_t every)
    : first_step_(first_step),
      total_steps_(total_steps),
      every_(every < 1 ? 1 : every),
      enabled_(enabled),
      tty_(enabled && isatty(STDOUT_FILENO)),
      start_(std::chrono::steady_clock::now()) {}

namespace {
std::string format_duration(double seconds) {
  if (!(seconds >= 0) || seconds > 1e7) return "--:--";
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", (long long)(s / 3600), (long long)(s / 60 % 60), (long long)(s % 60));
  else std::snprintf(buf, sizeof buf, "%02lld:%02lld", (long long)(s / 60), (long long)(s % 60));
  return buf;
}
}  // namespace

void Progress::update(int64_t step, double loss, double lr, double tokens_per_s, double mfu) {
  if (!enabled_) return;
  char mfu_text[24] = "";
  if (mfu >= 0.0) std::snprintf(mfu_text, sizeof mfu_text, "  MFU %.1f%%", 100.0 * mfu);
  const int64_t done = step + 1;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const int64_t run = done - first_step_;
  const double eta = run > 0 ? elapsed / static_cast<double>(run) * static_cast<double>(total_steps_ - done) : -1.0;
  char line[256];
  if (tty_) {
    constexpr int kWidth = 24;
    const double frac = total_steps_ > 0 ? static_cast<double>(done) / static_cast<double>(total_steps_) : 1.0;
    const int filled = static_cast<int>(frac * kWidth);
    std::string bar(static_cast<size_t>(filled), '#');
    bar.resize(kWidth, '.');
    std::snprintf(line, sizeof line, "\r[%s] step %lld/%lld  loss %.4f  lr %.2e  %.0f tok/s%s  ETA %s   ", bar.c_str(),
                  (long long)done, (long long)total_steps_, loss, lr, tokens_per_s, mfu_text,
                  format_duration(eta).c_str());
    std::fputs(line, stdout);
    std::fflush(stdout);
    drawn_ = true;
  } else if (done % every_ == 0 || done == total_steps_) {
    std::snprintf(line, sizeof line, "step %lld/%lld  loss %.4f  lr %.2e  %.0f tok/s%s  ETA %s\n", (long long)done,
                  (long long)total_steps_, loss, lr, tokens_per_s, mfu_text, format_duration(eta).c_str());
    std::fputs(line, stdout);
    std::fflush(stdout);
  }
}

void Progress::message(const std::string& text) {
  if (!enabled_) return;
  if (tty_ && drawn_) std::fputs("\r\033[2K", stdout);
  std::fputs((text + "\n").c_str(), stdout);
  std::fflush(stdout);
}

void Progress::finish() {
  if (enabled_ && tty_ && drawn_) std::fputs("\n", stdout);
  drawn_ = false;
  std::fflush(stdout);
}

}  // namespace kraken::train
