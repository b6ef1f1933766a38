// The tensor-core bf16 attention, both families — WMMA (attention_{forward,backward}_bf16_tc_cuda,
// kernels/cuda/attention_tc.cu) and mma.sync (…_mma_cuda, kernels/cuda/attention_mma.cu) — called
// directly on device buffers, against the contract of kernels/attention.h: the CPU f32 kernel
// on exactly the bf16 values the GPU reads, its outputs rounded once (nearest even) — the reference of
// tests/gpu/bf16_kernels_cuda_test.cpp. Head sizes 64 (GPT-2), 42 (the Kraken 4-way preset: padded to
// 48, 4-byte rows), 128 (the largest, over 48 KiB of shared memory) and 24 (padded to 32); T from 1 to
// 257, with 65 (the last 64-row tile holds one row) and 17, 100, 257 ragged; B·NH = 6; dqkv accumulates
// into non-zero values. Then: B·NH above the 65535 grid limit, buffers only 2-byte aligned (the scalar
// copies), agreement with the CUDA-core (SIMT) kernels and between the two families, and the dispatch
// of attention_*_bf16_cuda. The two families share one contract and so these tolerances, as does the
// third, Hopper's wgmma (attention_wgmma.cu: compute capability 9.0 only, its tests skip elsewhere),
// checked here against the CPU and the mma kernels, with the probe of its operand layouts.
// Skips where there is no GPU, and in the dry run (KRAKEN_GPU_TESTS_ON_CPU=1): these tests call CUDA
// kernels directly, so there is nothing for the CPU to stand in for.
//
// Tolerances. bf16 has 8 significant bits: rounding to nearest changes a value by at most u = 2⁻⁸ of
// it. Let b be the reference's f32 value of an output element and a the tensor-core kernel's f32 value
// before its final rounding. Both round once; as in bf16_kernels_cuda_test.cpp, a small |a − b| then
// costs at most one flipped rounding, at most 2⁻⁷·|ref|, plus |a − b| itself. So every bf16 output must
// satisfy
//     |got − ref| ≤ 2⁻⁷·|ref| + rel·max|ref|,   rel ≥ max|a − b| / max|ref|.
// What |a − b| is made of, besides the f32 differences of the SIMT kernels (summation order, exp2f
// against expf: ≤ 1e-5 / 2e-5 of the scale, and 1e-7 measured), is the one deliberate deviation:
//   forward: the weights p = e^{s−m} are rounded to bf16 before they multiply v, p̃ = p(1 + δ), |δ| ≤ u,
//     and out is normalised by Σp̃, so with w the exact softmax weights
//         a − b = Σ_s w_s·δ_s·(v_s − b) / (1 + Σ_s w_s·δ_s),   |a − b| ≤ u/(1 − u) · Σ_s w_s·|v_s − b|:
//     the rounding perturbs an average, by at most 2⁻⁸ of the values' mean distance from it (0 for
//     the first row, whose one weight is exactly 1).
//   backward: dv = Σ_t p̃_ts·dO_t, dk = scale·Σ_t dS̃_ts·q_t, dq = scale·Σ_s dS̃_ts·k_s with p̃, dS̃ the
//     bf16 roundings of the f32 P and dS = P∘(dP − D): |a − b| ≤ u·Σ|terms| of the element's sum.
// Computed in double for N(0, 1) inputs of exactly these shapes, the largest of these per-element
// bounds (every rounding error with the worst sign at once) is 3.4e-3 of max|out| and 8.4e-3 of
// max|dqkv|; a CPU emulation of these kernels (their loops and WMMA calls run by host threads, the
// fragment layouts scrambled) measured max (|got − ref| − 2⁻⁷·|ref|) / max|ref| at 7.3e-4 (out) and
// 1.7e-3 (dqkv), the rounding errors mostly cancelling. Hence rel = 5e-3 for out and 1.2e-2 for dqkv
// (the worst case plus the f32 part), 1e-5 for lse (f32 throughout, measured 1.5e-7).
// A real mistake is far outside: a mask admitting the next key changes row 0 from v₀ to a mix of v₀
// and v₁; a wrong tile, a missing rescale of O or a missing Dᵢ changes rows by O(1) of their values; a
// scale of 1/D or without log₂e reshapes every softmax (measured with such mutations of the kernels in
// the emulation: 0.2 to 25 of max|ref|, against 5e-3 and 1.2e-2). The tensor-core and SIMT kernels
// must agree within the sum of their tolerances. The tests print every worst error ([gpu-vs-cpu] lines,
// collected by tools/gpu-check.sh).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#if KRAKEN_WITH_CUDA
#include <cuda_runtime.h>
#endif

#include "kernels/attention.h"
#include "kernels/elementwise.h"
#include "runtime/allocator.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "runtime/tensor.h"
#include "tests/gpu/attention_test_util.h"
#include "tests/gpu/gpu_test_util.h"

