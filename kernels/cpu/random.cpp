#include <cmath>

#include "kernels/philox.h"
#include "kernels/random.h"

namespace kraken::kernels {
namespace {
constexpr int64_t kParallelMin = 1 << 14;
constexpr float kTwoPi = 6.283185307179586f;

// Box–Muller on words (2j, 2j+1) of block offset + i/2: value i of a normal stream.
inline float normal_at(uint64_t seed, uint64_t stream, uint64_t offset, int64_t i) {
  const PhiloxBlock b = philox4x32_10(seed, stream, offset + static_cast<uint64_t>(i / 2));
  const int j = static_cast<int>(i % 2) * 2;
  const float u1 = 1.0f - uint_to_unit(b.v[j]);  // (0, 1]: log stays finite
  const float u2 = uint_to_unit(b.v[j + 1]);
  return std::sqrt(-2.0f * std::log(u1)) * std::cos(kTwoPi * u2);
}
}  // namespace

void fill_uniform_cpu(float* out, int64_t n, float low, float high, uint64_t seed, uint64_t stream, uint64_t offset) {
#pragma omp parallel for if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i)
    out[i] = low + (high - low) * philox_uniform(seed, stream, offset, static_cast<uint64_t>(i));
}

void fill_normal_cpu(float* out, int64_t n, float mean, float std, uint64_t seed, uint64_t stream, uint64_t offset) {
#pragma omp parallel for if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = mean + std * normal_at(seed, stream, offset, i);
}

void dropout_forward_cpu(float* out, const float* x, int64_t n, float p, uint64_t seed, uint64_t stream, uint64_t offset) {
  const float keep_scale = 1.0f / (1.0f - p);
#pragma omp parallel for if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = philox_uniform(seed, stream, offset, static_cast<uint64_t>(i)) >= p;
    out[i] = keep ? x[i] * keep_scale : 0.0f;
  }
}

void dropout_backward_cpu(float* dx, const float* dout, int64_t n, float p, uint64_t seed, uint64_t stream,
                          uint64_t offset) {
  // in the forward pass this was: out = x·mask/(1−p)
  const float keep_scale = 1.0f / (1.0f - p);
#pragma omp parallel for if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = philox_uniform(seed, stream, offset, static_cast<uint64_t>(i)) >= p;
    if (keep) dx[i] += dout[i] * keep_scale;
  }
}

}  // namespace kraken::kernels
