// fp32 matrix products through kernels::matmul_cpu (the BLAS loaded at run time, or the fallback).
//
// Reported: FLOP/s counted as 2·M·N·K per product (one multiply and one add per term), the usual GEMM
// convention, so "150G/s" in the output is 150 GFLOP/s. Square sizes for the headline number (issue 2's
// target is ≥ 150 GFLOP/s at 1024³ on 2 cores), then the three cases a linear layer runs:
//   forward  y  = x · Wᵀ   (trans_b)      x (rows, in), W (out, in)
//   backward dx = dy · W   (no transpose)
//   backward dW = dyᵀ · x  (trans_a)
// at GPT-2 small shapes (rows = B·T = 4·256, C = 768, 3C = 2304, 4C = 3072).
// Run: OMP_NUM_THREADS=2 build/bin/matmul_bench
#include <benchmark/benchmark.h>

#include <vector>

#include "kernels/random.h"

#include "kernels/matmul.h"

namespace {

using kraken::kernels::matmul_cpu;

// Values in [-1, 1) from the project's Philox stream: they do not change the speed, only avoid denormals.
std::vector<float> filled(int64_t n, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(n));
  kraken::kernels::fill_uniform_cpu(v.data(), n, -1.0f, 1.0f, seed, 0, 0);
  return v;
}

// C (M, N) = op(A) · op(B), op(A) (M, K), op(B) (K, N).
void run_gemm(benchmark::State& state, int64_t M, int64_t N, int64_t K, bool ta, bool tb) {
  const std::vector<float> a = filled(M * K, 1), b = filled(K * N, 2);
  std::vector<float> c(static_cast<size_t>(M * N));
  matmul_cpu(c.data(), a.data(), b.data(), M, N, K, ta, tb, 1.0f, 0.0f);  // load the BLAS, warm caches
  for (auto _ : state) {
    matmul_cpu(c.data(), a.data(), b.data(), M, N, K, ta, tb, 1.0f, 0.0f);
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] =
      benchmark::Counter(2.0 * static_cast<double>(M) * N * K, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(kraken::kernels::cpu_blas_name());
}

void BM_SgemmSquare(benchmark::State& state) {
  const int64_t n = state.range(0);
  run_gemm(state, n, n, n, state.range(1) != 0, state.range(2) != 0);
}
// (n, trans_a, trans_b): plain products, and at 1024 the transposed forms the linear layer uses.
BENCHMARK(BM_SgemmSquare)
    ->ArgNames({"n", "ta", "tb"})
    ->Args({256, 0, 0})
    ->Args({512, 0, 0})
    ->Args({1024, 0, 0})
    ->Args({2048, 0, 0})
    ->Args({1024, 0, 1})
    ->Args({1024, 1, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Linear layer at GPT-2 small sizes: rows = 1024, (in, out) = (768, 2304) for c_attn, (768, 3072) c_fc.
void BM_LinearForward(benchmark::State& state) {  // y (rows, out) = x (rows, in) · Wᵀ
  run_gemm(state, state.range(0), state.range(2), state.range(1), false, true);
}
void BM_LinearBackwardInput(benchmark::State& state) {  // dx (rows, in) = dy (rows, out) · W (out, in)
  run_gemm(state, state.range(0), state.range(1), state.range(2), false, false);
}
void BM_LinearBackwardWeight(benchmark::State& state) {  // dW (out, in) = dyᵀ (out, rows) · x (rows, in)
  run_gemm(state, state.range(2), state.range(1), state.range(0), true, false);
}
#define KRAKEN_LINEAR_SHAPES(bm)                                                                              \
  BENCHMARK(bm)->ArgNames({"rows", "in", "out"})->Args({1024, 768, 2304})->Args({1024, 768, 3072})            \
      ->Unit(benchmark::kMillisecond)->UseRealTime()
KRAKEN_LINEAR_SHAPES(BM_LinearForward);
KRAKEN_LINEAR_SHAPES(BM_LinearBackwardInput);
KRAKEN_LINEAR_SHAPES(BM_LinearBackwardWeight);

}  // namespace
