// CUDA causal attention forward on Hopper's warpgroup tensor-core instructions (wgmma.h, sm_90a only).
//
// Why: the Kraken 4-way preset's heads are D = 168, where cuDNN's fused attention (the default) and our
// mma.sync kernels (attention_mma.cu) leave the H100 well under its tensor-core rate (bench/RESULTS.md:
// cuDNN's forward ~370 TFLOP/s, its backward ~160 with the dQ product; the preset's step at 37% MFU, 60 of its
// 184 ms in attention). mma.sync cannot feed Hopper's tensor cores fully; wgmma can. This file is the
// first step: the forward pass on wgmma, which fixes the operand layouts and the descriptors on a GPU
// before a backward (the larger share) is built on the same pieces.
//
// The arithmetic is attention_mma.cu's, so the kernel meets the same contract (kernels/attention.h): S
// and the online softmax (log2 units) in f32; P rounded to bf16 before P·v; out = O / l̃ with l̃ the sum
// of the rounded weights, lse (natural log) from the f32 ones; out rounded once. Products sum in the
// tensor cores' order. Its out and lse are what any backward of the contract takes, so the dispatch pairs
// it with the default backward (attention.cu, KRAKEN_CUDA_ATTENTION=wgmma).
//
// Shape of the work: a block is two warpgroups (256 threads) and 128 queries, 64 per warpgroup — the
// wgmma M. The block's q tile stays in shared memory; k and v stream through it in tiles of 64 keys,
// double-buffered by cp.async (all 256 threads copy tile i + 1 while tile i is multiplied). Per warpgroup
// and tile: S (64 × 64) = q·kᵀ as Dk/16 wgmma m64n64k16 with both operands K-major in shared memory
// (Dk = D rounded up to 16; the q and k columns D .. Dk are zeros); the mask and the softmax on S's
// accumulators (each thread holds two rows, as in the mma kernel); P, rounded and paired, is the register
// A operand of O (64 × D) += P·v, four wgmma m64nDk16 with v read MN-major (the transpose bit) from the
// same tile layout. The two warpgroups share the k and v tiles, so each tile is read from global memory
// once per 128 queries, and while one warpgroup runs its softmax the other's products keep the tensor
// cores busy. Shared tiles use the core-matrix layout of wgmma.h (each 8 × 8 block of bf16 as 128
// contiguous bytes); a copy puts 8 consecutive threads on the 8 rows of one core matrix, so their 16-byte
// writes fill it without bank conflicts.
//
// Head sizes: D a multiple of 8 whose D is one of wgmma_instructions.inc's N (64, 128, 168, 256); qkv 16-
// and out 4-byte aligned; a device of compute capability 9.0 (wgmma is sm_90a's). attention_bf16_wgmma_usable
// says whether a call qualifies; the dispatch sends the others to the default kernels.
//
// Where this first version is expected to stop (arithmetic, not yet measured): an SM's tensor cores do
// ~2048 bf16 multiply-adds a clock and its shared memory delivers 128 bytes. A wgmma with both operands in
// shared memory reads 64·16 + N·16 bf16 for 64·N·16 multiply-adds: at N = 64 (q·kᵀ here) exactly the 128
// bytes a clock the tensor cores need, at N = 32 (the dk/dv kernel's Sᵀ and dPᵀ above D = 64) 1.5 times
// more than shared memory gives. The products with P or dS in registers read only B (N = D) and are not
// so bound. Wider tiles (N = 128) lower the ratio where the registers allow them; the GPU's numbers decide.
// Measured (H200, twenty-second session, bench/RESULTS.md): right the first time; at D = 168 the forward
// 141 TFLOP/s against cuDNN's 217, the backward 122 against 117, but in the preset's step (4 sub-layers as
// one call of 256 sequences) 59.6 ms of backward kernels against cuDNN's 47.0 and 19.1 of forward against
// 8.2. ncu: one 8-warp block an SM, SM throughput ~30%: every product is waited for before the softmax
// that follows it, and both warpgroups meet at a barrier each tile. So the forward now has a second,
// pipelined kernel in FlashAttention-3's structure (a producer warpgroup and an mbarrier ring, registers
// moved to the consumers, the next S issued before this tile's softmax; "the pipelined kernels" below),
// which the public forward runs where it applies, and pipelined dq and dk/dv kernels (dk/dv at D = 168
// without the overlap within a warpgroup: its registers leave no room for it).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/attention.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/fast_exp.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/mbarrier.h"
#include "kernels/cuda/mma_sync.h"
#include "kernels/cuda/scratch.h"
#include "kernels/cuda/wgmma.h"
#include "kernels/error.h"

namespace kraken::kernels {
namespace {

using cuda_detail::exp2_ftz;

constexpr int kWarpgroups = 2;
constexpr int kThreads = 128 * kWarpgroups;
constexpr int kQueryTile = 64 * kWarpgroups;  // queries of a block
constexpr int kKeyTile = 64;                  // keys of a streamed tile (dq's; the forward's above D = 64)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;

struct Dims {
  int T, C, NH, D;
  int64_t ld;        // 3C: qkv's row stride
  float scale_log2;  // log₂e/√D: scores in log2 units
  // The backward adds its gradients into dqkv, or (false) writes them as if dqkv held zeros — the
  // dispatch's overwriting contract without a pass zeroing dqkv first (kernels/attention.h).
  bool accumulate = true;
};

// Shared memory of the forward for head size D (a multiple of 8): the q tile (128 × Dk), then two stages
// of a k tile and a v tile (`keys` × Dk each), all in wgmma.h's core-matrix layout. At D = 64 (GPT-2's)
// the tiles are 128 keys: q·kᵀ is then m64n128k16, which reads 3 bytes of shared memory per 64
// multiply-adds where n64 reads 4 (the header's arithmetic), and S's 64 registers a thread fit beside O
// (ptxas: 235; at D = 128 it would be 253 of 255); above, 64 keys. D = 64: 80 KiB; 128: 96 KiB; 168: 132
// KiB; 256: 192 KiB.
template <int D>
struct ForwardSmem {
  static constexpr int Dk = (D + 15) / 16 * 16;
  static constexpr int keys = D <= 64 ? 128 : 64;
  static constexpr size_t key_tile = sizeof(uint16_t) * keys * Dk;
  static constexpr size_t q = 0, kv = sizeof(uint16_t) * kQueryTile * Dk;
  static constexpr size_t bytes = kv + 2 * 2 * key_tile;
  static_assert(key_tile % 128 == 0 && kv % 128 == 0, "tiles stay 128-byte aligned");
};

// Two floats rounded to bf16 (nearest even), lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
  return static_cast<uint32_t>(__bfloat16_as_ushort(pair.x)) | static_cast<uint32_t>(__bfloat16_as_ushort(pair.y)) << 16;
}
__device__ __forceinline__ float low_bf16(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float high_bf16(uint32_t pair) { return __uint_as_float(pair & 0xffff0000u); }

// Rows [t0, t0 + rows) of a head's columns [0, D) (src: row t0's first column, row stride ld) into a
// core-matrix tile of Dk columns, by cp.async in 16-byte pieces shared among `threads` threads (this one
// `thread`); rows at or past T are zero-filled. Piece p is row 8·(p / (8·D/8)) + p % 8, columns
// 8·((p / 8) % (D/8)): 8 consecutive threads write the 8 rows of one core matrix (128 contiguous bytes).
template <int D, int Dk>
__device__ __forceinline__ void load_tile(unsigned char* tile, const uint16_t* src, int64_t ld, int t0, int rows,
                                          int T, int thread = threadIdx.x, int threads = kThreads) {
  constexpr int kPacks = D / 8;
  const int pieces = rows * kPacks;
  for (int p = thread; p < pieces; p += threads) {
    const int r = p / (8 * kPacks) * 8 + p % 8, c = (p / 8) % kPacks * 8;
    const bool in = t0 + r < T;
    mma::cp_async_16(tile + wgmma::tile_offset(r, c, Dk), src + (in ? static_cast<int64_t>(r) * ld + c : 0), in);
  }
}

// Keys [kRows·i, kRows·(i + 1)) of a head (base: its q columns in qkv) into a stage: the k tile, then the v
// tile tile_bytes further.
template <int D, int Dk, int kRows>
__device__ __forceinline__ void load_key_tile(unsigned char* stage, size_t tile_bytes, const uint16_t* base, int i,
                                              const Dims& g, int thread = threadIdx.x, int threads = kThreads) {
  const int t0 = i * kRows;
  load_tile<D, Dk>(stage, base + g.C + static_cast<int64_t>(t0) * g.ld, g.ld, t0, kRows, g.T, thread, threads);
  load_tile<D, Dk>(stage + tile_bytes, base + 2 * g.C + static_cast<int64_t>(t0) * g.ld, g.ld, t0, kRows, g.T, thread,
                   threads);
}

// The two kinds of product the kernels issue (each issued, not waited for; a wgmma::fence must precede):
// acc (64 × N) = A·Bᵀ with A rows a_row .. a_row + 63 of one tile and B rows 0 .. N − 1 of another, both
// K-major over the Dk head columns (S = q·kᵀ, dP = dO·vᵀ and their transposes) ...
template <int N, int Dk>
__device__ __forceinline__ void issue_rows_times_rows(float (&acc)[N / 2], const unsigned char* a_tile, int a_row,
                                                      const unsigned char* b_tile) {
#pragma unroll
  for (int kk = 0; kk < Dk / 16; ++kk)
    wgmma::mma<N, 0, 0>(acc, wgmma::k_major(a_tile, Dk, a_row, 16 * kk), wgmma::k_major(b_tile, Dk, 0, 16 * kk),
                        kk > 0);
}
// ... and acc (64 × D) += A·B with A (64 × K) in registers, 16 columns a step (P, dS and their transposes),
// and B rows 0 .. K − 1 of a tile read MN-major (v, dO, q, k).
template <int D, int K, int Dk>
__device__ __forceinline__ void issue_registers_times_tile(float (&acc)[D / 2], const uint32_t (&a)[K / 16][4],
                                                           const unsigned char* b_tile) {
#pragma unroll
  for (int j = 0; j < K / 16; ++j) wgmma::mma<D, 1>(acc, a[j], wgmma::mn_major(b_tile, Dk, 16 * j, 0), 1);
}

// The software pipeline of the three kernels over `count` streamed tiles in two stages: load(i, stage)
// issues tile i's copies (and the copies issued before the first call land with tile 0); compute(i, stage)
// runs once tile i is visible to every thread and to wgmma, while tile i + 1 is in flight; the barrier
// after it keeps a stage from being loaded again while a warpgroup still reads it.
template <typename Load, typename Compute>
__device__ __forceinline__ void pipeline(int count, Load&& load, Compute&& compute) {
  load(0, 0);
  mma::cp_async_commit();
  for (int i = 0; i < count; ++i) {
    if (i + 1 < count) load(i + 1, (i + 1) & 1);
    mma::cp_async_commit();
    mma::cp_async_wait<1>();  // tile i has landed for this thread
    wgmma::fence_shared_for_wgmma();
    __syncthreads();  // ... and for every thread
    compute(i, i & 1);
    __syncthreads();
  }
}

// ---- forward ------------------------------------------------------------------------------------------
//
// Two kernels with the same arithmetic, bit for bit (the tests hold them to it): the first version, in
// which the 256 threads of two warpgroups copy each k/v tile together and meet at a barrier per tile, and
// the pipelined one below it. The pieces they share:

// A warpgroup's online-softmax state: its thread's two rows' running max m (log2 units), the sums l of the
// f32 weights and l_rounded of the bf16-rounded ones (both partial over the thread's columns until the
// end).
struct SoftmaxRows {
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, l_rounded[2] = {0.0f, 0.0f};
};

// One tile's softmax on the scores s (64 × kKeys accumulators of keys k0 ..; s[4n + e]: row e < 2 ? row0 :
// row1, key k0 + 8n + 2·tq + (e & 1)): the causal mask, the new max, P = 2^{s·scale − m} rounded and paired
// as the A operand of P·v, the sums. alpha: what the rows' earlier O must be multiplied by (rescale_rows)
// before this tile's P·v adds to it. wq: the warpgroup's first query; a tile is only called for when some
// key of it precedes some query of the warpgroup (then key k0 ≤ wq precedes all of them, and each row's
// max is finite).
template <int kKeys>
__device__ __forceinline__ void softmax_tile(float (&s)[kKeys / 2], uint32_t (&p)[kKeys / 16][4], SoftmaxRows& st,
                                             float (&alpha)[2], int k0, int wq, int row0, int row1, int tq,
                                             float scale_log2) {
  // Only a tile reaching past the warpgroup's first query needs the mask (keys past T come only in such
  // tiles).
  if (k0 + kKeys - 1 > wq) {
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (k0 + 8 * n + 2 * tq + (e & 1) > (e < 2 ? row0 : row1)) s[4 * n + e] = -INFINITY;
  }
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int n = 0; n < kKeys / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[4 * n + e]);
  float neg_m[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 2));
    // (finite: tiles start at multiples of 64 (or 128), warpgroups at multiples of 64, so a live tile's key
    // k0 ≤ wq ≤ the row)
    const float m_new = fmaxf(st.m[r], mx[r] * scale_log2);
    alpha[r] = exp2_ftz(st.m[r] - m_new);  // 2^{−∞} = 0 on the first tile
    st.m[r] = m_new;
    neg_m[r] = -m_new;
  }
  float sum[2] = {0.0f, 0.0f}, sum_rounded[2] = {0.0f, 0.0f};
