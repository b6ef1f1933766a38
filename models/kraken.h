// The Kraken transformer (Prabhakar, Zhang, Wentzlaff, NeurIPS 2024; spec in research/kraken.md, read
// from the authors' training/model.py). Every layer is `degree` independent sub-layers, each a full-width
// pre-LN GPT-2 block with its own parameters and its own residual stream; the streams meet once per
// layer, in the input of each sub-layer's MLP, through S = Σ_j x_j (the one collective per layer when
// the sub-layers live on different devices). Degree 1 is exactly GPT-2 (our decision, kraken.md).
//
// Forward (x_i: sub-layer i's stream; kraken.md "The model, degree k ≥ 2"):
//   x0 = wte[idx] + wpe[pos]                              every stream starts from x0
//   a_i = x_i + Attn_i(LN1_i(x_i))
//   m_i = a_i                                 in layer 0 (no mixing yet)
//   m_i = Attn_i(LN1_i(x_i)) + S,  S = Σ_j x_j   in layers ≥ 1 (= a_i − x_i + S: the other streams join)
//   x_i ← a_i + MLP_i(LN2_i(m_i))                        the sum feeds only the MLP input
//   z = W_conj · concat_i(x_i) (+ b)                      the "conjunction", Linear(kC → C)
//   logits = LN_f(z) · wteᵀ                               tied embedding
// With degree 1, S = x_1 and m_1 = a_1, so the same code is GPT-2's block; there is no conjunction.
// In code a process's n streams are one stacked tensor X (n, B, T, C) and each step above one call of a
// grouped op for all n sub-layers (runtime/ops.h: linear, mlp and layernorm with a leading group
// dimension, attention over n·B sequences, S summed in the residual fork, ops::residual_fork_summed, or
// sum_stack(X) all-reduced under Kraken's tp): on a GPU one strided-batch product per
// Linear instead of n small ones. The parameters stay one tensor per sub-layer (checkpoint names
// h.{l}.{i}.…); each layer stacks its matrices for the forward (ops::stack_many, which under mixed
// precision is also the cast to bf16).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "parallel/collectives.h"
#include "parallel/communicator.h"
#include "runtime/module.h"
#include "runtime/rng.h"
#include "runtime/tensor.h"

namespace kraken::models {

struct KrakenConfig {
  int64_t n_layer = 12;
  int64_t n_embd = 768;   // C
  int64_t n_head = 12;    // H, over all sub-layers: each sub-layer has H / degree heads of size C / (H / degree)
  int64_t degree = 1;     // k, sub-layers per layer
  int64_t context = 1024; // maximum sequence length (rows of wpe)
  int64_t vocab_size = 50257;
  int64_t mlp_expansion = 4;  // e: the MLP is C → eC → C (the paper's Kraken presets use 2)
  bool bias = true;           // biases in every Linear and LayerNorm (the paper's Kraken: none)
  float dropout = 0.0f;

  // The vocabulary rounded up to a multiple of 64 (wte rows); the loss uses the first vocab_size.
  int64_t padded_vocab() const { return (vocab_size + 63) / 64 * 64; }
  int64_t heads_per_sublayer() const { return n_head / degree; }
  int64_t head_size() const { return n_embd / heads_per_sublayer(); }
  // Throws kraken::Error naming the field and what was expected.
  void validate() const;
  // The closed form, with the padded vocabulary:
  //   Vp·C + T·C + k·L·((4 + 2e)C² + [bias] (9 + e)C + [no bias] 2C) + [k > 1] (kC² + [bias] C) + C (+ C)
  int64_t parameter_count() const;
  // Training (forward + backward) FLOPs per token as llm.c counts them for its MFU (gpt2_estimate_mfu,
  // research/llmc.md): 6·N + 6·k·L·C·T, N every parameter (the tied wte once), attention's q·kᵀ and p·v
  // over the causal half of the T×T scores. The MFU the trainer and the benchmark report, so that ours
  // and llm.c's (the "50%, where llm.c stands") are one measure.
  double training_flops_per_token(int64_t seq_len) const;
  // The same with the matrix parameters only and attention over every one of the T×T scores (PaLM's
  // appendix B, nanoGPT's estimate_mfu): 6·(matrix parameters) + 12·k·L·C·T, 6.4% above llm.c's count
  // for GPT-2 124M at T = 1024 and 8.7% at GPT-2's shape at degree 4. The benchmark's reports up to the
  // twenty-eighth session (bench/RESULTS.md) computed their MFU with this one.
  double full_attention_training_flops_per_token(int64_t seq_len) const;
};

// Which part of the model this process holds. The defaults are the whole model in one process;
// pipeline parallelism gives a process a range of layers, tensor parallelism a part of every layer:
//   degree k > 1 (Kraken): tp ranks split each layer's sub-layers, k / tp whole sub-layers each; the
//     layer's one collective is the asynchronous all-reduce of S (parallel/collectives.h), started
//     after the previous layer and waited on at LN2, behind this layer's attention;
//   degree 1 (GPT-2, Megatron-LM's tensor parallelism): heads and MLP columns are split — c_attn and
//     c_fc column-parallel, both c_proj row-parallel — with copy_to_tp / reduce_from_tp around each
//     branch: two all-reduces per layer in forward and two in backward, each on the critical path.
struct ModelShard {
  int64_t first_layer = 0;
  int64_t last_layer = -1;    // exclusive; -1 = n_layer
  bool has_embedding = true;  // wte, wpe (first pipeline stage)
  bool has_head = true;       // conjunction, ln_f, the tied LM head (last pipeline stage)
  int tp_rank = 0;
  int tp_size = 1;
  parallel::Communicator* tp = nullptr;  // the tensor-parallel group, when tp_size > 1
};

// Where GPT-2's attention and MLP projections add their biases: in the LayerNorm after each residual
// add, which sums their gradients in its backward pass (ops::add_bias_layernorm; the default), or in the
// products' epilogues. KRAKEN_PROJECTION_BIASES=norms|products sets it for the process; a scope sets it
// for this thread while it lives (tests run both). Without dropout only, and in a Kraken layer (degree > 1)
// where a LayerNorm follows a plain add: LN2 of a layer without S, the next layer's LN1 (not the fork with
// LN2, nor the conjunction); the same model either way.
bool projection_biases_in_norms();
class ProjectionBiasesScope {
 public:
  explicit ProjectionBiasesScope(bool in_norms);
  ~ProjectionBiasesScope();
  ProjectionBiasesScope(const ProjectionBiasesScope&) = delete;
  ProjectionBiasesScope& operator=(const ProjectionBiasesScope&) = delete;

