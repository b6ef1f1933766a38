// The emulation itself (emu.h, include/mma.h): barriers, shuffles, shared memory, WMMA products, and
// that it fails loudly where a GPU would hang or trap. Kernels in selftest_kernels.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels/elementwise.h"
#include "tests/cuda_emu/schedule.h"

namespace kraken_emu_selftest {
void mismatched_barriers();
void warp_sum(float* out, const float* in, int warps);
void static_shared(int* out, int blocks);
void unwritten_shared(unsigned char* out);
void wmma_product(float* d, const uint16_t* a, const uint16_t* b, const float* c);
void mma_sync_product(float* d, const uint16_t* a, const uint16_t* b, int way);
void cp_async_copy(unsigned char* out, const unsigned char* src, bool fill);
void wgmma_chain(float* out);
void wgmma_overwrite(float* out, bool early);
void wgmma_register_overwrite(float* out, bool early);
void named_turns(int* log, int turns0, int turns1, int mutation);
void trap();
void large_shared(unsigned char* out, int bytes, int raise_to);  // raise_to 0: no cudaFuncSetAttribute
}  // namespace kraken_emu_selftest

namespace {

namespace self = kraken_emu_selftest;

TEST(CudaEmulationSelf, BarriersThatCannotCompleteAreADeadlockError) {
  try {
    self::mismatched_barriers();
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("deadlock"), std::string::npos) << e.what();
  }
}

TEST(CudaEmulationSelf, ATrapIsAnError) { EXPECT_THROW(self::trap(), std::runtime_error); }

// A GPU refuses a launch asking for more than 48 KiB of dynamic shared memory unless
// cudaFuncSetAttribute raised that kernel's limit at least as far; so does the emulation.
TEST(CudaEmulationSelf, DynamicSharedMemoryAbove48KiBNeedsTheKernelsOptIn) {
  unsigned char out = 0;
  self::large_shared(&out, 48 * 1024, 0);  // the default limit: no attribute needed
  EXPECT_EQ(out, 7);
  try {
    self::large_shared(&out, 64 * 1024, 0);
    FAIL() << "a 64 KiB launch without the opt-in ran";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("cudaFuncAttributeMaxDynamicSharedMemorySize"), std::string::npos) << e.what();
  }
  EXPECT_THROW(self::large_shared(&out, 100 * 1024, 96 * 1024), std::runtime_error);  // raised, not far enough
  out = 0;
  self::large_shared(&out, 200 * 1024, 200 * 1024);
  EXPECT_EQ(out, 7);
  self::large_shared(&out, 96 * 1024, 0);  // the raised limit stays the kernel's, as on a GPU
}

TEST(CudaEmulationSelf, ShufflesReduceAcrossTheWarp) {
  for (const auto schedule : {kraken_emu::Schedule::kAscending, kraken_emu::Schedule::kDescending}) {
    kraken_emu::set_schedule(schedule);
    std::vector<float> in(96), out(3, -1.0f);
    for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i);
    self::warp_sum(out.data(), in.data(), 3);
    EXPECT_EQ(out, (std::vector<float>{496.0f, 1520.0f, 2544.0f}));  // Σ 0..31, Σ 32..63, Σ 64..95
  }
  kraken_emu::set_schedule(kraken_emu::Schedule::kAscending);
}

TEST(CudaEmulationSelf, StaticSharedMemoryIsTheBlocks) {
  std::vector<int> out(128);
  self::static_shared(out.data(), 2);
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 64; ++t) EXPECT_EQ(out[b * 64 + t], ((t + 1) % 64) * 3 + b) << b << " " << t;
}

TEST(CudaEmulationSelf, UnwrittenDynamicSharedMemoryIsPoison) {
  std::vector<unsigned char> out(32, 0);
  self::unwritten_shared(out.data());
  for (unsigned char v : out) EXPECT_EQ(v, 0xFF);
}

