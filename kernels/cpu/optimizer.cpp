// CPU optimizer kernels (equations in kernels/optimizer.h).
//
// Thread-count invariance: the index range is cut into fixed blocks of kBlock elements and OpenMP
// hands out whole blocks, so where the compiler's vector body ends and its scalar remainder begins is a
// property of the block, not of the thread count. Sums are accumulated in double: within a block in
// kLanes interleaved lanes combined in a fixed tree (independent chains the compiler can vectorise),
// then the block partials in block order.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/optimizer.h"

namespace kraken::kernels {
namespace {

constexpr int64_t kBlock = 8192;
constexpr int64_t kParallelMin = 1 << 15;  // below this, one thread is faster than waking two
constexpr int kLanes = 8;

int64_t block_count(int64_t n) { return (n + kBlock - 1) / kBlock; }

// Σ_{i ∈ [lo, hi)} term(i) in double, in a fixed order that depends only on lo and hi.
template <typename Term>
double lane_sum(int64_t lo, int64_t hi, const Term& term) {
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] += term(i + k);
  }
  double tail = 0.0;
  for (; i < hi; ++i) tail += term(i);
  return (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))) + tail;
}

// Σ_{i < n} term(i): fixed blocks (threaded), then the block partials in order.
template <typename Term>
double blocked_sum(int64_t n, const Term& term) {
  if (n <= 0) return 0.0;
  const int64_t blocks = block_count(n);
  std::vector<double> partial(static_cast<size_t>(blocks));
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t b = 0; b < blocks; ++b) partial[b] = lane_sum(b * kBlock, std::min(n, (b + 1) * kBlock), term);
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace

void adamw_update_cpu(float* param, const float* grad, float* m, float* v, int64_t n, float lr, float beta1,
                      float beta2, float eps, float weight_decay, int64_t step, float grad_scale) {
  // Scalars once per call, in double, then rounded to f32 (see the header).
  const double t = static_cast<double>(step);
  const float decay = static_cast<float>(1.0 - static_cast<double>(lr) * weight_decay);
  const float step_size = static_cast<float>(lr / (1.0 - std::pow(static_cast<double>(beta1), t)));
  const float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(static_cast<double>(beta2), t)));
  const float one_minus_b1 = 1.0f - beta1, one_minus_b2 = 1.0f - beta2;
  const int64_t blocks = block_count(n);
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      const float g = grad_scale * grad[i];
      const float mi = beta1 * m[i] + one_minus_b1 * g;
      const float vi = beta2 * v[i] + one_minus_b2 * (g * g);
      m[i] = mi;
      v[i] = vi;
      const float denom = std::sqrt(vi) / bc2_sqrt + eps;
      param[i] = param[i] * decay - step_size * (mi / denom);
    }
  }
}

void sgd_update_cpu(float* param, const float* grad, float* velocity, int64_t n, float lr, float momentum,
                    float dampening, bool nesterov, float weight_decay, bool first_step, float grad_scale) {
  const int64_t blocks = block_count(n);
  const float keep = 1.0f - dampening;
  const bool use_momentum = momentum != 0.0f;
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
    if (!use_momentum) {
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) {
        const float g = grad_scale * grad[i];
        const float d = weight_decay != 0.0f ? g + weight_decay * param[i] : g;
        param[i] -= lr * d;
      }
      continue;
    }
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      const float g = grad_scale * grad[i];
      float d = weight_decay != 0.0f ? g + weight_decay * param[i] : g;
      const float buf = first_step ? d : momentum * velocity[i] + keep * d;
      velocity[i] = buf;
      d = nesterov ? d + momentum * buf : buf;
      param[i] -= lr * d;
    }
  }
}

double sum_squares_multi_cpu(const float* const* xs, const int64_t* sizes, int64_t count) {
  double total = 0.0;
  for (int64_t k = 0; k < count; ++k) {
    const float* x = xs[k];
    total += blocked_sum(sizes[k], [x](int64_t i) { return static_cast<double>(x[i]) * x[i]; });
  }
  return total;
}

void squared_distances_cpu(double* out, const float* q, const float* const* rows, int64_t count, int64_t n) {
  if (count <= 0) return;
  const int64_t blocks = n > 0 ? block_count(n) : 0;
  // partial[b·count + r]: block b's share of row r. One pass over the query block serves every row
  // while it is in cache.
  std::vector<double> partial(static_cast<size_t>(blocks * count));
#pragma omp parallel for schedule(static) if (blocks > 1 && n * count > kParallelMin)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
    for (int64_t r = 0; r < count; ++r) {
      const float* row = rows[r];
      // Differences of two floats are exact in double (for the magnitudes parameters take), so the
      // only rounding is in the accumulation.
      partial[b * count + r] = lane_sum(lo, hi, [q, row](int64_t i) {
        const double diff = static_cast<double>(q[i]) - static_cast<double>(row[i]);
        return diff * diff;
      });
    }
  }
  for (int64_t r = 0; r < count; ++r) {
    double total = 0.0;
    for (int64_t b = 0; b < blocks; ++b) total += partial[b * count + r];
    out[r] = total;
  }
}

double squared_distance_indexed_cpu(const float* a, const float* b, const int32_t* idx, int64_t m) {
  return blocked_sum(m, [a, b, idx](int64_t j) {
    const double diff = static_cast<double>(a[idx[j]]) - static_cast<double>(b[idx[j]]);
    return diff * diff;
  });
}

double sum_squares_indexed_cpu(const float* a, const int32_t* idx, int64_t m) {
  return blocked_sum(m, [a, idx](int64_t j) { return static_cast<double>(a[idx[j]]) * a[idx[j]]; });
}

void weighted_sum_rows_cpu(float* out, const float* const* rows, const double* weights, int64_t count, int64_t n) {
  constexpr int64_t kTile = 1024;  // 8 KiB of double accumulators stay in L1 while every row streams by
  const int64_t tiles = (n + kTile - 1) / kTile;
#pragma omp parallel for schedule(static) if (tiles > 1 && n * count > kParallelMin)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t lo = t * kTile, len = std::min(n, lo + kTile) - lo;
    double acc[kTile];
    std::fill(acc, acc + len, 0.0);
    for (int64_t r = 0; r < count; ++r) {
      const float* row = rows[r] + lo;
      const double w = weights[r];
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) acc[i] += w * static_cast<double>(row[i]);
    }
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) out[lo + i] = static_cast<float>(acc[i]);
  }
}

}  // namespace kraken::kernels