 private:
  int previous_;
};

class KrakenModel : public runtime::Module {
 public:
  KrakenModel(const KrakenConfig& config, const runtime::Device& device = runtime::Device::cpu(),
              const ModelShard& shard = {});

  const KrakenConfig& config() const { return config_; }

  // ids (B, T) i32 → logits (B, T, Vp). `dropout` is the generator for dropout masks (may be null when
  // config.dropout == 0 or when not training). Needs the whole depth (first and last stage).
  runtime::Tensor forward(const runtime::Tensor& ids, runtime::Generator* dropout = nullptr, bool training = true);
  // One pipeline stage: the first reads `ids`, the others `input`, the boundary activation
  // (B, T, local_streams·C) of the stage before; the last returns logits (B, T, Vp), the others the
  // boundary activation.
  runtime::Tensor stage_forward(const runtime::Tensor& ids, const runtime::Tensor& input,
                                runtime::Generator* dropout = nullptr, bool training = true);
  // Mean cross-entropy over the real vocabulary; targets (B, T) i32 (negative targets are ignored).
  // expected_dloss: the gradient the caller's backward will bring the loss (ops::cross_entropy).
  runtime::Tensor loss(const runtime::Tensor& ids, const runtime::Tensor& targets,
                       runtime::Generator* dropout = nullptr, bool training = true, float expected_dloss = 1.0f);

  // Mixed precision (DESIGN.md "Precision"): with bf16 the residual streams, every activation and
  // every matrix product are bf16; the parameters stay f32 (the optimizer's master weights) and the
  // matrices and biases are cast to bf16 for each forward, one ops::cast_many per layer and one for the
  // head (stage_forward says why), so their gradients come back to the f32 masters through the casts. LayerNorm keeps f32 gamma and beta; the logits are bf16 and the
  // loss f32.
  void set_compute_dtype(runtime::DType dtype);
  runtime::DType compute_dtype() const { return compute_dtype_; }

  // Mixed precision: the bf16 buffers the forward casts the matrices and biases into, made on the first
  // call (after set_compute_dtype) and kept — per layer the stacks the grouped products take, per
  // Megatron layer and for the head one buffer a parameter — as (parameter, its bf16 copy) pairs, the
  // copy a view into its layer's stack where there is one: for an optimizer to rewrite after each update
  // (optim::Optimizer::set_compute_copies), so that AdamW writes the bf16 weights in its own pass.
  // Empty in f32.
  std::vector<std::pair<runtime::Tensor, runtime::Tensor>> compute_copy_targets();
  // Whether those buffers hold every parameter's current value rounded to bf16, as an optimizer that
  // writes them leaves them after its step: a forward then takes them as they are, where it would cast
  // every weight again. Whoever sets it vouches for it: the trainer, right after such a step, and clears
  // it when it stops (anything else that changes a parameter would leave the copies stale). Off at first.
  void set_compute_copies_current(bool current) { copies_current_ = current; }

