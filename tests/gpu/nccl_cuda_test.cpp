// NCCL on one GPU: Kraken's device collectives (parallel/nccl_comm.cpp) in a communicator of one rank.
//
// NCCL refuses two ranks on one GPU (since 2.5: "Duplicate GPU detected"), and the GPU machines lent to
// this project have one GPU and no MPI, so a world of one is all the NCCL they can run. It checks what
// the layouts over several GPUs (tests/parallel/mpi/nccl_mpi_test.cpp, train.mpi.layout_gpu) rest on
// but cannot show where they never ran: that the library loads and plans, the mapping of types and
// reductions, the out-of-place collectives and a point-to-point pair (to itself) moving the bytes, the
// ordering between the compute stream and the communication stream in both directions, and the
// statistics of operations let go with and without a wait. Not the transfers between GPUs.
// Communicator answers a one-rank group without NCCL (the identity), so these tests drive its NCCL
// half, detail::NcclComm, directly. Skips without a GPU or without NCCL in the build.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/communicator_impl.h"
#include "runtime/allocator.h"
#include "runtime/ops.h"
#include "tests/gpu/gpu_test_util.h"

namespace kraken::testing {
namespace {

using parallel::Handle;
using parallel::P2POp;
using parallel::ReduceOp;
using runtime::DType;
using runtime::Tensor;
namespace ops = runtime::ops;

#define KRAKEN_REQUIRE_NCCL()                                                                          \
  do {                                                                                                 \
    KRAKEN_REQUIRE_GPU();                                                                              \
    if (gpu_tests_on_cpu()) GTEST_SKIP() << "dry run: NCCL needs a GPU (no CPU stand-in)";            \
    if (!KRAKEN_NCCL_BUILT) GTEST_SKIP() << "this build has no NCCL (CMake found no libnccl/nccl.h)"; \
  } while (0)

#if KRAKEN_WITH_NCCL
#define KRAKEN_NCCL_BUILT 1
using parallel::detail::NcclComm;
using parallel::detail::StatsCounter;

// A communicator of one rank on GPU 0 (rank 0 makes the id; there is nobody to hand it to).
std::unique_ptr<NcclComm> world_of_one(std::shared_ptr<StatsCounter> stats = nullptr) {
  return std::make_unique<NcclComm>(0, 1, 0, [](void*, size_t) {}, std::move(stats));
}

std::vector<float> bits_of(const Tensor& t) { return t.to_vector(); }

TEST(GpuNccl, OneRanksCollectivesMoveEveryByte) {
  KRAKEN_REQUIRE_NCCL();
  auto comm = world_of_one();
  const Tensor source = random_tensor({37, 53}, 11);  // odd sizes: no multiple of any vector width
  const std::vector<float> want = bits_of(source);

  // In place: every reduction of one rank is its input, in each type the trainer sends.
  for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Average, ReduceOp::Max, ReduceOp::Min}) {
    Tensor t = source.to(test_device());
    comm->all_reduce(t, op).wait();
    EXPECT_EQ(bits_of(t), want) << "all_reduce, op " << static_cast<int>(op);
  }
  Tensor b = source.to(DType::BF16).to(test_device());
  comm->all_reduce(b, ReduceOp::Sum).wait();
  EXPECT_EQ(bits_of(b), bits_of(source.to(DType::BF16))) << "bf16 all_reduce";
  Tensor ids = random_ids({1000}, 50257, 3);
  Tensor ids_gpu = ids.to(test_device());
  comm->all_reduce(ids_gpu, ReduceOp::Max).wait();
  EXPECT_EQ(bits_of(ids_gpu), bits_of(ids)) << "i32 all_reduce";

