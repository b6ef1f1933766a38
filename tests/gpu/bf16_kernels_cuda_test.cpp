// The bf16-storage CUDA kernels (the *_bf16_cuda entry points of kernels/elementwise.h, layernorm.h,
// attention.h (its _simt_ kernels), cross_entropy.h and random.h), called directly on device buffers, against their
// contract: the f32 kernel on the widened bf16 inputs, each output rounded once to bf16. The reference
// is the CPU f32 kernel (kernels/*_cpu) on exactly the bf16 values the GPU reads, its outputs rounded
// with cast_f32_to_bf16_cpu (nearest even, as __float2bfloat16_rn); accumulating outputs start from
// non-zero values, widened on the CPU as the GPU reads them. Sizes are deliberately ragged: C not a
// multiple of 8 or 32, T not a multiple of the 32-row attention tiles, n not a multiple of 4.
// Skips where there is no GPU, and in the dry run (KRAKEN_GPU_TESTS_ON_CPU=1): these tests call CUDA
// kernels directly, so there is nothing for the CPU to stand in for.
//
// Tolerances. Let a (GPU) and b (CPU) be an output's f32 value before the final rounding. They differ
// only as the fp32 kernels do, which tests/gpu/ops_cuda_test.cpp and nn_cuda_test.cpp bound relative
// to the tensor's largest magnitude: 0 for one IEEE operation per element (scale, mul, add, the
// broadcast add, the dropout forward, the f32 accumulation), 1e-7 for the dropout backward (dx + dout·k
// may be one FMA on one side only: 2⁻²⁴ of the scale), 4e-6 for GELU (tanhf within 2 ulp, other FMA
// contractions), 1e-5 for one reordered reduction (layernorm, sums over rows, cross-entropy), 1e-5 /
// 2e-5 for the attention forward / backward; the typical difference is about 1e-6 of the scale
// (√n·2⁻²⁴). Rounding to nearest is monotone, so such a small |a − b| either leaves both on the same
// bf16 value or, when a rounding boundary lies between them, puts them on neighbouring ones (one
// flipped rounding). A neighbour of ref is at most one bf16 ulp of ref away, and with 8 significant
// bits that is at most 2⁻⁷·|ref| (between 2⁻⁸ and 2⁻⁷ of the element: 2⁻⁸ alone would reject a correct
// kernel at the bottom of a binade, e.g. ref = 1, got = 1 + 2⁻⁷). What |a − b| adds beyond one flip
// matters only for elements far below the tensor's scale, and the absolute term covers it. So every
// bf16 output must satisfy
//     |got − ref| ≤ 2⁻⁷·|ref| + rel·max|ref|,   rel = the fp32 tolerance of the same kernel above,
// while a wrong index, mask or factor is an O(1) relative error. The f32 outputs (mean, rstd, lse,
// losses, dgamma, dbeta, the accumulate buffer) are compared as in the fp32 tests, |got − ref| ≤
// rel·max|ref|. Each comparison prints its worst error and how many elements differ from the
// reference bits ([gpu-vs-cpu] lines, collected by tools/gpu-check.sh).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cross_entropy.h"
#include "kernels/elementwise.h"
#include "kernels/layernorm.h"
#include "kernels/random.h"
#include "runtime/allocator.h"
#include "runtime/tensor.h"
#include "tests/gpu/gpu_test_util.h"

