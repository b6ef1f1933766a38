// bf16 causal attention through cuDNN's fused flash attention (the fourth implementation of the contract
// in kernels/attention.h, and its dispatch's default where cuDNN is built in). Host code only: it builds
// cuDNN operation graphs with the C backend API (cudnnBackendCreateDescriptor / SetAttribute / Finalize,
// cudnnBackendExecute) and lets cuDNN's runtime fusion engines compile and run them.
//
// Which route, and why. cuDNN 9.19 (the headers this was written against) has two ways to ask for SDPA:
//   - the native CUDNN_BACKEND_OPERATION_SDPA_{FWD,BWD}_DESCRIPTORs. Their attributes in cudnn_graph_v9.h
//     are Q, K, V, O, Stats, scale, block mask, page tables and per-sequence lengths, and nothing that
//     expresses a causal mask: masks reach the native operation only through a score-modifier subgraph,
//     which cudnn-frontend wires up for backends ≥ 9.21 (its UnifiedSDPANode refuses masks below 9.21).
//     A block mask is per tile, not per element, so it cannot express the diagonal either.
//   - an operation graph of primitive operations in the shape cuDNN's runtime fusion engine recognises as
//     flash attention: what cudnn-frontend's "composite" SDPA nodes lower to for every backend below 9.21,
//     with causal masking, training statistics and the backward (NVIDIA's attention documentation: cuDNN
//     SDPA forward and backward, bf16, sm_80 and later, Hopper bprop d ≤ 256, Ampere bprop d ≤ 128, head
//     sizes a multiple of 8, masking and a deterministic backward supported).
// So the graphs here are the composite ones, node for node as cudnn-frontend emits them (read from its
// source, include/cudnn_frontend/node/scaled_dot_product_flash_attention.h, softmax.h and
// diagonal_band_mask.h: the fusion engine matches the pattern, so the order and the tensor types follow
// that code, not taste). Virtual tensors are f32 (cudnn-frontend's "intermediate" type) except where it
// sets another: the causal indices (int32), the mask (boolean), and the bf16 operands of the products
// that consume the probabilities (P in forward, Pᵀ and dSᵀ in backward).
//
// Forward, per (b, h), S of shape (T, T):
//   S = Q·Kᵀ (matmul; Kᵀ is K's strided view with the last two dimensions swapped),  S ← S·scale,
//   causal mask: r = GEN_INDEX(S, axis 2), c = GEN_INDEX(S, axis 3), keep = CMP_GE(r, c),
//                S ← BINARY_SELECT(S, lowest, keep)   (keep ? S : the lowest finite float, as
//                cudnn-frontend's causal mask: exp of it is 0 as of −∞, and no tile that a kernel finds
//                fully masked turns a max − max into −∞ − (−∞)),
//   softmax with statistics: M = max_row S, E = exp(S − M), L = Σ_row E, Stats = M + log L, P = E / L,
//   O = P·V.
// Stats is therefore log Σ_{s ≤ t} exp(S[t, s]) with natural exp and log of the scaled, masked scores:
// exactly our lse (kernels/attention.h), in the layout (B, NH, T, 1) = our (B, NH, T). (cuDNN ≥ 9.27 can
// emit base-2 stats instead — cudnn-frontend's stats_use_log2 — which this graph does not ask for.)
//
// Backward (cudnn-frontend's composite SDPA backward without dropout or bias), from Q, Kᵀ, Vᵀ, O, dO, Stats:
//   Dᵢ = Σ_d dO·O (MUL, reduction ADD, then ·1 into a non-virtual f32 tensor in our workspace),
//   S = Q·Kᵀ·scale − Stats, causal mask as above, P = exp(S)          (the forward's softmax, recomputed),
//   dV = Pᵀ·dO (Pᵀ a bf16 RESHAPE of P),  dP = dO·Vᵀ,  dS = (dP − Dᵢ)·P·scale,
//   dK = dSᵀ·Q (dSᵀ a bf16 RESHAPE),  dQ = dS·K (K a RESHAPE of Kᵀ back to (T, D)).
// dQ comes straight out of its product into dqkv. cudnn-frontend builds the graph that way exactly when
// asked for a deterministic backward (its is_deterministic_algorithm: the "dP workspace" implementation);
// its default graph instead accumulates dQ into an f32 buffer, with atomics. In addition every engine
// whose CUDNN_ATTR_ENGINE_NUMERICAL_NOTE lists CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC is skipped (forward
// and backward; KRAKEN_CUDNN_ATTENTION_NONDETERMINISTIC=1, for measuring only, takes one where nothing
// else finalizes, and says so on stderr), and the GPU tests check two backward runs for identical bits. That is as far as the
// backend API lets us ask: cuDNN documents no determinism guarantee beyond those notes, so the test is
// the evidence (tests/gpu/attention_cudnn_cuda_test.cpp; two runs bit for bit equal on the H200 and H100).
// The dP workspace costs B·NH·T²·2 bytes of workspace (GPT-2 at B = 8, T = 1024: 192 MiB), held in a
// per-device scratch buffer — and it costs time: the backward kernel writes dS there and a separate
// kernel (cuDNN's matmul_dq) reads it back for dQ = dS·K, 2·B·NH·T²·2 bytes a layer. On an H100 that
// kernel took 0.95 of GPT-2's 3.1 ms of attention at B = 8 and 10.5 of the Kraken preset's 58 ms at
// B = 64 (bench/RESULTS.md), all of it memory traffic.
//
// The atomic dQ (KRAKEN_CUDNN_ATTENTION_BACKWARD=atomic; the default stays the deterministic graph): the
// graph cudnn-frontend builds when determinism is not asked for. dQ = dS·K goes into a non-virtual f32
// tensor dQacc (B, NH, T, D), contiguous, with the F16x16 reordering mode — that tensor being non-virtual
// is how the backend API tells the fusion engine to accumulate dQ in f32 from each key tile, with atomics,
// instead of writing dS — and dQ = IDENTITY(dQacc) converts it into dqkv's bf16 columns. dQacc lives in
// our workspace and must be zero before each run (cudnn-frontend memsets it: its workspace modification
// of type 1); B·NH·T·D·4 bytes, 24 MiB for GPT-2 at B = 8. Floating-point additions in arrival order make
// dQ differ between runs in its last bits, so engines for this graph may carry the non-deterministic note,
// which is not checked here; dK and dV should still be each key tile's own sums (the repeat test holds them
// to equal bits). Where cuDNN refuses the atomic graph, the deterministic one is planned and stderr says so
// (tools/gpu-check.sh keeps the line). Measured since (bench/RESULTS.md, twelfth to eighteenth sessions):
// cuDNN plans it at every shape asked on the H100 and H200, the tests pass on it, and it gains 0.2–1.6% a
// step (GPT-2 B = 64: 109.5 against 109.7 ms) — too little to give up bit-reproducible steps by default.
//
// Contract differences from the hand-written kernels (kernels/attention.h): the backward OVERWRITES dqkv
// (dQ, dK and dV cover all of its columns) instead of adding to it; the graphs need 16-byte aligned
// buffers, C and D multiples of 8 (attention_bf16_cudnn_usable says whether a call qualifies; the
// dispatch falls back to the other kernels otherwise).
//
// Plans. A graph is built, and its execution plan chosen (heuristics mode A, the first configuration
// that finalizes and is not marked non-deterministic; the first of the GraphVariants below whose graph
// cuDNN takes), once per (device, B, T, C, NH, direction) and kept
// for the process; a shape cuDNN refuses is remembered with the reason. One cuDNN handle per device; its
// stream is set on every call. The workspace comes from device_scratch (kernels/cuda/scratch.h), so a
// steady-state step allocates nothing. The first plan of a shape costs cuDNN's runtime compilation
// (NVRTC; seconds), which is why plans are cached. KRAKEN_CUDNN_ATTENTION_TUNE=n, a measurement mode, times
// other configurations on a shape's first call and keeps the fastest (tune_once, below).
#include "kernels/attention.h"

