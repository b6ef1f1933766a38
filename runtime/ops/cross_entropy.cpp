// Cross-entropy fused with log-softmax (kernels/cross_entropy.h has the equations). Where the logits
// need a gradient, the forward writes it too, for the gradient the caller expects the loss to get
// (training: 1, or the micro-batch scale), in the same pass that reads each row for its log-sum-exp
// (kernels' fused entry points): the node keeps that gradient instead of the logits, and backward only
// checks, on the device, that the loss's gradient is the one expected (else rescales it).
//
// With no counted row (every target ignored) the loss is 0 and the gradient is 0: an empty mean is
// taken as 0 so that a micro-batch of padding contributes nothing instead of NaN.
#include "kernels/cross_entropy.h"

#include <string>

#include "kernels/elementwise.h"
#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/dispatch.h"
#include "runtime/ops.h"
#include "runtime/ops/precision.h"

namespace kraken::runtime::ops {
namespace {

// What forward and the evaluation sum share: validated sizes and the per-row results.
struct RowLosses {
  int64_t N = 0, Vp = 0, V = 0, count = 0;
  Tensor targets;  // on the logits' device
  Tensor losses;  // (N,) lse − logit of the target, 0 for ignored rows
  Tensor lse;     // (N,)
};

// Validates logits and targets, counts the rows that take part, and allocates losses and lse. The
// targets are checked and counted on the host: targets there (a training step's) are then copied to the
// logits' GPU without waiting for it (runtime/allocator.h: a staged upload); targets on the GPU are copied
// to the host for it, which waits for the forward queued before.
RowLosses check_rows(const char* op, const Tensor& logits, const Tensor& targets, int64_t vocab,
                     int32_t ignore_index) {
  precision::check_float(op, logits, "logits");  // bf16 logits (mixed precision) give f32 losses
  check_dtype(op, targets, DType::I32, "targets");
  if (!targets.device().is_cpu()) check_same_device(op, logits, targets);
  if (logits.dim() != 2 && logits.dim() != 3)
    KRAKEN_THROW(op, ": logits must be (N, Vp) or (B, T, Vp), got ", shape_str(logits.shape()));
  const Shape lead(logits.shape().begin(), logits.shape().end() - 1);
  if (targets.shape() != lead)
    KRAKEN_THROW(op, ": targets ", shape_str(targets.shape()), " must have the leading shape ", shape_str(lead),
                 " of logits ", shape_str(logits.shape()));
  RowLosses r;
  r.Vp = logits.size(-1);
  r.V = vocab <= 0 ? r.Vp : vocab;
  if (r.V > r.Vp)
    KRAKEN_THROW(op, ": vocab ", r.V, " is larger than the last dimension of logits ", shape_str(logits.shape()));
  r.N = targets.numel();

  const Tensor host_targets = targets.device().is_cpu() ? targets : targets.to(Device::cpu());
  const int32_t* t = host_targets.data<int32_t>();
  const int64_t bad = kernels::cross_entropy_check_targets_cpu(t, r.N, r.V, ignore_index, &r.count);
  if (bad >= 0)
    KRAKEN_THROW(op, ": target ", t[bad], " at row ", bad, " (position ", index_str(targets.shape(), bad),
                 " of targets ", shape_str(targets.shape()), ") is outside [0, vocab = ", r.V,
                 ") and is not ignore_index ", ignore_index);

  r.targets = targets.to(logits.device());
  r.losses = Tensor::empty({r.N}, DType::F32, logits.device());
  r.lse = Tensor::empty({r.N}, DType::F32, logits.device());
  return r;
}

RowLosses row_losses(const char* op, const Tensor& logits, const Tensor& targets, int64_t vocab,
                     int32_t ignore_index) {
  RowLosses r = check_rows(op, logits, targets, vocab, ignore_index);
  if (logits.dtype() == DType::BF16)  // on CUDA (the CPU widened before)
    KRAKEN_CUDA_ONLY(logits.device(), kernels::cross_entropy_forward_bf16_cuda(
                                          r.losses.data<float>(), r.lse.data<float>(), logits.data<uint16_t>(),
                                          r.targets.data<int32_t>(), r.N, r.Vp, r.V, ignore_index, stream_of(logits)));
  else
    KRAKEN_ON_DEVICE(logits.device(),
                     kernels::cross_entropy_forward_cpu(r.losses.data<float>(), r.lse.data<float>(),
                                                        logits.data<float>(), r.targets.data<int32_t>(), r.N, r.Vp, r.V,
                                                        ignore_index),
                     kernels::cross_entropy_forward_cuda(r.losses.data<float>(), r.lse.data<float>(),
                                                         logits.data<float>(), r.targets.data<int32_t>(), r.N, r.Vp, r.V,
                                                         ignore_index, stream_of(logits)));
  return r;
}

}  // namespace

Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t vocab, int32_t ignore_index,
                     float expected_dloss) {
  if (precision::widen_on_cpu(logits))  // the loss is f32 either way; dlogits is rounded by the cast's backward
    return cross_entropy(precision::widen(logits), targets, vocab, ignore_index, expected_dloss);
  const bool record_grad = needs_grad({logits});
  RowLosses r;
  Tensor dlogits;
  if (!record_grad) {
    r = row_losses("cross_entropy", logits, targets, vocab, ignore_index);
  } else {
    // Forward and the backward for expected_dloss in one pass; dlogits is fully written.
    r = check_rows("cross_entropy", logits, targets, vocab, ignore_index);
    dlogits = Tensor::empty(logits.shape(), logits.dtype(), logits.device());
    if (logits.dtype() == DType::BF16)
      KRAKEN_CUDA_ONLY(logits.device(), kernels::cross_entropy_fused_bf16_cuda(
                                            r.losses.data<float>(), r.lse.data<float>(), dlogits.data<uint16_t>(),
                                            logits.data<uint16_t>(), r.targets.data<int32_t>(), expected_dloss, r.count,
                                            r.N, r.Vp, r.V, ignore_index, stream_of(logits)));
    else
      KRAKEN_ON_DEVICE(logits.device(),
                       kernels::cross_entropy_fused_cpu(r.losses.data<float>(), r.lse.data<float>(),
                                                        dlogits.data<float>(), logits.data<float>(),
                                                        r.targets.data<int32_t>(), expected_dloss, r.count, r.N, r.Vp,
                                                        r.V, ignore_index),
                       kernels::cross_entropy_fused_cuda(r.losses.data<float>(), r.lse.data<float>(),
                                                         dlogits.data<float>(), logits.data<float>(),
                                                         r.targets.data<int32_t>(), expected_dloss, r.count, r.N, r.Vp,
                                                         r.V, ignore_index, stream_of(logits)));
  }
  Tensor loss = Tensor::empty({}, DType::F32, logits.device());
  KRAKEN_ON_DEVICE(logits.device(),
                   kernels::cross_entropy_mean_cpu(loss.data<float>(), r.losses.data<float>(), r.N, r.count),
                   kernels::cross_entropy_mean_cuda(loss.data<float>(), r.losses.data<float>(), r.N, r.count,
                                                    stream_of(logits)));
  if (record_grad) {
    // The dloss the gradient was computed for, on the device: backward compares without a host round trip.
    const Tensor assumed = Tensor::full({1}, expected_dloss, logits.device());
    record("cross_entropy", {logits, r.targets}, {loss}, [dlogits, assumed](const std::vector<Tensor>& g) {
      // in the forward pass this was: loss = (1/count)·Σ_n (lse_n − logits[n, t_n]); dlogits was computed for
      // dloss = assumed
      const Tensor& dloss = g[0];
      float* a = assumed.data<float>();
      if (dlogits.dtype() == DType::BF16)
        KRAKEN_CUDA_ONLY(dloss.device(), kernels::cross_entropy_rescale_bf16_cuda(dlogits.data<uint16_t>(),
                                                                                  dloss.data<float>(), a,
                                                                                  dlogits.numel(), stream_of(dloss)));
      else
        KRAKEN_ON_DEVICE(dloss.device(),
                         kernels::cross_entropy_rescale_cpu(dlogits.data<float>(), dloss.data<float>(), a,
                                                            dlogits.numel()),
                         kernels::cross_entropy_rescale_cuda(dlogits.data<float>(), dloss.data<float>(), a,
                                                             dlogits.numel(), stream_of(dloss)));
      return std::vector<Tensor>{dlogits, Tensor()};
    });
  }
  return loss;
}

LossSum cross_entropy_sum(const Tensor& logits, const Tensor& targets, int64_t vocab, int32_t ignore_index) {
  if (precision::widen_on_cpu(logits)) return cross_entropy_sum(precision::widen(logits), targets, vocab, ignore_index);
  RowLosses r = row_losses("cross_entropy_sum", logits, targets, vocab, ignore_index);
  // The same double sum, in the same order, as cross_entropy_mean_cpu: on the CPU the two agree exactly.
  const Tensor host = r.losses.device().is_cpu() ? r.losses : r.losses.to(Device::cpu());
  return LossSum{kernels::sum_cpu(host.data<float>(), r.N), r.count};
}

}  // namespace kraken::runtime::ops
