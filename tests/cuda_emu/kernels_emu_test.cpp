// The CUDA kernels' logic, run in CI without a GPU: kernels/cuda's attention (tensor cores and CUDA
// cores), layernorm, cross-entropy, elementwise, embedding, softmax, random and optimizer kernels,
// executed by the CPU emulation of CUDA (tests/cuda_emu/emu.h: every thread a fiber, the real
// barriers, WMMA fragments with scrambled layouts), against the CPU kernels on the same values.
//
// Tolerances are those of tests/gpu, where the same comparisons run on a GPU: the tensor-core
// attention rounds P and dS to bf16 before their products (5e-3 of the output's scale, 1.2e-2 of the
// gradient's, one bf16 ulp of each element on top); the other kernels compute the CPU's f32 sequence
// up to the order of their reductions (1e-5 or 2e-5 of the scale, plus one bf16 ulp where the result
// is rounded); the optimizers a few ulp per step; embedding, uniform fills and dropout are the CPU's
// bits (the emulated kernels are compiled with the same flags as the CPU ones, so the same
// contractions into fused multiply-adds).
// What a GPU adds (speed, races, device math ulps) is for tests/gpu and tools/gpu-check.sh.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cross_entropy.h"
#include "kernels/cuda/column_chunks.h"
#include "kernels/elementwise.h"
#include "kernels/embedding.h"
#include "kernels/layernorm.h"
#include "kernels/optimizer.h"
#include "kernels/random.h"
#include "kernels/softmax.h"
#include "tests/cuda_emu/emulated_kernels.h"

namespace kraken {
namespace {

namespace emu = kernels_emu;

// Runs check under both thread orders of the emulation (schedule.h).
template <typename Check>
void under_both_schedules(const Check& check) {
  for (const auto schedule : {kraken_emu::Schedule::kAscending, kraken_emu::Schedule::kDescending}) {
    SCOPED_TRACE(schedule == kraken_emu::Schedule::kAscending ? "ascending schedule" : "descending schedule");
    kraken_emu::set_schedule(schedule);
    check();
  }
  kraken_emu::set_schedule(kraken_emu::Schedule::kAscending);
}

std::vector<float> normal(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}
std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  kernels::cast_f32_to_bf16_cpu(out.data(), x.data(), static_cast<int64_t>(x.size()));
  return out;
}
std::vector<float> to_f32(const std::vector<uint16_t>& x) {
  std::vector<float> out(x.size());
  kernels::cast_bf16_to_f32_cpu(out.data(), x.data(), static_cast<int64_t>(x.size()));
  return out;
}
// x rounded to bf16 and widened again: the values a bf16 kernel sees.
std::vector<float> rounded(const std::vector<float>& x) { return to_f32(to_bf16(x)); }

double max_abs(const std::vector<float>& x) {
  double m = 0.0;
  for (float v : x) m = std::max(m, std::fabs(static_cast<double>(v)));
  return m;
}

// |got − want| ≤ rel·max|want| (+ one bf16 ulp of want when `bf16_ulp`) for every element.
void expect_close(const std::vector<float>& got, const std::vector<float>& want, double rel, bool bf16_ulp,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  const double scale = max_abs(want);
  double worst = 0.0;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_FALSE(std::isnan(got[i])) << what << ": element " << i << " is NaN";
    const double allowed = rel * scale + (bf16_ulp ? std::fabs(want[i]) / 128.0 : 0.0);
    const double excess = std::fabs(static_cast<double>(got[i]) - want[i]) - allowed;
    if (excess > worst || i == 0) worst = excess, at = i;
  }
  EXPECT_LE(worst, 0.0) << what << ": element " << at << " is " << got[at] << ", the CPU's " << want[at]
                        << " (scale " << scale << ", relative allowance " << rel << ")";
}

// ---- attention on tensor cores ----------------------------------------------------------------------

struct AttentionShape {
  int64_t B, T, D, NH;
  std::string str() const {
    return "B=" + std::to_string(B) + " T=" + std::to_string(T) + " D=" + std::to_string(D) +
           " NH=" + std::to_string(NH);
  }
};

// The two tensor-core families (kernels/attention.h): WMMA (attention_tc.cu) and mma.sync
// (attention_mma.cu); one contract, so one check.
struct TensorCoreAttention {
  const char* name;
  decltype(&emu::attention_forward_bf16_tc_cuda) forward;
  decltype(&emu::attention_backward_bf16_tc_cuda) backward;
};
const TensorCoreAttention kWmma{"WMMA", emu::attention_forward_bf16_tc_cuda, emu::attention_backward_bf16_tc_cuda};
const TensorCoreAttention kMmaSync{"mma.sync", emu::attention_forward_bf16_mma_cuda,
                                   emu::attention_backward_bf16_mma_cuda};

void check_attention(const AttentionShape& s, const TensorCoreAttention& kernels = kWmma) {
  const std::string what = std::string("emulated tensor-core attention (") + kernels.name + ") " + s.str();
  const int64_t C = s.D * s.NH, rows = s.B * s.T;
  const std::vector<uint16_t> qkv = to_bf16(normal(static_cast<size_t>(rows * 3 * C), 1, 1.5f));
  const std::vector<uint16_t> dout = to_bf16(normal(static_cast<size_t>(rows * C), 2));
  const std::vector<float> qkv_f = to_f32(qkv), dout_f = to_f32(dout);

  std::vector<uint16_t> out(static_cast<size_t>(rows * C)), dqkv(static_cast<size_t>(rows * 3 * C), 0);
  std::vector<float> lse(static_cast<size_t>(s.B * s.NH * s.T));
  kernels.forward(out.data(), lse.data(), qkv.data(), s.B, s.T, C, s.NH, nullptr);
  std::vector<float> out_cpu(out.size()), lse_cpu(lse.size()), dqkv_cpu(dqkv.size(), 0.0f);
  kernels::attention_forward_cpu(out_cpu.data(), lse_cpu.data(), qkv_f.data(), s.B, s.T, C, s.NH);
  expect_close(to_f32(out), out_cpu, 5e-3, true, what + ": out");
  expect_close(lse, lse_cpu, 1e-5, false, what + ": lse");

  // The backward from the forward's own out and lse, as the model runs it.
  kernels.backward(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), s.B, s.T, C, s.NH, nullptr);
  kernels::attention_backward_cpu(dqkv_cpu.data(), dout_f.data(), qkv_f.data(), rounded(out_cpu).data(),
                                  lse_cpu.data(), s.B, s.T, C, s.NH);
  expect_close(to_f32(dqkv), dqkv_cpu, 1.2e-2, true, what + ": dqkv");
}

TEST(CudaEmulation, TensorCoreAttentionMatchesTheCpu) {
  under_both_schedules([] {
    check_attention({1, 1, 64, 1});   // one query: the first tile, fully masked but for the diagonal
    check_attention({2, 65, 64, 2});  // a second 64-row tile with one row
    check_attention({1, 40, 42, 2});  // D = 42: padded to 48, rows 4-byte aligned (2-element copies)
    check_attention({1, 19, 5, 1});   // D = 5: odd, scalar copies, mostly padding
  });
}

TEST(CudaEmulation, TensorCoreAttentionAbove128) {
  // Above Dp = 128 q and dO are not held in registers and the backward streams 32-row tiles: the
  // Kraken 4-way heads (Dp = 192), the 6-way ones (D = 209, Dp = 224) and the largest head, 256.
  under_both_schedules([] {
    check_attention({1, 70, 168, 1});
    check_attention({1, 37, 209, 1});
    check_attention({1, 33, 256, 1});
  });
  EXPECT_TRUE(emu::attention_bf16_tc_supported(256));  // the emulated device has Hopper's shared memory
  EXPECT_FALSE(emu::attention_bf16_tc_supported(257));
}

TEST(CudaEmulation, MmaSyncAttentionMatchesTheCpu) {
  // Register-resident softmax on mma.sync fragments, ldmatrix, cp.async double buffering (D a multiple of
  // 8) or plain copies (D = 42, 5): the shapes of the WMMA test, three query tiles (T = 150: the
  // pipeline's second and third stage, a partial last tile), two heads of D = 64 with B = 2.
  under_both_schedules([] {
    check_attention({1, 1, 64, 1}, kMmaSync);
    check_attention({2, 65, 64, 2}, kMmaSync);
    check_attention({1, 150, 32, 1}, kMmaSync);
    check_attention({1, 40, 42, 2}, kMmaSync);
    check_attention({1, 19, 5, 1}, kMmaSync);
    check_attention({1, 70, 128, 1}, kMmaSync);
  });
}

// The wgmma kernels (attention_wgmma.cu); and the wgmma forward with the mma backward on its out and lse
// (any backward of the contract takes any forward's).
const TensorCoreAttention kWgmma{"wgmma", emu::attention_forward_bf16_wgmma_cuda,
                                 emu::attention_backward_bf16_wgmma_cuda};
const TensorCoreAttention kWgmmaForward{"wgmma forward, mma.sync backward", emu::attention_forward_bf16_wgmma_cuda,
                                        emu::attention_backward_bf16_mma_cuda};

TEST(CudaEmulation, WgmmaLayoutProbeIsAMatrixProduct) {
  // The operand routes the wgmma kernels use — both operands K-major, both MN-major, A from registers —
  // through wgmma.h's descriptors and the emulation's reading of them (small integers: exact sums). The
  // same probe runs on a GPU (tests/gpu), where it checks that reading against the hardware.
  std::vector<float> a(64 * 32), b(32 * 64);
  for (size_t i = 0; i < a.size(); ++i) {
    a[i] = static_cast<float>(static_cast<int>(i * 7 % 11) - 5);
    b[i] = static_cast<float>(static_cast<int>(i * 5 % 13) - 6);
  }
  const std::vector<uint16_t> a16 = to_bf16(a), b16 = to_bf16(b);
  under_both_schedules([&] {
    for (int way = 0; way < 3; ++way) {
      std::vector<float> d(64 * 64, -1.0f);
      emu::wgmma_layout_probe_cuda(d.data(), a16.data(), b16.data(), way, false, nullptr);
      for (int r = 0; r < 64; ++r)
        for (int c = 0; c < 64; ++c) {
          float want = 0.0f;
          for (int k = 0; k < 32; ++k) want += a[r * 32 + k] * b[k * 64 + c];
          ASSERT_EQ(d[r * 64 + c], want) << "way " << way << ", row " << r << ", column " << c;
        }
      // The other reading, which the GPU test tries where ours fails, must tell the two apart: with the
      // strides exchanged the same tiles are read as other matrices, and most of the product is wrong.
      std::vector<float> x(64 * 64, -1.0f);
      emu::wgmma_layout_probe_cuda(x.data(), a16.data(), b16.data(), way, true, nullptr);
      int wrong = 0;
      for (int r = 0; r < 64; ++r)
        for (int c = 0; c < 64; ++c) wrong += x[r * 64 + c] != d[r * 64 + c];
      EXPECT_GT(wrong, 2048) << "way " << way << ": the exchanged strides read nearly the same product";
    }
  });
}

TEST(CudaEmulation, WgmmaAttentionMatchesTheCpu) {
  // Blocks of two warpgroups and 128 rows — queries in the forward and the dq kernel, keys in the dk/dv
  // kernel — streaming 64-key or kQ-query tiles double-buffered: one query; a block's second warpgroup
  // with rows past T (T = 65); several blocks, partial last tiles, the dk/dv kernel's first query tile at
  // its block's first key (T = 150, two heads, B = 2: 64-query tiles; T = 200 at D = 168 and 128: 32-query
  // tiles); the Kraken 4-way head (D = 168, q and k padded to 176 with zeros), 128, and 256 — GPT-2's shape
  // at degree 4 — whose backward forms dK and dV in kernels of their own and streams 32-key tiles in dq
  // (T = 33: one block with a second warpgroup nearly empty; T = 150: two blocks, a partial last tile).
  under_both_schedules([] {
    check_attention({1, 1, 64, 1}, kWgmma);
    check_attention({1, 65, 64, 1}, kWgmma);
    check_attention({2, 150, 64, 2}, kWgmma);
    check_attention({1, 200, 168, 2}, kWgmma);
    check_attention({1, 70, 128, 1}, kWgmma);
    check_attention({1, 200, 128, 1}, kWgmma);
    check_attention({1, 33, 256, 1}, kWgmma);
    check_attention({1, 150, 256, 2}, kWgmma);
    check_attention({1, 33, 256, 1}, kWgmmaForward);
  });
  EXPECT_TRUE(emu::attention_bf16_wgmma_supported(168));
  EXPECT_TRUE(emu::attention_bf16_wgmma_backward_supported(168));
  EXPECT_TRUE(emu::attention_bf16_wgmma_supported(256));
  EXPECT_TRUE(emu::attention_bf16_wgmma_backward_supported(256));  // dK and dV in kernels of their own
  EXPECT_FALSE(emu::attention_bf16_wgmma_supported(42));  // no kernel for that head size: the dispatch falls back
}

// The dispatch (attention_{forward,backward}_bf16_cuda) as KRAKEN_CUDA_ATTENTION says, which it reads once
// per process: ctest runs this test unset and again under wgmma and wgmma-backward (tests/CMakeLists.txt).
// The emulation has no cuDNN, so the default's kernels are the fallback's (mma at D = 64 and 168, WMMA at
// 256). Each direction is bit for bit the entry point it should have taken; the backward overwrites dqkv
// (NaNs in) where the entry points add into zeros — the wgmma kernels writing over it themselves (every
// kernel kind: pipelined at 64 and 168, the 16-query dk/dv at 168, the split lockstep ones at 256).
TEST(CudaEmulation, AttentionDispatchFollowsKrakenCudaAttention) {
  const char* env = std::getenv("KRAKEN_CUDA_ATTENTION");
  const std::string choice = env ? env : "";
  ASSERT_TRUE(choice.empty() || choice == "wgmma" || choice == "wgmma-backward") << "not a setting this test knows";
  for (const int64_t D : {64, 168, 256}) {
    const AttentionShape s{1, 70, D, 2};
    const std::string what = "the dispatch, KRAKEN_CUDA_ATTENTION=" + choice + ", " + s.str();
    const int64_t C = D * s.NH, rows = s.B * s.T;
    const std::vector<uint16_t> qkv = to_bf16(normal(static_cast<size_t>(rows * 3 * C), 21, 1.5f));
    const std::vector<uint16_t> dout = to_bf16(normal(static_cast<size_t>(rows * C), 22));
    const size_t n_out = static_cast<size_t>(rows * C), n_lse = static_cast<size_t>(s.B * s.NH * s.T);
    std::vector<uint16_t> out(n_out), out_want(n_out);
    std::vector<float> lse(n_lse), lse_want(n_lse);
    emu::attention_forward_bf16_cuda(out.data(), lse.data(), qkv.data(), s.B, s.T, C, s.NH, nullptr);
    const emu::AttentionBf16Kernels usual = emu::attention_bf16_kernels(D);
    ASSERT_TRUE(usual == emu::AttentionBf16Kernels::kTensorCoreMma || usual == emu::AttentionBf16Kernels::kTensorCoreWmma)
        << what;
    const bool mma = usual == emu::AttentionBf16Kernels::kTensorCoreMma;
    if (choice == "wgmma")
      emu::attention_forward_bf16_wgmma_cuda(out_want.data(), lse_want.data(), qkv.data(), s.B, s.T, C, s.NH, nullptr);
    else if (mma)
      emu::attention_forward_bf16_mma_cuda(out_want.data(), lse_want.data(), qkv.data(), s.B, s.T, C, s.NH, nullptr);
    else
      emu::attention_forward_bf16_tc_cuda(out_want.data(), lse_want.data(), qkv.data(), s.B, s.T, C, s.NH, nullptr);
    EXPECT_EQ(out, out_want) << what << ": out";
    EXPECT_EQ(lse, lse_want) << what << ": lse";
    std::vector<uint16_t> dqkv(static_cast<size_t>(rows * 3 * C), uint16_t{0x7fc0});
    std::vector<uint16_t> dqkv_want(dqkv.size(), 0);
    emu::attention_backward_bf16_cuda(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), s.B, s.T, C, s.NH,
                                      nullptr);
    if (!choice.empty())
      emu::attention_backward_bf16_wgmma_cuda(dqkv_want.data(), dout.data(), qkv.data(), out.data(), lse.data(), s.B,
                                              s.T, C, s.NH, nullptr);
    else if (mma)
      emu::attention_backward_bf16_mma_cuda(dqkv_want.data(), dout.data(), qkv.data(), out.data(), lse.data(), s.B, s.T,
                                            C, s.NH, nullptr);
    else
      emu::attention_backward_bf16_tc_cuda(dqkv_want.data(), dout.data(), qkv.data(), out.data(), lse.data(), s.B, s.T,
                                           C, s.NH, nullptr);
    EXPECT_EQ(dqkv, dqkv_want) << what << ": dqkv";
  }
}

// The pipelined wgmma kernels — the forward and the backward's dq and dk/dv kernels, each with and without
// ping-pong turns: a producer warpgroup, an mbarrier ring of 3 stages, each warpgroup's next
// scores issued before its softmax (or dS), but dk/dv at D = 168 — are the lockstep kernels' arithmetic
// in another order of issue (dk/dv at D = 168 on query tiles of 16, not 32): the same bits of out, lse
// and dqkv, and no deadlock (the turns: warpgroups with unequal issue counts, or none), under both
// schedules (copies landing at once: a stage refilled while a product still reads it would show; or as
// late as they can: a product reading a stage before its full wait would). Shapes: one query; a block's
// second warpgroup past T (T = 65); rings wrapped (D = 64: 4 forward tiles of 128 keys, 7 dq and dk/dv
// tiles of 64; 128: 5 dk/dv tiles of 32, the second warpgroup's first two released unread; 168: 5 tiles
// of 64, dk/dv 17 of 16, the second warpgroup's first four unread), with blocks whose first warpgroup
// releases the last tile unread and whose second has no queries (T = 260 at D = 168); two heads, B = 2.
TEST(CudaEmulation, PipelinedWgmmaKernelsAreTheLockstepOnesBits) {
  const AttentionShape shapes[] = {{1, 1, 64, 1},   {1, 65, 64, 1},   {1, 390, 64, 1},
                                   {1, 130, 128, 1}, {1, 260, 168, 1}, {2, 70, 168, 2}};
  under_both_schedules([&] {
    for (const AttentionShape& s : shapes) {
      SCOPED_TRACE(s.str());
      const int64_t C = s.D * s.NH, rows = s.B * s.T;
      const std::vector<uint16_t> qkv = to_bf16(normal(static_cast<size_t>(rows * 3 * C), 71, 1.5f));
      const std::vector<uint16_t> dout = to_bf16(normal(static_cast<size_t>(rows * C), 72));
      const std::vector<uint16_t> dqkv0 = to_bf16(normal(static_cast<size_t>(rows * 3 * C), 73, 0.5f));
      std::vector<uint16_t> out(static_cast<size_t>(rows * C), 0xffff), out_lockstep(out.size(), 0);
      std::vector<float> lse(static_cast<size_t>(s.B * s.NH * s.T), -1.0f), lse_lockstep(lse.size(), 0.0f);
      ASSERT_TRUE(emu::attention_bf16_wgmma_pipelined_supported(s.D));
      emu::attention_forward_bf16_wgmma_lockstep_cuda(out_lockstep.data(), lse_lockstep.data(), qkv.data(), s.B, s.T,
                                                      C, s.NH, nullptr);
      for (const bool ping_pong : {false, true}) {  // (true: attention_forward_bf16_wgmma_cuda's)
        SCOPED_TRACE(ping_pong ? "ping-pong" : "no ping-pong");
        emu::attention_forward_bf16_wgmma_kernel_cuda(out.data(), lse.data(), qkv.data(), s.B, s.T, C, s.NH, true,
                                                      ping_pong, nullptr);
        EXPECT_EQ(out, out_lockstep);
        EXPECT_EQ(0, std::memcmp(lse.data(), lse_lockstep.data(), sizeof(float) * lse.size()));
      }
      std::vector<uint16_t> dqkv_lockstep = dqkv0;
      emu::attention_backward_bf16_wgmma_lockstep_cuda(dqkv_lockstep.data(), dout.data(), qkv.data(), out.data(),
                                                       lse.data(), s.B, s.T, C, s.NH, nullptr);
      for (const bool ping_pong : {false, true}) {  // (true: attention_backward_bf16_wgmma_cuda's)
        SCOPED_TRACE(ping_pong ? "backward, ping-pong" : "backward, no ping-pong");
        std::vector<uint16_t> dqkv = dqkv0;
        emu::attention_backward_bf16_wgmma_kernels_cuda(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(),
                                                        s.B, s.T, C, s.NH, true, true, ping_pong, nullptr);
        EXPECT_EQ(dqkv, dqkv_lockstep);
      }
    }
  });
  EXPECT_FALSE(emu::attention_bf16_wgmma_pipelined_supported(256));  // the lockstep kernel takes it
}

