// Small kernels that exercise the emulation itself (emu_selftest_test.cpp checks what they compute):
// compiled like the kernels/cuda files, with -DKRAKEN_CUDA_EMULATION.
#include <cuda_bf16.h>
#include <mma.h>

#include <cstdint>

#include "kernels/cuda/check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/mbarrier.h"
#include "kernels/cuda/mma_sync.h"
#include "kernels/cuda/wgmma.h"

namespace kraken_emu_selftest {
namespace {

namespace wmma = nvcuda::wmma;

// Lanes 0–15 wait at __syncwarp, lanes 16–31 at __syncthreads: neither barrier can complete.
__global__ void mismatched_barriers_kernel() {
  if (threadIdx.x < 16) __syncwarp();
  else __syncthreads();
}

// out[warp] = Σ in over the warp's lanes, by a butterfly of shuffles.
__global__ void warp_sum_kernel(float* out, const float* in) {
  float v = in[threadIdx.x];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) out[threadIdx.x / 32] = v;
}

// Each thread writes its slot of a static shared array, then reads its neighbour's.
__global__ void static_shared_kernel(int* out) {
  __shared__ int slots[64];
  slots[threadIdx.x] = static_cast<int>(threadIdx.x) * 3 + static_cast<int>(blockIdx.x);
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = slots[(threadIdx.x + 1) % 64];
}

// out[i] = the first byte of dynamic shared memory, never written.
__global__ void unwritten_shared_kernel(unsigned char* out) {
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  out[threadIdx.x] = smem[threadIdx.x];
}

// D = A·B + C for one 16 × 16 × 16 tile: A row-major, B column-major (both bf16), C and D row-major f32.
__global__ void wmma_kernel(float* d, const __nv_bfloat16* a, const __nv_bfloat16* b, const float* c) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::load_matrix_sync(fc, c, 16, wmma::mem_row_major);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(d, fc, 16, wmma::mem_row_major);
}

// D (16 × 16, row-major f32) = A·B for A (16 × 16 row-major) and B (16 × 16, k × n, row-major), both
// bf16, as two mma.sync m16n8k16 products. `way` picks how the operands reach the registers: 0 from
// global memory by the PTX ISA's layout formulas written out; 1 by ldmatrix from shared memory, B from
// its transpose's rows (as attention_mma.cu loads k for q·kᵀ); 2 by ldmatrix .trans from B's rows (as it
// loads v for P·v).
__global__ void mma_sync_kernel(float* d, const uint16_t* a, const uint16_t* b, int way) {
  KRAKEN_DYNAMIC_SHARED(uint16_t, smem);  // A at 0, B (way 2) or Bᵀ (way 1) at 256; pitch 16
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  for (int i = lane; i < 256; i += 32) {
    smem[i] = a[i];
    smem[256 + i] = way == 1 ? b[(i % 16) * 16 + i / 16] : b[i];
  }
  __syncwarp();
  uint32_t ra[4], rb[2][2];
  if (way == 0) {
    auto pair = [](uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16; };
    auto at = [&](int r, int c) { return pair(a[r * 16 + c], a[r * 16 + c + 1]); };  // A[r][c, c+1]
    ra[0] = at(g, 2 * t), ra[1] = at(g + 8, 2 * t), ra[2] = at(g, 2 * t + 8), ra[3] = at(g + 8, 2 * t + 8);
    auto bt = [&](int k, int n) { return pair(b[k * 16 + n], b[(k + 1) * 16 + n]); };  // B[k, k+1][n]
    for (int n = 0; n < 2; ++n) rb[n][0] = bt(2 * t, 8 * n + g), rb[n][1] = bt(2 * t + 8, 8 * n + g);
  } else {
    kraken::kernels::mma::ldmatrix_x4(ra, smem + (lane % 16) * 16 + (lane / 16) * 8);
    uint32_t r[4];
    if (way == 1)
      kraken::kernels::mma::ldmatrix_x4(r, smem + 256 + ((lane / 16) * 8 + lane % 8) * 16 + ((lane / 8) % 2) * 8);
    else
      kraken::kernels::mma::ldmatrix_x4_trans(r, smem + 256 + (lane % 16) * 16 + (lane / 16) * 8);
    rb[0][0] = r[0], rb[0][1] = r[1], rb[1][0] = r[2], rb[1][1] = r[3];
  }
  for (int n = 0; n < 2; ++n) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    kraken::kernels::mma::mma_bf16(acc, ra, rb[n]);
    for (int e = 0; e < 4; ++e) d[(g + 8 * (e >> 1)) * 16 + 8 * n + 2 * t + (e & 1)] = acc[e];
  }
}