namespace kraken::kernels {
namespace {

using runtime::Device;
using runtime::DType;
using runtime::Shape;
using runtime::Tensor;

#if KRAKEN_WITH_CUDA

constexpr double kOneUlp = testing::kOneBf16Ulp;

Device gpu() { return Device::cuda(0); }
CUstream_st* stream() { return runtime::compute_stream(gpu()); }

// N(0, std²) values (plus `shift`) rounded to bf16 on the CPU: the exact inputs of both sides.
Tensor bf16_input(const Shape& shape, uint64_t seed, float std = 1.0f, float shift = 0.0f) {
  std::vector<float> v = testing::random_tensor(shape, seed, std).to_vector();
  for (float& x : v) x += shift;
  return Tensor::from_vector(v, shape).to(DType::BF16);
}

// f32 values on the CPU (parameters, f32 accumulators).
std::vector<float> f32_values(int64_t n, uint64_t seed, float std = 1.0f) {
  return testing::random_tensor({n}, seed, std).to_vector();
}

Tensor f32_on_gpu(const std::vector<float>& v) {
  return Tensor::from_vector(v, {static_cast<int64_t>(v.size())}).to(gpu());
}

uint16_t* bits(const Tensor& t) { return t.data<uint16_t>(); }
float* f32(const Tensor& t) { return t.data<float>(); }

// A bf16 buffer of quiet NaNs on the GPU: an output a kernel must only write (any read shows in the result).
Tensor bf16_nans_on_gpu(const Shape& shape) {
  return Tensor::full(shape, std::numeric_limits<float>::quiet_NaN()).to(DType::BF16).to(gpu());
}

// A bf16 device output against the rounded reference: |got − ref| ≤ 2⁻⁷·|ref| + rel·max|ref|.
void expect_bf16_close(const Tensor& got_dev, const std::vector<float>& ref, double rel, const std::string& what) {
  ASSERT_EQ(got_dev.dtype(), DType::BF16) << what;
  testing::expect_within_ulp(got_dev.to_vector(), ref, kOneUlp, rel, "bf16 " + what);  // widened exactly
}

// An f32 device output: |got − ref| ≤ rel·max|ref| (gpu_test_util's comparison).
void expect_f32_close(const Tensor& got_dev, const std::vector<float>& ref, double rel, const std::string& what) {
  testing::expect_close(got_dev.to_vector(), ref, rel, what);
}

// ---- elementwise ----------------------------------------------------------------------------------

void check_elementwise() {
  const int64_t n = 4099;  // not a multiple of 4 or 8
  const Tensor a16 = bf16_input({n}, 1), b16 = bf16_input({n}, 2);
  const std::vector<float> a = a16.to_vector(), b = b16.to_vector();
  const Tensor a_dev = a16.to(gpu()), b_dev = b16.to(gpu());
  std::vector<float> ref(static_cast<size_t>(n));
  {
    Tensor out = Tensor::empty({n}, DType::BF16, gpu());
    add_bf16_cuda(bits(out), bits(a_dev), bits(b_dev), n, stream());
    add_cpu(ref.data(), a.data(), b.data(), n);
    expect_bf16_close(out, testing::round_bf16(ref), 0.0, "add");
  }
  {
    // a multiple of 8 with aligned buffers: the 8-wide kernel
    const int64_t m = 8 * 513;
    const Tensor a8 = bf16_input({m}, 11), b8 = bf16_input({m}, 12);
    std::vector<float> ref8(static_cast<size_t>(m));
    const Tensor a8_dev = a8.to(gpu()), b8_dev = b8.to(gpu());
    Tensor out = Tensor::empty({m}, DType::BF16, gpu());
    add_bf16_cuda(bits(out), bits(a8_dev), bits(b8_dev), m, stream());
    add_cpu(ref8.data(), a8.to_vector().data(), b8.to_vector().data(), m);
    expect_bf16_close(out, testing::round_bf16(ref8), 0.0, "add (8-wide)");
  }
  {
    Tensor out = Tensor::empty({n}, DType::BF16, gpu());
    scale_bf16_cuda(bits(out), bits(a_dev), -0.37f, n, stream());
    scale_cpu(ref.data(), a.data(), -0.37f, n);
    expect_bf16_close(out, testing::round_bf16(ref), 0.0, "scale");
  }
  {
    Tensor out = Tensor::empty({n}, DType::BF16, gpu());
    mul_bf16_cuda(bits(out), bits(a_dev), bits(b_dev), n, stream());
    mul_cpu(ref.data(), a.data(), b.data(), n);
    expect_bf16_close(out, testing::round_bf16(ref), 0.0, "mul");
  }
  {
    // acc (f32, non-zero) += x: one f32 addition per element, no rounding to bf16.
    std::vector<float> acc = f32_values(n, 3, 4.0f);
    const Tensor acc_dev = f32_on_gpu(acc);
    accumulate_bf16_cuda(f32(acc_dev), bits(a_dev), n, stream());
    add_cpu(acc.data(), acc.data(), a.data(), n);
    expect_f32_close(acc_dev, acc, 0.0, "accumulate (f32 += bf16)");
  }
  // GELU over a wide range (std 4), backward accumulating into a non-zero dx; 5·4099 elements take the
  // scalar kernels, 8·4099 (a multiple of 8, aligned buffers) the 8-wide ones.
  for (const int64_t m : {int64_t{5 * 4099}, int64_t{8 * 4099}}) {
    const std::string path = m % 8 == 0 ? " (8-wide)" : " (scalar)";
    const Tensor x16 = bf16_input({m}, 4, 4.0f), dout16 = bf16_input({m}, 5), dx16 = bf16_input({m}, 6);
    const std::vector<float> x = x16.to_vector(), dout = dout16.to_vector();
    std::vector<float> y(static_cast<size_t>(m)), dx = dx16.to_vector();
    const Tensor x_dev = x16.to(gpu()), dout_dev = dout16.to(gpu()), dx_dev = dx16.to(gpu());
    Tensor y_dev = Tensor::empty({m}, DType::BF16, gpu());
    gelu_forward_bf16_cuda(bits(y_dev), bits(x_dev), m, stream());
    gelu_backward_bf16_cuda(bits(dx_dev), bits(x_dev), bits(dout_dev), m, stream());
    gelu_forward_cpu(y.data(), x.data(), m);
    gelu_backward_cpu(dx.data(), x.data(), dout.data(), m);
    expect_bf16_close(y_dev, testing::round_bf16(y), 4e-6, "gelu forward" + path);
    expect_bf16_close(dx_dev, testing::round_bf16(dx), 4e-6, "gelu backward (dx +=)" + path);
  }
}

void check_broadcast_and_sum_rows() {
  // cols = 1001: not a multiple of the 8-column blocks (the broadcast add one element per access); 1008:
  // 8 columns per access. rows = 8 takes the one-thread-per-column kernel, 330 the row-group kernel
  // (rows ≥ 64), 64 its smallest case.
  for (const int64_t cols : {int64_t{1001}, int64_t{1008}})
  for (int64_t rows : {int64_t{8}, int64_t{64}, int64_t{330}}) {
    const std::string shape = " (" + std::to_string(rows) + ", " + std::to_string(cols) + ")";
    const Tensor a16 = bf16_input({rows, cols}, 10), b16 = bf16_input({cols}, 11);
    const std::vector<float> a = a16.to_vector(), b = b16.to_vector();
    const Tensor a_dev = a16.to(gpu()), b_dev = b16.to(gpu());
    Tensor out = Tensor::empty({rows, cols}, DType::BF16, gpu());
    add_broadcast_bf16_cuda(bits(out), bits(a_dev), bits(b_dev), rows, cols, stream());
    std::vector<float> ref(static_cast<size_t>(rows * cols));
    add_broadcast_cpu(ref.data(), a.data(), b.data(), rows, cols);
    expect_bf16_close(out, testing::round_bf16(ref), 0.0, "add_broadcast" + shape);
    // db (bf16, non-zero) += Σ_r dout[r, :]: summed in f32, rounded once.
    const Tensor db16 = bf16_input({cols}, 12, 3.0f);
    std::vector<float> db = db16.to_vector();
    const Tensor db_dev = db16.to(gpu());
    sum_rows_bf16_cuda(bits(db_dev), bits(a_dev), rows, cols, stream());
    sum_rows_cpu(db.data(), a.data(), rows, cols);
    expect_bf16_close(db_dev, testing::round_bf16(db), 1e-5, "sum_rows (db +=)" + shape);
  }
}

// A bias gradient at a training step's scale: 65,543 rows of 1008 columns (16 column blocks), where the
// first pass's chunks (kernels/cuda/column_chunks.h) are 128 rows by default and 512 under
// KRAKEN_CUDA_COLUMN_CHUNKS=long (tools/gpu-check.sh runs it both ways), each with a partial last chunk.
// The emulation cannot afford rows enough for long chunks above 128.
void check_sum_rows_over_many_rows() {
  const int64_t rows = 65543, cols = 1008;
  const Tensor a16 = bf16_input({rows, cols}, 13), db16 = bf16_input({cols}, 14, 3.0f);
  const std::vector<float> a = a16.to_vector();
  std::vector<float> db = db16.to_vector();
  const Tensor a_dev = a16.to(gpu()), db_dev = db16.to(gpu());
  sum_rows_bf16_cuda(bits(db_dev), bits(a_dev), rows, cols, stream());
  sum_rows_cpu(db.data(), a.data(), rows, cols);
  // f32 sums of 65,543 terms in two orders: ~2e-3 apart at sums up to ~1,000, far below a bf16 ulp there
  expect_bf16_close(db_dev, testing::round_bf16(db), 1e-5, "sum_rows (db +=) over 65,543 rows × 1008");
}

// ---- layernorm --------------------------------------------------------------------------------------

void check_layernorm(int64_t rows, int64_t C, bool with_beta) {
  const std::string what = "layernorm (" + std::to_string(rows) + ", " + std::to_string(C) + ")" +
                           (with_beta ? "" : " without beta");
  const float eps = 1e-5f;
  // Activations with a non-zero mean and scale; gamma, beta f32.
  const Tensor x16 = bf16_input({rows, C}, 20, 2.0f, 0.7f);
  const std::vector<float> x = x16.to_vector(), gamma = f32_values(C, 21, 0.5f), beta = f32_values(C, 22, 0.5f);
  const Tensor x_dev = x16.to(gpu()), gamma_dev = f32_on_gpu(gamma), beta_dev = f32_on_gpu(beta);
  Tensor out_dev = Tensor::empty({rows, C}, DType::BF16, gpu());
  Tensor mean_dev = Tensor::empty({rows}, DType::F32, gpu()), rstd_dev = Tensor::empty({rows}, DType::F32, gpu());
  layernorm_forward_bf16_cuda(bits(out_dev), f32(mean_dev), f32(rstd_dev), bits(x_dev), f32(gamma_dev),
                              with_beta ? f32(beta_dev) : nullptr, rows, C, eps, stream());
  std::vector<float> out(static_cast<size_t>(rows * C)), mean(static_cast<size_t>(rows)),
      rstd(static_cast<size_t>(rows));
  layernorm_forward_cpu(out.data(), mean.data(), rstd.data(), x.data(), gamma.data(),
                        with_beta ? beta.data() : nullptr, rows, C, eps);
  expect_bf16_close(out_dev, testing::round_bf16(out), 1e-5, what + ": out");
  expect_f32_close(mean_dev, mean, 1e-5, what + ": mean");
  expect_f32_close(rstd_dev, rstd, 1e-5, what + ": rstd");

  // Backward from the same (CPU) mean and rstd on both sides; dx (bf16), dgamma, dbeta (f32) start
  // non-zero.
  const Tensor dout16 = bf16_input({rows, C}, 23), dx16 = bf16_input({rows, C}, 24);
  const std::vector<float> dout = dout16.to_vector();
  std::vector<float> dx = dx16.to_vector(), dgamma = f32_values(C, 25), dbeta = f32_values(C, 26);
  const Tensor dout_dev = dout16.to(gpu()), dx_dev = dx16.to(gpu());
  const Tensor dgamma_dev = f32_on_gpu(dgamma), dbeta_dev = f32_on_gpu(dbeta);
  const Tensor mean_in = f32_on_gpu(mean), rstd_in = f32_on_gpu(rstd);
  layernorm_backward_bf16_cuda(bits(dx_dev), bits(dx_dev), f32(dgamma_dev), with_beta ? f32(dbeta_dev) : nullptr,
                               bits(dout_dev), bits(x_dev), f32(gamma_dev), f32(mean_in), f32(rstd_in), rows, C,
                               stream());
  layernorm_backward_cpu(dx.data(), dx.data(), dgamma.data(), with_beta ? dbeta.data() : nullptr, dout.data(),
                         x.data(), gamma.data(), mean.data(), rstd.data(), rows, C);
  expect_bf16_close(dx_dev, testing::round_bf16(dx), 1e-5, what + ": dx +=");
  expect_f32_close(dgamma_dev, dgamma, 1e-5, what + ": dgamma +=");
  if (with_beta) expect_f32_close(dbeta_dev, dbeta, 1e-5, what + ": dbeta +=");

  // Without dx_in dx is only written: it starts as NaNs, which a read would carry into the result. Once
  // with the parameters' sums in the pass, once without (the dx-only kernels).
  for (const bool params : {true, false}) {
    const Tensor dx_fresh = bf16_nans_on_gpu({rows, C});
    std::vector<float> dx_cpu(static_cast<size_t>(rows * C), 0.0f);
    layernorm_backward_bf16_cuda(bits(dx_fresh), nullptr, params ? f32(dgamma_dev) : nullptr,
                                 params && with_beta ? f32(dbeta_dev) : nullptr, bits(dout_dev), bits(x_dev),
                                 f32(gamma_dev), f32(mean_in), f32(rstd_in), rows, C, stream());
    layernorm_backward_cpu(dx_cpu.data(), nullptr, nullptr, nullptr, dout.data(), x.data(), gamma.data(), mean.data(),
                           rstd.data(), rows, C);
    expect_bf16_close(dx_fresh, testing::round_bf16(dx_cpu), 1e-5,
                      what + (params ? ": dx = (no dx_in)" : ": dx = (no dx_in, no dgamma/dbeta)"));
  }
}

// A grouped backward (kernels/layernorm.h) against one call per group: the same kernels on the same rows,
// so the same bits. G = 4 groups of 100 rows at C = 504 (a Kraken sub-layer's width); group 1 wants no
// dgamma.
void check_grouped_layernorm_backward() {
  const int64_t G = 4, rows = 100, C = 504;
  const std::string what = "grouped layernorm backward";
  const Tensor x = bf16_input({G * rows, C}, 40, 2.0f, 0.3f).to(gpu()), dout = bf16_input({G * rows, C}, 41).to(gpu());
  const Tensor dx_in = bf16_input({G * rows, C}, 42).to(gpu());
  const Tensor gammas = f32_on_gpu(f32_values(G * C, 43)), mean = f32_on_gpu(f32_values(G * rows, 44, 0.2f));
  std::vector<float> rstd_values = f32_values(G * rows, 45, 0.1f);
  for (float& v : rstd_values) v += 1.0f;
  const Tensor rstd = f32_on_gpu(rstd_values);
  const std::vector<float> start = f32_values(G * C, 46);
  Tensor dx[2] = {bf16_nans_on_gpu({G * rows, C}), bf16_nans_on_gpu({G * rows, C})};
  Tensor dgamma[2] = {f32_on_gpu(start), f32_on_gpu(start)}, dbeta[2] = {f32_on_gpu(start), f32_on_gpu(start)};
  for (int way = 0; way < 2; ++way) {
    std::vector<LayerNormGroupGradients> groups;
    for (int64_t g = 0; g < G; ++g)
      groups.push_back({f32(gammas) + g * C, g == 1 ? nullptr : f32(dgamma[way]) + g * C, f32(dbeta[way]) + g * C});
    if (way == 0) {
      layernorm_backward_grouped_bf16_cuda(bits(dx[0]), bits(dx_in), groups.data(), G, bits(dout), bits(x), f32(mean),
                                           f32(rstd), rows, C, stream());
      continue;
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t e = g * rows * C;
      layernorm_backward_bf16_cuda(bits(dx[1]) + e, bits(dx_in) + e, groups[g].dgamma, groups[g].dbeta, bits(dout) + e,
                                   bits(x) + e, groups[g].gamma, f32(mean) + g * rows, f32(rstd) + g * rows, rows, C,
                                   stream());
    }
  }
  EXPECT_EQ(dx[0].to_vector(), dx[1].to_vector()) << what << ": dx";
  EXPECT_EQ(dgamma[0].to_vector(), dgamma[1].to_vector()) << what << ": dgamma";
  EXPECT_EQ(dbeta[0].to_vector(), dbeta[1].to_vector()) << what << ": dbeta";
  EXPECT_EQ(dgamma[0].to_vector()[static_cast<size_t>(C)], start[static_cast<size_t>(C)]) << what << ": group 1's dgamma";
}

// ---- attention --------------------------------------------------------------------------------------
// The CUDA-core (SIMT) kernels, f32 throughout: the bounds above hold for them. The tensor-core kernels,
// which attention_*_bf16_cuda take by default, round P to bf16: tests/gpu/attention_tc_cuda_test.cpp.

void check_attention(int64_t B, int64_t T, int64_t C, int64_t NH) {
  const std::string what = "attention B=" + std::to_string(B) + " T=" + std::to_string(T) +
                           " C=" + std::to_string(C) + " NH=" + std::to_string(NH);
  const Tensor qkv16 = bf16_input({B, T, 3 * C}, 30);
  const std::vector<float> qkv = qkv16.to_vector();
  const Tensor qkv_dev = qkv16.to(gpu());
  Tensor out_dev = Tensor::empty({B, T, C}, DType::BF16, gpu());
  Tensor lse_dev = Tensor::empty({B, NH, T}, DType::F32, gpu());
  attention_forward_bf16_simt_cuda(bits(out_dev), f32(lse_dev), bits(qkv_dev), B, T, C, NH, stream());
  std::vector<float> out(static_cast<size_t>(B * T * C)), lse(static_cast<size_t>(B * NH * T));
  attention_forward_cpu(out.data(), lse.data(), qkv.data(), B, T, C, NH);
  const std::vector<float> out_rounded = testing::round_bf16(out);
  expect_bf16_close(out_dev, out_rounded, 1e-5, what + ": out");
  expect_f32_close(lse_dev, lse, 1e-5, what + ": lse");

  // Backward on identical inputs: the reference's out (rounded to bf16, as the forward stores it) and
  // lse, a random dout; dqkv (bf16) starts non-zero.
  const Tensor dout16 = bf16_input({B, T, C}, 31), dqkv16 = bf16_input({B, T, 3 * C}, 32, 0.1f);
  const std::vector<float> dout = dout16.to_vector();
  std::vector<float> dqkv = dqkv16.to_vector();
  const Tensor dout_dev = dout16.to(gpu()), dqkv_dev = dqkv16.to(gpu());
  const Tensor out_in = Tensor::from_vector(out_rounded, {B, T, C}).to(DType::BF16).to(gpu());
  const Tensor lse_in = f32_on_gpu(lse);
  attention_backward_bf16_simt_cuda(bits(dqkv_dev), bits(dout_dev), bits(qkv_dev), bits(out_in), f32(lse_in), B, T,
                                    C, NH, stream());
  attention_backward_cpu(dqkv.data(), dout.data(), qkv.data(), out_rounded.data(), lse.data(), B, T, C, NH);
  expect_bf16_close(dqkv_dev, testing::round_bf16(dqkv), 2e-5, what + ": dqkv +=");
}

// ---- cross-entropy ----------------------------------------------------------------------------------

void check_cross_entropy(int64_t N, int64_t Vp, int64_t V, const std::vector<int64_t>& ignored_rows) {
  const std::string what = "cross_entropy N=" + std::to_string(N) + " Vp=" + std::to_string(Vp) +
                           " V=" + std::to_string(V);
  const int32_t ignore = -1;
  const Tensor logits16 = bf16_input({N, Vp}, 40, 3.0f);  // std 3: peaked rows
  const std::vector<float> logits = logits16.to_vector();
  std::vector<int32_t> targets = testing::random_ids({N}, V, 41).to_int_vector();
  for (int64_t r : ignored_rows) targets[static_cast<size_t>(r)] = ignore;
  int64_t count = 0;
  ASSERT_LT(cross_entropy_check_targets_cpu(targets.data(), N, V, ignore, &count), 0) << what;
  const Tensor logits_dev = logits16.to(gpu()), targets_dev = Tensor::from_ints(targets, {N}).to(gpu());
  Tensor losses_dev = Tensor::empty({N}, DType::F32, gpu()), lse_dev = Tensor::empty({N}, DType::F32, gpu());
  cross_entropy_forward_bf16_cuda(f32(losses_dev), f32(lse_dev), bits(logits_dev), targets_dev.data<int32_t>(), N, Vp,
                                  V, ignore, stream());
  std::vector<float> losses(static_cast<size_t>(N)), lse(static_cast<size_t>(N));
  cross_entropy_forward_cpu(losses.data(), lse.data(), logits.data(), targets.data(), N, Vp, V, ignore);
  expect_f32_close(losses_dev, losses, 1e-5, what + ": losses");
  // lse of an ignored row is unused (0 on both devices today, but not promised): compare the others.
  std::vector<float> lse_got = lse_dev.to_vector();
  for (int64_t r : ignored_rows) lse_got[static_cast<size_t>(r)] = lse[static_cast<size_t>(r)];
  testing::expect_close(lse_got, lse, 1e-5, what + ": lse");

  // Backward from the CPU's lse; dlogits is written, not accumulated: it starts as garbage (−7), and
  // the padding and the ignored rows must come out exactly +0.
  const float dloss = 1.7f;
  const Tensor dloss_dev = f32_on_gpu({dloss}), lse_in = f32_on_gpu(lse);
  const Tensor dlogits_dev = Tensor::full({N, Vp}, -7.0f).to(DType::BF16).to(gpu());
  cross_entropy_backward_bf16_cuda(bits(dlogits_dev), bits(logits_dev), f32(lse_in), targets_dev.data<int32_t>(),
                                   f32(dloss_dev), count, N, Vp, V, ignore, stream());
  std::vector<float> dlogits(static_cast<size_t>(N * Vp));
  cross_entropy_backward_cpu(dlogits.data(), logits.data(), lse.data(), targets.data(), &dloss, count, N, Vp, V,
                             ignore);
  expect_bf16_close(dlogits_dev, testing::round_bf16(dlogits), 1e-5, what + ": dlogits");
  const Tensor got = dlogits_dev.to(Device::cpu());
  const uint16_t* g = got.data<uint16_t>();
  for (int64_t r = 0; r < N; ++r) {
    for (int64_t v = 0; v < Vp; ++v) {
      if (v >= V || targets[static_cast<size_t>(r)] == ignore) {
        ASSERT_EQ(g[r * Vp + v], 0u) << what << ": row " << r << " column " << v << " must be +0";
      }
    }
  }

  // The fused kernel (training's: forward and backward in one pass, dloss from the host), the row read a
  // second time, kept in shared memory, or copied there ahead (pipelined): the forward kernel's losses
  // and lse, and the backward kernel's dlogits from that lse, bit for bit.
  const Tensor from_lse = Tensor::full({N, Vp}, -7.0f).to(DType::BF16).to(gpu());
  cross_entropy_backward_bf16_cuda(bits(from_lse), bits(logits_dev), f32(lse_dev), targets_dev.data<int32_t>(),
                                   f32(dloss_dev), count, N, Vp, V, ignore, stream());
  for (const auto reads : {CrossEntropyRowReads::kTwice, CrossEntropyRowReads::kStagedInSharedMemory,
                           CrossEntropyRowReads::kPipelined}) {
    const std::string how = what + (reads == CrossEntropyRowReads::kTwice                  ? ", fused"
                                    : reads == CrossEntropyRowReads::kStagedInSharedMemory ? ", fused, row staged"
                                                                                           : ", fused, pipelined");
    Tensor fused_losses = Tensor::full({N}, -3.0f).to(gpu()), fused_lse = Tensor::full({N}, -3.0f).to(gpu());
    const Tensor fused_dlogits = Tensor::full({N, Vp}, -7.0f).to(DType::BF16).to(gpu());
    cross_entropy_fused_bf16_cuda(f32(fused_losses), f32(fused_lse), bits(fused_dlogits), bits(logits_dev),
                                  targets_dev.data<int32_t>(), dloss, count, N, Vp, V, ignore, stream(), reads);
    EXPECT_EQ(fused_losses.to_vector(), losses_dev.to_vector()) << how << ": losses";
    EXPECT_EQ(fused_lse.to_vector(), lse_dev.to_vector()) << how << ": lse";
    const Tensor a = fused_dlogits.to(Device::cpu()), b = from_lse.to(Device::cpu());
    EXPECT_EQ(0, std::memcmp(a.data<uint16_t>(), b.data<uint16_t>(), static_cast<size_t>(N * Vp) * 2))
        << how << ": dlogits";
  }
}

// ---- dropout ----------------------------------------------------------------------------------------

void check_dropout(float p) {
  const std::string what = "dropout p=" + std::to_string(p);
  const int64_t n = 10007;  // not a multiple of 4: the last Philox block is partly used
  const uint64_t seed = 77, philox_stream = 9, offset = 123;
  const Tensor x16 = bf16_input({n}, 50), dout16 = bf16_input({n}, 51), dx16 = bf16_input({n}, 52);
  const std::vector<float> x = x16.to_vector(), dout = dout16.to_vector();
  std::vector<float> y(static_cast<size_t>(n)), dx = dx16.to_vector();
  const Tensor x_dev = x16.to(gpu()), dout_dev = dout16.to(gpu()), dx_dev = dx16.to(gpu());
  Tensor y_dev = Tensor::empty({n}, DType::BF16, gpu());
  dropout_forward_bf16_cuda(bits(y_dev), bits(x_dev), n, p, seed, philox_stream, offset, stream());
  dropout_backward_bf16_cuda(bits(dx_dev), bits(dout_dev), n, p, seed, philox_stream, offset, stream());
  dropout_forward_cpu(y.data(), x.data(), n, p, seed, philox_stream, offset);
  dropout_backward_cpu(dx.data(), dout.data(), n, p, seed, philox_stream, offset);
  // Forward: one product per element (rel = 0), a dropped element exactly 0. Backward: nvcc makes
  // dx + dout·k one FMA, and gcc may or may not (-ffp-contract): one f32 rounding of dout·k apart,
  // at most 2⁻²⁴ ≈ 6e-8 of the scale, so 1e-7 (a kept dx is otherwise exact).
  expect_bf16_close(y_dev, testing::round_bf16(y), 0.0, what + ": forward");
  expect_bf16_close(dx_dev, testing::round_bf16(dx), 1e-7, what + ": backward (dx +=)");
  int64_t kept = 0;
  for (float v : y_dev.to_vector()) kept += v != 0.0f;
  EXPECT_NEAR(static_cast<double>(kept) / static_cast<double>(n), 1.0 - p, 0.02) << what;
}

#else  // a build without CUDA: the tests skip before calling these

void check_elementwise() {}
void check_broadcast_and_sum_rows() {}
void check_sum_rows_over_many_rows() {}
void check_layernorm(int64_t, int64_t, bool) {}
void check_grouped_layernorm_backward() {}
void check_attention(int64_t, int64_t, int64_t, int64_t) {}
void check_cross_entropy(int64_t, int64_t, int64_t, const std::vector<int64_t>&) {}
void check_dropout(float) {}

#endif  // KRAKEN_WITH_CUDA

TEST(GpuBf16Kernels, ElementwiseAndGeluMatchTheRoundedCpu) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  check_elementwise();
}

TEST(GpuBf16Kernels, BroadcastAddAndSumRowsMatchTheRoundedCpu) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  check_broadcast_and_sum_rows();
}

