// CUDA causal attention on tensor cores: bf16 operands, f32 accumulation (WMMA 16×16×16 fragments).
//
// The same FlashAttention recurrence as attention.cu (Dao et al. 2022; the warp split of Dao 2023),
// with the four or five products of each tile pair on tensor cores instead of f32 FMAs:
//
// Tiles. A block owns a tile of kTile = 64 rows (queries in the forward and the dq kernel, keys in the
// dk/dv kernel) and is 4 warps; warp w owns rows 16w .. 16w+15 of it, so no row's softmax state or
// gradient is ever shared between warps. The other side streams through shared memory in tiles of 64
// rows. Head columns are padded from D to Dp with zeros in shared memory (a zero column adds nothing
// to q·kᵀ, dO·vᵀ, and the padded output columns are never written), so any D ≤ 256 works: Dp is D
// rounded up to 16 up to 128 and to 32 above (Dp ∈ {16, 32, …, 128, 160, 192, 224, 256}, a template
// parameter; the coarser steps above 128 halve the instantiations for 5% more padding at D = 168,
// the Kraken 4-way preset's heads) and a warp's accumulators (Dp/16 fragments of 16 × 16 per output)
// live in registers. Whether a head size runs here also depends on the device's shared memory per
// block (below); attention_bf16_tc_supported asks the device. bf16 tiles have a pitch of Dp + 8 elements
// (16·odd bytes: the 8 rows of a WMMA/ldmatrix phase hit 8 different 16-byte bank groups; every
// fragment pointer is 32-byte aligned). Global rows are copied in 16-, 4- or 2-byte pieces depending
// on what D and the pointers' alignment allow (D = 42 heads start on 4-byte boundaries only).
//
// Forward, per warp and key tile: S = q·kᵀ (16 × 64, f32 fragments) is stored to the warp's f32
// scratch; each row is then read by two lanes (32 columns each) that apply the causal mask and the
// online softmax in log2 units (m, l in f32, the same in both lanes): m' = max(m, max s),
// α = 2^{m−m'}, p = 2^{s−m'}. p is rounded to bf16 and written over the scratch (P, 16 × 64), α to a
// per-row slot; the O fragments are multiplied by α of their element's row and P·v is accumulated
// into them. The element → row map of an accumulator fragment is unspecified, so each warp learns it
// once: it loads a 16 × 16 tile whose row r holds the value r into an accumulator fragment ("rowid");
// element i of every accumulator fragment then belongs to row rowid.x[i] (all fragments of one type
// share one layout: the elementwise use the CUDA guide documents for fragments). At the end
// out = O / l̃ and lse = m·ln 2 + ln l, where l sums the f32 p and l̃ the bf16-rounded p that
// multiplied v: out is then exactly a convex combination of the v rows with the weights used
// (the rounding perturbs weights, not their sum), and lse is as accurate as the f32 kernel's.
//
// Backward, as attention.cu without float atomics, two kernels writing disjoint columns of dqkv:
//   dk/dv kernel, one block per (key tile, b·h), warp = 16 keys; for every query tile at or after the
//     key tile, per 16-query block: Sᵀ = k·qᵀ and dPᵀ = v·dOᵀ (f32 fragments → scratch), then
//     elementwise Pᵀ = 2^{Sᵀ·scale·log₂e − lse·log₂e} (0 where masked) and dSᵀ = Pᵀ ∘ (dPᵀ − Dᵢ),
//     both rounded to bf16 into the warp's 16 × 64 tiles, then dV += Pᵀ·dO and dK += dSᵀ·q.
//   dq kernel, one block per (query tile, b·h), warp = 16 queries: S = q·kᵀ, dP = dO·vᵀ, dS as above,
//     dQ += dS·k.
// Dᵢ = Σ_d dO[i, d]·O[i, d] and lse are loaded per query tile (Dᵢ recomputed in f32 from dout and out).
// A 16 × 16 block whose keys all follow all of the warp's queries (or lies past T) is skipped: it is
// entirely masked. Every output element has one owner (one lane) summing in a fixed order: results
// are deterministic run to run. dk = scale·dSᵀ·q, dq = scale·dS·k, dv = Pᵀ·dO are added to dqkv in
// f32 and rounded once.
//
// A warp's own 16 rows of the block's tile are the A operand of every ·ᵀ product it computes (q in the
// forward; q and dO for dq; k and v for dk/dv): they are loaded into fragments once and held in
// registers (for dk/dv only up to Dp = 64, for the forward and dq up to 128; above, with the larger
// accumulators, they would spill).
//
// Blocks: grid.x = b·h (up to 2³¹ − 1), grid.y = the 64-row tile, ordered so that the tiles with the
// most work start first (the last query tiles forward and for dq, the first key tiles for dk/dv).
// Shared memory per block, Dp = 64 / 128 / 192: forward 44.3 / 68.3 / 92.3 KiB, dk/dv 64.5 / 96.5 /
// 103.5 KiB, dq 55.5 / 87.5 / 94.5 KiB (above Dp = 128 the backward streams 32-row tiles; the forward
// stages O over its k and v tiles): with the registers (sm_90: Dp = 64 128, 167 and 126 per thread,
// Dp = 192 168, 255 and 168) that is 4, 3 and 4 blocks of 4 warps per SM at Dp = 64 and 2, 2 and 2 at
// Dp = 192 (one each before those two changes). Every Dp ≤ 256 fits the A100's 163 KiB per block.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "kernels/attention.h"
#include "kernels/cuda/attention_tiles.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/launch.h"