#pragma unroll
  for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float p0 = exp2_ftz(fmaf(s[4 * n + 2 * r], scale_log2, neg_m[r]));
      const float p1 = exp2_ftz(fmaf(s[4 * n + 2 * r + 1], scale_log2, neg_m[r]));
      const uint32_t pair = pack_bf16(p0, p1);
      sum[r] += p0 + p1;
      sum_rounded[r] += low_bf16(pair) + high_bf16(pair);
      p[n / 2][2 * (n % 2) + r] = pair;
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    st.l[r] = st.l[r] * alpha[r] + sum[r];
    st.l_rounded[r] = st.l_rounded[r] * alpha[r] + sum_rounded[r];
  }
}

template <int D>
__device__ __forceinline__ void rescale_rows(float (&o)[D / 2], const float (&alpha)[2]) {
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
    o[4 * n] *= alpha[0], o[4 * n + 1] *= alpha[0], o[4 * n + 2] *= alpha[1], o[4 * n + 3] *= alpha[1];
}

// out = O / l̃ (rounded once) and lse = m·ln 2 + ln l for the thread's rows that exist.
template <int D>
__device__ __forceinline__ void store_rows(uint16_t* out, float* lse, const float (&o)[D / 2], SoftmaxRows& st,
                                           int b, int h, int row0, int row1, int tq, const Dims& g) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    st.l[r] += __shfl_xor_sync(kFull, st.l[r], 1);
    st.l[r] += __shfl_xor_sync(kFull, st.l[r], 2);
    st.l_rounded[r] += __shfl_xor_sync(kFull, st.l_rounded[r], 1);
    st.l_rounded[r] += __shfl_xor_sync(kFull, st.l_rounded[r], 2);
  }
  const float inv[2] = {st.l_rounded[0] > 0.0f ? 1.0f / st.l_rounded[0] : 0.0f,
                        st.l_rounded[1] > 0.0f ? 1.0f / st.l_rounded[1] : 0.0f};
  uint16_t* orow[2] = {out + (static_cast<int64_t>(b) * g.T + row0) * g.C + static_cast<int64_t>(h) * g.D,
                       out + (static_cast<int64_t>(b) * g.T + row1) * g.C + static_cast<int64_t>(h) * g.D};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if ((r == 0 ? row0 : row1) >= g.T) continue;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<uint32_t*>(orow[r] + 8 * n + 2 * tq) =
          pack_bf16(o[4 * n + 2 * r] * inv[r], o[4 * n + 2 * r + 1] * inv[r]);
  }
  const int64_t bh = static_cast<int64_t>(b) * g.NH + h;
  if (tq == 0) {
    if (row0 < g.T) lse[bh * g.T + row0] = st.m[0] * kLn2 + logf(st.l[0]);
    if (row1 < g.T) lse[bh * g.T + row1] = st.m[1] * kLn2 + logf(st.l[1]);
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads, 1)
    attention_forward_wgmma_kernel(uint16_t* out, float* lse, const uint16_t* qkv, Dims g) {
  using L = ForwardSmem<D>;
  constexpr int Dk = L::Dk, kKeys = L::keys;
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, tq = lane % 4;
  const int bh = blockIdx.x, b = bh / g.NH, h = bh % g.NH;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kQueryTile;  // the longest rows first
  const int wq = q0 + 64 * wg;                                // the warpgroup's first query
  const int wg_last = min(wq + 64, g.T) - 1;                  // and its last (< wq when it has none)
  const int block_last = min(q0 + kQueryTile, g.T) - 1;
  const int row0 = wq + 16 * warp + lane / 4, row1 = row0 + 8;  // the thread's two queries
  const uint16_t* base = qkv + static_cast<int64_t>(b) * g.T * g.ld + static_cast<int64_t>(h) * g.D;
  unsigned char* qs = smem + L::q;

  if (Dk != D) {  // the padding columns D .. Dk must read as zeros; cp.async never writes them
    for (size_t i = threadIdx.x; i < L::bytes / 16; i += kThreads)
      reinterpret_cast<uint4*>(smem)[i] = make_uint4(0u, 0u, 0u, 0u);
    __syncthreads();
  }
  load_tile<D, Dk>(qs, base + static_cast<int64_t>(q0) * g.ld, g.ld, q0, kQueryTile, g.T);

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  SoftmaxRows st;
  auto stage_k = [&](int stage) { return smem + L::kv + 2 * stage * L::key_tile; };
  auto load = [&](int i, int stage) { load_key_tile<D, Dk, kKeys>(stage_k(stage), L::key_tile, base, i, g); };
  auto compute = [&](int i, int stage) {
    const unsigned char* ks = stage_k(stage);
    const unsigned char* vs = ks + L::key_tile;
    const int k0 = i * kKeys;
    // Live when some key of the tile precedes some query of the warpgroup. Warpgroup-uniform, as wgmma
    // needs.
    if (wq >= g.T || k0 > wg_last) return;
    float s[kKeys / 2];
    wgmma::fence();
    issue_rows_times_rows<kKeys, Dk>(s, qs, 64 * wg, ks);
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_accumulators(s);
    uint32_t p[kKeys / 16][4];  // P as the A operand of each 16-key step
    float alpha[2];
    softmax_tile<kKeys>(s, p, st, alpha, k0, wq, row0, row1, tq, g.scale_log2);
    rescale_rows<D>(o, alpha);
    // O += P·v: v's rows are the k, its columns the n — MN-major.
    wgmma::fence_accumulators(o);
    wgmma::fence();
    issue_registers_times_tile<D, kKeys, Dk>(o, p, vs);
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_accumulators(o);
  };
  pipeline(block_last / kKeys + 1, load, compute);  // (the q tile lands with the first k and v tile)
  store_rows<D>(out, lse, o, st, b, h, row0, row1, tq, g);
}

// ---- the pipelined kernels ----------------------------------------------------------------------------
//
// FlashAttention-3's structure (Shah et al. 2024, §3.1–3.2; our reading, with cp.async where it uses TMA),
// on the lockstep kernels' arithmetic: the forward, the dq kernel and the dk/dv kernel. Why: ncu on the
// lockstep kernels (twenty-second session) shows one block an SM at ~30% SM throughput — every product
// waited for before the softmax that follows it, both warpgroups meeting at a barrier each tile while the
// tensor cores idle.
//   - Warp specialisation: a third warpgroup is the producer. It copies the block's own tiles (q; q and dO
//     for dq; k and v for dk/dv) and then each streamed tile pair (k and v; q and dO for dk/dv) by cp.async
//     into a ring of kStages stages, completing the stage's
//     "full" mbarrier with arrivals on its copies (mbarrier.h); before refilling a stage it waits for the
//     stage's "empty" barrier, which the 256 consumer threads complete once the products that read it have
//     finished. No __syncthreads after the start: each warpgroup runs at its own pace, so one's softmax
//     can meet the other's products.
//   - Within a warpgroup, the products of two tiles overlap the elementwise work: at tile t it issues
//     tile t's scores (S_t = q·k_tᵀ; and dP_t = dO·v_tᵀ for dq; their transposes for dk/dv), then the
//     accumulation of tile t − 1 (O += P_{t−1}·v_{t−1}; dQ += dS_{t−1}·k_{t−1}; dV and dK), waits only for
//     the scores, computes tile t's softmax (or dS) while the accumulation runs, then waits for it (but
//     dk/dv at D = 168: no registers for it). The same accumulations in the same order as the lockstep
//     kernels (the forward's O·α_t then + P_t·v_t too), so the results are theirs, bit for bit.
//   - Between the warpgroups, ping-pong turns (IssueTurns, FA3's "pingpong scheduling", which FA3 uses in
//     its forward): each warpgroup issues its products only after the other's preceding issue, through two
//     named barriers, so that their softmaxes (dS; Pᵀ and dSᵀ) alternate under each other's products. A
//     template switch in each kernel, so the benchmark can time them without it.
//   - Registers move to the consumers (setmaxnreg, as FA3): 384 threads at one block an SM start with 168
//     registers each; the producer drops to 40 and the consumers rise to 232 (40·128 + 232·256 = 168·384:
//     the consumers can take only what the producer releases). ptxas spills nothing in the consumers (at
//     224 the dq and dk/dv kernels did) and 40 bytes in dk/dv's producer (its rows' loads; at 24 the
//     forward's producer spilled 64). Why a whole
//     warpgroup for the copies: an SM's four schedulers each own a quarter of the register file, so a
//     ninth warp alone already caps every thread at 168 (ptxas: 48 bytes spilled at D = 168), and
//     setmaxnreg works on warpgroups.
// The producer copies with cp.async where FA3 uses TMA (which the CPU emulation does not model): at D = 168
// a 64-key k/v tile is 21 16-byte copies a producer thread, against ~2,600 clocks of the two warpgroups'
// products per tile. CUTLASS's cp.async warp-specialised GEMM mainloop fences no proxies between the copies
// and wgmma; the consumers here fence after each full wait (fence.proxy.async, as the PTX memory model
// asks for generic-proxy writes a wgmma reads).
constexpr int kProducerThreads = 128;
constexpr int kPipelinedThreads = kThreads + kProducerThreads;
// What each thread starts with: the launch bounds' share of the 65,536 registers, a multiple of 8 (ptxas
// reports it for every pipelined kernel). setmaxnreg.inc takes only what the block's own .dec released, so
// the two counts must add up to the launch's allocation exactly; more, and the consumers wait forever.
constexpr int kLaunchRegisters = 65536 / kPipelinedThreads / 8 * 8;  // 168
constexpr int kProducerRegisters = 40, kConsumerRegisters = 232;
static_assert(kProducerRegisters * kProducerThreads + kConsumerRegisters * kThreads ==
                  kLaunchRegisters * kPipelinedThreads,
              "the consumers take exactly what the producer releases");

// Shared memory of a pipelined kernel for head size D: the block's own tiles (kOwn bytes), kStages stages
// each of two streamed tiles of kRows rows (k and v for the forward and dq; q and dO for dk/dv) and
// kExtra bytes (dk/dv: the queries' lse·log₂e and Dᵢ), then the barriers (full and empty per stage, and
// the own tiles'). As many stages as fit under ~220 KiB, at most 3. The forward (own: q; the lockstep
// kernel's 128 keys at D = 64, else 64): D = 64: 112 KiB; 128: 128; 168: 176. dq (own: q and dO; 64
// keys): 64: 80 KiB; 128: 160; 168: 220. dk/dv (own: k and v; query tiles of 64 at D = 64, 32 at 128,
// 16 at 168): 64: 81.5 KiB; 128: 112.8; 168: 121.4.
template <int D, size_t kOwn, int kRows, size_t kExtra = 0>
struct PipelinedSmem {
  static constexpr int head = D, Dk = (D + 15) / 16 * 16, rows = kRows;
  static constexpr size_t tile = sizeof(uint16_t) * kRows * Dk, stage = 2 * tile + kExtra;
  static constexpr size_t own = 0, ring = kOwn;
  static constexpr size_t budget = 220 * 1024;
  static constexpr int stages = static_cast<int>(std::min<size_t>(3, (budget - kOwn) / stage));
  static constexpr size_t barriers = ring + stages * stage;
  static constexpr size_t bytes = barriers + sizeof(uint64_t) * (2 * stages + 1);
  static_assert(stages >= 2, "two stages at least: the producer fills one while the consumers read the other");
  static_assert(kOwn % 128 == 0 && tile % 128 == 0 && kExtra % 128 == 0, "tiles stay 128-byte aligned");
};
template <int D>
using PipelinedForwardSmem = PipelinedSmem<D, ForwardSmem<D>::kv, ForwardSmem<D>::keys>;
template <int D>
using PipelinedQSmem = PipelinedSmem<D, 2 * sizeof(uint16_t) * kQueryTile * ((D + 15) / 16 * 16), kKeyTile>;

