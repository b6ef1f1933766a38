// Fused log-softmax + cross-entropy at GPT-2's head: N = B·T = 1024 rows, Vp = 50304 padded columns of
// which vocab = 50257 take part. The CPU kernels on preallocated buffers, and the op with its node.
//
// Bytes are the minimum memory traffic in f32: forward reads the vocab columns of every row once
// (the padding is never touched) plus targets, and writes a loss and a log-sum-exp per row; backward
// reads the vocab columns and the lse again and writes the full padded gradient. Items are rows.
//   OMP_NUM_THREADS=2 build/bin/cross_entropy_bench
#include <benchmark/benchmark.h>

#include <vector>

#include "kernels/cross_entropy.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "runtime/rng.h"

namespace {

using kraken::runtime::Generator;
using kraken::runtime::Tensor;

constexpr int64_t kF = sizeof(float);
constexpr int64_t kRows = 1024, kPadded = 50304, kVocab = 50257;

int64_t forward_bytes(int64_t N, int64_t Vp, int64_t V) { return kF * (N * V + 3 * N); }
int64_t backward_bytes(int64_t N, int64_t Vp, int64_t V) { return kF * (N * V + N * Vp + 2 * N); }

struct Inputs {
  Tensor logits, targets;
  Inputs() : logits(Tensor::empty({kRows, kPadded})) {
    Generator gen(7, 0);
    gen.fill_normal(logits, 0.0f, 2.0f);
    std::vector<int32_t> t(kRows);
    for (auto& v : t) v = static_cast<int32_t>(gen.next_below(kVocab));
    t[5] = -1;  // one ignored row, as padding positions in a batch would be
    targets = Tensor::from_ints(t, {kRows});
  }
};

void BM_CrossEntropyForward(benchmark::State& state) {
  Inputs in;
  Tensor losses = Tensor::empty({kRows}), lse = Tensor::empty({kRows}), loss = Tensor::empty({});
  for (auto _ : state) {
    kraken::kernels::cross_entropy_forward_cpu(losses.data<float>(), lse.data<float>(), in.logits.data<float>(),
                                               in.targets.data<int32_t>(), kRows, kPadded, kVocab, -1);
    kraken::kernels::cross_entropy_mean_cpu(loss.data<float>(), losses.data<float>(), kRows, kRows - 1);
    benchmark::DoNotOptimize(loss.data<float>());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * forward_bytes(kRows, kPadded, kVocab));
  state.SetItemsProcessed(state.iterations() * kRows);
}

void BM_CrossEntropyForwardBackward(benchmark::State& state) {
  Inputs in;
  Tensor losses = Tensor::empty({kRows}), lse = Tensor::empty({kRows}), loss = Tensor::empty({});
  Tensor dloss = Tensor::full({}, 1.0f), dlogits = Tensor::empty({kRows, kPadded});
  for (auto _ : state) {
    kraken::kernels::cross_entropy_forward_cpu(losses.data<float>(), lse.data<float>(), in.logits.data<float>(),
                                               in.targets.data<int32_t>(), kRows, kPadded, kVocab, -1);
    kraken::kernels::cross_entropy_mean_cpu(loss.data<float>(), losses.data<float>(), kRows, kRows - 1);
    kraken::kernels::cross_entropy_backward_cpu(dlogits.data<float>(), in.logits.data<float>(), lse.data<float>(),
                                                in.targets.data<int32_t>(), dloss.data<float>(), kRows - 1, kRows,
                                                kPadded, kVocab, -1);
    benchmark::DoNotOptimize(dlogits.data<float>());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() *
                          (forward_bytes(kRows, kPadded, kVocab) + backward_bytes(kRows, kPadded, kVocab)));
  state.SetItemsProcessed(state.iterations() * kRows);
}

// The op as the trainer calls it: target validation, allocation and the tape. Here the logits are a
// leaf, so the engine also copies their gradient into .grad (an extra (N, Vp) read and write that
// training does not pay: there the head's matmul backward consumes the gradient); bytes count the
// kernels' traffic only, so the gap to the kernel benchmark above is that copy plus the overhead.
void BM_CrossEntropyOpForwardBackward(benchmark::State& state) {
  Inputs in;
  in.logits.set_requires_grad(true);
  for (auto _ : state) {
    in.logits.impl()->grad.reset();  // as zero_grad would leave it: no accumulation pass
    Tensor loss = kraken::runtime::ops::cross_entropy(in.logits, in.targets, kVocab, -1);
    kraken::runtime::backward(loss);
    benchmark::DoNotOptimize(in.logits.grad().data<float>());
  }
  state.SetBytesProcessed(state.iterations() *
                          (forward_bytes(kRows, kPadded, kVocab) + backward_bytes(kRows, kPadded, kVocab)));
  state.SetItemsProcessed(state.iterations() * kRows);
}

// Rates from wall time: the work is spread over OpenMP threads, so one thread's CPU time says little.
BENCHMARK(BM_CrossEntropyForward)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_CrossEntropyForwardBackward)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_CrossEntropyOpForwardBackward)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
