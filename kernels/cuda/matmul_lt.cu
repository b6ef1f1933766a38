// bf16 matrix products through cuBLASLt, fp32 accumulation, with the bias and GELU epilogues fused
// into the product's kernel (contract in kernels/matmul.h). Every bf16 product of the model's mixed
// precision comes here (runtime/ops: linear, matmul, the tied LM head).
//
// Row-major to cuBLASLt's column-major as in matmul.cu: C (M, N) = op(A)·op(B) is computed as
// Cᵀ (N, M) = op(B)ᵀ·op(A)ᵀ, B passed first, no data moved. The epilogue's bias vector runs along the
// rows of cuBLASLt's D, which are the columns of our C: one bias per output feature, as a linear layer
// needs. cuBLASLt's GELU epilogue is the tanh form GPT-2 uses (kernels/elementwise.h).
//
// The training epilogues of GPT-2's MLP (runtime/ops/mlp.cpp), in the same mapping (cublasLt.h's
// comments on cublasLtEpilogue_t and CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_*):
// - GELU_AUX(_BIAS): D = gelu(P + bias) and the aux matrix = P + bias, GELU's input. The aux matrix is
//   shaped like D, (N, M) column-major with leading dimension N — our (M, N) row-major, out's layout —
//   and takes D's type when CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE is left unset (bf16 here). Its
//   leading dimension must be a multiple of 8: N % 8 == 0, or the caller takes the unfused path.
// - DGELU(_BGRAD): D = P ∘ gelu'(aux), aux the forward's pre-activation in the same layout; the BGRAD
//   form also writes the bias gradient into the bias pointer: one value per row of D (our column n),
//   summed over D's columns (our rows m) — the gradient of the bias GELU_AUX_BIAS added.
// - BGRADB: D = P and the bias gradient of cuBLASLt's B, one value per column of D, reduced over the
//   product's K. cuBLASLt's B is our A, D's columns our rows m: bias_grad[m] = Σ_k op(A)[m, k]. For
//   the weight gradient dW (out, in) = dyᵀ·x, op(A) = dyᵀ, that is Σ over the batch rows of dy: the
//   linear layer's bias gradient, from the same read of dy. (BGRADA would sum our B: x, no use here.)
// Bias gradients have D's type (bf16). Where cuBLASLt has no algorithm for one of these epilogues the
// plan remembers it and the entry point returns false; the op then runs the plain product and our own
// elementwise and column-sum kernels, which is also what KRAKEN_CUDA_EPILOGUES=0 runs.
//
// Per device: one cuBLASLt handle and one 32 MiB workspace (cudaMalloc'd once, kept for the process:
// the kernels layer has no allocator of its own, and 32 MiB is what cuBLASLt's fastest Hopper kernels
// ask for). A product's plan (descriptors and the algorithm cuBLASLt's heuristic picked) is kept per
// thread, keyed by everything the heuristic saw: shapes, transposes, output type, epilogue, operand
// alignments and device. A training step repeats the same few dozen products, and the heuristic query
// costs tens of µs of host time per call, which at small batches is time the GPU waits. Only the bias
// and aux pointers change between calls of one plan; they are set on the plan's descriptor before each
// product.
#include <cublasLt.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "kernels/cuda/check.h"
#include "kernels/device_memory.h"
#include "kernels/matmul.h"

