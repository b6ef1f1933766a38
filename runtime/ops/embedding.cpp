// Embedding lookup (kernels/embedding.h has the contract). Ids are validated on the host before any
// kernel runs, so a bad token id is a kraken::Error naming it, where it is and the table size, on
// either device; backward keeps only the ids.
#include "kernels/embedding.h"

#include <string>

#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/dispatch.h"
#include "runtime/ops.h"
#include "runtime/ops/precision.h"

namespace kraken::runtime::ops {

Tensor embedding(const Tensor& weight, const Tensor& ids) {
  precision::check_float("embedding", weight, "weight");
  // A bf16 table is looked up in f32 and the rows rounded back (exact: they were bf16); mixed precision
  // keeps its tables f32 and casts the looked-up rows instead (models/kraken.cpp).
  if (weight.dtype() == DType::BF16) return precision::narrow(embedding(precision::widen(weight), ids));
  check_dim("embedding", weight, 2, "weight");
  check_dtype("embedding", ids, DType::I32, "ids");
  check_same_device("embedding", weight, ids);
  const int64_t V = weight.size(0), C = weight.size(1), N = ids.numel();

  const Tensor host_ids = ids.device().is_cpu() ? ids : ids.to(Device::cpu());
  const int32_t* id_values = host_ids.data<int32_t>();
  const int64_t bad = kernels::embedding_first_bad_id_cpu(id_values, N, V);
  if (bad >= 0)
    KRAKEN_THROW("embedding: id ", id_values[bad], " at position ", index_str(ids.shape(), bad), " of ids ",
                 shape_str(ids.shape()), " is outside [0, ", V, ") for weight ", shape_str(weight.shape()));

  Shape shape = ids.shape();
  shape.push_back(C);
  Tensor out = Tensor::empty(shape, DType::F32, weight.device());
  KRAKEN_ON_DEVICE(weight.device(),
                   kernels::embedding_forward_cpu(out.data<float>(), weight.data<float>(), ids.data<int32_t>(), N, V,
                                                  C),
                   kernels::embedding_forward_cuda(out.data<float>(), weight.data<float>(), ids.data<int32_t>(), N, V,
                                                   C, stream_of(weight)));
  if (needs_grad({weight})) {
    Tensor ids_saved = ids.detach();
    // A parameter table takes its scatter-add directly (no (V, C) zeros, no extra pass to add them).
    Tensor leaf = weight.is_leaf() ? weight : Tensor();
    record("embedding", {weight, ids}, {out}, [ids_saved, leaf, N, V, C](const std::vector<Tensor>& g) {
      // in the forward pass this was: out[n, :] = weight[ids[n], :]
      const Tensor& dout = g[0];
      Tensor direct = leaf_grad_accumulator(leaf);
      Tensor dweight = direct.defined() ? direct : Tensor::zeros({V, C}, DType::F32, dout.device());
      KRAKEN_ON_DEVICE(dout.device(),
                       kernels::embedding_backward_cpu(dweight.data<float>(), dout.data<float>(),
                                                       ids_saved.data<int32_t>(), N, V, C),
                       kernels::embedding_backward_cuda(dweight.data<float>(), dout.data<float>(),
                                                        ids_saved.data<int32_t>(), N, V, C, stream_of(dout)));
      return std::vector<Tensor>{direct.defined() ? Tensor() : dweight, Tensor()};
    });
  }
  return out;
}

}  // namespace kraken::runtime::ops
