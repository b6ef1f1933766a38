// The OptEx iteration (design and equations in optim/optex.h).
#include "optim/optex.h"

#include <chrono>
#include <cmath>
#include <limits>
#include <string>

#include "kernels/error.h"
#include "optim/reductions.h"

namespace kraken::optim {

using runtime::DType;
using runtime::Tensor;

namespace {

constexpr uint64_t kEstimatorStream = 0x0F7E;  // the estimator's Philox stream ("optex")
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

runtime::Device common_device(const Optimizer& base) {
  const auto& params = base.params();
  if (params.empty()) KRAKEN_THROW("optex: the base optimizer has no parameters");
  const runtime::Device device = params[0].param.device();
  for (const ParamRef& p : params)
    if (p.param.device() != device)
      KRAKEN_THROW("optex: parameter '", p.name, "' is on ", p.param.device().str(), " and '", params[0].name,
                   "' on ", device.str(), "; the history needs every parameter on one device");
  return device;
}

int64_t total_numel(const Optimizer& base) {
  int64_t d = 0;
  for (const ParamRef& p : base.params()) d += p.param.numel();
  return d;
}

int64_t json_int(const nlohmann::json& j, const char* key, const char* who) {
  const auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer())
    KRAKEN_THROW(who, ": '", key, "' must be an integer, got ", it == j.end() ? std::string("nothing") : it->dump());
  return it->get<int64_t>();
}

}  // namespace

void OptExOptions::validate() const {
  if (parallelism < 1) KRAKEN_THROW("optex: parallelism must be >= 1, got ", parallelism);
  estimator.validate();
}

int64_t optex_device_bytes(int64_t dim, const OptExOptions& options) {
  if (options.parallelism <= 1) return 0;  // N = 1 keeps nothing
  return KernelGradientEstimator::history_bytes(dim, options.estimator.history) +
         (2 * static_cast<int64_t>(options.parallelism) + 1) * dim * static_cast<int64_t>(sizeof(float));
}

namespace {
double finite_mean(const std::vector<double>& values) {
  double sum = 0.0;
  int count = 0;
  for (double e : values)
    if (std::isfinite(e)) sum += e, ++count;
  return count ? sum / count : kNaN;
}
}  // namespace

double OptExReport::mean_relative_error() const { return finite_mean(proxy_relative_error); }
double OptExReport::mean_cosine() const { return finite_mean(proxy_cosine); }

OptEx::OptEx(std::unique_ptr<Optimizer> base, const OptExOptions& options, OptExHooks hooks)
    : base_(std::move(base)),
      options_(options),
      hooks_(std::move(hooks)),
      device_(common_device(*base_)),
      dim_(total_numel(*base_)),
      estimator_(options.estimator, dim_, device_, runtime::Generator(options.seed, kEstimatorStream)) {
  options_.validate();
  int64_t offset = 0;
  for (const ParamRef& p : base_->params()) {
    offsets_.push_back(offset);
    offset += p.param.numel();
  }
  estimator_.set_partial_sum_hook(hooks_.reduce_partials);
  points_.resize(options_.parallelism);
  grads_.resize(options_.parallelism);
}

std::vector<Tensor> OptEx::views(const Tensor& flat) const {
  std::vector<Tensor> out;
  const auto& params = base_->params();
  for (size_t i = 0; i < params.size(); ++i)
    out.push_back(Tensor::from_storage(flat.impl()->storage, flat.impl()->offset + offsets_[i], params[i].param.shape(),
                                       DType::F32));
  return out;
}

Tensor OptEx::new_flat() {
  if (!spare_.empty()) {
    Tensor t = spare_.back();
    spare_.pop_back();
    return t;
  }
  return Tensor::empty({dim_}, DType::F32, device_);
}

void OptEx::copy_into(const Tensor& flat, const std::vector<Tensor>& parts) const {
  const auto& params = base_->params();
  if (parts.size() != params.size())
    KRAKEN_THROW("optex: the gradient oracle returned ", parts.size(), " tensors for ", params.size(), " parameters");
  std::vector<Tensor> dst = views(flat);
  for (size_t i = 0; i < parts.size(); ++i) {
    if (!parts[i].defined() || parts[i].shape() != params[i].param.shape() || parts[i].dtype() != DType::F32)
      KRAKEN_THROW("optex: the gradient oracle's tensor for '", params[i].name, "' is ",
                   parts[i].defined() ? parts[i].describe() : std::string("undefined"), ", expected ",
                   params[i].param.describe());
    dst[i].copy_from(parts[i]);
  }
}

void OptEx::copy_params_into(const Tensor& flat) const {
  std::vector<Tensor> dst = views(flat);
  const auto& params = base_->params();
  for (size_t i = 0; i < params.size(); ++i) dst[i].copy_from(params[i].param);
}

