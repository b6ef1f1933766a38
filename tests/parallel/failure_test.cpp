// run_guarded and the config check on a world of one. Under mpirun: tests/parallel/mpi/failure_*.cpp.
#include <gtest/gtest.h>

#include <stdexcept>

#include "kernels/error.h"
#include "parallel/failure.h"

namespace kraken::parallel {
namespace {

TEST(RunGuarded, ReturnsMainsResultWhenNothingThrows) {
  EXPECT_EQ(run_guarded([] { return 0; }), 0);
  EXPECT_EQ(run_guarded([] { return 7; }), 7);
}

TEST(RunGuarded, KrakenErrorPrintsRankAndMessageAndReturnsTwo) {
  ::testing::internal::CaptureStderr();
  const int code = run_guarded([]() -> int { KRAKEN_THROW("config key 'model.n_layer' must be positive"); });
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(code, 2);
  EXPECT_EQ(err, "rank 0: error: config key 'model.n_layer' must be positive\n");
}

TEST(RunGuarded, OtherExceptionsReturnOne) {
  ::testing::internal::CaptureStderr();
  const int code = run_guarded([]() -> int { throw std::runtime_error("disk full"); });
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(code, 1);
  EXPECT_EQ(err, "rank 0: error: disk full\n");
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(run_guarded([]() -> int { throw 42; }), 1);
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "rank 0: error: unknown exception\n");
}

TEST(ConfigCheck, TextHashIsFnv1a64) {
  EXPECT_EQ(text_hash(""), 0xcbf29ce484222325ull);  // the FNV-1a offset basis
  EXPECT_EQ(text_hash("a"), 0xaf63dc4c8601ec8cull);
  EXPECT_NE(text_hash("lr = 1e-3"), text_hash("lr = 1e-4"));
}

TEST(ConfigCheck, WorldOfOneAlwaysAgreesWithItself) {
  EXPECT_NO_THROW(check_same_on_all_ranks("config", "[model]\nn_layer = 2\n"));
}

}  // namespace
}  // namespace kraken::parallel