namespace kraken::kernels {
namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;

struct LtDevice {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  std::string name;  // cudaDeviceProp::name, for the committed picks below
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
    if (!device_malloc_or_reclaim(&d.workspace, kWorkspaceBytes, device))
      KRAKEN_THROW("cuda:", device, ": cannot allocate cuBLASLt's ", kWorkspaceBytes >> 20, " MiB workspace (out of memory)");
    cudaDeviceProp prop{};
    KRAKEN_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    d.name = prop.name;
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
  int64_t batch;                                        // 1, or a strided batch
  int64_t stride_a, stride_b, stride_out, stride_bias;  // elements between the batch's matrices (batch > 1;
                                                        // the aux matrices at stride_out, like out)
  bool trans_a, trans_b, out_bf16;
  cublasLtEpilogue_t epilogue;
  // Alignments (bytes) of cuBLASLt's first operand (our B), second (our A), output, bias (or bias
  // gradient) and aux matrix (0 where the epilogue has none).
  uint32_t align_first, align_second, align_out, align_bias, align_aux;
  bool operator==(const PlanKey& o) const {
    return device == o.device && M == o.M && N == o.N && K == o.K && batch == o.batch && stride_a == o.stride_a &&
           stride_b == o.stride_b && stride_out == o.stride_out && stride_bias == o.stride_bias && trans_a == o.trans_a &&
           trans_b == o.trans_b && out_bf16 == o.out_bf16 && epilogue == o.epilogue &&
           align_first == o.align_first && align_second == o.align_second && align_out == o.align_out &&
           align_bias == o.align_bias && align_aux == o.align_aux;
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
    mix(static_cast<uint64_t>(k.batch));
    mix(static_cast<uint64_t>(k.stride_a));
    mix(static_cast<uint64_t>(k.stride_b));
    mix(static_cast<uint64_t>(k.stride_out));
    mix(static_cast<uint64_t>(k.stride_bias));
    mix((k.trans_a ? 1u : 0u) | (k.trans_b ? 2u : 0u) | (k.out_bf16 ? 4u : 0u) |
        (static_cast<uint64_t>(k.epilogue) << 3));
    mix((static_cast<uint64_t>(k.align_first) << 48) | (static_cast<uint64_t>(k.align_second) << 32) |
        (static_cast<uint64_t>(k.align_out) << 16) | k.align_bias);
    mix(k.align_aux);
    return static_cast<size_t>(h);
  }
};
struct Plan {
  LtDescriptors desc;
  cublasLtMatmulAlgo_t algo;
  bool supported = true;  // false: cuBLASLt had no algorithm for an epilogue the caller can do without
  // KRAKEN_CUBLASLT_TUNE only: the heuristic's candidates, best first by its own ranking, until the
  // first product times them (tune_plan).
  std::vector<cublasLtMatmulHeuristicResult_t> candidates;
  int pick = 0;  // the heuristic's candidate in use: 0, or a committed pick's
};

// KRAKEN_CUBLASLT_TUNE=n (read once; 2 ≤ n ≤ 32): a measurement mode. Each plan asks the heuristic for n
// algorithms instead of one, and its first product times every one of them on its own operands (a run
// to warm up, then 3 timed; the outputs are overwritten each run, beta = 0, so the result is the chosen
// algorithm's), keeps the fastest and says so on stderr, one line a plan: whether cuBLASLt's first
// choice leaves time on the table (the DGELU product's xmma kernel, 96 µs where the plain product of
// its shape takes 57 at B = 8 on an H100, is the case that asked). The choice follows timings, so bits
// may differ from run to run: for the benchmark, not for training. Unset, 0 or 1: the heuristic's
// first choice, as always.
int tune_candidates() {
  static const int n = cuda_detail::tune_count_from_env("KRAKEN_CUBLASLT_TUNE", 32, "cuBLASLt's algorithms");
  return n;
}
// Committed picks (kernels/cuda/cublaslt_picks.inc says what they are and how one is made).
struct CublasLtPick {
  const char* device;  // null: the end of the table
  size_t version;      // cublasLtGetVersion()
  int64_t M, N, K, batch;
  bool trans_a, trans_b, out_bf16;
  int epilogue;   // a cublasLtEpilogue_t value
  int candidate;  // index into the heuristic's results
};
constexpr CublasLtPick kPicks[] = {
#include "kernels/cuda/cublaslt_picks.inc"
    {nullptr, 0, 0, 0, 0, 0, false, false, false, 0, 0},
};

// KRAKEN_CUBLASLT_PICKS=0 (read once): the heuristic's first choice everywhere, the picks ignored.
bool picks_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("KRAKEN_CUBLASLT_PICKS");
    if (v == nullptr || *v == '\0' || std::string(v) == "1") return true;
    if (std::string(v) == "0") return false;
    KRAKEN_THROW("KRAKEN_CUBLASLT_PICKS=", v, ": expected 0 (ignore the committed picks) or 1 (use them; the default)");
  }();
  return enabled;
}

