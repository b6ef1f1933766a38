#include "optim/clip.h"

#include <cmath>

#include "kernels/elementwise.h"
#include "optim/reductions.h"
#include "runtime/dispatch.h"

namespace kraken::optim {

using runtime::Tensor;

double global_grad_norm_squared(const std::vector<Tensor>& grads) { return sum_squares(grads); }

double global_grad_norm(const std::vector<Tensor>& grads) { return std::sqrt(global_grad_norm_squared(grads)); }

double clip_coefficient(double norm, double max_norm) {
  if (!(max_norm > 0.0)) KRAKEN_THROW("clip_grad_norm: max_norm must be > 0, got ", max_norm);
  // The 1e-6 is PyTorch's: it keeps the clipped norm just below max_norm.
  return norm > max_norm ? max_norm / (norm + 1e-6) : 1.0;
}

void clip_grad_norm_given(std::vector<Tensor>& grads, double norm, double max_norm) {
  const double coef = clip_coefficient(norm, max_norm);
  if (coef == 1.0) return;
  const float alpha = static_cast<float>(coef);
  for (Tensor& g : grads) {
    float* data = g.data<float>();
    KRAKEN_ON_DEVICE(g.device(), kernels::scale_cpu(data, data, alpha, g.numel()),
                     kernels::scale_cuda(data, data, alpha, g.numel(), runtime::stream_of(g)));
  }
}

double clip_grad_norm(std::vector<Tensor>& grads, double max_norm) {
  const double norm = global_grad_norm(grads);
  clip_grad_norm_given(grads, norm, max_norm);
  return norm;
}

}  // namespace kraken::optim
