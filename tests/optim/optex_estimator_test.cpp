// The kernelized gradient estimator against closed-form numbers computed here in double: the
// Matérn-5/2 kernel, the posterior mean on a 2-D case with three history points (with and without the
// input scaling), interpolation of history gradients as σ² → 0 (optex.md §7 T3), the zero proxy below
// two pairs, the FIFO, the distance cache, the coordinate subset, the partial-sum hook, and errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "optim/optex_estimator.h"

namespace kraken::optim {
namespace {

using runtime::Device;
using runtime::Tensor;

Tensor flat(const std::vector<float>& v) { return Tensor::from_vector(v, {static_cast<int64_t>(v.size())}); }

double matern_reference(double r, double l) {
  const double s5 = std::sqrt(5.0);
  return (1.0 + s5 * r / l + 5.0 * r * r / (3.0 * l * l)) * std::exp(-s5 * r / l);
}

double dist(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
  return std::sqrt(s);
}

TEST(Matern52, MatchesClosedFormValues) {
  EXPECT_DOUBLE_EQ(matern52(0.0, 0.1), 1.0);
  // (1 + √5 + 5/3)·e^{−√5} at r = ℓ, and at r = ℓ/2 (values from an independent evaluation).
  EXPECT_NEAR(matern52(1.0, 1.0), 0.523994108832, 1e-12);
  EXPECT_NEAR(matern52(0.25, 0.5), 0.828649142418, 1e-12);
  EXPECT_NEAR(matern52(0.37, 0.2), matern_reference(0.37, 0.2), 1e-15);
  EXPECT_LT(matern52(50.0, 0.1), 1e-100);
}

// The tiny case: 3 points in 2-D. The test inverts the 3×3 matrix by its adjugate (no Cholesky), so the
// estimator's factor-and-solve is checked against an independent route.
struct Tiny {
  std::vector<std::vector<float>> theta = {{0.1f, 0.2f}, {0.3f, -0.1f}, {-0.2f, 0.4f}};
  std::vector<std::vector<float>> grad = {{1.0f, 2.0f}, {-1.0f, 0.5f}, {0.3f, -0.7f}};
  std::vector<float> query = {0.05f, 0.1f};

  // μ(query) = k(query)ᵀ (K + σ²I)⁻¹ G with inputs divided by `scale`.
  std::vector<double> mu(double l, double noise, double scale) const {
    double K[3][3], k[3];
    for (int i = 0; i < 3; ++i) {
      k[i] = matern_reference(dist(query, theta[i]) / scale, l);
      for (int j = 0; j < 3; ++j) K[i][j] = matern_reference(dist(theta[i], theta[j]) / scale, l) + (i == j ? noise : 0.0);
    }
    double adj[3][3];
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) {
        const int r0 = (j + 1) % 3, r1 = (j + 2) % 3, c0 = (i + 1) % 3, c1 = (i + 2) % 3;
        adj[i][j] = K[r0][c0] * K[r1][c1] - K[r0][c1] * K[r1][c0];  // cofactor of (j, i), transposed
      }
    const double det = K[0][0] * adj[0][0] + K[0][1] * adj[1][0] + K[0][2] * adj[2][0];
    std::vector<double> out(2, 0.0);
    for (int t = 0; t < 3; ++t) {
      double w = 0;  // ((K + σ²I)⁻¹ k)_t
      for (int j = 0; j < 3; ++j) w += adj[t][j] / det * k[j];
      for (int c = 0; c < 2; ++c) out[c] += w * grad[t][c];
    }
    return out;
  }

