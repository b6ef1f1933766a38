// `device = "cuda"` end to end through the Trainer: 20 steps on the GPU track the CPU's losses, a run
// resumed from a GPU checkpoint continues bit-identically, and a GPU checkpoint resumes on the CPU.
// Skips where there is no GPU.
//
// Why the tracking tolerance is 1e-5 relative: both runs start from the same seed (weights equal to a
// few ulp: the GPU's normal fill uses CUDA's logf/cosf, nn_cuda_test.cpp) with identical data and
// dropout masks, and every op agrees to rounding (model_cuda_test.cpp: logits within ~1e-6 of their
// scale). Measured on the CPU with this config: perturbing every weight by up to 16 ulp after the first
// step moves none of the 19 following losses by more than one ulp of the loss (9.5e-8 relative), so
// rounding does not grow over 20 steps here. 1e-5 is about 20 ulp of a loss near 5: ten times what
// per-op rounding can produce, and far below what a real error does (a wrong mask, scale or gradient
// moves the losses by 1e-3 or more within a few steps).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/shard.h"
#include "runtime/allocator.h"
#include "runtime/rng.h"
#include "runtime/safetensors.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/support/temp_dir.h"
#include "train/auto_plan.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/trainer.h"
#include "tests/support/fixtures.h"

namespace kraken::train {
namespace {

using testing::TempDir;

void write_shards(const TempDir& dir, int64_t vocab) { testing::write_counting_shards(dir.path(), vocab); }

// Degree 2 with dropout, as the CPU trainer tests use it; T = 16 and C = 32 are small on purpose (the
// CPU side of each comparison runs too).
// fp32 unless asked: "auto" would be bf16 on the GPU and fp32 on the CPU.
std::string tiny_config(const TempDir& dir, const std::string& device, const std::string& optim = "name = \"adamw\"",
                        const std::string& precision = "fp32") {
  return "[model]\nn_layer = 2\nn_embd = 32\nn_head = 4\ndegree = 2\ncontext = 16\nvocab_size = 200\ndropout = 0.1\n"
         "[data]\ntrain = \"" + dir / "train_*.bin" + "\"\nval = \"" + dir / "val_*.bin" + "\"\n"
         "[train]\ndevice = \"" + device + "\"\nprecision = \"" + precision + "\"\nbatch_size = 2\nseq_len = 16\nmax_steps = 20\neval_every = 0\n"
         "eval_batches = 2\nout_dir = \"" + dir / "run" + "\"\n"
         "[optim]\nlr = 3e-3\nwarmup_steps = 3\n" + optim + "\n";
}

TrainerOptions quiet(int64_t stop_after = -1) {
  TrainerOptions o;
  o.progress = false;
  o.stop_after_steps = stop_after;
  o.handle_signals = false;
  return o;
}

RunSummary train(const std::string& text, int64_t stop_after = -1) {
  Trainer t(parse_config(text, "gpu_test.toml"), quiet(stop_after));
  return t.run();
}

void expect_tracks(const std::vector<double>& dev, const std::vector<double>& cpu, double rel, const std::string& what) {
  ASSERT_EQ(dev.size(), cpu.size()) << what;
  double worst = 0.0;
  size_t at = 0;
  for (size_t i = 0; i < dev.size(); ++i) {
    const double r = std::fabs(dev[i] - cpu[i]) / std::fabs(cpu[i]);
    if (r > worst) worst = r, at = i;
  }
  EXPECT_LE(worst, rel) << what << ": step " << at + 1 << " loss " << dev[at] << " on the device, " << cpu[at]
                        << " on the CPU";
  std::printf("[gpu-vs-cpu] %s: worst relative loss difference %.3g at step %zu (allowed %.3g)\n", what.c_str(), worst,
              at + 1, rel);
}

TEST(GpuTrainer, TwentyStepsTrackTheCpuLosses) {
  KRAKEN_REQUIRE_GPU();
  TempDir a("kraken_gpu_cpu"), b("kraken_gpu_dev");
  write_shards(a, 200);
  write_shards(b, 200);
  const RunSummary cpu = train(tiny_config(a, "cpu"));
  const RunSummary dev = train(tiny_config(b, testing::test_device_name()));
  ASSERT_EQ(cpu.losses.size(), 20u);
  expect_tracks(dev.losses, cpu.losses, 1e-5, "training losses");
  EXPECT_NEAR(dev.val_loss, cpu.val_loss, 1e-5 * cpu.val_loss);  // the evaluation at the end
  EXPECT_LT(dev.losses.back(), dev.losses.front());              // and it learns
  // The step records carry an MFU on a GPU the planner knows (a fraction; tiny here), none on the CPU.
  auto mfus = [](const TempDir& dir) {
    std::vector<double> out;
    std::ifstream in(dir / "run/metrics.jsonl");
    for (std::string line; std::getline(in, line);) {
      const nlohmann::json r = nlohmann::json::parse(line);
      if (r.contains("mfu")) out.push_back(r["mfu"].get<double>());
    }
    return out;
  };
  EXPECT_TRUE(mfus(a).empty());
  if (gpu_peak_flops(runtime::cuda_device_name(0)) > 0.0) {
    const std::vector<double> m = mfus(b);
    ASSERT_EQ(m.size(), 20u);
    for (double x : m) EXPECT_TRUE(x > 0.0 && x < 1.0) << x;
  }
}

// Mixed precision (the GPU's default): 20 steps track the CPU's emulated bf16 run. Both round the same
// quantities; they part where an f32 reorder flips a bf16 rounding. The CPU's bf16 run stays within
// 0.015 of its fp32 run over these steps (tests/train, lr 1e-2); 0.01 relative (0.05 on a loss of 5)
// bounds two bf16 runs with that margin, and fails a broken kernel, which does not track at all.
TEST(GpuTrainer, MixedPrecisionTracksTheCpuMixedPrecisionLosses) {
  KRAKEN_REQUIRE_GPU();
  TempDir a("kraken_gpu_cpu_bf16"), b("kraken_gpu_dev_bf16");
  write_shards(a, 200);
  write_shards(b, 200);
  const RunSummary cpu = train(tiny_config(a, "cpu", "name = \"adamw\"", "bf16"));
  const RunSummary dev = train(tiny_config(b, testing::test_device_name(), "name = \"adamw\"", "auto"));
  ASSERT_EQ(cpu.losses.size(), 20u);
  expect_tracks(dev.losses, cpu.losses, 1e-2, "mixed-precision training losses");
  EXPECT_LT(dev.losses.back(), dev.losses.front());
}

TEST(GpuTrainer, ResumeFromAGpuCheckpointIsBitIdentical) {
  KRAKEN_REQUIRE_GPU();
  // AdamW state, parameters, loader position and dropout offset go through the checkpoint (staged
  // through the host); every GPU kernel is deterministic, so the resumed run repeats the bits, in fp32
  // and in mixed precision (whose bf16 casts are recomputed from the restored f32 masters).
  for (const char* precision : {"fp32", "bf16"})
  for (const char* optim : {"name = \"adamw\"", "name = \"sgd\"\nmomentum = 0.9"}) {
    SCOPED_TRACE(std::string(optim) + ", " + precision);
    TempDir a("kraken_gpu_a"), b("kraken_gpu_b");
    write_shards(a, 200);
    write_shards(b, 200);
    const std::vector<double> full = train(tiny_config(a, testing::test_device_name(), optim, precision)).losses;
    const std::string text = tiny_config(b, testing::test_device_name(), optim, precision);
    const RunSummary first = train(text, 10);
    ASSERT_EQ(first.steps_done, 10);
    const RunSummary second = train(text);  // checkpoint.resume = "auto"
    EXPECT_EQ(second.first_step, 10);
    std::vector<double> resumed = first.losses;
    resumed.insert(resumed.end(), second.losses.begin(), second.losses.end());
    ASSERT_EQ(resumed.size(), full.size());
    for (size_t i = 0; i < full.size(); ++i) EXPECT_EQ(resumed[i], full[i]) << "step " << i + 1;
  }
}

TEST(GpuTrainer, AGpuCheckpointResumesOnTheCpu) {
  KRAKEN_REQUIRE_GPU();
  // The checkpoint holds logical f32 tensors, whatever device wrote them: ten steps on the GPU, then
  // ten on the CPU from its checkpoint, track ten more GPU steps from the same checkpoint.
  TempDir dir("kraken_gpu_ckpt");
  write_shards(dir, 200);
  const std::string gpu_text = tiny_config(dir, testing::test_device_name());
  ASSERT_EQ(train(gpu_text, 10).steps_done, 10);
  const std::string ckpt = CheckpointStore(dir / "run/checkpoints", 3).latest();
  ASSERT_FALSE(ckpt.empty());
  // The saved tensors are finite numbers (a bad device → host staging would show up as garbage).
  for (const auto& [name, t] : runtime::load_safetensors(ckpt + "/model.safetensors", runtime::Device::cpu()))
    for (float v : t.to_vector()) ASSERT_TRUE(std::isfinite(v)) << name;
  std::string cpu_text = tiny_config(dir, "cpu");
  cpu_text += "[checkpoint]\nresume = \"" + ckpt + "\"\ndir = \"" + dir / "cpu_checkpoints" + "\"\n";
  std::string dev_text = gpu_text + "[checkpoint]\nresume = \"" + ckpt + "\"\ndir = \"" + dir / "gpu_checkpoints" + "\"\n";
  const RunSummary on_cpu = train(cpu_text), on_dev = train(dev_text);
  EXPECT_EQ(on_cpu.first_step, 10);
  expect_tracks(on_dev.losses, on_cpu.losses, 1e-5, "steps 11-20 after the GPU checkpoint");
}

}  // namespace
}  // namespace kraken::train