// The ring of streamed stages in a pipelined block's shared memory and its barriers: tile t lives in stage
// t % kStages in round t / kStages (mbarrier.h's parities).
template <typename L>
struct TileRing {
  unsigned char* smem;
  uint64_t* full;   // [stages]: the producer's arrivals once its writes of the stage have landed
  uint64_t* empty;  // [stages]: every consumer thread, done with the stage
  uint64_t* own;    // the producer's arrivals on its copies of the block's own tiles

  __device__ explicit TileRing(unsigned char* s)
      : smem(s),
        full(reinterpret_cast<uint64_t*>(s + L::barriers)),
        empty(full + L::stages),
        own(empty + L::stages) {}
  __device__ unsigned char* first(int t) const { return smem + L::ring + (t % L::stages) * L::stage; }
  __device__ unsigned char* second(int t) const { return first(t) + L::tile; }
  __device__ unsigned char* extra(int t) const { return first(t) + 2 * L::tile; }
  // (the producer) Before writing tile t's stage: its readers of the round before are done.
  __device__ void wait_empty(int t) const { mbarrier::wait(&empty[t % L::stages], ((t / L::stages) & 1) ^ 1); }
  // (consumers) Tile t has landed, for this thread's reads and its wgmma's.
  __device__ void wait_full(int t) const {
    mbarrier::wait(&full[t % L::stages], (t / L::stages) & 1);
    wgmma::fence_shared_for_wgmma();
  }
  __device__ void wait_own() const {
    mbarrier::wait(own, 0);
    wgmma::fence_shared_for_wgmma();
  }
  // (consumers) Done with tile t: every read of it, by this thread's wgmma too, has completed.
  __device__ void release(int t) const { mbarrier::arrive(&empty[t % L::stages]); }
  // (consumers) Tiles [first, count) the warpgroup does not read: released all the same (the empty
  // barriers count both warpgroups), each after its full wait, so that no arrival runs ahead into a
  // stage's next round.
  __device__ void release_unread(int from, int count) const {
    for (int t = from; t < count; ++t) {
      mbarrier::wait(&full[t % L::stages], (t / L::stages) & 1);
      release(t);
    }
  }
};

// The start of a pipelined block, by all its threads: the padding columns D .. Dk of every tile zeroed
// (cp.async never writes them; wgmma must read zeros there), the barriers initialised (a stage's full
// phase after full_arrivals arrivals), one __syncthreads.
template <typename L>
__device__ __forceinline__ void start_pipelined_block(const TileRing<L>& ring, int full_arrivals = kProducerThreads) {
  if (L::Dk != L::head) {
    for (size_t i = threadIdx.x; i < L::barriers / 16; i += kPipelinedThreads)
      reinterpret_cast<uint4*>(ring.smem)[i] = make_uint4(0u, 0u, 0u, 0u);
    wgmma::fence_shared_for_wgmma();
  }
  if (threadIdx.x == 0) {
    for (int s = 0; s < L::stages; ++s) {
      mbarrier::init(&ring.full[s], full_arrivals);
      mbarrier::init(&ring.empty[s], kThreads);
    }
    mbarrier::init(ring.own, kProducerThreads);
  }
  __syncthreads();
}

// The producer's part after the own tiles' copies (and its arrival on `own`): tiles [0, count) of the
// head's keys (base: its q columns in qkv) through the ring; it returns once its copies have landed.
template <int D, typename L>
__device__ __forceinline__ void produce_key_tiles(const TileRing<L>& ring, const uint16_t* base, int count,
                                                  const Dims& g) {
  const int me = threadIdx.x - kThreads;
  for (int t = 0; t < count; ++t) {
    ring.wait_empty(t);
    load_key_tile<D, L::Dk, L::rows>(ring.first(t), L::tile, base, t, g, me, kProducerThreads);
    mbarrier::arrive_on_copies(&ring.full[t % L::stages]);
  }
  mma::cp_async_commit();
  mma::cp_async_wait<0>();  // (its copies land before it leaves)
}

// Register fragments a wgmma in flight reads (P or dS, the A operand of the accumulation) must stay where
// they are until the wait that covers it: this keeps them live to that point.
template <int K>
__device__ __forceinline__ void keep_fragments(uint32_t (&a)[K][4]) {
#if !defined(KRAKEN_CUDA_EMULATION)
#pragma unroll
  for (int j = 0; j < K; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[j][i])::"memory");
#endif
}
template <int K>
__device__ __forceinline__ void copy_fragments(uint32_t (&to)[K][4], const uint32_t (&from)[K][4]) {
#pragma unroll
  for (int j = 0; j < K; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) to[j][i] = from[j][i];
}

// Ping-pong scheduling of the pipelined kernels (FA3 §3.1): the two consumer warpgroups take turns issuing
// their products — warpgroup 0's issue i, warpgroup 1's issue i, warpgroup 0's issue i + 1, … — so that
// the tensor cores take one warpgroup's products while the other computes its softmax (or dS, or Pᵀ and
// dSᵀ), instead of both warpgroups' falling in the same gap. Named barrier 1 + w is the one warpgroup w
// waits on for its turn; the other arrives on it when its own turn is done (mbarrier.h). A warpgroup's
// issues are numbered within one numbering for the block and make a range: the causal mask gives the
// warpgroups different ones (the forward's and dq's warpgroup 0 ends sooner, dk/dv's warpgroup 1 starts
// later; a warpgroup past T has none), so each waits only for a turn the other takes and passes its turn
// only where the other will wait for it. (Each barrier's rounds stay in step: a warpgroup arrives again
// only after waiting for the other's issue that follows its own, which comes after that round's sync.)
struct IssueTurns {
  int wg, their_first, their_end;  // this warpgroup; the other's issues are their_first .. their_end − 1
  __device__ bool theirs(int i) const { return i >= their_first && i < their_end; }
  // (Each a predicated barrier, no branch: mbarrier.h's sync_if.)
  __device__ void wait_turn(int i) const {  // before issue i: the other's issue before it has been made
    named_barrier::sync_if<1>(wg == 0 && theirs(i - 1), kThreads);
    named_barrier::sync_if<2>(wg != 0 && theirs(i), kThreads);
  }
  __device__ void pass_turn(int i) const {  // after issue i: the other's next issue may go
    named_barrier::arrive_if<2>(wg == 0 && theirs(i), kThreads);
    named_barrier::arrive_if<1>(wg != 0 && theirs(i + 1), kThreads);
  }
};

// Issues (issue(): the products and their commits) as the turns' issue i: after the other warpgroup's turn
// before it where kTurns, after a wgmma::fence, then passes the turn.
template <bool kTurns, typename Issue>
__device__ __forceinline__ void issue_in_turn(const IssueTurns& turns, int i, Issue&& issue) {
  if constexpr (kTurns) turns.wait_turn(i);
  wgmma::fence();
  issue();
  if constexpr (kTurns) turns.pass_turn(i);
}

template <int D, bool kPingPong>
__global__ void __launch_bounds__(kPipelinedThreads, 1)
    attention_forward_wgmma_pipelined_kernel(uint16_t* out, float* lse, const uint16_t* qkv, Dims g) {
  using L = PipelinedForwardSmem<D>;
  constexpr int Dk = L::Dk, kKeys = L::rows;
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  const TileRing<L> ring(smem);
  const int bh = blockIdx.x, b = bh / g.NH, h = bh % g.NH;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kQueryTile;  // the longest rows first
  const int tiles = (min(q0 + kQueryTile, g.T) - 1) / kKeys + 1;
  const uint16_t* base = qkv + static_cast<int64_t>(b) * g.T * g.ld + static_cast<int64_t>(h) * g.D;
  unsigned char* qs = smem + L::own;
  start_pipelined_block(ring);

  if (threadIdx.x >= kThreads) {  // the producer
    wgmma::release_registers_to<kProducerRegisters>();
    load_tile<D, Dk>(qs, base + static_cast<int64_t>(q0) * g.ld, g.ld, q0, kQueryTile, g.T, threadIdx.x - kThreads,
                     kProducerThreads);
    mbarrier::arrive_on_copies(ring.own);
    produce_key_tiles<D>(ring, base, tiles, g);
    return;
  }

  wgmma::take_registers_to<kConsumerRegisters>();
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, tq = lane % 4;
  const int wq = q0 + 64 * wg;                                  // the warpgroup's first query
  const int row0 = wq + 16 * warp + lane / 4, row1 = row0 + 8;  // the thread's two queries
  // The tiles with a key preceding some query of warpgroup w (keys ≤ its last query): 0 for a warpgroup
  // past T. Warpgroup-uniform, as wgmma needs.
  auto live_tiles = [&](int w) {
    const int first_query = q0 + 64 * w;
    return first_query < g.T ? (min(first_query + 64, g.T) - 1) / kKeys + 1 : 0;
  };
  const int live = live_tiles(wg);
  // Issues 0 (S_0), t (S_t and O += P_{t−1}·v_{t−1}) and live (the last accumulation): live + 1 of them.
  const int their_live = live_tiles(1 - wg);
  const IssueTurns turns{wg, 0, their_live > 0 ? their_live + 1 : 0};

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  SoftmaxRows st;
  if (live > 0) {
    ring.wait_own();
    float s[kKeys / 2], alpha[2];
    uint32_t p[kKeys / 16][4], p_next[kKeys / 16][4];  // P of the tile in flight, and of the next
    ring.wait_full(0);
    issue_in_turn<kPingPong>(turns, 0, [&] {
      issue_rows_times_rows<kKeys, Dk>(s, qs, 64 * wg, ring.first(0));
      wgmma::commit();
    });
    wgmma::wait<0>();
    wgmma::fence_accumulators(s);
    softmax_tile<kKeys>(s, p, st, alpha, 0, wq, row0, row1, tq, g.scale_log2);  // (O is 0: nothing to rescale)
    for (int t = 1; t < live; ++t) {
      ring.wait_full(t);
      issue_in_turn<kPingPong>(turns, t, [&] {
        issue_rows_times_rows<kKeys, Dk>(s, qs, 64 * wg, ring.first(t));  // S_t
        wgmma::commit();
        issue_registers_times_tile<D, kKeys, Dk>(o, p, ring.second(t - 1));  // O += P_{t−1}·v_{t−1}
        wgmma::commit();
      });
      wgmma::wait<1>();  // S_t (groups complete in order)
      wgmma::fence_accumulators(s);
      softmax_tile<kKeys>(s, p_next, st, alpha, t * kKeys, wq, row0, row1, tq, g.scale_log2);
      wgmma::wait<0>();  // P_{t−1}·v_{t−1}
      wgmma::fence_accumulators(o);
      keep_fragments(p);
      ring.release(t - 1);
      rescale_rows<D>(o, alpha);
      copy_fragments(p, p_next);
    }
    issue_in_turn<kPingPong>(turns, live, [&] {
      issue_registers_times_tile<D, kKeys, Dk>(o, p, ring.second(live - 1));
      wgmma::commit();
    });
    wgmma::wait<0>();
    wgmma::fence_accumulators(o);
    keep_fragments(p);
    ring.release(live - 1);
  }
  ring.release_unread(live, tiles);
  store_rows<D>(out, lse, o, st, b, h, row0, row1, tq, g);
}