namespace kraken::kernels {
namespace {

// ==== device code ======================================================================================

namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

__device__ __forceinline__ const bf16* as_bf16(const uint16_t* p) { return reinterpret_cast<const bf16*>(p); }

constexpr int kBlocks = kTile / kSub;  // 16-wide blocks of a streamed tile
constexpr int kPitchP = kTile + 8;   // bf16 pitch of a warp's 16 × 64 P or dS tile
constexpr int kPitchS = kSub + 4;    // f32 pitch of a warp's 16 × 16 S or dP tile (backward)

// rowid: an accumulator fragment whose element i holds the row (0 .. 15) it stands for. `scratch` is
// a 16 × 16 f32 area of the warp's own (pitch lds), free on entry and again on return.
__device__ void load_row_ids(FragC& rowid, float* scratch, int lds) {
  const int lane = threadIdx.x % 32;
  for (int i = lane; i < kSub * kSub; i += 32) scratch[(i / kSub) * lds + i % kSub] = static_cast<float>(i / kSub);
  __syncwarp();
  wmma::load_matrix_sync(rowid, scratch, lds, wmma::mem_row_major);
  __syncwarp();
}

// Multiplies every element of the fragments by factor[its row].
template <int N>
__device__ __forceinline__ void scale_rows(FragC (&frags)[N], const FragC& rowid, const float* factor) {
  float f[FragC::num_elements];
  for (int i = 0; i < FragC::num_elements; ++i) f[i] = factor[static_cast<int>(rowid.x[i])];
#pragma unroll
  for (int n = 0; n < N; ++n)
    for (int i = 0; i < FragC::num_elements; ++i) frags[n].x[i] *= f[i];
}

// A warp's 16 rows of a bf16 tile (pitch Dp + 8) as the A operand of products with another tile's
// rows transposed (q·kᵀ, dO·vᵀ, k·qᵀ, v·dOᵀ): held in registers for the whole kernel when kHold (the
// rows do not change, and holding them saves reloading them from shared memory for every 16-row block
// of the other side), else loaded when used.
template <int Dp, bool kHold>
struct HeldRows {
  static constexpr int kF = Dp / kSub;
  FragA a[kHold ? kF : 1];
  const uint16_t* rows;
  __device__ __forceinline__ explicit HeldRows(const uint16_t* first_row) : rows(first_row) {
    if (kHold) {
#pragma unroll
      for (int kk = 0; kk < kF; ++kk) wmma::load_matrix_sync(a[kk], as_bf16(rows + kk * kSub), Dp + 8);
    }
  }
  // acc = these rows · (the 16 rows of b_rows)ᵀ over the padded head columns.
  __device__ __forceinline__ void times_transposed(FragC& acc, const uint16_t* b_rows) const {
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < kF; ++kk) {
      FragBCol bt;
      wmma::load_matrix_sync(bt, as_bf16(b_rows + kk * kSub), Dp + 8);
      if (kHold) {
        wmma::mma_sync(acc, a[kHold ? kk : 0], bt, acc);
      } else {
        FragA x;
        wmma::load_matrix_sync(x, as_bf16(rows + kk * kSub), Dp + 8);
        wmma::mma_sync(acc, x, bt, acc);
      }
    }
  }
};

// ---- forward ------------------------------------------------------------------------------------------

template <int Dp>
struct ForwardSmem {
  static constexpr int ld = Dp + 8;       // bf16 pitch of the q, k and v tiles
  static constexpr int lds = kTile + 4;   // f32 pitch of a warp's scratch
  static constexpr int ldo = Dp + 4;      // f32 pitch of a warp's O at the end, over the k and v tiles
  static constexpr size_t tile = sizeof(uint16_t) * kTile * ld;
  // A warp's scratch: S (16 × 64 f32), overwritten by P (16 × 64 bf16, pitch kPitchP). O (16 × Dp
  // f32) is staged over the k and v tiles once the loop is done, so the scratch does not grow with
  // Dp: at Dp = 192 (the Kraken 4-way heads) a block needs 92 KiB and two fit an SM, not one.
  static constexpr size_t scratch = sizeof(float) * kSub * lds;
  static constexpr size_t q = 0, k = q + tile, v = k + tile, s = v + tile, row = s + kWarps * scratch;
  static constexpr size_t bytes = row + sizeof(float) * kWarps * kSub;  // α, then 1/l̃, per row
  static_assert(sizeof(uint16_t) * kSub * kPitchP <= scratch, "P fits in the scratch");
  static_assert(sizeof(float) * kWarps * kSub * ldo <= 2 * tile, "O fits over the k and v tiles");
  static_assert(tile % 128 == 0 && scratch % 32 == 0 && (sizeof(float) * kSub * ldo) % 32 == 0,
                "fragment pointers stay 32-byte aligned");
};

template <int Dp>
__global__ void __launch_bounds__(kThreads)
    attention_forward_tc_kernel(uint16_t* out, float* lse, const uint16_t* qkv, TcDims g) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using L = ForwardSmem<Dp>;
  constexpr int kF = Dp / kSub;  // 16-column fragments of a row block of q or O
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  uint16_t* qs = reinterpret_cast<uint16_t*>(smem + L::q);
  uint16_t* ks = reinterpret_cast<uint16_t*>(smem + L::k);
  uint16_t* vs = reinterpret_cast<uint16_t*>(smem + L::v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* sw = reinterpret_cast<float*>(smem + L::s + warp * L::scratch);
  uint16_t* pw = reinterpret_cast<uint16_t*>(smem + L::s + warp * L::scratch);
  float* roww = reinterpret_cast<float*>(smem + L::row) + warp * kSub;

  const int bh = blockIdx.x, b = bh / g.NH, h = bh % g.NH;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kTile;  // the longest rows first
  const int qw = q0 + warp * kSub;                      // the warp's first query
  const int warp_last = min(qw + kSub, g.T) - 1;        // and its last (< qw when it has none)
  const int block_last = min(q0 + kTile, g.T) - 1;
  const uint16_t* base = qkv + static_cast<int64_t>(b) * g.T * g.ld + static_cast<int64_t>(h) * g.D;

  zero_shared(smem, 3 * L::tile);  // the padding columns D .. Dp of q, k and v stay zero
  __syncthreads();
  copy_rows(qs, L::ld, base, g.ld, q0, g);
  FragC rowid;
  load_row_ids(rowid, sw, L::lds);
  __syncthreads();  // q is in place
  const HeldRows<Dp, (Dp <= 128)> q_rows(qs + warp * kSub * L::ld);
  FragC o[kF];
#pragma unroll
  for (int f = 0; f < kF; ++f) wmma::fill_fragment(o[f], 0.0f);

  // Lane (r, half) keeps the softmax state of row r (both lanes of a row hold the same values) and
  // handles its columns 32·half .. 32·half + 31.
  const int r = lane % kSub, half = lane / kSub, t = qw + r;
  float m = -INFINITY, l = 0.0f, l_rounded = 0.0f;
  for (int k0 = 0; k0 <= block_last; k0 += kTile) {
    __syncthreads();  // the previous k and v tiles are no longer read
    copy_rows(ks, L::ld, base + g.C, g.ld, k0, g);
    copy_rows(vs, L::ld, base + 2 * g.C, g.ld, k0, g);
    __syncthreads();
    // S = q·kᵀ per 16-key block; a block is live when some key precedes some query of the warp.
#pragma unroll
    for (int j = 0; j < kBlocks; ++j) {
      if (qw >= g.T || k0 + j * kSub > warp_last) continue;  // masked whole: its S is never read
      FragC s;
      q_rows.times_transposed(s, ks + j * kSub * L::ld);
      wmma::store_matrix_sync(sw + j * kSub, s, L::lds, wmma::mem_row_major);
    }
    __syncwarp();
    // Online softmax in log2 units. The mask is applied by index, so stale S of skipped blocks is
    // never used.
    float x[32];
    const float4* srow = reinterpret_cast<const float4*>(sw + r * L::lds + half * 32);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const float4 v4 = srow[c];
      x[4 * c] = v4.x, x[4 * c + 1] = v4.y, x[4 * c + 2] = v4.z, x[4 * c + 3] = v4.w;
    }
    float mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const int key = k0 + half * 32 + c;
      x[c] = key <= t && t < g.T ? x[c] * g.scale_log2 : -INFINITY;
      mx = fmaxf(mx, x[c]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 16));
    const float m_new = fmaxf(m, mx);
    // A row that has seen only masked scores (past T, or before its first key) keeps O = 0, l = 0.
    const bool empty = m_new == -INFINITY;
    const float alpha = empty ? 1.0f : exp2f(m - m_new);  // 2^{−∞} = 0 on the row's first tile
    float sum = 0.0f, sum_rounded = 0.0f;
    uint32_t packed[16];
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const float p0 = empty ? 0.0f : exp2f(x[2 * c] - m_new), p1 = empty ? 0.0f : exp2f(x[2 * c + 1] - m_new);
      const uint16_t u0 = f2b(p0), u1 = f2b(p1);
      sum += p0 + p1;
      sum_rounded += b2f(u0) + b2f(u1);
      packed[c] = static_cast<uint32_t>(u0) | static_cast<uint32_t>(u1) << 16;
    }
    sum += __shfl_xor_sync(kFull, sum, 16);
    sum_rounded += __shfl_xor_sync(kFull, sum_rounded, 16);
    m = m_new;
    l = l * alpha + sum;
    l_rounded = l_rounded * alpha + sum_rounded;
    __syncwarp();  // every lane has read its S before P overwrites the scratch
    uint4* prow = reinterpret_cast<uint4*>(pw + r * kPitchP + half * 32);