namespace kraken::kernels {
namespace {

using runtime::Device;
using runtime::DType;
using runtime::Shape;
using runtime::Tensor;
using Shape4 = testing::AttentionShape;

// The wgmma tests' HangWatch limits: one kernel at the test shapes (milliseconds on a GPU; the training
// shapes' tens), and a whole test with its CPU reference (seconds). Far above a slow run, far below
// gpu-check's 90-second limit on the lot, which a hang would otherwise use up.
constexpr double kHangSeconds = 10.0, kHangSecondsPerTest = 45.0;

#if KRAKEN_WITH_CUDA

using testing::AttentionCase;
using testing::bits_of;
using testing::DeviceBf16;

constexpr double kOneUlp = testing::kOneBf16Ulp;
constexpr double kRelOut = testing::kTensorCoreRelOut, kRelGrad = testing::kTensorCoreRelGrad,
                 kRelLse = testing::kTensorCoreRelLse;  // the tensor-core kernels (above)
constexpr double kSimtOut = 1e-5, kSimtGrad = 2e-5, kSimtLse = 1e-5;  // the SIMT kernels (bf16_kernels_cuda_test)

Device gpu() { return Device::cuda(0); }
CUstream_st* stream() { return runtime::compute_stream(gpu()); }

// N(0, std²) values rounded to bf16 on the CPU: the exact inputs of both sides.
Tensor bf16_input(const Shape& shape, uint64_t seed, float std = 1.0f) {
  return testing::random_tensor(shape, seed, std).to(DType::BF16);
}

std::vector<float> widen(const std::vector<uint16_t>& b) { return testing::widen_bits(b); }

// got (bf16 values, widened) against ref: |got − ref| ≤ 2⁻⁷·|ref| + rel·max|ref| (ulp = false: without
// the 2⁻⁷ term, for f32 outputs).
void expect_close(const std::vector<float>& got, const std::vector<float>& ref, double rel, bool ulp,
                  const std::string& what) {
  testing::expect_within_ulp(got, ref, ulp ? kOneUlp : 0.0, rel, what);
}


// What one implementation returns for the same inputs.
struct Results {
  std::vector<float> out, lse, dqkv;
  std::vector<uint16_t> out_bits, dqkv_bits;
};

enum class Path { kTc, kMma, kSimt, kDispatch, kWgmma, kWgmmaForward };
const char* path_name(Path p) {
  switch (p) {
    case Path::kTc: return "tc";
    case Path::kMma: return "mma";
    case Path::kWgmma: return "wgmma";
    case Path::kWgmmaForward: return "wgmma forward, mma backward";
    case Path::kSimt: return "simt";
    case Path::kDispatch: break;
  }
  return "dispatch";
}

// Forward from qkv, and backward from the given out, lse, dout into dqkv (starting at dqkv0).
Results run(Path path, const Shape4& s, const std::vector<uint16_t>& qkv, const std::vector<uint16_t>& out_in,
            const std::vector<float>& lse_in, const std::vector<uint16_t>& dout, const std::vector<uint16_t>& dqkv0,
            int64_t offset) {
  const int64_t B = s.B, T = s.T, C = s.C, NH = s.NH;
  DeviceBf16 qkv_d(qkv, offset), out_d(std::vector<uint16_t>(static_cast<size_t>(B * T * C), 0x7fc0), offset);
  Tensor lse_d = Tensor::full({B, NH, T}, -12345.0f).to(gpu());
  DeviceBf16 out_in_d(out_in, offset), dout_d(dout, offset), dqkv_d(dqkv0, offset);
  const Tensor lse_in_d = Tensor::from_vector(lse_in, {B, NH, T}).to(gpu());
  float* lse = lse_d.data<float>();
  const float* lse_b = lse_in_d.data<float>();
  switch (path) {
    case Path::kTc:
      attention_forward_bf16_tc_cuda(out_d.ptr(), lse, qkv_d.ptr(), B, T, C, NH, stream());
      attention_backward_bf16_tc_cuda(dqkv_d.ptr(), dout_d.ptr(), qkv_d.ptr(), out_in_d.ptr(), lse_b, B, T, C, NH,
                                      stream());
      break;
    case Path::kMma:
      attention_forward_bf16_mma_cuda(out_d.ptr(), lse, qkv_d.ptr(), B, T, C, NH, stream());
      attention_backward_bf16_mma_cuda(dqkv_d.ptr(), dout_d.ptr(), qkv_d.ptr(), out_in_d.ptr(), lse_b, B, T, C, NH,
                                       stream());
      break;
    case Path::kWgmma:
      attention_forward_bf16_wgmma_cuda(out_d.ptr(), lse, qkv_d.ptr(), B, T, C, NH, stream());
      attention_backward_bf16_wgmma_cuda(dqkv_d.ptr(), dout_d.ptr(), qkv_d.ptr(), out_in_d.ptr(), lse_b, B, T, C, NH,
                                         stream());
      break;
    case Path::kWgmmaForward:
      attention_forward_bf16_wgmma_cuda(out_d.ptr(), lse, qkv_d.ptr(), B, T, C, NH, stream());
      attention_backward_bf16_mma_cuda(dqkv_d.ptr(), dout_d.ptr(), qkv_d.ptr(), out_in_d.ptr(), lse_b, B, T, C, NH,
                                       stream());
      break;
    case Path::kSimt:
      attention_forward_bf16_simt_cuda(out_d.ptr(), lse, qkv_d.ptr(), B, T, C, NH, stream());
      attention_backward_bf16_simt_cuda(dqkv_d.ptr(), dout_d.ptr(), qkv_d.ptr(), out_in_d.ptr(), lse_b, B, T, C, NH,
                                        stream());
      break;
    case Path::kDispatch:
      attention_forward_bf16_cuda(out_d.ptr(), lse, qkv_d.ptr(), B, T, C, NH, stream());
      attention_backward_bf16_cuda(dqkv_d.ptr(), dout_d.ptr(), qkv_d.ptr(), out_in_d.ptr(), lse_b, B, T, C, NH,
                                   stream());
      break;
  }
  Results r;
  r.out_bits = out_d.bits();
  r.dqkv_bits = dqkv_d.bits();
  r.out = widen(r.out_bits);
  r.dqkv = widen(r.dqkv_bits);
  r.lse = lse_d.to_vector();
  return r;
}

// The inputs of one case and the CPU reference on them, accumulating into non-zero dqkv0.
AttentionCase make_case(const Shape4& s, uint64_t seed) {
  return testing::attention_case(s, seed, testing::GradientStart::kRandom);
}

void check_tc_against_cpu(const Shape4& s, int64_t offset = 0, Path path = Path::kTc) {
  const std::string what = std::string("attention ") + path_name(path) + " " + s.str() +
                           (offset ? " (buffers " + std::to_string(offset) + " elements off alignment)" : "");
  const AttentionCase c = make_case(s, 60 + static_cast<uint64_t>(s.T + s.C));
  const Results r = run(path, s, c.qkv, c.out_rounded_bits, c.lse, c.dout, c.dqkv0, offset);
  expect_close(r.out, c.out_rounded, kRelOut, true, what + ": out");
  expect_close(r.lse, c.lse, kRelLse, false, what + ": lse");
  expect_close(r.dqkv, c.dqkv, kRelGrad, true, what + ": dqkv +=");
  // The first row of every head attends to itself alone: its weight is exactly 1, so out = v₀ exactly.
  const std::vector<float> qkv = widen(c.qkv);
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t d = 0; d < s.C; ++d) {
      const float v0 = qkv[static_cast<size_t>(b * s.T * 3 * s.C + 2 * s.C + d)];
      ASSERT_EQ(r.out[static_cast<size_t>(b * s.T * s.C + d)], v0) << what << ": out at b=" << b << " t=0 column " << d;
    }
  }
}

