// Dropout with a regenerated mask: forward reserves a range of the generator's Philox stream and
// backward draws the same range again, so nothing of size x is saved.
#include "kernels/random.h"

#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/dispatch.h"
#include "runtime/ops.h"

namespace kraken::runtime::ops {

Tensor dropout(const Tensor& x, float p, Generator& generator, bool training) {
  check_dtype("dropout", x, DType::F32);
  if (!(p >= 0.0f && p < 1.0f)) KRAKEN_THROW("dropout: probability must be in [0, 1), got ", p);
  if (!training || p == 0.0f) return x;
  const int64_t n = x.numel();
  const uint64_t seed = generator.seed(), stream = generator.stream();
  const uint64_t offset = generator.reserve(kernels::uniform_blocks(n));
  Tensor out = Tensor::empty(x.shape(), DType::F32, x.device());
  KRAKEN_ON_DEVICE(x.device(),
                   kernels::dropout_forward_cpu(out.data<float>(), x.data<float>(), n, p, seed, stream, offset),
                   kernels::dropout_forward_cuda(out.data<float>(), x.data<float>(), n, p, seed, stream, offset,
                                                 stream_of(x)));
  if (needs_grad({x})) {
    record("dropout", {x}, {out}, [p, seed, stream, offset](const std::vector<Tensor>& g) {
      const Tensor& dout = g[0];
      Tensor dx = Tensor::zeros(dout.shape(), DType::F32, dout.device());
      KRAKEN_ON_DEVICE(dout.device(),
                       kernels::dropout_backward_cpu(dx.data<float>(), dout.data<float>(), dx.numel(), p, seed, stream,
                                                     offset),
                       kernels::dropout_backward_cuda(dx.data<float>(), dout.data<float>(), dx.numel(), p, seed,
                                                      stream, offset, stream_of(dx)));
      return std::vector<Tensor>{dx};
    });
  }
  return out;
}

}  // namespace kraken::runtime::ops
