// Matrix products and the linear layer, both on BLAS (CPU) or cuBLAS (CUDA); bf16 operands go through
// cuBLASLt on CUDA and are widened on the CPU (runtime/ops/precision.h).
//
// With C = op(A)·op(B), the gradients are dop(A) = dC·op(B)ᵀ and dop(B) = op(A)ᵀ·dC; each case below
// writes them as one more product of the stored operands, so no transpose is ever materialised.
#include "kernels/matmul.h"

#include "kernels/elementwise.h"
#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/dispatch.h"
#include "runtime/ops.h"
#include "runtime/ops/grouped.h"
#include "runtime/ops/precision.h"

namespace kraken::runtime::ops {
namespace {

// bf16 C (batch, M, N) = op(A)·op(B) (+ bias on every row) on CUDA: cuBLASLt, f32 accumulation, the
// bias added in the product's epilogue, one rounding. With a bias, one product per matrix, matrix i taking
// the bias stride_bias elements further on (0: one bias for all; a grouped linear's: N).
void gemm_bf16(Tensor& c, const Tensor& a, const Tensor& b, int64_t batch, int64_t M, int64_t N, int64_t K, bool ta,
               bool tb, int64_t stride_a, int64_t stride_b, const Tensor& bias = Tensor(), int64_t stride_bias = 0) {
  if (K == 0) {  // an empty sum: zeros (cuBLASLt wants K >= 1), then the bias
    KRAKEN_CHECK(stride_bias == 0, "gemm_bf16: K = 0 with a bias per matrix");
    c.zero_();
    NoGrad no_grad;
    if (bias.defined()) c.copy_from(add(c, bias));
    return;
  }
  if (batch > 1 && !bias.defined()) {  // one strided-batch product
    KRAKEN_CUDA_ONLY(c.device(), kernels::matmul_bf16_batched_cuda(c.data<uint16_t>(), true, a.data<uint16_t>(),
                                                                   b.data<uint16_t>(), batch, M, N, K, ta, tb, M * N,
                                                                   stride_a, stride_b, stream_of(c)));
    return;
  }
  const kernels::MatmulEpilogue epilogue = bias.defined() ? kernels::MatmulEpilogue::kBias : kernels::MatmulEpilogue::kNone;
  const uint16_t* bias_ptr = bias.defined() ? bias.data<uint16_t>() : nullptr;
  for (int64_t i = 0; i < batch; ++i) {
    KRAKEN_CUDA_ONLY(c.device(), kernels::matmul_bf16_cuda(c.data<uint16_t>() + i * M * N, true,
                                                           a.data<uint16_t>() + i * stride_a,
                                                           b.data<uint16_t>() + i * stride_b,
                                                           bias_ptr ? bias_ptr + i * stride_bias : nullptr, M, N, K, ta,
                                                           tb, epilogue, stream_of(c)));
  }
}

// C (batch, M, N) = op(A)·op(B) (+ beta·C) on raw tensors. bf16 (CUDA only) takes beta = 0.
void gemm(Tensor& c, const Tensor& a, const Tensor& b, int64_t batch, int64_t M, int64_t N, int64_t K, bool ta,
          bool tb, float beta, int64_t stride_a, int64_t stride_b) {
  if (c.dtype() == DType::BF16) {
    KRAKEN_CHECK(beta == 0.0f, "bf16 products do not accumulate into their output");
    gemm_bf16(c, a, b, batch, M, N, K, ta, tb, stride_a, stride_b);
    return;
  }
  const int64_t stride_c = M * N;
  KRAKEN_ON_DEVICE(c.device(),
                   kernels::matmul_batched_cpu(c.data<float>(), a.data<float>(), b.data<float>(), batch, M, N, K, ta,
                                               tb, 1.0f, beta, stride_c, stride_a, stride_b),
                   kernels::matmul_batched_cuda(c.data<float>(), a.data<float>(), b.data<float>(), batch, M, N, K, ta,
                                                tb, 1.0f, beta, stride_c, stride_a, stride_b, stream_of(c)));
}

[[noreturn]] void mismatch(const Tensor& a, const Tensor& b, bool ta, bool tb, const char* why) {
  KRAKEN_THROW("matmul: ", why, ": ", shape_str(a.shape()), (ta ? "ᵀ" : ""), " · ", shape_str(b.shape()),
               (tb ? "ᵀ" : ""));
}

}  // namespace

Tensor group_row_sums(const Tensor& dy, int64_t groups, int64_t rows, int64_t cols, BiasColumns zero) {
  Tensor db = Tensor::zeros({groups, cols}, dy.dtype(), dy.device());
  bool skipped = false;  // the zero columns left unread, and so zeros
  // On CUDA every group's sums in one launch of each column-sum pass (kernels/elementwise.h): a launch pair
  // per group before, four bias gradients of four sub-layers a Kraken layer made 32 launches.
  if (dy.dtype() == DType::BF16) {
    if (zero.count > 0)
      KRAKEN_CUDA_ONLY(dy.device(), skipped = kernels::sum_rows_skipping_bf16_cuda(
                                        db.data<uint16_t>(), dy.data<uint16_t>(), groups, rows, cols, zero.first,
                                        zero.count, stream_of(dy)));
    if (!skipped)
      KRAKEN_CUDA_ONLY(dy.device(), kernels::sum_rows_grouped_bf16_cuda(db.data<uint16_t>(), dy.data<uint16_t>(),
                                                                        groups, rows, cols, stream_of(dy)));
  } else {
    float* d = db.data<float>();
    const float* y = dy.data<float>();
    const auto each_group = [&] {
      for (int64_t g = 0; g < groups; ++g) kernels::sum_rows_cpu(d + g * cols, y + g * rows * cols, rows, cols);
    };
    KRAKEN_ON_DEVICE(dy.device(), each_group(), kernels::sum_rows_grouped_cuda(d, y, groups, rows, cols, stream_of(dy)));
  }
  if (!skipped) zero_bias_columns(db, groups, cols, zero);  // (elsewhere the sums' cost is the full one)
  return db;
}

void zero_bias_columns(const Tensor& db, int64_t groups, int64_t cols, BiasColumns zero) {
  if (zero.count <= 0) return;
  const size_t element = dtype_size(db.dtype());
  for (int64_t g = 0; g < groups; ++g)
    zero_bytes(static_cast<char*>(db.data_ptr()) + static_cast<size_t>(g * cols + zero.first) * element, db.device(),
               static_cast<size_t>(zero.count) * element);
}

void add_group_biases(const Tensor& out, const Tensor& in, const Tensor& bias, int64_t groups, int64_t rows,
                      int64_t cols) {
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t first = g * rows * cols;
    if (out.dtype() == DType::BF16) {
      KRAKEN_CUDA_ONLY(out.device(), kernels::add_broadcast_bf16_cuda(out.data<uint16_t>() + first,
                                                                      in.data<uint16_t>() + first,
                                                                      bias.data<uint16_t>() + g * cols, rows, cols,
                                                                      stream_of(out)));
    } else {
      float* o = out.data<float>() + first;
      const float *x = in.data<float>() + first, *b = bias.data<float>() + g * cols;
      KRAKEN_ON_DEVICE(out.device(), kernels::add_broadcast_cpu(o, x, b, rows, cols),
                       kernels::add_broadcast_cuda(o, x, b, rows, cols, stream_of(out)));
    }
  }
}

