// Sums over the rows of a (rows, cols) matrix, per column — bias gradients, LayerNorm's dgamma and dbeta —
// in two passes, deterministic and without atomics.
//
// One pass with a block per few columns (what these kernels did before) leaves the GPU nearly idle
// when there are few columns and many rows: C = 768 columns of 8192 rows made 96 blocks, and each warp
// loaded 2-byte elements from 4 rows at a time (the bias gradients took 0.82 ms of a GPT-2 step on an
// H200, about a third of the bandwidth). Here:
//   pass 1  grid (column blocks of 64, row chunks of chunk_rows(rows, cols)): a block of 256 threads = 8 column
//           threads × 32 row groups; each thread owns 8 adjacent columns (one 16-byte bf16 access, two
//           f32) and sums rows g, g + 32, … of its chunk in order; a fixed shared-memory tree adds the
//           32 groups; the chunk's sums go to a scratch buffer (scratch.h).
//   pass 2  64 threads per column add the chunks' sums (each a fixed subset in order, then a fixed tree)
//           and hand the total to `apply`; where there are one or two chunks, a thread per column.
// The order of every sum depends on rows and cols alone (and on KRAKEN_CUDA_COLUMN_CHUNKS, column_chunks.h):
// the same bits on every run and every device.
// Sets: several (rows, cols) matrices one after another (the Kraken sub-layers' bias gradients, one per
// sub-layer), each summed on its own in one launch of each pass — the chunks of a set start at its first
// row, so every set's sums are the bits of a call of its own.
// Needs cols a multiple of 8 and the matrices 16-byte aligned; callers keep a one-pass kernel otherwise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/check.h"
#include "kernels/cuda/column_chunks.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/scratch.h"
#include "kernels/cuda/storage.h"

namespace kraken::kernels::cuda_detail {

constexpr int kColumnThreads = 8;                         // threads across a block's columns
constexpr int kColumnsPerBlock = 8 * kColumnThreads;      // 8 columns each
static_assert(kColumnsPerBlock == kColumnsPerChunkBlock, "column_chunks.h counts the first pass's blocks");
constexpr int kRowGroups = 32;                            // threads down the rows
constexpr int kColumnSumThreads = kColumnThreads * kRowGroups;

// Pass 1. terms(r, c0, t) gives row r's K terms of columns c0 .. c0 + 7: t[k][i] for column c0 + i.
// partials[(k · chunks + chunk) · cols + c] = Σ over the chunk's rows of term k at column c, chunks =
// gridDim.y. blockIdx.y is set · set_chunks + the chunk within the set; set s is rows s·rows .. (s + 1)·rows − 1
// (one set: set_chunks = gridDim.y).
template <int K, typename Terms>
__global__ void __launch_bounds__(kColumnSumThreads)
    column_partials_kernel(float* partials, int64_t rows, int64_t cols, int64_t chunk, int64_t set_chunks,
                           Terms terms) {
  __shared__ float sums[K][kRowGroups][kColumnsPerBlock + 4];
  const int ct = threadIdx.x % kColumnThreads, group = threadIdx.x / kColumnThreads;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kColumnsPerBlock + 8 * ct;
  const int64_t set = blockIdx.y / set_chunks, set_end = (set + 1) * rows;
  const int64_t r_begin = set * rows + (blockIdx.y - set * set_chunks) * chunk;
  const int64_t r_end = r_begin + chunk < set_end ? r_begin + chunk : set_end;
  float acc[K][8] = {};
  if (c0 < cols) {
#pragma unroll 4
    for (int64_t r = r_begin + group; r < r_end; r += kRowGroups) {
      float t[K][8];
      terms(r, c0, t);
#pragma unroll
      for (int k = 0; k < K; ++k)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[k][i] += t[k][i];
    }
  }
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int i = 0; i < 8; ++i) sums[k][group][8 * ct + i] = acc[k][i];
  __syncthreads();
  for (int stride = kRowGroups / 2; stride > 0; stride >>= 1) {
    if (group < stride) {
#pragma unroll
      for (int k = 0; k < K; ++k)
#pragma unroll
        for (int i = 0; i < 8; ++i) sums[k][group][8 * ct + i] += sums[k][group + stride][8 * ct + i];
    }
    __syncthreads();
  }
  // The block's 64 column totals, written by 64 threads.
  if (threadIdx.x < kColumnsPerBlock) {
    const int64_t c = static_cast<int64_t>(blockIdx.x) * kColumnsPerBlock + threadIdx.x;
    if (c < cols) {
#pragma unroll
      for (int k = 0; k < K; ++k)
        partials[(static_cast<int64_t>(k) * gridDim.y + blockIdx.y) * cols + c] = sums[k][0][threadIdx.x];
    }
  }
}

