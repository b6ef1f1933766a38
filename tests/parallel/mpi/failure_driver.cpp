// Runs failure_helper under mpirun in each mode and checks that the job ends quickly (no hang: a
// timeout kills it after 60 s, and it must take far less), with the failing rank's message and the
// exit code run_guarded chose (2 for kraken::Error, 1 otherwise). Not itself an MPI program: ctest
// runs it directly, and it prints "KRAKEN-MPI-OK ranks=2 …" when every mode behaved.
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <string>

#ifndef KRAKEN_MPIEXEC
#error "KRAKEN_MPIEXEC (the mpirun program) must be defined"
#endif
#ifndef KRAKEN_FAILURE_HELPER
#error "KRAKEN_FAILURE_HELPER (the helper program) must be defined"
#endif

namespace {

struct Run {
  int exit_code = -1;
  std::string output;
  double seconds = 0.0;
};

Run run_job(const std::string& mode) {
  const std::string command = std::string("timeout 60 ") + KRAKEN_MPIEXEC +
                              " -n 2 --oversubscribe --allow-run-as-root " + KRAKEN_FAILURE_HELPER + " " + mode +
                              " 2>&1";
  Run run;
  const auto begin = std::chrono::steady_clock::now();
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return run;
  char buffer[4096];
  size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) run.output.append(buffer, n);
  const int status = pclose(pipe);
  run.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return run;
}

int g_checks = 0, g_failures = 0;

void expect(bool ok, const std::string& mode, const std::string& what, const Run& run) {
  g_checks += 1;
  if (ok) return;
  g_failures += 1;
  std::printf("FAIL %s: %s (exit %d after %.1f s)\n--- output ---\n%s--------------\n", mode.c_str(), what.c_str(),
              run.exit_code, run.seconds, run.output.c_str());
}

void check_mode(const std::string& mode, int want_code, const std::string& want_message) {
  std::printf("[case] %s\n", mode.c_str());
  std::fflush(stdout);
  const Run run = run_job(mode);
  expect(run.exit_code != 124, mode, "the job hung until the timeout killed it", run);
  expect(run.exit_code == want_code, mode, "exit code " + std::to_string(want_code) + " expected", run);
  expect(run.output.find(want_message) != std::string::npos, mode, "missing message: " + want_message, run);
  // A launch takes ~0.5 s here; 20 s leaves room for a loaded machine and still catches a hang.
  expect(run.seconds < 20.0, mode, "took too long to fail", run);
}

}  // namespace

int main() {
  check_mode("error", 2, "rank 1: error: deliberate failure on rank 1");
  check_mode("exception", 1, "rank 1: error: deliberate std::runtime_error on rank 1");
  check_mode("in-flight", 2, "rank 1: error: deliberate failure on rank 1 with an all-reduce in flight");
  check_mode("config", 2, "error: config differs between ranks: rank 1 differs from rank 0");
  if (g_failures == 0)
    std::printf("KRAKEN-MPI-OK ranks=2 checks=%d\n", g_checks);
  else
    std::printf("KRAKEN-MPI-FAIL failures=%d checks=%d\n", g_failures, g_checks);
  return g_failures == 0 ? 0 : 1;
}
