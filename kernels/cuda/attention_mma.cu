// CUDA causal attention on tensor cores with the scores kept in registers: mma.sync m16n8k16 (bf16
// operands, f32 accumulators), ldmatrix and cp.async — the FlashAttention-2 formulation (Dao 2023).
//
// Why a second tensor-core family beside attention_tc.cu: WMMA leaves its fragment layouts unspecified,
// so the WMMA kernels store every 16 × 64 block of scores to shared memory, run the softmax there and
// load P back as an operand; on an H200 they reached 57–76 TFLOP/s at D = 64 and were a third of a
// GPT-2 training step. mma.sync's layouts are fixed by the PTX ISA (mma_sync.h), so here the scores
// never leave registers: each lane holds two query rows (g and g + 8 of its warp's 16) and two
// adjacent columns of every 8-key tile, the row max and sum are two shuffles among the 4 lanes of a
// row, and P, rounded to bf16 and paired, is already the A operand of P·v.
//
// The arithmetic is that of attention_tc.cu, so both meet one contract (kernels/attention.h): scores,
// the online softmax (in log2 units), Dᵢ and lse in f32; P (backward: P and dS) rounded to bf16 before
// their products; out = O / l̃ with l̃ the sum of the rounded weights, lse from the f32 ones; dq, dk,
// dv added to dqkv in f32 and rounded once. Products sum in the tensor cores' order, not the WMMA
// kernels', so the two families agree to rounding, not bit for bit. Deterministic: no atomics.
//
// Tiles (attention_tiles.h): D is padded with zeros to Dp, a multiple of 16 (the WMMA kernels step by
// 32 above 128; here the Kraken 4-way heads, D = 168, pad to 176, not 192). A block is 4 warps owning
// 64 rows, 16 per warp — queries in the forward
// and the dq kernel, keys in the dk/dv kernel — and streams the other side through shared memory in
// tiles of 64 rows (bf16, pitch Dp + 8: the 8 row addresses of an ldmatrix phase fall in 8 different
// 16-byte bank groups). Up to Dp = 128 the streamed tiles are double-buffered: cp.async brings tile
// i + 1 while tile i is multiplied (rows whose D allows 16-byte pieces; other D copy synchronously into
// the same buffers). Above 128 one buffer, so a block stays within the A100's shared memory.
//
// Per warp and streamed tile:
//   forward   S = q·kᵀ (16 × 64, 32 f32 registers), mask, m' = max(m, rowmax S), α = 2^{m − m'},
//             P = 2^{S − m'}; O = α·O + P·v (O: Dp/2 registers); l and l̃ are per-lane partial row
//             sums (α is the same in the 4 lanes of a row), added across the lanes at the end.
//   dq        per 16-key block: S = q·kᵀ, dP = dO·vᵀ, P = 2^{S·scale·log₂e − lse·log₂e},
//             dS = P∘(dP − Dᵢ); dQ += dS·k.
//   Dᵢ = Σ_d dO[i, d]·O[i, d] (f32, from the bf16 dO and out) is computed once per backward by a small
//   kernel into a per-device scratch buffer (scratch.h), and streamed with lse by cp.async beside the q
//   and dO tiles (the WMMA kernels recompute it for every pair of tiles, with plain loads the pipeline
//   cannot hide).
//   dk/dv     per 16-query block: Sᵀ = k·qᵀ, dPᵀ = v·dOᵀ, Pᵀ and dSᵀ as above (lse and Dᵢ of the
//             column's query); dV += Pᵀ·dO, dK += dSᵀ·q.
// A 16-row block entirely masked for the warp (all keys after all its queries, or past T) is skipped.
// The warp's own rows (q in the forward; q and dO for dq; k and v for dk/dv) are held as A fragments in
// registers where the accumulators leave room (forward and dq up to Dp = 128, dk/dv up to 64), else
// loaded with ldmatrix when used. Results are staged through shared memory (f32) once, so the global
// writes are whole rows in 16-byte pieces, as in attention_tc.cu.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cuda/attention_tiles.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/fast_exp.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/mma_sync.h"
#include "kernels/cuda/scratch.h"

