// Dropout with a regenerated mask: forward reserves a range of the generator's Philox stream and
// backward draws the same range again, so nothing of size x is saved.
#include "kernels/random.h"

#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/dispatch.h"
#include "runtime/ops.h"
#include "runtime/ops/precision.h"

namespace kraken::runtime::ops {

Tensor dropout(const Tensor& x, float p, Generator& generator, bool training) {
  precision::check_float("dropout", x);
  if (!(p >= 0.0f && p < 1.0f)) KRAKEN_THROW("dropout: probability must be in [0, 1), got ", p);
  if (!training || p == 0.0f) return x;
  if (precision::widen_on_cpu(x)) return precision::narrow(dropout(precision::widen(x), p, generator, training));
  const bool bf16 = x.dtype() == DType::BF16;  // on CUDA
  const int64_t n = x.numel();
  const uint64_t seed = generator.seed(), stream = generator.stream();
  const uint64_t offset = generator.reserve(kernels::uniform_blocks(n));
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (bf16)
    KRAKEN_CUDA_ONLY(x.device(), kernels::dropout_forward_bf16_cuda(out.data<uint16_t>(), x.data<uint16_t>(), n, p,
                                                                    seed, stream, offset, stream_of(x)));
  else
    KRAKEN_ON_DEVICE(x.device(),
                     kernels::dropout_forward_cpu(out.data<float>(), x.data<float>(), n, p, seed, stream, offset),
                     kernels::dropout_forward_cuda(out.data<float>(), x.data<float>(), n, p, seed, stream, offset,
                                                   stream_of(x)));
  if (needs_grad({x})) {
    record("dropout", {x}, {out}, [p, seed, stream, offset, bf16](const std::vector<Tensor>& g) {
      const Tensor& dout = g[0];
      Tensor dx = Tensor::zeros(dout.shape(), dout.dtype(), dout.device());
      if (bf16) {
        KRAKEN_CUDA_ONLY(dx.device(), kernels::dropout_backward_bf16_cuda(dx.data<uint16_t>(), dout.data<uint16_t>(),
                                                                          dx.numel(), p, seed, stream, offset,
                                                                          stream_of(dx)));
        return std::vector<Tensor>{dx};
      }
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