// Thread 0 copies 16 bytes of src into shared memory by cp.async (zero-filled when !fill) and records
// them before the wait (out[0..15]) and after it (out[16..31]).
__global__ void cp_async_kernel(unsigned char* out, const unsigned char* src, bool fill) {
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  if (threadIdx.x != 0) return;
  kraken::kernels::mma::cp_async_16(smem, src, fill);
  kraken::kernels::mma::cp_async_commit();
  for (int i = 0; i < 16; ++i) out[i] = smem[i];
  kraken::kernels::mma::cp_async_wait<0>();
  for (int i = 0; i < 16; ++i) out[16 + i] = smem[i];
}

// One warpgroup: A (64 × 16) and B (16 × 64, K-major) all ones in shared memory; two wgmma chained on one
// accumulator (the second adds to the first, before any wait) and committed; thread t records its first
// accumulator before the wait (out[t]) and after it (out[128 + t]).
__global__ void wgmma_chain_kernel(float* out) {
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  const uint16_t one = 0x3F80;  // bf16 1.0
  for (int i = threadIdx.x; i < 2 * 64 * 16; i += 128) reinterpret_cast<uint16_t*>(smem)[i] = one;
  __syncthreads();
  namespace wg = kraken::kernels::wgmma;
  float acc[32];
  wg::fence();
  for (int step = 0; step < 2; ++step)
    wg::mma<64, 0, 0>(acc, wg::k_major(smem, 16, 0, 0), wg::k_major(smem + 64 * 16 * 2, 16, 0, 0), step);
  wg::commit();
  out[threadIdx.x] = acc[0];
  wg::wait<0>();
  out[128 + threadIdx.x] = acc[0];
}

// The same operands, one wgmma committed; then every thread overwrites A with twos, before its wait
// (`early`: a hazard on a GPU, which may read A at any time up to the wait) or after it and a barrier.
__global__ void wgmma_overwrite_kernel(float* out, bool early) {
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  const uint16_t one = 0x3F80, two = 0x4000;  // bf16 1.0, 2.0
  for (int i = threadIdx.x; i < 2 * 64 * 16; i += 128) reinterpret_cast<uint16_t*>(smem)[i] = one;
  __syncthreads();
  namespace wg = kraken::kernels::wgmma;
  float acc[32];
  wg::fence();
  wg::mma<64, 0, 0>(acc, wg::k_major(smem, 16, 0, 0), wg::k_major(smem + 64 * 16 * 2, 16, 0, 0), 0);
  wg::commit();
  auto overwrite = [&] {
    for (int i = threadIdx.x; i < 64 * 16; i += 128) reinterpret_cast<uint16_t*>(smem)[i] = two;
  };
  if (early) overwrite();
  wg::wait<0>();
  wg::fence_accumulators(acc);
  if (!early) {
    __syncthreads();
    overwrite();
  }
  out[threadIdx.x] = acc[0];
}

// A (64 × 16) all ones from registers, B ones in shared memory; then thread 0 changes one of its A
// registers before the wait (`early`) or after it.
__global__ void wgmma_register_overwrite_kernel(float* out, bool early) {
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  const uint16_t one = 0x3F80;
  for (int i = threadIdx.x; i < 64 * 16; i += 128) reinterpret_cast<uint16_t*>(smem)[i] = one;
  __syncthreads();
  namespace wg = kraken::kernels::wgmma;
  uint32_t a[4];
  for (uint32_t& r : a) r = 0x3F803F80u;  // two bf16 ones
  float acc[32];
  wg::fence();
  wg::mma<64, 0>(acc, a, wg::k_major(smem, 16, 0, 0), 0);
  wg::commit();
  if (early && threadIdx.x == 0) a[2] = 0;
  wg::wait<0>();
  wg::fence_accumulators(acc);
  if (!early && threadIdx.x == 0) a[2] = 0;
  out[threadIdx.x] = acc[0] + static_cast<float>(a[1] & 1u);  // (a kept alive to the end)
}