// ---- backward -----------------------------------------------------------------------------------------
//
// Two kernels, as attention_mma.cu's, so that every gradient element is one thread's sum in a fixed order
// (deterministic, no atomics), at the price of recomputing S and dP in both: 7 products where an atomic
// dQ needs 5. (The atomic form keeps dQ's accumulators beside dK's and dV's; at D = 168 those two alone
// are 168 registers a thread.)
//   dk/dv: a block owns 128 keys, 64 per warpgroup, dK and dV in registers; it streams the queries from
//     its first key on in tiles of kQ (64, or 32 above D = 64 to leave the registers for dK and dV):
//     Sᵀ = k·qᵀ and dPᵀ = v·dOᵀ (both operands K-major), Pᵀ = 2^{Sᵀ·scale·log₂e − lse·log₂e} (0 above
//     the diagonal and for queries past T), dSᵀ = Pᵀ∘(dPᵀ − Dᵢ); dV += Pᵀ·dO and dK += dSᵀ·q with Pᵀ and
//     dSᵀ, rounded to bf16, as register A operands and dO, q read MN-major.
//   dq: a block owns 128 queries, 64 per warpgroup, and streams keys up to its last query in tiles of 64:
//     S = q·kᵀ, dP = dO·vᵀ, P and dS as above (the row's lse and Dᵢ in registers), dQ += dS·k.
// At D = 256 (GPT-2's shape at degree 4: 3 heads a sub-layer) dK and dV alone would be 256 registers a
// thread, so two dk/dv kernels run over the same keys, one forming dV (Sᵀ, Pᵀ, dV += Pᵀ·dO, on 64-query
// tiles: it holds no v tile) and one dK (Sᵀ, dPᵀ, dSᵀ, dK += dSᵀ·q, on 32), 8 products in all; and dq
// streams 32-key tiles, two stages of which fit beside its q and dO (192 KiB; 64-key tiles would need
// 256). Lockstep kernels only: the pipelined ones' rings and registers do not fit there.
// Dᵢ = Σ_d dO[i, d]·O[i, d] comes first, from a small kernel, into a scratch buffer laid out as lse.
// Scale 1/√D is applied to dK and dQ once at the end; the gradients are added to dqkv (bf16) in f32 and
// rounded once.

// Dᵢ for every (b·NH + h, t): one warp per (row, head), D/8 packs of 8 over its lanes.
__global__ void __launch_bounds__(256) attention_delta_wgmma_kernel(float* delta, const uint16_t* dout,
                                                                   const uint16_t* out, int64_t rows, Dims g) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;  // row · NH + h
  if (i >= rows * g.NH) return;  // (warp-uniform)
  const int64_t row = i / g.NH;
  const int h = static_cast<int>(i % g.NH), lane = threadIdx.x % 32;
  const int64_t at = row * g.C + static_cast<int64_t>(h) * g.D;
  float acc = 0.0f;
  for (int c = 8 * lane; c < g.D; c += 8 * 32) {
    const uint4 x = *reinterpret_cast<const uint4*>(dout + at + c), y = *reinterpret_cast<const uint4*>(out + at + c);
    const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) acc += low_bf16(xs[k]) * low_bf16(ys[k]) + high_bf16(xs[k]) * high_bf16(ys[k]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(kFull, acc, offset);
  const int64_t b = row / g.T, t = row - b * g.T;
  if (lane == 0) delta[(b * g.NH + h) * g.T + t] = acc;
}

// Which gradients a dk/dv kernel forms: both (one kernel), or one of them (D = 256: dK and dV together
// would be 256 registers a thread, so two kernels over the same keys, 128 each).
enum KeyGradients : int { kDkOnly = 1, kDvOnly = 2, kDkAndDv = 3 };

// The query tile of the dk/dv kernel: 64 queries, or 32 where dK and dV take most of the registers (ptxas
// for sm_90a at 64 queries: D = 128 at the 255-register cap with 16 bytes spilled; at 32, D = 168 uses 255).
// The dV kernel of D = 256 has no v tile and no dPᵀ: 64 queries fit its registers and shared memory, and
// its Sᵀ product at n64 asks of shared memory what it gives, where n32 asks 1.5 times that (the header).
template <int D, int kParts = kDkAndDv>
constexpr int kv_query_tile() {
  return D <= 64 || kParts == kDvOnly ? 64 : 32;
}

// The key tile of the lockstep dq kernel: 64 keys, or 32 at D = 256, where two stages of 64-key k and v
// tiles beside q and dO would be 256 KiB of shared memory (32 keys: 192 KiB), and dQ takes half the
// registers.
template <int D>
constexpr int dq_key_tile() {
  return D <= 168 ? kKeyTile : 32;
}

// Shared memory of the backward kernels (core-matrix tiles of Dk columns). dk/dv (KvSmem): its k and v (128
// rows each; the dV kernel k alone), then two stages of a q and a dO tile (kQ rows) and kQ lse·log₂e and
// Dᵢ. dq (QSmem): its q and dO (128 rows), then two stages of a k and a v tile (dq_key_tile rows). D = 256:
// 192.5 (dV: 193) and 192 KiB; 168: 132.5 and 176; 128: 96.5 and 128; 64: 65 and 64.
template <int D, int kParts = kDkAndDv>
struct KvSmem {
  static constexpr int Dk = (D + 15) / 16 * 16, kQ = kv_query_tile<D, kParts>();
  static constexpr size_t own = sizeof(uint16_t) * kQueryTile * Dk;  // 128 rows
  static constexpr size_t query_tile = sizeof(uint16_t) * kQ * Dk;
  static constexpr size_t kv_stream = ((kParts & kDkOnly) != 0 ? 2 : 1) * own,
                          kv_rows = kv_stream + 2 * 2 * query_tile;
  static constexpr size_t kv_bytes = kv_rows + 2 * 2 * sizeof(float) * kQ;
  static_assert(own % 128 == 0 && query_tile % 128 == 0, "tiles stay 128-byte aligned");
};
template <int D>
struct QSmem {
  static constexpr int Dk = (D + 15) / 16 * 16;
  static constexpr size_t own = sizeof(uint16_t) * kQueryTile * Dk;  // 128 rows
  static constexpr size_t key_tile = sizeof(uint16_t) * dq_key_tile<D>() * Dk;
  static constexpr size_t q_stream = 2 * own, q_bytes = q_stream + 2 * 2 * key_tile;
  static_assert(own % 128 == 0 && key_tile % 128 == 0, "tiles stay 128-byte aligned");
};

// Adds f·acc (the thread's accumulators of a 64 × D block, rows r0 and r0 + 8 of the warp's 16) to the
// bf16 row segments dst[r] (columns 0 .. D) of rows that exist, rounding once.
template <int D>
__device__ __forceinline__ void add_rows(uint16_t* const (&dst)[2], const bool (&live)[2], const float (&acc)[D / 2],
                                         float f, bool accumulate) {
  const int tq = threadIdx.x % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!live[r]) continue;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      uint32_t* p = reinterpret_cast<uint32_t*>(dst[r] + 8 * n + 2 * tq);
      const uint32_t old = accumulate ? *p : 0u;  // (0u: +0 + x, the bits of adding into zeros)
      *p = pack_bf16(low_bf16(old) + f * acc[4 * n + 2 * r], high_bf16(old) + f * acc[4 * n + 2 * r + 1]);
    }
  }
}

// The dk/dv kernels' pieces. Pᵀ and dSᵀ of one tile of queries q0 .. q0 + kQ − 1 (bf16 pairs, the A operands
// of dV += Pᵀ·dO and dK += dSᵀ·q, 16 queries a step) from Sᵀ and dPᵀ (element 4n + e: key e < 2 ? key0 :
// key1, query q0 + 8n + 2·tq + (e & 1)) and the tile's rows (lse·log₂e, +∞ past T, at rows[j]; Dᵢ at
// rows[kQ + j]): Pᵀ = 2^{Sᵀ·scale − lse·log₂e}, 0 above the diagonal; dSᵀ = Pᵀ∘(dPᵀ − Dᵢ) where kWithDs
// (the dV kernel of D = 256 has no dPᵀ: dpt and dst unused). kw: the warpgroup's first key.
template <int kQ, bool kWithDs = true>
__device__ __forceinline__ void transposed_weights(uint32_t (&pt)[kQ / 16][4], uint32_t (&dst)[kQ / 16][4],
                                                   const float (&st)[kQ / 2], const float (&dpt)[kQ / 2],
                                                   const float* rows, int q0, int kw, int key0, int key1, int tq,
                                                   float scale_log2) {
  const bool diagonal = q0 < kw + 63;  // some query of the tile precedes some key of the warpgroup
#pragma unroll
  for (int n = 0; n < kQ / 8; ++n) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float p[2], ds[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int j = 8 * n + 2 * tq + c;  // the query's column in the tile
        p[c] = exp2_ftz(fmaf(st[4 * n + 2 * r + c], scale_log2, -rows[j]));
        if (diagonal && q0 + j < (r == 0 ? key0 : key1)) p[c] = 0.0f;
        if constexpr (kWithDs) ds[c] = p[c] * (dpt[4 * n + 2 * r + c] - rows[kQ + j]);
      }
      pt[n / 2][2 * (n % 2) + r] = pack_bf16(p[0], p[1]);
      if constexpr (kWithDs) dst[n / 2][2 * (n % 2) + r] = pack_bf16(ds[0], ds[1]);
    }
  }
}

// dqkv's k and v columns of the thread's keys += scale·dK and dV (those the kernel forms), rounded once.
template <int D, int kParts>
__device__ __forceinline__ void add_dkv_rows(uint16_t* dqkv, const float (&dk)[D / 2], const float (&dv)[D / 2],
                                             int b, int h, int key0, int key1, const Dims& g, float scale) {
  uint16_t* krow = dqkv + static_cast<int64_t>(b) * g.T * g.ld + g.C + static_cast<int64_t>(h) * g.D;
  uint16_t* const kdst[2] = {krow + static_cast<int64_t>(key0) * g.ld, krow + static_cast<int64_t>(key1) * g.ld};
  uint16_t* const vdst[2] = {kdst[0] + g.C, kdst[1] + g.C};
  const bool live[2] = {key0 < g.T, key1 < g.T};
  if constexpr ((kParts & kDkOnly) != 0) add_rows<D>(kdst, live, dk, scale, g.accumulate);
  if constexpr ((kParts & kDvOnly) != 0) add_rows<D>(vdst, live, dv, 1.0f, g.accumulate);
}