#pragma unroll
    for (int c = 0; c < 4; ++c)
      prow[c] = make_uint4(packed[4 * c], packed[4 * c + 1], packed[4 * c + 2], packed[4 * c + 3]);
    if (half == 0) roww[r] = alpha;
    __syncwarp();
    // O = O·α + P·v
    scale_rows(o, rowid, roww);
#pragma unroll
    for (int j = 0; j < kBlocks; ++j) {
      if (qw >= g.T || k0 + j * kSub > warp_last) continue;  // P is 0 there
      FragA a;
      wmma::load_matrix_sync(a, as_bf16(pw + j * kSub), kPitchP);
#pragma unroll
      for (int f = 0; f < kF; ++f) {
        FragBRow bv;
        wmma::load_matrix_sync(bv, as_bf16(vs + j * kSub * L::ld + f * kSub), L::ld);
        wmma::mma_sync(o[f], a, bv, o[f]);
      }
    }
  }
  __syncwarp();  // all reads of α and P are done
  if (half == 0) roww[r] = l_rounded > 0.0f ? 1.0f / l_rounded : 0.0f;
  __syncwarp();
  scale_rows(o, rowid, roww);
  __syncthreads();  // every warp is done with the k and v tiles, which take O
  float* ow = reinterpret_cast<float*>(smem + L::k) + warp * kSub * L::ldo;
