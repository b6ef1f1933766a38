// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter-based
// generator. Output block = f(key, counter), so any element of a random stream can be computed
// independently, in any order, on any thread, on the CPU or the GPU, with the same result. That is
// what makes dropout masks regenerable in backward and initialisation independent of thread counts.
//
// Our convention: key = the 64-bit seed; counter = (offset as 64 bits, stream as 64 bits). A stream
// separates users of one seed (a rank, a purpose); an offset advances within a stream, one block
// of four 32-bit words at a time.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KRAKEN_HD __host__ __device__ __forceinline__
#else
#define KRAKEN_HD inline
#endif

namespace kraken::kernels {

struct PhiloxBlock {
  uint32_t v[4];
};

KRAKEN_HD PhiloxBlock philox4x32_10(uint64_t seed, uint64_t stream, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = static_cast<uint32_t>(stream), c3 = static_cast<uint32_t>(stream >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// A uniform float in [0, 1) from the top 24 bits (exactly representable).
KRAKEN_HD float uint_to_unit(uint32_t x) { return static_cast<float>(x >> 8) * (1.0f / 16777216.0f); }

// Element i of a uniform stream starting at `offset`: block offset + i/4, word i%4.
KRAKEN_HD float philox_uniform(uint64_t seed, uint64_t stream, uint64_t offset, uint64_t i) {
  return uint_to_unit(philox4x32_10(seed, stream, offset + i / 4).v[i % 4]);
}

}  // namespace kraken::kernels