// The committed candidate index for this product on this device, or 0 (the heuristic's first).
int picked_candidate(const std::string& device, int64_t M, int64_t N, int64_t K, int64_t batch, bool trans_a,
                     bool trans_b, bool out_bf16, int epilogue) {
  if (!picks_enabled()) return 0;
  for (const CublasLtPick* p = kPicks; p->device; ++p)
    if (device == p->device && p->version == cublasLtGetVersion() && p->M == M && p->N == N && p->K == K &&
        p->batch == batch && p->trans_a == trans_a && p->trans_b == trans_b && p->out_bf16 == out_bf16 &&
        p->epilogue == epilogue)
      return p->candidate;
  return 0;
}

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

// Which pointers an epilogue takes: a bias (read), a bias gradient (written, through the same
// attribute), an aux matrix (GELU's input: written forward, read backward).
bool has_bias_pointer(cublasLtEpilogue_t e) {
  return e == CUBLASLT_EPILOGUE_BIAS || e == CUBLASLT_EPILOGUE_GELU_BIAS || e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS ||
         e == CUBLASLT_EPILOGUE_DGELU_BGRAD || e == CUBLASLT_EPILOGUE_BGRADB;
}
bool has_aux(cublasLtEpilogue_t e) {
  return e == CUBLASLT_EPILOGUE_GELU_AUX || e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS || e == CUBLASLT_EPILOGUE_DGELU ||
         e == CUBLASLT_EPILOGUE_DGELU_BGRAD;
}
// The training epilogues have a fallback in the caller: without an algorithm they report it, not throw.
bool optional_epilogue(cublasLtEpilogue_t e) { return has_aux(e) || e == CUBLASLT_EPILOGUE_BGRADB; }

// The descriptors of a product and the heuristic's first choice for it. The bias and aux pointers are
// the first call's (the heuristic looks at their alignment); every call sets its own before the product.
std::unique_ptr<Plan> make_plan(const LtDevice& lt, const PlanKey& k, const void* bias, const void* aux) {
  auto plan = std::make_unique<Plan>();
  LtDescriptors& desc = plan->desc;
  const bool wants_bias = has_bias_pointer(k.epilogue);
  const cudaDataType_t out_type = k.out_bf16 ? CUDA_R_16BF : CUDA_R_32F;
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // cuBLASLt's first operand is our B, its second our A (see the top of the file).
  const cublasOperation_t op_first = k.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = k.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  KRAKEN_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)));
  KRAKEN_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)));
  const cublasLtEpilogue_t ep = k.epilogue;
  KRAKEN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)));
  if (wants_bias) {
    // The bias, and a bias gradient, have the output's type (cuBLASLt's rule for non-fp8 kernels).
    const int32_t bias_type = out_type;
    KRAKEN_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    KRAKEN_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)));
  }
  if (has_aux(k.epilogue)) {
    // GELU's input, laid out as D: (N, M) column-major, leading dimension N (a multiple of 8, checked by
    // the caller). Its type is left unset: D's (bf16).
    const int64_t aux_ld = k.N;
    KRAKEN_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)));
    KRAKEN_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)));
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
  if (k.batch > 1) {  // cuBLASLt's first operand is our B, its second our A
    // The epilogue's vectors and matrices walk the batch too: a bias (or bias gradient) per matrix, and
    // the aux matrix laid out as D.
    if (wants_bias)
      KRAKEN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE,
                                                         &k.stride_bias, sizeof(k.stride_bias)));
    if (has_aux(k.epilogue))
      KRAKEN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE,
                                                         &k.stride_out, sizeof(k.stride_out)));
    const int32_t count = static_cast<int32_t>(k.batch);
    const std::pair<cublasLtMatrixLayout_t, int64_t> layouts[] = {
        {desc.a, k.stride_b}, {desc.b, k.stride_a}, {desc.d, k.stride_out}};
    for (const auto& [layout, stride] : layouts) {
      KRAKEN_CUBLAS_CHECK(
          cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
      KRAKEN_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                           &stride, sizeof(stride)));
    }
  }

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
  const int pick = picked_candidate(lt.name, k.M, k.N, k.K, k.batch, k.trans_a, k.trans_b, k.out_bf16,
                                    static_cast<int>(k.epilogue));
  std::vector<cublasLtMatmulHeuristicResult_t> results(static_cast<size_t>(std::max(tune_candidates(), pick + 1)));
  int found = 0;
  // NOT_SUPPORTED is the heuristic's own "nothing for this configuration" (cublasLt.h), not a failure: the
  // same as no result, which an optional epilogue or a batch answers by declining below.
  const cublasStatus_t searched = cublasLtMatmulAlgoGetHeuristic(
      lt.handle, desc.op, desc.a, desc.b, desc.d, desc.d, desc.pref, static_cast<int>(results.size()), results.data(), &found);
  if (searched == CUBLAS_STATUS_NOT_SUPPORTED) found = 0;
  else KRAKEN_CUBLAS_CHECK(searched);
  if (found == 0 && (optional_epilogue(k.epilogue) || k.batch > 1)) {
    plan->supported = false;
    return plan;
  }
  if (found == 0)
    KRAKEN_THROW("matmul_bf16_cuda: cuBLASLt has no algorithm for (", k.M, ", ", k.K, ")", k.trans_a ? "ᵀ" : "",
                 " · (", k.K, ", ", k.N, ")", k.trans_b ? "ᵀ" : "", " with output ", k.out_bf16 ? "bf16" : "f32",
                 " and cuBLASLt epilogue ", static_cast<int>(k.epilogue));
  // A committed pick where the heuristic still offers that many candidates (else its first).
  plan->algo = results[pick < found ? pick : 0].algo;
  plan->pick = pick < found ? pick : 0;
  if (found > 1 && tune_candidates() > 1)
    plan->candidates.assign(results.begin(), results.begin() + std::min(found, tune_candidates()));
  return plan;
}