namespace kraken::kernels {
namespace {

using cuda_detail::exp2_ftz;

// ==== device code ======================================================================================

constexpr int kBlocksPerTile = kTile / kSub;  // 16-row blocks of a streamed tile

// Several attentions of one shape in one launch (attention_*_bf16_mma_group_cuda): block x of the grid
// belongs to group x / (B·NH) and head x % (B·NH), and each group has its own tensors. One launch for the
// Kraken sub-layers of a layer fills the GPU where one per sub-layer (B·3 heads) leaves it half idle.
struct ForwardGroups {
  uint16_t* out[kAttentionMaxGroups];
  float* lse[kAttentionMaxGroups];
  const uint16_t* qkv[kAttentionMaxGroups];
};
struct BackwardGroups {
  uint16_t* dqkv[kAttentionMaxGroups];
  const uint16_t* dout[kAttentionMaxGroups];
  const uint16_t* qkv[kAttentionMaxGroups];
  const uint16_t* out[kAttentionMaxGroups];
  const float* lse[kAttentionMaxGroups];
};

// Two floats rounded to bf16 (nearest even), lo in the low half: one cvt.rn.bf16x2.f32 on sm_80+.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
  return static_cast<uint32_t>(__bfloat16_as_ushort(pair.x)) | static_cast<uint32_t>(__bfloat16_as_ushort(pair.y)) << 16;
}
// The halves of a pack_bf16 pair as floats (a bf16 is the top half of its float).
__device__ __forceinline__ float low_bf16(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float high_bf16(uint32_t pair) { return __uint_as_float(pair & 0xffff0000u); }

// The A operand of rows r0 .. r0 + 15 and columns c0 .. c0 + 15 of a bf16 tile (pitch ld).
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* tile, int ld, int r0, int c0) {
  const int lane = threadIdx.x % 32;
  mma::ldmatrix_x4(a, tile + (r0 + lane % 16) * ld + c0 + (lane / 16) * 8);
}

// The B operands of two 16 × 8 products whose n runs over rows n0 .. n0 + 15 of a tile and whose k runs
// over its columns c0 .. c0 + 15 — the tile's rows transposed, as k is in q·kᵀ: b[0] for rows n0 .. n0 + 7,
// b[1] for n0 + 8 .. n0 + 15.
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[2][2], const uint16_t* tile, int ld, int n0, int c0) {
  const int lane = threadIdx.x % 32;
  uint32_t r[4];
  mma::ldmatrix_x4(r, tile + (n0 + (lane / 16) * 8 + lane % 8) * ld + c0 + ((lane / 8) % 2) * 8);
  b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// The B operands of two 16 × 8 products whose k runs over rows k0 .. k0 + 15 of a tile and whose n runs
// over its columns c0 .. c0 + 15, as v is in P·v: b[0] for columns c0 .. c0 + 7, b[1] for c0 + 8 .. c0 + 15.
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[2][2], const uint16_t* tile, int ld, int k0, int c0) {
  const int lane = threadIdx.x % 32;
  uint32_t r[4];
  mma::ldmatrix_x4_trans(r, tile + (k0 + lane % 16) * ld + c0 + (lane / 16) * 8);
  b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// acc[n0], acc[n0 + 1] += a · (b[0], b[1]).
template <int N>
__device__ __forceinline__ void mma_pair(float (&acc)[N][4], int n0, const uint32_t (&a)[4],
                                         const uint32_t (&b)[2][2]) {
  mma::mma_bf16(acc[n0], a, b[0]);
  mma::mma_bf16(acc[n0 + 1], a, b[1]);
}

// A warp's 16 rows of a tile as A operands over the padded head columns: held in registers when kHold,
// else loaded from shared memory at each use.
template <int Dp, bool kHold>
struct RowOperands {
  uint32_t held[kHold ? Dp / kSub : 1][4];
  const uint16_t* tile;
  int ld, r0;
  __device__ __forceinline__ RowOperands(const uint16_t* tile_, int ld_, int r0_) : tile(tile_), ld(ld_), r0(r0_) {}
  // Fills the registers; the tile must be in place. Warp-collective.
  __device__ __forceinline__ void hold() {
    if (kHold) {
#pragma unroll
      for (int kk = 0; kk < Dp / kSub; ++kk) load_a(held[kHold ? kk : 0], tile, ld, r0, kk * kSub);
    }
  }
  __device__ __forceinline__ void get(uint32_t (&a)[4], int kk) const {
    if (kHold) {
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = held[kHold ? kk : 0][i];
    } else {
      load_a(a, tile, ld, r0, kk * kSub);
    }
  }
};

// Rows [t0, t0 + 64) of a head's columns [0, D) into a shared tile (pitch ld): by cp.async in 16-byte
// pieces (zero-filled past T) where TcDims::vec is 8, else by plain loads and stores. Either way the rows
// may be read after this thread's cp_async_wait and a barrier.
// The piece → (row, column) arithmetic runs for every piece of every tile; divided by a run-time count
// of pieces per row it took more instructions than the copies (ncu on an H200: the integer pipe was the
// forward's busiest). Where D fills the padded head (D = Dp: GPT-2's 64) the count is a constant, so
// shifts and an unrolled loop; otherwise (Kraken's 168 in 176) the row and column step along.
template <int Dp>
__device__ __forceinline__ void load_rows(uint16_t* dst, int ld, const uint16_t* src, int64_t stride, int t0,
                                          const TcDims& g) {
  if (g.vec != 8) {
    copy_rows(dst, ld, src, stride, t0, g, kTile);
    return;
  }
  if (g.D == Dp) {
    constexpr int kPacks = Dp / 8, kPieces = kTile * kPacks;
#pragma unroll 1  // unrolled, the compiler keeps every piece's addresses live across the tile loop
    for (int k = 0; k < (kPieces + kThreads - 1) / kThreads; ++k) {
      const int idx = threadIdx.x + k * kThreads;
      if (kPieces % kThreads != 0 && idx >= kPieces) break;
      const int r = idx / kPacks, c = idx % kPacks * 8;
      const bool in = t0 + r < g.T;
      mma::cp_async_16(dst + r * ld + c, src + (in ? static_cast<int64_t>(t0 + r) * stride + c : 0), in);
    }
    return;
  }
  const int packs = g.D / 8, step_r = kThreads / packs, step_c = kThreads - step_r * packs;
  int r = static_cast<int>(threadIdx.x) / packs, c = static_cast<int>(threadIdx.x) - r * packs;
  while (r < kTile) {
    const bool in = t0 + r < g.T;
    mma::cp_async_16(dst + r * ld + c * 8, src + (in ? static_cast<int64_t>(t0 + r) * stride + c * 8 : 0), in);
    r += step_r, c += step_c;
    if (c >= packs) c -= packs, ++r;
  }
}

// The lane's accumulators (rows g, g + 8 of the warp's 16; columns 8n + 2t, +1) times factor[row] into
// the warp's f32 rows (pitch ldo), for store_rows.
template <int N>
__device__ __forceinline__ void stage_rows(float* ow, int ldo, const float (&acc)[N][4], float factor0,
                                           float factor1) {
  const int lane = threadIdx.x % 32, gr = lane / 4, c = 2 * (lane % 4);
#pragma unroll
  for (int n = 0; n < N; ++n) {
    *reinterpret_cast<float2*>(ow + gr * ldo + 8 * n + c) = make_float2(acc[n][0] * factor0, acc[n][1] * factor0);
    *reinterpret_cast<float2*>(ow + (gr + 8) * ldo + 8 * n + c) =
        make_float2(acc[n][2] * factor1, acc[n][3] * factor1);
  }
}

// Shared memory. Row tiles of 64 × (Dp + 8) bf16; the forward holds its q tile and `stages` pairs of k
// and v tiles; the backward kernels hold two own tiles (k, v or q, dO), `stages` pairs of streamed tiles
// and per stage the lse and Dᵢ of 64 queries. Results are staged (f32, pitch Dp + 4) over
// the tiles once the loop is done. Dp = 64: forward 45 KiB, backward 55 KiB; Dp = 128: 85 and 103 KiB;
// Dp = 176 (one stage; the Kraken 4-way heads, D = 168): 69 and 92.5 KiB; Dp = 256: 99 and 132.5 KiB.
template <int Dp>
struct MmaSmem {
  static constexpr int ld = Dp + 8;
  static constexpr int ldo = Dp + 4;
  static constexpr int stages = Dp <= 128 ? 2 : 1;
  static constexpr size_t tile = sizeof(uint16_t) * kTile * ld;
  // forward: q, then stage s's k and v
  static constexpr size_t fwd_q = 0, fwd_kv = tile, forward_bytes = fwd_kv + 2 * stages * tile;
  // backward: own0, own1, then stage s's two streamed tiles, then stage s's lse and Dᵢ
  static constexpr size_t own0 = 0, own1 = tile, stream = 2 * tile, rows = stream + 2 * stages * tile;
  static constexpr size_t backward_bytes = rows + sizeof(float) * 2 * kTile * stages;
  static_assert(tile % 128 == 0, "tiles stay 128-byte aligned");
  static_assert(sizeof(float) * kWarps * kSub * ldo <= 2 * stages * tile, "results fit over the tiles");
};

// Keys t0 .. t0 + 63 of a head (base: its q columns in qkv) into a streamed stage: k, then v below it.
// The forward and the dq kernel stream these.
template <int Dp>
__device__ __forceinline__ void load_kv_tile(uint16_t* ks, const uint16_t* base, int t0, const TcDims& g) {
  constexpr int ld = MmaSmem<Dp>::ld;
  load_rows<Dp>(ks, ld, base + g.C, g.ld, t0, g);
  load_rows<Dp>(ks + kTile * ld, ld, base + 2 * g.C, g.ld, t0, g);
}

// The software pipeline of the three kernels, over `count` streamed tiles: load(i, stage) issues tile
// i's copies; compute(i, stage) runs once tile i is visible to every thread. With two stages tile i + 1
// is in flight while tile i is multiplied; the barrier after compute keeps a stage from being reloaded
// while a warp still reads it.
template <int kStages, typename Load, typename Compute>
__device__ __forceinline__ void pipeline(int count, Load&& load, Compute&& compute) {
  load(0, 0);
  mma::cp_async_commit();
  for (int i = 0; i < count; ++i) {
    if (kStages == 2) {
      if (i + 1 < count) load(i + 1, (i + 1) & 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();  // all but the group just issued: tile i (and what came with tile 0)
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    compute(i, kStages == 2 ? i & 1 : 0);
    __syncthreads();
    if (kStages == 1 && i + 1 < count) {
      load(i + 1, 0);
      mma::cp_async_commit();
    }
  }
}

// ---- forward ------------------------------------------------------------------------------------------

template <int Dp>
__global__ void __launch_bounds__(kThreads)
    attention_forward_mma_kernel(ForwardGroups groups, TcDims g) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using L = MmaSmem<Dp>;
  constexpr int kK = Dp / kSub;  // 16-column steps of the head: the k of q·kᵀ, the n pairs of P·v
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  uint16_t* qs = reinterpret_cast<uint16_t*>(smem + L::fwd_q);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tq = lane % 4;
  const int group = blockIdx.x / g.bnh, bh = blockIdx.x % g.bnh, b = bh / g.NH, h = bh % g.NH;
  uint16_t* out = groups.out[group];
  float* lse = groups.lse[group];
  const uint16_t* qkv = groups.qkv[group];
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kTile;  // the longest rows first
  const int qw = q0 + warp * kSub;                      // the warp's first query
  const int warp_last = min(qw + kSub, g.T) - 1;        // and its last (< qw when it has none)
  const int block_last = min(q0 + kTile, g.T) - 1;
  const int row0 = qw + lane / 4, row1 = row0 + 8;      // the lane's two queries
  const uint16_t* base = qkv + static_cast<int64_t>(b) * g.T * g.ld + static_cast<int64_t>(h) * g.D;

  zero_shared(smem, L::forward_bytes);  // the padding columns D .. Dp stay zero
  __syncthreads();
  load_rows<Dp>(qs, L::ld, base, g.ld, q0, g);  // lands with the first k and v tile
  RowOperands<Dp, (Dp <= 128)> q_rows(qs, L::ld, warp * kSub);

  float o[2 * kK][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, l_rounded[2] = {0.0f, 0.0f};
  auto load = [&](int i, int stage) {
    load_kv_tile<Dp>(reinterpret_cast<uint16_t*>(smem + L::fwd_kv + 2 * stage * L::tile), base, i * kTile, g);
  };
  auto compute = [&](int i, int stage) {
    const uint16_t* ks = reinterpret_cast<const uint16_t*>(smem + L::fwd_kv + 2 * stage * L::tile);
    const uint16_t* vs = ks + kTile * L::ld;
    const int k0 = i * kTile;
    if (i == 0) q_rows.hold();
    // Live when some key of the tile precedes some query of the warp (then key k0 ≤ q0 precedes all of
    // them, so every row's max below is finite).
    if (qw >= g.T || k0 > warp_last) return;
    float s[2 * kBlocksPerTile][4] = {};
#pragma unroll
    for (int kk = 0; kk < kK; ++kk) {
      uint32_t a[4];
      q_rows.get(a, kk);
#pragma unroll
      for (int j = 0; j < kBlocksPerTile; ++j) {
        if (k0 + j * kSub > warp_last) continue;  // masked whole: its S is never used
        uint32_t bk[2][2];
        load_b_rows(bk, ks, L::ld, j * kSub, kk * kSub);
        mma_pair(s, 2 * j, a, bk);
      }
    }
    // Mask and the online softmax in log2 units; element e of tile n is row e < 2 ? row0 : row1, key
    // k0 + 8n + 2t + (e & 1). Only a tile reaching past the warp's first query needs the causal mask
    // (warp-uniform; keys past T come only in such tiles). The row max is taken over the raw scores
    // (scale_log2 > 0 keeps the order) and the scale folds into the exponent's one FFMA.
    if (k0 + kTile - 1 > qw) {
#pragma unroll
      for (int n = 0; n < 2 * kBlocksPerTile; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (k0 + 8 * n + 2 * tq + (e & 1) > (e < 2 ? row0 : row1)) s[n][e] = -INFINITY;
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < 2 * kBlocksPerTile; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
    float alpha[2], neg_m[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r] * g.scale_log2);
      alpha[r] = exp2_ftz(m[r] - m_new);  // 2^{−∞} = 0 on the first tile
      m[r] = m_new;
      neg_m[r] = -m_new;
    }
    uint32_t p[kBlocksPerTile][4];  // P as the A operand of each 16-key block
    float sum[2] = {0.0f, 0.0f}, sum_rounded[2] = {0.0f, 0.0f};
#pragma unroll
    for (int n = 0; n < 2 * kBlocksPerTile; ++n) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float p0 = exp2_ftz(fmaf(s[n][2 * r], g.scale_log2, neg_m[r]));
        const float p1 = exp2_ftz(fmaf(s[n][2 * r + 1], g.scale_log2, neg_m[r]));
        const uint32_t pair = pack_bf16(p0, p1);
        sum[r] += p0 + p1;
        sum_rounded[r] += low_bf16(pair) + high_bf16(pair);
        p[n / 2][2 * (n % 2) + r] = pair;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[r] = l[r] * alpha[r] + sum[r];
      l_rounded[r] = l_rounded[r] * alpha[r] + sum_rounded[r];
    }
#pragma unroll
    for (int n = 0; n < 2 * kK; ++n) o[n][0] *= alpha[0], o[n][1] *= alpha[0], o[n][2] *= alpha[1], o[n][3] *= alpha[1];
    // O += P·v
#pragma unroll
    for (int j = 0; j < kBlocksPerTile; ++j) {
      if (k0 + j * kSub > warp_last) continue;  // P is 0 there
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        uint32_t bv[2][2];
        load_b_cols(bv, vs, L::ld, j * kSub, kk * kSub);
        mma_pair(o, 2 * kk, p[j], bv);
      }
    }
  };
  pipeline<L::stages>(block_last / kTile + 1, load, compute);

  // (the pipeline ends with a barrier: the k and v tiles are free for the output)
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(kFull, l[r], 1);
    l[r] += __shfl_xor_sync(kFull, l[r], 2);
    l_rounded[r] += __shfl_xor_sync(kFull, l_rounded[r], 1);
    l_rounded[r] += __shfl_xor_sync(kFull, l_rounded[r], 2);
  }
  float* ow = reinterpret_cast<float*>(smem + L::fwd_kv) + warp * kSub * L::ldo;
  stage_rows(ow, L::ldo, o, l_rounded[0] > 0.0f ? 1.0f / l_rounded[0] : 0.0f,
             l_rounded[1] > 0.0f ? 1.0f / l_rounded[1] : 0.0f);
  __syncwarp();
  store_rows<false>(out + static_cast<int64_t>(b) * g.T * g.C + static_cast<int64_t>(h) * g.D, g.C, ow, L::ldo, qw,
                    1.0f, g);
  if (tq == 0) {
    if (row0 < g.T) lse[static_cast<int64_t>(bh) * g.T + row0] = m[0] * kLn2 + logf(l[0]);
    if (row1 < g.T) lse[static_cast<int64_t>(bh) * g.T + row1] = m[1] * kLn2 + logf(l[1]);
  }
#else
  __trap();  // mma.sync with bf16 needs sm_80
#endif
}