template <int D, int kParts = kDkAndDv>
__global__ void __launch_bounds__(kThreads, 1)
    attention_backward_kv_wgmma_kernel(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const float* lse,
                                       const float* delta, Dims g, float scale) {
  using L = KvSmem<D, kParts>;
  constexpr int Dk = L::Dk, kQ = L::kQ;
  constexpr bool kDk = (kParts & kDkOnly) != 0, kDv = (kParts & kDvOnly) != 0;
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, tq = lane % 4;
  const int bh = blockIdx.x, b = bh / g.NH, h = bh % g.NH;
  const int k0 = blockIdx.y * kQueryTile;  // the block's first key (the longest columns come first)
  const int kw = k0 + 64 * wg;             // the warpgroup's first key
  const int key0 = kw + 16 * warp + lane / 4, key1 = key0 + 8;  // the thread's two keys
  const uint16_t* base = qkv + static_cast<int64_t>(b) * g.T * g.ld + static_cast<int64_t>(h) * g.D;
  const uint16_t* dbase = dout + static_cast<int64_t>(b) * g.T * g.C + static_cast<int64_t>(h) * g.D;
  const float* lse_bh = lse + static_cast<int64_t>(bh) * g.T;
  const float* delta_bh = delta + static_cast<int64_t>(bh) * g.T;
  unsigned char* ks = smem;
  unsigned char* vs = smem + L::own;  // (the dV kernel has none: never loaded or read there)

  if (Dk != D) {  // the padding columns D .. Dk read as zeros
    for (size_t i = threadIdx.x; i < L::kv_rows / 16; i += kThreads)
      reinterpret_cast<uint4*>(smem)[i] = make_uint4(0u, 0u, 0u, 0u);
    __syncthreads();
  }
  load_tile<D, Dk>(ks, base + g.C + static_cast<int64_t>(k0) * g.ld, g.ld, k0, kQueryTile, g.T);
  if (kDk) load_tile<D, Dk>(vs, base + 2 * g.C + static_cast<int64_t>(k0) * g.ld, g.ld, k0, kQueryTile, g.T);

  float dk[D / 2], dv[D / 2];  // (the one a kernel does not form is never used: no registers)
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = 0.0f, dv[i] = 0.0f;
  auto stage_q = [&](int stage) { return smem + L::kv_stream + 2 * stage * L::query_tile; };
  auto stage_rows = [&](int stage) { return reinterpret_cast<float*>(smem + L::kv_rows) + 2 * stage * kQ; };
  const int first = k0 / kQ, tiles = (g.T + kQ - 1) / kQ - first;  // query tiles from the block's first key on
  auto load = [&](int i, int stage) {
    const int q0 = (first + i) * kQ;
    unsigned char* qs = stage_q(stage);
    load_tile<D, Dk>(qs, base + static_cast<int64_t>(q0) * g.ld, g.ld, q0, kQ, g.T);
    load_tile<D, Dk>(qs + L::query_tile, dbase + static_cast<int64_t>(q0) * g.C, g.C, q0, kQ, g.T);
    float* rows = stage_rows(stage);  // lse·log₂e (+∞ past T: P = 0 there) and Dᵢ, plain loads
    for (int j = threadIdx.x; j < kQ; j += kThreads) {
      const bool in = q0 + j < g.T;
      rows[j] = in ? lse_bh[q0 + j] * kLog2e : INFINITY;
      rows[kQ + j] = in ? delta_bh[q0 + j] : 0.0f;
    }
  };
  auto compute = [&](int i, int stage) {
    const int q0 = (first + i) * kQ;
    // Live when some query of the tile is at or after some key of the warpgroup (and the warpgroup has keys).
    if (kw >= g.T || q0 + kQ - 1 < kw) return;
    const unsigned char* qs = stage_q(stage);
    const unsigned char* dos = qs + L::query_tile;
    const float* rows = stage_rows(stage);
    // Sᵀ and dPᵀ: element 4n + e is key e < 2 ? key0 : key1, query q0 + 8n + 2·tq + (e & 1). (dV alone
    // needs no dPᵀ.)
    float st[kQ / 2], dpt[kQ / 2];  // (dpt unused, and so never allocated, in the dV kernel)
    wgmma::fence();
    issue_rows_times_rows<kQ, Dk>(st, ks, 64 * wg, qs);
    if constexpr (kDk) issue_rows_times_rows<kQ, Dk>(dpt, vs, 64 * wg, dos);
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_accumulators(st);
    if constexpr (kDk) wgmma::fence_accumulators(dpt);
    uint32_t pt[kQ / 16][4], dst[kQ / 16][4];  // Pᵀ and dSᵀ as A operands, 16 queries a step
    transposed_weights<kQ, kDk>(pt, dst, st, dpt, rows, q0, kw, key0, key1, tq, g.scale_log2);
    if constexpr (kDv) wgmma::fence_accumulators(dv);
    if constexpr (kDk) wgmma::fence_accumulators(dk);
    wgmma::fence();
    if constexpr (kDv) issue_registers_times_tile<D, kQ, Dk>(dv, pt, dos);
    if constexpr (kDk) issue_registers_times_tile<D, kQ, Dk>(dk, dst, qs);
    wgmma::commit();
    wgmma::wait<0>();
    if constexpr (kDv) wgmma::fence_accumulators(dv);
    if constexpr (kDk) wgmma::fence_accumulators(dk);
  };
  pipeline(tiles, load, compute);  // (tiles ≥ 1: the block's first key is below T; k and v land with tile 0)
  add_dkv_rows<D, kParts>(dqkv, dk, dv, b, h, key0, key1, g, scale);
}

// The pipelined dk/dv kernel (the pipelined kernels' notes above): its own tiles are the block's k and v,
// its ring streams q and dO tiles with their rows (lse·log₂e and Dᵢ, which the producer writes with plain
// stores and releases with a plain arrival beside its arrival on copies: the full barriers count both).
// For D ≤ 128, Sᵀ_t and dPᵀ_t are issued before tile t − 1's accumulations (dV += Pᵀ·dO, then dK +=
// dSᵀ·q, the lockstep kernel's order) and Pᵀ_t, dSᵀ_t computed while they run. A warpgroup's first tiles
// may precede all its keys (the second's first 64 queries): released unread.
// At D = 168 dK and dV alone are 168 of the consumers' 232 registers. The overlap holds Sᵀ, dPᵀ (kQ / 2
// each) and two sets of Pᵀ, dSᵀ (kQ / 4 each): ptxas spills 284 bytes a thread even at 16 queries a tile
// (320 at the lockstep kernel's 32 without the overlap). So there each warpgroup takes a tile's products
// in turn, as the lockstep kernel does, but on 16-query tiles (no spills) and without its barriers: the
// two warpgroups drift apart on the ring, one's weights under the other's products, and the copies are
// the producer's. Same bits as the lockstep kernel's 32-query tiles: a tile of 32 is two 16-query steps
// of one accumulation chain, the same steps in the same order.
template <int D>
constexpr int pipelined_kv_query_tile() {
  return D <= 128 ? kv_query_tile<D>() : 16;
}
template <int D>
using PipelinedKvSmem = PipelinedSmem<D, 2 * sizeof(uint16_t) * kQueryTile * ((D + 15) / 16 * 16),
                                      pipelined_kv_query_tile<D>(), 2 * sizeof(float) * pipelined_kv_query_tile<D>()>;

template <int D, bool kPingPong>
__global__ void __launch_bounds__(kPipelinedThreads, 1)
    attention_backward_kv_wgmma_pipelined_kernel(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                                 const float* lse, const float* delta, Dims g, float scale) {
  using L = PipelinedKvSmem<D>;
  constexpr int Dk = L::Dk, kQ = L::rows;
  constexpr bool kOverlap = D <= 128;  // (registers: above)
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  const TileRing<L> ring(smem);
  const int bh = blockIdx.x, b = bh / g.NH, h = bh % g.NH;
  const int k0 = blockIdx.y * kQueryTile;  // the block's first key (the longest columns come first)
  const uint16_t* base = qkv + static_cast<int64_t>(b) * g.T * g.ld + static_cast<int64_t>(h) * g.D;
  const uint16_t* dbase = dout + static_cast<int64_t>(b) * g.T * g.C + static_cast<int64_t>(h) * g.D;
  unsigned char* ks = smem + L::own;
  unsigned char* vs = ks + sizeof(uint16_t) * kQueryTile * Dk;
  const int first = k0 / kQ, tiles = (g.T + kQ - 1) / kQ - first;  // query tiles from the block's first key on
  start_pipelined_block(ring, 2 * kProducerThreads);

  if (threadIdx.x >= kThreads) {  // the producer
    wgmma::release_registers_to<kProducerRegisters>();
    const int me = threadIdx.x - kThreads;
    const float* lse_bh = lse + static_cast<int64_t>(bh) * g.T;
    const float* delta_bh = delta + static_cast<int64_t>(bh) * g.T;
    load_tile<D, Dk>(ks, base + g.C + static_cast<int64_t>(k0) * g.ld, g.ld, k0, kQueryTile, g.T, me,
                     kProducerThreads);
    load_tile<D, Dk>(vs, base + 2 * g.C + static_cast<int64_t>(k0) * g.ld, g.ld, k0, kQueryTile, g.T, me,
                     kProducerThreads);
    mbarrier::arrive_on_copies(ring.own);
    for (int t = 0; t < tiles; ++t) {
      const int q0 = (first + t) * kQ;
      ring.wait_empty(t);
      load_tile<D, Dk>(ring.first(t), base + static_cast<int64_t>(q0) * g.ld, g.ld, q0, kQ, g.T, me,
                       kProducerThreads);
      load_tile<D, Dk>(ring.second(t), dbase + static_cast<int64_t>(q0) * g.C, g.C, q0, kQ, g.T, me,
                       kProducerThreads);
      mbarrier::arrive_on_copies(&ring.full[t % L::stages]);
      float* rows = reinterpret_cast<float*>(ring.extra(t));
      for (int j = me; j < kQ; j += kProducerThreads) {
        const bool in = q0 + j < g.T;
        rows[j] = in ? lse_bh[q0 + j] * kLog2e : INFINITY;
        rows[kQ + j] = in ? delta_bh[q0 + j] : 0.0f;
      }
      mbarrier::arrive(&ring.full[t % L::stages]);
    }
    mma::cp_async_commit();
    mma::cp_async_wait<0>();  // (its copies land before it leaves)
    return;
  }

  wgmma::take_registers_to<kConsumerRegisters>();
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, tq = lane % 4;
  const int kw = k0 + 64 * wg;                                   // the warpgroup's first key
  const int key0 = kw + 16 * warp + lane / 4, key1 = key0 + 8;  // the thread's two keys
  // Tiles before `lead` have no query at or after the warpgroup's first key (query tiles are a divisor of
  // 64 long, so that is tile kw / kQ); a warpgroup past T reads none. Warpgroup-uniform.
  auto lead_of = [&](int w) { return k0 + 64 * w < g.T ? (k0 + 64 * w) / kQ - first : tiles; };
  const int lead = lead_of(wg);
  ring.release_unread(0, lead);
  // The turns' numbering: with the overlap, issue t is tile t's scores with tile t − 1's accumulations
  // (lead: the scores alone; tiles: the last accumulations); without it, 2t the scores, 2t + 1 the
  // accumulations of tile t.
  const int their_lead = lead_of(1 - wg);
  const IssueTurns turns =
      their_lead >= tiles ? IssueTurns{wg, 0, 0}
      : kOverlap          ? IssueTurns{wg, their_lead, tiles + 1}
                          : IssueTurns{wg, 2 * their_lead, 2 * tiles};

  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = 0.0f, dv[i] = 0.0f;
  if (lead < tiles) {
    ring.wait_own();
    float st[kQ / 2], dpt[kQ / 2];
    uint32_t pt[kQ / 16][4], dst[kQ / 16][4];  // Pᵀ and dSᵀ of the tile in flight
    auto issue_scores = [&](int t) {  // Sᵀ_t = k·q_tᵀ and dPᵀ_t = v·dO_tᵀ, one commit group
      issue_rows_times_rows<kQ, Dk>(st, ks, 64 * wg, ring.first(t));
      issue_rows_times_rows<kQ, Dk>(dpt, vs, 64 * wg, ring.second(t));
      wgmma::commit();
    };
    auto issue_accumulations = [&](int t) {  // dV += Pᵀ·dO_t and dK += dSᵀ·q_t, one commit group
      issue_registers_times_tile<D, kQ, Dk>(dv, pt, ring.second(t));
      issue_registers_times_tile<D, kQ, Dk>(dk, dst, ring.first(t));
      wgmma::commit();
    };
    auto weights = [&](uint32_t(&p)[kQ / 16][4], uint32_t(&d)[kQ / 16][4], int t) {
      transposed_weights<kQ>(p, d, st, dpt, reinterpret_cast<const float*>(ring.extra(t)), (first + t) * kQ, kw,
                             key0, key1, tq, g.scale_log2);
    };
    // Tile t's scores (the turns' issue i), waited for, and its Pᵀ and dSᵀ into p and d.
    auto score_tile = [&](int t, int i, uint32_t(&p)[kQ / 16][4], uint32_t(&d)[kQ / 16][4]) {
      ring.wait_full(t);
      issue_in_turn<kPingPong>(turns, i, [&] { issue_scores(t); });
      wgmma::wait<0>();
      wgmma::fence_accumulators(st);
      wgmma::fence_accumulators(dpt);
      weights(p, d, t);
    };
    // Tile t's accumulations from pt and dst (the turns' issue i), waited for; then its stage is released.
    auto accumulate_tile = [&](int t, int i) {
      wgmma::fence_accumulators(dv);
      wgmma::fence_accumulators(dk);
      issue_in_turn<kPingPong>(turns, i, [&] { issue_accumulations(t); });
      wgmma::wait<0>();
      wgmma::fence_accumulators(dv);
      wgmma::fence_accumulators(dk);
      keep_fragments(pt);
      keep_fragments(dst);
      ring.release(t);
    };
    if constexpr (!kOverlap) {  // each tile's scores, weights and accumulations in turn
      for (int t = lead; t < tiles; ++t) {
        score_tile(t, 2 * t, pt, dst);
        accumulate_tile(t, 2 * t + 1);
      }
    } else {  // tile t's scores issued before tile t − 1's accumulations, its weights computed under them
      uint32_t pt_next[kQ / 16][4], dst_next[kQ / 16][4];  // Pᵀ and dSᵀ of the next tile
      score_tile(lead, lead, pt, dst);
      for (int t = lead + 1; t < tiles; ++t) {
        ring.wait_full(t);
        issue_in_turn<kPingPong>(turns, t, [&] {
          issue_scores(t);
          issue_accumulations(t - 1);
        });
        wgmma::wait<1>();  // Sᵀ_t and dPᵀ_t
        wgmma::fence_accumulators(st);
        wgmma::fence_accumulators(dpt);
        weights(pt_next, dst_next, t);
        wgmma::wait<0>();  // tile t − 1's accumulations
        wgmma::fence_accumulators(dv);
        wgmma::fence_accumulators(dk);
        keep_fragments(pt);
        keep_fragments(dst);
        ring.release(t - 1);
        copy_fragments(pt, pt_next);
        copy_fragments(dst, dst_next);
      }
      accumulate_tile(tiles - 1, tiles);
    }
  }
  add_dkv_rows<D, kDkAndDv>(dqkv, dk, dv, b, h, key0, key1, g, scale);
}

