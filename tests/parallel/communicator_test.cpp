// The world of one (no mpirun, or a build without MPI): every collective is an identity, and the
// argument checks are the same as on many ranks. Multi-rank behaviour: tests/parallel/mpi/.
#include <gtest/gtest.h>

#include "kernels/error.h"
#include "parallel/communicator.h"
#include "parallel/world.h"

namespace kraken::parallel {
namespace {

using runtime::DType;

TEST(WorldOfOne, ProcessStartedWithoutLauncherIsRankZeroOfOne) {
  ASSERT_FALSE(launched_by_mpi_launcher()) << "this suite runs without mpirun";
  World& world = World::get();
  EXPECT_EQ(world.rank(), 0);
  EXPECT_EQ(world.size(), 1);
  EXPECT_FALSE(world.mpi_initialized());
  EXPECT_EQ(world.local_rank(), 0);
  EXPECT_EQ(world.local_size(), 1);
  EXPECT_EQ(world.communicator().size(), 1);
  EXPECT_EQ(world.communicator().world_ranks(), (std::vector<int>{0}));
}

TEST(WorldOfOne, CollectivesAreIdentities) {
  Communicator& comm = World::get().communicator();
  Tensor t = Tensor::from_vector({1.5f, -2.0f, 3.0f}, {3});
  for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Average, ReduceOp::Max, ReduceOp::Min}) {
    comm.all_reduce(t, op);
    EXPECT_EQ(t.to_vector(), (std::vector<float>{1.5f, -2.0f, 3.0f})) << reduce_op_name(op);
  }
  Handle h = comm.all_reduce_async(t, ReduceOp::Sum);
  EXPECT_TRUE(h.done());
  h.wait();
  Tensor rows = Tensor::from_vector({1, 2, 3, 4}, {2, 2});
  Tensor gathered = comm.all_gather(rows);
  EXPECT_EQ(gathered.shape(), (runtime::Shape{2, 2}));
  EXPECT_EQ(gathered.to_vector(), rows.to_vector());
  EXPECT_FALSE(gathered.shares_storage(rows)) << "all_gather returns a new tensor";
  EXPECT_EQ(comm.reduce_scatter(rows, ReduceOp::Average).to_vector(), rows.to_vector());
  comm.broadcast(rows, 0);
  EXPECT_EQ(rows.to_vector(), (std::vector<float>{1, 2, 3, 4}));
  comm.barrier();
  Tensor ids = Tensor::from_ints({7, -3}, {2});
  comm.all_reduce(ids, ReduceOp::Max);
  EXPECT_EQ(ids.to_int_vector(), (std::vector<int32_t>{7, -3}));
}

TEST(WorldOfOne, InvalidArgumentsAreErrorsEvenWithOneRank) {
  Communicator& comm = World::get().communicator();
  Tensor f = Tensor::zeros({4});
  EXPECT_THROW(comm.broadcast(f, 1), Error);                                   // root outside the group
  EXPECT_THROW(comm.send(f, 0), Error);                                        // to itself
  EXPECT_THROW(comm.recv(f, 1), Error);                                        // no such peer
  EXPECT_THROW(comm.all_reduce(Tensor::from_ints({1}, {1}), ReduceOp::Average), Error);  // i32 average
  EXPECT_THROW(comm.reduce_scatter(Tensor::zeros({2}, DType::BF16), ReduceOp::Sum), Error);  // bf16 on the host
  EXPECT_THROW(comm.all_reduce(Tensor(), ReduceOp::Sum), Error);
  EXPECT_THROW(comm.all_gather(Tensor::full({}, 1.0f)), Error);                // a scalar has no dim 0
  EXPECT_THROW(comm.all_gather_async(Tensor::zeros({2, 3}), Tensor::zeros({3, 3})), Error);
  try {
    comm.all_reduce(Tensor::zeros({2}, DType::U16), ReduceOp::Sum);
    FAIL() << "u16 all-reduce accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("u16"), std::string::npos) << e.what();
  }
}

TEST(WorldOfOne, SingleCommunicatorStandsInForAGroup) {
  auto group = Communicator::single("tp");
  EXPECT_EQ(group->name(), "tp");
  EXPECT_EQ(group->rank(), 0);
  EXPECT_EQ(group->size(), 1);
  EXPECT_EQ(group->stats().ops, 0) << "identities never reach a communication thread";
}

TEST(ReduceOps, NamesAreStable) {
  EXPECT_STREQ(reduce_op_name(ReduceOp::Sum), "sum");
  EXPECT_STREQ(reduce_op_name(ReduceOp::Average), "average");
  EXPECT_STREQ(reduce_op_name(ReduceOp::Max), "max");
  EXPECT_STREQ(reduce_op_name(ReduceOp::Min), "min");
}

}  // namespace
}  // namespace kraken::parallel
