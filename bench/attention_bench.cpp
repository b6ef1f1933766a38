// Fused causal attention on the CPU (kernels/cpu/attention.cpp) against a naive implementation.
//
// FLOP convention (the counters): only the causal lower triangle, diagonal included, is useful work:
// per (b, h) the pairs are T(T+1)/2 and each pair costs one length-D dot product (2D FLOPs) per
// product. Forward has two products (q·kᵀ and P·v): 4·B·H·D·T(T+1)/2. Backward has four (dP = dO·vᵀ,
// dV = Pᵀ·dO, dq = dS·k, dk = dSᵀ·q), twice the forward, so forward+backward is 3× the forward count.
// Recomputing S = q·kᵀ in backward is not counted in "FLOP/s" (it is not useful work); the extra
// counter "FLOP/s_recompute" counts it too (3.5× the forward). Softmax, exp and masking are not
// counted. The target compares "FLOP/s" of forward+backward at B=4, H=4, T=256, D=64 with
// matmul_bench's 1024³ sgemm rate (within 3×).
// Run: OMP_NUM_THREADS=2 build/bin/attention_bench
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/random.h"

#include "kernels/attention.h"

namespace {

using kraken::kernels::attention_backward_cpu;
using kraken::kernels::attention_forward_cpu;

// Values in [-1, 1) from the project's Philox stream: they do not change the speed, only avoid denormals.
std::vector<float> filled(int64_t n, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(n));
  kraken::kernels::fill_uniform_cpu(v.data(), n, -1.0f, 1.0f, seed, 0, 0);
  return v;
}

struct Problem {
  int64_t B, T, C, H;
  std::vector<float> qkv, out, lse, dout, dqkv;
  explicit Problem(const benchmark::State& state)
      : B(state.range(0)), T(state.range(2)), C(state.range(1) * state.range(3)), H(state.range(1)),
        qkv(filled(B * T * 3 * C, 1)), out(B * T * C), lse(B * H * T), dout(filled(B * T * C, 2)),
        dqkv(B * T * 3 * C) {}
  double forward_flops() const { return 4.0 * B * H * (C / H) * (T * (T + 1) / 2.0); }
};

void BM_AttentionForward(benchmark::State& state) {
  Problem p(state);
  for (auto _ : state) {
    attention_forward_cpu(p.out.data(), p.lse.data(), p.qkv.data(), p.B, p.T, p.C, p.H);
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] = benchmark::Counter(p.forward_flops(), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_AttentionForwardBackward(benchmark::State& state) {
  Problem p(state);
  for (auto _ : state) {
    attention_forward_cpu(p.out.data(), p.lse.data(), p.qkv.data(), p.B, p.T, p.C, p.H);
    attention_backward_cpu(p.dqkv.data(), p.dout.data(), p.qkv.data(), p.out.data(), p.lse.data(), p.B, p.T, p.C,
                           p.H);
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] =
      benchmark::Counter(3.0 * p.forward_flops(), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["FLOP/s_recompute"] =
      benchmark::Counter(3.5 * p.forward_flops(), benchmark::Counter::kIsIterationInvariantRate);
}

// The naive reference: per head, the explicit (T, T) score matrix, mask, softmax, ·v; backward from the
// stored P with the same chain rule. Plain loops (the inner ones over D or T vectorise), one thread per
// head, full matrices: what the fused kernel replaces.
void naive_forward_backward(Problem& p, std::vector<float>& P, std::vector<float>& dP, bool backward) {
  const int64_t T = p.T, C = p.C, D = C / p.H, ld = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
#pragma omp parallel for schedule(static)
  for (int64_t bh = 0; bh < p.B * p.H; ++bh) {
    const int64_t b = bh / p.H, h = bh % p.H;
    float* Pm = P.data() + bh * T * T;
    float* dPm = dP.data() + bh * T * T;
    const float* q = p.qkv.data() + b * T * ld + h * D;
    const float* k = q + C;
    const float* v = q + 2 * C;
    for (int64_t t = 0; t < T; ++t) {
      float m = -INFINITY;
      for (int64_t s = 0; s < T; ++s) {
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += q[t * ld + d] * k[s * ld + d];
        Pm[t * T + s] = s <= t ? dot * scale : -INFINITY;
        m = std::max(m, Pm[t * T + s]);
      }
      float z = 0.0f;
      for (int64_t s = 0; s < T; ++s) z += (Pm[t * T + s] = std::exp(Pm[t * T + s] - m));
      for (int64_t s = 0; s < T; ++s) Pm[t * T + s] /= z;
      float* o = p.out.data() + (b * T + t) * C + h * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
      for (int64_t s = 0; s < T; ++s)
        for (int64_t d = 0; d < D; ++d) o[d] += Pm[t * T + s] * v[s * ld + d];
    }
    if (!backward) continue;
    const float* dO = p.dout.data() + b * T * C + h * D;
    float* dq = p.dqkv.data() + b * T * ld + h * D;
    float* dk = dq + C;
    float* dv = dq + 2 * C;
    for (int64_t t = 0; t < T; ++t) {
      float rowdot = 0.0f;
      for (int64_t s = 0; s < T; ++s) {
        float acc = 0.0f;
        for (int64_t d = 0; d < D; ++d) {
          dv[s * ld + d] += Pm[t * T + s] * dO[t * C + d];
          acc += dO[t * C + d] * v[s * ld + d];
        }
        dPm[t * T + s] = acc;
        rowdot += acc * Pm[t * T + s];
      }
      for (int64_t s = 0; s < T; ++s) {
        const float ds = Pm[t * T + s] * (dPm[t * T + s] - rowdot) * scale;
        for (int64_t d = 0; d < D; ++d) {
          dq[t * ld + d] += ds * k[s * ld + d];
          dk[s * ld + d] += ds * q[t * ld + d];
        }
      }
    }
  }
}

void BM_NaiveForward(benchmark::State& state) {
  Problem p(state);
  std::vector<float> P(p.B * p.H * p.T * p.T), dP(1);
  for (auto _ : state) {
    naive_forward_backward(p, P, dP, false);
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] = benchmark::Counter(p.forward_flops(), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_NaiveForwardBackward(benchmark::State& state) {
  Problem p(state);
  std::vector<float> P(p.B * p.H * p.T * p.T), dP(P.size());
  for (auto _ : state) {
    naive_forward_backward(p, P, dP, true);
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] =
      benchmark::Counter(3.0 * p.forward_flops(), benchmark::Counter::kIsIterationInvariantRate);
}

// (B, H, T, D): the target size, then GPT-2's context length.
#define KRAKEN_ATTENTION_SIZES(bm)                                                                          \
  BENCHMARK(bm)->ArgNames({"B", "H", "T", "D"})->Args({4, 4, 256, 64})->Args({4, 4, 1024, 64})            \
      ->Unit(benchmark::kMillisecond)->UseRealTime()
KRAKEN_ATTENTION_SIZES(BM_AttentionForward);
KRAKEN_ATTENTION_SIZES(BM_AttentionForwardBackward);
KRAKEN_ATTENTION_SIZES(BM_NaiveForward);
KRAKEN_ATTENTION_SIZES(BM_NaiveForwardBackward);

}  // namespace
