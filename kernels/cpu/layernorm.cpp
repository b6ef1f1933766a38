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
    if (beta) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) outr[c] = (xr[c] - mu) * rs * gamma[c] + beta[c];
    } else {  // a LayerNorm without bias (the paper's Kraken models)
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) outr[c] = (xr[c] - mu) * rs * gamma[c];
    }
    if (mean) mean[r] = mu;
    if (rstd) rstd[r] = rs;
  }
}

namespace {

// Rows [r0, r1) of the backward (see the header), one pass per row after the sums dx needs:
//   g = dout ∘ gamma,  dx = dx_in + rstd·(g − mean(g) − x̂·mean(g ∘ x̂)),  pg += dout ∘ x̂,  pb += dout
// (no dx_in: dx = rstd·(…), dx not read).
// Instantiated for each combination of wanted gradients, so no loop carries a test.
template <bool kDx, bool kGamma, bool kBeta>
void backward_rows(float* dx, const float* dx_in, float* pg, float* pb, const float* dout, const float* x,
                   const float* gamma, const float* mean, const float* rstd, int64_t r0, int64_t r1, int64_t C) {
  const float inv_c = 1.0f / static_cast<float>(C);
  for (int64_t r = r0; r < r1; ++r) {
    const float* doutr = dout + r * C;
    const float* xr = kDx || kGamma ? x + r * C : nullptr;
    const float mu = mean[r], rs = rstd[r];
    float mean_g = 0.0f, mean_gx = 0.0f;
    if constexpr (kDx) {
      float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (int64_t c = 0; c < C; ++c) {
        const float g = doutr[c] * gamma[c];
        sum_g += g;
        sum_gx += g * ((xr[c] - mu) * rs);
      }
      mean_g = sum_g * inv_c;
      mean_gx = sum_gx * inv_c;
    }
    float* dxr = kDx ? dx + r * C : nullptr;
    const float* dinr = kDx && dx_in ? dx_in + r * C : nullptr;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float d = doutr[c];
      if constexpr (kDx || kGamma) {
        const float xhat = (xr[c] - mu) * rs;
        if constexpr (kDx) dxr[c] = (dinr ? dinr[c] : 0.0f) + rs * (d * gamma[c] - mean_g - xhat * mean_gx);
        if constexpr (kGamma) pg[c] += d * xhat;
      }
      if constexpr (kBeta) pb[c] += d;
    }
  }
}

using BackwardRows = void (*)(float*, const float*, float*, float*, const float*, const float*, const float*,
                              const float*, const float*, int64_t, int64_t, int64_t);
// Indexed by dx·4 + dgamma·2 + dbeta.
constexpr BackwardRows kBackwardRows[8] = {
    backward_rows<false, false, false>, backward_rows<false, false, true>, backward_rows<false, true, false>,
    backward_rows<false, true, true>,   backward_rows<true, false, false>, backward_rows<true, false, true>,
    backward_rows<true, true, false>,   backward_rows<true, true, true>};

}  // namespace

void layernorm_backward_cpu(float* dx, const float* dx_in, float* dgamma, float* dbeta, const float* dout,
                            const float* x, const float* gamma, const float* mean, const float* rstd, int64_t rows,
                            int64_t C) {
  // in the forward pass this was: out = x̂·gamma + beta, x̂ = (x − μ)·rstd
  if (!dx && !dgamma && !dbeta) return;
  const BackwardRows run = kBackwardRows[(dx ? 4 : 0) + (dgamma ? 2 : 0) + (dbeta ? 1 : 0)];
  const int64_t blocks = std::max<int64_t>(1, std::min(kMaxBlocks, rows / kMinBlockRows));
  const int64_t block_rows = (rows + blocks - 1) / blocks;
  const bool params = dgamma || dbeta;
  // partial[b] holds block b's Σ dout∘x̂ (first C) and Σ dout (next C).
  std::vector<float> partial(params ? static_cast<size_t>(blocks * 2 * C) : 0, 0.0f);
#pragma omp parallel for schedule(static) if (rows * C > kParallelMin && blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    float* pg = params ? partial.data() + b * 2 * C : nullptr;
    float* pb = params ? pg + C : nullptr;
    run(dx, dx_in, pg, pb, dout, x, gamma, mean, rstd, b * block_rows, std::min(rows, (b + 1) * block_rows), C);
  }
  if (!params) return;
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
