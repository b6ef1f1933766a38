// Module: a named tree of parameters, as PyTorch's nn.Module but without magic.
//
// A module registers its parameters and child modules in the order it creates them; named_parameters()
// walks that order and joins names with dots ("h.3.1.attn.c_attn.weight"), which makes the names
// stable: they are the checkpoint keys and the export names. How a parameter is initialised, whether it
// takes weight decay, and along which dimension tensor parallelism would split it are properties of
// its ParamSpec, never of its position in a list.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "runtime/rng.h"
#include "runtime/tensor.h"

namespace kraken::runtime {

struct ParamSpec {
  enum class Init { Normal, Zeros, Ones };
  Init init = Init::Normal;
  float init_std = 0.02f;     // for Init::Normal
  bool weight_decay = true;   // GPT-2: matrices decay; biases, LayerNorm and embeddings do not
  int split_dim = -1;         // dimension Megatron-style tensor parallelism splits (-1: replicated)
};

struct NamedParameter {
  std::string name;
  Tensor tensor;
  ParamSpec spec;
};

class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // Every parameter of this module and its children, depth first in registration order.
  std::vector<NamedParameter> named_parameters() const;
  std::vector<Tensor> parameters() const;
  int64_t parameter_count() const;
  // Fills every parameter as its spec says. Each parameter draws from its own Philox stream, keyed by
  // a hash of its name, so its initial values do not depend on which other parameters exist in this
  // process: a model split over tensor- or pipeline-parallel ranks starts from exactly the values of
  // the whole model in one process.
  void initialize(uint64_t seed);
  static uint64_t name_stream(const std::string& name);  // FNV-1a of the name
  void zero_grad();

 protected:
  // Creates an f32 leaf (requires_grad) on `device` and registers it under `name`.
  Tensor register_parameter(const std::string& name, const Shape& shape, const ParamSpec& spec,
                            const Device& device = Device::cpu());
  // Registers a child; the Module keeps ownership and returns a reference to it.
  template <typename M>
  M& register_module(const std::string& name, std::unique_ptr<M> child) {
    M& ref = *child;
    children_.push_back({name, std::move(child)});
    return ref;
  }

 private:
  void collect(const std::string& prefix, std::vector<NamedParameter>* out) const;
  std::vector<NamedParameter> params_;
  std::vector<std::pair<std::string, std::unique_ptr<Module>>> children_;
};

}  // namespace kraken::runtime
