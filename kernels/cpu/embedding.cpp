// CPU embedding: the forward copies rows, threaded over positions; the backward splits the channels
// into fixed blocks, and the thread that owns a block walks all positions in order, so every
// dweight[v, c] receives its contributions in the header's order (position order; a hot row's slice by
// slice), whatever the thread count.
#include "kernels/embedding.h"

#include <algorithm>
#include <cstring>
#include <vector>

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
  // in the forward pass this was: out[n, :] = weight[ids[n], :]; the order of the sums is the header's
  std::vector<int64_t> count(static_cast<size_t>(V), 0);
  for (int64_t n = 0; n < N; ++n) count[static_cast<size_t>(ids[n])] += 1;
  const int64_t hot_count = embedding_hot_threshold(count.data(), V, N), L = embedding_slice_length(N);
  std::vector<int64_t> hot_slot(static_cast<size_t>(V), -1);  // index among the hot rows, else −1
  std::vector<int32_t> hot_rows;
  for (int64_t v = 0; v < V; ++v)
    if (count[static_cast<size_t>(v)] >= hot_count) {
      hot_slot[static_cast<size_t>(v)] = static_cast<int64_t>(hot_rows.size());
      hot_rows.push_back(static_cast<int32_t>(v));
    }
  const int64_t hot = static_cast<int64_t>(hot_rows.size());
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel for schedule(static) if (N * C > kParallelMin && blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t c0 = b * kChannelBlock, width = std::min(C, c0 + kChannelBlock) - c0;
    for (int64_t n = 0; n < N; ++n) {  // the other rows: each position straight into its row
      if (hot_slot[static_cast<size_t>(ids[n])] >= 0) continue;
      float* dst = dweight + static_cast<int64_t>(ids[n]) * C + c0;
      const float* src = dout + n * C + c0;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) dst[c] += src[c];
    }
    if (hot == 0) continue;
    std::vector<float> sums(static_cast<size_t>(hot * width));  // each hot row's sum over one slice
    for (int64_t s = 0; s < kEmbeddingHotSlices; ++s) {
      std::fill(sums.begin(), sums.end(), 0.0f);
      for (int64_t n = s * L; n < std::min(N, (s + 1) * L); ++n) {
        const int64_t h = hot_slot[static_cast<size_t>(ids[n])];
        if (h < 0) continue;
        float* acc = sums.data() + h * width;
        const float* src = dout + n * C + c0;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) acc[c] += src[c];
      }
      for (int64_t h = 0; h < hot; ++h) {
        float* dst = dweight + static_cast<int64_t>(hot_rows[static_cast<size_t>(h)]) * C + c0;
        const float* acc = sums.data() + h * width;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) dst[c] += acc[c];
      }
    }
  }
}

int64_t embedding_first_bad_id_cpu(const int32_t* ids, int64_t N, int64_t V) {
  for (int64_t n = 0; n < N; ++n)
    if (ids[n] < 0 || ids[n] >= V) return n;
  return -1;
}

}  // namespace kraken::kernels
