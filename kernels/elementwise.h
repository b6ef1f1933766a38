// Elementwise kernels on contiguous buffers of n elements.
//
// GELU is GPT-2's tanh form: gelu(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
// Gradients accumulate: *_backward adds into dx (the caller zeroes dx when it wants "=").
#pragma once

#include <cstdint>

struct CUstream_st;

namespace kraken::kernels {

// ---- CPU ---------------------------------------------------------------------------------------
void fill_cpu(float* out, float value, int64_t n);
void add_cpu(float* out, const float* a, const float* b, int64_t n);                  // out = a + b
void axpy_cpu(float* y, const float* x, float alpha, int64_t n);                       // y += alpha·x
void scale_cpu(float* out, const float* x, float alpha, int64_t n);                    // out = alpha·x
void mul_cpu(float* out, const float* a, const float* b, int64_t n);                  // out = a ∘ b
// out[r, :] = a[r, :] + b[:]  for r < rows: broadcasting a trailing block (a bias, positions). out may
// be a (each element is read before it is written, by the same thread), as for add, scale and mul.
void add_broadcast_cpu(float* out, const float* a, const float* b, int64_t rows, int64_t cols);
// db[:] += Σ_r dout[r, :]: the gradient of the broadcast operand.
void sum_rows_cpu(float* db, const float* dout, int64_t rows, int64_t cols);
void gelu_forward_cpu(float* out, const float* x, int64_t n);
void gelu_backward_cpu(float* dx, const float* x, const float* dout, int64_t n);       // dx += gelu'(x)·dout
void cast_f32_to_bf16_cpu(uint16_t* out, const float* x, int64_t n);                  // round to nearest even
void cast_bf16_to_f32_cpu(float* out, const uint16_t* x, int64_t n);
// The same casts over `count` tensors: outs[k] = cast(xs[k]), ns[k] elements each (the arrays are host
// memory; on CUDA the pointers are device memory). Each output is the bits its own one-tensor cast gives;
// on CUDA they take one launch per kCastsPerLaunch tensors, not one each (the mixed-precision model
// casts each layer's weights so where the optimizer has not written their bf16 copies, and their
// gradients back: ~100–200 tensors per step, most of them biases too small to be worth a launch of
// their own).
void cast_f32_to_bf16_many_cpu(uint16_t* const* outs, const float* const* xs, const int64_t* ns, int64_t count);
void cast_bf16_to_f32_many_cpu(float* const* outs, const uint16_t* const* xs, const int64_t* ns, int64_t count);
// accs[k][i] += xs[k][i] widened to f32, for `count` tensors: the bits of casting xs[k] to f32 and adding it
// (axpy with alpha 1). Where the mixed-precision model's weight gradients come back onto f32 master
// gradients that already exist (zeroed in place between steps, or a gradient bucket's views), one pass
// and, on CUDA, one launch per kCastsPerLaunch tensors, instead of a cast into a new tensor and an add each.
void accumulate_bf16_many_cpu(float* const* accs, const uint16_t* const* xs, const int64_t* ns, int64_t count);
void cast_i32_to_f32_cpu(float* out, const int32_t* x, int64_t n);
void cast_u16_to_i32_cpu(int32_t* out, const uint16_t* x, int64_t n);
// Σ x as a double: the reduction order is fixed (blocks of 4096, summed in order), so the result does
// not depend on the thread count.
double sum_cpu(const float* x, int64_t n);
double sum_squares_cpu(const float* x, int64_t n);

// ---- CUDA (same contracts; fp32 unless the name says bf16) ---------------------------------------
void fill_cuda(float* out, float value, int64_t n, CUstream_st* stream);
void add_cuda(float* out, const float* a, const float* b, int64_t n, CUstream_st* stream);
void axpy_cuda(float* y, const float* x, float alpha, int64_t n, CUstream_st* stream);
void scale_cuda(float* out, const float* x, float alpha, int64_t n, CUstream_st* stream);
void mul_cuda(float* out, const float* a, const float* b, int64_t n, CUstream_st* stream);
void add_broadcast_cuda(float* out, const float* a, const float* b, int64_t rows, int64_t cols,
                        CUstream_st* stream);
void sum_rows_cuda(float* db, const float* dout, int64_t rows, int64_t cols, CUstream_st* stream);
// The f32 form of sum_rows_grouped_bf16_cuda (below): the bits of a sum_rows_cuda call per block.
void sum_rows_grouped_cuda(float* db, const float* dout, int64_t groups, int64_t rows, int64_t cols,
                           CUstream_st* stream);
void gelu_forward_cuda(float* out, const float* x, int64_t n, CUstream_st* stream);
void gelu_backward_cuda(float* dx, const float* x, const float* dout, int64_t n, CUstream_st* stream);
void cast_f32_to_bf16_cuda(uint16_t* out, const float* x, int64_t n, CUstream_st* stream);
void cast_bf16_to_f32_cuda(float* out, const uint16_t* x, int64_t n, CUstream_st* stream);
constexpr int kCastsPerLaunch = 128;  // tensors per launch of the *_many_cuda casts (their table is a kernel parameter)
void cast_f32_to_bf16_many_cuda(uint16_t* const* outs, const float* const* xs, const int64_t* ns, int64_t count,
                                CUstream_st* stream);
void cast_bf16_to_f32_many_cuda(float* const* outs, const uint16_t* const* xs, const int64_t* ns, int64_t count,
                                CUstream_st* stream);
void accumulate_bf16_many_cuda(float* const* accs, const uint16_t* const* xs, const int64_t* ns, int64_t count,
                               CUstream_st* stream);
// outs[k][0 .. ns[k]) = 0 for `count` f32 tensors, one launch per kCastsPerLaunch (Module::zero_grad: a
// model's ~150–200 gradients, where one cudaMemsetAsync each was as many launches).
void zero_many_cuda(float* const* outs, const int64_t* ns, int64_t count, CUstream_st* stream);
void add_bf16_cuda(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t n, CUstream_st* stream);

// ---- CUDA, bf16 storage ----------------------------------------------------------------------------
// Mixed precision keeps activations and their gradients in bf16 and computes in f32: every kernel
// below widens its bf16 inputs, runs the f32 contract above, and rounds each output to nearest even
// once. An accumulating output (dx +=, db +=) is read, added to in f32 and rounded again. So each
// equals the f32 kernel on the widened inputs followed by one rounding: the CPU reference of the
// ops layer (runtime/ops/precision.h) computes exactly that.
void scale_bf16_cuda(uint16_t* out, const uint16_t* x, float alpha, int64_t n, CUstream_st* stream);
void mul_bf16_cuda(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t n, CUstream_st* stream);
void add_broadcast_bf16_cuda(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t rows, int64_t cols,
                             CUstream_st* stream);
// db[:] += Σ_r dout[r, :], the sum in f32 (same fixed order as sum_rows_cuda), one rounding at the end.
void sum_rows_bf16_cuda(uint16_t* db, const uint16_t* dout, int64_t rows, int64_t cols, CUstream_st* stream);
// The same for `groups` consecutive (rows, cols) blocks of dout, db (groups, cols): db[g] += block g's
// column sums, the bits of a sum_rows_bf16_cuda call per block, in one launch of each of the column
// sums' two passes where cols is a multiple of 8 and rows ≥ 64 (a grouped linear's or MLP's bias
// gradients: the Kraken sub-layers', which took a launch pair per sub-layer), else a call per block.
void sum_rows_grouped_bf16_cuda(uint16_t* db, const uint16_t* dout, int64_t groups, int64_t rows, int64_t cols,
                                CUstream_st* stream);
// sum_rows_grouped_bf16_cuda for the columns outside [skip_first, skip_first + skip_count) alone: their dout
// is never read and db there is left as it is (a bias whose gradient there is zero by the model's
// structure: the keys' third of an attention's qkv bias, runtime/ops.h BiasColumns). The other columns'
// sums are the bits of sum_rows_grouped_bf16_cuda's two-pass sums on the matrix without the skipped
// columns. Returns false, doing nothing, where those do not take the shape: cols, skip_first or skip_count
// not a multiple of 8, dout not 16-byte aligned, rows < 64, or too many chunks for the grid.
bool sum_rows_skipping_bf16_cuda(uint16_t* db, const uint16_t* dout, int64_t groups, int64_t rows, int64_t cols,
                                 int64_t skip_first, int64_t skip_count, CUstream_st* stream);
// db[:] += Σ_r dout[r, :] for an f32 db: the bits of sum_rows_cuda on dout widened to f32 (the token and
// position embedding's position gradient from the bf16 gradient itself, kernels/embedding.h).
void sum_rows_bf16_to_f32_cuda(float* db, const uint16_t* dout, int64_t rows, int64_t cols, CUstream_st* stream);
// acc += x, acc f32: sums of more bf16 tensors than sum_bf16_cuda takes accumulate here and round once.
void accumulate_bf16_cuda(float* acc, const uint16_t* x, int64_t n, CUstream_st* stream);
// out = Σ_k xs[k] for 1 ≤ count ≤ kSumsPerLaunch bf16 tensors of n elements: summed in f32 from 0 in the
// order k = 0, 1, …, rounded once — the bits of accumulate_bf16_cuda over each into f32 zeros, then one
// cast — in one pass (count reads, one write) where that path made count + 2 (sum_list: the Kraken
// model's Σ_j x_j per layer). xs is a host array of device pointers; out may alias none of them.
constexpr int kSumsPerLaunch = 8;
void sum_bf16_cuda(uint16_t* out, const uint16_t* const* xs, int64_t count, int64_t n, CUstream_st* stream);
// The Kraken layer's residual fork (runtime ops::residual_fork): a = x + y and m = y + s, s broadcast over
// the `blocks` blocks of x and y (blocks × per_block elements; s has per_block), both sums in one pass over
// x and y; backward dy = da + dm and ds = Σ_g dm[g] (written; summed in f32 from 0 in block order), in one
// pass over da and dm. Every output has the bits of the separate kernels (add_bf16_cuda,
// add_broadcast_bf16_cuda, sum_rows_bf16_cuda into zeros). They take per_block a multiple of 8 and
// 16-byte aligned pointers (8 elements per access); otherwise they return false, having written nothing.
bool residual_fork_bf16_cuda(uint16_t* a, uint16_t* m, const uint16_t* x, const uint16_t* y, const uint16_t* s,
                             int64_t blocks, int64_t per_block, CUstream_st* stream);
bool residual_fork_backward_bf16_cuda(uint16_t* dy, uint16_t* ds, const uint16_t* da, const uint16_t* dm,
                                      int64_t blocks, int64_t per_block, CUstream_st* stream);
// The same fork with s = Σ_g x[g] (rounded to bf16 once, as sum_bf16_cuda leaves it) summed in the pass
// itself — the Kraken layer's S where its sub-layers share a GPU — so that S never exists in memory:
// forward a = x + y, m = y + s; backward dy = da + dm and dx = da + ds with ds = Σ_g dm[g] (rounded once),
// the bits of sum_bf16_cuda, residual_fork_bf16_cuda, residual_fork_backward_bf16_cuda and then
// add_broadcast_bf16_cuda(dx, da, ds) (sum_stack's backward). dx may be da and dy dm. For 2 to 8 blocks,
// per_block a multiple of 8 and 16-byte aligned pointers; otherwise false, nothing written.
bool residual_fork_summed_bf16_cuda(uint16_t* a, uint16_t* m, const uint16_t* x, const uint16_t* y, int64_t blocks,
                                    int64_t per_block, CUstream_st* stream);
bool residual_fork_summed_backward_bf16_cuda(uint16_t* dx, uint16_t* dy, const uint16_t* da, const uint16_t* dm,
                                             int64_t blocks, int64_t per_block, CUstream_st* stream);
void gelu_forward_bf16_cuda(uint16_t* out, const uint16_t* x, int64_t n, CUstream_st* stream);
void gelu_backward_bf16_cuda(uint16_t* dx, const uint16_t* x, const uint16_t* dout, int64_t n, CUstream_st* stream);

}  // namespace kraken::kernels
