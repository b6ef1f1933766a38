// AdamW: fused updates (kernels/optimizer.h), dispatched on each parameter's device; on one GPU, all
// parameters in a few multi-tensor launches.
#include "optim/adamw.h"

#include "kernels/optimizer.h"
#include "runtime/dispatch.h"

namespace kraken::optim {

using runtime::Tensor;

AdamW::AdamW(std::vector<ParamRef> params, const AdamWOptions& options)
    : Optimizer(std::move(params)), options_(options) {
  if (!(options_.beta1 >= 0.0f && options_.beta1 < 1.0f)) KRAKEN_THROW("adamw: beta1 must be in [0, 1), got ", options_.beta1);
  if (!(options_.beta2 >= 0.0f && options_.beta2 < 1.0f)) KRAKEN_THROW("adamw: beta2 must be in [0, 1), got ", options_.beta2);
  if (!(options_.eps > 0.0f)) KRAKEN_THROW("adamw: eps must be > 0, got ", options_.eps);
  if (!(options_.weight_decay >= 0.0f)) KRAKEN_THROW("adamw: weight_decay must be >= 0, got ", options_.weight_decay);
  for (size_t i = 0; i < params_.size(); ++i) {
    exp_avg_.push_back(zeros_like_param(i));
    exp_avg_sq_.push_back(zeros_like_param(i));
  }
}

void AdamW::step(const std::vector<Tensor>& grads, float lr, float grad_scale) {
  check_grads(grads);
  const int64_t t = steps_ + 1;  // the bias corrections count steps from 1
  const AdamWOptions& o = options_;
  // Parameters on one GPU update in a few launches instead of one each: the same arithmetic per element
  // (kernels/optimizer.h).
  if (params_on_one_gpu()) {
    std::vector<kernels::AdamWSlice> slices;
    for (size_t i = 0; i < params_.size(); ++i) {
      slices.push_back({params_[i].param.data<float>(), grads[i].data<float>(), exp_avg_[i].data<float>(),
                        exp_avg_sq_[i].data<float>(), params_[i].param.numel(),
                        params_[i].weight_decay ? o.weight_decay : 0.0f, copy_ptr(i)});
    }
    KRAKEN_CUDA_ONLY(params_[0].param.device(),
                     kernels::adamw_update_many_cuda(slices.data(), static_cast<int64_t>(slices.size()), lr, o.beta1,
                                                     o.beta2, o.eps, t, runtime::stream_of(params_[0].param),
                                                     grad_scale));
    steps_ = t;
    return;
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i].param;
    const float wd = params_[i].weight_decay ? o.weight_decay : 0.0f;
    float* m = exp_avg_[i].data<float>();
    float* v = exp_avg_sq_[i].data<float>();
    KRAKEN_ON_DEVICE(p.device(),
                     kernels::adamw_update_cpu(p.data<float>(), grads[i].data<float>(), m, v, p.numel(), lr, o.beta1,
                                               o.beta2, o.eps, wd, t, grad_scale),
                     kernels::adamw_update_cuda(p.data<float>(), grads[i].data<float>(), m, v, p.numel(), lr, o.beta1,
                                                o.beta2, o.eps, wd, t, runtime::stream_of(p), grad_scale));
    write_copy(i);
  }
  steps_ = t;
}

NamedTensors AdamW::state_tensors() const {
  NamedTensors out;
  for (size_t i = 0; i < params_.size(); ++i) out.emplace_back("exp_avg." + params_[i].name, exp_avg_[i]);
  for (size_t i = 0; i < params_.size(); ++i) out.emplace_back("exp_avg_sq." + params_[i].name, exp_avg_sq_[i]);
  return out;
}

nlohmann::json AdamW::state_scalars() const {
  return {{"type", name()},         {"step", steps_},        {"beta1", options_.beta1},
          {"beta2", options_.beta2}, {"eps", options_.eps}, {"weight_decay", options_.weight_decay}};
}

void AdamW::load_state(const NamedTensors& tensors, const nlohmann::json& scalars) {
  const int64_t step = parse_step(scalars);
  load_named_tensors("adamw state", state_tensors(), tensors);
  steps_ = step;
}

std::unique_ptr<Optimizer> AdamW::clone() const {
  auto copy = std::make_unique<AdamW>(params_, options_);
  copy->steps_ = steps_;
  for (size_t i = 0; i < params_.size(); ++i) {
    copy->exp_avg_[i].copy_from(exp_avg_[i]);
    copy->exp_avg_sq_[i].copy_from(exp_avg_sq_[i]);
  }
  return copy;
}

}  // namespace kraken::optim
