// The CUDA backend's basic ops against the CPU: device tensors (copies, fills, casts, views), the
// elementwise family, reductions, split/concat, matrix products in every transpose and the linear
// layer, forward and backward. Skips where there is no GPU (tests/gpu/gpu_test_util.h).
//
// Tolerances (relative to the reference's largest magnitude; see gpu_test_util.h):
//   0      ops that are one correctly rounded IEEE operation or a copy per element (add, mul, scale,
//          copies, casts, the broadcast add's forward): the GPU must give the CPU's bits;
//   4e-6   GELU: tanhf is within 2 ulp on both sides and nvcc/gcc contract different products into
//          FMAs, a few ulp of the tensor's scale (a ±2-ulp perturbation of the inputs moves the CPU's
//          GELU by 1.3e-7 forward and 2.3e-7 backward of the scale);
//   1e-5   sums of up to a few hundred fp32 terms in another order (bias gradients, matrix products
//          with K ≤ 128): √n·u ≈ 1e-6 at n = 300, so 1e-5 leaves a factor of ten (a ±2-ulp input
//          perturbation moves the CPU's matmul and linear by ≤ 3e-7 of the scale: over 30×).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "tests/gpu/gpu_test_util.h"

namespace kraken::runtime {
namespace {

using testing::expect_close;
using testing::expect_matches_cpu;
using testing::random_tensor;
using testing::test_device;
using testing::to_test_device;

Tensor leaf(const Shape& shape, uint64_t seed, float std = 1.0f) {
  Tensor t = random_tensor(shape, seed, std);
  t.set_requires_grad(true);
  return t;
}

// ---- device tensors ------------------------------------------------------------------------------

TEST(GpuTensor, CopiesFillsAndZerosRoundTripExactly) {
  KRAKEN_REQUIRE_GPU();
  const Tensor host = random_tensor({3, 1000}, 1);
  const Tensor dev = host.to(test_device());
  EXPECT_EQ(dev.device(), test_device());
  expect_close(dev, host, 0.0, "to(device)");
  expect_close(dev.clone(), host, 0.0, "clone on the device");
  Tensor target = Tensor::zeros({3, 1000}, DType::F32, test_device());
  target.copy_from(host);  // host → device
  expect_close(target, host, 0.0, "copy_from host");
  Tensor back = Tensor::zeros({3, 1000});
  back.copy_from(dev);  // device → host
  EXPECT_EQ(back.device(), Device::cpu());
  expect_close(back.to_vector(), host.to_vector(), 0.0, "copy_from device");
  Tensor filled = Tensor::full({70001}, -2.5f, test_device());
  expect_close(filled, Tensor::full({70001}, -2.5f), 0.0, "full");
  filled.zero_();
  expect_close(filled, Tensor::zeros({70001}), 0.0, "zero_");
  EXPECT_EQ(Tensor::full({}, 3.25f, test_device()).item(), 3.25f);
  const Tensor ids = testing::random_ids({5, 7}, 1000, 2);
  EXPECT_EQ(ids.to(test_device()).to_int_vector(), ids.to_int_vector());
}

TEST(GpuTensor, CastsToAndFromBf16GiveTheCpuBits) {
  KRAKEN_REQUIRE_GPU();
  // Round to nearest even on both sides. Ties are built explicitly (the 16 dropped bits = 0x8000, with
  // an even and an odd kept part), next to ordinary values, extremes and signed zeros.
  std::vector<float> values = {0.0f, -0.0f, 1.0f, -1.0f, 3.0e38f, -3.0e38f, 1e-40f, 65504.0f, 0.1f};
  for (uint32_t kept : {0x3f80u, 0x3f81u, 0xbf80u, 0xbf81u, 0x4000u}) {
    for (uint32_t low : {0x8000u, 0x7fffu, 0x8001u}) {
      const uint32_t bits = (kept << 16) | low;
      float f;
      std::memcpy(&f, &bits, 4);
      values.push_back(f);
    }
  }
  const std::vector<float> noise = random_tensor({4096}, 3, 10.0f).to_vector();
  values.insert(values.end(), noise.begin(), noise.end());
  const Tensor host = Tensor::from_vector(values, {static_cast<int64_t>(values.size())});
  const Tensor bf_cpu = host.to(DType::BF16), bf_dev = host.to(test_device()).to(DType::BF16);
  ASSERT_EQ(bf_dev.dtype(), DType::BF16);
  const Tensor bits_cpu = bf_cpu, bits_dev = bf_dev.to(Device::cpu());
  const uint16_t* a = bits_cpu.data<uint16_t>();
  const uint16_t* b = bits_dev.data<uint16_t>();
  for (int64_t i = 0; i < host.numel(); ++i) ASSERT_EQ(a[i], b[i]) << "element " << i << " = " << values[i];
  expect_close(bf_dev.to(DType::F32), bf_cpu.to(DType::F32), 0.0, "bf16 → f32");
  // The differentiable cast sends the gradient back as f32.
  expect_matches_cpu([](const std::vector<Tensor>& x) { return ops::cast(ops::cast(x[0], DType::BF16), DType::F32); },
                     {leaf({300}, 4)}, 0.0, 0.0, "cast f32 → bf16 → f32");
}

TEST(GpuTensor, ViewsSplitAndConcatMoveTheSameBytes) {
  KRAKEN_REQUIRE_GPU();
  // split/concat along an inner dimension go through copy_2d on the device.
  expect_matches_cpu(
      [](const std::vector<Tensor>& x) {
        std::vector<Tensor> parts = ops::split(x[0], {5, 11, 16}, -1);
        return ops::concat({parts[2], ops::scale(parts[0], 2.0f), parts[1]}, -1);
      },
      {leaf({3, 7, 32}, 5)}, 0.0, 0.0, "split/concat along the last dimension");
  expect_matches_cpu(
      [](const std::vector<Tensor>& x) {
        return ops::concat(ops::split(ops::reshape(x[0], {6, 4, 10}), {2, 2}, 1), 0);
      },
      {leaf({24, 10}, 6)}, 0.0, 0.0, "reshape, split along a middle dimension, concat along the first");
  // slice: the gradient is zero outside the rows, written on the device.
  expect_matches_cpu([](const std::vector<Tensor>& x) { return ops::scale(ops::slice(x[0], 3, 9), 1.5f); },
                     {leaf({12, 17}, 7)}, 0.0, 0.0, "slice");
}

// ---- elementwise ------------------------------------------------------------------------------------

TEST(GpuElementwise, AddMulScaleAreBitIdenticalToTheCpu) {
  KRAKEN_REQUIRE_GPU();
  const Tensor a = leaf({4, 33, 65}, 10), b = leaf({4, 33, 65}, 11);
  expect_matches_cpu([](const std::vector<Tensor>& x) { return ops::add(x[0], x[1]); }, {a, b}, 0.0, 0.0, "add");
  // mul's gradients are one product per element as well.
  expect_matches_cpu([](const std::vector<Tensor>& x) { return ops::mul(x[0], x[1]); }, {a, b}, 0.0, 0.0, "mul");
  expect_matches_cpu([](const std::vector<Tensor>& x) { return ops::scale(x[0], -0.37f); }, {a}, 0.0, 0.0, "scale");
  expect_matches_cpu([](const std::vector<Tensor>& x) { return ops::sum_list({x[0], x[1], x[0]}); }, {a, b}, 0.0, 0.0,
                     "sum_list");
}

TEST(GpuElementwise, BroadcastAddSumsTheGradientOverRows) {
  KRAKEN_REQUIRE_GPU();
  // Forward: one addition per element (0). Backward: Σ over the rows, in another order on the GPU
  // (1e-5). Few rows (8, one thread per column) and many (330, row groups and a tree) take the two
  // paths of sum_rows_cuda; 1001 columns leave a partial block of columns.
  for (int64_t rows : {8, 330}) {
    SCOPED_TRACE(rows);
    expect_matches_cpu([](const std::vector<Tensor>& x) { return ops::add(x[0], x[1]); },
                       {leaf({rows, 1001}, 12), leaf({1001}, 13)}, 0.0, 1e-5, "add (rows, C) + (C,)");
  }
  expect_matches_cpu([](const std::vector<Tensor>& x) { return ops::add(x[0], x[1]); },
                     {leaf({3, 29, 40}, 14), leaf({29, 40}, 15)}, 0.0, 1e-5, "add (B, T, C) + (T, C)");
}

TEST(GpuElementwise, GeluMatchesTheCpuWithinAFewUlps) {
  KRAKEN_REQUIRE_GPU();
  // Inputs up to ±12 reach both saturated tails, where 1 + tanh(u) cancels.
  expect_matches_cpu([](const std::vector<Tensor>& x) { return ops::gelu(x[0]); }, {leaf({5, 4099}, 16, 4.0f)}, 4e-6,
                     4e-6, "gelu");
}

TEST(GpuReduce, SumAndMeanMatchTheCpuExactly) {
  KRAKEN_REQUIRE_GPU();
  // Both devices sum on the host in the same fixed order (ops/reduce.cpp), so the bits agree.
  expect_matches_cpu([](const std::vector<Tensor>& x) { return ops::sum(x[0]); }, {leaf({77, 91}, 17)}, 0.0, 0.0, "sum");
  expect_matches_cpu([](const std::vector<Tensor>& x) { return ops::mean(x[0]); }, {leaf({77, 91}, 18)}, 0.0, 0.0,
                     "mean");
}

// ---- matrix products --------------------------------------------------------------------------------

TEST(GpuMatmul, TwoDimensionalProductsInEveryTransposeMatchTheCpu) {
  KRAKEN_REQUIRE_GPU();
  // M, N, K odd and unequal, so a swapped dimension or leading dimension cannot pass by symmetry.
  const int64_t M = 37, N = 53, K = 71;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      SCOPED_TRACE(std::string("ta=") + (ta ? "1" : "0") + " tb=" + (tb ? "1" : "0"));
      const Tensor a = leaf(ta ? Shape{K, M} : Shape{M, K}, 20), b = leaf(tb ? Shape{N, K} : Shape{K, N}, 21);
      expect_matches_cpu([ta, tb](const std::vector<Tensor>& x) { return ops::matmul(x[0], x[1], ta, tb); }, {a, b}, 1e-5,
                         1e-5, "matmul");
    }
  }
}

