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
void attention_forward_bf16_mma_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, int64_t C,
                                     int64_t NH, CUstream_st* stream);
void attention_backward_bf16_mma_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                      const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                                      CUstream_st* stream);
bool attention_bf16_mma_supported(int64_t D);
void attention_forward_bf16_mma_group_cuda(uint16_t* const* outs, float* const* lses, const uint16_t* const* qkvs,
                                           int64_t count, int64_t B, int64_t T, int64_t C, int64_t NH,
                                           CUstream_st* stream);
void attention_backward_bf16_mma_group_cuda(uint16_t* const* dqkvs, const uint16_t* const* douts,
                                            const uint16_t* const* qkvs, const uint16_t* const* outs,
                                            const float* const* lses, int64_t count, int64_t B, int64_t T, int64_t C,
                                            int64_t NH, CUstream_st* stream);
enum class AttentionWgmmaKernels { kPipelined, kNoPingPong, kLockstep };
AttentionWgmmaKernels attention_wgmma_kernels();
bool attention_wgmma_kernels_allow(bool pipelined, bool ping_pong);
void attention_wgmma_kernels_override(AttentionWgmmaKernels kernels);
void attention_wgmma_kernels_override_reset();
void attention_forward_bf16_wgmma_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T,
                                       int64_t C, int64_t NH, CUstream_st* stream);
void attention_backward_bf16_wgmma_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                        const uint16_t* out, const float* lse, int64_t B, int64_t T, int64_t C,
                                        int64_t NH, CUstream_st* stream);
void attention_backward_bf16_wgmma_overwrite_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                                  const uint16_t* out, const float* lse, int64_t B, int64_t T,
                                                  int64_t C, int64_t NH, CUstream_st* stream);
void attention_backward_bf16_wgmma_lockstep_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                                 const uint16_t* out, const float* lse, int64_t B, int64_t T,
                                                 int64_t C, int64_t NH, CUstream_st* stream);
void attention_backward_bf16_wgmma_kernels_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                                const uint16_t* out, const float* lse, int64_t B, int64_t T,
                                                int64_t C, int64_t NH, bool pipelined_dq, bool pipelined_kv,
                                                bool ping_pong, CUstream_st* stream);
void attention_forward_bf16_wgmma_lockstep_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B,
                                                int64_t T, int64_t C, int64_t NH, CUstream_st* stream);
bool attention_bf16_wgmma_supported(int64_t D);
bool attention_bf16_wgmma_pipelined_supported(int64_t D);
void attention_forward_bf16_wgmma_kernel_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T,
                                              int64_t C, int64_t NH, bool pipelined, bool ping_pong,
                                              CUstream_st* stream);
bool attention_bf16_wgmma_backward_supported(int64_t D);
// The dispatch (kernels/cuda/attention.cu; no cuDNN in the emulation: its calls fall back).
enum class AttentionBf16Kernels { kSimt, kTensorCoreWmma, kTensorCoreMma, kCudnn };
AttentionBf16Kernels attention_bf16_kernels(int64_t D);
void attention_forward_bf16_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, int64_t C,
                                 int64_t NH, CUstream_st* stream);
void attention_backward_bf16_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                  const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH, CUstream_st* stream);
void wgmma_layout_probe_cuda(float* d, const uint16_t* a, const uint16_t* b, int way, bool strides_exchanged,
                             CUstream_st* stream);
void mbarrier_pipeline_probe_cuda(float* sums, const float* x, int tiles, int mutation, CUstream_st* stream);

void attention_forward_cuda(float* out, float* lse, const float* qkv, int64_t B, int64_t T, int64_t C, int64_t NH,
                            CUstream_st* stream);
void attention_backward_cuda(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                             int64_t B, int64_t T, int64_t C, int64_t NH, CUstream_st* stream);
void attention_forward_bf16_simt_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, int64_t C,
                                      int64_t NH, CUstream_st* stream);
void attention_backward_bf16_simt_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                       const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                                       CUstream_st* stream);

// kernels/embedding.h, kernels/softmax.h
void embedding_forward_cuda(float* out, const float* weight, const int32_t* ids, int64_t N, int64_t V, int64_t C,
                            CUstream_st* stream);
void embedding_backward_cuda(float* dweight, const float* dout, const int32_t* ids, int64_t N, int64_t V, int64_t C,
                             CUstream_st* stream);
bool embedding_positions_forward_bf16_cuda(uint16_t* out, const float* weight, const float* positions,
                                           const int32_t* ids, int64_t N, int64_t T, int64_t V, int64_t C,
                                           CUstream_st* stream);
void embedding_backward_bf16_cuda(float* dweight, const uint16_t* dout, const int32_t* ids, int64_t N, int64_t V,
                                  int64_t C, CUstream_st* stream);
void softmax_forward_cuda(float* y, const float* x, int64_t rows, int64_t C, CUstream_st* stream);
void softmax_backward_cuda(float* dx, const float* y, const float* dy, int64_t rows, int64_t C, CUstream_st* stream);

