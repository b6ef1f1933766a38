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

// cast_into for f32 and bf16 sources mixed: one call per source dtype.
void cast_by_source(const std::vector<Tensor>& outs, const std::vector<Tensor>& xs) {
  for (DType from : {DType::F32, DType::BF16}) {
    std::vector<Tensor> to, src;
    for (size_t j = 0; j < xs.size(); ++j)
      if (xs[j].dtype() == from) src.push_back(xs[j]), to.push_back(outs[j]);
    cast_into(to, src);
  }
}

// The existing f32 gradient of `input` that its bf16 gradient g can be added into in place, where input
// is an f32 leaf whose .grad is defined (zeroed in place between steps, or a gradient bucket's view) and
// not already taken by an earlier input of the same call (`taken`); else undefined, and the engine gets
// a new f32 tensor to take or add. (What the engine would do — widen, then add with alpha 1 — in one
// pass, and on a GPU one launch for the whole call instead of one add per tensor.)
Tensor gradient_to_add_into(const Tensor& input, const Tensor& g, std::vector<const TensorImpl*>& taken) {
  if (!g.defined() || g.dtype() != DType::BF16 || !input.is_leaf() || !input.requires_grad() ||
      input.dtype() != DType::F32)
    return Tensor();
  Tensor grad = input.grad();
  if (!grad.defined() || grad.dtype() != DType::F32 || grad.shape() != g.shape() || grad.device() != g.device())
    return Tensor();
  for (const TensorImpl* t : taken)
    if (t == grad.impl()) return Tensor();
  taken.push_back(grad.impl());
  return grad;
}

// accs[k] += xs[k] widened (f32 += bf16), every tensor on one device: one kernel call.
void add_into(const std::vector<Tensor>& accs, const std::vector<Tensor>& xs) {
  const int64_t count = static_cast<int64_t>(xs.size());
  if (count == 0) return;
  std::vector<int64_t> ns;
  std::vector<float*> to;
  std::vector<const uint16_t*> from;
  for (size_t k = 0; k < xs.size(); ++k)
    ns.push_back(xs[k].numel()), to.push_back(accs[k].data<float>()), from.push_back(xs[k].data<uint16_t>());
  KRAKEN_ON_DEVICE(xs[0].device(), kernels::accumulate_bf16_many_cpu(to.data(), from.data(), ns.data(), count),
                   kernels::accumulate_bf16_many_cuda(to.data(), from.data(), ns.data(), count, stream_of(xs[0])));
}

