#include <gtest/gtest.h>

#include "runtime/allocator.h"
#include "runtime/rng.h"
#include "runtime/tensor.h"

namespace kraken::runtime {
namespace {

TEST(Tensor, ViewsShareStorage) {
  Tensor t = Tensor::from_vector({0, 1, 2, 3, 4, 5}, {3, 2});
  Tensor rows = t.slice(1, 3);
  EXPECT_TRUE(rows.shares_storage(t));
  EXPECT_EQ(rows.to_vector(), (std::vector<float>{2, 3, 4, 5}));
  rows.fill_(9.0f);
  EXPECT_EQ(t.to_vector(), (std::vector<float>{0, 1, 9, 9, 9, 9}));
  Tensor flat = t.reshape({-1});
  EXPECT_EQ(flat.shape(), (Shape{6}));
  EXPECT_TRUE(flat.shares_storage(t));
}

TEST(Tensor, HostAllocationsAreCacheLineAligned) {
  for (int64_t n : {1, 3, 17, 1000}) {
    Tensor t = Tensor::empty({n});
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data_ptr()) % 64, 0u);
  }
}

TEST(Tensor, TheAllocatorPeakRestartsFromWhatIsInUse) {
  const int64_t big = 4 << 20, small = 1 << 20;  // floats: 16 MiB, then 4 MiB
  { Tensor t = Tensor::empty({big}); }
  EXPECT_GE(host_allocator_stats().peak_bytes_in_use, host_allocator_stats().bytes_in_use + big * 4);
  reset_peak_bytes_in_use(Device::cpu());
  const AllocatorStats reset = host_allocator_stats();
  EXPECT_EQ(reset.peak_bytes_in_use, reset.bytes_in_use);
  { Tensor t = Tensor::empty({small}); }
  const AllocatorStats after = host_allocator_stats();
  EXPECT_GE(after.peak_bytes_in_use, reset.bytes_in_use + small * 4);
  EXPECT_LT(after.peak_bytes_in_use, reset.bytes_in_use + big * 4) << "the 16 MiB block counts no more";
}

TEST(Tensor, Bf16RoundTripRoundsToNearestEven) {
  // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to the even one, 1.
  // 1 + 3·2^-8 lies between 1 + 2^-7 and 1 + 2^-6: the tie goes to 1 + 2^-6 (even mantissa).
  Tensor t = Tensor::from_vector({1.0f + 1.0f / 256, 1.0f + 3.0f / 256, -2.5f, 3.0e38f}, {4});
  const std::vector<float> back = t.to(DType::BF16).to(DType::F32).to_vector();
  EXPECT_EQ(back[0], 1.0f);
  EXPECT_EQ(back[1], 1.0f + 1.0f / 64);
  EXPECT_EQ(back[2], -2.5f);
  EXPECT_NEAR(back[3], 3.0e38f, 3.0e38f / 128);
}

TEST(Tensor, DataWithWrongTypeThrows) {
  Tensor t = Tensor::zeros({2});
  EXPECT_THROW(t.data<int32_t>(), Error);
}

TEST(Tensor, CudaWithoutGpuIsAClearError) {
  std::string why;
  if (cuda_available(&why)) GTEST_SKIP() << "a GPU is present";
  try {
    Tensor::empty({2}, DType::F32, Device::cuda(0));
    FAIL() << "allocating on cuda:0 without a GPU did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cuda:0"), std::string::npos) << e.what();
  }
}

TEST(Rng, StreamsAreReproducibleAndIndependent) {
  Tensor a = Tensor::empty({1000}), b = Tensor::empty({1000}), c = Tensor::empty({1000});
  Generator g1(42, 0), g2(42, 0), g3(42, 1);
  g1.fill_normal(a, 0.0f, 1.0f);
  g2.fill_normal(b, 0.0f, 1.0f);
  g3.fill_normal(c, 0.0f, 1.0f);
  EXPECT_EQ(a.to_vector(), b.to_vector());
  EXPECT_NE(a.to_vector(), c.to_vector());
  EXPECT_EQ(g1.state(), g2.state());
}

TEST(Rng, NormalHasRightMoments) {
  Tensor t = Tensor::empty({200000});
  Generator gen(7, 0);
  gen.fill_normal(t, 1.0f, 2.0f);
  double s = 0, s2 = 0;
  for (float v : t.to_vector()) {
    s += v;
    s2 += static_cast<double>(v) * v;
  }
  const double mean = s / 200000, var = s2 / 200000 - mean * mean;
  // Standard errors: mean 2/√n = 0.0045, variance ≈ 4·√(2/n) = 0.0126; bands of about 5 sigma.
  EXPECT_NEAR(mean, 1.0, 0.025);
  EXPECT_NEAR(var, 4.0, 0.07);
}

TEST(Rng, FillDoesNotDependOnThreadCount) {
  // Element i is a function of (seed, stream, offset, i) only; compare against per-element draws.
  Tensor t = Tensor::empty({100001});
  Generator gen(3, 2);
  gen.fill_uniform(t, 0.0f, 1.0f);
  const std::vector<float> v = t.to_vector();
  for (int64_t i : {int64_t{0}, int64_t{1}, int64_t{4}, int64_t{77777}, int64_t{100000}}) {
    Tensor one = Tensor::empty({1});
    Generator g(3, 2);
    g.reserve(static_cast<uint64_t>(i / 4));
    Tensor four = Tensor::empty({4});
    g.fill_uniform(four, 0.0f, 1.0f);
    EXPECT_EQ(v[static_cast<size_t>(i)], four.to_vector()[static_cast<size_t>(i % 4)]);
  }
}

TEST(Rng, NextBelowIsInRange) {
  Generator gen(1, 1);
  for (int i = 0; i < 1000; ++i) EXPECT_LT(gen.next_below(7), 7u);
}

}  // namespace
}  // namespace kraken::runtime
