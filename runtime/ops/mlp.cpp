// GPT-2's MLP block as one op: y = linear(gelu(linear(x, W_fc, b_fc)), W_proj, b_proj).
//
// Why one op for three. On the GPU in bf16 the GELU belongs inside the products: cuBLASLt's epilogues
// apply it forward as the c_fc product stores its result (GELU_AUX_BIAS, which also stores GELU's input
// pre = x·W_fcᵀ + b_fc for backward) and apply its derivative backward as the product that makes
// d(gelu output) = dy·W_proj stores its result (DGELU, optionally with the bias gradient of b_fc in the
// same pass: DGELU_BGRAD). That backward product is c_proj's input gradient, so the fusion spans two
// linear layers; one node for the whole block keeps it inside one op instead of teaching the autograd
// core, or ops::linear, about a neighbour's activation. On an H200 profile of a GPT-2 124M step the
// separate GELU kernels took 1.08 ms of 20.5 ms and the bias column sums 0.65 ms.
//
// Paths:
// - The CPU, f32 anywhere, and CUDA bf16 with the fusion off (KRAKEN_CUDA_EPILOGUES=0): exactly the
//   three ops above, the same nodes and bits as writing them out (tests/runtime/mlp_test.cpp).
// - CUDA bf16 (default): one node. Forward: u = gelu(pre) and pre from one cuBLASLt product, then
//   y = u·W_projᵀ + b_proj. Backward: dW_proj = dyᵀ·u (with db_proj = Σ_rows dy in the same product,
//   BGRADB, at level 2), dpre = (dy·W_proj) ∘ gelu'(pre) (with db_fc = Σ_rows dpre, DGELU_BGRAD, at
//   levels 2 and 3), dW_fc = dpreᵀ·x, dx = dpre·W_fc. It saves what the three ops saved: x, W_fc, pre, u, W_proj.
//   Rows of H not a multiple of 8 (cuBLASLt's aux rule) take the three ops; a product cuBLASLt has no
//   fused algorithm for takes the plain product and our own GELU or column-sum kernel instead.
// Grouped (a Kraken layer's stacked sub-layers: ops.h), the same paths over the groups, the CPU's as
// grouped linears; at levels 2 and 3 the bias gradients' epilogues run one product per group. The bf16
// results differ from the three ops' by rounding only: fused, dy·W_proj is not rounded to bf16 before
// gelu' multiplies it (one rounding fewer), and the bias sums run in cuBLASLt's order.
#include <cstdlib>
#include <string>

#include "kernels/elementwise.h"
#include "kernels/error.h"
#include "kernels/matmul.h"
#include "runtime/autograd.h"
#include "runtime/dispatch.h"
#include "runtime/ops.h"
#include "runtime/ops/grouped.h"
#include "runtime/ops/precision.h"