bool tc_supported(int64_t D) { return attention_bf16_tc_supported(D); }
bool mma_supported(int64_t D) { return attention_bf16_mma_supported(D); }
bool wgmma_supported(int64_t D) { return attention_bf16_wgmma_supported(D); }
bool wgmma_backward_supported(int64_t D) { return attention_bf16_wgmma_backward_supported(D); }

// The wgmma probe's three operand routes (kernels/attention.h) against the host's product of small
// integers (exact in bf16 and in f32 sums): a wrong reading of the descriptors' strides, of the transpose
// bits or of the register layouts gives other numbers, not rounding.
void check_wgmma_probe() {
  std::vector<float> a(64 * 32), b(32 * 64);
  for (size_t i = 0; i < a.size(); ++i) {
    a[i] = static_cast<float>(static_cast<int>(i * 7 % 11) - 5);
    b[i] = static_cast<float>(static_cast<int>(i * 5 % 13) - 6);
  }
  const Tensor a_d = Tensor::from_vector(a, {64, 32}).to(DType::BF16).to(gpu());
  const Tensor b_d = Tensor::from_vector(b, {32, 64}).to(DType::BF16).to(gpu());
  // The elements of the probe's d that differ from the host's product (the first four reported when `report`).
  auto wrong_elements = [&](int way, bool exchanged, bool report) {
    Tensor d = Tensor::full({64, 64}, -1.0f).to(gpu());
    wgmma_layout_probe_cuda(d.data<float>(), a_d.data<uint16_t>(), b_d.data<uint16_t>(), way, exchanged, stream());
    const std::vector<float> got = d.to_vector();
    int wrong = 0;
    for (int r = 0; r < 64; ++r)
      for (int c = 0; c < 64; ++c) {
        float want = 0.0f;
        for (int k = 0; k < 32; ++k) want += a[static_cast<size_t>(r * 32 + k)] * b[static_cast<size_t>(k * 64 + c)];
        if (got[static_cast<size_t>(r * 64 + c)] != want && wrong++ < 4 && report)
          ADD_FAILURE() << "wgmma probe way " << way << ": d[" << r << "][" << c << "] = "
                        << got[static_cast<size_t>(r * 64 + c)] << ", want " << want;
      }
    return wrong;
  };
  for (int way = 0; way < 3; ++way) {
    const char* route = way == 0 ? "both K-major" : way == 1 ? "both MN-major" : "A in registers, B MN-major";
    const int wrong = wrong_elements(way, false, true);
    std::printf("[gpu-wgmma] probe way %d (%s): %d of 4096 elements wrong\n", way, route, wrong);
    std::fflush(stdout);  // tools/gpu-check.sh keeps these lines even where a later kernel hangs
    // Where our reading of the descriptors fails, the other one in the same run: if it is right, the fix is
    // to exchange the strides in wgmma::k_major or mn_major (and in the emulation's decoding).
    if (wrong != 0)
      std::printf("[gpu-wgmma] probe way %d (%s) with each descriptor's LBO and SBO exchanged: %d of 4096 wrong\n",
                  way, route, wrong_elements(way, true, false));
    std::fflush(stdout);
  }
}

// The mbarrier pipeline probe (kernels/attention.h): a producer warp's cp.async tiles through two stages
// under full/empty mbarriers to a consumer warp, which sums another lane's piece of each. Exact sums (the
// same additions in the same order as here) say the barriers made every copy visible before it was read
// and no stage was refilled under a reader. The first GPU run of kernels/cuda/mbarrier.h's PTX.
void check_mbarrier_probe() {
  for (const int tiles : {1, 2, 7, 64}) {
    std::vector<float> x(static_cast<size_t>(128 * tiles));
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(static_cast<int>(i * 37 % 101) - 50) / 8.0f;
    const Tensor x_d = Tensor::from_vector(x, {static_cast<int64_t>(x.size())}).to(gpu());
    Tensor sums = Tensor::full({32}, -1.0f).to(gpu());
    std::vector<float> got;
    {
      testing::HangWatch watch("the mbarrier pipeline probe, " + std::to_string(tiles) + " tiles", kHangSeconds);
      mbarrier_pipeline_probe_cuda(sums.data<float>(), x_d.data<float>(), tiles, 0, stream());
      got = sums.to_vector();
    }
    int wrong = 0;
    for (int lane = 0; lane < 32; ++lane) {
      float want = 0.0f;
      for (int t = 0; t < tiles; ++t) {
        const float* p = &x[static_cast<size_t>(128 * t + 4 * ((lane + 1) % 32))];
        want += p[0] + p[1] + p[2] + p[3];
      }
      if (got[static_cast<size_t>(lane)] != want && wrong++ < 4)
        ADD_FAILURE() << "mbarrier probe, " << tiles << " tiles: lane " << lane << " summed "
                      << got[static_cast<size_t>(lane)] << ", want " << want;
    }
    std::printf("[gpu-wgmma] mbarrier pipeline probe, %d tiles: %d of 32 sums wrong\n", tiles, wrong);
    std::fflush(stdout);
  }
}

