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
// Each shape runs cuBLASLt's heuristic's first algorithm, or the candidate a committed pick names for the
// device (kernels/cuda/cublaslt_picks.inc; KRAKEN_CUBLASLT_PICKS=0 ignores them); KRAKEN_CUBLASLT_TUNE=n
// (read once, 2–32), a measurement mode, times n of them on each shape's first product and keeps the
// fastest, saying so on stderr with the pick entry that would commit it (bits may then differ from run
// to run).
enum class MatmulEpilogue { kNone, kBias, kGelu, kBiasGelu };
void matmul_bf16_cuda(void* out, bool out_bf16, const uint16_t* a, const uint16_t* b, const void* bias, int64_t M,
                      int64_t N, int64_t K, bool trans_a, bool trans_b, MatmulEpilogue epilogue, CUstream_st* stream);
// The batched form without an epilogue: `batch` products at the given element strides (out's in its
// own type; a stride of 0 reuses one matrix) in one cuBLASLt strided-batch call; one product per matrix
// where K > 32,768 (long sums into few outputs, the weight gradients of large batches: a single product
// splits K, a strided batch did not — kernels/cuda/matmul_lt.cu), where cuBLASLt has no algorithm for the
// batch, or as KRAKEN_CUDA_BATCHED_PRODUCTS says (read once; 1: always batched, 0: never; for measuring
// one against the other).
void matmul_bf16_batched_cuda(void* out, bool out_bf16, const uint16_t* a, const uint16_t* b, int64_t batch, int64_t M,
                              int64_t N, int64_t K, bool trans_a, bool trans_b, int64_t stride_out, int64_t stride_a,
                              int64_t stride_b, CUstream_st* stream);

// The same products with the epilogues that training wants (runtime ops::mlp, ops::linear), everything
// bf16 (operands, out, bias, aux, bias gradients), f32 accumulation and epilogue arithmetic, each output
// rounded once. With P = op(A)·op(B) (M, N):
//   matmul_gelu_aux_bf16_cuda    out = gelu(P + bias[n]), pre = P + bias[n]   (bias may be null: no bias)
//   matmul_dgelu_bf16_cuda       dpre = P ∘ gelu'(pre); where bias_grad is given also
//                                bias_grad[n] = Σ_m dpre[m, n]  (the bias that was added before the GELU)
//   matmul_bias_grad_bf16_cuda   out = P and bias_grad[m] = Σ_k op(A)[m, k]: for dW = dyᵀ·x (A = dy,
//                                trans_a) the weight's and the bias's gradients in one product
// pre (M, N) is laid out like out. GELU is the tanh form (kernels/elementwise.h), gelu' its derivative.
// Each returns false, having written nothing, where it cannot run fused: pre's rows (N) not a multiple
// of 8 elements or pre not 16-byte aligned (cuBLASLt's rule for the GELU aux matrix), M or N zero, or no
// cuBLASLt algorithm for the epilogue at this shape (remembered per plan). The caller then runs the plain
// product and the elementwise kernels instead (runtime/ops/mlp.cpp). Other errors throw. K ≥ 1.
bool matmul_gelu_aux_bf16_cuda(uint16_t* out, uint16_t* pre, const uint16_t* a, const uint16_t* b, const uint16_t* bias,
                               int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b, CUstream_st* stream);
bool matmul_dgelu_bf16_cuda(uint16_t* dpre, uint16_t* bias_grad, const uint16_t* a, const uint16_t* b,
                            const uint16_t* pre, int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b,
                            CUstream_st* stream);
// The two GELU epilogues over `batch` products of one shape (a Kraken layer's sub-layers), at element
// strides: a, b as in matmul_bf16_batched_cuda; out and pre (dpre and pre) at stride_out, which must keep
// the aux matrices' 16 bytes (a multiple of 8); bias (bias_grad) at stride_bias. GELU_AUX: one cuBLASLt
// strided-batch call, or one call per matrix where cuBLASLt has no batched algorithm; DGELU: one call
// per matrix (its batched algorithm measured slower: matmul_lt.cu), every matrix planned before any runs —
// a later matrix's pointers may have other alignments than the first's, so a plan, or a refusal, of their
// own. False, with nothing written, as the single forms return it or where any matrix is refused.
bool matmul_gelu_aux_bf16_batched_cuda(uint16_t* out, uint16_t* pre, const uint16_t* a, const uint16_t* b,
                                       const uint16_t* bias, int64_t batch, int64_t M, int64_t N, int64_t K,
                                       bool trans_a, bool trans_b, int64_t stride_out, int64_t stride_a,
                                       int64_t stride_b, int64_t stride_bias, CUstream_st* stream);
bool matmul_dgelu_bf16_batched_cuda(uint16_t* dpre, uint16_t* bias_grad, const uint16_t* a, const uint16_t* b,
                                    const uint16_t* pre, int64_t batch, int64_t M, int64_t N, int64_t K, bool trans_a,
                                    bool trans_b, int64_t stride_out, int64_t stride_a, int64_t stride_b,
                                    int64_t stride_bias, CUstream_st* stream);
bool matmul_bias_grad_bf16_cuda(uint16_t* out, uint16_t* bias_grad, const uint16_t* a, const uint16_t* b, int64_t M,
                                int64_t N, int64_t K, bool trans_a, bool trans_b, CUstream_st* stream);
// BGRADB over `batch` products of one shape (a Kraken layer's sub-layers' weight and bias gradients): one
// call per matrix, out at stride_out, bias_grad at stride_bias, a and b as in matmul_bf16_batched_cuda.
// Every stride must keep 16 bytes (a multiple of 8 elements); false, with nothing written, where one does
// not or cuBLASLt refuses any matrix's product (each is planned before the first runs).
bool matmul_bias_grad_bf16_batched_cuda(uint16_t* out, uint16_t* bias_grad, const uint16_t* a, const uint16_t* b,
                                        int64_t batch, int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b,
                                        int64_t stride_out, int64_t stride_a, int64_t stride_b, int64_t stride_bias,
                                        CUstream_st* stream);

}  // namespace kraken::kernels
