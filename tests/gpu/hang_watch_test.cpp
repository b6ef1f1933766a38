// testing::HangWatch (gpu_test_util.h), on the CPU: a scope that overruns its watch ends the process with
// exit status 124 and a [gpu-hang] line naming it; a scope that ends in time leaves the process alone.
// No GPU needed: what it watches is any blocking call, a hung kernel's synchronisation among them.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "tests/gpu/gpu_test_util.h"

namespace kraken::testing {
namespace {

TEST(GpuTestHangWatch, EndsAProcessThatOverrunsItsScope) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");  // (the watch is a thread: re-execute, do not just fork)
  EXPECT_EXIT(
      {
        HangWatch watch("the scope under test", 0.2);
        std::this_thread::sleep_for(std::chrono::seconds(30));
      },
      ::testing::ExitedWithCode(124), "\\[gpu-hang\\] the scope under test did not finish in 0.2 s");
}

TEST(GpuTestHangWatch, LeavesAScopeThatEndsInTimeAlone) {
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 3; ++i) {
    HangWatch watch("a short scope", 0.3);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  // The watches' threads end with their scopes, not at their limits (three waits to the limit: 900 ms; the
  // margin is for a loaded machine's sleeps) ...
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(700));
  // ... and stay quiet past them: a watch that fired anyway would end this process (status 124) here.
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
}

}  // namespace
}  // namespace kraken::testing
