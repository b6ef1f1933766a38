// The progress line (train/metrics.h) and where its MFU comes from (train/auto_plan.h).
#include <gtest/gtest.h>

#include <string>

#include "train/auto_plan.h"
#include "train/metrics.h"

namespace kraken::train {
namespace {

TEST(Progress, ShowsMfuOnlyWhenKnown) {
  Progress progress(0, 2, /*enabled=*/true, /*every=*/1);  // not a terminal here: one line per step
  testing::internal::CaptureStdout();
  progress.update(0, 5.25, 1e-3, 12345.0, 0.2417);
  progress.update(1, 5.0, 1e-3, 12345.0);  // a CPU run: no MFU
  const std::string out = testing::internal::GetCapturedStdout();
  EXPECT_NE(out.find("step 1/2  loss 5.2500  lr 1.00e-03  12345 tok/s  MFU 24.2%  ETA"), std::string::npos) << out;
  EXPECT_NE(out.find("step 2/2  loss 5.0000  lr 1.00e-03  12345 tok/s  ETA"), std::string::npos) << out;
}

TEST(GpuTypes, NamesFromTheCudaRuntimeAndNvidiaSmiMapToThePlannersTable) {
  EXPECT_EQ(gpu_type_of_name("NVIDIA H100 80GB HBM3"), "H100");
  EXPECT_EQ(gpu_type_of_name("NVIDIA H200"), "H200");
  EXPECT_EQ(gpu_type_of_name("NVIDIA A100-SXM4-80GB"), "A100-80");
  EXPECT_EQ(gpu_type_of_name("NVIDIA A100-SXM4-40GB"), "A100-40");
  EXPECT_EQ(gpu_type_of_name("NVIDIA A100-SXM4-80GB, 81920 MiB"), "A100-80");
  EXPECT_EQ(gpu_type_of_name("Tesla V100-SXM2-16GB"), "V100");
  EXPECT_EQ(gpu_type_of_name("NVIDIA GeForce RTX 4090"), "");
  EXPECT_EQ(gpu_type_of_name(""), "");
  EXPECT_DOUBLE_EQ(gpu_peak_flops("NVIDIA H100 80GB HBM3"), 989.4e12);
  EXPECT_DOUBLE_EQ(gpu_peak_flops("NVIDIA A100-SXM4-40GB"), 312e12);
  EXPECT_EQ(gpu_peak_flops("NVIDIA GeForce RTX 4090"), 0.0);  // unknown: the trainer shows no MFU
}

}  // namespace
}  // namespace kraken::train
