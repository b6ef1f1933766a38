// Causal multi-head self-attention as one fused op (kernels/attention.h has the equations).
//
// The node saves the detached qkv, out and the per-row log-sum-exp (B, H, T): O(B·T·C) floats. The
// probabilities P (T, T per head) are recomputed in backward from P = exp(q·kᵀ/√D − lse) instead of
// being stored (FlashAttention, Dao et al. 2022).
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

}  // namespace kraken::runtime::ops
