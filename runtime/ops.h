// The differentiable op set: everything a Kraken transformer computes.
//
// Each op validates its operands once (a kraken::Error names the op and both shapes), runs the kernel
// of the operands' device, and, when an input needs a gradient, records a node whose backward closure
// sits next to the forward in runtime/ops/<family>.cpp. Float ops take f32 on the CPU. Shapes follow
// the (B, T, C) convention: B batch, T time, C channels, H heads, V vocabulary.
//
// Adding an op touches the same places every time (see runtime/README.md): kernels/<family>.h,
// kernels/cpu/<family>.cpp, kernels/cuda/<family>.cu, runtime/ops/<family>.cpp, this header, and a
// finite-difference test in tests/runtime/.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/rng.h"
#include "runtime/tensor.h"

namespace kraken::runtime::ops {

// ---- views and shapes (ops/shape.cpp) --------------------------------------------------------------
Tensor reshape(const Tensor& x, const Shape& shape);           // a view; one -1 is inferred
Tensor slice(const Tensor& x, int64_t begin, int64_t end);     // rows [begin, end) of dim 0, a view
// Splits dim `dim` into pieces of the given sizes (they must add up to its extent).
std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t dim);
Tensor concat(const std::vector<Tensor>& xs, int64_t dim);     // the inverse of split
Tensor cast(const Tensor& x, DType dtype);                     // f32 <-> bf16, gradient cast back
// cast(xs[k], dtype) for every k, the same values and gradients, as one autograd node: on CUDA the f32 →
// bf16 and bf16 → f32 casts of tensors on one device take one launch per kernels::kCastsPerLaunch of
// them, forward and backward (the mixed-precision model casts all its weights so). Inputs already of
// `dtype` come back as they are, history and all, as cast() returns them. Other dtype pairs, or inputs on
// several devices, are cast one by one. The node's backward runs once every output's gradient is
// complete, so the inputs' gradients all arrive then; an output that got none gives its input zeros.
std::vector<Tensor> cast_many(const std::vector<Tensor>& xs, DType dtype);
// The same, each cast written into into[k] (a buffer of that shape and dtype; undefined or absent: a new
// tensor) — persistent buffers that an optimizer rewrites after each step (models/kraken.h) — and
// returned as a fresh handle on it. With `filled`, the buffers already hold the casts (the optimizer's
// bf16 copies of the current parameters): nothing is written, only the node is recorded.
std::vector<Tensor> cast_many(const std::vector<Tensor>& xs, DType dtype, const std::vector<Tensor>& into,
                              bool filled);
// Each list of tensors (one shape and dtype within a list) as one tensor (n, ...) in `dtype`:
// stacks[k][i] = cast(lists[k][i], dtype) — a Kraken layer's sub-layer weights, each kind stacked for the
// grouped products (under mixed precision cast to bf16 on the way, in place of cast_many). One node; the
// f32 ↔ bf16 casts of all lists take one cast_many call each way (on CUDA, one launch per
// kernels::kCastsPerLaunch tensors), others are copied. An empty list, or one whose first tensor is
// undefined (an absent bias), gives an undefined stack; one tensor already of `dtype`, a view of it.
std::vector<Tensor> stack_many(const std::vector<std::vector<Tensor>>& lists, DType dtype);
// The same into given stacks, as cast_many above: into[k] the (n, ...) buffer of list k (undefined or
// absent: a new tensor); with `filled`, they already hold the stacks and nothing is written.
std::vector<Tensor> stack_many(const std::vector<std::vector<Tensor>>& lists, DType dtype,
                               const std::vector<Tensor>& into, bool filled);