#include <cstdint>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/scratch.h"
#include "kernels/error.h"

#if KRAKEN_WITH_CUDNN

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

namespace kraken::kernels {
namespace {

// ---- descriptors ----------------------------------------------------------------------------------------

// One backend descriptor, destroyed with its owner.
class Desc {
 public:
  explicit Desc(cudnnBackendDescriptorType_t type) { KRAKEN_CUDNN_CHECK(cudnnBackendCreateDescriptor(type, &d_)); }
  ~Desc() {
    if (d_) cudnnBackendDestroyDescriptor(d_);
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  cudnnBackendDescriptor_t get() const { return d_; }
  cudnnBackendDescriptor_t* ptr() { return &d_; }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};

void set(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, int64_t count,
         const void* value) {
  KRAKEN_CUDNN_CHECK(cudnnBackendSetAttribute(d, name, type, count, value));
}
void set_desc(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t name, const Desc& value) {
  cudnnBackendDescriptor_t v = value.get();
  set(d, name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &v);
}

using Dims = std::array<int64_t, 4>;

// The descriptors of one graph, alive as long as its plan (the plan was finalized from them).
class GraphBuilder {
 public:
  explicit GraphBuilder(cudnnHandle_t handle) : handle_(handle) {}

  // A tensor: uid > 0 names a buffer of the variant pack; virtual tensors get uids from 1000 up.
  const Desc& tensor(int64_t uid, cudnnDataType_t type, const Dims& dims, const Dims& strides, bool is_virtual,
                     bool by_value = false, cudnnBackendTensorReordering_t reordering = CUDNN_TENSOR_REORDERING_NONE) {
    Desc& t = make(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    if (uid == 0) uid = next_virtual_uid_++;
    const int64_t alignment = 16;
    set(t.get(), CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type);
    set(t.get(), CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims.data());
    set(t.get(), CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides.data());
    set(t.get(), CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid);
    set(t.get(), CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &alignment);
    set(t.get(), CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual);
    if (by_value) set(t.get(), CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value);
    if (reordering != CUDNN_TENSOR_REORDERING_NONE)
      set(t.get(), CUDNN_ATTR_TENSOR_REORDERING_MODE, CUDNN_TYPE_TENSOR_REORDERING_MODE, 1, &reordering);
    KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(t.get()));
    return t;
  }
  // A virtual tensor of the given shape, row-major (contiguous) strides.
  const Desc& virt(cudnnDataType_t type, const Dims& dims) {
    const Dims strides = {dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1};
    return tensor(0, type, dims, strides, true);
  }
  // A scalar passed by value in the variant pack (host memory).
  const Desc& scalar(int64_t uid) {
    return tensor(uid, CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true);
  }

  // y = mode(x, b) (b may be null), or y = t ? x : b for BINARY_SELECT; axis for GEN_INDEX.
  void pointwise(cudnnPointwiseMode_t mode, cudnnDataType_t math, const Desc& x, const Desc* b, const Desc& y,
                 const Desc* t = nullptr, int64_t axis = -1) {
    Desc& pw = make(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    set(pw.get(), CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    set(pw.get(), CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &math);
    if (axis >= 0) set(pw.get(), CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis);
    KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(pw.get()));
    Desc& op = make(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    set_desc(op.get(), CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw);
    set_desc(op.get(), CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x);
    if (b) set_desc(op.get(), CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b);
    set_desc(op.get(), CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y);
    if (t) set_desc(op.get(), CUDNN_ATTR_OPERATION_POINTWISE_TDESC, *t);
    KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(op.get()));
    ops_.push_back(op.get());
  }
  // y = reduce(x) over the dimensions where y has extent 1.
  void reduction(cudnnReduceTensorOp_t mode, const Desc& x, const Desc& y) {
    Desc& red = make(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    set(red.get(), CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode);
    set(red.get(), CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp);
    KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(red.get()));
    Desc& op = make(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    set_desc(op.get(), CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x);
    set_desc(op.get(), CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y);
    set_desc(op.get(), CUDNN_ATTR_OPERATION_REDUCTION_DESC, red);
    KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(op.get()));
    ops_.push_back(op.get());
  }
  // c = a·b, batched over the first two dimensions, f32 accumulation.
  void matmul(const Desc& a, const Desc& b, const Desc& c) {
    Desc& mm = make(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    set(mm.get(), CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp);
    KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(mm.get()));
    Desc& op = make(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    set_desc(op.get(), CUDNN_ATTR_OPERATION_MATMUL_ADESC, a);
    set_desc(op.get(), CUDNN_ATTR_OPERATION_MATMUL_BDESC, b);
    set_desc(op.get(), CUDNN_ATTR_OPERATION_MATMUL_CDESC, c);
    set_desc(op.get(), CUDNN_ATTR_OPERATION_MATMUL_DESC, mm);
    KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(op.get()));
    ops_.push_back(op.get());
  }
  // y = x with other dimensions and strides (the transposes of virtual tensors).
  void reshape(const Desc& x, const Desc& y) {
    Desc& op = make(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    set_desc(op.get(), CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x);
    set_desc(op.get(), CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y);
    KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(op.get()));
    ops_.push_back(op.get());
  }

  // The operation graph of every operation added, finalized.
  const Desc& graph() {
    Desc& g = make(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    set(g.get(), CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle_);
    set(g.get(), CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, static_cast<int64_t>(ops_.size()),
        ops_.data());
    KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(g.get()));
    return g;
  }

  Desc& make(cudnnBackendDescriptorType_t type) {
    descs_.push_back(std::make_unique<Desc>(type));
    return *descs_.back();
  }

 private:
  cudnnHandle_t handle_;
  int64_t next_virtual_uid_ = 1000;
  std::vector<std::unique_ptr<Desc>> descs_;
  std::vector<cudnnBackendDescriptor_t> ops_;
};

// ---- the graphs -------------------------------------------------------------------------------------------

// Buffers of the variant packs.
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kStats, kScale, kMaskValue, kDO, kDQ, kDK, kDV, kRowSums, kOne, kDQAccumulator,
};

struct Shape {
  int64_t B, T, C, NH;
  int64_t D() const { return C / NH; }
};

// Q, K, V (or dQ, dK, dV) of head h: columns h·D.. of their third of a (B, T, 3C) row, as (B, NH, T, D).
Dims qkv_strides(const Shape& s) { return {s.T * 3 * s.C, s.D(), 3 * s.C, 1}; }
// The same with the last two dimensions swapped: Kᵀ (B, NH, D, T).
Dims qkv_strides_t(const Shape& s) { return {s.T * 3 * s.C, s.D(), 1, 3 * s.C}; }
// out, dout (B, T, C) as (B, NH, T, D).
Dims out_strides(const Shape& s) { return {s.T * s.C, s.D(), s.C, 1}; }
// lse and the row sums (B, NH, T) as (B, NH, T, 1).
Dims row_strides(const Shape& s) { return {s.NH * s.T, s.T, 1, 1}; }

// Two details of the graphs that cudnn-frontend's versions set differently and that the fusion engine
// may match on: the data type the causal indices are computed in (int32 in its causal_mask score
// modifier, f32 in its newer diagonal-band mask) and the type of K reshaped from Kᵀ for dQ = dS·K (its
// intermediate type, f32, unless set). Never run on a GPU yet, so build_plan tries them in this order
// and keeps the first whose plan finalizes, saying on stderr when it was not the first.
struct GraphVariant {
  cudnnDataType_t index_math;
  cudnnDataType_t k_type;  // backward only
  const char* name;
};
constexpr GraphVariant kGraphVariants[] = {
    {CUDNN_DATA_INT32, CUDNN_DATA_FLOAT, "int32 causal indices, K for dQ as f32"},
    {CUDNN_DATA_INT32, CUDNN_DATA_BFLOAT16, "int32 causal indices, K for dQ as bf16"},
    {CUDNN_DATA_FLOAT, CUDNN_DATA_FLOAT, "f32 causal indices, K for dQ as f32"},
    {CUDNN_DATA_FLOAT, CUDNN_DATA_BFLOAT16, "f32 causal indices, K for dQ as bf16"},
};

// S = (Q·Kᵀ)·scale with the causal mask applied: the scores both directions start from. In backward
// the statistics are subtracted between scaling and masking, as cudnn-frontend orders it.
const Desc& masked_scores(GraphBuilder& g, const Shape& s, const GraphVariant& v, const Desc& q, const Desc& kt,
                          const Desc& scale, const Desc& mask_value, const Desc* stats) {
  const Dims st = {s.B, s.NH, s.T, s.T};
  const Desc& qk = g.virt(CUDNN_DATA_FLOAT, st);
  g.matmul(q, kt, qk);
  const Desc& scaled = g.virt(CUDNN_DATA_FLOAT, st);
  g.pointwise(CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, qk, &scale, scaled);
  const Desc* scores = &scaled;
  if (stats) {
    const Desc& shifted = g.virt(CUDNN_DATA_FLOAT, st);
    g.pointwise(CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, scaled, stats, shifted);
    scores = &shifted;
  }
  // The indices as cudnn-frontend's causal_mask score modifier builds them (GEN_INDEX into int32, in the
  // variant's compute type; CMP_GE in boolean).
  const Desc& row = g.virt(CUDNN_DATA_INT32, st);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, v.index_math, *scores, nullptr, row, nullptr, 2);
  const Desc& col = g.virt(CUDNN_DATA_INT32, st);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, v.index_math, *scores, nullptr, col, nullptr, 3);
  const Desc& keep = g.virt(CUDNN_DATA_BOOLEAN, st);  // key s ≤ query t
  g.pointwise(CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, row, &col, keep);
  const Desc& masked = g.virt(CUDNN_DATA_FLOAT, st);
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, *scores, &mask_value, masked, &keep);
  return masked;
}