namespace kraken::runtime::ops {
namespace {

EpilogueFusion epilogue_fusion_from_env() {
  const char* v = std::getenv("KRAKEN_CUDA_EPILOGUES");
  if (v == nullptr || *v == '\0') return EpilogueFusion::kGelu;  // (the fastest on an H200: ops.h)
  const std::string s(v);
  if (s == "0") return EpilogueFusion::kOff;
  if (s == "1") return EpilogueFusion::kGelu;
  if (s == "2") return EpilogueFusion::kGeluAndBiasGrads;
  if (s == "3") return EpilogueFusion::kGeluAndFcBiasGrad;
  KRAKEN_THROW("KRAKEN_CUDA_EPILOGUES=", s,
               ": expected 0 (GELU as its own kernels), 1 (GELU in the products' epilogues; the default), 2 "
               "(also the bias gradients) or 3 (also c_fc's bias gradient, in the DGELU product)");
}

thread_local int epilogue_fusion_override = -1;  // a EpilogueFusionScope's setting, or -1

#if KRAKEN_WITH_CUDA
// One bf16 product per group g < G, out[g] (M, N) = op(A[g])·op(B[g]) (+ bias[g] on every row), at the
// given element strides (out's M·N, bias's N): one strided-batch cuBLASLt call without a bias or an
// epilogue, else one call per group. G = 1 is the plain product.
void grouped_product(void* out, const uint16_t* a, const uint16_t* b, const uint16_t* bias, int64_t G, int64_t M,
                     int64_t N, int64_t K, bool ta, bool tb, int64_t stride_a, int64_t stride_b,
                     kernels::MatmulEpilogue epilogue, CUstream_st* s) {
  if (G > 1 && bias == nullptr && epilogue == kernels::MatmulEpilogue::kNone) {
    kernels::matmul_bf16_batched_cuda(out, true, a, b, G, M, N, K, ta, tb, M * N, stride_a, stride_b, s);
    return;
  }
  for (int64_t g = 0; g < G; ++g)
    kernels::matmul_bf16_cuda(static_cast<uint16_t*>(out) + g * M * N, true, a + g * stride_a, b + g * stride_b,
                              bias ? bias + g * N : nullptr, M, N, K, ta, tb, epilogue, s);
}

// The fused path: CUDA, bf16, one node. Shapes: x (rows, C) as (..., C), W_fc (H, C), W_proj (Co, H); or
// grouped, x (G, ..., C) as G blocks of R rows, W_fc (G, H, C), W_proj (G, Co, H), biases (G, ·) (rows =
// G·R in all), each product over the groups as kernels/matmul.h's batched forms run it: one strided
// batch, except a product with a bias and the DGELU product, one call per group.
Tensor mlp_fused(const Tensor& x, const Tensor& w_fc, const Tensor& b_fc, const Tensor& w_proj, const Tensor& b_proj,
                 EpilogueFusion fusion) {
  const bool grouped = w_fc.dim() == 3;
  const int64_t G = grouped ? w_fc.size(0) : 1;
  const int64_t C = w_fc.size(-1), H = w_fc.size(-2), Co = w_proj.size(-2);
  const int64_t rows = shape_numel(Shape(x.shape().begin(), x.shape().end() - 1)), R = rows / G;
  const Device dev = x.device();
  CUstream_st* s = stream_of(x);
  const uint16_t* b_fc_ptr = b_fc.defined() ? b_fc.data<uint16_t>() : nullptr;
  const bool grad = needs_grad({x, w_fc, b_fc, w_proj, b_proj});
  const int64_t fc_stride = H * C, proj_stride = Co * H;  // between the groups' weights

  // u (rows, H) = gelu(pre), pre = x·W_fcᵀ + b_fc: kept for backward only when one is coming.
  Tensor u = Tensor::empty({rows, H}, DType::BF16, dev), pre;
  if (grad) {
    pre = Tensor::empty({rows, H}, DType::BF16, dev);
    if (!kernels::matmul_gelu_aux_bf16_batched_cuda(u.data<uint16_t>(), pre.data<uint16_t>(), x.data<uint16_t>(),
                                                    w_fc.data<uint16_t>(), b_fc_ptr, G, R, H, C, false, true, R * H,
                                                    R * C, fc_stride, H, s)) {
      grouped_product(pre.data_ptr(), x.data<uint16_t>(), w_fc.data<uint16_t>(), b_fc_ptr, G, R, H, C, false, true,
                      R * C, fc_stride, b_fc_ptr ? kernels::MatmulEpilogue::kBias : kernels::MatmulEpilogue::kNone, s);
      kernels::gelu_forward_bf16_cuda(u.data<uint16_t>(), pre.data<uint16_t>(), rows * H, s);
    }
  } else {  // evaluation: GELU in the epilogue, no pre-activation to store
    grouped_product(u.data_ptr(), x.data<uint16_t>(), w_fc.data<uint16_t>(), b_fc_ptr, G, R, H, C, false, true, R * C,
                    fc_stride, b_fc_ptr ? kernels::MatmulEpilogue::kBiasGelu : kernels::MatmulEpilogue::kGelu, s);
  }
  // y (..., Co) = u·W_projᵀ + b_proj
  Shape y_shape = x.shape();
  y_shape.back() = Co;
  Tensor y = Tensor::empty(y_shape, DType::BF16, dev);
  grouped_product(y.data_ptr(), u.data<uint16_t>(), w_proj.data<uint16_t>(),
                  b_proj.defined() ? b_proj.data<uint16_t>() : nullptr, G, R, Co, H, false, true, R * H, proj_stride,
                  b_proj.defined() ? kernels::MatmulEpilogue::kBias : kernels::MatmulEpilogue::kNone, s);
  if (!grad) return y;

  const bool x_needs = x.requires_grad(), w_fc_needs = w_fc.requires_grad();
  const bool b_fc_needs = b_fc.defined() && b_fc.requires_grad();
  const bool w_proj_needs = w_proj.requires_grad(), b_proj_needs = b_proj.defined() && b_proj.requires_grad();
  const bool upstream = x_needs || w_fc_needs || b_fc_needs;  // does anything need dpre?
  Tensor x_saved = w_fc_needs ? x.detach() : Tensor(), w_fc_saved = x_needs ? w_fc.detach() : Tensor();
  Tensor pre_saved = upstream ? pre : Tensor(), u_saved = w_proj_needs ? u : Tensor();
  Tensor w_proj_saved = upstream ? w_proj.detach() : Tensor();
  const Shape x_shape = x.shape(), w_fc_shape = w_fc.shape(), w_proj_shape = w_proj.shape();
  const Shape b_fc_shape = b_fc.defined() ? b_fc.shape() : Shape{}, b_proj_shape = b_proj.defined() ? b_proj.shape() : Shape{};
  // The bias gradients in the products' epilogues (level 2; level 3 db_fc only), grouped one product per
  // group (as the DGELU products run anyway); else, or where cuBLASLt has no algorithm, column sums.
  const bool bias_grads_fused = fusion == EpilogueFusion::kGeluAndBiasGrads;
  const bool fc_bias_grad_fused = bias_grads_fused || fusion == EpilogueFusion::kGeluAndFcBiasGrad;
  record("mlp", {x, w_fc, b_fc, w_proj, b_proj}, {y},
         [x_saved, w_fc_saved, pre_saved, u_saved, w_proj_saved, x_shape, w_fc_shape, w_proj_shape, b_fc_shape,
          b_proj_shape, G, R, rows, C, H, Co, fc_stride, proj_stride, w_fc_needs, b_fc_needs, w_proj_needs,
          b_proj_needs, bias_grads_fused, fc_bias_grad_fused](const std::vector<Tensor>& g) {
           // in the forward pass this was: y = u·W_projᵀ + b_proj, u = gelu(pre), pre = x·W_fcᵀ + b_fc
           // (per group: every product below is one strided batch over the G groups)
           const Tensor& dy = g[0];  // (rows, Co)
           const Device dev = dy.device();
           CUstream_st* s = stream_of(dy);
           const auto none = kernels::MatmulEpilogue::kNone;
           Tensor dx, dw_fc, db_fc, dw_proj, db_proj;
           // dW_proj (Co, H) = dyᵀ·u, and db_proj = Σ_rows dy in the same product where fused
           if (w_proj_needs) {
             dw_proj = Tensor::empty(w_proj_shape, DType::BF16, dev);
             bool bias_done = false;
             if (b_proj_needs && bias_grads_fused) {
               db_proj = Tensor::empty(b_proj_shape, DType::BF16, dev);
               bias_done = kernels::matmul_bias_grad_bf16_batched_cuda(
                   dw_proj.data<uint16_t>(), db_proj.data<uint16_t>(), dy.data<uint16_t>(), u_saved.data<uint16_t>(),
                   G, Co, H, R, true, false, Co * H, R * Co, R * H, Co, s);
             }
             if (!bias_done)
               grouped_product(dw_proj.data_ptr(), dy.data<uint16_t>(), u_saved.data<uint16_t>(), nullptr, G, Co, H, R,
                               true, false, R * Co, R * H, none, s);
             if (b_proj_needs && !bias_done) db_proj = group_row_sums(dy, G, R, Co).reshape(b_proj_shape);
           } else if (b_proj_needs) {
             db_proj = group_row_sums(dy, G, R, Co).reshape(b_proj_shape);
           }
           if (!pre_saved.defined()) return std::vector<Tensor>{dx, dw_fc, db_fc, dw_proj, db_proj};

           // dpre (rows, H) = (dy·W_proj) ∘ gelu'(pre), and db_fc = Σ_rows dpre in the same product where fused
           Tensor dpre = Tensor::empty({rows, H}, DType::BF16, dev);
           bool dgelu_done = false, bias_done = false;
           if (b_fc_needs && fc_bias_grad_fused) {
             db_fc = Tensor::empty(b_fc_shape, DType::BF16, dev);
             dgelu_done = bias_done = kernels::matmul_dgelu_bf16_batched_cuda(
                 dpre.data<uint16_t>(), db_fc.data<uint16_t>(), dy.data<uint16_t>(), w_proj_saved.data<uint16_t>(),
                 pre_saved.data<uint16_t>(), G, R, H, Co, false, false, R * H, R * Co, proj_stride, H, s);
           }
           if (!dgelu_done)
             dgelu_done = kernels::matmul_dgelu_bf16_batched_cuda(
                 dpre.data<uint16_t>(), nullptr, dy.data<uint16_t>(), w_proj_saved.data<uint16_t>(),
                 pre_saved.data<uint16_t>(), G, R, H, Co, false, false, R * H, R * Co, proj_stride, 0, s);
           if (!dgelu_done) {  // the unfused arithmetic: du = dy·W_proj rounded, then dpre = gelu'(pre)·du
             Tensor du = Tensor::empty({rows, H}, DType::BF16, dev);
             grouped_product(du.data_ptr(), dy.data<uint16_t>(), w_proj_saved.data<uint16_t>(), nullptr, G, R, H, Co,
                             false, false, R * Co, proj_stride, none, s);
             dpre.zero_();  // the GELU backward kernel accumulates
             kernels::gelu_backward_bf16_cuda(dpre.data<uint16_t>(), pre_saved.data<uint16_t>(), du.data<uint16_t>(),
                                              rows * H, s);
           }
           if (b_fc_needs && !bias_done) db_fc = group_row_sums(dpre, G, R, H).reshape(b_fc_shape);
           if (w_fc_needs) {  // dW_fc (H, C) = dpreᵀ·x
             dw_fc = Tensor::empty(w_fc_shape, DType::BF16, dev);
             grouped_product(dw_fc.data_ptr(), dpre.data<uint16_t>(), x_saved.data<uint16_t>(), nullptr, G, H, C, R,
                             true, false, R * H, R * C, none, s);
           }
           if (w_fc_saved.defined()) {  // dx (rows, C) = dpre·W_fc
             dx = Tensor::empty(x_shape, DType::BF16, dev);
             grouped_product(dx.data_ptr(), dpre.data<uint16_t>(), w_fc_saved.data<uint16_t>(), nullptr, G, R, C, H,
                             false, false, R * H, fc_stride, none, s);
           }
           return std::vector<Tensor>{dx, dw_fc, db_fc, dw_proj, db_proj};
         });
  return y;
}
#endif

}  // namespace

EpilogueFusion epilogue_fusion() {
  if (epilogue_fusion_override >= 0) return static_cast<EpilogueFusion>(epilogue_fusion_override);
  static const EpilogueFusion from_env = epilogue_fusion_from_env();
  return from_env;
}

EpilogueFusionScope::EpilogueFusionScope(EpilogueFusion fusion) : previous_(epilogue_fusion_override) {
  epilogue_fusion_override = static_cast<int>(fusion);
}
EpilogueFusionScope::~EpilogueFusionScope() { epilogue_fusion_override = previous_; }

Tensor mlp(const Tensor& x, const Tensor& w_fc, const Tensor& b_fc, const Tensor& w_proj, const Tensor& b_proj) {
  precision::check_float("mlp", x, "input");
  precision::check_float("mlp", w_fc, "c_fc weight");
  precision::check_float("mlp", w_proj, "c_proj weight");
  // Grouped (ops.h): one more leading dimension G on the weights, biases and input.
  const bool grouped = w_fc.dim() == 3;
  const int64_t G = grouped ? w_fc.size(0) : 1;
  check_dim("mlp", w_fc, grouped ? 3 : 2, "c_fc weight");
  check_dim("mlp", w_proj, grouped ? 3 : 2, "c_proj weight");
  for (const Tensor* t : {&w_fc, &b_fc, &w_proj, &b_proj})
    if (t->defined()) check_same_device("mlp", x, *t);
  if (x.dim() < (grouped ? 2 : 1) || x.size(-1) != w_fc.size(-1) || (grouped && x.size(0) != G))
    KRAKEN_THROW("mlp: input ", shape_str(x.shape()), " does not fit the c_fc weight ", shape_str(w_fc.shape()),
                 grouped ? ", which is (groups, hidden, in): expected (groups, ..., in)" : ", which is (hidden, in)");
  const int64_t hidden = w_fc.size(-2), outf = w_proj.size(-2);
  if (w_proj.size(-1) != hidden || (grouped && w_proj.size(0) != G))
    KRAKEN_THROW("mlp: c_proj weight ", shape_str(w_proj.shape()), " does not take the c_fc weight's ", hidden,
                 " outputs", grouped ? " in each of its groups" : "");
  const Shape b_fc_expected = grouped ? Shape{G, hidden} : Shape{hidden};
  const Shape b_proj_expected = grouped ? Shape{G, outf} : Shape{outf};
  if (b_fc.defined() && b_fc.shape() != b_fc_expected)
    KRAKEN_THROW("mlp: c_fc bias ", shape_str(b_fc.shape()), ", expected ", shape_str(b_fc_expected));
  if (b_proj.defined() && b_proj.shape() != b_proj_expected)
    KRAKEN_THROW("mlp: c_proj bias ", shape_str(b_proj.shape()), ", expected ", shape_str(b_proj_expected));
  const DType dtype = precision::common_float("mlp", {&x, &w_fc, &b_fc, &w_proj, &b_proj});
  if (grouped && G == 1) {  // one group is the plain block on views
    Shape inner(x.shape().begin() + 1, x.shape().end()), out_shape = x.shape();
    out_shape.back() = outf;
    auto drop_group = [](const Tensor& t) {
      return t.defined() ? reshape(t, Shape(t.shape().begin() + 1, t.shape().end())) : t;
    };
    return reshape(mlp(reshape(x, inner), drop_group(w_fc), drop_group(b_fc), drop_group(w_proj), drop_group(b_proj)),
                   out_shape);
  }
#if KRAKEN_WITH_CUDA
  const int64_t C = w_fc.size(-1), H = hidden, Co = outf;
  const int64_t rows = shape_numel(Shape(x.shape().begin(), x.shape().end() - 1));
  // cuBLASLt's aux matrix (pre) has rows of H elements, which must be a multiple of 8; empty shapes and
  // the rest take the three ops.
  if (dtype == DType::BF16 && !x.device().is_cpu() && rows > 0 && C > 0 && Co > 0 && H > 0 && H % 8 == 0) {
    const EpilogueFusion fusion = epilogue_fusion();
    if (fusion != EpilogueFusion::kOff) return mlp_fused(x, w_fc, b_fc, w_proj, b_proj, fusion);
  }
#else
  (void)dtype;
#endif
  return linear(gelu(linear(x, w_fc, b_fc)), w_proj, b_proj);
}

}  // namespace kraken::runtime::ops