// ---- elementwise (ops/elementwise.cpp) --------------------------------------------------------------
// a + b, where b has a's shape or a trailing part of it ((B, T, C) + (T, C), (N, C) + (C,)); the
// gradient of a broadcast b is summed over the leading dimensions.
Tensor add(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);                  // same shapes
Tensor scale(const Tensor& x, float alpha);                    // alpha·x
Tensor gelu(const Tensor& x);                                  // GPT-2's tanh approximation
Tensor sum_list(const std::vector<Tensor>& xs);                // Σ_i xs[i], all of one shape
// Σ_g x[g] over the first dimension: (G, ...) → (...), the sum_list of x's G blocks (its kernels and
// bits) without copying them out; the gradient is dout in every block.
Tensor sum_stack(const Tensor& x);
// The Kraken layer's residual fork: {x + y, y + s}, s a trailing part of y's shape repeated over its
// leading dims (S over the stacked sub-layers: a_i = x_i + attn_i, m_i = attn_i + S). In bf16 on a GPU
// one kernel each way — one pass over x and y forward; dy = da + dm and ds = Σ dm in one pass backward,
// where the two adds took three forward and the engine's sum and a row reduction backward
// (kernels/elementwise.h) — else the two adds; the same bits either way.
std::vector<Tensor> residual_fork(const Tensor& x, const Tensor& y, const Tensor& s);
// residual_fork(x, y, sum_stack(x)) for x, y (G, ...): S over the stacked sub-layers summed in the fork's
// own pass where they share a GPU. In bf16 on a GPU for 2 ≤ G ≤ 8 one kernel each way — backward
// dy = da + dm and dx = da + Σ_g dm[g] together, where sum_stack's broadcast add made a pass of its own —
// and S never stored; else the three ops. The same bits either way (kernels/elementwise.h).
std::vector<Tensor> residual_fork_summed(const Tensor& x, const Tensor& y);

// ---- reductions (ops/reduce.cpp) -----------------------------------------------------------------------
Tensor sum(const Tensor& x);                                   // scalar (shape {})
Tensor mean(const Tensor& x);

// ---- matrix products (ops/matmul.cpp) -----------------------------------------------------------------
// op(a)·op(b). 2-D × 2-D; batched 3-D × 3-D with equal batch; N-D × 2-D treats a's leading dims as rows.
Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false);
// x (..., in) · weightᵀ + bias, weight (out, in) as PyTorch's nn.Linear; bias (out,) may be undefined.
// On CUDA in bf16 the bias is added in the product's epilogue, and its gradient (at epilogue_fusion()
// level 2, below) summed in the weight-gradient product's.
// Grouped: weight (G, out, in), bias (G, out), x (G, ..., in) → (G, ..., out), group g's rows times its
// own weight — G independent linears (a Kraken layer's sub-layers, stacked) whose products each run as
// one strided batch. G = 1 is the plain linear on views (the same node and bits).
// zero_grad: bias columns [first, first + count) (of each group's) whose gradient is zero by the model's
// structure, so it is not summed and stays zero — the keys' third of an attention's qkv bias: every score
// of a query shifts by q·b_k, which softmax ignores (Σ_j dS_ij = 0, so Σ_rows dK = scale · Σ_i q_i Σ_j dS_ij
// = 0). On CUDA in bf16 their dy is not read: a third of c_attn's bias-gradient reads. Empty: none.
struct BiasColumns {
  int64_t first = 0;
  int64_t count = 0;
};
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor(), BiasColumns zero_grad = {});

