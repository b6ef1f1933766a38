// CPU softmax: one row per iteration, threaded over rows, every row reduced by one thread with
// `#pragma omp simd` loops whose order is fixed at compile time (bit-identical for any thread count).
#include "kernels/softmax.h"

#include <cmath>
#include <limits>

namespace kraken::kernels {
namespace {
constexpr int64_t kParallelMin = 1 << 14;  // elements below which waking a second thread costs more
}  // namespace

void softmax_forward_cpu(float* y, const float* x, int64_t rows, int64_t C) {
#pragma omp parallel for schedule(static) if (rows * C > kParallelMin && rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < C; ++c) m = xr[c] > m ? xr[c] : m;
    // A row of −inf has no finite maximum; shifting by 0 keeps exp(−inf) = 0 instead of NaN.
    const float shift = std::isfinite(m) ? m : 0.0f;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < C; ++c) {
      const float e = exp_vectorisable(xr[c] - shift);
      yr[c] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yr[c] *= inv;
  }
}

void softmax_backward_cpu(float* dx, const float* y, const float* dy, int64_t rows, int64_t C) {
  // in the forward pass this was: y = exp(x − m)/Σ exp(x − m); its Jacobian is diag(y) − y·yᵀ, so
  // dx = y ∘ dy − y·(yᵀdy) = y ∘ (dy − Σ dy∘y)
#pragma omp parallel for schedule(static) if (rows * C > kParallelMin && rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const float* yr = y + r * C;
    const float* dyr = dy + r * C;
    float* dxr = dx + r * C;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < C; ++c) dot += dyr[c] * yr[c];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) dxr[c] += yr[c] * (dyr[c] - dot);
  }
}

}  // namespace kraken::kernels
