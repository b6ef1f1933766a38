// bf16 matrix products through cuBLASLt, fp32 accumulation, with the bias and GELU epilogues fused
// into the product's kernel (contract in kernels/matmul.h). Every bf16 product of the model's mixed
// precision comes here (runtime/ops: linear, matmul, the tied LM head).
//
// Row-major to cuBLASLt's column-major as in matmul.cu: C (M, N) = op(A)·op(B) is computed as
// Cᵀ (N, M) = op(B)ᵀ·op(A)ᵀ, B passed first, no data moved. The epilogue's bias vector runs along the
// rows of cuBLASLt's D, which are the columns of our C: one bias per output feature, as a linear layer
// needs. cuBLASLt's GELU epilogue is the tanh form GPT-2 uses (kernels/elementwise.h).
//
// Per device: one cuBLASLt handle and one 32 MiB workspace (cudaMalloc'd once, kept for the process:
// the kernels layer has no allocator of its own, and 32 MiB is what cuBLASLt's fastest Hopper kernels
// ask for). A product's plan (descriptors and the algorithm cuBLASLt's heuristic picked) is kept per
// thread, keyed by everything the heuristic saw: shapes, transposes, output type, epilogue, operand
// alignments and device. A training step repeats the same few dozen products, and the heuristic query
// costs tens of µs of host time per call, which at small batches is time the GPU waits. Only the bias
// pointer changes between calls of one plan; it is set on the plan's descriptor before each product.
#include <cublasLt.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>

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

// What a plan depends on.
struct PlanKey {
  int device;
  int64_t M, N, K;
  bool trans_a, trans_b, out_bf16;
  MatmulEpilogue epilogue;
  // Alignments (bytes) of cuBLASLt's first operand (our B), second (our A), output and bias.
  uint32_t align_first, align_second, align_out, align_bias;
  bool operator==(const PlanKey& o) const {
    return device == o.device && M == o.M && N == o.N && K == o.K && trans_a == o.trans_a &&
           trans_b == o.trans_b && out_bf16 == o.out_bf16 && epilogue == o.epilogue &&
           align_first == o.align_first && align_second == o.align_second && align_out == o.align_out &&
           align_bias == o.align_bias;
  }
};
struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const {
    uint64_t h = 1469598103934665603ULL;  // FNV-1a over the fields
    auto mix = [&h](uint64_t v) { h = (h ^ v) * 1099511628211ULL; };
    mix(static_cast<uint64_t>(k.device));
    mix(static_cast<uint64_t>(k.M));
    mix(static_cast<uint64_t>(k.N));
    mix(static_cast<uint64_t>(k.K));
    mix((k.trans_a ? 1u : 0u) | (k.trans_b ? 2u : 0u) | (k.out_bf16 ? 4u : 0u) |
        (static_cast<uint64_t>(k.epilogue) << 3));
    mix((static_cast<uint64_t>(k.align_first) << 48) | (static_cast<uint64_t>(k.align_second) << 32) |
        (static_cast<uint64_t>(k.align_out) << 16) | k.align_bias);
    return static_cast<size_t>(h);
  }
};
struct Plan {
  LtDescriptors desc;
  cublasLtMatmulAlgo_t algo;
};
// Plans seen by this thread. Bounded: a run whose shapes keep changing (sampling with a growing
// context, say) starts over rather than growing without end.
constexpr size_t kMaxPlans = 512;

cublasLtEpilogue_t lt_epilogue(MatmulEpilogue e) {
  switch (e) {
    case MatmulEpilogue::kNone: return CUBLASLT_EPILOGUE_DEFAULT;
    case MatmulEpilogue::kBias: return CUBLASLT_EPILOGUE_BIAS;
    case MatmulEpilogue::kGelu: return CUBLASLT_EPILOGUE_GELU;
    case MatmulEpilogue::kBiasGelu: return CUBLASLT_EPILOGUE_GELU_BIAS;
  }
  return CUBLASLT_EPILOGUE_DEFAULT;
}