// ---- the MLP block (ops/mlp.cpp) ------------------------------------------------------------------------
// GPT-2's MLP: linear(gelu(linear(x, w_fc, b_fc)), w_proj, b_proj). x (..., C), w_fc (H, C), w_proj
// (Co, H), biases (H,) and (Co,), either undefined. Grouped as linear is: x (G, ..., C), w_fc (G, H, C),
// w_proj (G, Co, H), biases (G, H) and (G, Co); each product one strided batch over the groups. On the CPU, in f32, and with the fusion off these
// are exactly the three ops (the same nodes and bits). On CUDA in bf16 it is one node whose cuBLASLt
// products apply GELU (forward) and its derivative (backward) in their epilogues, and at
// EpilogueFusion::kGeluAndBiasGrads also sum both bias gradients there; the results differ from the three
// ops' by rounding only. Rows of H not a multiple of 8 take the three ops (ops/mlp.cpp says why).
Tensor mlp(const Tensor& x, const Tensor& w_fc, const Tensor& b_fc, const Tensor& w_proj, const Tensor& b_proj);
// What cuBLASLt's epilogues do on CUDA in bf16 (ops::mlp, and ops::linear's bias gradient). The process
// default comes from KRAKEN_CUDA_EPILOGUES (0, 1, 2 or 3; unset: 1), read once; an EpilogueFusionScope sets
// it for its thread while it lives (tests, benchmarks). Unset is 1 because it measured fastest: GPT-2's
// MLP block forward + backward on an H200 took 0.487 ms at 1, 0.539 at 0 and 0.597 at 2 (cuBLASLt runs
// some BGRADB products on a slower generic kernel; bench/RESULTS.md).
enum class EpilogueFusion {
  kOff = 0,                // the three ops: cuBLASLt with the bias epilogue, GELU and column sums as kernels
  kGelu = 1,               // GELU and gelu' in the products' epilogues; bias gradients as column sums
  kGeluAndBiasGrads = 2,   // also the bias gradients: db_fc (DGELU_BGRAD), and every linear's (db_proj
                           // included) in its weight-gradient product (BGRADB); grouped, a product per group
  kGeluAndFcBiasGrad = 3,  // as 2 for db_fc (DGELU_BGRAD: GPT-2's widest bias, 4C) only; the others as
                           // column sums — level 2 without the BGRADB products that measured slow
};
EpilogueFusion epilogue_fusion();
class EpilogueFusionScope {
 public:
  explicit EpilogueFusionScope(EpilogueFusion fusion);
  ~EpilogueFusionScope();
  EpilogueFusionScope(const EpilogueFusionScope&) = delete;
  EpilogueFusionScope& operator=(const EpilogueFusionScope&) = delete;

 private:
  int previous_;
};

// ---- normalisation and embedding (ops/layernorm.cpp, ops/embedding.cpp) ----------------------------------
// Normalises the last dimension: (x − mean)/√(var + eps)·gamma + beta; gamma, beta (C,).
Tensor layernorm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps = 1e-5f);
// Grouped: x (G, ..., C), block g normalised with gammas[g] and betas[g] (each (C,); betas empty, or an
// undefined one, for no bias) — a Kraken layer's stacked sub-layers, each with its own parameters (not
// stacked: their gradients go to each directly). add_layernorm likewise.
Tensor layernorm(const Tensor& x, const std::vector<Tensor>& gammas, const std::vector<Tensor>& betas,
                 float eps = 1e-5f);
// The residual add and the LayerNorm after it: {s, layernorm(s)} with s = a + b (same shapes, no
// broadcast). One kernel on CUDA (kernels/layernorm.h); the two ops on the CPU, with the same result.
// The gradient of s from its other uses and the normalisation's gradient meet in one kernel.
std::vector<Tensor> add_layernorm(const Tensor& a, const Tensor& b, const Tensor& gamma, const Tensor& beta,
                                  float eps = 1e-5f);
std::vector<Tensor> add_layernorm(const Tensor& a, const Tensor& b, const std::vector<Tensor>& gammas,
                                  const std::vector<Tensor>& betas, float eps = 1e-5f);
// The residual add with a bias on its second term, and the LayerNorm after it: {s, layernorm(s)} with
// s = a + (b + bias), bias (C,) over every row (in bf16, b + bias rounded before the add) — a product's
// bias taken out of its epilogue (GPT-2's attention and MLP projections). In bf16 on a GPU one kernel
// forward, and backward the bias's gradient Σ_rows ds summed in the LayerNorm backward's pass over ds
// (kernels/layernorm.h), where the product's backward read ds again for it; else add, add, layernorm
// (the same forward bits; the bias's gradient summed in another order). An undefined bias: add_layernorm.
std::vector<Tensor> add_bias_layernorm(const Tensor& a, const Tensor& b, const Tensor& bias, const Tensor& gamma,
                                       const Tensor& beta, float eps = 1e-5f);
// Grouped, as the grouped add_layernorm: a, b (G, ..., C), bias (G, C) (or (C,) for G = 1), block g with
// bias[g], gammas[g] and betas[g] — the Kraken layer's sub-layers' projection biases; backward every
// group's Σ_rows ds in the same one pass.
std::vector<Tensor> add_bias_layernorm(const Tensor& a, const Tensor& b, const Tensor& bias,
                                       const std::vector<Tensor>& gammas, const std::vector<Tensor>& betas,
                                       float eps = 1e-5f);
