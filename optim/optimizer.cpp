// The Optimizer base: parameter checks, stepping with .grad(), named-state loading, the factory.
#include "optim/optimizer.h"

#include <map>
#include <set>

#include "kernels/elementwise.h"
#include "kernels/error.h"
#include "optim/adamw.h"
#include "optim/sgd.h"
#include "runtime/dispatch.h"

namespace kraken::optim {

using runtime::DType;
using runtime::Tensor;

std::vector<ParamRef> param_refs(const std::vector<runtime::NamedParameter>& params) {
  std::vector<ParamRef> refs;
  refs.reserve(params.size());
  for (const auto& p : params) refs.push_back({p.name, p.tensor, p.spec.weight_decay});
  return refs;
}

Optimizer::Optimizer(std::vector<ParamRef> params) : params_(std::move(params)) {
  std::set<std::string> seen;
  for (size_t i = 0; i < params_.size(); ++i) {
    const ParamRef& p = params_[i];
    if (p.name.empty()) KRAKEN_THROW("optimizer: parameter ", i, " has no name (state names are built from it)");
    if (!seen.insert(p.name).second) KRAKEN_THROW("optimizer: parameter name '", p.name, "' appears twice");
    if (!p.param.defined()) KRAKEN_THROW("optimizer: parameter '", p.name, "' is an undefined tensor");
    if (p.param.dtype() != DType::F32)
      KRAKEN_THROW("optimizer: parameter '", p.name, "' is ", p.param.describe(), "; master weights must be f32");
  }
}

Optimizer::~Optimizer() = default;

void Optimizer::step(float lr) {
  std::vector<Tensor> grads;
  grads.reserve(params_.size());
  for (const ParamRef& p : params_) {
    Tensor g = p.param.grad();
    if (!g.defined())
      KRAKEN_THROW(name(), ".step: parameter '", p.name, "' has no gradient (did backward reach it?)");
    grads.push_back(g);
  }
  step(grads, lr);
}

void Optimizer::check_grads(const std::vector<Tensor>& grads) const {
  if (grads.size() != params_.size())
    KRAKEN_THROW(name(), ".step: ", grads.size(), " gradients for ", params_.size(), " parameters");
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& g = grads[i];
    const ParamRef& p = params_[i];
    if (!g.defined()) KRAKEN_THROW(name(), ".step: the gradient of '", p.name, "' is undefined");
    if (g.dtype() != DType::F32 || g.shape() != p.param.shape() || g.device() != p.param.device())
      KRAKEN_THROW(name(), ".step: the gradient of '", p.name, "' is ", g.describe(), ", expected ",
                   p.param.describe());
  }
}

Tensor Optimizer::zeros_like_param(size_t i) const {
  return Tensor::zeros(params_[i].param.shape(), DType::F32, params_[i].param.device());
}

void Optimizer::set_compute_copies(std::vector<Tensor> copies) {
  if (!copies.empty() && copies.size() != params_.size())
    KRAKEN_THROW(name(), ": ", copies.size(), " compute copies for ", params_.size(), " parameters");
  for (size_t i = 0; i < copies.size(); ++i) {
    const Tensor& c = copies[i];
    if (!c.defined()) continue;
    const Tensor& p = params_[i].param;
    if (c.dtype() != DType::BF16 || c.shape() != p.shape() || c.device() != p.device())
      KRAKEN_THROW(name(), ": the compute copy of ", params_[i].name, " is ", c.describe(),
                   "; expected a bf16 tensor shaped and placed like the parameter, ", p.describe());
  }
  copies_ = std::move(copies);
}

uint16_t* Optimizer::copy_ptr(size_t i) const {
  return i < copies_.size() && copies_[i].defined() ? copies_[i].data<uint16_t>() : nullptr;
}

void Optimizer::write_copy(size_t i) const {
  uint16_t* copy = copy_ptr(i);
  if (!copy) return;
  const Tensor& p = params_[i].param;
  KRAKEN_ON_DEVICE(p.device(), kernels::cast_f32_to_bf16_cpu(copy, p.data<float>(), p.numel()),
                   kernels::cast_f32_to_bf16_cuda(copy, p.data<float>(), p.numel(), runtime::stream_of(p)));
}

bool Optimizer::params_on_one_gpu() const {
  if (params_.empty() || params_[0].param.device().is_cpu()) return false;
  for (const ParamRef& p : params_)
    if (p.param.device() != params_[0].param.device()) return false;
  return true;
}

int64_t Optimizer::parse_step(const nlohmann::json& scalars) const {
  if (!scalars.is_object()) KRAKEN_THROW(name(), " state: the scalars are not a JSON object");
  const auto type = scalars.find("type");
  if (type == scalars.end() || !type->is_string() || type->get<std::string>() != name())
    KRAKEN_THROW(name(), " state: the checkpoint holds the state of optimizer ",
                 type == scalars.end() ? std::string("(no type)") : type->dump(), ", not '", name(), "'");
  const auto step = scalars.find("step");
  if (step == scalars.end() || !step->is_number_integer() || step->get<int64_t>() < 0)
    KRAKEN_THROW(name(), " state: 'step' must be a non-negative integer, got ",
                 step == scalars.end() ? std::string("nothing") : step->dump());
  return step->get<int64_t>();
}

void load_named_tensors(const std::string& who, const NamedTensors& targets, const NamedTensors& given) {
  std::map<std::string, const Tensor*> by_name;
  for (const auto& [name, t] : given) {
    if (!by_name.emplace(name, &t).second) KRAKEN_THROW(who, ": tensor '", name, "' is given twice");
  }
  for (const auto& [name, target] : targets) {
    auto it = by_name.find(name);
    if (it == by_name.end()) KRAKEN_THROW(who, ": missing tensor '", name, "'");
    const Tensor& src = *it->second;
    if (!src.defined()) KRAKEN_THROW(who, ": tensor '", name, "' is undefined");
    if (src.shape() != target.shape() || src.dtype() != target.dtype())
      KRAKEN_THROW(who, ": tensor '", name, "' is ", src.describe(), ", expected ", target.describe());
  }
  if (by_name.size() != targets.size()) {
    std::set<std::string> expected;
    for (const auto& t : targets) expected.insert(t.first);
    for (const auto& [name, t] : given)
      if (!expected.count(name)) KRAKEN_THROW(who, ": unexpected tensor '", name, "'");
  }
  // Copy only after everything checked, so a bad checkpoint leaves the state untouched.
  for (const auto& [name, target] : targets) {
    Tensor dst = target;
    dst.copy_from(*by_name.at(name));
  }
}

NamedTensors clone_named_tensors(const NamedTensors& tensors) {
  NamedTensors out;
  out.reserve(tensors.size());
  for (const auto& [name, t] : tensors) out.emplace_back(name, t.clone());
  return out;
}

std::unique_ptr<Optimizer> make_optimizer(const OptimizerOptions& options, std::vector<ParamRef> params) {
  if (options.name == "adamw") return std::make_unique<AdamW>(std::move(params), options.adamw);
  if (options.name == "sgd") return std::make_unique<Sgd>(std::move(params), options.sgd);
  KRAKEN_THROW("optimizer: unknown name '", options.name, "' (expected \"adamw\" or \"sgd\")");
}

}  // namespace kraken::optim