// KRAKEN_CUBLASLT_TUNE: times the plan's candidates on this product's operands (a synchronisation: once
// per plan, in a measurement mode), keeps the fastest as the plan's algorithm and reports on stderr.
// Leaves out's contents to the caller's product, which runs next with the chosen algorithm.
void tune_plan(const LtDevice& lt, Plan& plan, const PlanKey& k, void* out, const uint16_t* a, const uint16_t* b,
               CUstream_st* stream) {
  std::vector<cublasLtMatmulHeuristicResult_t> candidates;
  candidates.swap(plan.candidates);
  cudaEvent_t start = nullptr, stop = nullptr;
  KRAKEN_CUDA_CHECK(cudaEventCreate(&start));
  KRAKEN_CUDA_CHECK(cudaEventCreate(&stop));
  const float alpha = 1.0f, beta = 0.0f;
  constexpr int kTimed = 3;
  size_t best = 0;
  std::vector<float> micros(candidates.size(), -1.0f);
  for (size_t i = 0; i < candidates.size(); ++i) {
    auto run = [&] {
      return cublasLtMatmul(lt.handle, plan.desc.op, &alpha, b, plan.desc.a, a, plan.desc.b, &beta, out, plan.desc.d,
                            out, plan.desc.d, &candidates[i].algo, lt.workspace, kWorkspaceBytes, stream);
    };
    if (run() != CUBLAS_STATUS_SUCCESS) continue;  // (a candidate that does not run is not chosen)
    KRAKEN_CUDA_CHECK(cudaEventRecord(start, stream));
    bool ran = true;
    for (int r = 0; r < kTimed; ++r) ran = ran && run() == CUBLAS_STATUS_SUCCESS;
    KRAKEN_CUDA_CHECK(cudaEventRecord(stop, stream));
    KRAKEN_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    KRAKEN_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (!ran) continue;
    micros[i] = 1e3f * ms / kTimed;
    if (micros[best] < 0.0f || micros[i] < micros[best]) best = i;
  }
  KRAKEN_CUDA_CHECK(cudaEventDestroy(start));
  KRAKEN_CUDA_CHECK(cudaEventDestroy(stop));
  if (micros[best] < 0.0f) return;  // none timed: the heuristic's first choice stays
  plan.algo = candidates[best].algo;
  plan.pick = static_cast<int>(best);
  std::fprintf(stderr,
               "cuBLASLt tune: (%lld, %lld)%s · (%lld, %lld)%s, batch %lld, epilogue %d: cuBLASLt's first %.1f µs, "
               "best #%zu of %zu %.1f µs (%.0f%% faster)\n",
               static_cast<long long>(k.M), static_cast<long long>(k.K), k.trans_a ? "ᵀ" : "",
               static_cast<long long>(k.K), static_cast<long long>(k.N), k.trans_b ? "ᵀ" : "",
               static_cast<long long>(k.batch), static_cast<int>(k.epilogue), micros[0], best, candidates.size(),
               micros[best], micros[0] > 0.0f ? 100.0 * (micros[0] - micros[best]) / micros[best] : 0.0);
  // The entry that would make this choice the default on this device (kernels/cuda/cublaslt_picks.inc).
  if (best > 0)
    std::fprintf(stderr, "cuBLASLt pick: {\"%s\", %zu, %lld, %lld, %lld, %lld, %s, %s, %s, %d, %zu},  // %.1f -> %.1f us\n",
                 lt.name.c_str(), cublasLtGetVersion(), static_cast<long long>(k.M), static_cast<long long>(k.N),
                 static_cast<long long>(k.K), static_cast<long long>(k.batch), k.trans_a ? "true" : "false",
                 k.trans_b ? "true" : "false", k.out_bf16 ? "true" : "false", static_cast<int>(k.epilogue), best,
                 micros[0], micros[best]);
}

