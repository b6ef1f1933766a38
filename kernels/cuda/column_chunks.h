// How the column sums' first pass (column_sums.h) cuts the rows into chunks, one block per chunk and 64
// columns: host arithmetic alone, a function of rows and cols (so the order of the sums depends on them
// only, never on the device). KRAKEN_CUDA_COLUMN_CHUNKS, read once per process, picks the rule:
//   short (the default)  512 rows, or 128 where there are few column blocks (C = 768 is 12 of them:
//                        512-row chunks of GPT-2's 8192 rows made 192 blocks, under 1.5 per SM of an H200);
//   long                 the longest chunk, 128 to 2048 rows, that still makes kLongChunkBlocks blocks.
// Why long: at B = 64 short chunks make 4,600–6,100 blocks of 4 to 16 rows a thread (one to four rounds
// of loads, then a shared-memory tree and the block's end), and the bias gradients' sums moved ~75% of an
// H100's bandwidth (twelfth session's profile: 48 launches, 4.3 ms of a 116 ms GPT-2 step). Long chunks
// give 8 to 32 rows a thread at B = 64 (2,300–3,100 blocks), and at B = 8 128-row chunks throughout
// (c_fc's 3072 columns: 3,072 blocks where short made 768). Measured in the fifteenth session on an H100:
// the bias-gradient sums at B = 64 0.043 / 0.109 / 0.142 ms (768 / 2304 / 3072 columns) against short's
// 0.044 / 0.110 / 0.144, GPT-2's steps 17.7 / 116.7 ms (B = 8 / 64) against 17.3 / 116.0 — no gain, so
// short stays the default (bench/RESULTS.md).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include "kernels/error.h"

namespace kraken::kernels::cuda_detail {

enum class ColumnChunks { kShort, kLong };
constexpr int64_t kColumnsPerChunkBlock = 64;  // a first-pass block's columns (column_sums.h)
constexpr int64_t kLongChunkBlocks = 2048;     // ~2 waves of 8 blocks on each of an H100's 132 SMs

inline ColumnChunks default_column_chunks() {
  static const ColumnChunks how = [] {
    const char* v = std::getenv("KRAKEN_CUDA_COLUMN_CHUNKS");
    if (v == nullptr || *v == '\0' || std::string(v) == "short") return ColumnChunks::kShort;
    if (std::string(v) == "long") return ColumnChunks::kLong;
    KRAKEN_THROW("KRAKEN_CUDA_COLUMN_CHUNKS=", v,
                 ": expected short (128 or 512 rows a block by the number of columns; the default) or long (up to "
                 "2048 rows, keeping 2048 blocks)");
  }();
  return how;
}

inline int64_t chunk_rows(int64_t rows, int64_t cols, ColumnChunks how) {
  const int64_t column_blocks = (cols + kColumnsPerChunkBlock - 1) / kColumnsPerChunkBlock;
  if (how == ColumnChunks::kShort) return column_blocks >= 32 ? 512 : 128;
  int64_t chunk = 2048;
  while (chunk > 128 && column_blocks * ((rows + chunk - 1) / chunk) < kLongChunkBlocks) chunk /= 2;
  return chunk;
}

}  // namespace kraken::kernels::cuda_detail
