// Reductions to a scalar: sum and mean. The sum is accumulated in double in a fixed block order, so
// it does not depend on the thread count.
#include "kernels/elementwise.h"

#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "runtime/ops/precision.h"

namespace kraken::runtime::ops {
namespace {

Tensor reduce_scalar(const char* name, const Tensor& x, double factor) {
  precision::check_float(name, x);
  if (x.dtype() == DType::BF16) return reduce_scalar(name, precision::widen(x), factor);  // the scalar is f32
  // A device tensor is summed on the host; scalar losses are small next to what produced them.
  Tensor host = x.to(Device::cpu());
  const double total = kernels::sum_cpu(host.data<float>(), host.numel()) * factor;
  Tensor out = Tensor::full({}, static_cast<float>(total), x.device());
  if (needs_grad({x})) {
    const Shape shape = x.shape();
    const Device device = x.device();
    record(name, {x}, {out}, [shape, device, factor](const std::vector<Tensor>& g) {
      // in the forward pass this was: out = factor·Σ x; every element gets factor·dout
      return std::vector<Tensor>{Tensor::full(shape, static_cast<float>(factor) * g[0].item(), device)};
    });
  }
  return out;
}

}  // namespace

Tensor sum(const Tensor& x) { return reduce_scalar("sum", x, 1.0); }

Tensor mean(const Tensor& x) {
  check_defined("mean", x);
  if (x.numel() == 0) KRAKEN_THROW("mean of an empty tensor ", x.describe());
  return reduce_scalar("mean", x, 1.0 / static_cast<double>(x.numel()));
}

}  // namespace kraken::runtime::ops