// Whether out (M, N) = op(A)·op(B) is only planned (the plan looked up or made, nothing launched: a batch
// run a product per matrix plans every matrix before it writes any) or planned and launched.
enum class Launch { kPlanOnly, kRun };

// out (M, N) = op(A)·op(B) with a cuBLASLt epilogue: every entry point ends here. bias is read or (for
// the gradient epilogues) written; aux likewise. Returns false where the plan is unsupported (only for
// the optional epilogues; the others throw when planned).
bool run_product(void* out, bool out_bf16, const uint16_t* a, const uint16_t* b, const void* bias, const void* aux,
                 int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b, cublasLtEpilogue_t epilogue,
                 CUstream_st* stream, int64_t batch = 1, int64_t stride_a = 0, int64_t stride_b = 0,
                 int64_t stride_out = 0, int64_t stride_bias = 0, Launch launch = Launch::kRun) {
  const bool wants_bias = has_bias_pointer(epilogue), wants_aux = has_aux(epilogue);
  KRAKEN_CHECK(!wants_bias || bias != nullptr, "matmul_bf16_cuda: the epilogue needs a bias (or bias gradient) vector");
  KRAKEN_CHECK(!wants_aux || aux != nullptr, "matmul_bf16_cuda: the epilogue needs its aux matrix");
  KRAKEN_CHECK(M >= 0 && N >= 0 && K >= 1 && M < (1LL << 31) && N < (1LL << 31) && K < (1LL << 31), "M=", M, " N=", N,
               " K=", K);
  if (M == 0 || N == 0) return true;
  LtDevice& lt = lt_for_current_device();
  int device = 0;
  KRAKEN_CUDA_CHECK(cudaGetDevice(&device));
  if (batch <= 1) stride_a = stride_b = stride_out = stride_bias = 0;  // (one key for every unbatched call)
  if (!wants_bias) stride_bias = 0;
  const PlanKey key{device, M, N, K, batch, stride_a, stride_b, stride_out, stride_bias, trans_a, trans_b, out_bf16, epilogue,
                    alignment_of(b), alignment_of(a), alignment_of(out), wants_bias ? alignment_of(bias) : 0u,
                    wants_aux ? alignment_of(aux) : 0u};
  thread_local std::unordered_map<PlanKey, std::unique_ptr<Plan>, PlanKeyHash> plans;
  auto found_plan = plans.find(key);
  if (found_plan == plans.end()) {
    if (plans.size() >= kMaxPlans) plans.clear();
    found_plan = plans.emplace(key, make_plan(lt, key, bias, aux)).first;
  }
  Plan& plan = *found_plan->second;
  if (!plan.supported) return false;
  if (launch == Launch::kPlanOnly) return true;
  if (wants_bias)
    KRAKEN_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan.desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  if (wants_aux)
    KRAKEN_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan.desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)));
  if (!plan.candidates.empty()) tune_plan(lt, plan, key, out, a, b, stream);
  const float alpha = 1.0f, beta = 0.0f;
  // beta = 0: C is not read; it is passed as D only because the API wants a C.
  KRAKEN_CUBLAS_CHECK(cublasLtMatmul(lt.handle, plan.desc.op, &alpha, b, plan.desc.a, a, plan.desc.b, &beta, out,
                                     plan.desc.d, out, plan.desc.d, &plan.algo, lt.workspace, kWorkspaceBytes, stream));
  return true;
}