// Pass 2: apply(c, totals) with totals[k] = Σ_chunk partials of term k at column c. A block per 8 columns
// × 64 chunk groups: group g adds chunks g, g + 64, … in order, then a fixed shared-memory tree adds the
// 64 groups. A warp reads 4 chunks' 8 columns (32-byte pieces, whole sectors). (32 columns × 16 groups a
// block, what this kernel did before, made 24 blocks for C = 768: a LayerNorm backward's 2048 chunks at
// B = 64 took ~21 µs each on an H100, latency-bound with 16 warps on each of 24 SMs; a thread per column
// adding every chunk, before that, 30 µs per LayerNorm backward on an H200 at 256 chunks.)
// Several independent sets of partials at once: blockIdx.y picks the set (partials + y · set_stride), and
// apply can tell them apart by blockIdx.y.
constexpr int kTotalColumns = 8;
constexpr int kTotalGroups = 64;
template <int K, typename Apply>
__global__ void __launch_bounds__(kTotalColumns* kTotalGroups)
    column_totals_kernel(const float* partials, int64_t chunks, int64_t cols, int64_t set_stride, Apply apply) {
  __shared__ float sums[K][kTotalGroups][kTotalColumns + 1];
  partials += static_cast<int64_t>(blockIdx.y) * set_stride;
  const int lane = threadIdx.x % kTotalColumns, group = threadIdx.x / kTotalColumns;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTotalColumns + lane;
  float acc[K] = {};
  if (c < cols) {
#pragma unroll 4
    for (int64_t chunk = group; chunk < chunks; chunk += kTotalGroups)
#pragma unroll
      for (int k = 0; k < K; ++k) acc[k] += partials[(k * chunks + chunk) * cols + c];
  }
#pragma unroll
  for (int k = 0; k < K; ++k) sums[k][group][lane] = acc[k];
  __syncthreads();
  for (int stride = kTotalGroups / 2; stride > 0; stride >>= 1) {
    if (group < stride) {
#pragma unroll
      for (int k = 0; k < K; ++k) sums[k][group][lane] += sums[k][group + stride][lane];
    }
    __syncthreads();
  }
  if (group == 0 && c < cols) {
    float totals[K];
#pragma unroll
    for (int k = 0; k < K; ++k) totals[k] = sums[k][0][lane];
    apply(c, totals);
  }
}

// Pass 2 where the first pass made at most kFewChunks chunks — a sum over few rows of many columns, such as
// GPT-2's position-embedding gradient (B rows of T·C = 786,432 columns: one chunk): a thread per column.
// The kernel above gave those 8 columns a block of 512 threads, 63 of its 64 groups adding zeros — 98,304
// blocks that took 0.27 ms of an H100 (fifteenth session's profile) for ~6 MB. The same bits: there,
// group g holds 0 + chunk g's sum and the tree adds exact zeros to each, then (0 + p0) + (0 + p1); here
// (0 + p0) + p1, the same value (0 + p1 differs from p1 only for −0, which adds the same to 0 + p0, never −0).
constexpr int64_t kFewChunks = 2;
constexpr int kFewChunkThreads = 256;
template <int K, typename Apply>
__global__ void __launch_bounds__(kFewChunkThreads)
    column_totals_few_chunks_kernel(const float* partials, int64_t chunks, int64_t cols, int64_t set_stride,
                                    Apply apply) {
  partials += static_cast<int64_t>(blockIdx.y) * set_stride;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFewChunkThreads + threadIdx.x;
  if (c >= cols) return;
  float totals[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float acc = 0.0f;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) acc += partials[(k * chunks + chunk) * cols + c];
    totals[k] = acc;
  }
  apply(c, totals);
}

