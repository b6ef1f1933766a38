// Layer normalisation over the last dimension (kernels/layernorm.h has the equations). Forward saves
// one mean and one reciprocal standard deviation per row; backward recomputes x̂ from them and x.
#include "kernels/layernorm.h"

#include <cmath>

#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/dispatch.h"
#include "runtime/ops.h"
#include "runtime/ops/precision.h"

namespace kraken::runtime::ops {

Tensor layernorm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps) {
  precision::check_float("layernorm", x, "input");  // gamma and beta stay f32 under mixed precision
  check_dtype("layernorm", gamma, DType::F32, "gamma");
  check_same_device("layernorm", x, gamma);
  if (beta.defined()) {  // an undefined beta is a LayerNorm without bias
    check_dtype("layernorm", beta, DType::F32, "beta");
    check_same_device("layernorm", x, beta);
  }
  if (x.dim() < 1 || x.size(-1) == 0)
    KRAKEN_THROW("layernorm: input ", shape_str(x.shape()), " needs a non-empty last dimension to normalise");
  const int64_t C = x.size(-1), rows = x.numel() / C;
  if (gamma.shape() != Shape{C} || (beta.defined() && beta.shape() != Shape{C}))
    KRAKEN_THROW("layernorm: gamma ", shape_str(gamma.shape()), " and beta ",
                 beta.defined() ? shape_str(beta.shape()) : std::string("(none)"),
                 " must both be (", C, ",) for input ", shape_str(x.shape()));
  if (!(eps >= 0.0f) || !std::isfinite(eps)) KRAKEN_THROW("layernorm: eps must be finite and >= 0, got ", eps);

  if (precision::widen_on_cpu(x)) return precision::narrow(layernorm(precision::widen(x), gamma, beta, eps));
  const bool bf16 = x.dtype() == DType::BF16;  // on CUDA
  const bool record_grad = needs_grad({x, gamma, beta});
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor mean = record_grad ? Tensor::empty({rows}, DType::F32, x.device()) : Tensor();
  Tensor rstd = record_grad ? Tensor::empty({rows}, DType::F32, x.device()) : Tensor();
  float* mean_ptr = record_grad ? mean.data<float>() : nullptr;
  float* rstd_ptr = record_grad ? rstd.data<float>() : nullptr;
  const float* beta_ptr = beta.defined() ? beta.data<float>() : nullptr;
  if (bf16)
    KRAKEN_CUDA_ONLY(x.device(), kernels::layernorm_forward_bf16_cuda(out.data<uint16_t>(), mean_ptr, rstd_ptr,
                                                                      x.data<uint16_t>(), gamma.data<float>(), beta_ptr,
                                                                      rows, C, eps, stream_of(x)));
  else
    KRAKEN_ON_DEVICE(x.device(),
                   kernels::layernorm_forward_cpu(out.data<float>(), mean_ptr, rstd_ptr, x.data<float>(),
                                                  gamma.data<float>(), beta_ptr, rows, C, eps),
                   kernels::layernorm_forward_cuda(out.data<float>(), mean_ptr, rstd_ptr, x.data<float>(),
                                                   gamma.data<float>(), beta_ptr, rows, C, eps,
                                                   stream_of(x)));
  if (record_grad) {
    const bool x_needs = x.requires_grad(), gamma_needs = gamma.requires_grad();
    const bool beta_needs = beta.defined() && beta.requires_grad();
    // x̂ (hence x) is needed by dx and dgamma; gamma only by dx; dbeta needs nothing but dout.
    Tensor x_saved = (x_needs || gamma_needs) ? x.detach() : Tensor();
    Tensor gamma_saved = x_needs ? gamma.detach() : Tensor();
    record("layernorm", {x, gamma, beta}, {out},
           [x_saved, gamma_saved, mean, rstd, x_needs, gamma_needs, beta_needs, rows, C, bf16](const std::vector<Tensor>& g) {
             // in the forward pass this was: out = (x − μ)·rstd·gamma + beta
             const Tensor& dout = g[0];
             const Device device = dout.device();
             Tensor dx = x_needs ? Tensor::zeros(dout.shape(), dout.dtype(), device) : Tensor();
             Tensor dgamma = gamma_needs ? Tensor::zeros({C}, DType::F32, device) : Tensor();
             Tensor dbeta = beta_needs ? Tensor::zeros({C}, DType::F32, device) : Tensor();
             float* dgamma_ptr = gamma_needs ? dgamma.data<float>() : nullptr;
             float* dbeta_ptr = beta_needs ? dbeta.data<float>() : nullptr;
             const float* gamma_ptr = gamma_saved.defined() ? gamma_saved.data<float>() : nullptr;
             if (bf16) {
               uint16_t* dx_ptr = x_needs ? dx.data<uint16_t>() : nullptr;
               const uint16_t* x_ptr = x_saved.defined() ? x_saved.data<uint16_t>() : nullptr;
               KRAKEN_CUDA_ONLY(device, kernels::layernorm_backward_bf16_cuda(
                                            dx_ptr, dgamma_ptr, dbeta_ptr, dout.data<uint16_t>(), x_ptr, gamma_ptr,
                                            mean.data<float>(), rstd.data<float>(), rows, C, stream_of(dout)));
               return std::vector<Tensor>{dx, dgamma, dbeta};
             }
             float* dx_ptr = x_needs ? dx.data<float>() : nullptr;
             const float* x_ptr = x_saved.defined() ? x_saved.data<float>() : nullptr;
             KRAKEN_ON_DEVICE(device,
                              kernels::layernorm_backward_cpu(dx_ptr, dgamma_ptr, dbeta_ptr, dout.data<float>(), x_ptr,
                                                              gamma_ptr, mean.data<float>(), rstd.data<float>(), rows,
                                                              C),
                              kernels::layernorm_backward_cuda(dx_ptr, dgamma_ptr, dbeta_ptr, dout.data<float>(),
                                                               x_ptr, gamma_ptr, mean.data<float>(),
                                                               rstd.data<float>(), rows, C, stream_of(dout)));
             return std::vector<Tensor>{dx, dgamma, dbeta};
           });
  }
  return out;
}

}  // namespace kraken::runtime::ops
