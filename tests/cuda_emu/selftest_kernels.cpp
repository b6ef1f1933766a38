// Small kernels that exercise the emulation itself (emu_selftest_test.cpp checks what they compute):
// compiled like the kernels/cuda files, with -DKRAKEN_CUDA_EMULATION.
#include <cuda_bf16.h>
#include <mma.h>

#include <cstdint>

#include "kernels/cuda/launch.h"

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

__global__ void trap_kernel() {
  if (threadIdx.x == 5) __trap();
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
void trap() { KRAKEN_KERNEL(1, 32, 0, nullptr, trap_kernel)(); }

}  // namespace kraken_emu_selftest