// The pipelined wgmma kernels (the forward and the backward's dq and dk/dv kernels, each with and without
// ping-pong turns: a producer warpgroup, an mbarrier ring, setmaxnreg, named barriers) against the lockstep ones: the
// same arithmetic, so the same bits of out, lse and dqkv —
// on a GPU the check that their barriers, proxy fences and register hand-over hold (the CPU emulation
// checks the order of the pipeline, not the PTX). Shapes: a short and a wrapped ring, blocks whose second
// warpgroup has no queries; or the training shapes (GPT-2's D = 64 heads, the Kraken preset's D = 168,
// T = 1024: many blocks an SM in turn, too slow for the sanitizers). Each kernel under a HangWatch, and
// only the kernels KRAKEN_CUDA_WGMMA allows (the others' counts read "left out"): where gpu-check found
// the turns wrong or hung, it runs this again under no-ping-pong.
void check_pipelined_kernels(bool training_shapes) {
  struct Case {
    int64_t B, T, D, NH;
  };
  const std::vector<Case> small = {{2, 1, 64, 2}, {2, 65, 128, 2}, {1, 300, 168, 2}, {2, 520, 64, 2}};
  const std::vector<Case> training = {{4, 1024, 64, 12}, {4, 1024, 168, 3}, {2, 1024, 128, 4}};
  for (const Case& k : training_shapes ? training : small) {
    ASSERT_TRUE(attention_bf16_wgmma_pipelined_supported(k.D)) << "D = " << k.D;
    const int64_t C = k.D * k.NH, n = k.B * k.T * C;
    // (no CPU reference: MatchesTheRoundedCpu holds the kernels to it, and at T = 1024 it would cost seconds)
    std::mt19937 rng(120 + static_cast<uint32_t>(k.T + k.D));
    auto random_bits = [&](int64_t count, float stddev) {
      std::normal_distribution<float> normal(0.0f, stddev);
      std::vector<float> values(static_cast<size_t>(count));
      for (float& v : values) v = normal(rng);
      return bits_of(Tensor::from_vector(values, {count}).to(DType::BF16));
    };
    const std::vector<uint16_t> qkv = random_bits(3 * n, 1.5f), dout = random_bits(n, 1.0f),
                                dqkv0 = random_bits(3 * n, 0.5f);
    const DeviceBf16 qkv_d(qkv, 0), dout_d(dout, 0);
    // Each pipelined kernel runs on its own, finished before the next, after a line naming it and under a
    // HangWatch: where one hangs, the watch's [gpu-hang] line says which (and the log's last plain line,
    // had the watch itself failed: not [gpu-wgmma] lines, which the report's summary keeps).
    auto starting = [&](const char* what) {
      std::printf("pipelined kernels B=%lld T=%lld D=%lld: %s\n", static_cast<long long>(k.B),
                  static_cast<long long>(k.T), static_cast<long long>(k.D), what);
      std::fflush(stdout);
    };
    const std::string shape = "B=" + std::to_string(k.B) + " T=" + std::to_string(k.T) + " D=" + std::to_string(k.D);
    // Runs a kernel (launch) under a watch, finished before the next.
    auto run_watched = [&](const char* what, const std::function<void()>& launch) {
      starting(what);
      testing::HangWatch watch(std::string("pipelined kernels ") + shape + ": " + what, kHangSeconds);
      launch();
      runtime::synchronize(gpu());
    };
    constexpr int64_t kLeftOut = -1;
    auto count = [](int64_t wrong) { return wrong == kLeftOut ? std::string("left out") : std::to_string(wrong); };
    DeviceBf16 out_lockstep(std::vector<uint16_t>(static_cast<size_t>(n), 0x1234), 0);
    Tensor lse_lockstep = Tensor::full({k.B, k.NH, k.T}, -2.0f).to(gpu());
    attention_forward_bf16_wgmma_lockstep_cuda(out_lockstep.ptr(), lse_lockstep.data<float>(), qkv_d.ptr(), k.B, k.T,
                                               C, k.NH, stream());
    const std::vector<uint16_t> out_want = out_lockstep.bits();
    const std::vector<float> lse_want = lse_lockstep.to_vector();
    // The forward with ping-pong turns (attention_forward_bf16_wgmma_cuda's), then without: elements of out
    // and lse that differ from the lockstep kernel's.
    int64_t forward_wrong[2] = {0, 0};
    for (const bool ping_pong : {true, false}) {
      int64_t& wrong = forward_wrong[ping_pong ? 0 : 1];
      if (!attention_wgmma_kernels_allow(true, ping_pong)) {
        wrong = kLeftOut;
        continue;
      }
      DeviceBf16 out(std::vector<uint16_t>(static_cast<size_t>(n), 0x7fc0), 0);
      Tensor lse = Tensor::full({k.B, k.NH, k.T}, -1.0f).to(gpu());
      run_watched(ping_pong ? "the forward with ping-pong" : "the forward without ping-pong", [&] {
        attention_forward_bf16_wgmma_kernel_cuda(out.ptr(), lse.data<float>(), qkv_d.ptr(), k.B, k.T, C, k.NH, true,
                                                 ping_pong, stream());
      });
      const std::vector<uint16_t> got = out.bits();
      const std::vector<float> got_lse = lse.to_vector();
      for (size_t i = 0; i < got.size(); ++i) wrong += got[i] != out_want[i];
      for (size_t i = 0; i < got_lse.size(); ++i) wrong += std::memcmp(&got_lse[i], &lse_want[i], sizeof(float)) != 0;
    }
    // The backward from the lockstep forward's out and lse (so a difference is the backward's), with one
    // kernel pipelined at a time: the dq kernel writes dqkv's q columns, the dk/dv kernel its k and v
    // columns, so each count is that kernel's.
    DeviceBf16 dqkv_lockstep(dqkv0, 0);
    attention_backward_bf16_wgmma_lockstep_cuda(dqkv_lockstep.ptr(), dout_d.ptr(), qkv_d.ptr(), out_lockstep.ptr(),
                                                lse_lockstep.data<float>(), k.B, k.T, C, k.NH, stream());
    const std::vector<uint16_t> dqkv_want = dqkv_lockstep.bits();
    // the dq kernel's with ping-pong and without, the dk/dv kernel's with and without
    int64_t backward_wrong[4] = {0, 0, 0, 0};
    const char* const backward_kernel[4] = {"the backward's dq kernel with ping-pong",
                                            "the backward's dq kernel without ping-pong",
                                            "the backward's dk/dv kernel with ping-pong",
                                            "the backward's dk/dv kernel without ping-pong"};
    for (int which = 0; which < 4; ++which) {
      const bool dq = which < 2, ping_pong = which % 2 == 0;
      if (!attention_wgmma_kernels_allow(true, ping_pong)) {
        backward_wrong[which] = kLeftOut;
        continue;
      }
      DeviceBf16 dqkv(dqkv0, 0);
      run_watched(backward_kernel[which], [&] {
        attention_backward_bf16_wgmma_kernels_cuda(dqkv.ptr(), dout_d.ptr(), qkv_d.ptr(), out_lockstep.ptr(),
                                                   lse_lockstep.data<float>(), k.B, k.T, C, k.NH, dq, !dq, ping_pong,
                                                   stream());
      });
      const std::vector<uint16_t> got = dqkv.bits();
      for (size_t i = 0; i < got.size(); ++i) backward_wrong[which] += got[i] != dqkv_want[i];
    }
    std::printf("[gpu-wgmma] pipelined kernels B=%lld T=%lld D=%lld NH=%lld, elements differing from the lockstep "
                "kernels' (with ping-pong / without): forward %s / %s of %zu out and lse; dq kernel %s / %s, "
                "dk/dv kernel %s / %s of %zu dqkv\n",
                static_cast<long long>(k.B), static_cast<long long>(k.T), static_cast<long long>(k.D),
                static_cast<long long>(k.NH), count(forward_wrong[0]).c_str(), count(forward_wrong[1]).c_str(),
                out_want.size() + lse_want.size(), count(backward_wrong[0]).c_str(), count(backward_wrong[1]).c_str(),
                count(backward_wrong[2]).c_str(), count(backward_wrong[3]).c_str(), dqkv_want.size());
    std::fflush(stdout);
    const char* const forward_kernel[2] = {"the forward with ping-pong", "the forward without ping-pong"};
    for (int which = 0; which < 2; ++which) {
      if (forward_wrong[which] != kLeftOut) {
        EXPECT_EQ(forward_wrong[which], 0) << forward_kernel[which] << ", " << shape;
      }
    }
    for (int which = 0; which < 4; ++which) {
      if (backward_wrong[which] != kLeftOut) {
        EXPECT_EQ(backward_wrong[which], 0) << backward_kernel[which] << ", " << shape;
      }
    }
  }
  EXPECT_FALSE(attention_bf16_wgmma_pipelined_supported(256));
}

