// The OptEx iteration: N = 1 is the base optimizer bit for bit; the in-place walk equals the spec's N
// workers with copied states; the history holds the evaluation points and their gradients; resume is
// bit-exact; rank groups that exchange gradients reproduce the single-process run; ℓ → 0 reduces SGD
// OptEx to SGD (optex.md §7 T4); and OptEx needs fewer sequential iterations than its base optimizer
// on the quadratic and Rosenbrock problems (§7 T5).
#include <gtest/gtest.h>

#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include "optim/adamw.h"
#include "optim/optex.h"
#include "optim/sgd.h"
#include "optim/synthetic.h"

namespace kraken::optim {
namespace {

using runtime::Tensor;

bool same_bits(const Tensor& a, const Tensor& b) {
  const std::vector<float> x = a.to_vector(), y = b.to_vector();
  return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
}

// A small two-tensor model: W (3, 4) with decay, b (4,) without.
std::vector<ParamRef> make_params() {
  std::vector<float> w(12), b(4);
  for (int i = 0; i < 12; ++i) w[i] = std::sin(1.0 + i);
  for (int i = 0; i < 4; ++i) b[i] = std::cos(2.0 + i);
  return {{"w", Tensor::from_vector(w, {3, 4}), true}, {"b", Tensor::from_vector(b, {4}), false}};
}

std::vector<ParamRef> copy_params(const std::vector<ParamRef>& params) {
  std::vector<ParamRef> out = params;
  for (ParamRef& p : out) p.param = p.param.clone();
  return out;
}

// ∇ of ½Σ c_i(θ_i − 1)² plus a term that depends on the micro-batch s and the iteration t: a stand-in
// for stochastic gradients that is a pure function of (θ, t, s), so replicas can recompute it.
std::vector<Tensor> gradient_at(const std::vector<Tensor>& theta, int64_t t, int s) {
  std::vector<Tensor> out;
  int64_t k = 0;
  for (const Tensor& p : theta) {
    std::vector<float> x = p.to_vector(), g(x.size());
    for (size_t i = 0; i < x.size(); ++i, ++k)
      g[i] = static_cast<float>((1.0 + 0.5 * k) * (x[i] - 1.0) + 0.1 * (s + 1) * std::sin(0.7 * k + t));
    out.push_back(Tensor::from_vector(g, p.shape()));
  }
  return out;
}

std::vector<Tensor> tensors_of(const std::vector<ParamRef>& params) {
  std::vector<Tensor> out;
  for (const ParamRef& p : params) out.push_back(p.param);
  return out;
}

// Oracle for an OptEx over `params`: the gradient at the current parameters, iteration t = *counter.
GradientOracle oracle_for(const std::vector<ParamRef>& params, const int64_t* counter) {
  return [params, counter](int s) { return gradient_at(tensors_of(params), *counter, s); };
}

std::unique_ptr<Optimizer> make_base(const std::string& name, std::vector<ParamRef> params) {
  OptimizerOptions o;
  o.name = name;
  o.sgd.momentum = 0.9f;
  o.sgd.weight_decay = 0.01f;
  o.adamw.weight_decay = 0.1f;
  return make_optimizer(o, std::move(params));
}

OptExOptions optex_options(int parallelism) {
  OptExOptions o;
  o.parallelism = parallelism;
  o.estimator.lengthscale = 1.0;
  o.estimator.history = 6;  // small, so evictions happen within a few iterations
  return o;
}

float lr_at(int64_t t) { return 0.05f / (1.0f + 0.1f * static_cast<float>(t)); }

TEST(OptEx, ParallelismOneIsBitIdenticalToTheBaseOptimizer) {
  for (const char* name : {"sgd", "adamw"}) {
    SCOPED_TRACE(name);
    const std::vector<ParamRef> plain = make_params(), wrapped = make_params();
    auto base = make_base(name, plain);
    int64_t t = 0;
    OptEx optex(make_base(name, wrapped), optex_options(1));
    const GradientOracle oracle = oracle_for(wrapped, &t);
    for (t = 0; t < 20; ++t) {
      base->step(gradient_at(tensors_of(plain), t, 0), lr_at(t));
      optex.step(oracle, lr_at(t));
    }
    for (size_t i = 0; i < plain.size(); ++i) EXPECT_TRUE(same_bits(plain[i].param, wrapped[i].param)) << plain[i].name;
    const NamedTensors a = base->state_tensors(), b = optex.base().state_tensors();
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(same_bits(a[i].second, b[i].second)) << a[i].first;
    EXPECT_EQ(optex.estimator().size(), 0);  // N = 1 keeps no history
    EXPECT_EQ(optex.gradient_evaluations(), 20);
  }
}

// An independent rendering of optex.md §3 with explicit workers: each proxy point gets its own copy of
// the parameters and of the base state (through load_state), every worker takes its own true step, and
// the last worker's output is kept.
TEST(OptEx, InPlaceWalkEqualsTheSpecsWorkersWithCopiedStates) {
  const int n_eval = 3;
  const OptExOptions options = optex_options(n_eval);
  for (const char* name : {"sgd", "adamw"}) {
    SCOPED_TRACE(name);
    const std::vector<ParamRef> params = make_params();
    int64_t t = 0;
    OptEx optex(make_base(name, params), options);
    const GradientOracle oracle = oracle_for(params, &t);

    std::vector<ParamRef> ref_params = make_params();
    std::unique_ptr<Optimizer> ref_state = make_base(name, ref_params);
    KernelGradientEstimator est(options.estimator, 16, runtime::Device::cpu(), runtime::Generator(options.seed, 0x0F7E));
    auto flat = [](const std::vector<ParamRef>& ps) {
      std::vector<float> all;
      for (const ParamRef& p : ps) {
        const std::vector<float> v = p.param.to_vector();
        all.insert(all.end(), v.begin(), v.end());
      }
      return Tensor::from_vector(all, {static_cast<int64_t>(all.size())});
    };
    auto unflat = [](const Tensor& f, const std::vector<ParamRef>& like) {
      std::vector<Tensor> out;
      const std::vector<float> v = f.to_vector();
      size_t k = 0;
      for (const ParamRef& p : like) {
        std::vector<float> part(v.begin() + k, v.begin() + k + p.param.numel());
        k += part.size();
        out.push_back(Tensor::from_vector(part, p.param.shape()));
      }
      return out;
    };
    // A worker: its own parameters and a copy of a base state.
    struct Worker {
      std::vector<ParamRef> params;
      std::unique_ptr<Optimizer> opt;
    };
    auto copy_worker = [&](const std::vector<ParamRef>& from_params, const Optimizer& from_state) {
      Worker w{copy_params(from_params), nullptr};
      w.opt = make_base(name, w.params);
      w.opt->load_state(clone_named_tensors(from_state.state_tensors()), from_state.state_scalars());
      return w;
    };

    for (t = 0; t < 8; ++t) {
      optex.step(oracle, lr_at(t));

      est.fit();
      std::vector<Worker> workers;
      workers.push_back(copy_worker(ref_params, *ref_state));  // θ^(0), S^(0)
      for (int s = 1; s < n_eval; ++s) {
        Worker next = copy_worker(workers.back().params, *workers.back().opt);
        Tensor mu = Tensor::zeros({16});
        est.predict(flat(workers.back().params), mu);
        next.opt->step(unflat(mu, next.params), lr_at(t));  // θ^(s), S^(s) = OPT(θ^(s−1), S^(s−1), μ)
        workers.push_back(std::move(next));
      }
      std::vector<std::pair<Tensor, Tensor>> pairs;
      for (int s = 0; s < n_eval; ++s) {
        const std::vector<Tensor> g = gradient_at(tensors_of(workers[s].params), t, s);
        std::vector<float> gf;
        for (const Tensor& x : g) {
          const std::vector<float> v = x.to_vector();
          gf.insert(gf.end(), v.begin(), v.end());
        }
        pairs.emplace_back(flat(workers[s].params), Tensor::from_vector(gf, {16}));
        workers[s].opt->step(g, lr_at(t));  // every worker's true step
      }
      // θ_t, S_t = the last worker's output.
      for (size_t i = 0; i < ref_params.size(); ++i) ref_params[i].param.copy_from(workers.back().params[i].param);
      ref_state->load_state(clone_named_tensors(workers.back().opt->state_tensors()), workers.back().opt->state_scalars());
      for (auto& [x, g] : pairs) est.push(x, g);

      for (size_t i = 0; i < params.size(); ++i)
        ASSERT_TRUE(same_bits(params[i].param, ref_params[i].param)) << "iteration " << t << " " << params[i].name;
    }
    EXPECT_EQ(optex.base().steps(), 8 * n_eval);  // N base steps per sequential iteration
    const NamedTensors a = optex.base().state_tensors(), b = ref_state->state_tensors();
    for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(same_bits(a[i].second, b[i].second)) << a[i].first;
  }
}

TEST(OptEx, HistoryHoldsTheEvaluationPointsAndTheirGradients) {
  const std::vector<ParamRef> params = make_params();
  OptEx optex(make_base("adamw", params), optex_options(3));
  std::vector<std::vector<float>> seen_points, seen_grads;
  int64_t t = 0;
  const GradientOracle oracle = [&](int s) {
    std::vector<float> x;
    for (const ParamRef& p : params) {
      const std::vector<float> v = p.param.to_vector();
      x.insert(x.end(), v.begin(), v.end());
    }
    seen_points.push_back(x);
    std::vector<Tensor> g = gradient_at(tensors_of(params), t, s);
    std::vector<float> gf;
    for (const Tensor& y : g) {
      const std::vector<float> v = y.to_vector();
      gf.insert(gf.end(), v.begin(), v.end());
    }
    seen_grads.push_back(gf);
    return g;
  };
  for (t = 0; t < 2; ++t) optex.step(oracle, 0.05f);
  ASSERT_EQ(optex.estimator().size(), 6);
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(optex.estimator().theta(i).to_vector(), seen_points[i]) << i;
    EXPECT_EQ(optex.estimator().grad(i).to_vector(), seen_grads[i]) << i;
  }
  // The second iteration's points moved along the proxy path (μ ≠ 0 once two pairs exist).
  EXPECT_NE(seen_points[3], seen_points[4]);
}

TEST(OptEx, ReportCountsIterationsEvaluationsAndEstimatorError) {
  const std::vector<ParamRef> params = make_params();
  OptEx optex(make_base("sgd", params), optex_options(4));
  int64_t t = 0;
  const GradientOracle oracle = oracle_for(params, &t);
  OptExReport first = optex.step(oracle, 0.05f);
  EXPECT_EQ(first.iteration, 1);
  EXPECT_EQ(first.gradient_evaluations, 4);
  EXPECT_EQ(first.history_size, 0);
  for (double e : first.proxy_relative_error) EXPECT_TRUE(std::isnan(e));  // μ ≡ 0: nothing to measure

  // Refit a copy of the history as it stands, then check the report's numbers against it.
  KernelGradientEstimator copy(optex_options(4).estimator, 16, runtime::Device::cpu());
  for (int i = 0; i < optex.estimator().size(); ++i)
    copy.push(optex.estimator().theta(i).clone(), optex.estimator().grad(i).clone());
  copy.fit();
  t = 1;
  const OptExReport second = optex.step(oracle, 0.05f);
  EXPECT_EQ(second.iteration, 2);
  EXPECT_EQ(second.gradient_evaluations, 8);
  EXPECT_EQ(second.history_size, 4);
  ASSERT_EQ(optex.estimator().size(), 6);  // T0 = 6: the last 6 of 8 pairs
  for (int s = 0; s < 4; ++s) {
    const Tensor point = optex.estimator().theta(2 + s), g = optex.estimator().grad(2 + s);
    Tensor mu = Tensor::zeros({16});
    copy.predict(point, mu);
    const std::vector<float> m = mu.to_vector(), gv = g.to_vector();
    double diff = 0, norm = 0, mu_norm = 0, dot = 0;
    for (int i = 0; i < 16; ++i) {
      diff += (static_cast<double>(m[i]) - gv[i]) * (static_cast<double>(m[i]) - gv[i]);
      norm += static_cast<double>(gv[i]) * gv[i];
      mu_norm += static_cast<double>(m[i]) * m[i];
      dot += static_cast<double>(m[i]) * gv[i];
    }
    EXPECT_NEAR(second.proxy_relative_error[s], std::sqrt(diff / norm), 1e-12) << s;
    EXPECT_NEAR(second.proxy_cosine[s], dot / std::sqrt(mu_norm * norm), 1e-12) << s;
  }
  EXPECT_GE(second.seconds_total, second.seconds_outside_gradients());
  EXPECT_GE(second.seconds_outside_gradients(), second.seconds_fit);
  EXPECT_GE(second.seconds_gradients, 0.0);
  EXPECT_EQ(optex_device_bytes(1000, OptExOptions()), 2 * 50 * 1000 * 4 + 9 * 1000 * 4);
  EXPECT_EQ(optex_device_bytes(1000, optex_options(1)), 0);
}

// Runs `iterations` iterations of OptEx over `params` starting at iteration `t0`.
void run(OptEx& optex, const std::vector<ParamRef>& params, int64_t t0, int64_t iterations) {
  int64_t t = t0;
  const GradientOracle oracle = oracle_for(params, &t);
  for (; t < t0 + iterations; ++t) optex.step(oracle, lr_at(t));
}

TEST(OptEx, ResumeIsBitExact) {
  for (const char* name : {"sgd", "adamw"}) {
    SCOPED_TRACE(name);
    OptExOptions options = optex_options(4);
    options.estimator.effective_dim = 9;  // the generator's state matters too
    const std::vector<ParamRef> straight = make_params();
    OptEx a(make_base(name, straight), options);
    run(a, straight, 0, 20);

    const std::vector<ParamRef> first = make_params();
    OptEx b(make_base(name, first), options);
    run(b, first, 0, 10);
    // What a checkpoint keeps: tensor copies and the scalars as JSON text.
    const NamedTensors saved = clone_named_tensors(b.state_tensors());
    const std::string scalars = b.state_scalars().dump();
    const std::vector<ParamRef> resumed = copy_params(first);
    OptEx c(make_base(name, resumed), options);
    c.load_state(saved, nlohmann::json::parse(scalars));
    EXPECT_EQ(c.iterations(), 10);
    run(c, resumed, 10, 10);

    for (size_t i = 0; i < straight.size(); ++i) EXPECT_TRUE(same_bits(straight[i].param, resumed[i].param)) << i;
    const NamedTensors sa = a.state_tensors(), sc = c.state_tensors();
    ASSERT_EQ(sa.size(), sc.size());
    for (size_t i = 0; i < sa.size(); ++i) {
      EXPECT_EQ(sa[i].first, sc[i].first);
      EXPECT_TRUE(same_bits(sa[i].second, sc[i].second)) << sa[i].first;
    }
    EXPECT_EQ(a.state_scalars(), c.state_scalars());
  }
}

TEST(OptEx, LoadStateRejectsMismatchedCheckpoints) {
  const std::vector<ParamRef> params = make_params();
  OptEx a(make_base("adamw", params), optex_options(2));
  run(a, params, 0, 3);
  const NamedTensors tensors = a.state_tensors();
  const nlohmann::json scalars = a.state_scalars();
  auto message = [&](OptEx& target, const NamedTensors& t, const nlohmann::json& s) {
    try {
      target.load_state(t, s);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  OptEx b(make_base("adamw", make_params()), optex_options(2));
  NamedTensors missing(tensors.begin(), tensors.end() - 1);  // drops the newest gradient
  EXPECT_NE(message(b, missing, scalars).find("missing its gradient"), std::string::npos);
  nlohmann::json wrong_dim = scalars;
  wrong_dim["dim"] = 17;
  EXPECT_NE(message(b, tensors, wrong_dim).find("17"), std::string::npos);
  OptEx sgd(make_base("sgd", make_params()), optex_options(2));
  EXPECT_NE(message(sgd, tensors, scalars).find("'sgd'"), std::string::npos);
  EXPECT_EQ(b.iterations(), 0);  // nothing changed by the failed loads
  EXPECT_EQ(b.estimator().size(), 0);
}

// Two rank groups simulated by two threads: group 0 owns even s, group 1 odd s; each walks the same
// proxy path, computes its own gradients, and the exchange swaps them. Both must reproduce the
// single-process run bit for bit.
TEST(OptEx, RankGroupsExchangingGradientsReproduceTheSingleProcessRun) {
  const int n_eval = 4;
  const std::vector<ParamRef> single = make_params();
  OptEx reference(make_base("adamw", single), optex_options(n_eval));
  run(reference, single, 0, 6);

  std::vector<Tensor> mailbox(n_eval);  // flat gradients posted by their owners
  std::mutex mutex;
  std::condition_variable cv;
  int arrived = 0, generation = 0;
  auto barrier = [&] {
    std::unique_lock<std::mutex> lock(mutex);
    const int gen = generation;
    if (++arrived == 2) {
      arrived = 0;
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return generation != gen; });
    }
  };
  std::vector<std::vector<ParamRef>> group_params = {make_params(), make_params()};
  auto group = [&](int rank) {
    OptExHooks hooks;
    hooks.owned = [rank](int s) { return s % 2 == rank; };
    hooks.exchange = [&, rank](std::vector<Tensor>& grads, const std::vector<bool>& owned) {
      for (int s = 0; s < n_eval; ++s)
        if (owned[s]) mailbox[s] = grads[s].clone();
      barrier();
      for (int s = 0; s < n_eval; ++s)
        if (!owned[s]) grads[s].copy_from(mailbox[s]);
      barrier();  // nobody posts the next iteration's gradients before everyone has read these
    };
    OptEx optex(make_base("adamw", group_params[rank]), optex_options(n_eval), hooks);
    run(optex, group_params[rank], 0, 6);
  };
  std::thread t0(group, 0), t1(group, 1);
  t0.join();
  t1.join();
  for (int rank = 0; rank < 2; ++rank)
    for (size_t i = 0; i < single.size(); ++i)
      EXPECT_TRUE(same_bits(single[i].param, group_params[rank][i].param)) << "group " << rank << " " << single[i].name;
}

TEST(OptEx, VanishingLengthscaleReducesSgdOptExToSgd) {
  // optex.md §7 T4: with ℓ → 0 the kernel vanishes away from the history points, so μ = 0 exactly at
  // every proxy point (none of them is in the history), the SGD proxy steps do not move, and each
  // iteration is one SGD step with the last micro-batch's gradient: on a deterministic objective,
  // exactly SGD.
  SyntheticRun run;
  run.kind = SyntheticKind::Quadratic;
  run.dim = 200;
  run.optimizer = "sgd";
  run.lr = 5e-3f;
  run.iterations = 15;
  run.optex.parallelism = 1;
  const SyntheticTrace sgd = run_synthetic(run);
  run.optex.parallelism = 4;
  run.optex.estimator.lengthscale = 1e-6;
  const SyntheticTrace optex = run_synthetic(run);
  EXPECT_EQ(sgd.gap, optex.gap);
}

// optex.md §7's effective speed-up (d = 1000, θ_0 ~ U(−1, 1), ℓ = 0.1, σ² = 1e-3, T0 = 50, N = 4):
// the target is the gap OptEx reaches after T = 40 sequential iterations; the result is the number of
// sequential iterations the base optimizer needs to reach it, divided by 40.
double speedup_at_n4(SyntheticKind kind, const char* optimizer, float lr) {
  SyntheticRun run;
  run.kind = kind;
  run.dim = 1000;
  run.optimizer = optimizer;
  run.lr = lr;
  run.iterations = 40;
  run.optex.parallelism = 4;
  const SyntheticTrace optex = run_synthetic(run);
  run.optex.parallelism = 1;
  run.iterations = 240;  // room for a speed-up of 6
  const SyntheticTrace vanilla = run_synthetic(run);
  return effective_speedup(vanilla.gap, optex.gap);
}

// Expected ratios: optex.md §7 T5 reports 4.06 (quadratic, Adam), 3.89 (Rosenbrock, Adam) and 2.84
// (quadratic, SGD lr 5e-3); this implementation gives 4.05, 3.93 and 2.83 (seed 0; seeds 0–3 vary by
// less than 0.1). The thresholds sit ~0.4 below, and far above what a broken estimator gives: with
// μ ≡ 0 (ℓ → 0, T4) the same runs score 1.88, 1.83 and 1.00. Above N by a hair is possible (4.05):
// Target (N·T base steps) bounds OptEx only approximately, since the proxy steps also advance Adam's
// bias corrections; 4.5 is a sanity bound.
TEST(OptEx, NeedsFewerSequentialIterationsThanAdamOnTheQuadratic) {
  const double speedup = speedup_at_n4(SyntheticKind::Quadratic, "adam", 0.01f);
  EXPECT_GE(speedup, 3.6);
  EXPECT_LE(speedup, 4.5);
}

TEST(OptEx, NeedsFewerSequentialIterationsThanAdamOnRosenbrock) {
  const double speedup = speedup_at_n4(SyntheticKind::Rosenbrock, "adam", 0.01f);
  EXPECT_GE(speedup, 3.5);
  EXPECT_LE(speedup, 4.5);
}

TEST(OptEx, NeedsFewerSequentialIterationsThanSgdOnTheQuadratic) {
  const double speedup = speedup_at_n4(SyntheticKind::Quadratic, "sgd", 5e-3f);
  EXPECT_GE(speedup, 2.4);
  EXPECT_LE(speedup, 4.0);
}

TEST(OptEx, BadOptionsAreErrors) {
  OptExOptions o = optex_options(0);
  EXPECT_THROW(OptEx(make_base("sgd", make_params()), o), Error);
  OptEx optex(make_base("sgd", make_params()), optex_options(2));
  const GradientOracle wrong = [](int) { return std::vector<Tensor>{Tensor::zeros({3, 4})}; };
  try {
    optex.step(wrong, 0.1f);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("1 tensors for 2 parameters"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kraken::optim
