// Elementwise ops: add (with trailing broadcast), mul, scale, gelu, and the sum of a list. Each takes
// f32 or bf16 (runtime/ops/precision.h).
#include "kernels/elementwise.h"

#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/dispatch.h"
#include "runtime/ops.h"
#include "runtime/ops/grouped.h"
#include "runtime/ops/precision.h"

namespace kraken::runtime::ops {
namespace {

using precision::narrow;
using precision::widen;
using precision::widen_on_cpu;

// Both f32 or both bf16, on one device; returns the dtype.
DType check_float_pair(const char* op, const Tensor& a, const Tensor& b) {
  precision::check_float(op, a, "first operand");
  precision::check_float(op, b, "second operand");
  check_same_device(op, a, b);
  return precision::common_float(op, {&a, &b});
}

// True when `suffix` equals the last dims of `shape`.
bool is_trailing(const Shape& shape, const Shape& suffix) {
  if (suffix.size() > shape.size()) return false;
  return std::equal(suffix.begin(), suffix.end(), shape.end() - static_cast<std::ptrdiff_t>(suffix.size()));
}

// Σ over the leading rows of g so it takes the shape of the broadcast operand.
Tensor reduce_to(const Tensor& g, const Shape& shape) {
  const int64_t cols = shape_numel(shape);
  const int64_t rows = cols == 0 ? 0 : g.numel() / cols;
  if (widen_on_cpu(g)) return narrow(reduce_to(widen(g), shape));
  Tensor out = Tensor::zeros(shape, g.dtype(), g.device());
  if (g.dtype() == DType::BF16) {
    KRAKEN_CUDA_ONLY(g.device(), kernels::sum_rows_bf16_cuda(out.data<uint16_t>(), g.data<uint16_t>(), rows, cols,
                                                             stream_of(g)));
    return out;
  }
  KRAKEN_ON_DEVICE(g.device(), kernels::sum_rows_cpu(out.data<float>(), g.data<float>(), rows, cols),
                   kernels::sum_rows_cuda(out.data<float>(), g.data<float>(), rows, cols, stream_of(g)));
  return out;
}

// out = a + b (b repeated over a's leading dims), out of a's shape and dtype; out may be a. Not for bf16
// on the CPU (the ops widen there).
void add_kernel(const Tensor& out, const Tensor& a, const Tensor& b) {
  const DType dtype = a.dtype();
  const bool broadcast = a.shape() != b.shape();
  if (dtype == DType::BF16) {
    const int64_t cols = b.numel();
    const int64_t rows = cols == 0 ? 0 : a.numel() / cols;
    KRAKEN_CUDA_ONLY(a.device(),
                     broadcast ? kernels::add_broadcast_bf16_cuda(out.data<uint16_t>(), a.data<uint16_t>(),
                                                                  b.data<uint16_t>(), rows, cols, stream_of(a))
                               : kernels::add_bf16_cuda(out.data<uint16_t>(), a.data<uint16_t>(), b.data<uint16_t>(),
                                                        a.numel(), stream_of(a)));
  } else if (broadcast) {
    const int64_t cols = b.numel();
    const int64_t rows = cols == 0 ? 0 : a.numel() / cols;
    KRAKEN_ON_DEVICE(a.device(),
                     kernels::add_broadcast_cpu(out.data<float>(), a.data<float>(), b.data<float>(), rows, cols),
                     kernels::add_broadcast_cuda(out.data<float>(), a.data<float>(), b.data<float>(), rows, cols,
                                                 stream_of(a)));
  } else {
    KRAKEN_ON_DEVICE(a.device(), kernels::add_cpu(out.data<float>(), a.data<float>(), b.data<float>(), a.numel()),
                     kernels::add_cuda(out.data<float>(), a.data<float>(), b.data<float>(), a.numel(), stream_of(a)));
  }
}

}  // namespace

Tensor add(const Tensor& a, const Tensor& b) {
  const DType dtype = check_float_pair("add", a, b);
  const bool broadcast = a.shape() != b.shape();
  if (broadcast && !is_trailing(a.shape(), b.shape()))
    KRAKEN_THROW("add: shapes ", shape_str(a.shape()), " and ", shape_str(b.shape()),
                 " do not match, and the second is not a trailing part of the first");
  if (widen_on_cpu(a)) return narrow(add(widen(a), widen(b)));
  Tensor out = Tensor::empty(a.shape(), dtype, a.device());
  add_kernel(out, a, b);
  if (needs_grad({a, b})) {
    const Shape b_shape = b.shape();
    const bool b_needs = b.requires_grad();
    record("add", {a, b}, {out}, [broadcast, b_shape, b_needs](const std::vector<Tensor>& g) {
      // in the forward pass this was: out = a + b (b repeated over a's leading dims)
      Tensor db = !b_needs ? Tensor() : broadcast ? reduce_to(g[0], b_shape) : g[0];
      return std::vector<Tensor>{g[0], db};
    });
  }
  return out;
}

std::vector<Tensor> residual_fork(const Tensor& x, const Tensor& y, const Tensor& s) {
  const DType dtype = check_float_pair("residual_fork", x, y);
  check_same_shape("residual_fork", x, y);
  if (check_float_pair("residual_fork", y, s) != dtype || !is_trailing(y.shape(), s.shape()))
    KRAKEN_THROW("residual_fork: s ", s.describe(), " must be a trailing part of y's shape ", shape_str(y.shape()));
  const int64_t per_block = s.numel(), blocks = per_block == 0 ? 0 : y.numel() / per_block;
  bool fused = false;
  Tensor a, m;
  if (dtype == DType::BF16 && y.device().is_cuda()) {
    a = Tensor::empty(y.shape(), dtype, y.device());
    m = Tensor::empty(y.shape(), dtype, y.device());
    KRAKEN_CUDA_ONLY(y.device(), fused = kernels::residual_fork_bf16_cuda(a.data<uint16_t>(), m.data<uint16_t>(),
                                                                         x.data<uint16_t>(), y.data<uint16_t>(),
                                                                         s.data<uint16_t>(), blocks, per_block,
                                                                         stream_of(y)));
  }
  if (!fused) return {add(x, y), add(y, s)};  // the reference, and wherever the kernel declines
  if (needs_grad({x, y, s})) {
    const Shape y_shape = y.shape(), s_shape = s.shape();
    const bool x_needs = x.requires_grad(), y_needs = y.requires_grad(), s_needs = s.requires_grad();
    record("residual_fork", {x, y, s}, {a, m},
           [y_shape, s_shape, blocks, per_block, x_needs, y_needs, s_needs](const std::vector<Tensor>& g) {
             // in the forward pass this was: a = x + y, m = y + s (s over every block of y)
             const Tensor &da = g[0], &dm = g[1];
             Tensor dy = Tensor::empty(y_shape, da.dtype(), da.device());
             Tensor ds = Tensor::empty(s_shape, da.dtype(), da.device());
             bool done = false;
             KRAKEN_CUDA_ONLY(da.device(), done = kernels::residual_fork_backward_bf16_cuda(
                                               dy.data<uint16_t>(), ds.data<uint16_t>(), da.data<uint16_t>(),
                                               dm.data<uint16_t>(), blocks, per_block, stream_of(da)));
             if (!done) dy = add(da, dm), ds = reduce_to(dm, s_shape);
             return std::vector<Tensor>{x_needs ? da : Tensor(), y_needs ? dy : Tensor(), s_needs ? ds : Tensor()};
           });
  }
  return {a, m};
}

std::vector<Tensor> residual_fork_summed_backward(const Shape& shape, bool x_needs, bool y_needs, const Tensor& g_a,
                                                  const Tensor& g_m) {
  // in the forward pass this was: a = x + y, m = y + S with S = Σ_g x[g] (over every block)
  const Tensor da = g_a.defined() ? g_a : Tensor::zeros(shape, DType::BF16, g_m.device());
  const Tensor dm = g_m.defined() ? g_m : Tensor::zeros(shape, DType::BF16, da.device());
  const int64_t blocks = shape[0], per_block = da.numel() / blocks;
  // Into the incoming gradients where the engine's handles are their only ones (each kernel thread
  // reads a position's da and every dm before it writes there), else new buffers.
  Tensor dx = writable_in_place(da) ? da : Tensor::empty(shape, DType::BF16, da.device());
  Tensor dy = writable_in_place(dm) ? dm : Tensor::empty(shape, DType::BF16, da.device());
  bool done = false;
  KRAKEN_CUDA_ONLY(da.device(), done = kernels::residual_fork_summed_backward_bf16_cuda(
                                    dx.data<uint16_t>(), dy.data<uint16_t>(), da.data<uint16_t>(),
                                    dm.data<uint16_t>(), blocks, per_block, stream_of(da)));
  if (!done) {  // gradients off 16-byte boundaries: the chain's ops, the same bits
    const Tensor ds = reduce_to(dm, Shape(shape.begin() + 1, shape.end()));
    dy = add(da, dm);
    dx = add(da, ds);
  }
  return {x_needs ? dx : Tensor(), y_needs ? dy : Tensor()};
}

void record_residual_fork_summed(const Tensor& x, const Tensor& y, const Tensor& a, const Tensor& m) {
  if (!needs_grad({x, y})) return;
  const Shape shape = y.shape();
  const bool x_needs = x.requires_grad(), y_needs = y.requires_grad();
  record("residual_fork_summed", {x, y}, {a, m}, [shape, x_needs, y_needs](const std::vector<Tensor>& g) {
    return residual_fork_summed_backward(shape, x_needs, y_needs, g[0], g[1]);
  });
}

std::vector<Tensor> residual_fork_summed(const Tensor& x, const Tensor& y) {
  const DType dtype = check_float_pair("residual_fork_summed", x, y);
  check_same_shape("residual_fork_summed", x, y);
  if (x.dim() < 1 || x.size(0) < 1)
    KRAKEN_THROW("residual_fork_summed: x ", shape_str(x.shape()), " needs a first dimension of at least one block");
  const int64_t blocks = x.size(0), per_block = x.numel() / blocks;
  bool fused = false;
  Tensor a, m;
  if (dtype == DType::BF16 && y.device().is_cuda()) {
    a = Tensor::empty(y.shape(), dtype, y.device());
    m = Tensor::empty(y.shape(), dtype, y.device());
    KRAKEN_CUDA_ONLY(y.device(), fused = kernels::residual_fork_summed_bf16_cuda(
                                     a.data<uint16_t>(), m.data<uint16_t>(), x.data<uint16_t>(),
                                     y.data<uint16_t>(), blocks, per_block, stream_of(y)));
  }
  if (!fused) return residual_fork(x, y, sum_stack(x));  // the reference, and wherever the kernel declines
  record_residual_fork_summed(x, y, a, m);
  return {a, m};
}

Tensor mul(const Tensor& a, const Tensor& b) {
  const DType dtype = check_float_pair("mul", a, b);
  check_same_shape("mul", a, b);
  if (widen_on_cpu(a)) return narrow(mul(widen(a), widen(b)));
  Tensor out = Tensor::empty(a.shape(), dtype, a.device());
  if (dtype == DType::BF16)
    KRAKEN_CUDA_ONLY(a.device(), kernels::mul_bf16_cuda(out.data<uint16_t>(), a.data<uint16_t>(), b.data<uint16_t>(),
                                                        a.numel(), stream_of(a)));
  else
    KRAKEN_ON_DEVICE(a.device(), kernels::mul_cpu(out.data<float>(), a.data<float>(), b.data<float>(), a.numel()),
                     kernels::mul_cuda(out.data<float>(), a.data<float>(), b.data<float>(), a.numel(), stream_of(a)));
  if (needs_grad({a, b})) {
    const bool a_needs = a.requires_grad(), b_needs = b.requires_grad();
    Tensor a_saved = b_needs ? a.detach() : Tensor(), b_saved = a_needs ? b.detach() : Tensor();
    record("mul", {a, b}, {out}, [a_saved, b_saved](const std::vector<Tensor>& g) {
      // in the forward pass this was: out = a ∘ b
      Tensor da = b_saved.defined() ? mul(g[0], b_saved) : Tensor();
      Tensor db = a_saved.defined() ? mul(g[0], a_saved) : Tensor();
      return std::vector<Tensor>{da, db};
    });
  }
  return out;
}

Tensor scale(const Tensor& x, float alpha) {
  precision::check_float("scale", x);
  if (widen_on_cpu(x)) return narrow(scale(widen(x), alpha));
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (x.dtype() == DType::BF16)
    KRAKEN_CUDA_ONLY(x.device(), kernels::scale_bf16_cuda(out.data<uint16_t>(), x.data<uint16_t>(), alpha, x.numel(),
                                                          stream_of(x)));
  else
    KRAKEN_ON_DEVICE(x.device(), kernels::scale_cpu(out.data<float>(), x.data<float>(), alpha, x.numel()),
                     kernels::scale_cuda(out.data<float>(), x.data<float>(), alpha, x.numel(), stream_of(x)));
  if (needs_grad({x})) {
    record("scale", {x}, {out}, [alpha](const std::vector<Tensor>& g) {
      return std::vector<Tensor>{scale(g[0], alpha)};
    });
  }
  return out;
}

Tensor gelu(const Tensor& x) {
  precision::check_float("gelu", x);
  if (widen_on_cpu(x)) return narrow(gelu(widen(x)));
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (x.dtype() == DType::BF16)
    KRAKEN_CUDA_ONLY(x.device(), kernels::gelu_forward_bf16_cuda(out.data<uint16_t>(), x.data<uint16_t>(), x.numel(),
                                                                 stream_of(x)));
  else
    KRAKEN_ON_DEVICE(x.device(), kernels::gelu_forward_cpu(out.data<float>(), x.data<float>(), x.numel()),
                     kernels::gelu_forward_cuda(out.data<float>(), x.data<float>(), x.numel(), stream_of(x)));
  if (needs_grad({x})) {
    Tensor x_saved = x.detach();
    record("gelu", {x}, {out}, [x_saved](const std::vector<Tensor>& g) {
      Tensor dx = Tensor::zeros(x_saved.shape(), x_saved.dtype(), x_saved.device());
      if (x_saved.dtype() == DType::BF16) {  // only on CUDA: the CPU widened in forward
        KRAKEN_CUDA_ONLY(dx.device(), kernels::gelu_backward_bf16_cuda(dx.data<uint16_t>(), x_saved.data<uint16_t>(),
                                                                       g[0].data<uint16_t>(), dx.numel(), stream_of(dx)));
        return std::vector<Tensor>{dx};
      }
      KRAKEN_ON_DEVICE(x_saved.device(),
                       kernels::gelu_backward_cpu(dx.data<float>(), x_saved.data<float>(), g[0].data<float>(), dx.numel()),
                       kernels::gelu_backward_cuda(dx.data<float>(), x_saved.data<float>(), g[0].data<float>(),
                                                   dx.numel(), stream_of(dx)));
      return std::vector<Tensor>{dx};
    });
  }
  return out;
}

Tensor sum_list(const std::vector<Tensor>& xs) {
  if (xs.empty()) KRAKEN_THROW("sum_list: no tensors");
  for (size_t i = 0; i < xs.size(); ++i) {
    check_float_pair("sum_list", xs[0], xs[i]);
    if (xs[i].shape() != xs[0].shape())
      KRAKEN_THROW("sum_list: tensor ", i, " has shape ", shape_str(xs[i].shape()), ", tensor 0 has ",
                   shape_str(xs[0].shape()));
  }
  Tensor out;
  if (xs[0].dtype() == DType::F32) {
    out = xs[0].clone();
    NoGrad no_grad;
    for (size_t i = 1; i < xs.size(); ++i) accumulate_into(out, xs[i]);
  } else if (widen_on_cpu(xs[0])) {
    std::vector<Tensor> wide;
    for (const Tensor& x : xs) wide.push_back(widen(x));
    return narrow(sum_list(wide));
  } else if (xs.size() <= static_cast<size_t>(kernels::kSumsPerLaunch)) {  // bf16 on CUDA: one pass, f32 sum
    out = Tensor::empty(xs[0].shape(), DType::BF16, xs[0].device());
    std::vector<const uint16_t*> ptrs;
    for (const Tensor& x : xs) ptrs.push_back(x.data<uint16_t>());
    KRAKEN_CUDA_ONLY(out.device(), kernels::sum_bf16_cuda(out.data<uint16_t>(), ptrs.data(),
                                                          static_cast<int64_t>(ptrs.size()), out.numel(),
                                                          stream_of(out)));
  } else {  // bf16 on CUDA, more tensors than one pass takes: an f32 accumulator, one rounding at the end
    Tensor acc = Tensor::zeros(xs[0].shape(), DType::F32, xs[0].device());
    for (const Tensor& x : xs)
      KRAKEN_CUDA_ONLY(x.device(), kernels::accumulate_bf16_cuda(acc.data<float>(), x.data<uint16_t>(), x.numel(),
                                                                 stream_of(x)));
    out = acc.to(DType::BF16);
  }
  if (needs_grad(xs)) {
    const size_t n = xs.size();
    record("sum_list", xs, {out}, [n](const std::vector<Tensor>& g) {
      // in the forward pass this was: out = Σ_i xs[i]; every input receives dout
      return std::vector<Tensor>(n, g[0]);
    });
  }
  return out;
}

Tensor sum_stack(const Tensor& x) {
  precision::check_float("sum_stack", x);
  if (x.dim() < 1 || x.size(0) < 1)
    KRAKEN_THROW("sum_stack: input ", shape_str(x.shape()), " needs a first dimension of at least one block");
  const int64_t G = x.size(0);
  const Shape block(x.shape().begin() + 1, x.shape().end());
  Tensor out;
  {
    // The blocks as views of x's storage, without history: the node below is the only one.
    NoGrad no_grad;
    std::vector<Tensor> blocks;
    for (int64_t g = 0; g < G; ++g) blocks.push_back(x.detach().slice(g, g + 1).reshape(block));
    out = G == 1 ? blocks[0].clone() : sum_list(blocks);
  }
  if (needs_grad({x})) {
    const Shape x_shape = x.shape();
    record("sum_stack", {x}, {out}, [x_shape, G](const std::vector<Tensor>& g) {
      // in the forward pass this was: out = Σ_g x[g]; every block receives dout
      // What x's other consumers sent (a Kraken layer's LayerNorms and residual add) gets dout added to
      // every block in one broadcast add, in place where it is ours alone: where copies of dout into a
      // new gradient and the engine's sum after took three passes over x's size.
      Tensor so_far = take_gradient_so_far(0);
      if (so_far.defined()) {
        if (so_far.shape() != x_shape || so_far.dtype() != g[0].dtype())
          KRAKEN_THROW("gradient accumulation: cannot add sum_stack's ", g[0].describe(), " into ", so_far.describe());
        if (!writable_in_place(so_far) || widen_on_cpu(so_far)) return std::vector<Tensor>{add(so_far, g[0])};
        add_kernel(so_far, so_far, g[0]);
        return std::vector<Tensor>{so_far};
      }
      Tensor dx = Tensor::empty(x_shape, g[0].dtype(), g[0].device());
      for (int64_t b = 0; b < G; ++b) {
        Tensor block = dx.slice(b, b + 1);
        block.copy_from(g[0].reshape(block.shape()));
      }
      return std::vector<Tensor>{dx};
    });
  }
  return out;
}

}  // namespace kraken::runtime::ops