// ---- backward -----------------------------------------------------------------------------------------

// Dᵢ = Σ_d dO[b, t, h, d]·O[b, t, h, d] for every group and (b·NH + h, t), into delta (group after group,
// each in the layout of lse): one thread per (group, row, head), V-element pieces.
template <int V>
__global__ void __launch_bounds__(256)
    attention_delta_kernel(float* delta, BackwardGroups groups, int count, int64_t rows, TcDims g) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // (group · rows + row) · NH + h
  if (i >= count * rows * g.NH) return;
  const int group = static_cast<int>(i / (rows * g.NH));
  const int64_t row = i / g.NH - group * rows;
  const int h = static_cast<int>(i % g.NH);
  const int64_t at = row * g.C + static_cast<int64_t>(h) * g.D;
  const uint16_t* dout = groups.dout[group];
  const uint16_t* out = groups.out[group];
  float acc = 0.0f;
  for (int c = 0; c < g.D; c += V) {
    const Pack<V> x = *reinterpret_cast<const Pack<V>*>(dout + at + c);
    const Pack<V> y = *reinterpret_cast<const Pack<V>*>(out + at + c);
#pragma unroll
    for (int k = 0; k < V; ++k) acc += b2f(x.u[k]) * b2f(y.u[k]);
  }
  const int64_t b = row / g.T, t = row - b * g.T;
  delta[(static_cast<int64_t>(group) * g.bnh + b * g.NH + h) * g.T + t] = acc;
}