// Pipelined kernels compiled with fewer registers than their launch's 168 a thread would hang at the
// consumers' setmaxnreg.inc (it takes only what the producer released): the lockstep kernels run instead,
// and the entry points still give their bits.
TEST(CudaEmulation, PipelinedWgmmaKernelsStepAsideWithoutTheLaunchRegisters) {
  const AttentionShape s{1, 70, 64, 2};
  const int64_t C = s.D * s.NH, rows = s.B * s.T;
  const std::vector<uint16_t> qkv = to_bf16(normal(static_cast<size_t>(rows * 3 * C), 74, 1.5f));
  const std::vector<uint16_t> dout = to_bf16(normal(static_cast<size_t>(rows * C), 75));
  std::vector<uint16_t> out(static_cast<size_t>(rows * C), 0), out_lockstep(out.size(), 0);
  std::vector<float> lse(static_cast<size_t>(s.B * s.NH * s.T), 0.0f), lse_lockstep(lse.size(), 0.0f);
  std::vector<uint16_t> dqkv(static_cast<size_t>(rows * 3 * C), 0), dqkv_lockstep(dqkv.size(), 0);
  emu::attention_forward_bf16_wgmma_lockstep_cuda(out_lockstep.data(), lse_lockstep.data(), qkv.data(), s.B, s.T, C,
                                                  s.NH, nullptr);
  emu::attention_backward_bf16_wgmma_lockstep_cuda(dqkv_lockstep.data(), dout.data(), qkv.data(), out_lockstep.data(),
                                                   lse_lockstep.data(), s.B, s.T, C, s.NH, nullptr);
  for (const int registers : {160, 176}) {
    SCOPED_TRACE(registers);
    kraken_emu::set_reported_registers(registers);
    for (const int64_t D : {64, 128, 168}) EXPECT_FALSE(emu::attention_bf16_wgmma_pipelined_supported(D)) << D;
    std::fill(dqkv.begin(), dqkv.end(), uint16_t{0});
    emu::attention_forward_bf16_wgmma_cuda(out.data(), lse.data(), qkv.data(), s.B, s.T, C, s.NH, nullptr);
    emu::attention_backward_bf16_wgmma_cuda(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), s.B, s.T, C,
                                            s.NH, nullptr);
    EXPECT_EQ(out, out_lockstep);
    EXPECT_EQ(0, std::memcmp(lse.data(), lse_lockstep.data(), sizeof(float) * lse.size()));
    EXPECT_EQ(dqkv, dqkv_lockstep);
  }
  kraken_emu::set_reported_registers(168);
  EXPECT_TRUE(emu::attention_bf16_wgmma_pipelined_supported(64));
}

// KRAKEN_CUDA_WGMMA's three settings (kernels/attention.h), the steps tools/gpu-check.sh takes down where
// a GPU finds a pipelined kernel wrong or hung: the entry points run the kernels each allows and no other
// (pipelined kernels launch 384 threads a block, the lockstep ones and Dᵢ's 256; only the ping-pong
// kernels use named barriers), with the same bits under each, and attention_wgmma_kernels_allow says so.
TEST(CudaEmulation, WgmmaEntryPointsRunTheKernelsKrakenCudaWgmmaAllows) {
  const AttentionShape s{1, 130, 64, 2};
  const int64_t C = s.D * s.NH, rows = s.B * s.T;
  const emu::AttentionWgmmaKernels from_environment = emu::attention_wgmma_kernels();
  const std::vector<uint16_t> qkv = to_bf16(normal(static_cast<size_t>(rows * 3 * C), 76, 1.5f));
  const std::vector<uint16_t> dout = to_bf16(normal(static_cast<size_t>(rows * C), 77));
  std::vector<uint16_t> out_lockstep(static_cast<size_t>(rows * C), 0), dqkv_lockstep(static_cast<size_t>(rows * 3 * C), 0);
  std::vector<float> lse_lockstep(static_cast<size_t>(s.B * s.NH * s.T), 0.0f);
  emu::attention_forward_bf16_wgmma_lockstep_cuda(out_lockstep.data(), lse_lockstep.data(), qkv.data(), s.B, s.T, C,
                                                  s.NH, nullptr);
  emu::attention_backward_bf16_wgmma_lockstep_cuda(dqkv_lockstep.data(), dout.data(), qkv.data(), out_lockstep.data(),
                                                   lse_lockstep.data(), s.B, s.T, C, s.NH, nullptr);
  struct Setting {
    emu::AttentionWgmmaKernels kernels;
    const char* name;
    int64_t pipelined_launches;  // of forward, dq and dk/dv
    bool turns;
  };
  for (const Setting& k : {Setting{emu::AttentionWgmmaKernels::kPipelined, "pipelined", 3, true},
                           Setting{emu::AttentionWgmmaKernels::kNoPingPong, "no-ping-pong", 3, false},
                           Setting{emu::AttentionWgmmaKernels::kLockstep, "lockstep", 0, false}}) {
    SCOPED_TRACE(k.name);
    emu::attention_wgmma_kernels_override(k.kernels);
    EXPECT_EQ(emu::attention_wgmma_kernels(), k.kernels);
    EXPECT_TRUE(emu::attention_wgmma_kernels_allow(false, false));
    EXPECT_EQ(emu::attention_wgmma_kernels_allow(true, false), k.pipelined_launches > 0);
    EXPECT_EQ(emu::attention_wgmma_kernels_allow(true, true), k.turns);
    const int64_t launches = kraken_emu::launches_with_block_threads(384);
    const int64_t rounds = kraken_emu::named_barrier_rounds_completed();
    std::vector<uint16_t> out(out_lockstep.size(), 0xffff), dqkv(dqkv_lockstep.size(), 0);
    std::vector<float> lse(lse_lockstep.size(), -1.0f);
    emu::attention_forward_bf16_wgmma_cuda(out.data(), lse.data(), qkv.data(), s.B, s.T, C, s.NH, nullptr);
    emu::attention_backward_bf16_wgmma_cuda(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), s.B, s.T, C,
                                            s.NH, nullptr);
    EXPECT_EQ(kraken_emu::launches_with_block_threads(384) - launches, k.pipelined_launches);
    EXPECT_EQ(kraken_emu::named_barrier_rounds_completed() > rounds, k.turns);
    EXPECT_EQ(out, out_lockstep);
    EXPECT_EQ(0, std::memcmp(lse.data(), lse_lockstep.data(), sizeof(float) * lse.size()));
    EXPECT_EQ(dqkv, dqkv_lockstep);
  }
  emu::attention_wgmma_kernels_override_reset();
  EXPECT_EQ(emu::attention_wgmma_kernels(), from_environment);
}

// The mbarrier pipeline probe (kernels/attention.h): a producer warp streams tiles through two stages with
// full/empty barriers, a consumer warp sums another lane's piece of each — the exact sums under both
// schedules (copies and their arrivals as late as can be, or at once), for one tile, a ring's worth, and
// an odd count that wraps the ring unevenly. The same probe runs on a GPU (tests/gpu).
std::vector<float> pipeline_sums_want(const std::vector<float>& x, int tiles) {
  std::vector<float> want(32, 0.0f);
  for (int lane = 0; lane < 32; ++lane)
    for (int t = 0; t < tiles; ++t) {
      const float* p = &x[static_cast<size_t>(128 * t + 4 * ((lane + 1) % 32))];
      want[static_cast<size_t>(lane)] += p[0] + p[1] + p[2] + p[3];
    }
  return want;
}

TEST(CudaEmulation, MbarrierPipelineProbeMovesEveryTile) {
  under_both_schedules([] {
    for (const int tiles : {1, 2, 7}) {
      const std::vector<float> x = normal(static_cast<size_t>(128 * tiles), 61);
      std::vector<float> sums(32, -1.0f);
      emu::mbarrier_pipeline_probe_cuda(sums.data(), x.data(), tiles, 0, nullptr);
      EXPECT_EQ(sums, pipeline_sums_want(x, tiles)) << tiles << " tiles";
    }
  });
}

// The emulation catches each rule the probe can break: reading a stage before its full barrier (the
// ascending schedule: the copies have not landed — NaN, the poison — and the ring then stalls), refilling one before its empty
// barrier (wrong sums, or the ring's phases run ahead of the consumers' parity: a deadlock), a phase
// nobody completes (a deadlock naming the mbarrier), a write over a barrier, a barrier never initialised,
// a stage released before it is read (wrong sums).
TEST(CudaEmulation, MbarrierPipelineProbesBrokenRulesAreCaught) {
  const int tiles = 5;
  const std::vector<float> x = normal(static_cast<size_t>(128 * tiles), 62);
  const std::vector<float> want = pipeline_sums_want(x, tiles);
  auto run = [&](int mutation) {
    std::vector<float> sums(32, -1.0f);
    emu::mbarrier_pipeline_probe_cuda(sums.data(), x.data(), tiles, mutation, nullptr);
    return sums;
  };
  auto error_of = [&](int mutation) -> std::string {
    try {
      run(mutation);
    } catch (const std::runtime_error& e) {
      return e.what();
    }
    return "";
  };
  {  // 1: under the ascending schedule the consumers read stages whose copies have not landed (their
     // sums NaN), then run ahead of the producer's ring, which waits for a phase parity that never returns
    std::vector<float> sums(32, -1.0f);
    std::string error;
    try {
      emu::mbarrier_pipeline_probe_cuda(sums.data(), x.data(), tiles, 1, nullptr);
    } catch (const std::runtime_error& e) {
      error = e.what();
    }
    EXPECT_TRUE(std::any_of(sums.begin(), sums.end(), [](float v) { return std::isnan(v); }))
        << "a read before the full barrier saw landed data";
    EXPECT_NE(error.find("deadlock"), std::string::npos) << error;
  }
  for (const auto schedule : {kraken_emu::Schedule::kAscending, kraken_emu::Schedule::kDescending}) {
    kraken_emu::set_schedule(schedule);
    std::string error;
    std::vector<float> sums;
    try {
      sums = run(2);
    } catch (const std::runtime_error& e) {
      error = e.what();
    }
    kraken_emu::set_schedule(kraken_emu::Schedule::kAscending);
    EXPECT_TRUE(!error.empty() || sums != want) << "a refill before the empty barrier went unseen ("
                                                << (schedule == kraken_emu::Schedule::kAscending ? "ascending" : "descending")
                                                << ")";
    if (!error.empty()) {
      EXPECT_NE(error.find("deadlock"), std::string::npos) << error;
    }
  }
  {  // 6: a stage released before it is read. The arrival that completes the empty phase lets the producer
     // refill the stage (its copies landing at once under the descending schedule) before the consumers
     // read it
    kraken_emu::set_schedule(kraken_emu::Schedule::kDescending);
    const std::vector<float> sums = run(6);
    kraken_emu::set_schedule(kraken_emu::Schedule::kAscending);
    EXPECT_NE(sums, want) << "a read after the stage's release saw the tile it was released for";
  }
  EXPECT_NE(error_of(3).find("on an mbarrier phase that never completes"), std::string::npos) << error_of(3);
  EXPECT_NE(error_of(4).find("written over after its init"), std::string::npos) << error_of(4);
  EXPECT_NE(error_of(5).find("used before mbarrier_init"), std::string::npos) << error_of(5);
  EXPECT_EQ(run(0), want);  // (and the probe is fine again)
}

TEST(CudaEmulation, MmaSyncAttentionAbove128) {
  // One stage above Dp = 128; k and v (dk/dv) and q, dO (dq) loaded per use: the Kraken heads (D = 168
  // pads to 176, 209 to 224) and the largest.
  under_both_schedules([] {
    check_attention({1, 130, 168, 1}, kMmaSync);
    check_attention({1, 37, 209, 1}, kMmaSync);
    check_attention({1, 33, 256, 1}, kMmaSync);
  });
  EXPECT_TRUE(emu::attention_bf16_mma_supported(256));
  EXPECT_FALSE(emu::attention_bf16_mma_supported(257));
}

void check_grouped_attention(const AttentionShape& s, int groups) {
  // Each group's results from one grouped launch are those of its own launch, bit for bit.
  const std::string what = "emulated grouped mma attention, " + std::to_string(groups) + " groups " + s.str();
  const int64_t C = s.D * s.NH, rows = s.B * s.T;
  std::vector<std::vector<uint16_t>> qkv, dout, out, dqkv, out1, dqkv1;
  std::vector<std::vector<float>> lse, lse1;
  for (int k = 0; k < groups; ++k) {
    qkv.push_back(to_bf16(normal(static_cast<size_t>(rows * 3 * C), 40 + k, 1.5f)));
    dout.push_back(to_bf16(normal(static_cast<size_t>(rows * C), 50 + k)));
    dqkv.push_back(to_bf16(normal(static_cast<size_t>(rows * 3 * C), 60 + k, 0.5f)));
    out.emplace_back(static_cast<size_t>(rows * C));
    lse.emplace_back(static_cast<size_t>(s.B * s.NH * s.T));
  }
  out1 = out, lse1 = lse, dqkv1 = dqkv;
  std::vector<uint16_t*> outs, dqkvs;
  std::vector<float*> lses;
  std::vector<const uint16_t*> qkvs, douts, outs_c;
  std::vector<const float*> lses_c;
  for (int k = 0; k < groups; ++k) {
    outs.push_back(out[k].data()), lses.push_back(lse[k].data()), qkvs.push_back(qkv[k].data());
    dqkvs.push_back(dqkv[k].data()), douts.push_back(dout[k].data());
    outs_c.push_back(out[k].data()), lses_c.push_back(lse[k].data());
  }
  emu::attention_forward_bf16_mma_group_cuda(outs.data(), lses.data(), qkvs.data(), groups, s.B, s.T, C, s.NH,
                                             nullptr);
  emu::attention_backward_bf16_mma_group_cuda(dqkvs.data(), douts.data(), qkvs.data(), outs_c.data(), lses_c.data(),
                                              groups, s.B, s.T, C, s.NH, nullptr);
  for (int k = 0; k < groups; ++k) {
    emu::attention_forward_bf16_mma_cuda(out1[k].data(), lse1[k].data(), qkv[k].data(), s.B, s.T, C, s.NH, nullptr);
    emu::attention_backward_bf16_mma_cuda(dqkv1[k].data(), dout[k].data(), qkv[k].data(), out1[k].data(),
                                          lse1[k].data(), s.B, s.T, C, s.NH, nullptr);
    EXPECT_EQ(out[k], out1[k]) << what << ": out of group " << k;
    EXPECT_EQ(lse[k], lse1[k]) << what << ": lse of group " << k;
    EXPECT_EQ(dqkv[k], dqkv1[k]) << what << ": dqkv of group " << k;
  }
}

TEST(CudaEmulation, GroupedMmaSyncAttentionIsEachGroupsOwn) {
  // Three groups (a Kraken layer's sub-layers run as one launch), two and three heads, a partial tile,
  // a head above 128; and one group, which is how the one-attention entry points run.
  under_both_schedules([] {
    check_grouped_attention({2, 70, 32, 3}, 3);
    check_grouped_attention({1, 40, 168, 1}, 2);
    check_grouped_attention({1, 65, 64, 1}, 1);
  });
}

// ---- layernorm ------------------------------------------------------------------------------------

void check_layernorm(int64_t rows, int64_t C);

// A shape or two at a time, in five tests (the AddressSanitizer copy of all eight shapes in one test took
// 716 s on a 2-core machine like CI's, over its ctest's 600-second limit).
// Rows not a multiple of 8 (rows per block) nor of 64 (dgamma/dbeta's row groups); 600 rows take the
// dgamma/dbeta loop's 8-row unrolled part (8 · 64 rows at a time) and its remainder.
// dgamma/dbeta: (70, 256), (1100, 136) and (9, 776) are summed in the dx pass (3, 35 and 1 row chunks
// of 32, the last partial; 1, 1 and 4 packs per lane), (70, 2048) by the two-pass column sums (8
// packs per lane, too many to keep the sums beside the row), (600, 100) (C not a multiple of 8) and
// (5, 2056) (fewer rows than the column sums' row groups) by the one-pass kernel.
// Forward and dx: C a multiple of 8 up to 2048 takes the register-resident 8-wide kernels (C = 256: one
// pack per lane; 136: 17 packs, lanes without one; 776: 97 packs, 4 per lane, the last partial; 2048:
// 8 per lane), 100 and 2056 the element-wise ones. (45, 504) and (33, 768): the benchmark presets' C,
// 2 and 3 packs per lane in the one-pass backward.
TEST(CudaEmulation, LayerNormMatchesTheCpuOnManyRowsAndFourPacks) {
  under_both_schedules([] {
    check_layernorm(1100, 136);
    check_layernorm(9, 776);
  });
}
// The widest rows take longest (C = 2048's column sums launch 131,072 emulated threads at a time), so
// each thread order is a test of its own (the AddressSanitizer copy of both in one took 403 s in CI).
struct ScheduleScope {
  explicit ScheduleScope(kraken_emu::Schedule schedule) { kraken_emu::set_schedule(schedule); }
  ~ScheduleScope() { kraken_emu::set_schedule(kraken_emu::Schedule::kAscending); }
};
TEST(CudaEmulation, LayerNormMatchesTheCpuOnTheWidestRowsInAscendingOrder) {
  const ScheduleScope ascending(kraken_emu::Schedule::kAscending);
  check_layernorm(70, 2048);
  check_layernorm(5, 2056);
}
TEST(CudaEmulation, LayerNormMatchesTheCpuOnTheWidestRowsInDescendingOrder) {
  const ScheduleScope descending(kraken_emu::Schedule::kDescending);
  check_layernorm(70, 2048);
  check_layernorm(5, 2056);
}
TEST(CudaEmulation, LayerNormMatchesTheCpuOnElementwiseRowsAndGpt2Width) {
  under_both_schedules([] {
    check_layernorm(600, 100);
    check_layernorm(33, 768);
  });
}
TEST(CudaEmulation, LayerNormMatchesTheCpuOnOnePackAndTheKrakenPresetsWidth) {
  under_both_schedules([] {
    check_layernorm(70, 256);
    check_layernorm(45, 504);
  });
}