TEST(GpuBf16Kernels, SumRowsOverATrainingStepsRowsMatchesTheRoundedCpu) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  check_sum_rows_over_many_rows();
}

TEST(GpuBf16Kernels, LayerNormMatchesTheRoundedCpu) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  // C = 100 and 37: not multiples of the warp or of 8; 75 rows leave a partial block of 8 rows.
  check_layernorm(75, 100, true);
  check_layernorm(75, 100, false);
  check_layernorm(130, 37, true);
  // C a multiple of 8 up to 1024: dx, dgamma and dbeta in one pass (kernels/layernorm.h) — 1, 2 (dx_in
  // loaded with the row), 3 and 4 packs a lane (4: more than the default 48 KiB of shared memory); 75 and
  // 130 rows leave a partial chunk of 32.
  check_layernorm(75, 256, true);
  check_layernorm(130, 504, false);
  check_layernorm(75, 768, true);
  check_layernorm(130, 1024, true);
}

TEST(GpuBf16Kernels, GroupedLayerNormBackwardIsOneCallPerGroup) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  check_grouped_layernorm_backward();
}

TEST(GpuBf16Kernels, AttentionMatchesTheRoundedCpu) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  // T not a multiple of the 32-row tiles (45, 77), shorter than one (7), exact (64); head sizes 16,
  // 64 and 128 (above 48 KiB of shared memory).
  check_attention(2, 45, 64, 4);
  check_attention(1, 7, 32, 2);
  check_attention(2, 64, 128, 2);
  check_attention(1, 77, 256, 2);
}