TEST(CudaEmulationSelf, WmmaProductsAreMatrixProducts) {
  // A (row-major) and B (column-major) hold small integers, exact in bf16 and in f32 sums.
  std::vector<float> a(256), b(256), c(256);
  for (int i = 0; i < 256; ++i) {
    a[i] = static_cast<float>((i * 7) % 11 - 5);
    b[i] = static_cast<float>((i * 5) % 13 - 6);
    c[i] = static_cast<float>(i % 9);
  }
  std::vector<uint16_t> a16(256), b16(256);
  kraken::kernels::cast_f32_to_bf16_cpu(a16.data(), a.data(), 256);
  kraken::kernels::cast_f32_to_bf16_cpu(b16.data(), b.data(), 256);
  std::vector<float> d(256, 0.0f);
  self::wmma_product(d.data(), a16.data(), b16.data(), c.data());
  for (int r = 0; r < 16; ++r) {
    for (int col = 0; col < 16; ++col) {
      float want = c[r * 16 + col];
      for (int k = 0; k < 16; ++k) want += a[r * 16 + k] * b[col * 16 + k];  // B column-major: (k, col) at col·16 + k
      EXPECT_EQ(d[r * 16 + col], want) << "row " << r << " column " << col;
    }
  }
}

TEST(CudaEmulationSelf, MmaSyncProductsAreMatrixProductsWhicheverWayTheOperandsArrive) {
  // The PTX layout formulas written out, ldmatrix of Bᵀ's rows, ldmatrix .trans of B's rows: each must
  // give A·B (small integers: exact in bf16 and in f32 sums).
  std::vector<float> a(256), b(256);
  for (int i = 0; i < 256; ++i) {
    a[i] = static_cast<float>((i * 7) % 11 - 5);
    b[i] = static_cast<float>((i * 5) % 13 - 6);
  }
  std::vector<uint16_t> a16(256), b16(256);
  kraken::kernels::cast_f32_to_bf16_cpu(a16.data(), a.data(), 256);
  kraken::kernels::cast_f32_to_bf16_cpu(b16.data(), b.data(), 256);
  for (int way = 0; way < 3; ++way) {
    std::vector<float> d(256, -1.0f);
    self::mma_sync_product(d.data(), a16.data(), b16.data(), way);
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) {
        float want = 0.0f;
        for (int k = 0; k < 16; ++k) want += a[r * 16 + k] * b[k * 16 + c];
        EXPECT_EQ(d[r * 16 + c], want) << "way " << way << ", row " << r << ", column " << c;
      }
  }
}

TEST(CudaEmulationSelf, WgmmaResultsLandAtTheWaitAndChainBeforeIt) {
  // Ones times ones over k = 16: 16 an element; the second wgmma adds onto the first before any wait, as
  // the GPU orders them: 32. Before the wait the accumulators read NaN (ascending) or the result already
  // (descending, where results land at the issue).
  std::vector<float> out(256, -1.0f);
  self::wgmma_chain(out.data());
  for (int t = 0; t < 128; ++t) {
    EXPECT_TRUE(std::isnan(out[t])) << "thread " << t << " read its accumulator before the wait";
    EXPECT_EQ(out[128 + t], 32.0f) << "thread " << t;
  }
  kraken_emu::set_schedule(kraken_emu::Schedule::kDescending);
  self::wgmma_chain(out.data());
  kraken_emu::set_schedule(kraken_emu::Schedule::kAscending);
  for (int t = 0; t < 128; ++t) EXPECT_EQ(out[t], 32.0f) << "thread " << t << ": landed at the issue";
}