  KernelGradientEstimator make(const KernelEstimatorOptions& o) const {
    KernelGradientEstimator est(o, 2, Device::cpu());
    for (int i = 0; i < 3; ++i) est.push(flat(theta[i]), flat(grad[i]));
    est.fit();
    return est;
  }
};

TEST(KernelGradientEstimator, PosteriorMeanMatchesClosedFormOnTinyCase) {
  const Tiny tiny;
  KernelEstimatorOptions o;
  o.lengthscale = 0.5;
  o.noise = 0.01;
  o.normalize_inputs = false;
  KernelGradientEstimator est = tiny.make(o);
  ASSERT_TRUE(est.defined());
  EXPECT_DOUBLE_EQ(est.gram()[0], 1.0 + 0.01);
  EXPECT_NEAR(est.gram()[1], matern_reference(dist(tiny.theta[0], tiny.theta[1]), 0.5), 1e-15);
  Tensor out = Tensor::zeros({2});
  EXPECT_TRUE(est.predict(flat(tiny.query), out));
  const std::vector<double> expect = tiny.mu(0.5, 0.01, 1.0);
  // μ is accumulated in double and rounded once to f32: within 1e-7 relative, plus the solve's rounding
  // (condition number of K + σ²I here < 1e3, so < 1e-12).
  for (int c = 0; c < 2; ++c) EXPECT_NEAR(out.to_vector()[c], expect[c], 1e-7 * std::abs(expect[c]) + 1e-9) << c;
  // The numbers are not trivially small: the query sits between the history points.
  EXPECT_GT(std::abs(expect[0]), 0.1);
}

TEST(KernelGradientEstimator, InputScalingDividesByMeanSqrtNorm) {
  const Tiny tiny;
  KernelEstimatorOptions o;
  o.lengthscale = 0.5;
  o.noise = 0.01;
  o.normalize_inputs = true;
  KernelGradientEstimator est = tiny.make(o);
  double s = 0;  // mean_τ ‖θ_τ‖^{1/2}
  for (const auto& t : tiny.theta) s += std::sqrt(dist(t, {0.0f, 0.0f}));
  s /= 3;
  EXPECT_NEAR(est.input_scale(), s, 1e-15);
  Tensor out = Tensor::zeros({2});
  est.predict(flat(tiny.query), out);
  const std::vector<double> expect = tiny.mu(0.5, 0.01, s);
  for (int c = 0; c < 2; ++c) EXPECT_NEAR(out.to_vector()[c], expect[c], 1e-7 * std::abs(expect[c]) + 1e-9) << c;
  // The scaling changes the answer: the unscaled μ differs at the 1e-2 level.
  EXPECT_GT(std::abs(expect[0] - tiny.mu(0.5, 0.01, 1.0)[0]), 1e-2);
}

// A history along a gradient-descent path on a quadratic in d = 50.
void fill_path(KernelGradientEstimator& est, int points) {
  const int64_t d = est.dim();
  std::vector<float> x(d);
  for (int64_t i = 0; i < d; ++i) x[i] = std::cos(0.3 * i);
  for (int p = 0; p < points; ++p) {
    std::vector<float> g(d);
    for (int64_t i = 0; i < d; ++i) g[i] = static_cast<float>((1.0 + i % 5) * x[i]);
    est.push(flat(x), flat(g));
    for (int64_t i = 0; i < d; ++i) x[i] -= 0.05f * g[i];
  }
}

TEST(KernelGradientEstimator, PosteriorMeanReproducesHistoryGradientsAsNoiseVanishes) {
  // At a history point w = (K + σ²I)⁻¹K e_τ = e_τ − σ²(K + σ²I)⁻¹e_τ, so μ(θ_τ) − g_τ = −σ²[(K+σ²I)⁻¹G]_τ:
  // once σ² is well below K's smallest eigenvalue (about 1e-3 for this history of nearby points), the
  // relative error is σ² times a constant, until it meets the f32 rounding of μ (~1e-7).
  std::vector<double> err;
  const std::vector<double> noises = {1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8};
  for (double noise : noises) {
    KernelEstimatorOptions o;
    o.lengthscale = 1.0;
    o.noise = noise;
    KernelGradientEstimator est(o, 50, Device::cpu());
    fill_path(est, 6);
    est.fit();
    const int tau = 3;
    Tensor out = Tensor::zeros({50});
    est.predict(est.theta(tau), out);
    const std::vector<float> mu = out.to_vector(), g = est.grad(tau).to_vector();
    err.push_back(dist(mu, g) / dist(g, std::vector<float>(50, 0.0f)));
  }
  for (size_t i = 0; i < err.size(); ++i) {
    SCOPED_TRACE(testing::Message() << "σ² = " << noises[i] << ", relative error " << err[i]);
    // σ²-scaled (this history's constant is about 2), with an f32 floor of 3e-7 (a few roundings of
    // 6e-8 relative each).
    EXPECT_LT(err[i], 3.0 * noises[i] + 3e-7);
    // In the linear regime each decade of σ² takes a decade off the error.
    if (noises[i] <= 1e-5 && err[i] > 1e-6) {
      EXPECT_NEAR(err[i - 1] / err[i], 10.0, 1.5);
    }
  }
  EXPECT_GT(err[0], 1e-4);  // the error is real at σ² = 1e-3: the test would see a missing σ²
}

TEST(KernelGradientEstimator, ProxyIsZeroBelowTwoPairs) {
  KernelGradientEstimator est(KernelEstimatorOptions(), 3, Device::cpu());
  Tensor out = Tensor::full({3}, 7.0f);
  est.fit();
  EXPECT_FALSE(est.predict(flat({1, 2, 3}), out));
  EXPECT_EQ(out.to_vector(), (std::vector<float>{0, 0, 0}));
  est.push(flat({1, 1, 1}), flat({5, 5, 5}));
  est.fit();
  out.fill_(7.0f);
  EXPECT_FALSE(est.predict(flat({1, 1, 1}), out));  // even at the one history point
  EXPECT_EQ(out.to_vector(), (std::vector<float>{0, 0, 0}));
  est.push(flat({1, 1, 2}), flat({5, 5, 6}));
  EXPECT_THROW(est.predict(flat({1, 1, 1}), out), Error);  // the history changed: fit first
  est.fit();
  EXPECT_TRUE(est.predict(flat({1, 1, 1}), out));
  EXPECT_GT(out.to_vector()[0], 1.0f);
}

TEST(KernelGradientEstimator, SingularGramWithoutNoiseIsAClearError) {
  KernelEstimatorOptions o;
  o.noise = 0.0;
  KernelGradientEstimator est(o, 2, Device::cpu());
  est.push(flat({1, 2}), flat({1, 0}));
  est.push(flat({1, 2}), flat({0, 1}));  // the same point twice: K = [[1, 1], [1, 1]]
  try {
    est.fit();
    FAIL() << "a singular Gram matrix was factored";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("not positive definite"), std::string::npos) << m;
    EXPECT_NE(m.find("2 history points"), std::string::npos) << m;
    EXPECT_NE(m.find("noise"), std::string::npos) << m;
  }
  // The same history with σ² > 0 is fine (the GP averages the two gradients).
  KernelGradientEstimator ok(KernelEstimatorOptions(), 2, Device::cpu());
  ok.push(flat({1, 2}), flat({1, 0}));
  ok.push(flat({1, 2}), flat({0, 1}));
  ok.fit();
  Tensor out = Tensor::zeros({2});
  ok.predict(flat({1, 2}), out);
  // w solves [[1+σ², 1], [1, 1+σ²]]w = (1, 1): w_i = 1/(2 + σ²).
  EXPECT_NEAR(out.to_vector()[0], 1.0 / 2.001, 1e-7);
  EXPECT_NEAR(out.to_vector()[1], 1.0 / 2.001, 1e-7);
}

