// The exact pipeline partition (partition.h explains the method).
#include "parallel/planner/partition.h"

#include <algorithm>
#include <cmath>
#include <deque>

#include "kernels/error.h"

namespace kraken::parallel::planner {
namespace {

bool cut_allowed(const PipelineProblem& p, int layer) { return p.cut_allowed.empty() || p.cut_allowed[layer]; }

std::vector<double> prefix(const std::vector<double>& v) {
  std::vector<double> p(v.size() + 1, 0.0);
  for (size_t i = 0; i < v.size(); ++i) p[i + 1] = p[i] + v[i];
  return p;
}

class Solver {
 public:
  explicit Solver(const PipelineProblem& p) : p_(p), L_(p.layers), S_(p.stages) {
    KRAKEN_CHECK(S_ >= 1 && L_ >= S_, "stages=", S_, " layers=", L_);
    KRAKEN_CHECK(int(p.stage_class.size()) == S_);
    for (const auto& t : p.class_time) time_prefix_.push_back(prefix(t));
    if (p.memory_limited) {
      for (const auto& s : p.class_static) static_prefix_.push_back(prefix(s));
      for (const auto& a : p.class_activation) activation_prefix_.push_back(prefix(a));
    }
    choice_.assign(S_, std::vector<int>(L_ + 1, -1));
    f_prev_.assign(L_ + 1, kInfinity);
    f_cur_.assign(L_ + 1, kInfinity);
  }

  double time(int j, int a, int b) const {
    const std::vector<double>& P = time_prefix_[p_.stage_class[j]];
    return P[b] - P[a];
  }

  double memory(int j, int a, int b) const {
    if (!p_.memory_limited) return 0;
    const int c = p_.stage_class[j];
    double m = static_prefix_[c][b] - static_prefix_[c][a] +
               p_.in_flight[j] * (activation_prefix_[c][b] - activation_prefix_[c][a]);
    if (a == 0 && b == L_) m -= p_.class_tied_static[c];  // one stage holds the tied weight once
    return m;
  }

  bool fits(int j, int a, int b) const { return !p_.memory_limited || memory(j, a, b) <= p_.capacity[j]; }

  // g(M): the least Σ τ + Σ boundary with every τ_j ≤ cap and every stage in memory; fills `split`.
  double min_sum(double cap, std::vector<int>* split) {
    ++programs_;
    if (S_ == 1) {
      const bool ok = time(0, 0, L_) <= cap && fits(0, 0, L_);
      if (ok && split) *split = {0, L_};
      return ok ? time(0, 0, L_) : kInfinity;
    }
    std::fill(f_prev_.begin(), f_prev_.end(), kInfinity);
    f_prev_[0] = 0;
    for (int j = 0; j < S_; ++j) {
      const std::vector<double>& P = time_prefix_[p_.stage_class[j]];
      std::fill(f_cur_.begin(), f_cur_.end(), kInfinity);
      // Stage j starts at a ∈ [j, …) (j earlier non-empty stages) and ends at b ≤ L − (S − 1 − j).
      const int b_last = L_ - (S_ - 1 - j);
      std::deque<int> window;  // start layers a, with f_prev[a] − P[a] increasing
      int lo = j, next = j;    // candidates a < next have entered the window
      for (int b = j + 1; b <= b_last; ++b) {
        // Admit a = b − 1, the newest possible start.
        for (; next <= b - 1; ++next) {
          if (f_prev_[next] == kInfinity || (j > 0 && !cut_allowed(p_, next))) continue;
          const double key = f_prev_[next] - P[next];
          while (!window.empty() && f_prev_[window.back()] - P[window.back()] >= key) window.pop_back();
          window.push_back(next);
        }
        // Drop starts whose stage would be too slow or too big; both only grow with b.
        while (lo < b && (P[b] - P[lo] > cap || (p_.memory_limited && memory(j, lo, b) > p_.capacity[j]))) ++lo;
        while (!window.empty() && window.front() < lo) window.pop_front();
        if (window.empty()) continue;
        const int a = window.front();
        const double boundary = j + 1 < S_ ? p_.boundary[j][b - 1] : 0.0;
        f_cur_[b] = f_prev_[a] - P[a] + P[b] + boundary;
        choice_[j][b] = a;
      }
      std::swap(f_prev_, f_cur_);
    }
    const double total = f_prev_[L_];
    if (total < kInfinity && split) {
      split->assign(S_ + 1, 0);
      (*split)[S_] = L_;
      for (int j = S_ - 1, b = L_; j > 0; --j) {
        b = choice_[j][b];
        (*split)[j] = b;
      }
    }
    return total;
  }

