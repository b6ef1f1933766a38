// Cross-entropy fused with log-softmax over the vocabulary (llm.c's crossentropy + softmax, in one).
//
// Shapes: logits, dlogits (N, Vp) contiguous, of which only the first V columns take part (the rest is
// padding, as GPT-2's vocabulary 50257 padded to 50304); targets (N,) i32; losses, lse (N,).
// A row whose target equals ignore_index is skipped; every other target is in [0, V) (the caller
// validates with cross_entropy_check_targets_cpu: a GPU kernel cannot throw a helpful error).
//   forward:  lse[n]    = log Σ_{v<V} exp(logits[n, v])                  (stable: max subtracted)
//             losses[n] = lse[n] − logits[n, targets[n]],  0 for an ignored row
//   mean:     loss      = (Σ_n losses[n]) / count, summed in double in a fixed order; 0 when count = 0
//   backward: dlogits[n, v] = (dloss/count)·(exp(logits[n, v] − lse[n]) − [v = targets[n]])  for v < V,
//             0 for v ≥ V and on ignored rows.
// The backward WRITES dlogits (every element, padding included) rather than accumulating: logits feed
// nothing but the loss, and skipping a zero-fill saves a pass over an (N, Vp) buffer. dloss points to
// the one-element gradient of the loss on the kernel's device, so the GPU needs no host round trip.
// Each row is reduced by one thread (CPU) or one block (GPU) in a fixed order: results do not depend
// on the thread count.
//
// Training knows the loss's gradient before the forward runs (the loss is backward's root, scaled by a
// host constant): the fused entry points compute the forward's losses and lse and the backward's
// dlogits for a host dloss in one pass over the logits — on a GPU each row is read from memory once
// and again from L2, where the separate kernels read it from memory twice, a forward and a backward
// apart — the same bits as forward then backward. The rescale entry points then check, on the device
// (no host round trip), the dloss that backward brings against the one assumed (a device float):
// equal, nothing moves; else dlogits *= dloss/assumed (one more rounding than the backward kernel
// would make) and assumed = dloss, so that a second backward through the same gradient stays right.
#pragma once

#include <cstdint>

struct CUstream_st;

namespace kraken::kernels {

// ---- CPU ---------------------------------------------------------------------------------------
void cross_entropy_forward_cpu(float* losses, float* lse, const float* logits, const int32_t* targets, int64_t N,
                               int64_t Vp, int64_t V, int32_t ignore_index);
void cross_entropy_mean_cpu(float* loss, const float* losses, int64_t N, int64_t count);
void cross_entropy_backward_cpu(float* dlogits, const float* logits, const float* lse, const int32_t* targets,
                                const float* dloss, int64_t count, int64_t N, int64_t Vp, int64_t V,
                                int32_t ignore_index);
void cross_entropy_fused_cpu(float* losses, float* lse, float* dlogits, const float* logits, const int32_t* targets,
                             float dloss, int64_t count, int64_t N, int64_t Vp, int64_t V, int32_t ignore_index);
void cross_entropy_rescale_cpu(float* dlogits, const float* dloss, float* assumed, int64_t n);
// Validation on host targets: returns the first row whose target is neither ignore_index nor in
// [0, V) (−1 when there is none) and stores in *count how many rows are not ignored.
int64_t cross_entropy_check_targets_cpu(const int32_t* targets, int64_t N, int64_t V, int32_t ignore_index,
                                        int64_t* count);

// ---- CUDA (same contracts, fp32; dloss and every buffer on the device) -----------------------------
void cross_entropy_forward_cuda(float* losses, float* lse, const float* logits, const int32_t* targets, int64_t N,
                                int64_t Vp, int64_t V, int32_t ignore_index, CUstream_st* stream);
void cross_entropy_mean_cuda(float* loss, const float* losses, int64_t N, int64_t count, CUstream_st* stream);
void cross_entropy_backward_cuda(float* dlogits, const float* logits, const float* lse, const int32_t* targets,
                                 const float* dloss, int64_t count, int64_t N, int64_t Vp, int64_t V,
                                 int32_t ignore_index, CUstream_st* stream);
// How the fused kernel reads a row for its gradient pass: again from global memory, where L2 may still
// hold it (kTwice), or from the shared memory its first pass kept it in (kStagedInSharedMemory: bf16
// rows on 16-byte boundaries whose (V/8)·16 bytes fit a block's shared memory; else as kTwice). The same
// bits either way. kDefault reads KRAKEN_CUDA_CROSS_ENTROPY (pipelined | staged | twice; read once per
// process), unset: kPipelined. kStagedInSharedMemory at 8192 × 50304 on an H100: 0.773 ms against 0.829
// (the second read came from memory, not L2: 0.829 ms is the bytes of three passes over the logits at 89%
// of the bandwidth). kPipelined: as kStagedInSharedMemory, in persistent blocks that copy their next row
// into a second stage (cp.async) while they work on the current one — where two stages fit a block's
// shared memory, else as kStagedInSharedMemory; 0.710–0.722 ms against the staged 0.745–0.749 in the
// fifteenth session (bench/RESULTS.md).
enum class CrossEntropyRowReads { kDefault, kTwice, kStagedInSharedMemory, kPipelined };
void cross_entropy_fused_cuda(float* losses, float* lse, float* dlogits, const float* logits, const int32_t* targets,
                              float dloss, int64_t count, int64_t N, int64_t Vp, int64_t V, int32_t ignore_index,
                              CUstream_st* stream, CrossEntropyRowReads reads = CrossEntropyRowReads::kDefault);
void cross_entropy_rescale_cuda(float* dlogits, const float* dloss, float* assumed, int64_t n, CUstream_st* stream);
// CUDA, bf16 logits (the LM head's output in mixed precision): losses and lse f32, dlogits bf16
// (each element rounded once); arithmetic in f32 as above.
void cross_entropy_forward_bf16_cuda(float* losses, float* lse, const uint16_t* logits, const int32_t* targets,
                                     int64_t N, int64_t Vp, int64_t V, int32_t ignore_index, CUstream_st* stream);
void cross_entropy_backward_bf16_cuda(uint16_t* dlogits, const uint16_t* logits, const float* lse,
                                      const int32_t* targets, const float* dloss, int64_t count, int64_t N, int64_t Vp,
                                      int64_t V, int32_t ignore_index, CUstream_st* stream);

void cross_entropy_fused_bf16_cuda(float* losses, float* lse, uint16_t* dlogits, const uint16_t* logits,
                                   const int32_t* targets, float dloss, int64_t count, int64_t N, int64_t Vp, int64_t V,
                                   int32_t ignore_index, CUstream_st* stream,
                                   CrossEntropyRowReads reads = CrossEntropyRowReads::kDefault);
void cross_entropy_rescale_bf16_cuda(uint16_t* dlogits, const float* dloss, float* assumed, int64_t n,
                                     CUstream_st* stream);

}  // namespace kraken::kernels