#pragma unroll
  for (int f = 0; f < kF; ++f) wmma::store_matrix_sync(ow + f * kSub, o[f], L::ldo, wmma::mem_row_major);
  __syncwarp();
  store_rows<false>(out + static_cast<int64_t>(b) * g.T * g.C + static_cast<int64_t>(h) * g.D, g.C, ow, L::ldo, qw,
                    1.0f, g);
  if (half == 0 && t < g.T) lse[static_cast<int64_t>(bh) * g.T + t] = m * kLn2 + logf(l);
#else
  __trap();  // bf16 WMMA needs sm_80
#endif
}

// ---- backward -----------------------------------------------------------------------------------------

// Two bf16 row tiles of the block's own 64 rows (k and v for the dk/dv kernel, q and dO for dq), two of
// the streamed side (q and dO, or k and v), then per warp an f32 16 × 16 tile for S and one for dP and
// kBf16Tiles 16 × 64 bf16 tiles (Pᵀ and dSᵀ for the dk/dv kernel, dS for the dq kernel), then lse and
// Dᵢ of the query tile. The streamed tiles are 64 rows, or 32 above Dp = 128: at Dp = 192 (the Kraken
// 4-way heads) that takes a block from 128.5 to 103 KiB (dk/dv) and from 119.5 to 94 KiB (dq), so two
// blocks fit an SM, not one. The results are staged over all four tiles once the loop is done.
template <int Dp, int kBf16Tiles>
struct BackwardSmem {
  static constexpr int ld = Dp + 8;   // bf16 pitch of the row tiles
  static constexpr int ldo = Dp + 4;  // f32 pitch of a warp's result (dk, dv or dq), over the tiles
  static constexpr int stream = Dp > 128 ? kTile / 2 : kTile;  // rows of a streamed tile
  static constexpr size_t tile = sizeof(uint16_t) * kTile * ld;
  static constexpr size_t stream_tile = sizeof(uint16_t) * stream * ld;
  static constexpr size_t f32_tile = sizeof(float) * kSub * kPitchS;       // S or dP, 16 × 16
  static constexpr size_t bf16_tile = sizeof(uint16_t) * kSub * kPitchP;  // P or dS, 16 × 64
  static constexpr size_t per_warp = 2 * f32_tile + kBf16Tiles * bf16_tile;
  static constexpr size_t own0 = 0, own1 = tile, stream0 = 2 * tile, stream1 = stream0 + stream_tile;
  static constexpr size_t tiles = stream1 + stream_tile, warps = tiles, rows = warps + kWarps * per_warp;
  static constexpr size_t bytes = rows + sizeof(float) * 2 * kTile;  // lse (log2 units) and Dᵢ per query
  static_assert(sizeof(float) * kWarps * kSub * ldo <= tiles, "the results fit over the tiles");
  static_assert(stream % kSub == 0 && stream_tile % 128 == 0, "whole 16-row blocks, aligned tiles");
  static_assert(tile % 128 == 0 && f32_tile % 32 == 0 && bf16_tile % 32 == 0, "32-byte aligned fragments");
};