void build_forward(GraphBuilder& g, const Shape& s, const GraphVariant& variant) {
  const Dims bhtd = {s.B, s.NH, s.T, s.D()}, bhdt = {s.B, s.NH, s.D(), s.T}, row = {s.B, s.NH, s.T, 1};
  const Dims st = {s.B, s.NH, s.T, s.T};
  const Desc& q = g.tensor(kQ, CUDNN_DATA_BFLOAT16, bhtd, qkv_strides(s), false);
  const Desc& kt = g.tensor(kK, CUDNN_DATA_BFLOAT16, bhdt, qkv_strides_t(s), false);
  const Desc& v = g.tensor(kV, CUDNN_DATA_BFLOAT16, bhtd, qkv_strides(s), false);
  const Desc& o = g.tensor(kO, CUDNN_DATA_BFLOAT16, bhtd, out_strides(s), false);
  const Desc& stats = g.tensor(kStats, CUDNN_DATA_FLOAT, row, row_strides(s), false);
  const Desc& scale = g.scalar(kScale);
  const Desc& mask_value = g.scalar(kMaskValue);

  const Desc& scores = masked_scores(g, s, variant, q, kt, scale, mask_value, nullptr);
  // softmax with statistics
  const Desc& m = g.virt(CUDNN_DATA_FLOAT, row);
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, scores, m);
  const Desc& centred = g.virt(CUDNN_DATA_FLOAT, st);
  g.pointwise(CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, scores, &m, centred);
  const Desc& e = g.virt(CUDNN_DATA_FLOAT, st);
  g.pointwise(CUDNN_POINTWISE_EXP, CUDNN_DATA_FLOAT, centred, nullptr, e);
  const Desc& l = g.virt(CUDNN_DATA_FLOAT, row);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, e, l);
  const Desc& log_l = g.virt(CUDNN_DATA_FLOAT, row);
  g.pointwise(CUDNN_POINTWISE_LOG, CUDNN_DATA_FLOAT, l, nullptr, log_l);
  g.pointwise(CUDNN_POINTWISE_ADD, CUDNN_DATA_FLOAT, m, &log_l, stats);
  const Desc& p = g.virt(CUDNN_DATA_BFLOAT16, st);  // the second product's A operand: bf16
  g.pointwise(CUDNN_POINTWISE_DIV, CUDNN_DATA_FLOAT, e, &l, p);
  g.matmul(p, v, o);
}

// dQ as the deterministic graph writes it (dS·K into dqkv), or through the f32 accumulator (the top).
enum class DqPath { kDirect, kAtomic };

void build_backward(GraphBuilder& g, const Shape& s, const GraphVariant& variant, DqPath dq_path) {
  const Dims bhtd = {s.B, s.NH, s.T, s.D()}, bhdt = {s.B, s.NH, s.D(), s.T}, row = {s.B, s.NH, s.T, 1};
  const Dims st = {s.B, s.NH, s.T, s.T};
  const Dims transposed = {s.NH * s.T * s.T, s.T * s.T, 1, s.T};  // (B, NH, T, T) read column-wise
  const Desc& q = g.tensor(kQ, CUDNN_DATA_BFLOAT16, bhtd, qkv_strides(s), false);
  const Desc& kt = g.tensor(kK, CUDNN_DATA_BFLOAT16, bhdt, qkv_strides_t(s), false);
  const Desc& vt = g.tensor(kV, CUDNN_DATA_BFLOAT16, bhdt, qkv_strides_t(s), false);
  const Desc& o = g.tensor(kO, CUDNN_DATA_BFLOAT16, bhtd, out_strides(s), false);
  const Desc& d_o = g.tensor(kDO, CUDNN_DATA_BFLOAT16, bhtd, out_strides(s), false);
  const Desc& stats = g.tensor(kStats, CUDNN_DATA_FLOAT, row, row_strides(s), false);
  const Desc& dq = g.tensor(kDQ, CUDNN_DATA_BFLOAT16, bhtd, qkv_strides(s), false);
  const Desc& dk = g.tensor(kDK, CUDNN_DATA_BFLOAT16, bhtd, qkv_strides(s), false);
  const Desc& dv = g.tensor(kDV, CUDNN_DATA_BFLOAT16, bhtd, qkv_strides(s), false);
  const Desc& row_sums = g.tensor(kRowSums, CUDNN_DATA_FLOAT, row, row_strides(s), false);
  const Desc& scale = g.scalar(kScale);
  const Desc& mask_value = g.scalar(kMaskValue);
  const Desc& one = g.scalar(kOne);

  // Dᵢ = Σ_d dO·O, into global memory (the graph reads it per key tile)
  // (with the strides cudnn-frontend gives this virtual tensor, copied as they are: NH·T·D, T·D, NH·D, 1,
  // not the row-major default; a virtual tensor is never in memory, but the engine may match on them)
  const Desc& do_o =
      g.tensor(0, CUDNN_DATA_FLOAT, bhtd, {s.NH * s.T * s.D(), s.T * s.D(), s.NH * s.D(), 1}, true);
  g.pointwise(CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, d_o, &o, do_o);
  const Desc& sums = g.virt(CUDNN_DATA_FLOAT, row);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, do_o, sums);
  g.pointwise(CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, sums, &one, row_sums);

  // P = exp(S·scale − lse), masked; dV = Pᵀ·dO
  const Desc& masked = masked_scores(g, s, variant, q, kt, scale, mask_value, &stats);
  const Desc& p = g.virt(CUDNN_DATA_FLOAT, st);
  g.pointwise(CUDNN_POINTWISE_EXP, CUDNN_DATA_FLOAT, masked, nullptr, p);
  const Desc& pt = g.tensor(0, CUDNN_DATA_BFLOAT16, st, transposed, true);
  g.reshape(p, pt);
  g.matmul(pt, d_o, dv);

  // dS = P ∘ (dO·Vᵀ − Dᵢ)·scale; dK = dSᵀ·Q
  const Desc& dp = g.virt(CUDNN_DATA_FLOAT, st);
  g.matmul(d_o, vt, dp);
  const Desc& dp_centred = g.virt(CUDNN_DATA_FLOAT, st);
  g.pointwise(CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, dp, &row_sums, dp_centred);
  const Desc& ds_unscaled = g.virt(CUDNN_DATA_FLOAT, st);
  g.pointwise(CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, dp_centred, &p, ds_unscaled);
  const Desc& ds = g.virt(CUDNN_DATA_FLOAT, st);
  g.pointwise(CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, ds_unscaled, &scale, ds);
  const Desc& dst = g.tensor(0, CUDNN_DATA_BFLOAT16, st, transposed, true);
  g.reshape(ds, dst);
  g.matmul(dst, q, dk);

  // dQ = dS·K (K: Kᵀ reshaped back to (B, NH, T, D)): written directly (the deterministic graph), or
  // accumulated in f32 and converted (the atomic one)
  const Desc& k = g.tensor(0, variant.k_type, bhtd, qkv_strides(s), true);
  g.reshape(kt, k);
  if (dq_path == DqPath::kDirect) {
    g.matmul(ds, k, dq);
    return;
  }
  const Dims contiguous = {s.NH * s.T * s.D(), s.T * s.D(), s.D(), 1};
  const Desc& dq_accumulator =
      g.tensor(kDQAccumulator, CUDNN_DATA_FLOAT, bhtd, contiguous, false, false, CUDNN_TENSOR_REORDERING_F16x16);
  g.matmul(ds, k, dq_accumulator);
  g.pointwise(CUDNN_POINTWISE_IDENTITY, CUDNN_DATA_FLOAT, dq_accumulator, nullptr, dq);
}

