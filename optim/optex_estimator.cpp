// The kernelized gradient estimator (equations and design in optim/optex_estimator.h).
#include "optim/optex_estimator.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <set>

#include "kernels/error.h"
#include "optim/reductions.h"

namespace kraken::optim {

using runtime::DType;
using runtime::Tensor;

void KernelEstimatorOptions::validate() const {
  if (!(lengthscale > 0.0) || !std::isfinite(lengthscale))
    KRAKEN_THROW("optex: lengthscale must be a positive number, got ", lengthscale);
  if (!(noise >= 0.0) || !std::isfinite(noise)) KRAKEN_THROW("optex: noise must be >= 0, got ", noise);
  if (history < 2) KRAKEN_THROW("optex: history must be >= 2 pairs (the estimate needs two), got ", history);
  if (effective_dim < 0) KRAKEN_THROW("optex: effective_dim must be >= 0 (0: all coordinates), got ", effective_dim);
}

double matern52(double r, double lengthscale) {
  const double a = std::sqrt(5.0) * r / lengthscale;  // √5·r/ℓ; a²/3 = 5r²/(3ℓ²)
  return (1.0 + a + a * a / 3.0) * std::exp(-a);
}

void cholesky_factor(std::vector<double>& a, int64_t n, const std::string& what) {
  KRAKEN_CHECK(static_cast<int64_t>(a.size()) == n * n);
  for (int64_t j = 0; j < n; ++j) {
    double pivot = a[j * n + j];
    for (int64_t k = 0; k < j; ++k) pivot -= a[j * n + k] * a[j * n + k];
    // A pivot below n·ε·a_jj is zero within the rounding of the sums that produced it: the matrix is
    // singular to working precision, and the "solution" would be noise amplified by 1/pivot.
    const double floor = static_cast<double>(n) * DBL_EPSILON * std::abs(a[j * n + j]);
    if (!(pivot > floor) || !std::isfinite(pivot))
      KRAKEN_THROW(what, ": the ", n, "×", n, " matrix is not positive definite (Cholesky pivot ", j, " is ", pivot,
                   ", needs > ", floor, ")");
    const double ljj = std::sqrt(pivot);
    a[j * n + j] = ljj;
    for (int64_t i = j + 1; i < n; ++i) {
      double v = a[i * n + j];
      for (int64_t k = 0; k < j; ++k) v -= a[i * n + k] * a[j * n + k];
      a[i * n + j] = v / ljj;
    }
  }
}

void cholesky_solve(const std::vector<double>& l, int64_t n, std::vector<double>& b) {
  KRAKEN_CHECK(static_cast<int64_t>(b.size()) == n);
  for (int64_t i = 0; i < n; ++i) {  // L·y = b
    double v = b[i];
    for (int64_t k = 0; k < i; ++k) v -= l[i * n + k] * b[k];
    b[i] = v / l[i * n + i];
  }
  for (int64_t i = n - 1; i >= 0; --i) {  // Lᵀ·x = y
    double v = b[i];
    for (int64_t k = i + 1; k < n; ++k) v -= l[k * n + i] * b[k];
    b[i] = v / l[i * n + i];
  }
}

KernelGradientEstimator::KernelGradientEstimator(const KernelEstimatorOptions& options, int64_t dim,
                                                 runtime::Device device, runtime::Generator generator)
    : options_(options), dim_(dim), device_(device), generator_(generator) {
  options_.validate();
  if (dim_ <= 0) KRAKEN_THROW("optex: the flat parameter vector is empty");
  if (options_.effective_dim > 0 && options_.effective_dim < dim_ && dim_ > INT32_MAX)
    KRAKEN_THROW("optex: effective_dim needs at most ", INT32_MAX, " parameters (32-bit indices), the model has ", dim_);
}

int64_t KernelGradientEstimator::history_bytes(int64_t dim, int64_t history) {
  return 2 * history * dim * static_cast<int64_t>(sizeof(float));
}

void KernelGradientEstimator::check_flat(const char* what, const Tensor& t) const {
  if (!t.defined() || t.dtype() != DType::F32 || t.numel() != dim_ || t.device() != device_)
    KRAKEN_THROW("optex estimator: ", what, " is ", t.defined() ? t.describe() : std::string("undefined"),
                 ", expected f32 with ", dim_, " elements on ", device_.str());
}

std::optional<std::pair<Tensor, Tensor>> KernelGradientEstimator::push(Tensor theta, Tensor grad) {
  check_flat("θ", theta);
  check_flat("g", grad);
  entries_.push_back({std::move(theta), std::move(grad), next_id_++, -1.0});
  stale_ = true;
  if (static_cast<int64_t>(entries_.size()) <= options_.history) return std::nullopt;
  Entry old = std::move(entries_.front());
  entries_.erase(entries_.begin());
  for (auto it = sq_dist_.begin(); it != sq_dist_.end();) {
    it = (it->first.first == old.id || it->first.second == old.id) ? sq_dist_.erase(it) : std::next(it);
  }
  return std::make_pair(std::move(old.theta), std::move(old.grad));
}

void KernelGradientEstimator::clear() {
  entries_.clear();
  sq_dist_.clear();
  stale_ = true;
  fitted_n_ = 0;
}

const Tensor& KernelGradientEstimator::theta(int64_t i) const {
  KRAKEN_CHECK(i >= 0 && i < size(), "history index ", i);
  return entries_[static_cast<size_t>(i)].theta;
}

const Tensor& KernelGradientEstimator::grad(int64_t i) const {
  KRAKEN_CHECK(i >= 0 && i < size(), "history index ", i);
  return entries_[static_cast<size_t>(i)].grad;
}

void KernelGradientEstimator::set_counted_ranges(std::vector<std::pair<int64_t, int64_t>> ranges) {
  for (const auto& [begin, end] : ranges)
    KRAKEN_CHECK(0 <= begin && begin <= end && end <= dim_, "counted range [", begin, ", ", end, ") of ", dim_);
  if (!ranges.empty() && options_.effective_dim > 0 && options_.effective_dim < dim_)
    KRAKEN_THROW("optex: effective_dim with model parallelism is not supported (each rank would draw its own "
                 "coordinate subset); set effective_dim = 0");
  counted_ = std::move(ranges);
  // Cached norms and distances were taken over other coordinates: drop them (not the history).
  for (Entry& e : entries_) e.sq_norm = -1.0;
  sq_dist_.clear();
  stale_ = true;
}

double KernelGradientEstimator::counted_sum_squares(const Tensor& x) const {
  if (counted_.empty()) return sum_squares({x});
  std::vector<Tensor> parts;
  for (const auto& [begin, end] : counted_) parts.push_back(x.detach().slice(begin, end));
  return sum_squares(parts);
}

std::vector<double> KernelGradientEstimator::counted_squared_distances(const Tensor& x,
                                                                         const std::vector<Tensor>& rows) const {
  if (counted_.empty()) return squared_distances(x, rows);
  std::vector<double> total(rows.size(), 0.0);
  for (const auto& [begin, end] : counted_) {
    std::vector<Tensor> parts;
    for (const Tensor& r : rows) parts.push_back(r.detach().slice(begin, end));
    const std::vector<double> d = squared_distances(x.detach().slice(begin, end), parts);
    for (size_t i = 0; i < d.size(); ++i) total[i] += d[i];
  }
  return total;
}

void KernelGradientEstimator::reduce(std::vector<double>& values) const {
  if (reduce_) reduce_(values);
}

void KernelGradientEstimator::draw_subset() {
  // Floyd's algorithm: m distinct indices of [0, d) from m draws and O(m) memory (a permutation of all
  // d indices would cost 8·d bytes). Sorted, so the distance sums walk memory forward.
  const int64_t m = options_.effective_dim;
  std::set<int64_t> chosen;
  for (int64_t j = dim_ - m; j < dim_; ++j) {
    const int64_t t = static_cast<int64_t>(generator_.next_below(static_cast<uint64_t>(j + 1)));
    if (!chosen.insert(t).second) chosen.insert(j);
  }
  subset_.assign(chosen.begin(), chosen.end());
  subset_index_ = Tensor::from_ints(subset_, {m}, device_);
}

double KernelGradientEstimator::kernel_of_sq_distance(double sq_distance) const {
  return matern52(std::sqrt(std::max(sq_distance, 0.0)) / scale_, options_.lengthscale);
}

void KernelGradientEstimator::fit() {
  const int64_t n = size();
  stale_ = false;
  fitted_n_ = n;
  subset_.clear();
  subset_index_ = Tensor();
  gram_.clear();
  factor_.clear();
  scale_ = 1.0;
  if (n < 2) return;

  const bool use_subset = options_.effective_dim > 0 && options_.effective_dim < dim_;
  std::vector<double> sq_norm(static_cast<size_t>(n));
  std::vector<double> sq_dist(static_cast<size_t>(n * n), 0.0);
  if (use_subset) {
    draw_subset();
    // Everything over the new subset: n norms, then the n(n−1)/2 distances, in one hook call.
    std::vector<double> partial;
    for (int64_t i = 0; i < n; ++i) partial.push_back(squared_distance_indexed(theta(i), Tensor(), subset_index_));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < i; ++j) partial.push_back(squared_distance_indexed(theta(i), theta(j), subset_index_));
    reduce(partial);
    size_t k = 0;
    for (int64_t i = 0; i < n; ++i) sq_norm[i] = partial[k++];
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < i; ++j) sq_dist[i * n + j] = sq_dist[j * n + i] = partial[k++];
  } else {
    // Only what the cache lacks: the norms of new entries, and each new entry against all older ones.
    // partial = [new norms..., new pair distances...], reduced in one hook call.
    std::vector<double> partial, pair_partial;
    std::vector<int64_t> new_norms;
    std::vector<std::pair<int64_t, int64_t>> new_pairs;  // (i, j), j < i
    for (int64_t i = 0; i < n; ++i) {
      if (entries_[i].sq_norm < 0.0) {
        new_norms.push_back(i);
        partial.push_back(counted_sum_squares(theta(i)));
      }
      std::vector<Tensor> rows;
      for (int64_t j = 0; j < i; ++j) {
        if (sq_dist_.count({entries_[j].id, entries_[i].id})) continue;
        rows.push_back(theta(j));
        new_pairs.emplace_back(i, j);
      }
      if (!rows.empty()) {
        const std::vector<double> d = counted_squared_distances(theta(i), rows);
        pair_partial.insert(pair_partial.end(), d.begin(), d.end());
      }
    }
    partial.insert(partial.end(), pair_partial.begin(), pair_partial.end());
    reduce(partial);
    size_t k = 0;
    for (int64_t i : new_norms) entries_[i].sq_norm = partial[k++];
    for (const auto& [i, j] : new_pairs) sq_dist_[{entries_[j].id, entries_[i].id}] = partial[k++];
    for (int64_t i = 0; i < n; ++i) {
      sq_norm[i] = entries_[i].sq_norm;
      for (int64_t j = 0; j < i; ++j) sq_dist[i * n + j] = sq_dist[j * n + i] = sq_dist_.at({entries_[j].id, entries_[i].id});
    }
  }

  if (options_.normalize_inputs) {
    // s = mean_τ ‖θ_τ‖^{1/2}, as the reference code. A history at the origin has no scale: keep 1.
    double s = 0.0;
    for (double v : sq_norm) s += std::sqrt(std::sqrt(v));
    s /= static_cast<double>(n);
    scale_ = (s > 0.0 && std::isfinite(s)) ? s : 1.0;
  }

  gram_.assign(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) gram_[i * n + j] = i == j ? 1.0 : kernel_of_sq_distance(sq_dist[i * n + j]);
    gram_[i * n + i] += options_.noise;
  }
  factor_ = gram_;
  cholesky_factor(factor_, n,
                  detail::error_message("optex estimator: K + σ²I over ", n, " history points (σ² = ", options_.noise,
                                        ", lengthscale ", options_.lengthscale,
                                        "; identical or nearly identical points need σ² > 0: raise optex noise)"));
}

