// Layer normalisation over the last dimension (kernels/layernorm.h has the equations), alone or fused
// with the residual add before it. Forward saves one mean and one reciprocal standard deviation per
// row; backward recomputes x̂ from them and x. Grouped (a Kraken layer's stacked sub-layers), x (G, ..., C)
// is G blocks of rows, block g normalised with its own gamma and beta: forward one kernel call per
// block, backward on a GPU one grouped call for all of them (one launch where its kernels allow: a
// block's 32-row chunks alone leave much of the GPU idle at small B); each parameter's gradient its own
// (no stacked copy of the parameters either way).
#include "kernels/layernorm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "kernels/elementwise.h"
#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/dispatch.h"
#include "runtime/ops.h"
#include "runtime/ops/grouped.h"
#include "runtime/ops/precision.h"

namespace kraken::runtime::ops {
namespace {

// The affine parameters of a (grouped) layernorm: gammas[g], betas[g] for block g of the rows; a beta
// may be undefined (a LayerNorm without bias).
struct Affine {
  std::vector<Tensor> gammas, betas;
};

// Validates a layernorm's operands (x f32 or bf16; every gamma and beta f32 (C,); G blocks need an x
// of shape (G, ..., C)); returns C.
int64_t check_layernorm(const char* op, const Tensor& x, const Affine& p, float eps) {
  precision::check_float(op, x, "input");  // gamma and beta stay f32 under mixed precision
  const int64_t G = static_cast<int64_t>(p.gammas.size());
  if (G == 0 || p.betas.size() != p.gammas.size())
    KRAKEN_THROW(op, ": ", G, " gammas and ", p.betas.size(), " betas: expected one of each per group");
  if (x.dim() < 1 || x.size(-1) == 0)
    KRAKEN_THROW(op, ": input ", shape_str(x.shape()), " needs a non-empty last dimension to normalise");
  const int64_t C = x.size(-1);
  if (G > 1 && (x.dim() < 2 || x.size(0) != G))
    KRAKEN_THROW(op, ": ", G, " groups of gamma and beta need an input (", G, ", ..., ", C, "); the input is ",
                 shape_str(x.shape()));
  for (int64_t g = 0; g < G; ++g) {
    const Tensor& gamma = p.gammas[static_cast<size_t>(g)];
    const Tensor& beta = p.betas[static_cast<size_t>(g)];
    check_dtype(op, gamma, DType::F32, "gamma");
    check_same_device(op, x, gamma);
    if (beta.defined()) {  // an undefined beta is a LayerNorm without bias
      check_dtype(op, beta, DType::F32, "beta");
      check_same_device(op, x, beta);
    }
    if (gamma.shape() != Shape{C} || (beta.defined() && beta.shape() != Shape{C}))
      KRAKEN_THROW(op, ": gamma ", shape_str(gamma.shape()), " and beta ",
                   beta.defined() ? shape_str(beta.shape()) : std::string("(none)"),
                   G > 1 ? " of group " + std::to_string(g) : std::string(), " must both be (", C, ",) for input ",
                   shape_str(x.shape()));
  }
  if (!(eps >= 0.0f) || !std::isfinite(eps)) KRAKEN_THROW(op, ": eps must be finite and >= 0, got ", eps);
  return C;
}

// What backward needs of a forward: x (the normalised input), the gammas, the row statistics.
struct Saved {
  Tensor x, mean, rstd;
  std::vector<Tensor> gammas;  // for dx
  int64_t rows = 0, C = 0;     // rows in all, in gammas.size() blocks
  bool x_needs = false;
  std::vector<bool> gamma_needs, beta_needs;
  // The parameters that are leaves needing a gradient (else undefined): the kernels add dgamma and dbeta
  // straight into their .grad (runtime::leaf_grad_accumulator), where a new zeroed tensor for each and
  // the engine's add into .grad cost a fill and a launch per parameter (GPT-2: 50 of each a step).
  std::vector<Tensor> gamma_leaves, beta_leaves;
};

Saved save(const Tensor& x_saved, const Affine& p, const Tensor& mean, const Tensor& rstd, int64_t rows, int64_t C,
           bool x_needs) {
  Saved s;
  s.rows = rows;
  s.C = C;
  s.x_needs = x_needs;
  bool any_gamma = false;
  for (size_t g = 0; g < p.gammas.size(); ++g) {
    s.gamma_needs.push_back(p.gammas[g].requires_grad());
    s.beta_needs.push_back(p.betas[g].defined() && p.betas[g].requires_grad());
    any_gamma = any_gamma || s.gamma_needs.back();
    s.gammas.push_back(x_needs ? p.gammas[g].detach() : Tensor());
    const Tensor& beta = p.betas[g];
    s.gamma_leaves.push_back(s.gamma_needs.back() && p.gammas[g].is_leaf() ? p.gammas[g] : Tensor());
    s.beta_leaves.push_back(s.beta_needs.back() && beta.is_leaf() ? beta : Tensor());
  }
  // x̂ (hence x) is needed by dx and dgamma; gamma only by dx; dbeta needs nothing but dout.
  s.x = (x_needs || any_gamma) ? x_saved : Tensor();
  s.mean = mean;
  s.rstd = rstd;
  return s;
}

// Where a backward's dgamma and dbeta go: into[g] what the kernels add into (they accumulate) — a leaf's
// .grad, or a new zeroed tensor — and returned[g] what goes back to the engine (undefined for a leaf added
// into directly). A leaf given for two blocks (or as a gamma and a beta) is added into once: the blocks'
// sums run concurrently on a GPU, so the others get tensors of their own.
struct ParamGradients {
  std::vector<Tensor> into_gammas, into_betas, returned_gammas, returned_betas;
};
ParamGradients param_gradients(const Saved& s, const Device& device) {
  const size_t G = s.gamma_needs.size();
  ParamGradients p;
  p.into_gammas.resize(G), p.into_betas.resize(G), p.returned_gammas.resize(G), p.returned_betas.resize(G);
  std::vector<const TensorImpl*> taken;
  auto target = [&](bool needs, const Tensor& leaf, Tensor& returned) {
    if (!needs) return Tensor();
    if (leaf.defined() && std::find(taken.begin(), taken.end(), leaf.impl()) == taken.end()) {
      Tensor direct = leaf_grad_accumulator(leaf);
      if (direct.defined() && direct.dtype() == DType::F32 && direct.device() == device && direct.numel() == s.C) {
        taken.push_back(leaf.impl());
        return direct;
      }
    }
    returned = Tensor::zeros({s.C}, DType::F32, device);
    return returned;
  };
  for (size_t g = 0; g < G; ++g) {
    p.into_gammas[g] = target(s.gamma_needs[g], s.gamma_leaves[g], p.returned_gammas[g]);
    p.into_betas[g] = target(s.beta_needs[g], s.beta_leaves[g], p.returned_betas[g]);
  }
  return p;
}

// The kernels' view of the same: each block's gamma (for dx) and where its dgamma and dbeta go (or null).
std::vector<kernels::LayerNormGroupGradients> group_gradients(const Saved& s, const ParamGradients& p) {
  std::vector<kernels::LayerNormGroupGradients> groups(s.gamma_needs.size());
  for (size_t g = 0; g < groups.size(); ++g)
    groups[g] = {s.gammas[g].defined() ? s.gammas[g].data<float>() : nullptr,
                 s.gamma_needs[g] ? p.into_gammas[g].data<float>() : nullptr,
                 s.beta_needs[g] ? p.into_betas[g].data<float>() : nullptr};
  return groups;
}

// {dx, the returned dgammas..., the returned dbetas...}
std::vector<Tensor> with_param_gradients(std::vector<Tensor> operand_grads, const ParamGradients& p) {
  operand_grads.insert(operand_grads.end(), p.returned_gammas.begin(), p.returned_gammas.end());
  operand_grads.insert(operand_grads.end(), p.returned_betas.begin(), p.returned_betas.end());
  return operand_grads;
}

// dx = dx_in + ∂L/∂x given dout, and every dgamma, dbeta: {dx, dgammas..., dbetas...}. dx_in (may be
// undefined, or dx itself) is the gradient that reaches x by other paths — the residual stream of the
// fused op, or what x's later consumers have sent (runtime::take_gradient_so_far) — added by the kernel
// in its pass; dx is only written. A parameter that is a leaf gets its gradient added into its .grad by
// the kernel and an undefined entry here; any other a new f32 tensor (param_gradients). dx_sums (bf16, G·C:
// a row per group; dx defined), if given, is written with each group's Σ_rows dx: add_bias_layernorm's
// bias gradient, on a GPU from the same pass where the kernels allow.
std::vector<Tensor> layernorm_backward_into(const Saved& s, const ParamGradients& params, const Tensor& dout,
                                            Tensor dx, const Tensor& dx_in, Tensor dx_sums = Tensor()) {
  // in the forward pass this was: out = (x − μ)·rstd·gamma + beta, per block of rows
  const Device device = dout.device();
  const size_t G = s.gamma_needs.size();
  const std::vector<Tensor>& dgammas = params.into_gammas;
  const std::vector<Tensor>& dbetas = params.into_betas;
  const int64_t rows = s.rows / static_cast<int64_t>(G), C = s.C;
  const std::vector<Tensor> grads = with_param_gradients({dx}, params);
  if (device.is_cuda()) {  // every block in one call (one launch where the kernels allow)
    const std::vector<kernels::LayerNormGroupGradients> groups = group_gradients(s, params);
    const int64_t n_groups = static_cast<int64_t>(G);
    if (dx_sums.defined()) {
      KRAKEN_CHECK(dx.defined() && dout.dtype() == DType::BF16 && dx_sums.dtype() == DType::BF16 &&
                       dx_sums.numel() == n_groups * C,
                   "layernorm backward: Σ dx for ", dx_sums.describe(), " with ", G, " groups of ", dout.describe());
      bool summed = false;
      KRAKEN_CUDA_ONLY(device, summed = kernels::layernorm_backward_summing_dx_bf16_cuda(
                                   dx.data<uint16_t>(), dx_in.defined() ? dx_in.data<uint16_t>() : nullptr,
                                   groups.data(), n_groups, dx_sums.data<uint16_t>(), dout.data<uint16_t>(),
                                   s.x.data<uint16_t>(), s.mean.data<float>(), s.rstd.data<float>(), rows, C,
                                   stream_of(dout)));
      if (summed) return grads;
    }
    if (dout.dtype() == DType::BF16)
      KRAKEN_CUDA_ONLY(device, kernels::layernorm_backward_grouped_bf16_cuda(
                                   dx.defined() ? dx.data<uint16_t>() : nullptr,
                                   dx.defined() && dx_in.defined() ? dx_in.data<uint16_t>() : nullptr, groups.data(),
                                   n_groups, dout.data<uint16_t>(), s.x.defined() ? s.x.data<uint16_t>() : nullptr,
                                   s.mean.data<float>(), s.rstd.data<float>(), rows, C, stream_of(dout)));
    else
      KRAKEN_CUDA_ONLY(device, kernels::layernorm_backward_grouped_cuda(
                                   dx.defined() ? dx.data<float>() : nullptr,
                                   dx.defined() && dx_in.defined() ? dx_in.data<float>() : nullptr, groups.data(),
                                   n_groups, dout.data<float>(), s.x.defined() ? s.x.data<float>() : nullptr,
                                   s.mean.data<float>(), s.rstd.data<float>(), rows, C, stream_of(dout)));
    if (dx_sums.defined()) {  // (the one pass declined: each group's own column sums)
      dx_sums.zero_();
      KRAKEN_CUDA_ONLY(device, kernels::sum_rows_grouped_bf16_cuda(dx_sums.data<uint16_t>(), dx.data<uint16_t>(),
                                                                   n_groups, rows, C, stream_of(dout)));
    }
    return grads;
  }
  KRAKEN_CHECK(!dx_sums.defined(), "layernorm backward: Σ dx is for bf16 on a GPU (elsewhere the ops' chain)");
  KRAKEN_CHECK(dout.dtype() == DType::F32, "layernorm backward on the CPU: ", dout.describe(),
               " (a bf16 forward widens its input there)");
  for (size_t g = 0; g < G; ++g) {
    const int64_t row0 = static_cast<int64_t>(g) * rows, e0 = row0 * C;
    float* dgamma_ptr = s.gamma_needs[g] ? dgammas[g].data<float>() : nullptr;
    float* dbeta_ptr = s.beta_needs[g] ? dbetas[g].data<float>() : nullptr;
    const float* gamma_ptr = s.gammas[g].defined() ? s.gammas[g].data<float>() : nullptr;
    const float* mean = s.mean.data<float>() + row0;
    const float* rstd = s.rstd.data<float>() + row0;
    float* dx_ptr = dx.defined() ? dx.data<float>() + e0 : nullptr;
    const float* dx_in_ptr = dx.defined() && dx_in.defined() ? dx_in.data<float>() + e0 : nullptr;
    const float* x_ptr = s.x.defined() ? s.x.data<float>() + e0 : nullptr;
    kernels::layernorm_backward_cpu(dx_ptr, dx_in_ptr, dgamma_ptr, dbeta_ptr, dout.data<float>() + e0, x_ptr, gamma_ptr,
                                    mean, rstd, rows, C);
  }
  return grads;
}

std::vector<Tensor> layernorm_backward(const Saved& s, const Tensor& dout, Tensor dx, const Tensor& dx_in,
                                       Tensor dx_sums = Tensor()) {
  return layernorm_backward_into(s, param_gradients(s, dout.device()), dout, dx, dx_in, dx_sums);
}

// Where block g of a forward's rows starts (its first element), its rows' statistics (null when nothing
// is recorded) and its parameters.
struct Block {
  int64_t first = 0;
  float *mean = nullptr, *rstd = nullptr;
  const float *gamma = nullptr, *beta = nullptr;
};
Block block(const Affine& p, int64_t g, int64_t block_rows, int64_t C, const Tensor& mean, const Tensor& rstd) {
  Block b;
  const int64_t row0 = g * block_rows;
  b.first = row0 * C;
  if (mean.defined()) b.mean = mean.data<float>() + row0, b.rstd = rstd.data<float>() + row0;
  b.gamma = p.gammas[static_cast<size_t>(g)].data<float>();
  const Tensor& beta = p.betas[static_cast<size_t>(g)];
  b.beta = beta.defined() ? beta.data<float>() : nullptr;
  return b;
}

// The node's inputs: the operands, then every gamma, then every beta.
std::vector<Tensor> with_params(std::vector<Tensor> operands, const Affine& p) {
  operands.insert(operands.end(), p.gammas.begin(), p.gammas.end());
  operands.insert(operands.end(), p.betas.begin(), p.betas.end());
  return operands;
}

void record_layernorm(const Tensor& x, const Affine& p, const Tensor& mean, const Tensor& rstd, int64_t rows,
                      int64_t C, const Tensor& out);

Tensor layernorm_affine(const Tensor& x, const Affine& p, float eps) {
  const int64_t C = check_layernorm("layernorm", x, p, eps), rows = x.numel() / C;
  if (precision::widen_on_cpu(x)) return precision::narrow(layernorm_affine(precision::widen(x), p, eps));
  const bool bf16 = x.dtype() == DType::BF16;  // on CUDA
  const std::vector<Tensor> inputs = with_params({x}, p);
  const bool record_grad = needs_grad(inputs);
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor mean = record_grad ? Tensor::empty({rows}, DType::F32, x.device()) : Tensor();
  Tensor rstd = record_grad ? Tensor::empty({rows}, DType::F32, x.device()) : Tensor();
  const int64_t G = static_cast<int64_t>(p.gammas.size()), block_rows = rows / G;
  for (int64_t g = 0; g < G; ++g) {  // one call per block of rows, with its gamma and beta
    const Block k = block(p, g, block_rows, C, mean, rstd);
    if (bf16)
      KRAKEN_CUDA_ONLY(x.device(), kernels::layernorm_forward_bf16_cuda(out.data<uint16_t>() + k.first, k.mean, k.rstd,
                                                                        x.data<uint16_t>() + k.first, k.gamma, k.beta,
                                                                        block_rows, C, eps, stream_of(x)));
    else
      KRAKEN_ON_DEVICE(x.device(),
                       kernels::layernorm_forward_cpu(out.data<float>() + k.first, k.mean, k.rstd,
                                                      x.data<float>() + k.first, k.gamma, k.beta, block_rows, C, eps),
                       kernels::layernorm_forward_cuda(out.data<float>() + k.first, k.mean, k.rstd,
                                                       x.data<float>() + k.first, k.gamma, k.beta, block_rows, C, eps,
                                                       stream_of(x)));
  }
  if (record_grad) record_layernorm(x, p, mean, rstd, rows, C, out);
  return out;
}

// The layernorm node for out = layernorm(x) computed with these row statistics (by layernorm_affine's
// kernels, or fused into the op that made x).
void record_layernorm(const Tensor& x, const Affine& p, const Tensor& mean, const Tensor& rstd, int64_t rows,
                      int64_t C, const Tensor& out) {
  const Saved s = save(x.detach(), p, mean, rstd, rows, C, x.requires_grad());
  record("layernorm", with_params({x}, p), {out}, [s](const std::vector<Tensor>& g) {
    const Tensor& dout = g[0];
    if (!s.x_needs) return layernorm_backward(s, dout, Tensor(), Tensor());
    // x's other consumers' gradient (a residual stream's), added in this pass: in place where it is
    // ours alone, else into a new buffer — never the engine's copy of a shared sum and add after.
    Tensor so_far = take_gradient_so_far(0);
    if (so_far.defined()) {  // as the engine's sum would check
      check_same_shape("layernorm backward", so_far, dout);
      if (so_far.dtype() != dout.dtype())
        KRAKEN_THROW("gradient accumulation: cannot add ", dout.describe(), " into ", so_far.describe());
    }
    Tensor dx = writable_in_place(so_far) ? so_far : Tensor::empty(dout.shape(), dout.dtype(), dout.device());
    return layernorm_backward(s, dout, dx, so_far);
  });
}

std::vector<Tensor> add_layernorm_affine(const Tensor& a, const Tensor& b, const Affine& p, float eps) {
  precision::check_float("add_layernorm", a, "first operand");
  precision::check_float("add_layernorm", b, "second operand");
  check_same_device("add_layernorm", a, b);
  check_same_shape("add_layernorm", a, b);
  precision::common_float("add_layernorm", {&a, &b});
  const int64_t C = check_layernorm("add_layernorm", a, p, eps), rows = a.numel() / C;
  if (a.device().is_cpu()) {
    // The reference: the two ops (the CPU gains nothing from the fusion; its arithmetic is the same).
    Tensor s = add(a, b);
    return {s, layernorm_affine(s, p, eps)};
  }
  // One kernel per block of rows: s = a + b, rounded to its dtype and stored, then normalised from the
  // stored values.
  const bool bf16 = a.dtype() == DType::BF16;
  const std::vector<Tensor> inputs = with_params({a, b}, p);
  const bool record_grad = needs_grad(inputs);
  Tensor s = Tensor::empty(a.shape(), a.dtype(), a.device()), out = Tensor::empty(a.shape(), a.dtype(), a.device());
  Tensor mean = record_grad ? Tensor::empty({rows}, DType::F32, a.device()) : Tensor();
  Tensor rstd = record_grad ? Tensor::empty({rows}, DType::F32, a.device()) : Tensor();
  const int64_t G = static_cast<int64_t>(p.gammas.size()), block_rows = rows / G;
  for (int64_t g = 0; g < G; ++g) {
    const Block k = block(p, g, block_rows, C, mean, rstd);
    if (bf16)
      KRAKEN_CUDA_ONLY(a.device(), kernels::add_layernorm_forward_bf16_cuda(
                                       s.data<uint16_t>() + k.first, out.data<uint16_t>() + k.first, k.mean, k.rstd,
                                       a.data<uint16_t>() + k.first, b.data<uint16_t>() + k.first, k.gamma, k.beta,
                                       block_rows, C, eps, stream_of(a)));
    else
      KRAKEN_CUDA_ONLY(a.device(), kernels::add_layernorm_forward_cuda(
                                       s.data<float>() + k.first, out.data<float>() + k.first, k.mean, k.rstd,
                                       a.data<float>() + k.first, b.data<float>() + k.first, k.gamma, k.beta,
                                       block_rows, C, eps, stream_of(a)));
  }
  if (record_grad) {
    // s also feeds the residual stream, whose gradient g[0] the normalisation's gradient is added to in
    // the same kernel; dx needs x̂ whenever a or b does, so s is always kept.
    const Saved saved = save(s.detach(), p, mean, rstd, rows, C, a.requires_grad() || b.requires_grad());
    record("add_layernorm", inputs, {s, out}, [saved](const std::vector<Tensor>& g) {
      // in the forward pass this was: s = a + b, out = layernorm(s)
      const Tensor& ds = g[0];
      const Tensor& dout = g[1];
      // dx = ds + the normalisation's gradient in one pass: into ds itself where the engine's handle is
      // its only one, else a new buffer (no copy of ds first).
      Tensor dx = !saved.x_needs        ? Tensor()
                  : writable_in_place(ds) ? ds
                                          : Tensor::empty(ds.shape(), ds.dtype(), ds.device());
      std::vector<Tensor> grads = layernorm_backward(saved, dout, dx, ds);
      grads.insert(grads.begin() + 1, grads[0]);  // da = db = dx
      return grads;
    });
  }
  return {s, out};
}

}  // namespace

Tensor layernorm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps) {
  return layernorm_affine(x, Affine{{gamma}, {beta}}, eps);
}

