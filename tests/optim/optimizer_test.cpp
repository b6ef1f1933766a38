// SGD and AdamW against their closed-form updates computed in double, weight decay only where a
// parameter asks for it, state checkpointing and copying, and thread-count invariance of the kernels.
//
// Tolerances: the kernels work in f32 (unit roundoff u ≈ 6e-8). One update rounds a handful of times,
// each error at most u·|value| with values of order 1, so three steps stay within ~20u ≈ 1.2e-6 of the
// double reference; 2e-6 absolute is that bound with a small margin, while any wrong term (a missing
// bias correction, decay applied twice, the wrong momentum formula) is off by 1e-3 or more.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>

#include "kernels/optimizer.h"
#include "optim/adamw.h"
#include "optim/sgd.h"

namespace kraken::optim {
namespace {

using runtime::Tensor;

constexpr double kTol = 2e-6;

// Three steps' gradients for a 3-element parameter, chosen with mixed signs and magnitudes.
const std::vector<std::vector<double>> kGrads = {{0.5, -1.5, 2.0}, {-0.25, 0.75, 1.0}, {1.0, 0.1, -3.0}};
const std::vector<double> kInit = {1.0, -0.5, 0.25};

std::vector<float> as_float(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

TEST(AdamW, MatchesClosedFormOverThreeSteps) {
  const double lr = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1;
  Tensor decayed = Tensor::from_vector(as_float(kInit), {3}), plain = Tensor::from_vector(as_float(kInit), {3});
  AdamWOptions o;
  o.weight_decay = static_cast<float>(wd);
  AdamW opt({{"decayed", decayed, true}, {"plain", plain, false}}, o);

  // Reference in double: p ← p(1 − lr·wd); m, v moments; p ← p − lr/(1−β1^t)·m/(√v/√(1−β2^t) + eps).
  std::vector<double> pd = kInit, pp = kInit, m(3, 0.0), v(3, 0.0);
  for (int t = 1; t <= 3; ++t) {
    const std::vector<double>& g = kGrads[t - 1];
    opt.step({Tensor::from_vector(as_float(g), {3}), Tensor::from_vector(as_float(g), {3})}, static_cast<float>(lr));
    for (int i = 0; i < 3; ++i) {
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      const double update = lr / (1 - std::pow(b1, t)) * m[i] / (std::sqrt(v[i]) / std::sqrt(1 - std::pow(b2, t)) + eps);
      pd[i] = pd[i] * (1 - lr * wd) - update;
      pp[i] = pp[i] - update;
    }
    const std::vector<float> got_d = decayed.to_vector(), got_p = plain.to_vector();
    for (int i = 0; i < 3; ++i) {
      EXPECT_NEAR(got_d[i], pd[i], kTol) << "decayed, step " << t << ", element " << i;
      EXPECT_NEAR(got_p[i], pp[i], kTol) << "plain, step " << t << ", element " << i;
    }
  }
  EXPECT_EQ(opt.steps(), 3);
  // The first step of Adam moves every coordinate by lr·sign(g) (m̂/√v̂ = g/|g|): a hand check of the
  // bias corrections independent of the loop above.
  Tensor p = Tensor::from_vector({0.0f, 0.0f}, {2});
  AdamW first({{"p", p, true}}, AdamWOptions{0.9f, 0.999f, 1e-8f, 0.0f});
  first.step({Tensor::from_vector({3.0f, -0.002f}, {2})}, 0.01f);
  EXPECT_NEAR(p.to_vector()[0], -0.01, 1e-8);
  EXPECT_NEAR(p.to_vector()[1], 0.01 * 0.002 / (0.002 + 1e-8), 1e-8);
}

TEST(AdamW, WeightDecayOnlyWhereAsked) {
  // Zero gradients: the Adam part is exactly 0 (m = v = 0 → 0/(0 + eps)), so what moves is decay alone.
  Tensor w = Tensor::from_vector({2.0f, -4.0f}, {2}), b = Tensor::from_vector({2.0f, -4.0f}, {2});
  AdamW opt({{"w", w, true}, {"b", b, false}}, AdamWOptions{0.9f, 0.999f, 1e-8f, 0.5f});
  opt.step({Tensor::zeros({2}), Tensor::zeros({2})}, 0.1f);
  EXPECT_FLOAT_EQ(w.to_vector()[0], 2.0f * (1.0f - 0.05f));
  EXPECT_FLOAT_EQ(w.to_vector()[1], -4.0f * (1.0f - 0.05f));
  EXPECT_EQ(b.to_vector(), (std::vector<float>{2.0f, -4.0f}));
}

struct SgdCase {
  float momentum, dampening, weight_decay;
  bool nesterov;
};

TEST(Sgd, MatchesClosedFormOverThreeSteps) {
  const double lr = 0.05;
  for (const SgdCase c : {SgdCase{0.0f, 0.0f, 0.0f, false}, SgdCase{0.9f, 0.0f, 0.0f, false},
                          SgdCase{0.9f, 0.1f, 0.01f, false}, SgdCase{0.8f, 0.0f, 0.05f, true}}) {
    SCOPED_TRACE(testing::Message() << "momentum " << c.momentum << " dampening " << c.dampening << " wd "
                                    << c.weight_decay << " nesterov " << c.nesterov);
    Tensor decayed = Tensor::from_vector(as_float(kInit), {3}), plain = Tensor::from_vector(as_float(kInit), {3});
    Sgd opt({{"decayed", decayed, true}, {"plain", plain, false}},
            SgdOptions{c.momentum, c.dampening, c.nesterov, c.weight_decay});
    // Reference, PyTorch's SGD in double: d = g + wd·p; b = d on the first step, else μb + (1−τ)d;
    // d = d + μb (nesterov) or b; p −= lr·d.
    std::vector<double> p[2] = {kInit, kInit}, buf[2] = {std::vector<double>(3), std::vector<double>(3)};
    for (int t = 0; t < 3; ++t) {
      const std::vector<double>& g = kGrads[t];
      opt.step({Tensor::from_vector(as_float(g), {3}), Tensor::from_vector(as_float(g), {3})}, static_cast<float>(lr));
      for (int k = 0; k < 2; ++k) {
        const double wd = k == 0 ? c.weight_decay : 0.0;
        for (int i = 0; i < 3; ++i) {
          double d = g[i] + wd * p[k][i];
          if (c.momentum != 0.0f) {
            buf[k][i] = t == 0 ? d : c.momentum * buf[k][i] + (1.0 - c.dampening) * d;
            d = c.nesterov ? d + c.momentum * buf[k][i] : buf[k][i];
          }
          p[k][i] -= lr * d;
        }
      }
      for (int i = 0; i < 3; ++i) {
        EXPECT_NEAR(decayed.to_vector()[i], p[0][i], kTol) << "step " << t << " element " << i;
        EXPECT_NEAR(plain.to_vector()[i], p[1][i], kTol) << "step " << t << " element " << i;
      }
    }
    EXPECT_EQ(opt.state_tensors().size(), c.momentum != 0.0f ? 2u : 0u);
  }
}

TEST(Sgd, NesterovWithoutMomentumIsRejected) {
  Tensor p = Tensor::zeros({2});
  EXPECT_THROW(Sgd({{"p", p, true}}, SgdOptions{0.0f, 0.0f, true, 0.0f}), Error);
}

TEST(Optimizer, StepWithoutArgumentsUsesParameterGrads) {
  Tensor a = Tensor::from_vector({1.0f, 2.0f}, {2}), b = Tensor::from_vector({1.0f, 2.0f}, {2});
  a.set_requires_grad(true);
  a.set_grad(Tensor::from_vector({0.5f, -1.0f}, {2}));
  Sgd by_grad({{"a", a, true}}, SgdOptions());
  Sgd explicit_grads({{"b", b, true}}, SgdOptions());
  by_grad.step(0.1f);
  explicit_grads.step({Tensor::from_vector({0.5f, -1.0f}, {2})}, 0.1f);
  EXPECT_EQ(a.to_vector(), b.to_vector());
}

TEST(Optimizer, MissingOrMisshapenGradientsAreClearErrors) {
  Tensor a = Tensor::zeros({2, 3});
  a.set_requires_grad(true);
  AdamW opt({{"h.0.weight", a, true}}, AdamWOptions());
  try {
    opt.step(0.1f);
    FAIL() << "step without a gradient did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("h.0.weight"), std::string::npos) << e.what();
  }
  try {
    opt.step({Tensor::zeros({3, 2})}, 0.1f);
    FAIL() << "a gradient of the wrong shape did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("(2, 3)"), std::string::npos) << e.what();
  }
  EXPECT_THROW(opt.step({}, 0.1f), Error);
}

TEST(Optimizer, StateRoundTripContinuesBitIdentically) {
  // Run A: 6 steps. Run B: 3 steps, state into a fresh optimizer over a copy of the parameters, 3 more.
  for (const char* name : {"adamw", "sgd"}) {
    SCOPED_TRACE(name);
    OptimizerOptions o;
    o.name = name;
    o.sgd.momentum = 0.9f;
    Tensor pa = Tensor::from_vector(as_float(kInit), {3});
    auto a = make_optimizer(o, {{"p", pa, true}});
    Tensor pb = Tensor::from_vector(as_float(kInit), {3});
    auto b = make_optimizer(o, {{"p", pb, true}});
    for (int t = 0; t < 3; ++t) {
      a->step({Tensor::from_vector(as_float(kGrads[t]), {3})}, 0.1f);
      b->step({Tensor::from_vector(as_float(kGrads[t]), {3})}, 0.1f);
    }
    Tensor pc = pb.clone();
    auto c = make_optimizer(o, {{"p", pc, true}});
    c->load_state(clone_named_tensors(b->state_tensors()), b->state_scalars());
    EXPECT_EQ(c->steps(), 3);
    for (int t = 0; t < 3; ++t) {
      a->step({Tensor::from_vector(as_float(kGrads[2 - t]), {3})}, 0.1f);
      c->step({Tensor::from_vector(as_float(kGrads[2 - t]), {3})}, 0.1f);
    }
    const std::vector<float> va = pa.to_vector(), vc = pc.to_vector();
    EXPECT_EQ(0, std::memcmp(va.data(), vc.data(), va.size() * sizeof(float)));
  }
}

TEST(Optimizer, LoadStateRejectsWrongNamesShapesAndType) {
  Tensor p = Tensor::zeros({4});
  AdamW opt({{"p", p, true}}, AdamWOptions());
  const nlohmann::json scalars = opt.state_scalars();
  auto message = [&](const NamedTensors& t, const nlohmann::json& s) {
    try {
      opt.load_state(t, s);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message({{"exp_avg.p", Tensor::zeros({4})}}, scalars).find("missing tensor 'exp_avg_sq.p'"), std::string::npos);
  EXPECT_NE(message({{"exp_avg.p", Tensor::zeros({4})}, {"exp_avg_sq.p", Tensor::zeros({5})}}, scalars).find("(5,)"),
            std::string::npos);
  EXPECT_NE(message({{"exp_avg.p", Tensor::zeros({4})}, {"exp_avg_sq.p", Tensor::zeros({4})}, {"x", Tensor::zeros({4})}},
                    scalars)
                .find("unexpected tensor 'x'"),
            std::string::npos);
  Sgd sgd({{"p", p, true}}, SgdOptions{0.9f, 0.0f, false, 0.0f});
  EXPECT_NE(message(opt.state_tensors(), sgd.state_scalars()).find("\"sgd\""), std::string::npos);
}

TEST(Optimizer, CloneStepsWithoutTouchingTheOriginalState) {
  Tensor p = Tensor::from_vector(as_float(kInit), {3});
  AdamW opt({{"p", p, true}}, AdamWOptions());
  opt.step({Tensor::from_vector(as_float(kGrads[0]), {3})}, 0.1f);
  const std::vector<float> m_before = opt.state_tensors()[0].second.to_vector();
  auto copy = opt.clone();
  copy->step({Tensor::from_vector(as_float(kGrads[1]), {3})}, 0.1f);
  EXPECT_EQ(opt.state_tensors()[0].second.to_vector(), m_before);
  EXPECT_EQ(opt.steps(), 1);
  EXPECT_EQ(copy->steps(), 2);
  EXPECT_NE(copy->state_tensors()[0].second.to_vector(), m_before);
  EXPECT_EQ(copy->params()[0].param.data_ptr(), p.data_ptr());  // same parameters
}

TEST(Optimizer, FactoryRejectsUnknownNames) {
  OptimizerOptions o;
  o.name = "lion";
  try {
    make_optimizer(o, {});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'lion'"), std::string::npos);
  }
}

// Every kernel, run with 1, 2 and 3 threads over a size that is threaded and not a multiple of any
// block: the outputs must be the same bits.
TEST(OptimizerKernels, BitIdenticalForAnyThreadCount) {
  const int64_t n = 100003;
  std::vector<float> x(n), y(n), z(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::sin(0.001 * i) * 3.0f;
    y[i] = std::cos(0.0007 * i);
    z[i] = 0.5f - static_cast<float>(i % 7) / 7.0f;
  }
  struct Out {
    std::vector<float> adam_p, adam_m, adam_v, sgd_p, sgd_b, wsum;
    double sumsq = 0, dist[2] = {0, 0};
  };
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    Out o;
    o.adam_p = x;
    o.adam_m = z;
    o.adam_v = std::vector<float>(n, 0.25f);
    kernels::adamw_update_cpu(o.adam_p.data(), y.data(), o.adam_m.data(), o.adam_v.data(), n, 0.01f, 0.9f, 0.999f, 1e-8f,
                              0.1f, 5);
    o.sgd_p = x;
    o.sgd_b = z;
    kernels::sgd_update_cpu(o.sgd_p.data(), y.data(), o.sgd_b.data(), n, 0.01f, 0.9f, 0.1f, false, 0.01f, false);
    const float* xs[3] = {x.data(), y.data(), z.data()};
    const int64_t sizes[3] = {n, n - 5, 7};
    o.sumsq = kernels::sum_squares_multi_cpu(xs, sizes, 3);
    const float* rows[2] = {y.data(), z.data()};
    kernels::squared_distances_cpu(o.dist, x.data(), rows, 2, n);
    const double w[3] = {0.3, -1.7, 2.5};
    o.wsum.resize(n);
    kernels::weighted_sum_rows_cpu(o.wsum.data(), xs, w, 3, n);
    return o;
  };
  const int saved = omp_get_max_threads();
  const Out one = run(1);
  for (int threads : {2, 3}) {
    const Out many = run(threads);
    EXPECT_EQ(one.adam_p, many.adam_p) << threads;
    EXPECT_EQ(one.adam_m, many.adam_m) << threads;
    EXPECT_EQ(one.adam_v, many.adam_v) << threads;
    EXPECT_EQ(one.sgd_p, many.sgd_p) << threads;
    EXPECT_EQ(one.sgd_b, many.sgd_b) << threads;
    EXPECT_EQ(one.wsum, many.wsum) << threads;
    EXPECT_EQ(0, std::memcmp(&one.sumsq, &many.sumsq, sizeof(double))) << threads;
    EXPECT_EQ(0, std::memcmp(one.dist, many.dist, sizeof(one.dist))) << threads;
  }
  omp_set_num_threads(saved);
  // And the sums are right: Σ of the three buffers' squares against a plain double loop.
  double ref = 0;
  for (int64_t i = 0; i < n; ++i) ref += static_cast<double>(x[i]) * x[i];
  for (int64_t i = 0; i < n - 5; ++i) ref += static_cast<double>(y[i]) * y[i];
  for (int64_t i = 0; i < 7; ++i) ref += static_cast<double>(z[i]) * z[i];
  EXPECT_NEAR(one.sumsq, ref, 1e-12 * ref);
}

}  // namespace
}  // namespace kraken::optim
