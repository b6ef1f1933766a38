// Learning-rate schedules with linear warm-up (nanoGPT's get_lr, llm.c's warm-up convention):
//   it < warmup:                 lr = max_lr·(it + 1)/warmup
//   warmup <= it <= decay_steps: constant: max_lr
//                                cosine:   min_lr + ½(1 + cos(π·r))·(max_lr − min_lr)
//                                linear:   max_lr + r·(min_lr − max_lr)
//                                with r = (it − warmup)/(decay_steps − warmup) ∈ [0, 1]
//   it > decay_steps:            min_lr (cosine, linear)
// `it` counts optimizer steps from 0.
#pragma once

#include <cstdint>
#include <string>

namespace kraken::optim {

enum class ScheduleKind { Constant, Cosine, Linear };

// "constant", "cosine", "linear"; anything else throws naming the text and the choices.
ScheduleKind parse_schedule_kind(const std::string& text);
const char* schedule_kind_name(ScheduleKind kind);

struct LrSchedule {
  ScheduleKind kind = ScheduleKind::Cosine;
  double max_lr = 6e-4;
  double min_lr = 6e-5;
  int64_t warmup_steps = 0;
  int64_t decay_steps = 0;  // the step where cosine/linear decay reaches min_lr (unused by constant)

  // Throws naming the field when the numbers are inconsistent (negative, min_lr > max_lr,
  // decay_steps < warmup_steps for a decaying schedule).
  void validate() const;
  double at(int64_t it) const;
};

}  // namespace kraken::optim
