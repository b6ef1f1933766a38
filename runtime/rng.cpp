#include "runtime/rng.h"

#include "kernels/error.h"
#include "kernels/philox.h"
#include "kernels/random.h"

namespace kraken::runtime {

uint64_t Generator::reserve(uint64_t blocks) {
  const uint64_t first = state_.offset;
  state_.offset += blocks;
  return first;
}

uint64_t Generator::next_u64() {
  const kernels::PhiloxBlock b = kernels::philox4x32_10(state_.seed, state_.stream, reserve(1));
  return (static_cast<uint64_t>(b.v[0]) << 32) | b.v[1];
}

double Generator::next_double() { return static_cast<double>(next_u64() >> 11) * (1.0 / 9007199254740992.0); }

uint64_t Generator::next_below(uint64_t bound) {
  KRAKEN_CHECK(bound > 0);
  // Rejection sampling removes the modulo bias.
  const uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
  uint64_t x;
  do {
    x = next_u64();
  } while (x >= limit);
  return x % bound;
}

void Generator::fill_normal(Tensor& t, float mean, float std) {
  check_dtype("fill_normal", t, DType::F32, "tensor");
  const int64_t n = t.numel();
  const uint64_t offset = reserve(kernels::normal_blocks(n));
  if (t.device().is_cpu()) {
    kernels::fill_normal_cpu(t.data<float>(), n, mean, std, state_.seed, state_.stream, offset);
    return;
  }
#if KRAKEN_WITH_CUDA
  kernels::fill_normal_cuda(t.data<float>(), n, mean, std, state_.seed, state_.stream, offset, compute_stream(t.device()));
#endif
}

void Generator::fill_uniform(Tensor& t, float low, float high) {
  check_dtype("fill_uniform", t, DType::F32, "tensor");
  const int64_t n = t.numel();
  const uint64_t offset = reserve(kernels::uniform_blocks(n));
  if (t.device().is_cpu()) {
    kernels::fill_uniform_cpu(t.data<float>(), n, low, high, state_.seed, state_.stream, offset);
    return;
  }
#if KRAKEN_WITH_CUDA
  kernels::fill_uniform_cuda(t.data<float>(), n, low, high, state_.seed, state_.stream, offset, compute_stream(t.device()));
#endif
}

}  // namespace kraken::runtime