// A 16 × 16 block of scores s and dP (f32, pitch kPitchS) → P and dS rounded to bf16 in the warp's
// 16 × 64 tiles at column `col` (pitch kPitchP; p_out may be null). Lane (r, half) does row r,
// columns 8·half .. 8·half + 7. The block's element (i, j) pairs query t(i, j) with key s(i, j); for the
// dk/dv kernel rows are keys (transposed: row_is_key), for the dq kernel rows are queries.
// row_first and col_first are the first key / query of the block's rows and columns; lse2 and delta
// are indexed by the query's place in the query tile: query − q_tile0.
__device__ __forceinline__ void probabilities_and_ds(uint16_t* p_out, uint16_t* ds_out, int col, const float* sw,
                                                     const float* dpw, const float* lse2, const float* delta,
                                                     bool row_is_key, int row_first, int col_first, int q_tile0,
                                                     const TcDims& g) {
  const int lane = threadIdx.x % 32, r = lane % kSub, half = lane / kSub;
  float s8[8], dp8[8];  // two 16-byte reads each: lanes 0-7 (rows 0-7) hit distinct bank groups
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const float4 a = reinterpret_cast<const float4*>(sw + r * kPitchS + half * 8)[c];
    const float4 b = reinterpret_cast<const float4*>(dpw + r * kPitchS + half * 8)[c];
    s8[4 * c] = a.x, s8[4 * c + 1] = a.y, s8[4 * c + 2] = a.z, s8[4 * c + 3] = a.w;
    dp8[4 * c] = b.x, dp8[4 * c + 1] = b.y, dp8[4 * c + 2] = b.z, dp8[4 * c + 3] = b.w;
  }
  uint32_t pp[4], dd[4];
#pragma unroll
  for (int c = 0; c < 8; c += 2) {
    uint32_t pu[2], du[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int cc = half * 8 + c + e;
      const int key = row_is_key ? row_first + r : col_first + cc;
      const int t = row_is_key ? col_first + cc : row_first + r;
      const bool valid = key <= t && t < g.T;
      const int qi = t - q_tile0;
      const float p = valid ? exp2f(s8[c + e] * g.scale_log2 - lse2[qi]) : 0.0f;
      const float ds = valid ? p * (dp8[c + e] - delta[qi]) : 0.0f;
      pu[e] = f2b(p);
      du[e] = f2b(ds);
    }
    pp[c / 2] = pu[0] | pu[1] << 16;
    dd[c / 2] = du[0] | du[1] << 16;
  }
  if (p_out) *reinterpret_cast<uint4*>(p_out + r * kPitchP + col + half * 8) = make_uint4(pp[0], pp[1], pp[2], pp[3]);
  *reinterpret_cast<uint4*>(ds_out + r * kPitchP + col + half * 8) = make_uint4(dd[0], dd[1], dd[2], dd[3]);
}