// The dQ path the backward asks for first: KRAKEN_CUDNN_ATTENTION_BACKWARD=atomic or deterministic (unset),
// read once per process (a bad value is an error naming the variable).
DqPath requested_dq_path() {
  static const DqPath path = [] {
    const char* env = std::getenv("KRAKEN_CUDNN_ATTENTION_BACKWARD");
    if (!env || !*env || std::strcmp(env, "deterministic") == 0) return DqPath::kDirect;
    if (std::strcmp(env, "atomic") == 0) return DqPath::kAtomic;
    KRAKEN_THROW("KRAKEN_CUDNN_ATTENTION_BACKWARD=", env, ": expected deterministic or atomic");
  }();
  return path;
}

// Bytes of the atomic graph's f32 dQ accumulator.
size_t dq_accumulator_bytes(const Shape& s) { return static_cast<size_t>(s.B * s.NH * s.T * s.D()) * sizeof(float); }

// ---- plans --------------------------------------------------------------------------------------------------

enum class Direction { kForward, kBackward };

// An engine configuration by value: cuDNN's engine (its global index) and the values of its knobs.
struct EngineChoice {
  int64_t engine = -1;
  std::vector<std::pair<int64_t, int64_t>> knobs;  // (cudnnBackendKnobType_t, value), sorted by type
  bool operator==(const EngineChoice& o) const { return engine == o.engine && knobs == o.knobs; }
};

// KRAKEN_CUDNN_ATTENTION_TUNE: one more plan of the same graph, to be timed against the plan in use.
struct Candidate {
  std::vector<std::unique_ptr<Desc>> descs;  // the engine, its knob choices and configuration
  std::unique_ptr<Desc> plan;
  int64_t workspace = 0;
  EngineChoice choice;
};

struct Plan {
  std::unique_ptr<GraphBuilder> graph;  // the descriptors the plan was built from
  std::unique_ptr<Desc> plan;
  int64_t workspace = 0;  // bytes cuDNN asks for (the backward's Dᵢ buffer comes on top)
  std::string error;      // non-empty: cuDNN refused the shape, and why
  bool nondeterministic = false;  // an engine cuDNN marks non-deterministic (only where asked for, below)
  DqPath dq_path = DqPath::kDirect;  // backward: the graph the plan was built from
  // KRAKEN_CUDNN_ATTENTION_TUNE only: the operation graph, whether its engines' notes are checked, the
  // configuration in use, and whether the first call has timed the others yet.
  const Desc* op_graph = nullptr;
  bool check_notes = true;
  EngineChoice choice;
  bool tuned = false;
};

struct DeviceState {
  cudnnHandle_t handle = nullptr;
  std::string error;  // cudnnCreate failed
};

constexpr int kMaxDevices = 64;

std::mutex& state_mutex() {
  static std::mutex m;
  return m;
}

int current_device() {
  int device = 0;
  KRAKEN_CUDA_CHECK(cudaGetDevice(&device));
  KRAKEN_CHECK(device >= 0 && device < kMaxDevices, "device ", device);
  return device;
}

// The device's handle (created on first use; the caller holds state_mutex()); null with *why set where
// cuDNN cannot start.
cudnnHandle_t handle_for(int device, std::string* why) {
  static DeviceState states[kMaxDevices];
  DeviceState& st = states[device];
  if (!st.handle && st.error.empty()) {
    try {
      KRAKEN_CUDNN_CHECK(cudnnCreate(&st.handle));
    } catch (const std::exception& e) {
      st.handle = nullptr;
      st.error = e.what();
    }
  }
  if (!st.handle && why) *why = st.error;
  return st.handle;
}

bool has_note(const Desc& engine, cudnnBackendNumericalNote_t wanted) {
  cudnnBackendNumericalNote_t notes[CUDNN_NUMERICAL_NOTE_TYPE_COUNT];
  int64_t count = 0;
  KRAKEN_CUDNN_CHECK(cudnnBackendGetAttribute(engine.get(), CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,
                                              CUDNN_TYPE_NUMERICAL_NOTE, CUDNN_NUMERICAL_NOTE_TYPE_COUNT, &count,
                                              notes));
  for (int64_t i = 0; i < count; ++i)
    if (notes[i] == wanted) return true;
  return false;
}

cudnnHandle_t current_handle();

// ---- KRAKEN_CUDNN_ATTENTION_TUNE: cuDNN's other engine configurations, timed -------------------------------

// KRAKEN_CUDNN_ATTENTION_TUNE=n (read once; 2 ≤ n ≤ 64): a measurement mode, the attention's counterpart
// of KRAKEN_CUBLASLT_TUNE (kernels/cuda/matmul_lt.cu). The plan in use is heuristics mode A's first
// configuration that finalizes (build_plan_of). Under this switch a shape's first call also builds up to
// n − 1 others of the same graph and times them all on that call's buffers: every configuration that
// heuristics modes A, B and FALLBACK offer, then each of those with one knob moved within the range its
// engine's CUDNN_ATTR_ENGINE_KNOB_INFO gives (tile sizes, kernel configurations: the engine's own list,
// not guessed here), nearest values first, every knob in turn. Engines marked non-deterministic are
// passed over where the plan in use checks that note. It keeps the fastest and says so on stderr, one
// line a shape, each configuration named by engine and knobs. Why: the Kraken preset's heads (D = 168)
// spend ~57 of its 178 ms of kernels in cuDNN's attention at ~118 TFLOP/s backward, against 184 at
// GPT-2's D = 64 (bench/RESULTS.md), and mode A's first choice was never compared with anything cuDNN
// itself offers. Building a configuration compiles it (NVRTC; seconds), so n bounds the cost. Unset, 0
// or 1: mode A's first, as always.
int attention_tune_limit() {
  static const int n =
      cuda_detail::tune_count_from_env("KRAKEN_CUDNN_ATTENTION_TUNE", 64, "cuDNN's engine configurations");
  return n;
}