// kernels/random.h
void fill_uniform_cuda(float* out, int64_t n, float low, float high, uint64_t seed, uint64_t stream, uint64_t offset,
                       CUstream_st* s);
void dropout_forward_cuda(float* out, const float* x, int64_t n, float p, uint64_t seed, uint64_t stream,
                          uint64_t offset, CUstream_st* s);
void dropout_backward_cuda(float* dx, const float* dout, int64_t n, float p, uint64_t seed, uint64_t stream,
                           uint64_t offset, CUstream_st* s);

// kernels/optimizer.h
void adamw_update_cuda(float* param, const float* grad, float* m, float* v, int64_t n, float lr, float beta1,
                       float beta2, float eps, float weight_decay, int64_t step, CUstream_st* stream,
                       float grad_scale);
void sgd_update_cuda(float* param, const float* grad, float* velocity, int64_t n, float lr, float momentum,
                     float dampening, bool nesterov, float weight_decay, bool first_step, CUstream_st* stream,
                     float grad_scale);
void sum_squares_accumulate_cuda(double* total, double* partials, const float* x, int64_t n, CUstream_st* stream);
struct AdamWSlice {  // kernels::AdamWSlice
  float* param;
  const float* grad;
  float* m;
  float* v;
  int64_t n;
  float weight_decay;
  uint16_t* copy = nullptr;
};
void adamw_update_many_cuda(const AdamWSlice* slices, int64_t count, float lr, float beta1, float beta2, float eps,
                            int64_t step, CUstream_st* stream, float grad_scale);
struct SgdSlice {  // kernels::SgdSlice
  float* param;
  const float* grad;
  float* velocity;
  int64_t n;
  float weight_decay;
  uint16_t* copy = nullptr;
};
void sgd_update_many_cuda(const SgdSlice* slices, int64_t count, float lr, float momentum, float dampening,
                          bool nesterov, bool first_step, CUstream_st* stream, float grad_scale);
void sum_squares_many_accumulate_cuda(double* total, double* partials, const float* const* xs, const int64_t* sizes,
                                      int64_t count, CUstream_st* stream);

// kernels/layernorm.h
struct LayerNormGroupGradients {
  const float* gamma;
  float* dgamma;
  float* dbeta;
};
void layernorm_backward_grouped_cuda(float* dx, const float* dx_in, const LayerNormGroupGradients* groups, int64_t G,
                                     const float* dout, const float* x, const float* mean, const float* rstd,
                                     int64_t rows_per_group, int64_t C, CUstream_st* stream);
void layernorm_backward_grouped_bf16_cuda(uint16_t* dx, const uint16_t* dx_in, const LayerNormGroupGradients* groups,
                                          int64_t G, const uint16_t* dout, const uint16_t* x, const float* mean,
                                          const float* rstd, int64_t rows_per_group, int64_t C, CUstream_st* stream);
void layernorm_forward_bf16_cuda(uint16_t* out, float* mean, float* rstd, const uint16_t* x, const float* gamma,
                                 const float* beta, int64_t rows, int64_t C, float eps, CUstream_st* stream);
void layernorm_backward_bf16_cuda(uint16_t* dx, const uint16_t* dx_in, float* dgamma, float* dbeta,
                                  const uint16_t* dout, const uint16_t* x, const float* gamma, const float* mean,
                                  const float* rstd, int64_t rows, int64_t C, CUstream_st* stream);
void add_layernorm_forward_bf16_cuda(uint16_t* s, uint16_t* out, float* mean, float* rstd, const uint16_t* a,
                                     const uint16_t* b, const float* gamma, const float* beta, int64_t rows, int64_t C,
                                     float eps, CUstream_st* stream);
bool add_bias_layernorm_forward_bf16_cuda(uint16_t* s, uint16_t* out, float* mean, float* rstd, const uint16_t* a,
                                          const uint16_t* b, const uint16_t* bias, const float* gamma,
                                          const float* beta, int64_t rows, int64_t C, float eps, CUstream_st* stream);
bool layernorm_backward_summing_dx_bf16_cuda(uint16_t* dx, const uint16_t* dx_in, const LayerNormGroupGradients* groups,
                                             int64_t G, uint16_t* dx_sums, const uint16_t* dout, const uint16_t* x,
                                             const float* mean, const float* rstd, int64_t rows_per_group, int64_t C,
                                             CUstream_st* stream);
bool residual_fork_summed_layernorm_bf16_cuda(uint16_t* a, uint16_t* m, uint16_t* out, float* mean, float* rstd,
                                              const uint16_t* x, const uint16_t* y, const float* const* gammas,
                                              const float* const* betas, int64_t G, int64_t rows, int64_t C, float eps,
                                              CUstream_st* stream);
bool residual_fork_summed_layernorm_backward_bf16_cuda(uint16_t* dx, uint16_t* dy,
                                                       const LayerNormGroupGradients* groups, int64_t G,
                                                       const uint16_t* da, const uint16_t* dout, const uint16_t* m,
                                                       const float* mean, const float* rstd, int64_t rows, int64_t C,
                                                       CUstream_st* stream);
