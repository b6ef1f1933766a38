// Matrix products: C = alpha * op(A) * op(B) + beta * C, row-major, op(X) = X or Xᵀ.
//
// Shapes: op(A) is (M, K), op(B) is (K, N), C is (M, N). A is stored (M, K) or, when trans_a, (K, M);
// B likewise. Leading dimensions are the stored row lengths, so contiguous matrices need no lda.
// The batched form walks `batch` matrices at the given element strides (a stride of 0 reuses one
// matrix for the whole batch, e.g. one weight for every batch element).
#pragma once

#include <cstdint>

struct CUstream_st;  // cudaStream_t without including CUDA headers here

namespace kraken::kernels {

void matmul_cpu(float* c, const float* a, const float* b, int64_t M, int64_t N, int64_t K, bool trans_a,
                bool trans_b, float alpha, float beta);

void matmul_batched_cpu(float* c, const float* a, const float* b, int64_t batch, int64_t M, int64_t N,
                        int64_t K, bool trans_a, bool trans_b, float alpha, float beta, int64_t stride_c,
                        int64_t stride_a, int64_t stride_b);

// The BLAS library in use ("OpenBLAS 0.3.21 SkylakeX", or "builtin" when none was found) and its threads.
const char* cpu_blas_name();
void set_cpu_blas_threads(int n);

// CUDA: fp32 data, cuBLAS (TF32 off, so it matches the CPU reference to fp32 rounding).
void matmul_cuda(float* c, const float* a, const float* b, int64_t M, int64_t N, int64_t K, bool trans_a,
                 bool trans_b, float alpha, float beta, CUstream_st* stream);
void matmul_batched_cuda(float* c, const float* a, const float* b, int64_t batch, int64_t M, int64_t N,
                         int64_t K, bool trans_a, bool trans_b, float alpha, float beta, int64_t stride_c,
                         int64_t stride_a, int64_t stride_b, CUstream_st* stream);

// CUDA, mixed precision (kernels/cuda/matmul_lt.cu, cuBLASLt): A and B bf16, products accumulated in
// f32, then the epilogue in f32 — out = op(A)·op(B) (+ bias[n] on every row) (then GELU, GPT-2's tanh
// form) — and out stored as bf16 (rounded to nearest even) or f32. bias (N,) has out's type. K ≥ 1.
enum class MatmulEpilogue { kNone, kBias, kGelu, kBiasGelu };
void matmul_bf16_cuda(void* out, bool out_bf16, const uint16_t* a, const uint16_t* b, const void* bias, int64_t M,
                      int64_t N, int64_t K, bool trans_a, bool trans_b, MatmulEpilogue epilogue, CUstream_st* stream);

}  // namespace kraken::kernels