// The same Dᵢ with a warp per (group, row), where the rows allow 16-byte pieces (TcDims::vec = 8): the
// lanes take the row's pieces of dO and O side by side (one coalesced pass; a thread per head read
// 16 bytes at a time from rows 2·D bytes apart, 1.6 TB/s on an H200), put each piece's 8 products' sum
// in shared memory, and each head's pieces are then added in order by one lane.
constexpr int kDeltaWarps = 8;
__global__ void __launch_bounds__(kDeltaWarps * 32)
    attention_delta_rows_kernel(float* delta, BackwardGroups groups, int count, int64_t rows, TcDims g) {
  KRAKEN_DYNAMIC_SHARED(float, pieces);  // [kDeltaWarps][C / 8]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kDeltaWarps + warp;  // group · rows + row
  if (i >= count * rows) return;  // (the warp's own barrier below is all it takes part in)
  const int group = static_cast<int>(i / rows);
  const int64_t row = i - group * rows;
  const uint16_t* dout = groups.dout[group] + row * g.C;
  const uint16_t* out = groups.out[group] + row * g.C;
  const int packs = g.C / 8, per_head = g.D / 8;
  float* mine = pieces + warp * packs;
  for (int p = lane; p < packs; p += 32) {
    const Pack<8> x = *reinterpret_cast<const Pack<8>*>(dout + 8 * p);
    const Pack<8> y = *reinterpret_cast<const Pack<8>*>(out + 8 * p);
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) acc += b2f(x.u[k]) * b2f(y.u[k]);
    mine[p] = acc;
  }
  __syncwarp();
  const int64_t b = row / g.T, t = row - b * g.T;
  for (int h = lane; h < g.NH; h += 32) {
    float acc = 0.0f;
    for (int q = 0; q < per_head; ++q) acc += mine[h * per_head + q];
    delta[(static_cast<int64_t>(group) * g.bnh + b * g.NH + h) * g.T + t] = acc;
  }
}

