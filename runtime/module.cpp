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
    Tensor target = p.spec.shard.sharded()
                        ? Tensor::empty(logical_shape(p.tensor.shape(), p.spec.shard), DType::F32, p.tensor.device())
                        : p.tensor;
    switch (p.spec.init) {
      case ParamSpec::Init::Normal: generator.fill_normal(target, 0.0f, p.spec.init_std); break;
      case ParamSpec::Init::Zeros: target.zero_(); break;
      case ParamSpec::Init::Ones: target.fill_(1.0f); break;
    }
    if (p.spec.shard.sharded()) p.tensor.copy_from(take_shard(target, p.spec.shard));
  }
}

namespace {

// The logical tensor as (outer, blocks, parts, piece, inner) around the sharded dimension.
struct ShardGeometry {
  int64_t outer = 1, inner = 1, piece = 0;
};

ShardGeometry geometry(const Shape& logical, const ShardSpec& s) {
  const int64_t d = s.dim;
  KRAKEN_CHECK(d >= 0 && d < static_cast<int64_t>(logical.size()), "shard dimension ", d, " of ", shape_str(logical));
  const int64_t extent = logical[static_cast<size_t>(d)];
  if (extent % (static_cast<int64_t>(s.blocks) * s.parts) != 0)
    KRAKEN_THROW("a tensor of shape ", shape_str(logical), " cannot be cut into ", s.parts, " pieces of ", s.blocks,
                 " blocks along dimension ", d);
  ShardGeometry g;
  for (int64_t i = 0; i < d; ++i) g.outer *= logical[static_cast<size_t>(i)];
  for (size_t i = static_cast<size_t>(d) + 1; i < logical.size(); ++i) g.inner *= logical[i];
  g.piece = extent / (static_cast<int64_t>(s.blocks) * s.parts);
  return g;
}

}  // namespace

Shape logical_shape(const Shape& local, const ShardSpec& shard) {
  Shape out = local;
  KRAKEN_CHECK(shard.dim >= 0 && shard.dim < static_cast<int>(out.size()));
  out[static_cast<size_t>(shard.dim)] *= shard.parts;
  return out;
}

Tensor take_shard(const Tensor& logical, const ShardSpec& shard) {
  if (!shard.sharded()) return logical.clone();
  const ShardGeometry g = geometry(logical.shape(), shard);
  Shape local = logical.shape();
  local[static_cast<size_t>(shard.dim)] /= shard.parts;
  Tensor out = Tensor::empty(local, logical.dtype(), logical.device());
  const size_t elem = dtype_size(logical.dtype());
  const size_t width = static_cast<size_t>(g.piece * g.inner) * elem;
  // Row (o, block) of the output is piece `index` of row (o, block) of the input.
  copy_2d(out.data_ptr(), width,
          static_cast<const char*>(logical.data_ptr()) + static_cast<size_t>(shard.index) * width,
          width * static_cast<size_t>(shard.parts), width, static_cast<size_t>(g.outer * shard.blocks),
          logical.device());
  return out;
}

Tensor join_shards(const std::vector<Tensor>& pieces, const ShardSpec& shard) {
  KRAKEN_CHECK(static_cast<int>(pieces.size()) == shard.parts, pieces.size(), " pieces for ", shard.parts, " parts");
  if (!shard.sharded()) return pieces[0].clone();
  const Shape logical = logical_shape(pieces[0].shape(), shard);
  const ShardGeometry g = geometry(logical, shard);
  Tensor out = Tensor::empty(logical, pieces[0].dtype(), pieces[0].device());
  const size_t elem = dtype_size(out.dtype());
  const size_t width = static_cast<size_t>(g.piece * g.inner) * elem;
  for (int i = 0; i < shard.parts; ++i) {
    if (pieces[static_cast<size_t>(i)].shape() != pieces[0].shape())
      KRAKEN_THROW("join_shards: piece ", i, " has shape ", shape_str(pieces[static_cast<size_t>(i)].shape()),
                   ", piece 0 has ", shape_str(pieces[0].shape()));
    copy_2d(static_cast<char*>(out.data_ptr()) + static_cast<size_t>(i) * width, width * static_cast<size_t>(shard.parts),
            pieces[static_cast<size_t>(i)].data_ptr(), width, width, static_cast<size_t>(g.outer * shard.blocks),
            out.device());
  }
  return out;
}

void Module::zero_grad() {
  std::vector<Tensor> grads;
  for (const Tensor& t : parameters())
    if (t.impl()->grad) grads.emplace_back(t.impl()->grad);
  zero_all(grads);
}

void Module::release_grads(int64_t min_elements) {
  std::vector<Tensor> zeroed;
  for (const Tensor& t : parameters()) {
    std::shared_ptr<TensorImpl>& grad = t.impl()->grad;
    if (!grad) continue;
    // Held by this parameter alone: no other handle on the gradient, no view of its memory.
    const bool alone = grad.use_count() == 1 && grad->storage.use_count() == 1 && grad->offset == 0;
    if (alone && grad->numel >= min_elements) grad.reset();
    else zeroed.emplace_back(grad);
  }
  zero_all(zeroed);
}

}  // namespace kraken::runtime
