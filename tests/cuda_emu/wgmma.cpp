// wgmma.mma_async m64nNk16 (bf16 → f32) for the emulation (emu.h), with the register layouts and the
// no-swizzle shared-memory descriptors that kernels/cuda/wgmma.h documents. The warpgroup's 128 threads
// deposit their operands in its scratch and meet; each checks that all issued the same instruction, then
// computes its own accumulators from the A rows it owns and the B columns it owns, and hands the results to
// the scheduler, which lands them at the wait (emu.cpp).
#include <cstring>
#include <vector>

#include "tests/cuda_emu/emu.h"

namespace kraken_emu {
namespace {

// What each thread of the warpgroup issued.
struct Issued {
  uint32_t a[128][4];
  uint64_t a_desc[128], b_desc[128];
  int n[128], trans_a[128], trans_b[128], scale_d[128], a_in_registers[128];
};
static_assert(sizeof(Issued) <= 8 * 1024, "fits the warpgroup's scratch");

float bf16_bits_to_float(uint32_t bits16) {
  const uint32_t u = bits16 << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// A no-swizzle descriptor, decoded.
struct Descriptor {
  uint32_t start, lbo, sbo;
};
Descriptor decode(uint64_t desc, const char* operand) {
  if ((desc >> 62) != 0) trap("wgmma: only the no-swizzle layout is emulated");
  if (((desc >> 49) & 7u) != 0) trap("wgmma: a descriptor with a matrix base offset");
  (void)operand;
  return Descriptor{static_cast<uint32_t>(desc & 0x3FFFu) << 4, static_cast<uint32_t>((desc >> 16) & 0x3FFFu) << 4,
                    static_cast<uint32_t>((desc >> 32) & 0x3FFFu) << 4};
}

// Element (mn, k) of an operand whose M or N index is mn: K-major rows are mn, MN-major columns are. The
// read is recorded, for the wait to check that the element did not change while the wgmma was in flight.
float element(const Descriptor& d, bool mn_major, int mn, int k, std::vector<SharedRead>& reads) {
  const uint32_t offset = d.start + static_cast<uint32_t>(mn / 8) * d.sbo + static_cast<uint32_t>(k / 8) * d.lbo +
                          (mn_major ? static_cast<uint32_t>(k % 8) * 16 + static_cast<uint32_t>(mn % 8) * 2
                                    : static_cast<uint32_t>(mn % 8) * 16 + static_cast<uint32_t>(k % 8) * 2);
  const unsigned char* p = static_cast<const unsigned char*>(dynamic_shared()) + offset;
  if (!in_dynamic_shared(p, 2)) trap("wgmma: an operand element outside the block's shared memory");
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  reads.push_back(SharedRead{offset, v});
  return bf16_bits_to_float(v);
}

}  // namespace

void wgmma_bf16(float* d, int n, const uint32_t* a, uint64_t a_desc, uint64_t b_desc, int trans_a, int trans_b,
                bool scale_d) {
  if (n < 8 || n > 256 || n % 8 != 0) trap("wgmma: N outside 8 .. 256 or not a multiple of 8");
  auto* s = static_cast<Issued*>(warpgroup_scratch());
  const int me = static_cast<int>(coords().thread_idx.x) % 128;
  const int warp = me / 32, l = lane(), g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) s->a[me][i] = a ? a[i] : 0u;
  s->a_desc[me] = a_desc, s->b_desc[me] = b_desc, s->n[me] = n, s->trans_a[me] = trans_a, s->trans_b[me] = trans_b;
  s->scale_d[me] = scale_d, s->a_in_registers[me] = a != nullptr;
  sync_warpgroup();  // every thread's operands are in
  for (int i = 0; i < 128; ++i)
    if (s->n[i] != n || s->trans_a[i] != trans_a || s->trans_b[i] != trans_b || s->scale_d[i] != scale_d ||
        s->a_in_registers[i] != (a != nullptr) || s->b_desc[i] != b_desc || (!a && s->a_desc[i] != a_desc))
      trap("wgmma: the warpgroup's threads issued different instructions");

  // This thread's two rows of A.
  std::vector<SharedRead> reads;  // every shared element this thread's part of the product reads
  reads.reserve(32 + 4 * static_cast<size_t>(n));
  const int rows[2] = {16 * warp + g, 16 * warp + g + 8};
  float A[2][16];
  if (a) {
    // Row 16w + g + 8h, columns 2t', 2t' + 1 (+8 for registers 2, 3) come from lane 4g + t' of warp w.
    for (int h = 0; h < 2; ++h)
      for (int tt = 0; tt < 4; ++tt)
        for (int hi = 0; hi < 2; ++hi) {
          const uint32_t pair = s->a[32 * warp + 4 * g + tt][h + 2 * hi];
          A[h][2 * tt + 8 * hi] = bf16_bits_to_float(pair & 0xffffu);
          A[h][2 * tt + 8 * hi + 1] = bf16_bits_to_float(pair >> 16);
        }
  } else {
    const Descriptor da = decode(a_desc, "A");
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k) A[h][k] = element(da, trans_a != 0, rows[h], k, reads);
  }
  // This thread's columns of B: 8j + 2t and 8j + 2t + 1 for each j < N / 8.
  const Descriptor db = decode(b_desc, "B");
  float B[64][16];
  for (int j = 0; j < n / 8; ++j)
    for (int c = 0; c < 2; ++c)
      for (int k = 0; k < 16; ++k) B[2 * j + c][k] = element(db, trans_b != 0, 8 * j + 2 * t + c, k, reads);
  const int count = n / 2;
  const float* held = held_wgmma_results(d, count);
  const float* before = held ? held : d;
  float values[128];
  for (int j = 0; j < n / 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int h = e / 2;
      float sum = 0.0f;
      for (int k = 0; k < 16; ++k) sum += A[h][k] * B[2 * j + e % 2][k];
      values[4 * j + e] = (scale_d ? before[4 * j + e] : 0.0f) + sum;
    }
  // (handed over before the barrier: a fiber left waiting there when another traps is never unwound, and
  // must not own memory)
  hold_wgmma_results(d, values, count, std::move(reads), a);
  sync_warpgroup();  // every thread has read the scratch
}

}  // namespace kraken_emu
