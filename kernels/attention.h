// Fused causal multi-head self-attention (GPT-2's attention, one kernel family).
//
// Layout (GPT-2's c_attn output): qkv (B, T, 3C) holds q in columns [0, C), k in [C, 2C), v in
// [2C, 3C); head h uses columns h·D .. (h+1)·D of each, D = C / NH. For every (b, h):
//   S = q·kᵀ / √D  (T, T),  S[t, s] = −∞ for s > t  (causal mask)
//   P = softmax(S) row-wise,  out = P·v  (T, D), written to out (B, T, C) columns h·D .. (h+1)·D
//   lse[b, h, t] = log Σ_{s ≤ t} exp(S[t, s])   so that P = exp(S − lse) can be recomputed.
// Only out and lse (B, NH, T) survive the forward; no (T, T) matrix is stored. Backward is the
// FlashAttention recurrence (Dao et al. 2022, Alg. 4; Dao 2023, Alg. 2): with Dᵢ = Σ_d dO[i, d]·O[i, d],
//   P = exp(S − lse),  dV = Pᵀ·dO,  dP = dO·vᵀ,  dS = P ∘ (dP − D),  dq = dS·k/√D,  dk = dSᵀ·q/√D,
// recomputed block by block. Gradients accumulate: dqkv (B, T, 3C) += the q, k and v gradients (all but
// the cuDNN implementation, which overwrites: see below).
//
// The CPU kernels are deterministic: every output element is produced by one thread in a fixed order,
// so results are bit-identical for any OpenMP thread count.
#pragma once

#include <cstdint>
#include <string>

struct CUstream_st;

