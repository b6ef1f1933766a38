// CPU causal attention: FlashAttention-style tiling with a register-blocked micro-kernel.
//
// Every product here (q·kᵀ, P·v, dO·vᵀ, Pᵀ·dO, dSᵀ·q, dS·k) has one side of 64 rows and a short inner
// dimension. One small kernel does them all: C (mr, N) (+)= A (mr, K)·B (K, N), with A read through
// two strides (so Pᵀ needs no transpose), B row-major with N a multiple of 16, and an mr × N block of
// C held in registers while k runs. Why not the BLAS per tile: measured on one core of the 2-core
// AVX-512 machine, single-threaded OpenBLAS (SkylakeX kernels) does 64×64×64 at ~110 GFLOP/s against
// ~100 here, but 64×256×64 and 64×1024×64 at ~92 and ~72 against ~101 and ~95; it cannot stop a strip
// at the causal diagonal or read Pᵀ in place; and a multi-threaded BLAS inside our OpenMP region would
// oversubscribe the cores, while making it single-threaded is a process-wide setting. The operands it cannot read in place (kᵀ and vᵀ, and any head whose D is
// not a multiple of 16) are packed per head into zero-padded buffers; packing is O(T·D) against the
// O(T²·D) products.
//
// Forward, per (b, h, query tile of kTile rows), with the tile's whole causal row in a scratch:
//   S = q·kᵀ (only up to each strip's last key), P = exp(S/√D − m) with m the row maximum,
//   lse = m + log Σ P, out = (P·v) / Σ P.
// Backward, per (b, h), key blocks j outermost and query blocks i ≥ j inside (FlashAttention-2, Dao
// 2023, Alg. 2): P = exp(S/√D − lse), dV_j += Pᵀ·dO_i, dP = dO_i·v_jᵀ, dS = P ∘ (dP − Dᵢ),
// dK_j += dSᵀ·q_i, dQ_i += dS·k_j, with the 1/√D of S applied once when dq and dk are written out.
//
// Determinism: forward items (b, h, tile) and backward items (b, h) each belong to one thread and run
// in a fixed order; no reduction crosses threads. So the results do not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "kernels/attention.h"
#include "kernels/error.h"