void check_layernorm(int64_t rows, int64_t C) {
  const std::string what = "emulated bf16 layernorm (" + std::to_string(rows) + ", " + std::to_string(C) + ")";
  const size_t n = static_cast<size_t>(rows * C);
  const std::vector<uint16_t> x = to_bf16(normal(n, 3, 2.0f)), dout = to_bf16(normal(n, 4));
  const std::vector<uint16_t> dx0 = to_bf16(normal(n, 5));
  const std::vector<float> gamma = normal(static_cast<size_t>(C), 6), beta = normal(static_cast<size_t>(C), 7);
  std::vector<uint16_t> out(n), dx = dx0;
  std::vector<float> mean(static_cast<size_t>(rows)), rstd(static_cast<size_t>(rows));
  std::vector<float> dgamma(static_cast<size_t>(C), 0.5f), dbeta(static_cast<size_t>(C), -0.25f);
  emu::layernorm_forward_bf16_cuda(out.data(), mean.data(), rstd.data(), x.data(), gamma.data(), beta.data(), rows,
                                   C, 1e-5f, nullptr);
  emu::layernorm_backward_bf16_cuda(dx.data(), dx.data(), dgamma.data(), dbeta.data(), dout.data(), x.data(),
                                    gamma.data(), mean.data(), rstd.data(), rows, C, nullptr);
  const std::vector<float> x_f = to_f32(x), dout_f = to_f32(dout);
  std::vector<float> out_cpu(n), mean_cpu(mean.size()), rstd_cpu(rstd.size()), dx_cpu = to_f32(dx0);
  std::vector<float> dgamma_cpu(dgamma.size(), 0.5f), dbeta_cpu(dbeta.size(), -0.25f);
  kernels::layernorm_forward_cpu(out_cpu.data(), mean_cpu.data(), rstd_cpu.data(), x_f.data(), gamma.data(),
                                 beta.data(), rows, C, 1e-5f);
  kernels::layernorm_backward_cpu(dx_cpu.data(), dx_cpu.data(), dgamma_cpu.data(), dbeta_cpu.data(), dout_f.data(),
                                  x_f.data(), gamma.data(), mean_cpu.data(), rstd_cpu.data(), rows, C);
  expect_close(to_f32(out), out_cpu, 1e-5, true, what + ": out");
  expect_close(mean, mean_cpu, 1e-5, false, what + ": mean");
  expect_close(rstd, rstd_cpu, 1e-5, false, what + ": rstd");
  expect_close(to_f32(dx), dx_cpu, 1e-5, true, what + ": dx +=");
  expect_close(dgamma, dgamma_cpu, 1e-5, false, what + ": dgamma +=");
  expect_close(dbeta, dbeta_cpu, 1e-5, false, what + ": dbeta +=");

  // The f32 kernels (the same templates on float), and dbeta without dgamma.
  std::vector<float> dx32 = to_f32(dx0), dbeta32(dbeta.size(), -0.25f), dx32_cpu = to_f32(dx0);
  std::vector<float> dbeta32_cpu(dbeta.size(), -0.25f), dgamma_unused(dgamma.size(), 0.5f);
  emu::layernorm_backward_cuda(dx32.data(), dx32.data(), nullptr, dbeta32.data(), dout_f.data(), x_f.data(),
                               gamma.data(), mean_cpu.data(), rstd_cpu.data(), rows, C, nullptr);
  kernels::layernorm_backward_cpu(dx32_cpu.data(), dx32_cpu.data(), dgamma_unused.data(), dbeta32_cpu.data(),
                                  dout_f.data(), x_f.data(), gamma.data(), mean_cpu.data(), rstd_cpu.data(), rows, C);
  expect_close(dx32, dx32_cpu, 1e-5, false, what + ": f32 dx +=");
  expect_close(dbeta32, dbeta32_cpu, 1e-5, false, what + ": f32 dbeta += (no dgamma)");

  // dx = dx_in + … from another buffer, and with no dx_in at all: dx starts as NaNs, so a kernel that
  // read it would show. With and without the parameters' sums (the fused and the dx-only kernels).
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const bool params : {true, false}) {
    for (const bool with_in : {true, false}) {
      const std::vector<float> dx_in = to_f32(dx0);
      std::vector<float> dx_new(n, nan), dx_ref(n, 0.0f), g_unused(dgamma.size(), 0.0f), b_unused = g_unused;
      std::vector<uint16_t> dx16_new(n, uint16_t{0x7fc0});
      emu::layernorm_backward_cuda(dx_new.data(), with_in ? dx_in.data() : nullptr, params ? g_unused.data() : nullptr,
                                   params ? b_unused.data() : nullptr, dout_f.data(), x_f.data(), gamma.data(),
                                   mean_cpu.data(), rstd_cpu.data(), rows, C, nullptr);
      emu::layernorm_backward_bf16_cuda(dx16_new.data(), with_in ? dx0.data() : nullptr,
                                        params ? g_unused.data() : nullptr, params ? b_unused.data() : nullptr,
                                        dout.data(), x.data(), gamma.data(), mean_cpu.data(), rstd_cpu.data(), rows,
                                        C, nullptr);
      kernels::layernorm_backward_cpu(dx_ref.data(), with_in ? dx_in.data() : nullptr, nullptr, nullptr,
                                      dout_f.data(), x_f.data(), gamma.data(), mean_cpu.data(), rstd_cpu.data(),
                                      rows, C);
      const std::string how = std::string(with_in ? ": dx = dx_in + …" : ": dx = … (no dx_in)") +
                              (params ? "" : ", no dgamma/dbeta");
      expect_close(dx_new, dx_ref, 1e-5, false, what + how + " (f32)");
      expect_close(to_f32(dx16_new), dx_ref, 1e-5, true, what + how + " (bf16)");
    }
  }

  // The one pass with dgamma and dbeta accumulating onto non-zero values — with dx_in from another
  // buffer, and with neither dx_in nor dgamma — bf16 and f32, dx starting as NaNs. Up to 100 rows (2 or
  // 3 chunks of 32, the last partial): (1100, 136)'s one pass is checked above, and shapes the one pass
  // does not take are the same kernels as there.
  for (const auto& [with_in, with_gamma] : {std::pair<bool, bool>{true, true}, std::pair<bool, bool>{false, false}}) {
    if (rows > 100) break;
    const std::string how = what + (with_in ? ", dx_in" : ", no dx_in") + (with_gamma ? "" : ", dbeta alone");
    const std::vector<float> din32 = to_f32(dx0);
    std::vector<uint16_t> dx16_new(n, uint16_t{0x7fc0});
    std::vector<float> dx32_new(n, nan), dx_ref(n, 0.0f);
    std::vector<float> g16(dgamma.size(), 0.5f), b16(dbeta.size(), -0.25f);
    std::vector<float> g32 = g16, b32 = b16, g_ref = g16, b_ref = b16;
    emu::layernorm_backward_bf16_cuda(dx16_new.data(), with_in ? dx0.data() : nullptr,
                                      with_gamma ? g16.data() : nullptr, b16.data(), dout.data(), x.data(),
                                      gamma.data(), mean_cpu.data(), rstd_cpu.data(), rows, C, nullptr);
    emu::layernorm_backward_cuda(dx32_new.data(), with_in ? din32.data() : nullptr, with_gamma ? g32.data() : nullptr,
                                 b32.data(), dout_f.data(), x_f.data(), gamma.data(), mean_cpu.data(),
                                 rstd_cpu.data(), rows, C, nullptr);
    kernels::layernorm_backward_cpu(dx_ref.data(), with_in ? din32.data() : nullptr,
                                    with_gamma ? g_ref.data() : nullptr, b_ref.data(), dout_f.data(), x_f.data(),
                                    gamma.data(), mean_cpu.data(), rstd_cpu.data(), rows, C);
    expect_close(to_f32(dx16_new), dx_ref, 1e-5, true, how + ": bf16 dx");
    expect_close(g16, g_ref, 1e-5, false, how + ": bf16 dgamma");
    expect_close(b16, b_ref, 1e-5, false, how + ": bf16 dbeta");
    expect_close(dx32_new, dx_ref, 1e-5, false, how + ": f32 dx");
    expect_close(g32, g_ref, 1e-5, false, how + ": f32 dgamma");
    expect_close(b32, b_ref, 1e-5, false, how + ": f32 dbeta");
  }

  // The residual add fused into the LayerNorm after it: s = a + b rounded once, then s normalised.
  std::vector<uint16_t> s_sum(n), out_fused(n);
  emu::add_layernorm_forward_bf16_cuda(s_sum.data(), out_fused.data(), mean.data(), rstd.data(), x.data(),
                                       dout.data(), gamma.data(), beta.data(), rows, C, 1e-5f, nullptr);
  std::vector<float> sum_f(n);
  for (size_t i = 0; i < n; ++i) sum_f[i] = x_f[i] + dout_f[i];
  const std::vector<uint16_t> s_cpu = to_bf16(sum_f);
  EXPECT_EQ(s_sum, s_cpu) << what << ": fused add, s is not a + b rounded once";
  kernels::layernorm_forward_cpu(out_cpu.data(), mean_cpu.data(), rstd_cpu.data(), to_f32(s_cpu).data(),
                                 gamma.data(), beta.data(), rows, C, 1e-5f);
  expect_close(to_f32(out_fused), out_cpu, 1e-5, true, what + ": fused add, out");
  expect_close(rstd, rstd_cpu, 1e-5, false, what + ": fused add, rstd");
}

// A grouped backward (G blocks of rows, each its own gamma and gradients: a Kraken layer's sub-layers)
// is G backward calls in one: the same bits. Shapes: 3 groups of 45 rows (2 chunks of 32 each, the
// second partial) at C = 504 and 136 (one launch for all groups), C = 100 (no one pass: group by group);
// 17 groups of 5 rows (two launches: 16 groups, then 1). One group wants no dgamma, one no dbeta.
void check_grouped_layernorm_backward(int64_t G, int64_t rows, int64_t C) {
  const std::string what = "emulated grouped layernorm backward, " + std::to_string(G) + " groups of (" +
                           std::to_string(rows) + ", " + std::to_string(C) + ")";
  const size_t n = static_cast<size_t>(G * rows * C);
  const std::vector<uint16_t> x = to_bf16(normal(n, 91, 2.0f)), dout = to_bf16(normal(n, 92)),
                              dx_in = to_bf16(normal(n, 93));
  const std::vector<float> gammas = normal(static_cast<size_t>(G * C), 94);
  std::vector<float> mean(static_cast<size_t>(G * rows)), rstd(mean.size());
  for (size_t r = 0; r < mean.size(); ++r) {
    mean[r] = 0.1f * static_cast<float>(r % 7);
    rstd[r] = 0.5f + 0.05f * static_cast<float>(r % 5);
  }
  // Each way: dx (bf16 and f32), and every group's dgamma, dbeta starting from 0.5, −0.25.
  struct Run {
    std::vector<uint16_t> dx16;
    std::vector<float> dx32, dgamma16, dbeta16, dgamma32, dbeta32;
  };
  const std::vector<float> x32 = to_f32(x), dout32 = to_f32(dout), dx_in32 = to_f32(dx_in);
  auto run = [&](bool grouped) {
    Run r{std::vector<uint16_t>(n, 0x7fc0), std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()),
          std::vector<float>(static_cast<size_t>(G * C), 0.5f), std::vector<float>(static_cast<size_t>(G * C), -0.25f),
          std::vector<float>(static_cast<size_t>(G * C), 0.5f), std::vector<float>(static_cast<size_t>(G * C), -0.25f)};
    std::vector<emu::LayerNormGroupGradients> g16(static_cast<size_t>(G)), g32(g16.size());
    for (int64_t g = 0; g < G; ++g) {
      const size_t at = static_cast<size_t>(g * C);
      g16[static_cast<size_t>(g)] = {gammas.data() + at, g == 1 ? nullptr : r.dgamma16.data() + at,
                                     g == 2 ? nullptr : r.dbeta16.data() + at};
      g32[static_cast<size_t>(g)] = {gammas.data() + at, g == 1 ? nullptr : r.dgamma32.data() + at,
                                     g == 2 ? nullptr : r.dbeta32.data() + at};
    }
    if (grouped) {
      emu::layernorm_backward_grouped_bf16_cuda(r.dx16.data(), dx_in.data(), g16.data(), G, dout.data(), x.data(),
                                                mean.data(), rstd.data(), rows, C, nullptr);
      emu::layernorm_backward_grouped_cuda(r.dx32.data(), dx_in32.data(), g32.data(), G, dout32.data(), x32.data(),
                                           mean.data(), rstd.data(), rows, C, nullptr);
      return r;
    }
    for (int64_t g = 0; g < G; ++g) {
      const size_t e = static_cast<size_t>(g * rows * C), row = static_cast<size_t>(g * rows);
      const auto& p16 = g16[static_cast<size_t>(g)];
      const auto& p32 = g32[static_cast<size_t>(g)];
      emu::layernorm_backward_bf16_cuda(r.dx16.data() + e, dx_in.data() + e, p16.dgamma, p16.dbeta, dout.data() + e,
                                        x.data() + e, p16.gamma, mean.data() + row, rstd.data() + row, rows, C,
                                        nullptr);
      emu::layernorm_backward_cuda(r.dx32.data() + e, dx_in32.data() + e, p32.dgamma, p32.dbeta, dout32.data() + e,
                                   x32.data() + e, p32.gamma, mean.data() + row, rstd.data() + row, rows, C, nullptr);
    }
    return r;
  };
  const Run one_by_one = run(false), grouped = run(true);
  EXPECT_EQ(grouped.dx16, one_by_one.dx16) << what << ": bf16 dx";
  EXPECT_EQ(grouped.dgamma16, one_by_one.dgamma16) << what << ": bf16 dgamma";
  EXPECT_EQ(grouped.dbeta16, one_by_one.dbeta16) << what << ": bf16 dbeta";
  EXPECT_EQ(grouped.dx32, one_by_one.dx32) << what << ": f32 dx";
  EXPECT_EQ(grouped.dgamma32, one_by_one.dgamma32) << what << ": f32 dgamma";
  EXPECT_EQ(grouped.dbeta32, one_by_one.dbeta32) << what << ": f32 dbeta";
  // The groups without a dgamma or dbeta kept their starting values.
  EXPECT_EQ(grouped.dgamma16[static_cast<size_t>(C)], 0.5f) << what;
  EXPECT_EQ(grouped.dbeta16[static_cast<size_t>(2 * C)], -0.25f) << what;
}

TEST(CudaEmulation, GroupedLayerNormBackwardIsOneCallPerGroup) {
  under_both_schedules([] {
    check_grouped_layernorm_backward(3, 45, 504);
    check_grouped_layernorm_backward(3, 45, 136);
    check_grouped_layernorm_backward(17, 5, 64);
    check_grouped_layernorm_backward(3, 45, 100);
  });
}

// ---- cross-entropy ----------------------------------------------------------------------------------