// The knob types' names in cudnnBackendKnobType_t's order (cudnn_graph.h), for the report.
const char* knob_name(int64_t type) {
  static const char* const kNames[] = {
      "SPLIT_K", "SWIZZLE", "TILE_SIZE", "USE_TEX", "EDGE", "KBLOCK", "LDGA", "LDGB", "CHUNK_K", "SPLIT_H",
      "WINO_TILE", "MULTIPLY", "SPLIT_K_BUF", "TILEK", "STAGES", "REDUCTION_MODE", "CTA_SPLIT_K_MODE",
      "SPLIT_K_SLC", "IDX_MODE", "SLICED", "SPLIT_RS", "SINGLEBUFFER", "LDGC", "SPECFILT", "KERNEL_CFG",
      "WORKSPACE", "TILE_CGA", "TILE_CGA_M", "TILE_CGA_N", "BLOCK_SIZE", "OCCUPANCY", "ARRAY_SIZE_PER_THREAD",
      "NUM_C_PER_BLOCK", "SPLIT_COLS", "TILE_ROWS", "TILE_COLS", "LOAD_SIZE", "CTA_COUNT", "STREAM_K",
      "SPLIT_P_SLC", "TILE_M", "TILE_N", "WARP_SPEC_CFG", "SWAP_AB"};
  return type >= 0 && type < static_cast<int64_t>(std::size(kNames)) ? kNames[type] : "KNOB";
}

std::string choice_name(const EngineChoice& c) {
  std::string s = "engine " + std::to_string(c.engine) + " {";
  for (size_t i = 0; i < c.knobs.size(); ++i)
    s += std::string(i ? ", " : "") + knob_name(c.knobs[i].first) + "=" + std::to_string(c.knobs[i].second);
  return s + "}";
}

int64_t global_index_of(const Desc& engine) {
  int64_t index = -1, n = 0;
  KRAKEN_CUDNN_CHECK(cudnnBackendGetAttribute(engine.get(), CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &n,
                                              &index));
  return index;
}

// Up to `capacity` descriptors of `type` that an attribute of `from` is read into (cuDNN fills descriptors
// the caller created); the ones read come back. (Knobs are read into CUDNN_KNOB_TYPE_COUNTS of them, as
// cudnn-frontend reads them; heuristics' results after asking their count.)
std::vector<std::unique_ptr<Desc>> read_descriptors(cudnnBackendDescriptor_t from, cudnnBackendAttributeName_t name,
                                                    cudnnBackendDescriptorType_t type, int64_t capacity) {
  std::vector<std::unique_ptr<Desc>> descs;
  std::vector<cudnnBackendDescriptor_t> raw;
  for (int64_t i = 0; i < capacity; ++i) {
    descs.push_back(std::make_unique<Desc>(type));
    raw.push_back(descs.back()->get());
  }
  int64_t n = 0;
  KRAKEN_CUDNN_CHECK(cudnnBackendGetAttribute(from, name, CUDNN_TYPE_BACKEND_DESCRIPTOR, capacity, &n, raw.data()));
  descs.resize(static_cast<size_t>(std::min(n, capacity)));
  return descs;
}

// The engine and knob values of a configuration heuristics returned.
EngineChoice choice_of(cudnnBackendDescriptor_t config) {
  EngineChoice c;
  Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
  int64_t n = 0;
  KRAKEN_CUDNN_CHECK(cudnnBackendGetAttribute(config, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n,
                                              engine.ptr()));
  c.engine = global_index_of(engine);
  for (const auto& knob : read_descriptors(config, CUDNN_ATTR_ENGINECFG_KNOB_CHOICES,
                                           CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR, CUDNN_KNOB_TYPE_COUNTS)) {
    cudnnBackendKnobType_t type{};
    int64_t value = 0;
    KRAKEN_CUDNN_CHECK(cudnnBackendGetAttribute(knob->get(), CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE, CUDNN_TYPE_KNOB_TYPE,
                                                1, &n, &type));
    KRAKEN_CUDNN_CHECK(
        cudnnBackendGetAttribute(knob->get(), CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE, CUDNN_TYPE_INT64, 1, &n, &value));
    c.knobs.emplace_back(static_cast<int64_t>(type), value);
  }
  std::sort(c.knobs.begin(), c.knobs.end());
  return c;
}

// An engine of the graph by global index, finalized.
std::unique_ptr<Desc> engine_of(const Desc& op_graph, int64_t index) {
  auto engine = std::make_unique<Desc>(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
  set_desc(engine->get(), CUDNN_ATTR_ENGINE_OPERATION_GRAPH, op_graph);
  set(engine->get(), CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &index);
  KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(engine->get()));
  return engine;
}

// The range of one of an engine's knobs: its values are lo, lo + stride, …, up to hi.
struct KnobRange {
  int64_t type, lo, hi, stride;
};

// The ranges of an engine's knobs (CUDNN_ATTR_ENGINE_KNOB_INFO).
std::vector<KnobRange> knob_ranges(const Desc& engine) {
  std::vector<KnobRange> out;
  for (const auto& info : read_descriptors(engine.get(), CUDNN_ATTR_ENGINE_KNOB_INFO,
                                           CUDNN_BACKEND_KNOB_INFO_DESCRIPTOR, CUDNN_KNOB_TYPE_COUNTS)) {
    cudnnBackendKnobType_t type{};
    int64_t lo = 0, hi = 0, stride = 0, n = 0;
    KRAKEN_CUDNN_CHECK(
        cudnnBackendGetAttribute(info->get(), CUDNN_ATTR_KNOB_INFO_TYPE, CUDNN_TYPE_KNOB_TYPE, 1, &n, &type));
    KRAKEN_CUDNN_CHECK(
        cudnnBackendGetAttribute(info->get(), CUDNN_ATTR_KNOB_INFO_MINIMUM_VALUE, CUDNN_TYPE_INT64, 1, &n, &lo));
    KRAKEN_CUDNN_CHECK(
        cudnnBackendGetAttribute(info->get(), CUDNN_ATTR_KNOB_INFO_MAXIMUM_VALUE, CUDNN_TYPE_INT64, 1, &n, &hi));
    KRAKEN_CUDNN_CHECK(
        cudnnBackendGetAttribute(info->get(), CUDNN_ATTR_KNOB_INFO_STRIDE, CUDNN_TYPE_INT64, 1, &n, &stride));
    if (stride > 0 && hi > lo) out.push_back({static_cast<int64_t>(type), lo, hi, stride});
  }
  return out;
}

// The configurations heuristics `mode` offers for the graph (none where the mode is refused).
std::vector<EngineChoice> offered_choices(const Desc& op_graph, cudnnBackendHeurMode_t mode) {
  std::vector<EngineChoice> out;
  try {
    Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    set_desc(heur.get(), CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, op_graph);
    set(heur.get(), CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
    KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(heur.get()));
    int64_t count = 0;  // (asked first, as build_plan_of does)
    KRAKEN_CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                                CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr));
    for (const auto& config : read_descriptors(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                               CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, std::min<int64_t>(count, 64)))
      out.push_back(choice_of(config->get()));
  } catch (const Error&) {
  }
  return out;
}

// A plan of the graph on the configuration `c`; throws where cuDNN refuses it, or where the engine is
// marked non-deterministic and `check_note` is set.
Candidate candidate_of(cudnnHandle_t handle, const Desc& op_graph, const EngineChoice& c, bool check_note) {
  Candidate out;
  out.choice = c;
  out.descs.push_back(engine_of(op_graph, c.engine));
  const Desc& engine = *out.descs.back();
  if (check_note && has_note(engine, CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC))
    KRAKEN_THROW(choice_name(c), " is marked non-deterministic");
  std::vector<cudnnBackendDescriptor_t> knobs;
  for (const auto& [type, value] : c.knobs) {
    out.descs.push_back(std::make_unique<Desc>(CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR));
    const cudnnBackendKnobType_t t = static_cast<cudnnBackendKnobType_t>(type);
    set(out.descs.back()->get(), CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE, CUDNN_TYPE_KNOB_TYPE, 1, &t);
    set(out.descs.back()->get(), CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE, CUDNN_TYPE_INT64, 1, &value);
    KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(out.descs.back()->get()));
    knobs.push_back(out.descs.back()->get());
  }
  out.descs.push_back(std::make_unique<Desc>(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
  const Desc& config = *out.descs.back();
  set_desc(config.get(), CUDNN_ATTR_ENGINECFG_ENGINE, engine);
  if (!knobs.empty())
    set(config.get(), CUDNN_ATTR_ENGINECFG_KNOB_CHOICES, CUDNN_TYPE_BACKEND_DESCRIPTOR,
        static_cast<int64_t>(knobs.size()), knobs.data());
  KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(config.get()));
  out.plan = std::make_unique<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
  set(out.plan->get(), CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
  set_desc(out.plan->get(), CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, config);
  KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(out.plan->get()));
  int64_t n = 0;
  KRAKEN_CUDNN_CHECK(cudnnBackendGetAttribute(out.plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                              CUDNN_TYPE_INT64, 1, &n, &out.workspace));
  return out;
}