// Two groups of 64 threads take turns through named barriers 1 and 2 (group 0 waits on 1, group 1 on 2),
// group 0 first: turn i of a group appends its number to log (one thread each). turns[g] turns for group
// g. Mutations: 1, group 1 never arrives after its first turn; 2, group 0 arrives twice after its first
// turn; 3, group 1 arrives one time too many after its last turn.
__global__ void named_turns_kernel(int* log, int turns0, int turns1, int mutation) {
  namespace nb = kraken::kernels::named_barrier;
  __shared__ int next;
  if (threadIdx.x == 0) next = 0;
  __syncthreads();
  const int group = threadIdx.x / 64, mine = group == 0 ? turns0 : turns1, theirs = group == 0 ? turns1 : turns0;
  for (int i = 0; i < mine; ++i) {
    // group 0 waits for group 1's turn i − 1, group 1 for group 0's turn i (where the other had them)
    if (group == 0 ? i > 0 && i - 1 < theirs : i < theirs) group == 0 ? nb::sync<1>(128) : nb::sync<2>(128);
    if (threadIdx.x % 64 == 0) log[next++] = group;
    const bool other_waits = group == 0 ? i < theirs : i + 1 < theirs;
    if (other_waits && !(mutation == 1 && group == 1 && i > 0)) group == 0 ? nb::arrive<2>(128) : nb::arrive<1>(128);
    if (mutation == 2 && group == 0 && i == 0) nb::arrive<2>(128);
    if (mutation == 3 && group == 1 && i == mine - 1) nb::arrive<1>(128);
  }
}

__global__ void trap_kernel() {
  if (threadIdx.x == 5) __trap();
}

// out[0] = the last byte of its dynamic shared memory (bytes of it), as written.
__global__ void large_shared_kernel(unsigned char* out, int bytes) {
  KRAKEN_DYNAMIC_SHARED(unsigned char, smem);
  if (threadIdx.x == 0) smem[bytes - 1] = 7;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = smem[bytes - 1];
}

}  // namespace

void mismatched_barriers() { KRAKEN_KERNEL(1, 32, 0, nullptr, mismatched_barriers_kernel)(); }
void warp_sum(float* out, const float* in, int warps) {
  KRAKEN_KERNEL(1, 32 * warps, 0, nullptr, warp_sum_kernel)(out, in);
}
void static_shared(int* out, int blocks) { KRAKEN_KERNEL(blocks, 64, 0, nullptr, static_shared_kernel)(out); }
void unwritten_shared(unsigned char* out) { KRAKEN_KERNEL(1, 32, 256, nullptr, unwritten_shared_kernel)(out); }
void wmma_product(float* d, const uint16_t* a, const uint16_t* b, const float* c) {
  KRAKEN_KERNEL(1, 32, 0, nullptr, wmma_kernel)(d, reinterpret_cast<const __nv_bfloat16*>(a),
                                                reinterpret_cast<const __nv_bfloat16*>(b), c);
}
void mma_sync_product(float* d, const uint16_t* a, const uint16_t* b, int way) {
  KRAKEN_KERNEL(1, 32, 1024, nullptr, mma_sync_kernel)(d, a, b, way);
}
void cp_async_copy(unsigned char* out, const unsigned char* src, bool fill) {
  KRAKEN_KERNEL(1, 32, 64, nullptr, cp_async_kernel)(out, src, fill);
}
void wgmma_chain(float* out) { KRAKEN_KERNEL(1, 128, 2 * 64 * 16 * 2, nullptr, wgmma_chain_kernel)(out); }
void wgmma_overwrite(float* out, bool early) {
  KRAKEN_KERNEL(1, 128, 2 * 64 * 16 * 2, nullptr, wgmma_overwrite_kernel)(out, early);
}
void wgmma_register_overwrite(float* out, bool early) {
  KRAKEN_KERNEL(1, 128, 64 * 16 * 2, nullptr, wgmma_register_overwrite_kernel)(out, early);
}
void named_turns(int* log, int turns0, int turns1, int mutation) {
  KRAKEN_KERNEL(1, 128, 0, nullptr, named_turns_kernel)(log, turns0, turns1, mutation);
}
void trap() { KRAKEN_KERNEL(1, 32, 0, nullptr, trap_kernel)(); }
void large_shared(unsigned char* out, int bytes, int raise_to) {
  if (raise_to > 0)
    KRAKEN_CUDA_CHECK(cudaFuncSetAttribute(large_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, raise_to));
  KRAKEN_KERNEL(1, 32, static_cast<size_t>(bytes), nullptr, large_shared_kernel)(out, bytes);
}

}  // namespace kraken_emu_selftest