void check_cross_entropy(int64_t N, int64_t Vp, int64_t V, const std::vector<int64_t>& ignored) {
  const std::string what = "emulated bf16 cross-entropy N=" + std::to_string(N) + " Vp=" + std::to_string(Vp) +
                           " V=" + std::to_string(V);
  const int32_t ignore = -1;
  const size_t n = static_cast<size_t>(N * Vp);
  std::vector<float> logits_init = normal(n, 8, 3.0f);
  // Row 0's largest logits in its last three real columns (the tail after the 8-wide packs when
  // V = 8k + 3), row N−1's in its first: a column left out there moves lse far beyond the tolerance.
  for (int64_t k = 1; k <= 3; ++k) logits_init[static_cast<size_t>(V - k)] = 9.0f + static_cast<float>(k);
  logits_init[static_cast<size_t>((N - 1) * Vp)] = 12.0f;
  const std::vector<uint16_t> logits = to_bf16(logits_init);
  std::vector<int32_t> targets(static_cast<size_t>(N));
  for (int64_t r = 0; r < N; ++r) targets[static_cast<size_t>(r)] = static_cast<int32_t>((r * 7919) % V);
  for (int64_t r : ignored) targets[static_cast<size_t>(r)] = ignore;
  const int64_t count = N - static_cast<int64_t>(ignored.size());
  std::vector<float> losses(static_cast<size_t>(N)), lse(static_cast<size_t>(N));
  emu::cross_entropy_forward_bf16_cuda(losses.data(), lse.data(), logits.data(), targets.data(), N, Vp, V, ignore,
                                       nullptr);
  const std::vector<float> logits_f = to_f32(logits);
  std::vector<float> losses_cpu(losses.size()), lse_cpu(lse.size());
  kernels::cross_entropy_forward_cpu(losses_cpu.data(), lse_cpu.data(), logits_f.data(), targets.data(), N, Vp, V,
                                     ignore);
  expect_close(losses, losses_cpu, 1e-5, false, what + ": losses");
  for (int64_t r : ignored) lse[static_cast<size_t>(r)] = lse_cpu[static_cast<size_t>(r)];  // unused there
  expect_close(lse, lse_cpu, 1e-5, false, what + ": lse");

  const float dloss = 1.7f;
  std::vector<uint16_t> dlogits(n, 0xC0E0);  // garbage (−7): the kernel writes every element
  emu::cross_entropy_backward_bf16_cuda(dlogits.data(), logits.data(), lse_cpu.data(), targets.data(), &dloss, count,
                                        N, Vp, V, ignore, nullptr);
  std::vector<float> dlogits_cpu(n);
  kernels::cross_entropy_backward_cpu(dlogits_cpu.data(), logits_f.data(), lse_cpu.data(), targets.data(), &dloss,
                                      count, N, Vp, V, ignore);
  expect_close(to_f32(dlogits), dlogits_cpu, 1e-5, true, what + ": dlogits");
  for (int64_t r = 0; r < N; ++r) {
    for (int64_t v = 0; v < Vp; ++v) {
      if (v >= V || targets[static_cast<size_t>(r)] == ignore) {
        ASSERT_EQ(dlogits[static_cast<size_t>(r * Vp + v)], 0u) << what << ": row " << r << " column " << v;
      }
    }
  }

  // The fused kernel (forward and backward in one pass, dloss from the host): the bits of the forward
  // kernel's losses and lse and of the backward kernel's dlogits from that lse, bf16 and f32.
  std::vector<float> fused_losses(losses.size(), -3.0f), fused_lse(lse.size(), -3.0f);
  std::vector<uint16_t> fused_dlogits(n, 0xC0E0);
  emu::cross_entropy_fused_bf16_cuda(fused_losses.data(), fused_lse.data(), fused_dlogits.data(), logits.data(),
                                     targets.data(), dloss, count, N, Vp, V, ignore, nullptr);
  std::vector<uint16_t> from_lse(n, 0xC0E0);
  emu::cross_entropy_backward_bf16_cuda(from_lse.data(), logits.data(), lse.data(), targets.data(), &dloss, count, N,
                                        Vp, V, ignore, nullptr);
  for (int64_t r : ignored) lse[static_cast<size_t>(r)] = 0.0f, losses[static_cast<size_t>(r)] = 0.0f;
  EXPECT_EQ(fused_losses, losses) << what << ": fused losses";
  EXPECT_EQ(fused_lse, lse) << what << ": fused lse";
  EXPECT_EQ(fused_dlogits, from_lse) << what << ": fused dlogits";
  // The row staged in shared memory for the gradient pass, and staged with the next row's copies in flight
  // (kernels/cross_entropy.h): the same bits (where the row is 8-wide; else the same kernel).
  for (const auto reads : {emu::CrossEntropyRowReads::kStagedInSharedMemory, emu::CrossEntropyRowReads::kPipelined}) {
    const std::string how = what + (reads == emu::CrossEntropyRowReads::kPipelined ? ": pipelined" : ": staged");
    std::vector<float> staged_losses(losses.size(), -3.0f), staged_lse(lse.size(), -3.0f);
    std::vector<uint16_t> staged_dlogits(n, 0xC0E0);
    emu::cross_entropy_fused_bf16_cuda(staged_losses.data(), staged_lse.data(), staged_dlogits.data(), logits.data(),
                                       targets.data(), dloss, count, N, Vp, V, ignore, nullptr, reads);
    EXPECT_EQ(staged_losses, losses) << how << " losses";
    EXPECT_EQ(staged_lse, lse) << how << " lse";
    EXPECT_EQ(staged_dlogits, from_lse) << how << " dlogits";
  }
  std::vector<float> losses32(losses.size()), lse32(lse.size()), dlogits32(n, -7.0f), fused32(n, -7.0f);
  std::vector<float> fused_losses32(losses.size()), fused_lse32(lse.size());
  emu::cross_entropy_forward_cuda(losses32.data(), lse32.data(), logits_f.data(), targets.data(), N, Vp, V, ignore,
                                  nullptr);
  emu::cross_entropy_backward_cuda(dlogits32.data(), logits_f.data(), lse32.data(), targets.data(), &dloss, count, N,
                                   Vp, V, ignore, nullptr);
  emu::cross_entropy_fused_cuda(fused_losses32.data(), fused_lse32.data(), fused32.data(), logits_f.data(),
                                targets.data(), dloss, count, N, Vp, V, ignore, nullptr);
  EXPECT_EQ(fused_losses32, losses32) << what << ": f32 fused losses";
  EXPECT_EQ(fused_lse32, lse32) << what << ": f32 fused lse";
  EXPECT_EQ(fused32, dlogits32) << what << ": f32 fused dlogits";

  // Rescaling: the dloss that was assumed leaves dlogits alone; another scales it once and becomes the
  // assumed one (a second call with it leaves dlogits alone).
  float assumed = dloss;
  std::vector<uint16_t> kept = fused_dlogits;
  emu::cross_entropy_rescale_bf16_cuda(kept.data(), &dloss, &assumed, static_cast<int64_t>(n), nullptr);
  EXPECT_EQ(kept, fused_dlogits) << what << ": rescaled for the dloss it was computed for";
  const float other = 0.25f;
  emu::cross_entropy_rescale_bf16_cuda(kept.data(), &other, &assumed, static_cast<int64_t>(n), nullptr);
  EXPECT_EQ(assumed, other) << what << ": the assumed dloss after rescaling";
  std::vector<float> want(n);
  for (size_t i = 0; i < n; ++i) want[i] = to_f32({fused_dlogits[i]})[0] * (other / dloss);
  EXPECT_EQ(kept, to_bf16(want)) << what << ": rescaled by dloss / assumed, rounded once";
  const std::vector<uint16_t> once = kept;
  emu::cross_entropy_rescale_bf16_cuda(kept.data(), &other, &assumed, static_cast<int64_t>(n), nullptr);
  EXPECT_EQ(kept, once) << what << ": a second backward with the same dloss must not rescale again";
}

TEST(CudaEmulation, CrossEntropyMatchesTheCpuOnBothAccessWidths) {
  under_both_schedules([] {
    check_cross_entropy(5, 130, 100, {1});    // Vp not a multiple of 8: one column at a time
    check_cross_entropy(4, 2056, 2051, {2});  // Vp = 8·257: 8 columns per load, a tail of 3 before Vp
    // GPT-2's vocabulary: 12 or 13 loads of 8 per thread, each merged into the thread's running state
    check_cross_entropy(2, 50304, 50257, {});
    // More rows than the pipelined kernel's blocks (4 an SM at this row size, of 2 SMs here): blocks take
    // up to 3 rows, through both stages and back to the first.
    kraken_emu::set_multiprocessor_count(2);
    check_cross_entropy(21, 1000, 997, {3, 8, 20});
    kraken_emu::set_multiprocessor_count(132);
  });
}

// Columns at −inf (a mask's) add nothing, a whole 8-column pack of them at a row's start included, where the
// thread's running maximum is still −inf (−inf − −inf would be NaN); a NaN makes its row's loss, lse and
// every gradient column NaN, also where the pack that holds it is otherwise −inf — a NaN-ignoring maximum
// would call that pack empty and skip it. The forward kernel and the fused one, each way it reads the row.
void check_cross_entropy_special_values() {
  const int64_t N = 3, V = 2056, Vp = 2056;  // 8-wide: 257 packs a row
  const uint16_t kMinusInf = 0xFF80, kNaN = 0x7FC0;
  std::vector<uint16_t> logits = to_bf16(normal(static_cast<size_t>(N * Vp), 12, 3.0f));
  for (int64_t v = 0; v < 16; ++v) logits[static_cast<size_t>(v)] = kMinusInf;  // row 0: packs 0 and 1
  logits[static_cast<size_t>(Vp)] = kNaN;                                         // row 1: {NaN, −inf × 7}
  for (int64_t v = 1; v < 8; ++v) logits[static_cast<size_t>(Vp + v)] = kMinusInf;
  const std::vector<int32_t> targets = {100, 5, 2000};
  const float dloss = 1.0f;
  std::vector<float> cpu_losses(N), cpu_lse(N);
  kernels::cross_entropy_forward_cpu(cpu_losses.data(), cpu_lse.data(), to_f32(logits).data(), targets.data(), N, Vp,
                                     V, -1);
  auto is_nan = [](uint16_t b) { return (b & 0x7F80) == 0x7F80 && (b & 0x7F) != 0; };
  auto check = [&](const std::vector<float>& losses, const std::vector<float>& lse, const std::string& how) {
    for (const int64_t r : {int64_t{0}, int64_t{2}}) {
      const size_t i = static_cast<size_t>(r);
      EXPECT_NEAR(lse[i], cpu_lse[i], 1e-5 * std::fabs(cpu_lse[i])) << how << ": lse of row " << r;
      EXPECT_NEAR(losses[i], cpu_losses[i], 1e-5 * std::fabs(cpu_lse[i])) << how << ": loss of row " << r;
    }
    EXPECT_TRUE(std::isnan(lse[1]) && std::isnan(losses[1])) << how << ": row 1 holds a NaN; lse " << lse[1];
  };
  std::vector<float> losses(N), lse(N);
  emu::cross_entropy_forward_bf16_cuda(losses.data(), lse.data(), logits.data(), targets.data(), N, Vp, V, -1, nullptr);
  check(losses, lse, "forward kernel");
  for (const auto reads : {emu::CrossEntropyRowReads::kTwice, emu::CrossEntropyRowReads::kStagedInSharedMemory,
                           emu::CrossEntropyRowReads::kPipelined}) {
    const std::string how = reads == emu::CrossEntropyRowReads::kTwice                  ? "fused"
                            : reads == emu::CrossEntropyRowReads::kStagedInSharedMemory ? "fused, staged"
                                                                                         : "fused, pipelined";
    std::vector<float> fused_losses(N, -3.0f), fused_lse(N, -3.0f);
    std::vector<uint16_t> dlogits(static_cast<size_t>(N * Vp), 0xC0E0);
    emu::cross_entropy_fused_bf16_cuda(fused_losses.data(), fused_lse.data(), dlogits.data(), logits.data(),
                                       targets.data(), dloss, N, N, Vp, V, -1, nullptr, reads);
    check(fused_losses, fused_lse, how);
    for (int64_t v = 0; v < 16; ++v)
      ASSERT_EQ(dlogits[static_cast<size_t>(v)], 0u) << how << ": row 0's −inf column " << v << " has probability 0";
    for (int64_t v = 0; v < V; ++v)
      ASSERT_TRUE(is_nan(dlogits[static_cast<size_t>(Vp + v)])) << how << ": row 1, column " << v << " not NaN";
    std::vector<uint16_t> want(dlogits.size(), 0xC0E0);
    emu::cross_entropy_backward_bf16_cuda(want.data(), logits.data(), fused_lse.data(), targets.data(), &dloss, N, N,
                                          Vp, V, -1, nullptr);
    for (const int64_t r : {int64_t{0}, int64_t{2}}) {
      const auto at = [&](const std::vector<uint16_t>& d) {
        return std::vector<uint16_t>(d.begin() + r * Vp, d.begin() + (r + 1) * Vp);
      };
      EXPECT_EQ(at(dlogits), at(want)) << how << ": row " << r << " is not the backward kernel's from its lse";
    }
  }
}

TEST(CudaEmulation, CrossEntropySkipsMinusInfinityAndPropagatesNaN) {
  under_both_schedules(check_cross_entropy_special_values);
}

// ---- elementwise: the 8-wide bf16 kernels and their scalar fallbacks --------------------------------

void check_gelu_and_add() {
  for (const int64_t n : {int64_t{1001}, int64_t{1024}}) {  // scalar, then 8 elements per access
    const std::string what = " (n = " + std::to_string(n) + ")";
    const size_t m = static_cast<size_t>(n);
    const std::vector<uint16_t> x = to_bf16(normal(m, 9, 3.0f)), b = to_bf16(normal(m, 10));
    const std::vector<uint16_t> dx0 = to_bf16(normal(m, 11));
    std::vector<uint16_t> y(m), sum(m), dx = dx0;
    emu::gelu_forward_bf16_cuda(y.data(), x.data(), n, nullptr);
    emu::gelu_backward_bf16_cuda(dx.data(), x.data(), b.data(), n, nullptr);
    emu::add_bf16_cuda(sum.data(), x.data(), b.data(), n, nullptr);
    const std::vector<float> x_f = to_f32(x), b_f = to_f32(b);
    std::vector<float> y_cpu(m), sum_cpu(m), dx_cpu = to_f32(dx0);
    kernels::gelu_forward_cpu(y_cpu.data(), x_f.data(), n);
    kernels::gelu_backward_cpu(dx_cpu.data(), x_f.data(), b_f.data(), n);
    kernels::add_cpu(sum_cpu.data(), x_f.data(), b_f.data(), n);
    expect_close(to_f32(y), y_cpu, 4e-6, true, "emulated bf16 gelu forward" + what);
    expect_close(to_f32(dx), dx_cpu, 4e-6, true, "emulated bf16 gelu backward" + what);
    EXPECT_EQ(sum, to_bf16(sum_cpu)) << "emulated bf16 add" << what << ": not the CPU's sum rounded once";
  }
}

TEST(CudaEmulation, GeluAndAddMatchTheCpuOnBothAccessWidths) { under_both_schedules(check_gelu_and_add); }

// The bf16 broadcast add, out[r, :] = a[r, :] + b[:]: 8 columns per access where cols is a multiple of 8
// (1008, and 8 itself), one element otherwise (1001); the CPU's sum rounded once, bit for bit.
void check_broadcast_add() {
  for (const int64_t cols : {int64_t{1001}, int64_t{1008}, int64_t{8}}) {
    const int64_t rows = 5;
    const std::string what = " (" + std::to_string(rows) + " × " + std::to_string(cols) + ")";
    const size_t m = static_cast<size_t>(rows * cols);
    const std::vector<uint16_t> a = to_bf16(normal(m, 21)), b = to_bf16(normal(static_cast<size_t>(cols), 22));
    std::vector<uint16_t> out(m + 1, 0x7fff);  // a sentinel past the end
    emu::add_broadcast_bf16_cuda(out.data(), a.data(), b.data(), rows, cols, nullptr);
    const std::vector<float> a_f = to_f32(a), b_f = to_f32(b);
    std::vector<float> ref(m);
    kernels::add_broadcast_cpu(ref.data(), a_f.data(), b_f.data(), rows, cols);
    EXPECT_EQ(std::vector<uint16_t>(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(m)), to_bf16(ref))
        << "emulated bf16 broadcast add" << what << ": not the CPU's sum rounded once";
    EXPECT_EQ(out[m], 0x7fff) << "emulated bf16 broadcast add" << what << " wrote past the end";
  }
}

TEST(CudaEmulation, BroadcastAddMatchesTheCpuOnBothAccessWidths) { under_both_schedules(check_broadcast_add); }

// The bf16 sum over a few rows, db[:] += Σ_r dout[r, :] (a Kraken layer's dS over its n streams): 8 columns
// per access where cols is a multiple of 8, one otherwise; the CPU's f32 sum in row order, added to db and
// rounded once, bit for bit.
void check_few_row_sums() {
  for (const int64_t cols : {int64_t{1001}, int64_t{1008}, int64_t{8}}) {
    const int64_t rows = 4;
    const std::string what = " (" + std::to_string(rows) + " × " + std::to_string(cols) + ")";
    const size_t m = static_cast<size_t>(rows * cols), n = static_cast<size_t>(cols);
    const std::vector<uint16_t> dout = to_bf16(normal(m, 31)), db0 = to_bf16(normal(n, 32));
    std::vector<uint16_t> db = db0;
    db.push_back(0x7fff);  // a sentinel past the end
    emu::sum_rows_bf16_cuda(db.data(), dout.data(), rows, cols, nullptr);
    std::vector<float> ref = to_f32(db0);
    kernels::sum_rows_cpu(ref.data(), to_f32(dout).data(), rows, cols);
    EXPECT_EQ(std::vector<uint16_t>(db.begin(), db.begin() + static_cast<std::ptrdiff_t>(n)), to_bf16(ref))
        << "emulated bf16 sum_rows" << what << ": not the CPU's sum rounded once";
    EXPECT_EQ(db[n], 0x7fff) << "emulated bf16 sum_rows" << what << " wrote past the end";
  }
}

TEST(CudaEmulation, FewRowSumsMatchTheCpuOnBothAccessWidths) { under_both_schedules(check_few_row_sums); }

// The residual fork, a = x + y and m = y + s (s over every block), and its backward, dy = da + dm and
// ds = Σ_g dm[g]: the bits of the CPU's separate sums, each rounded once. A block length that is not a
// multiple of 8 is declined, nothing written.
void check_residual_fork() {
  const int64_t blocks = 3, per_block = 1008;
  const size_t n = static_cast<size_t>(blocks * per_block), c = static_cast<size_t>(per_block);
  const std::vector<uint16_t> x = to_bf16(normal(n, 41)), y = to_bf16(normal(n, 42)), s = to_bf16(normal(c, 43));
  std::vector<uint16_t> a(n), m(n);
  ASSERT_TRUE(emu::residual_fork_bf16_cuda(a.data(), m.data(), x.data(), y.data(), s.data(), blocks, per_block,
                                           nullptr));
  const std::vector<float> xf = to_f32(x), yf = to_f32(y), sf = to_f32(s);
  std::vector<float> a_ref(n), m_ref(n);
  kernels::add_cpu(a_ref.data(), xf.data(), yf.data(), blocks * per_block);
  kernels::add_broadcast_cpu(m_ref.data(), yf.data(), sf.data(), blocks, per_block);
  EXPECT_EQ(a, to_bf16(a_ref)) << "emulated residual fork: a = x + y";
  EXPECT_EQ(m, to_bf16(m_ref)) << "emulated residual fork: m = y + s";

  const std::vector<uint16_t> da = to_bf16(normal(n, 44)), dm = to_bf16(normal(n, 45));
  std::vector<uint16_t> dy(n), ds(c);
  ASSERT_TRUE(emu::residual_fork_backward_bf16_cuda(dy.data(), ds.data(), da.data(), dm.data(), blocks, per_block,
                                                    nullptr));
  const std::vector<float> daf = to_f32(da), dmf = to_f32(dm);
  std::vector<float> dy_ref(n), ds_ref(c, 0.0f);
  kernels::add_cpu(dy_ref.data(), daf.data(), dmf.data(), blocks * per_block);
  kernels::sum_rows_cpu(ds_ref.data(), dmf.data(), blocks, per_block);
  EXPECT_EQ(dy, to_bf16(dy_ref)) << "emulated residual fork backward: dy = da + dm";
  EXPECT_EQ(ds, to_bf16(ds_ref)) << "emulated residual fork backward: ds = Σ_g dm[g]";

  std::vector<uint16_t> untouched(n, 0x7fff);
  EXPECT_FALSE(emu::residual_fork_bf16_cuda(untouched.data(), untouched.data(), x.data(), y.data(), s.data(), 2,
                                            1001, nullptr));
  EXPECT_FALSE(emu::residual_fork_backward_bf16_cuda(untouched.data(), untouched.data(), da.data(), dm.data(), 2, 1001,
                                                     nullptr));
  EXPECT_EQ(untouched, std::vector<uint16_t>(n, 0x7fff)) << "a declined fork wrote something";
}

TEST(CudaEmulation, ResidualForkIsTheSeparateSumsBitForBit) { under_both_schedules(check_residual_fork); }