// A batch whose products are long sums into few outputs — the Kraken sub-layers' weight gradients at
// B = 64, 4 × (504 × 1008) over K = 65,536 rows — runs one product per matrix: cuBLASLt splits a single
// product's K across the GPU (its split-K kernels), which its strided-batch plans did not. H100: 0.757 ms
// as one batch, 0.541 ms as four products; c_attn's 4 × (1512 × 504): 0.720 vs 0.702; at K = 8,192 the
// batch was twice as fast (0.061 vs 0.138, 0.085 vs 0.173) — bench/RESULTS.md. Measured at those two K
// only: where between them the loop starts to win is open (B = 32, K = 32,768, stays batched).
constexpr int64_t kPerMatrixAboveK = 32768;

// KRAKEN_CUDA_BATCHED_PRODUCTS (read once): unset, batches go to cuBLASLt as one strided-batch call up to
// kPerMatrixAboveK (above); 1, always; 0, never (one product per matrix) — the A/B of kernels/matmul.h.
enum class StridedBatches { kUpToK, kAlways, kNever };
StridedBatches strided_batches_mode() {
  static const StridedBatches mode = [] {
    const char* v = std::getenv("KRAKEN_CUDA_BATCHED_PRODUCTS");
    if (v == nullptr || *v == '\0') return StridedBatches::kUpToK;
    if (std::string(v) == "1") return StridedBatches::kAlways;
    if (std::string(v) == "0") return StridedBatches::kNever;
    KRAKEN_THROW("KRAKEN_CUDA_BATCHED_PRODUCTS=", v,
                 ": expected 1 (every batch of products as one cuBLASLt call), 0 (one call per matrix) or unset "
                 "(one call up to K = ", kPerMatrixAboveK, ")");
  }();
  return mode;
}

bool strided_batch(int64_t K) {
  switch (strided_batches_mode()) {
    case StridedBatches::kAlways: return true;
    case StridedBatches::kNever: return false;
    case StridedBatches::kUpToK: return K <= kPerMatrixAboveK;
  }
  return true;
}

// The aux matrix's rule (cublasLt.h, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD: a multiple of 8), and 16-byte
// alignment of its start, which we ask for rather than learn from a failure on a GPU.
bool aux_fits(const void* aux, int64_t N) {
  return N % 8 == 0 && reinterpret_cast<uintptr_t>(aux) % 16 == 0;
}

}  // namespace

void matmul_bf16_cuda(void* out, bool out_bf16, const uint16_t* a, const uint16_t* b, const void* bias, int64_t M,
                      int64_t N, int64_t K, bool trans_a, bool trans_b, MatmulEpilogue epilogue, CUstream_st* stream) {
  run_product(out, out_bf16, a, b, bias, nullptr, M, N, K, trans_a, trans_b, lt_epilogue(epilogue), stream);
}

void matmul_bf16_batched_cuda(void* out, bool out_bf16, const uint16_t* a, const uint16_t* b, int64_t batch, int64_t M,
                              int64_t N, int64_t K, bool trans_a, bool trans_b, int64_t stride_out, int64_t stride_a,
                              int64_t stride_b, CUstream_st* stream) {
  KRAKEN_CHECK(batch >= 0 && batch < (1LL << 31), "matmul_bf16_batched_cuda: batch ", batch);
  if (batch == 0 || M == 0 || N == 0) return;
  if (batch > 1 && strided_batch(K) && run_product(out, out_bf16, a, b, nullptr, nullptr, M, N, K, trans_a, trans_b,
                               CUBLASLT_EPILOGUE_DEFAULT, stream, batch, stride_a, stride_b, stride_out))
    return;
  // One matrix, or no strided-batch algorithm: one product per matrix.
  const size_t out_elem = out_bf16 ? 2 : 4;
  for (int64_t i = 0; i < batch; ++i)
    run_product(static_cast<char*>(out) + static_cast<size_t>(i * stride_out) * out_elem, out_bf16, a + i * stride_a,
                b + i * stride_b, nullptr, nullptr, M, N, K, trans_a, trans_b, CUBLASLT_EPILOGUE_DEFAULT, stream);
}