  int programs() const { return programs_; }

 private:
  const PipelineProblem& p_;
  int L_, S_;
  std::vector<std::vector<double>> time_prefix_, static_prefix_, activation_prefix_;
  std::vector<std::vector<int>> choice_;
  std::vector<double> f_prev_, f_cur_;
  int programs_ = 0;
};

// (Σ_i the fastest class's τ_i) / S: no split has a smaller bottleneck. (Slightly lowered so that a
// candidate equal to it in exact arithmetic is not lost to rounding.)
double pipeline_lower_bound_per_stage(const PipelineProblem& p) {
  double fastest = 0;
  for (int i = 0; i < p.layers; ++i) {
    double t = kInfinity;
    for (int c : p.stage_class) t = std::min(t, p.class_time[c][i]);
    fastest += t;
  }
  return fastest / p.stages * (1 - 1e-12);
}

}  // namespace

PartitionResult optimal_partition(const PipelineProblem& p, bool keep_alternatives) {
  Solver solver(p);
  PartitionResult result;
  const double B1 = p.micro_batches - 1;

  std::vector<int> split;
  const double g_inf = solver.min_sum(kInfinity, &split);
  if (g_inf == kInfinity) {
    result.programs = solver.programs();
    return result;  // nothing fits, whatever the bottleneck
  }
  auto consider = [&](const std::vector<int>& s) {
    if (keep_alternatives && std::find(result.alternatives.begin(), result.alternatives.end(), s) ==
                                 result.alternatives.end())
      result.alternatives.push_back(s);
  };
  result.feasible = true;
  if (B1 == 0) {
    result.stage_begin = split;
    result.objective = pipeline_objective(p, split);
    result.programs = solver.programs();
    return result;
  }
  consider(split);

  // Every stage time a split can produce is a candidate bottleneck, but only those in [M_min, M_max]
  // matter: below M_min = (Σ_i fastest τ_i) / S nothing is feasible, and above the bottleneck M_max of
  // the split that g(∞) found, g stays g(∞) while (B − 1)·M grows.
  double m_max = 0;
  for (int j = 0; j < p.stages; ++j) m_max = std::max(m_max, solver.time(j, split[j], split[j + 1]));
  const double m_min = pipeline_lower_bound_per_stage(p);
  std::vector<double> values;
  {
    std::vector<int> classes = p.stage_class;
    std::sort(classes.begin(), classes.end());
    classes.erase(std::unique(classes.begin(), classes.end()), classes.end());
    for (int c : classes) {
      const int j = int(std::find(p.stage_class.begin(), p.stage_class.end(), c) - p.stage_class.begin());
      for (int a = 0; a < p.layers; ++a)
        for (int b = a + 1; b <= p.layers; ++b) {
          const double v = solver.time(j, a, b);
          if (v > m_max) break;  // times only grow with b
          if (v >= m_min) values.push_back(v);
        }
    }
    std::sort(values.begin(), values.end());
    values.erase(std::unique(values.begin(), values.end()), values.end());
  }

  // The smallest feasible bottleneck (feasibility only grows with M).
  int lo = 0, hi = int(values.size()) - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (solver.min_sum(values[mid], nullptr) < kInfinity)
      hi = mid;
    else
      lo = mid + 1;
  }
  const int first = lo, last = int(values.size()) - 1;