void layernorm_forward_cuda(float* out, float* mean, float* rstd, const float* x, const float* gamma,
                            const float* beta, int64_t rows, int64_t C, float eps, CUstream_st* stream);
void layernorm_backward_cuda(float* dx, const float* dx_in, float* dgamma, float* dbeta, const float* dout,
                             const float* x, const float* gamma, const float* mean, const float* rstd, int64_t rows,
                             int64_t C, CUstream_st* stream);

// kernels/cross_entropy.h
enum class CrossEntropyRowReads { kDefault, kTwice, kStagedInSharedMemory, kPipelined };
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
void cross_entropy_forward_cuda(float* losses, float* lse, const float* logits, const int32_t* targets, int64_t N,
                                int64_t Vp, int64_t V, int32_t ignore_index, CUstream_st* stream);
void cross_entropy_backward_cuda(float* dlogits, const float* logits, const float* lse, const int32_t* targets,
                                 const float* dloss, int64_t count, int64_t N, int64_t Vp, int64_t V,
                                 int32_t ignore_index, CUstream_st* stream);
void cross_entropy_fused_cuda(float* losses, float* lse, float* dlogits, const float* logits, const int32_t* targets,
                              float dloss, int64_t count, int64_t N, int64_t Vp, int64_t V, int32_t ignore_index,
                              CUstream_st* stream, CrossEntropyRowReads reads = CrossEntropyRowReads::kDefault);
void cross_entropy_rescale_cuda(float* dlogits, const float* dloss, float* assumed, int64_t n, CUstream_st* stream);

// kernels/elementwise.h
void add_bf16_cuda(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t n, CUstream_st* stream);
void add_broadcast_bf16_cuda(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t rows, int64_t cols,
                             CUstream_st* stream);
void gelu_forward_bf16_cuda(uint16_t* out, const uint16_t* x, int64_t n, CUstream_st* stream);
void gelu_backward_bf16_cuda(uint16_t* dx, const uint16_t* x, const uint16_t* dout, int64_t n, CUstream_st* stream);
void cast_f32_to_bf16_cuda(uint16_t* out, const float* x, int64_t n, CUstream_st* stream);
void cast_bf16_to_f32_cuda(float* out, const uint16_t* x, int64_t n, CUstream_st* stream);
void cast_f32_to_bf16_many_cuda(uint16_t* const* outs, const float* const* xs, const int64_t* ns, int64_t count,
                                CUstream_st* stream);
void cast_bf16_to_f32_many_cuda(float* const* outs, const uint16_t* const* xs, const int64_t* ns, int64_t count,
                                CUstream_st* stream);
void accumulate_bf16_cuda(float* acc, const uint16_t* x, int64_t n, CUstream_st* stream);
void accumulate_bf16_many_cuda(float* const* accs, const uint16_t* const* xs, const int64_t* ns, int64_t count,
                               CUstream_st* stream);
void zero_many_cuda(float* const* outs, const int64_t* ns, int64_t count, CUstream_st* stream);
void sum_bf16_cuda(uint16_t* out, const uint16_t* const* xs, int64_t count, int64_t n, CUstream_st* stream);
void sum_rows_cuda(float* db, const float* dout, int64_t rows, int64_t cols, CUstream_st* stream);
void sum_rows_bf16_cuda(uint16_t* db, const uint16_t* dout, int64_t rows, int64_t cols, CUstream_st* stream);
void sum_rows_bf16_to_f32_cuda(float* db, const uint16_t* dout, int64_t rows, int64_t cols, CUstream_st* stream);
void sum_rows_grouped_cuda(float* db, const float* dout, int64_t groups, int64_t rows, int64_t cols,
                           CUstream_st* stream);
void sum_rows_grouped_bf16_cuda(uint16_t* db, const uint16_t* dout, int64_t groups, int64_t rows, int64_t cols,
                                CUstream_st* stream);
bool sum_rows_skipping_bf16_cuda(uint16_t* db, const uint16_t* dout, int64_t groups, int64_t rows, int64_t cols,
                                 int64_t skip_first, int64_t skip_count, CUstream_st* stream);
bool residual_fork_bf16_cuda(uint16_t* a, uint16_t* m, const uint16_t* x, const uint16_t* y, const uint16_t* s,
                             int64_t blocks, int64_t per_block, CUstream_st* stream);
bool residual_fork_backward_bf16_cuda(uint16_t* dy, uint16_t* ds, const uint16_t* da, const uint16_t* dm,
                                      int64_t blocks, int64_t per_block, CUstream_st* stream);
bool residual_fork_summed_bf16_cuda(uint16_t* a, uint16_t* m, const uint16_t* x, const uint16_t* y, int64_t blocks,
                                    int64_t per_block, CUstream_st* stream);
bool residual_fork_summed_backward_bf16_cuda(uint16_t* dx, uint16_t* dy, const uint16_t* da, const uint16_t* dm,
                                             int64_t blocks, int64_t per_block, CUstream_st* stream);

}  // namespace kraken::kernels_emu
