// SGD: fused updates (kernels/optimizer.h), per parameter on the CPU, a few launches for all of a GPU's.
#include "optim/sgd.h"

#include "kernels/optimizer.h"
#include "runtime/dispatch.h"

namespace kraken::optim {

using runtime::Tensor;

Sgd::Sgd(std::vector<ParamRef> params, const SgdOptions& options) : Optimizer(std::move(params)), options_(options) {
  if (!(options_.momentum >= 0.0f)) KRAKEN_THROW("sgd: momentum must be >= 0, got ", options_.momentum);
  if (!(options_.dampening >= 0.0f && options_.dampening <= 1.0f))
    KRAKEN_THROW("sgd: dampening must be in [0, 1], got ", options_.dampening);
  if (!(options_.weight_decay >= 0.0f)) KRAKEN_THROW("sgd: weight_decay must be >= 0, got ", options_.weight_decay);
  // As PyTorch: Nesterov momentum is defined for undamped momentum only.
  if (options_.nesterov && (options_.momentum <= 0.0f || options_.dampening != 0.0f))
    KRAKEN_THROW("sgd: nesterov needs momentum > 0 and dampening = 0 (momentum ", options_.momentum,
                 ", dampening ", options_.dampening, ")");
  if (options_.momentum != 0.0f) {
    for (size_t i = 0; i < params_.size(); ++i) velocity_.push_back(zeros_like_param(i));
  }
}

void Sgd::step(const std::vector<Tensor>& grads, float lr, float grad_scale) {
  check_grads(grads);
  const bool first = steps_ == 0;
  const SgdOptions& opts = options_;
  // Parameters on one GPU update in a few launches instead of one each, as AdamW does: the same
  // arithmetic per element (kernels/optimizer.h).
  if (params_on_one_gpu()) {
    std::vector<kernels::SgdSlice> slices;
    for (size_t i = 0; i < params_.size(); ++i) {
      slices.push_back({params_[i].param.data<float>(), grads[i].data<float>(),
                        velocity_.empty() ? nullptr : velocity_[i].data<float>(), params_[i].param.numel(),
                        params_[i].weight_decay ? opts.weight_decay : 0.0f, copy_ptr(i)});
    }
    KRAKEN_CUDA_ONLY(params_[0].param.device(),
                     kernels::sgd_update_many_cuda(slices.data(), static_cast<int64_t>(slices.size()), lr,
                                                   opts.momentum, opts.dampening, opts.nesterov, first,
                                                   runtime::stream_of(params_[0].param), grad_scale));
    ++steps_;
    return;
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i].param;
    const float wd = params_[i].weight_decay ? options_.weight_decay : 0.0f;
    float* velocity = velocity_.empty() ? nullptr : velocity_[i].data<float>();
    const SgdOptions& o = options_;
    KRAKEN_ON_DEVICE(p.device(),
                     kernels::sgd_update_cpu(p.data<float>(), grads[i].data<float>(), velocity, p.numel(), lr,
                                             o.momentum, o.dampening, o.nesterov, wd, first, grad_scale),
                     kernels::sgd_update_cuda(p.data<float>(), grads[i].data<float>(), velocity, p.numel(), lr,
                                              o.momentum, o.dampening, o.nesterov, wd, first,
                                              runtime::stream_of(p), grad_scale));
    write_copy(i);
  }
  ++steps_;
}

NamedTensors Sgd::state_tensors() const {
  NamedTensors out;
  for (size_t i = 0; i < velocity_.size(); ++i) out.emplace_back("momentum_buffer." + params_[i].name, velocity_[i]);
  return out;
}

nlohmann::json Sgd::state_scalars() const {
  return {{"type", name()},
          {"step", steps_},
          {"momentum", options_.momentum},
          {"dampening", options_.dampening},
          {"nesterov", options_.nesterov},
          {"weight_decay", options_.weight_decay}};
}

void Sgd::load_state(const NamedTensors& tensors, const nlohmann::json& scalars) {
  const int64_t step = parse_step(scalars);
  load_named_tensors("sgd state", state_tensors(), tensors);
  steps_ = step;
}

std::unique_ptr<Optimizer> Sgd::clone() const {
  auto copy = std::make_unique<Sgd>(params_, options_);
  copy->steps_ = steps_;
  for (size_t i = 0; i < velocity_.size(); ++i) copy->velocity_[i].copy_from(velocity_[i]);
  return copy;
}

}  // namespace kraken::optim
