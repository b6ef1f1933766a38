// The CUDA paths against the CPU: AdamW and SGD updates, the global norm, the estimator and a few
// OptEx iterations with every tensor on the GPU. Skips, with the reason, where there is no GPU.
//
// Tolerances: nvcc contracts a·b + c into FMAs and the device reductions sum in another order, so the
// GPU differs from the CPU by rounding only: a few f32 ulps per step for the updates (1e-6 absolute on
// values of order 1), ~1e-12 relative for double sums, and for OptEx, whose proxy points feed back
// into the kernel weights, 1e-5 after five iterations.
#include <gtest/gtest.h>

#include <cmath>

#include "optim/adamw.h"
#include "optim/clip.h"
#include "optim/optex.h"
#include "optim/sgd.h"
#include "runtime/allocator.h"

namespace kraken::optim {
namespace {

using runtime::Device;
using runtime::Tensor;

#define KRAKEN_REQUIRE_GPU()                                         \
  do {                                                               \
    std::string why;                                                 \
    if (!runtime::cuda_available(&why)) GTEST_SKIP() << "no GPU: " << why; \
  } while (0)

Tensor ramp(int64_t n, double phase, Device device = Device::cpu()) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(std::sin(0.37 * i + phase));
  return Tensor::from_vector(v, {n}, device);
}

void expect_close(const Tensor& gpu, const Tensor& cpu, double tol, const char* what) {
  const std::vector<float> a = gpu.to(Device::cpu()).to_vector(), b = cpu.to_vector();
  ASSERT_EQ(a.size(), b.size());
  double worst = 0;
  int64_t where = -1;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::abs(static_cast<double>(a[i]) - b[i]) > worst) worst = std::abs(static_cast<double>(a[i]) - b[i]), where = i;
  EXPECT_LE(worst, tol) << what << ": largest difference at " << where;
}

TEST(OptimizerCuda, UpdatesMatchTheCpu) {
  KRAKEN_REQUIRE_GPU();
  for (const char* name : {"adamw", "sgd"}) {
    SCOPED_TRACE(name);
    const int64_t n = 70001;
    Tensor cpu = ramp(n, 0.0), gpu = ramp(n, 0.0, Device::cuda(0));
    OptimizerOptions o;
    o.name = name;
    o.sgd.momentum = 0.9f;
    o.sgd.weight_decay = 0.01f;
    auto a = make_optimizer(o, {{"p", cpu, true}});
    auto b = make_optimizer(o, {{"p", gpu, true}});
    for (int t = 0; t < 3; ++t) {
      a->step({ramp(n, 1.0 + t)}, 0.01f);
      b->step({ramp(n, 1.0 + t, Device::cuda(0))}, 0.01f);
    }
    expect_close(gpu, cpu, 1e-6, "parameters");
    expect_close(b->state_tensors()[0].second, a->state_tensors()[0].second, 1e-6, "first state tensor");
  }
}

TEST(OptimizerCuda, GlobalNormMatchesTheCpu) {
  KRAKEN_REQUIRE_GPU();
  std::vector<Tensor> cpu = {ramp(100003, 0.0), ramp(17, 2.0)};
  std::vector<Tensor> gpu = {cpu[0].to(Device::cuda(0)), cpu[1].to(Device::cuda(0))};
  const double a = global_grad_norm(cpu), b = global_grad_norm(gpu);
  EXPECT_NEAR(a, b, 1e-12 * a);
  clip_grad_norm(cpu, 1.0);
  clip_grad_norm(gpu, 1.0);
  expect_close(gpu[0], cpu[0], 1e-7, "clipped");
}

TEST(OptimizerCuda, EstimatorMatchesTheCpu) {
  KRAKEN_REQUIRE_GPU();
  for (int64_t effective_dim : {0, 300}) {
    SCOPED_TRACE(effective_dim);
    KernelEstimatorOptions o;
    o.lengthscale = 1.0;
    o.effective_dim = effective_dim;
    const int64_t d = 5000;
    KernelGradientEstimator cpu(o, d, Device::cpu(), runtime::Generator(5, 1));
    KernelGradientEstimator gpu(o, d, Device::cuda(0), runtime::Generator(5, 1));
    for (int i = 0; i < 6; ++i) {
      cpu.push(ramp(d, 0.01 * i), ramp(d, 3.0 + 0.1 * i));
      gpu.push(ramp(d, 0.01 * i, Device::cuda(0)), ramp(d, 3.0 + 0.1 * i, Device::cuda(0)));
    }
    cpu.fit();
    gpu.fit();
    EXPECT_EQ(cpu.subset(), gpu.subset());
    for (size_t i = 0; i < cpu.gram().size(); ++i) EXPECT_NEAR(cpu.gram()[i], gpu.gram()[i], 1e-12) << i;
    Tensor mu_cpu = Tensor::zeros({d}), mu_gpu = Tensor::zeros({d}, runtime::DType::F32, Device::cuda(0));
    cpu.predict(ramp(d, 0.025), mu_cpu);
    gpu.predict(ramp(d, 0.025, Device::cuda(0)), mu_gpu);
    expect_close(mu_gpu, mu_cpu, 1e-5, "μ");
  }
}

TEST(OptimizerCuda, OptExIterationsMatchTheCpu) {
  KRAKEN_REQUIRE_GPU();
  const int64_t d = 4000;
  Tensor cpu = ramp(d, 0.0), gpu = ramp(d, 0.0, Device::cuda(0));
  OptExOptions o;
  o.parallelism = 4;
  o.estimator.lengthscale = 1.0;
  // SGD with momentum: linear in the proxy gradient, so rounding differences stay rounding-sized (Adam's
  // g/√v would magnify them on coordinates where the gradient is near zero).
  const SgdOptions sgd{0.9f, 0.0f, false, 0.0f};
  OptEx a(std::make_unique<Sgd>(std::vector<ParamRef>{{"p", cpu, true}}, sgd), o);
  OptEx b(std::make_unique<Sgd>(std::vector<ParamRef>{{"p", gpu, true}}, sgd), o);
  // ∇ ½‖θ − c_s‖²: a quadratic whose centre c_s depends on the micro-batch s.
  auto oracle = [d](const Tensor& p) {
    return [p, d](int s) {
      std::vector<float> x = p.to(Device::cpu()).to_vector();
      const std::vector<float> c = ramp(d, 1.0 + 0.5 * s).to_vector();
      for (int64_t i = 0; i < d; ++i) x[i] -= 0.5f * c[i];
      return std::vector<Tensor>{Tensor::from_vector(x, {d}, p.device())};
    };
  };
  for (int t = 0; t < 5; ++t) {
    a.step(oracle(cpu), 0.05f);
    b.step(oracle(gpu), 0.05f);
  }
  expect_close(gpu, cpu, 1e-5, "parameters after 5 OptEx iterations");
}

}  // namespace
}  // namespace kraken::optim