// The configurations to time, the plan in use first: what the heuristics offer, then one knob of each
// moved, at most `limit` in all; and how many were refused on the way.
std::vector<Candidate> tuning_candidates(Plan& p, cudnnHandle_t handle, size_t limit, int* refused) {
  std::vector<Candidate> out(1);
  out[0].plan = std::move(p.plan);
  out[0].workspace = p.workspace;
  out[0].choice = p.choice;
  std::vector<EngineChoice> tried = {p.choice}, bases;
  // Enough plans, or enough tried (a refused configuration may have cost a compilation too).
  const auto full = [&] { return out.size() >= limit || tried.size() >= 4 * limit; };
  const auto consider = [&](const EngineChoice& c) {
    if (full() || std::find(tried.begin(), tried.end(), c) != tried.end()) return;
    tried.push_back(c);
    try {
      out.push_back(candidate_of(handle, *p.op_graph, c, p.check_notes));
    } catch (const Error&) {
      ++*refused;
    }
  };
  bases.push_back(p.choice);
  for (const cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_B, CUDNN_HEUR_MODE_FALLBACK})
    for (const EngineChoice& c : offered_choices(*p.op_graph, mode)) {
      if (std::find(bases.begin(), bases.end(), c) == bases.end()) bases.push_back(c);
      consider(c);
    }
  // One knob moved at a time, nearest values first and every knob in turn at each distance, so that a
  // small limit samples all the knobs rather than exhausting the first. (A knob the configuration does
  // not set counts from its minimum.)
  for (const EngineChoice& base : bases) {
    std::vector<KnobRange> ranges;
    try {
      ranges = knob_ranges(*engine_of(*p.op_graph, base.engine));
    } catch (const Error&) {
      continue;
    }
    for (int64_t distance = 1; !full(); ++distance) {
      bool any = false;  // a value within some knob's range at this distance
      for (const KnobRange& r : ranges) {
        const auto is_r = [&](const std::pair<int64_t, int64_t>& k) { return k.first == r.type; };
        const auto at = std::find_if(base.knobs.begin(), base.knobs.end(), is_r);
        const int64_t from = at == base.knobs.end() ? r.lo : at->second;
        for (const int64_t value : {from + distance * r.stride, from - distance * r.stride}) {
          if (value < r.lo || value > r.hi) continue;
          any = true;
          EngineChoice moved = base;
          const auto it = std::find_if(moved.knobs.begin(), moved.knobs.end(), is_r);
          if (it == moved.knobs.end()) {
            moved.knobs.emplace_back(r.type, value);
            std::sort(moved.knobs.begin(), moved.knobs.end());
          } else {
            it->second = value;
          }
          consider(moved);
        }
      }
      if (!any) break;
    }
  }
  return out;
}

// KRAKEN_CUDNN_ATTENTION_TUNE: on a shape's first call, times the candidates with `run` (which runs
// p.plan with p.workspace on the call's buffers, overwriting its outputs: a run to warm up, then 3 timed),
// keeps the fastest in p and reports on stderr. The caller's own run follows, on the plan kept.
template <class Run>
void tune_once(Plan& p, const std::string& shape, CUstream_st* stream, Run&& run) {
  if (attention_tune_limit() < 2 || p.tuned || !p.op_graph) return;
  p.tuned = true;
  int refused = 0;
  std::vector<Candidate> candidates =
      tuning_candidates(p, current_handle(), static_cast<size_t>(attention_tune_limit()), &refused);
  cudaEvent_t start = nullptr, stop = nullptr;
  KRAKEN_CUDA_CHECK(cudaEventCreate(&start));
  KRAKEN_CUDA_CHECK(cudaEventCreate(&stop));
  constexpr int kTimed = 3;
  std::vector<float> micros(candidates.size(), -1.0f);
  size_t best = 0;
  for (size_t i = 0; i < candidates.size(); ++i) {
    p.plan = std::move(candidates[i].plan);
    p.workspace = candidates[i].workspace;
    try {
      run();
      KRAKEN_CUDA_CHECK(cudaEventRecord(start, reinterpret_cast<cudaStream_t>(stream)));
      for (int r = 0; r < kTimed; ++r) run();
      KRAKEN_CUDA_CHECK(cudaEventRecord(stop, reinterpret_cast<cudaStream_t>(stream)));
      KRAKEN_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0.0f;
      KRAKEN_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      micros[i] = 1e3f * ms / kTimed;
      if (micros[best] < 0.0f || micros[i] < micros[best]) best = i;
    } catch (const Error&) {
      // (a configuration that does not run is not chosen)
    }
    candidates[i].plan = std::move(p.plan);
  }
  KRAKEN_CUDA_CHECK(cudaEventDestroy(start));
  KRAKEN_CUDA_CHECK(cudaEventDestroy(stop));
  if (micros[best] < 0.0f) best = 0;  // none ran: the plan in use stays (its own call reports the error)
  p.plan = std::move(candidates[best].plan);
  p.workspace = candidates[best].workspace;
  p.choice = candidates[best].choice;
  std::string others;
  for (size_t i = 1; i < candidates.size(); ++i)
    others += "; #" + std::to_string(i) + " " + choice_name(candidates[i].choice) + " " +
              (micros[i] < 0.0f ? std::string("did not run") : std::to_string(static_cast<int>(micros[i])) + " µs");
  const double gain = micros[0] > 0.0f && micros[best] > 0.0f ? 100.0 * (micros[0] - micros[best]) / micros[best] : 0.0;
  std::fprintf(stderr,
               "cuDNN attention tune: %s: mode A's first (%s) %.1f µs, best #%zu of %zu %.1f µs (%.0f%% faster); "
               "%d refused%s\n",
               shape.c_str(), choice_name(candidates[0].choice).c_str(), micros[0], best, candidates.size(),
               micros[best], gain, refused, others.c_str());
}

