// Embedding lookup: rows of a table picked by integer ids (GPT-2's wte and wpe).
//
// Shapes: weight, dweight (V, C); ids (N,) i32, every id in [0, V) (the caller validates them: a
// kernel cannot throw a helpful error from a GPU); out, dout (N, C).
//   forward:  out[n, :] = weight[ids[n], :]
//   backward: dweight[v, :] += Σ_{n : ids[n] = v} dout[n, :], summed in increasing n
// The backward uses no float atomics: every (v, c) is accumulated by one thread in position order
// (CPU: threads own channel blocks; GPU: blocks own id ranges and walk the positions in order), so
// the result is bit-identical for any thread count and any launch.
#pragma once

#include <cstdint>

struct CUstream_st;

namespace kraken::kernels {

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
