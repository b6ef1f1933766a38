// fp32 matrix products on the GPU through cuBLAS.
//
// cuBLAS is column-major; our buffers are row-major. A row-major (M, N) matrix is the column-major
// (N, M) matrix of its transpose, so C = op(A)·op(B) is computed as Cᵀ = op(B)ᵀ·op(A)ᵀ with the
// operands swapped and no data moved. TF32 stays off here: this is the path that must match the CPU
// reference; the bf16 cuBLASLt path with fused epilogues belongs to the mixed-precision work.
#include <cublas_v2.h>

#include <mutex>

#include "kernels/cuda/check.h"
#include "kernels/elementwise.h"
#include "kernels/matmul.h"

namespace kraken::kernels {
namespace {

// One handle per device, created on first use. The stream is set per call.
cublasHandle_t handle_for_current_device() {
  static std::mutex mutex;
  static cublasHandle_t handles[64] = {};
  int device = 0;
  KRAKEN_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  if (!handles[device]) {
    KRAKEN_CUBLAS_CHECK(cublasCreate(&handles[device]));
    KRAKEN_CUBLAS_CHECK(cublasSetMathMode(handles[device], CUBLAS_PEDANTIC_MATH));
  }
  return handles[device];
}

}  // namespace

void matmul_batched_cuda(float* c, const float* a, const float* b, int64_t batch, int64_t M, int64_t N,
                         int64_t K, bool trans_a, bool trans_b, float alpha, float beta, int64_t stride_c,
                         int64_t stride_a, int64_t stride_b, CUstream_st* stream) {
  if (batch == 0 || M == 0 || N == 0) return;
  if (K == 0) {
    // An empty inner dimension leaves C = beta·C, as matmul_cpu defines it. cuBLAS would reject the call
    // (a leading dimension of K = 0 is below its minimum of 1) instead of computing that.
    for (int64_t i = 0; i < batch; ++i) {
      float* ci = c + i * stride_c;
      if (beta == 0.0f) fill_cuda(ci, 0.0f, M * N, stream);  // beta = 0 never reads C (it may hold NaN)
      else scale_cuda(ci, ci, beta, M * N, stream);
    }
    return;
  }
  cublasHandle_t handle = handle_for_current_device();
  KRAKEN_CUBLAS_CHECK(cublasSetStream(handle, stream));
  const int lda = static_cast<int>(trans_a ? M : K);
  const int ldb = static_cast<int>(trans_b ? K : N);
  // Column-major view: C'(N, M) = op(B)'(N, K) · op(A)'(K, M).
  KRAKEN_CUBLAS_CHECK(cublasSgemmStridedBatched(
      handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(N),
      static_cast<int>(M), static_cast<int>(K), &alpha, b, ldb, stride_b, a, lda, stride_a, &beta, c,
      static_cast<int>(N), stride_c, static_cast<int>(batch)));
}

void matmul_cuda(float* c, const float* a, const float* b, int64_t M, int64_t N, int64_t K, bool trans_a,
                 bool trans_b, float alpha, float beta, CUstream_st* stream) {
  matmul_batched_cuda(c, a, b, 1, M, N, K, trans_a, trans_b, alpha, beta, 0, 0, 0, stream);
}

}  // namespace kraken::kernels