// acc[f] += x·tile[row .. row + 15, 16f .. 16f + 15] for x a 16 × 16 bf16 block (pitch kPitchP).
template <int Dp>
__device__ __forceinline__ void accumulate_block(FragC (&acc)[Dp / kSub], const uint16_t* x, const uint16_t* tile,
                                                 int row) {
  constexpr int ld = Dp + 8;
  FragA a;
  wmma::load_matrix_sync(a, as_bf16(x), kPitchP);
#pragma unroll
  for (int f = 0; f < Dp / kSub; ++f) {
    FragBRow bt;
    wmma::load_matrix_sync(bt, as_bf16(tile + row * ld + f * kSub), ld);
    wmma::mma_sync(acc[f], a, bt, acc[f]);
  }
}

template <int Dp>
__global__ void __launch_bounds__(kThreads)
    attention_backward_kv_tc_kernel(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                    const float* lse, TcDims g) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using L = BackwardSmem<Dp, 2>;
  constexpr int kF = Dp / kSub;
  constexpr bool kHold = Dp <= 64;  // k and v rows in registers (above 64 they would spill)
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  constexpr int kStreamBlocks = L::stream / kSub;  // 16-query blocks of a streamed tile
  uint16_t* ks = reinterpret_cast<uint16_t*>(smem + L::own0);
  uint16_t* vs = reinterpret_cast<uint16_t*>(smem + L::own1);
  uint16_t* qs = reinterpret_cast<uint16_t*>(smem + L::stream0);
  uint16_t* dos = reinterpret_cast<uint16_t*>(smem + L::stream1);
  const int warp = threadIdx.x / 32;
  unsigned char* mine = smem + L::warps + warp * L::per_warp;
  float* sw = reinterpret_cast<float*>(mine);
  float* dpw = reinterpret_cast<float*>(mine + L::f32_tile);
  uint16_t* pw = reinterpret_cast<uint16_t*>(mine + 2 * L::f32_tile);
  uint16_t* dsw = reinterpret_cast<uint16_t*>(mine + 2 * L::f32_tile + L::bf16_tile);
  float* lse_s = reinterpret_cast<float*>(smem + L::rows);
  float* delta_s = lse_s + kTile;

  const int bh = blockIdx.x, b = bh / g.NH, h = bh % g.NH;
  const int k0 = blockIdx.y * kTile;  // the first key tiles have the most query tiles: first
  const int kw = k0 + warp * kSub;    // the warp's first key
  const int64_t row0 = static_cast<int64_t>(b) * g.T;
  const uint16_t* base = qkv + row0 * g.ld + static_cast<int64_t>(h) * g.D;

  zero_shared(smem, L::tiles);
  __syncthreads();
  copy_rows(ks, L::ld, base + g.C, g.ld, k0, g);
  copy_rows(vs, L::ld, base + 2 * g.C, g.ld, k0, g);
  __syncthreads();  // k and v are in place
  const HeldRows<Dp, kHold> k_rows(ks + warp * kSub * L::ld), v_rows(vs + warp * kSub * L::ld);
  FragC dk[kF], dv[kF];
#pragma unroll
  for (int f = 0; f < kF; ++f) wmma::fill_fragment(dk[f], 0.0f), wmma::fill_fragment(dv[f], 0.0f);

  for (int q0 = k0; q0 < g.T; q0 += L::stream) {  // the query tiles that see this key tile
    __syncthreads();  // the previous q, dO, lse and Dᵢ are no longer read
    copy_rows(qs, L::ld, base, g.ld, q0, g, L::stream);
    copy_rows(dos, L::ld, dout + row0 * g.C + static_cast<int64_t>(h) * g.D, g.C, q0, g, L::stream);
    load_query_rows<L::stream>(lse_s, delta_s, dout, out, lse, row0, bh, h, q0, g);
    __syncthreads();
    // Per 16-query block: live when some query of it follows some key of the warp, and it starts
    // before T (keys past T have no gradient to keep: their rows are never written).
#pragma unroll
    for (int j = 0; j < kStreamBlocks; ++j) {
      const int qj = q0 + j * kSub;
      if (qj >= g.T || qj + kSub - 1 < kw) continue;
      FragC s, dp;
      k_rows.times_transposed(s, qs + j * kSub * L::ld);    // Sᵀ = k·qᵀ
      v_rows.times_transposed(dp, dos + j * kSub * L::ld);  // dPᵀ = v·dOᵀ
      wmma::store_matrix_sync(sw, s, kPitchS, wmma::mem_row_major);
      wmma::store_matrix_sync(dpw, dp, kPitchS, wmma::mem_row_major);
      __syncwarp();
      probabilities_and_ds(pw, dsw, j * kSub, sw, dpw, lse_s, delta_s, true, kw, qj, q0, g);
      __syncwarp();  // S and dP are read before the next block's stores; P and dS written
    }
#pragma unroll
    for (int j = 0; j < kStreamBlocks; ++j) {
      const int qj = q0 + j * kSub;
      if (qj >= g.T || qj + kSub - 1 < kw) continue;
      accumulate_block<Dp>(dv, pw + j * kSub, dos, j * kSub);  // dV += Pᵀ·dO
      accumulate_block<Dp>(dk, dsw + j * kSub, qs, j * kSub);  // dK += dSᵀ·q
    }
  }
  __syncthreads();  // no tile is read any more: they take the results
  float* ow = reinterpret_cast<float*>(smem) + warp * kSub * L::ldo;
  uint16_t* drow = dqkv + row0 * g.ld + static_cast<int64_t>(h) * g.D;