// The descriptors of a product and the heuristic's first choice for it. The bias pointer is the first
// call's (the heuristic may look at it); every call sets its own before the product.
std::unique_ptr<Plan> make_plan(const LtDevice& lt, const PlanKey& k, const void* bias) {
  auto plan = std::make_unique<Plan>();
  LtDescriptors& desc = plan->desc;
  const bool wants_bias = k.epilogue == MatmulEpilogue::kBias || k.epilogue == MatmulEpilogue::kBiasGelu;
  const cudaDataType_t out_type = k.out_bf16 ? CUDA_R_16BF : CUDA_R_32F;
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // cuBLASLt's first operand is our B, its second our A (see the top of the file).
  const cublasOperation_t op_first = k.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = k.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  KRAKEN_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)));
  KRAKEN_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)));
  const cublasLtEpilogue_t ep = lt_epilogue(k.epilogue);
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)));
  if (wants_bias) {
    const int32_t bias_type = out_type;  // the bias has the output's type (cuBLASLt's rule for non-fp8 kernels)
    KRAKEN_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    KRAKEN_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)));
  }
  // Column-major shapes as stored: our B is (K, N) row-major = (N, K) column-major, or (K, N) when
  // transposed; our A likewise; D (N, M).
  const uint64_t M = static_cast<uint64_t>(k.M), N = static_cast<uint64_t>(k.N), K = static_cast<uint64_t>(k.K);
  const uint64_t first_rows = k.trans_b ? K : N, first_cols = k.trans_b ? N : K;
  const uint64_t second_rows = k.trans_a ? M : K, second_cols = k.trans_a ? K : M;
  KRAKEN_CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&desc.a, CUDA_R_16BF, first_rows, first_cols, static_cast<int64_t>(first_rows)));
  KRAKEN_CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&desc.b, CUDA_R_16BF, second_rows, second_cols, static_cast<int64_t>(second_rows)));
  KRAKEN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&desc.d, out_type, N, M, static_cast<int64_t>(N)));

  KRAKEN_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&desc.pref));
  const uint64_t workspace = kWorkspaceBytes;
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                           &workspace, sizeof(workspace)));
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                           &k.align_first, sizeof(k.align_first)));
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                           &k.align_second, sizeof(k.align_second)));
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                           &k.align_out, sizeof(k.align_out)));
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                           &k.align_out, sizeof(k.align_out)));
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(lt.handle, desc.op, desc.a, desc.b, desc.d, desc.d, desc.pref, 1,
                                                     &heuristic, &found));
  if (found == 0)
    KRAKEN_THROW("matmul_bf16_cuda: cuBLASLt has no algorithm for (", k.M, ", ", k.K, ")", k.trans_a ? "ᵀ" : "",
                 " · (", k.K, ", ", k.N, ")", k.trans_b ? "ᵀ" : "", " with output ", k.out_bf16 ? "bf16" : "f32",
                 " and epilogue ", static_cast<int>(k.epilogue));
  plan->algo = heuristic.algo;
  return plan;
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
  int device = 0;
  KRAKEN_CUDA_CHECK(cudaGetDevice(&device));
  const PlanKey key{device, M, N, K, trans_a, trans_b, out_bf16, epilogue, alignment_of(b), alignment_of(a),
                    alignment_of(out), wants_bias ? alignment_of(bias) : 0u};
  thread_local std::unordered_map<PlanKey, std::unique_ptr<Plan>, PlanKeyHash> plans;
  auto found_plan = plans.find(key);
  if (found_plan == plans.end()) {
    if (plans.size() >= kMaxPlans) plans.clear();
    found_plan = plans.emplace(key, make_plan(lt, key, bias)).first;
  }
  Plan& plan = *found_plan->second;
  if (wants_bias)
    KRAKEN_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan.desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  const float alpha = 1.0f, beta = 0.0f;
  // beta = 0: C is not read; it is passed as D only because the API wants a C.
  KRAKEN_CUBLAS_CHECK(cublasLtMatmul(lt.handle, plan.desc.op, &alpha, b, plan.desc.a, a, plan.desc.b, &beta, out,
                                     plan.desc.d, out, plan.desc.d, &plan.algo, lt.workspace, kWorkspaceBytes, stream));
}

}  // namespace kraken::kernels