  double best = kInfinity;
  std::vector<int> best_split;
  std::vector<double> g(values.size(), -1);
  auto eval = [&](int idx) {
    std::vector<int> s;
    g[idx] = solver.min_sum(values[idx], &s);
    KRAKEN_CHECK(g[idx] < kInfinity);
    consider(s);
    const double h = B1 * values[idx] + g[idx];
    if (h < best) {
      best = h;
      best_split = s;
    }
  };
  eval(first);
  if (last != first) eval(last);
  // Halve [l, r] (both ends evaluated) while it may hold a better value than `best`.
  std::vector<std::pair<int, int>> todo = {{first, last}};
  while (!todo.empty()) {
    const auto [l, r] = todo.back();
    todo.pop_back();
    if (r - l <= 1 || g[l] == g[r]) continue;  // nothing inside, or g constant: M = values[l] wins
    if (B1 * values[l + 1] + g[r] >= best) continue;
    const int mid = (l + r) / 2;
    eval(mid);
    todo.push_back({mid, r});
    todo.push_back({l, mid});
  }
  result.stage_begin = best_split;
  result.objective = pipeline_objective(p, best_split);
  result.programs = solver.programs();
  return result;
}

double stage_memory(const PipelineProblem& p, int j, int a, int b) {
  if (!p.memory_limited) return 0;
  const int c = p.stage_class[j];
  double m = 0;
  for (int i = a; i < b; ++i) m += p.class_static[c][i] + p.in_flight[j] * p.class_activation[c][i];
  if (a == 0 && b == p.layers) m -= p.class_tied_static[c];
  return m;
}

double pipeline_objective(const PipelineProblem& p, const std::vector<int>& split) {
  KRAKEN_CHECK(int(split.size()) == p.stages + 1 && split.front() == 0 && split.back() == p.layers);
  double max_t = 0, sum_t = 0, boundary = 0;
  for (int j = 0; j < p.stages; ++j) {
    KRAKEN_CHECK(split[j + 1] > split[j]);
    double t = 0;
    for (int i = split[j]; i < split[j + 1]; ++i) t += p.class_time[p.stage_class[j]][i];
    max_t = std::max(max_t, t);
    sum_t += t;
    if (j > 0 && !cut_allowed(p, split[j])) return kInfinity;
    if (j + 1 < p.stages) boundary += p.boundary[j][split[j + 1] - 1];
    if (p.memory_limited && stage_memory(p, j, split[j], split[j + 1]) > p.capacity[j]) return kInfinity;
  }
  return (p.micro_batches - 1) * max_t + sum_t + boundary;
}

double min_peak_memory(const PipelineProblem& p) {
  KRAKEN_CHECK(p.memory_limited);
  const int L = p.layers, S = p.stages;
  if (S == 1) return stage_memory(p, 0, 0, L);
  std::vector<std::vector<double>> stat, act;
  for (const auto& s : p.class_static) stat.push_back(prefix(s));
  for (const auto& a : p.class_activation) act.push_back(prefix(a));
  std::vector<double> f(L + 1, kInfinity), next(L + 1);
  f[0] = 0;
  for (int j = 0; j < S; ++j) {
    const int c = p.stage_class[j];
    std::fill(next.begin(), next.end(), kInfinity);
    for (int b = j + 1; b <= L - (S - 1 - j); ++b)
      for (int a = j; a < b; ++a) {
        if (f[a] == kInfinity || (j > 0 && !cut_allowed(p, a))) continue;
        const double m = stat[c][b] - stat[c][a] + p.in_flight[j] * (act[c][b] - act[c][a]);
        next[b] = std::min(next[b], std::max(f[a], m));
      }
    std::swap(f, next);
  }
  return f[L];
}

double pipeline_lower_bound(const PipelineProblem& p) {
  double fastest = 0;
  for (int i = 0; i < p.layers; ++i) {
    double t = kInfinity;
    for (int c : p.stage_class) t = std::min(t, p.class_time[c][i]);
    fastest += t;
  }
  // Σ_j τ_j ≥ fastest and max_j τ_j ≥ Σ_j τ_j / S.
  return (p.micro_batches - 1) * fastest / p.stages + fastest;
}

}  // namespace kraken::parallel::planner
