// What the multi-rank test drivers share: run a command, read the losses a run logged, compare them.
// The drivers are plain programs that ctest runs; they launch kraken-train themselves, as one process
// and under mpirun, and print "KRAKEN-MPI-OK ranks=N checks=M" only when every check held (a refused
// mpirun exits 0, so the exit code alone proves nothing).
#pragma once

#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#ifndef KRAKEN_MPIEXEC
#error "KRAKEN_MPIEXEC (the mpirun program) must be defined"
#endif
#ifndef KRAKEN_TRAIN
#error "KRAKEN_TRAIN (the kraken-train program) must be defined"
#endif

namespace kraken::testing::driver {

inline int g_checks = 0, g_failures = 0;

struct Run {
  int exit_code = -1;
  std::string output;
};

inline Run run(const std::string& command) {
  Run r;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (!pipe) return r;
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) r.output.append(buffer, n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

inline void fail(const std::string& what, const std::string& detail = "") {
  g_failures += 1;
  std::printf("FAIL %s\n%s\n", what.c_str(), detail.c_str());
  std::fflush(stdout);
}

// step -> the "loss" field of metrics.jsonl.
inline std::map<int, double> losses_of(const std::string& metrics, const char* key = "loss") {
  std::map<int, double> out;
  std::ifstream in(metrics);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.contains(key) && j[key].is_number()) out[j["step"].get<int>()] = j[key].get<double>();
  }
  return out;
}

// kraken-train on `ranks` processes (1: no mpirun), with a timeout so a hang fails instead of blocking.
inline std::string launch(int ranks, const std::string& config_path, const std::string& extra = "") {
  const std::string train = std::string(KRAKEN_TRAIN) + " " + config_path + " --quiet " + extra;
  if (ranks == 1) return "timeout 300 " + train;
  return "timeout 300 " + std::string(KRAKEN_MPIEXEC) + " -n " + std::to_string(ranks) +
         " --oversubscribe --allow-run-as-root " + train;
}

// Every step in [first, last] logged by both, within `tolerance` relative.
inline void compare(const std::string& what, const std::map<int, double>& want, const std::map<int, double>& got,
                    int first, int last, double tolerance = 1e-5) {
  g_checks += 1;
  double worst = 0.0;
  int worst_step = -1;
  for (int step = first; step <= last; ++step) {
    if (!want.count(step) || !got.count(step)) {
      fail(what, "no loss logged at step " + std::to_string(step));
      return;
    }
    const double rel = std::fabs(got.at(step) - want.at(step)) / std::fabs(want.at(step));
    if (rel > worst) worst = rel, worst_step = step;
  }
  std::printf("[case] %-44s worst relative difference %.2e (step %d)\n", what.c_str(), worst, worst_step);
  std::fflush(stdout);
  if (worst > tolerance) fail(what, "relative difference above the tolerance");
}

inline int finish(int ranks) {
  if (g_failures == 0) std::printf("KRAKEN-MPI-OK ranks=%d checks=%d\n", ranks, g_checks);
  else std::printf("KRAKEN-MPI-FAIL failures=%d checks=%d\n", g_failures, g_checks);
  return g_failures == 0 ? 0 : 1;
}

}  // namespace kraken::testing::driver
