#include "tests/support/gradcheck.h"

#include <gtest/gtest.h>

#include <cmath>

#include "runtime/autograd.h"
#include "runtime/rng.h"

namespace kraken::testing {

using runtime::Tensor;

Tensor random_leaf(const runtime::Shape& shape, uint64_t seed, float std) {
  Tensor t = Tensor::empty(shape);
  runtime::Generator gen(seed, 7);
  gen.fill_normal(t, 0.0f, std);
  t.set_requires_grad(true);
  return t;
}

MaxDiff max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  MaxDiff out;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - b[i]);
    if (d > out.value || out.index < 0) out = {d, static_cast<int64_t>(i)};
  }
  return out;
}

namespace {

double projected(const Tensor& y, const std::vector<float>& w) {
  const std::vector<float> v = y.to_vector();
  double acc = 0.0;
  for (size_t i = 0; i < v.size(); ++i) acc += static_cast<double>(w[i]) * v[i];
  return acc;
}

}  // namespace

void expect_gradients_match(const OpFn& f, const std::vector<Tensor>& inputs, const GradCheckOptions& options) {
  for (const Tensor& x : inputs)
    if (x.defined() && x.requires_grad()) x.impl()->grad.reset();

  Tensor y = f(inputs);
  ASSERT_TRUE(y.requires_grad()) << "the op's output does not require grad";
  Tensor w = Tensor::empty(y.shape());
  runtime::Generator gen(options.seed, 11);
  gen.fill_normal(w, 0.0f, 1.0f);
  const std::vector<float> wv = w.to_vector();
  runtime::backward(y, w);

  runtime::NoGrad no_grad;
  for (size_t k = 0; k < inputs.size(); ++k) {
    const Tensor& x = inputs[k];
    if (!x.defined() || !x.requires_grad()) continue;
    ASSERT_TRUE(x.grad().defined()) << "input " << k << " received no gradient";
    const std::vector<float> analytic = x.grad().to_vector();
    const int64_t n = x.numel();
    std::vector<int64_t> coords;
    if (n <= options.max_coords_per_input) {
      for (int64_t j = 0; j < n; ++j) coords.push_back(j);
    } else {
      runtime::Generator pick(options.seed + k, 13);
      for (int i = 0; i < options.max_coords_per_input; ++i)
        coords.push_back(static_cast<int64_t>(pick.next_below(static_cast<uint64_t>(n))));
    }
    float* data = x.data<float>();
    double worst = -1.0;
    int64_t worst_at = -1;
    double worst_fd = 0.0, worst_an = 0.0;
    for (int64_t j : coords) {
      const float saved = data[j];
      data[j] = saved + static_cast<float>(options.eps);
      const double plus = projected(f(inputs), wv);
      data[j] = saved - static_cast<float>(options.eps);
      const double minus = projected(f(inputs), wv);
      data[j] = saved;
      // The actual step is what f32 could represent, not eps itself.
      const double step = static_cast<double>(saved + static_cast<float>(options.eps)) -
                          static_cast<double>(saved - static_cast<float>(options.eps));
      const double fd = (plus - minus) / step;
      const double an = analytic[static_cast<size_t>(j)];
      const double excess = std::fabs(fd - an) - (options.atol + options.rtol * std::max(std::fabs(fd), std::fabs(an)));
      if (excess > worst) {
        worst = excess;
        worst_at = j;
        worst_fd = fd;
        worst_an = an;
      }
    }
    EXPECT_LE(worst, 0.0) << "input " << k << " (" << x.describe() << "): worst coordinate " << worst_at
                          << " analytic " << worst_an << " vs finite difference " << worst_fd;
  }
}

}  // namespace kraken::testing
