// The entry points of the emulated CUDA kernels (the *_emu.cpp files compile kernels/cuda/*.cu with
// the namespace kraken::kernels renamed kraken::kernels_emu, so they link beside the real ones). The
// signatures are those of kernels/*.h; a mismatch is a link error.
#pragma once

#include <cstdint>

#include "tests/cuda_emu/schedule.h"

struct CUstream_st;

namespace kraken::kernels_emu {

// kernels/attention.h
void attention_forward_bf16_tc_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, int64_t C,
                                    int64_t NH, CUstream_st* stream);
void attention_backward_bf16_tc_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                     const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                                     CUstream_st* stream);
bool attention_bf16_tc_supported(int64_t D);

// kernels/layernorm.h
void layernorm_forward_bf16_cuda(uint16_t* out, float* mean, float* rstd, const uint16_t* x, const float* gamma,
                                 const float* beta, int64_t rows, int64_t C, float eps, CUstream_st* stream);
void layernorm_backward_bf16_cuda(uint16_t* dx, float* dgamma, float* dbeta, const uint16_t* dout, const uint16_t* x,
                                  const float* gamma, const float* mean, const float* rstd, int64_t rows, int64_t C,
                                  CUstream_st* stream);
void layernorm_forward_cuda(float* out, float* mean, float* rstd, const float* x, const float* gamma,
                            const float* beta, int64_t rows, int64_t C, float eps, CUstream_st* stream);
void layernorm_backward_cuda(float* dx, float* dgamma, float* dbeta, const float* dout, const float* x,
                             const float* gamma, const float* mean, const float* rstd, int64_t rows, int64_t C,
                             CUstream_st* stream);

// kernels/cross_entropy.h
void cross_entropy_forward_bf16_cuda(float* losses, float* lse, const uint16_t* logits, const int32_t* targets,
                                     int64_t N, int64_t Vp, int64_t V, int32_t ignore_index, CUstream_st* stream);
void cross_entropy_backward_bf16_cuda(uint16_t* dlogits, const uint16_t* logits, const float* lse,
                                      const int32_t* targets, const float* dloss, int64_t count, int64_t N, int64_t Vp,
                                      int64_t V, int32_t ignore_index, CUstream_st* stream);

// kernels/elementwise.h
void add_bf16_cuda(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t n, CUstream_st* stream);
void gelu_forward_bf16_cuda(uint16_t* out, const uint16_t* x, int64_t n, CUstream_st* stream);
void gelu_backward_bf16_cuda(uint16_t* dx, const uint16_t* x, const uint16_t* dout, int64_t n, CUstream_st* stream);

}  // namespace kraken::kernels_emu
