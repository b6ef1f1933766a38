// Random fills and dropout masks from the Philox streams of kernels/philox.h. Element i of a fill that
// starts at block `offset` depends only on (seed, stream, offset, i): identical on CPU and GPU and for
// any thread count. Uniform fills use n/4 blocks, normal fills n/2 (Box–Muller on two words per value).
#pragma once

#include <cstdint>

struct CUstream_st;

namespace kraken::kernels {

// Blocks a fill of n elements consumes; the caller advances its offset by this much.
inline uint64_t uniform_blocks(int64_t n) { return static_cast<uint64_t>((n + 3) / 4); }
inline uint64_t normal_blocks(int64_t n) { return static_cast<uint64_t>((n + 1) / 2); }

void fill_uniform_cpu(float* out, int64_t n, float low, float high, uint64_t seed, uint64_t stream, uint64_t offset);
void fill_normal_cpu(float* out, int64_t n, float mean, float std, uint64_t seed, uint64_t stream, uint64_t offset);
// out = x·mask/(1−p) where mask_i = (uniform_i >= p); dx += dout·mask/(1−p) in backward.
void dropout_forward_cpu(float* out, const float* x, int64_t n, float p, uint64_t seed, uint64_t stream, uint64_t offset);
void dropout_backward_cpu(float* dx, const float* dout, int64_t n, float p, uint64_t seed, uint64_t stream,
                          uint64_t offset);

void fill_uniform_cuda(float* out, int64_t n, float low, float high, uint64_t seed, uint64_t stream, uint64_t offset,
                       CUstream_st* s);
void fill_normal_cuda(float* out, int64_t n, float mean, float std, uint64_t seed, uint64_t stream, uint64_t offset,
                      CUstream_st* s);
void dropout_forward_cuda(float* out, const float* x, int64_t n, float p, uint64_t seed, uint64_t stream,
                          uint64_t offset, CUstream_st* s);
void dropout_backward_cuda(float* dx, const float* dout, int64_t n, float p, uint64_t seed, uint64_t stream,
                           uint64_t offset, CUstream_st* s);
// bf16 storage, the same mask (the uniforms do not depend on the data type); f32 arithmetic.
void dropout_forward_bf16_cuda(uint16_t* out, const uint16_t* x, int64_t n, float p, uint64_t seed, uint64_t stream,
                               uint64_t offset, CUstream_st* s);
void dropout_backward_bf16_cuda(uint16_t* dx, const uint16_t* dout, int64_t n, float p, uint64_t seed,
                                uint64_t stream, uint64_t offset, CUstream_st* s);

}  // namespace kraken::kernels
