// Embedding lookup (kernels/embedding.h has the contract). Ids are validated on the host before any
// kernel runs, so a bad token id is a kraken::Error naming it, where it is and the table size, on
// either device; ids may come from the host for a table on a GPU (no wait for the GPU then). Backward
// keeps only the ids.
#include "kernels/embedding.h"

#include <string>

#include "kernels/elementwise.h"
#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/dispatch.h"
#include "runtime/ops.h"
#include "runtime/ops/precision.h"

namespace kraken::runtime::ops {

namespace {

// Ids are checked on the host, so a bad token id is an error naming it, where it is and the table size.
// Returns them on the table's device. Ids on the host are checked there and copied over without waiting
// for the GPU (runtime/allocator.h: a staged upload); ids on the table's GPU are copied to the host to be
// checked, which waits for everything queued before — so a training step passes them from the host.
Tensor checked_ids(const char* op, const Tensor& ids, const Tensor& weight) {
  if (!ids.device().is_cpu()) check_same_device(op, weight, ids);
  const int64_t V = weight.size(0), N = ids.numel();
  const Tensor host_ids = ids.device().is_cpu() ? ids : ids.to(Device::cpu());
  const int32_t* id_values = host_ids.data<int32_t>();
  const int64_t bad = kernels::embedding_first_bad_id_cpu(id_values, N, V);
  if (bad >= 0)
    KRAKEN_THROW(op, ": id ", id_values[bad], " at position ", index_str(ids.shape(), bad), " of ids ",
                 shape_str(ids.shape()), " is outside [0, ", V, ") for weight ", shape_str(weight.shape()));
  return ids.to(weight.device());
}

}  // namespace

Tensor embedding(const Tensor& weight, const Tensor& ids) {
  precision::check_float("embedding", weight, "weight");
  // A bf16 table is looked up in f32 and the rows rounded back (exact: they were bf16); mixed precision
  // keeps its tables f32 and casts the looked-up rows instead (models/kraken.cpp).
  if (weight.dtype() == DType::BF16) return precision::narrow(embedding(precision::widen(weight), ids));
  check_dim("embedding", weight, 2, "weight");
  check_dtype("embedding", ids, DType::I32, "ids");
  const int64_t V = weight.size(0), C = weight.size(1), N = ids.numel();
  const Tensor ids_here = checked_ids("embedding", ids, weight);

  Shape shape = ids.shape();
  shape.push_back(C);
  Tensor out = Tensor::empty(shape, DType::F32, weight.device());
  KRAKEN_ON_DEVICE(weight.device(),
                   kernels::embedding_forward_cpu(out.data<float>(), weight.data<float>(), ids_here.data<int32_t>(),
                                                  N, V, C),
                   kernels::embedding_forward_cuda(out.data<float>(), weight.data<float>(), ids_here.data<int32_t>(),
                                                   N, V, C, stream_of(weight)));
  if (needs_grad({weight})) {
    Tensor ids_saved = ids_here.detach();
    // A parameter table takes its scatter-add directly (no (V, C) zeros, no extra pass to add them).
    Tensor leaf = weight.is_leaf() ? weight : Tensor();
    record("embedding", {weight, ids_here}, {out}, [ids_saved, leaf, N, V, C](const std::vector<Tensor>& g) {
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

Tensor token_position_embedding(const Tensor& wte, const Tensor& wpe, const Tensor& ids, DType dtype) {
  const char* op = "token_position_embedding";
  check_dim(op, ids, 2, "ids");
  const int64_t B = ids.size(0), T = ids.size(1);
  auto three_ops = [&] { return cast(add(embedding(wte, ids), slice(wpe, 0, T)), dtype); };
  if (dtype != DType::BF16 || !wte.device().is_cuda() || wte.dtype() != DType::F32 || wpe.dtype() != DType::F32)
    return three_ops();
  check_dim(op, wte, 2, "wte");
  check_dim(op, wpe, 2, "wpe");
  check_dtype(op, ids, DType::I32, "ids");
  check_same_device(op, wte, wpe);
  const int64_t V = wte.size(0), C = wte.size(1), N = B * T;
  if (wpe.size(1) != C || wpe.size(0) < T)
    KRAKEN_THROW(op, ": wpe ", shape_str(wpe.shape()), " must have at least T = ", T, " rows of wte's C = ", C,
                 " channels");
  const Tensor ids_here = checked_ids(op, ids, wte);

  Tensor out = Tensor::empty({B, T, C}, DType::BF16, wte.device());
  bool fused = false;
  KRAKEN_CUDA_ONLY(wte.device(), fused = kernels::embedding_positions_forward_bf16_cuda(
                                     out.data<uint16_t>(), wte.data<float>(), wpe.data<float>(),
                                     ids_here.data<int32_t>(), N, T, V, C, stream_of(wte)));
  if (!fused) return three_ops();  // (nothing written)
  if (needs_grad({wte, wpe})) {
    Tensor ids_saved = ids_here.detach();
    // Parameters take their gradients directly (a scatter-add, column sums added in), as embedding's.
    Tensor wte_leaf = wte.is_leaf() ? wte : Tensor(), wpe_leaf = wpe.is_leaf() ? wpe : Tensor();
    const Shape wpe_shape = wpe.shape();
    const bool wte_needs = wte.requires_grad(), wpe_needs = wpe.requires_grad();
    record(op, {wte, wpe, ids_here}, {out},
           [ids_saved, wte_leaf, wpe_leaf, wpe_shape, wte_needs, wpe_needs, B, T, V, C](const std::vector<Tensor>& g) {
             // in the forward pass this was: out[b, t, :] = bf16(wte[ids[b, t], :] + wpe[t, :])
             const Tensor& dout = g[0];
             std::vector<Tensor> grads(3);
             if (wte_needs) {
               const Tensor direct = leaf_grad_accumulator(wte_leaf);
               const Tensor dwte = direct.defined() ? direct : Tensor::zeros({V, C}, DType::F32, dout.device());
               KRAKEN_CUDA_ONLY(dout.device(), kernels::embedding_backward_bf16_cuda(
                                                   dwte.data<float>(), dout.data<uint16_t>(),
                                                   ids_saved.data<int32_t>(), B * T, V, C, stream_of(dout)));
               if (!direct.defined()) grads[0] = dwte;
             }
             if (wpe_needs) {
               // dwpe[t, :] += Σ_b dout[b, t, :]: rows 0 .. T − 1 of wpe, the (T, C) the slice took
               const Tensor direct = leaf_grad_accumulator(wpe_leaf);
               const Tensor dwpe = direct.defined() ? direct : Tensor::zeros(wpe_shape, DType::F32, dout.device());
               KRAKEN_CUDA_ONLY(dout.device(), kernels::sum_rows_bf16_to_f32_cuda(dwpe.data<float>(),
                                                                                 dout.data<uint16_t>(), B, T * C,
                                                                                 stream_of(dout)));
               if (!direct.defined()) grads[1] = dwpe;
             }
             return grads;
           });
  }
  return out;
}

}  // namespace kraken::runtime::ops