// The dq kernels' pieces. A thread's two rows' lse·log₂e and Dᵢ (rows past T: never stored; any finite
// value).
__device__ __forceinline__ void load_row_statistics(float (&lse2)[2], float (&di)[2], const float* lse,
                                                    const float* delta, int bh, int row0, int row1, const Dims& g) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r == 0 ? row0 : row1;
    const bool in = row < g.T;
    lse2[r] = in ? lse[static_cast<int64_t>(bh) * g.T + row] * kLog2e : 0.0f;
    di[r] = in ? delta[static_cast<int64_t>(bh) * g.T + row] : 0.0f;
  }
}

// dS of one tile of keys k0 .. (the A operand of dQ += dS·k, bf16 pairs) from its scores s and dP (the
// forward's accumulator layout): P = 2^{s·scale − lse·log₂e}, 0 above the diagonal; dS = P∘(dP − Dᵢ).
template <int kKeys>
__device__ __forceinline__ void ds_tile(uint32_t (&ds)[kKeys / 16][4], const float (&s)[kKeys / 2],
                                        const float (&dp)[kKeys / 2], const float (&lse2)[2], const float (&di)[2],
                                        int k0, int wq, int row0, int row1, int tq, float scale_log2) {
  const bool diagonal = k0 + kKeys - 1 > wq;
#pragma unroll
  for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float v[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float p = exp2_ftz(fmaf(s[4 * n + 2 * r + c], scale_log2, -lse2[r]));
        if (diagonal && k0 + 8 * n + 2 * tq + c > (r == 0 ? row0 : row1)) p = 0.0f;
        v[c] = p * (dp[4 * n + 2 * r + c] - di[r]);
      }
      ds[n / 2][2 * (n % 2) + r] = pack_bf16(v[0], v[1]);
    }
  }
}

// dqkv's q columns of the thread's rows += scale·dQ, rounded once.
template <int D>
__device__ __forceinline__ void add_dq_rows(uint16_t* dqkv, const float (&dq)[D / 2], int b, int h, int row0,
                                            int row1, const Dims& g, float scale) {
  uint16_t* qrow = dqkv + static_cast<int64_t>(b) * g.T * g.ld + static_cast<int64_t>(h) * g.D;
  uint16_t* const qdst[2] = {qrow + static_cast<int64_t>(row0) * g.ld, qrow + static_cast<int64_t>(row1) * g.ld};
  const bool live[2] = {row0 < g.T, row1 < g.T};
  add_rows<D>(qdst, live, dq, scale, g.accumulate);
}

template <int D>
__global__ void __launch_bounds__(kThreads, 1)
    attention_backward_q_wgmma_kernel(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const float* lse,
                                      const float* delta, Dims g, float scale) {
  using L = QSmem<D>;
  constexpr int Dk = L::Dk, kKeys = dq_key_tile<D>();
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, tq = lane % 4;
  const int bh = blockIdx.x, b = bh / g.NH, h = bh % g.NH;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kQueryTile;  // the longest rows first
  const int wq = q0 + 64 * wg;
  const int wg_last = min(wq + 64, g.T) - 1;
  const int block_last = min(q0 + kQueryTile, g.T) - 1;
  const int row0 = wq + 16 * warp + lane / 4, row1 = row0 + 8;
  const uint16_t* base = qkv + static_cast<int64_t>(b) * g.T * g.ld + static_cast<int64_t>(h) * g.D;
  const uint16_t* dbase = dout + static_cast<int64_t>(b) * g.T * g.C + static_cast<int64_t>(h) * g.D;
  unsigned char* qs = smem;
  unsigned char* dos = smem + L::own;

  if (Dk != D) {
    for (size_t i = threadIdx.x; i < L::q_bytes / 16; i += kThreads)
      reinterpret_cast<uint4*>(smem)[i] = make_uint4(0u, 0u, 0u, 0u);
    __syncthreads();
  }
  load_tile<D, Dk>(qs, base + static_cast<int64_t>(q0) * g.ld, g.ld, q0, kQueryTile, g.T);
  load_tile<D, Dk>(dos, dbase + static_cast<int64_t>(q0) * g.C, g.C, q0, kQueryTile, g.T);
  float lse2[2], di[2];
  load_row_statistics(lse2, di, lse, delta, bh, row0, row1, g);

  float dq[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dq[i] = 0.0f;
  auto stage_k = [&](int stage) { return smem + L::q_stream + 2 * stage * L::key_tile; };
  auto load = [&](int i, int stage) { load_key_tile<D, Dk, kKeys>(stage_k(stage), L::key_tile, base, i, g); };
  auto compute = [&](int i, int stage) {
    const unsigned char* ks = stage_k(stage);
    const unsigned char* vs = ks + L::key_tile;
    const int k0 = i * kKeys;
    if (wq >= g.T || k0 > wg_last) return;  // (as in the forward)
    float s[kKeys / 2], dp[kKeys / 2];
    wgmma::fence();
    issue_rows_times_rows<kKeys, Dk>(s, qs, 64 * wg, ks);
    issue_rows_times_rows<kKeys, Dk>(dp, dos, 64 * wg, vs);
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_accumulators(s);
    wgmma::fence_accumulators(dp);
    uint32_t ds[kKeys / 16][4];
    ds_tile<kKeys>(ds, s, dp, lse2, di, k0, wq, row0, row1, tq, g.scale_log2);
    wgmma::fence_accumulators(dq);
    wgmma::fence();
    issue_registers_times_tile<D, kKeys, Dk>(dq, ds, ks);
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_accumulators(dq);
  };
  pipeline(block_last / kKeys + 1, load, compute);  // (q and dO land with the first k and v tile)

  add_dq_rows<D>(dqkv, dq, b, h, row0, row1, g, scale);
}

// The pipelined dq kernel (the pipelined kernels' notes above): the lockstep one's arithmetic, its S_t
// and dP_t issued before the accumulation of tile t − 1 and its dS computed while that runs.
template <int D, bool kPingPong>
__global__ void __launch_bounds__(kPipelinedThreads, 1)
    attention_backward_q_wgmma_pipelined_kernel(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                                const float* lse, const float* delta, Dims g, float scale) {
  using L = PipelinedQSmem<D>;
  constexpr int Dk = L::Dk;
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  const TileRing<L> ring(smem);
  const int bh = blockIdx.x, b = bh / g.NH, h = bh % g.NH;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kQueryTile;  // the longest rows first
  const int tiles = (min(q0 + kQueryTile, g.T) - 1) / kKeyTile + 1;
  const uint16_t* base = qkv + static_cast<int64_t>(b) * g.T * g.ld + static_cast<int64_t>(h) * g.D;
  const uint16_t* dbase = dout + static_cast<int64_t>(b) * g.T * g.C + static_cast<int64_t>(h) * g.D;
  unsigned char* qs = smem + L::own;
  unsigned char* dos = qs + sizeof(uint16_t) * kQueryTile * Dk;
  start_pipelined_block(ring);

  if (threadIdx.x >= kThreads) {  // the producer
    wgmma::release_registers_to<kProducerRegisters>();
    const int me = threadIdx.x - kThreads;
    load_tile<D, Dk>(qs, base + static_cast<int64_t>(q0) * g.ld, g.ld, q0, kQueryTile, g.T, me, kProducerThreads);
    load_tile<D, Dk>(dos, dbase + static_cast<int64_t>(q0) * g.C, g.C, q0, kQueryTile, g.T, me, kProducerThreads);
    mbarrier::arrive_on_copies(ring.own);
    produce_key_tiles<D>(ring, base, tiles, g);
    return;
  }

  wgmma::take_registers_to<kConsumerRegisters>();
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, tq = lane % 4;
  const int wq = q0 + 64 * wg;
  const int row0 = wq + 16 * warp + lane / 4, row1 = row0 + 8;
  auto live_tiles = [&](int w) {  // (as in the forward)
    const int first_query = q0 + 64 * w;
    return first_query < g.T ? (min(first_query + 64, g.T) - 1) / kKeyTile + 1 : 0;
  };
  const int live = live_tiles(wg), their_live = live_tiles(1 - wg);
  const IssueTurns turns{wg, 0, their_live > 0 ? their_live + 1 : 0};  // (issues 0 .. live, as the forward's)
  float lse2[2], di[2];
  load_row_statistics(lse2, di, lse, delta, bh, row0, row1, g);

  float dq[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dq[i] = 0.0f;
  if (live > 0) {
    ring.wait_own();
    float s[kKeyTile / 2], dp[kKeyTile / 2];
    uint32_t ds[kKeyTile / 16][4], ds_next[kKeyTile / 16][4];  // dS of the tile in flight, and of the next
    auto issue_scores = [&](int t) {  // S_t = q·k_tᵀ and dP_t = dO·v_tᵀ, one commit group
      issue_rows_times_rows<kKeyTile, Dk>(s, qs, 64 * wg, ring.first(t));
      issue_rows_times_rows<kKeyTile, Dk>(dp, dos, 64 * wg, ring.second(t));
      wgmma::commit();
    };
    ring.wait_full(0);
    issue_in_turn<kPingPong>(turns, 0, [&] { issue_scores(0); });
    wgmma::wait<0>();
    wgmma::fence_accumulators(s);
    wgmma::fence_accumulators(dp);
    ds_tile<kKeyTile>(ds, s, dp, lse2, di, 0, wq, row0, row1, tq, g.scale_log2);
    for (int t = 1; t < live; ++t) {
      ring.wait_full(t);
      issue_in_turn<kPingPong>(turns, t, [&] {
        issue_scores(t);
        issue_registers_times_tile<D, kKeyTile, Dk>(dq, ds, ring.first(t - 1));  // dQ += dS_{t−1}·k_{t−1}
        wgmma::commit();
      });
      wgmma::wait<1>();  // S_t and dP_t
      wgmma::fence_accumulators(s);
      wgmma::fence_accumulators(dp);
      ds_tile<kKeyTile>(ds_next, s, dp, lse2, di, t * kKeyTile, wq, row0, row1, tq, g.scale_log2);
      wgmma::wait<0>();  // dS_{t−1}·k_{t−1}
      wgmma::fence_accumulators(dq);
      keep_fragments(ds);
      ring.release(t - 1);
      copy_fragments(ds, ds_next);
    }
    issue_in_turn<kPingPong>(turns, live, [&] {
      issue_registers_times_tile<D, kKeyTile, Dk>(dq, ds, ring.first(live - 1));
      wgmma::commit();
    });
    wgmma::wait<0>();
    wgmma::fence_accumulators(dq);
    keep_fragments(ds);
    ring.release(live - 1);
  }
  ring.release_unread(live, tiles);
  add_dq_rows<D>(dqkv, dq, b, h, row0, row1, g, scale);
}

// ---- the layout probe ---------------------------------------------------------------------------------

// d (64 × 64, f32, row-major) = A (64 × 32) · B (32 × 64), both bf16 row-major in global memory, as two
// k-steps of wgmma m64n64k16 on one warpgroup. `way`: 0 A and B K-major in shared memory (B stored as
// its transpose's rows); 1 both MN-major (A stored as its transpose's rows, B as is); 2 A from registers
// (the PTX layout written out), B MN-major. What the attention kernels assume of wgmma, in one place a
// test can compare with the host's product. `exchanged`: every descriptor with its two strides exchanged
// (wgmma::exchange_strides), the reading a failing probe is tried with next.
constexpr int kProbeTileBytes = 16 * 1024;
template <int way>
__global__ void __launch_bounds__(128)
    wgmma_layout_probe_kernel(float* d, const uint16_t* a, const uint16_t* b, bool exchanged) {
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  // Each tile has 16 KiB to itself (it needs 4), zeroed: the exchanged reading of an MN-major descriptor
  // reaches ~9.3 KiB past its start, which must stay inside the block's shared memory.
  unsigned char* as = smem;                    // core-matrix tile: 64 × 32 (way 0) or 32 × 64 (way 1)
  unsigned char* bs = smem + kProbeTileBytes;  // 64 × 32 (way 0: Bᵀ) or 32 × 64 (ways 1, 2: B)
  for (int i = threadIdx.x; i < 2 * kProbeTileBytes / 16; i += 128)
    reinterpret_cast<uint4*>(smem)[i] = make_uint4(0u, 0u, 0u, 0u);
  __syncthreads();
  const uint16_t* a16 = a;
  for (int i = threadIdx.x; i < 64 * 32; i += 128) {
    const int r = i / 32, k = i % 32;  // A[r][k]
    const int kb = i / 64, nb = i % 64;  // B[kb][nb]
    const int at_a = way == 0 ? wgmma::tile_offset(r, k, 32) : wgmma::tile_offset(k, r, 64);
    const int at_b = way == 0 ? wgmma::tile_offset(nb, kb, 32) : wgmma::tile_offset(kb, nb, 64);
    *reinterpret_cast<uint16_t*>(as + at_a) = a16[i];
    *reinterpret_cast<uint16_t*>(bs + at_b) = b[i];
  }
  wgmma::fence_shared_for_wgmma();
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  auto pair = [&](int r, int c) {  // A[r][c, c + 1]
    return static_cast<uint32_t>(a16[r * 32 + c]) | static_cast<uint32_t>(a16[r * 32 + c + 1]) << 16;
  };
  uint32_t ra[2][4];
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    const int r = 16 * warp + g, c = 16 * kk + 2 * t;
    ra[kk][0] = pair(r, c), ra[kk][1] = pair(r + 8, c), ra[kk][2] = pair(r, c + 8), ra[kk][3] = pair(r + 8, c + 8);
  }
  auto read = [exchanged](uint64_t desc) { return exchanged ? wgmma::exchange_strides(desc) : desc; };
  float acc[32];
  wgmma::fence();
  if constexpr (way == 0) {
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
      wgmma::mma<64, 0, 0>(acc, read(wgmma::k_major(as, 32, 0, 16 * kk)), read(wgmma::k_major(bs, 32, 0, 16 * kk)),
                           kk > 0);
  } else if constexpr (way == 1) {
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
      wgmma::mma<64, 1, 1>(acc, read(wgmma::mn_major(as, 64, 16 * kk, 0)), read(wgmma::mn_major(bs, 64, 16 * kk, 0)),
                           kk > 0);
  } else {
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) wgmma::mma<64, 1>(acc, ra[kk], read(wgmma::mn_major(bs, 64, 16 * kk, 0)), kk > 0);
  }
  wgmma::commit();
  wgmma::wait<0>();
  wgmma::fence_accumulators(acc);
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) d[(16 * warp + g + 8 * (e / 2)) * 64 + 8 * j + 2 * t + e % 2] = acc[4 * j + e];
}