TEST(GpuMatmul, BatchedAndRowBatchedProductsMatchTheCpu) {
  KRAKEN_REQUIRE_GPU();
  const int64_t B = 3, M = 17, N = 29, K = 41;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      SCOPED_TRACE(std::string("ta=") + (ta ? "1" : "0") + " tb=" + (tb ? "1" : "0"));
      const Tensor a = leaf(ta ? Shape{B, K, M} : Shape{B, M, K}, 22), b = leaf(tb ? Shape{B, N, K} : Shape{B, K, N}, 23);
      expect_matches_cpu([ta, tb](const std::vector<Tensor>& x) { return ops::matmul(x[0], x[1], ta, tb); }, {a, b}, 1e-5,
                         1e-5, "batched matmul");
    }
  }
  // (B, T, C) · Wᵀ as the LM head does it: the leading dims become rows; dW sums over all of them.
  for (bool tb : {false, true}) {
    SCOPED_TRACE(tb);
    const Tensor a = leaf({2, 19, K}, 24), w = leaf(tb ? Shape{N, K} : Shape{K, N}, 25);
    expect_matches_cpu([tb](const std::vector<Tensor>& x) { return ops::matmul(x[0], x[1], false, tb); }, {a, w}, 1e-5,
                       1e-5, "N-D · 2-D matmul");
  }
}