// Builds the graph and picks its plan; throws kraken::Error with cuDNN's reason where it cannot. The
// atomic dQ graph is non-deterministic by design, so its engines' notes are not checked.
void build_plan_of(Plan& p, cudnnHandle_t handle, const Shape& s, Direction dir, const GraphVariant& v,
                   DqPath dq_path) {
  p.graph = std::make_unique<GraphBuilder>(handle);
  GraphBuilder& g = *p.graph;
  if (dir == Direction::kForward)
    build_forward(g, s, v);
  else
    build_backward(g, s, v, dq_path);
  const bool check_notes = dir == Direction::kForward || dq_path == DqPath::kDirect;
  const Desc& op_graph = g.graph();

  Desc& heur = g.make(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
  const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
  set_desc(heur.get(), CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, op_graph);
  set(heur.get(), CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
  KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(heur.get()));
  int64_t count = 0;
  KRAKEN_CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                              CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr));
  if (count <= 0) KRAKEN_THROW("cuDNN's heuristics (mode A) offer no engine for this graph");
  std::vector<Desc*> configs;
  std::vector<cudnnBackendDescriptor_t> raw;
  for (int64_t i = 0; i < count; ++i) {
    configs.push_back(&g.make(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
    raw.push_back(configs.back()->get());
  }
  int64_t returned = 0;
  KRAKEN_CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                              CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &returned, raw.data()));
  std::string refusals;
  std::vector<int64_t> nondeterministic;  // configurations passed over for their note
  const auto finalize = [&](int64_t i, bool check_note) {
    try {
      Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
      int64_t n = 0;
      KRAKEN_CUDNN_CHECK(cudnnBackendGetAttribute(configs[i]->get(), CUDNN_ATTR_ENGINECFG_ENGINE,
                                                  CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n, engine.ptr()));
      if (check_note && has_note(engine, CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC)) {
        refusals += "; engine config " + std::to_string(i) + " is marked non-deterministic";
        nondeterministic.push_back(i);
        return false;
      }
      auto plan = std::make_unique<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
      set(plan->get(), CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
      set_desc(plan->get(), CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, *configs[i]);
      KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(plan->get()));
      int64_t workspace = 0;
      KRAKEN_CUDNN_CHECK(cudnnBackendGetAttribute(plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                                  CUDNN_TYPE_INT64, 1, &n, &workspace));
      p.plan = std::move(plan);
      p.workspace = workspace;
      p.nondeterministic = check_notes && !check_note;  // the deterministic graph on an engine marked otherwise
      p.dq_path = dq_path;
      p.check_notes = check_note;
      if (attention_tune_limit() > 1) {
        try {
          p.choice = choice_of(configs[i]->get());
          p.op_graph = &op_graph;  // (tune_once tunes only plans that have it)
        } catch (const Error& e) {
          std::fprintf(stderr, "cuDNN attention tune: the plan's configuration unreadable (%s): not tuned\n",
                       e.what());
        }
      }
      return true;
    } catch (const Error& e) {
      refusals += "; engine config " + std::to_string(i) + ": " + e.what();
      return false;
    }
  };
  for (int64_t i = 0; i < returned; ++i)
    if (finalize(i, check_notes)) return;
  if (!check_notes) KRAKEN_THROW("none of cuDNN's ", returned, " engine configurations finalized", refusals);
  // Only for measuring (bench rows), never a default: KRAKEN_CUDNN_ATTENTION_NONDETERMINISTIC=1 takes an
  // engine cuDNN marks non-deterministic where no other finalizes, so that its speed can be known even
  // where the determinism Kraken asks for is not offered.
  static const bool allow_nondeterministic = [] {
    const char* env = std::getenv("KRAKEN_CUDNN_ATTENTION_NONDETERMINISTIC");
    return env && std::strcmp(env, "1") == 0;
  }();
  if (allow_nondeterministic)
    for (const int64_t i : nondeterministic)
      if (finalize(i, false)) return;
  KRAKEN_THROW("none of cuDNN's ", returned, " engine configurations finalized", refusals);
}

// The plan of the first graph variant cuDNN takes (the forward has only the index type to vary); throws
// with every variant's reason where none is taken. Returns the variant's index in kGraphVariants. A
// backward asked for the atomic dQ tries its variants first, then the deterministic graph's, and
// `atomic_refused` gets the reasons where it falls back.
size_t build_plan(Plan& p, cudnnHandle_t handle, const Shape& s, Direction dir, std::string* atomic_refused) {
  std::string reasons;
  const bool atomic_first = dir == Direction::kBackward && requested_dq_path() == DqPath::kAtomic;
  for (const DqPath path : {DqPath::kAtomic, DqPath::kDirect}) {
    if (path == DqPath::kAtomic && !atomic_first) continue;
    for (size_t i = 0; i < std::size(kGraphVariants); ++i) {
      const GraphVariant& v = kGraphVariants[i];
      if (dir == Direction::kForward && v.k_type != kGraphVariants[0].k_type) continue;
      try {
        build_plan_of(p, handle, s, dir, v, path);
        return i;
      } catch (const Error& e) {
        p.graph.reset();
        p.plan.reset();
        reasons += std::string(reasons.empty() ? "" : " | ") + v.name +
                   (path == DqPath::kAtomic ? " (atomic dQ)" : "") + ": " + e.what();
      }
    }
    if (path == DqPath::kAtomic && atomic_refused) *atomic_refused = reasons;
  }
  KRAKEN_THROW(reasons);
}

std::string shape_name(const Shape& s, Direction dir) {
  return std::string(dir == Direction::kForward ? "forward" : "backward") + " B=" + std::to_string(s.B) +
         " T=" + std::to_string(s.T) + " C=" + std::to_string(s.C) + " NH=" + std::to_string(s.NH);
}

// The cached plan of a shape on the current device (built on first use); its error says why not.
Plan& plan_for(const Shape& s, Direction dir) {
  attention_tune_limit();  // (a bad KRAKEN_CUDNN_ATTENTION_TUNE is the caller's error, not a refused shape)
  using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int>;
  static std::map<Key, std::unique_ptr<Plan>> plans;
  const int device = current_device();
  std::lock_guard<std::mutex> lock(state_mutex());
  std::unique_ptr<Plan>& slot = plans[Key{device, s.B, s.T, s.C, s.NH, static_cast<int>(dir)}];
  if (slot) return *slot;
  slot = std::make_unique<Plan>();
  std::string why;
  cudnnHandle_t handle = handle_for(device, &why);
  if (!handle) {
    slot->error = "cuDNN did not start: " + why;
  } else {
    try {
      std::string atomic_refused;
      const size_t variant = build_plan(*slot, handle, s, dir, &atomic_refused);
      // worth knowing (tools/gpu-check.sh keeps the lines that start so)
      if (!atomic_refused.empty())
        std::fprintf(stderr, "cuDNN attention %s: the atomic dQ graph refused (%s); planned the deterministic one\n",
                     shape_name(s, dir).c_str(), atomic_refused.c_str());
      else if (slot->dq_path == DqPath::kAtomic)
        std::fprintf(stderr, "cuDNN attention %s: atomic dQ (KRAKEN_CUDNN_ATTENTION_BACKWARD=atomic; not deterministic)\n",
                     shape_name(s, dir).c_str());
      if (variant > 0)
        std::fprintf(stderr, "cuDNN attention %s: planned with the graph variant \"%s\" (the ones before it refused)\n",
                     shape_name(s, dir).c_str(), kGraphVariants[variant].name);
      if (slot->nondeterministic)
        std::fprintf(stderr, "cuDNN attention %s: NON-DETERMINISTIC engine (KRAKEN_CUDNN_ATTENTION_NONDETERMINISTIC=1; "
                     "no deterministic one finalized)\n", shape_name(s, dir).c_str());
    } catch (const std::exception& e) {
      slot->plan.reset();
      slot->error = "cuDNN " + shape_name(s, dir) + ": " + e.what();
    }
  }
  return *slot;
}

// Why the graphs cannot take this shape before asking cuDNN ("" where they may).
std::string precheck(const Shape& s) {
  if (s.B <= 0 || s.T <= 0 || s.NH <= 0 || s.C <= 0 || s.C % s.NH != 0)
    return "shape B=" + std::to_string(s.B) + " T=" + std::to_string(s.T) + " C=" + std::to_string(s.C) +
           " NH=" + std::to_string(s.NH) + " is not an attention shape";
  if (s.D() % 8 != 0) return "head size D=" + std::to_string(s.D()) + " is not a multiple of 8 (cuDNN's SDPA needs it)";
  if (s.D() > 256) return "head size D=" + std::to_string(s.D()) + " is above 256 (cuDNN's SDPA limit)";
  return "";
}