// lse and Dᵢ of queries q0 .. q0 + 63 of head bh into lse_s[0..63], delta_s[0..63] by cp.async (one
// float per thread; zeros past T).
__device__ __forceinline__ void load_query_stats(float* lse_s, float* delta_s, const float* lse, const float* delta,
                                                 int bh, int q0, const TcDims& g) {
  const int i = threadIdx.x % kTile, t = q0 + i;
  const bool in = t < g.T;
  const int64_t at = in ? static_cast<int64_t>(bh) * g.T + t : 0;
  if (threadIdx.x < kTile)
    mma::cp_async_4(lse_s + i, lse + at, in);
  else
    mma::cp_async_4(delta_s + i, delta + at, in);
}

// Pᵀ or P and dS of one 16 × 16 block as A operands (bf16), from its scores s and dP (two 16 × 8
// accumulator tiles each). Element e of tile n stands for (row e < 2 ? g : g + 8, column 8n + 2t + (e & 1));
// stats(n, e) gives its query's −lse·log₂e and Dᵢ, valid(n, e) whether its key precedes its query and the
// query is before T — asked only when kMask: the caller knows, warp-uniformly, when a block has an
// invalid element (the diagonal block, rows or columns past T), and elsewhere skips the tests.
template <bool kMask, typename Stats, typename Valid>
__device__ __forceinline__ void probabilities_and_ds(uint32_t (&p_a)[4], uint32_t (&ds_a)[4], const float (&s)[2][4],
                                                     const float (&dp)[2][4], Stats&& stats, Valid&& valid,
                                                     float scale_log2) {
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    float pv[4], dv[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 st = stats(n, e);  // (−lse·log₂e, Dᵢ)
      pv[e] = exp2_ftz(fmaf(s[n][e], scale_log2, st.x));
      dv[e] = pv[e] * (dp[n][e] - st.y);
      if (kMask && !valid(n, e)) pv[e] = 0.0f, dv[e] = 0.0f;
    }
    p_a[2 * n] = pack_bf16(pv[0], pv[1]);
    p_a[2 * n + 1] = pack_bf16(pv[2], pv[3]);
    ds_a[2 * n] = pack_bf16(dv[0], dv[1]);
    ds_a[2 * n + 1] = pack_bf16(dv[2], dv[3]);
  }
}

// A backward block's group and head (block x of the grid: group x / (B·NH), head x % (B·NH)) and that
// group's tensors; delta is the group's part of the Dᵢ buffer.
struct BackwardBlock {
  int bh, b, h;
  uint16_t* dqkv;
  const uint16_t *dout, *qkv;
  const float *lse, *delta;
  __device__ __forceinline__ BackwardBlock(const BackwardGroups& groups, const float* deltas, const TcDims& g) {
    const int group = blockIdx.x / g.bnh;
    bh = blockIdx.x % g.bnh, b = bh / g.NH, h = bh % g.NH;
    dqkv = groups.dqkv[group], dout = groups.dout[group], qkv = groups.qkv[group], lse = groups.lse[group];
    delta = deltas + static_cast<int64_t>(group) * g.bnh * g.T;
  }
};

