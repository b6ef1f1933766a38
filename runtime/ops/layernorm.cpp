// Layer normalisation over the last dimension (kernels/layernorm.h has the equations), alone or fused
// with the residual add before it. Forward saves one mean and one reciprocal standard deviation per
// row; backward recomputes x̂ from them and x.
#include "kernels/layernorm.h"

#include <cmath>

#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/dispatch.h"
#include "runtime/ops.h"
#include "runtime/ops/precision.h"

namespace kraken::runtime::ops {
namespace {

// Validates a layernorm's operands (x f32 or bf16; gamma and beta f32, (C,)); returns C.
int64_t check_layernorm(const char* op, const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps) {
  precision::check_float(op, x, "input");  // gamma and beta stay f32 under mixed precision
  check_dtype(op, gamma, DType::F32, "gamma");
  check_same_device(op, x, gamma);
  if (beta.defined()) {  // an undefined beta is a LayerNorm without bias
    check_dtype(op, beta, DType::F32, "beta");
    check_same_device(op, x, beta);
  }
  if (x.dim() < 1 || x.size(-1) == 0)
    KRAKEN_THROW(op, ": input ", shape_str(x.shape()), " needs a non-empty last dimension to normalise");
  const int64_t C = x.size(-1);
  if (gamma.shape() != Shape{C} || (beta.defined() && beta.shape() != Shape{C}))
    KRAKEN_THROW(op, ": gamma ", shape_str(gamma.shape()), " and beta ",
                 beta.defined() ? shape_str(beta.shape()) : std::string("(none)"), " must both be (", C,
                 ",) for input ", shape_str(x.shape()));
  if (!(eps >= 0.0f) || !std::isfinite(eps)) KRAKEN_THROW(op, ": eps must be finite and >= 0, got ", eps);
  return C;
}

// What backward needs of a forward: x (the normalised input), gamma, the row statistics.
struct Saved {
  Tensor x, gamma, mean, rstd;
  int64_t rows = 0, C = 0;
  bool x_needs = false, gamma_needs = false, beta_needs = false;
};

// dx (+)= ∂L/∂x given dout, and dgamma, dbeta (new, f32). dx arrives zeroed, or holding a gradient that
// reaches x by another path (the residual stream of the fused op), which the kernel adds to.
std::vector<Tensor> layernorm_backward(const Saved& s, const Tensor& dout, Tensor dx) {
  // in the forward pass this was: out = (x − μ)·rstd·gamma + beta
  const Device device = dout.device();
  Tensor dgamma = s.gamma_needs ? Tensor::zeros({s.C}, DType::F32, device) : Tensor();
  Tensor dbeta = s.beta_needs ? Tensor::zeros({s.C}, DType::F32, device) : Tensor();
  float* dgamma_ptr = s.gamma_needs ? dgamma.data<float>() : nullptr;
  float* dbeta_ptr = s.beta_needs ? dbeta.data<float>() : nullptr;
  const float* gamma_ptr = s.gamma.defined() ? s.gamma.data<float>() : nullptr;
  if (dout.dtype() == DType::BF16) {  // only on CUDA: the CPU widened in forward
    uint16_t* dx_ptr = dx.defined() ? dx.data<uint16_t>() : nullptr;
    const uint16_t* x_ptr = s.x.defined() ? s.x.data<uint16_t>() : nullptr;
    KRAKEN_CUDA_ONLY(device, kernels::layernorm_backward_bf16_cuda(dx_ptr, dgamma_ptr, dbeta_ptr, dout.data<uint16_t>(),
                                                                   x_ptr, gamma_ptr, s.mean.data<float>(),
                                                                   s.rstd.data<float>(), s.rows, s.C, stream_of(dout)));
    return {dx, dgamma, dbeta};
  }
  float* dx_ptr = dx.defined() ? dx.data<float>() : nullptr;
  const float* x_ptr = s.x.defined() ? s.x.data<float>() : nullptr;
  KRAKEN_ON_DEVICE(device,
                   kernels::layernorm_backward_cpu(dx_ptr, dgamma_ptr, dbeta_ptr, dout.data<float>(), x_ptr, gamma_ptr,
                                                   s.mean.data<float>(), s.rstd.data<float>(), s.rows, s.C),
                   kernels::layernorm_backward_cuda(dx_ptr, dgamma_ptr, dbeta_ptr, dout.data<float>(), x_ptr,
                                                    gamma_ptr, s.mean.data<float>(), s.rstd.data<float>(), s.rows, s.C,
                                                    stream_of(dout)));
  return {dx, dgamma, dbeta};
}

}  // namespace

Tensor layernorm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps) {
  const int64_t C = check_layernorm("layernorm", x, gamma, beta, eps), rows = x.numel() / C;
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
                                                     gamma.data<float>(), beta_ptr, rows, C, eps, stream_of(x)));
  if (record_grad) {
    Saved s;
    s.rows = rows;
    s.C = C;
    s.x_needs = x.requires_grad();
    s.gamma_needs = gamma.requires_grad();
    s.beta_needs = beta.defined() && beta.requires_grad();
    // x̂ (hence x) is needed by dx and dgamma; gamma only by dx; dbeta needs nothing but dout.
    s.x = (s.x_needs || s.gamma_needs) ? x.detach() : Tensor();
    s.gamma = s.x_needs ? gamma.detach() : Tensor();
    s.mean = mean;
    s.rstd = rstd;
    record("layernorm", {x, gamma, beta}, {out}, [s](const std::vector<Tensor>& g) {
      const Tensor& dout = g[0];
      return layernorm_backward(s, dout, s.x_needs ? Tensor::zeros(dout.shape(), dout.dtype(), dout.device()) : Tensor());
    });
  }
  return out;
}