Tensor matmul(const Tensor& a, const Tensor& b, bool ta, bool tb) {
  precision::check_float("matmul", a, "first operand");
  precision::check_float("matmul", b, "second operand");
  check_same_device("matmul", a, b);
  const DType dtype = precision::common_float("matmul", {&a, &b});
  if (precision::widen_on_cpu(a)) return precision::narrow(matmul(precision::widen(a), precision::widen(b), ta, tb));
  Tensor out;
  if (a.dim() == 3 && b.dim() == 3) {  // batched
    if (a.size(0) != b.size(0)) mismatch(a, b, ta, tb, "batch sizes differ");
    const int64_t batch = a.size(0);
    const int64_t M = ta ? a.size(2) : a.size(1), K = ta ? a.size(1) : a.size(2);
    const int64_t Kb = tb ? b.size(2) : b.size(1), N = tb ? b.size(1) : b.size(2);
    if (K != Kb) mismatch(a, b, ta, tb, "inner dimensions differ");
    out = Tensor::empty({batch, M, N}, dtype, a.device());
    gemm(out, a, b, batch, M, N, K, ta, tb, 0.0f, M * K, K * N);
  } else if (a.dim() >= 2 && b.dim() == 2) {  // 2-D, or N-D rows times one matrix
    if (a.dim() > 2 && ta) mismatch(a, b, ta, tb, "a transposed operand must be 2-D");
    const int64_t K = ta ? a.size(0) : a.size(-1);
    // Rows = the product of the leading dims (not numel / K, which is 0 when K = 0 and left C unwritten).
    const int64_t M = ta ? a.size(1) : shape_numel(Shape(a.shape().begin(), a.shape().end() - 1));
    const int64_t Kb = tb ? b.size(1) : b.size(0), N = tb ? b.size(0) : b.size(1);
    if (K != Kb) mismatch(a, b, ta, tb, "inner dimensions differ");
    Shape shape = a.shape();
    if (ta) shape = {M, N};
    else shape.back() = N;
    out = Tensor::empty(shape, dtype, a.device());
    gemm(out, a, b, 1, M, N, K, ta, tb, 0.0f, 0, 0);
  } else {
    mismatch(a, b, ta, tb, "supported are 2-D·2-D, 3-D·3-D (batched) and N-D·2-D");
  }

  if (needs_grad({a, b})) {
    const bool a_needs = a.requires_grad(), b_needs = b.requires_grad();
    Tensor a_saved = b_needs ? a.detach() : Tensor(), b_saved = a_needs ? b.detach() : Tensor();
    const Shape a_shape = a.shape();
    const bool nd = b.dim() == 2 && a.dim() > 2;  // N-D rows times one matrix
    // A parameter matrix (the tied LM head's wte) takes dop(B) directly, with beta = 1 (f32 only).
    Tensor b_leaf = b.dim() == 2 && b.is_leaf() && dtype == DType::F32 ? b : Tensor();
    record("matmul", {a, b}, {out}, [a_saved, b_saved, b_leaf, a_shape, nd, ta, tb](const std::vector<Tensor>& g) {
      const Tensor& dc = g[0];
      Tensor da, db;
      if (b_saved.defined()) {
        // dop(A) = dC·op(B)ᵀ
        da = ta ? matmul(b_saved, dc, tb, true) : matmul(dc, b_saved, false, !tb);
      }
      if (a_saved.defined()) {
        // dop(B) = op(A)ᵀ·dC, with A's leading dims flattened into rows when it is N-D
        Tensor a2 = nd ? a_saved.reshape({-1, a_shape.back()}) : a_saved;
        Tensor dc2 = nd ? dc.reshape({-1, dc.size(-1)}) : dc;
        Tensor direct = dc.dim() == 3 && !nd ? Tensor() : leaf_grad_accumulator(b_leaf);
        if (direct.defined()) {
          // op(A) is (R, K) and dC (R, N): B stored (N, K) gets dCᵀ·op(A), stored (K, N) op(A)ᵀ·dC.
          const int64_t R = dc2.size(0), N = dc2.size(1), K = ta ? a2.size(0) : a2.size(1);
          if (tb) gemm(direct, dc2, a2, 1, N, K, R, true, ta, 1.0f, 0, 0);
          else gemm(direct, a2, dc2, 1, K, N, R, !ta, false, 1.0f, 0, 0);
        } else {
          db = tb ? matmul(dc2, a2, true, ta) : matmul(a2, dc2, !ta, false);
        }
      }
      return std::vector<Tensor>{da, db};
    });
  }
  return out;
}