// The fork with s = Σ_g x[g] summed in its own pass, against the kernels it stands for, chained as the
// model ran them — sum_bf16 for s, the fork; backward the fork's backward, then sum_stack's broadcast add
// of ds into da — bit for bit, for 2, 4 and 8 blocks, out of place and in place (dx into da, dy into dm).
// One block and nine are declined (the op then runs the chain), as is a block length not a multiple of 8.
void check_summed_residual_fork() {
  const int64_t per_block = 1008;
  for (const int64_t blocks : {int64_t{2}, int64_t{4}, int64_t{8}}) {
    const std::string what = " (" + std::to_string(blocks) + " blocks)";
    const size_t n = static_cast<size_t>(blocks * per_block), c = static_cast<size_t>(per_block);
    const std::vector<uint16_t> x = to_bf16(normal(n, 46)), y = to_bf16(normal(n, 47));
    std::vector<const uint16_t*> parts;
    for (int64_t g = 0; g < blocks; ++g) parts.push_back(x.data() + g * per_block);
    std::vector<uint16_t> s(c), a_want(n), m_want(n), a(n), m(n);
    emu::sum_bf16_cuda(s.data(), parts.data(), blocks, per_block, nullptr);
    ASSERT_TRUE(emu::residual_fork_bf16_cuda(a_want.data(), m_want.data(), x.data(), y.data(), s.data(), blocks,
                                             per_block, nullptr));
    ASSERT_TRUE(emu::residual_fork_summed_bf16_cuda(a.data(), m.data(), x.data(), y.data(), blocks, per_block, nullptr));
    EXPECT_EQ(a, a_want) << "emulated summed fork: a = x + y" << what;
    EXPECT_EQ(m, m_want) << "emulated summed fork: m = y + Σ_g x[g]" << what;

    const std::vector<uint16_t> da = to_bf16(normal(n, 48)), dm = to_bf16(normal(n, 49));
    std::vector<uint16_t> dy_want(n), ds(c), dx_want(n);
    ASSERT_TRUE(emu::residual_fork_backward_bf16_cuda(dy_want.data(), ds.data(), da.data(), dm.data(), blocks,
                                                      per_block, nullptr));
    emu::add_broadcast_bf16_cuda(dx_want.data(), da.data(), ds.data(), blocks, per_block, nullptr);
    std::vector<uint16_t> dx(n), dy(n);
    ASSERT_TRUE(emu::residual_fork_summed_backward_bf16_cuda(dx.data(), dy.data(), da.data(), dm.data(), blocks,
                                                             per_block, nullptr));
    EXPECT_EQ(dx, dx_want) << "emulated summed fork backward: dx = da + Σ_g dm[g]" << what;
    EXPECT_EQ(dy, dy_want) << "emulated summed fork backward: dy = da + dm" << what;
    std::vector<uint16_t> da_in_place = da, dm_in_place = dm;
    ASSERT_TRUE(emu::residual_fork_summed_backward_bf16_cuda(da_in_place.data(), dm_in_place.data(), da_in_place.data(),
                                                             dm_in_place.data(), blocks, per_block, nullptr));
    EXPECT_EQ(da_in_place, dx_want) << "emulated summed fork backward in place: dx into da" << what;
    EXPECT_EQ(dm_in_place, dy_want) << "emulated summed fork backward in place: dy into dm" << what;
  }
  const size_t n = 9 * 1008;
  const std::vector<uint16_t> x = to_bf16(normal(n, 50));
  std::vector<uint16_t> untouched(n, 0x7fff);
  for (const auto& [blocks, per_block] : {std::pair<int64_t, int64_t>{1, 1008}, std::pair<int64_t, int64_t>{9, 1008},
                                          std::pair<int64_t, int64_t>{2, 1001}}) {
    EXPECT_FALSE(emu::residual_fork_summed_bf16_cuda(untouched.data(), untouched.data(), x.data(), x.data(), blocks,
                                                     per_block, nullptr));
    EXPECT_FALSE(emu::residual_fork_summed_backward_bf16_cuda(untouched.data(), untouched.data(), x.data(), x.data(),
                                                              blocks, per_block, nullptr));
  }
  EXPECT_EQ(untouched, std::vector<uint16_t>(n, 0x7fff)) << "a declined summed fork wrote something";
}

TEST(CudaEmulation, SummedResidualForkIsTheChainItReplacesBitForBit) {
  under_both_schedules(check_summed_residual_fork);
}

// The fork with S summed in it and LN2 in the same pass against the summed fork, then a LayerNorm per
// group reading m back — a, m, out, mean and rstd bit for bit — for 2 and 4 groups at C = 504 (2 packs a
// lane, the preset's), 3 groups at C = 48 (one pack, lanes idle), 2 at 1024 (4 packs), 4 at 40 and 4 at 768
// (3 packs: G·packs above what the kernel with every group's row loaded first holds), with and without
// beta — both kernels: G = 2 and 4 with G·packs ≤ 8 load every group first, the others loop over G.
// G = 1 and 9, C = 52 and 2056 are declined.
void check_summed_fork_layernorm() {
  for (const auto& [G, rows, C] : {std::tuple<int64_t, int64_t, int64_t>{2, 13, 504},
                                   std::tuple<int64_t, int64_t, int64_t>{4, 9, 504},
                                   std::tuple<int64_t, int64_t, int64_t>{3, 11, 48},
                                   std::tuple<int64_t, int64_t, int64_t>{2, 5, 1024},
                                   std::tuple<int64_t, int64_t, int64_t>{4, 6, 40},
                                   std::tuple<int64_t, int64_t, int64_t>{4, 7, 768}}) {
    for (const bool with_beta : {true, false}) {
      const std::string what = " (" + std::to_string(G) + " groups of " + std::to_string(rows) + " × " +
                               std::to_string(C) + (with_beta ? ")" : ", no beta)");
      const size_t n = static_cast<size_t>(G * rows * C);
      const std::vector<uint16_t> x = to_bf16(normal(n, 51)), y = to_bf16(normal(n, 52));
      std::vector<std::vector<float>> gammas, betas;
      std::vector<const float*> gamma_ptrs, beta_ptrs;
      for (int64_t g = 0; g < G; ++g) {
        gammas.push_back(normal(static_cast<size_t>(C), 53 + static_cast<uint32_t>(g)));
        betas.push_back(normal(static_cast<size_t>(C), 63 + static_cast<uint32_t>(g)));
      }
      for (int64_t g = 0; g < G; ++g) {
        gamma_ptrs.push_back(gammas[static_cast<size_t>(g)].data());
        beta_ptrs.push_back(with_beta ? betas[static_cast<size_t>(g)].data() : nullptr);
      }
      std::vector<uint16_t> a(n), m(n), out(n), a_want(n), m_want(n), out_want(n);
      std::vector<float> mean(static_cast<size_t>(G * rows)), rstd(mean.size()), mean_want(mean.size()),
          rstd_want(mean.size());
      ASSERT_TRUE(emu::residual_fork_summed_layernorm_bf16_cuda(a.data(), m.data(), out.data(), mean.data(), rstd.data(),
                                                                x.data(), y.data(), gamma_ptrs.data(), beta_ptrs.data(),
                                                                G, rows, C, 1e-5f, nullptr))
          << what;
      ASSERT_TRUE(emu::residual_fork_summed_bf16_cuda(a_want.data(), m_want.data(), x.data(), y.data(), G, rows * C,
                                                      nullptr));
      for (int64_t g = 0; g < G; ++g) {
        const int64_t at = g * rows * C;
        emu::layernorm_forward_bf16_cuda(out_want.data() + at, mean_want.data() + g * rows, rstd_want.data() + g * rows,
                                         m_want.data() + at, gamma_ptrs[static_cast<size_t>(g)],
                                         beta_ptrs[static_cast<size_t>(g)], rows, C, 1e-5f, nullptr);
      }
      EXPECT_EQ(a, a_want) << "a = x + y" << what;
      EXPECT_EQ(m, m_want) << "m = y + Σ_g x[g]" << what;
      EXPECT_EQ(out, out_want) << "LN2(m)" << what;
      EXPECT_EQ(mean, mean_want) << "mean" << what;
      EXPECT_EQ(rstd, rstd_want) << "rstd" << what;
    }
  }
  const std::vector<uint16_t> x = to_bf16(normal(9 * 4 * 2056, 70));
  const std::vector<float> gamma = normal(2056, 71);
  std::vector<const float*> gammas(9, gamma.data()), betas(9, nullptr);
  std::vector<uint16_t> untouched(x.size(), 0x7fff);
  std::vector<float> stats(36, -1.0f);
  for (const auto& [G, C] : {std::pair<int64_t, int64_t>{1, 504}, std::pair<int64_t, int64_t>{9, 504},
                             std::pair<int64_t, int64_t>{2, 52}, std::pair<int64_t, int64_t>{2, 2056}}) {
    EXPECT_FALSE(emu::residual_fork_summed_layernorm_bf16_cuda(untouched.data(), untouched.data(), untouched.data(),
                                                               stats.data(), stats.data(), x.data(), x.data(),
                                                               gammas.data(), betas.data(), G, 4, C, 1e-5f, nullptr))
        << G << " groups of C = " << C;
  }
  EXPECT_EQ(untouched, std::vector<uint16_t>(x.size(), 0x7fff)) << "a declined fork and LayerNorm wrote something";
}

TEST(CudaEmulation, SummedForkWithLayerNormIsTheForkThenTheLayerNormBitForBit) {
  under_both_schedules(check_summed_fork_layernorm);
}

// Its backward in one pass against the two it replaces — LN2's grouped backward writing dm, then the summed
// fork's backward reading it — dx, dy and every group's dgamma and dbeta (added into 0.5 and −0.25) bit for
// bit: 2 groups of 45 × 504 (2 packs, two chunks), 4 of 33 × 768 (3 packs: G·packs 12, the most held; a
// chunk of one row), 2 of 70 × 1024 (4 packs), 4 of 6 × 40 (lanes without a pack); every parameter, none
// (no slices), or a mix (group 1 without dgamma, the last without dbeta); and, with every parameter, written
// in place over da and dout. Declined with nothing written: 1 and 3 groups, 4 groups at C = 1024 (16 packs), C = 52 and 1032,
// a misaligned da.
void check_summed_fork_layernorm_backward() {
  for (const auto& [G, rows, C] : {std::tuple<int64_t, int64_t, int64_t>{2, 45, 504},
                                   std::tuple<int64_t, int64_t, int64_t>{4, 33, 768},
                                   std::tuple<int64_t, int64_t, int64_t>{2, 70, 1024},
                                   std::tuple<int64_t, int64_t, int64_t>{4, 6, 40}}) {
    const size_t n = static_cast<size_t>(G * rows * C), gc = static_cast<size_t>(G * C);
    const std::vector<uint16_t> m = to_bf16(normal(n, 101, 2.0f)), da = to_bf16(normal(n, 102)),
                                dout = to_bf16(normal(n, 103));
    const std::vector<float> gammas = normal(gc, 104), betas = normal(gc, 105);
    std::vector<float> mean(static_cast<size_t>(G * rows)), rstd(mean.size());
    std::vector<uint16_t> out(n);
    for (int64_t g = 0; g < G; ++g)  // statistics of m as LN2's forward leaves them
      emu::layernorm_forward_bf16_cuda(out.data() + g * rows * C, mean.data() + g * rows, rstd.data() + g * rows,
                                       m.data() + g * rows * C, gammas.data() + g * C, betas.data() + g * C, rows, C,
                                       1e-5f, nullptr);
    enum class Params { kAll, kNone, kMixed };
    for (const Params params : {Params::kAll, Params::kNone, Params::kMixed}) {
      const std::string what = " (" + std::to_string(G) + " groups of " + std::to_string(rows) + " × " +
                               std::to_string(C) +
                               (params == Params::kAll ? ")" : params == Params::kNone ? ", no parameters)" : ", mixed)");
      struct Run {
        std::vector<uint16_t> dx, dy;
        std::vector<float> dgamma, dbeta;
      };
      auto run = [&](bool fused, bool in_place) {
        Run r{std::vector<uint16_t>(n, 0x7fc0), std::vector<uint16_t>(n, 0x7fc0), std::vector<float>(gc, 0.5f),
              std::vector<float>(gc, -0.25f)};
        std::vector<emu::LayerNormGroupGradients> groups(static_cast<size_t>(G));
        for (int64_t g = 0; g < G; ++g) {
          const bool dgamma = params == Params::kAll || (params == Params::kMixed && g != 1);
          const bool dbeta = params == Params::kAll || (params == Params::kMixed && g != G - 1);
          groups[static_cast<size_t>(g)] = {gammas.data() + g * C, dgamma ? r.dgamma.data() + g * C : nullptr,
                                            dbeta ? r.dbeta.data() + g * C : nullptr};
        }
        if (fused && in_place) {
          r.dx = da;
          r.dy = dout;
          EXPECT_TRUE(emu::residual_fork_summed_layernorm_backward_bf16_cuda(
              r.dx.data(), r.dy.data(), groups.data(), G, r.dx.data(), r.dy.data(), m.data(), mean.data(),
              rstd.data(), rows, C, nullptr))
              << what;
        } else if (fused) {
          EXPECT_TRUE(emu::residual_fork_summed_layernorm_backward_bf16_cuda(
              r.dx.data(), r.dy.data(), groups.data(), G, da.data(), dout.data(), m.data(), mean.data(), rstd.data(),
              rows, C, nullptr))
              << what;
        } else {
          std::vector<uint16_t> dm(n, 0x7fc0);
          emu::layernorm_backward_grouped_bf16_cuda(dm.data(), nullptr, groups.data(), G, dout.data(), m.data(),
                                                    mean.data(), rstd.data(), rows, C, nullptr);
          EXPECT_TRUE(emu::residual_fork_summed_backward_bf16_cuda(r.dx.data(), r.dy.data(), da.data(), dm.data(), G,
                                                                   rows * C, nullptr));
        }
        return r;
      };
      const Run want = run(false, false);
      for (const bool in_place : {false, true}) {
        if (in_place && params != Params::kAll) continue;  // (the emulation's time: in place once a shape)
        const Run got = run(true, in_place);
        const std::string how = what + (in_place ? ", in place" : "");
        EXPECT_EQ(got.dx, want.dx) << "dx = da + Σ_g dm[g]" << how;
        EXPECT_EQ(got.dy, want.dy) << "dy = da + dm" << how;
        EXPECT_EQ(got.dgamma, want.dgamma) << "dgamma" << how;
        EXPECT_EQ(got.dbeta, want.dbeta) << "dbeta" << how;
      }
      if (params == Params::kNone) {
        EXPECT_EQ(want.dgamma, std::vector<float>(gc, 0.5f)) << what;
      } else if (params == Params::kAll) {  // (the sums are there at all: a test that cannot pass vacuously)
        EXPECT_NE(want.dgamma, std::vector<float>(gc, 0.5f)) << what;
        EXPECT_NE(want.dbeta, std::vector<float>(gc, -0.25f)) << what;
      }
    }
  }
  const std::vector<uint16_t> x = to_bf16(normal(4 * 8 * 1032 + 8, 106));
  const std::vector<float> gamma = normal(4 * 1032, 107), stats(32, 1.0f);
  std::vector<uint16_t> untouched(x.size(), 0x7fff);
  std::vector<float> dgamma(4 * 1032, 0.5f);
  for (const auto& [G, C, offset] : {std::tuple<int64_t, int64_t, int>{1, 504, 0}, std::tuple<int64_t, int64_t, int>{3, 504, 0},
                                     std::tuple<int64_t, int64_t, int>{4, 1024, 0}, std::tuple<int64_t, int64_t, int>{2, 52, 0},
                                     std::tuple<int64_t, int64_t, int>{2, 1032, 0}, std::tuple<int64_t, int64_t, int>{2, 504, 1}}) {
    std::vector<emu::LayerNormGroupGradients> groups;
    for (int64_t g = 0; g < G; ++g) groups.push_back({gamma.data() + g * C, dgamma.data() + g * C, nullptr});
    EXPECT_FALSE(emu::residual_fork_summed_layernorm_backward_bf16_cuda(
        untouched.data(), untouched.data(), groups.data(), G, x.data() + offset, x.data(), x.data(), stats.data(),
        stats.data(), 8, C, nullptr))
        << G << " groups of C = " << C << (offset ? ", da misaligned" : "");
  }
  EXPECT_EQ(untouched, std::vector<uint16_t>(x.size(), 0x7fff)) << "a declined backward wrote dx or dy";
  EXPECT_EQ(dgamma, std::vector<float>(4 * 1032, 0.5f)) << "a declined backward added to dgamma";
}

TEST(CudaEmulation, SummedForkWithLayerNormBackwardIsTheTwoBackwardsBitForBit) {
  under_both_schedules(check_summed_fork_layernorm_backward);
}