// The Kraken layer's fork and LN2 where its sub-layers share a GPU: {a, layernorm(m)} for {a, m} =
// residual_fork_summed(x, y), group g normalised with gammas[g], betas[g]. In bf16 on a GPU for 2 to 8
// groups (C a multiple of 8 up to 2048) one kernel forward — LN2 normalises m as it is made, where it read
// it back — and one node backward, for 2 or 4 groups (C ≤ 1024) one kernel too (LN2's gradient of m summed
// into the fork's as it is made; KRAKEN_CUDA_FORK_NORM_BACKWARD=separate: the two ops' backward kernels);
// else the two ops. The same bits either way.
std::vector<Tensor> residual_fork_summed_layernorm(const Tensor& x, const Tensor& y, const std::vector<Tensor>& gammas,
                                                   const std::vector<Tensor>& betas, float eps = 1e-5f);
// weight (V, C), ids i32 of any shape S: returns S + (C,). Ids outside [0, V) are an error, found on the
// host: ids may be on the host for a table on a GPU (checked there, then copied over without waiting for
// the GPU); ids on the GPU are copied back to be checked, a wait for everything queued before.
Tensor embedding(const Tensor& weight, const Tensor& ids);
// GPT-2's first activation, cast(add(embedding(wte, ids), slice(wpe, 0, T)), dtype) for ids (B, T): wte
// (V, C) and wpe (≥ T, C) f32; ids as embedding's (from the host, nothing waits). On a GPU in bf16 one
// kernel forward, and backward wte's scatter and wpe's column sums read the bf16 gradient itself
// (kernels/embedding.h): the bits of the three ops, which run instead everywhere else (the CPU, f32, C not
// a multiple of 8).
Tensor token_position_embedding(const Tensor& wte, const Tensor& wpe, const Tensor& ids, DType dtype);

// ---- attention (ops/attention.cpp) ------------------------------------------------------------------------
// Causal multi-head self-attention, fused: qkv (B, T, 3C) holds q, k and v side by side (GPT-2's
// c_attn output), heads of size C/H. Returns (B, T, C) = softmax(q·kᵀ/√(C/H) + causal mask)·v per
// head. Backward recomputes the probabilities from the saved per-row log-sum-exp; no (T, T) matrix is
// kept between forward and backward.
Tensor attention(const Tensor& qkv, int64_t n_head);

// ---- softmax and losses (ops/softmax.cpp, ops/cross_entropy.cpp) ----------------------------------------------
Tensor softmax(const Tensor& x);                               // over the last dimension
// Mean over the non-ignored rows of −log softmax(logits)[target]. logits (N, Vp) or (B, T, Vp);
// targets i32 with logits' leading shape, on the logits' device or the host (checked and counted on the
// host: from there the step does not wait for the GPU; from the GPU it does). Only the first `vocab`
// columns take part (the rest is padding with zero gradient); vocab <= 0 means all. Targets equal to
// ignore_index are skipped.
// When every row is skipped the loss is 0 and so is the gradient (an empty mean is taken as 0).
// expected_dloss: the gradient backward will bring the loss (1 for a root; the micro-batch scale where
// the caller backpropagates scale·loss). Where the logits need a gradient the forward computes it for
// that dloss in its own pass over them; another dloss costs a rescaling pass in backward (and one more
// rounding).
Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t vocab = -1, int32_t ignore_index = -1,
                     float expected_dloss = 1.0f);

// Non-differentiable companion for evaluation: Σ of the per-row losses and how many rows counted.
struct LossSum {
  double sum = 0.0;
  int64_t count = 0;
};
LossSum cross_entropy_sum(const Tensor& logits, const Tensor& targets, int64_t vocab = -1, int32_t ignore_index = -1);

// ---- regularisation (ops/dropout.cpp) -----------------------------------------------------------------------
// Zeroes each element with probability p and scales the rest by 1/(1 − p). The mask comes from the
// generator's counter-based stream, so backward regenerates it instead of storing it, and the CUDA
// kernel draws the same mask as the CPU. p = 0 (or grad mode off and `training` false) is identity.
Tensor dropout(const Tensor& x, float p, Generator& generator, bool training = true);

}  // namespace kraken::runtime::ops