namespace kraken::kernels {

// out (B, T, C), lse (B, NH, T), qkv (B, T, 3C); C % NH == 0.
void attention_forward_cpu(float* out, float* lse, const float* qkv, int64_t B, int64_t T, int64_t C, int64_t NH);
// dqkv (B, T, 3C) += ∂L/∂qkv given dout (B, T, C) = ∂L/∂out and the forward's qkv, out and lse.
void attention_backward_cpu(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                            int64_t B, int64_t T, int64_t C, int64_t NH);

// CUDA: the same contracts, fp32, on `stream`.
void attention_forward_cuda(float* out, float* lse, const float* qkv, int64_t B, int64_t T, int64_t C, int64_t NH,
                            CUstream_st* stream);
void attention_backward_cuda(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                             int64_t B, int64_t T, int64_t C, int64_t NH, CUstream_st* stream);
// CUDA, bf16 storage: qkv, out, dout, dqkv bf16, lse f32. Four implementations:
//   _simt_ (kernels/cuda/attention.cu): every product and softmax in f32 on CUDA cores (the fp32
//     kernels on the widened tiles), out and dqkv rounded once at the end.
//   _tc_ (kernels/cuda/attention_tc.cu) and _mma_ (kernels/cuda/attention_mma.cu): the products on
//     tensor cores, bf16 operands with f32 accumulation — through WMMA with the scores in shared
//     memory, or through mma.sync with the scores in registers (FlashAttention-2 style); scores, the
//     online softmax (running max and sum), Dᵢ and lse stay f32, out and dqkv are rounded once at the
//     end. The one deviation from the f32 arithmetic, the usual FlashAttention practice: the
//     probabilities P (and in backward dS = P∘(dP − D)) are rounded to bf16 before they multiply v (dO,
//     q, k), a relative change of at most 2⁻⁸ per element. The forward normalises by the sum of those
//     rounded weights, so out stays a convex combination of v rows; lse is computed from the f32
//     weights. Both handle 1 ≤ D ≤ 256 where the device's shared memory per block allows
//     (attention_bf16_{tc,mma}_supported); sm_80+. They agree to rounding, not bit for bit.
//   _cudnn_ (kernels/cuda/attention_cudnn.cu): cuDNN's fused flash attention, built through the backend
//     API as the operation graph its runtime fusion engine recognises (that file says why this route
//     and which graph). bf16 products with f32 accumulation; lse is cuDNN's softmax statistics, the same
//     natural-log log-sum-exp. Unlike the others its backward OVERWRITES dqkv (dQ, dK, dV cover every
//     column) instead of adding to it. It asks for a deterministic backward (the graph without cuDNN's
//     f32 dQ accumulation, engines marked non-deterministic skipped); cuDNN documents no stronger
//     guarantee, so a GPU test checks two runs for equal bits. KRAKEN_CUDNN_ATTENTION_BACKWARD=atomic asks
//     for cuDNN's faster-by-bytes graph instead, dQ accumulated in f32 with atomics (not deterministic;
//     attention_bf16_cudnn_backward_deterministic says which graph a shape got). Needs cuDNN in the build, sm_80+, D a
//     multiple of 8 up to 256 (cuDNN's SDPA; on sm_80 its backward takes D ≤ 128), 16-byte aligned
//     buffers; attention_bf16_cudnn_why_not says what cuDNN refused. Measured on an H200 (bench/RESULTS.md).
// attention_{forward,backward}_bf16_cuda dispatch (attention_bf16_kernels) on the environment variable
// KRAKEN_CUDA_ATTENTION, read once per process so a forward and its backward always take the same path:
//   unset: cuDNN (measured fastest on an H200: bench/RESULTS.md) for the shapes a run repeats, else the
//     mma kernels up to D = kAttentionMmaDefaultMaxHead, the WMMA ones above, else the CUDA-core ones.
//     "The shapes a run repeats": cuDNN compiles each new shape at run time (about a second), which a
//     training step pays once but token-by-token sampling would pay per length; so with the variable
//     unset cuDNN takes a shape of at least kAttentionCudnnDefaultMinTokens rows (B·T) while fewer than
//     kAttentionCudnnDefaultMaxShapes shapes went to it, and every shape it took before.
//   "cudnn": cuDNN for every call it takes (shape and buffers: attention_bf16_cudnn_usable), else as unset;
//   "mma": the mma kernels where supported, else CUDA cores; "tc": the WMMA kernels where supported, else
//     CUDA cores; "simt": CUDA cores for every head size; "wgmma": Hopper's wgmma kernels where a call is
//     usable for them (attention_bf16_wgmma_usable, _backward_usable), else as unset — each direction on
//     its own, which the shared contract allows; "wgmma-backward": the wgmma backward where usable, the
//     forward (and any other backward) as unset.
// Because of cuDNN's overwrite, the dispatching backward's contract is: dqkv receives the gradient
// (overwritten, whatever it held), whichever implementation runs — the wgmma kernels write over it
// (attention_backward_bf16_wgmma_overwrite_cuda); before the other, accumulating kernels the dispatch
// zeroes dqkv itself, so a caller allocates it without a zero fill that cuDNN would make a
// wasted pass (runtime/ops/attention.cpp).
void attention_forward_bf16_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, int64_t C,
                                 int64_t NH, CUstream_st* stream);
void attention_backward_bf16_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                  const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH, CUstream_st* stream);
void attention_forward_bf16_simt_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, int64_t C,
                                      int64_t NH, CUstream_st* stream);
void attention_backward_bf16_simt_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                       const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                                       CUstream_st* stream);
void attention_forward_bf16_tc_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, int64_t C,
                                    int64_t NH, CUstream_st* stream);
void attention_backward_bf16_tc_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                     const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                                     CUstream_st* stream);
void attention_forward_bf16_mma_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, int64_t C,
                                     int64_t NH, CUstream_st* stream);
void attention_backward_bf16_mma_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                      const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                                      CUstream_st* stream);
// The mma kernels for `count` ≤ kAttentionMaxGroups attentions of one shape in one launch (group k:
// outs[k], lses[k], qkvs[k], …; arrays of device pointers in host memory): each group's results are
// what the one-attention entry points give it, bit for bit; one launch instead of `count` fills the GPU
// where one attention has few heads (a Kraken layer's sub-layers: B·3 heads each).
constexpr int64_t kAttentionMaxGroups = 8;
void attention_forward_bf16_mma_group_cuda(uint16_t* const* outs, float* const* lses, const uint16_t* const* qkvs,
                                           int64_t count, int64_t B, int64_t T, int64_t C, int64_t NH,
                                           CUstream_st* stream);
