// Views and re-arrangements: reshape, slice, split, concat, cast. None of them computes; their
// backward passes move gradients back to where the values came from.
#include <numeric>

#include "kernels/elementwise.h"
#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/dispatch.h"
#include "runtime/ops.h"

namespace kraken::runtime::ops {
namespace {

int64_t normalize_dim(const char* op, const Tensor& x, int64_t dim) {
  const int64_t n = x.dim();
  const int64_t d = dim < 0 ? dim + n : dim;
  if (d < 0 || d >= n) KRAKEN_THROW(op, ": dimension ", dim, " out of range for shape ", shape_str(x.shape()));
  return d;
}

// For a split/concat along `dim`: rows = product of the dims before it, inner = product after it.
void outer_inner(const Shape& shape, int64_t dim, int64_t* outer, int64_t* inner) {
  *outer = 1;
  *inner = 1;
  for (int64_t i = 0; i < dim; ++i) *outer *= shape[static_cast<size_t>(i)];
  for (size_t i = static_cast<size_t>(dim) + 1; i < shape.size(); ++i) *inner *= shape[i];
}

bool f32_bf16_pair(DType a, DType b) {
  return (a == DType::F32 && b == DType::BF16) || (a == DType::BF16 && b == DType::F32);
}

// outs[k] = xs[k] in outs[k]'s dtype, k < xs.size(): f32 → bf16 or bf16 → f32, every input of one dtype
// and all on one device. One kernel call for all of them.
void cast_into(const std::vector<Tensor>& outs, const std::vector<Tensor>& xs) {
  const int64_t count = static_cast<int64_t>(xs.size());
  if (count == 0) return;
  std::vector<int64_t> ns;
  for (const Tensor& x : xs) ns.push_back(x.numel());
  if (xs[0].dtype() == DType::F32) {
    std::vector<uint16_t*> to;
    std::vector<const float*> from;
    for (size_t k = 0; k < xs.size(); ++k) to.push_back(outs[k].data<uint16_t>()), from.push_back(xs[k].data<float>());
    KRAKEN_ON_DEVICE(xs[0].device(), kernels::cast_f32_to_bf16_many_cpu(to.data(), from.data(), ns.data(), count),
                     kernels::cast_f32_to_bf16_many_cuda(to.data(), from.data(), ns.data(), count, stream_of(xs[0])));
  } else {
    std::vector<float*> to;
    std::vector<const uint16_t*> from;
    for (size_t k = 0; k < xs.size(); ++k) to.push_back(outs[k].data<float>()), from.push_back(xs[k].data<uint16_t>());
    KRAKEN_ON_DEVICE(xs[0].device(), kernels::cast_bf16_to_f32_many_cpu(to.data(), from.data(), ns.data(), count),
                     kernels::cast_bf16_to_f32_many_cuda(to.data(), from.data(), ns.data(), count, stream_of(xs[0])));
  }
}

}  // namespace

Tensor reshape(const Tensor& x, const Shape& shape) {
  check_defined("reshape", x);
  Shape target = shape;
  int64_t known = 1, infer = -1;
  for (size_t i = 0; i < target.size(); ++i) {
    if (target[i] == -1) {
      if (infer >= 0) KRAKEN_THROW("reshape: more than one -1 in ", shape_str(shape));
      infer = static_cast<int64_t>(i);
    } else if (target[i] < 0) {
      KRAKEN_THROW("reshape: negative dimension in ", shape_str(shape));
    } else {
      known *= target[i];
    }
  }
  if (infer >= 0) {
    if (known == 0 || x.numel() % known != 0)
      KRAKEN_THROW("reshape: cannot infer -1 reshaping ", shape_str(x.shape()), " to ", shape_str(shape));
    target[static_cast<size_t>(infer)] = x.numel() / known;
  }
  if (shape_numel(target) != x.numel())
    KRAKEN_THROW("reshape: ", shape_str(x.shape()), " has ", x.numel(), " elements, ", shape_str(target), " has ",
                 shape_numel(target));
  Tensor out = Tensor::from_storage(x.impl()->storage, x.impl()->offset, target, x.dtype());
  if (needs_grad({x})) {
    const Shape in_shape = x.shape();
    record("reshape", {x}, {out}, [in_shape](const std::vector<Tensor>& g) {
      return std::vector<Tensor>{reshape(g[0], in_shape)};
    });
  }
  return out;
}

Tensor slice(const Tensor& x, int64_t begin, int64_t end) {
  check_defined("slice", x);
  if (x.dim() == 0) KRAKEN_THROW("slice: cannot slice a scalar");
  const int64_t rows = x.size(0);
  if (begin < 0 || end < begin || end > rows)
    KRAKEN_THROW("slice: rows [", begin, ", ", end, ") out of range for shape ", shape_str(x.shape()));
  Shape shape = x.shape();
  shape[0] = end - begin;
  const int64_t row_elems = rows == 0 ? 0 : x.numel() / rows;
  Tensor out = Tensor::from_storage(x.impl()->storage, x.impl()->offset + begin * row_elems, shape, x.dtype());
  if (needs_grad({x})) {
    const Shape in_shape = x.shape();
    record("slice", {x}, {out}, [in_shape, begin, end](const std::vector<Tensor>& g) {
      // in the forward pass this was: out = x[begin:end]; the other rows get zero gradient
      Tensor dx = Tensor::zeros(in_shape, g[0].dtype(), g[0].device());
      Tensor rows_view = dx.detach().slice(begin, end);
      rows_view.copy_from(g[0]);
      return std::vector<Tensor>{dx};
    });
  }
  return out;
}

std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t dim) {
  check_defined("split", x);
  const int64_t d = normalize_dim("split", x, dim);
  const int64_t total = std::accumulate(sizes.begin(), sizes.end(), int64_t{0});
  if (total != x.size(d))
    KRAKEN_THROW("split: sizes add up to ", total, " but dimension ", d, " of ", shape_str(x.shape()), " is ",
                 x.size(d));
  int64_t outer, inner;
  outer_inner(x.shape(), d, &outer, &inner);
  const size_t elem = dtype_size(x.dtype());
  const size_t src_pitch = static_cast<size_t>(x.size(d) * inner) * elem;
  std::vector<Tensor> outs;
  int64_t start = 0;
  for (int64_t size : sizes) {
    if (size < 0) KRAKEN_THROW("split: negative size ", size);
    Shape shape = x.shape();
    shape[static_cast<size_t>(d)] = size;
    Tensor out = Tensor::empty(shape, x.dtype(), x.device());
    const size_t width = static_cast<size_t>(size * inner) * elem;
    copy_2d(out.data_ptr(), width, static_cast<const char*>(x.data_ptr()) + static_cast<size_t>(start * inner) * elem,
            src_pitch, width, static_cast<size_t>(outer), x.device());
    outs.push_back(out);
    start += size;
  }
  if (needs_grad({x})) {
    record("split", {x}, outs, [d](const std::vector<Tensor>& g) {
      // in the forward pass this was: outs = split(x); so dx = concat(douts)
      return std::vector<Tensor>{concat(g, d)};
    });
  }
  return outs;
}