std::vector<double> KernelGradientEstimator::kernel_row(const Tensor& theta) {
  check_flat("the query θ", theta);
  if (stale_) KRAKEN_THROW("optex estimator: the history changed since the last fit(); fit again before querying");
  const int64_t n = fitted_n_;
  std::vector<double> d;
  if (!subset_.empty()) {
    for (int64_t i = 0; i < n; ++i) d.push_back(squared_distance_indexed(theta, this->theta(i), subset_index_));
  } else {
    std::vector<Tensor> rows;
    for (int64_t i = 0; i < n; ++i) rows.push_back(this->theta(i));
    d = counted_squared_distances(theta, rows);
  }
  reduce(d);
  for (double& v : d) v = kernel_of_sq_distance(v);
  return d;
}

std::vector<double> KernelGradientEstimator::weights(const Tensor& theta) {
  std::vector<double> w = kernel_row(theta);
  if (defined()) cholesky_solve(factor_, fitted_n_, w);
  return w;
}

bool KernelGradientEstimator::predict(const Tensor& theta, Tensor& out) {
  check_flat("the output μ", out);
  if (stale_) KRAKEN_THROW("optex estimator: the history changed since the last fit(); fit again before querying");
  if (!defined()) {
    out.zero_();
    return false;
  }
  const std::vector<double> w = weights(theta);
  std::vector<Tensor> rows;
  for (int64_t i = 0; i < fitted_n_; ++i) rows.push_back(grad(i));
  weighted_sum_rows(out, rows, w);
  return true;
}

}  // namespace kraken::optim
