// Every collective and point-to-point operation, blocking and asynchronous, with rank-filled inputs
// and closed-form results; asynchronous progress; stats; the config check. Runs on 2 and 4 ranks.
#include <chrono>
#include <string>
#include <thread>

#include "kernels/error.h"
#include "parallel/communicator.h"
#include "parallel/failure.h"
#include "tests/parallel/mpi/mpi_harness.h"

using kraken::parallel::Communicator;
using kraken::parallel::Handle;
using kraken::parallel::P2POp;
using kraken::parallel::ReduceOp;
using kraken::runtime::DType;
using kraken::runtime::Tensor;
using kraken::testing::MpiHarness;

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
void sleep_s(double s) { std::this_thread::sleep_for(std::chrono::duration<double>(s)); }

Tensor filled(int64_t n, const std::function<float(int64_t)>& f) {
  Tensor t = Tensor::empty({n});
  for (int64_t i = 0; i < n; ++i) t.data<float>()[i] = f(i);
  return t;
}

std::vector<float> values(int64_t n, const std::function<float(int64_t)>& f) { return filled(n, f).to_vector(); }

void all_reduce_cases(MpiHarness& h, Communicator& comm) {
  const int n = comm.size(), r = comm.rank();
  const float tri = n * (n + 1) / 2.0f;  // Σ_r (r + 1)
  h.run("AllReduceOfRankFilledTensorsIsClosedForm", [&] {
    // Inputs (r+1)(i+1): small integers, so every result below is exact in f32.
    for (bool async : {false, true}) {
      for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Average, ReduceOp::Max, ReduceOp::Min}) {
        Tensor t = filled(10, [&](int64_t i) { return float((r + 1) * (i + 1)); });
        if (async) {
          Handle handle = comm.all_reduce_async(t, op);
          handle.wait();
          h.expect(handle.done(), "done() after wait()");
        } else {
          comm.all_reduce(t, op);
        }
        std::vector<float> want = values(10, [&](int64_t i) {
          switch (op) {
            case ReduceOp::Sum: return tri * (i + 1);
            case ReduceOp::Average: return tri * (i + 1) / n;
            case ReduceOp::Max: return float(n * (i + 1));
            case ReduceOp::Min: return float(i + 1);
          }
          return 0.0f;
        });
        h.expect_all_near(t.to_vector(), want, 0, 0,
                          std::string(reduce_op_name(op)) + (async ? " async" : " blocking"));
      }
    }
    Tensor ids = Tensor::from_ints({r, 10 * r - 5}, {2});
    comm.all_reduce(ids, ReduceOp::Sum);
    h.expect(ids.to_int_vector() == std::vector<int32_t>{n * (n - 1) / 2, 10 * n * (n - 1) / 2 - 5 * n}, "i32 sum");
    ids = Tensor::from_ints({r, -r}, {2});
    comm.all_reduce(ids, ReduceOp::Max);
    h.expect(ids.to_int_vector() == std::vector<int32_t>{n - 1, 0}, "i32 max");
    // bf16 on the host (mixed precision on CPU ranks): summed in f32, rounded once. Rank r adds
    // 1 + r·2⁻⁷ (exact in bf16); the sum generally is not, and must be the f32 sum rounded.
    Tensor b = filled(3, [&](int64_t i) { return i == 2 ? 1.0f + r / 128.0f : float((r + 1) * (i + 1)); }).to(DType::BF16);
    comm.all_reduce(b, ReduceOp::Sum);
    h.expect(b.dtype() == DType::BF16, "bf16 stays bf16");
    const float exact = n + (n * (n - 1) / 2) / 128.0f;
    const float rounded = Tensor::from_vector({exact}, {1}).to(DType::BF16).to_vector()[0];
    h.expect_all_near(b.to_vector(), {tri, 2 * tri, rounded}, 0, 0, "bf16 sum");
  });

  h.run("LargeAllReduceIsClosedForm", [&] {
    const int64_t count = 3 << 20;  // 12 MB: Open MPI's segmented algorithms, not the small-message path
    Tensor t = filled(count, [&](int64_t i) { return float(r + 1 + i % 7); });
    comm.all_reduce_async(t, ReduceOp::Sum).wait();
    h.expect_all_near(t.to_vector(), values(count, [&](int64_t i) { return tri + float(n * (i % 7)); }), 0, 0,
                      "12 MB sum");
  });
}