Tensor layernorm(const Tensor& x, const std::vector<Tensor>& gammas, const std::vector<Tensor>& betas, float eps) {
  return layernorm_affine(x, Affine{gammas, betas.empty() ? std::vector<Tensor>(gammas.size()) : betas}, eps);
}

std::vector<Tensor> add_layernorm(const Tensor& a, const Tensor& b, const Tensor& gamma, const Tensor& beta, float eps) {
  return add_layernorm_affine(a, b, Affine{{gamma}, {beta}}, eps);
}

std::vector<Tensor> add_layernorm(const Tensor& a, const Tensor& b, const std::vector<Tensor>& gammas,
                                  const std::vector<Tensor>& betas, float eps) {
  return add_layernorm_affine(a, b, Affine{gammas, betas.empty() ? std::vector<Tensor>(gammas.size()) : betas}, eps);
}

namespace {

// b + bias[g] on block g of b's G blocks of rows, bias (G, C) (or (C,) for one group): add's broadcast for
// one group, else a node of its own doing the same per block (its gradient: dout, and each block's column
// sums) — the reference chain's, on the CPU or wherever the fused kernel declines.
Tensor add_biases_by_group(const Tensor& b, const Tensor& bias, int64_t G) {
  const char* op = "add_bias_layernorm";
  if (G == 1) return add(b, reshape(bias, {bias.size(-1)}));
  precision::check_float(op, bias, "bias");
  check_same_device(op, b, bias);
  precision::common_float(op, {&b, &bias});
  if (precision::widen_on_cpu(b)) return precision::narrow(add_biases_by_group(precision::widen(b), precision::widen(bias), G));
  const int64_t C = bias.size(-1), rows = b.numel() / (G * C);
  Tensor out = Tensor::empty(b.shape(), b.dtype(), b.device());
  add_group_biases(out, b, bias, G, rows, C);
  if (needs_grad({b, bias})) {
    const bool b_needs = b.requires_grad(), bias_needs = bias.requires_grad();
    const Shape bias_shape = bias.shape();
    record("add_group_biases", {b, bias}, {out}, [=](const std::vector<Tensor>& g) {
      // in the forward pass this was: out[g] = b[g] + bias[g] on every row of block g
      return std::vector<Tensor>{b_needs ? g[0] : Tensor(),
                                 bias_needs ? group_row_sums(g[0], G, rows, C).reshape(bias_shape) : Tensor()};
    });
  }
  return out;
}

std::vector<Tensor> add_bias_layernorm_affine(const Tensor& a, const Tensor& b, const Tensor& bias, const Affine& p,
                                              float eps) {
  const char* op = "add_bias_layernorm";
  if (!bias.defined()) return add_layernorm_affine(a, b, p, eps);
  const int64_t G = static_cast<int64_t>(p.gammas.size());
  const int64_t C = check_layernorm(op, a, p, eps);
  check_same_shape(op, a, b);
  if (!((bias.dim() == 1 && G == 1) || (bias.dim() == 2 && bias.size(0) == G)) || bias.size(-1) != C)
    KRAKEN_THROW(op, ": bias ", shape_str(bias.shape()), " for ", G, G == 1 ? " group" : " groups", " of input ",
                 shape_str(a.shape()), ": expected ", G == 1 ? "(" + std::to_string(C) + ",) or " : std::string(),
                 "(", G, ", ", C, ")");
  auto chain = [&] {  // the reference, and wherever the kernels decline (which also names what is wrong)
    const Tensor s = add(a, add_biases_by_group(b, bias, G));
    return std::vector<Tensor>{s, layernorm_affine(s, p, eps)};
  };
  if (a.dtype() != DType::BF16 || b.dtype() != DType::BF16 || bias.dtype() != DType::BF16 || !a.device().is_cuda() ||
      a.device() != b.device() || a.device() != bias.device())
    return chain();
  const int64_t rows = a.numel() / C, block_rows = rows / G;
  const std::vector<Tensor> inputs = with_params({a, b, bias}, p);
  const bool record_grad = needs_grad(inputs);
  Tensor s = Tensor::empty(a.shape(), DType::BF16, a.device()), out = Tensor::empty(a.shape(), DType::BF16, a.device());
  Tensor mean = record_grad ? Tensor::empty({rows}, DType::F32, a.device()) : Tensor();
  Tensor rstd = record_grad ? Tensor::empty({rows}, DType::F32, a.device()) : Tensor();
  // One launch per group (its gamma, beta and bias). Where a group's launch declines (the shape, or a
  // parameter's alignment), the chain runs instead on buffers of its own; what the fused launches wrote
  // before is dropped with s and out.
  for (int64_t g = 0; g < G; ++g) {
    const Block k = block(p, g, block_rows, C, mean, rstd);
    bool fused = false;
    KRAKEN_CUDA_ONLY(a.device(), fused = kernels::add_bias_layernorm_forward_bf16_cuda(
                                     s.data<uint16_t>() + k.first, out.data<uint16_t>() + k.first, k.mean, k.rstd,
                                     a.data<uint16_t>() + k.first, b.data<uint16_t>() + k.first,
                                     bias.data<uint16_t>() + g * C, k.gamma, k.beta, block_rows, C, eps,
                                     stream_of(a)));
    if (!fused) return chain();
  }
  if (record_grad) {
    const bool bias_needs = bias.requires_grad();
    const Saved saved = save(s.detach(), p, mean, rstd, rows, C,
                             a.requires_grad() || b.requires_grad() || bias_needs);
    const Shape bias_shape = bias.shape();
    record(op, inputs, {s, out}, [saved, bias_needs, bias_shape](const std::vector<Tensor>& g) {
      // in the forward pass this was: s = a + (b + bias[group]), out = layernorm(s)
      const Tensor& ds = g[0];
      const Tensor& dout = g[1];
      // dx = ds + the normalisation's gradient, as add_layernorm's; each group's bias gradient Σ_rows dx
      // from the same pass
      Tensor dx = !saved.x_needs        ? Tensor()
                  : writable_in_place(ds) ? ds
                                          : Tensor::empty(ds.shape(), ds.dtype(), ds.device());
      Tensor dbias = bias_needs ? Tensor::empty(bias_shape, DType::BF16, ds.device()) : Tensor();
      std::vector<Tensor> grads = layernorm_backward(saved, dout, dx, ds, dbias);
      grads.insert(grads.begin() + 1, {grads[0], dbias});  // da = db = dx, then dbias
      return grads;
    });
  }
  return {s, out};
}

}  // namespace

