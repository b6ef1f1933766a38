// SGD with momentum, dampening, Nesterov and coupled weight decay: PyTorch's torch.optim.SGD, update
// equations in kernels/optimizer.h. Weight decay applies only to ParamRefs with weight_decay = true.
// State: one "momentum_buffer.<param name>" per parameter when momentum ≠ 0 (none otherwise), and the
// step count (the first step copies the gradient into the buffer, as PyTorch does).
#pragma once

#include "optim/optimizer.h"

namespace kraken::optim {

class Sgd final : public Optimizer {
 public:
  Sgd(std::vector<ParamRef> params, const SgdOptions& options);

  const char* name() const override { return "sgd"; }
  using Optimizer::step;
  void step(const std::vector<runtime::Tensor>& grads, float lr, float grad_scale) override;

  NamedTensors state_tensors() const override;
  nlohmann::json state_scalars() const override;
  void load_state(const NamedTensors& tensors, const nlohmann::json& scalars) override;
  std::unique_ptr<Optimizer> clone() const override;

  const SgdOptions& options() const { return options_; }

 private:
  SgdOptions options_;
  std::vector<runtime::Tensor> velocity_;  // empty when momentum == 0
};

}  // namespace kraken::optim
