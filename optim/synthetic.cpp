#include "optim/synthetic.h"

#include <cmath>

#include "kernels/error.h"
#include "optim/adamw.h"
#include "optim/sgd.h"

namespace kraken::optim {

using runtime::DType;
using runtime::Tensor;

SyntheticKind parse_synthetic_kind(const std::string& name) {
  if (name == "sphere") return SyntheticKind::Sphere;
  if (name == "quadratic") return SyntheticKind::Quadratic;
  if (name == "rosenbrock") return SyntheticKind::Rosenbrock;
  if (name == "ackley") return SyntheticKind::Ackley;
  KRAKEN_THROW("synthetic problem: unknown name '", name, "' (expected sphere, quadratic, rosenbrock or ackley)");
}

const char* synthetic_kind_name(SyntheticKind kind) {
  switch (kind) {
    case SyntheticKind::Sphere: return "sphere";
    case SyntheticKind::Quadratic: return "quadratic";
    case SyntheticKind::Rosenbrock: return "rosenbrock";
    case SyntheticKind::Ackley: return "ackley";
  }
  return "?";
}

SyntheticProblem::SyntheticProblem(SyntheticKind kind, int64_t dim) : kind_(kind), dim_(dim) {
  if (dim < 2) KRAKEN_THROW("synthetic problem: dim must be >= 2, got ", dim);
  if (kind == SyntheticKind::Quadratic) {
    curvature_.resize(static_cast<size_t>(dim));
    for (int64_t i = 0; i < dim; ++i) curvature_[i] = std::pow(10.0, 2.0 * static_cast<double>(i) / static_cast<double>(dim - 1));
  }
}

double SyntheticProblem::value(const float* x) const {
  double f = 0.0;
  const int64_t d = dim_;
  switch (kind_) {
    case SyntheticKind::Sphere:
      for (int64_t i = 0; i < d; ++i) f += static_cast<double>(x[i]) * x[i];
      return f;
    case SyntheticKind::Quadratic:
      for (int64_t i = 0; i < d; ++i) f += 0.5 * curvature_[i] * x[i] * x[i];
      return f;
    case SyntheticKind::Rosenbrock:
      for (int64_t i = 0; i + 1 < d; ++i) {
        const double a = static_cast<double>(x[i + 1]) - static_cast<double>(x[i]) * x[i], b = 1.0 - x[i];
        f += 100.0 * a * a + b * b;
      }
      return f;
    case SyntheticKind::Ackley: {
      double s2 = 0.0, c = 0.0;
      for (int64_t i = 0; i < d; ++i) {
        s2 += static_cast<double>(x[i]) * x[i];
        c += std::cos(2.0 * M_PI * x[i]);
      }
      return -20.0 * std::exp(-0.2 * std::sqrt(s2 / d)) - std::exp(c / d) + 20.0 + std::exp(1.0);
    }
  }
  return f;
}

void SyntheticProblem::gradient(const float* x, float* g) const {
  const int64_t d = dim_;
  switch (kind_) {
    case SyntheticKind::Sphere:
      for (int64_t i = 0; i < d; ++i) g[i] = static_cast<float>(2.0 * x[i]);
      return;
    case SyntheticKind::Quadratic:
      for (int64_t i = 0; i < d; ++i) g[i] = static_cast<float>(curvature_[i] * x[i]);
      return;
    case SyntheticKind::Rosenbrock:
      // ∂/∂θ_i of 100(θ_{i+1} − θ_i²)² + (1 − θ_i)² is −400θ_i(θ_{i+1} − θ_i²) − 2(1 − θ_i);
      // of the previous term 100(θ_i − θ_{i−1}²)² it is 200(θ_i − θ_{i−1}²).
      for (int64_t i = 0; i < d; ++i) {
        const double xi = x[i];
        double gi = 0.0;
        if (i + 1 < d) gi += -400.0 * xi * (static_cast<double>(x[i + 1]) - xi * xi) - 2.0 * (1.0 - xi);
        if (i > 0) gi += 200.0 * (xi - static_cast<double>(x[i - 1]) * x[i - 1]);
        g[i] = static_cast<float>(gi);
      }
      return;
    case SyntheticKind::Ackley: {
      double s2 = 0.0, c = 0.0;
      for (int64_t i = 0; i < d; ++i) {
        s2 += static_cast<double>(x[i]) * x[i];
        c += std::cos(2.0 * M_PI * x[i]);
      }
      const double rms = std::sqrt(s2 / d);
      // d/dθ_i of −20·exp(−0.2·rms) is 4·exp(−0.2·rms)·θ_i/(d·rms) (0 at the origin, its limit along
      // any ray being bounded and the subgradient 0 there); of −exp(c/d) it is exp(c/d)·2π·sin(2πθ_i)/d.
      const double a = rms > 0.0 ? 4.0 * std::exp(-0.2 * rms) / (d * rms) : 0.0;
      const double b = std::exp(c / d) * 2.0 * M_PI / d;
      for (int64_t i = 0; i < d; ++i) g[i] = static_cast<float>(a * x[i] + b * std::sin(2.0 * M_PI * x[i]));
      return;
    }
  }
}

double SyntheticProblem::value(const Tensor& theta) const {
  KRAKEN_CHECK(theta.numel() == dim_ && theta.device().is_cpu());
  return value(theta.data<float>());
}

void SyntheticProblem::gradient(const Tensor& theta, Tensor& grad) const {
  KRAKEN_CHECK(theta.numel() == dim_ && grad.numel() == dim_ && theta.device().is_cpu() && grad.device().is_cpu());
  gradient(theta.data<float>(), grad.data<float>());
}

SyntheticTrace run_synthetic(const SyntheticRun& run) {
  const SyntheticProblem problem(run.kind, run.dim);
  runtime::Generator init(run.seed, 0), noise(run.seed, 1);
  Tensor theta = Tensor::empty({run.dim});
  init.fill_uniform(theta, -1.0f, 1.0f);
  std::vector<ParamRef> params = {{"theta", theta, false}};

  std::unique_ptr<Optimizer> base;
  if (run.optimizer == "adam") {
    AdamWOptions o;
    o.weight_decay = 0.0f;  // optax.adam: no decay
    base = std::make_unique<AdamW>(params, o);
  } else if (run.optimizer == "sgd") {
    base = std::make_unique<Sgd>(params, SgdOptions());
  } else {
    KRAKEN_THROW("synthetic run: unknown optimizer '", run.optimizer, "' (expected adam or sgd)");
  }
  OptEx optex(std::move(base), run.optex);

  Tensor grad = Tensor::empty({run.dim}), eps = Tensor::empty({run.dim});
  const GradientOracle oracle = [&](int) {
    problem.gradient(theta, grad);
    if (run.noise_std > 0.0f) {
      noise.fill_normal(eps, 0.0f, run.noise_std);
      float* g = grad.data<float>();
      const float* e = eps.data<float>();
      for (int64_t i = 0; i < run.dim; ++i) g[i] += e[i];
    }
    return std::vector<Tensor>{grad};
  };

  SyntheticTrace trace;
  trace.gap.push_back(problem.value(theta));
  for (int t = 0; t < run.iterations; ++t) {
    trace.reports.push_back(optex.step(oracle, run.lr));
    trace.gap.push_back(problem.value(theta));
  }
  return trace;
}

double effective_speedup(const std::vector<double>& vanilla_gap, const std::vector<double>& optex_gap) {
  KRAKEN_CHECK(optex_gap.size() >= 2);
  const double target = optex_gap.back();
  const double iterations = static_cast<double>(optex_gap.size() - 1);
  for (size_t k = 0; k < vanilla_gap.size(); ++k)
    if (vanilla_gap[k] <= target) return static_cast<double>(k) / iterations;
  return -1.0;
}

}  // namespace kraken::optim