// The product's bias taken into the LayerNorm after the residual add (ops::add_bias_layernorm). Forward:
// the bits of the three kernels it replaces (broadcast add of the bias, the add, the LayerNorm), a call
// per group with its own bias. Backward, for G groups in one call: dx, dgamma and dbeta the bits of the
// plain grouped one-pass backward (the third sum changes none of them), and each group's Σ_rows dx — in
// the LayerNorm's row order, not sum_rows's — within an f32 sum's error and one bf16 rounding of the exact
// sum of the group's stored dx (a sum of dout, of dx_in or of another group's dx is far outside that).
// (45, 504), (33, 768): the presets' C (2 and 3 packs a lane; 33 rows: two chunks, the last of one row);
// (70, 1024): 4 packs, the most the one pass takes; (9, 136): lanes without a pack; 4 groups of (33, 768):
// GPT-2's shape at degree 4; 2 of (45, 504).
void check_add_bias_layernorm() {
  struct Case {
    int64_t G, rows, C;
  };
  for (const Case& k : {Case{1, 45, 504}, Case{1, 33, 768}, Case{1, 70, 1024}, Case{1, 9, 136}, Case{4, 33, 768},
                        Case{2, 45, 504}}) {
    const int64_t G = k.G, rows = k.rows, C = k.C;
    const std::string what =
        " (" + std::to_string(G) + " × " + std::to_string(rows) + " × " + std::to_string(C) + ")";
    const size_t n = static_cast<size_t>(G * rows * C), per_group = static_cast<size_t>(rows * C);
    const size_t Cs = static_cast<size_t>(C), all_rows = static_cast<size_t>(G * rows);
    const std::vector<uint16_t> a = to_bf16(normal(n, 81, 2.0f)), b = to_bf16(normal(n, 82));
    const std::vector<uint16_t> bias = to_bf16(normal(static_cast<size_t>(G) * Cs, 83));
    const std::vector<float> gamma = normal(static_cast<size_t>(G) * Cs, 84),
                             beta = normal(static_cast<size_t>(G) * Cs, 85);
    std::vector<uint16_t> s(n), out(n), b_biased(n), s_want(n), out_want(n);
    std::vector<float> mean(all_rows), rstd(all_rows), mean_want(all_rows), rstd_want(all_rows);
    for (int64_t g = 0; g < G; ++g) {
      const size_t e = static_cast<size_t>(g) * per_group, r = static_cast<size_t>(g * rows);
      const size_t c = static_cast<size_t>(g) * Cs;
      ASSERT_TRUE(emu::add_bias_layernorm_forward_bf16_cuda(s.data() + e, out.data() + e, mean.data() + r,
                                                            rstd.data() + r, a.data() + e, b.data() + e,
                                                            bias.data() + c, gamma.data() + c, beta.data() + c,
                                                            rows, C, 1e-5f, nullptr))
          << what;
      emu::add_broadcast_bf16_cuda(b_biased.data() + e, b.data() + e, bias.data() + c, rows, C, nullptr);
      emu::add_bf16_cuda(s_want.data() + e, a.data() + e, b_biased.data() + e, rows * C, nullptr);
      emu::layernorm_forward_bf16_cuda(out_want.data() + e, mean_want.data() + r, rstd_want.data() + r,
                                       s_want.data() + e, gamma.data() + c, beta.data() + c, rows, C, 1e-5f, nullptr);
    }
    EXPECT_EQ(s, s_want) << "s = a + (b + bias)" << what;
    EXPECT_EQ(out, out_want) << "layernorm(s)" << what;
    EXPECT_EQ(mean, mean_want) << "mean" << what;
    EXPECT_EQ(rstd, rstd_want) << "rstd" << what;

    const std::vector<uint16_t> dout = to_bf16(normal(n, 86)), ds = to_bf16(normal(n, 87));
    for (const bool with_params : {true, false}) {
      const std::string how = what + (with_params ? "" : ", no dgamma or dbeta");
      std::vector<uint16_t> dx(n, 0x7fc0), dx_want(n, 0x7fc0), dbias(static_cast<size_t>(G) * Cs, 0x7fc0);
      std::vector<float> dgamma(static_cast<size_t>(G) * Cs, 0.5f), dbeta(dgamma.size(), -0.25f);
      std::vector<float> dgamma_want = dgamma, dbeta_want = dbeta;
      std::vector<emu::LayerNormGroupGradients> groups, groups_want;
      for (int64_t g = 0; g < G; ++g) {
        const size_t c = static_cast<size_t>(g) * Cs;
        groups.push_back({gamma.data() + c, with_params ? dgamma.data() + c : nullptr,
                          with_params ? dbeta.data() + c : nullptr});
        // The plain backward's bits: a one-pass one needs a parameter's gradient to take, so it is always
        // asked for dbeta here and the run without parameters compares dx alone.
        groups_want.push_back({gamma.data() + c, dgamma_want.data() + c, dbeta_want.data() + c});
      }
      ASSERT_TRUE(emu::layernorm_backward_summing_dx_bf16_cuda(dx.data(), ds.data(), groups.data(), G, dbias.data(),
                                                               dout.data(), s.data(), mean.data(), rstd.data(), rows,
                                                               C, nullptr))
          << how;
      emu::layernorm_backward_grouped_bf16_cuda(dx_want.data(), ds.data(), groups_want.data(), G, dout.data(),
                                                s.data(), mean.data(), rstd.data(), rows, C, nullptr);
      EXPECT_EQ(dx, dx_want) << "dx" << how;
      if (with_params) {
        EXPECT_EQ(dgamma, dgamma_want) << "dgamma" << how;
        EXPECT_EQ(dbeta, dbeta_want) << "dbeta" << how;
      } else {
        EXPECT_EQ(dgamma, std::vector<float>(dgamma.size(), 0.5f)) << "dgamma not asked for" << how;
      }
      const std::vector<float> dx_f = to_f32(dx), dbias_f = to_f32(dbias);
      int off_by_more = 0;
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t c = 0; c < C; ++c) {
          double exact = 0.0, scale = 0.0;
          for (int64_t r = 0; r < rows; ++r) {
            const double v = dx_f[static_cast<size_t>((g * rows + r) * C + c)];
            exact += v;
            scale += std::fabs(v);
          }
          // An f32 sum of `rows` terms in any order (rows · 2⁻²⁴ of their absolute sum), then one rounding
          // to bf16 (2⁻⁸ of the result at most)
          const double bound =
              std::ldexp(std::fabs(exact), -8) + static_cast<double>(rows) * std::ldexp(scale, -24);
          if (std::fabs(dbias_f[static_cast<size_t>(g * C + c)] - exact) > bound) ++off_by_more;
        }
      }
      EXPECT_EQ(off_by_more, 0) << "columns of Σ dx beyond one rounding of the exact sum" << how;
    }
  }
  // Declined, nothing written: C not a multiple of 8, C above 1024 (backward), a misaligned bias.
  const std::vector<uint16_t> x = to_bf16(normal(8 * 1032, 88));
  const std::vector<float> gamma = normal(1032, 89), stats_in(8, 1.0f);
  std::vector<uint16_t> untouched(x.size(), 0x7fff), sums(1032, 0x7fff);
  std::vector<float> stats(8, -1.0f);
  EXPECT_FALSE(emu::add_bias_layernorm_forward_bf16_cuda(untouched.data(), untouched.data(), stats.data(), stats.data(),
                                                         x.data(), x.data(), x.data(), gamma.data(), nullptr, 8, 100,
                                                         1e-5f, nullptr));
  EXPECT_FALSE(emu::add_bias_layernorm_forward_bf16_cuda(untouched.data(), untouched.data(), stats.data(), stats.data(),
                                                         x.data(), x.data(), x.data() + 1, gamma.data(), nullptr, 8,
                                                         128, 1e-5f, nullptr));
  const emu::LayerNormGroupGradients no_params{gamma.data(), nullptr, nullptr};
  EXPECT_FALSE(emu::layernorm_backward_summing_dx_bf16_cuda(untouched.data(), nullptr, &no_params, 1, sums.data(),
                                                            x.data(), x.data(), stats_in.data(), stats_in.data(), 8,
                                                            1032, nullptr));
  const emu::LayerNormGroupGradients two[2] = {no_params, no_params};  // Σ dx misaligned: 2 groups of (4, 128)
  EXPECT_FALSE(emu::layernorm_backward_summing_dx_bf16_cuda(untouched.data(), nullptr, two, 2, sums.data() + 1,
                                                            x.data(), x.data(), stats_in.data(), stats_in.data(), 4,
                                                            128, nullptr));
  EXPECT_EQ(untouched, std::vector<uint16_t>(x.size(), 0x7fff)) << "a declined call wrote something";
  EXPECT_EQ(sums, std::vector<uint16_t>(1032, 0x7fff)) << "a declined call wrote Σ dx";
  EXPECT_EQ(stats, std::vector<float>(8, -1.0f)) << "a declined call wrote row statistics";
}

TEST(CudaEmulation, AddBiasLayerNormIsTheChainsBitsAndSumsTheStoredDx) {
  under_both_schedules(check_add_bias_layernorm);
}

void check_casts_and_accumulate() {
  for (const int64_t n : {int64_t{1001}, int64_t{1024}}) {  // scalar, then 8 elements per access
    const std::string what = " (n = " + std::to_string(n) + ")";
    const size_t m = static_cast<size_t>(n);
    std::vector<float> x = normal(m, 12, 40.0f);
    x[0] = 0.0f, x[1] = -0.0f, x[2] = 3.0e38f, x[3] = 1.0e-40f;  // signed zeros, near the top, subnormal
    const std::vector<uint16_t> h = to_bf16(normal(m, 13));
    std::vector<uint16_t> narrowed(m);
    std::vector<float> widened(m), acc = normal(m, 14), acc_cpu = acc;
    emu::cast_f32_to_bf16_cuda(narrowed.data(), x.data(), n, nullptr);
    emu::cast_bf16_to_f32_cuda(widened.data(), h.data(), n, nullptr);
    emu::accumulate_bf16_cuda(acc.data(), h.data(), n, nullptr);
    const std::vector<float> h_f = to_f32(h);
    for (size_t i = 0; i < m; ++i) acc_cpu[i] += h_f[i];
    EXPECT_EQ(narrowed, to_bf16(x)) << "emulated f32 → bf16 cast" << what << ": not the CPU's rounding";
    EXPECT_EQ(widened, h_f) << "emulated bf16 → f32 cast" << what;
    EXPECT_EQ(acc, acc_cpu) << "emulated f32 += bf16" << what;
  }
}

// The many-tensor casts (one launch per kernels::kCastsPerLaunch tensors) against the CPU's one-tensor
// casts, bit for bit: lengths around multiples of 8, an empty one, and more tensors than one launch takes,
// packed into one input and one output buffer. Slice k starts 16-byte aligned on both sides (k mod 4 =
// 0: 8 elements per access), one element off on the input side (1), the output side (2) or both (3):
// one per access. The gaps between the outputs keep a sentinel: nothing is written outside a tensor.
template <typename T>
size_t to_aligned16(const std::vector<T>& v, size_t at) {  // the first index >= at whose address is 16-byte aligned
  while (reinterpret_cast<uintptr_t>(v.data() + at) % 16 != 0) ++at;
  return at;
}
template <typename From, typename To>
struct PackedTensors {
  std::vector<From> in;
  std::vector<To> out;
  std::vector<const From*> xs;
  std::vector<To*> outs;
};
template <typename From, typename To>
PackedTensors<From, To> packed(const std::vector<int64_t>& ns, const std::vector<From>& values, To sentinel) {
  PackedTensors<From, To> p;
  size_t total = 0;
  for (int64_t n : ns) total += static_cast<size_t>(n) + 24;
  p.in.assign(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(total));
  p.out.assign(total, sentinel);
  size_t in_at = 0, out_at = 0;
  for (size_t k = 0; k < ns.size(); ++k) {
    in_at = to_aligned16(p.in, in_at) + (k % 4 == 1 || k % 4 == 3 ? 1 : 0);
    out_at = to_aligned16(p.out, out_at) + (k % 4 == 2 || k % 4 == 3 ? 1 : 0);
    p.xs.push_back(p.in.data() + in_at);
    p.outs.push_back(p.out.data() + out_at);
    in_at += static_cast<size_t>(ns[k]) + 1, out_at += static_cast<size_t>(ns[k]) + 1;
  }
  return p;
}

void check_many_casts() {
  std::vector<int64_t> ns = {1, 7, 8, 9, 15, 16, 17, 0, 1000, 1001, 4099, 2048, 24, 40, 33, 31};
  for (int64_t k = 0; static_cast<int64_t>(ns.size()) < kernels::kCastsPerLaunch + 20; ++k) ns.push_back(1 + (k * 13) % 40);
  std::vector<float> values = normal(200000, 17, 40.0f);
  // signed zeros, near the top, subnormal, infinities, ties to even (down, then up)
  const uint32_t specials[] = {0x00000000u, 0x80000000u, 0x7f7fffffu, 0x00000f00u,
                               0x7f800000u, 0xff800000u, 0x3f808000u, 0x3f818000u};
  for (size_t i = 0; i < 8; ++i) std::memcpy(&values[8 + i], &specials[i], 4);
  const int64_t count = static_cast<int64_t>(ns.size());

  PackedTensors<float, uint16_t> f = packed(ns, values, uint16_t{0xabcd});
  emu::cast_f32_to_bf16_many_cuda(f.outs.data(), f.xs.data(), ns.data(), count, nullptr);
  std::vector<uint16_t> want(f.out.size(), uint16_t{0xabcd});
  for (size_t k = 0; k < ns.size(); ++k)
    kernels::cast_f32_to_bf16_cpu(want.data() + (f.outs[k] - f.out.data()), f.xs[k], ns[k]);
  for (size_t i = 0; i < want.size(); ++i)
    ASSERT_EQ(f.out[i], want[i]) << "emulated many-tensor f32 → bf16 cast: output buffer element " << i;

  PackedTensors<uint16_t, float> b = packed(ns, to_bf16(values), -7.0f);
  emu::cast_bf16_to_f32_many_cuda(b.outs.data(), b.xs.data(), ns.data(), count, nullptr);
  std::vector<float> want_f(b.out.size(), -7.0f);
  for (size_t k = 0; k < ns.size(); ++k)
    kernels::cast_bf16_to_f32_cpu(want_f.data() + (b.outs[k] - b.out.data()), b.xs[k], ns[k]);
  for (size_t i = 0; i < want_f.size(); ++i) {
    uint32_t got_bits, want_bits;
    std::memcpy(&got_bits, &b.out[i], 4), std::memcpy(&want_bits, &want_f[i], 4);
    ASSERT_EQ(got_bits, want_bits) << "emulated many-tensor bf16 → f32 cast: output buffer element " << i;
  }

  // The accumulating form: every f32 output += its widened bf16 input, the bits of a cast then an add
  // with alpha 1 (the engine's accumulation), outside the tensors untouched.
  const std::vector<float> start = normal(b.out.size(), 23, 3.0f);
  std::copy(start.begin(), start.end(), b.out.begin());  // (in place: outs point into b.out)
  emu::accumulate_bf16_many_cuda(b.outs.data(), b.xs.data(), ns.data(), count, nullptr);
  std::vector<float> want_acc = start;
  for (size_t k = 0; k < ns.size(); ++k) {
    std::vector<float> widened(static_cast<size_t>(ns[k]));
    kernels::cast_bf16_to_f32_cpu(widened.data(), b.xs[k], ns[k]);
    kernels::axpy_cpu(want_acc.data() + (b.outs[k] - b.out.data()), widened.data(), 1.0f, ns[k]);
  }
  std::vector<float> cpu_acc = start;
  std::vector<float*> cpu_outs;
  for (float* o : b.outs) cpu_outs.push_back(cpu_acc.data() + (o - b.out.data()));
  kernels::accumulate_bf16_many_cpu(cpu_outs.data(), b.xs.data(), ns.data(), count);
  for (size_t i = 0; i < want_acc.size(); ++i) {
    uint32_t got_bits, cpu_bits, want_bits;
    std::memcpy(&got_bits, &b.out[i], 4), std::memcpy(&cpu_bits, &cpu_acc[i], 4);
    std::memcpy(&want_bits, &want_acc[i], 4);
    ASSERT_EQ(got_bits, want_bits) << "emulated many-tensor bf16 += into f32: output buffer element " << i;
    ASSERT_EQ(cpu_bits, want_bits) << "CPU many-tensor bf16 += into f32: output buffer element " << i;
  }

  // The zeroing form: every tensor's elements +0.0, everything between them untouched.
  std::copy(start.begin(), start.end(), b.out.begin());
  emu::zero_many_cuda(b.outs.data(), ns.data(), count, nullptr);
  std::vector<float> want_zero = start;
  for (size_t k = 0; k < ns.size(); ++k)
    std::fill_n(want_zero.begin() + (b.outs[k] - b.out.data()), ns[k], 0.0f);
  for (size_t i = 0; i < want_zero.size(); ++i) {
    uint32_t got_bits, want_bits;
    std::memcpy(&got_bits, &b.out[i], 4), std::memcpy(&want_bits, &want_zero[i], 4);
    ASSERT_EQ(got_bits, want_bits) << "emulated many-tensor zero: output buffer element " << i;
  }
}

TEST(CudaEmulation, ManyTensorCastsAreTheOneTensorCastsBits) { under_both_schedules(check_many_casts); }

void check_sum_rows() {
  // Two-pass column sums (cols a multiple of 8: 128-row chunks, three and nine of them with a partial
  // last one; 2048 columns, 512-row chunks; 151 chunks, more than the second pass's 64 chunk groups, so
  // that each adds two or three in order), the one-pass grouped kernel (100 columns), and the few-row
  // kernels (fewer than 64 rows: 8 columns per thread in bf16 here, cols being a multiple of 8).
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{300, 72}, std::pair<int64_t, int64_t>{1100, 136},
                                   std::pair<int64_t, int64_t>{600, 2048}, std::pair<int64_t, int64_t>{19237, 8},
                                   std::pair<int64_t, int64_t>{1100, 100}, std::pair<int64_t, int64_t>{40, 64}}) {
    const std::string what = " (" + std::to_string(rows) + ", " + std::to_string(cols) + ")";
    const std::vector<float> x = normal(static_cast<size_t>(rows * cols), 15);
    const std::vector<float> db0 = normal(static_cast<size_t>(cols), 16);
    std::vector<float> db = db0, db_cpu = db0;
    emu::sum_rows_cuda(db.data(), x.data(), rows, cols, nullptr);
    kernels::sum_rows_cpu(db_cpu.data(), x.data(), rows, cols);
    expect_close(db, db_cpu, 1e-5, false, "emulated sum_rows +=" + what);
    const std::vector<uint16_t> x16 = to_bf16(x), db16_0 = to_bf16(db0);
    std::vector<uint16_t> db16 = db16_0;
    emu::sum_rows_bf16_cuda(db16.data(), x16.data(), rows, cols, nullptr);
    std::vector<float> db16_cpu = to_f32(db16_0);
    kernels::sum_rows_cpu(db16_cpu.data(), to_f32(x16).data(), rows, cols);
    expect_close(to_f32(db16), db16_cpu, 1e-5, true, "emulated bf16 sum_rows +=" + what);
  }
}

TEST(CudaEmulation, ColumnSumsMatchTheCpuOnEveryPath) { under_both_schedules(check_sum_rows); }

// The grouped column sums (a grouped linear's bias gradients): every group's sums the bits of a sum_rows
// call of its own, f32 and bf16 — one launch of each pass for all groups where the two-pass kernels take the
// shape: 128-row chunks with a partial last one in each group (300 rows: a chunk must not run into the next
// group), 512-row chunks (2048 columns; 600 rows), rows a multiple of the chunk (256); and the per-group
// calls where they do not (40 rows, fewer than the row groups; 100 columns, not a multiple of 8). Nothing
// written past the groups' sums.
void check_grouped_sum_rows() {
  struct Shape3 {
    int64_t groups, rows, cols;
  };
  for (const Shape3& sh : {Shape3{3, 300, 72}, Shape3{2, 600, 2048}, Shape3{4, 256, 136}, Shape3{3, 40, 64},
                           Shape3{2, 300, 100}}) {
    const std::string what = " (" + std::to_string(sh.groups) + " × " + std::to_string(sh.rows) + " × " +
                             std::to_string(sh.cols) + ")";
    const size_t n = static_cast<size_t>(sh.groups * sh.rows * sh.cols), m = static_cast<size_t>(sh.groups * sh.cols);
    const std::vector<float> x = normal(n, 19), db0 = normal(m, 20);
    std::vector<float> db = db0, db_each = db0;
    db.push_back(1234.5f);  // a sentinel past the end
    emu::sum_rows_grouped_cuda(db.data(), x.data(), sh.groups, sh.rows, sh.cols, nullptr);
    for (int64_t g = 0; g < sh.groups; ++g)
      emu::sum_rows_cuda(db_each.data() + g * sh.cols, x.data() + g * sh.rows * sh.cols, sh.rows, sh.cols, nullptr);
    EXPECT_EQ(std::memcmp(db.data(), db_each.data(), m * sizeof(float)), 0)
        << "emulated grouped sum_rows" << what << ": not the bits of one call per group";
    EXPECT_EQ(db[m], 1234.5f) << "emulated grouped sum_rows" << what << " wrote past the end";

    const std::vector<uint16_t> x16 = to_bf16(x), db16_0 = to_bf16(db0);
    std::vector<uint16_t> db16 = db16_0, db16_each = db16_0;
    db16.push_back(0x7fff);
    emu::sum_rows_grouped_bf16_cuda(db16.data(), x16.data(), sh.groups, sh.rows, sh.cols, nullptr);
    for (int64_t g = 0; g < sh.groups; ++g)
      emu::sum_rows_bf16_cuda(db16_each.data() + g * sh.cols, x16.data() + g * sh.rows * sh.cols, sh.rows, sh.cols,
                              nullptr);
    EXPECT_EQ(std::vector<uint16_t>(db16.begin(), db16.begin() + static_cast<std::ptrdiff_t>(m)), db16_each)
        << "emulated grouped bf16 sum_rows" << what << ": not the bits of one call per group";
    EXPECT_EQ(db16[m], 0x7fff) << "emulated grouped bf16 sum_rows" << what << " wrote past the end";
  }
}

TEST(CudaEmulation, GroupedColumnSumsAreOneCallPerGroupsBits) { under_both_schedules(check_grouped_sum_rows); }

