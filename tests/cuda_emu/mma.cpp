// The WMMA emulation's layouts and warp-collective parts (include/mma.h).
#include <mma.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <random>
#include <string>

namespace nvcuda::wmma::detail {
namespace {

// Per fragment kind, a fixed permutation of the 256 positions: position[kind][lane · 8 + i].
const std::array<std::array<int, 256>, 3>& permutations() {
  static const std::array<std::array<int, 256>, 3> table = [] {
    std::array<std::array<int, 256>, 3> t{};
    for (int kind = 0; kind < 3; ++kind) {
      for (int p = 0; p < 256; ++p) t[kind][p] = p;
      std::mt19937 rng(1000 + kind);
      std::shuffle(t[kind].begin(), t[kind].end(), rng);
    }
    return t;
  }();
  return table;
}

}  // namespace

int position(int kind, int lane, int i) { return permutations()[kind][lane * kElements + i]; }

void mma(float* d, const float* a, const float* b, const float* c) {
  float* s = static_cast<float*>(::kraken_emu::warp_scratch());
  float* A = s;
  float* B = s + 256;
  float* C = s + 512;
  const int lane = ::kraken_emu::lane();
  for (int i = 0; i < kElements; ++i) {
    A[position(0, lane, i)] = a[i];
    B[position(1, lane, i)] = b[i];
    C[position(2, lane, i)] = c[i];
  }
  ::kraken_emu::sync_warp();  // the warp's A, B and C are complete
  for (int i = 0; i < kElements; ++i) {
    const int p = position(2, lane, i), r = p / 16, col = p % 16;
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) sum += A[r * 16 + k] * B[k * 16 + col];
    d[i] = C[p] + sum;
  }
  ::kraken_emu::sync_warp();  // every lane has read: the scratch may be written again
}

}  // namespace nvcuda::wmma::detail