bool wgmma_pipelined_allowed() { return attention_wgmma_kernels_allow(true, false); }

#else  // a build without CUDA: the tests skip before calling these

enum class Path { kTc, kMma, kWgmma, kWgmmaForward };
void check_tc_against_cpu(const Shape4&, int64_t = 0, Path = Path::kTc) {}
bool tc_supported(int64_t) { return false; }
bool mma_supported(int64_t) { return false; }
bool wgmma_supported(int64_t) { return false; }
bool wgmma_backward_supported(int64_t) { return false; }
void check_wgmma_probe() {}
void check_mbarrier_probe() {}
void check_pipelined_kernels(bool) {}
bool wgmma_pipelined_allowed() { return false; }

#endif  // KRAKEN_WITH_CUDA

TEST(GpuAttentionTc, MatchesTheRoundedCpuForHeadSizesAndLengths) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  for (int64_t D : {64, 42, 128, 24})
    for (int64_t T : {1, 17, 64, 65, 100, 257}) check_tc_against_cpu({2, T, 3 * D, 3});
}

TEST(GpuAttentionTc, MatchesTheRoundedCpuWithUnalignedBuffersAndSmallHeads) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  check_tc_against_cpu({1, 77, 2 * 64, 2}, 1);  // every buffer 2-byte aligned: the scalar copies
  check_tc_against_cpu({1, 70, 96, 1}, 2);      // D = 96, only 4-byte aligned: the 2-element copies
  check_tc_against_cpu({2, 130, 2 * 16, 2});    // D = 16: no padding, one 16-column fragment
  check_tc_against_cpu({2, 65, 2 * 5, 2});      // D = 5: mostly padding
}

TEST(GpuAttentionTc, MatchesTheRoundedCpuForHeadsAbove128) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  // Padded to multiples of 32: the Kraken presets' 168 (4-way 125M; Dp = 192), 161 (4-way 350M) and 209
  // (6-way 125M; Dp = 224, where the dk/dv kernel spills a little), and 256, the largest (Dp = D).
  for (int64_t D : {168, 161, 209, 256}) {
    if (!tc_supported(D)) {
      std::printf("D = %lld: not enough shared memory per block on this device, skipped\n", static_cast<long long>(D));
      continue;
    }
    for (int64_t T : {1, 65, 200}) check_tc_against_cpu({2, T, 2 * D, 2});
  }
}

// The mma.sync kernels on the same cases (register-resident softmax, ldmatrix, cp.async double
// buffering up to Dp = 128, one buffer above).
TEST(GpuAttentionMma, MatchesTheRoundedCpuForHeadSizesAndLengths) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  for (int64_t D : {64, 42, 128, 24})
    for (int64_t T : {1, 17, 64, 65, 100, 257}) check_tc_against_cpu({2, T, 3 * D, 3}, 0, Path::kMma);
}

TEST(GpuAttentionMma, MatchesTheRoundedCpuWithUnalignedBuffersAndSmallHeads) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  check_tc_against_cpu({1, 77, 2 * 64, 2}, 1, Path::kMma);  // 2-byte aligned: plain copies, no cp.async
  check_tc_against_cpu({1, 70, 96, 1}, 2, Path::kMma);
  check_tc_against_cpu({2, 130, 2 * 16, 2}, 0, Path::kMma);  // cp.async, three tiles through two buffers
  check_tc_against_cpu({2, 65, 2 * 5, 2}, 0, Path::kMma);
}

TEST(GpuAttentionMma, HandlesMoreThan65535Heads) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  check_tc_against_cpu({35000, 3, 2 * 16, 2}, 0, Path::kMma);  // B·NH = 70000 blocks along grid.x
}

TEST(GpuAttentionMma, MatchesTheRoundedCpuForHeadsAbove128) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  for (int64_t D : {168, 161, 209, 256}) {
    if (!mma_supported(D)) {
      std::printf("D = %lld: not enough shared memory per block on this device, skipped\n", static_cast<long long>(D));
      continue;
    }
    for (int64_t T : {1, 65, 200}) check_tc_against_cpu({2, T, 2 * D, 2}, 0, Path::kMma);
  }
}