// The dk/dv kernel's body; two kernels run it (below), with and without a bound on registers.
template <int Dp>
__device__ __forceinline__ void backward_kv_mma(const BackwardGroups& groups, const float* deltas, const TcDims& g) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using L = MmaSmem<Dp>;
  constexpr int kK = Dp / kSub;
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  uint16_t* ks = reinterpret_cast<uint16_t*>(smem + L::own0);
  uint16_t* vs = reinterpret_cast<uint16_t*>(smem + L::own1);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tq = lane % 4;
  const BackwardBlock blk(groups, deltas, g);
  const int bh = blk.bh, b = blk.b, h = blk.h;
  uint16_t* dqkv = blk.dqkv;
  const uint16_t *dout = blk.dout, *qkv = blk.qkv;
  const float *lse = blk.lse, *delta = blk.delta;
  const int k0 = blockIdx.y * kTile;  // the first key tiles have the most query tiles: first
  const int kw = k0 + warp * kSub;    // the warp's first key
  const int64_t row0 = static_cast<int64_t>(b) * g.T;
  const uint16_t* base = qkv + row0 * g.ld + static_cast<int64_t>(h) * g.D;
  const uint16_t* dout_base = dout + row0 * g.C + static_cast<int64_t>(h) * g.D;

  zero_shared(smem, L::rows);
  __syncthreads();
  load_rows<Dp>(ks, L::ld, base + g.C, g.ld, k0, g);  // land with the first query tile
  load_rows<Dp>(vs, L::ld, base + 2 * g.C, g.ld, k0, g);
  constexpr bool kHold = Dp <= 64;  // above, with dK and dV in registers, they would spill
  RowOperands<Dp, kHold> k_rows(ks, L::ld, warp * kSub), v_rows(vs, L::ld, warp * kSub);
  float dk[2 * kK][4] = {}, dv[2 * kK][4] = {};

  auto tiles_of = [&](int stage) {
    return reinterpret_cast<uint16_t*>(smem + L::stream + 2 * stage * L::tile);  // q, then dO
  };
  auto rows_of = [&](int stage) { return reinterpret_cast<float*>(smem + L::rows) + 2 * kTile * stage; };
  auto load = [&](int i, int stage) {
    const int q0 = k0 + i * kTile;
    uint16_t* qs = tiles_of(stage);
    load_rows<Dp>(qs, L::ld, base, g.ld, q0, g);
    load_rows<Dp>(qs + kTile * L::ld, L::ld, dout_base, g.C, q0, g);
    float* lse_s = rows_of(stage);
    load_query_stats(lse_s, lse_s + kTile, lse, delta, bh, q0, g);
  };
  auto compute = [&](int i, int stage) {
    const int q0 = k0 + i * kTile;
    const uint16_t* qs = tiles_of(stage);
    const uint16_t* dos = qs + kTile * L::ld;
    const float* lse_s = rows_of(stage);
    if (i == 0) k_rows.hold(), v_rows.hold();
    if (kw >= g.T) return;  // keys past T have no gradient to keep
#pragma unroll
    for (int j = 0; j < kBlocksPerTile; ++j) {
      const int qj = q0 + j * kSub;
      if (qj >= g.T || qj + kSub - 1 < kw) continue;  // past T, or every query before every key
      float s[2][4] = {}, dp[2][4] = {};
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        uint32_t a[4], bq[2][2];
        k_rows.get(a, kk);
        load_b_rows(bq, qs, L::ld, j * kSub, kk * kSub);
        mma_pair(s, 0, a, bq);  // Sᵀ = k·qᵀ
        v_rows.get(a, kk);
        load_b_rows(bq, dos, L::ld, j * kSub, kk * kSub);
        mma_pair(dp, 0, a, bq);  // dPᵀ = v·dOᵀ
      }
      // Columns are queries: the lane's 4 (two per 8-column tile) and their statistics.
      float2 st[2][2];
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int qi = j * kSub + 8 * n + 2 * tq + c;  // in the streamed tile
          st[n][c] = make_float2(-lse_s[qi] * kLog2e, lse_s[kTile + qi]);
        }
      auto stats = [&](int n, int e) { return st[n][e & 1]; };
      auto valid = [&](int n, int e) {
        const int t = qj + 8 * n + 2 * tq + (e & 1);
        return kw + lane / 4 + 8 * (e >> 1) <= t && t < g.T;
      };
      uint32_t p_a[4], ds_a[4];
      if (qj == kw || qj + kSub > g.T)  // the diagonal block (keys after queries), or queries past T
        probabilities_and_ds<true>(p_a, ds_a, s, dp, stats, valid, g.scale_log2);
      else
        probabilities_and_ds<false>(p_a, ds_a, s, dp, stats, valid, g.scale_log2);
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        uint32_t bx[2][2];
        load_b_cols(bx, dos, L::ld, j * kSub, kk * kSub);
        mma_pair(dv, 2 * kk, p_a, bx);  // dV += Pᵀ·dO
        load_b_cols(bx, qs, L::ld, j * kSub, kk * kSub);
        mma_pair(dk, 2 * kk, ds_a, bx);  // dK += dSᵀ·q
      }
    }
  };
  pipeline<L::stages>((g.T - 1) / kTile - static_cast<int>(blockIdx.y) + 1, load, compute);

  float* ow = reinterpret_cast<float*>(smem) + warp * kSub * L::ldo;  // over the tiles, all free now
  uint16_t* drow = dqkv + row0 * g.ld + static_cast<int64_t>(h) * g.D;
  stage_rows(ow, L::ldo, dv, 1.0f, 1.0f);
  __syncwarp();
  store_rows<true>(drow + 2 * g.C, g.ld, ow, L::ldo, kw, 1.0f, g);  // dv = Pᵀ·dO
  __syncwarp();
  stage_rows(ow, L::ldo, dk, 1.0f, 1.0f);
  __syncwarp();
  store_rows<true>(drow + g.C, g.ld, ow, L::ldo, kw, g.scale, g);  // dk = dSᵀ·q/√D
#else
  __trap();
#endif
}
template <int Dp>
__global__ void __launch_bounds__(kThreads)
    attention_backward_kv_mma_kernel(BackwardGroups groups, const float* deltas, TcDims g) {
  backward_kv_mma<Dp>(groups, deltas, g);
}