namespace kraken::kernels {
namespace {

// ---- vectors of 16 floats (one AVX-512 register; GCC/Clang lower it to narrower units elsewhere) ----
// Without AVX-512 the compiler warns that passing such vectors changes the ABI; these helpers are
// internal and inlined, so no ABI is involved. (Tuned for AVX-512; elsewhere correct but slower.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, const Vec& v) { std::memcpy(p, &v, sizeof v); }
inline Vec splat(float x) { return Vec{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
inline IVec lane_index() { return IVec{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }
inline Vec vmax(Vec a, Vec b) { return a > b ? a : b; }
inline float hsum(Vec v) {  // fixed order: the result is the same wherever it runs
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline float hmax(Vec v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

// exp(x) = 2ⁿ·exp(r), n = round(x·log₂e), r = x − n·ln 2 in two parts (Cody–Waite) so r is exact to
// float precision; exp(r) on |r| ≤ ln2/2 is 1 + r + r²·p(r) with Cephes expf's minimax coefficients
// (about 1 ulp). Below −87.3 the result is 0 (it would underflow to a denormal anyway).
inline Vec vexp(Vec x) {
  const Vec lo = splat(-87.3f), hi = splat(88.3f);
  const Vec xc = x < lo ? lo : (x > hi ? hi : x);
  const Vec magic = splat(12582912.0f);  // 1.5·2²³: adding it rounds to an integer (round to nearest)
  const Vec n = (xc * 1.44269504088896341f + magic) - magic;
  const Vec r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  Vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec er = p * (r * r) + r + 1.0f;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  const Vec y = er * two_n;
  return x < lo ? Vec{} : y;
}

// ---- the micro-kernel -----------------------------------------------------------------------------
// C[m, n] (+)= Σ_k A(m, k)·B[k, n] for m < MR, n < 16·NV, where A(m, k) = a[m·a_rs + k·a_cs].
// MR·NV accumulators + NV loads of B + one broadcast of A fit the 32 vector registers.
template <int MR, int NV>
void micro_kernel(float* c, int64_t ldc, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
                  int64_t K, bool accumulate) {
  Vec acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = accumulate ? load(c + m * ldc + v * kLanes) : Vec{};
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(bk + v * kLanes);
    const float* ak = a + k * a_cs;
    for (int m = 0; m < MR; ++m) {
      const Vec av = splat(ak[m * a_rs]);
      for (int v = 0; v < NV; ++v) acc[m][v] += av * bv[v];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) store(c + m * ldc + v * kLanes, acc[m][v]);
}

constexpr int kMr = 6;  // rows per register block
constexpr int kNv = 4;  // 16-float vectors per register block: 6 × 64 floats of C

using MicroFn = void (*)(float*, int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t, bool);

template <int MR>
MicroFn pick_nv(int nv) {
  switch (nv) {
    case 1: return micro_kernel<MR, 1>;
    case 2: return micro_kernel<MR, 2>;
    case 3: return micro_kernel<MR, 3>;
    default: return micro_kernel<MR, 4>;
  }
}
MicroFn pick_kernel(int mr, int nv) {
  switch (mr) {
    case 1: return pick_nv<1>(nv);
    case 2: return pick_nv<2>(nv);
    case 3: return pick_nv<3>(nv);
    case 4: return pick_nv<4>(nv);
    case 5: return pick_nv<5>(nv);
    default: return pick_nv<6>(nv);
  }
}

// One strip of mr ≤ kMr rows: C (mr, N) (+)= A (mr, K)·B (K, N), N a multiple of 16.
void gemm_strip(float* c, int64_t ldc, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
                int mr, int64_t N, int64_t K, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += kNv * kLanes) {
    const int nv = static_cast<int>(std::min<int64_t>(kNv, (N - n0) / kLanes));
    pick_kernel(mr, nv)(c + n0, ldc, a, a_rs, a_cs, b + n0, ldb, K, accumulate);
  }
}

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// Below about a million multiply-adds a parallel region costs more than it saves (and on a busy machine
// a thread waiting for a descheduled partner costs a whole time slice), so tiny calls run on one thread.
bool worth_threads(int64_t B, int64_t T, int64_t C) { return B * T * T * C >= (int64_t{1} << 20); }

// A float buffer aligned to a cache line, uninitialised.
struct Buffer {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float[], Free> data;
  explicit Buffer(int64_t n) {
    const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * 4, 64));
    data.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    KRAKEN_CHECK(data != nullptr, "attention scratch of ", bytes, " bytes");
  }
  float* get() const { return data.get(); }
};

constexpr int64_t kTile = 64;  // query rows per tile, and keys per block in backward

// The sizes of one call and the packed-buffer geometry that follows from them.
struct Geometry {
  int64_t B, T, C, NH, D;
  int64_t Dp;   // D rounded up to 16: row length of packed (T, D) buffers
  int64_t Tp;   // T rounded up to 16: row length of packed (D, T) buffers
  int64_t ld;   // 3C: row stride of qkv
  float scale;  // 1/√D
  Geometry(int64_t B_, int64_t T_, int64_t C_, int64_t NH_)
      : B(B_), T(T_), C(C_), NH(NH_), D(C_ / NH_), Dp(round_up(C_ / NH_, kLanes)), Tp(round_up(T_, kLanes)),
        ld(3 * C_), scale(1.0f / std::sqrt(static_cast<float>(C_ / NH_))) {}
  // Column `h·D` of part (0 q, 1 k, 2 v) in row (b, t) of qkv.
  int64_t qkv_at(int64_t b, int64_t t, int part, int64_t h) const { return (b * T + t) * ld + part * C + h * D; }
};

// dst (T, Dp) = rows of one head's D columns, zero-padded to Dp; src rows are `stride` apart.
void pack_rows(float* dst, const float* src, int64_t stride, const Geometry& g) {
  for (int64_t t = 0; t < g.T; ++t) {
    std::memcpy(dst + t * g.Dp, src + t * stride, sizeof(float) * g.D);
    std::fill(dst + t * g.Dp + g.D, dst + (t + 1) * g.Dp, 0.0f);
  }
}

// Rows of one head's (T, D) block as the micro-kernel reads them: in place when D is a whole number of
// vectors (no copy), else packed into `scratch` with zero padding.
struct Rows {
  const float* data;
  int64_t ld;
};
Rows rows_of(const float* src, int64_t stride, float* scratch, const Geometry& g) {
  if (g.D == g.Dp) return {src, stride};
  pack_rows(scratch, src, stride, g);
  return {scratch, g.Dp};
}

#if defined(__GNUC__) && !defined(__clang__)
// One butterfly stage of a 16×16 transpose: swaps the off-diagonal K×K blocks of every 2K×2K block.
// After the stages K = 8, 4, 2, 1, row i holds what was column i.
template <int K>
inline void transpose_stage(Vec (&r)[kLanes]) {
  IVec lo, hi;
  for (int j = 0; j < kLanes; ++j) {
    lo[j] = (j & K) ? kLanes + j - K : j;
    hi[j] = (j & K) ? kLanes + j : j + K;
  }
  for (int i = 0; i < kLanes; ++i)
    if (!(i & K)) {
      const Vec a = r[i], b = r[i + K];
      r[i] = __builtin_shuffle(a, b, lo);
      r[i + K] = __builtin_shuffle(a, b, hi);
    }
}
#endif

// dst (D, Tp) = the transpose of one head's (T, D) block, zero-padded to Tp columns. Whole 16×16 blocks
// go through registers; the edges (T or D not a multiple of 16) element by element.
void pack_transposed(float* dst, const float* src, int64_t stride, const Geometry& g) {
  for (int64_t d = 0; d < g.D; ++d) std::fill(dst + d * g.Tp + g.T, dst + (d + 1) * g.Tp, 0.0f);
  int64_t t_done = 0, d_done = 0;
#if defined(__GNUC__) && !defined(__clang__)
  t_done = g.T / kLanes * kLanes;
  d_done = g.D / kLanes * kLanes;
  for (int64_t t0 = 0; t0 < t_done; t0 += kLanes)
    for (int64_t d0 = 0; d0 < d_done; d0 += kLanes) {
      Vec r[kLanes];
      for (int i = 0; i < kLanes; ++i) r[i] = load(src + (t0 + i) * stride + d0);
      transpose_stage<8>(r);
      transpose_stage<4>(r);
      transpose_stage<2>(r);
      transpose_stage<1>(r);
      for (int i = 0; i < kLanes; ++i) store(dst + (d0 + i) * g.Tp + t0, r[i]);
    }
#endif
  for (int64_t t = 0; t < g.T; ++t)
    for (int64_t d = t < t_done ? d_done : 0; d < g.D; ++d) dst[d * g.Tp + t] = src[t * stride + d];
}

// ---- forward ----------------------------------------------------------------------------------------
// One query tile [t0, t0 + rows) of head (b, h). s: (kTile, Tp) scratch; o: (kTile, Dp) scratch.
void forward_tile(float* out, float* lse, const float* qkv, const float* kt, const Rows& v, int64_t b, int64_t h,
                  int64_t t0, const Geometry& g, float* s, float* o) {
  const int64_t rows = std::min(kTile, g.T - t0);
  const int64_t kend = t0 + rows;  // keys the tile's last row sees
  const float* q = qkv + g.qkv_at(b, t0, 0, h);
  // S = q·kᵀ, each strip only up to its last row's key (rounded up to whole vectors).
  for (int64_t r0 = 0; r0 < rows; r0 += kMr) {
    const int mr = static_cast<int>(std::min<int64_t>(kMr, rows - r0));
    const int64_t n = round_up(t0 + r0 + mr, kLanes);
    gemm_strip(s + r0 * g.Tp, g.Tp, q + r0 * g.ld, g.ld, 1, kt, g.Tp, mr, n, g.D, false);
  }
  // Row softmax over keys 0..t, unnormalised: P = exp(S/√D − m), Σ P kept for the end.
  float inv_sum[kTile];
  float* lse_row = lse + (b * g.NH + h) * g.T;
  const IVec lanes = lane_index();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r, n = t + 1;
    float* srow = s + r * g.Tp;
    Vec mv = splat(-INFINITY);
    // The scaled scores are stored before m is subtracted, so the row's maximum gives exp(0) = 1
    // exactly (a fused s·scale − m would leave the product's rounding error behind).
    for (int64_t j = 0; j < n; j += kLanes) {
      const Vec x = load(srow + j) * g.scale;
      store(srow + j, x);
      mv = vmax(mv, (lanes + static_cast<int32_t>(j)) < static_cast<int32_t>(n) ? x : splat(-INFINITY));
    }
    const float m = hmax(mv);
    Vec sv = Vec{};
    for (int64_t j = 0; j < n; j += kLanes) {
      Vec p = vexp(load(srow + j) - m);
      p = (lanes + static_cast<int32_t>(j)) < static_cast<int32_t>(n) ? p : Vec{};
      store(srow + j, p);
      sv += p;
    }
    // Keys after t up to the tile's end take part in P·v below; they must be exactly zero.
    std::fill(srow + round_up(n, kLanes), srow + std::max(round_up(n, kLanes), kend), 0.0f);
    const float sum = hsum(sv);
    lse_row[t] = m + std::log(sum);
    inv_sum[r] = 1.0f / sum;
  }
  // out = P·v / Σ P, each strip only over the keys its rows see.
  for (int64_t r0 = 0; r0 < rows; r0 += kMr) {
    const int mr = static_cast<int>(std::min<int64_t>(kMr, rows - r0));
    gemm_strip(o + r0 * g.Dp, g.Dp, s + r0 * g.Tp, g.Tp, 1, v.data, v.ld, mr, g.Dp, t0 + r0 + mr, false);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = out + (b * g.T + t0 + r) * g.C + h * g.D;
    const float* src = o + r * g.Dp;
    for (int64_t d = 0; d < g.D; ++d) dst[d] = src[d] * inv_sum[r];
  }
}

// ---- backward ---------------------------------------------------------------------------------------
// Per-thread scratch for one head's backward.
struct HeadScratch {
  Buffer q, k, dout, kt, vt, dq, delta, p, ds, dk, dv;
  explicit HeadScratch(const Geometry& g)  // q, k and dout are only copied when rows_of must pack them
      : q(g.D == g.Dp ? 0 : g.T * g.Dp), k(g.D == g.Dp ? 0 : g.T * g.Dp), dout(g.D == g.Dp ? 0 : g.T * g.Dp),
        kt(g.D * g.Tp), vt(g.D * g.Tp), dq(g.Tp * g.Dp),
        delta(g.Tp), p(kTile * kTile), ds(kTile * kTile), dk(kTile * g.Dp), dv(kTile * g.Dp) {}
};

// The FlashAttention-2 backward of head (b, h), key blocks outermost.
void backward_head(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse, int64_t b,
                   int64_t h, const Geometry& g, HeadScratch& w) {
  const int64_t D = g.D, Dp = g.Dp, T = g.T;
  float *kt = w.kt.get(), *vt = w.vt.get(), *dq = w.dq.get(), *delta = w.delta.get();
  float *P = w.p.get(), *dS = w.ds.get(), *dk = w.dk.get(), *dv = w.dv.get();
  const Rows q = rows_of(qkv + g.qkv_at(b, 0, 0, h), g.ld, w.q.get(), g);
  const Rows k = rows_of(qkv + g.qkv_at(b, 0, 1, h), g.ld, w.k.get(), g);
  const Rows dO = rows_of(dout + b * T * g.C + h * D, g.C, w.dout.get(), g);
  pack_transposed(kt, qkv + g.qkv_at(b, 0, 1, h), g.ld, g);
  pack_transposed(vt, qkv + g.qkv_at(b, 0, 2, h), g.ld, g);
  std::fill(dq, dq + T * Dp, 0.0f);
  // Dᵢ = Σ_d dO[i, d]·O[i, d] = Σ_j P[i, j]·dP[i, j]: the softmax Jacobian's correction term.
  for (int64_t t = 0; t < T; ++t) {
    const float* orow = out + (b * T + t) * g.C + h * D;
    const float* drow = dO.data + t * dO.ld;
    Vec acc = Vec{};
    int64_t d = 0;
    for (; d + kLanes <= D; d += kLanes) acc += load(drow + d) * load(orow + d);
    float tail = 0.0f;
    for (; d < D; ++d) tail += drow[d] * orow[d];
    delta[t] = hsum(acc) + tail;
  }
  const float* lse_row = lse + (b * g.NH + h) * T;
  const IVec lanes = lane_index();

  for (int64_t j0 = 0; j0 < T; j0 += kTile) {
    const int64_t nk = std::min(kTile, T - j0), nkp = round_up(nk, kLanes);
    std::fill(dk, dk + kTile * Dp, 0.0f);
    std::fill(dv, dv + kTile * Dp, 0.0f);
    for (int64_t i0 = j0; i0 < T; i0 += kTile) {  // query blocks that see key block j (causality: i ≥ j)
      const int64_t nq = std::min(kTile, T - i0);
      const bool diagonal = i0 == j0;
      // S = q_i·k_jᵀ and dP = dO_i·v_jᵀ (nq, nkp); on the diagonal a strip stops at its last row's key.
      for (int64_t r0 = 0; r0 < nq; r0 += kMr) {
        const int mr = static_cast<int>(std::min<int64_t>(kMr, nq - r0));
        const int64_t n = diagonal ? std::min(nkp, round_up(r0 + mr, kLanes)) : nkp;
        gemm_strip(P + r0 * kTile, kTile, q.data + (i0 + r0) * q.ld, q.ld, 1, kt + j0, g.Tp, mr, n, D, false);
        gemm_strip(dS + r0 * kTile, kTile, dO.data + (i0 + r0) * dO.ld, dO.ld, 1, vt + j0, g.Tp, mr, n, D, false);
      }
      // P = exp(S/√D − lse), zero where the key comes after the query (or past T);
      // dS = P ∘ (dP − Dᵢ)  — in the forward pass this was: out = softmax(S)·v.
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t t = i0 + r;
        const int64_t n_valid = std::min(nk, t - j0 + 1);  // keys j0 .. t
        const float l = lse_row[t], dl = delta[t];
        float* prow = P + r * kTile;
        float* dsrow = dS + r * kTile;
        for (int64_t c = 0; c < nkp; c += kLanes) {
          const auto valid = (lanes + static_cast<int32_t>(c)) < static_cast<int32_t>(n_valid);
          if (c >= n_valid) {
            store(prow + c, Vec{});
            store(dsrow + c, Vec{});
            continue;
          }
          const Vec p = vexp(load(prow + c) * g.scale - l);
          const Vec pz = valid ? p : Vec{};
          store(prow + c, pz);
          store(dsrow + c, pz * (load(dsrow + c) - dl));
        }
      }
      // dV_j += Pᵀ·dO_i and dK_j += dSᵀ·q_i (nk, Dp): A = Pᵀ read in place (row stride 1, k stride kTile).
      // On the diagonal, key c only meets queries r ≥ c, so a strip of keys starts its sum there.
      for (int64_t c0 = 0; c0 < nk; c0 += kMr) {
        const int mr = static_cast<int>(std::min<int64_t>(kMr, nk - c0));
        const int64_t r_first = diagonal ? c0 : 0;
        gemm_strip(dv + c0 * Dp, Dp, P + r_first * kTile + c0, 1, kTile, dO.data + (i0 + r_first) * dO.ld, dO.ld,
                   mr, Dp, nq - r_first, true);
        gemm_strip(dk + c0 * Dp, Dp, dS + r_first * kTile + c0, 1, kTile, q.data + (i0 + r_first) * q.ld, q.ld,
                   mr, Dp, nq - r_first, true);
      }
      // dQ_i += dS·k_j (nq, Dp); on the diagonal a strip of queries needs keys up to its last row only.
      for (int64_t r0 = 0; r0 < nq; r0 += kMr) {
        const int mr = static_cast<int>(std::min<int64_t>(kMr, nq - r0));
        const int64_t kk = diagonal ? std::min(nk, r0 + mr) : nk;
        gemm_strip(dq + (i0 + r0) * Dp, Dp, dS + r0 * kTile, kTile, 1, k.data + j0 * k.ld, k.ld, mr, Dp, kk, true);
      }
    }
    // The 1/√D of S = q·kᵀ/√D, applied once: dk = dSᵀ·q/√D; dv = Pᵀ·dO.
    for (int64_t c = 0; c < nk; ++c) {
      float* dst = dqkv + g.qkv_at(b, j0 + c, 1, h);
      float* dst_v = dqkv + g.qkv_at(b, j0 + c, 2, h);
      for (int64_t d = 0; d < D; ++d) {
        dst[d] += g.scale * dk[c * Dp + d];
        dst_v[d] += dv[c * Dp + d];
      }
    }
  }
  for (int64_t t = 0; t < T; ++t) {  // dq = dS·k/√D
    float* dst = dqkv + g.qkv_at(b, t, 0, h);
    for (int64_t d = 0; d < D; ++d) dst[d] += g.scale * dq[t * Dp + d];
  }
}

}  // namespace

void attention_forward_cpu(float* out, float* lse, const float* qkv, int64_t B, int64_t T, int64_t C, int64_t NH) {
  KRAKEN_CHECK(NH > 0 && C > 0 && C % NH == 0, "C=", C, " NH=", NH);
  if (B == 0 || T == 0) return;
  const Geometry g(B, T, C, NH);
  const int64_t BH = B * NH, n_tiles = (T + kTile - 1) / kTile;
  // kᵀ (D, Tp) of every head (and v (T, Dp) when D is not a whole number of vectors), packed once and
  // shared by all its query tiles.
  Buffer kt(BH * g.D * g.Tp), v(g.D == g.Dp ? 0 : BH * g.T * g.Dp);
#pragma omp parallel if (worth_threads(B, T, C))
  {
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < BH; ++bh) {
      const int64_t b = bh / NH, h = bh % NH;
      pack_transposed(kt.get() + bh * g.D * g.Tp, qkv + g.qkv_at(b, 0, 1, h), g.ld, g);
      if (g.D != g.Dp) pack_rows(v.get() + bh * g.T * g.Dp, qkv + g.qkv_at(b, 0, 2, h), g.ld, g);
    }
    Buffer s(kTile * g.Tp), o(kTile * g.Dp);
    // Later tiles see more keys: hand them out first so the last items to finish are the small ones.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < BH * n_tiles; ++item) {
      const int64_t tile = n_tiles - 1 - item / BH, bh = item % BH;
      const int64_t b = bh / NH, h = bh % NH;
      const Rows v_rows = g.D == g.Dp ? Rows{qkv + g.qkv_at(b, 0, 2, h), g.ld} : Rows{v.get() + bh * g.T * g.Dp, g.Dp};
      forward_tile(out, lse, qkv, kt.get() + bh * g.D * g.Tp, v_rows, b, h, tile * kTile, g, s.get(), o.get());
    }
  }
}


void attention_backward_cpu(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                            int64_t B, int64_t T, int64_t C, int64_t NH) {
  KRAKEN_CHECK(NH > 0 && C > 0 && C % NH == 0, "C=", C, " NH=", NH);
  if (B == 0 || T == 0) return;
  const Geometry g(B, T, C, NH);
  const int64_t BH = B * NH;
  // One head per item: its key blocks accumulate dq in a fixed order, and heads write disjoint columns
  // of dqkv, so no two threads ever add into the same element.
#pragma omp parallel if (worth_threads(B, T, C))
  {
    HeadScratch scratch(g);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < BH; ++bh)
      backward_head(dqkv, dout, qkv, out, lse, bh / NH, bh % NH, g, scratch);
  }
}

}  // namespace kraken::kernels