// The column sums that skip a range (c_attn's keys' bias columns, ops::BiasColumns): every other column the
// bits of the grouped sums over the matrix with the range cut out, the skipped columns of db untouched
// (their dout is poisoned with NaN, so a read of it would show) — one group and four (GPT-2's qkv thirds
// at a small C, and a skip at the start or the end); and a shape the two-pass sums do not take declines,
// writing nothing.
void check_skipping_sum_rows() {
  struct Case {
    int64_t groups, rows, cols, first, count;
  };
  for (const Case& k : {Case{1, 300, 216, 72, 72}, Case{4, 300, 192, 64, 64}, Case{2, 300, 2304, 768, 768},
                        Case{3, 256, 136, 0, 64}, Case{2, 130, 136, 72, 64}}) {
    const std::string what = " (" + std::to_string(k.groups) + " × " + std::to_string(k.rows) + " × " +
                             std::to_string(k.cols) + ", skipping [" + std::to_string(k.first) + ", " +
                             std::to_string(k.first + k.count) + "))";
    const int64_t kept = k.cols - k.count;
    const std::vector<float> x = normal(static_cast<size_t>(k.groups * k.rows * k.cols), 21);
    const std::vector<float> db0 = normal(static_cast<size_t>(k.groups * k.cols), 22);
    std::vector<uint16_t> x16 = to_bf16(x), compact, db_compact;
    for (int64_t r = 0; r < k.groups * k.rows; ++r)
      for (int64_t c = 0; c < k.cols; ++c) {
        uint16_t& v = x16[static_cast<size_t>(r * k.cols + c)];
        if (c >= k.first && c < k.first + k.count) v = 0x7fc0;  // NaN
        else compact.push_back(v);
      }
    const std::vector<uint16_t> db16_0 = to_bf16(db0);
    for (int64_t g = 0; g < k.groups; ++g)
      for (int64_t c = 0; c < k.cols; ++c)
        if (c < k.first || c >= k.first + k.count) db_compact.push_back(db16_0[static_cast<size_t>(g * k.cols + c)]);
    std::vector<uint16_t> db16 = db16_0;
    db16.push_back(0x7fff);  // a sentinel past the end
    ASSERT_TRUE(emu::sum_rows_skipping_bf16_cuda(db16.data(), x16.data(), k.groups, k.rows, k.cols, k.first, k.count,
                                                 nullptr))
        << what;
    emu::sum_rows_grouped_bf16_cuda(db_compact.data(), compact.data(), k.groups, k.rows, kept, nullptr);
    size_t next = 0;
    for (int64_t g = 0; g < k.groups; ++g)
      for (int64_t c = 0; c < k.cols; ++c) {
        const size_t i = static_cast<size_t>(g * k.cols + c);
        if (c >= k.first && c < k.first + k.count) EXPECT_EQ(db16[i], db16_0[i]) << what << ": skipped column " << c;
        else EXPECT_EQ(db16[i], db_compact[next++]) << what << ": group " << g << ", column " << c;
      }
    EXPECT_EQ(db16.back(), 0x7fff) << what << " wrote past the end";
  }
  // Declined: a skip not on 8-column boundaries, fewer rows than the row groups, columns not a multiple of 8.
  for (const Case& k : {Case{2, 300, 192, 60, 64}, Case{2, 40, 192, 64, 64}, Case{1, 300, 100, 8, 8}}) {
    const std::vector<uint16_t> x16 = to_bf16(normal(static_cast<size_t>(k.groups * k.rows * k.cols), 23));
    const std::vector<uint16_t> db16_0 = to_bf16(normal(static_cast<size_t>(k.groups * k.cols), 24));
    std::vector<uint16_t> db16 = db16_0;
    EXPECT_FALSE(emu::sum_rows_skipping_bf16_cuda(db16.data(), x16.data(), k.groups, k.rows, k.cols, k.first, k.count,
                                                  nullptr))
        << k.rows << " × " << k.cols;
    EXPECT_EQ(db16, db16_0) << "a declined call wrote";
  }
}

TEST(CudaEmulation, ColumnSumsSkippingARangeAreTheCutMatrixsBits) { under_both_schedules(check_skipping_sum_rows); }

// The two-pass column sums' bits, rebuilt here from the order column_sums.h documents: pass 1, for each chunk
// of chunk_rows(…) rows, 32 row groups each adding rows g, g + 32, … from 0, then the tree over the groups
// (strides 16 … 1); pass 2, 64 chunk groups each adding chunks g, g + 64, … from 0, then the tree (strides
// 32 … 1) — which the one- and two-chunk kernel must match without running it: GPT-2's position-embedding
// gradient (B rows, one chunk) takes that kernel, a LayerNorm backward's 2048 chunks the tree.
void check_column_sum_bits() {
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{300, 2048}, std::pair<int64_t, int64_t>{900, 2048},
                                   std::pair<int64_t, int64_t>{1100, 2048}, std::pair<int64_t, int64_t>{700, 72},
                                   std::pair<int64_t, int64_t>{19237, 8}}) {
    const int64_t chunk = kernels::cuda_detail::chunk_rows(rows, cols, kernels::cuda_detail::default_column_chunks());
    const int64_t chunks = (rows + chunk - 1) / chunk;
    const std::string what = " (" + std::to_string(rows) + " × " + std::to_string(cols) + ", " +
                             std::to_string(chunks) + " chunks)";
    const std::vector<float> x = normal(static_cast<size_t>(rows * cols), 17);
    const std::vector<float> db0 = normal(static_cast<size_t>(cols), 18);
    std::vector<float> db = db0;
    emu::sum_rows_cuda(db.data(), x.data(), rows, cols, nullptr);
    for (int64_t c = 0; c < cols; ++c) {
      std::vector<float> partial(static_cast<size_t>(chunks));
      for (int64_t j = 0; j < chunks; ++j) {
        float group[32] = {};
        const int64_t end = std::min(rows, (j + 1) * chunk);
        for (int g = 0; g < 32; ++g)
          for (int64_t r = j * chunk + g; r < end; r += 32) group[g] += x[static_cast<size_t>(r * cols + c)];
        for (int stride = 16; stride > 0; stride /= 2)
          for (int g = 0; g < stride; ++g) group[g] += group[g + stride];
        partial[static_cast<size_t>(j)] = group[0];
      }
      float group[64] = {};
      for (int g = 0; g < 64; ++g)
        for (int64_t j = g; j < chunks; j += 64) group[g] += partial[static_cast<size_t>(j)];
      for (int stride = 32; stride > 0; stride /= 2)
        for (int g = 0; g < stride; ++g) group[g] += group[g + stride];
      const float want = db0[static_cast<size_t>(c)] + group[0];
      uint32_t got_bits, want_bits;
      std::memcpy(&got_bits, &db[static_cast<size_t>(c)], 4), std::memcpy(&want_bits, &want, 4);
      ASSERT_EQ(got_bits, want_bits) << "column " << c << what << ": " << db[static_cast<size_t>(c)] << " against "
                                     << want;
    }
  }
}

TEST(CudaEmulation, ColumnSumsAreTheDocumentedOrdersBits) { under_both_schedules(check_column_sum_bits); }

// The first pass's chunks under both rules (kernels/cuda/column_chunks.h), at GPT-2's bias gradients (C,
// 3C, 4C columns) for B = 8 and 64 and at the edges. The sums themselves under the long rule: ctest runs
// the test above again with KRAKEN_CUDA_COLUMN_CHUNKS=long (cuda_emu.ColumnSumsWithLongChunks), where
// (600, 2048) takes 128-row chunks instead of 512.
TEST(CudaEmulation, ColumnChunksFollowTheirRule) {
  using kernels::cuda_detail::chunk_rows;
  using kernels::cuda_detail::ColumnChunks;
  const int64_t B8 = 8 * 1024, B64 = 64 * 1024;
  EXPECT_EQ(chunk_rows(B64, 768, ColumnChunks::kShort), 128);
  EXPECT_EQ(chunk_rows(B64, 2048, ColumnChunks::kShort), 512);  // 32 column blocks
  EXPECT_EQ(chunk_rows(B64, 2040, ColumnChunks::kShort), 512);  // 31.9, a partial 32nd
  EXPECT_EQ(chunk_rows(B64, 1984, ColumnChunks::kShort), 128);  // 31
  // long: the longest of 2048, 1024, …, 128 rows that keeps 2048 blocks
  EXPECT_EQ(chunk_rows(B64, 768, ColumnChunks::kLong), 256);    // 12 × 256 = 3072 blocks (512: 1536)
  EXPECT_EQ(chunk_rows(B64, 2304, ColumnChunks::kLong), 1024);  // 36 × 64 = 2304
  EXPECT_EQ(chunk_rows(B64, 3072, ColumnChunks::kLong), 1024);  // 48 × 64 = 3072
  EXPECT_EQ(chunk_rows(B8, 3072, ColumnChunks::kLong), 128);    // 48 × 64 = 3072 (256: 1536)
  EXPECT_EQ(chunk_rows(B8, 768, ColumnChunks::kLong), 128);     // the floor: 768 blocks
  EXPECT_EQ(chunk_rows(64 * 2048, 64 * 2048, ColumnChunks::kLong), 2048);  // the ceiling: 2048 × 64
  EXPECT_EQ(chunk_rows(2047 * 1024 + 1, 8, ColumnChunks::kLong), 1024);  // 2048 chunks, the last one row
  EXPECT_EQ(chunk_rows(2048 * 1024, 8, ColumnChunks::kLong), 1024);      // exactly 2048
  EXPECT_EQ(chunk_rows(2047 * 1024, 8, ColumnChunks::kLong), 512);       // 2047 would be too few
  EXPECT_EQ(chunk_rows(1, 8, ColumnChunks::kLong), 128);
}

TEST(CudaEmulation, CastsAndBf16AccumulationAreTheCpusBitsOnBothAccessWidths) {
  under_both_schedules(check_casts_and_accumulate);
}

// sum_bf16_cuda against what sum_list did before it (and still does above kSumsPerLaunch tensors): each
// tensor accumulated into f32 zeros, then one rounding — the same bits. One tensor (a copy), the Kraken
// presets' four, a full table; both access widths, a misaligned input (one element off: scalar) and
// all-negative-zero elements (0 + −0 is +0: the sum starts from 0, as the accumulator did).
void check_sum_bf16() {
  for (const int64_t n : {int64_t{1001}, int64_t{1024}}) {
    for (const int64_t count : {int64_t{1}, int64_t{4}, int64_t{kernels::kSumsPerLaunch}}) {
      for (const bool misaligned : {false, true}) {
        const std::string what = " (n = " + std::to_string(n) + ", " + std::to_string(count) + " tensors" +
                                 (misaligned ? ", one misaligned)" : ")");
        const size_t m = static_cast<size_t>(n);
        std::vector<std::vector<uint16_t>> xs;
        for (int64_t k = 0; k < count; ++k) {
          xs.push_back(to_bf16(normal(m + 1, 30 + static_cast<uint32_t>(k), 2.0f + static_cast<float>(k))));
          xs.back()[0] = xs.back()[1] = 0x8000;  // −0 at 0 in every tensor, also from one element on
        }
        std::vector<const uint16_t*> ptrs;
        for (int64_t k = 0; k < count; ++k) ptrs.push_back(xs[static_cast<size_t>(k)].data());  // 16-byte aligned
        if (misaligned) ptrs.back() = xs.back().data() + 1;  // 2 bytes off: one element per access
        std::vector<uint16_t> out(m + 2, 0x7fff);  // a sentinel past the end
        emu::sum_bf16_cuda(out.data(), ptrs.data(), count, n, nullptr);
        std::vector<float> acc(m, 0.0f);
        for (const uint16_t* x : ptrs) emu::accumulate_bf16_cuda(acc.data(), x, n, nullptr);
        std::vector<uint16_t> expected(m);
        emu::cast_f32_to_bf16_cuda(expected.data(), acc.data(), n, nullptr);
        EXPECT_EQ(std::vector<uint16_t>(out.begin(), out.begin() + n), expected)
            << "emulated bf16 sum of many" << what << ": not the accumulated sum rounded once";
        EXPECT_EQ(out[m], 0x7fff) << "emulated bf16 sum of many" << what << ": wrote past n";
        EXPECT_EQ(out[0], 0x0000) << "emulated bf16 sum of many" << what << ": 0 + −0 + … is +0";
      }
    }
  }
}

TEST(CudaEmulation, SumOfManyBf16TensorsIsTheAccumulatedSumsBits) { under_both_schedules(check_sum_bf16); }

// ---- attention on CUDA cores (fp32, and bf16 through the f32 code) -------------------------------------

void check_simt_attention(const AttentionShape& s) {
  const std::string what = "emulated SIMT attention " + s.str();
  const int64_t C = s.D * s.NH, rows = s.B * s.T;
  const std::vector<float> qkv = normal(static_cast<size_t>(rows * 3 * C), 21, 1.5f);
  const std::vector<float> dout = normal(static_cast<size_t>(rows * C), 22);
  std::vector<float> out(static_cast<size_t>(rows * C)), lse(static_cast<size_t>(s.B * s.NH * s.T));
  std::vector<float> dqkv(qkv.size(), 0.25f);  // the backward accumulates
  emu::attention_forward_cuda(out.data(), lse.data(), qkv.data(), s.B, s.T, C, s.NH, nullptr);
  emu::attention_backward_cuda(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), s.B, s.T, C, s.NH,
                               nullptr);
  std::vector<float> out_cpu(out.size()), lse_cpu(lse.size()), dqkv_cpu(dqkv.size(), 0.25f);
  kernels::attention_forward_cpu(out_cpu.data(), lse_cpu.data(), qkv.data(), s.B, s.T, C, s.NH);
  kernels::attention_backward_cpu(dqkv_cpu.data(), dout.data(), qkv.data(), out_cpu.data(), lse_cpu.data(), s.B, s.T,
                                  C, s.NH);
  // tests/gpu/nn_cuda_test.cpp: two chained reductions forward, four backward.
  expect_close(out, out_cpu, 1e-5, false, what + ": out");
  expect_close(lse, lse_cpu, 1e-5, false, what + ": lse");
  expect_close(dqkv, dqkv_cpu, 2e-5, false, what + ": dqkv +=");

  // bf16 storage through the same code: the CPU f32 kernel on the rounded inputs, each output rounded once.
  const std::vector<uint16_t> qkv16 = to_bf16(qkv), dout16 = to_bf16(dout);
  std::vector<uint16_t> out16(out.size()), dqkv16(dqkv.size(), 0);
  emu::attention_forward_bf16_simt_cuda(out16.data(), lse.data(), qkv16.data(), s.B, s.T, C, s.NH, nullptr);
  emu::attention_backward_bf16_simt_cuda(dqkv16.data(), dout16.data(), qkv16.data(), out16.data(), lse.data(), s.B,
                                         s.T, C, s.NH, nullptr);
  const std::vector<float> qkv_r = to_f32(qkv16), dout_r = to_f32(dout16);
  std::fill(dqkv_cpu.begin(), dqkv_cpu.end(), 0.0f);
  kernels::attention_forward_cpu(out_cpu.data(), lse_cpu.data(), qkv_r.data(), s.B, s.T, C, s.NH);
  kernels::attention_backward_cpu(dqkv_cpu.data(), dout_r.data(), qkv_r.data(), rounded(out_cpu).data(),
                                  lse_cpu.data(), s.B, s.T, C, s.NH);
  expect_close(to_f32(out16), out_cpu, 1e-5, true, what + " bf16: out");
  expect_close(to_f32(dqkv16), dqkv_cpu, 2e-5, true, what + " bf16: dqkv +=");
}

TEST(CudaEmulation, SimtAttentionMatchesTheCpu) {
  under_both_schedules([] {
    check_simt_attention({1, 1, 16, 1});
    check_simt_attention({2, 37, 16, 3});  // T past one tile, several heads
    check_simt_attention({1, 20, 272, 1});  // a head too large for the tensor-core kernels
  });
}

// ---- embedding, softmax ------------------------------------------------------------------------------