TEST(KernelGradientEstimator, HistoryIsAFifoOfT0Pairs) {
  KernelEstimatorOptions o;
  o.history = 3;
  KernelGradientEstimator est(o, 1, Device::cpu());
  std::vector<float> evicted;
  for (int i = 0; i < 5; ++i) {
    auto old = est.push(flat({static_cast<float>(i)}), flat({10.0f + i}));
    if (old) evicted.push_back(old->first.to_vector()[0]);
  }
  EXPECT_EQ(est.size(), 3);
  EXPECT_EQ(est.theta(0).to_vector()[0], 2.0f);
  EXPECT_EQ(est.grad(2).to_vector()[0], 14.0f);
  EXPECT_EQ(evicted, (std::vector<float>{0.0f, 1.0f}));
  EXPECT_EQ(KernelGradientEstimator::history_bytes(1000, 50), 2 * 50 * 1000 * 4);
}

TEST(KernelGradientEstimator, CachedDistancesGiveTheSameBitsAsAFreshFit) {
  // A: 4 pairs, fit, 3 more (two evicted at T0 = 5), fit with the cache. B: the final 5 pairs at once.
  KernelEstimatorOptions o;
  o.history = 5;
  KernelGradientEstimator a(o, 50, Device::cpu()), all(o, 50, Device::cpu());
  o.history = 7;
  KernelGradientEstimator path(o, 50, Device::cpu());
  fill_path(path, 7);
  for (int i = 0; i < 4; ++i) a.push(path.theta(i).clone(), path.grad(i).clone());
  a.fit();
  for (int i = 4; i < 7; ++i) a.push(path.theta(i).clone(), path.grad(i).clone());
  a.fit();
  for (int i = 2; i < 7; ++i) all.push(path.theta(i).clone(), path.grad(i).clone());
  all.fit();
  ASSERT_EQ(a.gram().size(), 25u);
  EXPECT_EQ(0, std::memcmp(a.gram().data(), all.gram().data(), 25 * sizeof(double)));
  EXPECT_EQ(a.input_scale(), all.input_scale());
}