// The wgmma forward (kernels/cuda/attention_wgmma.cu) needs a compute capability 9.0 device (sm_90a code).
// (Every wgmma test under a HangWatch: a hung kernel ends the process within the watch's limit, and its
// [gpu-hang] line names what hung. The pipelined kernels and the mbarrier probe only where
// KRAKEN_CUDA_WGMMA allows pipelined kernels: under lockstep, the setting gpu-check falls back to where
// they failed, they skip.)
#define KRAKEN_REQUIRE_WGMMA_PIPELINED()                                                                      \
  do {                                                                                                        \
    if (!wgmma_pipelined_allowed())                                                                           \
      GTEST_SKIP() << "KRAKEN_CUDA_WGMMA=lockstep: the pipelined kernels (and the mbarrier probe) left out";  \
  } while (0)

TEST(GpuAttentionWgmma, LayoutProbeIsAMatrixProduct) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  if (!wgmma_supported(64)) GTEST_SKIP() << "wgmma needs a compute capability 9.0 device (H100, H200)";
  testing::HangWatch watch("GpuAttentionWgmma.LayoutProbeIsAMatrixProduct", kHangSecondsPerTest);
  check_wgmma_probe();
}

// The mbarrier pipeline a warp-specialised wgmma attention would stream its tiles through (sm_90 PTX).
TEST(GpuAttentionWgmma, MbarrierPipelineProbeMovesEveryTile) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  if (!wgmma_supported(64)) GTEST_SKIP() << "the probe is sm_90a code: a compute capability 9.0 device (H100, H200)";
  KRAKEN_REQUIRE_WGMMA_PIPELINED();
  check_mbarrier_probe();
}

TEST(GpuAttentionWgmma, PipelinedKernelsAreTheLockstepOnesBits) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  if (!wgmma_supported(64)) GTEST_SKIP() << "wgmma needs a compute capability 9.0 device (H100, H200)";
  KRAKEN_REQUIRE_WGMMA_PIPELINED();
  check_pipelined_kernels(false);
}

TEST(GpuAttentionWgmma, PipelinedKernelsAreTheLockstepOnesBitsAtTrainingShapes) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  if (!wgmma_supported(64)) GTEST_SKIP() << "wgmma needs a compute capability 9.0 device (H100, H200)";
  KRAKEN_REQUIRE_WGMMA_PIPELINED();
  check_pipelined_kernels(true);
}

// (From here the wgmma entry points: the kernels KRAKEN_CUDA_WGMMA asks for.)
TEST(GpuAttentionWgmma, MatchesTheRoundedCpu) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  if (!wgmma_supported(64)) GTEST_SKIP() << "wgmma needs a compute capability 9.0 device (H100, H200)";
  testing::HangWatch watch("GpuAttentionWgmma.MatchesTheRoundedCpu", kHangSecondsPerTest);
  // Its head sizes (168: the Kraken 4-way preset's, q and k padded to 176; 256: GPT-2's shape at degree 4,
  // whose backward forms dK and dV in kernels of their own and streams 32-key tiles in dq); T from one
  // query to three 128-row blocks, with a block whose second warpgroup has one row (65) or none (64, 129 →
  // 1), and B·NH = 4 or 6. The backward runs on the CPU's out and lse, as in the other tests; at D = 256
  // the wgmma forward also beside the mma backward (any backward takes any forward's out and lse).
  for (int64_t D : {64, 128, 168, 256}) {
    ASSERT_TRUE(wgmma_supported(D)) << "D = " << D;
    ASSERT_TRUE(wgmma_backward_supported(D)) << "D = " << D;
    for (int64_t T : {1, 17, 64, 65, 129, 257}) check_tc_against_cpu({2, T, 2 * D, 2}, 0, Path::kWgmma);
  }
  check_tc_against_cpu({2, 100, 2 * 256, 2}, 0, Path::kWgmmaForward);
  check_tc_against_cpu({2, 100, 3 * 64, 3}, 0, Path::kWgmma);
  EXPECT_FALSE(wgmma_supported(42));
}


TEST(GpuAttentionTc, HandlesMoreThan65535Heads) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  // B·NH = 70000 blocks along grid.x (the SIMT kernels put b·h on grid.y and stop at 65535).
  check_tc_against_cpu({35000, 3, 2 * 16, 2});
}

#if KRAKEN_WITH_CUDA
// Two implementations on the same inputs, within the sum of their tolerances against the CPU.
void check_paths_agree(const Shape4& s, Path first, Path second, double rel_out, double rel_lse, double rel_grad) {
  const std::string what = std::string("attention ") + path_name(first) + " vs " + path_name(second) + " " + s.str();
  const AttentionCase c = make_case(s, 90 + static_cast<uint64_t>(s.T));
  const Results a = run(first, s, c.qkv, c.out_rounded_bits, c.lse, c.dout, c.dqkv0, 0);
  const Results b = run(second, s, c.qkv, c.out_rounded_bits, c.lse, c.dout, c.dqkv0, 0);
  expect_close(a.out, b.out, rel_out, true, what + ": out");
  expect_close(a.lse, b.lse, rel_lse, false, what + ": lse");
  expect_close(a.dqkv, b.dqkv, rel_grad, true, what + ": dqkv +=");
}
void check_tc_against_simt(const Shape4& s) {
  check_paths_agree(s, Path::kTc, Path::kSimt, kRelOut + kSimtOut, kRelLse + kSimtLse, kRelGrad + kSimtGrad);
  check_paths_agree(s, Path::kMma, Path::kSimt, kRelOut + kSimtOut, kRelLse + kSimtLse, kRelGrad + kSimtGrad);
}
void check_mma_against_tc(const Shape4& s) {
  check_paths_agree(s, Path::kMma, Path::kTc, 2 * kRelOut, 2 * kRelLse, 2 * kRelGrad);
}
// The two mma-formulated families, wgmma and mma.sync: the same arithmetic in different tensor-core
// orders, so within the sum of their tolerances (printed as [gpu-vs-cpu] lines by check_paths_agree).
void check_wgmma_against_mma(const Shape4& s) {
  check_paths_agree(s, Path::kWgmma, Path::kMma, 2 * kRelOut, 2 * kRelLse, 2 * kRelGrad);
}