// sets: how many sets of partials, set_stride floats apart (one set: 1, 0).
template <int K, typename Apply>
void launch_column_totals(const float* partials, int64_t chunks, int64_t cols, Apply apply, cudaStream_t stream,
                          int sets = 1, int64_t set_stride = 0) {
  if (chunks <= kFewChunks) {
    const unsigned blocks = static_cast<unsigned>((cols + kFewChunkThreads - 1) / kFewChunkThreads);
    KRAKEN_KERNEL(dim3(blocks, static_cast<unsigned>(sets)), kFewChunkThreads, 0, stream,
                  column_totals_few_chunks_kernel<K, Apply>)
    (partials, chunks, cols, set_stride, apply);
  } else {
    KRAKEN_KERNEL(dim3(static_cast<unsigned>((cols + kTotalColumns - 1) / kTotalColumns), static_cast<unsigned>(sets)),
                  kTotalColumns * kTotalGroups, 0, stream, column_totals_kernel<K, Apply>)
    (partials, chunks, cols, set_stride, apply);
  }
  KRAKEN_CUDA_LAUNCH_CHECK();
}

// Both passes on `stream`; cols % 8 == 0, rows ≥ 1. `sets` matrices of `rows` rows each (rows: per set),
// terms taking the row's index among all sets' rows and apply the set as blockIdx.y; more than one set
// for one term only (K = 1: the partials of a set are then consecutive, as the second pass reads them).
// column_sums_fit says whether a shape fits the grid (the first pass's sets × chunks blocks in y).
inline bool column_sums_fit(int64_t rows, int64_t cols, int64_t sets = 1) {
  const int64_t chunk = chunk_rows(rows, cols, default_column_chunks());
  return rows >= 1 && cols % 8 == 0 && sets >= 1 && (cols + kColumnsPerBlock - 1) / kColumnsPerBlock <= 0x7fffffffLL &&
         sets * ((rows + chunk - 1) / chunk) <= 65535;
}
template <int K, typename Terms, typename Apply>
void column_sums(int64_t rows, int64_t cols, Terms terms, Apply apply, cudaStream_t stream, const char* name,
                 int64_t sets = 1) {
  const int64_t chunk = chunk_rows(rows, cols, default_column_chunks());
  const int64_t chunks = (rows + chunk - 1) / chunk;
  const int64_t column_blocks = (cols + kColumnsPerBlock - 1) / kColumnsPerBlock;
  KRAKEN_CHECK(column_sums_fit(rows, cols, sets) && (K == 1 || sets == 1), name, ": ", sets, " × ", rows,
               " rows × ", cols, " columns");
  float* partials = static_cast<float*>(
      device_scratch(ScratchSlot::kColumnSums, sizeof(float) * static_cast<size_t>(K * sets * chunks * cols)));
  KRAKEN_KERNEL(dim3(static_cast<unsigned>(column_blocks), static_cast<unsigned>(sets * chunks)), kColumnSumThreads, 0,
                stream, column_partials_kernel<K, Terms>)(partials, rows, cols, chunk, chunks, terms);
  KRAKEN_CUDA_LAUNCH_CHECK();
  launch_column_totals<K>(partials, chunks, cols, apply, stream, static_cast<int>(sets), chunks * cols);
}

}  // namespace kraken::kernels::cuda_detail
