// Per-device scratch buffers for kernels that need room between two launches (a deterministic two-pass
// reduction's partial sums, the attention backward's Dᵢ). One buffer per (device, slot), grown when a
// call needs more and kept for the process, like cuBLASLt's workspace (matmul_lt.cu): a steady-state
// step allocates nothing. A slot's users run on one stream, one after another; two of them on different
// streams of one device at once would share the buffer.
#pragma once

#include <cstddef>

namespace kraken::kernels::cuda_detail {

// kCudnnAttention: cuDNN's fused attention (attention_cudnn.cu): its execution plan's workspace and, in
// backward, the row sums Dᵢ the graph keeps in global memory.
// kEmbeddingBackward: the embedding backward's id counts, hot rows and their slice sums (embedding.cu).
enum class ScratchSlot { kAttentionDelta, kColumnSums, kCudnnAttention, kEmbeddingBackward, kCount };

// At least `bytes` of device memory, 256-byte aligned. Growing frees the old buffer first (cudaFree waits
// for the kernels still using it).
void* device_scratch(ScratchSlot slot, size_t bytes);

}  // namespace kraken::kernels::cuda_detail
