// Layer normalisation over the last dimension (Ba, Kiros, Hinton 2016, eq. 3–4), as GPT-2 uses it.
//
// Shapes: x, out, dx, dx_in, dout (rows, C) contiguous; gamma, beta, dgamma, dbeta (C,); mean, rstd (rows,).
// beta may be null: a LayerNorm without bias (then dbeta is null too).
// Forward, per row r:
//   μ_r = (1/C) Σ_c x[r, c],   σ²_r = (1/C) Σ_c (x[r, c] − μ_r)²,   rstd_r = 1/√(σ²_r + eps)
//   x̂[r, c] = (x[r, c] − μ_r)·rstd_r,   out[r, c] = x̂[r, c]·gamma[c] + beta[c]
// mean and rstd are what backward needs besides x and gamma; either may be null (inference).
// Backward, with g = dout ∘ gamma (the gradient of x̂):
//   dx[r, :]  = dx_in[r, :] + rstd_r·(g − mean_c(g) − x̂[r, :]·mean_c(g ∘ x̂[r, :]))
//   dgamma    += Σ_r dout[r, :] ∘ x̂[r, :],    dbeta += Σ_r dout[r, :]
// dx_in is the gradient that reaches x by other paths, added in the same pass (summed in f32, rounded
// once): dx itself to accumulate in place, another buffer, or null for none (dx is then only written,
// never read — no zeroing pass, no read of it). dgamma and dbeta accumulate (the caller zeroes them for
// "="). A null gradient pointer means nobody needs that gradient and it is not computed. dgamma and
// dbeta are reduced in an order fixed by `rows` alone (fixed row blocks summed in block order on the
// CPU, one fixed tree per column on the GPU), so they are bit-identical for any thread count.
#pragma once

#include <cstdint>

struct CUstream_st;

