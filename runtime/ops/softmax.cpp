// Softmax over the last dimension (kernels/softmax.h has the equations). Backward needs only the
// output y, so that is what the node keeps.
#include "kernels/softmax.h"

#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/dispatch.h"
#include "runtime/ops.h"
#include "runtime/ops/precision.h"

namespace kraken::runtime::ops {

Tensor softmax(const Tensor& x) {
  precision::check_float("softmax", x);
  // No bf16 kernel (the model never calls softmax outside attention): bf16 widens on every device.
  if (x.dtype() == DType::BF16) return precision::narrow(softmax(precision::widen(x)));
  if (x.dim() < 1) KRAKEN_THROW("softmax: input ", x.describe(), " is a scalar; it needs a last dimension");
  const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
  Tensor y = Tensor::empty(x.shape(), DType::F32, x.device());
  KRAKEN_ON_DEVICE(x.device(), kernels::softmax_forward_cpu(y.data<float>(), x.data<float>(), rows, C),
                   kernels::softmax_forward_cuda(y.data<float>(), x.data<float>(), rows, C, stream_of(x)));
  if (needs_grad({x})) {
    Tensor y_saved = y.detach();
    record("softmax", {x}, {y}, [y_saved, rows, C](const std::vector<Tensor>& g) {
      // in the forward pass this was: y = exp(x − max)/Σ exp(x − max); dx = y ∘ (dy − Σ dy∘y)
      const Tensor& dy = g[0];
      Tensor dx = Tensor::zeros(y_saved.shape(), DType::F32, dy.device());
      KRAKEN_ON_DEVICE(dy.device(),
                       kernels::softmax_backward_cpu(dx.data<float>(), y_saved.data<float>(), dy.data<float>(), rows,
                                                     C),
                       kernels::softmax_backward_cuda(dx.data<float>(), y_saved.data<float>(), dy.data<float>(), rows,
                                                      C, stream_of(dy)));
      return std::vector<Tensor>{dx};
    });
  }
  return y;
}

}  // namespace kraken::runtime::ops