// ---- the mbarrier pipeline probe ----------------------------------------------------------------------

// What a warp-specialised kernel (FlashAttention-3's structure, the next step for these kernels) rests on,
// in one small kernel a GPU test and the emulation run alike: a producer warp streams `tiles` tiles of 128
// floats through a ring of kProbeStages shared stages by cp.async, each stage's "full" mbarrier completed
// by its 32 lanes' arrivals on copies; a consumer warp waits on it, sums from each tile the 4 floats of
// the next lane's piece (another thread's copy: the barrier must have made it visible), and arrives on the
// stage's "empty" barrier, which the producer waits on before it refills the stage. sums[lane] = Σ over
// the tiles of x[128·t + 4·((lane + 1) % 32) + i], i < 4. `mutation` breaks one rule, for the emulation's
// tests of itself (0 on a GPU): 1 the consumers skip the full wait, 2 the producer the empty wait, 3 the
// producer stops a tile short (the consumers wait forever), 4 a consumer writes over a barrier, 5 no
// barrier is initialised, 6 the consumers release a stage before they read it.
constexpr int kProbeStages = 2, kProbeTileFloats = 128;
constexpr size_t kProbePipelineBytes = kProbeStages * kProbeTileFloats * sizeof(float) + 2 * kProbeStages * 8;
__global__ void __launch_bounds__(64) mbarrier_pipeline_probe_kernel(float* sums, const float* x, int tiles,
                                                                      int mutation) {
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  float* stages = reinterpret_cast<float*>(smem);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kProbeStages * kProbeTileFloats * sizeof(float));
  uint64_t* empty = full + kProbeStages;
  const int lane = threadIdx.x % 32;
  if (threadIdx.x == 0 && mutation != 5) {
    for (int s = 0; s < kProbeStages; ++s) {
      mbarrier::init(&full[s], 32);   // the producer's 32 arrivals on copies
      mbarrier::init(&empty[s], 32);  // the consumers' 32 arrivals
    }
  }
  __syncthreads();
  if (threadIdx.x < 32) {  // the producer warp
    const int last = mutation == 3 ? tiles - 1 : tiles;
    for (int t = 0; t < last; ++t) {
      const int s = t % kProbeStages, round = t / kProbeStages;
      if (mutation != 2) mbarrier::wait(&empty[s], (round & 1) ^ 1);
      mma::cp_async_16(stages + s * kProbeTileFloats + 4 * lane, x + static_cast<int64_t>(t) * kProbeTileFloats + 4 * lane,
                       true);
      mbarrier::arrive_on_copies(&full[s]);
    }
  } else {  // the consumer warp
    float sum = 0.0f;
    for (int t = 0; t < tiles; ++t) {
      const int s = t % kProbeStages, round = t / kProbeStages;
      if (mutation != 1) mbarrier::wait(&full[s], round & 1);
      if (mutation == 6) mbarrier::arrive(&empty[s]);
      const float* piece = stages + s * kProbeTileFloats + 4 * ((lane + 1) % 32);
      sum += piece[0] + piece[1] + piece[2] + piece[3];
      if (mutation == 4 && t == 0 && lane == 0) reinterpret_cast<float*>(&empty[s])[0] = sum;
      if (mutation != 6) mbarrier::arrive(&empty[s]);
    }
    sums[lane] = sum;
  }
}

// ==== host code ========================================================================================

bool device_has_wgmma() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;  // sm_90a code runs on compute capability 9.0 only
}

// Calls f(std::integral_constant<int, D>()) for the head sizes with kernels; false for the others.
template <typename F>
bool with_head(int64_t D, F&& f) {
  switch (D) {
    case 64: f(std::integral_constant<int, 64>()); return true;
    case 128: f(std::integral_constant<int, 128>()); return true;
    case 168: f(std::integral_constant<int, 168>()); return true;
    case 256: f(std::integral_constant<int, 256>()); return true;
    default: return false;
  }
}

