// CUDA embedding (contract in kernels/embedding.h).
//
// Forward: a grid-stride copy, one thread per output element.
// Backward without float atomics: block b owns the ids [b·kIdsPerBlock, (b + 1)·kIdsPerBlock). It walks
// all positions in chunks of kThreads; in each chunk the positions whose id it owns are compacted, in
// position order (warp ballots and a prefix over the warps), into shared memory, and then added one
// after another, each thread owning fixed columns. So every dweight[v, c] is written by one thread
// of one block, with its contributions in increasing position: bit-identical on every launch.
#include "kernels/cuda/check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/storage.h"
#include "kernels/embedding.h"

namespace kraken::kernels {
namespace {

using cuda_detail::aligned16;
using cuda_detail::as_bf16;
using cuda_detail::blocks_for;
using cuda_detail::load;
using cuda_detail::load8;
using cuda_detail::store8;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kIdsPerBlock = 64;  // 50257 GPT-2 ids -> 786 blocks

__global__ void embedding_forward_kernel(float* out, const float* weight, const int32_t* ids, int64_t N, int64_t C) {
  const int64_t total = N * C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t n = i / C, c = i - n * C;
    out[i] = weight[static_cast<int64_t>(ids[n]) * C + c];
  }
}

// The token and position embedding's forward (kernels/embedding.h): 8 channels a thread, the table rows
// in 16-byte f32 loads, one 16-byte bf16 store. (The three ops it replaces — the f32 lookup above, a
// broadcast add and a cast — took 0.64 ms of GPT-2's B = 64 step on an H100, over an f32 (N, C) three
// times.)
__global__ void embedding_positions_bf16x8_kernel(__nv_bfloat16* out, const float* weight, const float* positions,
                                                  const int32_t* ids, int64_t N, int64_t T, int64_t packs_per_row) {
  const int64_t C = 8 * packs_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N * packs_per_row;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t n = i / packs_per_row, c0 = 8 * (i - n * packs_per_row);
    float w[8], p[8];
    load8(weight + static_cast<int64_t>(ids[n]) * C + c0, w);
    load8(positions + (n % T) * C + c0, p);
#pragma unroll
    for (int k = 0; k < 8; ++k) w[k] = w[k] + p[k];
    store8(out + n * C + c0, w);
  }
}

// T: dout's storage (f32, or bf16 widened exactly as it is added: the same sums either way).
template <typename T>
__global__ void embedding_backward_kernel(float* dweight, const T* dout, const int32_t* ids, int64_t N, int64_t V,
                                          int64_t C) {
  __shared__ int64_t list_pos[kThreads];
  __shared__ int32_t list_id[kThreads];
  __shared__ int warp_count[kWarps];
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kIdsPerBlock, hi = min(V, lo + kIdsPerBlock);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t base = 0; base < N; base += kThreads) {  // the same trip count for every thread
    const int64_t p = base + threadIdx.x;
    const int32_t id = p < N ? ids[p] : -1;
    const bool mine = id >= lo && id < hi;
    const unsigned int ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int offset = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) offset += warp_count[w];
      total += warp_count[w];
    }
    if (mine) {
      const int slot = offset + __popc(ballot & ((1u << lane) - 1u));  // matches before me, in order
      list_pos[slot] = p;
      list_id[slot] = id;
    }
    __syncthreads();
    for (int i = 0; i < total; ++i) {
      float* dst = dweight + static_cast<int64_t>(list_id[i]) * C;
      const T* src = dout + list_pos[i] * C;
      for (int64_t c = threadIdx.x; c < C; c += kThreads) dst[c] += load(src + c);
    }
    __syncthreads();  // the lists are rewritten by the next chunk
  }
}

}  // namespace

// V is part of the contract (ids < V); the lookup itself does not need it.
void embedding_forward_cuda(float* out, const float* weight, const int32_t* ids, int64_t N, [[maybe_unused]] int64_t V,
                            int64_t C, CUstream_st* stream) {
  if (N * C <= 0) return;
  KRAKEN_KERNEL(blocks_for(N * C, kThreads), kThreads, 0, stream, embedding_forward_kernel)(out, weight, ids, N, C);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

namespace {
template <typename T>
void embedding_backward(float* dweight, const T* dout, const int32_t* ids, int64_t N, int64_t V, int64_t C,
                        CUstream_st* stream) {
  // in the forward pass this was: out[n, :] = weight[ids[n], :]
  if (N * C <= 0 || V <= 0) return;
  const unsigned int blocks = static_cast<unsigned int>((V + kIdsPerBlock - 1) / kIdsPerBlock);
  KRAKEN_KERNEL(blocks, kThreads, 0, stream, embedding_backward_kernel<T>)(dweight, dout, ids, N, V, C);
  KRAKEN_CUDA_LAUNCH_CHECK();
}
}  // namespace

void embedding_backward_cuda(float* dweight, const float* dout, const int32_t* ids, int64_t N, int64_t V, int64_t C,
                             CUstream_st* stream) {
  embedding_backward(dweight, dout, ids, N, V, C, stream);
}

void embedding_backward_bf16_cuda(float* dweight, const uint16_t* dout, const int32_t* ids, int64_t N, int64_t V,
                                  int64_t C, CUstream_st* stream) {
  embedding_backward(dweight, as_bf16(dout), ids, N, V, C, stream);
}

bool embedding_positions_forward_bf16_cuda(uint16_t* out, const float* weight, const float* positions,
                                           const int32_t* ids, int64_t N, int64_t T, [[maybe_unused]] int64_t V,
                                           int64_t C, CUstream_st* stream) {
  if (C <= 0 || C % 8 != 0 || T <= 0 || !aligned16(out) || !aligned16(weight) || !aligned16(positions)) return false;
  if (N <= 0) return true;
  const int64_t packs = N * (C / 8);
  KRAKEN_KERNEL(blocks_for(packs, kThreads), kThreads, 0, stream, embedding_positions_bf16x8_kernel)
  (as_bf16(out), weight, positions, ids, N, T, C / 8);
  KRAKEN_CUDA_LAUNCH_CHECK();
  return true;
}

}  // namespace kraken::kernels
