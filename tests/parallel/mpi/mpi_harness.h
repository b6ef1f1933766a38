// A small harness for programs run under mpirun by ctest (tests/CMakeLists.txt, kraken_mpi_test).
//
// Every rank runs the same named cases in the same order. A failed expectation is printed by the rank
// that saw it ("rank R: FAIL <case>: …") and counted; an exception ends the job through run_guarded
// ("rank R: error: …"), so a rank never waits forever for a peer that stopped. finish() sums the
// failures of all ranks, and rank 0 prints "KRAKEN-MPI-OK ranks=N checks=C" only when there are none:
// that line is what ctest looks for, because a refused mpirun exits 0.
#pragma once

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "parallel/world.h"

namespace kraken::testing {

class MpiHarness {
 public:
  explicit MpiHarness(int expected_ranks = 0) : world_(parallel::World::get()) {
    if (expected_ranks > 0 && world_.size() != expected_ranks) {
      KRAKEN_THROW("this test needs ", expected_ranks, " ranks, it runs on ", world_.size());
    }
  }

  int rank() const { return world_.rank(); }
  int size() const { return world_.size(); }
  parallel::World& world() { return world_; }

  void run(const std::string& name, const std::function<void()>& body) {
    current_ = name;
    if (rank() == 0) std::printf("[case] %s\n", name.c_str());
    std::fflush(stdout);
    body();
  }

  bool expect(bool ok, const std::string& what) {
    checks_ += 1;
    if (!ok) {
      failures_ += 1;
      std::fprintf(stderr, "rank %d: FAIL %s: %s\n", rank(), current_.c_str(), what.c_str());
      std::fflush(stderr);
    }
    return ok;
  }

  // |got − want| ≤ atol + rtol·|want|
  bool expect_near(double got, double want, double rtol, double atol, const std::string& what) {
    const bool ok = std::fabs(got - want) <= atol + rtol * std::fabs(want);
    return expect(ok, what + ": got " + fmt(got) + ", want " + fmt(want));
  }

  // Element-wise; reports the worst element.
  bool expect_all_near(const std::vector<float>& got, const std::vector<float>& want, double rtol, double atol,
                       const std::string& what) {
    if (got.size() != want.size())
      return expect(false, what + ": " + std::to_string(got.size()) + " values, want " + std::to_string(want.size()));
    size_t worst = 0;
    double worst_excess = -1.0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double excess = std::fabs(double(got[i]) - want[i]) - (atol + rtol * std::fabs(double(want[i])));
      if (excess > worst_excess) {
        worst_excess = excess;
        worst = i;
      }
    }
    const bool ok = got.empty() || worst_excess <= 0.0;
    return expect(ok, what + ": worst at " + std::to_string(worst) + ": got " + fmt(got.empty() ? 0 : got[worst]) +
                          ", want " + fmt(want.empty() ? 0 : want[worst]));
  }

  // Collective: the verdict over all ranks. Returns main's exit code.
  int finish() {
    runtime::Tensor counts = runtime::Tensor::from_ints({failures_, checks_}, {2});
    world_.communicator().all_reduce(counts, parallel::ReduceOp::Sum);
    const std::vector<int32_t> total = counts.to_int_vector();
    if (rank() == 0) {
      if (total[0] == 0)
        std::printf("KRAKEN-MPI-OK ranks=%d checks=%d\n", size(), total[1]);
      else
        std::printf("KRAKEN-MPI-FAIL ranks=%d failures=%d checks=%d\n", size(), total[0], total[1]);
      std::fflush(stdout);
    }
    return total[0] == 0 ? 0 : 1;
  }

 private:
  static std::string fmt(double v) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.9g", v);
    return buf;
  }

  parallel::World& world_;
  std::string current_;
  int failures_ = 0;
  int checks_ = 0;
};

}  // namespace kraken::testing