void attention_backward_bf16_mma_group_cuda(uint16_t* const* dqkvs, const uint16_t* const* douts,
                                            const uint16_t* const* qkvs, const uint16_t* const* outs,
                                            const float* const* lses, int64_t count, int64_t B, int64_t T, int64_t C,
                                            int64_t NH, CUstream_st* stream);
// cuDNN's fused attention (contract above): forward as the others; backward dqkv = ∂L/∂qkv (overwritten).
// Either throws a kraken::Error naming what cuDNN refused where attention_bf16_cudnn_usable is false.
void attention_forward_bf16_cudnn_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, int64_t C,
                                       int64_t NH, CUstream_st* stream);
void attention_backward_bf16_cudnn_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                        const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                                        CUstream_st* stream);
// "" where cuDNN builds (and caches, per device) execution plans for both directions of this shape, else
// why not ("head size D=42 is not a multiple of 8", cuDNN's own error, "this build has no cuDNN", …). The
// first call per shape costs cuDNN's runtime compilation (seconds); later calls are a map lookup.
std::string attention_bf16_cudnn_why_not(int64_t B, int64_t T, int64_t C, int64_t NH);
// The same for a head size alone, on a small probe shape (B = 1, T = 130, 2 heads of D).
std::string attention_bf16_cudnn_why_not(int64_t D);
bool attention_bf16_cudnn_supported(int64_t D);  // attention_bf16_cudnn_why_not(D).empty()
// Whether the cuDNN entry points take a call: the shape's plans build and every buffer is 16-byte aligned.
bool attention_bf16_cudnn_usable(const void* const* buffers, int64_t count, int64_t B, int64_t T, int64_t C,
                                 int64_t NH);
// Whether this shape's cuDNN backward is the deterministic graph: false only where
// KRAKEN_CUDNN_ATTENTION_BACKWARD=atomic asked for the f32 atomic dQ and cuDNN planned it (true where cuDNN
// takes no plan for the shape at all).
bool attention_bf16_cudnn_backward_deterministic(int64_t B, int64_t T, int64_t C, int64_t NH);
// True for the head sizes D = C/NH the _tc_ (_mma_) kernels handle on the current device: 1 ≤ D ≤ 256,
// padded to a multiple of 16 (_tc_: of 32 above 128), where the device has the shared memory per block
// this needs.
bool attention_bf16_tc_supported(int64_t D);
bool attention_bf16_mma_supported(int64_t D);