// into[k], checked to take the result of size `shape` in `dtype`: a fresh handle on it (a node's output
// must not carry an earlier forward's history); undefined where there is none.
Tensor buffer_for(const char* op, const std::vector<Tensor>& into, size_t k, const Shape& shape, DType dtype) {
  if (k >= into.size() || !into[k].defined()) return Tensor();
  if (into[k].shape() != shape || into[k].dtype() != dtype)
    KRAKEN_THROW(op, ": buffer ", k, " is ", into[k].describe(), ", expected ", dtype_name(dtype), " ",
                 shape_str(shape));
  return into[k].detach();
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

std::vector<Tensor> cast_many(const std::vector<Tensor>& xs, DType dtype) { return cast_many(xs, dtype, {}, false); }

std::vector<Tensor> cast_many(const std::vector<Tensor>& xs, DType dtype, const std::vector<Tensor>& into,
                              bool filled) {
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
  std::vector<Tensor> from, to, cast_from, cast_to;
  for (size_t k : moved) {
    from.push_back(xs[k]);
    Tensor buffer = buffer_for("cast_many", into, k, xs[k].shape(), dtype);
    const bool write = !(buffer.defined() && filled);
    to.push_back(buffer.defined() ? buffer : Tensor::empty(xs[k].shape(), dtype, xs[k].device()));
    if (write) cast_from.push_back(xs[k]), cast_to.push_back(to.back());
    outs[k] = to.back();
  }
  cast_into(cast_to, cast_from);
  // One node over the inputs that need a gradient; the others' casts stay without history, as cast()
  // leaves them.
  std::vector<Tensor> tracked, tracked_out;
  for (size_t k = 0; k < from.size(); ++k)
    if (needs_grad({from[k]})) tracked.push_back(from[k]), tracked_out.push_back(to[k]);
  if (!tracked.empty()) {
    const DType source = first.dtype();
    const Device device = first.device();
    record("cast_many", tracked, tracked_out, [tracked, source, dtype, device](const std::vector<Tensor>& g) {
      // in the forward pass this was: to_k = from_k.to(dtype); so dfrom_k = dto_k.to(source), for every k —
      // added straight into from_k's existing f32 gradient where it has one (gradient_to_add_into)
      std::vector<Tensor> dfrom(g.size()), grads, casts, added, into;
      std::vector<const TensorImpl*> taken;
      for (size_t k = 0; k < g.size(); ++k) {
        if (!g[k].defined()) continue;
        if (g[k].dtype() != dtype || g[k].device() != device) {  // not the forward's kind: cast it alone
          dfrom[k] = g[k].to(source);
          continue;
        }
        if (Tensor acc = gradient_to_add_into(tracked[k], g[k], taken); acc.defined()) {
          added.push_back(g[k]);
          into.push_back(acc);
          continue;
        }
        dfrom[k] = Tensor::empty(g[k].shape(), source, device);
        grads.push_back(g[k]);
        casts.push_back(dfrom[k]);
      }
      cast_into(casts, grads);
      add_into(into, added);
      return dfrom;
    });
  }
  return outs;
}

std::vector<Tensor> stack_many(const std::vector<std::vector<Tensor>>& lists, DType dtype) {
  return stack_many(lists, dtype, {}, false);
}

std::vector<Tensor> stack_many(const std::vector<std::vector<Tensor>>& lists, DType dtype,
                               const std::vector<Tensor>& into, bool filled) {
  std::vector<Tensor> stacks(lists.size());
  std::vector<Tensor> inputs;              // every stacked input
  std::vector<Tensor> cast_from, cast_to;  // those that change dtype (f32 <-> bf16): one cast call
  std::vector<size_t> list_of;             // for each input, its list
  std::vector<bool> built(lists.size(), false);  // stacks made here (not absent, not a view)
  for (size_t k = 0; k < lists.size(); ++k) {
    const std::vector<Tensor>& list = lists[k];
    if (list.empty() || !list[0].defined()) continue;
    const Tensor& first = list[0];
    for (size_t i = 0; i < list.size(); ++i) {
      check_defined("stack_many", list[i]);
      check_same_device("stack_many", first, list[i]);
      if (list[i].shape() != first.shape() || list[i].dtype() != first.dtype())
        KRAKEN_THROW("stack_many: list ", k, " holds ", first.describe(), " and ", list[i].describe(),
                     ": a stack takes tensors of one shape and dtype");
    }
    Shape shape = first.shape();
    shape.insert(shape.begin(), static_cast<int64_t>(list.size()));
    if (list.size() == 1 && first.dtype() == dtype) {  // nothing to move: a view (GPT-2 in f32)
      stacks[k] = reshape(first, shape);
      continue;
    }
    Tensor buffer = buffer_for("stack_many", into, k, shape, dtype);
    const bool write = !(buffer.defined() && filled);
    stacks[k] = buffer.defined() ? buffer : Tensor::empty(shape, dtype, first.device());
    built[k] = true;
    for (size_t i = 0; i < list.size(); ++i) {
      Tensor view = stacks[k].slice(static_cast<int64_t>(i), static_cast<int64_t>(i) + 1).reshape(first.shape());
      inputs.push_back(list[i]), list_of.push_back(k);
      if (!write) continue;
      if (list[i].dtype() == dtype) view.copy_from(list[i]);
      else if (f32_bf16_pair(list[i].dtype(), dtype)) cast_from.push_back(list[i]), cast_to.push_back(view);
      else view.copy_from(list[i].to(dtype));
    }
  }
  cast_by_source(cast_to, cast_from);
  if (needs_grad(inputs)) {
    std::vector<Tensor> outs;
    std::vector<int> out_of_list(lists.size(), -1);
    for (size_t k = 0; k < stacks.size(); ++k)
      if (built[k]) out_of_list[k] = static_cast<int>(outs.size()), outs.push_back(stacks[k]);
    std::vector<DType> from_dtypes;
    for (const Tensor& t : inputs) from_dtypes.push_back(t.dtype());
    record("stack_many", inputs, outs, [inputs, list_of, out_of_list, from_dtypes](const std::vector<Tensor>& g) {
      // in the forward pass this was: stack[k][i] = cast(list[k][i]); so dlist[k][i] = cast back of
      // dstack[k][i], the casts in one call per direction as forward — a bf16 piece added straight into
      // its f32 input's existing gradient where it has one (gradient_to_add_into)
      std::vector<Tensor> grads(list_of.size());
      std::vector<size_t> seen(out_of_list.size(), 0);
      std::vector<Tensor> cast_src, cast_dst, added, into;
      std::vector<const TensorImpl*> taken;
      for (size_t j = 0; j < list_of.size(); ++j) {
        const Tensor& dstack = g[static_cast<size_t>(out_of_list[list_of[j]])];
        const int64_t i = static_cast<int64_t>(seen[list_of[j]]++);
        if (!dstack.defined()) continue;  // the stack got no gradient: neither do its inputs
        const Shape shape(dstack.shape().begin() + 1, dstack.shape().end());
        Tensor piece = dstack.slice(i, i + 1).reshape(shape);
        if (piece.dtype() == from_dtypes[j]) {
          grads[j] = piece.clone();
        } else if (Tensor acc = gradient_to_add_into(inputs[j], piece, taken); acc.defined()) {
          added.push_back(piece), into.push_back(acc);
        } else if (f32_bf16_pair(piece.dtype(), from_dtypes[j])) {
          grads[j] = Tensor::empty(shape, from_dtypes[j], piece.device());
          cast_src.push_back(piece), cast_dst.push_back(grads[j]);
        } else {
          grads[j] = piece.to(from_dtypes[j]);
        }
      }
      cast_by_source(cast_dst, cast_src);
      add_into(into, added);
      return grads;
    });
  }
  return stacks;
}

}  // namespace kraken::runtime::ops
