#include "train/sharded_state.h"

#include <cstring>
#include <map>

#include <nlohmann/json.hpp>

#include "kernels/error.h"

namespace kraken::train {

using runtime::Tensor;

std::vector<LocalTensor> with_param_specs(const NamedTensors& tensors, const std::vector<runtime::NamedParameter>& params) {
  std::map<std::string, const runtime::NamedParameter*> by_name;
  for (const auto& p : params) by_name[p.name] = &p;
  std::vector<LocalTensor> out;
  for (const auto& [name, tensor] : tensors) {
    LocalTensor t{name, tensor, {}};
    // "exp_avg.h.0.attn.c_attn.weight" → the parameter "h.0.attn.c_attn.weight": try every suffix
    // after a dot, longest first.
    for (size_t dot = name.find('.'); dot != std::string::npos; dot = name.find('.', dot + 1)) {
      auto it = by_name.find(name.substr(dot + 1));
      if (it != by_name.end()) {
        t.spec = it->second->spec;
        break;
      }
    }
    if (by_name.count(name)) t.spec = by_name[name]->spec;
    out.push_back(std::move(t));
  }
  return out;
}

namespace {

// A list of named f32 tensors as two messages: a JSON header (names and shapes) as bytes in an i32
// tensor, and all the data in one f32 tensor.
void send_named(parallel::Communicator& comm, int dst, const NamedTensors& tensors) {
  nlohmann::json header = nlohmann::json::array();
  int64_t total = 0;
  for (const auto& [name, t] : tensors) {
    KRAKEN_CHECK(t.dtype() == runtime::DType::F32, "checkpoint tensors are f32: ", name);
    header.push_back({{"name", name}, {"shape", t.shape()}});
    total += t.numel();
  }
  const std::string text = header.dump();
  Tensor len = Tensor::from_ints({static_cast<int32_t>(text.size()), static_cast<int32_t>(total)}, {2});
  comm.send(len, dst, 1);
  std::vector<int32_t> chars(text.begin(), text.end());
  comm.send(Tensor::from_ints(chars, {static_cast<int64_t>(chars.size())}), dst, 2);
  Tensor data = Tensor::empty({total});
  int64_t off = 0;
  for (const auto& [name, t] : tensors) {
    runtime::copy_bytes(data.data<float>() + off, runtime::Device::cpu(), t.data_ptr(), t.device(), t.nbytes());
    off += t.numel();
  }
  comm.send(data, dst, 3);
}

NamedTensors recv_named(parallel::Communicator& comm, int src) {
  Tensor len = Tensor::zeros({2}, runtime::DType::I32);
  comm.recv(len, src, 1);
  const int32_t* l = len.data<int32_t>();
  Tensor chars = Tensor::zeros({l[0]}, runtime::DType::I32);
  comm.recv(chars, src, 2);
  std::string text(static_cast<size_t>(l[0]), ' ');
  for (int32_t i = 0; i < l[0]; ++i) text[static_cast<size_t>(i)] = static_cast<char>(chars.data<int32_t>()[i]);
  Tensor data = Tensor::zeros({l[1]});
  comm.recv(data, src, 3);
  NamedTensors out;
  int64_t off = 0;
  for (const auto& entry : nlohmann::json::parse(text)) {
    const runtime::Shape shape = entry["shape"].get<runtime::Shape>();
    Tensor t = Tensor::empty(shape);
    std::memcpy(t.data<float>(), data.data<float>() + off, t.nbytes());
    off += t.numel();
    out.emplace_back(entry["name"].get<std::string>(), t);
  }
  return out;
}

}  // namespace

NamedTensors gather_logical(const std::vector<LocalTensor>& local, const parallel::Mesh& mesh) {
  const parallel::MeshCoords& c = mesh.coords();
  if (c.dp != 0 || c.ex != 0) return {};  // other replicas hold the same values
  const bool tp_sharded = mesh.sizes().tp > 1;
  // 1. This rank's logical tensors: whole ones it owns, and on tp rank 0 the joined pieces.
  NamedTensors mine;
  for (const LocalTensor& t : local) {
    if (t.spec.tied_copy) continue;                 // the owner saves it
    if (t.spec.shard.sharded()) {
      KRAKEN_CHECK(tp_sharded, "a sharded tensor without tensor parallelism: ", t.name);
      // All tp ranks hold a piece of the same shape, in the same order: gather along dim 0.
      Tensor host = t.tensor.to(runtime::Device::cpu());
      Tensor all = mesh.tp().all_gather(host.reshape({1, host.numel()}));
      if (c.tp != 0) continue;
      std::vector<Tensor> pieces;
      for (int i = 0; i < t.spec.shard.parts; ++i) pieces.push_back(all.slice(i, i + 1).reshape(host.shape()));
      mine.emplace_back(t.name, runtime::join_shards(pieces, t.spec.shard));
      continue;
    }
    if (t.spec.replicated && c.tp != 0) continue;  // tp rank 0 saves the replica
    mine.emplace_back(t.name, t.tensor.to(runtime::Device::cpu()));
  }
  // 2. Every model-parallel rank of this replica sends its part to the group's rank 0 (world rank 0).
  parallel::Communicator& mp = mesh.mp();
  if (mp.rank() != 0) {
    send_named(mp, 0, mine);
    return {};
  }
  NamedTensors all = mine;
  for (int src = 1; src < mp.size(); ++src)
    for (auto& entry : recv_named(mp, src)) all.push_back(std::move(entry));
  return all;
}

void load_logical(const runtime::SafetensorsFile& file, const std::vector<LocalTensor>& targets) {
  for (const LocalTensor& t : targets) {
    if (!file.contains(t.name)) KRAKEN_THROW("'", file.path(), "' has no tensor '", t.name, "'");
    Tensor dst = t.tensor;
    if (!t.spec.shard.sharded()) {
      file.load_into(t.name, dst);
      continue;
    }
    const runtime::Shape logical = runtime::logical_shape(t.tensor.shape(), t.spec.shard);
    if (file.entry(t.name).shape != logical)
      KRAKEN_THROW("'", file.path(), "': tensor '", t.name, "' has shape ", runtime::shape_str(file.entry(t.name).shape),
                   ", this layout needs ", runtime::shape_str(logical));
    dst.copy_from(runtime::take_shard(file.load(t.name, t.tensor.device()), t.spec.shard));
  }
}

}  // namespace kraken::train