namespace {

// The grouped linear (ops.h): x (G, ..., in), weight (G, out, in), bias (G, out); G > 1. Every product is
// one strided batch over the groups (on CUDA in bf16: one cuBLASLt call), forward and backward, except the
// bf16 forward with biases (a product per group, each bias in its epilogue).
Tensor grouped_linear(const Tensor& x, const Tensor& weight, const Tensor& bias, BiasColumns zero) {
  const int64_t G = weight.size(0), outf = weight.size(1), in = weight.size(2);
  const int64_t rows = shape_numel(Shape(x.shape().begin() + 1, x.shape().end() - 1));  // per group
  const DType dtype = x.dtype();
  Shape shape = x.shape();
  shape.back() = outf;
  Tensor out = Tensor::empty(shape, dtype, x.device());
  // y[g] (rows, out) = x[g] (rows, in) · W[g]ᵀ + b[g] on every row. bf16 with a bias: a product per group
  // with b[g] in its epilogue, as the plain linear's — one strided batch, then a pass adding the biases,
  // wrote y and read it back (8 passes a Kraken layer: 4.75 of 169 ms of kernels in a step of GPT-2's
  // shape at degree 4, B = 32, H200). Each b[g] 16-byte aligned, as the plain linear's biases are (cuBLASLt
  // plans for the pointer's alignment, and the bias epilogue has no fallback); else one strided batch, the
  // biases after it.
  const bool biases_aligned = bias.defined() && outf % 8 == 0 && reinterpret_cast<uintptr_t>(bias.data_ptr()) % 16 == 0;
  if (biases_aligned && dtype == DType::BF16 && in > 0) {
    gemm_bf16(out, x, weight, G, rows, outf, in, false, true, rows * in, outf * in, bias, outf);
  } else {
    gemm(out, x, weight, G, rows, outf, in, false, true, 0.0f, rows * in, outf * in);
    if (bias.defined()) add_group_biases(out, out, bias, G, rows, outf);
  }
  if (needs_grad({x, weight, bias})) {
    const bool x_needs = x.requires_grad(), w_needs = weight.requires_grad();
    const bool b_needs = bias.defined() && bias.requires_grad();
    Tensor x_saved = w_needs ? x.detach() : Tensor(), w_saved = x_needs ? weight.detach() : Tensor();
    const Shape x_shape = x.shape(), w_shape = weight.shape();
    record("linear", {x, weight, bias}, {out},
           [x_saved, w_saved, x_shape, w_shape, G, rows, in, outf, b_needs, dtype, zero](const std::vector<Tensor>& g) {
             const Tensor& dy = g[0];  // (G, rows, out)
             Tensor dx, dw, db;
             if (w_saved.defined()) {  // dx[g] (rows, in) = dy[g] · W[g]
               dx = Tensor::empty(x_shape, dtype, dy.device());
               gemm(dx, dy, w_saved, G, rows, in, outf, false, false, 0.0f, rows * outf, outf * in);
             }
             bool biases_done = false;
             if (x_saved.defined()) {  // dW[g] (out, in) = dy[g]ᵀ · x[g]
               dw = Tensor::empty(w_shape, dtype, dy.device());
               // At fusion level 2, db[g] = Σ_rows dy[g] in the same product (BGRADB), one per group where
               // cuBLASLt has an algorithm; else one strided batch and the grouped column sums below.
               if (dtype == DType::BF16 && b_needs && rows > 0 && epilogue_fusion() == EpilogueFusion::kGeluAndBiasGrads) {
                 db = Tensor::empty({G, outf}, dtype, dy.device());
                 KRAKEN_CUDA_ONLY(dy.device(), biases_done = kernels::matmul_bias_grad_bf16_batched_cuda(
                                                   dw.data<uint16_t>(), db.data<uint16_t>(), dy.data<uint16_t>(),
                                                   x_saved.data<uint16_t>(), G, outf, in, rows, true, false,
                                                   outf * in, rows * outf, rows * in, outf, stream_of(dy)));
                 if (!biases_done) db = Tensor();
               }
               if (!biases_done) gemm(dw, dy, x_saved, G, outf, in, rows, true, false, 0.0f, rows * outf, rows * in);
               if (biases_done) zero_bias_columns(db, G, outf, zero);
             }
             if (b_needs && !biases_done) db = group_row_sums(dy, G, rows, outf, zero);
             return std::vector<Tensor>{dx, dw, db};
           });
  }
  return out;
}

}  // namespace

Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias, BiasColumns zero_grad) {
  precision::check_float("linear", x, "input");
  precision::check_float("linear", weight, "weight");
  if (zero_grad.count != 0) {
    const int64_t outf = weight.dim() >= 2 ? weight.size(-2) : 0;
    if (!bias.defined() || zero_grad.first < 0 || zero_grad.count < 0 || zero_grad.first + zero_grad.count > outf)
      KRAKEN_THROW("linear: zero_grad columns [", zero_grad.first, ", ", zero_grad.first + zero_grad.count, ") ",
                   bias.defined() ? "are not within the bias's " + std::to_string(outf) + " columns"
                                  : std::string("without a bias"));
  }
  if (weight.dim() == 3) {  // grouped: x (G, ..., in), weight (G, out, in), bias (G, out)
    check_same_device("linear", x, weight);
    const int64_t G = weight.size(0);
    if (x.dim() < 2 || x.size(0) != G || x.size(-1) != weight.size(2))
      KRAKEN_THROW("linear: grouped weight ", shape_str(weight.shape()), " is (groups, out, in): the input ",
                   shape_str(x.shape()), " must be (", G, ", ..., ", weight.size(2), ")");
    if (bias.defined()) {
      precision::check_float("linear", bias, "bias");
      check_same_device("linear", x, bias);
      if (bias.shape() != Shape{G, weight.size(1)})
        KRAKEN_THROW("linear: bias ", shape_str(bias.shape()), " for grouped weight ", shape_str(weight.shape()),
                     ", expected (", G, ", ", weight.size(1), ")");
    }
    precision::common_float("linear", {&x, &weight, &bias});
    if (G == 1) {  // one group is the plain linear on views
      Shape inner(x.shape().begin() + 1, x.shape().end()), out_shape = x.shape();
      out_shape.back() = weight.size(1);
      Tensor y = linear(reshape(x, inner), reshape(weight, {weight.size(1), weight.size(2)}),
                        bias.defined() ? reshape(bias, {weight.size(1)}) : Tensor(), zero_grad);
      return reshape(y, out_shape);
    }
    if (precision::widen_on_cpu(x))
      return precision::narrow(
          linear(precision::widen(x), precision::widen(weight), precision::widen(bias), zero_grad));
    return grouped_linear(x, weight, bias, zero_grad);
  }
  check_dim("linear", weight, 2, "weight");
  check_same_device("linear", x, weight);
  if (x.dim() < 1 || x.size(-1) != weight.size(1))
    KRAKEN_THROW("linear: input ", shape_str(x.shape()), " does not end in the weight's input size: weight ",
                 shape_str(weight.shape()), " is (out, in)");
  const int64_t in = weight.size(1), outf = weight.size(0);
  const int64_t rows = shape_numel(Shape(x.shape().begin(), x.shape().end() - 1));  // also right for in = 0
  if (bias.defined()) {
    precision::check_float("linear", bias, "bias");
    check_same_device("linear", x, bias);
    if (bias.shape() != Shape{outf})
      KRAKEN_THROW("linear: bias ", shape_str(bias.shape()), " for weight ", shape_str(weight.shape()),
                   ", expected (", outf, ",)");
  }
  const DType dtype = precision::common_float("linear", {&x, &weight, &bias});
  if (precision::widen_on_cpu(x))
    return precision::narrow(
        linear(precision::widen(x), precision::widen(weight), precision::widen(bias), zero_grad));
  Shape shape = x.shape();
  shape.back() = outf;
  Tensor out = Tensor::empty(shape, dtype, x.device());
  // y (rows, out) = x (rows, in) · Wᵀ (in, out), then + b on every row
  if (dtype == DType::BF16) gemm_bf16(out, x, weight, 1, rows, outf, in, false, true, 0, 0, bias);  // b in the epilogue
  else gemm(out, x, weight, 1, rows, outf, in, false, true, 0.0f, 0, 0);
  if (bias.defined() && dtype == DType::F32) {
    KRAKEN_ON_DEVICE(out.device(),
                     kernels::add_broadcast_cpu(out.data<float>(), out.data<float>(), bias.data<float>(), rows, outf),
                     kernels::add_broadcast_cuda(out.data<float>(), out.data<float>(), bias.data<float>(), rows, outf,
                                                 stream_of(out)));
  }
  if (needs_grad({x, weight, bias})) {
    const bool x_needs = x.requires_grad(), w_needs = weight.requires_grad();
    const bool b_needs = bias.defined() && bias.requires_grad();
    Tensor x_saved = w_needs ? x.detach() : Tensor(), w_saved = x_needs ? weight.detach() : Tensor();
    const Shape x_shape = x.shape(), w_shape = weight.shape();
    // f32 parameters (leaves) take their gradients directly: dW with beta = 1, db summed in place.
    // (A bf16 weight is the cast of an f32 master: its gradient goes back through the cast.)
    const bool f32 = dtype == DType::F32;
    Tensor w_leaf = f32 && weight.is_leaf() ? weight : Tensor();
    Tensor b_leaf = f32 && bias.defined() && bias.is_leaf() ? bias : Tensor();
    record("linear", {x, weight, bias}, {out},
           [x_saved, w_saved, w_leaf, b_leaf, x_shape, w_shape, rows, in, outf, b_needs, dtype,
            zero = zero_grad](const std::vector<Tensor>& g) {
             const Tensor& dy = g[0];  // (rows, out)
             Tensor dx, dw, db;
             if (w_saved.defined()) {  // dx (rows, in) = dy · W
               dx = Tensor::empty(x_shape, dtype, dy.device());
               gemm(dx, dy, w_saved, 1, rows, in, outf, false, false, 0.0f, 0, 0);
             }
             bool bias_done = false;
             if (x_saved.defined()) {  // dW (out, in) += dyᵀ · x
               Tensor direct = leaf_grad_accumulator(w_leaf);
               Tensor target = direct.defined() ? direct : Tensor::empty(w_shape, dtype, dy.device());
               // bf16 on CUDA: db = Σ_rows dy from the same read of dy, in the product's epilogue (BGRADB)
               // where the fusion level asks for it and cuBLASLt has an algorithm (a bf16 bias is never
               // a leaf: its gradient is new, not accumulated). Else the column sums below.
               if (dtype == DType::BF16 && b_needs && rows > 0 && epilogue_fusion() == EpilogueFusion::kGeluAndBiasGrads) {
                 db = Tensor::empty({outf}, dtype, dy.device());
                 KRAKEN_CUDA_ONLY(dy.device(), bias_done = kernels::matmul_bias_grad_bf16_cuda(
                                                   target.data<uint16_t>(), db.data<uint16_t>(), dy.data<uint16_t>(),
                                                   x_saved.data<uint16_t>(), outf, in, rows, true, false,
                                                   stream_of(dy)));
                 if (!bias_done) db = Tensor();
               }
               if (!bias_done)
                 gemm(target, dy, x_saved, 1, outf, in, rows, true, false, direct.defined() ? 1.0f : 0.0f, 0, 0);
               if (bias_done) zero_bias_columns(db, 1, outf, zero);
               if (!direct.defined()) dw = target;
             }
             if (b_needs && !bias_done && zero.count > 0) {  // db += Σ_rows dy, but for the zero columns
               Tensor sums = reshape(group_row_sums(dy, 1, rows, outf, zero), {outf});
               Tensor direct = leaf_grad_accumulator(b_leaf);  // (f32: its zero columns get + 0)
               if (direct.defined())
                 KRAKEN_ON_DEVICE(dy.device(), kernels::axpy_cpu(direct.data<float>(), sums.data<float>(), 1.0f, outf),
                                  kernels::axpy_cuda(direct.data<float>(), sums.data<float>(), 1.0f, outf,
                                                     stream_of(dy)));
               else
                 db = sums;
             } else if (b_needs && !bias_done) {  // db += Σ_rows dy
               Tensor direct = leaf_grad_accumulator(b_leaf);
               Tensor target = direct.defined() ? direct : Tensor::zeros({outf}, dtype, dy.device());
               if (dtype == DType::BF16)
                 KRAKEN_CUDA_ONLY(dy.device(), kernels::sum_rows_bf16_cuda(target.data<uint16_t>(), dy.data<uint16_t>(),
                                                                           rows, outf, stream_of(dy)));
               else
                 KRAKEN_ON_DEVICE(dy.device(), kernels::sum_rows_cpu(target.data<float>(), dy.data<float>(), rows, outf),
                                  kernels::sum_rows_cuda(target.data<float>(), dy.data<float>(), rows, outf, stream_of(dy)));
               if (!direct.defined()) db = target;
             }
             return std::vector<Tensor>{dx, dw, db};
           });
  }
  return out;
}

}  // namespace kraken::runtime::ops
