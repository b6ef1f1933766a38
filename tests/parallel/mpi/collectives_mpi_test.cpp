// Collectives as autograd ops on two ranks: the gradients of a tensor-parallel computation equal those
// of the same computation in one process, and Kraken's asynchronous pair really overlaps compute in
// both directions.
#include <algorithm>
#include <chrono>
#include <thread>

#include "kernels/error.h"
#include "parallel/collectives.h"
#include "parallel/failure.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "runtime/rng.h"
#include "tests/parallel/mpi/mpi_harness.h"

namespace ops = kraken::runtime::ops;
using kraken::parallel::Communicator;
using kraken::parallel::PendingReduce;
using kraken::runtime::Generator;
using kraken::runtime::NoGrad;
using kraken::runtime::Tensor;
using kraken::testing::MpiHarness;

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
void sleep_s(double s) { std::this_thread::sleep_for(std::chrono::duration<double>(s)); }

Tensor normal(const kraken::runtime::Shape& shape, uint64_t seed, float std = 1.0f) {
  Generator gen(seed);
  Tensor t = Tensor::empty(shape);
  gen.fill_normal(t, 0.0f, std);
  return t;
}

Tensor leaf(const Tensor& t) { return t.clone().set_requires_grad(true); }

// Columns [begin, begin + n) of a 2-D tensor, as a new tensor.
Tensor columns(const Tensor& t, int64_t begin, int64_t n) {
  NoGrad no_grad;
  const int64_t c = t.size(1);
  return ops::split(t, {begin, n, c - begin - n}, 1)[1].clone();
}

// Identity forward; its backward sleeps `backward_s` (a stand-in for compute the engine runs there).
Tensor sleepy(const Tensor& x, double backward_s) {
  Tensor out = x.clone();
  if (kraken::runtime::needs_grad({x}))
    kraken::runtime::record("sleepy", {x}, {out}, [backward_s](const std::vector<Tensor>& g) {
      sleep_s(backward_s);
      return std::vector<Tensor>{g[0]};
    });
  return out;
}

// f32 sums of a few terms of order 1, grouped differently from the reference (two partial sums of 3
// instead of one sum of 6): the results differ by a few ulps of the terms' magnitude, below 1e-5.
constexpr double kRtol = 1e-5, kAtol = 1e-5;

void megatron_pair(MpiHarness& h, Communicator& tp) {
  h.run("MegatronMlpSplitOverTwoRanksHasTheSingleProcessGradients", [&] {
    const int r = tp.rank();
    const int64_t B = 3, C = 4, H = 6, half = H / 2;
    const Tensor x0 = normal({B, C}, 1), w1 = normal({H, C}, 2, 0.5f), w2 = normal({C, H}, 3, 0.5f),
                 weights = normal({B, C}, 4);
    // One process: y = gelu(x·W1ᵀ)·W2ᵀ, L = sum(y ∘ weights).
    Tensor x = leaf(x0), w1_full = leaf(w1), w2_full = leaf(w2);
    Tensor y_ref = ops::linear(ops::gelu(ops::linear(x, w1_full)), w2_full);
    kraken::runtime::backward(ops::sum(ops::mul(y_ref, weights)));
    // Two ranks: W1 split by rows (column-parallel), W2 by columns (row-parallel).
    Tensor xr = leaf(x0), w1r = leaf(w1.slice(r * half, (r + 1) * half)), w2r = leaf(columns(w2, r * half, half));
    Tensor hr = ops::gelu(ops::linear(kraken::parallel::copy_to_tp(xr, tp), w1r));
    Tensor y = kraken::parallel::reduce_from_tp(ops::linear(hr, w2r), tp);
    kraken::runtime::backward(ops::sum(ops::mul(y, weights)));
    h.expect_all_near(y.to_vector(), y_ref.to_vector(), kRtol, kAtol, "y");
    h.expect_all_near(xr.grad().to_vector(), x.grad().to_vector(), kRtol, kAtol, "dx (all-reduced by copy_to_tp)");
    h.expect_all_near(w1r.grad().to_vector(), w1_full.grad().slice(r * half, (r + 1) * half).to_vector(), kRtol, kAtol,
                      "dW1 rows");
    h.expect_all_near(w2r.grad().to_vector(), columns(w2_full.grad(), r * half, half).to_vector(), kRtol, kAtol,
                      "dW2 columns");
  });

  h.run("GatherAndScatterAlongTheLastDimHaveMirrorGradients", [&] {
    const int r = tp.rank();
    // gather: y = [x_0 | x_1]; L = sum(y ∘ W) replicated, so dx_r = W's columns of rank r.
    Tensor x = leaf(normal({2, 3}, 10 + r));
    Tensor w = normal({2, 6}, 20);
    Tensor y = kraken::parallel::gather_from_tp(x, tp);
    Tensor x0 = normal({2, 3}, 10), x1 = normal({2, 3}, 11);
    h.expect_all_near(y.to_vector(), ops::concat({x0, x1}, 1).to_vector(), 0, 0, "gathered values");
    kraken::runtime::backward(ops::sum(ops::mul(y, w)));
    h.expect_all_near(x.grad().to_vector(), columns(w, 3 * r, 3).to_vector(), 0, 0, "gather backward");
    // scatter: y_r = x[:, 3r:3r+3]; L_r = sum(y_r ∘ V_r), so dx = [V_0 | V_1] on every rank.
    Tensor full = leaf(normal({2, 6}, 30));
    Tensor part = kraken::parallel::scatter_to_tp(full, tp);
    h.expect_all_near(part.to_vector(), columns(full.detach(), 3 * r, 3).to_vector(), 0, 0, "scattered values");
    kraken::runtime::backward(ops::sum(ops::mul(part, normal({2, 3}, 40 + r))));
    h.expect_all_near(full.grad().to_vector(), ops::concat({normal({2, 3}, 40), normal({2, 3}, 41)}, 1).to_vector(), 0,
                      0, "scatter backward");
  });
}