std::string why_not(const Shape& s) {
  const std::string pre = precheck(s);
  if (!pre.empty()) return pre;
  const Plan& f = plan_for(s, Direction::kForward);
  if (!f.plan) return f.error;
  const Plan& b = plan_for(s, Direction::kBackward);
  if (!b.plan) return b.error;
  return "";
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

constexpr size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// The current device's cuDNN handle.
cudnnHandle_t current_handle() {
  std::string why;
  cudnnHandle_t handle = nullptr;
  {
    const int device = current_device();
    std::lock_guard<std::mutex> lock(state_mutex());
    handle = handle_for(device, &why);
  }
  KRAKEN_CHECK(handle, "cuDNN handle: ", why);
  return handle;
}

// Runs a plan: binds the buffers (uids[i] ↔ ptrs[i]) and the workspace, on `stream`.
void execute(const Plan& p, const int64_t* uids, void* const* ptrs, int64_t n, void* workspace, CUstream_st* stream) {
  cudnnHandle_t handle = current_handle();
  KRAKEN_CUDNN_CHECK(cudnnSetStream(handle, reinterpret_cast<cudaStream_t>(stream)));
  Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
  set(pack.get(), CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, n, uids);
  set(pack.get(), CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, n, ptrs);
  set(pack.get(), CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace);
  KRAKEN_CUDNN_CHECK(cudnnBackendFinalize(pack.get()));
  KRAKEN_CUDNN_CHECK(cudnnBackendExecute(handle, p.plan->get(), pack.get()));
}

// The plan of a call, or a kraken::Error naming why cuDNN cannot run it.
Plan& checked_plan(const Shape& s, Direction dir, std::initializer_list<const void*> buffers) {
  const std::string pre = precheck(s);
  if (!pre.empty()) KRAKEN_THROW("cuDNN attention: ", pre);
  for (const void* b : buffers)
    if (!aligned16(b)) KRAKEN_THROW("cuDNN attention: every buffer must be 16-byte aligned");
  Plan& p = plan_for(s, dir);
  if (!p.plan) KRAKEN_THROW("cuDNN attention not supported: ", p.error);
  return p;
}

}  // namespace

std::string attention_bf16_cudnn_why_not(int64_t B, int64_t T, int64_t C, int64_t NH) {
  return why_not(Shape{B, T, C, NH});
}

// A head size on its own: a small probe shape (2 heads, T = 130: more than one 64- and 128-row tile and a
// ragged last one). The real shape is asked for separately (attention_bf16_cudnn_usable).
std::string attention_bf16_cudnn_why_not(int64_t D) {
  if (D <= 0) return "head size D=" + std::to_string(D) + " is not positive";
  return why_not(Shape{1, 130, 2 * D, 2});
}

bool attention_bf16_cudnn_supported(int64_t D) { return attention_bf16_cudnn_why_not(D).empty(); }

bool attention_bf16_cudnn_usable(const void* const* buffers, int64_t count, int64_t B, int64_t T, int64_t C,
                                 int64_t NH) {
  for (int64_t i = 0; i < count; ++i)
    if (!aligned16(buffers[i])) return false;
  return why_not(Shape{B, T, C, NH}).empty();
}

void attention_forward_bf16_cudnn_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, int64_t C,
                                       int64_t NH, CUstream_st* stream) {
  const Shape s{B, T, C, NH};
  Plan& p = checked_plan(s, Direction::kForward, {out, lse, qkv, qkv + C, qkv + 2 * C});
  float scale = 1.0f / std::sqrt(static_cast<float>(s.D()));
  float mask_value = std::numeric_limits<float>::lowest();  // the masked scores' value (see the top)
  const auto run = [&] {
    void* workspace = p.workspace > 0
                          ? cuda_detail::device_scratch(cuda_detail::ScratchSlot::kCudnnAttention, p.workspace)
                          : nullptr;
    const int64_t uids[] = {kQ, kK, kV, kO, kStats, kScale, kMaskValue};
    void* ptrs[] = {const_cast<uint16_t*>(qkv), const_cast<uint16_t*>(qkv + C), const_cast<uint16_t*>(qkv + 2 * C),
                    out, lse, &scale, &mask_value};
    execute(p, uids, ptrs, 7, workspace, stream);
  };
  tune_once(p, shape_name(s, Direction::kForward), stream, run);
  run();
}

void attention_backward_bf16_cudnn_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                        const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                                        CUstream_st* stream) {
  const Shape s{B, T, C, NH};
  Plan& p = checked_plan(s, Direction::kBackward,
                         {dqkv, dqkv + C, dqkv + 2 * C, dout, qkv, qkv + C, qkv + 2 * C, out, lse});
  float scale = 1.0f / std::sqrt(static_cast<float>(s.D()));
  float mask_value = std::numeric_limits<float>::lowest();  // the masked scores' value (see the top)
  float one = 1.0f;
  const bool atomic = p.dq_path == DqPath::kAtomic;
  const auto run = [&] {
    // Workspace: cuDNN's, then Dᵢ (B·NH·T floats), then the atomic graph's dQ accumulator, each 256-byte
    // aligned.
    const size_t plan_bytes = round_up(static_cast<size_t>(p.workspace), 256);
    const size_t sums_bytes = round_up(static_cast<size_t>(B * NH * T) * sizeof(float), 256);
    const size_t accumulator_bytes = atomic ? round_up(dq_accumulator_bytes(s), 256) : 0;
    char* scratch = static_cast<char*>(cuda_detail::device_scratch(cuda_detail::ScratchSlot::kCudnnAttention,
                                                                   plan_bytes + sums_bytes + accumulator_bytes));
    void* row_sums = scratch + plan_bytes;
    void* dq_accumulator = scratch + plan_bytes + sums_bytes;
    void* workspace = p.workspace > 0 ? static_cast<void*>(scratch) : nullptr;
    if (atomic)
      KRAKEN_CUDA_CHECK(
          cudaMemsetAsync(dq_accumulator, 0, dq_accumulator_bytes(s), reinterpret_cast<cudaStream_t>(stream)));
    const int64_t uids[] = {kQ, kK, kV, kO, kDO, kStats, kDQ, kDK, kDV, kRowSums, kScale, kMaskValue, kOne,
                            kDQAccumulator};
    void* ptrs[] = {const_cast<uint16_t*>(qkv), const_cast<uint16_t*>(qkv + C), const_cast<uint16_t*>(qkv + 2 * C),
                    const_cast<uint16_t*>(out), const_cast<uint16_t*>(dout), const_cast<float*>(lse),
                    dqkv, dqkv + C, dqkv + 2 * C, row_sums, &scale, &mask_value, &one, dq_accumulator};
    execute(p, uids, ptrs, atomic ? 14 : 13, workspace, stream);
  };
  tune_once(p, shape_name(s, Direction::kBackward), stream, run);
  run();
}

bool attention_bf16_cudnn_backward_deterministic(int64_t B, int64_t T, int64_t C, int64_t NH) {
  const Shape s{B, T, C, NH};
  if (!precheck(s).empty()) return true;
  const Plan& p = plan_for(s, Direction::kBackward);
  return !p.plan || p.dq_path == DqPath::kDirect;
}

}  // namespace kraken::kernels

#else  // built without cuDNN: every shape is unsupported, and says why

namespace kraken::kernels {

namespace {
const char* kNoCudnn = "this build has no cuDNN (CMake found no cudnn.h and libcudnn: set CUDNN_ROOT)";
}

std::string attention_bf16_cudnn_why_not(int64_t, int64_t, int64_t, int64_t) { return kNoCudnn; }
std::string attention_bf16_cudnn_why_not(int64_t) { return kNoCudnn; }
bool attention_bf16_cudnn_supported(int64_t) { return false; }
bool attention_bf16_cudnn_usable(const void* const*, int64_t, int64_t, int64_t, int64_t, int64_t) { return false; }
bool attention_bf16_cudnn_backward_deterministic(int64_t, int64_t, int64_t, int64_t) { return true; }

void attention_forward_bf16_cudnn_cuda(uint16_t*, float*, const uint16_t*, int64_t, int64_t, int64_t, int64_t,
                                       CUstream_st*) {
  KRAKEN_THROW("cuDNN attention: ", kNoCudnn);
}
void attention_backward_bf16_cudnn_cuda(uint16_t*, const uint16_t*, const uint16_t*, const uint16_t*, const float*,
                                        int64_t, int64_t, int64_t, int64_t, CUstream_st*) {
  KRAKEN_THROW("cuDNN attention: ", kNoCudnn);
}

}  // namespace kraken::kernels

#endif  // KRAKEN_WITH_CUDNN
