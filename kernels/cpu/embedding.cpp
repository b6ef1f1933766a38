// CPU embedding: the forward copies rows, threaded over positions; the backward splits the channels
// into fixed blocks, and the thread that owns a block walks all positions in order, so every
// dweight[v, c] receives its contributions in position order, whatever the thread count.
#include "kernels/embedding.h"

#include <algorithm>
#include <cstring>

namespace kraken::kernels {
namespace {
constexpr int64_t kParallelMin = 1 << 14;  // elements below which waking a second thread costs more
constexpr int64_t kChannelBlock = 64;      // 256 bytes of a row: whole cache lines per thread
}  // namespace

void embedding_forward_cpu(float* out, const float* weight, const int32_t* ids, int64_t N, int64_t V, int64_t C) {
#pragma omp parallel for schedule(static) if (N * C > kParallelMin && N > 1)
  for (int64_t n = 0; n < N; ++n)
    std::memcpy(out + n * C, weight + static_cast<int64_t>(ids[n]) * C, static_cast<size_t>(C) * sizeof(float));
}

void embedding_backward_cpu(float* dweight, const float* dout, const int32_t* ids, int64_t N, int64_t V, int64_t C) {
  // in the forward pass this was: out[n, :] = weight[ids[n], :]
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel for schedule(static) if (N * C > kParallelMin && blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t c0 = b * kChannelBlock, width = std::min(C, c0 + kChannelBlock) - c0;
    for (int64_t n = 0; n < N; ++n) {
      float* dst = dweight + static_cast<int64_t>(ids[n]) * C + c0;
      const float* src = dout + n * C + c0;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) dst[c] += src[c];
    }
  }
}

int64_t embedding_first_bad_id_cpu(const int32_t* ids, int64_t N, int64_t V) {
  for (int64_t n = 0; n < N; ++n)
    if (ids[n] < 0 || ids[n] >= V) return n;
  return -1;
}

}  // namespace kraken::kernels