#pragma unroll
  for (int f = 0; f < kF; ++f) wmma::store_matrix_sync(ow + f * kSub, dv[f], L::ldo, wmma::mem_row_major);
  __syncwarp();
  store_rows<true>(drow + 2 * g.C, g.ld, ow, L::ldo, kw, 1.0f, g);  // dv = Pᵀ·dO
  __syncwarp();
#pragma unroll
  for (int f = 0; f < kF; ++f) wmma::store_matrix_sync(ow + f * kSub, dk[f], L::ldo, wmma::mem_row_major);
  __syncwarp();
  store_rows<true>(drow + g.C, g.ld, ow, L::ldo, kw, g.scale, g);  // dk = dSᵀ·q/√D
#else
  __trap();
#endif
}

template <int Dp>
__global__ void __launch_bounds__(kThreads)
    attention_backward_q_tc_kernel(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                   const float* lse, TcDims g) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using L = BackwardSmem<Dp, 1>;
  constexpr int kF = Dp / kSub;
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  constexpr int kStreamBlocks = L::stream / kSub;  // 16-key blocks of a streamed tile
  uint16_t* qs = reinterpret_cast<uint16_t*>(smem + L::own0);
  uint16_t* dos = reinterpret_cast<uint16_t*>(smem + L::own1);
  uint16_t* ks = reinterpret_cast<uint16_t*>(smem + L::stream0);
  uint16_t* vs = reinterpret_cast<uint16_t*>(smem + L::stream1);
  const int warp = threadIdx.x / 32;
  unsigned char* mine = smem + L::warps + warp * L::per_warp;
  float* sw = reinterpret_cast<float*>(mine);
  float* dpw = reinterpret_cast<float*>(mine + L::f32_tile);
  uint16_t* dsw = reinterpret_cast<uint16_t*>(mine + 2 * L::f32_tile);
  float* lse_s = reinterpret_cast<float*>(smem + L::rows);
  float* delta_s = lse_s + kTile;

  const int bh = blockIdx.x, b = bh / g.NH, h = bh % g.NH;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kTile;  // the longest rows first
  const int qw = q0 + warp * kSub;
  const int warp_last = min(qw + kSub, g.T) - 1;
  const int block_last = min(q0 + kTile, g.T) - 1;
  const int64_t row0 = static_cast<int64_t>(b) * g.T;
  const uint16_t* base = qkv + row0 * g.ld + static_cast<int64_t>(h) * g.D;

  zero_shared(smem, L::tiles);
  __syncthreads();
  copy_rows(qs, L::ld, base, g.ld, q0, g);
  copy_rows(dos, L::ld, dout + row0 * g.C + static_cast<int64_t>(h) * g.D, g.C, q0, g);
  load_query_rows(lse_s, delta_s, dout, out, lse, row0, bh, h, q0, g);
  __syncthreads();  // q, dO, lse and Dᵢ are in place
  const HeldRows<Dp, (Dp <= 128)> q_rows(qs + warp * kSub * L::ld), do_rows(dos + warp * kSub * L::ld);
  FragC dq[kF];
#pragma unroll
  for (int f = 0; f < kF; ++f) wmma::fill_fragment(dq[f], 0.0f);

  for (int k0 = 0; k0 <= block_last; k0 += L::stream) {
    __syncthreads();  // the previous k and v are no longer read
    copy_rows(ks, L::ld, base + g.C, g.ld, k0, g, L::stream);
    copy_rows(vs, L::ld, base + 2 * g.C, g.ld, k0, g, L::stream);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kStreamBlocks; ++j) {
      const int kj = k0 + j * kSub;
      if (qw >= g.T || kj > warp_last) continue;  // masked whole
      FragC s, dp;
      q_rows.times_transposed(s, ks + j * kSub * L::ld);    // S = q·kᵀ
      do_rows.times_transposed(dp, vs + j * kSub * L::ld);  // dP = dO·vᵀ
      wmma::store_matrix_sync(sw, s, kPitchS, wmma::mem_row_major);
      wmma::store_matrix_sync(dpw, dp, kPitchS, wmma::mem_row_major);
      __syncwarp();
      probabilities_and_ds(nullptr, dsw, j * kSub, sw, dpw, lse_s, delta_s, false, qw, kj, q0, g);
      __syncwarp();
    }
