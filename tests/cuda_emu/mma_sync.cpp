// mma.sync m16n8k16 and ldmatrix for the emulation (emu.h), with the fragment layouts of the PTX ISA
// that kernels/cuda/mma_sync.h documents. Both gather the whole warp through its scratch: every lane
// deposits what it holds (operands, or a row address), waits for the others, then takes its own part.
#include <cstring>

#include "tests/cuda_emu/emu.h"

namespace kraken_emu {
namespace {

float bf16_bits_to_float(uint32_t bits16) {
  const uint32_t u = bits16 << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace

void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  float* s = static_cast<float*>(warp_scratch());
  float* A = s;        // 16 × 16, row-major
  float* B = s + 256;  // 16 × 8 (k × n), row-major
  const int l = lane(), g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i)
    for (int h = 0; h < 2; ++h) {
      const int row = g + 8 * (i & 1), col = 2 * t + h + 8 * (i >> 1);
      A[row * 16 + col] = bf16_bits_to_float((a[i] >> (16 * h)) & 0xffffu);
    }
  for (int i = 0; i < 2; ++i)
    for (int h = 0; h < 2; ++h) B[(2 * t + h + 8 * i) * 8 + g] = bf16_bits_to_float((b[i] >> (16 * h)) & 0xffffu);
  sync_warp();  // the warp's A and B are complete
  for (int j = 0; j < 4; ++j) {
    const int row = g + 8 * (j >> 1), col = 2 * t + (j & 1);
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) sum += A[row * 16 + k] * B[k * 8 + col];
    d[j] += sum;
  }
  sync_warp();  // every lane has read: the scratch may be written again
}

void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  if (!in_dynamic_shared(row, 16)) trap("ldmatrix: a row address outside the block's shared memory");
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) trap("ldmatrix: a row address not 16-byte aligned");
  auto** rows = static_cast<const unsigned char**>(warp_scratch());
  const int l = lane(), g = l / 4, t = l % 4;
  rows[l] = static_cast<const unsigned char*>(row);
  sync_warp();  // every lane's address is in
  auto element = [&](int matrix, int i, int j) {  // element (i, j) of 8 × 8 matrix `matrix`
    uint16_t v;
    std::memcpy(&v, rows[8 * matrix + i] + 2 * j, sizeof v);
    return static_cast<uint32_t>(v);
  };
  for (int m = 0; m < 4; ++m)
    r[m] = trans ? element(m, 2 * t, g) | element(m, 2 * t + 1, g) << 16
                 : element(m, g, 2 * t) | element(m, g, 2 * t + 1) << 16;
  sync_warp();  // every lane has read the addresses
}

}  // namespace kraken_emu