template <int D>
void forward_wgmma(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, const Dims& g,
                   cudaStream_t stream) {
  const size_t smem = ForwardSmem<D>::bytes;
  KRAKEN_CUDA_CHECK(cudaFuncSetAttribute(attention_forward_wgmma_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(B * g.NH), static_cast<unsigned>((T + kQueryTile - 1) / kQueryTile));
  KRAKEN_KERNEL(grid, kThreads, smem, stream, attention_forward_wgmma_kernel<D>)(out, lse, qkv, g);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

template <int D, bool kPingPong>
void forward_wgmma_pipelined(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, const Dims& g,
                             cudaStream_t stream) {
  const size_t smem = PipelinedForwardSmem<D>::bytes;
  KRAKEN_CUDA_CHECK(cudaFuncSetAttribute(attention_forward_wgmma_pipelined_kernel<D, kPingPong>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(B * g.NH), static_cast<unsigned>((T + kQueryTile - 1) / kQueryTile));
  KRAKEN_KERNEL(grid, kPipelinedThreads, smem, stream, attention_forward_wgmma_pipelined_kernel<D, kPingPong>)(
      out, lse, qkv, g);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

template <int D>
void backward_wgmma(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out, const float* lse,
                    int64_t B, int64_t T, const Dims& g, bool pipelined_dq, bool pipelined_kv, bool ping_pong,
                    cudaStream_t stream) {
  float* delta = static_cast<float*>(
      cuda_detail::device_scratch(cuda_detail::ScratchSlot::kAttentionDelta, sizeof(float) * B * g.NH * T));
  const int64_t warps = B * T * g.NH, blocks = (warps * 32 + 255) / 256;
  KRAKEN_CHECK(blocks <= 0x7fffffffLL, "B·T·NH = ", warps);
  KRAKEN_KERNEL(dim3(static_cast<unsigned>(blocks)), 256, 0, stream, attention_delta_wgmma_kernel)(delta, dout, out,
                                                                                                   B * T, g);
  KRAKEN_CUDA_LAUNCH_CHECK();
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.D));
  const dim3 grid(static_cast<unsigned>(B * g.NH), static_cast<unsigned>((T + kQueryTile - 1) / kQueryTile));
  // dk/dv, then dq: each kernel's (block size, shared memory) for the pipelined or the lockstep version.
  auto launch = [&](auto kernel, int threads, size_t bytes) {
    KRAKEN_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    KRAKEN_KERNEL(grid, threads, bytes, stream, kernel)(dqkv, dout, qkv, lse, delta, g, scale);
    KRAKEN_CUDA_LAUNCH_CHECK();
  };
  if constexpr (D == 256) {
    // The lockstep kernels only (the pipelined ones' rings do not fit beside these tiles), dK and dV in two
    // kernels of their own over the same keys: each recomputes Sᵀ, 8 products where one kernel's are 7.
    (void)pipelined_dq, (void)pipelined_kv, (void)ping_pong;
    launch(attention_backward_kv_wgmma_kernel<D, kDvOnly>, kThreads, KvSmem<D, kDvOnly>::kv_bytes);
    launch(attention_backward_kv_wgmma_kernel<D, kDkOnly>, kThreads, KvSmem<D, kDkOnly>::kv_bytes);
    launch(attention_backward_q_wgmma_kernel<D>, kThreads, QSmem<D>::q_bytes);
  } else {
    if (pipelined_kv)
      launch(ping_pong ? attention_backward_kv_wgmma_pipelined_kernel<D, true>
                       : attention_backward_kv_wgmma_pipelined_kernel<D, false>,
             kPipelinedThreads, PipelinedKvSmem<D>::bytes);
    else
      launch(attention_backward_kv_wgmma_kernel<D>, kThreads, KvSmem<D>::kv_bytes);
    if (pipelined_dq)
      launch(ping_pong ? attention_backward_q_wgmma_pipelined_kernel<D, true>
                       : attention_backward_q_wgmma_pipelined_kernel<D, false>,
             kPipelinedThreads, PipelinedQSmem<D>::bytes);
    else
      launch(attention_backward_q_wgmma_kernel<D>, kThreads, QSmem<D>::q_bytes);
  }
}

// Calls f(std::integral_constant<int, D>()) for the head sizes below 256, which the pipelined kernels take
// (at D = 256 the forward's stages, two of 64 KiB beside q's 64, leave no room for a third, and dK and dV
// alone would be 256 registers a thread); false for the others.
template <typename F>
bool with_head_below_256(int64_t D, F&& f) {
  switch (D) {
    case 64: f(std::integral_constant<int, 64>()); return true;
    case 128: f(std::integral_constant<int, 128>()); return true;
    case 168: f(std::integral_constant<int, 168>()); return true;
    default: return false;
  }
}

// The device's opt-in shared memory per block, asked once per process like device_has_wgmma (one GPU a
// process here): the dispatch asks whether a call suits the kernels on every call.
int max_shared_per_block() {
  static const int most = [] {
    int device = 0, bytes = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
      return 0;
    return bytes;
  }();
  return most;
}

Dims make_dims(int64_t T, int64_t C, int64_t NH) {
  return Dims{static_cast<int>(T), static_cast<int>(C), static_cast<int>(NH), static_cast<int>(C / NH), 3 * C,
              kLog2e / std::sqrt(static_cast<float>(C / NH))};
}

}  // namespace

bool attention_bf16_wgmma_backward_supported(int64_t D) {
  static const bool has = device_has_wgmma();
  size_t smem = 0;
  if (!has || !with_head(D, [&](auto d) {
        constexpr int kD = decltype(d)::value;
        smem = std::max(KvSmem<kD>::kv_bytes, QSmem<kD>::q_bytes);
        if constexpr (kD == 256) smem = std::max({smem, KvSmem<kD, kDvOnly>::kv_bytes, KvSmem<kD, kDkOnly>::kv_bytes});
      }))
    return false;
  return smem <= static_cast<size_t>(max_shared_per_block());
}

bool attention_bf16_wgmma_backward_usable(const uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                          const uint16_t* out, int64_t C, int64_t NH) {
  if (NH <= 0 || C % NH != 0 || !attention_bf16_wgmma_backward_supported(C / NH)) return false;
  for (const uint16_t* p : {dqkv, dout, qkv, out})
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

namespace {
// Whether the pipelined kernels for head size D were compiled with the launch's kLaunchRegisters a thread,
// as ptxas gives them under their launch bounds. The consumers' setmaxnreg.inc takes only what the
// producer's .dec released, so a kernel built with fewer (another ptxas, a -maxrregcount) would wait there
// forever; where any of them differs, D runs the lockstep kernels (slower, the same bits) rather than risk
// the hang. Asked once per head size and process (the dispatch asks on every call: nine driver queries a
// call would be host time on the step's path), but on every call under the emulation, whose tests change
// the registers it reports.
template <typename Kernel>
bool compiled_with_launch_registers(Kernel* kernel) {
  cudaFuncAttributes attributes{};
  return cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess && attributes.numRegs == kLaunchRegisters;
}
template <int kD>
bool pipelined_kernels_as_launched() {
  return compiled_with_launch_registers(attention_forward_wgmma_pipelined_kernel<kD, true>) &&
         compiled_with_launch_registers(attention_forward_wgmma_pipelined_kernel<kD, false>) &&
         compiled_with_launch_registers(attention_backward_q_wgmma_pipelined_kernel<kD, true>) &&
         compiled_with_launch_registers(attention_backward_q_wgmma_pipelined_kernel<kD, false>) &&
         compiled_with_launch_registers(attention_backward_kv_wgmma_pipelined_kernel<kD, true>) &&
         compiled_with_launch_registers(attention_backward_kv_wgmma_pipelined_kernel<kD, false>);
}
bool pipelined_registers_as_launched(int64_t D) {
  bool all = false;
  with_head_below_256(D, [&](auto d) {
#if defined(KRAKEN_CUDA_EMULATION)
    all = pipelined_kernels_as_launched<decltype(d)::value>();
#else
    static const bool as_launched = pipelined_kernels_as_launched<decltype(d)::value>();  // (one per head size)
    all = as_launched;
#endif
  });
  return all;
}

// The pipelined dq kernel where its shared memory fits (D = 168: 220 KiB), else the lockstep one; the
// pipelined dk/dv kernel likewise.
bool pipelined_dq_fits(int64_t D) {
  size_t smem = 0;
  return with_head_below_256(D, [&](auto d) { smem = PipelinedQSmem<decltype(d)::value>::bytes; }) &&
         smem <= static_cast<size_t>(max_shared_per_block()) && pipelined_registers_as_launched(D);
}
bool pipelined_kv_fits(int64_t D) {
  size_t smem = 0;
  return with_head_below_256(D, [&](auto d) { smem = PipelinedKvSmem<decltype(d)::value>::bytes; }) &&
         smem <= static_cast<size_t>(max_shared_per_block()) && pipelined_registers_as_launched(D);
}

}  // namespace

namespace {
void backward_wgmma_entry(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                          const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH, bool pipelined_dq,
                          bool pipelined_kv, bool ping_pong, bool accumulate, CUstream_st* stream) {
  KRAKEN_CHECK(attention_bf16_wgmma_backward_usable(dqkv, dout, qkv, out, C, NH), "wgmma attention backward: C=", C,
               " NH=", NH, " needs a head size of 64, 128, 168 or 256, a compute capability 9.0 device and 16-byte "
               "aligned buffers");
  if (B == 0 || T == 0) return;
  KRAKEN_CHECK(B * NH <= 0x7fffffffLL && T <= 0x7fffffffLL, "B·NH = ", B * NH, ", T = ", T, ": too large a grid");
  Dims g = make_dims(T, C, NH);
  g.accumulate = accumulate;
  pipelined_dq = pipelined_dq && pipelined_dq_fits(g.D);
  pipelined_kv = pipelined_kv && pipelined_kv_fits(g.D);
  with_head(g.D, [&](auto d) {
    backward_wgmma<decltype(d)::value>(dqkv, dout, qkv, out, lse, B, T, g, pipelined_dq, pipelined_kv, ping_pong,
                                       stream);
  });
}

// The kernels KRAKEN_CUDA_WGMMA asks for, adding into dqkv or overwriting it.
void backward_wgmma_as_set(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                           const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH, bool accumulate,
                           CUstream_st* stream) {
  const AttentionWgmmaKernels w = attention_wgmma_kernels();  // KRAKEN_CUDA_WGMMA
  const bool pipelined = w != AttentionWgmmaKernels::kLockstep;
  backward_wgmma_entry(dqkv, dout, qkv, out, lse, B, T, C, NH, pipelined, pipelined,
                       w == AttentionWgmmaKernels::kPipelined, accumulate, stream);
}
}  // namespace

void attention_backward_bf16_wgmma_kernels_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                                const uint16_t* out, const float* lse, int64_t B, int64_t T,
                                                int64_t C, int64_t NH, bool pipelined_dq, bool pipelined_kv,
                                                bool ping_pong, CUstream_st* stream) {
  backward_wgmma_entry(dqkv, dout, qkv, out, lse, B, T, C, NH, pipelined_dq, pipelined_kv, ping_pong, true, stream);
}

void attention_backward_bf16_wgmma_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                        const uint16_t* out, const float* lse, int64_t B, int64_t T, int64_t C,
                                        int64_t NH, CUstream_st* stream) {
  backward_wgmma_as_set(dqkv, dout, qkv, out, lse, B, T, C, NH, true, stream);
}

void attention_backward_bf16_wgmma_overwrite_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                                  const uint16_t* out, const float* lse, int64_t B, int64_t T,
                                                  int64_t C, int64_t NH, CUstream_st* stream) {
  backward_wgmma_as_set(dqkv, dout, qkv, out, lse, B, T, C, NH, false, stream);
}

void attention_backward_bf16_wgmma_lockstep_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv,
                                                 const uint16_t* out, const float* lse, int64_t B, int64_t T,
                                                 int64_t C, int64_t NH, CUstream_st* stream) {
  attention_backward_bf16_wgmma_kernels_cuda(dqkv, dout, qkv, out, lse, B, T, C, NH, false, false, false, stream);
}

bool attention_bf16_wgmma_supported(int64_t D) {
  static const bool has = device_has_wgmma();
  size_t smem = 0;
  if (!has || !with_head(D, [&](auto d) { smem = ForwardSmem<decltype(d)::value>::bytes; })) return false;
  return smem <= static_cast<size_t>(max_shared_per_block());
}

bool attention_bf16_wgmma_usable(const uint16_t* out, const uint16_t* qkv, int64_t C, int64_t NH) {
  if (NH <= 0 || C % NH != 0 || !attention_bf16_wgmma_supported(C / NH)) return false;
  return reinterpret_cast<uintptr_t>(qkv) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 4 == 0;
}

bool attention_bf16_wgmma_pipelined_supported(int64_t D) {
  size_t smem = 0;
  if (!attention_bf16_wgmma_supported(D) ||
      !with_head_below_256(D, [&](auto d) { smem = PipelinedForwardSmem<decltype(d)::value>::bytes; }))
    return false;
  return smem <= static_cast<size_t>(max_shared_per_block()) && pipelined_registers_as_launched(D);
}

void attention_forward_bf16_wgmma_kernel_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T,
                                              int64_t C, int64_t NH, bool pipelined, bool ping_pong,
                                              CUstream_st* stream) {
  KRAKEN_CHECK(attention_bf16_wgmma_usable(out, qkv, C, NH), "wgmma attention: C=", C, " NH=", NH,
               " needs a head size of 64, 128, 168 or 256, a compute capability 9.0 device, qkv 16- and out 4-byte "
               "aligned");
  if (B == 0 || T == 0) return;
  KRAKEN_CHECK(B * NH <= 0x7fffffffLL && T <= 0x7fffffffLL, "B·NH = ", B * NH, ", T = ", T, ": too large a grid");
  const Dims g = make_dims(T, C, NH);
  if (pipelined && attention_bf16_wgmma_pipelined_supported(g.D)) {
    with_head_below_256(g.D, [&](auto d) {
      if (ping_pong) forward_wgmma_pipelined<decltype(d)::value, true>(out, lse, qkv, B, T, g, stream);
      else forward_wgmma_pipelined<decltype(d)::value, false>(out, lse, qkv, B, T, g, stream);
    });
    return;
  }
  with_head(g.D, [&](auto d) { forward_wgmma<decltype(d)::value>(out, lse, qkv, B, T, g, stream); });
}

void attention_forward_bf16_wgmma_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T,
                                       int64_t C, int64_t NH, CUstream_st* stream) {
  const AttentionWgmmaKernels w = attention_wgmma_kernels();  // KRAKEN_CUDA_WGMMA
  attention_forward_bf16_wgmma_kernel_cuda(out, lse, qkv, B, T, C, NH, w != AttentionWgmmaKernels::kLockstep,
                                           w == AttentionWgmmaKernels::kPipelined, stream);
}

void attention_forward_bf16_wgmma_lockstep_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B,
                                                int64_t T, int64_t C, int64_t NH, CUstream_st* stream) {
  attention_forward_bf16_wgmma_kernel_cuda(out, lse, qkv, B, T, C, NH, false, false, stream);
}

void wgmma_layout_probe_cuda(float* d, const uint16_t* a, const uint16_t* b, int way, bool strides_exchanged,
                             CUstream_st* stream) {
  KRAKEN_CHECK(way >= 0 && way <= 2, "wgmma layout probe: way ", way, " (0, 1 or 2)");
  KRAKEN_CHECK(device_has_wgmma(), "wgmma layout probe: needs a compute capability 9.0 device");
  const size_t smem = 2 * kProbeTileBytes;
  const bool x = strides_exchanged;
  if (way == 0) KRAKEN_KERNEL(1, 128, smem, stream, wgmma_layout_probe_kernel<0>)(d, a, b, x);
  if (way == 1) KRAKEN_KERNEL(1, 128, smem, stream, wgmma_layout_probe_kernel<1>)(d, a, b, x);
  if (way == 2) KRAKEN_KERNEL(1, 128, smem, stream, wgmma_layout_probe_kernel<2>)(d, a, b, x);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

void mbarrier_pipeline_probe_cuda(float* sums, const float* x, int tiles, int mutation, CUstream_st* stream) {
  KRAKEN_CHECK(tiles >= 1 && mutation >= 0 && mutation <= 6, "mbarrier pipeline probe: tiles ", tiles, ", mutation ",
               mutation);
  KRAKEN_CHECK(device_has_wgmma(), "mbarrier pipeline probe: needs a compute capability 9.0 device");
  KRAKEN_KERNEL(1, 64, kProbePipelineBytes, stream, mbarrier_pipeline_probe_kernel)(sums, x, tiles, mutation);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

}  // namespace kraken::kernels