// A GPU reads a wgmma's operands at any time up to the wait that covers it: the emulation reads them at
// the issue and again at the wait, under both schedules. run(out, true) changes an operand before the
// wait, which must be the error naming `what`; run(out, false) after it, which gives 16 an element.
void check_change_before_the_wait_is_an_error(void (*run)(float*, bool), const std::string& what) {
  for (auto schedule : {kraken_emu::Schedule::kAscending, kraken_emu::Schedule::kDescending}) {
    kraken_emu::set_schedule(schedule);
    std::vector<float> out(128, -1.0f);
    try {
      run(out.data(), true);
      ADD_FAILURE() << "changed before the wait: no error ('" << what << "')";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
    run(out.data(), false);
    for (int t = 0; t < 128; ++t) EXPECT_EQ(out[t], 16.0f) << "changed after the wait, thread " << t;
  }
  kraken_emu::set_schedule(kraken_emu::Schedule::kAscending);
}

TEST(CudaEmulationSelf, SharedMemoryAWgmmaReadsMustNotChangeBeforeItsWait) {
  // (after the wait and a barrier: allowed)
  check_change_before_the_wait_is_an_error(self::wgmma_overwrite, "shared memory that a wgmma in flight reads");
}

TEST(CudaEmulationSelf, ARegistersOfAWgmmaMustNotChangeBeforeItsWait) {
  check_change_before_the_wait_is_an_error(self::wgmma_register_overwrite, "A registers of a wgmma in flight");
}

TEST(CudaEmulationSelf, CpAsyncLandsAtTheWaitOrAtTheIssue) {
  std::vector<unsigned char> src(16), out(32, 0);
  for (int i = 0; i < 16; ++i) src[i] = static_cast<unsigned char>(i + 1);
  alignas(16) unsigned char aligned[16];
  std::copy(src.begin(), src.end(), aligned);
  self::cp_async_copy(out.data(), aligned, true);  // the ascending schedule: at the wait
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(out[i], 0xFF) << "before the wait: still the poison";
    EXPECT_EQ(out[16 + i], src[i]) << "after the wait: the copy";
  }
  self::cp_async_copy(out.data(), aligned, false);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(out[16 + i], 0) << "src-size 0: zero-filled";
  kraken_emu::set_schedule(kraken_emu::Schedule::kDescending);  // at the issue
  self::cp_async_copy(out.data(), aligned, true);
  kraken_emu::set_schedule(kraken_emu::Schedule::kAscending);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(out[i], src[i]) << "landed before the wait";
}

// Two groups taking turns through named barriers (bar.sync / bar.arrive) write their turns in turn, under
// either schedule (the descending one runs group 1 first where nothing holds it), also where one group has
// more turns than the other; a missing arrival or a surplus one in the middle is a deadlock, a surplus
// arrival at the end an error when the block returns.
TEST(CudaEmulationSelf, NamedBarriersMakeTwoGroupsTakeTurns) {
  for (const auto schedule : {kraken_emu::Schedule::kAscending, kraken_emu::Schedule::kDescending}) {
    kraken_emu::set_schedule(schedule);
    for (const auto& [turns0, turns1] : std::vector<std::pair<int, int>>{{3, 3}, {2, 5}, {4, 1}, {0, 2}, {3, 0}}) {
      std::vector<int> log(static_cast<size_t>(turns0 + turns1), -1), want;
      for (int i = 0; i < std::max(turns0, turns1); ++i) {
        if (i < turns0) want.push_back(0);
        if (i < turns1) want.push_back(1);
      }
      self::named_turns(log.data(), turns0, turns1, 0);
      EXPECT_EQ(log, want) << turns0 << " and " << turns1 << " turns";
    }
  }
  kraken_emu::set_schedule(kraken_emu::Schedule::kAscending);
  for (const int mutation : {1, 2, 3}) {
    std::vector<int> log(6, -1);
    try {
      self::named_turns(log.data(), 3, 3, mutation);
      ADD_FAILURE() << "mutation " << mutation << ": no error";
    } catch (const std::runtime_error& e) {
      const std::string what = e.what();
      // (1 and 2: each group waits on the other, all 128 threads at named barriers)
      EXPECT_NE(what.find(mutation == 3 ? "named barrier whose round never completed" : " 128 at a named barrier"),
                std::string::npos)
          << "mutation " << mutation << ": " << what;
    }
  }
}

}  // namespace