void gather_scatter_broadcast_cases(MpiHarness& h, Communicator& comm) {
  const int n = comm.size(), r = comm.rank();
  h.run("AllGatherConcatenatesRanksInOrder", [&] {
    Tensor in = Tensor::empty({2, 3});
    for (int k = 0; k < 6; ++k) in.data<float>()[k] = float(100 * r + k);
    std::vector<float> want;
    for (int q = 0; q < n; ++q)
      for (int k = 0; k < 6; ++k) want.push_back(float(100 * q + k));
    Tensor out = comm.all_gather(in);
    h.expect(out.shape() == kraken::runtime::Shape{2 * n, 3}, "shape (2n, 3)");
    h.expect_all_near(out.to_vector(), want, 0, 0, "blocking");
    Tensor out2 = Tensor::empty({2 * n, 3});
    comm.all_gather_async(in, out2).wait();
    h.expect_all_near(out2.to_vector(), want, 0, 0, "async");
    Tensor ids = comm.all_gather(Tensor::from_ints({r}, {1}));
    std::vector<int32_t> ranks(static_cast<size_t>(n));
    for (int q = 0; q < n; ++q) ranks[static_cast<size_t>(q)] = q;
    h.expect(ids.to_int_vector() == ranks, "i32 ranks");
  });

  h.run("ReduceScatterKeepsThisRanksRowsOfTheSum", [&] {
    // in[k] = (q+1)·k on rank q, (2n, 3): the sum is tri·k; rank r keeps rows 2r, 2r+1 (k = 6r … 6r+5).
    Tensor in = filled(2 * n * 3, [&](int64_t k) { return float((r + 1) * k); }).reshape({2 * n, 3});
    const float tri = n * (n + 1) / 2.0f;
    Tensor sum = comm.reduce_scatter(in, ReduceOp::Sum);
    h.expect(sum.shape() == kraken::runtime::Shape{2, 3}, "shape (2, 3)");
    h.expect_all_near(sum.to_vector(), values(6, [&](int64_t j) { return tri * (6 * r + j); }), 0, 0, "sum");
    Tensor avg = Tensor::empty({2, 3});
    comm.reduce_scatter_async(in, avg, ReduceOp::Average).wait();
    h.expect_all_near(avg.to_vector(), values(6, [&](int64_t j) { return tri * (6 * r + j) / n; }), 1e-7, 0,
                      "average (one division, correctly rounded)");
  });

  h.run("BroadcastCopiesTheRootsTensorEverywhere", [&] {
    for (int root = 0; root < n; ++root) {
      Tensor t = r == root ? filled(5, [&](int64_t i) { return float(10 * root + i); }) : Tensor::zeros({5});
      if (root % 2 == 0)
        comm.broadcast(t, root);
      else
        comm.broadcast_async(t, root).wait();
      h.expect_all_near(t.to_vector(), values(5, [&](int64_t i) { return float(10 * root + i); }), 0, 0,
                        "root " + std::to_string(root));
    }
  });
}