Tensor concat(const std::vector<Tensor>& xs, int64_t dim) {
  if (xs.empty()) KRAKEN_THROW("concat: no tensors");
  const Tensor& first = xs[0];
  check_defined("concat", first);
  const int64_t d = normalize_dim("concat", first, dim);
  Shape shape = first.shape();
  int64_t extent = 0;
  std::vector<int64_t> sizes;
  for (const Tensor& t : xs) {
    check_defined("concat", t);
    check_same_device("concat", first, t);
    if (t.dtype() != first.dtype()) KRAKEN_THROW("concat: dtypes differ: ", first.describe(), " vs ", t.describe());
    Shape a = t.shape(), b = first.shape();
    if (a.size() != b.size()) KRAKEN_THROW("concat: shapes ", shape_str(b), " and ", shape_str(a), " differ in rank");
    a[static_cast<size_t>(d)] = b[static_cast<size_t>(d)] = 0;
    if (a != b)
      KRAKEN_THROW("concat along ", d, ": shapes ", shape_str(first.shape()), " and ", shape_str(t.shape()),
                   " differ outside that dimension");
    sizes.push_back(t.size(d));
    extent += t.size(d);
  }
  shape[static_cast<size_t>(d)] = extent;
  Tensor out = Tensor::empty(shape, first.dtype(), first.device());
  int64_t outer, inner;
  outer_inner(shape, d, &outer, &inner);
  const size_t elem = dtype_size(first.dtype());
  const size_t dst_pitch = static_cast<size_t>(extent * inner) * elem;
  int64_t start = 0;
  for (const Tensor& t : xs) {
    const size_t width = static_cast<size_t>(t.size(d) * inner) * elem;
    copy_2d(static_cast<char*>(out.data_ptr()) + static_cast<size_t>(start * inner) * elem, dst_pitch, t.data_ptr(),
            width, width, static_cast<size_t>(outer), t.device());
    start += t.size(d);
  }
  if (needs_grad(xs)) {
    record("concat", xs, {out}, [sizes, d](const std::vector<Tensor>& g) {
      // in the forward pass this was: out = concat(xs); so dxs = split(dout)
      return split(g[0], sizes, d);
    });
  }
  return out;
}

