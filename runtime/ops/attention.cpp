// Causal multi-head self-attention as one fused op (kernels/attention.h has the equations).
//
// The node saves the detached qkv, out and the per-row log-sum-exp (B, H, T): O(B·T·C) floats. The
// probabilities P (T, T per head) are recomputed in backward from P = exp(q·kᵀ/√D − lse) instead of
// being stored (FlashAttention, Dao et al. 2022).
#include <algorithm>
#include <cstddef>
#include <vector>

#include "kernels/attention.h"

#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/dispatch.h"
#include "runtime/ops.h"
#include "runtime/ops/precision.h"

namespace kraken::runtime::ops {

Tensor attention(const Tensor& qkv, int64_t n_head) {
  precision::check_float("attention", qkv, "qkv");
  if (qkv.dim() != 3)
    KRAKEN_THROW("attention: qkv must be (B, T, 3C) with 3 dimensions, got shape ", shape_str(qkv.shape()));
  if (n_head <= 0) KRAKEN_THROW("attention: n_head must be positive, got ", n_head, " for qkv ", shape_str(qkv.shape()));
  const int64_t B = qkv.size(0), T = qkv.size(1), C3 = qkv.size(2);
  if (C3 == 0 || C3 % (3 * n_head) != 0)
    KRAKEN_THROW("attention: the last dimension of qkv ", shape_str(qkv.shape()), " must be a positive multiple of 3·n_head = ",
                 3 * n_head, " (q, k and v of ", n_head, " heads side by side)");
  if (precision::widen_on_cpu(qkv)) return precision::narrow(attention(precision::widen(qkv), n_head));
  const bool bf16 = qkv.dtype() == DType::BF16;  // on CUDA
  const int64_t C = C3 / 3;

  Tensor out = Tensor::empty({B, T, C}, qkv.dtype(), qkv.device());
  Tensor lse = Tensor::empty({B, n_head, T}, DType::F32, qkv.device());
  if (bf16)
    KRAKEN_CUDA_ONLY(qkv.device(), kernels::attention_forward_bf16_cuda(out.data<uint16_t>(), lse.data<float>(),
                                                                        qkv.data<uint16_t>(), B, T, C, n_head,
                                                                        stream_of(qkv)));
  else
    KRAKEN_ON_DEVICE(qkv.device(),
                     kernels::attention_forward_cpu(out.data<float>(), lse.data<float>(), qkv.data<float>(), B, T, C,
                                                    n_head),
                     kernels::attention_forward_cuda(out.data<float>(), lse.data<float>(), qkv.data<float>(), B, T, C,
                                                     n_head, stream_of(qkv)));

  if (needs_grad({qkv})) {
    Tensor qkv_saved = qkv.detach(), out_saved = out.detach();
    record("attention", {qkv}, {out}, [qkv_saved, out_saved, lse, B, T, C, n_head, bf16](const std::vector<Tensor>& g) {
      // in the forward pass this was: out = softmax(q·kᵀ/√D + mask)·v, per head
      const Tensor& dout = g[0];
      // The bf16 dispatch overwrites dqkv (cuDNN writes it; before the hand-written kernels, which add
      // into it, the dispatch zeroes it: kernels/attention.h). The f32 kernels add into zeros.
      Tensor dqkv = bf16 ? Tensor::empty(qkv_saved.shape(), qkv_saved.dtype(), qkv_saved.device())
                         : Tensor::zeros(qkv_saved.shape(), qkv_saved.dtype(), qkv_saved.device());
      if (bf16) {
        KRAKEN_CUDA_ONLY(dqkv.device(), kernels::attention_backward_bf16_cuda(
                                            dqkv.data<uint16_t>(), dout.data<uint16_t>(), qkv_saved.data<uint16_t>(),
                                            out_saved.data<uint16_t>(), lse.data<float>(), B, T, C, n_head,
                                            stream_of(dqkv)));
        return std::vector<Tensor>{dqkv};
      }
      KRAKEN_ON_DEVICE(dqkv.device(),
                       kernels::attention_backward_cpu(dqkv.data<float>(), dout.data<float>(), qkv_saved.data<float>(),
                                                       out_saved.data<float>(), lse.data<float>(), B, T, C, n_head),
                       kernels::attention_backward_cuda(dqkv.data<float>(), dout.data<float>(),
                                                        qkv_saved.data<float>(), out_saved.data<float>(),
                                                        lse.data<float>(), B, T, C, n_head, stream_of(dqkv)));
      return std::vector<Tensor>{dqkv};
    });
  }
  return out;
}

std::vector<Tensor> attention_group(const std::vector<Tensor>& qkvs, int64_t n_head) {
  for (size_t k = 1; k < qkvs.size(); ++k) {
    if (qkvs[k].shape() != qkvs[0].shape() || qkvs[k].dtype() != qkvs[0].dtype() ||
        qkvs[k].device() != qkvs[0].device())
      KRAKEN_THROW("attention_group: qkv ", k, " is ", shape_str(qkvs[k].shape()), " ", dtype_name(qkvs[k].dtype()),
                   " on ", qkvs[k].device().str(), ", qkv 0 is ", shape_str(qkvs[0].shape()), " ",
                   dtype_name(qkvs[0].dtype()), " on ", qkvs[0].device().str(), ": a group shares one shape");
  }
  std::vector<Tensor> outs;
  bool grouped = false;
#if KRAKEN_WITH_CUDA  // (the kernels' dispatch exists in CUDA builds only)
  // Grouped where the dispatch would take the mma kernels for this shape (cuDNN, where it takes the
  // shape, runs one call per input: faster than the grouped mma launch, bench/RESULTS.md).
  grouped = qkvs.size() > 1 && qkvs[0].defined() && qkvs[0].dtype() == DType::BF16 && qkvs[0].device().is_cuda() &&
            qkvs[0].dim() == 3 && n_head > 0 && qkvs[0].size(2) % (3 * n_head) == 0 &&
            kernels::attention_bf16_kernels_for_call(qkvs[0].size(0), qkvs[0].size(1), qkvs[0].size(2) / 3, n_head) ==
                kernels::AttentionBf16Kernels::kTensorCoreMma;
#endif
  if (!grouped) {  // (where cuDNN takes the shape: one cuDNN call per input, forward and backward)
    for (const Tensor& qkv : qkvs) outs.push_back(attention(qkv, n_head));
    return outs;
  }
  // One launch per kAttentionMaxGroups inputs, each launch its own autograd node.
  for (size_t first = 0; first < qkvs.size(); first += kernels::kAttentionMaxGroups) {
    const size_t count = std::min<size_t>(kernels::kAttentionMaxGroups, qkvs.size() - first);
    const std::vector<Tensor> inputs(qkvs.begin() + static_cast<std::ptrdiff_t>(first),
                                     qkvs.begin() + static_cast<std::ptrdiff_t>(first + count));
    if (count == 1) {
      outs.push_back(attention(inputs[0], n_head));
      continue;
    }
    const int64_t B = inputs[0].size(0), T = inputs[0].size(1), C = inputs[0].size(2) / 3;
    std::vector<Tensor> out, lse;
    std::vector<uint16_t*> out_ptrs;
    std::vector<float*> lse_ptrs;
    std::vector<const uint16_t*> qkv_ptrs;
    for (const Tensor& qkv : inputs) {
      out.push_back(Tensor::empty({B, T, C}, DType::BF16, qkv.device()));
      lse.push_back(Tensor::empty({B, n_head, T}, DType::F32, qkv.device()));
      out_ptrs.push_back(out.back().data<uint16_t>());
      lse_ptrs.push_back(lse.back().data<float>());
      qkv_ptrs.push_back(qkv.data<uint16_t>());
    }
    KRAKEN_CUDA_ONLY(inputs[0].device(), kernels::attention_forward_bf16_mma_group_cuda(
                                             out_ptrs.data(), lse_ptrs.data(), qkv_ptrs.data(),
                                             static_cast<int64_t>(count), B, T, C, n_head, stream_of(inputs[0])));
    if (needs_grad(inputs)) {
      std::vector<Tensor> qkv_saved, out_saved;
      for (size_t k = 0; k < count; ++k) qkv_saved.push_back(inputs[k].detach()), out_saved.push_back(out[k].detach());
      record("attention_group", inputs, out, [qkv_saved, out_saved, lse, B, T, C, n_head](const std::vector<Tensor>& g) {
        // in the forward pass this was: out_k = softmax(q_k·k_kᵀ/√D + mask)·v_k, per head, for every k
        std::vector<Tensor> dqkv;
        std::vector<uint16_t*> dqkv_ptrs;
        std::vector<const uint16_t*> dout_ptrs, qkv_ptrs, out_ptrs;
        std::vector<const float*> lse_ptrs;
        for (size_t k = 0; k < qkv_saved.size(); ++k) {
          dqkv.push_back(Tensor::zeros(qkv_saved[k].shape(), DType::BF16, qkv_saved[k].device()));
          dqkv_ptrs.push_back(dqkv.back().data<uint16_t>());
          dout_ptrs.push_back(g[k].data<uint16_t>());
          qkv_ptrs.push_back(qkv_saved[k].data<uint16_t>());
          out_ptrs.push_back(out_saved[k].data<uint16_t>());
          lse_ptrs.push_back(lse[k].data<float>());
        }
        KRAKEN_CUDA_ONLY(dqkv[0].device(), kernels::attention_backward_bf16_mma_group_cuda(
                                               dqkv_ptrs.data(), dout_ptrs.data(), qkv_ptrs.data(), out_ptrs.data(),
                                               lse_ptrs.data(), static_cast<int64_t>(qkv_saved.size()), B, T, C,
                                               n_head, stream_of(dqkv[0])));
        return dqkv;
      });
    }
    outs.insert(outs.end(), out.begin(), out.end());
  }
  return outs;
}

}  // namespace kraken::runtime::ops
