// CPU layer normalisation: threaded over rows, each row reduced by one thread in `#pragma omp simd`
// loops. The parameter gradients are summed per fixed block of rows (the blocks depend on `rows`
// only) and the block partials added in block order, so the result is the same for any thread count.
#include "kernels/layernorm.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace kraken::kernels {
namespace {
constexpr int64_t kParallelMin = 1 << 14;  // elements below which waking a second thread costs more
// dgamma/dbeta partials: at most kMaxBlocks blocks of at least kMinBlockRows rows. 32 blocks keep 32
// threads busy while the final sum over blocks stays a few percent of the row work.
constexpr int64_t kMaxBlocks = 32;
constexpr int64_t kMinBlockRows = 32;
}  // namespace

void layernorm_forward_cpu(float* out, float* mean, float* rstd, const float* x, const float* gamma,
                           const float* beta, int64_t rows, int64_t C, float eps) {
  const float inv_c = 1.0f / static_cast<float>(C);
#pragma omp parallel for schedule(static) if (rows * C > kParallelMin && rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * C;
    float* outr = out + r * C;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < C; ++c) sum += xr[c];
    const float mu = sum * inv_c;
    // Two passes (the row is in L1 by now): Σ(x − μ)² does not cancel like Σx² − Cμ² would.
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int64_t c = 0; c < C; ++c) {
      const float d = xr[c] - mu;
      sq += d * d;
    }
    const float rs = 1.0f / std::sqrt(sq * inv_c + eps);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) outr[c] = (xr[c] - mu) * rs * gamma[c] + beta[c];
    if (mean) mean[r] = mu;
    if (rstd) rstd[r] = rs;
  }
}

namespace {

// dx for one row (see the header): g = dout ∘ gamma, dx += rstd·(g − mean(g) − x̂·mean(g ∘ x̂)).
inline void row_dx(float* dxr, const float* doutr, const float* xr, const float* gamma, float mu, float rs,
                   int64_t C) {
  float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
  for (int64_t c = 0; c < C; ++c) {
    const float g = doutr[c] * gamma[c];
    sum_g += g;
    sum_gx += g * (xr[c] - mu) * rs;
  }
  const float inv_c = 1.0f / static_cast<float>(C);
  const float mean_g = sum_g * inv_c, mean_gx = sum_gx * inv_c;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float xhat = (xr[c] - mu) * rs;
    dxr[c] += rs * (doutr[c] * gamma[c] - mean_g - xhat * mean_gx);
  }
}

}  // namespace

void layernorm_backward_cpu(float* dx, float* dgamma, float* dbeta, const float* dout, const float* x,
                            const float* gamma, const float* mean, const float* rstd, int64_t rows, int64_t C) {
  // in the forward pass this was: out = x̂·gamma + beta, x̂ = (x − μ)·rstd
  if (!dgamma && !dbeta) {
    if (!dx) return;
#pragma omp parallel for schedule(static) if (rows * C > kParallelMin && rows > 1)
    for (int64_t r = 0; r < rows; ++r)
      row_dx(dx + r * C, dout + r * C, x + r * C, gamma, mean[r], rstd[r], C);
    return;
  }

  const int64_t blocks = std::max<int64_t>(1, std::min(kMaxBlocks, rows / kMinBlockRows));
  const int64_t block_rows = (rows + blocks - 1) / blocks;
  // partial[b] holds block b's Σ dout∘x̂ (first C) and Σ dout (next C).
  std::vector<float> partial(static_cast<size_t>(blocks * 2 * C), 0.0f);
#pragma omp parallel for schedule(static) if (rows * C > kParallelMin && blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    float* pg = partial.data() + b * 2 * C;
    float* pb = pg + C;
    const int64_t r1 = std::min(rows, (b + 1) * block_rows);
    for (int64_t r = b * block_rows; r < r1; ++r) {
      const float* xr = x + r * C;
      const float* doutr = dout + r * C;
      const float mu = mean[r], rs = rstd[r];
      if (dx) row_dx(dx + r * C, doutr, xr, gamma, mu, rs, C);
      if (dgamma) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) pg[c] += doutr[c] * (xr[c] - mu) * rs;
      }
      if (dbeta) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) pb[c] += doutr[c];
      }
    }
  }
  // Blocks added in block order (a few percent of the work above, so one thread does it).
  std::vector<float> sum(static_cast<size_t>(2 * C), 0.0f);
  for (int64_t b = 0; b < blocks; ++b) {
    const float* pb = partial.data() + b * 2 * C;
    float* s = sum.data();
#pragma omp simd
    for (int64_t c = 0; c < 2 * C; ++c) s[c] += pb[c];
  }
  if (dgamma) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) dgamma[c] += sum[static_cast<size_t>(c)];
  }
  if (dbeta) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) dbeta[c] += sum[static_cast<size_t>(C + c)];
  }
}

}  // namespace kraken::kernels
