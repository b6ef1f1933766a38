// CPU elementwise kernels: plain loops that gcc vectorises (-O3 -march=native), threaded with OpenMP
// above a size where the fork/join pays for itself.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/elementwise.h"
#include "kernels/vector_math.h"

namespace kraken::kernels {
namespace {
constexpr int64_t kParallelMin = 1 << 15;  // below this, one thread is faster than waking two
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;
}  // namespace

void fill_cpu(float* out, float value, int64_t n) {
#pragma omp parallel for simd if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = value;
}

void add_cpu(float* out, const float* a, const float* b, int64_t n) {
#pragma omp parallel for simd if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

void axpy_cpu(float* y, const float* x, float alpha, int64_t n) {
#pragma omp parallel for simd if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

void scale_cpu(float* out, const float* x, float alpha, int64_t n) {
#pragma omp parallel for simd if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = alpha * x[i];
}

void mul_cpu(float* out, const float* a, const float* b, int64_t n) {
#pragma omp parallel for simd if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * b[i];
}

void add_broadcast_cpu(float* out, const float* a, const float* b, int64_t rows, int64_t cols) {
#pragma omp parallel for if (rows * cols > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const float* ar = a + r * cols;
    float* orow = out + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) orow[c] = ar[c] + b[c];
  }
}

void sum_rows_cpu(float* db, const float* dout, int64_t rows, int64_t cols) {
  // Columns are split across threads (not rows), so every column is summed in row order by one
  // thread: deterministic for any thread count.
#pragma omp parallel if (rows * cols > kParallelMin)
  {
    // Each thread owns a contiguous range of columns of at least 16 floats.
#pragma omp for schedule(static)
    for (int64_t c0 = 0; c0 < cols; c0 += 64) {
      const int64_t c1 = std::min(cols, c0 + 64);
      float acc[64] = {0};
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = dout + r * cols;
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += row[c];
      }
      for (int64_t c = c0; c < c1; ++c) db[c] += acc[c - c0];
    }
  }
}

void gelu_forward_cpu(float* out, const float* x, int64_t n) {
#pragma omp parallel for simd if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float u = kSqrt2OverPi * (v + kGeluCubic * v * v * v);
    out[i] = 0.5f * v * (1.0f + tanh_vectorisable(u));
  }
}

void gelu_backward_cpu(float* dx, const float* x, const float* dout, int64_t n) {
  // in the forward pass this was: out = 0.5·x·(1 + tanh(u)), u = √(2/π)(x + 0.044715x³)
  // d out/dx = 0.5(1 + tanh u) + 0.5·x·sech²(u)·√(2/π)(1 + 3·0.044715x²)
#pragma omp parallel for simd if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float u = kSqrt2OverPi * (v + kGeluCubic * v * v * v);
    const float t = tanh_vectorisable(u);
    const float sech2 = 1.0f - t * t;
    const float grad = 0.5f * (1.0f + t) + 0.5f * v * sech2 * kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * v * v);
    dx[i] += grad * dout[i];
  }
}

void cast_f32_to_bf16_cpu(uint16_t* out, const float* x, int64_t n) {
#pragma omp parallel for if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &x[i], 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
      out[i] = static_cast<uint16_t>((bits >> 16) | 0x40u);
      continue;
    }
    const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);  // round half to even
    out[i] = static_cast<uint16_t>((bits + rounding) >> 16);
  }
}

void cast_bf16_to_f32_cpu(float* out, const uint16_t* x, int64_t n) {
#pragma omp parallel for if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(x[i]) << 16;
    std::memcpy(&out[i], &bits, 4);
  }
}

void cast_f32_to_bf16_many_cpu(uint16_t* const* outs, const float* const* xs, const int64_t* ns, int64_t count) {
  for (int64_t k = 0; k < count; ++k) cast_f32_to_bf16_cpu(outs[k], xs[k], ns[k]);
}

void cast_bf16_to_f32_many_cpu(float* const* outs, const uint16_t* const* xs, const int64_t* ns, int64_t count) {
  for (int64_t k = 0; k < count; ++k) cast_bf16_to_f32_cpu(outs[k], xs[k], ns[k]);
}

void accumulate_bf16_many_cpu(float* const* accs, const uint16_t* const* xs, const int64_t* ns, int64_t count) {
  for (int64_t k = 0; k < count; ++k) {
    float* acc = accs[k];
    const uint16_t* x = xs[k];
    const int64_t n = ns[k];
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(x[i]) << 16;
      float v;
      std::memcpy(&v, &bits, sizeof v);
      acc[i] += v;
    }
  }
}

void cast_i32_to_f32_cpu(float* out, const int32_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

void cast_u16_to_i32_cpu(int32_t* out, const uint16_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i];
}

namespace {
constexpr int64_t kSumBlock = 4096;
template <typename F>
double blocked_sum(int64_t n, F&& term) {
  const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  std::vector<double> partial(static_cast<size_t>(blocks));
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t lo = blk * kSumBlock, hi = std::min(n, lo + kSumBlock);
    double acc = 0.0;
    for (int64_t i = lo; i < hi; ++i) acc += term(i);
    partial[blk] = acc;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}
}  // namespace

double sum_cpu(const float* x, int64_t n) {
  return blocked_sum(n, [x](int64_t i) { return static_cast<double>(x[i]); });
}

double sum_squares_cpu(const float* x, int64_t n) {
  return blocked_sum(n, [x](int64_t i) { return static_cast<double>(x[i]) * x[i]; });
}

}  // namespace kraken::kernels