// attention_*_bf16_cuda give bit for bit what the path they take gives (every kernel here is
// deterministic): the one attention_bf16_kernels(D) names.
void check_supported_sizes() {
  EXPECT_FALSE(attention_bf16_tc_supported(0));
  EXPECT_FALSE(attention_bf16_mma_supported(0));
  // Every D ≤ 256 needs at most 127.5 KiB per block (dk/dv at Dp = 256), which the A100 (163 KiB) and
  // Hopper (227 KiB) have; smaller parts (sm_86: 99 KiB) stop earlier.
  int device = 0, optin = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), cudaSuccess);
  if (optin >= 133 * 1024) {  // the mma kernels' largest block: 132.5 KiB (backward, Dp = 256)
    for (int64_t D = 1; D <= 256; ++D) {
      EXPECT_TRUE(attention_bf16_tc_supported(D)) << D;
      EXPECT_TRUE(attention_bf16_mma_supported(D)) << D;
    }
  }
  EXPECT_FALSE(attention_bf16_tc_supported(257));
  EXPECT_FALSE(attention_bf16_mma_supported(257));
}

void check_dispatch(const Shape4& s) {
  const int64_t D = s.C / s.NH;
  const AttentionBf16Kernels kernels = attention_bf16_kernels(D);
  const char* env = std::getenv("KRAKEN_CUDA_ATTENTION");
  const std::string choice = env ? env : "";
  AttentionBf16Kernels want = AttentionBf16Kernels::kSimt;
  if (choice == "tc") {
    if (attention_bf16_tc_supported(D)) want = AttentionBf16Kernels::kTensorCoreWmma;
  } else if (choice == "mma") {
    if (attention_bf16_mma_supported(D)) want = AttentionBf16Kernels::kTensorCoreMma;
  } else if ((choice == "cudnn" || choice.empty() || choice == "wgmma" || choice == "wgmma-backward") &&
             attention_bf16_cudnn_supported(D)) {
    want = AttentionBf16Kernels::kCudnn;
  } else if (choice != "simt") {
    if (D <= kAttentionMmaDefaultMaxHead && attention_bf16_mma_supported(D))
      want = AttentionBf16Kernels::kTensorCoreMma;
    else if (attention_bf16_tc_supported(D))
      want = AttentionBf16Kernels::kTensorCoreWmma;
  }
  EXPECT_EQ(kernels, want) << "D = " << D;
  // KRAKEN_CUDA_ATTENTION=wgmma takes the wgmma kernels per call, before the choice above, where they
  // take the head size both ways (the others go as that choice says).
  const bool wgmma =
      choice == "wgmma" && attention_bf16_wgmma_supported(D) && attention_bf16_wgmma_backward_supported(D);
  const AttentionCase c = make_case(s, 120 + static_cast<uint64_t>(s.T));
  // The dispatch overwrites dqkv (it zeroes it for the kernels, which add): NaNs in, the gradient out,
  // as the kernel itself adds it to zeros.
  const std::vector<uint16_t> nans(c.dqkv0.size(), uint16_t{0x7fc0}), zeros(c.dqkv0.size(), uint16_t{0});
  if (choice == "wgmma-backward" && attention_bf16_wgmma_backward_supported(D)) {
    // The backward alone is the wgmma kernels' (from the given out and lse, whoever made them); the forward
    // is the choice above's (cuDNN's: GpuAttentionCudnn.DispatchHonoursKrakenCudaAttention checks it).
    const Results a = run(Path::kDispatch, s, c.qkv, c.out_rounded_bits, c.lse, c.dout, nans, 0);
    const Results b = run(Path::kWgmma, s, c.qkv, c.out_rounded_bits, c.lse, c.dout, zeros, 0);
    EXPECT_EQ(a.dqkv_bits, b.dqkv_bits) << "attention dispatch " << s.str() << " (wgmma-backward): dqkv";
    std::printf("[gpu-vs-cpu] attention dispatch %s (%s forward, wgmma backward): the backward equals the wgmma "
                "kernels' bit for bit\n", s.str().c_str(), attention_bf16_kernels_name(kernels));
    return;
  }
  if (kernels == AttentionBf16Kernels::kCudnn && !wgmma) {  // (its overwriting backward: attention_cudnn_cuda_test.cpp)
    std::printf("attention dispatch %s: cuDNN, checked by GpuAttentionCudnn.DispatchHonoursKrakenCudaAttention\n",
                s.str().c_str());
    return;
  }
  const Path path = wgmma                                              ? Path::kWgmma
                    : kernels == AttentionBf16Kernels::kTensorCoreMma    ? Path::kMma
                    : kernels == AttentionBf16Kernels::kTensorCoreWmma ? Path::kTc
                                                                       : Path::kSimt;
  const std::string what = "attention dispatch " + s.str() + " (" +
                           (wgmma ? "wgmma" : attention_bf16_kernels_name(kernels)) + ")";
  const Results a = run(Path::kDispatch, s, c.qkv, c.out_rounded_bits, c.lse, c.dout, nans, 0);
  const Results b = run(path, s, c.qkv, c.out_rounded_bits, c.lse, c.dout, zeros, 0);
  EXPECT_EQ(a.out_bits, b.out_bits) << what << ": out";
  EXPECT_EQ(a.lse, b.lse) << what << ": lse";
  EXPECT_EQ(a.dqkv_bits, b.dqkv_bits) << what << ": dqkv";
  std::printf("[gpu-vs-cpu] %s: the dispatching entry points equal their path bit for bit\n", what.c_str());
}
// The grouped mma launch (attention_*_bf16_mma_group_cuda: `count` attentions of one shape in one launch,
// forward and backward) against the one-attention mma entry points on each group: the same bits — out,
// lse and dqkv (which the mma kernels add into: both start from the same values).
void check_group_against_alone(int64_t count, int64_t B, int64_t T, int64_t C, int64_t NH) {
  const Shape shape{B, T, 3 * C}, out_shape{B, T, C}, lse_shape{B, NH, T};
  std::vector<Tensor> qkv, dout, out_g, lse_g, dqkv_g, out_a, lse_a, dqkv_a;
  for (int64_t k = 0; k < count; ++k) {
    qkv.push_back(bf16_input(shape, 400 + static_cast<uint64_t>(k)).to(gpu()));
    dout.push_back(bf16_input(out_shape, 500 + static_cast<uint64_t>(k)).to(gpu()));
    const Tensor dqkv0 = bf16_input(shape, 600 + static_cast<uint64_t>(k)).to(gpu());
    dqkv_g.push_back(dqkv0.clone()), dqkv_a.push_back(dqkv0.clone());
    for (auto* outs : {&out_g, &out_a}) outs->push_back(Tensor::empty(out_shape, DType::BF16, gpu()));
    for (auto* lses : {&lse_g, &lse_a}) lses->push_back(Tensor::empty(lse_shape, DType::F32, gpu()));
  }
  std::vector<uint16_t*> outs, dqkvs;
  std::vector<float*> lses;
  std::vector<const uint16_t*> qkvs, douts, outs_in;
  std::vector<const float*> lses_in;
  for (int64_t k = 0; k < count; ++k) {
    outs.push_back(out_g[k].data<uint16_t>()), lses.push_back(lse_g[k].data<float>());
    qkvs.push_back(qkv[k].data<uint16_t>()), douts.push_back(dout[k].data<uint16_t>());
    dqkvs.push_back(dqkv_g[k].data<uint16_t>()), outs_in.push_back(out_g[k].data<uint16_t>());
    lses_in.push_back(lse_g[k].data<float>());
  }
  attention_forward_bf16_mma_group_cuda(outs.data(), lses.data(), qkvs.data(), count, B, T, C, NH, stream());
  attention_backward_bf16_mma_group_cuda(dqkvs.data(), douts.data(), qkvs.data(), outs_in.data(), lses_in.data(), count,
                                         B, T, C, NH, stream());
  for (int64_t k = 0; k < count; ++k) {
    attention_forward_bf16_mma_cuda(out_a[k].data<uint16_t>(), lse_a[k].data<float>(), qkv[k].data<uint16_t>(), B, T,
                                    C, NH, stream());
    attention_backward_bf16_mma_cuda(dqkv_a[k].data<uint16_t>(), dout[k].data<uint16_t>(), qkv[k].data<uint16_t>(),
                                     out_a[k].data<uint16_t>(), lse_a[k].data<float>(), B, T, C, NH, stream());
    EXPECT_EQ(bits_of(out_g[k].to(Device::cpu())), bits_of(out_a[k].to(Device::cpu()))) << "out " << k;
    EXPECT_EQ(lse_g[k].to_vector(), lse_a[k].to_vector()) << "lse " << k;
    EXPECT_EQ(bits_of(dqkv_g[k].to(Device::cpu())), bits_of(dqkv_a[k].to(Device::cpu()))) << "dqkv " << k;
  }
  std::printf("[gpu-vs-cpu] the mma kernels' grouped launch of %lld (D = %lld): each group's own attention, bit for "
              "bit\n", static_cast<long long>(count), static_cast<long long>(C / NH));
}
#else
void check_group_against_alone(int64_t, int64_t, int64_t, int64_t, int64_t) {}
void check_tc_against_simt(const Shape4&) {}
void check_mma_against_tc(const Shape4&) {}
void check_wgmma_against_mma(const Shape4&) {}
void check_supported_sizes() {}
void check_dispatch(const Shape4&) {}
#endif