void OptEx::measure_error(const Tensor& mu, const Tensor& g, int s, OptExReport& report) {
  // ‖μ − g‖², ‖g‖², ‖μ‖² (partial sums on a model-parallel rank, hence the hook), then
  // cos = (‖μ‖² + ‖g‖² − ‖μ − g‖²)/(2‖μ‖‖g‖): the expansion loses digits only when the cosine is within
  // ~1e-12 of 1, far below what this report resolves.
  std::vector<double> sums = {estimator_.counted_squared_distances(mu, {g})[0], estimator_.counted_sum_squares(g),
                              estimator_.counted_sum_squares(mu)};
  if (hooks_.reduce_partials) hooks_.reduce_partials(sums);
  const double diff2 = sums[0], g2 = sums[1], mu2 = sums[2];
  report.proxy_relative_error[s] = g2 > 0.0 ? std::sqrt(diff2 / g2) : kNaN;
  report.proxy_cosine[s] = g2 > 0.0 && mu2 > 0.0 ? (mu2 + g2 - diff2) / (2.0 * std::sqrt(mu2 * g2)) : kNaN;
}

OptExReport OptEx::step(const GradientOracle& oracle, float lr) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  const int n_eval = options_.parallelism;
  OptExReport report;
  report.parallelism = n_eval;
  report.proxy_relative_error.assign(n_eval, kNaN);
  report.proxy_cosine.assign(n_eval, kNaN);

  if (n_eval == 1) {
    // Exactly the base optimizer: the oracle's gradients go straight to its step.
    Clock::time_point t = Clock::now();
    const std::vector<Tensor> grads = oracle(0);
    report.seconds_gradients = seconds_since(t);
    t = Clock::now();
    base_->step(grads, lr);
    report.seconds_update = seconds_since(t);
  } else {
    Clock::time_point t = Clock::now();
    estimator_.fit();
    report.history_size = estimator_.fitted_size();
    report.seconds_fit = seconds_since(t);

    std::vector<bool> owned(n_eval);
    for (int s = 0; s < n_eval; ++s) {
      t = Clock::now();
      if (!points_[s].defined()) points_[s] = new_flat();
      if (!grads_[s].defined()) grads_[s] = new_flat();
      if (!proxy_.defined()) proxy_ = new_flat();
      copy_params_into(points_[s]);  // θ^(s)
      owned[s] = !hooks_.owned || hooks_.owned(s);
      report.seconds_proxy += seconds_since(t);
      if (owned[s]) {
        t = Clock::now();
        const std::vector<Tensor> parts = oracle(s);  // ∇f(θ^(s); ξ_s)
        report.seconds_gradients += seconds_since(t);
        t = Clock::now();
        copy_into(grads_[s], parts);
        report.seconds_proxy += seconds_since(t);
      }
      if (s == n_eval - 1) break;
      t = Clock::now();
      const bool defined = estimator_.predict(points_[s], proxy_);  // μ(θ^(s)), zero below two pairs
      if (defined && owned[s]) measure_error(proxy_, grads_[s], s, report);
      base_->step(views(proxy_), lr);  // θ^(s+1), S^(s+1)
      report.seconds_proxy += seconds_since(t);
    }

    bool all_owned = true;
    for (bool o : owned) all_owned = all_owned && o;
    if (!all_owned) {
      if (!hooks_.exchange) KRAKEN_THROW("optex: some evaluations belong to other groups but no exchange is set");
      t = Clock::now();
      hooks_.exchange(grads_, owned);
      report.seconds_exchange = seconds_since(t);
    }

    const int last = n_eval - 1;
    if (options_.measure_last_point && estimator_.defined() && owned[last]) {
      t = Clock::now();
      estimator_.predict(points_[last], proxy_);
      measure_error(proxy_, grads_[last], last, report);
      report.seconds_proxy += seconds_since(t);
    }

    t = Clock::now();
    base_->step(views(grads_[last]), lr);  // θ_t, S_t = OPT(θ^(N−1), S^(N−1), g_{N−1})
    for (int s = 0; s < n_eval; ++s) {
      auto evicted = estimator_.push(points_[s], grads_[s]);
      points_[s] = Tensor();
      grads_[s] = Tensor();
      if (evicted) {
        spare_.push_back(evicted->first);
        spare_.push_back(evicted->second);
      }
    }
    report.seconds_update = seconds_since(t);
  }

  ++iterations_;
  evaluations_ += n_eval;
  report.iteration = iterations_;
  report.gradient_evaluations = evaluations_;
  report.seconds_total = seconds_since(start);
  return report;
}

NamedTensors OptEx::state_tensors() const {
  NamedTensors out;
  for (const auto& [name, t] : base_->state_tensors()) out.emplace_back("base." + name, t);
  for (int64_t i = 0; i < estimator_.size(); ++i) {
    out.emplace_back("optex.theta." + std::to_string(i), estimator_.theta(i));
    out.emplace_back("optex.grad." + std::to_string(i), estimator_.grad(i));
  }
  return out;
}