template <int Dp>
__global__ void __launch_bounds__(kThreads)
    attention_backward_q_mma_kernel(BackwardGroups groups, const float* deltas, TcDims g) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using L = MmaSmem<Dp>;
  constexpr int kK = Dp / kSub;
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  uint16_t* qs = reinterpret_cast<uint16_t*>(smem + L::own0);
  uint16_t* dos = reinterpret_cast<uint16_t*>(smem + L::own1);
  float* lse_s = reinterpret_cast<float*>(smem + L::rows);
  const int warp = threadIdx.x / 32;
  const BackwardBlock blk(groups, deltas, g);
  const int bh = blk.bh, b = blk.b, h = blk.h;
  uint16_t* dqkv = blk.dqkv;
  const uint16_t *dout = blk.dout, *qkv = blk.qkv;
  const float *lse = blk.lse, *delta = blk.delta;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kTile;  // the longest rows first
  const int qw = q0 + warp * kSub;
  const int warp_last = min(qw + kSub, g.T) - 1;
  const int block_last = min(q0 + kTile, g.T) - 1;
  const int64_t row0 = static_cast<int64_t>(b) * g.T;
  const uint16_t* base = qkv + row0 * g.ld + static_cast<int64_t>(h) * g.D;

  zero_shared(smem, L::rows);
  __syncthreads();
  load_rows<Dp>(qs, L::ld, base, g.ld, q0, g);  // land with the first key tile
  load_rows<Dp>(dos, L::ld, dout + row0 * g.C + static_cast<int64_t>(h) * g.D, g.C, q0, g);
  load_query_stats(lse_s, lse_s + kTile, lse, delta, bh, q0, g);
  RowOperands<Dp, (Dp <= 128)> q_rows(qs, L::ld, warp * kSub), do_rows(dos, L::ld, warp * kSub);
  float dq[2 * kK][4] = {};
  float2 row_stats[2];  // (−lse·log₂e, Dᵢ) of the lane's two queries
  const int lane = threadIdx.x % 32, tq = lane % 4;

  auto load = [&](int i, int stage) {
    load_kv_tile<Dp>(reinterpret_cast<uint16_t*>(smem + L::stream + 2 * stage * L::tile), base, i * kTile, g);
  };
  auto compute = [&](int i, int stage) {
    const uint16_t* ks = reinterpret_cast<const uint16_t*>(smem + L::stream + 2 * stage * L::tile);
    const uint16_t* vs = ks + kTile * L::ld;
    const int k0 = i * kTile;
    if (i == 0) {
      q_rows.hold(), do_rows.hold();
      // Rows are queries: the lane's two, fixed for the whole loop.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int qi = warp * kSub + lane / 4 + 8 * r;  // in the block's own tile
        row_stats[r] = make_float2(-lse_s[qi] * kLog2e, lse_s[kTile + qi]);
      }
    }
    if (qw >= g.T) return;
#pragma unroll
    for (int j = 0; j < kBlocksPerTile; ++j) {
      const int kj = k0 + j * kSub;
      if (kj > warp_last) continue;  // every key after every query of the warp
      float s[2][4] = {}, dp[2][4] = {};
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        uint32_t a[4], bk[2][2];
        q_rows.get(a, kk);
        load_b_rows(bk, ks, L::ld, j * kSub, kk * kSub);
        mma_pair(s, 0, a, bk);  // S = q·kᵀ
        do_rows.get(a, kk);
        load_b_rows(bk, vs, L::ld, j * kSub, kk * kSub);
        mma_pair(dp, 0, a, bk);  // dP = dO·vᵀ
      }
      auto stats = [&](int, int e) { return row_stats[e >> 1]; };
      auto valid = [&](int n, int e) {
        const int t = qw + lane / 4 + 8 * (e >> 1);
        return kj + 8 * n + 2 * tq + (e & 1) <= t && t < g.T;
      };
      uint32_t p_a[4], ds_a[4];
      if (kj == qw || qw + kSub > g.T)  // the diagonal block (keys after queries), or queries past T
        probabilities_and_ds<true>(p_a, ds_a, s, dp, stats, valid, g.scale_log2);
      else
        probabilities_and_ds<false>(p_a, ds_a, s, dp, stats, valid, g.scale_log2);
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        uint32_t bk[2][2];
        load_b_cols(bk, ks, L::ld, j * kSub, kk * kSub);
        mma_pair(dq, 2 * kk, ds_a, bk);  // dQ += dS·k
      }
    }
  };
  pipeline<L::stages>(block_last / kTile + 1, load, compute);

  float* ow = reinterpret_cast<float*>(smem) + warp * kSub * L::ldo;  // over the tiles, all free now
  stage_rows(ow, L::ldo, dq, 1.0f, 1.0f);
  __syncwarp();
  store_rows<true>(dqkv + row0 * g.ld + static_cast<int64_t>(h) * g.D, g.ld, ow, L::ldo, qw, g.scale, g);  // dq
#else
  __trap();
#endif
}

// ==== host code ========================================================================================