#pragma unroll
    for (int j = 0; j < kStreamBlocks; ++j) {
      const int kj = k0 + j * kSub;
      if (qw >= g.T || kj > warp_last) continue;
      accumulate_block<Dp>(dq, dsw + j * kSub, ks, j * kSub);  // dQ += dS·k
    }
  }
  __syncthreads();  // no tile is read any more: they take the results
  float* ow = reinterpret_cast<float*>(smem) + warp * kSub * L::ldo;
#pragma unroll
  for (int f = 0; f < kF; ++f) wmma::store_matrix_sync(ow + f * kSub, dq[f], L::ldo, wmma::mem_row_major);
  __syncwarp();
  uint16_t* drow = dqkv + row0 * g.ld + static_cast<int64_t>(h) * g.D;
  store_rows<true>(drow, g.ld, ow, L::ldo, qw, g.scale, g);  // dq = dS·k/√D
#else
  __trap();
#endif
}

// ==== host code ========================================================================================


template <int Dp>
void forward_tc(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, int64_t NH, const TcDims& g,
                cudaStream_t stream) {
  const size_t smem = ForwardSmem<Dp>::bytes;
  allow_smem(attention_forward_tc_kernel<Dp>, smem);
  KRAKEN_KERNEL(tc_grid(B, T, NH), kThreads, smem, stream, attention_forward_tc_kernel<Dp>)(out, lse, qkv, g);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

template <int Dp>
void backward_tc(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out, const float* lse,
                 int64_t B, int64_t T, int64_t NH, const TcDims& g, cudaStream_t stream) {
  const size_t smem_kv = BackwardSmem<Dp, 2>::bytes, smem_q = BackwardSmem<Dp, 1>::bytes;
  allow_smem(attention_backward_kv_tc_kernel<Dp>, smem_kv);
  KRAKEN_KERNEL(tc_grid(B, T, NH), kThreads, smem_kv, stream, attention_backward_kv_tc_kernel<Dp>)
  (dqkv, dout, qkv, out, lse, g);
  KRAKEN_CUDA_LAUNCH_CHECK();
  allow_smem(attention_backward_q_tc_kernel<Dp>, smem_q);
  KRAKEN_KERNEL(tc_grid(B, T, NH), kThreads, smem_q, stream, attention_backward_q_tc_kernel<Dp>)
  (dqkv, dout, qkv, out, lse, g);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

size_t tc_smem_bytes(int D) {
  size_t most = 0;
  with_padded_head<32>(D, [&](auto dp) {
    constexpr int Dp = decltype(dp)::value;
    most = std::max({ForwardSmem<Dp>::bytes, BackwardSmem<Dp, 2>::bytes, BackwardSmem<Dp, 1>::bytes});
  });
  return most;
}

}  // namespace

bool attention_bf16_tc_supported(int64_t D) { return head_fits_device(D, tc_smem_bytes); }

void attention_forward_bf16_tc_cuda(uint16_t* out, float* lse, const uint16_t* qkv, int64_t B, int64_t T, int64_t C,
                                    int64_t NH, CUstream_st* stream) {
  if (B == 0 || T == 0) return;
  const TcDims g = make_tc_dims(B, T, C, NH, {qkv, out}, "tensor-core attention", attention_bf16_tc_supported);
  with_padded_head<32>(g.D, [&](auto dp) { forward_tc<decltype(dp)::value>(out, lse, qkv, B, T, NH, g, stream); });
}

void attention_backward_bf16_tc_cuda(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                                     const float* lse, int64_t B, int64_t T, int64_t C, int64_t NH,
                                     CUstream_st* stream) {
  if (B == 0 || T == 0) return;
  const TcDims g = make_tc_dims(B, T, C, NH, {dqkv, dout, qkv, out}, "tensor-core attention",
                                    attention_bf16_tc_supported);
  with_padded_head<32>(g.D, [&](auto dp) {
    backward_tc<decltype(dp)::value>(dqkv, dout, qkv, out, lse, B, T, NH, g, stream);
  });
}

}  // namespace kraken::kernels