bool matmul_gelu_aux_bf16_cuda(uint16_t* out, uint16_t* pre, const uint16_t* a, const uint16_t* b, const uint16_t* bias,
                               int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b, CUstream_st* stream) {
  return matmul_gelu_aux_bf16_batched_cuda(out, pre, a, b, bias, 1, M, N, K, trans_a, trans_b, 0, 0, 0, 0, stream);
}

bool matmul_dgelu_bf16_cuda(uint16_t* dpre, uint16_t* bias_grad, const uint16_t* a, const uint16_t* b,
                            const uint16_t* pre, int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b,
                            CUstream_st* stream) {
  return matmul_dgelu_bf16_batched_cuda(dpre, bias_grad, a, b, pre, 1, M, N, K, trans_a, trans_b, 0, 0, 0, 0, stream);
}

namespace {

// One epilogue product per matrix of a batch: every matrix planned first, then each launched — false,
// with nothing written, where cuBLASLt refuses any of them. The matrices share a shape but not always
// their alignments (a plan's key holds each pointer's, up to 256 bytes: a later sub-layer's bias row of 504
// columns starts 16 bytes past a boundary where the first starts 256 past one), so a later matrix may
// have a plan, and a refusal, of its own.
bool per_matrix_epilogue_products(uint16_t* out, const uint16_t* a, const uint16_t* b, uint16_t* vec, const uint16_t* aux,
                                  int64_t batch, int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b,
                                  int64_t stride_out, int64_t stride_a, int64_t stride_b, int64_t stride_vec,
                                  cublasLtEpilogue_t epilogue, CUstream_st* stream) {
  for (const Launch launch : {Launch::kPlanOnly, Launch::kRun}) {
    for (int64_t i = 0; i < batch; ++i) {
      const bool done = run_product(out + i * stride_out, true, a + i * stride_a, b + i * stride_b,
                                    vec ? vec + i * stride_vec : nullptr, aux ? aux + i * stride_out : nullptr, M, N,
                                    K, trans_a, trans_b, epilogue, stream, 1, 0, 0, 0, 0, launch);
      if (launch == Launch::kPlanOnly && !done) return false;
      KRAKEN_CHECK(done, "matmul epilogue ", static_cast<int>(epilogue), ": matrix ", i, " of a batch of ", batch,
                   " lost the algorithm it was planned with");
    }
  }
  return true;
}

// One GELU epilogue product over a batch: a strided-batch call, else (no batched algorithm) one call per
// matrix. False, with nothing written, where cuBLASLt refuses the batch and any of its matrices.
bool epilogue_batch(uint16_t* out, const uint16_t* a, const uint16_t* b, uint16_t* vec, const uint16_t* aux,
                    int64_t batch, int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b, int64_t stride_out,
                    int64_t stride_a, int64_t stride_b, int64_t stride_vec, cublasLtEpilogue_t epilogue,
                    bool try_strided, CUstream_st* stream) {
  KRAKEN_CHECK(batch >= 1 && batch < (1LL << 31), "matmul GELU epilogue: batch ", batch);
  if (M == 0 || N == 0 || !aux_fits(aux, N)) return false;
  if (batch == 1)
    return run_product(out, true, a, b, vec, aux, M, N, K, trans_a, trans_b, epilogue, stream);
  if (stride_out % 8 != 0) return false;  // the aux matrices after the first would lose their 16 bytes
  if (try_strided && strided_batch(K) &&
      run_product(out, true, a, b, vec, aux, M, N, K, trans_a, trans_b, epilogue, stream, batch,
                                 stride_a, stride_b, stride_out, stride_vec))
    return true;
  return per_matrix_epilogue_products(out, a, b, vec, aux, batch, M, N, K, trans_a, trans_b, stride_out, stride_a,
                                      stride_b, stride_vec, epilogue, stream);
}

}  // namespace