  // Out of place: the output starts as something else, so only NCCL's copy makes it the input.
  const Tensor in = source.to(test_device());
  Tensor gathered = Tensor::full({37, 53}, -1.0f, test_device());
  comm->all_gather(in, gathered).wait();
  EXPECT_EQ(bits_of(gathered), want) << "all_gather";
  Tensor scattered = Tensor::full({37, 53}, -1.0f, test_device());
  comm->reduce_scatter(in, scattered, ReduceOp::Sum).wait();
  EXPECT_EQ(bits_of(scattered), want) << "reduce_scatter";
  Tensor broadcast = source.to(test_device());
  comm->broadcast(broadcast, 0).wait();
  EXPECT_EQ(bits_of(broadcast), want) << "broadcast";

  // A send to itself and the matching receive, in one group (as the pipeline's pairs are issued).
  Tensor received = Tensor::full({37, 53}, -1.0f, test_device());
  P2POp send, recv;
  send.kind = P2POp::Kind::Send;
  send.tensor = in;
  recv.kind = P2POp::Kind::Recv;
  recv.tensor = received;
  comm->send_recv({send, recv}).wait();
  EXPECT_EQ(bits_of(received), want) << "send_recv to itself";
}

// The compute stream's last write must land before NCCL reads, and NCCL's write before the compute
// stream's next read. The producer is a chain of adds over 128 MB (milliseconds of queued work when
// the collective is issued) and the consumer starts as soon as the host can launch it, so a missing
// event either way shows as wrong values, not as a rare flake.
TEST(GpuNccl, StreamsAreOrderedBothWays) {
  KRAKEN_REQUIRE_NCCL();
  auto comm = world_of_one();
  const int64_t n = 32 * 1024 * 1024;
  const Tensor x_cpu = random_tensor({n}, 5);
  Tensor x = x_cpu.to(test_device());
  Tensor y = x;
  for (int i = 0; i < 12; ++i) y = ops::add(y, x);  // the same IEEE adds on both sides: the same bits
  Tensor out = Tensor::full({n}, -1.0f, test_device());
  Handle h = comm->all_gather(y, out);
  h.wait();
  const Tensor z = ops::scale(out, 0.5f);
  const std::vector<float> got = z.to_vector();

  std::vector<float> ref = x_cpu.to_vector();
  const std::vector<float> xv = ref;
  for (int i = 0; i < 12; ++i)
    for (int64_t j = 0; j < n; ++j) ref[static_cast<size_t>(j)] += xv[static_cast<size_t>(j)];
  for (float& v : ref) v *= 0.5f;
  int64_t wrong = 0, first = -1;
  for (int64_t j = 0; j < n; ++j)
    if (got[static_cast<size_t>(j)] != ref[static_cast<size_t>(j)] && wrong++ == 0) first = j;
  EXPECT_EQ(wrong, 0) << wrong << " of " << n << " elements wrong; the first at " << first << ": "
                      << (first >= 0 ? got[static_cast<size_t>(first)] : 0.0f) << " for "
                      << (first >= 0 ? ref[static_cast<size_t>(first)] : 0.0f);
}

// Handles waited on and dropped (the trainer's way) are counted when their events are collected; a
// handle dropped without a wait synchronises and counts itself. Every operation once, its bytes once.
TEST(GpuNccl, EveryOperationIsCountedOnce) {
  KRAKEN_REQUIRE_NCCL();
  auto stats = std::make_shared<StatsCounter>();
  auto comm = world_of_one(stats);
  Tensor t = random_tensor({4096}, 9).to(test_device());
  const int waited = 300;
  for (int i = 0; i < waited; ++i) comm->all_reduce(t, ReduceOp::Sum).wait();
  { Handle dropped = comm->all_reduce(t, ReduceOp::Max); }
  comm->collect_finished();
  std::lock_guard<std::mutex> lock(stats->mu);
  EXPECT_EQ(stats->stats.ops, waited + 1);
  EXPECT_EQ(stats->stats.bytes, (waited + 1) * static_cast<int64_t>(t.nbytes()));
  EXPECT_GT(stats->stats.busy_seconds, 0.0);
}
#else
#define KRAKEN_NCCL_BUILT 0
TEST(GpuNccl, OneRanksCollectivesMoveEveryByte) { KRAKEN_REQUIRE_NCCL(); }
#endif

}  // namespace
}  // namespace kraken::testing