void point_to_point_cases(MpiHarness& h, Communicator& comm) {
  const int n = comm.size(), r = comm.rank();
  h.run("SendRecvRingDeliversTheLeftNeighboursData", [&] {
    const int right = (r + 1) % n, left = (r + n - 1) % n;
    Tensor out = filled(1000, [&](int64_t i) { return float(r * 1000 + i); });
    Tensor in = Tensor::empty({1000});
    Handle sent = comm.send_async(out, right, 5);
    comm.recv(in, left, 5);
    sent.wait();
    h.expect_all_near(in.to_vector(), values(1000, [&](int64_t i) { return float(left * 1000 + i); }), 0, 0, "ring");
  });

  h.run("MessagesAreMatchedByTagNotByArrival", [&] {
    if (r == 0) {
      comm.send(Tensor::full({4}, 1.0f), 1, 1);
      comm.send(Tensor::full({4}, 2.0f), 1, 2);
    } else if (r == 1) {
      Tensor second = Tensor::empty({4}), first = Tensor::empty({4});
      Handle h2 = comm.recv_async(second, 0, 2);
      Handle h1 = comm.recv_async(first, 0, 1);
      h2.wait();
      h1.wait();
      h.expect(second.to_vector() == std::vector<float>(4, 2.0f), "tag 2");
      h.expect(first.to_vector() == std::vector<float>(4, 1.0f), "tag 1");
    }
  });

  h.run("ExchangeBothWaysDoesNotDeadlock", [&] {
    // Pairs (0,1), (2,3): each sends 8 MB to the other while receiving 8 MB (rendezvous-sized).
    const int peer = r ^ 1;
    if (peer >= n) return;
    const int64_t count = 2 << 20;
    Tensor out = filled(count, [&](int64_t i) { return float(r + i % 3); });
    Tensor in = Tensor::empty({count});
    comm.send_recv_async({P2POp{P2POp::Kind::Send, out, peer, 3}, P2POp{P2POp::Kind::Recv, in, peer, 3}}).wait();
    h.expect_all_near(in.to_vector(), values(count, [&](int64_t i) { return float(peer + i % 3); }), 0, 0, "grouped");
    // The same with two separate calls, send first on both sides: still no deadlock, because posted
    // receives and sends never block the communication thread.
    Tensor in2 = Tensor::empty({count});
    Handle s = comm.send_async(out, peer, 4);
    comm.recv(in2, peer, 4);
    s.wait();
    h.expect_all_near(in2.to_vector(), in.to_vector(), 0, 0, "separate");
  });

  h.run("ReceiveOfTheWrongSizeIsAnErrorNamingTheBytes", [&] {
    if (r == 0) comm.send(Tensor::full({3}, 1.0f), 1, 9);
    if (r != 1) return;
    Tensor in = Tensor::empty({4});
    try {
      comm.recv(in, 0, 9);
      h.expect(false, "a 12-byte message into a 16-byte tensor was accepted");
    } catch (const kraken::Error& e) {
      h.expect(std::string(e.what()).find("received 12 bytes") != std::string::npos, e.what());
    }
  });
}

