#include "optim/schedule.h"

#include <cmath>

#include "kernels/error.h"

namespace kraken::optim {

ScheduleKind parse_schedule_kind(const std::string& text) {
  if (text == "constant") return ScheduleKind::Constant;
  if (text == "cosine") return ScheduleKind::Cosine;
  if (text == "linear") return ScheduleKind::Linear;
  KRAKEN_THROW("lr schedule: unknown kind '", text, "' (expected \"constant\", \"cosine\" or \"linear\")");
}

const char* schedule_kind_name(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::Constant: return "constant";
    case ScheduleKind::Cosine: return "cosine";
    case ScheduleKind::Linear: return "linear";
  }
  return "?";
}

void LrSchedule::validate() const {
  if (!(max_lr > 0.0) || !std::isfinite(max_lr)) KRAKEN_THROW("lr schedule: max_lr must be a positive number, got ", max_lr);
  if (!(min_lr >= 0.0) || min_lr > max_lr)
    KRAKEN_THROW("lr schedule: min_lr must be in [0, max_lr = ", max_lr, "], got ", min_lr);
  if (warmup_steps < 0) KRAKEN_THROW("lr schedule: warmup_steps must be >= 0, got ", warmup_steps);
  if (kind != ScheduleKind::Constant && decay_steps < warmup_steps)
    KRAKEN_THROW("lr schedule: decay_steps (", decay_steps, ") must be >= warmup_steps (", warmup_steps, ") for a ",
                 schedule_kind_name(kind), " schedule");
}

double LrSchedule::at(int64_t it) const {
  if (it < warmup_steps) return max_lr * static_cast<double>(it + 1) / static_cast<double>(warmup_steps);
  if (kind == ScheduleKind::Constant) return max_lr;
  if (it > decay_steps) return min_lr;
  // decay_steps == warmup_steps leaves an empty decay interval: the step at it == warmup is max_lr.
  const double span = static_cast<double>(decay_steps - warmup_steps);
  const double r = span > 0.0 ? static_cast<double>(it - warmup_steps) / span : 0.0;
  if (kind == ScheduleKind::Linear) return max_lr + r * (min_lr - max_lr);
  const double coeff = 0.5 * (1.0 + std::cos(M_PI * r));
  return min_lr + coeff * (max_lr - min_lr);
}

}  // namespace kraken::optim