template <int Dp>
void forward_mma(const ForwardGroups& groups, int64_t count, int64_t B, int64_t T, int64_t NH, const TcDims& g,
                 cudaStream_t stream) {
  const size_t smem = MmaSmem<Dp>::forward_bytes;
  allow_smem(attention_forward_mma_kernel<Dp>, smem);
  KRAKEN_KERNEL(tc_grid(count * B, T, NH), kThreads, smem, stream, attention_forward_mma_kernel<Dp>)(groups, g);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

void delta_mma(float* delta, const BackwardGroups& groups, int64_t count, int64_t B, const TcDims& g,
               cudaStream_t stream) {
  const int64_t rows = B * g.T;
  const size_t row_bytes = sizeof(float) * kDeltaWarps * static_cast<size_t>(g.C / 8);
  if (g.vec == 8 && row_bytes <= 48 * 1024) {
    const int64_t row_blocks = (count * rows + kDeltaWarps - 1) / kDeltaWarps;
    KRAKEN_CHECK(row_blocks <= 0x7fffffffLL, "groups·B·T = ", count * rows);
    KRAKEN_KERNEL(dim3(static_cast<unsigned>(row_blocks)), kDeltaWarps * 32, row_bytes, stream,
                  attention_delta_rows_kernel)(delta, groups, static_cast<int>(count), rows, g);
    KRAKEN_CUDA_LAUNCH_CHECK();
    return;
  }
  const int64_t threads = 256, blocks = (count * rows * g.NH + threads - 1) / threads;
  KRAKEN_CHECK(blocks <= 0x7fffffffLL, "groups·B·T·NH = ", count * rows * g.NH);
  const dim3 grid(static_cast<unsigned>(blocks));
  const int n = static_cast<int>(count);
  if (g.vec == 8)
    KRAKEN_KERNEL(grid, threads, 0, stream, attention_delta_kernel<8>)(delta, groups, n, rows, g);
  else if (g.vec == 2)
    KRAKEN_KERNEL(grid, threads, 0, stream, attention_delta_kernel<2>)(delta, groups, n, rows, g);
  else
    KRAKEN_KERNEL(grid, threads, 0, stream, attention_delta_kernel<1>)(delta, groups, n, rows, g);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

template <typename Kernel>
void launch_backward(Kernel kernel, size_t smem, const BackwardGroups& groups, const float* delta, int64_t count,
                     int64_t B, int64_t T, int64_t NH, const TcDims& g, cudaStream_t stream) {
  allow_smem(kernel, smem);
  KRAKEN_KERNEL(tc_grid(count * B, T, NH), kThreads, smem, stream, kernel)(groups, delta, g);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

template <int Dp>
void backward_mma(const BackwardGroups& groups, int64_t count, int64_t B, int64_t T, int64_t NH, const TcDims& g,
                  cudaStream_t stream) {
  float* delta = static_cast<float*>(cuda_detail::device_scratch(cuda_detail::ScratchSlot::kAttentionDelta,
                                                                 sizeof(float) * count * B * NH * T));
  delta_mma(delta, groups, count, B, g, stream);
  const size_t smem = MmaSmem<Dp>::backward_bytes;
  launch_backward(attention_backward_kv_mma_kernel<Dp>, smem, groups, delta, count, B, T, NH, g, stream);
  launch_backward(attention_backward_q_mma_kernel<Dp>, smem, groups, delta, count, B, T, NH, g, stream);
}

size_t mma_smem_bytes(int D) {
  size_t most = 0;
  with_padded_head<16>(D, [&](auto dp) {
    constexpr int Dp = decltype(dp)::value;
    most = std::max(MmaSmem<Dp>::forward_bytes, MmaSmem<Dp>::backward_bytes);
  });
  return most;
}

}  // namespace

bool attention_bf16_mma_supported(int64_t D) { return head_fits_device(D, mma_smem_bytes); }

void attention_forward_bf16_mma_group_cuda(uint16_t* const* outs, float* const* lses, const uint16_t* const* qkvs,
                                           int64_t count, int64_t B, int64_t T, int64_t C, int64_t NH,
                                           CUstream_st* stream) {
  KRAKEN_CHECK(count >= 0 && count <= kAttentionMaxGroups, "mma attention: ", count, " groups (at most ",
               kAttentionMaxGroups, " per launch)");
  if (count == 0 || B == 0 || T == 0) return;
  ForwardGroups groups{};
  std::vector<const void*> ptrs;
  for (int64_t k = 0; k < count; ++k) {
    groups.out[k] = outs[k], groups.lse[k] = lses[k], groups.qkv[k] = qkvs[k];
    ptrs.push_back(qkvs[k]), ptrs.push_back(outs[k]);
  }
  const TcDims g = make_tc_dims(B, T, C, NH, ptrs, "mma attention", attention_bf16_mma_supported);
  KRAKEN_CHECK(count * B * NH <= 0x7fffffffLL, "groups·B·NH = ", count * B * NH, " exceeds the grid's x limit");
  with_padded_head<16>(g.D, [&](auto dp) { forward_mma<decltype(dp)::value>(groups, count, B, T, NH, g, stream); });
}

void attention_backward_bf16_mma_group_cuda(uint16_t* const* dqkvs, const uint16_t* const* douts,
                                            const uint16_t* const* qkvs, const uint16_t* const* outs,
                                            const float* const* lses, int64_t count, int64_t B, int64_t T, int64_t C,
                                            int64_t NH, CUstream_st* stream) {
  KRAKEN_CHECK(count >= 0 && count <= kAttentionMaxGroups, "mma attention: ", count, " groups (at most ",
               kAttentionMaxGroups, " per launch)");
  if (count == 0 || B == 0 || T == 0) return;
  BackwardGroups groups{};
  std::vector<const void*> ptrs;
  for (int64_t k = 0; k < count; ++k) {
    groups.dqkv[k] = dqkvs[k], groups.dout[k] = douts[k], groups.qkv[k] = qkvs[k], groups.out[k] = outs[k];
    groups.lse[k] = lses[k];
    ptrs.insert(ptrs.end(), {dqkvs[k], douts[k], qkvs[k], outs[k]});
  }
  const TcDims g = make_tc_dims(B, T, C, NH, ptrs, "mma attention", attention_bf16_mma_supported);
  KRAKEN_CHECK(count * B * NH <= 0x7fffffffLL, "groups·B·NH = ", count * B * NH, " exceeds the grid's x limit");
  with_padded_head<16>(g.D, [&](auto dp) {
    backward_mma<decltype(dp)::value>(groups, count, B, T, NH, g, stream);
  });
}

void attention_forward_bf16_mma_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, int64_t C,
                                     int64_t NH, CUstream_st* stream) {
  attention_forward_bf16_mma_group_cuda(&out, &lse, &qkv, 1, B, T, C, NH, stream);
}

void attention_backward_bf16_mma_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                      const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                                      CUstream_st* stream) {
  attention_backward_bf16_mma_group_cuda(&dqkv, &dout, &qkv, &out, &lse, 1, B, T, C, NH, stream);
}

}  // namespace kraken::kernels
