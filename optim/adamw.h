// AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, ICLR 2019), PyTorch's
// torch.optim.AdamW; the update equations are in kernels/optimizer.h. Decay applies only to ParamRefs
// with weight_decay = true (GPT-2: matrices, not biases, LayerNorm or embeddings).
// State: "exp_avg.<param name>" and "exp_avg_sq.<param name>" per parameter, and the step count t
// shared by all parameters (the bias corrections use it).
#pragma once

#include "optim/optimizer.h"

namespace kraken::optim {

class AdamW final : public Optimizer {
 public:
  AdamW(std::vector<ParamRef> params, const AdamWOptions& options);

  const char* name() const override { return "adamw"; }
  using Optimizer::step;
  void step(const std::vector<runtime::Tensor>& grads, float lr, float grad_scale) override;

  NamedTensors state_tensors() const override;
  nlohmann::json state_scalars() const override;
  void load_state(const NamedTensors& tensors, const nlohmann::json& scalars) override;
  std::unique_ptr<Optimizer> clone() const override;

  const AdamWOptions& options() const { return options_; }

 private:
  AdamWOptions options_;
  std::vector<runtime::Tensor> exp_avg_, exp_avg_sq_;
};

}  // namespace kraken::optim