std::vector<Tensor> add_bias_layernorm(const Tensor& a, const Tensor& b, const Tensor& bias, const Tensor& gamma,
                                       const Tensor& beta, float eps) {
  return add_bias_layernorm_affine(a, b, bias, Affine{{gamma}, {beta}}, eps);
}

std::vector<Tensor> add_bias_layernorm(const Tensor& a, const Tensor& b, const Tensor& bias,
                                       const std::vector<Tensor>& gammas, const std::vector<Tensor>& betas, float eps) {
  return add_bias_layernorm_affine(a, b, bias,
                                   Affine{gammas, betas.empty() ? std::vector<Tensor>(gammas.size()) : betas}, eps);
}

namespace {

// KRAKEN_CUDA_FORK_NORM_BACKWARD (read once): fused (unset: the default), the fork's and LN2's backward in one
// kernel; separate, the two kernels in turn — the same bits, for timing one against the other in a step.
bool fork_norm_backward_fused() {
  static const bool fused = [] {
    const char* v = std::getenv("KRAKEN_CUDA_FORK_NORM_BACKWARD");
    if (v == nullptr || *v == '\0' || std::string(v) == "fused") return true;
    if (std::string(v) == "separate") return false;
    KRAKEN_THROW("KRAKEN_CUDA_FORK_NORM_BACKWARD=", v,
                 ": expected fused (the default: the residual fork's and LN2's backward in one kernel) or separate");
  }();
  return fused;
}

}  // namespace