void check_embedding_and_softmax() {
  const int64_t N = 300, V = 50, C = 24;  // more ids than a block's 256 threads, repeated ids
  const std::vector<float> weight = normal(static_cast<size_t>(V * C), 31);
  std::vector<int32_t> ids(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) ids[static_cast<size_t>(n)] = static_cast<int32_t>((n * n + 7 * n) % V);
  std::vector<float> out(static_cast<size_t>(N * C)), out_cpu(out.size());
  emu::embedding_forward_cuda(out.data(), weight.data(), ids.data(), N, V, C, nullptr);
  kernels::embedding_forward_cpu(out_cpu.data(), weight.data(), ids.data(), N, V, C);
  EXPECT_EQ(out, out_cpu) << "emulated embedding forward";
  const std::vector<float> dout = normal(out.size(), 32);
  std::vector<float> dweight(weight.size(), 1.0f), dweight_cpu(weight.size(), 1.0f);
  emu::embedding_backward_cuda(dweight.data(), dout.data(), ids.data(), N, V, C, nullptr);
  kernels::embedding_backward_cpu(dweight_cpu.data(), dout.data(), ids.data(), N, V, C);
  EXPECT_EQ(dweight, dweight_cpu) << "emulated embedding backward: the ids' rows in id order, as on the CPU";
  // The backward's other paths, bit for bit too, and both against the header's order rebuilt here: ids
  // over several blocks' ranges (128 each); N = 7, no row can be hot; N = 300, 24 rows of 8 to 20
  // positions hot (the least threshold); N = 1100, 7 and 131 (440 and 293 positions, in different
  // blocks, interleaved with the others) hot with others; N = 5312 over 600 ids (512 rows of 9
  // consecutive positions, then 88 of 8): 600 rows of 8 or more are past the 512 the threshold allows,
  // so it is 9 and exactly 512 rows are hot, every slot (a cap one row lower, or one row higher, changes
  // the hot rows, and with several of a row's positions in one slice, the sums' bits). Hot rows summed
  // slice by slice; C = 24 (8 columns a lane, the hot slices 4), C = 20 (a column a lane, the hot slices
  // 4; lanes past the row), and C = 24 with the buffers one float off 16-byte alignment (a column a
  // lane); ids one int off 16-byte alignment.
  for (const auto& [Nb, Vb] : {std::pair<int64_t, int64_t>{7, 300}, {300, 300}, {1100, 300}, {5312, 600}}) {
    for (const auto& [Cb, skew] : {std::pair<int64_t, int64_t>{24, 0}, {20, 0}, {24, 1}}) {
      if (Nb == 5312 && (Cb != 24 || skew != 0)) continue;  // (the cap's case once: the emulation's time)
      std::vector<int32_t> ids_b(static_cast<size_t>(Nb + 1));
      for (int64_t n = 0; n < Nb; ++n) {
        int32_t id = static_cast<int32_t>((n * n + 7 * n) % Vb);
        if (Nb == 5312) id = static_cast<int32_t>(n < 4608 ? n / 9 : 512 + (n - 4608) / 8);  // runs: a slice adds
        else if (Nb > 1000 && n % 5 < 2) id = 7;                             // 440 of 1100: hot
        else if (Nb > 1000 && (n % 5 == 2 || (n % 5 == 3 && n % 3 == 0))) id = 131;  // 293: hot too
        ids_b[static_cast<size_t>(n + skew)] = id;
      }
      const int32_t* idp = ids_b.data() + skew;
      const std::vector<float> dout_b = normal(static_cast<size_t>(Nb * Cb + skew), 40);
      std::vector<float> dw = normal(static_cast<size_t>(Vb * Cb + skew), 41), dw_cpu = dw;
      emu::embedding_backward_cuda(dw.data() + skew, dout_b.data() + skew, idp, Nb, Vb, Cb, nullptr);
      kernels::embedding_backward_cpu(dw_cpu.data() + skew, dout_b.data() + skew, idp, Nb, Vb, Cb);
      const std::string what =
          "N " + std::to_string(Nb) + ", C " + std::to_string(Cb) + ", skew " + std::to_string(skew);
      EXPECT_EQ(dw, dw_cpu) << "emulated embedding backward against the CPU, " << what;
      // The order, from kernels/embedding.h.
      std::vector<float> want = normal(static_cast<size_t>(Vb * Cb + skew), 41);
      std::vector<int64_t> count(static_cast<size_t>(Vb), 0);
      for (int64_t n = 0; n < Nb; ++n) count[static_cast<size_t>(idp[n])] += 1;
      // The threshold by its definition: the least k ≥ 8 at which at most 512 rows have k or more.
      int64_t hot = kernels::kEmbeddingHotMin;
      for (;; ++hot) {
        int64_t rows = 0;
        for (const int64_t c : count) rows += c >= hot;
        if (rows <= kernels::kEmbeddingMaxHotRows) break;
      }
      EXPECT_EQ(hot, kernels::embedding_hot_threshold(count.data(), Vb, Nb)) << what;
      const int64_t L = kernels::embedding_slice_length(Nb);
      int hot_rows = 0;
      for (int64_t v = 0; v < Vb; ++v) {
        float* dst = want.data() + skew + v * Cb;
        const bool is_hot = count[static_cast<size_t>(v)] >= hot;
        hot_rows += is_hot;
        for (int64_t c = 0; c < Cb; ++c) {
          if (!is_hot) {
            for (int64_t n = 0; n < Nb; ++n)
              if (idp[n] == v) dst[c] += dout_b[static_cast<size_t>(skew + n * Cb + c)];
            continue;
          }
          for (int64_t sl = 0; sl < kernels::kEmbeddingHotSlices; ++sl) {
            float part = 0.0f;
            for (int64_t n = sl * L; n < std::min(Nb, (sl + 1) * L); ++n)
              if (idp[n] == v) part += dout_b[static_cast<size_t>(skew + n * Cb + c)];
            dst[c] += part;
          }
        }
      }
      const int want_hot_rows = Nb == 7 ? 0 : Nb == 300 ? 24 : Nb == 5312 ? 512 : -1;
      if (want_hot_rows >= 0) {
        EXPECT_EQ(hot_rows, want_hot_rows) << what;
      } else {
        EXPECT_GE(hot_rows, 2) << what;  // 7 and 131, and the rows of 8 or more
      }
      if (Nb == 5312) {
        EXPECT_EQ(hot, 9) << what;
      }
      EXPECT_EQ(dw_cpu, want) << "the CPU's embedding backward against the documented order, " << what;
      // From a bf16 gradient: the CPU's sums of it widened.
      const std::vector<uint16_t> dout_16 = to_bf16(dout_b);
      const std::vector<float> dout_wide = to_f32(dout_16);
      std::vector<float> dw16 = normal(static_cast<size_t>(Vb * Cb + skew), 42), dw16_cpu = dw16;
      emu::embedding_backward_bf16_cuda(dw16.data() + skew, dout_16.data() + skew, idp, Nb, Vb, Cb, nullptr);
      kernels::embedding_backward_cpu(dw16_cpu.data() + skew, dout_wide.data() + skew, idp, Nb, Vb, Cb);
      EXPECT_EQ(dw16, dw16_cpu) << "emulated bf16 embedding backward against the CPU's on the widened gradient, "
                                << what;
    }
  }

  const int64_t rows = 13, width = 300;
  const std::vector<float> x = normal(static_cast<size_t>(rows * width), 33, 3.0f), dy = normal(x.size(), 34);
  std::vector<float> y(x.size()), y_cpu(x.size()), dx(x.size(), 0.5f), dx_cpu(x.size(), 0.5f);
  emu::softmax_forward_cuda(y.data(), x.data(), rows, width, nullptr);
  emu::softmax_backward_cuda(dx.data(), y.data(), dy.data(), rows, width, nullptr);
  kernels::softmax_forward_cpu(y_cpu.data(), x.data(), rows, width);
  kernels::softmax_backward_cpu(dx_cpu.data(), y_cpu.data(), dy.data(), rows, width);
  expect_close(y, y_cpu, 1e-5, false, "emulated softmax forward");
  expect_close(dx, dx_cpu, 1e-5, false, "emulated softmax backward");
}

TEST(CudaEmulation, EmbeddingAndSoftmaxMatchTheCpu) { under_both_schedules(check_embedding_and_softmax); }

// The token and position embedding (kernels/embedding.h) against the three ops it stands for, bit for
// bit: forward, the CPU's lookup, add and rounding; backward, the f32 kernels on the gradient widened —
// the scatter into wte and the positions' column sums, on each of sum_rows's paths (B = 3: a thread per
// column; B = 70: the two-pass column sums; B = 70 with C = 12: not 8-wide, the one-pass grouped kernel,
// where the forward declines).
void check_token_position_embedding() {
  for (const auto& [B, T, C] : {std::tuple<int64_t, int64_t, int64_t>{3, 37, 24},
                                std::tuple<int64_t, int64_t, int64_t>{70, 5, 16},
                                std::tuple<int64_t, int64_t, int64_t>{70, 5, 12}}) {
    const std::string what = " (B " + std::to_string(B) + ", T " + std::to_string(T) + ", C " + std::to_string(C) + ")";
    const int64_t V = 50, N = B * T, context = T + 3;  // positions has rows past T, left alone
    const std::vector<float> wte = normal(static_cast<size_t>(V * C), 35), wpe = normal(static_cast<size_t>(context * C), 36);
    std::vector<int32_t> ids(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) ids[static_cast<size_t>(n)] = static_cast<int32_t>((n * n + 3 * n) % V);
    std::vector<uint16_t> out(static_cast<size_t>(N * C) + 8, 0x7fff);  // a sentinel past the end
    const bool fused = emu::embedding_positions_forward_bf16_cuda(out.data(), wte.data(), wpe.data(), ids.data(), N,
                                                                  T, V, C, nullptr);
    ASSERT_EQ(fused, C % 8 == 0) << "the forward takes C a multiple of 8 only" << what;
    if (fused) {
      std::vector<float> looked_up(static_cast<size_t>(N * C)), want(looked_up.size());
      kernels::embedding_forward_cpu(looked_up.data(), wte.data(), ids.data(), N, V, C);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c)
          want[static_cast<size_t>(n * C + c)] = looked_up[static_cast<size_t>(n * C + c)] + wpe[static_cast<size_t>((n % T) * C + c)];
      EXPECT_EQ(std::vector<uint16_t>(out.begin(), out.begin() + N * C), to_bf16(want)) << "forward" << what;
      EXPECT_EQ(out[static_cast<size_t>(N * C)], 0x7fff) << "forward wrote past N·C" << what;
    }
    const std::vector<uint16_t> dout = to_bf16(normal(static_cast<size_t>(N * C), 37));
    const std::vector<float> dout_f32 = to_f32(dout);
    std::vector<float> dwte = normal(wte.size(), 38), dwte_f32 = dwte;  // gradients already there (a tied head's)
    emu::embedding_backward_bf16_cuda(dwte.data(), dout.data(), ids.data(), N, V, C, nullptr);
    emu::embedding_backward_cuda(dwte_f32.data(), dout_f32.data(), ids.data(), N, V, C, nullptr);
    EXPECT_EQ(dwte, dwte_f32) << "wte's scatter from the bf16 gradient against the f32 kernel on it widened" << what;
    std::vector<float> dwpe = normal(wpe.size(), 39), dwpe_f32 = dwpe;
    emu::sum_rows_bf16_to_f32_cuda(dwpe.data(), dout.data(), B, T * C, nullptr);
    emu::sum_rows_cuda(dwpe_f32.data(), dout_f32.data(), B, T * C, nullptr);
    EXPECT_EQ(dwpe, dwpe_f32) << "the positions' sums from the bf16 gradient against sum_rows_cuda on it widened" << what;
    std::vector<float> dwpe_cpu = normal(wpe.size(), 39);
    kernels::sum_rows_cpu(dwpe_cpu.data(), dout_f32.data(), B, T * C);
    expect_close(dwpe, dwpe_cpu, 1e-6, false, "the positions' sums against the CPU's" + what);
  }
}

TEST(CudaEmulation, TokenPositionEmbeddingHasTheThreeOpsBits) { under_both_schedules(check_token_position_embedding); }

// ---- random fills and dropout: the same Philox draws as the CPU, bit for bit ----------------------------

TEST(CudaEmulation, UniformFillsAndDropoutAreTheCpusBits) {
  const int64_t n = 10007;
  std::vector<float> u(static_cast<size_t>(n)), u_cpu(u.size());
  emu::fill_uniform_cuda(u.data(), n, -0.5f, 2.0f, 42, 3, 100, nullptr);
  kernels::fill_uniform_cpu(u_cpu.data(), n, -0.5f, 2.0f, 42, 3, 100);
  EXPECT_EQ(u, u_cpu) << "emulated uniform fill";
  const std::vector<float> x = normal(u.size(), 35), dout = normal(u.size(), 36);
  std::vector<float> y(u.size()), y_cpu(u.size()), dx(u.size(), 1.0f), dx_cpu(u.size(), 1.0f);
  emu::dropout_forward_cuda(y.data(), x.data(), n, 0.1f, 7, 1, 5000, nullptr);
  emu::dropout_backward_cuda(dx.data(), dout.data(), n, 0.1f, 7, 1, 5000, nullptr);
  kernels::dropout_forward_cpu(y_cpu.data(), x.data(), n, 0.1f, 7, 1, 5000);
  kernels::dropout_backward_cpu(dx_cpu.data(), dout.data(), n, 0.1f, 7, 1, 5000);
  EXPECT_EQ(y, y_cpu) << "emulated dropout forward";
  EXPECT_EQ(dx, dx_cpu) << "emulated dropout backward";
}

// ---- optimizer updates and the gradient norm's double reduction ---------------------------------------

TEST(CudaEmulation, OptimizerUpdatesAndNormsMatchTheCpu) {
  const int64_t n = 5000;
  const std::vector<float> grad = normal(static_cast<size_t>(n), 41);
  std::vector<float> p = normal(grad.size(), 42), m(grad.size(), 0.0f), v(grad.size(), 0.0f);
  std::vector<float> p_cpu = p, m_cpu = m, v_cpu = v;
  for (int64_t step = 1; step <= 3; ++step) {
    emu::adamw_update_cuda(p.data(), grad.data(), m.data(), v.data(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step,
                           nullptr, 0.5f);
    kernels::adamw_update_cpu(p_cpu.data(), grad.data(), m_cpu.data(), v_cpu.data(), n, 1e-3f, 0.9f, 0.95f, 1e-8f,
                              0.1f, step, 0.5f);
  }
  // tests/gpu/optim_cuda_test.cpp: a few ulp per step where the compilers contract differently.
  expect_close(p, p_cpu, 2e-6, false, "emulated AdamW: parameters");
  expect_close(m, m_cpu, 2e-6, false, "emulated AdamW: first moments");
  expect_close(v, v_cpu, 2e-6, false, "emulated AdamW: second moments");
  std::vector<float> q = normal(grad.size(), 43), vel(grad.size(), 0.0f), q_cpu = q, vel_cpu = vel;
  for (int step = 0; step < 3; ++step) {
    emu::sgd_update_cuda(q.data(), grad.data(), vel.data(), n, 0.01f, 0.9f, 0.0f, true, 0.01f, step == 0, nullptr,
                         1.0f);
    kernels::sgd_update_cpu(q_cpu.data(), grad.data(), vel_cpu.data(), n, 0.01f, 0.9f, 0.0f, true, 0.01f, step == 0);
  }
  expect_close(q, q_cpu, 2e-6, false, "emulated SGD (Nesterov momentum, decay)");

  std::vector<double> partials(kernels::kReducePartials), total(1, 2.0);
  emu::sum_squares_accumulate_cuda(total.data(), partials.data(), grad.data(), n, nullptr);
  const float* data = grad.data();
  const double want = 2.0 + kernels::sum_squares_multi_cpu(&data, &n, 1);
  EXPECT_NEAR(total[0], want, 1e-12 * want) << "emulated sum of squares (added to the total)";
}

TEST(CudaEmulation, ManyTensorUpdatesAndNormsMatchOneAtATime) {
  // 45 tensors (a chunk of 32 and a remainder), from empty to 300,000 elements (more than the 1,024
  // blocks of 256 threads a slice gets: its blocks stride), with and without weight decay.
  std::vector<int64_t> sizes;
  for (int k = 0; k < 45; ++k) sizes.push_back(k == 7 ? 0 : (k * 397) % 3001 + (k % 5 == 0 ? 4096 : 1));
  sizes[40] = 300000;
  std::vector<std::vector<float>> p, g, m, v, p1, m1, v1;
  for (size_t k = 0; k < sizes.size(); ++k) {
    const size_t n = static_cast<size_t>(sizes[k]);
    p.push_back(normal(n, 100 + static_cast<uint32_t>(k)));
    g.push_back(normal(n, 200 + static_cast<uint32_t>(k)));
    m.push_back(normal(n, 300 + static_cast<uint32_t>(k), 0.1f));
    v.push_back(std::vector<float>(n, 0.01f));
  }
  p1 = p, m1 = m, v1 = v;
  // Every other slice also writes its bf16 copy (kernels/optimizer.h); one starts off 8-byte alignment
  // (element by element then).
  std::vector<std::vector<uint16_t>> copies(sizes.size());
  for (size_t k = 0; k < sizes.size(); ++k) copies[k].assign(static_cast<size_t>(sizes[k]) + 1, uint16_t{0x7fc0});
  auto copy_of = [&](size_t k) { return k % 2 == 0 ? nullptr : copies[k].data() + (k == 5 ? 1 : 0); };
  for (int64_t step = 1; step <= 2; ++step) {
    std::vector<emu::AdamWSlice> slices;
    for (size_t k = 0; k < sizes.size(); ++k)
      slices.push_back({p[k].data(), g[k].data(), m[k].data(), v[k].data(), sizes[k], k % 3 == 0 ? 0.0f : 0.1f,
                        copy_of(k)});
    emu::adamw_update_many_cuda(slices.data(), static_cast<int64_t>(slices.size()), 1e-3f, 0.9f, 0.95f, 1e-8f, step,
                                nullptr, 0.7f);
    for (size_t k = 0; k < sizes.size(); ++k)
      emu::adamw_update_cuda(p1[k].data(), g[k].data(), m1[k].data(), v1[k].data(), sizes[k], 1e-3f, 0.9f, 0.95f,
                             1e-8f, k % 3 == 0 ? 0.0f : 0.1f, step, nullptr, 0.7f);
  }
  for (size_t k = 0; k < sizes.size(); ++k) {
    EXPECT_EQ(p[k], p1[k]) << "parameter " << k << ": the many-tensor update is not the one-tensor update's bits";
    EXPECT_EQ(m[k], m1[k]) << "first moment " << k;
    EXPECT_EQ(v[k], v1[k]) << "second moment " << k;
    if (uint16_t* c = copy_of(k)) {
      EXPECT_EQ(std::vector<uint16_t>(c, c + sizes[k]), to_bf16(p[k])) << "bf16 copy " << k << ": not the new parameters rounded";
    }
  }

  std::vector<const float*> data;
  for (const auto& x : g) data.push_back(x.data());
  std::vector<double> partials(kernels::kReducePartials), total(1, 1.5);
  emu::sum_squares_many_accumulate_cuda(total.data(), partials.data(), data.data(), sizes.data(),
                                        static_cast<int64_t>(sizes.size()), nullptr);
  const double want = 1.5 + kernels::sum_squares_multi_cpu(data.data(), sizes.data(), static_cast<int64_t>(sizes.size()));
  EXPECT_NEAR(total[0], want, 1e-12 * want) << "many-tensor sum of squares";
  // Its 16-byte pieces four at a time (a tensor of more than 4 pieces per thread of the grid, not a
  // multiple of 4 long), and a tensor whose start is not 16-byte aligned (element by element).
  const std::vector<float> big = normal(2200003, 400), odd = normal(1001, 401);
  const float* more[] = {big.data(), odd.data() + 1, g[40].data()};
  const int64_t more_sizes[] = {static_cast<int64_t>(big.size()), 1000, sizes[40]};
  total[0] = 0.0;
  emu::sum_squares_many_accumulate_cuda(total.data(), partials.data(), more, more_sizes, 3, nullptr);
  const double want_more = kernels::sum_squares_multi_cpu(more, more_sizes, 3);
  EXPECT_NEAR(total[0], want_more, 1e-12 * want_more) << "sum of squares with pieces four at a time, and unaligned";

  // SGD: momentum with dampening (first step, then the running buffer), Nesterov, and none.
  struct Sgd {
    float momentum, dampening;
    bool nesterov;
  };
  for (const Sgd& o : {Sgd{0.9f, 0.1f, false}, Sgd{0.9f, 0.0f, true}, Sgd{0.0f, 0.0f, false}}) {
    std::vector<std::vector<float>> q = p, q1 = p, buf = m, buf1 = m;
    for (int64_t step = 0; step < 2; ++step) {
      std::vector<emu::SgdSlice> slices;
      for (size_t k = 0; k < sizes.size(); ++k)
        slices.push_back({q[k].data(), g[k].data(), o.momentum != 0.0f ? buf[k].data() : nullptr, sizes[k],
                          k % 3 == 0 ? 0.0f : 0.1f, copy_of(k)});
      emu::sgd_update_many_cuda(slices.data(), static_cast<int64_t>(slices.size()), 0.05f, o.momentum, o.dampening,
                                o.nesterov, step == 0, nullptr, 0.7f);
      for (size_t k = 0; k < sizes.size(); ++k)
        emu::sgd_update_cuda(q1[k].data(), g[k].data(), o.momentum != 0.0f ? buf1[k].data() : nullptr, sizes[k],
                             0.05f, o.momentum, o.dampening, o.nesterov, k % 3 == 0 ? 0.0f : 0.1f, step == 0, nullptr,
                             0.7f);
    }
    for (size_t k = 0; k < sizes.size(); ++k) {
      EXPECT_EQ(q[k], q1[k]) << "SGD (momentum " << o.momentum << ") parameter " << k
                             << ": the many-tensor update is not the one-tensor update's bits";
      EXPECT_EQ(buf[k], buf1[k]) << "SGD momentum buffer " << k;
      if (uint16_t* c = copy_of(k)) {
        EXPECT_EQ(std::vector<uint16_t>(c, c + sizes[k]), to_bf16(q[k])) << "SGD bf16 copy " << k;
      }
    }
  }
}

}  // namespace
}  // namespace kraken
