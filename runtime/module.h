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

// How the tensor a process holds relates to the logical parameter under tensor parallelism. The
// logical tensor's dimension `dim` holds `blocks` equal blocks (3 for a q|k|v weight, else 1); each
// block is cut into `parts` equal pieces and this process holds piece `index` of every block, side by
// side. parts = 1 is the whole tensor. Checkpoints store logical tensors, so a run can resume under
// another layout: take_shard cuts a process's piece out, join_shards puts the pieces back together.
struct ShardSpec {
  int dim = 0;
  int parts = 1;
  int index = 0;
  int blocks = 1;
  bool sharded() const { return parts > 1; }
};

struct ParamSpec {
  enum class Init { Normal, Zeros, Ones };
  Init init = Init::Normal;
  float init_std = 0.02f;     // for Init::Normal
  bool weight_decay = true;   // GPT-2: matrices decay; biases, LayerNorm and embeddings do not
  ShardSpec shard;            // this process's piece of the logical tensor
  // The same tensor lives, identical, on the other tensor-parallel ranks (embeddings, LayerNorms,
  // biases after a reduction): a global gradient norm must count it once, not once per rank.
  bool replicated = false;
  // A copy of a parameter owned elsewhere (the LM head's tied wte on the last pipeline stage): its
  // gradient is summed into the owner's and it is not counted or saved twice.
  bool tied_copy = false;
};

runtime::Shape logical_shape(const runtime::Shape& local, const ShardSpec& shard);
// This process's piece of a logical tensor (a new tensor on the same device).
Tensor take_shard(const Tensor& logical, const ShardSpec& shard);
// The logical tensor from all pieces, pieces[i] being piece i (its spec is `shard` with index = i).
Tensor join_shards(const std::vector<Tensor>& pieces, const ShardSpec& shard);

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
  // a hash of its name, and a shard draws the whole logical tensor and keeps its piece, so initial
  // values do not depend on the layout: a model split over tensor- or pipeline-parallel ranks starts
  // from exactly the values of the whole model in one process.
  void initialize(uint64_t seed);
  static uint64_t name_stream(const std::string& name);  // FNV-1a of the name
  void zero_grad();  // every parameter's gradient zeroed in place (one launch per device on a GPU)
  // Between optimizer steps, instead of zero_grad: each gradient buffer of at least
  // kReleasedGradientMinElements that its parameter holds alone goes back to the allocator, so that the
  // next backward's first contribution becomes the gradient as it is (a cast of the bf16 gradient, for
  // the mixed-precision model's weights) where after zero_grad it is added to zeros: one pass writing
  // zeros and one reading them saved, 8 bytes a parameter (GPT-2 124M: ~1 GB a step). Every other
  // gradient is zeroed in place: the small ones (a new zeroed buffer each would be a launch each), and
  // those whose memory something else shares (a data-parallel bucket's views, a handle kept elsewhere),
  // which must keep their buffer. A parameter the next backward does not reach then has no gradient
  // where zero_grad would have left zeros. (`min_elements` other than the default: for tests, whose
  // tiny models would otherwise release nothing.)
  static constexpr int64_t kReleasedGradientMinElements = int64_t{1} << 16;
  void release_grads(int64_t min_elements = kReleasedGradientMinElements);

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
