// Optimizer kernels on the GPU, beyond tests/optim/optimizer_cuda_test.cpp (which covers AdamW and SGD
// with momentum on one tensor, the global norm, the OptEx estimator and OptEx iterations): the SGD
// variants, AdamW over many parameters with and without decay, run-to-run bit-reproducibility of the
// updates and reductions, and each device reduction against the CPU, including the multi-pass
// weighted sum. Skips where there is no GPU.
//
// Tolerances: the updates are a few f32 operations per element, contracted into FMAs differently by
// nvcc and gcc, so after k steps parameters differ by a few ulp per step: 2e-6 of their scale (≈ 30 ulp)
// after 10 steps. The double reductions reorder sums of ≤ 10⁶ positive terms: relative 1e-12 (√n·2⁻⁵³
// ≈ 1e-13). The weighted sum over more than 64 rows adds the later passes in f32 (kernels/optimizer.h):
// 2 ulp of the result, 1e-6 relative to the scale.
#include <gtest/gtest.h>

#include <cmath>

#include "optim/adamw.h"
#include "optim/clip.h"
#include "optim/reductions.h"
#include "optim/sgd.h"
#include "tests/gpu/gpu_test_util.h"

namespace kraken::optim {
namespace {

using runtime::Device;
using runtime::DType;
using runtime::Tensor;
using testing::expect_close;
using testing::random_tensor;
using testing::test_device;

// Parameters of several sizes (one element, odd sizes, one larger than a block of the CPU kernels).
std::vector<int64_t> sizes() { return {1, 37, 4096, 70001}; }

std::vector<Tensor> params_on(const Device& device, uint64_t seed) {
  std::vector<Tensor> out;
  for (int64_t n : sizes()) out.push_back(random_tensor({n}, seed + static_cast<uint64_t>(n)).to(device));
  return out;
}

std::vector<Tensor> grads_on(const Device& device, int step) {
  std::vector<Tensor> out;
  for (int64_t n : sizes()) out.push_back(random_tensor({n}, 1000 + 10 * static_cast<uint64_t>(step) + n, 0.1f).to(device));
  return out;
}

std::vector<ParamRef> refs(const std::vector<Tensor>& params) {
  std::vector<ParamRef> out;
  for (size_t i = 0; i < params.size(); ++i) out.push_back({"p" + std::to_string(i), params[i], i % 2 == 0});
  return out;
}

// Ten steps of `name` with the given options on the CPU and on the device; parameters and every state
// tensor compared.
void expect_optimizer_matches(const OptimizerOptions& o, const std::string& what) {
  std::vector<Tensor> cpu = params_on(Device::cpu(), 5), dev = params_on(test_device(), 5);
  auto a = make_optimizer(o, refs(cpu));
  auto b = make_optimizer(o, refs(dev));
  for (int t = 0; t < 10; ++t) {
    a->step(grads_on(Device::cpu(), t), 0.01f * (1.0f + 0.1f * static_cast<float>(t)));
    b->step(grads_on(test_device(), t), 0.01f * (1.0f + 0.1f * static_cast<float>(t)));
  }
  for (size_t i = 0; i < cpu.size(); ++i) expect_close(dev[i], cpu[i], 2e-6, what + ": parameter " + std::to_string(i));
  const NamedTensors sa = a->state_tensors(), sb = b->state_tensors();
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size(); ++i) {
    EXPECT_EQ(sb[i].first, sa[i].first);
    expect_close(sb[i].second, sa[i].second, 2e-6, what + ": " + sa[i].first);
  }
  EXPECT_EQ(b->state_scalars(), a->state_scalars());
}

TEST(GpuOptimizer, SgdVariantsMatchTheCpu) {
  KRAKEN_REQUIRE_GPU();
  struct Case {
    const char* name;
    SgdOptions sgd;
  };
  for (const Case& c : {Case{"plain", {0.0f, 0.0f, false, 0.0f}}, Case{"plain with decay", {0.0f, 0.0f, false, 0.05f}},
                        Case{"momentum, damped", {0.9f, 0.5f, false, 0.01f}}, Case{"nesterov", {0.9f, 0.0f, true, 0.01f}}}) {
    SCOPED_TRACE(c.name);
    OptimizerOptions o;
    o.name = "sgd";
    o.sgd = c.sgd;
    expect_optimizer_matches(o, c.name);
  }
}

TEST(GpuOptimizer, AdamWOverManyParametersWithAndWithoutDecayMatchesTheCpu) {
  KRAKEN_REQUIRE_GPU();
  OptimizerOptions o;
  o.name = "adamw";
  o.adamw = {0.9f, 0.95f, 1e-8f, 0.1f};  // the GPT-2 settings the trainer uses
  expect_optimizer_matches(o, "adamw");
}

TEST(GpuOptimizer, UpdatesAndReductionsAreBitReproducibleRunToRun) {
  KRAKEN_REQUIRE_GPU();
  // Fixed grids and fixed trees, no atomics: the same inputs give the same bits every time.
  std::vector<Tensor> first, second;
  for (std::vector<Tensor>* out : {&first, &second}) {
    *out = params_on(test_device(), 7);
    OptimizerOptions o;
    auto opt = make_optimizer(o, refs(*out));
    for (int t = 0; t < 3; ++t) opt->step(grads_on(test_device(), t), 0.01f);
  }
  for (size_t i = 0; i < first.size(); ++i) expect_close(second[i], first[i], 0.0, "AdamW run to run");
  const std::vector<Tensor> g = grads_on(test_device(), 4);
  EXPECT_EQ(sum_squares(g), sum_squares(g));
}

TEST(GpuOptimizer, BothOptimizersWriteTheBf16CopiesInTheirUpdate) {
  KRAKEN_REQUIRE_GPU();
  // set_compute_copies: after each step every copy is its parameter rounded to bf16 — AdamW and SGD
  // write them in the many-tensor update's own pass (the 16-byte path and the element one: some
  // parameters are odd-sized).
  for (const char* name : {"adamw", "sgd"}) {
    std::vector<Tensor> params = params_on(test_device(), 9), copies;
    for (const Tensor& p : params) copies.push_back(Tensor::zeros(p.shape(), DType::BF16, test_device()));
    OptimizerOptions o;
    o.name = name;
    o.sgd.momentum = 0.9f;
    auto opt = make_optimizer(o, refs(params));
    opt->set_compute_copies(copies);
    for (int t = 0; t < 2; ++t) {
      opt->step(grads_on(test_device(), t), 0.01f);
      for (size_t i = 0; i < params.size(); ++i)
        EXPECT_EQ(copies[i].to_vector(), params[i].to(DType::BF16).to_vector()) << name << " copy " << i;
    }
  }
}

TEST(GpuReductions, DistancesNormsAndWeightedRowsMatchTheCpu) {
  KRAKEN_REQUIRE_GPU();
  const int64_t n = 300007;  // several grid strides of the 512·256-thread reduction grid
  const Tensor q = random_tensor({n}, 1);
  std::vector<Tensor> rows_cpu, rows_dev;
  for (int r = 0; r < 70; ++r) {
    rows_cpu.push_back(random_tensor({n}, 100 + static_cast<uint64_t>(r)));
    rows_dev.push_back(rows_cpu.back().to(test_device()));
  }
  const Tensor q_dev = q.to(test_device());

  const std::vector<double> d_cpu = squared_distances(q, {rows_cpu.begin(), rows_cpu.begin() + 5});
  const std::vector<double> d_dev = squared_distances(q_dev, {rows_dev.begin(), rows_dev.begin() + 5});
  ASSERT_EQ(d_dev.size(), 5u);
  for (size_t r = 0; r < 5; ++r) EXPECT_NEAR(d_dev[r], d_cpu[r], 1e-12 * d_cpu[r]) << "row " << r;

  std::vector<int32_t> idx;
  for (int64_t i = 0; i < n; i += 7) idx.push_back(static_cast<int32_t>((i * 31) % n));
  const Tensor idx_cpu = Tensor::from_ints(idx, {static_cast<int64_t>(idx.size())});
  const Tensor idx_dev = idx_cpu.to(test_device());
  const double di_cpu = squared_distance_indexed(q, rows_cpu[0], idx_cpu);
  EXPECT_NEAR(squared_distance_indexed(q_dev, rows_dev[0], idx_dev), di_cpu, 1e-12 * di_cpu);
  const double si_cpu = squared_distance_indexed(q, Tensor(), idx_cpu);
  EXPECT_NEAR(squared_distance_indexed(q_dev, Tensor(), idx_dev), si_cpu, 1e-12 * si_cpu);
  const double ss_cpu = sum_squares(rows_cpu);
  EXPECT_NEAR(sum_squares(rows_dev), ss_cpu, 1e-12 * ss_cpu);

  // 70 rows: one pass of 64 rows summed in double, then a pass of 6 added in f32.
  std::vector<double> weights;
  for (int r = 0; r < 70; ++r) weights.push_back(std::sin(0.3 * r + 0.1));
  Tensor out_cpu = Tensor::empty({n}), out_dev = Tensor::empty({n}, DType::F32, test_device());
  weighted_sum_rows(out_cpu, rows_cpu, weights);
  weighted_sum_rows(out_dev, rows_dev, weights);
  expect_close(out_dev, out_cpu, 1e-6, "weighted sum of 70 rows");
  // No rows: zeros.
  weighted_sum_rows(out_dev, {}, {});
  expect_close(out_dev, Tensor::zeros({n}), 0.0, "weighted sum of no rows");
}

TEST(GpuReductions, ClippingScalesEveryGradientOnTheDevice) {
  KRAKEN_REQUIRE_GPU();
  std::vector<Tensor> cpu = grads_on(Device::cpu(), 9), dev = grads_on(test_device(), 9);
  const double norm_cpu = clip_grad_norm(cpu, 0.5), norm_dev = clip_grad_norm(dev, 0.5);
  EXPECT_NEAR(norm_dev, norm_cpu, 1e-12 * norm_cpu);
  ASSERT_GT(norm_cpu, 0.5);  // so the clip actually scaled
  // One f32 coefficient times each element: the CPU's bits, unless the two norms (equal to 1e-12)
  // straddle a rounding boundary of the f32 coefficient, which would cost one ulp (2e-7 of the scale).
  for (size_t i = 0; i < cpu.size(); ++i) expect_close(dev[i], cpu[i], 2e-7, "clipped gradient " + std::to_string(i));
  EXPECT_NEAR(global_grad_norm(dev), 0.5, 1e-6);
}

}  // namespace
}  // namespace kraken::optim