void async_cases(MpiHarness& h, Communicator& comm) {
  const int n = comm.size(), r = comm.rank();
  h.run("AsyncOperationsCompleteInIssueOrderWhateverTheWaitOrder", [&] {
    std::vector<Tensor> ts;
    std::vector<Handle> handles;
    for (int k = 0; k < 8; ++k) {
      ts.push_back(filled(64, [&](int64_t i) { return float(k * (r + 1) + i); }));
      handles.push_back(k % 3 == 2 ? comm.broadcast_async(ts.back(), k % n) : comm.all_reduce_async(ts.back()));
    }
    for (int k = 7; k >= 0; --k) handles[static_cast<size_t>(k)].wait();
    for (int k = 0; k < 8; ++k) {
      const int root = k % n;
      std::vector<float> want = values(64, [&](int64_t i) {
        return k % 3 == 2 ? float(k * (root + 1) + i) : float(k * n * (n + 1) / 2 + n * i);
      });
      h.expect_all_near(ts[static_cast<size_t>(k)].to_vector(), want, 0, 0, "op " + std::to_string(k));
    }
  });

  h.run("BarrierHoldsEveryRankUntilTheLastArrives", [&] {
    const auto begin = Clock::now();
    if (r == n - 1) sleep_s(0.2);
    comm.barrier();
    if (r != n - 1) h.expect(since(begin) >= 0.15, "left the barrier after " + std::to_string(since(begin)) + " s");
  });

  h.run("AsyncAllReduceProgressesWhileTheCallerSleeps", [&] {
    // The last rank joins 0.15 s late; everyone else starts at once and then sleeps 0.4 s without any
    // MPI call. The all-reduce (16 MB) must finish during that sleep — on the communication thread —
    // so done() is already true afterwards and wait() returns at once. With MPI_Iallreduce and no
    // thread, Open MPI would do most of the transfer inside wait().
    const int64_t count = 4 << 20;
    Tensor t = filled(count, [&](int64_t i) { return float(r + (i & 1)); });
    comm.barrier();
    if (r == n - 1) sleep_s(0.15);
    Handle handle = comm.all_reduce_async(t, ReduceOp::Sum);
    sleep_s(r == n - 1 ? 0.25 : 0.4);
    const bool done_before_wait = handle.done();
    const auto begin = Clock::now();
    handle.wait();
    const double waited = since(begin);
    h.expect(done_before_wait, "the all-reduce was not complete after the sleep");
    h.expect(waited < 0.05, "wait() blocked " + std::to_string(waited) + " s");
    if (r == 0)
      h.expect(handle.seconds() >= 0.1, "the operation took " + std::to_string(handle.seconds()) +
                                            " s on the communication thread: it cannot have spanned the late rank");
    h.expect_all_near(t.to_vector(), values(count, [&](int64_t i) { return float(n * (n - 1) / 2 + n * (i & 1)); }),
                      0, 0, "values");
  });

  h.run("StatsCountOperationsBytesAndWaiting", [&] {
    comm.reset_stats();
    Tensor t = Tensor::zeros({100});
    for (int k = 0; k < 3; ++k) comm.all_reduce(t);
    const auto stats = comm.stats();
    h.expect(stats.ops == 3, "ops " + std::to_string(stats.ops));
    h.expect(stats.bytes == 1200, "bytes " + std::to_string(stats.bytes));
    h.expect(stats.busy_seconds > 0.0 && stats.wait_seconds >= 0.0, "times");
  });
}

void world_cases(MpiHarness& h) {
  h.run("WorldKnowsRankSizeAndPlaceOnTheNode", [&] {
    kraken::parallel::World& world = h.world();
    h.expect(world.mpi_initialized(), "MPI initialised under mpirun");
    h.expect(world.communicator().rank() == world.rank() && world.communicator().size() == world.size(),
             "world communicator");
    // Every rank runs on this one machine.
    h.expect(world.local_size() == world.size() && world.local_rank() == world.rank(),
             "local rank " + std::to_string(world.local_rank()) + " of " + std::to_string(world.local_size()));
  });
}

void config_check_cases(MpiHarness& h) {
  const int n = h.size(), r = h.rank();
  h.run("ConfigCheckPassesForEqualTextsAndNamesTheRanksThatDiffer", [&] {
    kraken::parallel::check_same_on_all_ranks("config", "[model]\nn_layer = 2\n");
    h.expect(true, "equal texts");
    try {
      kraken::parallel::check_same_on_all_ranks("config", r % 2 == 1 ? "n_layer = 3" : "n_layer = 2");
      h.expect(false, "different configs were accepted");
    } catch (const kraken::Error& e) {
      const std::string want = n == 2 ? "config differs between ranks: rank 1 differs from rank 0"
                                      : "config differs between ranks: ranks 1, 3 differ from rank 0";
      h.expect(std::string(e.what()).find(want) != std::string::npos, e.what());
    }
  });
}

}  // namespace

int main() {
  return kraken::parallel::run_guarded([] {
    MpiHarness h;
    if (h.size() < 2) KRAKEN_THROW("communicator_mpi_test needs at least 2 ranks");
    Communicator& comm = h.world().communicator();
    world_cases(h);
    all_reduce_cases(h, comm);
    gather_scatter_broadcast_cases(h, comm);
    point_to_point_cases(h, comm);
    async_cases(h, comm);
    config_check_cases(h);
    return h.finish();
  });
}
