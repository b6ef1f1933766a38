// Optimizer: the interface the trainer and OptEx use. SGD and AdamW implement it (optim/sgd.h,
// optim/adamw.h); make_optimizer builds one from a small options struct.
//
// Three properties make an optimizer usable by OptEx (optim/optex.h) and by checkpoints:
//   - it steps with any gradients, one tensor per parameter (not necessarily the parameters' .grad()):
//     OptEx feeds it proxy gradients predicted by its estimator;
//   - its whole state is tensors with stable names ("exp_avg.<param name>") plus a few JSON scalars, so a
//     checkpoint saves it and load_state restores it bit for bit;
//   - clone() deep-copies that state over the same parameters.
// Parameters may live on the CPU or a GPU; every update dispatches on the parameter's device.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/module.h"
#include "runtime/tensor.h"

namespace kraken::optim {

// One parameter as the optimizer sees it. weight_decay says whether decay applies (GPT-2: matrices
// yes; biases, LayerNorm and embeddings no), so no optimizer ever guesses from a name or a shape.
struct ParamRef {
  std::string name;
  runtime::Tensor param;
  bool weight_decay = true;
};

// From a Module's named parameters: the name and the ParamSpec's weight_decay flag.
std::vector<ParamRef> param_refs(const std::vector<runtime::NamedParameter>& params);

using NamedTensors = std::vector<std::pair<std::string, runtime::Tensor>>;

class Optimizer {
 public:
  // Parameters must be defined f32 tensors with distinct, non-empty names.
  explicit Optimizer(std::vector<ParamRef> params);
  virtual ~Optimizer();
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  virtual const char* name() const = 0;  // "sgd", "adamw": also the "type" of its state scalars

  // One update of every parameter with the given gradients: one per parameter, in params() order, of
  // the parameter's shape and device (f32, any tensors).
  // `grad_scale` multiplies every gradient inside the update: clipping by global norm without a pass of
  // its own (1 leaves the gradients bit for bit).
  virtual void step(const std::vector<runtime::Tensor>& grads, float lr, float grad_scale) = 0;
  void step(const std::vector<runtime::Tensor>& grads, float lr) { step(grads, lr, 1.0f); }
  // The same with each parameter's accumulated .grad(); a parameter without one is an error.
  void step(float lr);

  // Checkpointing. state_tensors() returns the live state tensors (not copies) under stable names;
  // state_scalars() the step count and the hyper-parameters (informational). load_state copies into
  // the live state after checking that exactly the expected names are there with the expected shapes.
  virtual NamedTensors state_tensors() const = 0;
  virtual nlohmann::json state_scalars() const = 0;
  virtual void load_state(const NamedTensors& tensors, const nlohmann::json& scalars) = 0;

  // A deep copy of the state over the same parameter tensors: stepping the copy moves the parameters
  // and leaves this optimizer's state untouched.
  virtual std::unique_ptr<Optimizer> clone() const = 0;

  const std::vector<ParamRef>& params() const { return params_; }
  int64_t steps() const { return steps_; }  // updates applied so far

  // Mixed precision: bf16 copies of the parameters that every step() rewrites from the updated values,
  // rounded to nearest even (one per parameter in params() order; an undefined one: none) — in the
  // update's own pass where the parameters live on one GPU, else by a cast after it. The model computes
  // with them (models/kraken.h, set_compute_copies_current). Each must be a bf16 tensor of its
  // parameter's shape on its device; clone() takes none; an empty list clears them.
  void set_compute_copies(std::vector<runtime::Tensor> copies);

 protected:
  // Parameter i's bf16 copy (null: none), and the cast that writes it from the parameter (a no-op
  // where there is none) for the updates that do not write it in their own pass.
  uint16_t* copy_ptr(size_t i) const;
  void write_copy(size_t i) const;
  // Throws naming the optimizer and the parameter when grads do not match the parameters.
  void check_grads(const std::vector<runtime::Tensor>& grads) const;
  // A zero f32 tensor shaped and placed like parameter i.
  runtime::Tensor zeros_like_param(size_t i) const;
  // Whether every parameter lives on one GPU (a rank's usual case): then the optimizers update all of
  // them in a few multi-tensor launches instead of one launch each.
  bool params_on_one_gpu() const;
  // Validates state scalars (type, step) and returns the step count they hold.
  int64_t parse_step(const nlohmann::json& scalars) const;

  std::vector<ParamRef> params_;
  int64_t steps_ = 0;
  std::vector<runtime::Tensor> copies_;  // empty, or one (maybe undefined) per parameter
};

// Copies `given` into `targets` (name → live tensor) after checking that the two name sets are equal
// and every shape and dtype matches. `who` names the owner in error messages ("adamw state").
void load_named_tensors(const std::string& who, const NamedTensors& targets, const NamedTensors& given);

// Deep copies of named tensors (same names, fresh storage on the same devices).
NamedTensors clone_named_tensors(const NamedTensors& tensors);

// ---- the factory ---------------------------------------------------------------------------------
struct AdamWOptions {  // PyTorch's defaults
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.01f;  // decoupled; only on ParamRefs with weight_decay = true
};

struct SgdOptions {  // PyTorch's defaults
  float momentum = 0.0f;
  float dampening = 0.0f;
  bool nesterov = false;
  float weight_decay = 0.0f;  // coupled (added to the gradient); only where ParamRef asks for it
};

struct OptimizerOptions {
  std::string name = "adamw";  // "adamw" or "sgd"
  AdamWOptions adamw;
  SgdOptions sgd;
};

std::unique_ptr<Optimizer> make_optimizer(const OptimizerOptions& options, std::vector<ParamRef> params);

}  // namespace kraken::optim