void kraken_pair(MpiHarness& h, Communicator& tp) {
  h.run("KrakenPairOverTwoRanksHasTheSingleProcessGradients", [&] {
    const int r = tp.rank();
    const kraken::runtime::Shape shape{4, 5};
    // One process: S = x_0 + x_1; L = Σ_r [sum(w_r ∘ gelu(S)) + sum(u_r ∘ x_r ∘ x_r)].
    Tensor x0 = leaf(normal(shape, 100)), x1 = leaf(normal(shape, 101));
    Tensor s_ref = ops::add(x0, x1);
    Tensor loss_ref = ops::add(ops::add(ops::sum(ops::mul(normal(shape, 200), ops::gelu(s_ref))),
                                        ops::sum(ops::mul(normal(shape, 300), ops::mul(x0, x0)))),
                               ops::add(ops::sum(ops::mul(normal(shape, 201), ops::gelu(s_ref))),
                                        ops::sum(ops::mul(normal(shape, 301), ops::mul(x1, x1)))));
    kraken::runtime::backward(loss_ref);
    // Rank r holds x_r and computes its own term, with x_r∘x_r (its "attention") between start and wait.
    Tensor x = leaf(normal(shape, 100 + r));
    PendingReduce pending = kraken::parallel::start_all_reduce(x, tp);
    Tensor own = ops::mul(x, x);
    Tensor s = kraken::parallel::wait_all_reduce(pending);
    kraken::runtime::backward(ops::add(ops::sum(ops::mul(normal(shape, 200 + r), ops::gelu(s))),
                                       ops::sum(ops::mul(normal(shape, 300 + r), own))));
    h.expect_all_near(s.to_vector(), s_ref.to_vector(), 0, 0, "S = x_0 + x_1 (one f32 addition, as in one process)");
    h.expect_all_near(x.grad().to_vector(), (r == 0 ? x0 : x1).grad().to_vector(), kRtol, kAtol, "dx_r");
    h.expect_all_near(x.to_vector(), normal(shape, 100 + r).to_vector(), 0, 0, "x untouched by the sum");
  });

  h.run("KrakenPairForwardRunsBehindTheComputeBetweenStartAndWait", [&] {
    // Rank 1 starts 0.15 s late; rank 0 "computes" 0.3 s between start and wait. The sum completes on
    // the communication thread during that compute, so wait() has nothing left to do.
    const int r = tp.rank();
    Tensor x = Tensor::full({1 << 20}, float(r + 1));
    tp.barrier();
    if (r == 1) sleep_s(0.15);
    PendingReduce pending = kraken::parallel::start_all_reduce(x, tp);
    sleep_s(r == 0 ? 0.3 : 0.15);
    const bool done = pending.done();
    const auto begin = Clock::now();
    Tensor s = kraken::parallel::wait_all_reduce(pending);
    const double waited = since(begin);
    h.expect(done, "the forward sum was not complete after the compute");
    h.expect(waited < 0.05, "wait_all_reduce blocked " + std::to_string(waited) + " s");
    const std::vector<float> v = s.to_vector();
    h.expect(std::all_of(v.begin(), v.end(), [](float e) { return e == 3.0f; }), "S = 1 + 2");
  });

  h.run("KrakenPairBackwardRunsBehindTheComputeBetweenThePair", [&] {
    // L = sum(sleepy_after(S)) + sum(sleepy_between(x)), S = Σ_ranks x. The engine runs: the node after
    // the pair (rank 1 sleeps 0.15 s there, so its half of the backward all-reduce starts late), the
    // wait op (starts the all-reduce of dS), the node between the pair (rank 0 sleeps 0.3 s: the
    // "attention backward"), the start op (waits). On rank 0 the all-reduce spans rank 1's delay yet
    // is complete before rank 0's wait: the backward transfer ran behind compute.
    const int r = tp.rank();
    Tensor x = Tensor::full({1 << 20}, 1.0f).set_requires_grad(true);
    PendingReduce pending = kraken::parallel::start_all_reduce(x, tp);
    Tensor between = sleepy(x, r == 0 ? 0.3 : 0.0);
    Tensor s = kraken::parallel::wait_all_reduce(pending);
    Tensor after = sleepy(s, r == 1 ? 0.15 : 0.0);
    Tensor loss = ops::add(ops::sum(after), ops::sum(between));
    tp.barrier();
    tp.reset_stats();
    kraken::runtime::backward(loss);
    const auto stats = tp.stats();
    h.expect(stats.ops == 1, "one all-reduce in backward, got " + std::to_string(stats.ops));
    if (r == 0) {
      h.expect(stats.busy_seconds >= 0.1, "the backward all-reduce took " + std::to_string(stats.busy_seconds) +
                                              " s: it did not span rank 1's delay");
      h.expect(stats.wait_seconds < 0.05, "start_all_reduce's backward waited " + std::to_string(stats.wait_seconds) +
                                              " s: the transfer was not hidden");
    }
    // dL/dx = 1 (between) + Σ_ranks dL/dS (1 each) = 3.
    const std::vector<float> g = x.grad().to_vector();
    h.expect(std::all_of(g.begin(), g.end(), [](float e) { return e == 3.0f; }), "dx = 1 + 2");
  });
}

}  // namespace

int main() {
  return kraken::parallel::run_guarded([] {
    MpiHarness h(2);
    Communicator& tp = h.world().communicator();
    megatron_pair(h, tp);
    kraken_pair(h, tp);
    return h.finish();
  });
}