TEST(KernelGradientEstimator, EffectiveDimUsesARedrawnCoordinateSubset) {
  KernelEstimatorOptions o;
  o.effective_dim = 7;
  o.history = 6;
  KernelGradientEstimator est(o, 50, Device::cpu(), runtime::Generator(11, 3));
  fill_path(est, 4);
  est.fit();
  const std::vector<int32_t> first = est.subset();
  ASSERT_EQ(first.size(), 7u);
  for (size_t i = 1; i < first.size(); ++i) EXPECT_LT(first[i - 1], first[i]);  // sorted, distinct
  EXPECT_GE(first.front(), 0);
  EXPECT_LT(first.back(), 50);
  // Gram entries from the subset coordinates only, with the scale over the subset norms.
  auto sub = [&](const Tensor& t) {
    std::vector<float> all = t.to_vector(), out;
    for (int32_t i : first) out.push_back(all[i]);
    return out;
  };
  double s = 0;
  for (int i = 0; i < 4; ++i) s += std::sqrt(dist(sub(est.theta(i)), std::vector<float>(7, 0.0f)));
  s /= 4;
  EXPECT_NEAR(est.input_scale(), s, 1e-14);
  EXPECT_NEAR(est.gram()[1 * 4 + 3], matern_reference(dist(sub(est.theta(1)), sub(est.theta(3))) / s, 0.1), 1e-14);
  const std::vector<double> row = est.kernel_row(est.theta(2));
  EXPECT_NEAR(row[0], matern_reference(dist(sub(est.theta(2)), sub(est.theta(0))) / s, 0.1), 1e-14);
  est.fit();
  EXPECT_NE(est.subset(), first);  // a new draw every fit
  // effective_dim >= d means every coordinate.
  o.effective_dim = 50;
  KernelGradientEstimator full(o, 50, Device::cpu());
  fill_path(full, 3);
  full.fit();
  EXPECT_TRUE(full.subset().empty());
}

TEST(KernelGradientEstimator, PartialSumHookReachesFitAndQueries) {
  // A hook that multiplies every partial by 4 acts like a second rank holding 3 more copies of the
  // same slice: squared distances ×4, so r doubles and k(2r; ℓ) = k(r; ℓ/2).
  KernelEstimatorOptions o;
  o.normalize_inputs = false;
  o.lengthscale = 0.8;
  KernelGradientEstimator hooked(o, 50, Device::cpu());
  hooked.set_partial_sum_hook([](std::vector<double>& v) {
    for (double& x : v) x *= 4.0;
  });
  o.lengthscale = 0.4;
  KernelGradientEstimator plain(o, 50, Device::cpu());
  fill_path(hooked, 5);
  fill_path(plain, 5);
  hooked.fit();
  plain.fit();
  for (size_t i = 0; i < 25; ++i) EXPECT_NEAR(hooked.gram()[i], plain.gram()[i], 1e-14) << i;
  Tensor q = plain.theta(2).clone();
  q.data<float>()[0] += 0.1f;
  const std::vector<double> a = hooked.kernel_row(q), b = plain.kernel_row(q);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-14) << i;
}

TEST(KernelGradientEstimator, BadOptionsAndInputsAreErrors) {
  KernelEstimatorOptions o;
  o.lengthscale = 0;
  EXPECT_THROW(KernelGradientEstimator(o, 3, Device::cpu()), Error);
  o = KernelEstimatorOptions();
  o.history = 1;
  EXPECT_THROW(KernelGradientEstimator(o, 3, Device::cpu()), Error);
  KernelGradientEstimator est(KernelEstimatorOptions(), 3, Device::cpu());
  EXPECT_THROW(est.push(flat({1, 2}), flat({1, 2, 3})), Error);
}

}  // namespace
}  // namespace kraken::optim
