// The NCCL path: device tensors (one GPU per rank) through every collective, point to point and the
// Kraken pair, with the same closed forms as the host tests. NCCL cannot put two ranks on one GPU, so
// this needs as many GPUs as ranks; elsewhere every rank says so and rank 0 prints KRAKEN-MPI-SKIP.
#include <string>

#include "kernels/error.h"
#include "parallel/collectives.h"
#include "parallel/communicator.h"
#include "parallel/failure.h"
#include "runtime/allocator.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "tests/parallel/mpi/mpi_harness.h"

namespace ops = kraken::runtime::ops;
using kraken::parallel::Communicator;
using kraken::parallel::Handle;
using kraken::parallel::P2POp;
using kraken::parallel::ReduceOp;
using kraken::runtime::Device;
using kraken::runtime::DType;
using kraken::runtime::Tensor;
using kraken::testing::MpiHarness;

namespace {

std::vector<float> iota_scaled(int64_t n, float scale, float offset = 0.0f) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = scale * static_cast<float>(i + 1) + offset;
  return v;
}

void device_cases(MpiHarness& h, Communicator& comm, const Device& gpu) {
  const int n = comm.size(), r = comm.rank();
  const float tri = n * (n + 1) / 2.0f;
  h.run("DeviceAllReduceOfRankFilledTensorsIsClosedForm", [&] {
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Average, ReduceOp::Max, ReduceOp::Min}) {
      Tensor t = Tensor::from_vector(iota_scaled(1000, float(r + 1)), {1000}).to(gpu);
      Handle handle = comm.all_reduce_async(t, op);
      handle.wait();  // orders the compute stream (and so the copy below) after the all-reduce
      const float scale = op == ReduceOp::Sum ? tri : op == ReduceOp::Average ? tri / n : op == ReduceOp::Max ? n : 1;
      h.expect_all_near(t.to_vector(), iota_scaled(1000, scale), 1e-6, 0, reduce_op_name(op));
    }
    Tensor b = Tensor::from_vector(iota_scaled(64, float(r + 1)), {64}).to(gpu).to(DType::BF16);
    comm.all_reduce(b, ReduceOp::Max);
    h.expect_all_near(b.to_vector(), iota_scaled(64, float(n)), 0, 0, "bf16 max (integers up to 256 are exact)");
  });

  h.run("DeviceGatherScatterBroadcastAreClosedForm", [&] {
    Tensor in = Tensor::full({2, 3}, float(r)).to(gpu);
    std::vector<float> want;
    for (int q = 0; q < n; ++q) want.insert(want.end(), 6, float(q));
    h.expect_all_near(comm.all_gather(in).to_vector(), want, 0, 0, "all_gather");
    Tensor rows = Tensor::full({2 * n, 3}, float(r + 1)).to(gpu);
    h.expect_all_near(comm.reduce_scatter(rows, ReduceOp::Sum).to_vector(), std::vector<float>(6, tri), 0, 0,
                      "reduce_scatter");
    Tensor t = Tensor::full({5}, r == n - 1 ? 7.0f : 0.0f).to(gpu);
    comm.broadcast(t, n - 1);
    h.expect_all_near(t.to_vector(), std::vector<float>(5, 7.0f), 0, 0, "broadcast");
  });

  h.run("DeviceExchangeWithBothNeighbours", [&] {
    const int right = (r + 1) % n, left = (r + n - 1) % n;
    Tensor out = Tensor::full({1 << 20}, float(r)).to(gpu);
    Tensor from_left = Tensor::zeros({1 << 20}, DType::F32, gpu);
    comm.send_recv_async({P2POp{P2POp::Kind::Send, out, right, 0}, P2POp{P2POp::Kind::Recv, from_left, left, 0}})
        .wait();
    const std::vector<float> got = from_left.to_vector();
    h.expect(got.front() == float(left) && got.back() == float(left), "ring exchange");
  });

  h.run("DeviceOperationsLetGoAreCountedOnceEach", [&] {
    // A handle let go after wait() does not block the host (its events are retired to the communicator),
    // one let go unwaited synchronises first; stats() counts both, once each, whatever order they finish.
    comm.reset_stats();
    Tensor t = Tensor::full({1000}, float(r + 1)).to(gpu);
    for (int i = 0; i < 3; ++i) comm.all_reduce(t, ReduceOp::Sum);  // async + wait + let go
    { Handle unwaited = comm.all_reduce_async(t, ReduceOp::Sum); }
    const kraken::parallel::CommStats st = comm.stats();
    h.expect(st.ops == 4, "4 operations counted, got " + std::to_string(st.ops));
    h.expect(st.bytes == 4 * 4000, "4 × 4000 bytes counted, got " + std::to_string(st.bytes));
    h.expect(st.busy_seconds > 0.0, "their device time counted");
    // Σ over ranks of (r + 1) is tri; each later all-reduce multiplies by n.
    h.expect_all_near(t.to_vector(), std::vector<float>(1000, tri * n * n * n), 1e-6, 0, "four sums in order");
    h.expect(comm.stats().ops == 4, "a second stats() counts nothing twice");
  });

  h.run("DeviceKrakenPairGradientIsTheSumOfEveryRanksGradient", [&] {
    // L_r = sum((r+1)·S), S = Σ x: dL/dx = Σ_r (r+1) = tri on every rank.
    Tensor x = Tensor::full({256}, 1.0f).to(gpu).set_requires_grad(true);
    auto pending = kraken::parallel::start_all_reduce(x, comm);
    Tensor s = kraken::parallel::wait_all_reduce(pending);
    kraken::runtime::backward(ops::sum(ops::scale(s, float(r + 1))));
    h.expect_all_near(s.to_vector(), std::vector<float>(256, float(n)), 0, 0, "S");
    h.expect_all_near(x.grad().to_vector(), std::vector<float>(256, tri), 0, 0, "dx");
  });
}

}  // namespace

int main() {
  return kraken::parallel::run_guarded([] {
    MpiHarness h;
    std::string why;
    const int gpus = kraken::runtime::cuda_available(&why) ? kraken::runtime::cuda_device_count() : 0;
    if (gpus < h.size()) {
      if (h.rank() == 0)
        std::printf("KRAKEN-MPI-SKIP: the NCCL test needs %d GPUs (one per rank), found %d%s%s\n", h.size(), gpus,
                    why.empty() ? "" : ": ", why.c_str());
      return 0;
    }
    device_cases(h, h.world().communicator(), Device::cuda(h.rank()));
    return h.finish();
  });
}