namespace kraken::kernels {

// ---- CPU ---------------------------------------------------------------------------------------
void layernorm_forward_cpu(float* out, float* mean, float* rstd, const float* x, const float* gamma,
                           const float* beta, int64_t rows, int64_t C, float eps);
void layernorm_backward_cpu(float* dx, const float* dx_in, float* dgamma, float* dbeta, const float* dout,
                            const float* x, const float* gamma, const float* mean, const float* rstd, int64_t rows,
                            int64_t C);

// ---- CUDA (same contracts, fp32) ----------------------------------------------------------------
// Where C is a multiple of 8 up to 1024 and dx and the parameters' gradients are both wanted, the CUDA
// backward computes all three in one pass over dout and x (kernels/cuda/layernorm.cu).
void layernorm_forward_cuda(float* out, float* mean, float* rstd, const float* x, const float* gamma,
                            const float* beta, int64_t rows, int64_t C, float eps, CUstream_st* stream);
void layernorm_backward_cuda(float* dx, const float* dx_in, float* dgamma, float* dbeta, const float* dout,
                             const float* x, const float* gamma, const float* mean, const float* rstd, int64_t rows,
                             int64_t C, CUstream_st* stream);

// ---- CUDA, grouped: G blocks of rows, each with its own gamma and gradients ------------------------
// dx, dx_in, dout, x (G · rows_per_group, C) and mean, rstd (G · rows_per_group,): block g, rows
// [g · rows_per_group, (g + 1) · rows_per_group), normalised with groups[g].gamma; its dgamma, dbeta
// (either may be null) accumulate as above. The same results as G calls of layernorm_backward_cuda, in
// one launch (of up to 16 groups) where the one pass applies: a Kraken layer's sub-layers, whose
// 32-row chunks alone would fill a quarter of an H100 at B = 8. groups is a host array.
struct LayerNormGroupGradients {
  const float* gamma;
  float* dgamma;
  float* dbeta;
};
void layernorm_backward_grouped_cuda(float* dx, const float* dx_in, const LayerNormGroupGradients* groups, int64_t G,
                                     const float* dout, const float* x, const float* mean, const float* rstd,
                                     int64_t rows_per_group, int64_t C, CUstream_st* stream);

// ---- CUDA, the residual add fused into the LayerNorm after it --------------------------------------
// s = a + b (rounded to the storage type and stored), out = layernorm(s) computed from the stored s:
// exactly what add followed by layernorm computes, in one pass over a and b instead of a pass that
// writes s and another that reads it back. Backward needs no kernel of its own: the layernorm
// backward's dx_in is the residual stream's gradient of s.
void add_layernorm_forward_cuda(float* s, float* out, float* mean, float* rstd, const float* a, const float* b,
                                const float* gamma, const float* beta, int64_t rows, int64_t C, float eps,
                                CUstream_st* stream);
void add_layernorm_forward_bf16_cuda(uint16_t* s, uint16_t* out, float* mean, float* rstd, const uint16_t* a,
                                     const uint16_t* b, const float* gamma, const float* beta, int64_t rows, int64_t C,
                                     float eps, CUstream_st* stream);

// ---- CUDA, bf16: a product's bias added in the LayerNorm's pass too (ops::add_bias_layernorm) -------
// GPT-2's attention and MLP projections end in a bias and the residual add, and the LayerNorm after the
// add already reads the add's gradient in backward: the bias's gradient Σ_rows ds is summed there, where
// the product's backward read ds again for it (0.8–1 ms of GPT-2's step at B = 64 by bytes).
// Forward: s = a + (b + bias), b + bias rounded to bf16 first and the sum rounded again (the bits of
// add_broadcast_bf16_cuda then add_bf16_cuda), then out = layernorm(s) as add_layernorm_forward_bf16_cuda.
// bias (C,) bf16; for the Kraken layer's G stacked sub-layers one call per block of rows, each with its
// sub-layer's bias. Backward, for G groups of rows_per_group rows (layernorm_backward_grouped_bf16_cuda's
// dx, dgamma, dbeta) and, in the same pass, dx_sums[g·C + c] = Σ_r dx[g, r, c] over dx as stored (f32,
// rounded once to bf16; written, not accumulated) — rows summed in another order than sum_rows_bf16_cuda's
// (the LayerNorm backward's chunks of 32 rows). Both need C a multiple of 8 (forward up to 2048, backward
// up to 1024), rows ≥ 1 and every buffer 16-byte aligned (dx_sums: each group's row); false otherwise,
// nothing written.
bool add_bias_layernorm_forward_bf16_cuda(uint16_t* s, uint16_t* out, float* mean, float* rstd, const uint16_t* a,
                                          const uint16_t* b, const uint16_t* bias, const float* gamma,
                                          const float* beta, int64_t rows, int64_t C, float eps, CUstream_st* stream);
bool layernorm_backward_summing_dx_bf16_cuda(uint16_t* dx, const uint16_t* dx_in, const LayerNormGroupGradients* groups,
                                             int64_t G, uint16_t* dx_sums, const uint16_t* dout, const uint16_t* x,
                                             const float* mean, const float* rstd, int64_t rows_per_group, int64_t C,
                                             CUstream_st* stream);

// ---- CUDA, bf16 activations ---------------------------------------------------------------------
// x, out, dout, dx bf16; gamma, beta, their gradients, mean and rstd f32 (parameters stay f32 in
// mixed precision). Arithmetic in f32; out and dx rounded once (dx: after adding dx_in).
void layernorm_forward_bf16_cuda(uint16_t* out, float* mean, float* rstd, const uint16_t* x, const float* gamma,
                                 const float* beta, int64_t rows, int64_t C, float eps, CUstream_st* stream);
void layernorm_backward_bf16_cuda(uint16_t* dx, const uint16_t* dx_in, float* dgamma, float* dbeta,
                                  const uint16_t* dout, const uint16_t* x, const float* gamma, const float* mean,
                                  const float* rstd, int64_t rows, int64_t C, CUstream_st* stream);
void layernorm_backward_grouped_bf16_cuda(uint16_t* dx, const uint16_t* dx_in, const LayerNormGroupGradients* groups,
                                          int64_t G, const uint16_t* dout, const uint16_t* x, const float* mean,
                                          const float* rstd, int64_t rows_per_group, int64_t C, CUstream_st* stream);

// The Kraken layer's residual fork with S summed in it and each sub-layer's LN2 after it, in one pass per
// row (runtime ops::residual_fork_summed_layernorm): x and y (G, rows, C), group g's gamma and beta
// (beta null: none), mean and rstd (G·rows):
//   S = Σ_g x[g] (in f32 from 0 in g order, rounded once);  a[g] = x[g] + y[g];  m[g] = y[g] + S;
//   out[g] = layernorm(m[g]) with gammas[g], betas[g]
// — the bits of residual_fork_summed_bf16_cuda then layernorm_forward_bf16_cuda on each group's m, where
// LN2 read m back (n passes over a stream's size a layer). 2 ≤ G ≤ kMaxForkNormGroups, C a multiple of 8
// up to 2048 (the LayerNorm forward's rows in registers), every buffer 16-byte aligned; false otherwise,
// nothing written.
constexpr int kMaxForkNormGroups = 8;
bool residual_fork_summed_layernorm_bf16_cuda(uint16_t* a, uint16_t* m, uint16_t* out, float* mean, float* rstd,
                                              const uint16_t* x, const uint16_t* y, const float* const* gammas,
                                              const float* const* betas, int64_t G, int64_t rows, int64_t C, float eps,
                                              CUstream_st* stream);
// Its backward in one pass per row position: given da (a's gradient) and dout (LN2's output's),
//   dm[g] = layernorm_backward(dout[g]) on m[g] (rounded to bf16, never stored);  ds = Σ_g dm[g] (f32 from 0
//   in g order, rounded once);  dy[g] = da[g] + dm[g];  dx[g] = da[g] + ds;
//   dgamma[g] += Σ_rows dout[g] ∘ m̂[g],  dbeta[g] += Σ_rows dout[g]  (each where non-null)
// — the bits of layernorm_backward_grouped_bf16_cuda (dx_in null) then residual_fork_summed_backward_bf16_cuda,
// whose dm went to memory and back (two passes over the G streams a layer). The slices of the dgamma and
// dbeta sums take 64·G·C bytes of shared memory a block (the grouped backward's 32-row chunks, every group
// at once). dx may be da and dy dout. G = 2 or 4 with G·⌈C/256⌉ ≤ 12 (C a multiple of 8 up to 1024), rows ≥ 1,
// every buffer 16-byte aligned and the slices within the device's shared memory; false otherwise, nothing written.
bool residual_fork_summed_layernorm_backward_bf16_cuda(uint16_t* dx, uint16_t* dy,
                                                       const LayerNormGroupGradients* groups, int64_t G,
                                                       const uint16_t* da, const uint16_t* dout, const uint16_t* m,
                                                       const float* mean, const float* rstd, int64_t rows, int64_t C,
                                                       CUstream_st* stream);

}  // namespace kraken::kernels
