// bf16 matrix products through cuBLASLt, fp32 accumulation, with the bias and GELU epilogues fused
// into the product's kernel (contract in kernels/matmul.h). The start of mixed precision: nothing in
// the model calls it yet.
//
// Row-major to cuBLASLt's column-major as in matmul.cu: C (M, N) = op(A)·op(B) is computed as
// Cᵀ (N, M) = op(B)ᵀ·op(A)ᵀ, B passed first, no data moved. The epilogue's bias vector runs along the
// rows of cuBLASLt's D, which are the columns of our C: one bias per output feature, as a linear layer
// needs. cuBLASLt's GELU epilogue is the tanh form GPT-2 uses (kernels/elementwise.h).
//
// Per device: one cuBLASLt handle and one 32 MiB workspace (cudaMalloc'd once, kept for the process:
// the kernels layer has no allocator of its own, and 32 MiB is what cuBLASLt's fastest Hopper kernels
// ask for). Descriptors are made per call; their cost (~µs) is small next to a product worth running
// on tensor cores.
#include <cublasLt.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <mutex>

#include "kernels/cuda/check.h"
#include "kernels/matmul.h"

namespace kraken::kernels {
namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;

struct LtDevice {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
};

LtDevice& lt_for_current_device() {
  static std::mutex mutex;
  static LtDevice devices[64];
  int device = 0;
  KRAKEN_CUDA_CHECK(cudaGetDevice(&device));
  KRAKEN_CHECK(device >= 0 && device < 64, "device ", device);
  std::lock_guard<std::mutex> lock(mutex);
  LtDevice& d = devices[device];
  if (!d.handle) {
    KRAKEN_CUBLAS_CHECK(cublasLtCreate(&d.handle));
    KRAKEN_CUDA_CHECK(cudaMalloc(&d.workspace, kWorkspaceBytes));
  }
  return d;
}

// The largest power of two (≤ 256) dividing the address: what the heuristic may assume.
uint32_t alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

// Descriptors released however the call ends.
struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

cublasLtEpilogue_t lt_epilogue(MatmulEpilogue e) {
  switch (e) {
    case MatmulEpilogue::kNone: return CUBLASLT_EPILOGUE_DEFAULT;
    case MatmulEpilogue::kBias: return CUBLASLT_EPILOGUE_BIAS;
    case MatmulEpilogue::kGelu: return CUBLASLT_EPILOGUE_GELU;
    case MatmulEpilogue::kBiasGelu: return CUBLASLT_EPILOGUE_GELU_BIAS;
  }
  return CUBLASLT_EPILOGUE_DEFAULT;
}

}  // namespace

void matmul_bf16_cuda(void* out, bool out_bf16, const uint16_t* a, const uint16_t* b, const void* bias, int64_t M,
                      int64_t N, int64_t K, bool trans_a, bool trans_b, MatmulEpilogue epilogue, CUstream_st* stream) {
  const bool wants_bias = epilogue == MatmulEpilogue::kBias || epilogue == MatmulEpilogue::kBiasGelu;
  KRAKEN_CHECK(!wants_bias || bias != nullptr, "matmul_bf16_cuda: the bias epilogue needs a bias vector");
  KRAKEN_CHECK(M >= 0 && N >= 0 && K >= 1 && M < (1LL << 31) && N < (1LL << 31) && K < (1LL << 31), "M=", M, " N=", N,
               " K=", K);
  if (M == 0 || N == 0) return;
  LtDevice& lt = lt_for_current_device();
  const cudaDataType_t out_type = out_bf16 ? CUDA_R_16BF : CUDA_R_32F;
  LtDescriptors desc;
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // cuBLASLt's first operand is our B, its second our A (see the top of the file).
  const cublasOperation_t op_first = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)));
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)));
  const cublasLtEpilogue_t ep = lt_epilogue(epilogue);
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)));
  if (wants_bias) {
    const int32_t bias_type = out_type;  // the bias has the output's type (cuBLASLt's rule for non-fp8 kernels)
    KRAKEN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    KRAKEN_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)));
  }
  // Column-major shapes as stored: our B is (K, N) row-major = (N, K) column-major, or (K, N) when
  // transposed; our A likewise; D (N, M).
  const uint64_t first_rows = static_cast<uint64_t>(trans_b ? K : N), first_cols = static_cast<uint64_t>(trans_b ? N : K);
  const uint64_t second_rows = static_cast<uint64_t>(trans_a ? M : K), second_cols = static_cast<uint64_t>(trans_a ? K : M);
  KRAKEN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&desc.a, CUDA_R_16BF, first_rows, first_cols, static_cast<int64_t>(first_rows)));
  KRAKEN_CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&desc.b, CUDA_R_16BF, second_rows, second_cols, static_cast<int64_t>(second_rows)));
  KRAKEN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&desc.d, out_type, static_cast<uint64_t>(N), static_cast<uint64_t>(M),
                                                 static_cast<int64_t>(N)));

  KRAKEN_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&desc.pref));
  const uint64_t workspace = kWorkspaceBytes;
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                                           sizeof(workspace)));
  const uint32_t align_first = alignment_of(b), align_second = alignment_of(a), align_out = alignment_of(out);
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                           &align_first, sizeof(align_first)));
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                           &align_second, sizeof(align_second)));
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                           &align_out, sizeof(align_out)));
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                           &align_out, sizeof(align_out)));
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(lt.handle, desc.op, desc.a, desc.b, desc.d, desc.d, desc.pref, 1,
                                                     &heuristic, &found));
  if (found == 0)
    KRAKEN_THROW("matmul_bf16_cuda: cuBLASLt has no algorithm for (", M, ", ", K, ")", trans_a ? "ᵀ" : "", " · (", K,
                 ", ", N, ")", trans_b ? "ᵀ" : "", " with output ", out_bf16 ? "bf16" : "f32", " and epilogue ",
                 static_cast<int>(epilogue));
  const float alpha = 1.0f, beta = 0.0f;
  // beta = 0: C is not read; it is passed as D only because the API wants a C.
  KRAKEN_CUBLAS_CHECK(cublasLtMatmul(lt.handle, desc.op, &alpha, b, desc.a, a, desc.b, &beta, out, desc.d, out, desc.d,
                                     &heuristic.algo, lt.workspace, kWorkspaceBytes, stream));
}

}  // namespace kraken::kernels