bool matmul_gelu_aux_bf16_batched_cuda(uint16_t* out, uint16_t* pre, const uint16_t* a, const uint16_t* b,
                                       const uint16_t* bias, int64_t batch, int64_t M, int64_t N, int64_t K,
                                       bool trans_a, bool trans_b, int64_t stride_out, int64_t stride_a,
                                       int64_t stride_b, int64_t stride_bias, CUstream_st* stream) {
  // (bias is only read; the shared pointer slot is non-const for the gradient epilogues)
  return epilogue_batch(out, a, b, const_cast<uint16_t*>(bias), pre, batch, M, N, K, trans_a, trans_b, stride_out,
                        stride_a, stride_b, stride_bias,
                        bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX, true, stream);
}

bool matmul_dgelu_bf16_batched_cuda(uint16_t* dpre, uint16_t* bias_grad, const uint16_t* a, const uint16_t* b,
                                    const uint16_t* pre, int64_t batch, int64_t M, int64_t N, int64_t K, bool trans_a,
                                    bool trans_b, int64_t stride_out, int64_t stride_a, int64_t stride_b,
                                    int64_t stride_bias, CUstream_st* stream) {
  // One product per matrix: for a strided batch of DGELU products (the Kraken preset's, 4 × (8192 × 1008)
  // from K = 504) cuBLASLt's heuristic took its generic globalKernel, 284 µs per layer on an H100, where
  // the four single products take ~45 µs each on the sm90 xmma DGELU kernel (bench/RESULTS.md).
  return epilogue_batch(dpre, a, b, bias_grad, pre, batch, M, N, K, trans_a, trans_b, stride_out, stride_a, stride_b,
                        stride_bias, bias_grad ? CUBLASLT_EPILOGUE_DGELU_BGRAD : CUBLASLT_EPILOGUE_DGELU, false,
                        stream);
}

bool matmul_bias_grad_bf16_cuda(uint16_t* out, uint16_t* bias_grad, const uint16_t* a, const uint16_t* b, int64_t M,
                                int64_t N, int64_t K, bool trans_a, bool trans_b, CUstream_st* stream) {
  KRAKEN_CHECK(bias_grad != nullptr, "matmul_bias_grad_bf16_cuda: no bias gradient vector");
  if (M == 0 || N == 0) return false;
  return run_product(out, true, a, b, bias_grad, nullptr, M, N, K, trans_a, trans_b, CUBLASLT_EPILOGUE_BGRADB, stream);
}

bool matmul_bias_grad_bf16_batched_cuda(uint16_t* out, uint16_t* bias_grad, const uint16_t* a, const uint16_t* b,
                                        int64_t batch, int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b,
                                        int64_t stride_out, int64_t stride_a, int64_t stride_b, int64_t stride_bias,
                                        CUstream_st* stream) {
  KRAKEN_CHECK(bias_grad != nullptr && batch >= 1 && batch < (1LL << 31), "matmul_bias_grad_bf16_batched_cuda: batch ",
               batch, bias_grad ? "" : ", no bias gradient vector");
  if (M == 0 || N == 0) return false;
  // (A stride off 16 bytes would leave a later matrix's operands without the 16 bytes cuBLASLt's bf16
  // kernels want.)
  if (batch > 1 && (stride_out % 8 != 0 || stride_a % 8 != 0 || stride_b % 8 != 0 || stride_bias % 8 != 0)) return false;
  // One product per matrix, as the bench's rows time it (gpu_train_bench: a BGRADB product each); cuBLASLt's
  // strided batches of these epilogues have not been timed.
  return per_matrix_epilogue_products(out, a, b, bias_grad, nullptr, batch, M, N, K,
                                      trans_a, trans_b, stride_out, stride_a, stride_b, stride_bias,
                                      CUBLASLT_EPILOGUE_BGRADB, stream);
}

}  // namespace kraken::kernels