Tensor cast(const Tensor& x, DType dtype) {
  check_defined("cast", x);
  if (x.dtype() == dtype) return x;
  Tensor out = x.to(dtype);
  if (needs_grad({x})) {
    const DType from = x.dtype();
    record("cast", {x}, {out}, [from](const std::vector<Tensor>& g) { return std::vector<Tensor>{g[0].to(from)}; });
  }
  return out;
}

std::vector<Tensor> cast_many(const std::vector<Tensor>& xs, DType dtype) {
  std::vector<Tensor> outs(xs.size());
  std::vector<size_t> moved;  // the inputs that change dtype
  for (size_t k = 0; k < xs.size(); ++k) {
    check_defined("cast_many", xs[k]);
    if (xs[k].dtype() == dtype)
      outs[k] = xs[k];
    else
      moved.push_back(k);
  }
  if (moved.empty()) return outs;
  const Tensor& first = xs[moved[0]];
  bool together = f32_bf16_pair(first.dtype(), dtype);
  for (size_t k : moved) together = together && xs[k].dtype() == first.dtype() && xs[k].device() == first.device();
  if (!together) {
    for (size_t k : moved) outs[k] = cast(xs[k], dtype);
    return outs;
  }
  std::vector<Tensor> from, to;
  for (size_t k : moved) {
    from.push_back(xs[k]);
    to.push_back(Tensor::empty(xs[k].shape(), dtype, xs[k].device()));
    outs[k] = to.back();
  }
  cast_into(to, from);
  // One node over the inputs that need a gradient; the others' casts stay without history, as cast()
  // leaves them.
  std::vector<Tensor> tracked, tracked_out;
  for (size_t k = 0; k < from.size(); ++k)
    if (needs_grad({from[k]})) tracked.push_back(from[k]), tracked_out.push_back(to[k]);
  if (!tracked.empty()) {
    const DType source = first.dtype();
    const Device device = first.device();
    record("cast_many", tracked, tracked_out, [source, dtype, device](const std::vector<Tensor>& g) {
      // in the forward pass this was: to_k = from_k.to(dtype); so dfrom_k = dto_k.to(source), for every k
      std::vector<Tensor> dfrom(g.size()), grads, casts;
      for (size_t k = 0; k < g.size(); ++k) {
        if (!g[k].defined()) continue;
        if (g[k].dtype() != dtype || g[k].device() != device) {  // not the forward's kind: cast it alone
          dfrom[k] = g[k].to(source);
          continue;
        }
        dfrom[k] = Tensor::empty(g[k].shape(), source, device);
        grads.push_back(g[k]);
        casts.push_back(dfrom[k]);
      }
      cast_into(casts, grads);
      return dfrom;
    });
  }
  return outs;
}

}  // namespace kraken::runtime::ops
