// Embedding lookup: rows of a table picked by integer ids (GPT-2's wte and wpe).
//
// Shapes: weight, dweight (V, C); ids (N,) i32, every id in [0, V) (the caller validates them: a
// kernel cannot throw a helpful error from a GPU); out, dout (N, C).
//   forward:  out[n, :] = weight[ids[n], :]
//   backward: dweight[v, :] += Σ_{n : ids[n] = v} dout[n, :], in f32, in this order:
//     - a row with fewer than embedding_hot_threshold(counts) positions: each dout[n] added to
//       dweight[v] in increasing n;
//     - a hot row (at least that many: text's frequent tokens — GPT-2's " the" is ~7% of English
//       text): the positions cut into kEmbeddingHotSlices slices [s·L, (s + 1)·L), L = ⌈N / slices⌉;
//       each slice's dout rows summed from 0 in increasing n, and the slices' sums added to dweight[v]
//       in slice order (every slice, an empty one adding 0).
// A hot row's sums run in parallel over its slices on a GPU, where one sequence of thousands of
// dependent additions (each waiting for its row of dout from memory) would take milliseconds.
// The backward uses no float atomics: every sum above has one order, on the CPU (threads own channel
// blocks) as on the GPU (kernels/cuda/embedding.cu), so the result is bit-identical for any thread
// count and any launch, and the same on both.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

struct CUstream_st;

namespace kraken::kernels {

// The backward's order (above): a row is hot from the smallest count k ≥ kEmbeddingHotMin at which at
// most kEmbeddingMaxHotRows rows have k positions or more (the cap bounds the GPU's scratch for the
// slice sums: 25 MB at C = 768), and a hot row's sum is cut into 16 slices. The threshold follows the
// ids: on GPT-2 tokens of English text (the demo corpus, windows at random) it is 8 at N = 8,192 (~120
// hot rows) and 15–16 at 65,536 (~490); uniform ids have few or none hot. (Until the seventeenth session
// it was a fixed max(32, ⌈N / 512⌉), which left text's rows of 32 to 127 positions at N = 65,536 to the
// GPU's kernel for the other rows, whose warps add one row's contributions after another:
// bench/embedding_chains.py counts what that cost.)
constexpr int64_t kEmbeddingHotSlices = 16;
constexpr int64_t kEmbeddingHotMin = 8;
constexpr int64_t kEmbeddingMaxHotRows = 512;
// The threshold is at most this: no more than 512 rows can have ⌈N / 512⌉ positions each. A GPU finds
// the threshold from a histogram of the counts kEmbeddingHotMin … embedding_hot_threshold_bound(N).
constexpr int64_t embedding_hot_threshold_bound(int64_t N) {
  const int64_t scaled = (N + kEmbeddingMaxHotRows - 1) / kEmbeddingMaxHotRows;
  return scaled > kEmbeddingHotMin ? scaled : kEmbeddingHotMin;
}
// The threshold from each row's count of positions (counts[v], v < V; N positions in all): the counts
// from kEmbeddingHotMin up binned (the last bin every count at or past the bound), then the rows with
// at least k positions added up from the bound down while they are at most 512. (The GPU runs the same
// two steps: embedding.cu.)
template <typename Count>
int64_t embedding_hot_threshold(const Count* counts, int64_t V, int64_t N) {
  const int64_t bound = embedding_hot_threshold_bound(N);
  std::vector<int64_t> rows(static_cast<size_t>(bound - kEmbeddingHotMin + 1), 0);
  for (int64_t v = 0; v < V; ++v) {
    const int64_t c = static_cast<int64_t>(counts[v]);
    if (c >= kEmbeddingHotMin) ++rows[static_cast<size_t>((c < bound ? c : bound) - kEmbeddingHotMin)];
  }
  int64_t threshold = bound, at_least = 0;  // (at the bound they are at most 512: N / bound ≤ 512)
  for (int64_t k = bound; k >= kEmbeddingHotMin; --k) {
    at_least += rows[static_cast<size_t>(k - kEmbeddingHotMin)];
    if (at_least > kEmbeddingMaxHotRows) break;
    threshold = k;
  }
  return threshold;
}
constexpr int64_t embedding_slice_length(int64_t N) { return (N + kEmbeddingHotSlices - 1) / kEmbeddingHotSlices; }

// ---- CPU ---------------------------------------------------------------------------------------
void embedding_forward_cpu(float* out, const float* weight, const int32_t* ids, int64_t N, int64_t V, int64_t C);
void embedding_backward_cpu(float* dweight, const float* dout, const int32_t* ids, int64_t N, int64_t V, int64_t C);
// Index of the first id outside [0, V), or −1 when all are valid.
int64_t embedding_first_bad_id_cpu(const int32_t* ids, int64_t N, int64_t V);

// ---- CUDA (same contracts, fp32) ----------------------------------------------------------------
void embedding_forward_cuda(float* out, const float* weight, const int32_t* ids, int64_t N, int64_t V, int64_t C,
                            CUstream_st* stream);
void embedding_backward_cuda(float* dweight, const float* dout, const int32_t* ids, int64_t N, int64_t V,
                             int64_t C, CUstream_st* stream);

// ---- CUDA, the token and position embedding of a mixed-precision model ------------------------------
// GPT-2's first activation, x0 = bf16(wte[ids] + wpe[t]) (runtime ops::token_position_embedding), in one
// pass where three ops made three: ids (N = B·T,) row-major over (B, T); weight (V, C) and positions
// (≥ T, C) f32; out and dout (N, C) bf16.
//   forward:  out[n, :] = bf16(weight[ids[n], :] + positions[n mod T, :])   (the f32 sum rounded once)
// Needs C a multiple of 8 and all four arrays 16-byte aligned (8 channels per access); returns false,
// having written nothing, otherwise.
bool embedding_positions_forward_bf16_cuda(uint16_t* out, const float* weight, const float* positions,
                                           const int32_t* ids, int64_t N, int64_t T, int64_t V, int64_t C,
                                           CUstream_st* stream);
//   backward (weight): embedding_backward_cuda's contract and bits, dout bf16 (widened exactly) — the
//   positions' gradient is kernels::sum_rows_bf16_to_f32_cuda over dout as (B, T·C).
void embedding_backward_bf16_cuda(float* dweight, const uint16_t* dout, const int32_t* ids, int64_t N, int64_t V,
                                  int64_t C, CUstream_st* stream);

}  // namespace kraken::kernels