// Hopper's warpgroup instructions (kernels/cuda/attention_wgmma.cu, wgmma; sm_90a code, so compute
// capability 9.0 devices only): the mma kernels' contract and arithmetic (their out and lse serve any
// backward above, and theirs any forward), deterministic. The forward takes head sizes 64, 128, 168 and
// 256 with qkv 16-byte and out 4-byte aligned; the backward (adds into dqkv) the same head sizes with every
// buffer 16-byte aligned — at 256 the lockstep kernels only, dK and dV each in a kernel of its own (together
// they would be 256 registers a thread) and dq on 32-key tiles. Opt-in, KRAKEN_CUDA_ATTENTION=wgmma (both
// directions) or =wgmma-backward (the backward alone, beside the default's forward — cuDNN's, faster than
// the wgmma forward at every head size measured, where the wgmma backward beat cuDNN's at D = 168 on an
// H200 and its D = 256 backward has not run on a GPU yet): the lockstep kernels were on an H200 faster
// than the mma kernels (but for the D = 64 forward), slower than cuDNN's in a training step (bench/RESULTS.md,
// twenty-second session); the pipelined ones have not run on a GPU yet.
// The forward runs the pipelined kernel (warp-specialised: a producer warpgroup and an mbarrier ring, the
// consumer warpgroups taking turns at their products — FlashAttention-3's structure) where
// attention_bf16_wgmma_pipelined_supported (D = 64, 128, 168), else the lockstep one (two warpgroups
// meeting at a barrier a tile, the first version); the backward's dq and dk/dv kernels likewise where their
// shared memory fits (all three head sizes on Hopper). Any of them compiled with other than the launch's
// 168 registers a thread (setmaxnreg would hang): the lockstep ones. Pipelined and lockstep give the same
// bits. attention_{forward,backward}_bf16_wgmma_cuda run the kernels KRAKEN_CUDA_WGMMA asks for (below;
// what KRAKEN_CUDA_ATTENTION=wgmma runs); the _lockstep_ entry points the lockstep kernels always, the
// _kernel(s)_ ones the kernels named (tests and the benchmark compare them).
// KRAKEN_CUDA_WGMMA (read once per process): pipelined (the default: as above), no-ping-pong (the pipelined
// kernels, their warpgroups not taking turns) or lockstep (the first versions throughout). A step down
// this list gives up speed, never bits: tools/gpu-check.sh takes the next setting where the GPU tests
// find a kernel wrong or hung, and the tests and the benchmark leave out the kernels the setting rules out
// (attention_wgmma_kernels_allow), so that one GPU call still measures the rest.
enum class AttentionWgmmaKernels { kPipelined, kNoPingPong, kLockstep };
AttentionWgmmaKernels attention_wgmma_kernels();
// Whether the setting lets a kernel of this kind run: a lockstep one always, a pipelined one unless
// lockstep, with ping-pong turns only under pipelined.
bool attention_wgmma_kernels_allow(bool pipelined, bool ping_pong);
// For tests: on the calling thread, `kernels` in place of the environment's setting; reset_ puts the
// environment's back.
void attention_wgmma_kernels_override(AttentionWgmmaKernels kernels);
void attention_wgmma_kernels_override_reset();
void attention_forward_bf16_wgmma_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T,
                                       int64_t C, int64_t NH, CUstream_st* stream);
void attention_forward_bf16_wgmma_lockstep_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B,
                                                int64_t T, int64_t C, int64_t NH, CUstream_st* stream);
bool attention_bf16_wgmma_pipelined_supported(int64_t D);
// The forward's kernel as asked, for tests and the benchmark: pipelined (where supported, else lockstep)
// with or without ping-pong scheduling (the two consumer warpgroups taking turns at issuing their products,
// FA3's; the default setting's choice), or lockstep.
void attention_forward_bf16_wgmma_kernel_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T,
                                              int64_t C, int64_t NH, bool pipelined, bool ping_pong,
                                              CUstream_st* stream);
void attention_backward_bf16_wgmma_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                        const uint16_t* out, const float* lse, int64_t B, int64_t T, int64_t C,
                                        int64_t NH, CUstream_st* stream);
// The same gradients written over dqkv (whatever it held): the bits of adding them into zeros, without a
// pass zeroing dqkv first — what the dispatch runs (it overwrites dqkv, as cuDNN does).
void attention_backward_bf16_wgmma_overwrite_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                                  const uint16_t* out, const float* lse, int64_t B, int64_t T,
                                                  int64_t C, int64_t NH, CUstream_st* stream);
void attention_backward_bf16_wgmma_lockstep_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                                 const uint16_t* out, const float* lse, int64_t B, int64_t T,
                                                 int64_t C, int64_t NH, CUstream_st* stream);
// The backward with each of its two kernels pipelined or lockstep as asked (the pipelined one only where it
// fits, as above), the pipelined ones with or without ping-pong turns (the default setting: with), so that
// the tests and the benchmark check and time one against the other.
void attention_backward_bf16_wgmma_kernels_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                                const uint16_t* out, const float* lse, int64_t B, int64_t T,
                                                int64_t C, int64_t NH, bool pipelined_dq, bool pipelined_kv,
                                                bool ping_pong, CUstream_st* stream);