TEST(GpuAttentionTc, AgreesWithTheSimtKernels) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  check_tc_against_simt({2, 100, 3 * 64, 3});
  check_tc_against_simt({1, 257, 12 * 42, 12});
  check_tc_against_simt({2, 45, 2 * 128, 2});
  check_tc_against_simt({2, 130, 2 * 168, 2});  // Dp = 192: q and dO no longer held in registers
}

TEST(GpuAttentionWgmma, AgreesWithTheMmaKernels) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  if (!wgmma_supported(64)) GTEST_SKIP() << "wgmma needs a compute capability 9.0 device (H100, H200)";
  testing::HangWatch watch("GpuAttentionWgmma.AgreesWithTheMmaKernels", kHangSecondsPerTest);
  check_wgmma_against_mma({2, 300, 2 * 64, 2});
  check_wgmma_against_mma({2, 300, 2 * 168, 2});
  check_wgmma_against_mma({2, 300, 2 * 256, 2});
}

TEST(GpuAttentionMma, AgreesWithTheWmmaKernels) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  check_mma_against_tc({2, 1024, 4 * 64, 4});  // GPT-2 heads at the benchmark's T
  check_mma_against_tc({2, 300, 3 * 168, 3});    // one sub-layer of the Kraken 4-way preset
}

TEST(GpuAttentionMma, GroupIsEachInputsOwnAttention) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  check_group_against_alone(4, 2, 130, 3 * 168, 3);  // a Kraken 4-way layer's sub-layers, in one launch
  check_group_against_alone(kAttentionMaxGroups, 1, 65, 2 * 64, 2);  // as many as one launch takes
}

TEST(GpuAttentionTc, DispatchTakesOnePathForForwardAndBackward) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  check_supported_sizes();
  check_dispatch({2, 100, 2 * 64, 2});
  check_dispatch({1, 33, 2 * 168, 2});  // D = 168 (the Kraken 4-way preset): tensor cores, Dp = 192
  check_dispatch({1, 33, 2 * 209, 2});  // D = 209: WMMA by default (the mma dk/dv kernel spills there)
  check_dispatch({1, 33, 2 * 256, 2});  // D = 256 (GPT-2's shape at degree 4): cuDNN by default
  check_dispatch({1, 33, 2 * 272, 2});  // D = 272: beyond the tensor-core kernels, always SIMT
}

}  // namespace
}  // namespace kraken::kernels