std::vector<Tensor> add_layernorm(const Tensor& a, const Tensor& b, const Tensor& gamma, const Tensor& beta, float eps) {
  precision::check_float("add_layernorm", a, "first operand");
  precision::check_float("add_layernorm", b, "second operand");
  check_same_device("add_layernorm", a, b);
  check_same_shape("add_layernorm", a, b);
  precision::common_float("add_layernorm", {&a, &b});
  const int64_t C = check_layernorm("add_layernorm", a, gamma, beta, eps), rows = a.numel() / C;
  if (a.device().is_cpu()) {
    // The reference: the two ops (the CPU gains nothing from the fusion; its arithmetic is the same).
    Tensor s = add(a, b);
    return {s, layernorm(s, gamma, beta, eps)};
  }
  // One kernel: s = a + b, rounded to its dtype and stored, then normalised from the stored values.
  const bool bf16 = a.dtype() == DType::BF16;
  const bool record_grad = needs_grad({a, b, gamma, beta});
  Tensor s = Tensor::empty(a.shape(), a.dtype(), a.device()), out = Tensor::empty(a.shape(), a.dtype(), a.device());
  Tensor mean = record_grad ? Tensor::empty({rows}, DType::F32, a.device()) : Tensor();
  Tensor rstd = record_grad ? Tensor::empty({rows}, DType::F32, a.device()) : Tensor();
  float* mean_ptr = record_grad ? mean.data<float>() : nullptr;
  float* rstd_ptr = record_grad ? rstd.data<float>() : nullptr;
  const float* beta_ptr = beta.defined() ? beta.data<float>() : nullptr;
  if (bf16)
    KRAKEN_CUDA_ONLY(a.device(), kernels::add_layernorm_forward_bf16_cuda(
                                     s.data<uint16_t>(), out.data<uint16_t>(), mean_ptr, rstd_ptr, a.data<uint16_t>(),
                                     b.data<uint16_t>(), gamma.data<float>(), beta_ptr, rows, C, eps, stream_of(a)));
  else
    KRAKEN_CUDA_ONLY(a.device(), kernels::add_layernorm_forward_cuda(s.data<float>(), out.data<float>(), mean_ptr,
                                                                     rstd_ptr, a.data<float>(), b.data<float>(),
                                                                     gamma.data<float>(), beta_ptr, rows, C, eps,
                                                                     stream_of(a)));
  if (record_grad) {
    Saved saved;
    saved.rows = rows;
    saved.C = C;
    saved.x_needs = a.requires_grad() || b.requires_grad();
    saved.gamma_needs = gamma.requires_grad();
    saved.beta_needs = beta.defined() && beta.requires_grad();
    saved.x = s.detach();  // always: dx needs x̂ whenever a or b does
    saved.gamma = saved.x_needs ? gamma.detach() : Tensor();
    saved.mean = mean;
    saved.rstd = rstd;
    record("add_layernorm", {a, b, gamma, beta}, {s, out}, [saved](const std::vector<Tensor>& g) {
      // in the forward pass this was: s = a + b, out = layernorm(s); s also feeds the residual stream,
      // whose gradient g[0] the normalisation's gradient is added to in the same kernel
      const Tensor& ds = g[0];
      const Tensor& dout = g[1];
      Tensor dx = saved.x_needs ? ds.clone() : Tensor();
      std::vector<Tensor> grads = layernorm_backward(saved, dout, dx);
      return std::vector<Tensor>{grads[0], grads[0], grads[1], grads[2]};
    });
  }
  return {s, out};
}

}  // namespace kraken::runtime::ops