  // The tied wte (V_p, C), for checkpoint code that needs to know which parameter is shared.
  const runtime::Tensor& wte() const { return wte_; }
  const ModelShard& shard() const { return shard_; }
  // Residual streams this process carries: degree / tp (Kraken), or 1 (degree 1).
  int64_t local_streams() const { return local_streams_; }
  int64_t first_stream() const { return first_stream_; }
  // The boundary activation's shape for a (B, T) batch.
  runtime::Shape boundary_shape(int64_t B, int64_t T) const { return {B, T, local_streams_ * config_.n_embd}; }

 private:
  struct SubLayer {
    runtime::Tensor ln_1_w, ln_1_b, c_attn_w, c_attn_b, attn_proj_w, attn_proj_b;
    runtime::Tensor ln_2_w, ln_2_b, c_fc_w, c_fc_b, mlp_proj_w, mlp_proj_b;
  };
  runtime::Tensor dropout(const runtime::Tensor& x, runtime::Generator* gen, bool training);
  // A layer's output x ← a + MLP(…), left as its two terms: the next layer's LN1 adds them in its own
  // pass (ops::add_layernorm), where an add of its own would write the sum and LN1 read it back.
  // x = a + (m + m_bias): m_bias, the MLP projection's biases (n, C) (GPT-2's (C,)), where they were left
  // out of the product for the LayerNorm after the add to take (ops::add_bias_layernorm); else undefined.
  struct Unsummed {
    runtime::Tensor a, m, m_bias;
    bool defined() const { return a.defined(); }
  };
  // One layer on the stacked streams X (n, B, T, C), n = local_streams(), with h1 = LN1_i(x_i) already
  // taken (by the caller, fused with the previous layer's last add): every op takes the n sub-layers at
  // once, their parameters stacked (the grouped ops of runtime/ops.h), so a layer is one LayerNorm,
  // product, attention and MLP call each rather than n. S = Σ_j x_j over all sub-layers mixes into each:
  // `sum_here` where every sub-layer is local (summed in the residual fork itself, ops::residual_fork_summed),
  // else `pending`, its all-reduce under Kraken's tp; neither in the first layer, where nothing mixes.
  // stacks: the layer's persistent bf16 stacks (compute_copy_targets), or empty. mlp_bias_onward: a
  // LayerNorm after this layer's last add can take the MLP projection's bias (Unsummed::m_bias).
  Unsummed layer_forward(const std::vector<SubLayer>& subs, const std::vector<runtime::Tensor>& stacks,
                         const runtime::Tensor& X, const runtime::Tensor& h1, bool sum_here, bool mlp_bias_onward,
                         parallel::PendingReduce& pending, runtime::Generator* gen, bool training);
  // The lists a layer's grouped products take stacked, in layer_forward's order (each kind, every local
  // sub-layer): c_attn, attn_proj, c_fc, mlp_proj, weight then bias.
  static std::vector<std::vector<runtime::Tensor>> stack_lists(const std::vector<SubLayer>& subs);
  // One layer of Megatron-LM's tensor parallelism (degree 1, tp > 1) on its one stream x (B, T, C).
  runtime::Tensor megatron_layer_forward(const SubLayer& s, const runtime::Tensor& x, runtime::Generator* gen,
                                         bool training);

  bool megatron() const { return config_.degree == 1 && shard_.tp_size > 1; }
  // A parameter as the products use it: itself in f32; under mixed precision its bf16 copy from this
  // forward's cast_for_compute, or its own cast where there is none.
  runtime::Tensor compute(const runtime::Tensor& param);
  // The parameters that reach the products through compute(): a layer's (weights and biases of its four
  // Linears, every local sub-layer), and the head's (the conjunction's, the tied wte).
  std::vector<runtime::Tensor> product_params(const std::vector<SubLayer>& subs) const;
  std::vector<runtime::Tensor> head_product_params() const;
  // Casts `params` to the compute dtype in one ops::cast_many (into their persistent buffers where
  // compute_copy_targets made them; nothing to cast while those are current) and keeps the copies for
  // compute().
  void cast_for_compute(const std::vector<runtime::Tensor>& params);

  KrakenConfig config_;
  ModelShard shard_;
  int64_t local_streams_ = 1, first_stream_ = 0;
  runtime::DType compute_dtype_ = runtime::DType::F32;
  runtime::Tensor wte_, wpe_, conj_w_, conj_b_, ln_f_w_, ln_f_b_;
  std::vector<std::vector<SubLayer>> layers_;  // [layer - first_layer][sub-layer]
  // The bf16 copies of the current forward, by parameter; emptied when the forward returns (the tape
  // holds what backward needs).
  std::unordered_map<const runtime::TensorImpl*, runtime::Tensor> compute_copies_;
  // compute_copy_targets' persistent buffers: per layer its stacks (undefined where a list has none);
  // per parameter cast one by one (Megatron's layers, the head) its buffer.
  std::vector<std::vector<runtime::Tensor>> layer_stacks_;
  std::unordered_map<const runtime::TensorImpl*, runtime::Tensor> param_buffers_;
  bool copies_current_ = false;
};

}  // namespace kraken::models
