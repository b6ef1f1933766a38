// Layer normalisation at GPT-2 shapes (C = 768; B·T = 4·256 and 8·1024 rows): the CPU kernels on
// preallocated buffers, and the op with its autograd node (allocation and zero-fill included).
//
// Bytes are the minimum memory traffic of each kernel in f32: forward reads x and writes out (plus
// mean, rstd and the (C,) parameters); backward reads dout and x and reads and writes dx (it
// accumulates), plus mean/rstd and the (C,) parameter gradients. Items are rows.
//   OMP_NUM_THREADS=2 build/bin/layernorm_bench
#include <benchmark/benchmark.h>

#include "kernels/layernorm.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "runtime/rng.h"

namespace {

using kraken::runtime::Generator;
using kraken::runtime::Tensor;

constexpr int64_t kF = sizeof(float);

int64_t forward_bytes(int64_t rows, int64_t C) { return kF * (2 * rows * C + 2 * rows + 2 * C); }
int64_t backward_bytes(int64_t rows, int64_t C) { return kF * (4 * rows * C + 2 * rows + 5 * C); }

Tensor normal(const kraken::runtime::Shape& shape, uint64_t seed) {
  Tensor t = Tensor::empty(shape);
  Generator gen(seed, 0);
  gen.fill_normal(t, 0.0f, 1.0f);
  return t;
}

void BM_LayerNormForward(benchmark::State& state) {
  const int64_t rows = state.range(0), C = state.range(1);
  Tensor x = normal({rows, C}, 1), gamma = normal({C}, 2), beta = normal({C}, 3);
  Tensor out = Tensor::empty({rows, C}), mean = Tensor::empty({rows}), rstd = Tensor::empty({rows});
  for (auto _ : state) {
    kraken::kernels::layernorm_forward_cpu(out.data<float>(), mean.data<float>(), rstd.data<float>(), x.data<float>(),
                                           gamma.data<float>(), beta.data<float>(), rows, C, 1e-5f);
    benchmark::DoNotOptimize(out.data<float>());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * forward_bytes(rows, C));
  state.SetItemsProcessed(state.iterations() * rows);
}

void BM_LayerNormForwardBackward(benchmark::State& state) {
  const int64_t rows = state.range(0), C = state.range(1);
  Tensor x = normal({rows, C}, 1), gamma = normal({C}, 2), beta = normal({C}, 3), dout = normal({rows, C}, 4);
  Tensor out = Tensor::empty({rows, C}), mean = Tensor::empty({rows}), rstd = Tensor::empty({rows});
  Tensor dx = Tensor::zeros({rows, C}), dgamma = Tensor::zeros({C}), dbeta = Tensor::zeros({C});
  for (auto _ : state) {
    kraken::kernels::layernorm_forward_cpu(out.data<float>(), mean.data<float>(), rstd.data<float>(), x.data<float>(),
                                           gamma.data<float>(), beta.data<float>(), rows, C, 1e-5f);
    kraken::kernels::layernorm_backward_cpu(dx.data<float>(), dx.data<float>(), dgamma.data<float>(),
                                            dbeta.data<float>(), dout.data<float>(), x.data<float>(),
                                            gamma.data<float>(), mean.data<float>(), rstd.data<float>(), rows, C);
    benchmark::DoNotOptimize(dx.data<float>());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * (forward_bytes(rows, C) + backward_bytes(rows, C)));
  state.SetItemsProcessed(state.iterations() * rows);
}

// The op as the model calls it: output and gradients freshly allocated, dx zero-filled, the tape
// recorded and walked. Bytes count the kernels' traffic only, so the gap to the kernel benchmark
// above is the runtime's overhead.
void BM_LayerNormOpForwardBackward(benchmark::State& state) {
  const int64_t rows = state.range(0), C = state.range(1);
  Tensor x = normal({rows, C}, 1), gamma = normal({C}, 2), beta = normal({C}, 3), dout = normal({rows, C}, 4);
  x.set_requires_grad(true);
  gamma.set_requires_grad(true);
  beta.set_requires_grad(true);
  for (auto _ : state) {
    Tensor out = kraken::runtime::ops::layernorm(x, gamma, beta);
    kraken::runtime::backward(out, dout);
    benchmark::DoNotOptimize(x.grad().data<float>());
  }
  state.SetBytesProcessed(state.iterations() * (forward_bytes(rows, C) + backward_bytes(rows, C)));
  state.SetItemsProcessed(state.iterations() * rows);
}

// (rows, C): GPT-2 small's width at B·T = 4·256 and 8·1024. Rates from wall time: the work is spread
// over OpenMP threads, so one thread's CPU time says little.
#define KRAKEN_LN_SHAPES \
  Args({4 * 256, 768})->Args({8 * 1024, 768})->Unit(benchmark::kMicrosecond)->UseRealTime()
BENCHMARK(BM_LayerNormForward)->KRAKEN_LN_SHAPES;
BENCHMARK(BM_LayerNormForwardBackward)->KRAKEN_LN_SHAPES;
BENCHMARK(BM_LayerNormOpForwardBackward)->KRAKEN_LN_SHAPES;

}  // namespace
