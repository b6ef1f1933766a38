// OptEx across rank groups equals OptEx in one process, and kraken-train fails fast and cleanly.
//
// With [parallel] optex_groups = N the world splits into N evaluation groups; every rank walks the same
// proxy path, group s takes the true gradient at point s on micro-batches s·A … (s+1)·A − 1 of the
// iteration (what one process computes for evaluation s), the gradients are all-gathered, and every
// rank extends the same history. So the logged losses must equal the single-process run's: checked
// for N = 2 and 4 groups of one rank and N = 2 groups of dp = 2, tp = 2 and pp = 2, to 1e-5 relative
// (the only differences are summation orders: the data-parallel all-reduce, partial distances). Then: a groups run resumed from a
// checkpoint continues bit for bit; a layout that does not fit the job size is a clear error on every
// rank (exit 2, no hang); SIGINT stops a run after the step in flight with a checkpoint and exit 0.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "data/shard.h"
#include "runtime/rng.h"
#include "tests/support/temp_dir.h"
#include "tests/train/mpi/driver_util.h"

namespace {

using kraken::testing::TempDir;
using namespace kraken::testing::driver;

std::string config(const TempDir& dir, const std::string& name, int parallelism, int groups, int dp, int steps,
                   const std::string& optim = "optex", int tp = 1, int pp = 1) {
  const int batch = 4 / dp;
  std::string text =
      "[model]\nn_layer = 2\nn_embd = 32\nn_head = 4\ndegree = 2\ncontext = 16\nvocab_size = 97\n"
      "[data]\ntrain = \"" + dir / "train.bin" + "\"\nshuffle = true\n"
      "[train]\nbatch_size = " + std::to_string(batch) + "\nseq_len = 16\ngrad_accum = 2\nmax_steps = " +
      std::to_string(steps) + "\nout_dir = \"" + dir / ("runs/" + name) + "\"\n"
      "[optim]\nname = \"" + optim + "\"\nlr = 3e-3\nwarmup_steps = 2\ndecay_steps = 20\n";
  if (optim == "optex")
    text += "[optim.optex]\nparallelism = " + std::to_string(parallelism) + "\nhistory = 16\nlengthscale = 1.0\n";
  text += "[parallel]\ndp = " + std::to_string(dp) + "\ntp = " + std::to_string(tp) + "\npp = " + std::to_string(pp) +
          "\noptex_groups = " + std::to_string(groups) + "\n";
  const std::string path = dir / (name + ".toml");
  std::ofstream(path) << text;
  return path;
}

void expect_run(const std::string& what, const Run& r) {
  if (r.exit_code != 0) fail(what, r.output);
}

}  // namespace

int main() {
  TempDir dir("kraken_optex_groups");
  {
    std::vector<uint16_t> tokens(20000);
    kraken::runtime::Generator gen(13, 0);
    uint16_t t = 0;
    for (auto& tok : tokens) tok = t = static_cast<uint16_t>((t + 1 + gen.next_below(3)) % 97);
    kraken::data::write_llmc_shard(dir / "train.bin", tokens);
  }
  struct Case {
    const char* name;
    int parallelism, groups, dp, tp = 1, pp = 1;
  };
  // Groups that are themselves model parallel count every logical parameter once in the kernel
  // distances (replicas on one tp rank, the tied embedding at its owner) and sum the partials.
  for (const Case& c : {Case{"OptEx N=2 as 2 groups", 2, 2, 1}, Case{"OptEx N=4 as 4 groups", 4, 4, 1},
                        Case{"OptEx N=2 as 2 groups of dp=2", 2, 2, 2}, Case{"OptEx N=2 as 2 groups of tp=2", 2, 2, 1, 2, 1},
                        Case{"OptEx N=2 as 2 groups of pp=2", 2, 2, 1, 1, 2}}) {
    const std::string ref = "single_n" + std::to_string(c.parallelism);
    if (!std::filesystem::exists(dir / ("runs/" + ref + "/metrics.jsonl")))
      expect_run(c.name, run(launch(1, config(dir, ref, c.parallelism, 1, 1, 8))));
    const std::string name = "groups_n" + std::to_string(c.parallelism) + "_dp" + std::to_string(c.dp) + "_tp" +
                             std::to_string(c.tp) + "_pp" + std::to_string(c.pp);
    const Run r = run(launch(c.groups * c.dp * c.tp * c.pp,
                             config(dir, name, c.parallelism, c.groups, c.dp, 8, "optex", c.tp, c.pp)));
    if (r.exit_code != 0) {
      fail(c.name, r.output);
      continue;
    }
    compare(c.name, losses_of(dir / ("runs/" + ref + "/metrics.jsonl")),
            losses_of(dir / ("runs/" + name + "/metrics.jsonl")), 1, 8);
    g_checks += 1;
    if (losses_of(dir / ("runs/" + name + "/metrics.jsonl"), "grad_evals")[8] != 8.0 * c.parallelism)
      fail(std::string(c.name) + ": grad_evals", "expected N gradient evaluations per sequential iteration");
  }

  // Resume with groups: 4 iterations, a checkpoint, 4 more equals 8 straight.
  {
    const std::string path = config(dir, "resume_groups", 2, 2, 1, 8);
    expect_run("groups run, first half", run(launch(2, path, "--stop-after 4")));
    expect_run("groups run, resumed", run(launch(2, path)));
    compare("OptEx groups resume", losses_of(dir / "runs/groups_n2_dp1_tp1_pp1/metrics.jsonl"),
            losses_of(dir / "runs/resume_groups/metrics.jsonl"), 1, 8, 0.0);
  }

  // A layout that does not fit the job: every rank says so and the job ends with exit code 2.
  {
    g_checks += 1;
    const auto t0 = std::chrono::steady_clock::now();
    const Run r = run(launch(2, config(dir, "bad_layout", 2, 1, 4, 2, "adamw")));
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r.exit_code != 2 || r.output.find("but the job has 2") == std::string::npos || seconds > 30)
      fail("a layout that does not fit the job", "exit " + std::to_string(r.exit_code) + "\n" + r.output);
  }

  // SIGINT: the run finishes its step, writes a checkpoint and exits 0; running again resumes.
  {
    g_checks += 1;
    const std::string path = config(dir, "signal", 1, 1, 1, 100000, "adamw");
    const std::string metrics = dir / "runs/signal/metrics.jsonl";
    const pid_t child = fork();
    if (child == 0) {
      const std::string out = dir / "signal.log";
      freopen(out.c_str(), "w", stdout);
      execl(KRAKEN_TRAIN, KRAKEN_TRAIN, path.c_str(), "--quiet", static_cast<char*>(nullptr));
      _exit(127);
    }
    // Wait for a few logged steps, then interrupt.
    for (int i = 0; i < 600 && losses_of(metrics).size() < 3; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    kill(child, SIGINT);
    int status = 0;
    waitpid(child, &status, 0);
    std::ifstream log(dir / "signal.log");
    const std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
    const auto steps = losses_of(metrics);
    const int last = steps.empty() ? 0 : steps.rbegin()->first;
    char ckpt[64];
    std::snprintf(ckpt, sizeof ckpt, "/checkpoints/step_%08d", last);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || text.find("stopped by a signal") == std::string::npos ||
        !std::filesystem::exists(dir / "runs/signal" + std::string(ckpt) + "/state.json"))
      fail("SIGINT stops cleanly with a checkpoint", "status " + std::to_string(status) + "\n" + text);
    else
      std::printf("[case] SIGINT after %d steps: exit 0, checkpoint %s\n", last, ckpt);
  }
  return finish(4);
}