TEST(GpuMatmul, AnEmptyInnerDimensionGivesZeros) {
  KRAKEN_REQUIRE_GPU();
  // K = 0: C = 0 (cuBLAS itself would refuse the zero leading dimension; matmul_cuda defines it).
  const Tensor a = Tensor::empty({4, 0}, DType::F32, test_device()), b = Tensor::empty({0, 6}, DType::F32, test_device());
  expect_close(ops::matmul(a, b), Tensor::zeros({4, 6}), 0.0, "(4, 0) · (0, 6)");
  const Tensor ab = Tensor::empty({2, 3, 0}, DType::F32, test_device()), bb = Tensor::empty({2, 0, 5}, DType::F32, test_device());
  expect_close(ops::matmul(ab, bb), Tensor::zeros({2, 3, 5}), 0.0, "batched (3, 0) · (0, 5)");
}

TEST(GpuLinear, LinearWithAndWithoutBiasMatchesTheCpu) {
  KRAKEN_REQUIRE_GPU();
  // 2·40 = 80 rows: the bias gradient takes sum_rows_cuda's grouped path; 6 rows its per-column one.
  for (int64_t T : {40, 3}) {
    SCOPED_TRACE(T);
    const Tensor x = leaf({2, T, 96}, 26), w = leaf({120, 96}, 27, 0.1f), b = leaf({120}, 28);
    expect_matches_cpu([](const std::vector<Tensor>& v) { return ops::linear(v[0], v[1], v[2]); }, {x, w, b}, 1e-5, 1e-5,
                       "linear with bias");
    expect_matches_cpu([](const std::vector<Tensor>& v) { return ops::linear(v[0], v[1]); }, {x, w}, 1e-5, 1e-5,
                       "linear without bias");
  }
  // Only the weight wants a gradient (a frozen input): dx is not computed, dW still is.
  Tensor x = random_tensor({50, 64}, 29);
  expect_matches_cpu([](const std::vector<Tensor>& v) { return ops::linear(v[0], v[1], v[2]); },
                     {x, leaf({32, 64}, 30, 0.1f), leaf({32}, 31)}, 1e-5, 1e-5, "linear, input without gradient");
}

}  // namespace
}  // namespace kraken::runtime