std::vector<Tensor> residual_fork_summed_layernorm(const Tensor& x, const Tensor& y, const std::vector<Tensor>& gammas,
                                                   const std::vector<Tensor>& betas, float eps) {
  const char* op = "residual_fork_summed_layernorm";
  const Affine p{gammas, betas.empty() ? std::vector<Tensor>(gammas.size()) : betas};
  auto chain = [&] {
    const std::vector<Tensor> a_m = residual_fork_summed(x, y);
    return std::vector<Tensor>{a_m[0], layernorm_affine(a_m[1], p, eps)};
  };
  if (x.dtype() != DType::BF16 || y.dtype() != DType::BF16 || !x.device().is_cuda() || x.shape() != y.shape() ||
      x.device() != y.device() || x.dim() < 2 || static_cast<int64_t>(gammas.size()) != x.size(0))
    return chain();  // (which also names what is wrong)
  const int64_t C = check_layernorm(op, x, p, eps), G = x.size(0), rows = x.numel() / C;
  const std::vector<Tensor> inputs = with_params({x, y}, p);
  const bool record_grad = needs_grad(inputs);
  Tensor a = Tensor::empty(x.shape(), DType::BF16, x.device()), m = Tensor::empty(x.shape(), DType::BF16, x.device());
  Tensor out = Tensor::empty(x.shape(), DType::BF16, x.device());
  Tensor mean = record_grad ? Tensor::empty({rows}, DType::F32, x.device()) : Tensor();
  Tensor rstd = record_grad ? Tensor::empty({rows}, DType::F32, x.device()) : Tensor();
  std::vector<const float*> gamma_ptrs, beta_ptrs;
  for (size_t g = 0; g < p.gammas.size(); ++g) {
    gamma_ptrs.push_back(p.gammas[g].data<float>());
    beta_ptrs.push_back(p.betas[g].defined() ? p.betas[g].data<float>() : nullptr);
  }
  bool fused = false;
  KRAKEN_CUDA_ONLY(x.device(), fused = kernels::residual_fork_summed_layernorm_bf16_cuda(
                                   a.data<uint16_t>(), m.data<uint16_t>(), out.data<uint16_t>(),
                                   mean.defined() ? mean.data<float>() : nullptr,
                                   rstd.defined() ? rstd.data<float>() : nullptr, x.data<uint16_t>(),
                                   y.data<uint16_t>(), gamma_ptrs.data(), beta_ptrs.data(), G, rows / G, C, eps,
                                   stream_of(x)));
  if (!fused) return chain();  // (nothing written)
  if (!record_grad) return {a, out};
  // One node for both (m is no output: LN2 is its only consumer). Backward on a GPU one kernel too where it
  // applies — LN2's dm goes straight into the fork's sums instead of to memory and back; else the two
  // nodes' backwards in turn, the same bits.
  const Saved saved = save(m, p, mean, rstd, rows, C, /*x_needs=*/true);
  const Shape shape = x.shape();
  const bool x_needs = x.requires_grad(), y_needs = y.requires_grad();
  record(op, inputs, {a, out}, [saved, shape, x_needs, y_needs](const std::vector<Tensor>& g) {
    // in the forward pass this was: a = x + y, m = y + Σ_g x[g], out = layernorm(m) (group g's gamma, beta)
    const Tensor &da = g[0], &dout = g[1];
    const ParamGradients params = param_gradients(saved, saved.x.device());
    if (da.defined() && dout.defined() && fork_norm_backward_fused()) {
      Tensor dx = writable_in_place(da) ? da : Tensor::empty(shape, DType::BF16, da.device());
      Tensor dy = writable_in_place(dout) ? dout : Tensor::empty(shape, DType::BF16, da.device());
      const std::vector<kernels::LayerNormGroupGradients> groups = group_gradients(saved, params);
      bool done = false;
      KRAKEN_CUDA_ONLY(da.device(), done = kernels::residual_fork_summed_layernorm_backward_bf16_cuda(
                                        dx.data<uint16_t>(), dy.data<uint16_t>(), groups.data(),
                                        static_cast<int64_t>(groups.size()), da.data<uint16_t>(),
                                        dout.data<uint16_t>(), saved.x.data<uint16_t>(), saved.mean.data<float>(),
                                        saved.rstd.data<float>(), saved.rows / static_cast<int64_t>(groups.size()),
                                        saved.C, stream_of(da)));
      if (done) return with_param_gradients({x_needs ? dx : Tensor(), y_needs ? dy : Tensor()}, params);
    }
    Tensor dm;
    std::vector<Tensor> grads = with_param_gradients({Tensor(), Tensor()}, params);
    if (dout.defined())
      dm = layernorm_backward_into(saved, params, dout, Tensor::empty(shape, DType::BF16, dout.device()), Tensor())[0];
    const std::vector<Tensor> fork = residual_fork_summed_backward(shape, x_needs, y_needs, da, dm);
    grads[0] = fork[0];
    grads[1] = fork[1];
    return grads;
  });
  return {a, out};
}

}  // namespace kraken::runtime::ops
