// Optimizer kernels: fused AdamW and SGD updates, deterministic sums of squares (the global gradient
// norm), and the three reductions OptEx's kernelized gradient estimator needs (squared distances,
// squared norms over a coordinate subset, and a weighted sum of history rows).
//
// AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019; the update of
// PyTorch's torch.optim.AdamW), per element, for step t >= 1 (the caller counts t from 1):
//   p ← p·(1 − lr·wd)                                       (decoupled weight decay, before the step)
//   m ← β1·m + (1 − β1)·g
//   v ← β2·v + (1 − β2)·g²
//   p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps)
// The bias corrections 1 − β^t are computed once per call in double and rounded to f32 (as PyTorch
// does with its Python-float scalars); everything per element is f32.
//
// Both take g = grad_scale·grad: gradient clipping by global norm folded into the update, which saves a
// pass over every gradient (grad_scale = 1 leaves g bit for bit, and a separate scaling pass would
// compute the same products).
//
// SGD (PyTorch's torch.optim.SGD), per element:
//   d ← g + wd·p                                            (coupled L2 weight decay, when wd ≠ 0)
//   if momentum ≠ 0:
//     b ← d                               on the first step (PyTorch's buffer starts as a copy of d)
//     b ← momentum·b + (1 − dampening)·d  afterwards
//     d ← d + momentum·b   (nesterov)   or   d ← b
//   p ← p − lr·d
//
// Determinism: CPU kernels split n into fixed blocks (kernels/cpu/optimizer.cpp) and threads take whole
// blocks, so every element runs the same instructions whatever OMP_NUM_THREADS is, and every sum is
// accumulated in double in one fixed order: results are bit-identical for any thread count. The CUDA
// reductions use a fixed grid and a fixed tree, so they are reproducible run to run on one GPU (they
// need not equal the CPU's bits).
#pragma once

#include <cstdint>

struct CUstream_st;

namespace kraken::kernels {

// ---- CPU ---------------------------------------------------------------------------------------
// param, grad, m, v: n floats each; step = t >= 1.
void adamw_update_cpu(float* param, const float* grad, float* m, float* v, int64_t n, float lr, float beta1,
                      float beta2, float eps, float weight_decay, int64_t step, float grad_scale = 1.0f);
// velocity may be null when momentum == 0. first_step selects b ← d (PyTorch's first use of the buffer).
void sgd_update_cpu(float* param, const float* grad, float* velocity, int64_t n, float lr, float momentum,
                    float dampening, bool nesterov, float weight_decay, bool first_step, float grad_scale = 1.0f);

// Σ_k Σ_i xs[k][i]² over `count` buffers of sizes[k] floats, in double: each buffer in fixed blocks,
// the buffers in the order given. The square of the global gradient norm.
double sum_squares_multi_cpu(const float* const* xs, const int64_t* sizes, int64_t count);

// out[r] = Σ_i (q[i] − rows[r][i])² in double, for r < count: the squared distances from one query
// point to `count` history points of n floats. Differences are taken directly (not via norms and dot
// products) so that nearby points lose no digits to cancellation.
void squared_distances_cpu(double* out, const float* q, const float* const* rows, int64_t count, int64_t n);
// The same over a coordinate subset: Σ_j (a[idx[j]] − b[idx[j]])², j < m.
double squared_distance_indexed_cpu(const float* a, const float* b, const int32_t* idx, int64_t m);
// Σ_j a[idx[j]]², j < m.
double sum_squares_indexed_cpu(const float* a, const int32_t* idx, int64_t m);
// out[i] = Σ_r weights[r]·rows[r][i] (accumulated in double in r order, stored as f32), i < n.
void weighted_sum_rows_cpu(float* out, const float* const* rows, const double* weights, int64_t count, int64_t n);

// ---- CUDA (same contracts; fp32 master weights and state) -----------------------------------------
void adamw_update_cuda(float* param, const float* grad, float* m, float* v, int64_t n, float lr, float beta1,
                       float beta2, float eps, float weight_decay, int64_t step, CUstream_st* stream,
                       float grad_scale = 1.0f);
void sgd_update_cuda(float* param, const float* grad, float* velocity, int64_t n, float lr, float momentum,
                     float dampening, bool nesterov, float weight_decay, bool first_step, CUstream_st* stream,
                     float grad_scale = 1.0f);

// Many tensors in a few launches (a model's 150 parameters in 5, not 150): one AdamW update of each
// slice (param, grad, m, v of n floats, its own weight decay), the same arithmetic per element as
// adamw_update_cuda, bit for bit. The slice array is host memory; the pointers are device memory.
// copy (may be null): n bf16 values that the update also writes, each new parameter rounded to nearest
// even — the bf16 copy mixed precision computes with, in the same pass instead of a cast of its own.
struct AdamWSlice {
  float* param;
  const float* grad;
  float* m;
  float* v;
  int64_t n;
  float weight_decay;
  uint16_t* copy = nullptr;
};
void adamw_update_many_cuda(const AdamWSlice* slices, int64_t count, float lr, float beta1, float beta2, float eps,
                            int64_t step, CUstream_st* stream, float grad_scale = 1.0f);

// SGD over many tensors the same way: one sgd_update_cuda of each slice (param, grad, velocity — null
// when momentum is 0 — of n floats, its own weight decay), bit for bit; copy as for AdamW.
struct SgdSlice {
  float* param;
  const float* grad;
  float* velocity;
  int64_t n;
  float weight_decay;
  uint16_t* copy = nullptr;
};
void sgd_update_many_cuda(const SgdSlice* slices, int64_t count, float lr, float momentum, float dampening,
                          bool nesterov, bool first_step, CUstream_st* stream, float grad_scale = 1.0f);

// Device reductions write into device doubles. `partials` is a device scratch of
// kReducePartials doubles, reused by every call on the same stream.
constexpr int kReducePartials = 512;
// *total += Σ_i x[i]²  (total: one device double).
void sum_squares_accumulate_cuda(double* total, double* partials, const float* x, int64_t n, CUstream_st* stream);
// *total += Σ_k Σ_i xs[k][i]² over `count` tensors of sizes[k] floats (xs and sizes host arrays of
// device pointers): a few launches for all of them, a fixed order (not sum_squares_accumulate_cuda's).
void sum_squares_many_accumulate_cuda(double* total, double* partials, const float* const* xs, const int64_t* sizes,
                                      int64_t count, CUstream_st* stream);
// *total += Σ_i (a[i] − b[i])².
void squared_distance_accumulate_cuda(double* total, double* partials, const float* a, const float* b, int64_t n,
                                      CUstream_st* stream);
// *total += Σ_j (a[idx[j]] − b[idx[j]])²; b may be null for Σ_j a[idx[j]]² (idx on the device).
void squared_distance_indexed_accumulate_cuda(double* total, double* partials, const float* a, const float* b,
                                              const int32_t* idx, int64_t m, CUstream_st* stream);
// out[i] = Σ_r weights[r]·rows[r][i]; `rows` and `weights` are host arrays (the rows point to device
// memory). Up to kWeightedRowsPerLaunch rows are summed in double in one pass; longer lists continue
// in further passes that add to out in f32.
constexpr int kWeightedRowsPerLaunch = 64;
void weighted_sum_rows_cuda(float* out, const float* const* rows, const double* weights, int64_t count, int64_t n,
                            CUstream_st* stream);

}  // namespace kraken::kernels
