// Learning-rate schedules at warm-up, peak, mid-decay and end; clipping by global norm.
#include <gtest/gtest.h>

#include <cmath>

#include "optim/clip.h"
#include "optim/schedule.h"

namespace kraken::optim {
namespace {

using runtime::Tensor;

LrSchedule schedule(ScheduleKind kind) {
  LrSchedule s;
  s.kind = kind;
  s.max_lr = 1e-3;
  s.min_lr = 1e-4;
  s.warmup_steps = 10;
  s.decay_steps = 110;
  s.validate();
  return s;
}

TEST(LrSchedule, CosineWarmupPeakAndEnd) {
  const LrSchedule s = schedule(ScheduleKind::Cosine);
  EXPECT_DOUBLE_EQ(s.at(0), 1e-4);   // max·1/10
  EXPECT_DOUBLE_EQ(s.at(4), 5e-4);   // max·5/10
  EXPECT_DOUBLE_EQ(s.at(9), 1e-3);   // the last warm-up step reaches the peak
  EXPECT_DOUBLE_EQ(s.at(10), 1e-3);  // decay starts at the peak (r = 0)
  // r = 1/4: min + ½(1 + cos(π/4))(max − min) = 1e-4 + 0.8535534·9e-4
  EXPECT_NEAR(s.at(35), 1e-4 + 0.5 * (1.0 + std::sqrt(0.5)) * 9e-4, 1e-15);
  EXPECT_NEAR(s.at(60), 5.5e-4, 1e-15);  // r = ½: halfway
  EXPECT_NEAR(s.at(110), 1e-4, 1e-15);   // r = 1: min
  EXPECT_DOUBLE_EQ(s.at(111), 1e-4);
  EXPECT_DOUBLE_EQ(s.at(100000), 1e-4);
}

TEST(LrSchedule, LinearAndConstant) {
  const LrSchedule lin = schedule(ScheduleKind::Linear);
  EXPECT_DOUBLE_EQ(lin.at(0), 1e-4);
  EXPECT_DOUBLE_EQ(lin.at(10), 1e-3);
  EXPECT_NEAR(lin.at(35), 1e-3 - 0.25 * 9e-4, 1e-15);
  EXPECT_NEAR(lin.at(110), 1e-4, 1e-15);
  EXPECT_DOUBLE_EQ(lin.at(500), 1e-4);
  const LrSchedule con = schedule(ScheduleKind::Constant);
  EXPECT_DOUBLE_EQ(con.at(4), 5e-4);
  EXPECT_DOUBLE_EQ(con.at(10), 1e-3);
  EXPECT_DOUBLE_EQ(con.at(100000), 1e-3);
}

TEST(LrSchedule, NoWarmupStartsAtThePeak) {
  LrSchedule s = schedule(ScheduleKind::Cosine);
  s.warmup_steps = 0;
  EXPECT_DOUBLE_EQ(s.at(0), 1e-3);
}

TEST(LrSchedule, InconsistentSettingsAreErrors) {
  LrSchedule s = schedule(ScheduleKind::Cosine);
  s.min_lr = 2e-3;
  EXPECT_THROW(s.validate(), Error);
  s = schedule(ScheduleKind::Linear);
  s.decay_steps = 5;
  try {
    s.validate();
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("decay_steps"), std::string::npos) << e.what();
  }
  EXPECT_THROW(parse_schedule_kind("exponential"), Error);
  EXPECT_EQ(parse_schedule_kind("linear"), ScheduleKind::Linear);
}

TEST(ClipGradNorm, ScalesToMaxNormAndReturnsThePreClipNorm) {
  // ‖(3, 4, 12)‖ = 13 over two tensors.
  std::vector<Tensor> grads = {Tensor::from_vector({3.0f, 4.0f}, {2}), Tensor::from_vector({12.0f}, {1})};
  EXPECT_DOUBLE_EQ(global_grad_norm_squared(grads), 169.0);
  EXPECT_DOUBLE_EQ(global_grad_norm(grads), 13.0);
  const double norm = clip_grad_norm(grads, 6.5);
  EXPECT_DOUBLE_EQ(norm, 13.0);
  const double coef = 6.5 / (13.0 + 1e-6);
  // One f32 multiply each: within half an ulp of the double product.
  EXPECT_NEAR(grads[0].to_vector()[0], 3.0 * coef, 3.0 * 6e-8);
  EXPECT_NEAR(grads[0].to_vector()[1], 4.0 * coef, 4.0 * 6e-8);
  EXPECT_NEAR(grads[1].to_vector()[0], 12.0 * coef, 12.0 * 6e-8);
  EXPECT_LT(global_grad_norm(grads), 6.5);
  EXPECT_NEAR(global_grad_norm(grads), 6.5, 1e-6);
}

TEST(ClipGradNorm, LeavesSmallGradientsAlone) {
  std::vector<Tensor> grads = {Tensor::from_vector({3.0f, 4.0f}, {2})};
  EXPECT_DOUBLE_EQ(clip_grad_norm(grads, 5.0), 5.0);  // norm == max_norm: no clipping
  EXPECT_EQ(grads[0].to_vector(), (std::vector<float>{3.0f, 4.0f}));
  EXPECT_DOUBLE_EQ(clip_coefficient(1.0, 5.0), 1.0);
  EXPECT_THROW(clip_coefficient(1.0, 0.0), Error);
}

TEST(ClipGradNorm, ModelParallelRanksClipWithTheSummedNorm) {
  // Two "ranks" each hold half of the gradient: their partial squared norms add up to the full one,
  // and clipping each half with the global norm equals clipping the whole.
  std::vector<Tensor> whole = {Tensor::from_vector({1.0f, -2.0f, 2.0f, 4.0f}, {4})};
  std::vector<Tensor> left = {Tensor::from_vector({1.0f, -2.0f}, {2})}, right = {Tensor::from_vector({2.0f, 4.0f}, {2})};
  const double norm = std::sqrt(global_grad_norm_squared(left) + global_grad_norm_squared(right));
  EXPECT_DOUBLE_EQ(norm, 5.0);
  clip_grad_norm(whole, 1.0);
  clip_grad_norm_given(left, norm, 1.0);
  clip_grad_norm_given(right, norm, 1.0);
  const std::vector<float> w = whole[0].to_vector();
  EXPECT_EQ(left[0].to_vector(), (std::vector<float>{w[0], w[1]}));
  EXPECT_EQ(right[0].to_vector(), (std::vector<float>{w[2], w[3]}));
}

}  // namespace
}  // namespace kraken::optim