bool attention_bf16_wgmma_supported(int64_t D);  // the forward: the head size, the device and its shared memory
bool attention_bf16_wgmma_backward_supported(int64_t D);
bool attention_bf16_wgmma_usable(const uint16_t* out, const uint16_t* qkv, int64_t C, int64_t NH);
bool attention_bf16_wgmma_backward_usable(const uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                          const uint16_t* out, int64_t C, int64_t NH);
// What the wgmma kernels assume of the instruction, checked in one place: d (64 × 64, f32, row-major) =
// a (64 × 32) · b (32 × 64), bf16 row-major, computed on one warpgroup with the operands K-major in shared
// memory (way 0), MN-major (way 1), or A from registers and B MN-major (way 2). strides_exchanged: every
// descriptor's two strides the other way round (the reading to try where ours fails). For tests.
void wgmma_layout_probe_cuda(float* d, const uint16_t* a, const uint16_t* b, int way, bool strides_exchanged,
                             CUstream_st* stream);
// The mbarrier pipeline a warp-specialised attention kernel would rest on (kernels/cuda/mbarrier.h), checked
// in one small kernel: a producer warp streams `tiles` tiles of 128 floats of x (16-byte aligned) through
// two shared stages by cp.async with full/empty mbarriers, a consumer warp sums from each the 4 floats
// of the next lane's piece: sums[lane] (32 floats) = Σ_t Σ_{i<4} x[128·t + 4·((lane + 1) % 32) + i].
// mutation 0 on a GPU; 1 to 6 break one rule each, for the CPU emulation's tests of itself
// (attention_wgmma.cu). Compute capability 9.0. For tests.
void mbarrier_pipeline_probe_cuda(float* sums, const float* x, int tiles, int mutation, CUstream_st* stream);

// The largest head the mma kernels take by default: above it their dk/dv kernel spills registers (dK and
// dV alone are Dp registers per thread; ptxas for sm_90: 220 bytes spilled at Dp = 224, 1.3 KB at 256),
// so the WMMA kernels take those heads. (Measured at D = 64 and 168 only, where mma is the faster family;
// KRAKEN_CUDA_ATTENTION=mma takes the mma kernels for every head size.)
constexpr int64_t kAttentionMmaDefaultMaxHead = 192;

// The unset KRAKEN_CUDA_ATTENTION's limits on cuDNN (above): a training step's B·T is in the thousands,
// a sampled token's is B·(prompt so far).
constexpr int64_t kAttentionCudnnDefaultMinTokens = 2048;
constexpr int64_t kAttentionCudnnDefaultMaxShapes = 8;

enum class AttentionBf16Kernels { kSimt, kTensorCoreWmma, kTensorCoreMma, kCudnn };
// Which kernels attention_{forward,backward}_bf16_cuda take for this head size. kCudnn says cuDNN takes
// the head size (attention_bf16_cudnn_supported); a call whose shape or buffers cuDNN does not take
// then runs attention_bf16_kernels_fallback(D).
AttentionBf16Kernels attention_bf16_kernels(int64_t D);
// The same for a call's shape: what the unset variable's B·T rule and shape budget leave it (buffers'
// alignment aside, which can still send a cuDNN call to the fallback). Changes nothing.
AttentionBf16Kernels attention_bf16_kernels_for_call(int64_t B, int64_t T, int64_t C, int64_t NH);
// What the unset KRAKEN_CUDA_ATTENTION takes where cuDNN does not: mma up to kAttentionMmaDefaultMaxHead,
// WMMA above, simt.
AttentionBf16Kernels attention_bf16_kernels_fallback(int64_t D);
const char* attention_bf16_kernels_name(AttentionBf16Kernels kernels);  // "simt", "tc", "mma" or "cudnn"
// What a bf16 step's attention runs at head size D, for reports: attention_bf16_kernels_name of
// attention_bf16_kernels(D), except where KRAKEN_CUDA_ATTENTION=wgmma takes the head size (which
// attention_bf16_kernels leaves out: the wgmma kernels are chosen per call): "wgmma (pipelined)" for the
// head sizes the pipelined kernels take (64, 128, 168; "wgmma (pipelined, no ping-pong)" or "wgmma
// (lockstep)" as KRAKEN_CUDA_WGMMA asks), else "wgmma", and "<name> forward, wgmma … backward" under
// KRAKEN_CUDA_ATTENTION=wgmma-backward.
std::string attention_bf16_kernels_label(int64_t D);

}  // namespace kraken::kernels
