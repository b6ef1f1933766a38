#include "runtime/module.h"

#include "kernels/error.h"

namespace kraken::runtime {

Tensor Module::register_parameter(const std::string& name, const Shape& shape, const ParamSpec& spec,
                                  const Device& device) {
  for (const NamedParameter& p : params_)
    KRAKEN_CHECK(p.name != name, "parameter '", name, "' registered twice");
  Tensor t = Tensor::zeros(shape, DType::F32, device);
  t.set_requires_grad(true);
  params_.push_back({name, t, spec});
  return t;
}

void Module::collect(const std::string& prefix, std::vector<NamedParameter>* out) const {
  for (const NamedParameter& p : params_) out->push_back({prefix + p.name, p.tensor, p.spec});
  for (const auto& [name, child] : children_) child->collect(prefix + name + ".", out);
}

std::vector<NamedParameter> Module::named_parameters() const {
  std::vector<NamedParameter> out;
  collect("", &out);
  for (NamedParameter& p : out) p.tensor.set_name(p.name);
  return out;
}

std::vector<Tensor> Module::parameters() const {
  std::vector<Tensor> out;
  for (const NamedParameter& p : named_parameters()) out.push_back(p.tensor);
  return out;
}

int64_t Module::parameter_count() const {
  int64_t n = 0;
  for (const NamedParameter& p : named_parameters()) n += p.tensor.numel();
  return n;
}

uint64_t Module::name_stream(const std::string& name) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : name) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

void Module::initialize(uint64_t seed) {
  for (NamedParameter& p : named_parameters()) {
    Generator generator(seed, name_stream(p.name));
    switch (p.spec.init) {
      case ParamSpec::Init::Normal: generator.fill_normal(p.tensor, 0.0f, p.spec.init_std); break;
      case ParamSpec::Init::Zeros: p.tensor.zero_(); break;
      case ParamSpec::Init::Ones: p.tensor.fill_(1.0f); break;
    }
  }
}

void Module::zero_grad() {
  for (const Tensor& t : parameters()) t.impl()->grad ? Tensor(t.impl()->grad).zero_() : void();
}

}  // namespace kraken::runtime