TEST(GpuBf16Kernels, CrossEntropyMatchesTheRoundedCpu) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  // Vp = 130 with V = 100 real columns (odd padding), ignored rows: the one-column-at-a-time kernels;
  // the GPT-2 vocabulary padded to 50304 (a multiple of 8): the 8-wide ones, with and without ignored rows.
  check_cross_entropy(21, 130, 100, {0, 5, 6, 13});
  check_cross_entropy(4, 50304, 50257, {});
  check_cross_entropy(5, 50304, 50257, {1, 3});
  // More rows than the pipelined kernel's blocks (at this row size 4 an SM: 528 on an H100): blocks take
  // two or three rows, through both stages and back (small rows, so that racecheck stays quick).
  check_cross_entropy(1100, 1000, 997, {7, 600, 1099});
}

// Columns at −inf add nothing, two whole 8-column packs at a row's start included; a NaN makes its row's
// loss, lse and every gradient column NaN, also where its pack is otherwise −inf — which holds only if
// max.NaN.f32 propagates the NaN on the hardware as the emulation (CudaEmulation.CrossEntropySkips…)
// assumes. The forward kernel and the fused one, each way it reads the row.
TEST(GpuBf16Kernels, CrossEntropySkipsMinusInfinityAndPropagatesNaN) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  const int64_t N = 3, V = 2056, Vp = 2056;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> init = testing::random_tensor({N, Vp}, 60, 3.0f).to_vector();
  for (int64_t c = 0; c < 16; ++c) init[static_cast<size_t>(c)] = -inf;
  init[static_cast<size_t>(Vp)] = std::numeric_limits<float>::quiet_NaN();
  for (int64_t c = 1; c < 8; ++c) init[static_cast<size_t>(Vp + c)] = -inf;
  const Tensor logits16 = Tensor::from_vector(init, {N, Vp}).to(DType::BF16);
  const std::vector<float> logits = logits16.to_vector();
  ASSERT_TRUE(std::isnan(logits[static_cast<size_t>(Vp)]) && logits[0] == -inf);
  const std::vector<int32_t> targets = {100, 5, 2000};
  std::vector<float> cpu_losses(N), cpu_lse(N);
  cross_entropy_forward_cpu(cpu_losses.data(), cpu_lse.data(), logits.data(), targets.data(), N, Vp, V, -1);
  const Tensor logits_dev = logits16.to(gpu()), targets_dev = Tensor::from_ints(targets, {N}).to(gpu());
  auto check = [&](const Tensor& losses_dev, const Tensor& lse_dev, const std::string& how) {
    const std::vector<float> losses = losses_dev.to_vector(), lse = lse_dev.to_vector();
    for (const size_t r : {size_t{0}, size_t{2}}) {
      EXPECT_NEAR(lse[r], cpu_lse[r], 1e-5 * std::fabs(cpu_lse[r])) << how << ": lse of row " << r;
      EXPECT_NEAR(losses[r], cpu_losses[r], 1e-5 * std::fabs(cpu_lse[r])) << how << ": loss of row " << r;
    }
    EXPECT_TRUE(std::isnan(lse[1]) && std::isnan(losses[1])) << how << ": row 1 holds a NaN; lse " << lse[1];
  };
  Tensor losses_dev = Tensor::empty({N}, DType::F32, gpu()), lse_dev = Tensor::empty({N}, DType::F32, gpu());
  cross_entropy_forward_bf16_cuda(f32(losses_dev), f32(lse_dev), bits(logits_dev), targets_dev.data<int32_t>(), N, Vp,
                                  V, -1, stream());
  check(losses_dev, lse_dev, "forward kernel");
  for (const auto reads : {CrossEntropyRowReads::kTwice, CrossEntropyRowReads::kStagedInSharedMemory,
                           CrossEntropyRowReads::kPipelined}) {
    const std::string how = reads == CrossEntropyRowReads::kTwice                  ? "fused"
                            : reads == CrossEntropyRowReads::kStagedInSharedMemory ? "fused, row staged"
                                                                                   : "fused, pipelined";
    Tensor fused_losses = Tensor::full({N}, -3.0f).to(gpu()), fused_lse = Tensor::full({N}, -3.0f).to(gpu());
    const Tensor dlogits_dev = Tensor::full({N, Vp}, -7.0f).to(DType::BF16).to(gpu());
    cross_entropy_fused_bf16_cuda(f32(fused_losses), f32(fused_lse), bits(dlogits_dev), bits(logits_dev),
                                  targets_dev.data<int32_t>(), 1.0f, N, N, Vp, V, -1, stream(), reads);
    check(fused_losses, fused_lse, how);
    const std::vector<float> dlogits = dlogits_dev.to(Device::cpu()).to_vector();
    for (int64_t c = 0; c < 16; ++c)
      ASSERT_EQ(dlogits[static_cast<size_t>(c)], 0.0f) << how << ": row 0's −inf column " << c << " has probability 0";
    for (int64_t c = 0; c < V; ++c)
      ASSERT_TRUE(std::isnan(dlogits[static_cast<size_t>(Vp + c)])) << how << ": row 1, column " << c << " not NaN";
  }
}

TEST(GpuBf16Kernels, DropoutMatchesTheRoundedCpu) {
  KRAKEN_REQUIRE_CUDA_KERNELS();
  check_dropout(0.1f);
  check_dropout(0.5f);
}

}  // namespace
}  // namespace kraken::kernels