nlohmann::json OptEx::state_scalars() const {
  const runtime::RngState& rng = estimator_.generator().state();
  const KernelEstimatorOptions& e = options_.estimator;
  return {{"type", "optex"},
          {"iterations", iterations_},
          {"gradient_evaluations", evaluations_},
          {"parallelism", options_.parallelism},
          {"dim", dim_},
          {"history_size", estimator_.size()},
          {"rng", {{"seed", rng.seed}, {"stream", rng.stream}, {"offset", rng.offset}}},
          {"estimator",
           {{"history", e.history},
            {"lengthscale", e.lengthscale},
            {"noise", e.noise},
            {"normalize_inputs", e.normalize_inputs},
            {"effective_dim", e.effective_dim}}},
          {"base", base_->state_scalars()}};
}

void OptEx::load_state(const NamedTensors& tensors, const nlohmann::json& scalars) {
  const char* who = "optex state";
  if (!scalars.is_object() || scalars.value("type", std::string()) != "optex")
    KRAKEN_THROW(who, ": the checkpoint does not hold OptEx state (type ",
                 scalars.is_object() && scalars.contains("type") ? scalars["type"].dump() : std::string("missing"), ")");
  const int64_t dim = json_int(scalars, "dim", who);
  if (dim != dim_) KRAKEN_THROW(who, ": the checkpoint's history has ", dim, " parameters per point, this model ", dim_);
  const int64_t count = json_int(scalars, "history_size", who);
  const int64_t iterations = json_int(scalars, "iterations", who);
  const int64_t evaluations = json_int(scalars, "gradient_evaluations", who);
  if (count < 0 || iterations < 0 || evaluations < 0) KRAKEN_THROW(who, ": negative counters");
  if (!scalars.contains("rng") || !scalars.contains("base")) KRAKEN_THROW(who, ": 'rng' or 'base' is missing");
  runtime::RngState rng;
  const nlohmann::json& rng_json = scalars["rng"];
  for (const char* key : {"seed", "stream", "offset"})
    if (!rng_json.is_object() || !rng_json.contains(key) || !rng_json[key].is_number_unsigned())
      KRAKEN_THROW(who, ": rng.", key, " must be an unsigned integer");
  rng.seed = rng_json["seed"].get<uint64_t>();
  rng.stream = rng_json["stream"].get<uint64_t>();
  rng.offset = rng_json["offset"].get<uint64_t>();

  // Sort the tensors and check the history before anything changes.
  NamedTensors base_tensors;
  std::vector<Tensor> thetas(static_cast<size_t>(count)), grads(static_cast<size_t>(count));
  for (const auto& [name, t] : tensors) {
    if (name.rfind("base.", 0) == 0) {
      base_tensors.emplace_back(name.substr(5), t);
      continue;
    }
    const bool is_theta = name.rfind("optex.theta.", 0) == 0, is_grad = name.rfind("optex.grad.", 0) == 0;
    if (!is_theta && !is_grad) KRAKEN_THROW(who, ": unexpected tensor '", name, "'");
    const std::string index = name.substr(is_theta ? 12 : 11);
    if (index.empty() || index.find_first_not_of("0123456789") != std::string::npos)
      KRAKEN_THROW(who, ": bad history tensor name '", name, "'");
    const int64_t i = std::stoll(index);
    if (i >= count) KRAKEN_THROW(who, ": '", name, "' is beyond the history size ", count);
    if (!t.defined() || t.dtype() != DType::F32 || t.shape() != runtime::Shape{dim_})
      KRAKEN_THROW(who, ": '", name, "' is ", t.defined() ? t.describe() : std::string("undefined"), ", expected f32 (",
                   dim_, ")");
    Tensor& slot = is_theta ? thetas[i] : grads[i];
    if (slot.defined()) KRAKEN_THROW(who, ": '", name, "' is given twice");
    slot = t;
  }
  for (int64_t i = 0; i < count; ++i)
    if (!thetas[i].defined() || !grads[i].defined())
      KRAKEN_THROW(who, ": history pair ", i, " of ", count, " is missing its ", thetas[i].defined() ? "gradient" : "point");

  base_->load_state(base_tensors, scalars["base"]);  // validates fully before changing anything

  estimator_.clear();
  spare_.clear();
  for (int s = 0; s < options_.parallelism; ++s) points_[s] = grads_[s] = Tensor();
  // A smaller configured history keeps the most recent pairs.
  for (int64_t i = std::max<int64_t>(0, count - options_.estimator.history); i < count; ++i) {
    Tensor theta = Tensor::empty({dim_}, DType::F32, device_), grad = Tensor::empty({dim_}, DType::F32, device_);
    theta.copy_from(thetas[i]);
    grad.copy_from(grads[i]);
    estimator_.push(theta, grad);
  }
  estimator_.generator().set_state(rng);
  iterations_ = iterations;
  evaluations_ = evaluations;
}

}  // namespace kraken::optim
